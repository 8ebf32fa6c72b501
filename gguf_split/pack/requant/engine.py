"""Which implementation re-quantizes, and on how many threads: one entry point, `quantize`, whose bytes
do not depend on either choice.

Engines (same bytes; tests compare each with llama.cpp and with each other): "numpy" (`port`, always
there), "numba" (`kernels`: compiled loops, the searches vectorised across blocks; when numba is
installed), "auto" (numba when installed). Threads split the rows: rows are independent, so the split changes no byte.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from .port import Arr, F, RequantError, check_args, quantize_numpy, row_bytes

ENGINES = ("auto", "numba", "numpy")


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def quantize_numba(x: Arr, qtype: int, imatrix: Arr | None = None) -> Arr:
    """The same bytes through the compiled kernels of `kernels` (needs numba)."""
    from . import kernels

    x, qw = check_args(x, qtype, imatrix)
    n_rows, n = x.shape
    out = np.empty((n_rows, row_bytes(qtype, n)), dtype=np.uint8)
    kernel = kernels.KERNELS[Q(qtype).name]
    kernel(x, out, qw if qw is not None else np.zeros(n, dtype=F), qw is not None)
    return out


def _engine_fn(engine: str) -> Callable[[Arr, int, Arr | None], Arr]:
    if engine == "auto":
        engine = "numba" if numba_available() else "numpy"
    fns: dict[str, Callable[[Arr, int, Arr | None], Arr]] = {"numba": quantize_numba, "numpy": quantize_numpy}
    if engine not in fns:
        raise RequantError(f"unknown engine {engine!r}")
    return fns[engine]


def quantize(x: Arr, qtype: int, imatrix: Arr | None = None, *, engine: str = "auto",
             threads: int = 1) -> Arr:
    """llama.cpp's `ggml_quantize_chunk(qtype, x, ..., imatrix)` bytes for float32 rows x (R, n_per_row)
    as uint8 (R, row_bytes), reproduced deterministically.

    engine: "numba", "numpy" or "auto" (numba when installed). threads > 1 splits the rows among a
    thread pool (rows are independent, so the bytes do not depend on the split)."""
    fn = _engine_fn(engine)
    x, qw = check_args(x, qtype, imatrix)
    n_rows = x.shape[0]
    threads = max(1, min(threads, n_rows))
    if threads == 1:
        return fn(x, qtype, qw)
    bounds = np.linspace(0, n_rows, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(lambda ab: fn(x[ab[0]:ab[1]], qtype, qw), zip(bounds[:-1], bounds[1:])))
    out: Arr = np.concatenate(parts)
    return out


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def dequantize(raw: Any, qtype: int, n_rows: int, n_per_row: int) -> Arr:
    """float32 rows of a quantized tensor (gguf's dequantizers; only for measurements and tests)."""
    from gguf.quants import dequantize as _deq
    data = np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, -1)
    out: Arr = np.asarray(_deq(data, Q(qtype)), dtype=F).reshape(n_rows, n_per_row)
    return out
