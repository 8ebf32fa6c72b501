"""Near misses: tensors that two models hold in different bytes only because they were quantized differently.

Why: a family quantized model by model (a per-model imatrix, another llama.cpp build, another type mix) shares
nothing but its norms, although most of its tensors come from the same full-precision weights. gguf-split
cannot share different bytes, but it can say so: "chat and code differ in 180 tensors only by quantization
(different imatrix?): quantize from full precision with one recipe to share 92 MB".

The test, for two versions a, b of a tensor (same name, same quantized type, same shape, other bytes), on
their dequantized values (float32, through gguf's quants), viewed as rows of ne0 values: a uniform quantizer
with step D leaves an error of RMS D / sqrt(12); each version's step is estimated per group of 32
consecutive values (every quantized type's block is 32 or 256 values) as (max - min) / (levels - 1), with the
type's number of levels (Q4: 16, Q6_K: 64, Q8_0: 256, ...), so its expected noise is n^2 = mean(D^2) / 12.
The pair differs only by quantization when mean((a - b)^2) <= NOISE_FACTOR (n_a^2 + n_b^2).

Why a fifth: quantizing the same weights with another importance matrix (or on another build) changes some
rounding choices, not every value, so the difference stays well below the noise itself, while a fine-tune's
change moves every value. Measured on the benchmark families, each task quantized to Q4_K_M with its own
imatrix by llama-quantize (bench_quantize.py): the tensors the fine-tunes left alone differ by at most 0.05
of the noise (SmolLM2-135M; Gemma-3-270M: under 0.0001), the ones a rank-8 LoRA changed by 0.29 or more
(Gemma-3: 0.83), except SmolLM2's Q4_K ffn_down, whose LoRA change is 0.03 of its noise. The bound is a
heuristic between those: imatrices that differ more than two fine-tunes' do (unrelated calibration data)
can push requantization above it, and a fine-tune whose change is that small against the quantization noise
cannot be told from requantization (it is then reported as one, as those four ffn_down are). A test of
low-rank structure in the difference was tried and dropped: the imatrix's per-column weights make
requantization differences column-sparse, which looks just as structured as a LoRA's change.
Tensors are compared on at most SAMPLE_ROWS rows (evenly spaced): memory and time stay bounded
whatever the tensor's size (Gemma-3's token embedding has 262,144 rows).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

SAMPLE_ROWS = 4096
GROUP = 32
NOISE_FACTOR = 0.2  # on squared RMS (energy)

# quantization levels per value of each type family (the grid a block's values fall on)
_LEVELS = {Q.Q8_0: 256, Q.Q8_1: 256, Q.Q8_K: 256, Q.Q6_K: 64, Q.Q5_0: 32, Q.Q5_1: 32, Q.Q5_K: 32,
           Q.Q4_0: 16, Q.Q4_1: 16, Q.Q4_K: 16, Q.IQ4_NL: 16, Q.IQ4_XS: 16, Q.Q3_K: 8, Q.IQ3_XXS: 8, Q.IQ3_S: 8,
           Q.Q2_K: 4, Q.IQ2_XXS: 4, Q.IQ2_XS: 4, Q.IQ2_S: 4, Q.IQ1_S: 3, Q.IQ1_M: 3, Q.TQ1_0: 3, Q.TQ2_0: 3}


@dataclass(frozen=True)
class Version:
    """One model's version of a tensor: identity, and its bytes (read only when it is compared)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    digest: bytes
    nbytes: int
    read: Callable[[], Any]  # -> a buffer of the tensor's bytes


@dataclass
class NearMiss:
    """Two tasks, and the tensors they hold in different bytes that differ only by quantization."""

    tasks: tuple[str, str]
    tensors: list[str] = field(default_factory=list)
    bytes: int = 0  # what sharing them would save (one copy of each)

    def line(self) -> str:
        a, b = self.tasks
        return (f"{a} and {b} differ in {len(self.tensors)} tensors only by quantization (different imatrix?): "
                f"quantize from full precision with one recipe to share {self.bytes / 1e6:,.1f} MB")


@dataclass
class NearMissReport:
    pairs: list[NearMiss] = field(default_factory=list)  # most bytes first
    tensors: int = 0  # distinct (name, version) pairs that are near misses of another version
    bytes: int = 0  # what one recipe would share across the family: per tensor, every near version but one

    def lines(self, limit: int = 8) -> list[str]:
        out = [p.line() for p in self.pairs[:limit]]
        if len(self.pairs) > limit:
            out.append(f"... and {len(self.pairs) - limit} more pairs of tasks")
        if len(self.pairs) > 1:
            out.append(f"in all, one recipe from full precision would share {self.bytes / 1e6:,.1f} MB more")
        return out


def is_quantized(ggml_type: int) -> bool:
    t = _type(ggml_type)
    return t is not None and GGML_QUANT_SIZES[t][0] > 1


def _type(ggml_type: int) -> Q | None:
    try:
        return Q(ggml_type)
    except ValueError:
        return None


def near_misses(tasks: Mapping[str, Sequence[Version]]) -> NearMissReport:
    """Every pair of tasks holding tensors of the same name, quantized type and shape in different bytes
    that pass the test above."""
    by_name: dict[tuple[str, int, tuple[int, ...]], dict[bytes, list[str]]] = {}
    versions: dict[bytes, Version] = {}
    for task, held in tasks.items():
        for v in held:
            if is_quantized(v.ggml_type) and _type(v.ggml_type) in _LEVELS:
                by_name.setdefault((v.name, v.ggml_type, v.shape), {}).setdefault(v.digest, []).append(task)
                versions[v.digest] = v
    report = NearMissReport()
    pairs: dict[tuple[str, str], NearMiss] = {}
    order = {t: i for i, t in enumerate(tasks)}
    for (name, _, _), holders in by_name.items():
        if len(holders) < 2:
            continue
        near = _near_pairs([versions[d] for d in holders])
        if not near:
            continue
        _count(report, pairs, order, name, holders, near, versions)
    report.pairs = sorted(pairs.values(), key=lambda p: -p.bytes)
    return report


def _count(report: NearMissReport, pairs: dict[tuple[str, str], NearMiss], order: Mapping[str, int], name: str,
           holders: Mapping[bytes, list[str]], near: Sequence[tuple[bytes, bytes]],
           versions: Mapping[bytes, Version]) -> None:
    """Record one tensor's near versions: per pair of tasks, and across the family (connected versions)."""
    parent = {d: d for d in holders}

    def root(d: bytes) -> bytes:
        while parent[d] != d:
            d = parent[d]
        return d

    for a, b in near:
        parent[root(a)] = root(b)
        for ta in holders[a]:
            for tb in holders[b]:
                key = (ta, tb) if order[ta] < order[tb] else (tb, ta)
                p = pairs.setdefault(key, NearMiss(key))
                if name not in p.tensors:
                    p.tensors.append(name)
                    p.bytes += versions[a].nbytes
    groups: dict[bytes, int] = {}
    for d in holders:
        groups[root(d)] = groups.get(root(d), 0) + 1
    merged = sum(n - 1 for n in groups.values())
    report.tensors += sum(n for n in groups.values() if n > 1)
    report.bytes += merged * next(iter(versions[d] for d in holders)).nbytes


def _near_pairs(versions: Sequence[Version]) -> list[tuple[bytes, bytes]]:
    """The pairs of versions that differ only by quantization (each version dequantized once, sampled)."""
    import numpy as np

    values = [_sampled(v) for v in versions]
    noise = [_noise(x, v.ggml_type) for x, v in zip(values, versions)]
    out = []
    for i in range(len(versions)):
        for j in range(i + 1, len(versions)):
            diff = values[i] - values[j]
            ms = float(np.mean(diff.astype(np.float64) ** 2))
            if ms <= NOISE_FACTOR * (noise[i] + noise[j]):
                out.append((versions[i].digest, versions[j].digest))
    return out


def _sampled(v: Version) -> Any:
    """The tensor's dequantized values as rows of ne0 (at most SAMPLE_ROWS of them, evenly spaced)."""
    import numpy as np
    from gguf.quants import dequantize

    qt = Q(v.ggml_type)
    block, size = GGML_QUANT_SIZES[qt]
    ne0 = v.shape[0]
    rows = v.nbytes // (ne0 // block * size)
    raw = np.frombuffer(v.read(), dtype=np.uint8).reshape(rows, ne0 // block * size)
    if rows > SAMPLE_ROWS:
        raw = raw[np.linspace(0, rows - 1, SAMPLE_ROWS).astype(np.int64)]
    return np.asarray(dequantize(np.ascontiguousarray(raw), qt), dtype=np.float32).reshape(-1, ne0)


def _noise(x: Any, ggml_type: int) -> float:
    """Expected squared RMS quantization error of values `x`: per group of 32, step = range / (levels - 1)."""
    import numpy as np

    groups = x.reshape(-1, GROUP) if x.size % GROUP == 0 else x.reshape(1, -1)
    step = (groups.max(axis=1) - groups.min(axis=1)).astype(np.float64) / (_LEVELS[Q(ggml_type)] - 1)
    return float(np.mean(step ** 2) / 12)
