"""Quantize a model tensor by tensor, giving exactly the file `llama-quantize` writes.

Why: tensors are shared across a family only when their bytes are identical, so a family is quantized once,
from its F32/F16/BF16 sources, with one recipe (type + importance matrix), and each distinct unit
(source tensor bytes and shape, target type, imatrix vector) is quantized once. Each model's result must
still be what `llama-quantize` (same llama.cpp, same TYPE and imatrix) writes for that model: same tensors
(names, order, types, bytes), same KVs, same layout. This module is that core; it needs the `llama` extra
(llama-cpp-python >= 0.3.20, imported lazily: without it a call raises one line saying how to install it).

Contract, and how each part is made exact (sources: llama.cpp src/llama-quant.cpp, tools/quantize/
quantize.cpp, ggml/src/gguf.cpp, as vendored by llama-cpp-python 0.3.36):

- **Types are asked of llama.cpp, never re-derived.** `plan_model` runs `llama_model_quantize` with
  `dry_run` and the recipe's imatrix (the mixes test `has_imatrix`: Q4_0 with an imatrix gives the first
  ffn_down layers Q4_1), capturing its log: one line per tensor, in its order, with the source type and
  the target type, plus a warning per row-size fallback (Q4_K -> Q5_0, Q6_K -> Q8_0, ... or F16). The
  types depend on the whole model (whether `output.weight` exists changes `token_embd`'s type; n_layer,
  n_gqa, the imatrix), so every model is planned on its own. A dry run reads the header only: 10 ms of
  CPU for a tiny model, 65 ms for SmolLM2-135M, 0.3 s for Gemma-3-270M (llama.cpp parses and logs the
  262k-token vocabulary).
  Per-tensor types (a template model's) go to llama.cpp as exact-name `tt_overrides`, so fallbacks and
  precedence stay llama.cpp's.
- **Tensor order**: llama.cpp's loader order (by layer number of `blk.N.`, then name), read from the plan.
- **Bytes**: for a tensor whose target type differs from its type, llama.cpp converts the rows to float32
  (`ggml_fp16_to_fp32_row`, `ggml_bf16_to_fp32_row`, or the type's `to_float` when requantizing) and
  calls `ggml_quantize_chunk` on chunks of rows with the tensor's imatrix vector (per expert for 3-D
  tensors). Rows are quantized independently, so any chunking gives the same bytes; this module calls
  the same functions of the same libggml-base through ctypes (which releases the GIL) on a thread pool.
  Both the source and the result are checked with `ggml_validate_row_data`, as llama.cpp does (a NaN in
  a source tensor fails, copied tensors included). A tensor whose target type is its type is copied.
  Memory: one quantized tensor plus one float32 chunk (at most 16 MiB) per thread; each source tensor's
  pages are unmapped once done (llama.cpp converts a whole tensor to float32 at once: on Gemma-3 its
  peak RSS is 1.18 GB, this module's 0.6 GB).
- **Header** (`quantized_header`, pure Python: a restore needs no llama.cpp): GGUF v3; the source KVs in
  order, as `gguf_set_kv` copies them (string values cut at a NUL, bools written 0/1, a key set twice
  moves to the end), then `general.quantization_version` and `general.file_type` (removed and appended),
  `split.no` / `split.count` / `split.tensors.count` removed, then the CLI's `quantize.imatrix.*` KVs;
  tensor infos with `ggml_n_dims` dims (trailing 1s dropped) and offsets at 32-byte alignment, data
  padded to 32 with zeros. llama-quantize uses 32 even when the source's `general.alignment` says
  otherwise, and keeps that KV: its output is then unloadable, so such a source is refused.
- **The CLI's part** (`imatrix_kvs`): with an imatrix (after `--include/--exclude-weights`, not empty),
  `quantize.imatrix.file` (the path as given, at most 127 bytes), `.dataset` (the first dataset, 127
  bytes), `.entries_count` (u32: the entries in the file, used or not) and `.chunks_count` (u32, when
  > 0). The file path is what differs between two machines; `Recipe.imatrix_label` sets it.

What llama.cpp does that is reproduced, not judged: an imatrix entry whose size differs from the tensor's
row (times experts) fails, except for `token_embd` (quantized without it); a tensor with no entry is
quantized without one (reported in `ModelPlan.warnings`); the very-low-bit types that need an imatrix
fail without one. What is refused beyond llama.cpp: an imatrix none of whose entries matches a quantized
tensor of the model (an imatrix for another model), sources with a non-32 alignment (see above), models
in several shards (merge them first), 4-D tensors (llama.cpp's quantizer handles 3 dimensions).
`general.quantization_version` is gguf's GGML_QUANT_VERSION (ggml's GGML_QNT_VERSION is a macro, not
exported; the tests compare it with llama.cpp's output).

`llama_quantize` runs `llama_model_quantize` itself with the parameters the CLI would pass: the
fall-back for what cannot be reproduced tensor by tensor, and the oracle of the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import mmap
import os
import re
import struct
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
    LlamaFileType,
)

from .errors import GGUFSplitError, os_problem
from .gguf_format import (
    ALIGNMENT_KEY,
    GGUFFile,
    KV,
    TensorInfo,
    align_up,
    encode_prefix,
    encode_tensor_info,
    encode_value,
)
from .imatrix import Imatrix, load_imatrix

INSTALL_HINT = "quantizing needs llama.cpp's Python binding: pip install 'gguf-split[llama]'"
OUTPUT_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT  # llama-quantize's output layout, whatever the source says
OUTPUT_VERSION = 3
# llama-quantize's type names that are aliases of a mix
TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
IMATRIX_FILE_KEY = "quantize.imatrix.file"
IMATRIX_DATASET_KEY = "quantize.imatrix.dataset"
IMATRIX_ENTRIES_KEY = "quantize.imatrix.entries_count"
IMATRIX_CHUNKS_KEY = "quantize.imatrix.chunks_count"
_CLI_STRING_MAX = 127  # the CLI strncpy's into a char[128] KV override
SPLIT_KEYS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
# names llama.cpp's quantizer treats as token embeddings (llama-quant.cpp, tensor_name_match_token_embd)
TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")
OUTPUT_NAME = "output.weight"
# chunks of rows handed to one ggml_quantize_chunk call: large enough that Python's per-call cost vanishes,
# small enough that each worker's float32 buffer stays small and both cores get work on mid-size tensors
CHUNK_MIN_ELEMENTS = 1 << 16
CHUNK_MAX_ELEMENTS = 1 << 22
# ggml log levels in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LOG_ERROR, _LOG_CONT = 4, 5


# ---------------------------------------------------------------------------------------------------------
# Recipe


def parse_quant_type(text: str) -> tuple[str, int]:
    """llama-quantize's TYPE argument (case-insensitive, Q4_K = Q4_K_M ...) -> (canonical name, llama_ftype)."""
    name = text.strip().upper()
    name = TYPE_ALIASES.get(name, name)
    member = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
    ftype = LlamaFileType.__members__.get(member)
    if ftype is None or ftype is LlamaFileType.GUESSED:
        raise GGUFSplitError(None, f"unknown quantization type {text!r} (llama-quantize's types: Q4_K_M, Q5_K_M, "
                                   f"Q6_K, Q8_0, Q4_0, IQ4_XS, ...)")
    return name, int(ftype)


@dataclass(frozen=True)
class Recipe:
    """How a family is quantized: llama-quantize's TYPE, its imatrix (as loaded and filtered by the CLI)
    and the value its output's `quantize.imatrix.file` holds (the path given on the command line)."""

    quant_type: str
    ftype: int
    imatrix: Imatrix | None = None
    imatrix_label: str | None = None
    tensor_types: tuple[tuple[str, int], ...] = ()  # exact per-tensor types (a template's), llama.cpp-checked
    allow_requantize: bool = False
    # the CLI's --pure, --output-tensor-type, --token-embedding-type, --leave-output-tensor
    pure: bool = False
    output_tensor_type: int | None = None
    token_embedding_type: int | None = None
    leave_output_tensor: bool = False

    def imatrix_vector(self, name: str) -> np.ndarray | None:
        return None if self.imatrix is None else self.imatrix.entries.get(name)


def make_recipe(quant_type: str, imatrix: str | os.PathLike[str] | None = None, *,
                include_weights: Sequence[str] = (), exclude_weights: Sequence[str] = (),
                imatrix_label: str | None = None, template: str | os.PathLike[str] | None = None,
                allow_requantize: bool = False, pure: bool = False, output_tensor_type: str | None = None,
                token_embedding_type: str | None = None, leave_output_tensor: bool = False) -> Recipe:
    """A recipe as `llama-quantize [--imatrix FILE] [--include/--exclude-weights ...] [--pure]
    [--output-tensor-type T] [--token-embedding-type T] [--leave-output-tensor] TYPE` builds it.
    An imatrix left empty by the filters is no imatrix (the CLI then passes none and writes no KVs).
    `template`: a quantized model whose per-tensor types the family must take (see template_types)."""
    name, ftype = parse_quant_type(quant_type)
    imx: Imatrix | None = None
    label = None
    if imatrix is not None:
        imx = load_imatrix(imatrix).filtered(include=include_weights, exclude=exclude_weights)
        if not imx.entries:
            imx = None
        else:
            _check_finite(imx)
            label = os.fspath(imatrix) if imatrix_label is None else imatrix_label
    types = tuple(template_types(template).items()) if template is not None else ()
    return Recipe(name, ftype, imx, label, types, allow_requantize, pure, _ggml_type(output_tensor_type),
                  _ggml_type(token_embedding_type), leave_output_tensor)


def _ggml_type(name: str | None) -> int | None:
    """A ggml type by name, case-insensitive (the CLI's parse_ggml_type)."""
    if name is None:
        return None
    for t in GGMLQuantizationType:
        if t.name.lower() == name.strip().lower():
            return int(t)
    raise GGUFSplitError(None, f"unknown ggml type {name!r}")


def _check_finite(imx: Imatrix) -> None:
    """llama_model_quantize refuses an imatrix holding a NaN or an infinity (in any entry)."""
    for name, v in imx.entries.items():
        if v.size and not np.isfinite(v).all():
            raise GGUFSplitError(imx.path, f"imatrix entry {name!r} holds a non-finite value (llama.cpp refuses it)")


def template_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """The type of every tensor of a (quantized) template model, by name."""
    with GGUFFile(path) as f:
        return {t.name: t.ggml_type for t in f.header.tensors}


# ---------------------------------------------------------------------------------------------------------
# llama.cpp through ctypes (lazy)


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


# ---------------------------------------------------------------------------------------------------------
# Planning: the type of every tensor, asked of llama.cpp


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the quantized model, in llama.cpp's order."""

    name: str
    shape: tuple[int, ...]  # GGUF order, ne0 first, as in the source
    src_type: int
    dst_type: int
    fallback: bool = False  # llama.cpp fell back from the mix's type (row size)
    with_imatrix: bool = False  # quantized with the recipe's imatrix vector for this name

    @property
    def quantized(self) -> bool:
        return self.src_type != self.dst_type


@dataclass
class ModelPlan:
    path: str
    recipe: Recipe
    tensors: list[PlannedTensor]
    warnings: list[str] = field(default_factory=list)  # one line each, what llama-quantize would log


_PLAN_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\] (.*?) +- \[[\d, ]+\], type = +(\S+), size = .*?(?: \((\S+)\))?$",
                        re.M)
_FALLBACK_LINE = re.compile(r"^warning: (.*?) +- ncols +\d+ not divisible by +\d+ \(required for type +(\S+)\) "
                            r".*?-> falling back to +(\S+)$", re.M)


def plan_model(path: str | os.PathLike[str], recipe: Recipe) -> ModelPlan:
    """The tensors of `path` quantized by `recipe`: order and types from llama.cpp's dry run, imatrix
    vectors checked as llama.cpp checks them. Refusals are GGUFSplitError naming the file."""
    path = os.fspath(path)
    be = backend()
    with GGUFFile(path) as f:
        h = f.header
        if h.alignment != OUTPUT_ALIGNMENT:
            raise GGUFSplitError(path, f"{ALIGNMENT_KEY} is {h.alignment}: llama-quantize lays its output out at "
                                       f"{OUTPUT_ALIGNMENT} but keeps that key, which makes the output unloadable; "
                                       f"rewrite the model with alignment {OUTPUT_ALIGNMENT} first")
        count = SPLIT_KEYS[1]
        if count in h.kv_by_key and int(f.kv_value(count)) > 1:
            raise GGUFSplitError(path, "a model in several shards: merge it first (llama-gguf-split --merge)")
        infos = {t.name: t for t in h.tensors}
    lines, fallbacks = _dry_run(be, path, recipe)
    tensors = _planned_tensors(path, be, infos, lines, fallbacks)
    plan = ModelPlan(path, recipe, tensors)
    _resolve_imatrix(plan)
    _check_plan(plan, be)
    return plan


def _dry_run(be: Backend, path: str, recipe: Recipe) -> tuple[list[tuple[str, str, str | None]], set[str]]:
    """llama.cpp's dry run: (name, type, new type or None when unchanged) per tensor in its order, and the
    names it fell back for."""
    params = _params(be, recipe, dry_run=True)
    with _captured_log(be) as records:
        rc = be.llama.llama_model_quantize(path.encode(), b"", ctypes.byref(params.struct))
    if rc != 0:
        raise GGUFSplitError(path, f"llama.cpp cannot quantize this model: {_error_text(records)}")
    text = "".join(t for _, t in records)
    lines = [(m.group(3), m.group(4), m.group(5)) for m in _PLAN_LINE.finditer(text)]
    fallbacks = {m.group(1) for m in _FALLBACK_LINE.finditer(text)}
    return lines, fallbacks


def _planned_tensors(path: str, be: Backend, infos: Mapping[str, TensorInfo],
                     lines: Sequence[tuple[str, str, str | None]], fallbacks: set[str]) -> list[PlannedTensor]:
    if len(lines) != len(infos) or {n for n, _, _ in lines} != set(infos):
        raise GGUFSplitError(path, f"cannot read llama.cpp's quantization plan ({len(lines)} of {len(infos)} "
                                   f"tensors recognised in its log)")
    out = []
    for name, cur_name, new_name in lines:
        t = infos[name]
        cur = be.type_ids.get(cur_name)
        new = cur if new_name is None else be.type_ids.get(new_name)
        if cur != t.ggml_type or new is None:
            raise GGUFSplitError(path, f"cannot read llama.cpp's quantization plan for {name!r}")
        out.append(PlannedTensor(name, t.shape, t.ggml_type, new, fallback=name in fallbacks))
    return out


def _resolve_imatrix(plan: ModelPlan) -> None:
    """Which quantized tensors get an imatrix vector, as llama_model_quantize decides; refusals as its."""
    imx = plan.recipe.imatrix
    if imx is None:
        return
    used = 0
    for i, t in enumerate(plan.tensors):
        if not t.quantized:
            continue
        v = imx.entries.get(t.name)
        if v is None:
            plan.warnings.append(f"{t.name}: no imatrix entry, quantized without one (as llama-quantize does)")
            continue
        want = t.shape[0] * (t.shape[2] if len(t.shape) > 2 else 1)
        if v.size != want:
            if t.name in TOKEN_EMBD_NAMES:
                plan.warnings.append(f"{t.name}: imatrix entry has {v.size} values, the tensor {want}: "
                                     f"quantized without it (as llama-quantize does)")
                continue
            raise GGUFSplitError(imx.path, f"imatrix entry {t.name!r} has {v.size} values but {plan.path}'s tensor "
                                           f"needs {want}: an imatrix for another model?")
        plan.tensors[i] = dataclasses.replace(t, with_imatrix=True)
        used += 1
    if not used and any(t.quantized for t in plan.tensors):
        raise GGUFSplitError(imx.path, f"no imatrix entry matches a tensor of {plan.path}: an imatrix for another "
                                       f"model?")


# llama-quant.cpp, tensor_requires_imatrix: the very-low-bit types that give garbage without an imatrix
_NEEDS_IMATRIX = {GGMLQuantizationType.IQ3_XXS, GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS,
                  GGMLQuantizationType.IQ2_S, GGMLQuantizationType.IQ1_M, GGMLQuantizationType.IQ1_S}


def _requires_imatrix(be: Backend, t: PlannedTensor, ftype: int) -> bool:
    if be.lib.ggml_quantize_requires_imatrix(t.dst_type):  # ggml aborts the process without one
        return True
    if t.name in TOKEN_EMBD_NAMES or t.name == OUTPUT_NAME:
        return False
    if t.dst_type == GGMLQuantizationType.Q2_K:
        return ftype == LlamaFileType.MOSTLY_Q2_K_S
    return t.dst_type in _NEEDS_IMATRIX


def _check_plan(plan: ModelPlan, be: Backend) -> None:
    template = dict(plan.recipe.tensor_types)
    for t in plan.tensors:
        if t.fallback:
            plan.warnings.append(f"{t.name}: {t.shape[0]} columns do not fit the mix's type, "
                                 f"{be.type_name(t.dst_type)} instead (llama-quantize's fallback)")
        if not t.quantized:
            continue
        if not t.with_imatrix and _requires_imatrix(be, t, plan.recipe.ftype):
            raise GGUFSplitError(plan.path, f"{plan.recipe.quant_type} needs an importance matrix for {t.name!r} "
                                            f"({be.type_name(t.dst_type)}): give --imatrix")
        if be.is_quantized(t.src_type) and not plan.recipe.allow_requantize:
            raise GGUFSplitError(plan.path, f"tensor {t.name!r} is already {be.type_name(t.src_type)}: requantizing "
                                            f"is disabled (quantize from the F16/BF16/F32 model)")
        if not be.is_quantized(t.src_type) and t.src_type not in _FLOAT_SOURCES:
            raise GGUFSplitError(plan.path, f"tensor {t.name!r}: llama.cpp cannot convert {be.type_name(t.src_type)} "
                                            f"to {be.type_name(t.dst_type)}")
        if len(t.shape) > 3 and t.shape[3] != 1:
            raise GGUFSplitError(plan.path, f"tensor {t.name!r} has 4 dimensions: llama.cpp's quantizer cannot")
        known = GGML_QUANT_SIZES.get(GGMLQuantizationType(t.dst_type)) if t.dst_type in _GGUF_TYPES else None
        if known is None or known != (be.lib.ggml_blck_size(t.dst_type), be.lib.ggml_type_size(t.dst_type)):
            raise GGUFSplitError(plan.path, f"type {be.type_name(t.dst_type)} is unknown to the installed gguf "
                                            f"package: pip install -U gguf")
    for t in plan.tensors:
        want = template.get(t.name)
        if want is not None and want != t.dst_type:
            raise GGUFSplitError(plan.path, f"tensor {t.name!r} cannot take the template's type "
                                            f"{be.type_name(want)} (llama.cpp gives {be.type_name(t.dst_type)})")


_GGUF_TYPES = {int(t) for t in GGMLQuantizationType}
_FLOAT_SOURCES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


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


# ---------------------------------------------------------------------------------------------------------
# The CLI's KVs


def imatrix_kvs(recipe: Recipe) -> list[tuple[str, GGUFValueType, Any]]:
    """The KVs llama-quantize (the CLI) adds for its imatrix, in its order: (key, type, value); strings as
    bytes, cut as its strncpy cuts them."""
    imx = recipe.imatrix
    if imx is None:
        return []
    label = imx.path if recipe.imatrix_label is None else recipe.imatrix_label
    kvs: list[tuple[str, GGUFValueType, Any]] = [
        (IMATRIX_FILE_KEY, GGUFValueType.STRING, os.fsencode(label).split(b"\0")[0][:_CLI_STRING_MAX])]
    if imx.datasets:
        kvs.append((IMATRIX_DATASET_KEY, GGUFValueType.STRING, imx.datasets[0][:_CLI_STRING_MAX]))
    kvs.append((IMATRIX_ENTRIES_KEY, GGUFValueType.UINT32, len(imx.entries)))
    if imx.chunk_count > 0:
        kvs.append((IMATRIX_CHUNKS_KEY, GGUFValueType.UINT32, imx.chunk_count))
    return kvs


# ---------------------------------------------------------------------------------------------------------
# The header llama_model_quantize writes


def quantized_header(source: GGUFFile, tensors: Sequence[tuple[str, tuple[int, ...], int]], ftype: int,
                     extra_kvs: Sequence[tuple[str, GGUFValueType, Any]] = ()) -> bytes:
    """The bytes before the first tensor of the file llama-quantize writes for `source`: `tensors` are
    (name, GGUF shape, target type) in llama.cpp's order, `extra_kvs` the CLI's (imatrix_kvs). Pure
    Python: sizes come from gguf's tables."""
    kvs = _copied_kvs(source)
    _set(kvs, Keys.General.QUANTIZATION_VERSION, _U32_TYPE + struct.pack("<I", GGML_QUANT_VERSION))
    _set(kvs, Keys.General.FILE_TYPE, _U32_TYPE + struct.pack("<I", ftype))
    for key in SPLIT_KEYS:
        kvs.pop(key.encode(), None)
    for key, vtype, value in extra_kvs:
        _set(kvs, key, struct.pack("<I", vtype) + encode_value(vtype, value))
    parts = [encode_prefix(OUTPUT_VERSION, len(tensors), len(kvs))]
    parts += [encode_value(GGUFValueType.STRING, k) + v for k, v in kvs.items()]
    offset = 0
    for name, shape, t in tensors:
        parts.append(encode_tensor_info(name, _n_dims_shape(shape), t, offset))
        offset += align_up(tensor_nbytes(t, shape), OUTPUT_ALIGNMENT)
    meta = b"".join(parts)
    return meta + bytes(align_up(len(meta), OUTPUT_ALIGNMENT) - len(meta))


_U32_TYPE = struct.pack("<I", GGUFValueType.UINT32)


def _set(kvs: dict[bytes, bytes], key: str | bytes, typed_value: bytes) -> None:
    """gguf_set_val_*: an existing key is removed, the pair appended."""
    k = key if isinstance(key, bytes) else key.encode("utf-8")
    kvs.pop(k, None)
    kvs[k] = typed_value


def _copied_kvs(source: GGUFFile) -> dict[bytes, bytes]:
    """The source's KVs as gguf_set_kv copies them: key -> value type + value bytes."""
    out: dict[bytes, bytes] = {}
    for kv in source.header.kvs:
        key = kv.key.encode("utf-8").split(b"\0")[0]
        _set(out, key, _copied_value(source, kv))
    return out


def _copied_value(source: GGUFFile, kv: KV) -> bytes:
    raw = source.raw(kv.value_start - 4, kv.end)
    if kv.vtype is GGUFValueType.STRING:
        value = raw[12:]
        return raw if b"\0" not in value else raw[:4] + encode_value(kv.vtype, value.split(b"\0")[0])
    if kv.vtype is GGUFValueType.BOOL:
        return raw[:4] + (b"\1" if raw[4] else b"\0")
    if kv.vtype is GGUFValueType.ARRAY and kv.subtype is GGUFValueType.BOOL:
        return raw[:16] + bytes(1 if b else 0 for b in raw[16:])
    if kv.vtype is GGUFValueType.ARRAY and kv.subtype is GGUFValueType.STRING:
        return _c_strings(raw)
    return raw


def _c_strings(raw: bytes) -> bytes:
    """A string array's type + value with every string cut at its first NUL (unchanged if none has one)."""
    count = struct.unpack_from("<Q", raw, 8)[0]
    pos, cut = 16, False
    strings = []
    for _ in range(count):
        n = struct.unpack_from("<Q", raw, pos)[0]
        s = raw[pos + 8 : pos + 8 + n]
        pos += 8 + n
        if b"\0" in s:
            s, cut = s.split(b"\0")[0], True
        strings.append(s)
    if not cut:
        return raw
    return raw[:4] + encode_value(GGUFValueType.ARRAY, strings, GGUFValueType.STRING)


def _n_dims_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape as gguf writes it: ggml_n_dims dims (trailing 1s dropped, at least one)."""
    dims = list(shape) or [1]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def tensor_nbytes(t: int, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


# ---------------------------------------------------------------------------------------------------------
# Quantizing one tensor


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
        for fut in [pool.submit(job.run, *c) for c in chunks]:
            fut.result()
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


# ---------------------------------------------------------------------------------------------------------
# Whole models


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
                    _drop_pages(f, f.header.data_start + info.offset, info.nbytes)
            os.replace(tmp, dst)
        except OSError as e:
            _unlink(tmp)
            raise GGUFSplitError(dst, f"cannot write: {os_problem(e)}") from None
        except BaseException:
            _unlink(tmp)
            raise
    return plan


def _drop_pages(f: GGUFFile, start: int, length: int) -> None:
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
