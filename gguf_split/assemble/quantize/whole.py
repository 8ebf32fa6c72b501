"""Whole models: the file llama-quantize writes, tensor by tensor (`quantize_model`), or by llama.cpp
itself (`llama_quantize`: the fall-back, and the oracle of the tests)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

from ...errors import GGUFSplitError, os_problem
from ...format.gguf import GGUFFile, align_up
from .binding import _captured_log, _error_text, _params, backend
from .header import OUTPUT_ALIGNMENT, imatrix_kvs, quantized_header
from .mix import ModelPlan, plan_model
from .recipe import Recipe
from .tensor import default_threads, quantize_tensor


def quantize_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], recipe: Recipe, *,
                   threads: int | None = None, plan: ModelPlan | None = None) -> ModelPlan:
    """Write to `dst` the file llama-quantize writes for `src` with `recipe` (tensor by tensor, streaming:
    memory holds one quantized tensor plus a chunk per thread). `dst` appears complete or not at all.
    `plan`: plan_model(src, recipe), when the caller has it already."""
    src, dst = os.fspath(src), os.fspath(dst)
    if plan is None:
        plan = plan_model(src, recipe)
    elif plan.path != src or plan.recipe is not recipe:
        raise ValueError("the plan is for another model or recipe")
    extra = imatrix_kvs(recipe)
    tmp = f"{dst}.tmp-{os.getpid()}"
    n_threads = threads or default_threads()
    with GGUFFile(src) as f, ThreadPoolExecutor(n_threads) as pool:
        header = quantized_header(f, [(t.name, t.shape, t.dst_type) for t in plan.tensors], recipe.ftype, extra)
        try:
            with open(tmp, "xb") as out:
                out.write(header)
                for t in plan.tensors:
                    info = f.header.tensor_by_name[t.name]
                    data = quantize_tensor(f.tensor_view(info), t, recipe.imatrix_vector(t.name) if t.with_imatrix
                                           else None, pool=pool if n_threads > 1 else None, path=src)
                    out.write(memoryview(data))
                    out.write(bytes(align_up(data.nbytes, OUTPUT_ALIGNMENT) - data.nbytes))
                    del data
                    drop_pages(f, f.header.data_start + info.offset, info.nbytes)
            os.replace(tmp, dst)
        except OSError as e:
            _unlink(tmp)
            raise GGUFSplitError(dst, f"cannot write: {os_problem(e)}") from None
        except BaseException:
            _unlink(tmp)
            raise
    return plan


def drop_pages(f: GGUFFile, start: int, length: int) -> None:
    """Unmap a source tensor's pages once it is done (they stay in the page cache), so the process's
    memory holds one tensor at a time, as llama.cpp's quantizer unmaps each weight."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or length <= 0:
        return
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(align_up(start + length, mmap.PAGESIZE), f.size)
    with contextlib.suppress(OSError, ValueError):
        f.mm.madvise(advice, lo, hi - lo)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def llama_quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], recipe: Recipe, *,
                   threads: int = 0) -> None:
    """Run llama_model_quantize on a whole model with the parameters llama-quantize (the CLI) passes for
    `recipe`, its imatrix KVs included: the fall-back where tensor by tensor cannot be exact, and the
    oracle the tensor-by-tensor path is tested against."""
    src, dst = os.fspath(src), os.fspath(dst)
    be = backend()
    params = _params(be, recipe, nthread=threads, cli_kvs=True)
    with _captured_log(be) as records:
        rc = be.llama.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params.struct))
    if rc != 0:
        raise GGUFSplitError(src, f"llama.cpp cannot quantize this model: {_error_text(records)}")
