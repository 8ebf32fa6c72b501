"""llama.cpp through llama-cpp-python (the `llama` extra, imported lazily): the quantizer's library.

`Backend` loads `llama_cpp` and its libggml-base (the same process image), declares the ggml functions
called through ctypes (`ggml_quantize_chunk`, `ggml_validate_row_data`, the row converters), and says which
build it is (`build_info`, recorded with a quantized split). `_params` fills `llama_model_quantize_params`
as llama-quantize (the CLI) fills them for a recipe; `_captured_log` reads llama.cpp's log (the dry run's
per-tensor plan) and restores the previous logger. Without the extra, `backend()` raises one line saying
how to install it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

from ...errors import GGUFSplitError
from .header import imatrix_kvs
from .recipe import Recipe

INSTALL_HINT = "quantizing needs llama.cpp's Python binding: pip install 'gguf-split[llama]'"
# ggml log levels in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LOG_ERROR, _LOG_CONT = 4, 5


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits (read for `to_float`, to requantize)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Backend:
    """llama-cpp-python's llama.cpp: the `llama_cpp` module and its libggml-base (same process image)."""

    def __init__(self) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise GGUFSplitError(None, INSTALL_HINT) from None
        if not hasattr(llama_cpp, "llama_model_imatrix_data"):
            raise GGUFSplitError(None, f"quantizing needs llama-cpp-python >= 0.3.20 (installed: "
                                       f"{getattr(llama_cpp, '__version__', '?')}): pip install -U 'gguf-split[llama]'")
        self.llama: Any = llama_cpp
        self.lib = _load_ggml_base(llama_cpp)
        lib = self.lib
        i64, sz, vp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, vp, vp, i64, i64, i64, vp]
        lib.ggml_quantize_chunk.restype = sz
        lib.ggml_validate_row_data.argtypes = [ctypes.c_int, vp, sz]
        lib.ggml_validate_row_data.restype = ctypes.c_bool
        lib.ggml_fp16_to_fp32_row.argtypes = [vp, vp, i64]
        lib.ggml_fp16_to_fp32_row.restype = None
        lib.ggml_bf16_to_fp32_row.argtypes = [vp, vp, i64]
        lib.ggml_bf16_to_fp32_row.restype = None
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = i64
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = sz
        lib.ggml_row_size.argtypes = [ctypes.c_int, i64]
        lib.ggml_row_size.restype = sz
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        count = int(getattr(llama_cpp, "GGML_TYPE_COUNT", max(int(t) for t in GGMLQuantizationType) + 1))
        # ggml_type_name(i) is an array lookup, valid below GGML_TYPE_COUNT; removed types have block size 0
        self.type_ids = {lib.ggml_type_name(i).decode(): i for i in range(count) if lib.ggml_blck_size(i) > 0}
        self.log_lock = threading.Lock()
        self._to_float: dict[int, Any] = {}
        llama_cpp.llama_backend_init()

    def type_name(self, t: int) -> str:
        return str(self.lib.ggml_type_name(t).decode())

    def is_quantized(self, t: int) -> bool:
        return bool(self.lib.ggml_get_type_traits(t).contents.is_quantized)

    def row_size(self, t: int, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(t, n_per_row))

    def to_float(self, t: int) -> Any:
        """The F32 conversion llama.cpp applies to a source of type `t` (f(src, dst, n))."""
        if t == GGMLQuantizationType.F16:
            return self.lib.ggml_fp16_to_fp32_row
        if t == GGMLQuantizationType.BF16:
            return self.lib.ggml_bf16_to_fp32_row
        fn = self._to_float.get(t)
        if fn is None:
            ptr = self.lib.ggml_get_type_traits(t).contents.to_float
            if not ptr:
                raise GGUFSplitError(None, f"llama.cpp cannot convert a {self.type_name(t)} tensor to float")
            fn = self._to_float[t] = _TO_FLOAT(ptr)
        return fn

    def build_info(self) -> dict[str, str]:
        """What identifies the quantizer's build (recorded with a quantized split)."""
        lib, llama = self.lib, self.llama
        lib.ggml_version.restype = ctypes.c_char_p
        lib.ggml_commit.restype = ctypes.c_char_p
        info = {"llama_cpp_python": str(getattr(llama, "__version__", "?")),
                "ggml_version": lib.ggml_version().decode(), "ggml_commit": lib.ggml_commit().decode(),
                "system_info": llama.llama_print_system_info().decode().strip()}
        with contextlib.suppress(AttributeError):
            fn = llama.llama_cpp._lib.llama_version
            fn.restype = ctypes.c_char_p
            info["llama_version"] = fn().decode()
        return info


_backend: Backend | None = None
_backend_lock = threading.Lock()


def backend() -> Backend:
    """The llama.cpp binding, loaded once; GGUFSplitError (one line: how to install it) without it."""
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = Backend()
        return _backend


def _load_ggml_base(llama_cpp: Any) -> ctypes.CDLL:
    """libggml-base next to llama-cpp-python's libllama (the one libllama uses: dlopen returns the loaded
    image), or libllama itself when ggml is linked into it."""
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = os.path.join(libdir, name)
        if os.path.exists(path):
            return ctypes.CDLL(path)
    lib = llama_cpp.llama_cpp._lib
    if hasattr(lib, "ggml_quantize_chunk"):
        return lib  # type: ignore[no-any-return]
    raise GGUFSplitError(None, f"no libggml-base in {libdir}: {INSTALL_HINT}")


@contextlib.contextmanager
def _captured_log(be: Backend) -> Iterator[list[tuple[int, str]]]:
    """llama.cpp's log (process-wide) into a list while the block runs; the previous logger is restored."""
    llama = be.llama
    with be.log_lock:
        records: list[tuple[int, str]] = []

        def record(level: int, text: bytes, _user: Any) -> None:
            records.append((level, text.decode("utf-8", errors="replace")))

        callback = llama.llama_log_callback(record)
        old_cb, old_ud = llama.llama_log_callback(), ctypes.c_void_p()
        if hasattr(llama, "llama_log_get"):
            llama.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_ud))
        else:  # before llama_log_get: llama-cpp-python's own logger is what was installed
            with contextlib.suppress(ImportError, AttributeError):
                from llama_cpp import _logger
                old_cb = _logger.llama_log_callback
        llama.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield records
        finally:
            llama.llama_log_set(old_cb, old_ud)


def _error_text(records: Sequence[tuple[int, str]]) -> str:
    """What llama.cpp said when it failed: its 'failed to quantize: ...' reason, else its last error line."""
    errors, last = [], 0
    for level, text in records:
        last = last if level == _LOG_CONT else level
        if last >= _LOG_ERROR and text.strip() and not set(text.strip()) <= {"="}:
            errors.append(text.strip())
    for text in reversed(errors):
        m = re.search(r"failed to quantize: (.*)", text)
        if m:
            return m.group(1).strip()
    return errors[-1] if errors else "llama.cpp refused it (no message)"


@dataclass
class _Params:
    """llama_model_quantize_params plus the arrays it points to (kept alive with it)."""

    struct: Any
    keep: list[Any]


def _params(be: Backend, recipe: Recipe, *, dry_run: bool = False, nthread: int = 0,
            cli_kvs: bool = False) -> _Params:
    llama = be.llama
    p = llama.llama_model_quantize_default_params()
    p.ftype = recipe.ftype
    p.nthread = nthread
    p.dry_run = dry_run
    p.allow_requantize = recipe.allow_requantize
    p.pure = recipe.pure
    p.quantize_output_tensor = not recipe.leave_output_tensor
    if recipe.output_tensor_type is not None:
        p.output_tensor_type = recipe.output_tensor_type
    if recipe.token_embedding_type is not None:
        p.token_embedding_type = recipe.token_embedding_type
    keep: list[Any] = []
    imx = recipe.imatrix
    if imx is not None:
        arr = (llama.llama_model_imatrix_data * (len(imx.entries) + 1))()
        for i, (name, v) in enumerate(imx.entries.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(v)
            arr[i].name = name.encode("utf-8", errors="surrogateescape")
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        keep.append(arr)
        p.imatrix = arr
    if recipe.tensor_types:
        tt = (llama.llama_model_tensor_override * (len(recipe.tensor_types) + 1))()
        for i, (name, t) in enumerate(recipe.tensor_types):
            tt[i].pattern = exact_pattern(name).encode("utf-8")
            tt[i].type = t
        tt[len(recipe.tensor_types)].type = int(getattr(llama, "GGML_TYPE_COUNT", 0))
        keep.append(tt)
        p.tt_overrides = tt
    if cli_kvs:
        kvs = imatrix_kvs(recipe)
        if kvs:
            arr_kv = (llama.llama_model_kv_override * (len(kvs) + 1))()
            for i, (key, vtype, value) in enumerate(kvs):
                arr_kv[i].key = key.encode()
                if vtype is GGUFValueType.STRING:
                    arr_kv[i].tag = llama.LLAMA_KV_OVERRIDE_TYPE_STR
                    arr_kv[i].value.val_str = value
                else:
                    arr_kv[i].tag = llama.LLAMA_KV_OVERRIDE_TYPE_INT
                    arr_kv[i].value.val_i64 = value
            keep.append(arr_kv)
            p.kv_overrides = arr_kv
    return _Params(p, keep)


def exact_pattern(name: str) -> str:
    """A std::regex (ECMAScript) matching exactly `name`, for llama.cpp's tensor-type overrides."""
    return "^" + re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", name) + "$"
