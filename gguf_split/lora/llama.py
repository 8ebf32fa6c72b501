"""Serve a task of a split with LoRA adapters through llama.cpp (llama-cpp-python's low-level C API).

    from gguf_split.lora.llama import LlamaLora
    with LlamaLora(task.llama_cpp_paths()) as llm:          # [adaptor, foundation], or one model file
        llm.set_loras([("chat-lora.gguf", 1.0)])           # no reload: adapters load once, then switch
        logits = llm.logits(tokens)                        # float32 logits of the last token
        llm.set_loras([("chat-lora.gguf", 0.5), ("code-lora.gguf", 1.0)])
        llm.set_loras([])                                  # the bare model again

Why not `llama_cpp.Llama(lora_path=...)`: that class turns mmap off when given a LoRA (llama.py:
`use_mmap = use_mmap and lora_path is None`), so every tensor of the model, shared files included, is read
into the process's private memory. Here the model is loaded with llama.cpp's default parameters (mmap on,
from `llama_model_load_from_splits` for a split), so the shared files stay page-cache mappings every process
shares, and an adapter costs only its own A and B (llama.cpp copies them into its buffers,
`llama_adapter_lora_init`). Adapters are bound to the model and switched per context with
`llama_set_adapters_lora`, which rebuilds nothing but the compute graph.

Every adapter is checked with `LoraAdapter.check_against` (headers only) before llama.cpp sees it: a LoRA
llama.cpp would abort the whole process on (a token_embd LoRA over a tied output head, ranks that do not
chain, a non-F32 alpha) or refuse with a log line only is refused with a GGUFSplitError naming the file.

llama.cpp's objects are not thread-safe: one LlamaLora per thread. `llama_cpp` is imported on first use.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GGUFSplitError
from ..format.gguf import ARCHITECTURE_KEY, GGUFFile
from .adapter import LoraAdapter

__all__ = ["LlamaLora", "llama_cpp_module", "silence_llama_logs"]

_backend_ready = False
_quiet_callback: Any = None


def llama_cpp_module() -> Any:
    """`llama_cpp` (the `llama` extra), with llama.cpp's backend initialised once per process."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFSplitError(None, f"llama-cpp-python is not installed (pip install 'gguf-split[llama]'): {e}") from None
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def silence_llama_logs() -> None:
    """Drop llama.cpp's log lines (process-wide; benchmarks use it)."""
    global _quiet_callback
    L = llama_cpp_module()
    if _quiet_callback is None:
        _quiet_callback = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_quiet_callback, ctypes.c_void_p(0))


@dataclass(frozen=True)
class _Info:
    name: str
    shape: tuple[int, ...]
    ggml_type: int


class _Headers:
    """A model given as llama.cpp split files, seen through their headers: split 0's architecture and the
    union of the tensor names and shapes (what check_against needs; no tensor bytes)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.tensors: dict[str, _Info] = {}
        arch = None
        for i, p in enumerate(paths):
            with GGUFFile(p) as f:
                if i == 0:
                    arch = f.get(ARCHITECTURE_KEY)
                for t in f.header.tensors:
                    self.tensors[t.name] = _Info(t.name, t.shape, t.ggml_type)
        self.metadata = {ARCHITECTURE_KEY: arch}


class LlamaLora:
    """A model (one file or a list of split files) in llama.cpp with one context and switchable LoRAs."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], *, n_ctx: int = 512,
                 n_batch: int = 512, n_threads: int = 1, use_extra_bufts: bool | None = None) -> None:
        """paths: the split files in split order (e.g. `TaskModel.llama_cpp_paths()`), or one GGUF.
        n_threads=1 makes results independent of the thread split (bitwise comparisons). use_extra_bufts:
        llama.cpp's weight repacking (None: llama.cpp's default, on)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.path.abspath(os.fspath(p)) for p in paths]
        if not self.paths:
            raise ValueError("no model file")
        self._headers = _Headers(self.paths)  # refuses a missing or broken file with a clear message
        L = self._L = llama_cpp_module()
        params = L.llama_model_default_params()
        if use_extra_bufts is not None:
            params.use_extra_bufts = use_extra_bufts
        enc = [os.fsencode(p) for p in self.paths]
        if len(enc) == 1:
            model = L.llama_model_load_from_file(enc[0], params)
        else:
            model = L.llama_model_load_from_splits((ctypes.c_char_p * len(enc))(*enc), len(enc), params)
        if not model:
            raise GGUFSplitError(self.paths[0], "llama.cpp could not load the model (see its log)")
        self._model = model
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            L.llama_model_free(model)
            raise GGUFSplitError(self.paths[0], "llama.cpp could not create a context (see its log)")
        self._ctx = ctx
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        self._adapters: dict[str, Any] = {}  # abs path -> llama_adapter_lora_p (loaded once)
        self._active: list[tuple[str, float]] = []

    # adapters

    def load_adapter(self, path: str | os.PathLike[str]) -> None:
        """Check and load one adapter into llama.cpp (once; `set_loras` does it on demand)."""
        k = os.path.abspath(os.fspath(path))
        if k in self._adapters:
            return
        with LoraAdapter.open(k) as adapter:
            adapter.check_against(self._headers)
        handle = self._L.llama_adapter_lora_init(self._live_model, os.fsencode(k))
        if not handle:
            raise GGUFSplitError(k, "llama.cpp refused the LoRA adapter (see its log)")
        self._adapters[k] = handle

    def set_loras(self, loras: Sequence[tuple[str | os.PathLike[str], float]]) -> None:
        """Make exactly these adapters active with these scales (in this order); loads new ones, keeps
        the others loaded but inactive. The model is not reloaded; cached tokens are dropped by `logits`."""
        want = [(os.path.abspath(os.fspath(p)), float(s)) for p, s in loras]
        if len({p for p, _ in want}) != len(want):
            raise ValueError("an adapter is listed twice")
        for p, _ in want:
            self.load_adapter(p)
        L = self._L
        n = len(want)
        arr = (L.llama_adapter_lora_p_ctypes * max(n, 1))(*[self._adapters[p] for p, _ in want])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in want])
        if L.llama_set_adapters_lora(self._live_ctx, arr if n else None, n, scales if n else None) != 0:
            raise GGUFSplitError(None, "llama_set_adapters_lora failed")
        self._active = want

    @property
    def loras(self) -> list[tuple[str, float]]:
        return list(self._active)

    def unload_adapter(self, path: str | os.PathLike[str]) -> None:
        """Free an adapter's memory (it must not be active)."""
        k = os.path.abspath(os.fspath(path))
        if any(p == k for p, _ in self._active):
            raise ValueError(f"{k} is active: set_loras without it first")
        handle = self._adapters.pop(k, None)
        if handle is not None:
            self._L.llama_adapter_lora_free(handle)

    # inference

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """The model's own tokenizer (llama_tokenize; BOS added as the model's metadata says)."""
        L = self._L
        raw = text.encode("utf-8")
        vocab = L.llama_model_get_vocab(self._live_model)
        n_max = len(raw) + 8
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_special, False)
        if n < 0:
            raise GGUFSplitError(self.paths[0], f"tokenizing {len(raw)} bytes failed ({n})")
        return list(buf[:n])

    def _clear(self) -> None:
        self._L.llama_memory_clear(self._L.llama_get_memory(self._live_ctx), True)

    def _decode(self, tokens: Sequence[int], pos0: int, all_logits: bool) -> None:
        L = self._L
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = int(tok)
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            batch.n_tokens = n
            rc = L.llama_decode(self._live_ctx, batch)
        finally:
            L.llama_batch_free(batch)
        if rc != 0:
            raise GGUFSplitError(None, f"llama_decode returned {rc}")

    def _row(self, i: int) -> np.ndarray:
        ptr = self._L.llama_get_logits_ith(self._live_ctx, i)
        row: np.ndarray = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return row

    def logits(self, tokens: Sequence[int], *, all_positions: bool = False) -> np.ndarray:
        """Decode `tokens` from an empty cache as one batch: the last token's float32 logits (n_vocab,), or
        every position's (len(tokens), n_vocab)."""
        if not tokens or len(tokens) > min(self.n_batch, self.n_ctx):
            raise ValueError(f"need 1..{min(self.n_batch, self.n_ctx)} tokens, got {len(tokens)}")
        self._clear()
        self._decode(tokens, 0, all_positions)
        if all_positions:
            return np.stack([self._row(i) for i in range(len(tokens))])
        return self._row(-1)

    def greedy(self, tokens: Sequence[int], n: int) -> list[int]:
        """`n` tokens by argmax after `tokens` (the cache is cleared first)."""
        if len(tokens) + n > self.n_ctx:
            raise ValueError(f"{len(tokens)} + {n} tokens exceed n_ctx {self.n_ctx}")
        self._clear()
        self._decode(tokens, 0, False)
        out: list[int] = []
        pos = len(tokens)
        for _ in range(n):
            nxt = int(np.argmax(self._row(-1)))
            out.append(nxt)
            self._decode([nxt], pos, False)
            pos += 1
        return out

    # lifetime

    @property
    def _live_model(self) -> Any:
        if self._model is None:
            raise GGUFSplitError(self.paths[0], "model is closed")
        return self._model

    @property
    def _live_ctx(self) -> Any:
        if self._ctx is None:
            raise GGUFSplitError(self.paths[0], "model is closed")
        return self._ctx

    def close(self) -> None:
        L = self._L
        if self._ctx is not None:
            L.llama_free(self._ctx)
            self._ctx = None
        for handle in self._adapters.values():
            L.llama_adapter_lora_free(handle)
        self._adapters.clear()
        if self._model is not None:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaLora":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
