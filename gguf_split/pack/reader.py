"""Reading a pack: `read_index` (what it holds, from its tail and index alone) and `unpack` (its files, byte
for byte), through `PackReader`, an open pack whose index is checked and whose records are checked as they
are read.

    read_index("set.ggufpack") -> PackIndex      # the files, their sizes and digests, without unpacking
    unpack("set.ggufpack", "out/") -> UnpackReport

Why every check comes before any use: a pack travels (a download, a hub), so its bytes are untrusted. The
head, the tail and the whole index are checked when the pack is opened (index.py); a record's frame, its
xxh3-128 and its decoded size before it is decoded; each blob's and each tensor's xxh3-128 over the bytes
rebuilt, and each file's size, xxh3-128 and sha256 over the bytes written, all before `disk.commit` renames
anything into place. A problem is one GGUFSplitError naming the pack ("corrupt pack: ..."), and nothing is
written.

Memory: a file is rebuilt piece by piece (a blob, a chunk of a tensor's rows, a run of zeros) on a thread
pool, a bounded window of pieces in flight and written in order, so unpacking holds a few chunks per thread
and a delta-coded tensor's factors while its chunks are being rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
import xxhash
from gguf.constants import GGMLQuantizationType as Q

from ..disk.commit import buffered, holds_bytes, write_files
from ..disk.jobs import default_threads, map_ordered
from ..disk.progress import QUIET, Progress, Reporter
from ..errors import GGUFSplitError
from ..format.gguf import open_mapped
from . import codec, ladder
from .codec import CodecError, Factors
from .format import (CODEC_DELTA, CODEC_FPLANES, CODEC_PLAIN, CODEC_REQUANT, HEAD, KIND_DATA, KIND_INDEX, MAGIC,
                     MAX_INDEX_BYTES, MAX_RECORD_BYTES, PART_BLOB, PART_TENSOR, PART_ZEROS, READABLE_VERSIONS,
                     REC_STORED, REC_ZSTD, Corrupt, RecordHeader, Tail, UnknownCodec, need)
from .index import BlobEntry, FileEntry, FileParts, PackIndex, TensorEntry, parse_index

_ZERO = bytes(1 << 20)
FACTORS_KEPT = 8  # delta factors a reader keeps decoded (a file's tensors come one after another)


@dataclass
class UnpackReport:
    out_dir: str
    files: list[FileEntry]
    bytes_written: int
    seconds: float
    kept: list[str] = field(default_factory=list)  # files already in place, byte for byte: left as they were


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of a file being rebuilt, in file order: a blob, a chunk of a tensor (`last`: the tensor's
    last chunk, where its digest is checked) or a run of zeros (`value` bytes)."""

    kind: str
    value: int
    chunk: int = 0
    last: bool = False


class PackReader:
    """An open, checked pack: its index parsed and validated; records read and checked on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        minimum = HEAD.size + RecordHeader.SIZE + Tail.SIZE
        try:
            size = os.stat(self.path).st_size
        except (OSError, ValueError):
            size = minimum
        fd, self._mm, st = open_mapped(self.path, min_size=minimum,
                                       too_small=f"not a gguf-split pack: {size} bytes is too short")
        os.close(fd)  # the map keeps what it needs
        self.size = st.st_size
        self._factors: dict[int, Factors] = {}  # delta-coded tensors' factors, a few at a time
        self._factors_lock = threading.Lock()
        self._weights: dict[tuple[int, int, tuple[int, ...]], ladder.Weights] = {}  # importance vectors
        # tensor -> (descriptor, offset) of its bytes in an output this unpack already wrote and checked
        self._rebuilt: dict[int, tuple[int, int]] = {}
        try:
            self._read_index()
        except UnknownCodec as e:
            self.close()
            raise GGUFSplitError(self.path, str(e)) from None
        except Corrupt as e:
            self.close()
            raise GGUFSplitError(self.path, f"corrupt pack: {e}") from None
        except BaseException:
            self.close()
            raise

    # -- structure

    def _read_index(self) -> None:
        self.version = self._check_head()
        tail = Tail.read(self.mm, self.size)
        if tail.magic != MAGIC:
            raise Corrupt("no GGUFPACK magic at the end: the pack is truncated or was not written completely")
        need(tail.version == self.version and tail.flags == 0,
             f"the tail says version {tail.version}, flags {tail.flags:#x}; the head says version {self.version}")
        self.index_offset = ioff = tail.index_offset
        need(ioff >= HEAD.size and tail.index_length >= RecordHeader.SIZE
             and ioff + tail.index_length == self.size - Tail.SIZE,
             "the tail's index position does not match the file size (truncated?)")
        header, body = self._record(ioff, KIND_INDEX, limit=self.size - Tail.SIZE)
        need(header.decoded_length <= MAX_INDEX_BYTES,
             f"index claims {header.decoded_length} bytes, over the limit of {MAX_INDEX_BYTES}")
        raw = self._decode(header, body, "index")
        try:
            ix = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise Corrupt(f"index is not valid JSON ({type(e).__name__})") from None
        index = parse_index(ix, self.version, self.index_offset)
        self.kind, self.meta = index.kind, index.meta
        self.blobs: list[BlobEntry] = index.blobs
        self.tensors: list[TensorEntry] = index.tensors
        self.files: list[FileParts] = index.files

    def _check_head(self) -> int:
        magic, version, flags = HEAD.unpack_from(self.mm, 0)
        if magic != MAGIC:
            raise GGUFSplitError(self.path, "not a gguf-split pack (no GGUFPACK magic)")
        if version not in READABLE_VERSIONS:
            known = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise GGUFSplitError(self.path, f"pack format version {version} is not supported (this gguf-split "
                                            f"reads versions {known}); a newer gguf-split wrote it")
        need(flags == 0, f"unknown flags {flags:#x} in the head")
        return int(version)

    # -- records

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            raise GGUFSplitError(self.path, "pack is closed")
        return self._mm

    def _record(self, off: int, kind: int = KIND_DATA, limit: int | None = None) -> tuple[RecordHeader, memoryview]:
        """The header and body of the record at `off`, its frame and checksum verified."""
        limit = self.index_offset if limit is None else limit
        need(off + RecordHeader.SIZE <= limit, f"record at {off} lies past the records")
        h = RecordHeader.read(self.mm, off)
        need(h.reserved == (0, 0), f"record at {off}: reserved fields are not zero")
        need(h.kind in (KIND_DATA, KIND_INDEX), f"record at {off}: unknown kind {h.kind}")
        need(h.codec in (REC_STORED, REC_ZSTD), f"record at {off}: unknown record codec {h.codec}")
        need(h.body_length <= limit - off - RecordHeader.SIZE,
             f"record at {off}: body of {h.body_length} bytes runs past the records")
        start = off + RecordHeader.SIZE
        body = memoryview(self.mm)[start : start + h.body_length]
        if xxhash.xxh3_128_digest(body) != h.digest:
            raise Corrupt(f"record at {off}: checksum mismatch (corrupt)")
        need(h.kind == kind, f"record at {off} is not a{'n index' if kind == KIND_INDEX else ' data'} record")
        return h, body

    def _decode(self, h: RecordHeader, body: memoryview, what: str) -> bytes:
        if h.codec == REC_STORED:
            need(h.decoded_length == len(body), f"{what}: stored record of {len(body)} bytes claims {h.decoded_length}")
            return bytes(body)
        need(h.decoded_length <= MAX_RECORD_BYTES, f"{what}: record claims {h.decoded_length} bytes")
        try:
            return codec.decompress(body, h.decoded_length)
        except CodecError as e:
            raise Corrupt(f"{what}: {e}") from None

    def data(self, off: int, expected: int | None, what: str, bound: int | None = None) -> bytes:
        """A data record's decoded bytes; exactly `expected` of them, or at most `bound`."""
        h, body = self._record(off)
        if expected is not None:
            need(h.decoded_length == expected, f"{what}: record holds {h.decoded_length} bytes, {expected} expected")
        elif bound is not None:
            need(h.decoded_length <= bound, f"{what}: record claims {h.decoded_length} bytes, at most {bound} possible")
        return self._decode(h, body, what)

    def blob(self, i: int) -> bytes:
        b = self.blobs[i]
        data = self.data(b.record, b.size, f"blob {i}")
        need(xxhash.xxh3_128_hexdigest(data) == b.xxh3, f"blob {i}: xxh3 mismatch")
        return data

    def chunk(self, ti: int, c: int) -> bytes:
        """Chunk c of tensor ti, whatever its codec (a delta reads its base's chunk, a requant its source's:
        at most requant -> delta -> plain or fplanes, which the index checks). A requant source an earlier
        output of this unpack holds (checked when written) is read back from it: a ladder's source is
        decoded once, not once per quant derived from it."""
        if ti in self._rebuilt:
            got = self._read_back(ti, c)
            if got is not None:
                return got
        kind = self.tensors[ti].codec
        if kind == CODEC_PLAIN:
            return self.plain_chunk(ti, c)
        if kind == CODEC_FPLANES:
            return self.fplanes_chunk(ti, c)
        if kind == CODEC_DELTA:
            return self.delta_chunk(ti, c, self.factors_cached(ti))
        return self.requant_chunk(ti, c)

    def note_written(self, fi: int, fd: int) -> None:
        """File fi's bytes are in `fd` (readable, complete, every tensor and the file checked): its tensors
        may be read back from it."""
        if not hasattr(os, "pread"):
            return
        sources = {t.source for t in self.tensors if t.codec == CODEC_REQUANT}
        pos = 0
        for p in self.files[fi].parts:
            if p.kind == PART_TENSOR:
                if p.value in sources:  # only what a quant derives from: other packs read as they always did
                    self._rebuilt.setdefault(p.value, (fd, pos))
                pos += self.tensors[p.value].geo.nbytes
            else:
                pos += self.blobs[p.value].size if p.kind == PART_BLOB else p.value

    def _read_back(self, ti: int, c: int) -> bytes | None:
        t = self.tensors[ti]
        fd, start = self._rebuilt[ti]
        r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
        n = (r1 - r0) * t.geo.row_bytes
        try:
            data = os.pread(fd, n, start + r0 * t.geo.row_bytes)
        except OSError:
            return None
        return data if len(data) == n else None

    def factors_cached(self, ti: int) -> Factors:
        """A delta-coded tensor's factors, read once for all its chunks (the last few tensors' kept)."""
        with self._factors_lock:
            v = self._factors.get(ti)
            if v is None:
                v = self.factors(ti)
                while len(self._factors) >= FACTORS_KEPT:
                    self._factors.pop(next(iter(self._factors)))
                self._factors[ti] = v
            return v

    def fplanes_chunk(self, ti: int, c: int) -> bytes:
        t = self.tensors[ti]
        r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
        n = (r1 - r0) * t.geo.row_elems
        what = f"tensor {t.name!r} chunk {c}"
        data = self.data(t.chunks[c], None, what, ladder.fplanes_bound(n))
        try:
            return ladder.decode_fplanes_chunk(data, t.geo.ggml_type, t.shuffle, n)
        except CodecError as e:
            raise Corrupt(f"{what}: {e}") from None

    def requant_chunk(self, ti: int, c: int) -> bytes:
        t = self.tensors[ti]
        assert t.source is not None
        s = self.tensors[t.source]
        r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
        what = f"tensor {t.name!r} chunk {c}"
        qtype, n = t.geo.ggml_type, t.geo.row_elems
        res = self.data(t.chunks[c], None, what, ladder.residual_bound(r1 - r0, n, qtype))
        source = self.chunk(t.source, c)
        try:
            w = self.weights(t) if t.imatrix is not None else None
            return ladder.decode_requant_chunk(source, s.geo.ggml_type, res, qtype, r1 - r0, n, w, r0)
        except CodecError as e:
            raise Corrupt(f"{what}: {e}") from None

    def whole(self, ti: int) -> bytes:
        """A (small) tensor's bytes, every chunk (an imatrix's in_sum2 or counts)."""
        t = self.tensors[ti]
        return b"".join(self.chunk(ti, c) for c in range(t.geo.chunk_count(t.rows_per_chunk)))

    def weights(self, t: TensorEntry) -> ladder.Weights:
        """A requant tensor's importance vectors (made once per imatrix and shape)."""
        assert t.imatrix is not None
        key = (*t.imatrix, t.geo.shape)
        with self._factors_lock:
            w = self._weights.get(key)
        if w is None:
            sums, counts = (self.whole(j) for j in t.imatrix)
            for j, data in zip(t.imatrix, (sums, counts)):
                need(xxhash.xxh3_128_hexdigest(data) == self.tensors[j].xxh3, f"tensor {self.tensors[j].name!r}: "
                     "rebuilt bytes do not match the recorded xxh3-128")
            w = ladder.Weights.from_tensors(sums, counts, t.geo.shape)
            with self._factors_lock:
                self._weights[key] = w
        return w

    def plain_chunk(self, ti: int, c: int) -> bytes:
        t = self.tensors[ti]
        r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
        raw = self.data(t.chunks[c], (r1 - r0) * t.geo.row_bytes, f"tensor {t.name!r} chunk {c}")
        return codec.unshuffle(raw, t.shuffle)

    def factors(self, ti: int) -> Factors:
        t = self.tensors[ti]
        m, n = t.geo.n_rows, t.geo.row_elems
        if t.rank == 0:
            return np.zeros((0, m), np.float32), np.zeros((0, n), np.float32)
        assert t.factors is not None
        size = t.rank * (m + n) * np.dtype(codec.FACTOR_DTYPES[t.factor_type]).itemsize
        raw = self.data(t.factors, size, f"tensor {t.name!r} factors")
        return codec.factors_from_bytes(raw, t.factor_type, t.rank, m, n)

    def delta_chunk(self, ti: int, c: int, fac: Factors) -> bytes:
        t = self.tensors[ti]
        assert t.base is not None
        b = self.tensors[t.base]
        r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
        rows = r1 - r0
        n = rows * t.geo.row_elems
        width = codec.DELTA_TARGET_TYPES[Q(t.geo.ggml_type)][1]
        res = self.data(t.chunks[c], None, f"tensor {t.name!r} chunk {c}", codec.residual_bound(n, width))
        base_raw = self.chunk(t.base, c)
        bt = np.ascontiguousarray(fac[0][:, r0:r1])
        try:
            return codec.decode_delta_chunk(base_raw, b.geo.ggml_type, t.geo.ggml_type, rows, t.geo.row_elems,
                                            bt, fac[1], res, t.residual)
        except CodecError as e:
            raise Corrupt(f"tensor {t.name!r} chunk {c}: {e}") from None

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def __enter__(self) -> "PackReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def index(self) -> PackIndex:
        return PackIndex(self.path, self.version, self.kind, self.meta, [f.entry for f in self.files], self.size,
                         len(self.tensors))


class FileRebuild:
    """One file of a pack rebuilt in order: its pieces made on the pool (a bounded window in flight),
    written as they come, every tensor and the whole file checked against the index."""

    def __init__(self, reader: PackReader, fi: int) -> None:
        self.reader = reader
        self.file = reader.files[fi]

    def pieces(self) -> Iterator[Piece]:
        """The file's pieces, in order."""
        for p in self.file.parts:
            if p.kind != PART_TENSOR:
                yield Piece(p.kind, p.value)
                continue
            t = self.reader.tensors[p.value]
            n = t.geo.chunk_count(t.rows_per_chunk)
            for c in range(n):
                yield Piece(PART_TENSOR, p.value, c, c == n - 1)

    def piece_bytes(self, piece: Piece) -> bytes | None:
        """A piece's bytes (None for zeros, which the writer makes itself); runs on the pool."""
        r = self.reader
        if piece.kind == PART_ZEROS:
            return None
        if piece.kind == PART_BLOB:
            return r.blob(piece.value)
        return r.chunk(piece.value, piece.chunk)

    def write(self, out: BinaryIO, pool: Executor, window: int, bar: Reporter) -> None:
        digests = _FileDigests()
        tensor = xxhash.xxh3_128()
        for piece, data in map_ordered(pool, self.piece_bytes, self.pieces(), window):
            if data is None:
                n = _write_zeros(out, piece.value, digests)
            else:
                out.write(data)
                digests.update(data)
                n = len(data)
            if piece.kind == PART_TENSOR:
                assert data is not None
                tensor.update(data)
                if piece.last:
                    self._check_tensor(piece.value, tensor.hexdigest())
                    tensor = xxhash.xxh3_128()
            bar.advance(n)
        digests.check(self.file.entry)

    def _check_tensor(self, ti: int, digest: str) -> None:
        t = self.reader.tensors[ti]
        if digest != t.xxh3:
            raise Corrupt(f"tensor {t.name!r} of {self.file.entry.name}: rebuilt bytes do not match the recorded "
                          "xxh3-128" + (" (a delta or requant: this machine computes its prediction differently, or "
                                        "the pack is corrupt)" if t.codec in (CODEC_DELTA, CODEC_REQUANT) else ""))


class _FileDigests:
    """Size, xxh3-128 and sha256 of the bytes written, checked against the file's entry."""

    def __init__(self) -> None:
        self.size = 0
        self.sha = hashlib.sha256()
        self.xxh = xxhash.xxh3_128()

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.xxh.update(data)
        self.size += len(data)

    def check(self, entry: FileEntry) -> None:
        if self.size != entry.size:
            raise Corrupt(f"{entry.name}: rebuilt {self.size} bytes, {entry.size} expected")
        if self.xxh.hexdigest() != entry.xxh3:
            raise Corrupt(f"{entry.name}: rebuilt file does not match its recorded xxh3-128")
        if self.sha.hexdigest() != entry.sha256:
            raise Corrupt(f"{entry.name}: rebuilt file does not match its recorded sha256")


def _write_zeros(out: BinaryIO, n: int, digests: _FileDigests) -> int:
    left = n
    while left:
        piece = _ZERO[: min(left, len(_ZERO))]
        out.write(piece)
        digests.update(piece)
        left -= len(piece)
    return n


# ---------------------------------------------------------------------------------------------------------
# The entry points


def read_index(pack_path: str | os.PathLike[str]) -> PackIndex:
    """The pack's files (name, size, sha256, xxh3-128), kind and meta, after checking its whole index."""
    with PackReader(pack_path) as r:
        return r.index()


def unpack(pack_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, force: bool = False,
           threads: int | None = None, progress: Progress = QUIET, files: Sequence[str] | None = None) -> UnpackReport:
    """Write every file of the pack (or the ones named in `files`) into out_dir, byte-identical (each
    tensor's xxh3-128 and each file's xxh3-128 and sha256 checked before anything is renamed into place).
    A file already there with the recorded size and xxh3-128 is kept. On any problem: GGUFSplitError, and
    out_dir is left as it was."""
    t0 = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    nthreads = default_threads(threads)
    with PackReader(pack_path) as r:
        chosen = _chosen(r, files)
        total = sum(f.entry.size for _, f in chosen)
        _check_can_predict(r)
        _check_free_space(out_dir, total)
        entries = {f.entry.name: f.entry for _, f in chosen}
        with ThreadPoolExecutor(nthreads) as pool, progress.bar("unpacking", total) as bar:
            outputs = [(f.entry.name, _output(r, i, pool, nthreads + 2, bar)) for i, f in _sources_first(r, chosen)]
            kept = write_files(out_dir, outputs, force=force,
                               keep=lambda name, path: holds_bytes(path, entries[name].size, entries[name].xxh3))
    written = total - sum(entries[name].size for name in kept)
    return UnpackReport(out_dir, [f.entry for _, f in chosen], written, time.perf_counter() - t0, kept)


def _sources_first(r: PackReader, chosen: list[tuple[int, FileParts]]) -> list[tuple[int, FileParts]]:
    """The files holding a tensor that requant tensors derive from first (in pack order otherwise), so the
    quants read their source back instead of decoding it; the files written do not depend on the order."""
    sources = {t.source for t in r.tensors if t.codec == CODEC_REQUANT}
    return sorted(chosen, key=lambda c: not any(p.kind == PART_TENSOR and p.value in sources for p in c[1].parts))


def _chosen(r: PackReader, files: Sequence[str] | None) -> list[tuple[int, FileParts]]:
    if files is not None:
        missing = set(files) - {f.entry.name for f in r.files}
        if missing:
            raise GGUFSplitError(r.path, f"holds no file {sorted(missing)[0]!r}")
    return [(i, f) for i, f in enumerate(r.files) if files is None or f.entry.name in files]


def _check_can_predict(r: PackReader) -> None:
    """Delta and requant tensors are rebuilt only where float32 arithmetic gives the encoder's bits."""
    if any(t.codec in (CODEC_DELTA, CODEC_REQUANT) for t in r.tensors):
        try:
            codec.check_float_environment()
        except CodecError as e:
            raise GGUFSplitError(r.path, str(e)) from None


def _check_free_space(out_dir: str, total: int) -> None:
    probe = out_dir
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if total > free:
        raise GGUFSplitError(out_dir, f"the pack unpacks to {total} bytes, only {free} are free there")


def _output(r: PackReader, fi: int, pool: Executor, window: int, bar: Reporter) -> Callable[[int], None]:
    """write_files' writer of file fi: through a 1 MiB buffer, then noted as readable (`note_written`)."""
    write = buffered(partial(_write_checked, r, fi, pool, window, bar))

    def fill(fd: int) -> None:
        write(fd)
        r.note_written(fi, fd)

    return fill


def _write_checked(r: PackReader, fi: int, pool: Executor, window: int, bar: Reporter, out: BinaryIO) -> None:
    try:
        FileRebuild(r, fi).write(out, pool, window, bar)
    except Corrupt as e:
        raise GGUFSplitError(r.path, f"corrupt pack: {e}") from None
