"""Packing, stage 3: how each distinct tensor is coded. Who may be a delta base, which tensors try a delta
(and against which base), and for a plainly coded tensor its byte-shuffle stride.

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

from ..disk.jobs import run_jobs
from ..disk.progress import Progress, Reporter
from . import codec
from .codec import DeltaPlan, RowReader
from .format import CODEC_DELTA, CODEC_PLAIN
from .inventory import DistinctTensor

MAX_BASE_DISTANCE = 0.5  # relative distance |t - b| / |t| beyond which a delta cannot pay
MAX_SHAPE_CANDIDATES = 32  # bases of the same shape tried when no other version has the target's name
DELTA_GAIN = 0.97  # a delta is taken when it is estimated at most this fraction of zstd's bytes
SIMILARITY_ROWS = 16


@dataclass
class TensorPlan:
    """How a distinct tensor is coded: plainly (byte-shuffled with `stride`, then zstd), or as a delta
    against tensor `base` with `delta`'s factors and residual mode."""

    codec: str = CODEC_PLAIN
    stride: int = 1
    base: int | None = None
    delta: DeltaPlan | None = None


class BaseChoice:
    """Which tensors are delta targets, which may be their bases, and the base a target is predicted from."""

    def __init__(self, tensors: list[DistinctTensor]) -> None:
        self.groups: dict[tuple[str, tuple[int, ...]], list[DistinctTensor]] = {}
        for t in tensors:
            for n in t.names:
                self.groups.setdefault((n, t.shape), []).append(t)
        anchors = {self._anchor(versions).index for versions in self.groups.values() if len(versions) > 1}
        self.targets = {t.index for t in tensors if t.ggml_type in codec.DELTA_TARGET_TYPES and t.index not in anchors}
        self.by_shape: dict[tuple[int, ...], list[DistinctTensor]] = {}
        for t in tensors:
            if self.can_base(t):
                self.by_shape.setdefault(t.shape, []).append(t)

    @staticmethod
    def _anchor(versions: list[DistinctTensor]) -> DistinctTensor:
        """The version stored plainly: held by the most files, then the smallest, then the first."""
        return max(versions, key=lambda t: (t.file_count, -t.geo.nbytes, -t.index))

    def can_base(self, t: DistinctTensor) -> bool:
        return t.index not in self.targets and t.ggml_type in codec.DELTA_BASE_TYPES

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
    """A delta when `t` is a target, a close base exists and the delta pays; else plain with its stride."""
    if t.index in choice.targets:
        b = choice.base_for(t)
        if b is not None:
            p = codec.plan_delta(t.rows(), t.ggml_type, b.rows(), b.ggml_type, t.geo, level=level,
                                 rows_per_chunk=t.rows_per_chunk, seed=t.index)
            if p is not None and p.estimate < DELTA_GAIN * p.plain_estimate:
                return TensorPlan(CODEC_DELTA, base=b.index, delta=p)
    return TensorPlan(CODEC_PLAIN, stride=choose_stride(t.geo, t.ggml_type, t.rows(), level))


def choose_stride(geo: codec.Geometry, ggml_type: int, rows: RowReader, level: int) -> int:
    """Byte-shuffle stride by the bytes it produces on up to 2 spread samples of ~128 KiB."""
    natural = codec.natural_stride(ggml_type)
    if natural <= 1:
        return 1
    m = geo.n_rows
    per = max(1, (128 << 10) // max(1, geo.row_bytes))
    starts = sorted({int(s) for s in np.linspace(0, max(0, m - per), 2)})
    sizes = {1: 0, natural: 0}
    for s in starts:
        raw = bytes(rows(s, min(m, s + per)))
        for st in sizes:
            sizes[st] += len(codec.compress(codec.shuffle(raw, st), level))
    return min(sizes, key=lambda st: (sizes[st], st))


def plan_codecs(tensors: list[DistinctTensor], level: int, threads: int, progress: Progress) -> list[TensorPlan]:
    """Stage 3: every tensor's plan, on a pool (BLAS in one thread: the pool is the parallelism)."""
    choice = BaseChoice(tensors)
    plans: list[TensorPlan] = [TensorPlan() for _ in tensors]

    def plan_one(t: DistinctTensor, bar: Reporter, cancel: threading.Event) -> None:
        plans[t.index] = plan_tensor(t, choice, level)
        bar.advance(t.geo.nbytes)

    with codec.blas_single_threaded(), progress.bar("analysing", sum(t.geo.nbytes for t in tensors)) as bar:
        # big ones first, so the threads finish together
        run_jobs(plan_one, [(t, bar) for t in sorted(tensors, key=lambda t: -t.geo.nbytes)], threads)
    return plans
