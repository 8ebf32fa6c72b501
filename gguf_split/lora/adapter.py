"""LoRA adapters in llama.cpp's GGUF format: extract a fine-tune's difference from its base as a LoRA, open
an adapter zero-copy, check it against a model, and compute merged tensors exactly as llama.cpp does.

    from gguf_split.lora import extract_lora, LoraAdapter, LoraModel
    report = extract_lora(open_model("chat.gguf"), open_model("base.gguf"), "chat-lora.gguf")
    print("\n".join(report.lines()))
    m = LoraModel(open_model("base.gguf"))            # or a TaskModel of a split: anything with .metadata/.tensors
    m.apply_lora("chat-lora.gguf", scale=1.0)        # O(adapter): opens the adapter, checks names and shapes
    m.tensors["blk.0.attn_q.weight"].to_numpy(merged=True)   # base + scale·alpha/r·B·A, as llama.cpp merges
    m.remove_lora("chat-lora.gguf")                  # m.tensors gives back the very same base Tensor objects

The format (checked against llama.cpp's src/llama-adapter.cpp, `llama_adapter_lora_init_impl`, and
src/llama-graph.cpp, `build_lora_mm` / `build_inp_embd`, in the llama.cpp that llama-cpp-python 0.3.36
vendors):
- KVs `general.type` = "adapter" (string), `adapter.type` = "lora" (string), `adapter.lora.alpha` (must be
  F32: llama.cpp's `gguf_get_val_f32` aborts on another type; absent means 0), `general.architecture` equal
  to the model's (compared as llama.cpp's architecture enum, i.e. by name).
- Tensor names `<model tensor>.lora_a` / `.lora_b`, both required. A name ending `_norm.weight` is skipped by
  llama.cpp's loader (a norm vector, silently ignored); any other name is an error there.
- Shapes (ne order, ne0 first) for a model tensor with ne [n_in, n_out]: `lora_a` ne [n_in, r], `lora_b`
  ne [r, n_out], the forward pass adds scale·B·(A·x) to W·x (`build_lora_mm`). For `token_embd.weight`
  ([n_embd, n_vocab]) A and B are flipped: `lora_a` ne [r, n_vocab], `lora_b` ne [r, n_embd] (B
  non-transposed), rows gathered from A by token id (`build_inp_embd`).
- Scale: `alpha ? user_scale * alpha / r : user_scale` in float32, r = `lora_b`'s ne0, per tensor
  (`llama_adapter_lora_weight::get_scale`); one alpha per file. With per-tensor ranks the extractor folds
  r/alpha into the factors, so every tensor's product is exact whatever its rank.
- Tied output head: a model without `output.weight` reuses `token_embd.weight` for the output matmul
  (TENSOR_DUPLICATED, same tensor name), and `build_lora_mm` looks adapters up by name: a `token_embd` LoRA
  is then applied to the output head with the flipped (embedding) layout, and ggml's shape assertion
  (`GGML_ASSERT(ggml_can_mul_mat(a, b))`) aborts the process at the first decode (tried here with ranks 8 and
  64 = n_embd). Such a LoRA is refused here (tests/test_lora_llama.py shows the abort in a subprocess).

Extraction (`extract_lora`): for each tensor the task changes, D = task − base in float32 (the base
dequantized: merged fine-tunes are F16 over a quantized base, made by adding to the dequantized base), then a
truncated SVD D ≈ U·S·Vᵀ. The rank rule, `rank="auto"`: the smallest r with

    ‖D − D_r‖_F² ≤ (τ·‖D‖_F)² + N²,        τ = `threshold` (default 0.01, i.e. 1 % of the change),

where N² = Σ ulp(w)²/12 over the task tensor's values is the expected rounding error of the task tensor's
own storage (F16, BF16 or F32; 0 for a quantized task tensor). The merged file cannot hold the fine-tune more
precisely than N, and that rounding is full-rank noise no low-rank factor can (or should) reproduce: without
the N² term, a small change stored in F16 would need a near-full rank to "fit" its rounding. `rank=N` fixes the
rank (at most min(n_in, n_out)). The error reported per tensor is recomputed from the factors as written
(after their F16 rounding), relative to ‖D‖_F, next to the rounding floor N/‖D‖_F.

Tensors a LoRA cannot express are listed and refused (GGUFSplitError) unless allow_partial=True, in which case
they are left out and listed in the report: a tensor in one model only (an untied `output.weight`, llama.cpp
issue #9065), a changed shape, 1-D tensors (norms, biases: llama.cpp's LoRA has no vector deltas), tensors
of more than 2 dimensions, integer tensors, and `token_embd.weight` of a base with a tied output head.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import xxhash
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType

from ..errors import GGUFSplitError, os_problem
from ..format.gguf import (
    ARCHITECTURE_KEY,
    GGUFFile,
    TensorInfo,
    align_up,
    encode_kv,
    encode_prefix,
    encode_tensor_info,
    to_numpy,
    type_name,
)
from ..disk.progress import QUIET, Progress

__all__ = [
    "DEFAULT_THRESHOLD", "LoraAdapter", "LoraModel", "LoraReport", "LoraSet", "LoraTensor", "LoraTensors", "Refused",
    "TensorLora", "extract_lora", "extract_lora_from_files", "lora_delta", "merged", "write_atomically",
]

K_GENERAL_TYPE = "general.type"
K_ADAPTER_TYPE = "adapter.type"
K_ALPHA = "adapter.lora.alpha"
K_NAME = "general.name"
K_BASE_DIGEST = "gguf_split.lora.base_digest"  # hex xxh3-128 of the base's target tensors (see base_digest)
K_RANK_RULE = "gguf_split.lora.rank_rule"  # "auto threshold=0.01" or "fixed 8"
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
ALIGNMENT = 32

DEFAULT_THRESHOLD = 0.01
DEFAULT_ALPHA = 1.0
FULL_SVD_MAX = 1024  # min(n_in, n_out) up to which (and m·n up to FULL_SVD_ELEMENTS) a full SVD is taken
FULL_SVD_ELEMENTS = 1 << 22
OVERSAMPLE = 16
POWER_ITERATIONS = 2

_FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}
_INT_TYPES = {Q.I8, Q.I16, Q.I32, Q.I64}
_OUT_TYPES = {"F16": Q.F16, "F32": Q.F32}


# ---------------------------------------------------------------------------------------------------------
# The math, in llama.cpp's conventions


def is_token_embd(name: str) -> bool:
    """llama.cpp's test (llama-adapter.cpp: `str_endswith(name, "token_embd.weight")`)."""
    return name.endswith(TOKEN_EMBD)


def lora_scale(user_scale: float, alpha: float, rank: int) -> np.float32:
    """`alpha ? user_scale * alpha / rank : user_scale`, in float32 as llama.cpp computes it."""
    s: np.float32 = np.float32(user_scale)
    if alpha:
        s = np.float32(np.float32(s * np.float32(alpha)) / np.float32(rank))
    return s


def lora_delta(a: np.ndarray, b: np.ndarray, name: str) -> np.ndarray:
    """B·A in numpy order (the model tensor's reversed ne), float32, from A and B in numpy order (reversed
    ne), without the scale. For token_embd the layout is flipped (A is [n_vocab, r], B is [n_embd, r])."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    d: np.ndarray
    if is_token_embd(name):
        d = a @ b.T  # (n_vocab, r) @ (r, n_embd): ggml_mul_mat(b, get_rows(a, tokens)) per token
    else:
        d = b @ a  # (n_out, r) @ (r, n_in)
    return d


def merged(base: np.ndarray, loras: Sequence[tuple["LoraAdapter", float]], name: str) -> np.ndarray:
    """base + Σ scale·(alpha/r)·B·A for every adapter that targets `name`, in float32 and in the given order,
    as llama-export-lora computes a merged tensor before its F16 cast (tools/export-lora: delta = B·A in F32,
    `ggml_scale`, then `ggml_add(delta, cur)` per adapter). `base` is the model tensor in numpy order
    (dequantized float32, e.g. `Tensor.to_numpy()`); it is not modified."""
    cur = np.asarray(base, dtype=np.float32)
    copied = False
    for adapter, scale in loras:
        w = adapter.weights.get(name)
        if w is None:
            continue
        if tuple(cur.shape) != w.target_np_shape:
            raise ValueError(f"{name}: base tensor has numpy shape {cur.shape}, the LoRA makes {w.target_np_shape}")
        delta = lora_delta(w.a.to_numpy(), w.b.to_numpy(), name)
        delta *= lora_scale(scale, adapter.alpha, w.rank)
        cur = delta + cur
        copied = True
    return cur if copied else cur.copy()


# ---------------------------------------------------------------------------------------------------------
# Opening an adapter


@dataclass(frozen=True, slots=True)
class _View:
    """A tensor of the adapter file: name, ggml type, GGUF shape, read-only view of the mapped file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: memoryview
    file: str

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_numpy(self) -> np.ndarray:
        out: np.ndarray = to_numpy(self.data, self.ggml_type, self.shape)
        return out


@dataclass(frozen=True, slots=True)
class LoraWeight:
    """One target tensor's A and B (zero-copy views of the adapter file) and its rank (B's ne0)."""

    target: str
    a: _View
    b: _View
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
        h = file.header
        kvs = h.kv_by_key

        def string(key: str, required: bool = True) -> str | None:
            kv = kvs.get(key)
            if kv is None:
                if required:
                    raise GGUFSplitError(self.path, f"not a LoRA adapter: no {key}")
                return None
            if kv.vtype is not GGUFValueType.STRING:
                raise GGUFSplitError(self.path, f"{key} is a {kv.vtype.name}, llama.cpp needs a string")
            v = file.kv_value(key)
            return v if isinstance(v, str) else v.decode("utf-8", "replace")

        if string(K_GENERAL_TYPE) != "adapter":
            raise GGUFSplitError(self.path, f"not a LoRA adapter: general.type is {string(K_GENERAL_TYPE)!r}, not 'adapter'")
        if string(K_ADAPTER_TYPE) != "lora":
            raise GGUFSplitError(self.path, f"not a LoRA adapter: adapter.type is {string(K_ADAPTER_TYPE)!r}, not 'lora'")
        self.architecture: str = string(ARCHITECTURE_KEY)  # type: ignore[assignment]
        akv = kvs.get(K_ALPHA)
        if akv is None:
            self.alpha = 0.0  # llama.cpp: a missing alpha reads as 0, i.e. no alpha/r scaling
        elif akv.vtype is not GGUFValueType.FLOAT32:
            raise GGUFSplitError(self.path, f"{K_ALPHA} is a {akv.vtype.name}; llama.cpp reads it as F32 and aborts "
                                            f"on any other type")
        else:
            self.alpha = float(file.kv_value(K_ALPHA))
            if not math.isfinite(self.alpha):
                raise GGUFSplitError(self.path, f"{K_ALPHA} is {self.alpha}")
        self.base_digest: str | None = string(K_BASE_DIGEST, required=False)
        self.rank_rule: str | None = string(K_RANK_RULE, required=False)
        self.name: str | None = string(K_NAME, required=False)

        halves: dict[str, dict[str, TensorInfo]] = {}
        self.ignored: list[str] = []  # `*_norm.weight` tensors: llama.cpp's loader skips them
        for t in h.tensors:
            if t.name.endswith(SUFFIX_A) or t.name.endswith(SUFFIX_B):
                halves.setdefault(t.name[:-len(SUFFIX_A)], {})[t.name[-1]] = t
            elif t.name.endswith("_norm.weight"):
                self.ignored.append(t.name)
            else:
                raise GGUFSplitError(self.path, f"tensor {t.name!r} has neither a .lora_a nor a .lora_b suffix "
                                                f"(llama.cpp refuses the file)")
        weights: dict[str, LoraWeight] = {}
        for target, pair in halves.items():
            if set(pair) != {"a", "b"}:
                missing = SUFFIX_A if "a" not in pair else SUFFIX_B
                raise GGUFSplitError(self.path, f"LoRA pair for {target!r} has no {target}{missing}")
            ta, tb = pair["a"], pair["b"]
            for t in (ta, tb):
                if len(t.shape) > 2:
                    raise GGUFSplitError(self.path, f"{t.name} has {len(t.shape)} dimensions {list(t.shape)}: "
                                                    f"per-expert (3-D) LoRAs are not supported here")
                if t.ggml_type in _INT_TYPES:
                    raise GGUFSplitError(self.path, f"{t.name} has integer type {type_name(t.ggml_type)}")
            sa, sb = _shape2(ta.shape), _shape2(tb.shape)
            if is_token_embd(target):
                # lora_a [r, n_vocab], lora_b [r, n_embd]; llama.cpp does not compare the two r's and aborts
                # in ggml_mul_mat at the first decode when they differ
                if sa[0] != sb[0]:
                    raise GGUFSplitError(self.path, f"{target}: lora_a ne {list(sa)} and lora_b ne {list(sb)} have "
                                                    f"different ranks (a token_embd LoRA is flipped: A [r, n_vocab], "
                                                    f"B [r, n_embd])")
            elif sa[1] != sb[0]:
                raise GGUFSplitError(self.path, f"{target}: lora_a ne {list(sa)} and lora_b ne {list(sb)} do not "
                                                f"chain (need A [n_in, r], B [r, n_out]; llama.cpp: 'lora_a tensor "
                                                f"is not transposed')")
            a = _View(ta.name, ta.ggml_type, sa, file.tensor_view(ta), self.path)
            b = _View(tb.name, tb.ggml_type, sb, file.tensor_view(tb), self.path)
            weights[target] = LoraWeight(target, a, b, sb[0])
        self.weights: Mapping[str, LoraWeight] = weights

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
        for target, w in self.weights.items():
            if target not in tensors:
                raise GGUFSplitError(self.path, f"LoRA tensor {target!r} does not exist in the model (another base "
                                                f"model?)")
            t = tensors[target]
            if len(t.shape) > 2:
                raise GGUFSplitError(self.path, f"{target}: the model tensor has ne {list(t.shape)}, more than 2 "
                                                f"dimensions")
            if _shape2(t.shape) != w.target_shape:
                flip = " (token_embd's A and B are flipped)" if is_token_embd(target) else ""
                raise GGUFSplitError(self.path, f"{target}: LoRA A ne {list(w.a.shape)}, B ne {list(w.b.shape)} fit "
                                                f"a tensor of ne {list(w.target_shape)}, the model's has ne "
                                                f"{list(t.shape)}{flip}")
            if is_token_embd(target) and OUTPUT not in tensors:
                raise GGUFSplitError(self.path, f"{target}: the model ties its output head to token_embd (no "
                                                f"output.weight); llama.cpp would apply this LoRA to the output "
                                                f"matmul in the flipped layout and abort")
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
# Active adapters over a model


class LoraSet:
    """The active adapters (path → (adapter, scale)), in the order they were applied, and a name index.

    Adding, rescaling or removing one rebuilds the index over the active adapters' targets: O(adapter
    sizes' tensor counts), independent of the model. Readers take `snapshot()` (immutable), so a change
    never shows half-done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: tuple[tuple[str, LoraAdapter, float], ...] = ()
        self._index: Mapping[str, tuple[tuple[LoraAdapter, float], ...]] = {}

    @staticmethod
    def key(path: str | os.PathLike[str]) -> str:
        return os.path.abspath(os.fspath(path))

    def _publish(self, entries: tuple[tuple[str, LoraAdapter, float], ...]) -> None:
        index: dict[str, list[tuple[LoraAdapter, float]]] = {}
        for _, adapter, scale in entries:
            for target in adapter.weights:
                index.setdefault(target, []).append((adapter, scale))
        self._entries = entries
        self._index = {k: tuple(v) for k, v in index.items()}

    def add(self, adapter: LoraAdapter, scale: float = 1.0) -> None:
        """Activate `adapter` (keyed by its absolute path) or, if already active, set its scale."""
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, not {scale}")
        k = self.key(adapter.path)
        with self._lock:
            entries = list(self._entries)
            for i, (p, a, _) in enumerate(entries):
                if p == k:
                    entries[i] = (p, a, float(scale))
                    break
            else:
                entries.append((k, adapter, float(scale)))
            self._publish(tuple(entries))

    def remove(self, path: str | os.PathLike[str]) -> LoraAdapter:
        k = self.key(path)
        with self._lock:
            kept = tuple(e for e in self._entries if e[0] != k)
            if len(kept) == len(self._entries):
                raise KeyError(os.fspath(path))
            gone = next(e[1] for e in self._entries if e[0] == k)
            self._publish(kept)
        return gone

    def get(self, path: str | os.PathLike[str]) -> LoraAdapter | None:
        k = self.key(path)
        return next((a for p, a, _ in self._entries if p == k), None)

    def apply(self, model: Any, path: str | os.PathLike[str], scale: float = 1.0) -> LoraAdapter:
        """Open the adapter at `path`, check it against `model` and activate it with `scale`; an active
        one only changes scale. O(adapter header): nothing of the model or the adapter's data is read."""
        have = self.get(path)
        if have is not None:
            self.add(have, scale)
            return have
        adapter = LoraAdapter.open(path)
        try:
            adapter.check_against(model)
            self.add(adapter, scale)
        except BaseException:
            adapter.close()
            raise
        return adapter

    def discard(self, path: str | os.PathLike[str]) -> None:
        """Deactivate and close the adapter at `path` (GGUFSplitError if it is not active). Views a reader
        still holds keep its map alive."""
        try:
            adapter = self.remove(path)
        except KeyError:
            raise GGUFSplitError(path, "is not an active LoRA of this model") from None
        adapter.close()

    def wrap(self, tensors: Mapping[str, Any]) -> Mapping[str, Any]:
        """`tensors` itself when no adapter is active, else a LoraTensors view over it."""
        index = self._index
        return LoraTensors(tensors, index) if index else tensors

    def active(self) -> list[tuple[str, float]]:
        """[(path, scale), ...] in application order."""
        return [(p, s) for p, _, s in self._entries]

    def for_tensor(self, name: str) -> tuple[tuple[LoraAdapter, float], ...]:
        return self._index.get(name, ())

    def snapshot(self) -> Mapping[str, tuple[tuple[LoraAdapter, float], ...]]:
        return self._index

    def __len__(self) -> int:
        return len(self._entries)


class LoraTensor:
    """A model tensor with active LoRAs: the base tensor's fields and bytes unchanged (`data` is the base
    view itself), plus `loras`; `to_numpy(merged=True)` materializes base + the LoRAs."""

    __slots__ = ("base", "loras")

    def __init__(self, base: Any, loras: tuple[tuple[LoraAdapter, float], ...]) -> None:
        self.base = base
        self.loras = loras

    name = property(lambda self: self.base.name)
    ggml_type = property(lambda self: self.base.ggml_type)
    shape = property(lambda self: self.base.shape)
    data = property(lambda self: self.base.data)
    file = property(lambda self: self.base.file)
    type_name = property(lambda self: self.base.type_name)
    nbytes = property(lambda self: self.base.nbytes)

    def to_numpy(self, merged: bool = False) -> np.ndarray:
        base = self.base.to_numpy()
        return _merged(base, self.loras, self.base.name) if merged else base

    def __repr__(self) -> str:
        return f"LoraTensor({self.base.name!r}, {len(self.loras)} LoRA(s))"


_merged = merged  # LoraTensor.to_numpy's parameter shadows the function's name


class LoraTensors(Mapping[str, Any]):
    """The model's tensors; a name some active LoRA targets comes back as a LoraTensor over the original
    Tensor, every other name as the original Tensor object itself."""

    def __init__(self, base: Mapping[str, Any], index: Mapping[str, tuple[tuple[LoraAdapter, float], ...]]) -> None:
        self._base = base
        self._index = index

    def __getitem__(self, name: str) -> Any:
        t = self._base[name]
        loras = self._index.get(name)
        return LoraTensor(t, loras) if loras else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def __contains__(self, name: object) -> bool:
        return name in self._base


class LoraModel:
    """Composition over any model (`.metadata`, `.tensors`). The loader's TaskModel gets the same API by
    holding a LoraSet: `apply_lora` = `lora_set.apply(self, ...)`, `remove_lora` = `lora_set.discard(...)`,
    `loras` = `lora_set.active()`, `tensors` = `lora_set.wrap(<its tensors>)`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.lora_set = LoraSet()

    @property
    def metadata(self) -> Any:
        return self.model.metadata

    @property
    def tensors(self) -> Mapping[str, Any]:
        return self.lora_set.wrap(self.model.tensors)

    def apply_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> LoraAdapter:
        return self.lora_set.apply(self.model, path, scale)

    def remove_lora(self, path: str | os.PathLike[str]) -> None:
        self.lora_set.discard(path)

    @property
    def loras(self) -> list[tuple[str, float]]:
        return self.lora_set.active()


# ---------------------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class TensorLora:
    """One tensor of an extracted LoRA."""

    name: str
    shape: tuple[int, ...]  # the model tensor's ne
    rank: int
    rel_error: float  # ‖D − scale·B·A‖_F / ‖D‖_F, recomputed from the factors as written
    floor: float  # N / ‖D‖_F: the task tensor's own storage rounding, relative to the change
    change: float  # ‖D‖_F / ‖task tensor‖_F: how big the fine-tune's change is
    lora_bytes: int
    task_bytes: int  # the task tensor's own bytes
    method: str  # "svd" or "randomized svd (k=...)"
    bound: float | None  # the auto rule's bound on rel_error, √(τ² + floor²); None for a fixed rank

    @property
    def within(self) -> bool:
        """The error meets the auto rule's bound (fixed ranks: always True)."""
        return self.bound is None or self.rel_error <= self.bound * 1.0005


@dataclass(frozen=True)
class Refused:
    name: str
    reason: str
    task_bytes: int  # 0 when the task lacks the tensor


@dataclass
class LoraReport:
    output: str | None
    alpha: float
    dtype: str
    rank_rule: str  # "auto" or the fixed rank
    threshold: float
    tensors: list[TensorLora] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)  # left out (allow_partial) — never silently
    identical: int = 0  # tensors equal in both models (no delta)
    same_values: list[str] = field(default_factory=list)  # different bytes/type, equal values
    file_bytes: int = 0

    @property
    def lora_bytes(self) -> int:
        return sum(t.lora_bytes for t in self.tensors)

    @property
    def task_bytes(self) -> int:
        """The task's own tensors: every tensor that differs from the base (LoRA'd or refused)."""
        return sum(t.task_bytes for t in self.tensors) + sum(r.task_bytes for r in self.refused)

    @property
    def partial(self) -> bool:
        return bool(self.refused)

    def lines(self) -> list[str]:
        rule = (f"rank auto (relative error ≤ {self.threshold:g} beyond the storage rounding)"
                if self.rank_rule == "auto" else f"rank {self.rank_rule}")
        out = [f"LoRA {self.output or '(not written)'}: {len(self.tensors)} tensors, {rule}, alpha {self.alpha:g}, "
               f"{self.dtype} factors"]
        width = max((len(t.name) for t in self.tensors), default=10)
        for t in self.tensors:
            out.append(f"  {t.name:<{width}}  rank {t.rank:>4}  rel.error {t.rel_error:.2e} (floor {t.floor:.1e})  "
                       f"change {t.change:.1e}  {_size(t.lora_bytes):>9} vs {_size(t.task_bytes):>9}")
        for r in self.refused:
            out.append(f"  {r.name:<{width}}  LEFT OUT: {r.reason}")
        if self.same_values:
            out.append(f"  {len(self.same_values)} tensor(s) differ in bytes but not in value (no delta): "
                       + ", ".join(self.same_values))
        out.append(f"  {self.identical} tensor(s) identical to the base")
        total = f"total {_size(self.lora_bytes)} of factors ({_size(self.file_bytes)} file) vs " \
                f"{_size(self.task_bytes)} of the task's own tensors"
        if self.task_bytes:
            total += f" ({self.lora_bytes / self.task_bytes:.1%})"
        out.append(total)
        if self.refused:
            out.append(f"PARTIAL: {len(self.refused)} changed tensor(s) are not in the LoRA; served over the base it "
                       f"is not the task")
        return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _path_of(model: Any) -> str | None:
    for attr in ("path", "adaptor_path"):
        p = getattr(model, attr, None)
        if isinstance(p, (str, os.PathLike)):
            return os.fspath(p)
    return None


def _rounding_energy(t: Any) -> float:
    """N² = Σ ulp(w)²/12 over the task tensor's stored values: the expected energy of the rounding that
    storing base + change in this type added (uniform rounding within one ulp). 0 for quantized types."""
    qt = t.ggml_type
    if qt == Q.F16:
        w = np.frombuffer(t.data, dtype=np.float16)
        sp = np.spacing(np.abs(w)).astype(np.float64)
    elif qt == Q.F32:
        w = np.frombuffer(t.data, dtype=np.float32)
        sp = np.spacing(np.abs(w)).astype(np.float64)
    elif qt == Q.BF16:
        w = (np.frombuffer(t.data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        sp = np.spacing(np.abs(w)).astype(np.float64) * 65536.0  # bf16 keeps 7 of float32's 23 mantissa bits
    else:
        return 0.0
    return float(np.dot(sp, sp)) / 12.0


def _sq(d: np.ndarray) -> float:
    """‖d‖_F² accumulated in float64, in row chunks (no float64 copy of a big tensor)."""
    total = 0.0
    step = max(1, (1 << 22) // max(1, d.shape[1]))
    for i in range(0, d.shape[0], step):
        c = d[i:i + step].astype(np.float64)
        total += float(np.einsum("ij,ij->", c, c))
    return total


def _orth(y: np.ndarray) -> np.ndarray:
    return np.linalg.qr(y)[0]


def _randomized(d: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k SVD by a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011,
    Alg. 4.4). U·diag(s)·Vt = Q·Qᵀ·D exactly for the orthonormal basis Q found, so the residual
    ‖D‖² − Σ s² is exact for this projection (and ≥ the optimal rank-k residual)."""
    m, n = d.shape
    q = _orth(d @ rng.standard_normal((n, k), dtype=np.float32))
    for _ in range(POWER_ITERATIONS):
        q = _orth(d @ _orth(d.T @ q))
    small = (q.T @ d).astype(np.float64)
    u_s, s, vt = np.linalg.svd(small, full_matrices=False)
    return (q.astype(np.float64) @ u_s), s, vt


def _choose_rank(s: np.ndarray, total: float, bound2: float, tail: np.ndarray | None) -> int | None:
    """Smallest r ≥ 1 with residual² ≤ bound2; residual² from the exact tail energies when known (full SVD),
    else ‖D‖² − Σ_{i≤r} s_i². None if no r ≤ len(s) meets it."""
    if tail is not None:
        resid2 = tail  # tail[r] = Σ_{i≥r} s_i², r = 0..len(s)
    else:
        resid2 = total - np.concatenate(([0.0], np.cumsum(s.astype(np.float64) ** 2)))
    ok = np.nonzero(resid2[1:] <= bound2)[0]
    return int(ok[0]) + 1 if ok.size else None


@dataclass
class _Factors:
    u: np.ndarray  # (m, r)
    s: np.ndarray  # (r,)
    vt: np.ndarray  # (r, n)
    method: str


def _factorize(d: np.ndarray, rank: int | str, bound2: float, total: float) -> _Factors:
    """A truncated SVD of d (m × n, numpy order) with the rank fixed or chosen by the auto rule."""
    m, n = d.shape
    kmax = min(m, n)
    small = kmax <= FULL_SVD_MAX and m * n <= FULL_SVD_ELEMENTS
    rng = np.random.default_rng(0)  # deterministic factors for the same inputs on one machine
    if isinstance(rank, int):
        r = min(rank, kmax)
        if small or r + OVERSAMPLE >= kmax // 2:
            u, s, vt = np.linalg.svd(d, full_matrices=False)
            return _Factors(u[:, :r], s[:r], vt[:r], "svd")
        u, s, vt = _randomized(d, r + OVERSAMPLE, rng)
        return _Factors(u[:, :r], s[:r], vt[:r], f"randomized svd (k={r + OVERSAMPLE})")
    if not small:
        k = min(64, kmax)
        while k + OVERSAMPLE < kmax // 2:
            u, s, vt = _randomized(d, k + OVERSAMPLE, rng)
            r = _choose_rank(s[:k], total, bound2, None)
            if r is not None:
                return _Factors(u[:, :r], s[:r], vt[:r], f"randomized svd (k={k + OVERSAMPLE})")
            k *= 4
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    s64 = s.astype(np.float64) ** 2
    tail = np.concatenate((np.cumsum(s64[::-1])[::-1], [0.0]))
    r = _choose_rank(s, total, bound2, tail) or kmax
    return _Factors(u[:, :r], s[:r], vt[:r], "svd")


def _to_lora(f: _Factors, name: str, alpha: float, out_np: type) -> tuple[np.ndarray, np.ndarray]:
    """A and B arrays (numpy order, output dtype) with scale·B·A ≈ U·S·Vᵀ, scale = alpha/r in float32:
    √(S/scale) goes to each factor (balanced magnitudes, safest for F16)."""
    r = len(f.s)
    scale = float(lora_scale(1.0, alpha, r))
    root = np.sqrt(f.s.astype(np.float64) / scale)
    left = f.u.astype(np.float64) * root[None, :]  # (m, r)
    right = root[:, None] * f.vt.astype(np.float64)  # (r, n)
    if is_token_embd(name):
        a, b = left, right.T  # lora_a (n_vocab, r) = ne [r, n_vocab]; lora_b (n_embd, r) = ne [r, n_embd]
    else:
        a, b = right, left  # lora_a (r, n_in) = ne [n_in, r]; lora_b (n_out, r) = ne [r, n_out]
    if out_np is np.float16:
        big = max(float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)))
        if big >= 65504:
            raise OverflowError(f"{name}: a factor value {big:.3g} does not fit F16 (use dtype F32)")
    return np.ascontiguousarray(a, dtype=out_np), np.ascontiguousarray(b, dtype=out_np)


def _error2(d: np.ndarray, a: np.ndarray, b: np.ndarray, name: str, scale: np.float32) -> float:
    """‖D − scale·B·A‖_F², with the factors as stored, in float64 row chunks."""
    total = 0.0
    af, bf = a.astype(np.float64), b.astype(np.float64)
    if is_token_embd(name):
        rows, right = af, bf.T  # delta = A · Bᵀ
    else:
        rows, right = bf, af  # delta = B · A
    step = max(1, (1 << 21) // max(1, d.shape[1]))
    for i in range(0, d.shape[0], step):
        e = d[i:i + step].astype(np.float64) - float(scale) * (rows[i:i + step] @ right)
        total += float(np.einsum("ij,ij->", e, e))
    return total


def _classify(name: str, t: Any, b: Any, base_tensors: Mapping[str, Any]) -> str | None:
    """Why a changed tensor cannot be a LoRA target, or None."""
    if tuple(t.shape) != tuple(b.shape):
        return f"shape changed: base ne {list(b.shape)}, task ne {list(t.shape)}"
    if t.ggml_type in _INT_TYPES or b.ggml_type in _INT_TYPES:
        return "integer tensor"
    if len(t.shape) == 1:
        return "a vector (norm or bias): llama.cpp's LoRA has no vector deltas (its loader skips *_norm.weight)"
    if len(t.shape) > 2:
        return f"{len(t.shape)}-D tensor: per-expert LoRAs are not supported here"
    if is_token_embd(name) and OUTPUT not in base_tensors:
        return ("the base ties its output head to token_embd (no output.weight): llama.cpp would apply a token_embd "
                "LoRA to the output matmul in the flipped layout and abort")
    return None


def _values_equal(t: Any, b: Any) -> bool:
    if t.ggml_type == b.ggml_type:
        return False  # bytes differ (checked before) and the type is the same: values differ
    try:
        return bool(np.array_equal(t.to_numpy(), b.to_numpy()))
    except Exception:
        return False


def _dequantized(t: Any, path: str | None) -> np.ndarray:
    try:
        out: np.ndarray = t.to_numpy()
        return out
    except (NotImplementedError, ValueError, KeyError) as e:
        raise GGUFSplitError(path, f"{t.name}: cannot dequantize ggml type {type_name(t.ggml_type)}: {e}") from None


def _bytes_equal(t: Any, b: Any) -> bool:
    if t.ggml_type != b.ggml_type or tuple(t.shape) != tuple(b.shape) or len(t.data) != len(b.data):
        return False
    return bool(np.array_equal(np.frombuffer(t.data, np.uint8), np.frombuffer(b.data, np.uint8)))


def extract_lora(task: Any, base: Any, out_path: str | os.PathLike[str] | None, *,
                 rank: int | str = "auto", threshold: float = DEFAULT_THRESHOLD, allow_partial: bool = False,
                 alpha: float = DEFAULT_ALPHA, dtype: str = "F16", progress: Progress = QUIET,
                 name: str | None = None) -> LoraReport:
    """Write `task` − `base` as a llama.cpp LoRA GGUF at `out_path` (atomically; None: compute the report
    only). `task` and `base` are models (`.metadata`, `.tensors`): `open_model(...)` or a split's task.

    rank: "auto" (the module docstring's rule, with `threshold` τ) or a fixed int. alpha: written as
    `adapter.lora.alpha` (nonzero; r/alpha is folded into each tensor's factors). dtype: "F16" or "F32" factors.
    Tensors a LoRA cannot express raise GGUFSplitError naming the task unless allow_partial=True (then they
    are listed in report.refused). Identical tensors are skipped."""
    if rank != "auto" and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ValueError(f"rank must be 'auto' or a positive int, not {rank!r}")
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise ValueError(f"threshold must be in (0, 1), not {threshold!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha != 0):
        raise ValueError(f"alpha must be a finite nonzero number, not {alpha!r} (0 would mean no alpha/r scaling)")
    if float(np.float32(alpha)) != float(alpha) or not math.isfinite(float(np.float32(alpha))):
        raise ValueError(f"alpha {alpha!r} is not exact in float32 (llama.cpp stores it as F32)")
    if dtype not in _OUT_TYPES:
        raise ValueError(f"dtype must be 'F16' or 'F32', not {dtype!r}")
    out_type = _OUT_TYPES[dtype]
    out_np = np.float16 if out_type == Q.F16 else np.float32
    task_path = _path_of(task)
    if out_path is not None and os.path.exists(out_path):
        for model in (task, base):
            src = _path_of(model)
            if src is not None and os.path.exists(src) and os.path.samefile(src, out_path):
                raise GGUFSplitError(out_path, "is an input model: the LoRA would replace it")

    arch = task.metadata.get(ARCHITECTURE_KEY)
    base_arch = base.metadata.get(ARCHITECTURE_KEY)
    if not isinstance(arch, str):
        raise GGUFSplitError(task_path, "has no general.architecture")
    if arch != base_arch:
        raise GGUFSplitError(task_path, f"architecture {arch!r}, the base is {base_arch!r}: not a fine-tune of it")

    tt, bt = task.tensors, base.tensors
    report = LoraReport(None, float(alpha), dtype, "auto" if rank == "auto" else str(rank), float(threshold))
    todo: list[str] = []
    for n in list(tt) + [n for n in bt if n not in tt]:
        t, b = tt.get(n), bt.get(n)
        if b is None:
            what = " (an untied output head: llama.cpp issue #9065)" if n == OUTPUT else ""
            report.refused.append(Refused(n, f"exists in the task only{what}; a LoRA can only change tensors the "
                                             f"base has", t.nbytes))
            continue
        if t is None:
            report.refused.append(Refused(n, "exists in the base only; a LoRA cannot remove a tensor", 0))
            continue
        if _bytes_equal(t, b):
            report.identical += 1
            continue
        if tuple(t.shape) == tuple(b.shape) and _values_equal(t, b):
            report.same_values.append(n)
            continue
        why = _classify(n, t, b, bt)
        if why is not None:
            report.refused.append(Refused(n, why, t.nbytes))
            continue
        todo.append(n)
    if report.refused and not allow_partial:
        listed = "; ".join(f"{r.name}: {r.reason}" for r in report.refused)
        raise GGUFSplitError(task_path, f"{len(report.refused)} changed tensor(s) cannot be expressed as a LoRA "
                                        f"(use --allow-partial to leave them out): {listed}")

    pieces: list[tuple[str, tuple[int, ...], np.ndarray]] = []  # GGUF name, ne, data (numpy order)
    with progress.bar("extract", sum(tt[n].nbytes for n in todo)) as bar:
        for n in todo:
            t, b = tt[n], bt[n]
            tn = _dequantized(t, task_path)  # numpy order (n_out, n_in); token_embd (n_vocab, n_embd)
            d = np.ascontiguousarray(tn - _dequantized(b, _path_of(base)), dtype=np.float32)
            total = _sq(d)
            if total == 0.0:
                report.same_values.append(n)
                bar.advance(t.nbytes)
                continue
            floor2 = _rounding_energy(t)
            bound2 = threshold ** 2 * total + floor2
            f = _factorize(d, rank, bound2, total)
            try:
                a, bm = _to_lora(f, n, alpha, out_np)
            except OverflowError as e:
                raise GGUFSplitError(task_path, str(e)) from None
            scale = lora_scale(1.0, alpha, len(f.s))
            err2 = _error2(d, a, bm, n, scale)
            if rank == "auto" and err2 > bound2 * 1.001 and len(f.s) < min(d.shape):
                # rounding the factors (or a randomized basis) missed the bound: take a full SVD, one more rank
                u, s, vt = np.linalg.svd(d, full_matrices=False)
                r = len(f.s)
                while err2 > bound2 * 1.001 and r < len(s):
                    r = min(len(s), r + max(1, r // 8))
                    f = _Factors(u[:, :r], s[:r], vt[:r], "svd")
                    a, bm = _to_lora(f, n, alpha, out_np)
                    scale = lora_scale(1.0, alpha, r)
                    err2 = _error2(d, a, bm, n, scale)
            r = len(f.s)
            if is_token_embd(n):
                ne_a, ne_b = (r, d.shape[0]), (r, d.shape[1])
            else:
                ne_a, ne_b = (d.shape[1], r), (r, d.shape[0])
            pieces.append((n + SUFFIX_A, ne_a, a))
            pieces.append((n + SUFFIX_B, ne_b, bm))
            report.tensors.append(TensorLora(
                n, tuple(t.shape), r, math.sqrt(err2 / total), math.sqrt(floor2 / total),
                math.sqrt(total / max(_sq(tn), 1e-300)), a.nbytes + bm.nbytes, t.nbytes, f.method,
                math.sqrt(bound2 / total) if rank == "auto" else None))
            del tn, d
            bar.advance(t.nbytes)

    if out_path is not None:
        if not pieces:
            raise GGUFSplitError(task_path, "no tensor differs from the base in a way a LoRA can hold: nothing to write")
        kvs = _adapter_kvs(task, base, arch, alpha, rank, threshold, name,
                           base_digest(bt, [t.name for t in report.tensors]))
        header, offsets, size = _layout(kvs, [(p, ne, out_type) for p, ne, _ in pieces])

        def write(f: BinaryIO) -> None:
            f.write(header)
            pos = len(header)
            for (_, _, data), off in zip(pieces, offsets):
                target = len(header) + off
                f.write(bytes(target - pos))
                f.write(memoryview(data.tobytes() if not data.flags.c_contiguous else data.data).cast("B"))
                pos = target + data.nbytes
            f.write(bytes(size - pos))

        write_atomically(out_path, write)
        report.output = os.fspath(out_path)
        report.file_bytes = size
    return report


def _adapter_kvs(task: Any, base: Any, arch: str, alpha: float, rank: int | str, threshold: float,
                 name: str | None, digest: str) -> list[bytes]:
    S = GGUFValueType.STRING
    md = task.metadata
    if name is None:
        name = f"LoRA: {md.get('general.name', 'task')} over {base.metadata.get('general.name', 'base')}"
    out = [
        encode_kv(ARCHITECTURE_KEY, S, arch),
        encode_kv(K_GENERAL_TYPE, S, "adapter"),
        encode_kv(K_NAME, S, name),
        encode_kv(K_ADAPTER_TYPE, S, "lora"),
        encode_kv(K_ALPHA, GGUFValueType.FLOAT32, float(alpha)),
        encode_kv(K_RANK_RULE, S, f"auto threshold={threshold:g}" if rank == "auto" else f"fixed {rank}"),
        encode_kv(K_BASE_DIGEST, S, digest),
    ]
    # the architecture's hyperparameters, as the task has them (llama.cpp ignores them in an adapter; they
    # document what the LoRA was made for)
    prefix = arch + "."
    for key in md:
        if not key.startswith(prefix):
            continue
        fld = md.field(key) if hasattr(md, "field") else None
        if fld is None or (fld.type is GGUFValueType.ARRAY and fld.subtype is GGUFValueType.ARRAY):
            continue
        out.append(encode_kv(key, fld.type, fld.value, fld.subtype))
    return out


def _layout(kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int]]) -> tuple[bytes, list[int], int]:
    """Header bytes, each tensor's offset in the data section, and the file size (every tensor aligned)."""
    from gguf.constants import GGML_QUANT_SIZES

    offsets, pos = [], 0
    for _, ne, qt in tensors:
        offsets.append(pos)
        block, size = GGML_QUANT_SIZES[Q(qt)]
        pos = align_up(pos + math.prod(ne) // block * size, ALIGNMENT)
    infos = b"".join(encode_tensor_info(n, ne, qt, o) for (n, ne, qt), o in zip(tensors, offsets))
    header = encode_prefix(3, len(tensors), len(kvs)) + b"".join(kvs) + infos
    header += bytes(align_up(len(header), ALIGNMENT) - len(header))
    return header, offsets, len(header) + pos


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(f)` into a temporary file beside `path`, fsync it, rename it into place,
    fsync the directory. A failure leaves no temporary file and `path` untouched. (One function, so the
    split's own output machinery can replace it.)"""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise GGUFSplitError(path, f"cannot write: {os_problem(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise GGUFSplitError(path, f"cannot write: {os_problem(e)}") from None
        raise


def extract_lora_from_files(task_path: str | os.PathLike[str], base_path: str | os.PathLike[str],
                            out_path: str | os.PathLike[str] | None, **kwargs: Any) -> LoraReport:
    """extract_lora on two plain GGUF model files."""
    from ..format.model import open_model

    with open_model(task_path) as task, open_model(base_path) as base:
        return extract_lora(task, base, out_path, **kwargs)
