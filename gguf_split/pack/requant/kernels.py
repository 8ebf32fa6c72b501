"""The numba engine: llama.cpp's quantizers (ggml-quants.c of ggml 0.25.3) compiled, giving the bytes of
`port` (and of llama.cpp) an order of magnitude faster. numba is optional; without it `port` runs.

One module on purpose: numba's on-disk cache checks only the stamp of the file that holds a function, not
of the files its callees live in, so a kernel cached from one file would keep running an old copy of a
search edited in another.

Three parts:
- the quantizers that do not search (Q8_0; Q4_0, Q4_1, Q5_0, Q5_1 without an importance matrix) as
  line-by-line scalar transcriptions: they run at 0.3-1.3 G elements/s a core;
- the scale searches (make_qx_quants, make_qkx2/3_quants, make_qp_quants, make_q3_quants) compiled
  *across* blocks ("lanes"). A search costs ~300 float operations per element (make_qkx2_quants: 21-22
  candidate scales per 32-element sub-block, each a chain of dependent float32 sums); scalar code
  (llama.cpp's own C, or a scalar transcription in numba) runs it at 3-15 M elements/s a core, which
  made re-quantizing the bottleneck of unpacking. The sums are sequential *within* a block but
  independent *across* blocks, so the data of a tile of blocks is laid out (element of the block, block)
  and every loop over blocks is innermost: each SIMD lane carries one block's sums in the C code's
  order, and LLVM's loop vectoriser makes 8-wide (AVX2) or 16-wide (AVX-512) code of them without
  reassociating anything (4-12x the scalar code here);
- the kernels of the types that search, over tiles: a tile holds TILE units (a super-block of 256 for
  the k-quants, a block of 32 for the legacy types) laid out X[j, i, t] = element i of sub-block j of
  unit t, so X[j] is the (n, TILE) input of one lane search and every per-unit step (block scales, codes,
  packing) is a loop over t. Units past the end of the tensor are zeros (an all-zero block, never
  written out).

Why the bytes are the same on every machine (the contract of the pack's "requant" coding):
- every value is float32 and every operation one IEEE-754 binary32 operation rounded to nearest even,
  written in the C code's order: literals are `F(...)` and integers are converted with `F(...)` before
  they meet a float, so nothing is widened to float64 (numba would widen float32 op int64 to float64);
  add, sub, mul, div, sqrt, compare-and-select and exact int <-> float conversions round the same way
  in a SIMD lane as in a scalar register;
- numba compiles with fastmath off: LLVM gets no `contract`/`reassoc` flags, so it cannot fuse a
  multiply and an add into an FMA or reorder a sum. `tests/pack/test_requant.py` checks the generated
  machine code for FMA instructions and the LLVM IR for double arithmetic;
- float -> int conversions are either llama.cpp's `nearest_int` bit trick (an add and a bit view, no
  conversion instruction) or C truncations of values that are in range for finite inputs; float32 ->
  float16 is llama.cpp's own `ggml_compute_fp32_to_fp16` (float and integer operations);
- in the lanes, a branch of the C code becomes a select; a candidate C skips is computed and discarded
  (division by zero in a discarded lane makes an infinity, never a trap); where C copies a candidate's
  codes on acceptance, a lane records the candidate's inverse scale (and min) and the codes are
  recomputed from them at the end (the same operations on the same inputs); make_qp_quants' refinement
  passes run until a pass changes no lane (a pass that changes nothing leaves the state as it was: C's
  early break), make_q3_quants' runs lane by lane as C does (most blocks settle in a pass or two).
Inputs must be finite (the pack writer checks): NaN payloads differ between CPUs.

Kernels (`KERNELS`) take float32 rows `x` (n_rows, n_per_row), the importance vector `qw` (n_per_row
float32, ignored when `use_qw` is False) and write `out` (n_rows, row_bytes) uint8. They release the GIL
(`nogil`): rows are independent, so a thread pool over row ranges changes no byte, and neither does TILE.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar, cast

import numpy as np

F = np.float32
I32 = np.int32
_numba: Any = importlib.import_module("numba")  # optional: this module is imported only when it is installed
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def jit(**options: Any) -> Callable[[_Fn], _Fn]:
    """numba.njit with the options given (typed for mypy, which does not see the optional numba)."""
    return cast(Callable[[_Fn], _Fn], _numba.njit(**options))


_JIT: dict[str, Any] = dict(nogil=True, cache=True, fastmath=False, error_model="numpy", boundscheck=False)


@jit(inline="always", **_JIT)
def nearest_int(fval: Any) -> Any:
    # ggml: val = fval + 12582912.f; i = bits(val); return (i & 0x007fffff) - 0x00400000
    val = F(fval + F(12582912.0))
    i = val.view(I32)
    return (i & 0x007FFFFF) - 0x00400000


@jit(inline="always", **_JIT)
def fp32_to_fp16(f: Any) -> Any:
    """ggml_compute_fp32_to_fp16 (the FP16 library's branch-free conversion, round to nearest even)."""
    scale_to_inf = F(5.192296858534828e33)  # 0x1.0p+112f
    scale_to_zero = F(7.703719777548943e-34)  # 0x1.0p-110f
    base = (abs(f) * scale_to_inf) * scale_to_zero
    w = np.uint32(F(f).view(np.uint32))
    shl1_w = np.uint32(w + w)
    sign = w & np.uint32(0x80000000)
    bias = shl1_w & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = F(np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(F)) + base
    bits = np.uint32(F(base).view(np.uint32))
    exp_bits = (bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_w > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


@jit(inline="always", **_JIT)
def fp16_to_fp32(h: Any) -> Any:
    """ggml_compute_fp16_to_fp32 (exact)."""
    w = np.uint32(h) << np.uint32(16)
    sign = w & np.uint32(0x80000000)
    two_w = np.uint32(w + w)
    exp_offset = np.uint32(0xE0) << np.uint32(23)
    exp_scale = F(1.925929944387236e-34)  # 0x1.0p-112f
    normalized_value = F(np.uint32((two_w >> np.uint32(4)) + exp_offset).view(F)) * exp_scale
    magic_mask = np.uint32(126) << np.uint32(23)
    denormalized_value = F(np.uint32((two_w >> np.uint32(17)) | magic_mask).view(F)) - F(0.5)
    if two_w < (np.uint32(1) << np.uint32(27)):
        r = sign | np.uint32(F(denormalized_value).view(np.uint32))
    else:
        r = sign | np.uint32(F(normalized_value).view(np.uint32))
    return F(np.uint32(r).view(F))


@jit(inline="always", **_JIT)
def put_f16(out: Any, pos: int, f: Any) -> Any:
    """Store float32 f as ggml_half at out[pos:pos+2] (little-endian); returns the half's bits."""
    h = fp32_to_fp16(f)
    out[pos] = np.uint8(h & np.uint16(0xFF))
    out[pos + 1] = np.uint8(h >> np.uint16(8))
    return h


@jit(inline="always", **_JIT)
def trunc_i8(v: Any) -> Any:
    """C's (int8_t)(float) for the values the reference quantizers produce (in range for finite input)."""
    if not (v > F(-129.0)):
        v = F(-128.0)
    if v > F(128.0):
        v = F(127.0)
    return np.int8(np.int32(v))


# ---------------------------------------------------------------------------------------------------------
# Q8_0, and the legacy 32-element types without an importance matrix


@jit(**_JIT)
def q8_0_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        for ib in range(n // 32):
            amax = F(0.0)
            for j in range(32):
                v = abs(xr[32 * ib + j])
                amax = amax if amax > v else v
            d = amax / F(127.0)
            idv = F(1.0) / d if d != F(0.0) else F(0.0)
            p = 34 * ib
            put_f16(o, p, d)
            for j in range(32):
                x0 = xr[32 * ib + j] * idv
                # roundf: half away from zero (x0 - trunc(x0) is exact)
                t = F(np.trunc(x0))
                if abs(x0 - t) >= F(0.5):
                    t = t + (F(1.0) if x0 > F(0.0) else F(-1.0))
                o[p + 2 + j] = np.uint8(np.int32(t) & 0xFF)


@jit(**_JIT)
def q4_0_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        for ib in range(n // 32):
            p = 18 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            amax = F(0.0)
            mx = F(0.0)
            for j in range(32):
                if amax < abs(xb[j]):
                    amax = abs(xb[j])
                    mx = xb[j]
            d = mx / F(-8.0)
            idv = F(1.0) / d if d != F(0.0) else F(0.0)
            put_f16(o, p, d)
            for j in range(16):
                xi0 = min(15, np.int32(trunc_i8(xb[j] * idv + F(8.5)))) & 0xFF
                xi1 = min(15, np.int32(trunc_i8(xb[j + 16] * idv + F(8.5)))) & 0xFF
                o[p + 2 + j] = np.uint8((xi0 | (xi1 << 4)) & 0xFF)


@jit(**_JIT)
def q4_1_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        for ib in range(n // 32):
            p = 20 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            mn = F(3.4028234663852886e38)
            mx = F(-3.4028234663852886e38)
            for j in range(32):
                v = xb[j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            d = (mx - mn) / F(15.0)
            idv = F(1.0) / d if d != F(0.0) else F(0.0)
            put_f16(o, p, d)
            put_f16(o, p + 2, mn)
            for j in range(16):
                xi0 = min(15, np.int32(trunc_i8((xb[j] - mn) * idv + F(0.5)))) & 0xFF
                xi1 = min(15, np.int32(trunc_i8((xb[j + 16] - mn) * idv + F(0.5)))) & 0xFF
                o[p + 4 + j] = np.uint8((xi0 | (xi1 << 4)) & 0xFF)


@jit(**_JIT)
def q5_0_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    L = np.empty(32, dtype=np.int32)
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        for ib in range(n // 32):
            p = 22 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            amax = F(0.0)
            mx = F(0.0)
            for j in range(32):
                if amax < abs(xb[j]):
                    amax = abs(xb[j])
                    mx = xb[j]
            d = mx / F(-16.0)
            idv = F(1.0) / d if d != F(0.0) else F(0.0)
            put_f16(o, p, d)
            for j in range(32):
                L[j] = min(31, np.int32(trunc_i8(xb[j] * idv + F(16.5)))) & 0xFF
            qh = np.uint32(0)
            for j in range(16):
                xi0 = L[j]
                xi1 = L[j + 16]
                o[p + 6 + j] = np.uint8(((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF)
                qh |= np.uint32((xi0 & 0x10) >> 4) << np.uint32(j)
                qh |= np.uint32((xi1 & 0x10) >> 4) << np.uint32(j + 16)
            for k in range(4):
                o[p + 2 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@jit(**_JIT)
def q5_1_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    L = np.empty(32, dtype=np.int32)
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        for ib in range(n // 32):
            p = 24 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            mn = F(3.4028234663852886e38)
            mx = F(-3.4028234663852886e38)
            for j in range(32):
                v = xb[j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            d = (mx - mn) / F(31.0)
            idv = F(1.0) / d if d != F(0.0) else F(0.0)
            put_f16(o, p, d)
            put_f16(o, p + 2, mn)
            for j in range(32):
                v = (xb[j] - mn) * idv + F(0.5)
                L[j] = np.int32(trunc_i8(v)) & 0xFF  # (uint8_t)(float): in [0, 31] for finite input
            qh = np.uint32(0)
            for j in range(16):
                xi0 = L[j]
                xi1 = L[j + 16]
                o[p + 8 + j] = np.uint8(((xi0 & 0x0F) | ((xi1 & 0x0F) << 4)) & 0xFF)
                qh |= np.uint32((xi0 & 0x10) >> 4) << np.uint32(j)
                qh |= np.uint32((xi1 & 0x10) >> 4) << np.uint32(j + 16)
            for k in range(4):
                o[p + 4 + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


# ---------------------------------------------------------------------------------------------------------
# Lane searches


EPS = F(1e-15)  # GROUP_MAX_EPS
TILE = 64  # units (super-blocks for the k-quants, blocks for the legacy types) per pass; bytes do not depend on it


@jit(inline="always", **_JIT)
def near(v: Any) -> Any:
    """ggml's nearest_int in int32: bits(v + 12582912.f) & 0x7fffff, minus 0x400000."""
    return I32(I32(F(v + F(12582912.0)).view(I32) & I32(0x7FFFFF)) - I32(0x400000))


@jit(inline="always", **_JIT)
def clamp(v: Any, lo: Any, hi: Any) -> Any:
    """MAX(lo, MIN(hi, v)) on int32."""
    return max(lo, min(hi, v))


# ---------------------------------------------------------------------------------------------------------
# make_qx_quants (rmse_type 1): Q6_K, Q3_K with imatrix (and its block scale), Q4_0/Q5_0 with imatrix


@jit(**_JIT)
def _first_absmax(x: Any, amax: Any, mx: Any) -> None:
    """amax = max = 0; for i: if (|x_i| > amax) {amax = |x_i|; max = x_i}, per lane."""
    n, T = x.shape
    for t in range(T):
        amax[t] = F(0.0)
        mx[t] = F(0.0)
    for i in range(n):
        xi = x[i]
        for t in range(T):
            a = abs(xi[t])
            up = a > amax[t]
            mx[t] = xi[t] if up else mx[t]
            amax[t] = a if up else amax[t]


@jit(**_JIT)
def _qx_sums(x: Any, w: Any, wx: Any, isc: Any, lo: Any, hi: Any, slx: Any, sl2: Any) -> None:
    """sumlx += w*x*l; suml2 += w*l*l with l = clamp(nearest_int(iscale*x)), per lane, i in order."""
    n, T = x.shape
    for t in range(T):
        slx[t] = F(0.0)
        sl2[t] = F(0.0)
    for i in range(n):
        xi = x[i]
        wi = w[i]
        wxi = wx[i]
        for t in range(T):
            fl = F(clamp(near(isc[t] * xi[t]), lo, hi))
            slx[t] += wxi[t] * fl
            sl2[t] += (wi[t] * fl) * fl


@jit(**_JIT)
def qx_lanes(x: Any, w: Any, wx: Any, nmax: int, L: Any, scale: Any) -> None:
    """make_qx_quants(n, nmax, x, L, 1, w) for every lane t of x (n, T): w the weights (qw, or x*x where
    C passes none), wx = w*x; L (n, T) int32 out (code + nmax), scale (T,) out."""
    n, T = x.shape
    amax = np.empty(T, F)
    mx = np.empty(T, F)
    _first_absmax(x, amax, mx)
    for t in range(T):
        mx[t] = F(1.0) if amax[t] < EPS else mx[t]  # an all-zero lane: results discarded below
    isc = np.empty(T, F)
    bisc = np.empty(T, F)
    best = np.empty(T, F)
    slx = np.empty(T, F)
    sl2 = np.empty(T, F)
    fn = F(nmax)
    lo = I32(-nmax)
    hi = I32(nmax - 1)
    for c in range(19):  # c = 0: iscale = -nmax/max; then is = -9..-1, 1..9
        step = F(0.0) if c == 0 else F(c - 10 if c < 10 else c - 9)
        for t in range(T):
            isc[t] = (-(fn + F(0.1) * step)) / mx[t]
        _qx_sums(x, w, wx, isc, lo, hi, slx, sl2)
        if c == 0:
            for t in range(T):
                s = slx[t] / sl2[t] if sl2[t] != F(0.0) else F(0.0)
                scale[t] = s
                best[t] = s * slx[t]
                bisc[t] = isc[t]
            continue
        for t in range(T):
            up = sl2[t] > F(0.0) and slx[t] * slx[t] > best[t] * sl2[t]
            s = slx[t] / sl2[t]
            scale[t] = s if up else scale[t]
            best[t] = s * slx[t] if up else best[t]
            bisc[t] = isc[t] if up else bisc[t]
    n32 = I32(nmax)
    for i in range(n):
        xi = x[i]
        Li = L[i]
        for t in range(T):
            Li[t] = I32(0) if amax[t] < EPS else clamp(near(bisc[t] * xi[t]), lo, hi) + n32
    for t in range(T):
        scale[t] = F(0.0) if amax[t] < EPS else scale[t]


# ---------------------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants: Q4_K, Q5_K, Q2_K, and Q4_1/Q5_1 with imatrix


@jit(**_JIT)
def _qkx_stats(x: Any, w: Any, mn: Any, mx: Any, sw: Any, sx: Any) -> None:
    """min, max (from x[0]), sum_w, sum_x = sum w*x (from w[0], w[0]*x[0]), per lane, i in order."""
    n, T = x.shape
    for t in range(T):
        mn[t] = x[0, t]
        mx[t] = x[0, t]
        sw[t] = w[0, t]
        sx[t] = w[0, t] * x[0, t]
    for i in range(1, n):
        xi = x[i]
        wi = w[i]
        for t in range(T):
            v = xi[t]
            mn[t] = v if v < mn[t] else mn[t]
            mx[t] = v if v > mx[t] else mx[t]
            sw[t] += wi[t]
            sx[t] += wi[t] * v


@jit(**_JIT)
def _qkx_error(x: Any, w: Any, La: Any, sc: Any, m: Any, use_mad: bool, err: Any) -> None:
    """err = sum of w * |diff| or w * diff*diff, diff = (scale*L + min) - x, per lane, i in order."""
    n, T = x.shape
    for t in range(T):
        err[t] = F(0.0)
    for i in range(n):
        xi = x[i]
        wi = w[i]
        Li = La[i]
        for t in range(T):
            diff = (sc[t] * F(Li[t]) + m[t]) - xi[t]
            diff = abs(diff) if use_mad else diff * diff
            err[t] += wi[t] * diff


@jit(**_JIT)
def _qkx_codes(x: Any, isc: Any, m: Any, hi: Any, La: Any) -> None:
    """L = clamp(nearest_int(iscale*(x - min)), 0, nmax), per lane."""
    n, T = x.shape
    z = I32(0)
    for i in range(n):
        xi = x[i]
        Li = La[i]
        for t in range(T):
            Li[t] = clamp(near(isc[t] * (xi[t] - m[t])), z, hi)


@jit(**_JIT)
def _qkx_sums(x: Any, w: Any, La: Any, sl: Any, sl2: Any, sxl: Any) -> None:
    """sum_l += w*l; sum_l2 += w*l*l; sum_xl += w*l*x, per lane, i in order."""
    n, T = x.shape
    for t in range(T):
        sl[t] = F(0.0)
        sl2[t] = F(0.0)
        sxl[t] = F(0.0)
    for i in range(n):
        xi = x[i]
        wi = w[i]
        Li = La[i]
        for t in range(T):
            fl = F(Li[t])
            wl = wi[t] * fl
            sl[t] += wl
            sl2[t] += wl * fl
            sxl[t] += wl * xi[t]


@jit(**_JIT)
def _qkx_fit(sw: Any, sx: Any, sl: Any, sl2: Any, sxl: Any, ok: Any, ts: Any, tm: Any) -> None:
    """D = sum_w*sum_l2 - sum_l^2; if D > 0: the least-squares scale and min (min clipped to 0)."""
    for t in range(sw.shape[0]):
        D = sw[t] * sl2[t] - sl[t] * sl[t]
        ok[t] = D > F(0.0)
        s = (sw[t] * sxl[t] - sx[t] * sl[t]) / D
        m = (sl2[t] * sx[t] - sl[t] * sxl[t]) / D
        pos = m > F(0.0)
        tm[t] = F(0.0) if pos else m
        ts[t] = sxl[t] / sl2[t] if pos else s


@jit(**_JIT)
def qkx_lanes(x: Any, w: Any, nmax: int, rmin: Any, rdelta: Any, nstep: int, use_mad: bool, v3: bool,
              L: Any, scale: Any, the_min: Any) -> None:
    """make_qkx2_quants (v3 False) / make_qkx3_quants (v3 True, weights given) for every lane t of
    x (n, T) with weights w (n, T); L (n, T) int32 out, scale and the_min (T,) out. nstep >= 1.
    C's `min` moves with each accepted candidate and later candidates are built around it."""
    n, T = x.shape
    mn, mx, sw, sx = np.empty(T, F), np.empty(T, F), np.empty(T, F), np.empty(T, F)
    _qkx_stats(x, w, mn, mx, sw, sx)
    degen = np.empty(T, np.bool_)
    first_min, isc, bisc, bmn = np.empty(T, F), np.empty(T, F), np.empty(T, F), np.empty(T, F)
    best, cur, ts, tm = np.empty(T, F), np.empty(T, F), np.empty(T, F), np.empty(T, F)
    sl, sl2, sxl = np.empty(T, F), np.empty(T, F), np.empty(T, F)
    ok = np.empty(T, np.bool_)
    fnmax = F(nmax)
    for t in range(T):
        mn[t] = F(0.0) if mn[t] > F(0.0) else mn[t]
        degen[t] = (mx[t] <= mn[t]) if v3 else (mx[t] == mn[t])
        first_min[t] = mn[t]
        isc[t] = fnmax / ((mx[t] - mn[t]) if not degen[t] else F(1.0))
        scale[t] = F(1.0) / isc[t]
        bisc[t] = isc[t]
        bmn[t] = mn[t]
    hi = I32(nmax)
    _qkx_codes(x, isc, mn, hi, L)
    _qkx_error(x, w, L, scale, mn, use_mad, best)
    for is_ in range(nstep + 1):
        for t in range(T):
            isc[t] = ((rmin + rdelta * F(is_)) + fnmax) / ((mx[t] - mn[t]) if not degen[t] else F(1.0))
        _qkx_codes(x, isc, mn, hi, L)
        _qkx_sums(x, w, L, sl, sl2, sxl)
        _qkx_fit(sw, sx, sl, sl2, sxl, ok, ts, tm)
        _qkx_error(x, w, L, ts, tm, use_mad, cur)
        for t in range(T):
            up = ok[t] and cur[t] < best[t] and not degen[t]
            best[t] = cur[t] if up else best[t]
            scale[t] = ts[t] if up else scale[t]
            bisc[t] = isc[t] if up else bisc[t]
            bmn[t] = mn[t] if up else bmn[t]
            mn[t] = tm[t] if up else mn[t]
    _qkx_codes(x, bisc, bmn, hi, L)  # the accepted candidate's codes (or the first ones)
    for i in range(n):
        Li = L[i]
        for t in range(T):
            Li[t] = I32(0) if degen[t] else Li[t]
    for t in range(T):
        scale[t] = F(0.0) if degen[t] else scale[t]
        the_min[t] = -(first_min[t] if degen[t] else mn[t])


# ---------------------------------------------------------------------------------------------------------
# make_qp_quants (the k-quants' block scales with imatrix) and make_q3_quants (Q3_K without)


@jit(**_JIT)
def _qp_mse(x: Any, qw: Any, isc: Any, nmax: Any, first: bool, err: Any) -> None:
    """sum of w*diff*diff, diff = x - (1/iscale)*l; l = nearest_int(iscale*x) as uint8 (first pass) or
    MIN(nmax, nearest_int(iscale*x)) (the candidates), per lane, i in order."""
    n, T = x.shape
    for t in range(T):
        err[t] = F(0.0)
    for i in range(n):
        xi = x[i]
        wi = qw[i]
        for t in range(T):
            l = near(isc[t] * xi[t])
            l = (l & I32(0xFF)) if first else min(nmax, l)
            diff = xi[t] - (F(1.0) / isc[t]) * F(l)
            err[t] += (wi[t] * diff) * diff


@jit(**_JIT)
def _qp_refine_pass(x: Any, w: Any, L: Any, sumlx: Any, suml2: Any, hi: Any) -> bool:
    """One pass of make_qp_quants' refinement (L uint8 values, new codes MIN(nmax, .), stored & 0xFF),
    per lane, i in order. True when some lane changed (a pass without change leaves every lane as it
    was, so the next would change nothing either: C's `if (!n_changed) break`)."""
    n, T = x.shape
    changed = I32(0)
    for i in range(n):
        xi = x[i]
        wi = w[i]
        Li = L[i]
        for t in range(T):
            fli = F(Li[t])
            wx = wi[t] * xi[t]
            slx = sumlx[t] - wx * fli
            sl2 = suml2[t] - (wi[t] * fli) * fli
            c = slx > F(0.0) and sl2 > F(0.0)
            new_l = min(hi, near((xi[t] * sl2) / (slx if c else F(1.0))))
            c = c and new_l != Li[t]
            fnl = F(new_l)
            slx = slx + wx * fnl
            sl2 = sl2 + (wi[t] * fnl) * fnl
            c = c and (slx * slx) * suml2[t] > (sumlx[t] * sumlx[t]) * sl2
            Li[t] = (new_l & I32(0xFF)) if c else Li[t]
            sumlx[t] = slx if c else sumlx[t]
            suml2[t] = sl2 if c else suml2[t]
            changed |= I32(c)
    return bool(changed != 0)


@jit(**_JIT)
def _qp_search(x: Any, qw: Any, nmax: int, mx: Any, isc: Any) -> None:
    """The first iscale and the 8 candidates of make_qp_quants: isc (T,) out, the best one."""
    T = x.shape[1]
    best = np.empty(T, F)
    cand = np.empty(T, F)
    err = np.empty(T, F)
    fnmax = F(nmax)
    n32 = I32(nmax)
    for t in range(T):
        isc[t] = fnmax / mx[t]
    _qp_mse(x, qw, isc, n32, True, best)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        for t in range(T):
            cand[t] = (F(0.1) * F(is_) + fnmax) / mx[t]
        _qp_mse(x, qw, cand, n32, False, err)
        for t in range(T):
            up = err[t] < best[t]
            best[t] = err[t] if up else best[t]
            isc[t] = cand[t] if up else isc[t]


@jit(**_JIT)
def qp_lanes(x: Any, qw: Any, nmax: int, L: Any, scale: Any) -> None:
    """make_qp_quants(n, nmax, x, L, qw) for every lane t of x (n, T); L (n, T) int32 out (uint8 values),
    scale (T,) out."""
    n, T = x.shape
    mx = np.zeros(T, F)
    for i in range(n):
        xi = x[i]
        for t in range(T):
            mx[t] = mx[t] if mx[t] > xi[t] else xi[t]
    zero = np.empty(T, np.bool_)
    for t in range(T):
        zero[t] = mx[t] < EPS
        mx[t] = F(1.0) if zero[t] else mx[t]
    isc = np.empty(T, F)
    _qp_search(x, qw, nmax, mx, isc)
    sumlx = np.zeros(T, F)
    suml2 = np.zeros(T, F)
    n32 = I32(nmax)
    for i in range(n):
        xi = x[i]
        wi = qw[i]
        Li = L[i]
        for t in range(T):
            l = min(n32, near(isc[t] * xi[t]))
            Li[t] = l & I32(0xFF)
            fl = F(l)
            sumlx[t] += (wi[t] * xi[t]) * fl
            suml2[t] += (wi[t] * fl) * fl
    for _ in range(5):
        if not _qp_refine_pass(x, qw, L, sumlx, suml2, n32):
            break
    for i in range(n):
        Li = L[i]
        for t in range(T):
            Li[t] = I32(0) if zero[t] else Li[t]
    for t in range(T):
        scale[t] = F(0.0) if zero[t] or not suml2[t] > F(0.0) else sumlx[t] / suml2[t]


@jit(**_JIT)
def _q3_refine_lane(x: Any, w: Any, L: Any, sumlx: Any, suml2: Any, lo: Any, hi: Any, t: int) -> None:
    """make_q3_quants' refinement of one lane, as C runs it (up to 5 passes, leaving after one without
    change)."""
    n = x.shape[0]
    slx_t = sumlx[t]
    sl2_t = suml2[t]
    for _ in range(5):
        changed = False
        for i in range(n):
            xi = x[i, t]
            wi = w[i, t]
            fli = F(L[i, t])
            slx = slx_t - (wi * xi) * fli
            if slx > F(0.0):
                sl2 = sl2_t - (wi * fli) * fli
                new_l = clamp(near((xi * sl2) / slx), lo, hi)
                if new_l != L[i, t]:
                    fnl = F(new_l)
                    slx = slx + (wi * xi) * fnl
                    sl2 = sl2 + (wi * fnl) * fnl
                    if sl2 > F(0.0) and (slx * slx) * sl2_t > (slx_t * slx_t) * sl2:
                        L[i, t] = new_l
                        slx_t = slx
                        sl2_t = sl2
                        changed = True
        if not changed:
            break
    sumlx[t] = slx_t
    suml2[t] = sl2_t


@jit(**_JIT)
def q3_lanes(x: Any, w: Any, nmax: int, L: Any, scale: Any) -> None:
    """make_q3_quants(n, nmax, x, L, true) for every lane t of x (n, T), w = x*x; L (n, T) int32 out
    (code + nmax), scale (T,) out."""
    n, T = x.shape
    amax = np.empty(T, F)
    mx = np.empty(T, F)
    _first_absmax(x, amax, mx)
    sumlx = np.zeros(T, F)
    suml2 = np.zeros(T, F)
    lo = I32(-nmax)
    hi = I32(nmax - 1)
    for t in range(T):
        mx[t] = F(-F(nmax)) / (F(1.0) if amax[t] < EPS else mx[t])  # mx now holds iscale
    for i in range(n):
        xi = x[i]
        wi = w[i]
        Li = L[i]
        for t in range(T):
            l = clamp(near(mx[t] * xi[t]), lo, hi)
            Li[t] = l
            fl = F(l)
            sumlx[t] += (wi[t] * xi[t]) * fl
            suml2[t] += (wi[t] * fl) * fl
    for t in range(T):  # C's refinement lane by lane: it leaves most blocks after a pass or two
        if not amax[t] < EPS:
            _q3_refine_lane(x, w, L, sumlx, suml2, lo, hi, t)
    n32 = I32(nmax)
    for i in range(n):
        Li = L[i]
        for t in range(T):
            Li[t] = I32(0) if amax[t] < EPS else Li[t] + n32
    for t in range(T):
        zero = amax[t] < EPS or not suml2[t] > F(0.0)
        scale[t] = F(0.0) if zero else sumlx[t] / suml2[t]


# ---------------------------------------------------------------------------------------------------------
# Tiles: gathering units, weights


@jit(**_JIT)
def _gather(x: Any, unit: int, s0: int, X: Any) -> None:
    """X[j, i, t] = x at element (ni*j + i) of unit s0 + t (units of `unit` elements, row-major in x)."""
    nj, ni, T = X.shape
    n_rows, n = x.shape
    per_row = n // unit
    total = n_rows * per_row
    for t in range(T):
        s = s0 + t
        if s >= total:
            for j in range(nj):
                for i in range(ni):
                    X[j, i, t] = F(0.0)
            continue
        xr = x[s // per_row]
        c0 = (s % per_row) * unit
        for j in range(nj):
            for i in range(ni):
                X[j, i, t] = xr[c0 + ni * j + i]


@jit(**_JIT)
def _gather_qw(qw: Any, n_rows: int, unit: int, s0: int, Q: Any) -> None:
    """Q[j, i, t] = the importance of element (ni*j + i) of unit s0 + t (its column's)."""
    nj, ni, T = Q.shape
    per_row = qw.shape[0] // unit
    total = n_rows * per_row
    for t in range(T):
        c0 = ((s0 + t) % per_row) * unit if s0 + t < total else 0
        for j in range(nj):
            for i in range(ni):
                Q[j, i, t] = qw[c0 + ni * j + i]


@jit(**_JIT)
def _unit_sum_x2(X: Any, s2: Any) -> None:
    """sum of x*x over each unit, elements in order (j, then i), from 0."""
    nj, ni, T = X.shape
    for t in range(T):
        s2[t] = F(0.0)
    for j in range(nj):
        for i in range(ni):
            xi = X[j, i]
            for t in range(T):
                s2[t] += xi[t] * xi[t]


@jit(**_JIT)
def _imatrix_weights(X: Any, Q: Any, sigma2: Any, W: Any, sw: Any) -> None:
    """W = qw * sqrtf(sigma2 + x*x); sw[j] = the sum of sub-block j's weights, in order."""
    nj, ni, T = X.shape
    for j in range(nj):
        for t in range(T):
            sw[j, t] = F(0.0)
        for i in range(ni):
            xi = X[j, i]
            qi = Q[j, i]
            wi = W[j, i]
            for t in range(T):
                wi[t] = qi[t] * np.sqrt(sigma2[t] + xi[t] * xi[t])
                sw[j, t] += wi[t]


@jit(**_JIT)
def _superblock_imatrix_weights(X: Any, Q: Any, factor: Any, W: Any, sw: Any) -> None:
    """The k-quants' imatrix weights: sigma2 = factor*sum_x2/256 over the super-block."""
    T = X.shape[2]
    s2 = np.empty(T, F)
    _unit_sum_x2(X, s2)
    for t in range(T):
        s2[t] = (factor * s2[t]) / F(256.0)
    _imatrix_weights(X, Q, s2, W, sw)


@jit(**_JIT)
def _products(A: Any, B: Any, out: Any) -> None:
    """out = A*B elementwise (3-D, same shape)."""
    nj, ni, T = A.shape
    for j in range(nj):
        for i in range(ni):
            a = A[j, i]
            b = B[j, i]
            o = out[j, i]
            for t in range(T):
                o[t] = a[t] * b[t]


@jit(inline="always", **_JIT)
def _f16_at(o: Any, p: int) -> Any:
    return fp16_to_fp32(np.uint16(o[p]) | (np.uint16(o[p + 1]) << np.uint16(8)))


@jit(inline="always", **_JIT)
def _put_f16(o: Any, p: int, f: Any) -> None:
    h = fp32_to_fp16(f)
    o[p] = np.uint8(h & np.uint16(0xFF))
    o[p + 1] = np.uint8(h >> np.uint16(8))


@jit(inline="always", **_JIT)
def _unit_out(out: Any, unit_bytes: int, s: int) -> Any:
    """(the row of out holding unit s, the unit's byte offset in it)."""
    per_row = out.shape[1] // unit_bytes
    return out[s // per_row], (s % per_row) * unit_bytes


@jit(**_JIT)
def _codes(X: Any, D: Any, DM: Any, lo: Any, hi: Any, bias: Any, L: Any) -> None:
    """The quantizer's last step: where d = D[j, t] != 0, L = clamp(nearest_int((x + dm)/d)) + bias
    (C's `if (!d) continue` keeps the search's codes elsewhere)."""
    nj, ni, T = X.shape
    for j in range(nj):
        d = D[j]
        dm = DM[j]
        for i in range(ni):
            xi = X[j, i]
            Li = L[j, i]
            for t in range(T):
                q = clamp(near((xi[t] + dm[t]) / (d[t] if d[t] != F(0.0) else F(1.0))), lo, hi) + bias
                Li[t] = q if d[t] != F(0.0) else Li[t]


# ---------------------------------------------------------------------------------------------------------
# Q6_K


@jit(**_JIT)
def _q6_k_header(scales: Any, o: Any, p: int, t: int, D: Any) -> bool:
    """Scales and d of one super-block (t); D[j, t] = d * sc[j]. False for an all-zero block."""
    max_scale = F(0.0)
    max_abs = F(0.0)
    for ib in range(16):
        a = abs(scales[ib, t])
        if a > max_abs:
            max_abs = a
            max_scale = scales[ib, t]
    if max_abs < EPS:
        return False
    iscale = F(-128.0) / max_scale
    _put_f16(o, p + 208, F(1.0) / iscale)
    dall = _f16_at(o, p + 208)
    for ib in range(16):
        sc = min(I32(127), near(iscale * scales[ib, t]))
        o[p + 192 + ib] = np.uint8(sc & I32(0xFF))
        D[ib, t] = dall * F(np.int8(o[p + 192 + ib]))
    return True


@jit(**_JIT)
def _q6_k_pack(L: Any, o: Any, p: int, t: int) -> None:
    """ql, qh of one super-block from its 256 codes L[j, i, t] (element 16*j + i): element 128h + 32k + l
    is L[8h + 2k + l // 16, l % 16]."""
    for h in range(2):
        for l in range(32):
            j = 8 * h + l // 16
            i = l % 16
            q0, q1, q2, q3 = L[j, i, t], L[j + 2, i, t], L[j + 4, i, t], L[j + 6, i, t]
            o[p + 64 * h + l] = np.uint8(((q0 & 0xF) | ((q2 & 0xF) << 4)) & 0xFF)
            o[p + 64 * h + l + 32] = np.uint8(((q1 & 0xF) | ((q3 & 0xF) << 4)) & 0xFF)
            o[p + 128 + 32 * h + l] = np.uint8(((q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4)
                                                | ((q3 >> 4) << 6)) & 0xFF)


@jit(**_JIT)
def q6_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    total = n_rows * (n // 256)
    X, W, WX = np.zeros((16, 16, TILE), F), np.zeros((16, 16, TILE), F), np.zeros((16, 16, TILE), F)
    L = np.zeros((16, 16, TILE), I32)
    scales, D, DM = np.zeros((16, TILE), F), np.zeros((16, TILE), F), np.zeros((16, TILE), F)
    ok = np.zeros(TILE, np.bool_)
    for s0 in range(0, total, TILE):
        _gather(x, 256, s0, X)
        if use_qw:
            _gather_qw(qw, n_rows, 256, s0, W)
        else:
            _products(X, X, W)
        _products(W, X, WX)
        for j in range(16):
            qx_lanes(X[j], W[j], WX[j], 32, L[j], scales[j])
        for t in range(min(TILE, total - s0)):
            o, p = _unit_out(out, 210, s0 + t)
            ok[t] = _q6_k_header(scales, o, p, t, D)
            if not ok[t]:
                for k in range(210):
                    o[p + k] = 0
                for j in range(16):
                    D[j, t] = F(0.0)
        _codes(X, D, DM, I32(-32), I32(31), I32(32), L)
        for t in range(min(TILE, total - s0)):
            if ok[t]:
                o, p = _unit_out(out, 210, s0 + t)
                _q6_k_pack(L, o, p, t)


# ---------------------------------------------------------------------------------------------------------
# Q4_K, Q5_K


@jit(**_JIT)
def _k4_pack_scales(o: Any, p: int, ls: Any, lm: Any) -> None:
    """The 12 scale bytes of Q4_K/Q5_K at o[p:] from 8 six-bit scales and mins (uint8 values)."""
    for j in range(12):
        o[p + j] = 0
    for j in range(8):
        a = ls[j] & I32(0xFF)
        b = lm[j] & I32(0xFF)
        if j < 4:
            o[p + j] = np.uint8(a)
            o[p + j + 4] = np.uint8(b)
        else:
            o[p + j + 4] = np.uint8(((a & 0xF) | ((b & 0xF) << 4)) & 0xFF)
            o[p + j - 4] = np.uint8((np.int32(o[p + j - 4]) | ((a >> 4) << 6)) & 0xFF)
            o[p + j] = np.uint8((np.int32(o[p + j]) | ((b >> 4) << 6)) & 0xFF)


@jit(**_JIT)
def _k4_dequant_scales(o: Any, p: int, t: int, D: Any, DM: Any) -> None:
    """D[j, t] = d * sc_j, DM[j, t] = dmin * m_j from the stored header (get_scale_min_k4)."""
    dall = _f16_at(o, p)
    dmin = _f16_at(o, p + 2)
    q = p + 4
    for j in range(8):
        if j < 4:
            sc = np.int32(o[q + j]) & 63
            m = np.int32(o[q + j + 4]) & 63
        else:
            sc = (np.int32(o[q + j + 4]) & 0xF) | ((np.int32(o[q + j - 4]) >> 6) << 4)
            m = (np.int32(o[q + j + 4]) >> 4) | ((np.int32(o[q + j]) >> 6) << 4)
        D[j, t] = dall * F(sc)
        DM[j, t] = dmin * F(m)


@jit(**_JIT)
def _q45_k_header_ref(scales: Any, mins: Any, o: Any, p: int, t: int) -> None:
    """quantize_row_q4_K_ref / q5_K_ref: the 6-bit scales and mins against the largest, d and dmin."""
    max_scale = F(0.0)
    max_min = F(0.0)
    for j in range(8):
        if scales[j, t] > max_scale:
            max_scale = scales[j, t]
        if mins[j, t] > max_min:
            max_min = mins[j, t]
    inv_scale = F(63.0) / max_scale if max_scale > F(0.0) else F(0.0)
    inv_min = F(63.0) / max_min if max_min > F(0.0) else F(0.0)
    ls = np.empty(8, I32)
    lm = np.empty(8, I32)
    for j in range(8):
        ls[j] = min(I32(63), near(inv_scale * scales[j, t]) & I32(0xFF))
        lm[j] = min(I32(63), near(inv_min * mins[j, t]) & I32(0xFF))
    _k4_pack_scales(o, p + 4, ls, lm)
    _put_f16(o, p, max_scale / F(63.0))
    _put_f16(o, p + 2, max_min / F(63.0))


@jit(**_JIT)
def _q45_k_scales(X: Any, Q: Any, use_qw: bool, nmax: int, W: Any, sw: Any, L: Any, scales: Any,
                  mins: Any) -> None:
    """The sub-block searches of a tile: make_qkx2_quants on av_x + |x| (ref) or make_qkx3_quants on
    the imatrix weights (impl)."""
    T = X.shape[2]
    if use_qw:
        _superblock_imatrix_weights(X, Q, F(2.0), W, sw)
        for j in range(8):
            qkx_lanes(X[j], W[j], nmax, F(-0.9), F(0.05), 36, False, True, L[j], scales[j], mins[j])
        return
    s = np.empty(T, F)
    for j in range(8):
        for t in range(T):
            s[t] = F(0.0)
        for i in range(32):
            for t in range(T):
                s[t] += X[j, i, t] * X[j, i, t]
        for t in range(T):
            s[t] = np.sqrt(s[t] / F(32.0))
        for i in range(32):
            for t in range(T):
                W[j, i, t] = s[t] + abs(X[j, i, t])
        if nmax == 15:
            qkx_lanes(X[j], W[j], nmax, F(-1.0), F(0.1), 20, False, False, L[j], scales[j], mins[j])
        else:
            qkx_lanes(X[j], W[j], nmax, F(-0.5), F(0.1), 15, False, False, L[j], scales[j], mins[j])


@jit(**_JIT)
def _q45_k_headers(out: Any, s0: int, n_units: int, use_qw: bool, nmax: int, bytes_per: int, scales: Any,
                   mins: Any, sw: Any, D: Any, DM: Any) -> None:
    """Every super-block's header (d, dmin, 12 scale bytes) and D, DM from it."""
    if use_qw:
        T = scales.shape[1]
        Ls = np.empty((8, T), I32)
        Lm = np.empty((8, T), I32)
        d_block = np.empty(T, F)
        m_block = np.empty(T, F)
        qp_lanes(scales, sw, 63, Ls, d_block)
        qp_lanes(mins, sw, 63, Lm, m_block)
    for t in range(n_units):
        o, p = _unit_out(out, bytes_per, s0 + t)
        if use_qw:
            ls = Ls[:, t].copy()
            lm = Lm[:, t].copy()
            if nmax == 31:
                for j in range(8):
                    ls[j] = min(I32(63), ls[j])
                    lm[j] = min(I32(63), lm[j])
            _k4_pack_scales(o, p + 4, ls, lm)
            _put_f16(o, p, d_block[t])
            _put_f16(o, p + 2, m_block[t])
        else:
            _q45_k_header_ref(scales, mins, o, p, t)
        _k4_dequant_scales(o, p, t, D, DM)


@jit(**_JIT)
def _q4_k_pack(L: Any, o: Any, p: int, t: int) -> None:
    for g in range(4):
        for l in range(32):
            o[p + 16 + 32 * g + l] = np.uint8((L[2 * g, l, t] | (L[2 * g + 1, l, t] << 4)) & 0xFF)


@jit(**_JIT)
def _q5_k_pack(L: Any, o: Any, p: int, t: int) -> None:
    for l in range(32):
        o[p + 16 + l] = 0
    for g in range(4):
        for l in range(32):
            l1 = L[2 * g, l, t]
            l2 = L[2 * g + 1, l, t]
            o[p + 16 + l] = np.uint8(np.int32(o[p + 16 + l]) | (((l1 >> 4) & 1) << (2 * g))
                                     | (((l2 >> 4) & 1) << (2 * g + 1)))
            o[p + 48 + 32 * g + l] = np.uint8(((l1 & 0xF) | ((l2 & 0xF) << 4)) & 0xFF)


@jit(**_JIT)
def _q45_k_rows(x: Any, out: Any, qw: Any, use_qw: bool, nmax: int) -> None:
    n_rows, n = x.shape
    total = n_rows * (n // 256)
    bytes_per = 144 if nmax == 15 else 176
    X, W, Q = np.zeros((8, 32, TILE), F), np.zeros((8, 32, TILE), F), np.zeros((8, 32, TILE), F)
    L = np.zeros((8, 32, TILE), I32)
    scales, mins, sw = np.zeros((8, TILE), F), np.zeros((8, TILE), F), np.zeros((8, TILE), F)
    D, DM = np.zeros((8, TILE), F), np.zeros((8, TILE), F)
    for s0 in range(0, total, TILE):
        n_units = min(TILE, total - s0)
        _gather(x, 256, s0, X)
        if use_qw:
            _gather_qw(qw, n_rows, 256, s0, Q)
        _q45_k_scales(X, Q, use_qw, nmax, W, sw, L, scales, mins)
        _q45_k_headers(out, s0, n_units, use_qw, nmax, bytes_per, scales, mins, sw, D, DM)
        _codes(X, D, DM, I32(0), I32(nmax), I32(0), L)
        for t in range(n_units):
            o, p = _unit_out(out, bytes_per, s0 + t)
            if nmax == 15:
                _q4_k_pack(L, o, p, t)
            else:
                _q5_k_pack(L, o, p, t)


@jit(**_JIT)
def q4_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    _q45_k_rows(x, out, qw, use_qw, 15)


@jit(**_JIT)
def q5_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    _q45_k_rows(x, out, qw, use_qw, 31)


# ---------------------------------------------------------------------------------------------------------
# Q3_K, Q2_K (sub-blocks of 16; four 2-bit codes a byte)


@jit(**_JIT)
def _pack_2bit(L: Any, o: Any, p: int, t: int) -> None:
    """qs[32h + l] = L[128h + l] | L[128h + l + 32] << 2 | ... << 4 | ... << 6 (element 16*j + i)."""
    for h in range(2):
        for l in range(32):
            j = 8 * h + l // 16
            i = l % 16
            o[p + 32 * h + l] = np.uint8((L[j, i, t] | (L[j + 2, i, t] << 2) | (L[j + 4, i, t] << 4)
                                          | (L[j + 6, i, t] << 6)) & 0xFF)


@jit(**_JIT)
def _q3_k_put_scales(Ls: Any, o: Any, p: int, t: int) -> None:
    """The 12 scale bytes of Q3_K at o[p + 96:] from 16 six-bit codes Ls[j, t]."""
    sp = p + 96
    for k in range(12):
        o[sp + k] = 0
    for j in range(16):
        l = Ls[j, t]
        if j < 8:
            o[sp + j] = np.uint8(l & 0xF)
        else:
            o[sp + j - 8] = np.uint8((np.int32(o[sp + j - 8]) | ((l & 0xF) << 4)) & 0xFF)
        l >>= 4
        o[sp + 8 + j % 4] = np.uint8((np.int32(o[sp + 8 + j % 4]) | (l << (2 * (j // 4)))) & 0xFF)


@jit(**_JIT)
def _q3_k_header_ref(scales: Any, o: Any, p: int, t: int, Ls: Any) -> None:
    """quantize_row_q3_K_ref: 6-bit scales against the largest in magnitude, d."""
    max_scale = F(0.0)
    amax = F(0.0)
    for j in range(16):
        a = abs(scales[j, t])
        if a > amax:
            amax = a
            max_scale = scales[j, t]
    if max_scale != F(0.0):
        iscale = F(-32.0) / max_scale
        for j in range(16):
            l8 = np.int32(np.int8(near(iscale * scales[j, t]) & I32(0xFF)))
            Ls[j, t] = clamp(l8, I32(-32), I32(31)) + I32(32)
        _q3_k_put_scales(Ls, o, p, t)
        _put_f16(o, p + 108, F(1.0) / iscale)
    else:
        for k in range(12):
            o[p + 96 + k] = 0
        _put_f16(o, p + 108, F(0.0))


@jit(**_JIT)
def _q3_k_dequant_scales(o: Any, p: int, t: int, D: Any) -> None:
    """D[j, t] = d * (6-bit scale - 32) from the stored header."""
    dall = _f16_at(o, p + 108)
    sp = p + 96
    for j in range(16):
        sc = (np.int32(o[sp + j]) & 0xF) if j < 8 else (np.int32(o[sp + j - 8]) >> 4)
        sc = (sc | (((np.int32(o[sp + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        D[j, t] = dall * F(sc)


@jit(**_JIT)
def _q3_k_pack(L: Any, o: Any, p: int, t: int) -> None:
    """hmask (bit g of byte m: element 32g + m above 3) and the low two bits as 2-bit codes."""
    for m in range(32):
        h = 0
        for g in range(8):
            e = 32 * g + m
            if L[e // 16, e % 16, t] > 3:
                h |= 1 << g
                L[e // 16, e % 16, t] -= 4
        o[p + m] = np.uint8(h)
    _pack_2bit(L, o, p + 32, t)


@jit(**_JIT)
def _q3_k_tile(X: Any, Q: Any, use_qw: bool, W: Any, WX: Any, sw: Any, L: Any, scales: Any, Ls: Any,
               d_block: Any) -> None:
    """The searches of a Q3_K tile: make_q3_quants (ref) or make_qx_quants on the imatrix weights plus
    the block scale's make_qx_quants over the 16 scales (impl)."""
    _products(X, X, W)
    if not use_qw:
        for j in range(16):
            q3_lanes(X[j], W[j], 4, L[j], scales[j])
        return
    _superblock_imatrix_weights(X, Q, F(2.0), W, sw)
    _products(W, X, WX)
    for j in range(16):
        qx_lanes(X[j], W[j], WX[j], 4, L[j], scales[j])
    swx = sw * scales
    qx_lanes(scales, sw, swx, 32, Ls, d_block)


@jit(**_JIT)
def q3_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    total = n_rows * (n // 256)
    X, W, WX, Q = (np.zeros((16, 16, TILE), F), np.zeros((16, 16, TILE), F), np.zeros((16, 16, TILE), F),
                   np.zeros((16, 16, TILE), F))
    L = np.zeros((16, 16, TILE), I32)
    scales, sw, D, DM = np.zeros((16, TILE), F), np.zeros((16, TILE), F), np.zeros((16, TILE), F), np.zeros((16, TILE), F)
    Ls = np.zeros((16, TILE), I32)
    d_block = np.zeros(TILE, F)
    for s0 in range(0, total, TILE):
        n_units = min(TILE, total - s0)
        _gather(x, 256, s0, X)
        if use_qw:
            _gather_qw(qw, n_rows, 256, s0, Q)
        _q3_k_tile(X, Q, use_qw, W, WX, sw, L, scales, Ls, d_block)
        for t in range(n_units):
            o, p = _unit_out(out, 110, s0 + t)
            if use_qw:
                _q3_k_put_scales(Ls, o, p, t)
                _put_f16(o, p + 108, d_block[t])
            else:
                _q3_k_header_ref(scales, o, p, t, Ls)
            _q3_k_dequant_scales(o, p, t, D)
        _codes(X, D, DM, I32(-4), I32(3), I32(4), L)
        for t in range(n_units):
            o, p = _unit_out(out, 110, s0 + t)
            _q3_k_pack(L, o, p, t)


@jit(**_JIT)
def _q2_k_header_ref(scales: Any, mins: Any, o: Any, p: int, t: int) -> None:
    """quantize_row_q2_K_ref: 4-bit scales and mins against the largest, d and dmin."""
    max_scale = F(0.0)
    max_min = F(0.0)
    for j in range(16):
        if scales[j, t] > max_scale:
            max_scale = scales[j, t]
        if mins[j, t] > max_min:
            max_min = mins[j, t]
    if max_scale > F(0.0):
        iscale = F(15.0) / max_scale
        for j in range(16):
            o[p + j] = np.uint8(near(iscale * scales[j, t]) & I32(0xFF))
        _put_f16(o, p + 80, max_scale / F(15.0))
    else:
        for j in range(16):
            o[p + j] = 0
        _put_f16(o, p + 80, F(0.0))
    if max_min > F(0.0):
        iscale = F(15.0) / max_min
        for j in range(16):
            o[p + j] = np.uint8((np.int32(o[p + j]) | (near(iscale * mins[j, t]) << 4)) & 0xFF)
        _put_f16(o, p + 82, max_min / F(15.0))
    else:
        _put_f16(o, p + 82, F(0.0))


@jit(**_JIT)
def _q2_k_tile(X: Any, Q: Any, use_qw: bool, W: Any, sw: Any, L: Any, scales: Any, mins: Any, Ls: Any,
               Lm: Any, dm: Any, mm: Any) -> None:
    """The searches of a Q2_K tile: make_qkx2_quants on |x| with MAD (ref), or make_qkx3_quants on the
    imatrix weights plus make_qp_quants of the scales and of the mins (impl)."""
    nj, ni, T = X.shape
    if not use_qw:
        for j in range(nj):
            for i in range(ni):
                for t in range(T):
                    W[j, i, t] = abs(X[j, i, t])
            qkx_lanes(X[j], W[j], 3, F(-0.5), F(0.1), 15, True, False, L[j], scales[j], mins[j])
        return
    _superblock_imatrix_weights(X, Q, F(1.0), W, sw)
    for j in range(nj):
        qkx_lanes(X[j], W[j], 3, F(-0.9), F(0.05), 36, False, True, L[j], scales[j], mins[j])
    qp_lanes(scales, sw, 15, Ls, dm)
    qp_lanes(mins, sw, 15, Lm, mm)


@jit(**_JIT)
def q2_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    total = n_rows * (n // 256)
    X, W, Q = np.zeros((16, 16, TILE), F), np.zeros((16, 16, TILE), F), np.zeros((16, 16, TILE), F)
    L = np.zeros((16, 16, TILE), I32)
    scales, mins, sw = np.zeros((16, TILE), F), np.zeros((16, TILE), F), np.zeros((16, TILE), F)
    D, DM = np.zeros((16, TILE), F), np.zeros((16, TILE), F)
    Ls, Lm = np.zeros((16, TILE), I32), np.zeros((16, TILE), I32)
    dm, mm = np.zeros(TILE, F), np.zeros(TILE, F)
    for s0 in range(0, total, TILE):
        n_units = min(TILE, total - s0)
        _gather(x, 256, s0, X)
        if use_qw:
            _gather_qw(qw, n_rows, 256, s0, Q)
        _q2_k_tile(X, Q, use_qw, W, sw, L, scales, mins, Ls, Lm, dm, mm)
        for t in range(n_units):
            o, p = _unit_out(out, 84, s0 + t)
            if use_qw:
                _put_f16(o, p + 80, dm[t])
                _put_f16(o, p + 82, mm[t])
                for j in range(16):
                    o[p + j] = np.uint8((Ls[j, t] | (Lm[j, t] << 4)) & 0xFF)
            else:
                _q2_k_header_ref(scales, mins, o, p, t)
            dall = _f16_at(o, p + 80)
            dmin = _f16_at(o, p + 82)
            for j in range(16):
                D[j, t] = dall * F(np.int32(o[p + j]) & 0xF)
                DM[j, t] = dmin * F(np.int32(o[p + j]) >> 4)
        _codes(X, D, DM, I32(0), I32(3), I32(0), L)
        for t in range(n_units):
            o, p = _unit_out(out, 84, s0 + t)
            _pack_2bit(L, o, p + 16, t)


# ---------------------------------------------------------------------------------------------------------
# Q4_0, Q5_0, Q4_1, Q5_1 with an importance matrix (without one they do not search, see above)


@jit(**_JIT)
def _row_sigma2(x: Any) -> Any:
    """Per row: sum of x*x over the whole row, from 0, divided by n_per_row."""
    n_rows, n = x.shape
    out = np.empty(n_rows, F)
    for r in range(n_rows):
        s = F(0.0)
        for j in range(n):
            s += x[r, j] * x[r, j]
        out[r] = s / F(n)
    return out


@jit(**_JIT)
def _legacy_weights(x: Any, qw: Any, s0: int, X: Any, Q: Any, sig: Any, W: Any, sw: Any) -> None:
    """A tile of 32-element blocks and their weights qw * sqrtf(sigma2 of the row + x*x)."""
    T = X.shape[2]
    per_row = x.shape[1] // 32
    total = x.shape[0] * per_row
    s2 = np.empty(T, F)
    for t in range(T):
        s2[t] = sig[min(s0 + t, total - 1) // per_row]
    _gather(x, 32, s0, X)
    _gather_qw(qw, x.shape[0], 32, s0, Q)
    _imatrix_weights(X, Q, s2, W, sw)


@jit(**_JIT)
def _put_qh(o: Any, p: int, L: Any, t: int) -> None:
    """The fifth bits of 32 codes as a little-endian u32 at o[p:p+4]."""
    qh = np.uint32(0)
    for j in range(32):
        qh |= np.uint32((L[0, j, t] & 0x10) >> 4) << np.uint32(j)
    for k in range(4):
        o[p + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@jit(**_JIT)
def _legacy_rows(x: Any, out: Any, qw: Any, nmax: int, with_min: bool, bytes_per: int) -> None:
    """Q4_0 (nmax 8) / Q5_0 (16): make_qx_quants; Q4_1 (15) / Q5_1 (31): make_qkx3_quants."""
    n_rows, n = x.shape
    total = n_rows * (n // 32)
    X, Q, W, WX = (np.zeros((1, 32, TILE), F), np.zeros((1, 32, TILE), F), np.zeros((1, 32, TILE), F),
                   np.zeros((1, 32, TILE), F))
    L = np.zeros((1, 32, TILE), I32)
    d, the_min, sw = np.zeros(TILE, F), np.zeros(TILE, F), np.zeros((1, TILE), F)
    sig = _row_sigma2(x)
    five = nmax in (16, 31)
    qs = bytes_per - 16
    for s0 in range(0, total, TILE):
        _legacy_weights(x, qw, s0, X, Q, sig, W, sw)
        if with_min:
            qkx_lanes(X[0], W[0], nmax, F(-0.9), F(0.05), 36, False, True, L[0], d, the_min)
        else:
            _products(W, X, WX)
            qx_lanes(X[0], W[0], WX[0], nmax, L[0], d)
        for t in range(min(TILE, total - s0)):
            o, p = _unit_out(out, bytes_per, s0 + t)
            _put_f16(o, p, d[t])
            if with_min:
                _put_f16(o, p + 2, -the_min[t])
            if five:
                _put_qh(o, p + qs - 4, L, t)
            for j in range(16):
                o[p + qs + j] = np.uint8(((L[0, j, t] & 0xF) | ((L[0, j + 16, t] & 0xF) << 4)) & 0xFF)


@jit(**_JIT)
def q4_0_im_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    _legacy_rows(x, out, qw, 8, False, 18)


@jit(**_JIT)
def q5_0_im_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    _legacy_rows(x, out, qw, 16, False, 22)


@jit(**_JIT)
def q4_1_im_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    _legacy_rows(x, out, qw, 15, True, 20)


@jit(**_JIT)
def q5_1_im_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    _legacy_rows(x, out, qw, 31, True, 24)


def _legacy(search: Callable[..., None], scalar: Callable[..., None]) -> Callable[..., None]:
    """The legacy types search only with an importance matrix; without one the scalar kernel is it."""
    def kernel(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
        (search if use_qw else scalar)(x, out, qw, use_qw)
    return kernel


KERNELS: dict[str, Callable[..., None]] = {
    "Q8_0": q8_0_rows, "Q2_K": q2_k_rows, "Q3_K": q3_k_rows, "Q4_K": q4_k_rows, "Q5_K": q5_k_rows, "Q6_K": q6_k_rows,
                "Q4_0": _legacy(q4_0_im_rows, q4_0_rows), "Q5_0": _legacy(q5_0_im_rows, q5_0_rows),
                "Q4_1": _legacy(q4_1_im_rows, q4_1_rows), "Q5_1": _legacy(q5_1_im_rows, q5_1_rows)}
