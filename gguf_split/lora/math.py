"""The arithmetic of a LoRA, in llama.cpp's conventions, and the factorisation that extraction uses.

Why a module of its own: these are pure functions of arrays (no file, no model, no I/O), and they are
the one place that says how llama.cpp scales an adapter and lays out token_embd's pair; the reader
(adapter.py), the overlay's merged tensors (overlay.py) and the extractor (extract.py) all take them from
here, so what gguf-split computes is what llama.cpp computes.

llama.cpp's conventions (src/llama-adapter.cpp and src/llama-graph.cpp, see the package docstring):
- the delta of a model tensor W (ne [n_in, n_out], numpy (n_out, n_in)) is B·A with A ne [n_in, r] and
  B ne [r, n_out]; for `token_embd.weight` A and B are flipped (A ne [r, n_vocab], B ne [r, n_embd]) and
  the delta is A·Bᵀ in numpy order;
- the scale is `alpha ? user_scale * alpha / r : user_scale`, in float32, r = B's ne0.

The factorisation: D = task − base ≈ U·S·Vᵀ by a truncated SVD (full for small matrices, a randomized
range finder with power iterations for big ones), the rank fixed or chosen by the auto rule

    ‖D − D_r‖_F² ≤ (τ·‖D‖_F)² + N²,     N² = Σ ulp(w)²/12 over the task tensor's stored values,

then folded into A and B with the scale alpha/r, each factor taking √(S/scale) (balanced magnitudes,
safest for F16). `fit` checks the error of the factors as stored (after their rounding) and, under the auto
rule, adds ranks from a full SVD until that error meets the bound too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType as Q

__all__ = ["OUTPUT", "TOKEN_EMBD", "Fit", "fit", "is_token_embd", "lora_delta", "lora_scale", "rounding_energy",
           "square_norm"]

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"

FULL_SVD_MAX = 1024  # min(n_in, n_out) up to which (and m·n up to FULL_SVD_ELEMENTS) a full SVD is taken
FULL_SVD_ELEMENTS = 1 << 22
OVERSAMPLE = 16
POWER_ITERATIONS = 2
SLACK = 1.001  # the factors' own F16 rounding may exceed the bound by this much before a rank is added


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's conventions


def is_token_embd(name: str) -> bool:
    """llama.cpp's test (llama-adapter.cpp: `str_endswith(name, "token_embd.weight")`)."""
    return name.endswith(TOKEN_EMBD)


def lora_scale(user_scale: float, alpha: float, rank: int) -> np.float32:
    """`alpha ? user_scale * alpha / rank : user_scale`, in float32 as llama.cpp computes it."""
    s: np.float32 = np.float32(user_scale)
    if alpha:
        s = np.float32(np.float32(s * np.float32(alpha)) / np.float32(rank))
    return s


def lora_delta(a: np.ndarray, b: np.ndarray, name: str) -> np.ndarray:
    """B·A in numpy order (the model tensor's reversed ne), float32, from A and B in numpy order (reversed
    ne), without the scale. For token_embd the layout is flipped (A is [n_vocab, r], B is [n_embd, r])."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    d: np.ndarray
    if is_token_embd(name):
        d = a @ b.T  # (n_vocab, r) @ (r, n_embd): ggml_mul_mat(b, get_rows(a, tokens)) per token
    else:
        d = b @ a  # (n_out, r) @ (r, n_in)
    return d


# ---------------------------------------------------------------------------------------------------------
# Norms


def rounding_energy(ggml_type: int, data: Any) -> float:
    """N² = Σ ulp(w)²/12 over a tensor's stored values: the expected energy of the rounding that storing
    base + change in this type added (uniform rounding within one ulp). 0 for quantized types."""
    if ggml_type == Q.F16:
        sp = np.spacing(np.abs(np.frombuffer(data, dtype=np.float16))).astype(np.float64)
    elif ggml_type == Q.F32:
        sp = np.spacing(np.abs(np.frombuffer(data, dtype=np.float32))).astype(np.float64)
    elif ggml_type == Q.BF16:
        w = (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        sp = np.spacing(np.abs(w)).astype(np.float64) * 65536.0  # bf16 keeps 7 of float32's 23 mantissa bits
    else:
        return 0.0
    return float(np.dot(sp, sp)) / 12.0


def square_norm(d: np.ndarray) -> float:
    """‖d‖_F² accumulated in float64, in row chunks (no float64 copy of a big tensor)."""
    total = 0.0
    step = max(1, (1 << 22) // max(1, d.shape[1]))
    for i in range(0, d.shape[0], step):
        c = d[i:i + step].astype(np.float64)
        total += float(np.einsum("ij,ij->", c, c))
    return total


# ---------------------------------------------------------------------------------------------------------
# Truncated SVD and the rank rule


@dataclass(frozen=True)
class _Factors:
    """A truncated SVD U·diag(s)·Vt of a delta, and how it was found."""

    u: np.ndarray  # (m, r)
    s: np.ndarray  # (r,)
    vt: np.ndarray  # (r, n)
    method: str  # "svd" or "randomized svd (k=...)"

    @property
    def rank(self) -> int:
        return len(self.s)

    def truncated(self, r: int, method: str) -> "_Factors":
        return _Factors(self.u[:, :r], self.s[:r], self.vt[:r], method)


def _full_svd(d: np.ndarray) -> _Factors:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return _Factors(u, s, vt, "svd")


def _randomized(d: np.ndarray, k: int, rng: np.random.Generator) -> _Factors:
    """Top-k SVD by a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011,
    Alg. 4.4). U·diag(s)·Vt = Q·Qᵀ·D exactly for the orthonormal basis Q found, so the residual
    ‖D‖² − Σ s² is exact for this projection (and ≥ the optimal rank-k residual)."""
    n = d.shape[1]
    q = _orth(d @ rng.standard_normal((n, k), dtype=np.float32))
    for _ in range(POWER_ITERATIONS):
        q = _orth(d @ _orth(d.T @ q))
    u_s, s, vt = np.linalg.svd((q.T @ d).astype(np.float64), full_matrices=False)
    return _Factors(q.astype(np.float64) @ u_s, s, vt, f"randomized svd (k={k})")


def _orth(y: np.ndarray) -> np.ndarray:
    return np.linalg.qr(y)[0]


def _choose_rank(s: np.ndarray, total: float, bound2: float, tail: np.ndarray | None) -> int | None:
    """Smallest r ≥ 1 with residual² ≤ bound2; residual² from the exact tail energies when known (full SVD),
    else ‖D‖² − Σ_{i≤r} s_i². None if no r ≤ len(s) meets it."""
    if tail is not None:
        resid2 = tail  # tail[r] = Σ_{i≥r} s_i², r = 0..len(s)
    else:
        resid2 = total - np.concatenate(([0.0], np.cumsum(s.astype(np.float64) ** 2)))
    ok = np.nonzero(resid2[1:] <= bound2)[0]
    return int(ok[0]) + 1 if ok.size else None


def _small(d: np.ndarray) -> bool:
    """Small enough for a full SVD."""
    m, n = d.shape
    return bool(min(m, n) <= FULL_SVD_MAX and m * n <= FULL_SVD_ELEMENTS)


def _fixed_rank(d: np.ndarray, rank: int, rng: np.random.Generator) -> _Factors:
    kmax = min(d.shape)
    r = min(rank, kmax)
    if _small(d) or r + OVERSAMPLE >= kmax // 2:
        return _full_svd(d).truncated(r, "svd")
    f = _randomized(d, r + OVERSAMPLE, rng)
    return f.truncated(r, f.method)


def _auto_rank(d: np.ndarray, bound2: float, total: float, rng: np.random.Generator) -> _Factors:
    """The smallest rank within the bound: randomized SVDs of growing size (k = 64, 256, ...) while that is
    cheaper than a full one, then a full SVD with the exact tail energies."""
    kmax = min(d.shape)
    if not _small(d):
        k = min(64, kmax)
        while k + OVERSAMPLE < kmax // 2:
            f = _randomized(d, k + OVERSAMPLE, rng)
            r = _choose_rank(f.s[:k], total, bound2, None)
            if r is not None:
                return f.truncated(r, f.method)
            k *= 4
    f = _full_svd(d)
    s64 = f.s.astype(np.float64) ** 2
    tail = np.concatenate((np.cumsum(s64[::-1])[::-1], [0.0]))
    return f.truncated(_choose_rank(f.s, total, bound2, tail) or kmax, "svd")


def _factorize(d: np.ndarray, rank: int | str, bound2: float, total: float) -> _Factors:
    """A truncated SVD of d (m × n, numpy order) with the rank fixed or chosen by the auto rule."""
    rng = np.random.default_rng(0)  # deterministic factors for the same inputs on one machine
    if isinstance(rank, int):
        return _fixed_rank(d, rank, rng)
    return _auto_rank(d, bound2, total, rng)


# ---------------------------------------------------------------------------------------------------------
# Factors as a LoRA


@dataclass(frozen=True)
class Fit:
    """A delta as a LoRA pair: A and B as stored (numpy order, the output dtype), with
    `lora_scale(1, alpha, rank)`·B·A ≈ D, and ‖D − scale·B·A‖_F² of these very arrays."""

    a: np.ndarray
    b: np.ndarray
    rank: int
    error2: float
    method: str


def _as_lora(f: _Factors, name: str, alpha: float, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) arrays (numpy order, `dtype`) with scale·B·A ≈ U·S·Vᵀ, scale = alpha/r in float32:
    √(S/scale) goes to each factor. OverflowError when a value does not fit F16."""
    scale = float(lora_scale(1.0, alpha, f.rank))
    root = np.sqrt(f.s.astype(np.float64) / scale)
    left = f.u.astype(np.float64) * root[None, :]  # (m, r)
    right = root[:, None] * f.vt.astype(np.float64)  # (r, n)
    if is_token_embd(name):
        a, b = left, right.T  # lora_a (n_vocab, r) = ne [r, n_vocab]; lora_b (n_embd, r) = ne [r, n_embd]
    else:
        a, b = right, left  # lora_a (r, n_in) = ne [n_in, r]; lora_b (n_out, r) = ne [r, n_out]
    if dtype is np.float16:
        big = max(float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)))
        if big >= 65504:
            raise OverflowError(f"{name}: a factor value {big:.3g} does not fit F16 (use dtype F32)")
    return np.ascontiguousarray(a, dtype=dtype), np.ascontiguousarray(b, dtype=dtype)


def _error2(d: np.ndarray, a: np.ndarray, b: np.ndarray, name: str, scale: np.float32) -> float:
    """‖D − scale·B·A‖_F², with the factors as stored, in float64 row chunks."""
    total = 0.0
    af, bf = a.astype(np.float64), b.astype(np.float64)
    if is_token_embd(name):
        rows, right = af, bf.T  # delta = A · Bᵀ
    else:
        rows, right = bf, af  # delta = B · A
    step = max(1, (1 << 21) // max(1, d.shape[1]))
    for i in range(0, d.shape[0], step):
        e = d[i:i + step].astype(np.float64) - float(scale) * (rows[i:i + step] @ right)
        total += float(np.einsum("ij,ij->", e, e))
    return total


def _stored(d: np.ndarray, f: _Factors, name: str, alpha: float, dtype: type) -> Fit:
    a, b = _as_lora(f, name, alpha, dtype)
    return Fit(a, b, f.rank, _error2(d, a, b, name, lora_scale(1.0, alpha, f.rank)), f.method)


def fit(d: np.ndarray, name: str, *, rank: int | str, bound2: float, total: float, alpha: float,
        dtype: type) -> Fit:
    """The LoRA pair for delta `d` (numpy order, float32) of the model tensor `name`: rank fixed (an int) or
    "auto" (the smallest within `bound2`, the squared error bound; `total` = ‖d‖_F²). Under the auto rule,
    when rounding the factors (or a randomized basis) missed the bound, ranks are added from a full SVD
    until the stored factors meet it. OverflowError when a factor does not fit F16."""
    f = _factorize(d, rank, bound2, total)
    got = _stored(d, f, name, alpha, dtype)
    if rank != "auto" or got.error2 <= bound2 * SLACK or f.rank >= min(d.shape):
        return got
    full = _full_svd(d)
    r = f.rank
    while got.error2 > bound2 * SLACK and r < len(full.s):
        r = min(len(full.s), r + max(1, r // 8))
        got = _stored(d, full.truncated(r, "svd"), name, alpha, dtype)
    return got
