"""The recipe: llama-quantize's TYPE, its importance matrix and its options, as one value.

A recipe is what makes two quantizations of the same tensor give the same bytes (with the same llama.cpp):
a split records it, and `add` refuses another one unless asked. Pure Python (no llama.cpp needed).
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from gguf.constants import GGMLQuantizationType, LlamaFileType

from ...errors import GGUFSplitError
from ...format.gguf import GGUFFile
from ...format.records import RecipeRecord
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
    include_weights: tuple[str, ...] = ()
    exclude_weights: tuple[str, ...] = ()
    template_name: str = ""  # the template model's file name, and the sha256 of its (name, type) list
    template_types_sha256: str = ""

    def imatrix_vector(self, name: str) -> np.ndarray | None:
        return None if self.imatrix is None else self.imatrix.entries.get(name)

    def options_text(self) -> str:
        """llama-quantize's options besides TYPE and --imatrix, canonical (recorded; compared by `add`)."""
        parts = ["--allow-requantize"] * self.allow_requantize + ["--leave-output-tensor"] * self.leave_output_tensor
        parts += ["--pure"] * self.pure
        for flag, t in (("--output-tensor-type", self.output_tensor_type),
                        ("--token-embedding-type", self.token_embedding_type)):
            if t is not None:
                parts += [flag, GGMLQuantizationType(t).name.lower()]
        for flag, values in (("--include-weights", self.include_weights), ("--exclude-weights", self.exclude_weights)):
            for v in values:
                parts += [flag, v]
        return shlex.join(parts)

    def record(self) -> RecipeRecord:
        """What a split records of this recipe (the imatrix by its file's sha256, a template by its types)."""
        imx = self.imatrix
        return RecipeRecord(self.quant_type, self.ftype, self.options_text(),
                            os.path.basename(imx.path) if imx is not None else "", imx.sha256 if imx is not None else "",
                            self.template_name, self.template_types_sha256)


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
                  _ggml_type(token_embedding_type), leave_output_tensor, tuple(include_weights),
                  tuple(exclude_weights), os.path.basename(os.fspath(template)) if template is not None else "",
                  types_digest(types) if template is not None else "")


def types_digest(types: Sequence[tuple[str, int]]) -> str:
    """sha256 of a (tensor name, type) list, order-free: a template's identity in the records."""
    return hashlib.sha256("\n".join(f"{n}\t{t}" for n, t in sorted(types)).encode("utf-8", "surrogateescape")).hexdigest()


_VALUE_FLAGS = {"--output-tensor-type": "output_tensor_type", "--token-embedding-type": "token_embedding_type",
                "--include-weights": "include_weights", "--exclude-weights": "exclude_weights"}
_BOOL_FLAGS = {"--allow-requantize": "allow_requantize", "--leave-output-tensor": "leave_output_tensor",
               "--pure": "pure"}


def parse_quantize_args(text: str) -> dict[str, Any]:
    """llama-quantize's own options given as one string ("--pure --output-tensor-type q8_0") -> make_recipe's
    keywords; ValueError (one line, saying what is supported) for anything else."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot parse {text!r}: {e}") from None
    out: dict[str, Any] = {}
    supported = ", ".join([*_BOOL_FLAGS, *(f"{f} X" for f in _VALUE_FLAGS)])
    i = 0
    while i < len(words):
        w = words[i]
        if w in _BOOL_FLAGS:
            out[_BOOL_FLAGS[w]] = True
        elif w in _VALUE_FLAGS and i + 1 < len(words):
            i += 1
            key = _VALUE_FLAGS[w]
            if key.endswith("_weights"):
                out.setdefault(key, []).append(words[i])
            else:
                _ggml_type_or_value_error(words[i])
                out[key] = words[i]
        else:
            raise ValueError(f"{w!r} is not a llama-quantize option gguf-split passes on (supported: {supported})")
        i += 1
    if out.get("include_weights") and out.get("exclude_weights"):
        raise ValueError("--include-weights and --exclude-weights cannot be used together (as in llama-quantize)")
    return out


def _ggml_type_or_value_error(name: str) -> None:
    try:
        _ggml_type(name)
    except GGUFSplitError as e:
        raise ValueError(e.problem) from None


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
