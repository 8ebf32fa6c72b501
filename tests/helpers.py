"""Helpers the tests share: tiny GGUF models written with gguf's own GGUFWriter (never committed files),
and the checks of the command line's one-line refusals. Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

ERROR_PREFIX = "gguf-split: error: "


def one_line(code: int, stderr: str, named: str | Path, fragment: str) -> str:
    """A refusal as the command line must make it: exit 2, one line `gguf-split: error: ...` naming the file
    `named` and saying `fragment`, no traceback; the line."""
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), stderr
    assert "Traceback" not in stderr
    assert str(named) in lines[0], lines[0]
    assert fragment.lower() in lines[0].lower(), lines[0]
    return lines[0]


def command(*args: str | Path) -> list[str]:
    """The argv of `gguf-split ARGS` run as its own process (`python -m gguf_split`)."""
    return [sys.executable, "-m", "gguf_split", *map(str, args)]


# name -> (ggml type, GGUF shape ne0 first). Covers F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K.
BASE_TENSORS: dict[str, tuple[Q, tuple[int, ...]]] = {
    "token_embd.weight": (Q.Q8_0, (64, 16)),
    "blk.0.attn_norm.weight": (Q.F32, (64,)),
    "blk.0.attn_q.weight": (Q.Q4_0, (64, 64)),
    "blk.0.attn_v.weight": (Q.BF16, (64, 32)),
    "blk.0.ffn_up.weight": (Q.Q4_K, (256, 8)),
    "blk.0.ffn_down.weight": (Q.Q6_K, (256, 4)),
    "blk.1.attn_q.weight": (Q.F16, (64, 64)),
    "output_norm.weight": (Q.F32, (64,)),
}


def raw_tensor(rng: np.random.Generator, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """Random raw bytes of the right size for `qtype`/`shape`, as the uint8 byte-shaped array
    GGUFWriter.add_tensor(raw_dtype=...) takes (numpy order: reversed GGUF shape)."""
    block, size = GGML_QUANT_SIZES[qtype]
    np_shape = tuple(reversed(shape))
    byte_shape = (*np_shape[:-1], np_shape[-1] // block * size)
    return rng.integers(0, 256, size=byte_shape, dtype=np.uint8)


def write_model(path: str | os.PathLike[str], tensors: dict[str, tuple[Q, tuple[int, ...], int]], *,
                arch: str = "llama", kvs: Callable[[GGUFWriter], None] | None = None,
                alignment: int | None = None) -> str:
    """Write a GGUF with `tensors` (name -> (type, GGUF shape, seed)); byte content depends on the seed only."""
    w = GGUFWriter(os.fspath(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("test model")
    w.add_uint32(f"{arch}.block_count", 2)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "\u00e9\u4e2d"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, -3.0, -4.0])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_array("test.strings_nested", [["x", "y"], ["z"]])
    w.add_int64("test.i64", -(1 << 40))
    w.add_float64("test.f64", 2.5)
    if kvs is not None:
        kvs(w)
    for name, (qtype, shape, seed) in tensors.items():
        rng = np.random.default_rng(seed)
        w.add_tensor(name, raw_tensor(rng, qtype, shape), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def base_tensors(seed: int = 0) -> dict[str, tuple[Q, tuple[int, ...], int]]:
    return {name: (qt, shape, seed * 1000 + i) for i, (name, (qt, shape)) in enumerate(BASE_TENSORS.items())}


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_sharded(prefix: str | os.PathLike[str], tensors: dict[str, tuple[Q, tuple[int, ...], int]], n: int,
                  **kwargs: Any) -> str:
    """A model as `llama-gguf-split --split` writes it: `<prefix>-0000k-of-0000N.gguf`, the tensors spread
    in order over n shards; shard 1 holds every KV, and every shard `split.no` (u16), `split.count` (u16)
    and `split.tensors.count` (i32). Returns the first shard's path."""
    names = list(tensors)
    per = -(-len(names) // n)
    paths = []
    for k in range(n):
        path = f"{os.fspath(prefix)}-{k + 1:05d}-of-{n:05d}.gguf"
        part = {name: tensors[name] for name in names[k * per:(k + 1) * per]}

        def split_kvs(w: GGUFWriter, k: int = k) -> None:
            w.add_uint16("split.no", k)
            w.add_uint16("split.count", n)
            w.add_int32("split.tensors.count", len(names))

        if k == 0:
            user = kwargs.get("kvs")
            write_model(path, part, kvs=lambda w: (user(w) if user else None, split_kvs(w)),
                        **{a: b for a, b in kwargs.items() if a != "kvs"})
        else:
            _write_bare(path, part, split_kvs)
        paths.append(path)
    return paths[0]


def _write_bare(path: str, tensors: dict[str, tuple[Q, tuple[int, ...], int]],
                kvs: Callable[[GGUFWriter], None]) -> None:
    """A shard after the first: no architecture or model KVs, only what `kvs` adds."""
    w = GGUFWriter(path, arch="llama")
    w.kv_data[0].pop("general.architecture", None)
    kvs(w)
    for name, (qtype, shape, seed) in tensors.items():
        w.add_tensor(name, raw_tensor(np.random.default_rng(seed), qtype, shape), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
