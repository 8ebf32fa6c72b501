"""Helpers the tests share: tiny GGUF models written with gguf's own GGUFWriter (never committed files),
tiny full-precision llama models and importance matrices for the quantization tests, and the checks of the
command line's one-line refusals. Fixtures live in conftest.py."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from gguf_split.demo import Dims, add_tokenizer

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


# ---------------------------------------------------------------------------------------------------------
# Tiny full-precision llama models and importance matrices for the quantization tests.
# 
# The models are real llama.cpp models (its quantizer loads the architecture's hyperparameters), at F16 by
# default, with rows of 256 columns so the k-quant mixes apply (a smaller n_embd would make every tensor
# fall back). Importance matrices are written in both formats llama-imatrix writes: GGUF (`<name>.in_sum2`
# + `<name>.counts`, F32, and the `imatrix.*` KVs) and the legacy `.dat`.

SMALL = dict(n_embd=256, n_ff=256, n_layer=8, n_head=2, n_head_kv=1, n_vocab=320)


def make_model(path: str | os.PathLike[str], *, n_embd: int = 256, n_ff: int = 256, n_layer: int = 8,
               n_head: int = 2, n_head_kv: int = 1, n_vocab: int = 320, dtype: str = "f16",
               output: bool = False, seed: int = 0, changed: Iterable[str] = (), n_expert: int = 0,
               extra: Callable[[GGUFWriter, np.random.Generator], None] | None = None,
               kvs: Callable[[GGUFWriter], None] | None = None) -> str:
    """A llama model with random weights in `dtype` (f16, bf16 or f32; norms F32). `changed`: tensors drawn
    from another seed (a fine-tune); `output`: an untied output head; `n_expert`: a mixture of experts (3-D
    `ffn_*_exps` tensors, an F32 router), as Mixtral is in llama.cpp's llama architecture."""
    d = Dims(n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv)
    changed = set(changed)
    w = GGUFWriter(os.fspath(path), "llama")
    w.add_name("quant test")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_vocab_size(n_vocab)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    w.add_file_type({"f32": 0, "f16": 1, "bf16": 32}[dtype])
    add_tokenizer(w, d)
    if kvs is not None:
        kvs(w)

    def add(name: str, shape: tuple[int, ...], norm: bool = False) -> None:
        # one generator per tensor: a tensor's bytes depend on its name and seed only
        rng = np.random.default_rng([seed + (1000 if name in changed else 0), *name.encode()])
        np_shape = tuple(reversed(shape))
        if norm:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(np_shape)).astype(np.float32))
            return
        x = (rng.standard_normal(np_shape) * 0.05).astype(np.float32)
        if dtype == "f16":
            w.add_tensor(name, x.astype(np.float16))
        elif dtype == "bf16":
            from gguf.constants import GGMLQuantizationType as Q
            bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for test data
            w.add_tensor(name, bits.view(np.uint8).reshape(*np_shape[:-1], np_shape[-1] * 2), raw_dtype=Q.BF16)
        else:
            w.add_tensor(name, x)

    hd = n_embd // n_head
    add("token_embd.weight", (n_embd, n_vocab))
    for i in range(n_layer):
        add(f"blk.{i}.attn_norm.weight", (n_embd,), True)
        add(f"blk.{i}.attn_q.weight", (n_embd, n_embd))
        add(f"blk.{i}.attn_k.weight", (n_embd, n_head_kv * hd))
        add(f"blk.{i}.attn_v.weight", (n_embd, n_head_kv * hd))
        add(f"blk.{i}.attn_output.weight", (n_embd, n_embd))
        add(f"blk.{i}.ffn_norm.weight", (n_embd,), True)
        if n_expert:
            add(f"blk.{i}.ffn_gate_inp.weight", (n_embd, n_expert), True)
            add(f"blk.{i}.ffn_gate_exps.weight", (n_embd, n_ff, n_expert))
            add(f"blk.{i}.ffn_up_exps.weight", (n_embd, n_ff, n_expert))
            add(f"blk.{i}.ffn_down_exps.weight", (n_ff, n_embd, n_expert))
            continue
        add(f"blk.{i}.ffn_gate.weight", (n_embd, n_ff))
        add(f"blk.{i}.ffn_up.weight", (n_embd, n_ff))
        add(f"blk.{i}.ffn_down.weight", (n_ff, n_embd))
    add("output_norm.weight", (n_embd,), True)
    if output:
        add("output.weight", (n_embd, n_vocab))
    if extra is not None:
        extra(w, np.random.default_rng(seed + 7))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def matmul_inputs(n_embd: int = 256, n_ff: int = 256, n_layer: int = 8, n_head: int = 2, n_head_kv: int = 1,
                  n_expert: int = 0, **_: int) -> dict[str, int]:
    """name -> values llama-imatrix records for make_model's model: the row length (ne0), times the experts
    for expert tensors (tied head: token_embd is the output matmul's weight)."""
    out = {"token_embd.weight": n_embd}
    for i in range(n_layer):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            out[f"blk.{i}.{t}.weight"] = n_embd
        if n_expert:
            out[f"blk.{i}.ffn_gate_inp.weight"] = n_embd
            for t, n in (("ffn_gate_exps", n_embd), ("ffn_up_exps", n_embd), ("ffn_down_exps", n_ff)):
                out[f"blk.{i}.{t}.weight"] = n * n_expert
            continue
        for t, n in (("ffn_gate", n_embd), ("ffn_up", n_embd), ("ffn_down", n_ff)):
            out[f"blk.{i}.{t}.weight"] = n
    return out


def random_entries(sizes: dict[str, int], seed: int = 0, n_expert: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (sums, counts) as llama-imatrix accumulates them (positive sums; counts per expert for the
    `_exps` tensors of a model of `n_expert` experts, one of them never routed to)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in sizes.items():
        experts = n_expert if "_exps" in name else 1
        n //= experts
        counts = rng.integers(100, 5000, size=experts).astype(np.float32)
        if experts > 1:
            counts[1] = 0  # an expert the data never reached: llama-quantize uses ones for it
        sums = (rng.gamma(2.0, 1.0, size=n * experts) * np.repeat(counts, n)).astype(np.float32)
        out[name] = (sums, counts)
    return out


def write_imatrix_gguf(path: str | os.PathLike[str], entries: dict[str, tuple[np.ndarray, np.ndarray]], *,
                       datasets: Sequence[str] | None = ("train.txt",), chunk_count: int | None = 10,
                       chunk_size: int | None = 512, extra: Callable[[GGUFWriter], None] | None = None) -> str:
    """An imatrix as llama-imatrix (GGUF output) writes it; None leaves a metadata key out."""
    w = GGUFWriter(os.fspath(path), arch="llama")
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    if datasets is not None:
        w.add_array("imatrix.datasets", list(datasets))
    if chunk_count is not None:
        w.add_uint32("imatrix.chunk_count", chunk_count)
    if chunk_size is not None:
        w.add_uint32("imatrix.chunk_size", chunk_size)
    if extra is not None:
        extra(w)
    for name in sorted(entries):
        sums, counts = entries[name]
        sums, counts = np.asarray(sums, np.float32), np.asarray(counts, np.float32)
        nmat = max(counts.size, 1)
        # llama-imatrix writes [ne0, nmat] and [1, nmat]; a size that does not divide stays flat
        w.add_tensor(f"{name}.in_sum2", sums.reshape(nmat, -1) if sums.size % nmat == 0 else sums)
        w.add_tensor(f"{name}.counts", counts.reshape(counts.size, 1) if counts.size else counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def dat_bytes(entries: Sequence[tuple[bytes | str, int, np.ndarray]], *, chunk_count: int | None = 10,
              dataset: bytes | str | None = b"train.txt") -> bytes:
    """A legacy imatrix: (name, ncall, values already scaled by ncall) per entry, then the optional tail."""
    out = [struct.pack("<i", len(entries))]
    for name, ncall, values in entries:
        raw = name.encode() if isinstance(name, str) else name
        v = np.asarray(values, np.float32)
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, v.size), v.astype("<f4").tobytes()]
    if chunk_count is not None:
        out.append(struct.pack("<i", chunk_count))
        if dataset is not None:
            raw = dataset.encode() if isinstance(dataset, str) else dataset
            out += [struct.pack("<i", len(raw)), raw]
    return b"".join(out)


def write_imatrix_dat(path: str | os.PathLike[str], entries: dict[str, tuple[np.ndarray, np.ndarray]], **kw: object) -> str:
    """The legacy file llama-imatrix --output-format dat writes for the same accumulated data."""
    rows = []
    for name in sorted(entries):
        sums, counts = entries[name]
        ncall = int(counts.max())  # chunk size 1: ncall = max count
        per = sums.size // counts.size
        vals = np.array([sums[i] / counts[i // per] * ncall for i in range(sums.size)], np.float32)
        rows.append((name, ncall, vals))
    with open(path, "wb") as f:
        f.write(dat_bytes(rows, **kw))
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------------------
# The version-1 pack writer, from git history: packs it writes must stay readable, and byte-identical to
# what today's writer makes when no version-2 codec is needed.

# the last commit whose pack writer was container.py (before the writer became stages, issue 18, and before
# pack format 2); a change that alters a pack's bytes on purpose sets this to its own commit
OLD_WRITER = "d9942910d2712a008faa5063ca1e557adef25ef8"


def pack_with_old_writer(tasks: dict[str, str], out: Path, work: Path) -> None:
    """Pack `tasks` into `out` with the package of commit OLD_WRITER (extracted under `work`, run in a child
    process: `pack` is the API both have). Skips the test outside a git checkout holding that commit."""
    import io
    import json
    import subprocess
    import tarfile

    import pytest

    repo = Path(__file__).resolve().parents[1]  # the checkout's root
    try:
        archive = subprocess.run(["git", "-C", os.fspath(repo), "archive", "--format=tar", OLD_WRITER, "gguf_split"],
                                 check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git checkout holding commit {OLD_WRITER[:12]}")
    old = work / "old-writer"
    old.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        try:
            tar.extractall(old, filter="data")
        except TypeError:  # a Python without extraction filters (our own archive: nothing to filter)
            tar.extractall(old)
    script = ("import json, sys\nfrom gguf_split.pack.transport import pack\n"
              "pack(sys.argv[2], tasks=json.loads(sys.argv[1]), threads=2)\n")
    subprocess.run([sys.executable, "-c", script, json.dumps(tasks), os.fspath(out)],
                   check=True, env={**os.environ, "PYTHONPATH": os.fspath(old)}, cwd=work)
