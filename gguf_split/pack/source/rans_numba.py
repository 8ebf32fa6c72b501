"""The rANS coder of `rans` as compiled scalar loops (numba, optional): the same integer operations in the
same order, so the same bytes; ~20x the numpy lanes. Imported only when numba is installed."""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar, cast

import numpy as np

_numba: Any = importlib.import_module("numba")
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def jit(**options: Any) -> Callable[[_Fn], _Fn]:
    """numba.njit with the options given (typed for mypy, which does not see the optional numba)."""
    return cast(Callable[[_Fn], _Fn], _numba.njit(**options))


_JIT: dict[str, Any] = dict(nogil=True, cache=True, boundscheck=False)


@jit(**_JIT)
def _encode(sym: Any, f: Any, cum: Any, lanes: int, emitted: Any) -> Any:
    """Reverse pass; emitted (n,) uint16 scratch, filled from 0 in emission order. -> (states, count)."""
    n = sym.size
    x = np.full(lanes, 1 << 16, np.int64)
    k = 0
    steps = (n + lanes - 1) // lanes
    for step in range(steps - 1, -1, -1):
        lo = step * lanes
        m = min(lanes, n - lo)
        for lane in range(m - 1, -1, -1):
            s = sym[lo + lane]
            fs = f[s]
            xs = x[lane]
            if xs >= (fs << 17):
                emitted[k] = np.uint16(xs & 0xFFFF)
                k += 1
                xs >>= 16
            x[lane] = ((xs // fs) << 15) + xs % fs + cum[s]
    return x, k


def encode(sym: Any, f: Any, cum: Any, lanes: int) -> tuple[Any, Any]:
    emitted = np.empty(max(1, sym.size), np.uint16)
    x, k = _encode(sym, f, cum, lanes, emitted)
    return x.astype(np.uint32), np.ascontiguousarray(emitted[:k][::-1])


@jit(**_JIT)
def _decode(x: Any, w: Any, f: Any, cum: Any, slot2sym: Any, n: int, lanes: int, out: Any) -> int:
    """-> words used; -1 when the stream ends early."""
    pos = 0
    nw = w.size
    for lo in range(0, n, lanes):
        m = min(lanes, n - lo)
        for lane in range(m):
            xs = x[lane]
            s = slot2sym[xs & 0x7FFF]
            out[lo + lane] = s
            xs = f[s] * (xs >> 15) + (xs & 0x7FFF) - cum[s]
            if xs < (1 << 16):
                if pos >= nw:
                    return -1
                xs = (xs << 16) | np.int64(w[pos])
                pos += 1
            x[lane] = xs
    return pos


def decode(x: Any, w: Any, f: Any, cum: Any, slot2sym: Any, n: int, lanes: int) -> tuple[Any, int]:
    """(symbols, words used); words used is -1 when the stream ends early (rans.decode raises for it: this
    module imports nothing of rans, so the two do not import each other)."""
    out = np.empty(n, np.uint16)
    used = _decode(x.copy(), w, f, cum, slot2sym, n, lanes, out)
    return out, int(used)
