"""The type of every tensor, asked of llama.cpp (its dry run), and the checks llama.cpp makes.

Types are never re-derived: `plan_model` runs `llama_model_quantize` with `dry_run` and the recipe's
imatrix, capturing its log (one line per tensor in its order, source and target type, plus a warning per
row-size fallback). They depend on the whole model (whether `output.weight` exists changes `token_embd`'s
type; n_layer, n_gqa, the imatrix), so every model is planned on its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ...errors import GGUFSplitError
from ...format.gguf import ALIGNMENT_KEY, GGUFFile, TensorInfo
from .binding import Backend, _captured_log, _error_text, _params, backend
from .header import OUTPUT_ALIGNMENT, SPLIT_KEYS
from .recipe import Recipe

# names llama.cpp's quantizer treats as token embeddings (llama-quant.cpp, tensor_name_match_token_embd)
TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")
OUTPUT_NAME = "output.weight"
FALLBACK_NOTE = "(llama-quantize's fallback)"


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
            raise GGUFSplitError(path, "a model in several shards: plan_model reads one file (split quantizes a "
                                       "sharded model as a whole through llama_model_quantize)")
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
                                 f"{be.type_name(t.dst_type)} instead {FALLBACK_NOTE}")
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
