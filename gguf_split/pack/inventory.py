"""Packing, stages 1 and 2: hash the input files, then list what they hold once each (every distinct tensor,
every distinct piece of header) and each file as the parts that rebuild it.

Why first and apart: everything after (which tensor is a delta of which, the order of the records, the
index) works on this inventory alone; the files are only read again for the bytes of a record. The
hashing is `disk.sweep`'s one pass per file (its sha256 and xxh3-128, each tensor's xxh3-128), on
`disk.jobs.run_jobs`, so Ctrl-C stops it at once. A distinct tensor is its xxh3-128 + ggml type + shape;
a header is cut at every KV record of BIG_KV bytes or more (a tokenizer's arrays, the same in every file
of a family), each such record and each run between them a blob, stored once by its xxh3-128 and size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import xxhash

from ..disk.jobs import run_jobs
from ..disk.progress import Progress, Reporter
from ..disk.sweep import Digests, sweep_file
from ..errors import GGUFSplitError
from ..format.gguf import GGUFFile, TensorInfo, iter_gaps
from . import codec
from .codec import CodecError, Geometry, RowReader
from .format import BIG_KV, PART_BLOB, PART_TENSOR, PART_ZEROS, Part


@dataclass
class Source:
    """Where a distinct tensor is found: a file and the tensor's entry in its header."""

    file: GGUFFile
    info: TensorInfo


@dataclass
class DistinctTensor:
    """A distinct tensor: xxh3-128 + type + shape, with every place it occurs."""

    index: int
    digest: bytes
    ggml_type: int
    shape: tuple[int, ...]
    geo: Geometry
    rows_per_chunk: int
    sources: list[Source] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # every name it is found under, the first first

    @property
    def occurrences(self) -> int:
        return len(self.sources)

    @property
    def file_count(self) -> int:
        return len({id(s.file) for s in self.sources})

    def rows(self) -> RowReader:
        """Its bytes by rows, from its first source: (r0, r1) -> a view of rows [r0, r1)."""
        src = self.sources[0]
        f = src.file
        start = f.header.data_start + src.info.offset
        rb = self.geo.row_bytes
        return lambda r0, r1: f.view(start + r0 * rb, start + r1 * rb)


@dataclass
class Blob:
    """A distinct piece of header (or of non-zero padding): bytes [start, end) of a file."""

    index: int
    file: GGUFFile
    start: int
    end: int
    digest: bytes

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class Inventory:
    """What the input files hold, each distinct thing once, and each file as parts (format.Part)."""

    files: list[GGUFFile]
    digests: list[Digests]  # per file: sha256, xxh3-128, each tensor's xxh3-128 (header order)
    tensors: list[DistinctTensor] = field(default_factory=list)
    blobs: list[Blob] = field(default_factory=list)
    parts: list[list[Part]] = field(default_factory=list)  # per file
    _tensor_keys: dict[tuple[bytes, int, tuple[int, ...]], DistinctTensor] = field(default_factory=dict)
    _blob_keys: dict[tuple[bytes, int], Blob] = field(default_factory=dict)

    def blob(self, f: GGUFFile, start: int, end: int) -> Part:
        v = f.view(start, end)
        key = (xxhash.xxh3_128_digest(v), end - start)
        v.release()
        b = self._blob_keys.get(key)
        if b is None:
            b = self._blob_keys[key] = Blob(len(self.blobs), f, start, end, key[0])
            self.blobs.append(b)
        return Part(PART_BLOB, b.index)

    def tensor(self, f: GGUFFile, t: TensorInfo, digest: bytes) -> Part:
        key = (digest, t.ggml_type, t.shape)
        d = self._tensor_keys.get(key)
        if d is None:
            try:
                geo = codec.geometry(t.ggml_type, t.shape)
            except CodecError as e:
                raise GGUFSplitError(f.path, f"tensor {t.name!r}: {e}") from None
            d = DistinctTensor(len(self.tensors), digest, t.ggml_type, t.shape, geo, codec.default_rows_per_chunk(geo))
            self.tensors.append(d)
            self._tensor_keys[key] = d
        d.sources.append(Source(f, t))
        if t.name not in d.names:
            d.names.append(t.name)
        return Part(PART_TENSOR, d.index)


def hash_files(files: list[GGUFFile], threads: int, progress: Progress) -> list[Digests]:
    """Stage 1: each file's sha256, xxh3-128 and tensor digests, one sweep per file, files in parallel."""
    digests: list[Digests | None] = [None] * len(files)

    def hash_one(i: int, bar: Reporter, cancel: threading.Event) -> None:
        digests[i] = sweep_file(files[i], sha256=True, bar=bar, cancel=cancel)

    with progress.bar("hashing", sum(f.size for f in files)) as bar:
        run_jobs(hash_one, [(i, bar) for i in range(len(files))], threads)
    return [d for d in digests if d is not None]


def take_inventory(files: list[GGUFFile], digests: list[Digests]) -> Inventory:
    """Stage 2: the distinct tensors and header pieces of `files`, and each file as parts."""
    inv = Inventory(files, digests)
    for f, d in zip(files, digests):
        inv.parts.append(_file_parts(inv, f, d))
    return inv


def _file_parts(inv: Inventory, f: GGUFFile, d: Digests) -> list[Part]:
    """A file as parts in file order: header blobs, then tensors and gaps (zeros, or a blob)."""
    h = f.header
    spans = _header_spans(inv, f)
    spans += [(a, b, _gap_part(inv, f, a, b)) for a, b in iter_gaps(h)]
    for t, digest in zip(h.tensors, d.tensors):
        start = h.data_start + t.offset
        spans.append((start, start + t.nbytes, inv.tensor(f, t, digest)))
    spans.sort(key=lambda s: (s[0], s[1]))
    pos = 0
    for a, b, _ in spans:
        if a != pos:
            raise GGUFSplitError(f.path, f"internal: file parts do not tile the file at byte {pos}")
        pos = b
    if pos != f.size:
        raise GGUFSplitError(f.path, f"internal: file parts end at {pos}, the file has {f.size} bytes")
    return [p for _, _, p in spans]


def _header_spans(inv: Inventory, f: GGUFFile) -> list[tuple[int, int, Part]]:
    """The header up to the end of the tensor infos as blobs: every KV record of BIG_KV bytes or more on its
    own, the runs between them."""
    h = f.header
    spans: list[tuple[int, int, Part]] = []
    start = 0
    for kv in h.kvs:
        if kv.end - kv.start >= BIG_KV:
            if kv.start > start:
                spans.append((start, kv.start, inv.blob(f, start, kv.start)))
            spans.append((kv.start, kv.end, inv.blob(f, kv.start, kv.end)))
            start = kv.end
    if h.tensor_info_end > start:
        spans.append((start, h.tensor_info_end, inv.blob(f, start, h.tensor_info_end)))
    return spans


def _gap_part(inv: Inventory, f: GGUFFile, a: int, b: int) -> Part:
    v = f.view(a, b)
    zero = not np.frombuffer(v, dtype=np.uint8).any()
    v.release()
    return Part(PART_ZEROS, b - a) if zero else inv.blob(f, a, b)
