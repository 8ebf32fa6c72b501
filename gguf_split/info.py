"""Info: what a foundation, an adaptor or any GGUF holds, and what a split directory saves.

Reads headers only (no tensor data), so it is instant on any model size.
"""

from __future__ import annotations

import os
from typing import Any

from .gguf_format import ARCHITECTURE_KEY, GGUFFile
from .layout import (
    K_FOUNDATION_FILE,
    K_FOUNDATION_ID,
    K_SRC_NAME,
    K_SRC_SIZE,
    K_SRC_XXH3,
    K_TASK,
    ROLE_ADAPTOR,
    ROLE_FOUNDATION,
    SPLIT_KEYS,
    U64,
    check_seal,
    open_output,
    record,
    role_of,
)
from .restore import find_split


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description of one GGUF file (header only)."""
    with open_output(path) as f:
        h = f.header
        role = role_of(f) or "model"
        if role in (ROLE_FOUNDATION, ROLE_ADAPTOR):
            check_seal(f)  # its records are read below: refuse a damaged header with one clear error
        out: dict[str, Any] = {
            "path": f.path,
            "role": role,
            "file_bytes": f.size,
            "gguf_version": h.version,
            "architecture": f.get(ARCHITECTURE_KEY),
            "alignment": h.alignment,
            "tensors": len(h.tensors),
            "tensor_bytes": sum(t.nbytes for t in h.tensors),
            "header_bytes": h.data_start,
            "types": _type_counts(f),
        }
        if role == ROLE_FOUNDATION:
            out["foundation_id"] = f.get(K_FOUNDATION_ID)
        elif role == ROLE_ADAPTOR:
            out.update({
                "task": f.get(K_TASK),
                "foundation_id": f.get(K_FOUNDATION_ID),
                "foundation_file": f.get(K_FOUNDATION_FILE),
                "model_tensors": f.get("split.tensors.count"),
                "kvs": len(f.tail),
                "source": {"name": f.get(K_SRC_NAME), "bytes": record(f, K_SRC_SIZE, U64),
                           "xxh3": f.get(K_SRC_XXH3)},
            })
        else:
            out["kvs"] = len(h.kvs)
            out["split"] = {k: f.get(k) for k in SPLIT_KEYS if k in h.kv_by_key} or None
        out["tensor_list"] = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes}
                              for t in h.tensors]
        return out


def _type_counts(f: GGUFFile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in f.header.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts


def savings(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Sizes of a split directory against the models it replaces."""
    foundation, adaptors = find_split(directory)
    fnd = describe(foundation)
    rows = [describe(a) for a in adaptors]
    inputs = sum(int(r["source"]["bytes"]) for r in rows)
    total = fnd["file_bytes"] + sum(r["file_bytes"] for r in rows)
    return {
        "directory": os.fspath(directory),
        "foundation": {"path": foundation, "bytes": fnd["file_bytes"], "tensors": fnd["tensors"],
                       "id": fnd["foundation_id"]},
        "adaptors": [{"task": r["task"], "path": r["path"], "bytes": r["file_bytes"], "tensors": r["tensors"],
                      "source": r["source"]["name"], "source_bytes": r["source"]["bytes"],
                      "foundation_match": r["foundation_id"] == fnd["foundation_id"]} for r in rows],
        "input_bytes": inputs,
        "output_bytes": total,
        "saved_bytes": inputs - total,
        "ratio": total / inputs if inputs else None,
    }
