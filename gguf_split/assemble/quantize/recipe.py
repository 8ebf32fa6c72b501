"""The recipe: llama-quantize's TYPE, its importance matrix and its options, as one value.

A recipe is what makes two quantizations of the same tensor give the same bytes (with the same llama.cpp):
a split records it, and `add` refuses another one unless asked. Pure Python (no llama.cpp needed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from gguf.constants import GGMLQuantizationType, LlamaFileType

from ...errors import GGUFSplitError
from ...format.gguf import GGUFFile
from .imatrix import Imatrix, load_imatrix

# llama-quantize's type names that are aliases of a mix
TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


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
