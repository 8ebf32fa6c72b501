"""Packs: a set of GGUF files as one `NAME.ggufpack` that travels in far fewer bytes, and back, byte for byte.

    pack_files([(name, path), ...], "set.ggufpack", kind="models", meta={...}) -> PackReport
    read_index("set.ggufpack") -> PackIndex      # the files, their sizes and digests, without unpacking
    unpack("set.ggufpack", "out/") -> UnpackReport

The format is in docs/pack-format.md. In short: a 16-byte head, records (each with its length and xxh3-128),
an index record (zstd-compressed JSON) and a 32-byte tail pointing at it. Every distinct tensor (xxh3-128 +
type + shape) is stored once, coded by `codec` (plain zstd, or a delta against another version of it);
header pieces are stored once (a tokenizer shared by every file is one record). The index records each
tensor's xxh3-128 and each file's xxh3-128 and sha256; unpack checks them all before renaming its outputs
into place, and writes nothing when anything fails.

Memory: tensors are handled in chunks of whole rows (about 2^20 elements), a bounded number at a time, so
packing and unpacking hold a few chunks per thread plus, while a delta is planned, its (rows × ~72) float32
sketch; never a whole tensor, except a single row larger than a chunk.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import xxhash
import zstandard
from gguf.constants import GGMLQuantizationType as Q

from . import codec
from . import codec as _codec  # for annotations inside classes with a field named `codec`
from .codec import CodecError, Geometry
from ..errors import GGUFSplitError
from ..format.gguf import GGUFFile, TensorInfo, iter_gaps, open_mapped
from ..disk.progress import QUIET, Progress

MAGIC = b"GGUFPACK"
VERSION = 1
SUFFIX = ".ggufpack"

_HEAD = struct.Struct("<8sII")  # magic, version, flags
_REC = struct.Struct("<BBHIQQ16s")  # kind, codec, reserved u16, reserved u32, body length, decoded length, xxh3-128
_TAIL = struct.Struct("<QQII8s")  # index record offset, index record length, version, flags, magic

KIND_DATA = 1
KIND_INDEX = 2
REC_STORED = 0
REC_ZSTD = 1

MAX_INDEX_BYTES = 256 << 20  # decoded JSON index
MAX_RECORD_BYTES = 1 << 30  # any one decoded record (a chunk is far smaller)
MAX_FILE_BYTES = 1 << 50
MAX_NAME_BYTES = 255
BIG_KV = 4096  # KV records at least this long are stored once across files, on their own

LEVEL_TENSORS = 3  # measured: level 3 gives 92 % on Q4_1 (shuffled) at ~230 MB/s; 19 gives 88 % at 6 MB/s
LEVEL_HEADERS = 19  # headers are small and repeated once: spend the time

_ZERO = bytes(1 << 20)


# ---------------------------------------------------------------------------------------------------------
# Reports


@dataclass
class CodecStat:
    count: int = 0
    input_bytes: int = 0  # bytes of the tensors (as they are in the files, once per distinct tensor)
    stored_bytes: int = 0  # bytes of their records in the pack (headers included)


@dataclass
class TensorStat:
    name: str
    ggml_type: str
    nbytes: int
    codec: str  # "zstd", "raw", "delta"
    stored_bytes: int
    occurrences: int
    rank: int | None = None
    base: str | None = None
    factor_type: str | None = None
    residual: str | None = None


@dataclass
class PackReport:
    path: str
    pack_bytes: int
    input_bytes: int
    files: list[tuple[str, int]]
    codecs: dict[str, CodecStat]  # "delta", "zstd", "raw", "ref" (repeats of a tensor stored once), "headers"
    tensors: list[TensorStat]
    seconds: float

    @property
    def ratio(self) -> float:
        return self.pack_bytes / max(1, self.input_bytes)


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str
    xxh3: str


@dataclass
class PackIndex:
    path: str
    version: int
    kind: Any
    meta: Any
    files: list[FileEntry]
    pack_bytes: int
    tensors: int  # distinct tensors stored


@dataclass
class UnpackReport:
    out_dir: str
    files: list[FileEntry]
    bytes_written: int
    seconds: float
    kept: list[str] = field(default_factory=list)  # files already in place, byte for byte: left as they were


# ---------------------------------------------------------------------------------------------------------
# Names and output files


def check_file_name(name: Any, where: str | None = None) -> str:
    """A bare file name as it must come back: no directory part, no NUL, not '.' or '..', not hidden
    temp-like, at most 255 bytes of UTF-8."""
    if not isinstance(name, str) or not name:
        raise GGUFSplitError(where, f"file name {name!r} is not a non-empty string")
    bad = ("/" in name or "\\" in name or "\0" in name or name in (".", "..") or name.startswith(".")
           or name != name.strip() or any(ord(c) < 32 for c in name))
    if bad:
        raise GGUFSplitError(where, f"file name {name!r} must be a bare file name (no directory, not hidden, "
                                    "no control characters)")
    try:
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise GGUFSplitError(where, f"file name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    except UnicodeEncodeError:
        raise GGUFSplitError(where, f"file name {name!r} is not valid Unicode") from None
    return name


def _write_outputs(out_dir: str, items: Sequence[tuple[str, Callable[[BinaryIO], None]]], *,
                   force: bool = False, in_place: Callable[[str, str], bool] | None = None) -> list[str]:
    """Write each (name, writer) into out_dir, all or nothing, through the project's crash-safe commit
    (commit.Transaction: hidden temporaries, fsync, one atomic journal switch; a kill at any moment leaves
    the old files or all the new ones). Each writer writes (and checks) its file's bytes; an existing file
    of the same name is kept if `in_place(name, path)` says it already holds them, else refused unless
    `force`; out_dir is created if missing (and removed again if nothing could be written). Returns the
    names kept."""
    from ..disk.commit import Transaction

    out_dir = os.path.abspath(out_dir)
    for name, _ in items:
        check_file_name(name, out_dir)
    if len({n for n, _ in items}) != len(items):
        raise GGUFSplitError(out_dir, "two outputs have the same name")
    kept: list[str] = []
    with Transaction(out_dir) as tx:
        for name, _ in items:
            p = os.path.join(out_dir, name)
            if os.path.lexists(p):
                if os.path.isdir(p) and not os.path.islink(p):
                    raise GGUFSplitError(p, "is a directory: cannot replace it with a file")
                if in_place is not None and in_place(name, p):
                    kept.append(name)
                elif not force:
                    raise GGUFSplitError(p, "already exists (use --force to replace it)")
        for name, write in items:
            if name in kept:
                continue
            nf = tx.new(name)

            def fill(fd: int, write: Callable[[BinaryIO], None] = write) -> None:
                with os.fdopen(os.dup(fd), "wb", buffering=1 << 20) as f:
                    write(f)
                    f.flush()

            tx.write(nf, fill)
        tx.commit()
    return kept


def _threads(threads: int | None) -> int:
    if threads is None:
        return max(1, min(8, os.cpu_count() or 1))
    return max(1, int(threads))


def _ordered(pool: ThreadPoolExecutor, jobs: Iterable[Callable[[], Any]], window: int) -> Iterator[Any]:
    """Run jobs in the pool, at most `window` at a time, and yield their results in order."""
    pending: deque[Future[Any]] = deque()
    it = iter(jobs)
    try:
        for job in it:
            pending.append(pool.submit(job))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        for f in pending:
            try:
                f.result()
            except BaseException:
                pass


def _hex(digest: bytes) -> str:
    return digest.hex()


# ---------------------------------------------------------------------------------------------------------
# Packing


@dataclass
class _Source:
    file: int
    info: TensorInfo


@dataclass
class _Obj:
    """A distinct tensor: xxh3-128 + type + shape."""

    index: int
    digest: bytes
    ggml_type: int
    shape: tuple[int, ...]
    geo: Geometry
    sources: list[_Source]
    names: list[str]
    rows_per_chunk: int = 1
    codec: str = "plain"
    stride: int = 1
    base: int | None = None
    plan: "_codec.DeltaPlan | None" = None
    factors_off: int | None = None
    chunk_offs: list[int] = field(default_factory=list)
    stored: int = 0
    all_stored_raw: bool = True


@dataclass
class _Blob:
    index: int
    file: int
    start: int
    end: int
    digest: bytes
    offset: int = -1
    stored: int = 0


class _PackWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = 0

    def write(self, b: Any) -> None:
        self.f.write(b)
        self.pos += len(b)

    def record(self, kind: int, rcodec: int, body: Any, decoded: int, digest: bytes | None = None) -> int:
        off = self.pos
        if digest is None:
            digest = xxhash.xxh3_128_digest(body)
        self.write(_REC.pack(kind, rcodec, 0, 0, len(body), decoded, digest))
        self.write(body)
        return off


def _encode_plain_chunk(raw: Any, stride: int, level: int) -> tuple[int, Any, int, bytes]:
    """(record codec, body, decoded length, body digest) of one plain chunk."""
    n = len(raw)
    data = codec.shuffle(raw, stride) if stride > 1 else raw
    z = codec.compress(data, level)
    if len(z) < n:
        return REC_ZSTD, z, n, xxhash.xxh3_128_digest(z)
    body = data if stride > 1 else raw
    return REC_STORED, body, n, xxhash.xxh3_128_digest(body)


def pack_files(inputs: Sequence[tuple[str, str | os.PathLike[str]]], out_path: str | os.PathLike[str], *,
               kind: Any = "models", meta: Any = None, threads: int | None = None,
               progress: Progress = QUIET, force: bool = False, level: int = LEVEL_TENSORS) -> PackReport:
    """Pack GGUF files into one pack at `out_path` (written to a temporary beside it, renamed when done).

    `inputs`: (name, path) in order; `name` is the bare file name unpack gives back. `kind` and `meta` are
    small JSON values stored in the index as they are (e.g. "split" and task -> file names)."""
    t_start = time.perf_counter()
    out_path = os.path.abspath(os.fspath(out_path))
    nthreads = _threads(threads)
    try:
        index_extra = json.dumps({"kind": kind, "meta": meta}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GGUFSplitError(out_path, f"kind/meta are not plain JSON values: {e}") from None
    if len(index_extra) > 16 << 20:
        raise GGUFSplitError(out_path, "kind/meta are larger than 16 MiB")
    if not inputs:
        raise GGUFSplitError(out_path, "nothing to pack: no input files")
    names = [check_file_name(n, os.fspath(p)) for n, p in inputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GGUFSplitError(out_path, f"two inputs have the file name {dup!r}")
    if os.path.lexists(out_path):
        if not force:
            raise GGUFSplitError(out_path, "already exists (use --force to replace it)")
        if os.path.isdir(out_path):
            raise GGUFSplitError(out_path, "is a directory")

    files: list[GGUFFile] = []
    try:
        for _, p in inputs:
            files.append(GGUFFile(p))
        for gf in files:
            if os.path.exists(out_path) and os.path.samefile(gf.path, out_path):
                raise GGUFSplitError(out_path, "the pack would overwrite one of its inputs")
        return _pack(files, names, out_path, kind, meta, nthreads, progress, level, t_start, force)
    finally:
        for gf in files:
            gf.close()


def _pack(files: list[GGUFFile], names: list[str], out_path: str, kind: Any, meta: Any, nthreads: int,
          progress: Progress, level: int, t_start: float, force: bool) -> PackReport:
    total_in = sum(f.size for f in files)

    # 1. digests: each file whole (sha256, xxh3-128) and each tensor (xxh3-128)
    file_sha: list[str] = [""] * len(files)
    file_xxh: list[str] = [""] * len(files)
    tensor_digest: list[dict[str, bytes]] = [{} for _ in files]
    with ThreadPoolExecutor(nthreads) as pool, progress.bar("hashing", total_in * 2) as bar:
        def hash_file(i: int) -> None:
            f = files[i]
            sha, xh = hashlib.sha256(), xxhash.xxh3_128()
            for a in range(0, f.size, 16 << 20):
                v = f.view(a, min(f.size, a + (16 << 20)))
                sha.update(v)
                xh.update(v)
                v.release()
                bar.advance(min(16 << 20, f.size - a))
            file_sha[i], file_xxh[i] = sha.hexdigest(), xh.hexdigest()

        def hash_tensors(i: int) -> None:
            f = files[i]
            for t in f.header.tensors:
                v = f.tensor_view(t)
                tensor_digest[i][t.name] = xxhash.xxh3_128_digest(v)
                v.release()
                bar.advance(t.nbytes)
            bar.advance(f.size - sum(t.nbytes for t in f.header.tensors))

        for fut in [pool.submit(hash_file, i) for i in range(len(files))] + \
                   [pool.submit(hash_tensors, i) for i in range(len(files))]:
            fut.result()

    # 2. distinct tensors, header pieces, and each file as parts
    objs: list[_Obj] = []
    obj_by_key: dict[tuple[bytes, int, tuple[int, ...]], _Obj] = {}
    blobs: list[_Blob] = []
    blob_by_key: dict[tuple[bytes, int], _Blob] = {}
    file_parts: list[list[tuple[str, int]]] = []
    occurrences: dict[int, int] = {}

    def blob_for(fi: int, a: int, b: int) -> int:
        v = files[fi].view(a, b)
        key = (xxhash.xxh3_128_digest(v), b - a)
        v.release()
        bl = blob_by_key.get(key)
        if bl is None:
            bl = _Blob(len(blobs), fi, a, b, key[0])
            blobs.append(bl)
            blob_by_key[key] = bl
        return bl.index

    for fi, f in enumerate(files):
        h = f.header
        segs: list[tuple[int, int, tuple[str, int]]] = []  # (start, end, part)
        start = 0
        for kv in h.kvs:
            if kv.end - kv.start >= BIG_KV:
                if kv.start > start:
                    segs.append((start, kv.start, ("b", blob_for(fi, start, kv.start))))
                segs.append((kv.start, kv.end, ("b", blob_for(fi, kv.start, kv.end))))
                start = kv.end
        if h.tensor_info_end > start:
            segs.append((start, h.tensor_info_end, ("b", blob_for(fi, start, h.tensor_info_end))))
        for a, b in iter_gaps(h):
            v = f.view(a, b)
            zero = not np.frombuffer(v, dtype=np.uint8).any()
            v.release()
            segs.append((a, b, ("z", b - a) if zero else ("b", blob_for(fi, a, b))))
        for t in h.tensors:
            key = (tensor_digest[fi][t.name], t.ggml_type, t.shape)
            o = obj_by_key.get(key)
            if o is None:
                try:
                    geo = codec.geometry(t.ggml_type, t.shape)
                except CodecError as e:
                    raise GGUFSplitError(f.path, f"tensor {t.name!r}: {e}") from None
                o = _Obj(len(objs), key[0], t.ggml_type, t.shape, geo, [], [])
                o.rows_per_chunk = codec.default_rows_per_chunk(geo)
                objs.append(o)
                obj_by_key[key] = o
            o.sources.append(_Source(fi, t))
            if t.name not in o.names:
                o.names.append(t.name)
            occurrences[o.index] = occurrences.get(o.index, 0) + 1
            s = h.data_start + t.offset
            segs.append((s, s + t.nbytes, ("t", o.index)))
        segs.sort()
        pos = 0
        for a, b, _ in segs:
            if a != pos:
                raise GGUFSplitError(f.path, f"internal: file parts do not tile the file at byte {pos}")
            pos = b
        if pos != f.size:
            raise GGUFSplitError(f.path, f"internal: file parts end at {pos}, the file has {f.size} bytes")
        file_parts.append([p for _, _, p in segs])

    # 3. codecs: who may be a delta base, which tensors try a delta
    def source_rows(o: _Obj) -> Callable[[int, int], memoryview]:
        src = o.sources[0]
        f = files[src.file]
        base_off = f.header.data_start + src.info.offset
        rb = o.geo.row_bytes
        return lambda r0, r1: f.view(base_off + r0 * rb, base_off + r1 * rb)

    groups: dict[tuple[str, tuple[int, ...]], list[_Obj]] = {}
    for o in objs:
        for n in o.names:
            groups.setdefault((n, o.shape), []).append(o)
    anchors: set[int] = set()
    for versions in groups.values():
        if len(versions) > 1:
            best = max(versions, key=lambda o: (len({s.file for s in o.sources}), -o.geo.nbytes, -o.index))
            anchors.add(best.index)
    targets = [o for o in objs if o.ggml_type in codec.DELTA_TARGET_TYPES and o.index not in anchors]
    target_ids = {o.index for o in targets}

    def can_base(o: _Obj) -> bool:
        return o.index not in target_ids and o.ggml_type in codec.DELTA_BASE_TYPES

    by_shape: dict[tuple[int, ...], list[_Obj]] = {}
    for o in objs:
        if can_base(o):
            by_shape.setdefault(o.shape, []).append(o)

    def similarity(t: _Obj, b: _Obj) -> float:
        """Relative distance |t - b| / |t| on a few rows."""
        m = t.geo.n_rows
        rows = sorted({int(r) for r in np.linspace(0, m - 1, min(m, 16))})
        tr, br = source_rows(t), source_rows(b)
        num = den = 0.0
        with np.errstate(invalid="ignore", over="ignore"):  # bytes that are not finite floats: no delta base
            for r in rows:
                tv = codec.dequantize_rows(tr(r, r + 1), t.ggml_type, 1, t.geo.row_elems).astype(np.float64)
                bv = codec.dequantize_rows(br(r, r + 1), b.ggml_type, 1, b.geo.row_elems).astype(np.float64)
                num += float(((tv - bv) ** 2).sum())
                den += float((tv ** 2).sum())
        if not np.isfinite(num) or not np.isfinite(den):
            return float("inf")
        return (num / den) ** 0.5 if den > 0 else float("inf")

    def choose_base(t: _Obj) -> _Obj | None:
        same = []
        for n in t.names:
            same += [o for o in groups.get((n, t.shape), []) if o is not t and can_base(o)]
        cands = same or [o for o in by_shape.get(t.shape, []) if o is not t][:32]
        best, best_d = None, 0.5  # farther than this, a delta cannot pay
        for c in cands:
            d = similarity(t, c)
            if d < best_d:
                best, best_d = c, d
        return best

    def plan(o: _Obj) -> None:
        if o.index in target_ids:
            b = choose_base(o)
            if b is not None:
                p = codec.plan_delta(source_rows(o), o.ggml_type, source_rows(b), b.ggml_type, o.geo,
                                     level=level, rows_per_chunk=o.rows_per_chunk, seed=o.index)
                # a delta decodes slower than zstd: take it when it saves at least 3 %
                if p is not None and p.estimate < 0.97 * p.plain_estimate:
                    o.codec, o.base, o.plan = "delta", b.index, p
                    return
        o.stride = _choose_stride(o, source_rows(o), level)

    with ThreadPoolExecutor(nthreads) as pool, codec.blas_single_threaded(), \
            progress.bar("analysing", sum(o.geo.nbytes for o in objs)) as bar:
        def plan_job(o: _Obj) -> None:
            plan(o)
            bar.advance(o.geo.nbytes)

        # big ones first, so the two threads finish together
        for fut in [pool.submit(plan_job, o) for o in sorted(objs, key=lambda o: -o.geo.nbytes)]:
            fut.result()

    # 4. records, in order of first use (a delta's base before it), then the index and the tail
    result: dict[str, int] = {}

    def write_pack(fh: BinaryIO) -> None:
        w = _PackWriter(fh)
        w.write(_HEAD.pack(MAGIC, VERSION, 0))
        emitted_obj: set[int] = set()
        emitted_blob: set[int] = set()
        order: list[tuple[str, int]] = []

        def want_obj(i: int) -> None:
            if i in emitted_obj:
                return
            o = objs[i]
            if o.base is not None:
                want_obj(o.base)
            emitted_obj.add(i)
            order.append(("t", i))

        for parts in file_parts:
            for tag, i in parts:
                if tag == "b" and i not in emitted_blob:
                    emitted_blob.add(i)
                    order.append(("b", i))
                elif tag == "t":
                    want_obj(i)

        def jobs() -> Iterator[tuple[Callable[[], Any], Callable[[Any], None]]]:
            for tag, i in order:
                if tag == "b":
                    bl = blobs[i]

                    def blob_job(bl: _Blob = bl) -> Any:
                        data = files[bl.file].raw(bl.start, bl.end)
                        z = codec.compress(data, LEVEL_HEADERS)
                        if len(z) < len(data):
                            return REC_ZSTD, z, len(data), xxhash.xxh3_128_digest(z)
                        return REC_STORED, data, len(data), xxhash.xxh3_128_digest(data)

                    def blob_done(res: Any, bl: _Blob = bl) -> None:
                        bl.offset = w.record(KIND_DATA, res[0], res[1], res[2], res[3])
                        bl.stored = _REC.size + len(res[1])
                        bar.advance(bl.end - bl.start)

                    yield blob_job, blob_done
                    continue
                o = objs[i]
                rows = source_rows(o)
                if o.codec == "delta":
                    assert o.plan is not None and o.base is not None
                    p, b = o.plan, objs[o.base]
                    brows = source_rows(b)
                    if p.rank > 0:
                        def fac_job(p: codec.DeltaPlan = p) -> Any:
                            raw = p.factor_bytes()
                            z = codec.compress(raw, LEVEL_HEADERS if len(raw) < (4 << 20) else level)
                            if len(z) < len(raw):
                                return REC_ZSTD, z, len(raw), xxhash.xxh3_128_digest(z)
                            return REC_STORED, raw, len(raw), xxhash.xxh3_128_digest(raw)

                        def fac_done(res: Any, o: _Obj = o) -> None:
                            o.factors_off = w.record(KIND_DATA, *res)
                            o.stored += _REC.size + len(res[1])

                        yield fac_job, fac_done
                    for c in range(o.geo.chunk_count(o.rows_per_chunk)):
                        r0, r1 = o.geo.chunk_span(c, o.rows_per_chunk)

                        def delta_job(o: _Obj = o, b: _Obj = b, r0: int = r0, r1: int = r1,
                                      rows: Any = rows, brows: Any = brows) -> Any:
                            assert o.plan is not None
                            tr, br = rows(r0, r1), brows(r0, r1)
                            try:
                                body = codec.encode_delta_chunk(o.plan, br, b.ggml_type, tr, o.ggml_type,
                                                                r0, r1, o.geo.row_elems, level)
                            except CodecError as e:
                                raise GGUFSplitError(out_path, f"tensor {o.names[0]!r}: {e} (a bug: please "
                                                               "report it)") from None
                            return REC_ZSTD, body, zstandard.frame_content_size(body), \
                                xxhash.xxh3_128_digest(body), (r1 - r0) * o.geo.row_bytes

                        def chunk_done(res: Any, o: _Obj = o) -> None:
                            o.chunk_offs.append(w.record(KIND_DATA, *res[:4]))
                            o.stored += _REC.size + len(res[1])
                            bar.advance(res[4])

                        yield delta_job, chunk_done
                else:
                    for c in range(o.geo.chunk_count(o.rows_per_chunk)):
                        r0, r1 = o.geo.chunk_span(c, o.rows_per_chunk)

                        def plain_job(o: _Obj = o, r0: int = r0, r1: int = r1, rows: Any = rows) -> Any:
                            raw = rows(r0, r1)
                            return (*_encode_plain_chunk(raw, o.stride, level), len(raw))

                        def plain_done(res: Any, o: _Obj = o) -> None:
                            o.chunk_offs.append(w.record(KIND_DATA, *res[:4]))
                            o.stored += _REC.size + len(res[1])
                            if res[0] != REC_STORED:
                                o.all_stored_raw = False
                            bar.advance(res[4])

                        yield plain_job, plain_done

        to_write = sum(blobs[i].end - blobs[i].start if t == "b" else objs[i].geo.nbytes for t, i in order)
        with ThreadPoolExecutor(nthreads) as pool, codec.blas_single_threaded(), \
                progress.bar("packing", to_write) as bar:
            pairs = jobs()
            done_q: deque[Callable[[Any], None]] = deque()

            def run() -> Iterator[Callable[[], Any]]:
                for job, done in pairs:
                    done_q.append(done)
                    yield job

            for res in _ordered(pool, run(), window=2 * nthreads + 2):
                done_q.popleft()(res)

        index = _build_index(kind, meta, names, files, file_sha, file_xxh, file_parts, objs, blobs)
        raw_index = json.dumps(index, separators=(",", ":"), allow_nan=False).encode("utf-8")
        if len(raw_index) > MAX_INDEX_BYTES:
            raise GGUFSplitError(out_path, f"the index would be {len(raw_index)} bytes, over the limit of "
                                           f"{MAX_INDEX_BYTES}")
        zi = codec.compress(raw_index, LEVEL_HEADERS)
        ioff = w.record(KIND_INDEX, REC_ZSTD, zi, len(raw_index))
        w.write(_TAIL.pack(ioff, _REC.size + len(zi), VERSION, 0, MAGIC))
        result["pack_bytes"] = w.pos

    _write_outputs(os.path.dirname(out_path), [(os.path.basename(out_path), write_pack)], force=force)
    pack_bytes = result["pack_bytes"]
    return _report(out_path, pack_bytes, total_in, names, files, objs, blobs, occurrences, t_start)


def _choose_stride(o: _Obj, rows: Callable[[int, int], memoryview], level: int) -> int:
    """Byte-shuffle stride by the bytes it produces on up to 2 spread samples of ~128 KiB."""
    natural = codec.natural_stride(o.ggml_type)
    if natural <= 1:
        return 1
    m = o.geo.n_rows
    per = max(1, (128 << 10) // max(1, o.geo.row_bytes))
    starts = sorted({int(s) for s in np.linspace(0, max(0, m - per), 2)})
    sizes = {1: 0, natural: 0}
    for s in starts:
        raw = bytes(rows(s, min(m, s + per)))
        for st in sizes:
            sizes[st] += len(codec.compress(codec.shuffle(raw, st), level))
    return min(sizes, key=lambda st: (sizes[st], st))


def _build_index(kind: Any, meta: Any, names: list[str], files: list[GGUFFile], file_sha: list[str],
                 file_xxh: list[str], file_parts: list[list[tuple[str, int]]], objs: list[_Obj],
                 blobs: list[_Blob]) -> dict[str, Any]:
    import gguf

    from .. import __version__

    tensors = []
    for o in objs:
        e: dict[str, Any] = {"name": o.names[0], "type": int(o.ggml_type), "shape": list(o.shape),
                             "xxh3": _hex(o.digest), "rows_per_chunk": o.rows_per_chunk, "codec": o.codec,
                             "chunks": o.chunk_offs}
        if o.codec == "plain":
            e["shuffle"] = o.stride
        else:
            assert o.plan is not None
            e.update({"base": o.base, "rank": o.plan.rank, "factor_type": o.plan.factor_type,
                      "residual": o.plan.mode, "factors": o.factors_off})
        tensors.append(e)
    return {
        "format": "ggufpack",
        "version": VERSION,
        "kind": kind,
        "meta": meta,
        "writer": {"gguf_split": __version__, "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                   "numpy": np.__version__, "zstandard": zstandard.__version__},
        "blobs": [{"size": b.end - b.start, "xxh3": _hex(b.digest), "record": b.offset} for b in blobs],
        "tensors": tensors,
        "files": [{"name": n, "size": f.size, "sha256": file_sha[i], "xxh3": file_xxh[i],
                   "parts": [[t, v] for t, v in file_parts[i]]}
                  for i, (n, f) in enumerate(zip(names, files))],
    }


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - informational only
        return None


def _report(out_path: str, pack_bytes: int, total_in: int, names: list[str], files: list[GGUFFile],
            objs: list[_Obj], blobs: list[_Blob], occurrences: dict[int, int], t_start: float) -> PackReport:
    codecs: dict[str, CodecStat] = {k: CodecStat() for k in ("delta", "zstd", "raw", "ref", "headers")}
    stats = []
    for o in objs:
        name = o.names[0]
        kind = "delta" if o.codec == "delta" else ("raw" if o.all_stored_raw else "zstd")
        c = codecs[kind]
        c.count += 1
        c.input_bytes += o.geo.nbytes
        c.stored_bytes += o.stored
        reps = occurrences[o.index] - 1
        if reps:
            codecs["ref"].count += reps
            codecs["ref"].input_bytes += reps * o.geo.nbytes
        ts = TensorStat(name, Q(o.ggml_type).name, o.geo.nbytes, kind, o.stored, occurrences[o.index])
        if o.plan is not None and o.base is not None:
            ts.rank, ts.base = o.plan.rank, objs[o.base].names[0] + f" ({Q(objs[o.base].ggml_type).name})"
            ts.factor_type, ts.residual = o.plan.factor_type, o.plan.mode
        stats.append(ts)
    hdr = codecs["headers"]
    for f in files:
        hdr.input_bytes += f.size - sum(t.nbytes for t in f.header.tensors)
    hdr.count = len(blobs)
    hdr.stored_bytes = sum(b.stored for b in blobs)
    return PackReport(out_path, pack_bytes, total_in, [(n, f.size) for n, f in zip(names, files)], codecs, stats,
                      time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------------------
# Reading


class _Bad(Exception):
    """A problem with the pack's contents (turned into GGUFSplitError naming the pack)."""


def _is_int(v: Any) -> bool:
    return type(v) is int


def _need(cond: bool, problem: str) -> None:
    if not cond:
        raise _Bad(problem)


def _nothing() -> None:
    return None


def _hexstr(v: Any, nbytes: int, what: str) -> str:
    _need(isinstance(v, str) and len(v) == 2 * nbytes and all(c in "0123456789abcdef" for c in v),
          f"{what} is not a {nbytes}-byte lowercase hex digest")
    return str(v)


@dataclass
class _TensorEntry:
    name: str
    geo: Geometry
    xxh3: str
    rows_per_chunk: int
    codec: str
    chunks: list[int]
    shuffle: int = 1
    base: int | None = None
    rank: int = 0
    factor_type: str = "f16"
    residual: str = "sub"
    factors: int | None = None


@dataclass
class _BlobEntry:
    size: int
    xxh3: str
    record: int


@dataclass
class _FileEntryFull:
    entry: FileEntry
    parts: list[tuple[str, int]]


class PackReader:
    """An open, checked pack: its index parsed and validated; records read and checked on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        minimum = _HEAD.size + _REC.size + _TAIL.size
        try:
            size = os.stat(self.path).st_size
        except (OSError, ValueError):
            size = minimum
        fd, self._mm, st = open_mapped(self.path, min_size=minimum,
                                       too_small=f"not a gguf-split pack: {size} bytes is too short")
        os.close(fd)  # the map keeps what it needs
        self.size = st.st_size
        try:
            self._read_index()
        except _Bad as e:
            self.close()
            raise GGUFSplitError(self.path, f"corrupt pack: {e}") from None
        except BaseException:
            self.close()
            raise

    # -- structure

    def _read_index(self) -> None:
        mm = self.mm
        magic, version, flags = _HEAD.unpack_from(mm, 0)
        if magic != MAGIC:
            raise GGUFSplitError(self.path, "not a gguf-split pack (no GGUFPACK magic)")
        if version != VERSION:
            raise GGUFSplitError(self.path, f"pack format version {version} is not supported (this gguf-split "
                                            f"reads version {VERSION}); a newer gguf-split wrote it")
        _need(flags == 0, f"unknown flags {flags:#x} in the head")
        ioff, ilen, tver, tflags, tmagic = _TAIL.unpack_from(mm, self.size - _TAIL.size)
        if tmagic != MAGIC:
            raise _Bad("no GGUFPACK magic at the end: the pack is truncated or was not written completely")
        _need(tver == version and tflags == 0, f"the tail says version {tver}, flags {tflags:#x}; the head "
                                               f"says version {version}")
        self.index_offset = ioff
        _need(ioff >= _HEAD.size and ilen >= _REC.size and ioff + ilen == self.size - _TAIL.size,
              "the tail's index position does not match the file size (truncated?)")
        _, rcodec, body, decoded = self._record(ioff, KIND_INDEX, limit=self.size - _TAIL.size)
        _need(decoded <= MAX_INDEX_BYTES, f"index claims {decoded} bytes, over the limit of {MAX_INDEX_BYTES}")
        raw = self._decode(rcodec, body, decoded, "index")
        try:
            index = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _Bad(f"index is not valid JSON ({type(e).__name__})") from None
        self.version = version
        self._parse(index)

    def _parse(self, ix: Any) -> None:
        _need(isinstance(ix, dict), "index is not a JSON object")
        _need(ix.get("format") == "ggufpack", "index format is not 'ggufpack'")
        _need(ix.get("version") == self.version, f"index version {ix.get('version')!r} differs from the head's")
        self.kind, self.meta = ix.get("kind"), ix.get("meta")
        blobs, tensors, files = ix.get("blobs"), ix.get("tensors"), ix.get("files")
        _need(isinstance(blobs, list) and isinstance(tensors, list) and isinstance(files, list),
              "index lacks its blobs, tensors or files list")
        self.blobs: list[_BlobEntry] = []
        for i, b in enumerate(blobs):
            _need(isinstance(b, dict), f"blob {i} is not an object")
            size, rec = b.get("size"), b.get("record")
            _need(_is_int(size) and 0 <= size <= MAX_RECORD_BYTES, f"blob {i}: bad size {size!r}")
            self._check_offset(rec, f"blob {i}")
            self.blobs.append(_BlobEntry(size, _hexstr(b.get("xxh3"), 16, f"blob {i} xxh3"), rec))
        self.tensors: list[_TensorEntry] = []
        for i, t in enumerate(tensors):
            self.tensors.append(self._parse_tensor(i, t))
        for i, t in enumerate(self.tensors):
            if t.codec == "delta":
                assert t.base is not None
                _need(0 <= t.base < len(self.tensors), f"tensor {i}: base {t.base} does not exist")
                b = self.tensors[t.base]
                _need(b.codec == "plain", f"tensor {i}: its base {t.base} is not plainly coded")
                _need(b.geo.ggml_type in codec.DELTA_BASE_TYPES, f"tensor {i}: base type "
                                                                 f"{b.geo.ggml_type} cannot be a delta base")
                _need(b.geo.shape == t.geo.shape and b.rows_per_chunk == t.rows_per_chunk,
                      f"tensor {i}: its base has another shape or chunking")
        self.files: list[_FileEntryFull] = []
        seen: set[str] = set()
        for i, f in enumerate(files):
            _need(isinstance(f, dict), f"file {i} is not an object")
            try:
                name = check_file_name(f.get("name"))
            except GGUFSplitError as e:
                raise _Bad(f"file {i}: {e.problem}") from None
            _need(name not in seen, f"file name {name!r} appears twice")
            seen.add(name)
            size = f.get("size")
            _need(_is_int(size) and 0 <= size <= MAX_FILE_BYTES, f"file {name!r}: bad size {size!r}")
            parts = f.get("parts")
            _need(isinstance(parts, list), f"file {name!r}: no parts list")
            total = 0
            out_parts: list[tuple[str, int]] = []
            for p in parts:
                _need(isinstance(p, list) and len(p) == 2 and p[0] in ("b", "t", "z") and _is_int(p[1]),
                      f"file {name!r}: bad part {str(p)[:60]}")
                tag, v = p
                if tag == "b":
                    _need(0 <= v < len(self.blobs), f"file {name!r}: blob {v} does not exist")
                    total += self.blobs[v].size
                elif tag == "t":
                    _need(0 <= v < len(self.tensors), f"file {name!r}: tensor {v} does not exist")
                    total += self.tensors[v].geo.nbytes
                else:
                    _need(0 < v <= MAX_FILE_BYTES, f"file {name!r}: bad zero run {v}")
                    total += v
                out_parts.append((tag, v))
            _need(total == size, f"file {name!r}: its parts add up to {total} bytes, not {size}")
            entry = FileEntry(name, size, _hexstr(f.get("sha256"), 32, f"file {name!r} sha256"),
                              _hexstr(f.get("xxh3"), 16, f"file {name!r} xxh3"))
            self.files.append(_FileEntryFull(entry, out_parts))

    def _parse_tensor(self, i: int, t: Any) -> _TensorEntry:
        _need(isinstance(t, dict), f"tensor {i} is not an object")
        ty, shape = t.get("type"), t.get("shape")
        _need(_is_int(ty) and isinstance(shape, list) and all(_is_int(d) for d in shape),
              f"tensor {i}: bad type or shape")
        try:
            geo = codec.geometry(ty, tuple(shape))
            rpc = t.get("rows_per_chunk")
            codec.check_rows_per_chunk(geo, rpc)
        except CodecError as e:
            raise _Bad(f"tensor {i}: {e}") from None
        name = t.get("name")
        name = name if isinstance(name, str) else f"#{i}"
        chunks = t.get("chunks")
        n = geo.chunk_count(rpc)
        _need(isinstance(chunks, list) and len(chunks) == n, f"tensor {i}: needs {n} chunks")
        for c in chunks:
            self._check_offset(c, f"tensor {i} chunk")
        te = _TensorEntry(name[:200], geo, _hexstr(t.get("xxh3"), 16, f"tensor {i} xxh3"), rpc, t.get("codec"),
                          chunks)
        if te.codec == "plain":
            te.shuffle = t.get("shuffle")
            try:
                codec.check_stride(geo, te.shuffle)
            except CodecError as err:
                raise _Bad(f"tensor {i}: {err}") from None
        elif te.codec == "delta":
            _need(ty in codec.DELTA_TARGET_TYPES, f"tensor {i}: type {ty} cannot be a delta target")
            te.base, te.rank = t.get("base"), t.get("rank")
            te.factor_type, te.residual, te.factors = t.get("factor_type"), t.get("residual"), t.get("factors")
            _need(_is_int(te.base), f"tensor {i}: bad base")
            _need(_is_int(te.rank) and 0 <= te.rank <= min(codec.MAX_RANK, geo.n_rows, geo.row_elems),
                  f"tensor {i}: bad rank {te.rank!r}")
            _need(isinstance(te.factor_type, str) and te.factor_type in codec.FACTOR_DTYPES,
                  f"tensor {i}: unknown factor type")
            _need(isinstance(te.residual, str) and te.residual in codec.RESIDUAL_MODES,
                  f"tensor {i}: unknown residual mode")
            fbytes = te.rank * (geo.n_rows + geo.row_elems) * np.dtype(codec.FACTOR_DTYPES[te.factor_type]).itemsize
            _need(fbytes <= MAX_RECORD_BYTES, f"tensor {i}: factors of {fbytes} bytes are over the limit")
            if te.rank:
                self._check_offset(te.factors, f"tensor {i} factors")
            else:
                _need(te.factors is None, f"tensor {i}: rank 0 with factors")
        else:
            raise _Bad(f"tensor {i}: unknown codec {str(te.codec)[:40]!r}")
        return te

    def _check_offset(self, off: Any, what: str) -> None:
        _need(_is_int(off) and _HEAD.size <= off and off + _REC.size <= self.index_offset,
              f"{what}: record offset {off!r} lies outside the records")

    # -- records

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            raise GGUFSplitError(self.path, "pack is closed")
        return self._mm

    def _record(self, off: int, kind: int = KIND_DATA, limit: int | None = None) -> tuple[int, int, memoryview, int]:
        """(kind, record codec, body, decoded length) of the record at `off`, its checksum verified."""
        limit = self.index_offset if limit is None else limit
        _need(off + _REC.size <= limit, f"record at {off} lies past the records")
        rkind, rcodec, r1, r2, blen, decoded, digest = _REC.unpack_from(self.mm, off)
        _need(r1 == 0 and r2 == 0, f"record at {off}: reserved fields are not zero")
        _need(rkind in (KIND_DATA, KIND_INDEX), f"record at {off}: unknown kind {rkind}")
        _need(rcodec in (REC_STORED, REC_ZSTD), f"record at {off}: unknown record codec {rcodec}")
        _need(blen <= limit - off - _REC.size, f"record at {off}: body of {blen} bytes runs past the records")
        body = memoryview(self.mm)[off + _REC.size : off + _REC.size + blen]
        if xxhash.xxh3_128_digest(body) != digest:
            raise _Bad(f"record at {off}: checksum mismatch (corrupt)")
        _need(rkind == kind, f"record at {off} is not a{'n index' if kind == KIND_INDEX else ' data'} record")
        return rkind, rcodec, body, decoded

    def _decode(self, rcodec: int, body: memoryview, decoded: int, what: str) -> bytes:
        if rcodec == REC_STORED:
            _need(decoded == len(body), f"{what}: stored record of {len(body)} bytes claims {decoded}")
            return bytes(body)
        _need(decoded <= MAX_RECORD_BYTES, f"{what}: record claims {decoded} bytes")
        try:
            return codec.decompress(body, decoded)
        except CodecError as e:
            raise _Bad(f"{what}: {e}") from None

    def data(self, off: int, expected: int | None, what: str, bound: int | None = None) -> bytes:
        """A data record's decoded bytes; exactly `expected` of them, or at most `bound`."""
        _, rcodec, body, decoded = self._record(off)
        if expected is not None:
            _need(decoded == expected, f"{what}: record holds {decoded} bytes, {expected} expected")
        elif bound is not None:
            _need(decoded <= bound, f"{what}: record claims {decoded} bytes, at most {bound} possible")
        return self._decode(rcodec, body, decoded, what)

    def blob(self, i: int) -> bytes:
        b = self.blobs[i]
        data = self.data(b.record, b.size, f"blob {i}")
        _need(xxhash.xxh3_128_hexdigest(data) == b.xxh3, f"blob {i}: xxh3 mismatch")
        return data

    def plain_chunk(self, ti: int, c: int) -> bytes:
        t = self.tensors[ti]
        r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
        raw = self.data(t.chunks[c], (r1 - r0) * t.geo.row_bytes, f"tensor {t.name!r} chunk {c}")
        return codec.unshuffle(raw, t.shuffle)

    def factors(self, ti: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.tensors[ti]
        m, n = t.geo.n_rows, t.geo.row_elems
        if t.rank == 0:
            return np.zeros((0, m), np.float32), np.zeros((0, n), np.float32)
        assert t.factors is not None
        size = t.rank * (m + n) * np.dtype(codec.FACTOR_DTYPES[t.factor_type]).itemsize
        raw = self.data(t.factors, size, f"tensor {t.name!r} factors")
        return codec.factors_from_bytes(raw, t.factor_type, t.rank, m, n)

    def _delta_job(self, ti: int, c: int, factors: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> bytes:
        """A delta chunk, its factors looked up when the job runs (they are cached per tensor)."""
        return self.delta_chunk(ti, c, factors(ti))

    def delta_chunk(self, ti: int, c: int, fac: tuple[np.ndarray, np.ndarray]) -> bytes:
        t = self.tensors[ti]
        assert t.base is not None
        b = self.tensors[t.base]
        r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
        rows = r1 - r0
        n = rows * t.geo.row_elems
        width = codec.DELTA_TARGET_TYPES[Q(t.geo.ggml_type)][1]
        res = self.data(t.chunks[c], None, f"tensor {t.name!r} chunk {c}", codec.residual_bound(n, width))
        base_raw = self.plain_chunk(t.base, c)
        bt = np.ascontiguousarray(fac[0][:, r0:r1])
        try:
            return codec.decode_delta_chunk(base_raw, b.geo.ggml_type, t.geo.ggml_type, rows, t.geo.row_elems,
                                            bt, fac[1], res, t.residual)
        except CodecError as e:
            raise _Bad(f"tensor {t.name!r} chunk {c}: {e}") from None

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

    # -- writing one file

    def write_file(self, fi: int, out: BinaryIO, pool: ThreadPoolExecutor, window: int, bar: Any) -> None:
        f = self.files[fi]
        sha, xh = hashlib.sha256(), xxhash.xxh3_128()
        fac_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        fac_lock = threading.Lock()

        def factors(ti: int) -> tuple[np.ndarray, np.ndarray]:
            with fac_lock:
                v = fac_cache.get(ti)
                if v is None:
                    v = fac_cache[ti] = self.factors(ti)
                return v

        def job_list() -> Iterator[tuple[Any, Callable[[], Any]]]:
            for tag, v in f.parts:
                if tag == "z":
                    yield ("z", v, False), _nothing
                elif tag == "b":
                    yield ("b", v, False), partial(self.blob, v)
                else:
                    t = self.tensors[v]
                    n = t.geo.chunk_count(t.rows_per_chunk)
                    for c in range(n):
                        job: Callable[[], Any]
                        if t.codec == "plain":
                            job = partial(self.plain_chunk, v, c)
                        else:
                            job = partial(self._delta_job, v, c, factors)
                        yield ("t", v, c == n - 1), job

        tags: deque[Any] = deque()

        def jobs() -> Iterator[Callable[[], Any]]:
            for tag, job in job_list():
                tags.append(tag)
                yield job

        th = xxhash.xxh3_128()
        written = 0
        for res in _ordered(pool, jobs(), window):
            tag, v, last = tags.popleft()
            if tag == "z":
                left = v
                while left:
                    piece = _ZERO[: min(left, len(_ZERO))]
                    out.write(piece)
                    sha.update(piece)
                    xh.update(piece)
                    left -= len(piece)
                n = v
            else:
                out.write(res)
                sha.update(res)
                xh.update(res)
                n = len(res)
                if tag == "t":
                    th.update(res)
                    if last:
                        t = self.tensors[v]
                        if th.hexdigest() != t.xxh3:
                            raise _Bad(f"tensor {t.name!r} of {f.entry.name}: rebuilt bytes do not match the "
                                       "recorded xxh3-128" + (" (a delta: this machine computes its prediction "
                                                              "differently, or the pack is corrupt)"
                                                              if t.codec == "delta" else ""))
                        th = xxhash.xxh3_128()
                        fac_cache.pop(v, None)
            written += n
            bar.advance(n)
        if written != f.entry.size:
            raise _Bad(f"{f.entry.name}: rebuilt {written} bytes, {f.entry.size} expected")
        if xh.hexdigest() != f.entry.xxh3:
            raise _Bad(f"{f.entry.name}: rebuilt file does not match its recorded xxh3-128")
        if sha.hexdigest() != f.entry.sha256:
            raise _Bad(f"{f.entry.name}: rebuilt file does not match its recorded sha256")


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
    from ..disk.commit import holds_bytes

    t0 = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    nthreads = _threads(threads)
    with PackReader(pack_path) as r:
        if files is not None:
            missing = set(files) - {f.entry.name for f in r.files}
            if missing:
                raise GGUFSplitError(r.path, f"holds no file {sorted(missing)[0]!r}")
        chosen = [(i, f) for i, f in enumerate(r.files) if files is None or f.entry.name in files]
        total = sum(f.entry.size for _, f in chosen)
        if any(t.codec == "delta" for t in r.tensors):
            try:
                codec.check_float_environment()
            except CodecError as e:
                raise GGUFSplitError(r.path, str(e)) from None
        probe = out_dir
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        try:
            free = os.statvfs(probe).f_bavail * os.statvfs(probe).f_frsize
        except OSError:
            free = None
        if free is not None and total > free:
            raise GGUFSplitError(out_dir, f"the pack unpacks to {total} bytes, only {free} are free there")
        with ThreadPoolExecutor(nthreads) as pool, progress.bar("unpacking", total) as bar:
            def writer(fi: int) -> Callable[[BinaryIO], None]:
                def write(out: BinaryIO) -> None:
                    try:
                        r.write_file(fi, out, pool, nthreads + 2, bar)
                    except _Bad as e:
                        raise GGUFSplitError(r.path, f"corrupt pack: {e}") from None
                return write

            entries = {f.entry.name: f.entry for _, f in chosen}
            kept = _write_outputs(out_dir, [(f.entry.name, writer(i)) for i, f in chosen], force=force,
                                  in_place=lambda name, path: holds_bytes(path, entries[name].size,
                                                                          entries[name].xxh3))
    written = total - sum(entries[name].size for name in kept)
    return UnpackReport(out_dir, [f.entry for _, f in chosen], written, time.perf_counter() - t0, kept)
