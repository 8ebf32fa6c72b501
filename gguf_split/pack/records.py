"""Packing, stage 4: the data records, in order of first use, coded on a pool and written in that order.

Why this order: file by file, part by part, a delta's base before the delta, so every reference in the
index points backwards and unpacking reads the pack mostly front to back. Each record is one `RecordJob`
(a blob, a delta's factors, one chunk of a tensor's rows); `Encoder` turns it into a record body on the
pool (zstd, shuffles, delta residuals: all release the GIL) while the writer appends finished records in
order, a bounded window of jobs in flight (`disk.jobs.map_ordered`), and notes where each landed
(`Written`) for the index.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import xxhash
import zstandard

from ..disk.jobs import map_ordered
from ..disk.progress import Progress
from ..errors import GGUFSplitError
from . import codec, ladder
from .codec import CodecError
from .format import CODEC_DELTA, CODEC_FPLANES, CODEC_REQUANT, KIND_DATA, PART_BLOB, PART_TENSOR, REC_STORED, REC_ZSTD, Part, RecordHeader
from .inventory import Inventory
from .planning import TensorPlan, load_weights

LEVEL_TENSORS = 3  # measured: level 3 gives 92 % on Q4_1 (shuffled) at ~230 MB/s; 19 gives 88 % at 6 MB/s
LEVEL_HEADERS = 19  # headers are small and repeated once: spend the time
SMALL_FACTORS = 4 << 20  # factors below this are coded at LEVEL_HEADERS (they are few and read once)

BLOB, FACTORS, CHUNK = "blob", "factors", "chunk"


@dataclass(frozen=True, slots=True)
class RecordJob:
    """One data record to write: a blob, a delta-coded tensor's factors, or rows [r0, r1) of a tensor."""

    what: str  # BLOB, FACTORS or CHUNK
    index: int  # the blob's or the tensor's
    r0: int = 0
    r1: int = 0


@dataclass(frozen=True, slots=True)
class Encoded:
    """A record's body as it goes into the pack."""

    codec: int  # REC_STORED or REC_ZSTD
    body: Any  # bytes, or a view of the input (stored as it is)
    decoded: int
    digest: bytes  # xxh3-128 of the body
    source_bytes: int  # input bytes it covers (progress)


@dataclass
class TensorRecords:
    """Where a distinct tensor's records landed."""

    chunks: list[int] = field(default_factory=list)
    factors: int | None = None
    stored: int = 0  # bytes of its records, headers included
    all_stored_raw: bool = True  # no chunk was worth compressing


@dataclass
class BlobRecord:
    offset: int = -1
    stored: int = 0


@dataclass
class Written:
    """Where every record landed, for the index and the report."""

    blobs: list[BlobRecord]
    tensors: list[TensorRecords]

    def note(self, job: RecordJob, offset: int, enc: Encoded) -> None:
        stored = RecordHeader.SIZE + len(enc.body)
        if job.what == BLOB:
            self.blobs[job.index] = BlobRecord(offset, stored)
            return
        t = self.tensors[job.index]
        t.stored += stored
        if job.what == FACTORS:
            t.factors = offset
            return
        t.chunks.append(offset)
        if enc.codec != REC_STORED:
            t.all_stored_raw = False


class PackStream:
    """The pack file being written: its position, and records appended at it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = 0

    def write(self, b: Any) -> None:
        self.f.write(b)
        self.pos += len(b)

    def record(self, kind: int, rcodec: int, body: Any, decoded: int, digest: bytes | None = None) -> int:
        """Append one record; returns its offset."""
        off = self.pos
        if digest is None:
            digest = xxhash.xxh3_128_digest(body)
        self.write(RecordHeader(kind, rcodec, len(body), decoded, digest).encode())
        self.write(body)
        return off


def record_order(inv: Inventory, plans: list[TensorPlan]) -> list[Part]:
    """Blobs and tensors in order of first use, each once, a delta's base (a requant's source) before it."""
    order: list[Part] = []
    seen: set[Part] = set()

    def want(p: Part) -> None:
        if p in seen:
            return
        for dep in (plans[p.value].needs if p.kind == PART_TENSOR else []):
            want(Part(PART_TENSOR, dep))
        seen.add(p)
        order.append(p)

    for parts in inv.parts:
        for p in parts:
            if p.kind in (PART_BLOB, PART_TENSOR):
                want(p)
    return order


def record_jobs(order: list[Part], inv: Inventory, plans: list[TensorPlan]) -> Iterator[RecordJob]:
    """The records of `order`: a blob's one; a tensor's factors (a delta of rank > 0) then its chunks."""
    for p in order:
        if p.kind == PART_BLOB:
            yield RecordJob(BLOB, p.value)
            continue
        t, plan = inv.tensors[p.value], plans[p.value]
        if plan.delta is not None and plan.delta.rank > 0:
            yield RecordJob(FACTORS, p.value)
        for c in range(t.geo.chunk_count(t.rows_per_chunk)):
            r0, r1 = t.geo.chunk_span(c, t.rows_per_chunk)
            yield RecordJob(CHUNK, p.value, r0, r1)


def stored_or_compressed(raw: Any, level: int, compressed: Any = None) -> tuple[int, Any]:
    """(record codec, body): the zstd frame when it is smaller than the bytes, else the bytes."""
    z = codec.compress(raw, level) if compressed is None else compressed
    return (REC_ZSTD, z) if len(z) < len(raw) else (REC_STORED, raw)


class Encoder:
    """Codes a RecordJob into a record body (runs on the pool; reads the inputs through their maps)."""

    def __init__(self, inv: Inventory, plans: list[TensorPlan], level: int, out_path: str) -> None:
        self.inv, self.plans, self.level, self.out_path = inv, plans, level, out_path
        self._weights: dict[int, ladder.Weights | None] = {}  # a requant tensor's importance vectors
        self._lock = threading.Lock()

    def weights(self, ti: int) -> ladder.Weights | None:
        pair = self.plans[ti].imatrix
        if pair is None:
            return None
        with self._lock:
            if ti not in self._weights:
                self._weights[ti] = load_weights(self.inv.tensors[pair[0]], self.inv.tensors[pair[1]],
                                                 self.inv.tensors[ti].shape)
            w = self._weights[ti]
        if w is None:
            raise CodecError("its importance vectors do not fit")
        return w

    def __call__(self, job: RecordJob) -> Encoded:
        if job.what == BLOB:
            return self.blob(job.index)
        if job.what == FACTORS:
            return self.factors(job.index)
        kind = self.plans[job.index].codec
        try:
            if kind == CODEC_DELTA:
                return self.delta_chunk(job.index, job.r0, job.r1)
            if kind == CODEC_REQUANT:
                return self.requant_chunk(job.index, job.r0, job.r1)
            if kind == CODEC_FPLANES:
                return self.fplanes_chunk(job.index, job.r0, job.r1)
        except CodecError as e:
            name = self.inv.tensors[job.index].names[0]
            raise GGUFSplitError(self.out_path, f"tensor {name!r}: {e} (a bug: please report it)") from None
        return self.plain_chunk(job.index, job.r0, job.r1)

    def blob(self, i: int) -> Encoded:
        b = self.inv.blobs[i]
        data = b.file.raw(b.start, b.end)
        rcodec, body = stored_or_compressed(data, LEVEL_HEADERS)
        return Encoded(rcodec, body, len(data), xxhash.xxh3_128_digest(body), b.size)

    def factors(self, ti: int) -> Encoded:
        delta = self.plans[ti].delta
        assert delta is not None
        raw = delta.factor_bytes()
        rcodec, body = stored_or_compressed(raw, LEVEL_HEADERS if len(raw) < SMALL_FACTORS else self.level)
        return Encoded(rcodec, body, len(raw), xxhash.xxh3_128_digest(body), 0)

    def plain_chunk(self, ti: int, r0: int, r1: int) -> Encoded:
        raw = self.inv.tensors[ti].rows()(r0, r1)
        stride = self.plans[ti].stride
        data = codec.shuffle(raw, stride) if stride > 1 else raw
        rcodec, body = stored_or_compressed(data, self.level)
        return Encoded(rcodec, body, len(raw), xxhash.xxh3_128_digest(body), len(raw))

    def delta_chunk(self, ti: int, r0: int, r1: int) -> Encoded:
        t, plan = self.inv.tensors[ti], self.plans[ti]
        assert plan.delta is not None and plan.base is not None
        b = self.inv.tensors[plan.base]
        body = codec.encode_delta_chunk(plan.delta, b.rows()(r0, r1), b.ggml_type, t.rows()(r0, r1), t.ggml_type,
                                        r0, r1, t.geo.row_elems, self.level)
        return Encoded(REC_ZSTD, body, zstandard.frame_content_size(body), xxhash.xxh3_128_digest(body),
                       (r1 - r0) * t.geo.row_bytes)

    def requant_chunk(self, ti: int, r0: int, r1: int) -> Encoded:
        t, plan = self.inv.tensors[ti], self.plans[ti]
        assert plan.source is not None
        s = self.inv.tensors[plan.source]
        body = ladder.encode_requant_chunk(s.rows()(r0, r1), s.ggml_type, t.rows()(r0, r1), t.ggml_type, r1 - r0,
                                           t.geo.row_elems, self.level, self.weights(ti), r0)
        return Encoded(REC_ZSTD, body, zstandard.frame_content_size(body), xxhash.xxh3_128_digest(body),
                       (r1 - r0) * t.geo.row_bytes)

    def fplanes_chunk(self, ti: int, r0: int, r1: int) -> Encoded:
        t = self.inv.tensors[ti]
        raw = t.rows()(r0, r1)
        data, z = ladder.encode_fplanes_chunk(raw, t.ggml_type, self.plans[ti].stride, self.level)
        rcodec, body = (REC_STORED, data) if z is None else stored_or_compressed(data, self.level, z)
        return Encoded(rcodec, body, len(data), xxhash.xxh3_128_digest(body), len(raw))


def write_records(out: PackStream, inv: Inventory, plans: list[TensorPlan], level: int, threads: int,
                  progress: Progress, out_path: str) -> Written:
    """Stage 4: every data record, coded on `threads` threads and appended to `out` in order."""
    order = record_order(inv, plans)
    written = Written([BlobRecord() for _ in inv.blobs], [TensorRecords() for _ in inv.tensors])
    total = sum(inv.blobs[p.value].size if p.kind == PART_BLOB else inv.tensors[p.value].geo.nbytes for p in order)
    encode = Encoder(inv, plans, level, out_path)
    with ThreadPoolExecutor(threads) as pool, codec.blas_single_threaded(), progress.bar("packing", total) as bar:
        for job, enc in map_ordered(pool, encode, record_jobs(order, inv, plans), window=2 * threads + 2):
            written.note(job, out.record(KIND_DATA, enc.codec, enc.body, enc.decoded, enc.digest), enc)
            bar.advance(enc.source_bytes)
    return written
