"""Reading llama.cpp's LoRA GGUF files: `LoraAdapter.open(path)` maps one read-only and checks it as
llama.cpp's loader would; `check_against(model)` adds the checks that need the model.

Why a module of its own: the reader is what every use of an adapter goes through (the overlay on a
loaded task, llama.cpp serving in llama.py, tests and benchmarks), and it must refuse, with a
GGUFSplitError naming the file, every file llama.cpp would abort the process on or refuse with a log line
only. The format's keys live here too: the writer (write.py) writes what this reads.

The format (llama.cpp's src/llama-adapter.cpp, `llama_adapter_lora_init_impl`; the package docstring
has the whole story): KVs `general.type` = "adapter", `adapter.type` = "lora" (strings),
`adapter.lora.alpha` (F32; absent means 0), `general.architecture`; tensors `<model tensor>.lora_a` /
`.lora_b` in pairs, A ne [n_in, r] and B ne [r, n_out] (token_embd flipped: A ne [r, n_vocab], B ne [r,
n_embd]); a name ending `_norm.weight` is skipped by llama.cpp's loader, any other name is an error.
A and B stay zero-copy views of the mapped file: opening reads the header only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType

from ..errors import GGUFSplitError
from ..format.gguf import ARCHITECTURE_KEY, GGUFFile, TensorInfo, type_name
from ..format.model import Tensor
from .math import OUTPUT, is_token_embd

__all__ = ["AdapterTensor", "LoraAdapter", "LoraWeight", "base_digest"]

K_GENERAL_TYPE = "general.type"
K_ADAPTER_TYPE = "adapter.type"
K_ALPHA = "adapter.lora.alpha"
K_NAME = "general.name"
K_BASE_DIGEST = "gguf_split.lora.base_digest"  # hex xxh3-128 of the base's target tensors (see base_digest)
K_RANK_RULE = "gguf_split.lora.rank_rule"  # "auto threshold=0.01" or "fixed 8"
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
INT_TYPES = frozenset({Q.I8, Q.I16, Q.I32, Q.I64})


AdapterTensor = Tensor  # a tensor of the adapter file: the same zero-copy view as any GGUF's (format.model)


@dataclass(frozen=True, slots=True)
class LoraWeight:
    """One target tensor's A and B (zero-copy views of the adapter file) and its rank (B's ne0)."""

    target: str
    a: AdapterTensor
    b: AdapterTensor
    rank: int

    @property
    def target_shape(self) -> tuple[int, int]:
        """The model tensor's ne this pair fits: [n_in, n_out] (token_embd: [n_embd, n_vocab])."""
        if is_token_embd(self.target):
            return (self.b.shape[1], self.a.shape[1])
        return (self.a.shape[0], self.b.shape[1])

    @property
    def target_np_shape(self) -> tuple[int, int]:
        return tuple(reversed(self.target_shape))  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


def _shape2(shape: tuple[int, ...]) -> tuple[int, ...]:
    """ne padded to 2 dimensions with 1s (ggml keeps 4, unused ones are 1)."""
    return tuple(shape) + (1,) * (2 - len(shape)) if len(shape) < 2 else tuple(shape)


class LoraAdapter:
    """A llama.cpp LoRA GGUF, mapped read-only: `weights[target]` gives A and B as zero-copy views.

    Opening reads the header with gguf-split's strict reader and checks everything llama.cpp's loader
    checks on its own (types of the KVs, pairs, ranks), so a file llama.cpp would abort on is refused with a
    GGUFSplitError naming it. `check_against(model)` adds the checks that need the model."""

    def __init__(self, file: GGUFFile) -> None:
        self._file = file
        self.path = file.path
        for key, want in ((K_GENERAL_TYPE, "adapter"), (K_ADAPTER_TYPE, "lora")):
            got = _string(file, key)
            if got != want:
                raise GGUFSplitError(self.path, f"not a LoRA adapter: {key} is {got!r}, not {want!r}")
        self.architecture: str = _string(file, ARCHITECTURE_KEY)  # type: ignore[assignment]
        self.alpha = _alpha(file)
        self.base_digest: str | None = _string(file, K_BASE_DIGEST, required=False)
        self.rank_rule: str | None = _string(file, K_RANK_RULE, required=False)
        self.name: str | None = _string(file, K_NAME, required=False)
        pairs, self.ignored = _pairs(file)  # ignored: `*_norm.weight` tensors, which llama.cpp's loader skips
        self.weights: Mapping[str, LoraWeight] = {target: _weight(file, target, pair)
                                                  for target, pair in pairs.items()}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "LoraAdapter":
        f = GGUFFile(path)
        try:
            return cls(f)
        except BaseException:
            f.close()
            raise

    @property
    def targets(self) -> list[str]:
        return list(self.weights)

    @property
    def nbytes(self) -> int:
        """Bytes of A and B over all targets (what switching to this adapter reads)."""
        return sum(w.nbytes for w in self.weights.values())

    def check_against(self, model: Any, *, same_base: bool = False) -> None:
        """Raise GGUFSplitError (naming this adapter) unless llama.cpp can apply it to `model` (anything with
        `.metadata` and `.tensors`): same architecture, every target present with the shape llama.cpp expects,
        no token_embd LoRA over a tied output head. `same_base=True` also requires the target tensors to be
        byte-identical to those the adapter was extracted against (its recorded base digest), which reads
        them (O(target tensors), a few ms per 100 MB)."""
        arch = model.metadata.get(ARCHITECTURE_KEY)
        if arch != self.architecture:
            raise GGUFSplitError(self.path, f"LoRA for architecture {self.architecture!r}, the model is {arch!r}")
        tensors = model.tensors
        for w in self.weights.values():
            problem = _misfit(w, tensors)
            if problem is not None:
                raise GGUFSplitError(self.path, problem)
        if same_base:
            if self.base_digest is None:
                raise GGUFSplitError(self.path, "records no base digest (not written by gguf-split)")
            got = base_digest(tensors, self.targets)
            if got != self.base_digest:
                raise GGUFSplitError(self.path, f"was extracted against other base tensors (digest "
                                                f"{self.base_digest}, this model's {got})")

    def close(self) -> None:
        """Release the map once no view is alive (views handed out keep it)."""
        self._file.close()

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({self.path!r}, {len(self.weights)} tensors, alpha={self.alpha})"


def base_digest(tensors: Mapping[str, Any], names: Sequence[str]) -> str:
    """xxh3-128 over (name, ggml type, shape, bytes) of the named tensors, in sorted name order."""
    h = xxhash.xxh3_128()
    for name in sorted(names):
        t = tensors[name]
        h.update(f"{name}\0{int(t.ggml_type)}\0{list(t.shape)}\0".encode())
        h.update(t.data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The checks, one rule each


def _string(file: GGUFFile, key: str, required: bool = True) -> str | None:
    """A string KV, as llama.cpp's `gguf_get_val_str` reads it (another type aborts there)."""
    kv = file.header.kv_by_key.get(key)
    if kv is None:
        if required:
            raise GGUFSplitError(file.path, f"not a LoRA adapter: no {key}")
        return None
    if kv.vtype is not GGUFValueType.STRING:
        raise GGUFSplitError(file.path, f"{key} is a {kv.vtype.name}, llama.cpp needs a string")
    v = file.kv_value(key)
    return v if isinstance(v, str) else v.decode("utf-8", "replace")


def _alpha(file: GGUFFile) -> float:
    """`adapter.lora.alpha`: an F32 (llama.cpp's `gguf_get_val_f32` aborts on another type); a missing
    alpha reads as 0 there, i.e. no alpha/r scaling."""
    kv = file.header.kv_by_key.get(K_ALPHA)
    if kv is None:
        return 0.0
    if kv.vtype is not GGUFValueType.FLOAT32:
        raise GGUFSplitError(file.path, f"{K_ALPHA} is a {kv.vtype.name}; llama.cpp reads it as F32 and aborts "
                                        f"on any other type")
    alpha = float(file.kv_value(K_ALPHA))
    if not math.isfinite(alpha):
        raise GGUFSplitError(file.path, f"{K_ALPHA} is {alpha}")
    return alpha


@dataclass(frozen=True, slots=True)
class _Pair:
    a: TensorInfo
    b: TensorInfo


def _pairs(file: GGUFFile) -> tuple[dict[str, _Pair], list[str]]:
    """The `.lora_a` / `.lora_b` pairs by target, and the `*_norm.weight` tensors llama.cpp skips; any
    other tensor, or half a pair, is refused."""
    halves: dict[str, dict[str, TensorInfo]] = {}
    ignored: list[str] = []
    for t in file.header.tensors:
        if t.name.endswith(SUFFIX_A) or t.name.endswith(SUFFIX_B):
            halves.setdefault(t.name[:-len(SUFFIX_A)], {})[t.name[-1]] = t
        elif t.name.endswith("_norm.weight"):
            ignored.append(t.name)
        else:
            raise GGUFSplitError(file.path, f"tensor {t.name!r} has neither a .lora_a nor a .lora_b suffix "
                                            f"(llama.cpp refuses the file)")
    pairs: dict[str, _Pair] = {}
    for target, half in halves.items():
        if set(half) != {"a", "b"}:
            missing = SUFFIX_A if "a" not in half else SUFFIX_B
            raise GGUFSplitError(file.path, f"LoRA pair for {target!r} has no {target}{missing}")
        pairs[target] = _Pair(half["a"], half["b"])
    return pairs, ignored


def _weight(file: GGUFFile, target: str, pair: _Pair) -> LoraWeight:
    """A pair as a LoraWeight, once its dimensions, types and ranks are what llama.cpp needs."""
    for t in (pair.a, pair.b):
        if len(t.shape) > 2:
            raise GGUFSplitError(file.path, f"{t.name} has {len(t.shape)} dimensions {list(t.shape)}: "
                                            f"per-expert (3-D) LoRAs are not supported here")
        if t.ggml_type in INT_TYPES:
            raise GGUFSplitError(file.path, f"{t.name} has integer type {type_name(t.ggml_type)}")
    sa, sb = _shape2(pair.a.shape), _shape2(pair.b.shape)
    if is_token_embd(target):
        # lora_a [r, n_vocab], lora_b [r, n_embd]; llama.cpp does not compare the two r's and aborts in
        # ggml_mul_mat at the first decode when they differ
        if sa[0] != sb[0]:
            raise GGUFSplitError(file.path, f"{target}: lora_a ne {list(sa)} and lora_b ne {list(sb)} have "
                                            f"different ranks (a token_embd LoRA is flipped: A [r, n_vocab], "
                                            f"B [r, n_embd])")
    elif sa[1] != sb[0]:
        raise GGUFSplitError(file.path, f"{target}: lora_a ne {list(sa)} and lora_b ne {list(sb)} do not "
                                        f"chain (need A [n_in, r], B [r, n_out]; llama.cpp: 'lora_a tensor "
                                        f"is not transposed')")
    a = AdapterTensor(pair.a.name, pair.a.ggml_type, sa, file.tensor_view(pair.a), file.path)
    b = AdapterTensor(pair.b.name, pair.b.ggml_type, sb, file.tensor_view(pair.b), file.path)
    return LoraWeight(target, a, b, sb[0])


def _misfit(w: LoraWeight, tensors: Mapping[str, Any]) -> str | None:
    """Why llama.cpp cannot apply `w` to the model whose tensors these are, or None."""
    target = w.target
    if target not in tensors:
        return f"LoRA tensor {target!r} does not exist in the model (another base model?)"
    t = tensors[target]
    if len(t.shape) > 2:
        return f"{target}: the model tensor has ne {list(t.shape)}, more than 2 dimensions"
    if _shape2(t.shape) != w.target_shape:
        flip = " (token_embd's A and B are flipped)" if is_token_embd(target) else ""
        return (f"{target}: LoRA A ne {list(w.a.shape)}, B ne {list(w.b.shape)} fit a tensor of ne "
                f"{list(w.target_shape)}, the model's has ne {list(t.shape)}{flip}")
    if is_token_embd(target) and OUTPUT not in tensors:
        return (f"{target}: the model ties its output head to token_embd (no output.weight); llama.cpp would "
                f"apply this LoRA to the output matmul in the flipped layout and abort")
    return None
