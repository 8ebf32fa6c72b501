"""Quantize models tensor by tensor, giving exactly the file `llama-quantize` writes.

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
in several shards (plan_model reads one file: `split` quantizes those as a whole, family.quantize_whole), 4-D
tensors (llama.cpp's quantizer handles 3 dimensions).
`general.quantization_version` is gguf's GGML_QUANT_VERSION (ggml's GGML_QNT_VERSION is a macro, not
exported; the tests compare it with llama.cpp's output).

`llama_quantize` runs `llama_model_quantize` itself with the parameters the CLI would pass: the
fall-back for what cannot be reproduced tensor by tensor, and the oracle of the tests.
"""

from . import binding, tensor
from .binding import INSTALL_HINT, Backend, backend
from .header import imatrix_kvs, quantized_header, tensor_nbytes
from .imatrix import Imatrix, load_imatrix
from .mix import ModelPlan, PlannedTensor, plan_model
from .recipe import Recipe, make_recipe, parse_quant_type, template_types
from .tensor import default_threads, quantize_tensor, unit_key
from .whole import llama_quantize, quantize_model

__all__ = ["INSTALL_HINT", "Backend", "Imatrix", "ModelPlan", "PlannedTensor", "Recipe", "backend", "binding",
           "default_threads", "imatrix_kvs", "llama_quantize", "load_imatrix", "make_recipe", "parse_quant_type",
           "plan_model", "quantize_model", "quantize_tensor", "quantized_header", "template_types", "tensor",
           "tensor_nbytes", "unit_key"]
