"""The pack's index, both ways: the entries the writer fills in and turns into JSON, and the checks that turn
a pack's JSON back into entries a reader can trust (docs/pack-format.md, "The index").

Why one module: what a writer puts in the index and what a reader accepts are the same list of fields;
kept side by side, a field cannot be added to one and forgotten in the other. Every check here runs when
the index is read, before any record is, so a forged index (a name with a path, a size of 2^60, a chunk
offset in the middle of another record, a delta whose base is itself) is one line and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from ..errors import GGUFSplitError
from ..format.names import check_bare_name
from . import codec, ladder
from .codec import CodecError, Geometry
from .format import (CODEC_DELTA, CODEC_FPLANES, CODEC_PLAIN, CODEC_REQUANT, HEAD, MAX_FILE_BYTES,
                     MAX_RECORD_BYTES, PART_BLOB, PART_TENSOR, PART_ZEROS, RECORD, VERSION_CODECS, Corrupt, Part,
                     UnknownCodec, need)

FORMAT_NAME = "ggufpack"


# ---------------------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class FileEntry:
    """A file the pack gives back: its name, size and digests."""

    name: str
    size: int
    sha256: str
    xxh3: str


@dataclass
class PackIndex:
    """What `read_index` tells about a pack without unpacking it."""

    path: str
    version: int
    kind: Any
    meta: Any
    files: list[FileEntry]
    pack_bytes: int
    tensors: int  # distinct tensors stored


@dataclass
class BlobEntry:
    size: int
    xxh3: str
    record: int

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "xxh3": self.xxh3, "record": self.record}


@dataclass
class TensorEntry:
    """A distinct tensor: how it is cut into chunks and coded, and where its records are."""

    name: str
    geo: Geometry
    xxh3: str
    rows_per_chunk: int
    codec: str
    chunks: list[int]
    shuffle: int = 1  # plain, fplanes
    base: int | None = None  # delta: the base tensor's index, the factors' record (None at rank 0)
    rank: int = 0
    factor_type: str = "f16"
    residual: str = "sub"
    factors: int | None = None
    source: int | None = None  # requant: the source tensor's index, the port's version, the importance
    port: str = ladder.PORT  # vectors' (in_sum2, counts) tensors or None
    imatrix: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        e: dict[str, Any] = {"name": self.name, "type": int(self.geo.ggml_type), "shape": list(self.geo.shape),
                             "xxh3": self.xxh3, "rows_per_chunk": self.rows_per_chunk, "codec": self.codec,
                             "chunks": self.chunks}
        if self.codec in (CODEC_PLAIN, CODEC_FPLANES):
            e["shuffle"] = self.shuffle
        elif self.codec == CODEC_REQUANT:
            e.update({"source": self.source, "port": self.port,
                      "imatrix": list(self.imatrix) if self.imatrix is not None else None})
        else:
            e.update({"base": self.base, "rank": self.rank, "factor_type": self.factor_type,
                      "residual": self.residual, "factors": self.factors})
        return e


@dataclass
class FileParts:
    entry: FileEntry
    parts: list[Part]

    def to_json(self) -> dict[str, Any]:
        e = self.entry
        return {"name": e.name, "size": e.size, "sha256": e.sha256, "xxh3": e.xxh3,
                "parts": [p.to_json() for p in self.parts]}


@dataclass
class Index:
    """A pack's index: the caller's kind and meta, and the blobs, tensors and files."""

    kind: Any
    meta: Any
    blobs: list[BlobEntry] = field(default_factory=list)
    tensors: list[TensorEntry] = field(default_factory=list)
    files: list[FileParts] = field(default_factory=list)

    def to_json(self, version: int, writer: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": version,
            "kind": self.kind,
            "meta": self.meta,
            "writer": writer,
            "blobs": [b.to_json() for b in self.blobs],
            "tensors": [t.to_json() for t in self.tensors],
            "files": [f.to_json() for f in self.files],
        }


# ---------------------------------------------------------------------------------------------------------
# Reading: JSON -> checked entries (every problem raises Corrupt)


def parse_index(ix: Any, version: int, records_end: int) -> Index:
    """The entries of a decoded JSON index, every field checked; `records_end`: where the records stop (the
    index record's offset), so every record offset must lie between the head and it."""
    need(isinstance(ix, dict), "index is not a JSON object")
    need(ix.get("format") == FORMAT_NAME, f"index format is not {FORMAT_NAME!r}")
    need(ix.get("version") == version, f"index version {ix.get('version')!r} differs from the head's")
    blobs, tensors, files = ix.get("blobs"), ix.get("tensors"), ix.get("files")
    need(isinstance(blobs, list) and isinstance(tensors, list) and isinstance(files, list),
         "index lacks its blobs, tensors or files list")
    index = Index(ix.get("kind"), ix.get("meta"))
    index.blobs = [_parse_blob(i, b, records_end) for i, b in enumerate(blobs)]
    index.tensors = [_parse_tensor(i, t, records_end, version) for i, t in enumerate(tensors)]
    for i, t in enumerate(index.tensors):
        if t.codec == CODEC_DELTA:
            _check_base(i, t, index.tensors)
        elif t.codec == CODEC_REQUANT:
            _check_source(i, t, index.tensors)
    seen: set[str] = set()
    for i, f in enumerate(files):
        index.files.append(_parse_file(i, f, index, seen))
    return index


def _is_int(v: Any) -> bool:
    return type(v) is int


def _hexstr(v: Any, nbytes: int, what: str) -> str:
    need(isinstance(v, str) and len(v) == 2 * nbytes and all(c in "0123456789abcdef" for c in v),
         f"{what} is not a {nbytes}-byte lowercase hex digest")
    return str(v)


def _check_offset(off: Any, what: str, records_end: int) -> None:
    need(_is_int(off) and HEAD.size <= off and off + RECORD.size <= records_end,
         f"{what}: record offset {off!r} lies outside the records")


def _parse_blob(i: int, b: Any, records_end: int) -> BlobEntry:
    need(isinstance(b, dict), f"blob {i} is not an object")
    size, rec = b.get("size"), b.get("record")
    need(_is_int(size) and 0 <= size <= MAX_RECORD_BYTES, f"blob {i}: bad size {size!r}")
    _check_offset(rec, f"blob {i}", records_end)
    return BlobEntry(size, _hexstr(b.get("xxh3"), 16, f"blob {i} xxh3"), rec)


def _parse_tensor(i: int, t: Any, records_end: int, version: int) -> TensorEntry:
    need(isinstance(t, dict), f"tensor {i} is not an object")
    ty, shape = t.get("type"), t.get("shape")
    need(_is_int(ty) and isinstance(shape, list) and all(_is_int(d) for d in shape), f"tensor {i}: bad type or shape")
    try:
        geo = codec.geometry(ty, tuple(shape))
        rpc = t.get("rows_per_chunk")
        codec.check_rows_per_chunk(geo, rpc)
    except CodecError as e:
        raise Corrupt(f"tensor {i}: {e}") from None
    name = t.get("name")
    name = name if isinstance(name, str) else f"#{i}"
    chunks = t.get("chunks")
    n = geo.chunk_count(rpc)
    need(isinstance(chunks, list) and len(chunks) == n, f"tensor {i}: needs {n} chunks")
    for c in chunks:
        _check_offset(c, f"tensor {i} chunk", records_end)
    te = TensorEntry(name[:200], geo, _hexstr(t.get("xxh3"), 16, f"tensor {i} xxh3"), rpc, t.get("codec"), chunks)
    if not isinstance(te.codec, str) or te.codec not in VERSION_CODECS[version]:
        raise UnknownCodec(f"tensor {te.name!r} is coded with {str(te.codec)[:40]!r}, a codec this gguf-split does "
                           f"not know in a version {version} pack (a newer gguf-split wrote it?)")
    if te.codec in (CODEC_PLAIN, CODEC_FPLANES):
        te.shuffle = t.get("shuffle")
        try:
            codec.check_stride(geo, te.shuffle)
        except CodecError as err:
            raise Corrupt(f"tensor {i}: {err}") from None
        need(te.codec == CODEC_PLAIN or geo.ggml_type in ladder.FPLANES_TYPES,
             f"tensor {i}: type {geo.ggml_type} cannot be coded fplanes")
    elif te.codec == CODEC_DELTA:
        _parse_delta_fields(i, t, te, records_end)
    else:
        _parse_requant_fields(i, t, te)
    return te


def _parse_requant_fields(i: int, t: Any, te: TensorEntry) -> None:
    te.source, te.port = t.get("source"), t.get("port")
    if not isinstance(te.port, str) or te.port not in ladder.PORTS:
        raise UnknownCodec(f"tensor {te.name!r} is coded with requant port {str(te.port)[:40]!r}, which this "
                           "gguf-split does not know (a newer gguf-split wrote it?)")
    need(ladder.can_requant(te.geo.ggml_type), f"tensor {i}: type {te.geo.ggml_type} cannot be re-derived")
    need(_is_int(te.source), f"tensor {i}: bad source")
    im = t.get("imatrix")
    need(im is None or (isinstance(im, list) and len(im) == 2 and all(_is_int(v) for v in im)),
         f"tensor {i}: bad imatrix")
    te.imatrix = (im[0], im[1]) if im is not None else None


def _check_source(i: int, t: TensorEntry, tensors: list[TensorEntry]) -> None:
    """A requant's source: an F16/BF16/F32 tensor of its shape and chunking, not itself re-derived (so
    decoding chains at most requant -> delta -> plain or fplanes)."""
    assert t.source is not None
    need(0 <= t.source < len(tensors), f"tensor {i}: source {t.source} does not exist")
    s = tensors[t.source]
    need(s.codec != CODEC_REQUANT, f"tensor {i}: its source {t.source} is itself re-derived")
    need(s.geo.ggml_type in ladder.SOURCE_TYPES, f"tensor {i}: source type {s.geo.ggml_type} cannot be a source")
    need(s.geo.shape == t.geo.shape and s.rows_per_chunk == t.rows_per_chunk,
         f"tensor {i}: its source has another shape or chunking")
    if t.imatrix is not None:
        n_mat = t.geo.shape[2] if len(t.geo.shape) >= 3 else 1
        need(len(t.geo.shape) <= 3, f"tensor {i}: importance vectors for a 4-D tensor")
        for j, elems in zip(t.imatrix, (t.geo.row_elems * n_mat, n_mat)):
            need(0 <= j < len(tensors), f"tensor {i}: imatrix tensor {j} does not exist")
            m = tensors[j]
            need(m.geo.ggml_type == Q.F32 and m.codec != CODEC_REQUANT and m.geo.n_elems == elems,
                 f"tensor {i}: imatrix tensor {j} is not F32 data of {elems} values")
            need(m.geo.nbytes <= MAX_RECORD_BYTES, f"tensor {i}: imatrix tensor {j} is too large")


def _parse_delta_fields(i: int, t: Any, te: TensorEntry, records_end: int) -> None:
    geo = te.geo
    need(geo.ggml_type in codec.DELTA_TARGET_TYPES, f"tensor {i}: type {geo.ggml_type} cannot be a delta target")
    te.base, te.rank = t.get("base"), t.get("rank")
    te.factor_type, te.residual, te.factors = t.get("factor_type"), t.get("residual"), t.get("factors")
    need(_is_int(te.base), f"tensor {i}: bad base")
    need(_is_int(te.rank) and 0 <= te.rank <= min(codec.MAX_RANK, geo.n_rows, geo.row_elems),
         f"tensor {i}: bad rank {te.rank!r}")
    need(isinstance(te.factor_type, str) and te.factor_type in codec.FACTOR_DTYPES, f"tensor {i}: unknown factor type")
    need(isinstance(te.residual, str) and te.residual in codec.RESIDUAL_MODES, f"tensor {i}: unknown residual mode")
    fbytes = te.rank * (geo.n_rows + geo.row_elems) * np.dtype(codec.FACTOR_DTYPES[te.factor_type]).itemsize
    need(fbytes <= MAX_RECORD_BYTES, f"tensor {i}: factors of {fbytes} bytes are over the limit")
    if te.rank:
        _check_offset(te.factors, f"tensor {i} factors", records_end)
    else:
        need(te.factors is None, f"tensor {i}: rank 0 with factors")


def _check_base(i: int, t: TensorEntry, tensors: list[TensorEntry]) -> None:
    assert t.base is not None
    need(0 <= t.base < len(tensors), f"tensor {i}: base {t.base} does not exist")
    b = tensors[t.base]
    need(b.codec in (CODEC_PLAIN, CODEC_FPLANES), f"tensor {i}: its base {t.base} is not plainly coded")
    need(b.geo.ggml_type in codec.DELTA_BASE_TYPES, f"tensor {i}: base type {b.geo.ggml_type} cannot be a delta base")
    need(b.geo.shape == t.geo.shape and b.rows_per_chunk == t.rows_per_chunk,
         f"tensor {i}: its base has another shape or chunking")


def _parse_file(i: int, f: Any, index: Index, seen: set[str]) -> FileParts:
    need(isinstance(f, dict), f"file {i} is not an object")
    try:
        name = check_bare_name(f.get("name"), None, strict=True)
    except GGUFSplitError as e:
        raise Corrupt(f"file {i}: {e.problem}") from None
    need(name not in seen, f"file name {name!r} appears twice")
    seen.add(name)
    size = f.get("size")
    need(_is_int(size) and 0 <= size <= MAX_FILE_BYTES, f"file {name!r}: bad size {size!r}")
    parts = f.get("parts")
    need(isinstance(parts, list), f"file {name!r}: no parts list")
    out = [_parse_part(name, p, index) for p in parts]
    total = sum(_part_size(p, index) for p in out)
    need(total == size, f"file {name!r}: its parts add up to {total} bytes, not {size}")
    entry = FileEntry(name, size, _hexstr(f.get("sha256"), 32, f"file {name!r} sha256"),
                      _hexstr(f.get("xxh3"), 16, f"file {name!r} xxh3"))
    return FileParts(entry, out)


def _parse_part(name: str, p: Any, index: Index) -> Part:
    need(isinstance(p, list) and len(p) == 2 and p[0] in (PART_BLOB, PART_TENSOR, PART_ZEROS) and _is_int(p[1]),
         f"file {name!r}: bad part {str(p)[:60]}")
    kind, v = p
    if kind == PART_BLOB:
        need(0 <= v < len(index.blobs), f"file {name!r}: blob {v} does not exist")
    elif kind == PART_TENSOR:
        need(0 <= v < len(index.tensors), f"file {name!r}: tensor {v} does not exist")
    else:
        need(0 < v <= MAX_FILE_BYTES, f"file {name!r}: bad zero run {v}")
    return Part(kind, v)


def _part_size(p: Part, index: Index) -> int:
    if p.kind == PART_BLOB:
        return index.blobs[p.value].size
    if p.kind == PART_TENSOR:
        return index.tensors[p.value].geo.nbytes
    return p.value
