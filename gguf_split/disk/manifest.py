"""Manifests: what hashing one GGUF file yields, enough to plan a split without reading a tensor byte again.

Hashing is the whole cost of planning (a split of ten fine-tunes of a 70B model reads 400 GB), so the
result of hashing a file is kept: its manifest. Per file: the identity it was hashed under (`FileKey`:
device, inode, size, mtime_ns, ctime_ns, so any change to the file, or a file put in its place, gives
another key), the whole file's xxh3-128 (what restore proves its output against), the xxh3-128 of its
frame (every byte outside the tensors: header and padding, so a caller that re-reads the header can
check that the header it sees is the one hashed), per tensor in header order its name, ggml type, shape,
offset, size and xxh3-128 (a TensorId without reading the tensor), and a few header facts a survey
reports (architecture, names, types, llama.cpp's split keys, gguf-split's role, the `quantize.imatrix.*`
hints).

Why in disk/: the scanner (assemble.scan) takes digests from a `ManifestSource` and leaves manifests
there, and the survey (above assemble) makes and stores them; the types both use live below both.
`survey.manifest.scan_file` makes one from a path; `disk.manifest_cache` keeps them on disk.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from gguf.constants import GGUFValueType, Keys

from ..format.gguf import GGUFFile, TensorInfo, type_name
from .sweep import GAP, HEADER, file_spans, sweep

MODEL, OWN_FILE, PACK = "model", "gguf-split file", "pack"  # kinds of scanned file
FORMAT = 1  # of the encoded manifest (cache.py keeps its own schema version besides)

# llama.cpp's tools/quantize/quantize.cpp writes these (gguf.constants has no names for them); only the
# llama-quantize command line writes them, and they hold a path, a dataset name and counts: a hint of how
# a file was quantized, never proof of it.
IMATRIX_FILE = "quantize.imatrix.file"
IMATRIX_DATASET = "quantize.imatrix.dataset"
IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"

_STRING_FACTS = {"architecture": Keys.General.ARCHITECTURE, "general_type": Keys.General.TYPE, "name": Keys.General.NAME,
                 "basename": Keys.General.BASENAME, "finetune": Keys.General.FINETUNE,
                 "size_label": Keys.General.SIZE_LABEL, "imatrix_file": IMATRIX_FILE,
                 "imatrix_dataset": IMATRIX_DATASET, "role": "gguf_split.role", "task": "gguf_split.task",
                 "base_model": Keys.General.BASE_MODEL_NAME.format(id=0)}
_INT_FACTS = {"file_type": Keys.General.FILE_TYPE, "imatrix_entries": IMATRIX_ENTRIES,
              "imatrix_chunks": IMATRIX_CHUNKS, "split_no": Keys.Split.LLM_KV_SPLIT_NO,
              "split_count": Keys.Split.LLM_KV_SPLIT_COUNT, "split_tensors": Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT}
_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64,
              GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64}
_MAX_FACT_BYTES = 4096  # a longer string is not a name: not decoded (a hostile file may put 1 GiB there)


@dataclass(frozen=True, slots=True)
class FileKey:
    """What identifies a file's content without reading it: a change of any field means "hash again".
    mtime_ns alone is not enough (a tool may put it back; utime() cannot put back ctime), nor is the path
    (a file replaced by another under the same name has another inode)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileKey":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def changed_ns(self) -> int:
        """The later of the two timestamps a write moves (what the racy-clean rule compares)."""
        return max(self.mtime_ns, self.ctime_ns)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # relative to the data section, as in the header
    nbytes: int
    digest: bytes  # xxh3-128


@dataclass(frozen=True)
class FileManifest:
    """One scanned file. `kind` MODEL: a GGUF file (a model or one shard of one), every digest filled;
    OWN_FILE: a file gguf-split wrote (an adaptor or a shared file: its facts, no digests); PACK: a
    gguf-split pack (facts: its kind and tasks)."""

    path: str
    key: FileKey
    kind: str
    recorded_ns: int  # wall clock before the file was first looked at (the racy-clean rule)
    xxh3: bytes = b""
    frame: bytes = b""
    tensors: tuple[TensorEntry, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.key.size

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def fact(self, name: str) -> Any:
        return self.facts.get(name)

    def with_path(self, path: str, key: FileKey | None = None, recorded_ns: int | None = None) -> "FileManifest":
        """The same content seen under another path (and key, as another host or a later stat sees it)."""
        return FileManifest(path, key or self.key, self.kind, self.recorded_ns if recorded_ns is None else recorded_ns,
                            self.xxh3, self.frame, self.tensors, self.facts)


class ManifestSource(Protocol):
    """Where a scanner finds a file's manifest before hashing it, and leaves the manifests it makes."""

    def lookup(self, path: str, st: os.stat_result) -> FileManifest | None:
        """A manifest to trust for the file `path` whose fstat is `st`, or None (hash it)."""

    def store(self, manifest: FileManifest) -> None:
        """Keep a manifest just made (its key and recorded_ns say what it holds for)."""

    def forget(self, path: str, st: os.stat_result) -> None:
        """Drop whatever is kept for this file (its bytes were found to differ from its manifest)."""


# --- scanning -------------------------------------------------------------------------------------------

def header_facts(f: GGUFFile) -> dict[str, Any]:
    """The header facts a survey reports, decoding only small scalars and strings of the known keys."""
    h = f.header
    facts: dict[str, Any] = {"version": h.version, "alignment": h.alignment, "data_start": h.data_start,
                             "kv_bytes": h.tensor_info_start, "tensor_count": len(h.tensors)}
    for name, key in _STRING_FACTS.items():
        kv = h.kv_by_key.get(key)
        if kv is not None and kv.vtype is GGUFValueType.STRING and kv.end - kv.value_start <= _MAX_FACT_BYTES:
            value = f.kv_value(key)
            facts[name] = value if isinstance(value, str) else bytes(value).decode("utf-8", "backslashreplace")
    for name, key in _INT_FACTS.items():
        kv = h.kv_by_key.get(key)
        if kv is not None and kv.vtype in _INT_TYPES:
            value = f.kv_value(key)
            if isinstance(value, int) and not isinstance(value, bool):
                facts[name] = value
    if any(k.startswith("gguf_split.") for k in h.kv_by_key):
        facts.setdefault("role", "output")
    return facts


def frame_digest(f: GGUFFile) -> bytes:
    """xxh3-128 of every byte of `f` outside its tensors, in file order (header, then the gaps)."""
    return sweep([s for s in file_spans(f) if s.role in (HEADER, GAP)]).xxh3


def manifest_of(f: GGUFFile, key: FileKey, recorded_ns: int, xxh3: bytes, tensor_digests: list[bytes]) -> FileManifest:
    """The manifest of an open, hashed GGUF file (tensor digests in header order)."""
    tensors = tuple(TensorEntry(t.name, t.ggml_type, t.shape, t.offset, t.nbytes, d)
                    for t, d in zip(f.header.tensors, tensor_digests))
    return FileManifest(f.path, key, MODEL, recorded_ns, xxh3, frame_digest(f), tensors, header_facts(f))


def matches_header(m: FileManifest, tensors: list[TensorInfo]) -> bool:
    """The manifest describes these tensor records (name, type, shape, offset, size, in order)."""
    return m.kind == MODEL and len(m.tensors) == len(tensors) and all(
        e.name == t.name and e.ggml_type == t.ggml_type and e.shape == t.shape and e.offset == t.offset
        and e.nbytes == t.nbytes for e, t in zip(m.tensors, tensors))


# --- the stored form ------------------------------------------------------------------------------------

def encode(m: FileManifest) -> bytes:
    """The manifest without its path and key (the store keeps those apart), as compressed JSON."""
    body = {"format": FORMAT, "kind": m.kind, "xxh3": m.xxh3.hex(), "frame": m.frame.hex(), "facts": m.facts,
            "tensors": [[t.name, t.ggml_type, list(t.shape), t.offset, t.nbytes] for t in m.tensors],
            "digests": b"".join(t.digest for t in m.tensors).hex()}
    return zlib.compress(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(), 1)


def decode(blob: bytes, path: str, key: FileKey, recorded_ns: int) -> FileManifest:
    """`encode`'s inverse; ValueError for anything that is not exactly what `encode` writes."""
    try:
        body = json.loads(zlib.decompress(blob))
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError("another manifest format")
        rows, digests = body["tensors"], bytes.fromhex(body["digests"])
        if not isinstance(rows, list) or len(digests) != 16 * len(rows) or not isinstance(body["facts"], dict):
            raise ValueError("inconsistent manifest")
        tensors = tuple(TensorEntry(str(name), int(ty), tuple(int(x) for x in shape), int(off), int(n),
                                    digests[16 * i:16 * i + 16])
                        for i, (name, ty, shape, off, n) in enumerate(rows))
        kind = body["kind"]
        if kind not in (MODEL, OWN_FILE, PACK):
            raise ValueError(f"unknown kind {kind!r}")
        return FileManifest(path, key, kind, recorded_ns, bytes.fromhex(body["xxh3"]), bytes.fromhex(body["frame"]),
                            tensors, body["facts"])
    except (KeyError, TypeError, zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"damaged manifest: {e}") from None


def dominant_type(m: FileManifest) -> str | None:
    """The ggml type holding most of the file's tensor bytes (what "a Q4_K_M file" mostly is)."""
    by_type: dict[int, int] = {}
    for t in m.tensors:
        by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.nbytes
    return type_name(max(by_type, key=lambda k: by_type[k])) if by_type else None
