"""Prototype: the k-quant scale search compiled *across* sub-blocks (lanes), for speed.

Why: the search (make_qkx2_quants: 21-22 candidate scales per 32-element sub-block, each a chain of
dependent float32 sums) costs ~300 float operations per element; scalar code (llama.cpp's C, or
`requant_numba`) runs it at 3-10 M elements/s per core. The sums are sequential *within* a sub-block but
independent *across* sub-blocks, so laying the data out (element of the sub-block, sub-block) — as the
numpy engine does — and looping over sub-blocks innermost gives LLVM loops it may vectorise without
reassociating anything: each SIMD lane carries one sub-block's sums in the C code's order. The IEEE ops
involved (add, mul, div, sqrt, compare/select, float->int bit casts) are exact in SIMD form, and with
fastmath off no FMA is formed, so the bytes stay those of `requant`.

Only Q4_K without an importance matrix is prototyped (the type and path measured in the report); the
same transformation applies to every search in `requant`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar, cast

import numpy as np

from . import port

F = np.float32
I32 = np.int32
_numba: Any = importlib.import_module("numba")  # optional: this module is imported only when it is installed
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def jit(**options: Any) -> Callable[[_Fn], _Fn]:
    """numba.njit with the options given (typed for mypy, which does not see the optional numba)."""
    return cast(Callable[[_Fn], _Fn], _numba.njit(**options))


_JIT: dict[str, Any] = dict(nogil=True, cache=True, fastmath=False, error_model="numpy", boundscheck=False)


@jit(**_JIT)
def make_qkx2_lanes(x: Any, w: Any, nmax: int, rmin: Any, rdelta: Any, nstep: int, L: Any, scale: Any,
                    the_min: Any) -> None:
    """make_qkx2_quants (use_mad false) for every lane b of x (n, B); L (n, B) int32 out."""
    n, B = x.shape
    mn = np.empty(B, F)
    mx = np.empty(B, F)
    sum_w = np.empty(B, F)
    sum_x = np.empty(B, F)
    iscale = np.empty(B, F)
    best = np.empty(B, F)
    sl = np.empty(B, F)
    sl2 = np.empty(B, F)
    sxl = np.empty(B, F)
    cur = np.empty(B, F)
    ts = np.empty(B, F)
    tm = np.empty(B, F)
    rng = np.empty(B, F)
    degen = np.empty(B, np.bool_)
    upd = np.empty(B, np.bool_)
    Laux = np.empty((n, B), I32)
    fnmax = F(nmax)
    n32 = I32(nmax)
    z32 = I32(0)
    mask = I32(0x007FFFFF)
    bias = I32(0x00400000)
    for b in range(B):
        mn[b] = x[0, b]
        mx[b] = x[0, b]
        sum_w[b] = w[0, b]
        sum_x[b] = w[0, b] * x[0, b]
    for i in range(1, n):
        for b in range(B):
            xi = x[i, b]
            mn[b] = xi if xi < mn[b] else mn[b]
            mx[b] = xi if xi > mx[b] else mx[b]
            sum_w[b] += w[i, b]
            sum_x[b] += w[i, b] * xi
    for b in range(B):
        if mn[b] > F(0.0):
            mn[b] = F(0.0)
        degen[b] = mx[b] == mn[b]
        the_min[b] = mn[b]  # kept for degenerate lanes
        rng[b] = F(1.0) if degen[b] else mx[b] - mn[b]
        iscale[b] = fnmax / rng[b]
        scale[b] = F(1.0) / iscale[b]
        best[b] = F(0.0)
    for i in range(n):
        for b in range(B):
            v = F(F(iscale[b] * (x[i, b] - mn[b])) + F(12582912.0))
            l = I32(I32(v.view(I32) & mask) - bias)
            l = max(z32, min(n32, l))
            L[i, b] = l
            diff = (scale[b] * F(l) + mn[b]) - x[i, b]
            best[b] += w[i, b] * (diff * diff)
    for is_ in range(nstep + 1):
        for b in range(B):
            rng[b] = F(1.0) if degen[b] else mx[b] - mn[b]
            iscale[b] = ((rmin + rdelta * F(is_)) + fnmax) / rng[b]
            sl[b] = F(0.0)
            sl2[b] = F(0.0)
            sxl[b] = F(0.0)
            cur[b] = F(0.0)
        for i in range(n):
            xi = x[i]
            wi = w[i]
            la = Laux[i]
            for b in range(B):
                v = F(F(iscale[b] * (xi[b] - mn[b])) + F(12582912.0))
                l = I32(I32(v.view(I32) & mask) - bias)
                l = max(z32, min(n32, l))
                la[b] = l
                fl = F(l)
                wl = wi[b] * fl
                sl[b] += wl
                sl2[b] += wl * fl
                sxl[b] += wl * xi[b]
        for b in range(B):
            D = sum_w[b] * sl2[b] - sl[b] * sl[b]
            Ds = D if D > F(0.0) else F(1.0)
            t_s = (sum_w[b] * sxl[b] - sum_x[b] * sl[b]) / Ds
            t_m = (sl2[b] * sum_x[b] - sl[b] * sxl[b]) / Ds
            pos = t_m > F(0.0)
            sl2s = sl2[b] if pos else F(1.0)
            ts[b] = (sxl[b] / sl2s) if pos else t_s
            tm[b] = F(0.0) if pos else t_m
            upd[b] = D > F(0.0)
        for i in range(n):
            xi = x[i]
            wi = w[i]
            la = Laux[i]
            for b in range(B):
                diff = (ts[b] * F(la[b]) + tm[b]) - xi[b]
                cur[b] += wi[b] * (diff * diff)
        for b in range(B):
            upd[b] = upd[b] and cur[b] < best[b] and not degen[b]
            if upd[b]:
                best[b] = cur[b]
                scale[b] = ts[b]
                mn[b] = tm[b]
        for i in range(n):
            li = L[i]
            la = Laux[i]
            for b in range(B):
                li[b] = la[b] if upd[b] else li[b]
    for b in range(B):
        if degen[b]:
            scale[b] = F(0.0)
            mn[b] = the_min[b]
            for i in range(n):
                L[i, b] = 0
        the_min[b] = -mn[b]


_TILE = 256  # sub-blocks per call: (32, 256) float32 arrays stay in L1/L2


def q4_k_ref(x: np.ndarray) -> np.ndarray:
    """Q4_K without imatrix through the lane-parallel search; header packing and codes in numpy."""
    x = np.ascontiguousarray(x, dtype=F)
    n_rows, n = x.shape
    xt = port._blocks_t(x, 32)
    B = xt.shape[1]
    sum_x2 = port._seqsum0(xt * xt)
    w = np.sqrt(sum_x2 / F(32.0)) + np.abs(xt)
    L = np.empty((32, B), I32)
    scales = np.empty(B, F)
    mins = np.empty(B, F)
    for b0 in range(0, B, _TILE):
        b1 = min(B, b0 + _TILE)
        Lt = np.empty((32, b1 - b0), I32)
        sc = np.empty(b1 - b0, F)
        mnt = np.empty(b1 - b0, F)
        make_qkx2_lanes(np.ascontiguousarray(xt[:, b0:b1]), np.ascontiguousarray(w[:, b0:b1]), 15, F(-1.0),
                        F(0.1), 20, Lt, sc, mnt)
        L[:, b0:b1] = Lt
        scales[b0:b1] = sc
        mins[b0:b1] = mnt
    S = B // 8
    sc8, mn8 = scales.reshape(S, 8).T, mins.reshape(S, 8).T
    max_scale = port._seq_max_gt(sc8)
    max_min = port._seq_max_gt(mn8)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > F(0.0), F(63.0) / np.where(max_scale > F(0.0), max_scale, F(1.0)), F(0.0))
        inv_min = np.where(max_min > F(0.0), F(63.0) / np.where(max_min > F(0.0), max_min, F(1.0)), F(0.0))
        ls = np.minimum(63, port.nearest_int(inv_scale * sc8) & 0xFF).T
        lm = np.minimum(63, port.nearest_int(inv_min * mn8) & 0xFF).T
        head = np.empty((S, 16), dtype=np.uint8)
        port._put_f16(head, 0, max_scale / F(63.0))
        port._put_f16(head, 2, max_min / F(63.0))
        head[:, 4:] = port._k4_scale_bytes(ls, lm)
        out = np.empty((S, 144), dtype=np.uint8)
        out[:, :16] = head
        port._q4_k_pack(out, port._q45_k_codes(xt, head, L, 15))
    return out.reshape(n_rows, -1)
