"""Packing, stage 3: how each distinct tensor is coded. Which quantized tensors are re-derived from a
full-precision version of themselves (requant), who may be a delta base, which tensors try a delta (and
against which base), and for the rest plain coding (its byte-shuffle stride) or, for F16/BF16, fplanes.

Requant first: a quantized tensor of a type the port re-derives (`ladder.can_requant`) whose name and shape
an F16/BF16/F32 tensor of the pack shares (the same file's ladder, or a fine-tune published as F16 and as a
quant: any file) tries each such source (up to MAX_SOURCES) on sampled rows and takes the one whose residual
is smallest, when it is at most REQUANT_GAIN of the tensor's plain bytes. A tensor so planned is never a
delta base (a source is then stored by itself, fplanes or a delta against another full-precision version,
and every quant of it costs a residual: measured on ladders, far below the quant as a base of a delta).

Why these rules: a family of fine-tunes holds several versions of a tensor under one name and shape.
One version of each such group, the *anchor* (the one most files hold, then the smallest), is stored
plainly so the others can be predicted from it; a target is any F16, BF16 or F32 tensor that is not an
anchor; a base is any tensor of a type with an elementwise dequantizer (codec.DELTA_BASE_TYPES) that is
not a target, so a delta is never stacked on a delta. A target tries the other versions of its name first,
else up to 32 tensors of its shape (an untied output head against the token embedding), keeps the closest
on a few sampled rows, and takes the delta only when `codec.plan_delta` estimates it 3 % smaller than
zstd (a delta decodes slower). Plans run on `disk.jobs.run_jobs`, the largest tensors first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from ..disk.jobs import run_jobs
from ..disk.progress import Progress, Reporter
from . import codec, ladder
from .codec import DeltaPlan, RowReader
from .format import CODEC_DELTA, CODEC_FPLANES, CODEC_PLAIN, CODEC_REQUANT
from .inventory import DistinctTensor

MAX_BASE_DISTANCE = 0.5  # relative distance |t - b| / |t| beyond which a delta cannot pay
MAX_SHAPE_CANDIDATES = 32  # bases of the same shape tried when no other version has the target's name
DELTA_GAIN = 0.97  # a delta is taken when it is estimated at most this fraction of zstd's bytes
SIMILARITY_ROWS = 16
MAX_SOURCES = 4  # full-precision versions a quant tries as its requant source
MAX_IMATRICES = 4  # importance matrices (packed imatrix files) a quant tries, next to none
SUMS, COUNTS = ".in_sum2", ".counts"  # llama-imatrix's GGUF tensor names: <tensor name> + these
REQUANT_GAIN = 0.95  # requant is taken when its sampled residual is at most this fraction of plain's bytes
CLEAR_REQUANT = 0.01  # a residual this small (of plain's bytes) is a ladder's: taken without weighing a delta
SAMPLE_BYTES = 128 << 10  # bytes of each of the 2 spread samples a plain, fplanes or requant estimate reads


@dataclass
class TensorPlan:
    """How a distinct tensor is coded: plainly (byte-shuffled with `stride`, then zstd), fplanes (its plain
    fallback shuffled with `stride`), as a delta against tensor `base` with `delta`'s factors and residual
    mode, or re-derived from tensor `source` (requant)."""

    codec: str = CODEC_PLAIN
    stride: int = 1
    base: int | None = None
    delta: DeltaPlan | None = None
    source: int | None = None
    imatrix: tuple[int, int] | None = None  # requant: the in_sum2 and counts tensors of its importance vectors

    @property
    def needs(self) -> list[int]:
        """The tensors whose chunks this one's decoding reads (their records come first)."""
        deps = [d for d in (self.base, self.source) if d is not None]
        return deps + list(self.imatrix or ())


class BaseChoice:
    """Which tensors are delta targets, which may be their bases, and the base a target is predicted from."""

    def __init__(self, tensors: list[DistinctTensor], requant: frozenset[int] = frozenset()) -> None:
        self.requant = requant  # tensors re-derived from a source: never a base
        self.deltas: dict[tuple[int, int], DeltaPlan | None] = {}  # (target, base) -> plan, made once
        self._lock = threading.Lock()
        self.groups: dict[tuple[str, tuple[int, ...]], list[DistinctTensor]] = {}
        for t in tensors:
            for n in t.names:
                self.groups.setdefault((n, t.shape), []).append(t)
        anchors = {self._anchor(versions).index for versions in self.groups.values() if len(versions) > 1}
        self.targets = {t.index for t in tensors if t.ggml_type in codec.DELTA_TARGET_TYPES and t.index not in anchors}
        self._weights: dict[tuple[int, int], ladder.Weights | None] = {}
        self.imatrices = _imatrix_pairs(tensors)
        self.by_shape: dict[tuple[int, ...], list[DistinctTensor]] = {}
        for t in tensors:
            if self.can_base(t):
                self.by_shape.setdefault(t.shape, []).append(t)

    @staticmethod
    def _anchor(versions: list[DistinctTensor]) -> DistinctTensor:
        """The version stored plainly: held by the most files, then the smallest, then the first."""
        return max(versions, key=lambda t: (t.file_count, -t.geo.nbytes, -t.index))

    def can_base(self, t: DistinctTensor) -> bool:
        return t.index not in self.targets and t.index not in self.requant and t.ggml_type in codec.DELTA_BASE_TYPES

    def delta(self, t: DistinctTensor, b: DistinctTensor, level: int) -> DeltaPlan | None:
        """plan_delta of target t against base b, computed once (requant planning may have asked)."""
        with self._lock:
            if (t.index, b.index) in self.deltas:
                return self.deltas[(t.index, b.index)]
        p = codec.plan_delta(t.rows(), t.ggml_type, b.rows(), b.ggml_type, t.geo, level=level,
                             rows_per_chunk=t.rows_per_chunk, seed=t.index)
        with self._lock:
            self.deltas[(t.index, b.index)] = p
        return p

    def weights(self, t: DistinctTensor, pair: tuple[DistinctTensor, DistinctTensor]) -> ladder.Weights | None:
        """The importance vectors of an imatrix's (in_sum2, counts) for quant t, or None when they do not fit."""
        key = (pair[0].index, pair[1].index)
        with self._lock:
            if key not in self._weights:
                self._weights[key] = load_weights(pair[0], pair[1], t.shape)
            return self._weights[key]

    def imatrices_for(self, t: DistinctTensor) -> list[tuple[DistinctTensor, DistinctTensor]]:
        found: list[tuple[DistinctTensor, DistinctTensor]] = []
        for n in t.names:
            found += [p for p in self.imatrices.get(n, []) if p not in found]
        return found[:MAX_IMATRICES]

    def sources_for(self, t: DistinctTensor) -> list[DistinctTensor]:
        """The full-precision versions of quantized `t` (same name and shape) a requant may derive it from."""
        if not ladder.can_requant(t.ggml_type):
            return []
        found: list[DistinctTensor] = []
        for n in t.names:
            found += [o for o in self.groups.get((n, t.shape), []) if o.ggml_type in ladder.SOURCE_TYPES
                      and o not in found]
        return found[:MAX_SOURCES]

    def base_for(self, t: DistinctTensor) -> DistinctTensor | None:
        """The closest candidate base of target `t`, or None when none is close enough to pay."""
        same: list[DistinctTensor] = []
        for n in t.names:
            same += [o for o in self.groups.get((n, t.shape), []) if o is not t and self.can_base(o)]
        candidates = same or [o for o in self.by_shape.get(t.shape, []) if o is not t][:MAX_SHAPE_CANDIDATES]
        best, best_d = None, MAX_BASE_DISTANCE
        for c in candidates:
            d = distance(t, c)
            if d < best_d:
                best, best_d = c, d
        return best


def _imatrix_pairs(tensors: list[DistinctTensor]) -> dict[str, list[tuple[DistinctTensor, DistinctTensor]]]:
    """Tensor name -> the (`<name>.in_sum2`, `<name>.counts`) F32 pairs of the imatrix files packed (each
    pair from one file)."""
    by_place = {(id(src.file), src.info.name): t for t in tensors for src in t.sources}
    pairs: dict[str, list[tuple[DistinctTensor, DistinctTensor]]] = {}
    for t in tensors:
        for src in t.sources:
            name = src.info.name
            if t.ggml_type != Q.F32 or not name.endswith(SUMS):
                continue
            counts = by_place.get((id(src.file), name[:-len(SUMS)] + COUNTS))
            if counts is not None and counts.ggml_type == Q.F32:
                got = pairs.setdefault(name[:-len(SUMS)], [])
                if (t, counts) not in got:
                    got.append((t, counts))
    return pairs


def load_weights(sums: DistinctTensor, counts: DistinctTensor, shape: tuple[int, ...]) -> ladder.Weights | None:
    """Importance vectors from an imatrix's two tensors for a quant of `shape` (None: they do not fit)."""
    try:
        return ladder.Weights.from_tensors(bytes(sums.rows()(0, sums.geo.n_rows)),
                                           bytes(counts.rows()(0, counts.geo.n_rows)), shape)
    except codec.CodecError:
        return None


def distance(t: DistinctTensor, b: DistinctTensor) -> float:
    """Relative distance |t - b| / |t| on a few rows (inf when either is not finite there)."""
    m = t.geo.n_rows
    rows = sorted({int(r) for r in np.linspace(0, m - 1, min(m, SIMILARITY_ROWS))})
    tr, br = t.rows(), b.rows()
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


def plan_tensor(t: DistinctTensor, choice: BaseChoice, level: int) -> TensorPlan:
    """A delta when `t` is a target, a close base exists and the delta pays; else plain with its stride,
    or fplanes (F16/BF16) when that is smaller on the samples."""
    if t.index in choice.targets:
        b = choice.base_for(t)
        if b is not None:
            p = choice.delta(t, b, level)
            if p is not None and p.estimate < DELTA_GAIN * p.plain_estimate:
                return TensorPlan(CODEC_DELTA, base=b.index, delta=p)
    sizes = plain_sizes(t.geo, t.ggml_type, t.rows(), level)
    stride = min((st for st in sizes if st > 0), key=lambda st: (sizes[st], st))
    if FPLANES_KEY in sizes and sizes[FPLANES_KEY] < sizes[stride]:
        return TensorPlan(CODEC_FPLANES, stride=stride)
    return TensorPlan(CODEC_PLAIN, stride=stride)


FPLANES_KEY = 0  # plain_sizes' key for the fplanes coding


def sample_spans(geo: codec.Geometry) -> list[tuple[int, int]]:
    """Up to 2 spread runs of rows of ~SAMPLE_BYTES each, the estimates' samples."""
    m = geo.n_rows
    per = max(1, SAMPLE_BYTES // max(1, geo.row_bytes))
    return [(s, min(m, s + per)) for s in sorted({int(s) for s in np.linspace(0, max(0, m - per), 2)})]


def plain_sizes(geo: codec.Geometry, ggml_type: int, rows: RowReader, level: int) -> dict[int, int]:
    """Bytes on the samples: per byte-shuffle stride (1 and the type's natural one), and fplanes
    (FPLANES_KEY) for F16/BF16."""
    natural = codec.natural_stride(ggml_type)
    sizes = {1: 0, natural: 0}
    if ggml_type in ladder.FPLANES_TYPES:
        sizes[FPLANES_KEY] = 0
    for r0, r1 in sample_spans(geo):
        raw = bytes(rows(r0, r1))
        for st in sizes:
            sizes[st] += (ladder.fplanes_size(raw, ggml_type, natural, level) if st == FPLANES_KEY
                          else len(codec.compress(codec.shuffle(raw, st), level)))
    return sizes


def choose_stride(geo: codec.Geometry, ggml_type: int, rows: RowReader, level: int) -> int:
    """Byte-shuffle stride by the bytes it produces on up to 2 spread samples of ~128 KiB."""
    if codec.natural_stride(ggml_type) <= 1:
        return 1
    sizes = plain_sizes(geo, ggml_type, rows, level)
    return min((st for st in sizes if st > 0), key=lambda st: (sizes[st], st))


class SourceCheck:
    """Whether a requant source is finite everywhere (the port reproduces only finite inputs), each
    source read once however many quants ask."""

    def __init__(self) -> None:
        self._known: dict[int, bool] = {}
        self._lock = threading.Lock()

    def finite(self, s: DistinctTensor) -> bool:
        with self._lock:
            if s.index not in self._known:
                self._known[s.index] = _all_finite(s)
            return self._known[s.index]


def _all_finite(s: DistinctTensor) -> bool:
    rows = s.rows()
    for c in range(s.geo.chunk_count(s.rows_per_chunk)):
        r0, r1 = s.geo.chunk_span(c, s.rows_per_chunk)
        if not np.isfinite(ladder.source_rows(rows(r0, r1), s.ggml_type, r1 - r0, s.geo.row_elems)).all():
            return False
    return True


def plan_requant(t: DistinctTensor, choice: BaseChoice, check: SourceCheck, level: int) -> TensorPlan | None:
    """Requant from the source whose residual is smallest on the samples, when it pays (else None).

    A residual under CLEAR_REQUANT (1 %) of the plain bytes is a ladder (the quant was made from that source):
    taken. A larger one is a quant of something close to the source (a fine-tune's F16 next to its base's
    quant): there the quant may serve better as the base of the source's delta, so both ways are
    estimated and the cheaper kept."""
    spans = sample_spans(t.geo)
    scale = t.geo.n_rows / sum(r1 - r0 for r0, r1 in spans)
    rows = t.rows()
    plain = scale * min(sum(len(codec.compress(codec.shuffle(bytes(rows(r0, r1)), st), level)) for r0, r1 in spans)
                        for st in {1, codec.natural_stride(t.ggml_type)})
    best: tuple[float, DistinctTensor, tuple[int, int] | None] | None = None
    options: list[tuple[tuple[int, int] | None, ladder.Weights | None]] = [(None, None)]
    for pair in choice.imatrices_for(t):
        w = choice.weights(t, pair)
        if w is not None:
            options.append(((pair[0].index, pair[1].index), w))
    for s in choice.sources_for(t):
        if not check.finite(s):
            continue
        srows = s.rows()
        for key, w in options:
            est = scale * sum(ladder.requant_estimate(srows(r0, r1), s.ggml_type, rows(r0, r1), t.ggml_type, r1 - r0,
                                                      t.geo.row_elems, level, w, r0) or 0 for r0, r1 in spans)
            if best is None or est < best[0]:
                best = (est, s, key)
    if best is None or best[0] > REQUANT_GAIN * plain:
        return None
    est, s, imatrix = best
    if est > CLEAR_REQUANT * plain and s.index in choice.targets and t.ggml_type in codec.DELTA_BASE_TYPES:
        p = choice.delta(s, t, level)
        if p is not None and p.estimate < DELTA_GAIN * p.plain_estimate and plain + p.estimate < est + p.plain_estimate:
            return None  # the quant as the source's delta base costs less than the quant re-derived
    return TensorPlan(CODEC_REQUANT, source=s.index, imatrix=imatrix)


def _rank0_delta_bytes(s: DistinctTensor, q: DistinctTensor, level: int) -> int:
    """Sampled bytes of source s as a rank-0 delta of quant q (its dequantization rounded to s's type, and
    the exact residual): small when s is (close to) an upcast of q."""
    dtype, _ = codec.DELTA_TARGET_TYPES[Q(s.ggml_type)]
    total = 0
    n = s.geo.row_elems
    for r0, r1 in sample_spans(s.geo):
        base = codec.dequantize_rows(q.rows()(r0, r1), q.ggml_type, r1 - r0, n)
        if not np.isfinite(base).all():
            return 1 << 62
        pred = codec.predict_bits(base, np.zeros((0, r1 - r0), np.float32), np.zeros((0, n), np.float32), s.ggml_type)
        target = np.frombuffer(s.rows()(r0, r1), dtype=dtype)
        total += len(codec.compress(codec.residual_encode(target, pred, "sub"), level))
    return total


def _sampled_plain(t: DistinctTensor, spans: list[tuple[int, int]], level: int) -> int:
    rows = t.rows()
    return min(sum(len(codec.compress(codec.shuffle(bytes(rows(r0, r1)), st), level)) for r0, r1 in spans)
               for st in {1, codec.natural_stride(t.ggml_type)})


def keep_upcast_bases(tensors: list[DistinctTensor], plans: list[TensorPlan | None], level: int) -> None:
    """A source that is (nearly) an upcast of one of its quants (a ladder made from a quantized model) costs
    least as that quant, plain, plus a delta; the other quants still derive from the source. Per source,
    on the samples: if some quant q's plain bytes plus the source's rank-0 delta against q beat the source's
    own coding plus q's requant residual, q is planned again (plain: it becomes the source's delta base)."""
    by_source: dict[int, list[DistinctTensor]] = {}
    for t in tensors:
        p = plans[t.index]
        if p is not None and p.source is not None and p.imatrix is None and t.ggml_type in codec.DELTA_BASE_TYPES:
            by_source.setdefault(p.source, []).append(t)
    for si, quants in by_source.items():
        s = tensors[si]
        spans = sample_spans(s.geo)
        sizes = plain_sizes(s.geo, s.ggml_type, s.rows(), level)
        own = min(sizes.values())
        best: tuple[int, DistinctTensor] | None = None
        for q in quants:
            rq = sum(ladder.requant_estimate(s.rows()(r0, r1), s.ggml_type, q.rows()(r0, r1), q.ggml_type,
                                             r1 - r0, s.geo.row_elems, level) or 0 for r0, r1 in spans)
            gain = own + rq - _sampled_plain(q, spans, level) - _rank0_delta_bytes(s, q, level)
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, q)
        if best is not None:
            plans[best[1].index] = None


def plan_codecs(tensors: list[DistinctTensor], level: int, threads: int, progress: Progress) -> list[TensorPlan]:
    """Stage 3: every tensor's plan, on a pool (BLAS in one thread: the pool is the parallelism): the
    requant candidates first (they decide which tensors may be delta bases), then everything else."""
    choice = BaseChoice(tensors)
    plans: list[TensorPlan | None] = [None] * len(tensors)
    check = SourceCheck()
    by_size = sorted(tensors, key=lambda t: -t.geo.nbytes)  # big ones first, so the threads finish together
    candidates = [t for t in by_size if choice.sources_for(t)]

    def requant_one(t: DistinctTensor, bar: Reporter, cancel: threading.Event) -> None:
        plans[t.index] = plan_requant(t, choice, check, level)
        if plans[t.index] is not None:  # else planned again below
            bar.advance(t.geo.nbytes)

    def plan_one(t: DistinctTensor, bar: Reporter, cancel: threading.Event) -> None:
        plans[t.index] = plan_tensor(t, choice, level)
        bar.advance(t.geo.nbytes)

    with codec.blas_single_threaded(), progress.bar("analysing", sum(t.geo.nbytes for t in tensors)) as bar:
        run_jobs(requant_one, [(t, bar) for t in candidates], threads)
        keep_upcast_bases(tensors, plans, level)
        deltas = choice.deltas
        choice = BaseChoice(tensors, frozenset(i for i, p in enumerate(plans) if p is not None))
        choice.deltas = deltas
        run_jobs(plan_one, [(t, bar) for t in by_size if plans[t.index] is None], threads)
    return [p if p is not None else TensorPlan() for p in plans]
