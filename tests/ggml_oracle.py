"""llama.cpp's own quantizer as a test oracle: `ggml_quantize_chunk` from the libggml-base.so that
llama-cpp-python bundles (the `llama` extra), called through ctypes.

Only tests and benchmarks use this; the pack decoder never does (its bytes must not depend on which
llama.cpp build, compiler or CPU a reader has). `available()` is False when the library is missing.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
from functools import lru_cache
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q


def _declare(lib: Any) -> Any:
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


@lru_cache(maxsize=None)
def load(path: str) -> Any:
    """Another libggml-base build (e.g. one compiled with FMA contraction, to measure its effect)."""
    return _declare(ctypes.CDLL(path))


@lru_cache(maxsize=1)
def library() -> Any:
    """The loaded libggml-base.so of llama-cpp-python, or None."""
    try:
        import llama_cpp  # noqa: F401  (locates the bundled libraries)
    except ImportError:
        return None
    libdir = pathlib.Path(os.path.dirname(llama_cpp.__file__)) / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            lib = ctypes.CDLL(str(libdir / name))
            break
    else:
        return None
    return _declare(lib)


def available() -> bool:
    return library() is not None


def library_path() -> str:
    import llama_cpp
    return str(pathlib.Path(os.path.dirname(llama_cpp.__file__)) / "lib" / "libggml-base.so")


def quantize(x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None, lib: Any = None) -> np.ndarray:
    """llama.cpp's bytes for float32 rows `x` (n_rows, n_per_row) quantized to `qtype`, as uint8
    (n_rows, row_bytes). `imatrix` (n_per_row float32) is the per-column importance, as llama-quantize
    passes it. `lib`: another build from `load` (default: llama-cpp-python's)."""
    lib = lib if lib is not None else library()
    if lib is None:
        raise RuntimeError("llama-cpp-python's libggml-base is not available")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    n_rows, n_per_row = x.shape
    block, type_size = GGML_QUANT_SIZES[Q(qtype)]
    row_bytes = n_per_row // block * type_size
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    imp = None
    if imatrix is not None:
        imp = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imp.shape == (n_per_row,)
    lib.ggml_quantize_init(int(qtype))
    got = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
                                  None if imp is None else imp.ctypes.data)
    assert got == out.nbytes, (got, out.nbytes)
    return out
