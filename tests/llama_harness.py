"""Run GGUF models through stock llama.cpp (llama-cpp-python's low-level `llama_cpp` module).

Shared by tests/test_llama_cpp.py and bench/bench_llama_pss.py. The point of both is to show that what
gguf-split writes is an ordinary llama.cpp split model, so this module uses only llama.cpp's own C API:
`llama_model_load_from_splits` with an explicit [adaptor, foundation] list, or `llama_model_load_from_file`
on one path (a split's `<task>-00001-of-00002.gguf` link, from which llama.cpp finds split 2 by name).
No tokenizer is involved: prompts are token ids, and the result compared is the raw bytes of the last
token's logits, so "identical" means bitwise identical.

llama.cpp logs through one process-wide callback; `init()` installs a callback that records the messages
instead of printing them (quiet tests, and the error text of a refused load is still available), and calls
`llama_backend_init` once. Models are loaded with llama.cpp's default parameters (default load mode, i.e.
mmap on the CPU backend), as a user's llama.cpp would load them.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

try:
    import llama_cpp
except ImportError as e:  # the test skips (or fails under CI) with this reason
    llama_cpp = None
    IMPORT_ERROR: str | None = f"llama_cpp (llama-cpp-python) cannot be imported: {e}"
else:
    IMPORT_ERROR = None

# A fixed prompt of token ids, valid for the demo vocabulary (320 tokens) and any larger one: BOS, byte
# tokens and word tokens.
PROMPT: tuple[int, ...] = (1, 300, 301, 72, 302, 5, 100, 303, 259, 310)
N_CTX = 256  # llama.cpp rounds smaller contexts up to 256

_log: list[tuple[int, str]] = []
_log_callback: Any = None  # keep the ctypes callback alive as long as llama.cpp may call it


class LlamaLoadError(RuntimeError):
    """llama.cpp refused a model; the message is what llama.cpp logged at error level while loading."""


def _record(level: int, text: bytes, _user_data: Any) -> None:
    _log.append((level, text.decode("utf-8", errors="replace")))


def init() -> Any:
    """The `llama_cpp` module, with logging captured and the backend initialised (once per process)."""
    global _log_callback
    if llama_cpp is None:
        raise RuntimeError(IMPORT_ERROR)
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(_record)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


# ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous
# line). (llama-cpp-python's _logger.py still documents an older numbering.)
WARN, ERROR, CONT = 3, 4, 5


def log_mark() -> int:
    """A position in the captured log, for log_since."""
    return len(_log)


def log_since(mark: int, min_severity: int = WARN) -> list[str]:
    """Messages llama.cpp logged after `mark` at `min_severity` (WARN or ERROR) or above; a continuation
    line (level 5) has the severity of the line it continues."""
    out, last = [], 0
    for level, text in _log[mark:]:
        last = last if level == CONT else level
        if last >= min_severity:
            out.append(text)
    return out


def load_model(paths: Sequence[str | os.PathLike[str]]) -> Any:
    """Load a model: one path with `llama_model_load_from_file`, several as an explicit split list with
    `llama_model_load_from_splits` (in split order). Raises LlamaLoadError with llama.cpp's error text."""
    L = init()
    encoded = [os.fsencode(p) for p in paths]
    params = L.llama_model_default_params()
    mark = log_mark()
    if len(encoded) == 1:
        model = L.llama_model_load_from_file(encoded[0], params)
    else:
        model = L.llama_model_load_from_splits((ctypes.c_char_p * len(encoded))(*encoded), len(encoded), params)
    if not model:
        errors = "".join(log_since(mark, ERROR)).strip()
        raise LlamaLoadError(errors or f"llama.cpp could not load {[os.fsdecode(p) for p in encoded]}")
    return model


@contextmanager
def loaded(paths: Sequence[str | os.PathLike[str]]) -> Iterator[Any]:
    """A loaded model, freed on exit."""
    model = load_model(paths)
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


@contextmanager
def context(model: Any, *, n_threads: int = 1) -> Iterator[Any]:
    """A small inference context (one thread: the float results do not depend on a thread split)."""
    L = init()
    params = L.llama_context_default_params()
    params.n_ctx = N_CTX
    params.n_batch = params.n_ubatch = len(PROMPT)
    params.n_threads = params.n_threads_batch = n_threads
    mark = log_mark()
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context: " + "".join(log_since(mark, ERROR)).strip())
    try:
        yield ctx
    finally:
        L.llama_free(ctx)


def decode_last_logits(model: Any, ctx: Any, tokens: Sequence[int] = PROMPT) -> bytes:
    """Decode `tokens` as one batch; the raw float32 bytes of all n_vocab logits of the last token."""
    L = init()
    ids = (L.llama_token * len(tokens))(*tokens)
    rc = L.llama_decode(ctx, L.llama_batch_get_one(ids, len(tokens)))
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    return ctypes.string_at(L.llama_get_logits_ith(ctx, -1), n_vocab * ctypes.sizeof(ctypes.c_float))


def last_logits(paths: Sequence[str | os.PathLike[str]], tokens: Sequence[int] = PROMPT) -> bytes:
    """Load `paths` (see load_model), decode `tokens`, free everything; the last token's logits."""
    with loaded(paths) as model, context(model) as ctx:
        return decode_last_logits(model, ctx, tokens)


def demo_models(directory: str | os.PathLike[str], *, base_seed: int = 0, **dims: int) -> dict[str, str]:
    """gguf_split.demo.make_demo_models with another base seed or other dimensions: the same tasks and
    tensor names, other weights (a "foreign" split)."""
    from gguf_split import demo

    return demo.make_demo_models(directory, dims=demo.Dims(**dims), seed=base_seed)


def retype_tensors(src: str | os.PathLike[str], dst: str | os.PathLike[str], names: Sequence[str],
                   ggml_type: int) -> str:
    """Write `dst`: `src` with the named tensors dequantized and stored as `ggml_type` (F16 or F32), every
    other tensor and every KV copied byte for byte. The same weights through another matmul kernel: what
    differs between a model and this copy is the kernels' rounding alone (the LoRA tests' yardstick)."""
    import numpy as np
    from gguf.constants import GGMLQuantizationType as Q

    from gguf_split.format.gguf import GGUFFile, align_up, encode_prefix, encode_tensor_info, to_numpy

    np_type = {Q.F16: np.float16, Q.F32: np.float32}[Q(ggml_type)]
    with GGUFFile(src) as f:
        h = f.header
        unknown = set(names) - set(h.tensor_by_name)
        if unknown:
            raise ValueError(f"{src}: no tensors {sorted(unknown)}")
        plan = []
        for t in h.tensors:
            if t.name in names:
                data = to_numpy(f.tensor_view(t), t.ggml_type, t.shape).astype(np_type).tobytes()
                plan.append((t.name, t.shape, int(ggml_type), data))
            else:
                plan.append((t.name, t.shape, t.ggml_type, bytes(f.tensor_view(t))))
        kvs = [f.raw(kv.start, kv.end) for kv in h.kvs]
        a, offsets, pos = h.alignment, [], 0
        for p in plan:
            offsets.append(pos)
            pos = align_up(pos + len(p[3]), a)
        header = encode_prefix(3, len(plan), len(kvs)) + b"".join(kvs) + b"".join(
            encode_tensor_info(n, s, q, o) for (n, s, q, _), o in zip(plan, offsets))
        with open(dst, "wb") as out:
            out.write(header + bytes(align_up(len(header), a) - len(header)))
            for p in plan:
                out.write(p[3] + bytes(align_up(len(p[3]), a) - len(p[3])))
    return os.fspath(dst)
