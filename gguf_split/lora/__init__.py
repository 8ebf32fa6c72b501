"""LoRA adapters in llama.cpp's GGUF format: extract a fine-tune's difference from its base as a LoRA,
open an adapter zero-copy, check it against a model, overlay it on a loaded model and compute merged
tensors exactly as llama.cpp does, serve it through llama.cpp.

    from gguf_split.lora import extract_lora, LoraModel
    report = extract_lora(open_model("chat.gguf"), open_model("base.gguf"), "chat-lora.gguf")
    m = LoraModel(open_model("base.gguf"))            # or a split's TaskModel: it has apply_lora itself
    m.apply_lora("chat-lora.gguf", scale=1.0)

One module per job, each importing only the ones above it in this list (and format/, disk/; never
runtime/: the loader imports overlay.py, lazily, when a task first takes an adapter):
- math.py: llama.cpp's conventions (scale, token_embd's flipped layout) and the factorisation (SVD, rank rule);
- adapter.py: the reader (`LoraAdapter`), the format's keys, every check llama.cpp's loader makes;
- overlay.py: active adapters over a loaded model (`LoraSet`, `LoraTensor`, `LoraModel`, `merged`);
- write.py: the adapter file, written through disk.commit's Transaction;
- extract.py: `extract_lora` and its report;
- llama.py: `LlamaLora`, a split's task in llama.cpp with switchable adapters.

The format, checked against llama.cpp's src/llama-adapter.cpp (`llama_adapter_lora_init_impl`) and
src/llama-graph.cpp (`build_lora_mm` / `build_inp_embd`), in the llama.cpp that llama-cpp-python 0.3.36
vendors:
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

The names below are loaded on first use, so importing one module of the package loads no other.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "lora_delta": "math", "lora_scale": "math",
    "LoraAdapter": "adapter", "LoraWeight": "adapter", "base_digest": "adapter",
    "LoraModel": "overlay", "LoraSet": "overlay", "LoraTensor": "overlay", "LoraTensors": "overlay",
    "ScaledLora": "overlay", "merged": "overlay",
    "DEFAULT_THRESHOLD": "extract", "LoraReport": "extract", "Refused": "extract", "TensorLora": "extract",
    "extract_lora": "extract", "extract_lora_from_files": "extract",
    "LlamaLora": "llama",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gguf_split.lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .adapter import LoraAdapter, LoraWeight, base_digest
    from .extract import DEFAULT_THRESHOLD, LoraReport, Refused, TensorLora, extract_lora, extract_lora_from_files
    from .llama import LlamaLora
    from .math import lora_delta, lora_scale
    from .overlay import LoraModel, LoraSet, LoraTensor, LoraTensors, ScaledLora, merged
