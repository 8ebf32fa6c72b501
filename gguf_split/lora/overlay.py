"""Adapters over a loaded model: the active LoRAs of a model and the tensors they change, zero-copy.

Why a module of its own: this is the runtime half of LoRA support, the part the loader imports (lazily,
when a task first takes an adapter: a task without one never imports it). It holds no file format and no
extraction: it opens adapters through adapter.py and computes merged tensors with math.py's rule.

    m = LoraModel(open_model("base.gguf"))            # or the loader's TaskModel, which holds a LoraSet
    m.apply_lora("chat-lora.gguf", scale=1.0)         # O(adapter header): names and shapes checked
    t = m.tensors["blk.0.attn_q.weight"]              # a LoraTensor: the base view itself + its LoRAs
    t.to_numpy(merged=True)                           # base + Σ scale·alpha/r·B·A, as llama.cpp merges
    m.remove_lora("chat-lora.gguf")                   # m.tensors gives back the very same Tensor objects

A change of the active set publishes a new immutable index (target name -> the LoRAs on it): a reader
that took `tensors` sees one whole set of adapters, never a change half done, and applying or removing an
adapter costs O(the active adapters' tensor counts), whatever the model's size.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import GGUFSplitError
from .adapter import LoraAdapter
from .math import lora_delta, lora_scale

__all__ = ["LoraModel", "LoraSet", "LoraTensor", "LoraTensors", "ScaledLora", "merged"]


@dataclass(frozen=True, slots=True)
class ScaledLora:
    """An adapter with the scale the user applies it at (llama.cpp's per-adapter `scale`)."""

    adapter: LoraAdapter
    scale: float


def merged(base: np.ndarray, loras: Sequence[ScaledLora], name: str) -> np.ndarray:
    """base + Σ scale·(alpha/r)·B·A for every adapter that targets `name`, in float32 and in the given order,
    as llama-export-lora computes a merged tensor before its F16 cast (tools/export-lora: delta = B·A in F32,
    `ggml_scale`, then `ggml_add(delta, cur)` per adapter). `base` is the model tensor in numpy order
    (dequantized float32, e.g. `Tensor.to_numpy()`); it is not modified."""
    cur = np.asarray(base, dtype=np.float32)
    copied = False
    for lora in loras:
        w = lora.adapter.weights.get(name)
        if w is None:
            continue
        if tuple(cur.shape) != w.target_np_shape:
            raise ValueError(f"{name}: base tensor has numpy shape {cur.shape}, the LoRA makes {w.target_np_shape}")
        delta = lora_delta(w.a.to_numpy(), w.b.to_numpy(), name)
        delta *= lora_scale(lora.scale, lora.adapter.alpha, w.rank)
        cur = delta + cur
        copied = True
    return cur if copied else cur.copy()


_Index = Mapping[str, tuple[ScaledLora, ...]]  # target tensor name -> the active LoRAs on it, in order


class LoraSet:
    """The active adapters, keyed by absolute path in the order they were applied, and the index of their
    targets (see the module docstring). Thread-safe: changes are serialised, readers take `wrap(...)`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: Mapping[str, ScaledLora] = {}  # a dict keeps the application order
        self._index: _Index = {}

    @staticmethod
    def key(path: str | os.PathLike[str]) -> str:
        return os.path.abspath(os.fspath(path))

    def _publish(self, active: dict[str, ScaledLora]) -> None:
        index: dict[str, list[ScaledLora]] = {}
        for lora in active.values():
            for target in lora.adapter.weights:
                index.setdefault(target, []).append(lora)
        self._active = active
        self._index = {k: tuple(v) for k, v in index.items()}

    def add(self, adapter: LoraAdapter, scale: float = 1.0) -> None:
        """Activate `adapter` (keyed by its absolute path) or, if already active, set its scale (it keeps its
        place in the order)."""
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, not {scale}")
        k = self.key(adapter.path)
        with self._lock:
            active = dict(self._active)
            have = active.get(k)
            active[k] = replace(have, scale=float(scale)) if have is not None else ScaledLora(adapter, float(scale))
            self._publish(active)

    def remove(self, path: str | os.PathLike[str]) -> LoraAdapter:
        """Deactivate the adapter at `path` and return it (KeyError if it is not active)."""
        k = self.key(path)
        with self._lock:
            active = dict(self._active)
            gone = active.pop(k, None)
            if gone is None:
                raise KeyError(os.fspath(path))
            self._publish(active)
        return gone.adapter

    def get(self, path: str | os.PathLike[str]) -> LoraAdapter | None:
        lora = self._active.get(self.key(path))
        return lora.adapter if lora is not None else None

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

    def check_against(self, model: Any) -> None:
        """Every active adapter fits `model` (GGUFSplitError naming the first that does not)."""
        for lora in self._active.values():
            lora.adapter.check_against(model)

    def wrap(self, tensors: Mapping[str, Any]) -> Mapping[str, Any]:
        """`tensors` itself when no adapter is active, else a LoraTensors view over it."""
        index = self._index
        return LoraTensors(tensors, index) if index else tensors

    def active(self) -> list[tuple[str, float]]:
        """[(path, scale), ...] in application order."""
        return [(path, lora.scale) for path, lora in self._active.items()]

    def __len__(self) -> int:
        return len(self._active)


class LoraTensor:
    """A model tensor with active LoRAs: the base tensor's fields and bytes unchanged (`data` is the base
    view itself), plus `loras`; `to_numpy(merged=True)` materializes base + the LoRAs."""

    __slots__ = ("base", "loras")

    def __init__(self, base: Any, loras: tuple[ScaledLora, ...]) -> None:
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

    def __init__(self, base: Mapping[str, Any], index: _Index) -> None:
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
