"""Info: what a file holds, what a split directory saves, and which files one task needs.

Reads headers only (no tensor data), so it is instant on any model size. A split directory is checked as
far as headers tell (seals, every task's files present and the ones recorded): an inconsistent split is
an error, as in `verify`, not a line in a table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..format.gguf import ARCHITECTURE_KEY, GGUFFile
from ..format.records import (
    K_CONTENT_ID,
    K_TASK,
    ROLE_ADAPTOR,
    ROLE_SHARED,
    SPLIT_KEYS,
    AdaptorInfo,
    SplitFile,
    open_split_file,
    role_of,
)
from .directory import open_tasks


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description of one GGUF file (header only)."""
    with open_split_file(path) as f:
        h = f.header
        role = role_of(f) or "model"
        if isinstance(f, SplitFile):
            f.check_seal()  # its records are read below: refuse a damaged header with one clear error
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
        if isinstance(f, SplitFile) and role == ROLE_SHARED:
            f.require(ROLE_SHARED)
            out["content_id"] = f.get(K_CONTENT_ID)
            out["split_no"] = f.split_no()
            out["hole"] = not h.tensors  # no tensors: only a split.no that fills a gap in some task's file list
        elif isinstance(f, SplitFile) and role == ROLE_ADAPTOR:
            a = AdaptorInfo.read(f)
            out.update({
                "task": f.get(K_TASK),
                "model_tensors": a.n_model_tensors,
                "kvs": len(f.tail),
                "files": [{"position": r.position, "name": r.name, "content_id": r.content_id, "bytes": r.size,
                           "sha256": r.sha256} for r in a.files],
                "sources": [{"name": s.name, "bytes": s.size, "xxh3": s.xxh3} for s in a.sources],
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


def savings(directory: str | os.PathLike[str], *, shared: Sequence[str] = ()) -> dict[str, Any]:
    """Files of a split directory, which tasks use each, and what the split saves (as of one state of the
    directory: splitdir.open_tasks)."""
    users: dict[str, list[str]] = {}
    tasks: list[dict[str, Any]] = []
    versions: dict[tuple[str, int, tuple[int, ...], bytes], int] = {}
    header_bytes = 0
    with open_tasks(directory, shared=shared) as opened:
        sd, cache = opened.split, opened.cache
        for task, tf in opened.tasks.items():
            for f in tf.files:
                for t, d in zip(f.header.tensors, f.digests()):
                    versions[(t.name, t.ggml_type, t.shape, d)] = t.nbytes
                if f is not tf.adaptor:
                    users.setdefault(os.path.abspath(f.path), []).append(task)
            header_bytes += tf.adaptor.header.data_start
            tasks.append({"task": task, "path": tf.adaptor.path, "bytes": tf.adaptor.size,
                          "tensors": len(tf.adaptor.header.tensors),
                          "files": [os.path.basename(f.path) for f in tf.shared],
                          "sources": [s.name for s in tf.info.sources],
                          "source_bytes": sum(s.size for s in tf.info.sources)})
        files: list[dict[str, Any]] = [{"name": os.path.basename(p), "path": p, "bytes": f.size, "tensors": len(f.header.tensors),
                  "position": f.split_no(), "tasks": users.get(os.path.abspath(p), [])}
                 for p, f in sorted(cache.items(), key=lambda kv: (kv[1].split_no(), kv[0]))]
    unused = [os.path.basename(p) for n, p in sd.shared.items() if os.path.abspath(p) not in cache]
    inputs = sum(t["source_bytes"] for t in tasks)
    total = sum(f["bytes"] for f in files) + sum(t["bytes"] for t in tasks)
    optimum = sum(versions.values()) + header_bytes
    return {
        "directory": os.fspath(directory),
        "tasks": tasks,
        "files": files,
        "unused": unused,
        "pending_commit": sd.pending,
        "input_bytes": inputs,
        "output_bytes": total,
        "saved_bytes": inputs - total,
        "ratio": total / inputs if inputs else None,
        "dedup_optimum_bytes": optimum,
        "over_optimum_bytes": total - optimum,
    }


def task_files(directory: str | os.PathLike[str], task: str, *, shared: Sequence[str] = ()) -> dict[str, Any]:
    """Exactly the files one task needs (e.g. to download just those from a hub), in llama.cpp order."""
    with open_tasks(directory, [task], shared=shared) as opened:
        tf = opened.tasks[task]
        rows = [{"position": 0, "path": tf.adaptor.path, "bytes": tf.adaptor.size, "sha256": None}]
        rows += [{"position": r.position, "path": f.path, "bytes": f.size, "sha256": r.sha256}
                 for r, f in zip(tf.info.files, tf.shared)]
        return {"task": task, "files": rows, "bytes": sum(r["bytes"] for r in rows)}
