"""Deterministic re-quantization: llama.cpp's quantizers ported so that a pack can store a published quant
as the (usually empty) difference from our re-quantization of its full-precision source.

Why: a GGUF repository ships one model 5-25 times (the F16/BF16 file plus each quantization of it). Each
quant is a deterministic function of the source tensor, its type and the importance matrix, so a pack
needs the source once plus, per quant, only what differs from re-deriving it (issue 22). That works only
if the pack reader re-derives the same bytes on every CPU, OS and numpy build, so the quantizer runs in
our own code, never in whatever llama.cpp a reader has (llama.cpp serves as the test oracle only).

What is ported: `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)` of ggml 0.25.3
(ggml-quants.c) for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; without an importance
matrix it runs the `quantize_row_*_ref` functions, with one (n_per_row weights, as llama-quantize passes
per tensor) the `quantize_row_*_impl` weighted searches, exactly as llama.cpp dispatches. The _S/_M/_L
mixes are per-tensor choices among these types. Not ported: the IQ* types (lattice searches over
512-2048-entry grids with neighbour tables; rare on hubs next to the K-quants and an order of magnitude
more code), TQ1_0/TQ2_0 (ternary models only), MXFP4/NVFP4 (models published in that form, not
quantized from F16 by users), Q8_K (never stored in files).

How it stays deterministic (two implementations, same bytes; tests compare both with llama.cpp):
- `quantize_numpy` below is numpy, vectorised *across* blocks: arrays are laid out (element of the block,
  block), so each sum over a block's elements is a Python loop of elementwise float32 adds in the C
  code's order (never np.sum, whose pairwise blocking depends on layout and SIMD width). Every operation
  is one IEEE binary32 ufunc call (+, -, *, /, sqrt, abs, comparisons, where), correctly rounded on
  every CPU numpy supports; no float64 creeps in (all constants are float32, NEP 50 keeps float32).
  Branches become masks (`np.where`), and the refinement loops that C leaves early (`if (!n_changed)
  break`) run their full count: a pass that changes nothing leaves the state as it was, so the extra
  passes change nothing either.
- `kernels` holds the same algorithms compiled with numba (fastmath off), 10-100x faster;
  `engine.quantize(..., engine="numba")` uses it.
- float -> int conversions are llama.cpp's `nearest_int` (add 1.5*2^23, keep the mantissa bits: round to
  nearest even through the float adder, no conversion instruction) or truncations of values a finite
  input keeps in range; float32 -> float16 is llama.cpp's `ggml_compute_fp32_to_fp16` in integer and
  float32 operations.
Inputs must be finite: NaN payloads differ between CPUs (`check_source`). Subnormals must not be
flushed to zero (`codec.check_float_environment`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

F = np.float32
Arr = np.ndarray
EPS = F(1e-15)  # GROUP_MAX_EPS

# The types whose quantizer is ported, with or without an importance matrix.
REQUANT_TYPES = frozenset({Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})

# sub-blocks processed per numpy pass (results do not depend on it; it keeps the working set in cache)
_BLOCKS_PER_PASS = 4096


class RequantError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------
# Bit-exact primitives


def nearest_int(a: Arr) -> Arr:
    """ggml's nearest_int: (bits(a + 12582912.f) & 0x7fffff) - 0x400000, int32 (round half to even)."""
    v = (a + F(12582912.0)).astype(F, copy=False)
    out: Arr = (v.view(np.int32) & 0x7FFFFF) - 0x400000
    return out


def fp32_to_fp16_bits(f: Arr) -> Arr:
    """ggml_compute_fp32_to_fp16: float32 -> binary16 bits, round to nearest even, NaN -> 0x7E00 | sign."""
    f = np.asarray(f, dtype=F)
    with np.errstate(over="ignore", invalid="ignore"):
        base = (np.abs(f) * F(2.0 ** 112)) * F(2.0 ** -110)
    w = f.view(np.uint32)
    shl1_w = w + w
    sign = w & np.uint32(0x80000000)
    bias = np.maximum(shl1_w & np.uint32(0xFF000000), np.uint32(0x71000000))
    base = ((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(F) + base
    bits = base.view(np.uint32)
    nonsign = ((bits >> np.uint32(13)) & np.uint32(0x7C00)) + (bits & np.uint32(0xFFF))
    nonsign = np.where(shl1_w > np.uint32(0xFF000000), np.uint32(0x7E00), nonsign)
    out: Arr = ((sign >> np.uint32(16)) | nonsign).astype(np.uint16)
    return out


def fp16_bits_to_fp32(h: Arr) -> Arr:
    """binary16 bits -> float32 (exact; numpy's conversion is exact)."""
    out: Arr = np.asarray(h, dtype=np.uint16).view(np.float16).astype(F)
    return out


def _trunc_i8(v: Arr) -> Arr:
    """C's (int8_t)(float) on values a finite input keeps in range (clipped otherwise), as int32."""
    v = np.where(np.isnan(v), F(0.0), v)
    out: Arr = np.trunc(np.clip(v, F(-128.0), F(127.0))).astype(np.int32)
    return out


def _i8(v: Arr) -> Arr:
    """An int stored into int8_t (wraps), read back as int32."""
    out: Arr = ((v & 0xFF) ^ 0x80) - 0x80
    return out


def _seqsum0(t: Arr) -> Arr:
    """float s = 0; for i: s += t[i]  (t laid out (element, block))."""
    s = np.zeros(t.shape[1:], dtype=F)
    for i in range(t.shape[0]):
        s += t[i]
    return s


def _seqsum1(t: Arr) -> Arr:
    """float s = t[0]; for i >= 1: s += t[i]."""
    s: Arr = t[0].copy()
    for i in range(1, t.shape[0]):
        s += t[i]
    return s


def _first_absmax(x: Arr) -> tuple[Arr, Arr]:
    """amax = max = 0; for i: if (|x_i| > amax) {amax = |x_i|; max = x_i}  -> (amax, max)."""
    amax = np.zeros(x.shape[1:], dtype=F)
    mx = np.zeros(x.shape[1:], dtype=F)
    for i in range(x.shape[0]):
        ax = np.abs(x[i])
        upd = ax > amax
        amax = np.where(upd, ax, amax)
        mx = np.where(upd, x[i], mx)
    return amax, mx


def _seq_min_max(x: Arr, mn: Arr, mx: Arr, start: int) -> tuple[Arr, Arr]:
    """for i >= start: if (x_i < min) min = x_i; if (x_i > max) max = x_i  (keeps C's signed zeros)."""
    for i in range(start, x.shape[0]):
        mn = np.where(x[i] < mn, x[i], mn)
        mx = np.where(x[i] > mx, x[i], mx)
    return mn, mx


def _seq_max_gt(v: Arr) -> Arr:
    """m = 0; for j: if (v_j > m) m = v_j   (v laid out (j, block))."""
    m = np.zeros(v.shape[1:], dtype=F)
    for j in range(v.shape[0]):
        m = np.where(v[j] > m, v[j], m)
    return m


# ---------------------------------------------------------------------------------------------------------
# The searches of ggml-quants.c, vectorised across blocks. Arrays are (n, B): element i of every block.


def make_qx_quants(x: Arr, nmax: int, qw: Arr | None) -> tuple[Arr, Arr]:
    """make_qx_quants with rmse_type 1 -> (scale (B,), L (n, B) int32 in [0, 2*nmax))."""
    amax, mx = _first_absmax(x)
    zero = amax < EPS
    mx = np.where(zero, F(1.0), mx)
    w = qw if qw is not None else x * x
    wx = w * x
    fn = F(nmax)

    def trial(iscale: Arr) -> tuple[Arr, Arr, Arr]:
        lv = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        fl = lv.astype(F)
        return lv, _seqsum0(wx * fl), _seqsum0((w * fl) * fl)

    lv, sumlx, suml2 = trial((-fn) / mx)
    L = lv + nmax
    ok = suml2 != F(0.0)
    scale = np.where(ok, sumlx / np.where(ok, suml2, F(1.0)), F(0.0))
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        lv, sumlx, suml2 = trial((-(fn + F(0.1) * F(is_))) / mx)
        upd = (suml2 > F(0.0)) & (sumlx * sumlx > best * suml2)
        L = np.where(upd, lv + nmax, L)
        scale = np.where(upd, sumlx / np.where(upd, suml2, F(1.0)), scale)
        best = np.where(upd, scale * sumlx, best)
    L = np.where(zero, 0, L)
    scale = np.where(zero, F(0.0), scale)
    return scale, L


def make_q3_quants(x: Arr, nmax: int) -> tuple[Arr, Arr]:
    """make_q3_quants with do_rmse = true -> (scale, L in [0, 2*nmax))."""
    n = x.shape[0]
    amax, mx = _first_absmax(x)
    zero = amax < EPS
    mx = np.where(zero, F(1.0), mx)
    iscale = (-F(nmax)) / mx
    L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    fl = L.astype(F)
    sumlx = _seqsum0(wx * fl)
    suml2 = _seqsum0((w * fl) * fl)
    for _itry in range(5):  # C breaks after a pass without change; such a pass changes nothing, so no need
        for i in range(n):
            fli = L[i].astype(F)
            slx = sumlx - wx[i] * fli
            c = slx > F(0.0)
            sl2 = suml2 - (w[i] * fli) * fli
            new_l = np.clip(nearest_int((x[i] * sl2) / np.where(c, slx, F(1.0))), -nmax, nmax - 1)
            c &= new_l != L[i]
            fnl = new_l.astype(F)
            slx = slx + wx[i] * fnl
            sl2 = sl2 + (w[i] * fnl) * fnl
            c &= (sl2 > F(0.0)) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            L[i] = np.where(c, new_l, L[i])
            sumlx = np.where(c, slx, sumlx)
            suml2 = np.where(c, sl2, suml2)
    L = np.where(zero, 0, L + nmax)
    ok = suml2 > F(0.0)
    scale = np.where(ok & ~zero, sumlx / np.where(ok, suml2, F(1.0)), F(0.0))
    return scale, L


def make_qkx(x: Arr, nmax: int, w: Arr, rmin: float, rdelta: float, nstep: int, use_mad: bool,
             v3: bool) -> tuple[Arr, Arr, Arr]:
    """make_qkx2_quants (v3 False) / make_qkx3_quants (v3 True, weights given) -> (scale, L, the_min).
    Note the C code's `min` moves with the best candidate and later candidates are built around it."""
    mn, mx = _seq_min_max(x, x[0].copy(), x[0].copy(), 1)
    sum_w = _seqsum1(w)
    sum_x = _seqsum1(w * x)
    mn = np.where(mn > F(0.0), F(0.0), mn)
    degenerate = (mx <= mn) if v3 else (mx == mn)
    first_min = mn
    fnmax = F(nmax)
    rng = np.where(degenerate, F(1.0), mx - mn)
    iscale = fnmax / rng
    scale = F(1.0) / iscale
    L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
    diff = (scale * L.astype(F) + mn) - x
    diff = np.abs(diff) if use_mad else diff * diff
    best_error = _seqsum0(w * diff)
    frmin, frdelta = F(rmin), F(rdelta)
    for is_ in range(nstep + 1):
        rng = np.where(degenerate, F(1.0), mx - mn)
        iscale = ((frmin + frdelta * F(is_)) + fnmax) / rng
        lv = np.clip(nearest_int(iscale * (x - mn)), 0, nmax)
        fl = lv.astype(F)
        wl = w * fl
        sum_l = _seqsum0(wl)
        sum_l2 = _seqsum0(wl * fl)
        sum_xl = _seqsum0(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        okd = D > F(0.0)
        Ds = np.where(okd, D, F(1.0))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > F(0.0)
        this_min = np.where(pos, F(0.0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, F(1.0)), this_scale)
        diff = (this_scale * fl + this_min) - x
        diff = np.abs(diff) if use_mad else diff * diff
        cur_error = _seqsum0(w * diff)
        upd = okd & (cur_error < best_error) & ~degenerate
        L = np.where(upd, lv, L)
        best_error = np.where(upd, cur_error, best_error)
        scale = np.where(upd, this_scale, scale)
        mn = np.where(upd, this_min, mn)
    L = np.where(degenerate, 0, L)
    scale = np.where(degenerate, F(0.0), scale)
    mn = np.where(degenerate, first_min, mn)
    return scale, L, -mn


def make_qp_quants(x: Arr, nmax: int, qw: Arr) -> tuple[Arr, Arr]:
    """make_qp_quants -> (scale, L as the uint8 values C stores)."""
    n = x.shape[0]
    mx = np.zeros(x.shape[1:], dtype=F)
    for i in range(n):
        mx = np.where(mx > x[i], mx, x[i])
    zero = mx < EPS
    mx = np.where(zero, F(1.0), mx)
    fnmax = F(nmax)
    iscale = fnmax / mx
    L = nearest_int(iscale * x) & 0xFF
    scale = F(1.0) / iscale
    diff = x - scale * L.astype(F)
    best_mse = _seqsum0((qw * diff) * diff)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F(0.1) * F(is_) + fnmax) / mx
        scale_is = F(1.0) / iscale_is
        lv = np.minimum(nmax, nearest_int(iscale_is * x))
        diff = x - scale_is * lv.astype(F)
        mse = _seqsum0((qw * diff) * diff)
        upd = mse < best_mse
        best_mse = np.where(upd, mse, best_mse)
        iscale = np.where(upd, iscale_is, iscale)
    L = np.minimum(nmax, nearest_int(iscale * x)) & 0xFF
    fl = L.astype(F)
    qx = qw * x
    sumlx = _seqsum0(qx * fl)
    suml2 = _seqsum0((qw * fl) * fl)
    for _itry in range(5):
        for i in range(n):
            fli = L[i].astype(F)
            slx = sumlx - qx[i] * fli
            sl2 = suml2 - (qw[i] * fli) * fli
            c = (slx > F(0.0)) & (sl2 > F(0.0))
            new_l = np.minimum(nmax, nearest_int((x[i] * sl2) / np.where(c, slx, F(1.0))))
            c &= new_l != L[i]
            fnl = new_l.astype(F)
            slx = slx + qx[i] * fnl
            sl2 = sl2 + (qw[i] * fnl) * fnl
            c &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            L[i] = np.where(c, new_l & 0xFF, L[i])
            sumlx = np.where(c, slx, sumlx)
            suml2 = np.where(c, sl2, suml2)
    ok = suml2 > F(0.0)
    scale = np.where(ok, sumlx / np.where(ok, suml2, F(1.0)), F(0.0))
    L = np.where(zero, 0, L)
    scale = np.where(zero, F(0.0), scale)
    return scale, L


# ---------------------------------------------------------------------------------------------------------
# Per-type drivers. Each takes rows x (R, n) float32 and qw (n,) float32 or None and returns (R, row_bytes).


def _blocks_t(x: Arr, size: int) -> Arr:
    """(R, n) -> (size, R*n/size): element i of every block of `size` consecutive elements."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _qw_t(qw: Arr, n_rows: int, size: int) -> Arr:
    """The importance vector (n,) repeated per row, laid out like `_blocks_t`."""
    return np.ascontiguousarray(np.tile(qw.reshape(-1, size), (n_rows, 1)).T)


def _row_sigma2(x: Arr) -> Arr:
    """sum of x*x over each row, sequentially from 0, / n_per_row -> (R,) (the legacy types' imatrix path)."""
    xt = np.ascontiguousarray(x.T)
    out: Arr = _seqsum0(xt * xt) / F(x.shape[1])
    return out


def _legacy_weights(x: Arr, qw: Arr, size: int) -> tuple[Arr, Arr]:
    """(x blocks (32, B), weight = qw * sqrt(sigma2 + x*x)) with sigma2 per row."""
    n_rows, n = x.shape
    xt = _blocks_t(x, size)
    sigma2 = np.repeat(_row_sigma2(x), n // size)
    return xt, _qw_t(qw, n_rows, size) * np.sqrt(sigma2 + xt * xt)


def _put_f16(out: Arr, col: int, f: Arr) -> None:
    out[:, col:col + 2] = _le16(fp32_to_fp16_bits(f))


def _le16(bits: Arr) -> Arr:
    """uint16 values as (N, 2) little-endian bytes."""
    out: Arr = np.asarray(bits, dtype="<u2").view(np.uint8).reshape(-1, 2)
    return out


def _f16_at(b: Arr, col: int) -> Arr:
    """The float32 value of the ggml_half at bytes [col, col+2) of each row of b."""
    return fp16_bits_to_fp32(np.ascontiguousarray(b[:, col:col + 2]).view("<u2").reshape(-1))


def _pack_nibbles(L: Arr) -> Arr:
    """qs[j] = L[j] | L[j+16] << 4 for a (32, B) L -> (B, 16)."""
    out: Arr = ((L[:16] | (L[16:] << 4)) & 0xFF).T.astype(np.uint8)
    return out


def _qh_bits(L: Arr) -> Arr:
    """The fifth bits of (32, B) codes as 4 little-endian bytes per block."""
    qh = np.zeros(L.shape[1], dtype=np.uint32)
    for j in range(32):
        qh |= ((L[j] & 0x10) >> 4).astype(np.uint32) << np.uint32(j)
    out: Arr = qh.astype("<u4").view(np.uint8).reshape(-1, 4)
    return out


def _q8_0(x: Arr, qw: Arr | None) -> Arr:
    xb = x.reshape(-1, 32)
    amax = np.max(np.abs(xb), axis=1)  # max of |x| is exact in any order
    d = amax / F(127.0)
    idv = np.where(d != F(0.0), F(1.0) / np.where(d != F(0.0), d, F(1.0)), F(0.0))
    x0 = xb * idv[:, None]
    t = np.trunc(x0)  # roundf: half away from zero; x0 - trunc(x0) is exact
    t = t + np.where(np.abs(x0 - t) >= F(0.5), np.sign(x0), F(0.0))
    out = np.empty((xb.shape[0], 34), dtype=np.uint8)
    _put_f16(out, 0, d)
    out[:, 2:] = np.clip(t, -128, 127).astype(np.int8).view(np.uint8)
    return out


def _legacy_absmax(xt: Arr, div: float, bias: float, top: int) -> tuple[Arr, Arr]:
    """Q4_0/Q5_0 reference: d = max / div, q = MIN(top, (int8_t)(x*id + bias))."""
    _, mx = _first_absmax(xt)
    d = mx / F(div)
    idv = np.where(d != F(0.0), F(1.0) / np.where(d != F(0.0), d, F(1.0)), F(0.0))
    L = np.minimum(top, _trunc_i8(xt * idv + F(bias))) & 0xFF
    return d, L


def _legacy_minmax(xt: Arr, div: float, top: int | None) -> tuple[Arr, Arr, Arr]:
    """Q4_1/Q5_1 reference: d = (max - min)/div, m = min, q = (x - min)*id + 0.5 truncated."""
    B = xt.shape[1]
    mn, mx = _seq_min_max(xt, np.full(B, F(3.4028234663852886e38)), np.full(B, F(-3.4028234663852886e38)), 0)
    d = (mx - mn) / F(div)
    idv = np.where(d != F(0.0), F(1.0) / np.where(d != F(0.0), d, F(1.0)), F(0.0))
    v = _trunc_i8((xt - mn) * idv + F(0.5))
    L = (np.minimum(top, v) if top is not None else v) & 0xFF
    return d, mn, L


def _q4_0(x: Arr, qw: Arr | None) -> Arr:
    if qw is None:
        xt = _blocks_t(x, 32)
        d, L = _legacy_absmax(xt, -8.0, 8.5, 15)
    else:
        xt, w = _legacy_weights(x, qw, 32)
        d, L = make_qx_quants(xt, 8, w)
    out = np.empty((xt.shape[1], 18), dtype=np.uint8)
    _put_f16(out, 0, d)
    out[:, 2:] = _pack_nibbles(L)
    return out


def _q4_1(x: Arr, qw: Arr | None) -> Arr:
    if qw is None:
        xt = _blocks_t(x, 32)
        d, m, L = _legacy_minmax(xt, 15.0, 15)
    else:
        xt, w = _legacy_weights(x, qw, 32)
        d, L, the_min = make_qkx(xt, 15, w, -0.9, 0.05, 36, False, True)
        m = -the_min
    out = np.empty((xt.shape[1], 20), dtype=np.uint8)
    _put_f16(out, 0, d)
    _put_f16(out, 2, m)
    out[:, 4:] = _pack_nibbles(L)
    return out


def _q5_0(x: Arr, qw: Arr | None) -> Arr:
    if qw is None:
        xt = _blocks_t(x, 32)
        d, L = _legacy_absmax(xt, -16.0, 16.5, 31)
    else:
        xt, w = _legacy_weights(x, qw, 32)
        d, L = make_qx_quants(xt, 16, w)
    out = np.empty((xt.shape[1], 22), dtype=np.uint8)
    _put_f16(out, 0, d)
    out[:, 2:6] = _qh_bits(L)
    out[:, 6:] = _pack_nibbles(L & 0xF)
    return out


def _q5_1(x: Arr, qw: Arr | None) -> Arr:
    if qw is None:
        xt = _blocks_t(x, 32)
        d, m, L = _legacy_minmax(xt, 31.0, None)
    else:
        xt, w = _legacy_weights(x, qw, 32)
        d, L, the_min = make_qkx(xt, 31, w, -0.9, 0.05, 36, False, True)
        m = -the_min
    out = np.empty((xt.shape[1], 24), dtype=np.uint8)
    _put_f16(out, 0, d)
    _put_f16(out, 2, m)
    out[:, 4:8] = _qh_bits(L)
    out[:, 8:] = _pack_nibbles(L & 0xF)
    return out


def _superblock_sigma2(x: Arr, factor: float) -> Arr:
    """factor * (sum of x*x over each 256-element super-block, sequentially from 0) / 256 -> (S,)."""
    xs = _blocks_t(x, 256)
    out: Arr = (F(factor) * _seqsum0(xs * xs)) / F(256.0)
    return out


def _kquant_weights(x: Arr, qw: Arr, size: int, factor: float) -> Arr:
    """qw * sqrt(sigma2 + x*x) for sub-blocks of `size`, laid out (size, S*256/size)."""
    xt = _blocks_t(x, size)
    sigma2 = np.repeat(_superblock_sigma2(x, factor), 256 // size)
    out: Arr = _qw_t(qw, x.shape[0], size) * np.sqrt(sigma2 + xt * xt)
    return out


def _k4_scale_bytes(ls: Arr, lm: Arr) -> Arr:
    """The 12 scale bytes of Q4_K/Q5_K from (S, 8) six-bit scales and mins (uint8 values)."""
    S = ls.shape[0]
    b = np.zeros((S, 12), dtype=np.int32)
    b[:, 0:4] = ls[:, 0:4]
    b[:, 4:8] = lm[:, 0:4]
    b[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    b[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    b[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    out: Arr = (b & 0xFF).astype(np.uint8)
    return out


def _k4_scale_unpack(b: Arr) -> tuple[Arr, Arr]:
    """get_scale_min_k4 for j = 0..7 -> (sc (S, 8), m (S, 8))."""
    b = b.astype(np.int32)
    sc = np.empty((b.shape[0], 8), dtype=np.int32)
    m = np.empty_like(sc)
    sc[:, 0:4] = b[:, 0:4] & 63
    m[:, 0:4] = b[:, 4:8] & 63
    sc[:, 4:8] = (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)
    return sc, m


def _q45_k_head(x: Arr, qw: Arr | None, nmax: int) -> tuple[Arr, Arr, Arr]:
    """Q4_K / Q5_K search -> (x laid out (32, S*8), header (S, 16): d, dmin, 12 scale bytes, search L)."""
    xt = _blocks_t(x, 32)
    S = xt.shape[1] // 8
    if qw is None:
        sum_x2 = _seqsum0(xt * xt)
        av_x = np.sqrt(sum_x2 / F(32.0))
        w = av_x + np.abs(xt)
        if nmax == 15:
            scales, L, mins = make_qkx(xt, nmax, w, -1.0, 0.1, 20, False, False)
        else:
            scales, L, mins = make_qkx(xt, nmax, w, -0.5, 0.1, 15, False, False)
        sc8, mn8 = scales.reshape(S, 8).T, mins.reshape(S, 8).T
        max_scale = _seq_max_gt(sc8)
        max_min = _seq_max_gt(mn8)
        inv_scale = np.where(max_scale > F(0.0), F(63.0) / np.where(max_scale > F(0.0), max_scale, F(1.0)), F(0.0))
        inv_min = np.where(max_min > F(0.0), F(63.0) / np.where(max_min > F(0.0), max_min, F(1.0)), F(0.0))
        ls = np.minimum(63, nearest_int(inv_scale * sc8) & 0xFF).T
        lm = np.minimum(63, nearest_int(inv_min * mn8) & 0xFF).T
        d = max_scale / F(63.0)
        dmin = max_min / F(63.0)
    else:
        w = _kquant_weights(x, qw, 32, 2.0)
        sw = _seqsum0(w)
        scales, L, mins = make_qkx(xt, nmax, w, -0.9, 0.05, 36, False, True)
        sw8 = sw.reshape(S, 8).T
        d, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(S, 8).T), 63, sw8)
        dmin, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(S, 8).T), 63, sw8)
        ls, lm = ls.T, lm.T
        if nmax == 31:
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    head = np.empty((S, 16), dtype=np.uint8)
    _put_f16(head, 0, d)
    _put_f16(head, 2, dmin)
    head[:, 4:] = _k4_scale_bytes(ls, lm)
    return xt, head, L


def _q45_k_codes(xt: Arr, head: Arr, L: Arr, nmax: int) -> Arr:
    """The codes from the stored header: l = nearest_int((x + dmin*m)/(d*sc)) clamped, per sub-block of 32
    (L, the search's codes, where d*sc == 0) -> (S, 256)."""
    S = head.shape[0]
    sc, m = _k4_scale_unpack(head[:, 4:16])
    dsub = (_f16_at(head, 0)[:, None] * sc.astype(F)).reshape(-1)
    dmsub = (_f16_at(head, 2)[:, None] * m.astype(F)).reshape(-1)
    nz = dsub != F(0.0)
    lq = np.clip(nearest_int((xt + dmsub) / np.where(nz, dsub, F(1.0))), 0, nmax)
    out: Arr = np.ascontiguousarray(np.where(nz, lq, L).T).reshape(S, 256)
    return out


def _q4_k_pack(out: Arr, L: Arr) -> None:
    Lg = L.reshape(-1, 4, 64)  # groups of 64: qs[32g + l] = L[64g + l] | L[64g + l + 32] << 4
    out[:, 16:] = ((Lg[:, :, :32] | (Lg[:, :, 32:] << 4)) & 0xFF).reshape(-1, 128)


def _q5_k_pack(out: Arr, L: Arr) -> None:
    Lg = L.reshape(-1, 4, 64)
    lo, hi = Lg[:, :, :32], Lg[:, :, 32:]
    qh = np.zeros((L.shape[0], 32), dtype=np.int32)
    for g in range(4):
        qh |= ((lo[:, g] >> 4) & 1) << (2 * g)
        qh |= ((hi[:, g] >> 4) & 1) << (2 * g + 1)
    out[:, 16:48] = qh.astype(np.uint8)
    out[:, 48:] = (((lo & 0xF) | ((hi & 0xF) << 4)) & 0xFF).reshape(-1, 128)


def _q4_k(x: Arr, qw: Arr | None) -> Arr:
    xt, head, L = _q45_k_head(x, qw, 15)
    out = np.empty((head.shape[0], 144), dtype=np.uint8)
    out[:, :16] = head
    _q4_k_pack(out, _q45_k_codes(xt, head, L, 15))
    return out


def _q5_k(x: Arr, qw: Arr | None) -> Arr:
    xt, head, L = _q45_k_head(x, qw, 31)
    out = np.empty((head.shape[0], 176), dtype=np.uint8)
    out[:, :16] = head
    _q5_k_pack(out, _q45_k_codes(xt, head, L, 31))
    return out


def _pack_2bit(L: Arr) -> Arr:
    """(S, 256) 2-bit codes -> (S, 64): qs[32h + l] = L[128h+l] | L[128h+l+32] << 2 | ... << 4 | ... << 6."""
    Lg = L.reshape(-1, 2, 4, 32)
    q = Lg[:, :, 0] | (Lg[:, :, 1] << 2) | (Lg[:, :, 2] << 4) | (Lg[:, :, 3] << 6)
    out: Arr = (q & 0xFF).astype(np.uint8).reshape(-1, 64)
    return out


def _q6_k_codes(xt: Arr, blocks: Arr, L: Arr) -> Arr:
    """Q6_K codes from the stored int8 scales and d: l = nearest_int(x/(d*sc)) + 32 (L where d*sc == 0)."""
    S = blocks.shape[0]
    sc = _i8(blocks[:, 192:208].astype(np.int32))
    dsub = (_f16_at(blocks, 208)[:, None] * sc.astype(F)).reshape(-1)
    nz = dsub != F(0.0)
    lq = np.clip(nearest_int(xt / np.where(nz, dsub, F(1.0))), -32, 31) + 32
    out: Arr = np.ascontiguousarray(np.where(nz, lq, L).T).reshape(S, 256)
    return out


def _q6_k_pack(out: Arr, L: Arr) -> None:
    S = L.shape[0]
    Lg = L.reshape(S, 2, 4, 32)  # halves of 128, quarters of 32
    ql = np.concatenate([(Lg[:, :, 0] & 0xF) | ((Lg[:, :, 2] & 0xF) << 4),
                         (Lg[:, :, 1] & 0xF) | ((Lg[:, :, 3] & 0xF) << 4)], axis=2)  # (S, 2, 64)
    out[:, 0:128] = ql.reshape(S, 128).astype(np.uint8)
    qh = (Lg[:, :, 0] >> 4) | ((Lg[:, :, 1] >> 4) << 2) | ((Lg[:, :, 2] >> 4) << 4) | ((Lg[:, :, 3] >> 4) << 6)
    out[:, 128:192] = (qh & 0xFF).reshape(S, 64).astype(np.uint8)


def _q6_k(x: Arr, qw: Arr | None) -> Arr:
    xt = _blocks_t(x, 16)
    S = xt.shape[1] // 16
    scales, L = make_qx_quants(xt, 32, _qw_t(qw, x.shape[0], 16) if qw is not None else None)
    s16 = scales.reshape(S, 16).T
    max_abs, max_scale = _first_absmax(s16)
    zero = max_abs < EPS
    iscale = F(-128.0) / np.where(zero, F(1.0), max_scale)
    sc = _i8(np.minimum(127, nearest_int(iscale * s16)))  # (16, S), int8 as stored
    out = np.empty((S, 210), dtype=np.uint8)
    out[:, 192:208] = (sc.T & 0xFF).astype(np.uint8)
    out[:, 208:210] = _le16(fp32_to_fp16_bits(F(1.0) / iscale))
    _q6_k_pack(out, _q6_k_codes(xt, out, L))
    out[zero] = 0
    return out


def _q3_k_scale_bytes(Ls: Arr) -> Arr:
    """(S, 16) six-bit scale codes -> the 12 scale bytes of Q3_K."""
    sb = np.zeros((Ls.shape[0], 12), dtype=np.int32)
    sb[:, 0:8] = (Ls[:, 0:8] & 0xF) | ((Ls[:, 8:16] & 0xF) << 4)
    for j in range(16):
        sb[:, 8 + j % 4] |= (Ls[:, j] >> 4) << (2 * (j // 4))
    out: Arr = (sb & 0xFF).astype(np.uint8)
    return out


def _q3_k_codes(xt: Arr, blocks: Arr, L: Arr) -> Arr:
    """Q3_K codes from the stored scales: sc = 6-bit code - 32, l = nearest_int(x/(d*sc)) + 4 (L where 0)."""
    S = blocks.shape[0]
    b = blocks[:, 96:108].astype(np.int32)
    sc = np.empty((S, 16), dtype=np.int32)
    for j in range(16):
        low = (b[:, j] & 0xF) if j < 8 else (b[:, j - 8] >> 4)
        sc[:, j] = (low | (((b[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
    dsub = (_f16_at(blocks, 108)[:, None] * sc.astype(F)).reshape(-1)
    nz = dsub != F(0.0)
    lq = np.clip(nearest_int(xt / np.where(nz, dsub, F(1.0))), -4, 3) + 4
    out: Arr = np.ascontiguousarray(np.where(nz, lq, L).T).reshape(S, 256)
    return out


def _q3_k_pack(out: Arr, L: Arr) -> None:
    S = L.shape[0]
    hbit = (L > 3).astype(np.int32)
    L = L - 4 * hbit
    hmask = np.zeros((S, 32), dtype=np.int32)
    for g in range(8):
        hmask |= hbit[:, 32 * g: 32 * g + 32] << g
    out[:, 0:32] = hmask.astype(np.uint8)
    out[:, 32:96] = _pack_2bit(L)


def _q3_k(x: Arr, qw: Arr | None) -> Arr:
    xt = _blocks_t(x, 16)
    S = xt.shape[1] // 16
    if qw is None:
        scales, L = make_q3_quants(xt, 4)
        s16 = scales.reshape(S, 16).T
        _, max_scale = _first_absmax(s16)
        some = max_scale != F(0.0)
        iscale = F(-32.0) / np.where(some, max_scale, F(1.0))
        Ls = np.where(some, np.clip(_i8(nearest_int(iscale * s16)), -32, 31) + 32, 0).T
        dbits = np.where(some, fp32_to_fp16_bits(F(1.0) / iscale), fp32_to_fp16_bits(np.zeros(S, F)))
    else:
        w = _kquant_weights(x, qw, 16, 2.0)
        sw = _seqsum0(w)
        scales, L = make_qx_quants(xt, 4, w)
        d_block, Ls16 = make_qx_quants(np.ascontiguousarray(scales.reshape(S, 16).T), 32,
                                       np.ascontiguousarray(sw.reshape(S, 16).T))
        Ls = Ls16.T
        dbits = fp32_to_fp16_bits(d_block)
    out = np.empty((S, 110), dtype=np.uint8)
    out[:, 96:108] = _q3_k_scale_bytes(Ls)
    out[:, 108:110] = _le16(dbits)
    _q3_k_pack(out, _q3_k_codes(xt, out, L))
    return out


def _q2_k_codes(xt: Arr, blocks: Arr, L: Arr) -> Arr:
    """Q2_K codes from the stored scales: l = nearest_int((x + dmin*m)/(d*sc)) in [0, 3] (L where 0)."""
    S = blocks.shape[0]
    sb = blocks[:, 0:16].astype(np.int32)
    dsub = (_f16_at(blocks, 80)[:, None] * (sb & 0xF).astype(F)).reshape(-1)
    dmsub = (_f16_at(blocks, 82)[:, None] * (sb >> 4).astype(F)).reshape(-1)
    nz = dsub != F(0.0)
    lq = np.clip(nearest_int((xt + dmsub) / np.where(nz, dsub, F(1.0))), 0, 3)
    out: Arr = np.ascontiguousarray(np.where(nz, lq, L).T).reshape(S, 256)
    return out


def _q2_k(x: Arr, qw: Arr | None) -> Arr:
    xt = _blocks_t(x, 16)
    S = xt.shape[1] // 16
    if qw is None:
        scales, L, mins = make_qkx(xt, 3, np.abs(xt), -0.5, 0.1, 15, True, False)
        s16, m16 = scales.reshape(S, 16).T, mins.reshape(S, 16).T
        max_scale, max_min = _seq_max_gt(s16), _seq_max_gt(m16)
        has_s, has_m = max_scale > F(0.0), max_min > F(0.0)
        ls = np.where(has_s, nearest_int((F(15.0) / np.where(has_s, max_scale, F(1.0))) * s16) & 0xFF, 0)
        lm = np.where(has_m, nearest_int((F(15.0) / np.where(has_m, max_min, F(1.0))) * m16), 0)
        sb = ((ls | (lm << 4)) & 0xFF).T
        zero16 = fp32_to_fp16_bits(np.zeros(S, F))
        dbits = np.where(has_s, fp32_to_fp16_bits(max_scale / F(15.0)), zero16)
        mbits = np.where(has_m, fp32_to_fp16_bits(max_min / F(15.0)), zero16)
    else:
        w = _kquant_weights(x, qw, 16, 1.0)
        sw16 = np.ascontiguousarray(_seqsum0(w).reshape(S, 16).T)
        scales, L, mins = make_qkx(xt, 3, w, -0.9, 0.05, 36, False, True)
        dm, Ls = make_qp_quants(np.ascontiguousarray(scales.reshape(S, 16).T), 15, sw16)
        mm, Lm = make_qp_quants(np.ascontiguousarray(mins.reshape(S, 16).T), 15, sw16)
        sb = ((Ls | (Lm << 4)) & 0xFF).T
        dbits, mbits = fp32_to_fp16_bits(dm), fp32_to_fp16_bits(mm)
    out = np.empty((S, 84), dtype=np.uint8)
    out[:, 0:16] = sb.astype(np.uint8)
    out[:, 80:82] = _le16(dbits)
    out[:, 82:84] = _le16(mbits)
    out[:, 16:80] = _pack_2bit(_q2_k_codes(xt, out, L))
    return out


# Bytes of a block that carry its scales (the rest are codes), per type: what the residual codes first.
HEADER_BYTES: dict[int, tuple[tuple[int, int], ...]] = {
    Q.Q8_0: ((0, 2),), Q.Q4_0: ((0, 2),), Q.Q4_1: ((0, 4),), Q.Q5_0: ((0, 2),), Q.Q5_1: ((0, 4),),
    Q.Q2_K: ((0, 16), (80, 84)), Q.Q3_K: ((96, 110),), Q.Q4_K: ((0, 16),), Q.Q5_K: ((0, 16),),
    Q.Q6_K: ((192, 210),),
}


def codes_from_headers(x: Arr, blocks: Arr, qtype: int) -> Arr:
    """For the k-quants, whose codes are a function of the source and the block's stored scales: `blocks`
    (R, row_bytes) with every code byte re-derived from its own header and the rows x (R, n), as the
    quantizer's last step does (codes 0 in sub-blocks whose scale is 0). Other types: `blocks` unchanged.

    Why: a build whose scale search rounds differently (FMA contraction) picks another scale for some
    sub-blocks; with the codes re-derived from the published scales, such a block differs only in its
    header, and the residual pays for the header bytes alone."""
    qt = Q(qtype)
    out = np.array(blocks, dtype=np.uint8, copy=True)
    if qt not in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return out
    x = np.ascontiguousarray(x, dtype=F)
    _, type_size = GGML_QUANT_SIZES[qt]
    b = out.reshape(-1, type_size)
    with np.errstate(all="ignore"):
        if qt in (Q.Q4_K, Q.Q5_K):
            xt = _blocks_t(x, 32)
            nmax = 15 if qt == Q.Q4_K else 31
            L = _q45_k_codes(xt, b[:, :16], np.zeros(xt.shape, np.int32), nmax)
            (_q4_k_pack if qt == Q.Q4_K else _q5_k_pack)(b, L)
        else:
            xt = _blocks_t(x, 16)
            zeros = np.zeros(xt.shape, np.int32)
            if qt == Q.Q6_K:
                _q6_k_pack(b, _q6_k_codes(xt, b, zeros))
            elif qt == Q.Q3_K:
                _q3_k_pack(b, _q3_k_codes(xt, b, zeros))
            else:
                b[:, 16:80] = _pack_2bit(_q2_k_codes(xt, b, zeros))
    return out


_DRIVERS: dict[int, Callable[[Arr, Arr | None], Arr]] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}


# ---------------------------------------------------------------------------------------------------------
# Public entry points


def check_source(x: Arr) -> None:
    """Refuse what the port does not reproduce everywhere: non-finite values (NaN payloads vary by CPU)."""
    if not np.isfinite(x).all():
        raise RequantError("the source holds NaN or infinite values: its quantization is not reproducible")


def row_bytes(qtype: int, n_per_row: int) -> int:
    block, type_size = GGML_QUANT_SIZES[Q(qtype)]
    if n_per_row % block:
        raise RequantError(f"a row of {n_per_row} elements is not whole {Q(qtype).name} blocks of {block}")
    return n_per_row // block * type_size


def _rows_per_pass(qtype: int, n_per_row: int) -> int:
    block, _ = GGML_QUANT_SIZES[Q(qtype)]
    return max(1, _BLOCKS_PER_PASS * min(block, 32) // n_per_row)


def check_args(x: Arr, qtype: int, imatrix: Arr | None) -> tuple[Arr, Arr | None]:
    if Q(qtype) not in REQUANT_TYPES:
        raise RequantError(f"no deterministic quantizer for {Q(qtype).name}")
    x = np.ascontiguousarray(x, dtype=F)
    if x.ndim != 2:
        raise RequantError(f"rows must be a 2-D array, got shape {x.shape}")
    row_bytes(qtype, x.shape[1])
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=F)
        if qw.shape != (x.shape[1],):
            raise RequantError(f"importance vector of shape {qw.shape}, rows of {x.shape[1]} need ({x.shape[1]},)")
    return x, qw


def quantize_numpy(x: Arr, qtype: int, imatrix: Arr | None = None) -> Arr:
    """llama.cpp's bytes for float32 rows x (R, n_per_row) as uint8 (R, row_bytes), in numpy."""
    x, qw = check_args(x, qtype, imatrix)
    n_rows, n = x.shape
    out = np.empty((n_rows, row_bytes(qtype, n)), dtype=np.uint8)
    step = _rows_per_pass(qtype, n)
    driver = _DRIVERS[Q(qtype)]
    with np.errstate(all="ignore"):
        for r0 in range(0, n_rows, step):
            r1 = min(n_rows, r0 + step)
            out[r0:r1] = driver(x[r0:r1], qw).reshape(r1 - r0, -1)
    return out
