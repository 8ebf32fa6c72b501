"""Quantizing one tensor exactly as llama_model_quantize does, and what identifies the result.

For a tensor whose target type differs from its type, llama.cpp converts rows to float32 and calls
`ggml_quantize_chunk` on chunks of rows with the tensor's imatrix vector (per expert for 3-D tensors).
Rows are quantized independently, so any chunking gives the same bytes; this calls the same functions of
the same libggml-base through ctypes (which releases the GIL) on a thread pool.
"""

from __future__ import annotations

import hashlib
import os
import struct
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType

from ...disk.jobs import wait_for
from ...errors import GGUFSplitError
from .binding import Backend, backend
from .mix import PlannedTensor
from .recipe import Recipe

# chunks of rows handed to one ggml_quantize_chunk call: large enough that Python's per-call cost vanishes,
# small enough that each worker's float32 buffer stays small and both cores get work on mid-size tensors
CHUNK_MIN_ELEMENTS = 1 << 16
CHUNK_MAX_ELEMENTS = 1 << 22


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def quantize_tensor(src: Any, t: PlannedTensor, imatrix: np.ndarray | None = None, *,
                    pool: Executor | None = None, path: str | None = None) -> Any:
    """The bytes llama_model_quantize writes for tensor `t` whose source bytes are `src` (a buffer):
    a uint8 array, or `src` itself when the tensor is copied. `imatrix`: its vector (ne0 floats per
    expert), None without. Chunks of rows run on `pool` (ctypes releases the GIL)."""
    be = backend()
    ne = list(t.shape) + [1] * (4 - len(t.shape))
    n_per_row, rows_per_expert, n_expert = ne[0], ne[1], ne[2] * ne[3]
    src_arr = np.frombuffer(src, dtype=np.uint8)
    src_row = be.row_size(t.src_type, n_per_row)
    if src_arr.size != src_row * rows_per_expert * n_expert:
        raise GGUFSplitError(path, f"tensor {t.name!r}: {src_arr.size} bytes, its shape needs "
                                   f"{src_row * rows_per_expert * n_expert}")
    dst_row = be.row_size(t.dst_type, n_per_row) if t.quantized else src_row
    out = np.empty(dst_row * rows_per_expert * n_expert, dtype=np.uint8) if t.quantized else src_arr
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.size != n_per_row * n_expert:
            raise GGUFSplitError(path, f"tensor {t.name!r}: imatrix of {imatrix.size} values, needs "
                                       f"{n_per_row * n_expert}")
    elements = n_per_row * rows_per_expert * n_expert
    rows_per_chunk = max(1, min(CHUNK_MAX_ELEMENTS, max(CHUNK_MIN_ELEMENTS, elements // 8)) // n_per_row)
    chunks = [(e * rows_per_expert + r, min(rows_per_chunk, rows_per_expert - r), e)
              for e in range(n_expert) for r in range(0, rows_per_expert, rows_per_chunk)]
    job = _TensorJob(be, t, src_arr, src_row, out, dst_row, n_per_row, imatrix, path)
    if pool is None or len(chunks) == 1:
        for c in chunks:
            job.run(*c)
    else:
        futures = [pool.submit(job.run, *c) for c in chunks]
        try:
            for fut in futures:
                wait_for(fut)  # wakes every 0.1 s: a Ctrl-C is acted on at once, not after the tensor
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return out


@dataclass
class _TensorJob:
    be: Backend
    t: PlannedTensor
    src: np.ndarray
    src_row: int
    out: np.ndarray
    dst_row: int
    n_per_row: int
    imatrix: np.ndarray | None
    path: str | None

    def run(self, row: int, nrows: int, expert: int) -> None:
        lib, t = self.be.lib, self.t
        src_ptr = self.src.ctypes.data + row * self.src_row
        if not lib.ggml_validate_row_data(t.src_type, src_ptr, nrows * self.src_row):
            raise GGUFSplitError(self.path, f"tensor {t.name!r} has invalid data (NaN or infinity)")
        if not t.quantized:
            return
        n = nrows * self.n_per_row
        f32: np.ndarray | None = None
        if t.src_type == GGMLQuantizationType.F32:
            f32_ptr = src_ptr
        else:
            f32 = np.empty(n, dtype=np.float32)
            f32_ptr = f32.ctypes.data
            self.be.to_float(t.src_type)(src_ptr, f32_ptr, n)
        imx_ptr = None if self.imatrix is None else self.imatrix.ctypes.data + 4 * expert * self.n_per_row
        dst_ptr = self.out.ctypes.data + row * self.dst_row
        size = lib.ggml_quantize_chunk(t.dst_type, f32_ptr, dst_ptr, 0, nrows, self.n_per_row, imx_ptr)
        if size != nrows * self.dst_row:
            raise GGUFSplitError(self.path, f"tensor {t.name!r}: llama.cpp wrote {size} bytes, expected "
                                            f"{nrows * self.dst_row}")
        if not lib.ggml_validate_row_data(t.dst_type, dst_ptr, size):
            raise GGUFSplitError(self.path, f"tensor {t.name!r}: quantized data validation failed")
        del f32


def unit_key(source_digest: bytes, t: PlannedTensor, recipe: Recipe) -> bytes:
    """What makes a quantized tensor's bytes: the source bytes (their digest), source type, shape, target
    type and the imatrix vector used (name-independent: two tensors with these equal quantize equally)."""
    h = hashlib.sha256()
    h.update(source_digest)
    h.update(struct.pack("<II", t.src_type, t.dst_type))
    h.update(struct.pack(f"<{len(t.shape)}Q", *t.shape))
    v = recipe.imatrix_vector(t.name) if t.with_imatrix else None
    h.update(b"\0" if v is None else b"\1" + hashlib.sha256(np.ascontiguousarray(v, np.float32).tobytes()).digest())
    return h.digest()
