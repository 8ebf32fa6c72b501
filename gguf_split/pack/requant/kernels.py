"""Compiled (numba) twin of `requant`: llama.cpp's quantizers as scalar loops, a line-by-line transcription
of ggml-quants.c (ggml 0.25.3), for the pack reader's speed.

Why a second implementation: the k-quant scale searches run 16-37 candidate scales over every 16- or
32-element sub-block, each a chain of dependent float32 sums. numpy can only vectorise across blocks and
pays one call per element position per sum (see `requant`); compiled scalar loops run them at C speed.
Both implementations must give the same bytes: the tests compare each with llama.cpp and with each other.

Why the bytes are the same on every machine (the contract of the pack's "requant" coding):
- every value is float32 and every operation one IEEE-754 binary32 operation rounded to nearest even,
  written in the C code's order: literals are `F(...)` and integers are converted with `F(...)` before
  they meet a float, so nothing is widened to float64 (numba would widen float32 op int64 to float64);
- numba compiles with fastmath off: LLVM gets no `contract`/`reassoc` flags, so it cannot fuse a
  multiply and an add into an FMA or reorder a sum, and the loops carry their sums sequentially (a sum
  is never vectorised without reassociation). `tests/test_requant.py` checks the generated machine
  code for FMA instructions and the LLVM IR for double arithmetic;
- float -> int conversions are either llama.cpp's `nearest_int` bit trick (an add and a bit view, no
  conversion instruction) or C truncations of values that are in range for finite inputs;
- float32 -> float16 is llama.cpp's own `ggml_compute_fp32_to_fp16` (float and integer operations).
Inputs must be finite (the pack writer checks): NaN payloads differ between CPUs.

Kernels take float32 rows `x` (n_rows, n_per_row), an importance vector `qw` (n_per_row float32, ignored
when `use_qw` is False) and write into `out` (n_rows, row_bytes) uint8. They release the GIL (`nogil`),
so a thread pool over row ranges scales across cores; rows are independent, so the split does not change
any byte.
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


_JIT: dict[str, Any] = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")


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


# -------------------------------------------------------------------------------------------------------
# Shared search helpers (ggml-quants.c: make_qx_quants, make_q3_quants, make_qkx2_quants,
# make_qkx3_quants, make_qp_quants). L arrays are int32 holding the C array's value (int8/uint8 wraps
# emulated where a value can leave the type's range).


@jit(**_JIT)
def make_qx_quants(n: int, nmax: int, x: Any, L: Any, use_qw: bool, qw: Any) -> Any:
    """rmse_type == 1 (the only one the ported types use)."""
    mx = F(0.0)
    amax = F(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < F(1e-15):
        for i in range(n):
            L[i] = 0
        return F(0.0)
    fn = F(nmax)
    iscale = F(-fn) / mx
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = qw[i] if use_qw else x[i] * x[i]
        fl = F(l)
        sumlx += (w * x[i]) * fl
        suml2 += (w * fl) * fl
    scale = sumlx / suml2 if suml2 != F(0.0) else F(0.0)
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = F(-(fn + F(0.1) * F(is_))) / mx
        sumlx = F(0.0)
        suml2 = F(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = qw[i] if use_qw else x[i] * x[i]
            fl = F(l)
            sumlx += (w * x[i]) * fl
            suml2 += (w * fl) * fl
        if suml2 > F(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@jit(**_JIT)
def make_q3_quants(n: int, nmax: int, x: Any, L: Any) -> Any:
    """do_rmse == true (Q3_K's reference path)."""
    mx = F(0.0)
    amax = F(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < F(1e-15):
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(-F(nmax)) / mx
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l
        w = x[i] * x[i]
        fl = F(l)
        sumlx += (w * x[i]) * fl
        suml2 += (w * fl) * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fli = F(L[i])
            slx = sumlx - (w * x[i]) * fli
            if slx > F(0.0):
                sl2 = suml2 - (w * fli) * fli
                new_l = nearest_int((x[i] * sl2) / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fnl = F(new_l)
                    slx += (w * x[i]) * fnl
                    sl2 += (w * fnl) * fnl
                    if sl2 > F(0.0) and (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > F(0.0) else F(0.0)


@jit(**_JIT)
def make_qkx(n: int, nmax: int, x: Any, weights: Any, use_w: bool, L: Any, Laux: Any, the_min: Any,
             rmin: Any, rdelta: Any, nstep: int, use_mad: bool, v3: bool) -> Any:
    """make_qkx2_quants (v3 False: weights given) and make_qkx3_quants (v3 True: weights or x*x).
    The two differ only in `max == min` vs `max <= min` and in the NULL-weights default."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0] if use_w else x[0] * x[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i] if use_w else x[i] * x[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > F(0.0):
        mn = F(0.0)
    if (mx <= mn) if v3 else (mx == mn):
        for i in range(n):
            L[i] = 0
        the_min[0] = -mn
        return F(0.0)
    fnmax = F(nmax)
    iscale = fnmax / (mx - mn)
    scale = F(1.0) / iscale
    best_error = F(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = (scale * F(L[i]) + mn) - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i] if use_w else x[i] * x[i]
        best_error += w * diff
    if nstep < 1:
        the_min[0] = -mn
        return scale
    for is_ in range(nstep + 1):
        iscale = ((rmin + rdelta * F(is_)) + fnmax) / (mx - mn)
        sum_l = F(0.0)
        sum_l2 = F(0.0)
        sum_xl = F(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i] if use_w else x[i] * x[i]
            fl = F(l)
            sum_l += w * fl
            sum_l2 += (w * fl) * fl
            sum_xl += (w * fl) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F(0.0):
                this_min = F(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0.0)
            for i in range(n):
                diff = (this_scale * F(Laux[i]) + this_min) - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i] if use_w else x[i] * x[i]
                cur_error += w * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    the_min[0] = -mn
    return scale


@jit(**_JIT)
def make_qp_quants(n: int, nmax: int, x: Any, L: Any, qw: Any) -> Any:
    mx = F(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < F(1e-15):
        for i in range(n):
            L[i] = 0
        return F(0.0)
    fnmax = F(nmax)
    iscale = fnmax / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F(1.0) / iscale
    best_mse = F(0.0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        w = qw[i]
        best_mse += (w * diff) * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F(0.1) * F(is_) + fnmax) / mx
        scale_is = F(1.0) / iscale_is
        mse = F(0.0)
        for i in range(n):
            l = nearest_int(iscale_is * x[i])
            l = min(nmax, l)
            diff = x[i] - scale_is * F(l)
            w = qw[i]
            mse += (w * diff) * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = min(nmax, l)
        L[i] = l & 0xFF
        w = qw[i]
        fl = F(L[i])
        sumlx += (w * x[i]) * fl
        suml2 += (w * fl) * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fli = F(L[i])
            slx = sumlx - (w * x[i]) * fli
            sl2 = suml2 - (w * fli) * fli
            if slx > F(0.0) and sl2 > F(0.0):
                new_l = nearest_int((x[i] * sl2) / slx)
                new_l = min(nmax, new_l)
                if new_l != L[i]:
                    fnl = F(new_l)
                    slx += (w * x[i]) * fnl
                    sl2 += (w * fnl) * fnl
                    if (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F(0.0) else F(0.0)


@jit(inline="always", **_JIT)
def row_sigma2(x: Any, n: int) -> Any:
    """sum_x2 over a whole row, sequentially from 0, divided by n (the legacy types' imatrix path)."""
    s = F(0.0)
    for j in range(n):
        s += x[j] * x[j]
    return s / F(n)


# -------------------------------------------------------------------------------------------------------
# Legacy 32-element types


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
    weight = np.empty(32, dtype=F)
    L = np.empty(32, dtype=np.int32)
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        sigma2 = row_sigma2(xr, n) if use_qw else F(0.0)
        for ib in range(n // 32):
            p = 18 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            if use_qw:
                for j in range(32):
                    weight[j] = qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = make_qx_quants(32, 8, xb, L, True, weight)
                put_f16(o, p, d)
                for j in range(16):
                    o[p + 2 + j] = np.uint8((L[j] | (L[j + 16] << 4)) & 0xFF)
                continue
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
    weight = np.empty(32, dtype=F)
    L = np.empty(32, dtype=np.int32)
    Laux = np.empty(32, dtype=np.int32)
    the_min = np.empty(1, dtype=F)
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        sigma2 = row_sigma2(xr, n) if use_qw else F(0.0)
        for ib in range(n // 32):
            p = 20 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            if use_qw:
                for j in range(32):
                    weight[j] = qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = make_qkx(32, 15, xb, weight, True, L, Laux, the_min, F(-0.9), F(0.05), 36, False, True)
                put_f16(o, p, d)
                put_f16(o, p + 2, -the_min[0])
                for j in range(16):
                    o[p + 4 + j] = np.uint8((L[j] | (L[j + 16] << 4)) & 0xFF)
                continue
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
    weight = np.empty(32, dtype=F)
    L = np.empty(32, dtype=np.int32)
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        sigma2 = row_sigma2(xr, n) if use_qw else F(0.0)
        for ib in range(n // 32):
            p = 22 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            if use_qw:
                for j in range(32):
                    weight[j] = qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = make_qx_quants(32, 16, xb, L, True, weight)
                put_f16(o, p, d)
            else:
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
    weight = np.empty(32, dtype=F)
    L = np.empty(32, dtype=np.int32)
    Laux = np.empty(32, dtype=np.int32)
    the_min = np.empty(1, dtype=F)
    for r in range(n_rows):
        xr = x[r]
        o = out[r]
        sigma2 = row_sigma2(xr, n) if use_qw else F(0.0)
        for ib in range(n // 32):
            p = 24 * ib
            xb = xr[32 * ib: 32 * ib + 32]
            if use_qw:
                for j in range(32):
                    weight[j] = qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
                d = make_qkx(32, 31, xb, weight, True, L, Laux, the_min, F(-0.9), F(0.05), 36, False, True)
                put_f16(o, p, d)
                put_f16(o, p + 2, -the_min[0])
            else:
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


# -------------------------------------------------------------------------------------------------------
# k-quants (super-blocks of 256)


@jit(inline="always", **_JIT)
def pack_2bit(o: Any, p: int, L: Any) -> None:
    """qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6, j in {0, 128}."""
    for j in range(0, 256, 128):
        for l in range(32):
            o[p + j // 4 + l] = np.uint8((L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4)
                                          | (L[j + l + 96] << 6)) & 0xFF)


@jit(inline="always", **_JIT)
def pack_k4_scales(o: Any, p: int, Ls: Any, Lm: Any) -> None:
    """The 12 scale bytes of Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins (ls, lm are uint8 values)."""
    for j in range(12):
        o[p + j] = 0
    for j in range(8):
        ls = Ls[j] & 0xFF
        lm = Lm[j] & 0xFF
        if j < 4:
            o[p + j] = np.uint8(ls)
            o[p + j + 4] = np.uint8(lm)
        else:
            o[p + j + 4] = np.uint8(((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF)
            o[p + j - 4] = np.uint8((np.int32(o[p + j - 4]) | ((ls >> 4) << 6)) & 0xFF)
            o[p + j] = np.uint8((np.int32(o[p + j]) | ((lm >> 4) << 6)) & 0xFF)


@jit(inline="always", **_JIT)
def scale_min_k4(j: int, o: Any, p: int) -> Any:
    if j < 4:
        return np.int32(o[p + j]) & 63, np.int32(o[p + j + 4]) & 63
    d = (np.int32(o[p + j + 4]) & 0xF) | ((np.int32(o[p + j - 4]) >> 6) << 4)
    m = (np.int32(o[p + j + 4]) >> 4) | ((np.int32(o[p + j]) >> 6) << 4)
    return d, m


@jit(**_JIT)
def _qk_requantize(o: Any, p: int, xs: Any, L: Any, d16: Any, dmin16: Any, sub: int, nmax: int) -> None:
    """Codes from the stored super-block scales: l = nearest_int((x + dm)/d), 8 sub-blocks of `sub`."""
    dall = fp16_to_fp32(d16)
    dmin = fp16_to_fp32(dmin16)
    for j in range(256 // sub):
        sc, m = scale_min_k4(j, o, p + 4)
        d = dall * F(sc)
        if d == F(0.0):
            continue
        dm = dmin * F(m)
        for ii in range(sub):
            l = nearest_int((xs[sub * j + ii] + dm) / d)
            L[sub * j + ii] = max(0, min(nmax, l))


@jit(**_JIT)
def _q45k_scales(xs: Any, qw: Any, use_qw: bool, nmax: int, L: Any, Laux: Any, weights: Any, sw: Any,
                 scales: Any, mins: Any, Ls: Any, Lm: Any, the_min: Any, o: Any, p: int, is_q5: bool) -> None:
    """Scales, mins and their packing for one Q4_K/Q5_K super-block (ref without imatrix, impl with)."""
    if not use_qw:
        max_scale = F(0.0)
        max_min = F(0.0)
        for j in range(8):
            sum_x2 = F(0.0)
            for l in range(32):
                sum_x2 += xs[32 * j + l] * xs[32 * j + l]
            av_x = np.sqrt(sum_x2 / F(32.0))
            for l in range(32):
                weights[l] = av_x + abs(xs[32 * j + l])
            if is_q5:
                scales[j] = make_qkx(32, nmax, xs[32 * j: 32 * j + 32], weights, True, L[32 * j: 32 * j + 32],
                                     Laux, the_min, F(-0.5), F(0.1), 15, False, False)
            else:
                scales[j] = make_qkx(32, nmax, xs[32 * j: 32 * j + 32], weights, True, L[32 * j: 32 * j + 32],
                                     Laux, the_min, F(-1.0), F(0.1), 20, False, False)
            mins[j] = the_min[0]
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F(63.0) / max_scale if max_scale > F(0.0) else F(0.0)
        inv_min = F(63.0) / max_min if max_min > F(0.0) else F(0.0)
        for j in range(8):
            ls = nearest_int(inv_scale * scales[j]) & 0xFF
            lm = nearest_int(inv_min * mins[j]) & 0xFF
            Ls[j] = min(63, ls)
            Lm[j] = min(63, lm)
        pack_k4_scales(o, p + 4, Ls, Lm)
        put_f16(o, p, max_scale / F(63.0))
        put_f16(o, p + 2, max_min / F(63.0))
        return
    sum_x2 = F(0.0)
    for l in range(256):
        sum_x2 += xs[l] * xs[l]
    sigma2 = (F(2.0) * sum_x2) / F(256.0)
    for j in range(8):
        for l in range(32):
            weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + xs[32 * j + l] * xs[32 * j + l])
        sumw = F(0.0)
        for l in range(32):
            sumw += weights[l]
        sw[j] = sumw
        scales[j] = make_qkx(32, nmax, xs[32 * j: 32 * j + 32], weights, True, L[32 * j: 32 * j + 32], Laux,
                             the_min, F(-0.9), F(0.05), 36, False, True)
        mins[j] = the_min[0]
    d_block = make_qp_quants(8, 63, scales, Ls, sw)
    m_block = make_qp_quants(8, 63, mins, Lm, sw)
    if is_q5:
        for j in range(8):
            Ls[j] = min(63, Ls[j])
            Lm[j] = min(63, Lm[j])
    pack_k4_scales(o, p + 4, Ls, Lm)
    put_f16(o, p, d_block)
    put_f16(o, p + 2, m_block)


@jit(**_JIT)
def q4_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    L = np.zeros(256, dtype=np.int32)
    Laux = np.zeros(32, dtype=np.int32)
    weights = np.zeros(32, dtype=F)
    sw = np.zeros(8, dtype=F)
    scales = np.zeros(8, dtype=F)
    mins = np.zeros(8, dtype=F)
    Ls = np.zeros(8, dtype=np.int32)
    Lm = np.zeros(8, dtype=np.int32)
    the_min = np.zeros(1, dtype=F)
    for r in range(n_rows):
        o = out[r]
        for i in range(n // 256):
            xs = x[r, 256 * i: 256 * i + 256]
            p = 144 * i
            _q45k_scales(xs, qw[256 * i: 256 * i + 256], use_qw, 15, L, Laux, weights, sw, scales, mins, Ls, Lm,
                         the_min, o, p, False)
            d16 = np.uint16(o[p]) | (np.uint16(o[p + 1]) << np.uint16(8))
            dmin16 = np.uint16(o[p + 2]) | (np.uint16(o[p + 3]) << np.uint16(8))
            _qk_requantize(o, p, xs, L, d16, dmin16, 32, 15)
            for j in range(0, 256, 64):
                for l in range(32):
                    o[p + 16 + j // 2 + l] = np.uint8((L[j + l] | (L[j + l + 32] << 4)) & 0xFF)


@jit(**_JIT)
def q5_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    L = np.zeros(256, dtype=np.int32)
    Laux = np.zeros(32, dtype=np.int32)
    weights = np.zeros(32, dtype=F)
    sw = np.zeros(8, dtype=F)
    scales = np.zeros(8, dtype=F)
    mins = np.zeros(8, dtype=F)
    Ls = np.zeros(8, dtype=np.int32)
    Lm = np.zeros(8, dtype=np.int32)
    the_min = np.zeros(1, dtype=F)
    for r in range(n_rows):
        o = out[r]
        for i in range(n // 256):
            xs = x[r, 256 * i: 256 * i + 256]
            p = 176 * i
            _q45k_scales(xs, qw[256 * i: 256 * i + 256], use_qw, 31, L, Laux, weights, sw, scales, mins, Ls, Lm,
                         the_min, o, p, True)
            d16 = np.uint16(o[p]) | (np.uint16(o[p + 1]) << np.uint16(8))
            dmin16 = np.uint16(o[p + 2]) | (np.uint16(o[p + 3]) << np.uint16(8))
            _qk_requantize(o, p, xs, L, d16, dmin16, 32, 31)
            qh = p + 16
            ql = p + 48
            for j in range(32):
                o[qh + j] = 0
            m1 = 1
            m2 = 2
            for nn in range(0, 256, 64):
                for j in range(32):
                    l1 = L[nn + j]
                    if l1 > 15:
                        l1 -= 16
                        o[qh + j] = np.uint8(np.int32(o[qh + j]) | m1)
                    l2 = L[nn + j + 32]
                    if l2 > 15:
                        l2 -= 16
                        o[qh + j] = np.uint8(np.int32(o[qh + j]) | m2)
                    o[ql + j] = np.uint8((l1 | (l2 << 4)) & 0xFF)
                m1 <<= 2
                m2 <<= 2
                ql += 32


@jit(**_JIT)
def q6_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    L = np.zeros(256, dtype=np.int32)
    scales = np.zeros(16, dtype=F)
    for r in range(n_rows):
        o = out[r]
        for i in range(n // 256):
            xs = x[r, 256 * i: 256 * i + 256]
            p = 210 * i
            max_scale = F(0.0)
            max_abs_scale = F(0.0)
            for ib in range(16):
                scale = make_qx_quants(16, 32, xs[16 * ib: 16 * ib + 16], L[16 * ib: 16 * ib + 16], use_qw,
                                       qw[256 * i + 16 * ib: 256 * i + 16 * ib + 16])
                scales[ib] = scale
                abs_scale = abs(scale)
                if abs_scale > max_abs_scale:
                    max_abs_scale = abs_scale
                    max_scale = scale
            if max_abs_scale < F(1e-15):
                for k in range(210):
                    o[p + k] = 0
                continue
            iscale = F(-128.0) / max_scale
            d16 = put_f16(o, p + 208, F(1.0) / iscale)
            dall = fp16_to_fp32(d16)
            for ib in range(16):
                sc = min(127, nearest_int(iscale * scales[ib]))
                o[p + 192 + ib] = np.uint8(sc & 0xFF)
            for j in range(16):
                sc8 = np.int32(np.int8(o[p + 192 + j]))
                d = dall * F(sc8)
                if d == F(0.0):
                    continue
                for ii in range(16):
                    l = nearest_int(xs[16 * j + ii] / d)
                    l = max(-32, min(31, l))
                    L[16 * j + ii] = l + 32
            ql = p
            qh = p + 128
            for j in range(0, 256, 128):
                for l in range(32):
                    q1 = L[j + l] & 0xF
                    q2 = L[j + l + 32] & 0xF
                    q3 = L[j + l + 64] & 0xF
                    q4 = L[j + l + 96] & 0xF
                    o[ql + l] = np.uint8((q1 | (q3 << 4)) & 0xFF)
                    o[ql + l + 32] = np.uint8((q2 | (q4 << 4)) & 0xFF)
                    o[qh + l] = np.uint8(((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                                          | ((L[j + l + 96] >> 4) << 6)) & 0xFF)
                ql += 64
                qh += 32


@jit(**_JIT)
def q3_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    L = np.zeros(256, dtype=np.int32)
    scales = np.zeros(16, dtype=F)
    weight = np.zeros(16, dtype=F)
    sw = np.zeros(16, dtype=F)
    Ls = np.zeros(16, dtype=np.int32)
    for r in range(n_rows):
        o = out[r]
        for i in range(n // 256):
            xs = x[r, 256 * i: 256 * i + 256]
            p = 110 * i
            sp = p + 96  # scales[12]
            for k in range(12):
                o[sp + k] = 0
            if not use_qw:
                max_scale = F(0.0)
                amax = F(0.0)
                for j in range(16):
                    scales[j] = make_q3_quants(16, 4, xs[16 * j: 16 * j + 16], L[16 * j: 16 * j + 16])
                    scale = abs(scales[j])
                    if scale > amax:
                        amax = scale
                        max_scale = scales[j]
                if max_scale != F(0.0):
                    iscale = F(-32.0) / max_scale
                    for j in range(16):
                        l8 = np.int32(np.int8(nearest_int(iscale * scales[j]) & 0xFF))
                        Ls[j] = max(-32, min(31, l8)) + 32
                    put_f16(o, p + 108, F(1.0) / iscale)
                else:
                    for j in range(16):
                        Ls[j] = 0
                    put_f16(o, p + 108, F(0.0))
                skip_pack = max_scale == F(0.0)
            else:
                sum_x2 = F(0.0)
                for j in range(256):
                    sum_x2 += xs[j] * xs[j]
                sigma2 = (F(2.0) * sum_x2) / F(256.0)
                for j in range(16):
                    for l in range(16):
                        weight[l] = qw[256 * i + 16 * j + l] * np.sqrt(sigma2 + xs[16 * j + l] * xs[16 * j + l])
                    sumw = F(0.0)
                    for l in range(16):
                        sumw += weight[l]
                    sw[j] = sumw
                    scales[j] = make_qx_quants(16, 4, xs[16 * j: 16 * j + 16], L[16 * j: 16 * j + 16], True, weight)
                d_block = make_qx_quants(16, 32, scales, Ls, True, sw)
                put_f16(o, p + 108, d_block)
                skip_pack = False
            if not skip_pack:
                for j in range(16):
                    l = Ls[j]
                    if j < 8:
                        o[sp + j] = np.uint8(l & 0xF)
                    else:
                        o[sp + j - 8] = np.uint8((np.int32(o[sp + j - 8]) | ((l & 0xF) << 4)) & 0xFF)
                    l >>= 4
                    o[sp + j % 4 + 8] = np.uint8((np.int32(o[sp + j % 4 + 8]) | (l << (2 * (j // 4)))) & 0xFF)
            d16 = np.uint16(o[p + 108]) | (np.uint16(o[p + 109]) << np.uint16(8))
            dall = fp16_to_fp32(d16)
            for j in range(16):
                if j < 8:
                    sc = np.int32(o[sp + j]) & 0xF
                else:
                    sc = np.int32(o[sp + j - 8]) >> 4
                sc = (sc | (((np.int32(o[sp + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
                d = dall * F(sc)
                if d == F(0.0):
                    continue
                for ii in range(16):
                    l = nearest_int(xs[16 * j + ii] / d)
                    l = max(-4, min(3, l))
                    L[16 * j + ii] = l + 4
            for k in range(32):
                o[p + k] = 0
            m = 0
            hm = 1
            for j in range(256):
                if L[j] > 3:
                    o[p + m] = np.uint8(np.int32(o[p + m]) | hm)
                    L[j] -= 4
                m += 1
                if m == 32:
                    m = 0
                    hm <<= 1
            pack_2bit(o, p + 32, L)


@jit(**_JIT)
def q2_k_rows(x: Any, out: Any, qw: Any, use_qw: bool) -> None:
    n_rows, n = x.shape
    L = np.zeros(256, dtype=np.int32)
    Laux = np.zeros(16, dtype=np.int32)
    weight = np.zeros(16, dtype=F)
    scales = np.zeros(16, dtype=F)
    mins = np.zeros(16, dtype=F)
    sw = np.zeros(16, dtype=F)
    Ls = np.zeros(16, dtype=np.int32)
    Lm = np.zeros(16, dtype=np.int32)
    the_min = np.zeros(1, dtype=F)
    for r in range(n_rows):
        o = out[r]
        for i in range(n // 256):
            xs = x[r, 256 * i: 256 * i + 256]
            p = 84 * i  # scales[16], qs[64], d, dmin
            if not use_qw:
                max_scale = F(0.0)
                max_min = F(0.0)
                for j in range(16):
                    for l in range(16):
                        weight[l] = abs(xs[16 * j + l])
                    scales[j] = make_qkx(16, 3, xs[16 * j: 16 * j + 16], weight, True, L[16 * j: 16 * j + 16], Laux,
                                         the_min, F(-0.5), F(0.1), 15, True, False)
                    mins[j] = the_min[0]
                    if scales[j] > max_scale:
                        max_scale = scales[j]
                    if mins[j] > max_min:
                        max_min = mins[j]
                if max_scale > F(0.0):
                    iscale = F(15.0) / max_scale
                    for j in range(16):
                        o[p + j] = np.uint8(nearest_int(iscale * scales[j]) & 0xFF)
                    put_f16(o, p + 80, max_scale / F(15.0))
                else:
                    for j in range(16):
                        o[p + j] = 0
                    put_f16(o, p + 80, F(0.0))
                if max_min > F(0.0):
                    iscale = F(15.0) / max_min
                    for j in range(16):
                        l = nearest_int(iscale * mins[j])
                        o[p + j] = np.uint8((np.int32(o[p + j]) | (l << 4)) & 0xFF)
                    put_f16(o, p + 82, max_min / F(15.0))
                else:
                    put_f16(o, p + 82, F(0.0))
            else:
                sumx2 = F(0.0)
                for j in range(256):
                    sumx2 += xs[j] * xs[j]
                sigma2 = sumx2 / F(256.0)
                for j in range(16):
                    for l in range(16):
                        weight[l] = qw[256 * i + 16 * j + l] * np.sqrt(sigma2 + xs[16 * j + l] * xs[16 * j + l])
                    s = F(0.0)
                    for l in range(16):
                        s += weight[l]
                    sw[j] = s
                    scales[j] = make_qkx(16, 3, xs[16 * j: 16 * j + 16], weight, True, L[16 * j: 16 * j + 16], Laux,
                                         the_min, F(-0.9), F(0.05), 36, False, True)
                    mins[j] = the_min[0]
                dm = make_qp_quants(16, 15, scales, Ls, sw)
                mm = make_qp_quants(16, 15, mins, Lm, sw)
                put_f16(o, p + 80, dm)
                put_f16(o, p + 82, mm)
                for j in range(16):
                    o[p + j] = np.uint8((Ls[j] | (Lm[j] << 4)) & 0xFF)
            dall = fp16_to_fp32(np.uint16(o[p + 80]) | (np.uint16(o[p + 81]) << np.uint16(8)))
            dmin = fp16_to_fp32(np.uint16(o[p + 82]) | (np.uint16(o[p + 83]) << np.uint16(8)))
            for j in range(16):
                d = dall * F(np.int32(o[p + j]) & 0xF)
                if d == F(0.0):
                    continue
                dm2 = dmin * F(np.int32(o[p + j]) >> 4)
                for ii in range(16):
                    l = nearest_int((xs[16 * j + ii] + dm2) / d)
                    L[16 * j + ii] = max(0, min(3, l))
            pack_2bit(o, p + 16, L)


KERNELS: dict[str, Callable[..., None]] = {
    "Q8_0": q8_0_rows, "Q4_0": q4_0_rows, "Q4_1": q4_1_rows, "Q5_0": q5_0_rows, "Q5_1": q5_1_rows,
    "Q2_K": q2_k_rows, "Q3_K": q3_k_rows, "Q4_K": q4_k_rows, "Q5_K": q5_k_rows, "Q6_K": q6_k_rows,
}
