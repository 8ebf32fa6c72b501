"""Micro-benchmark of the strict header reader on a synthetic header (no model files needed).

A header of a 262,144-token vocabulary (tokens, scores, token types: the shape of Gemma-3's tokenizer;
`--merges 280000` adds a Llama-3-like merges array) and 2,000 tensor infos, built in memory with
gguf_format's encoders. Times, best of N:
- `parse_header` of the whole header, first walk (vocabulary memo cleared) and replayed from the memo;
- `parse_tensor_infos` of the 2,000 tensor-info records alone (what the runtime loader reads to open a task);
- `decode_value` of the 262,144-token string array (what the loader's metadata does on first use).

    python bench/bench_header_parse.py [--rounds 15] [--merges 0]
"""

from __future__ import annotations

import argparse
import random
import time

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V

from gguf_split.format.gguf import (
    _WALKED,
    align_up,
    decode_value,
    encode_kv,
    encode_prefix,
    encode_tensor_info,
    parse_header,
    parse_tensor_infos,
)

N_TOKENS = 262_144
N_TENSORS = 2_000


def synthetic_header(n_merges: int = 0) -> tuple[bytes, bytes, int]:
    """(header bytes, the tensor-info records alone, file size the header's tensors need)."""
    rnd = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz\u00e9\u4e2d\u2581"
    tokens = ["".join(rnd.choices(alphabet, k=rnd.randint(1, 12))) + str(i) for i in range(N_TOKENS)]
    merges = [f"{tokens[rnd.randrange(N_TOKENS)]} {tokens[rnd.randrange(N_TOKENS)]}" for _ in range(n_merges)]
    kvs = [
        encode_kv("general.architecture", V.STRING, "llama"),
        encode_kv("general.name", V.STRING, "synthetic"),
        encode_kv("llama.block_count", V.UINT32, 80),
        encode_kv("tokenizer.ggml.model", V.STRING, "gpt2"),
        encode_kv("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING),
        encode_kv("tokenizer.ggml.scores", V.ARRAY, [float(-i) for i in range(N_TOKENS)], V.FLOAT32),
        encode_kv("tokenizer.ggml.token_type", V.ARRAY, [1] * N_TOKENS, V.INT32),
    ]
    if merges:
        kvs.append(encode_kv("tokenizer.ggml.merges", V.ARRAY, merges, V.STRING))
    infos, offset = [], 0
    kinds = [(Q.Q4_K, (4096, 4096)), (Q.F32, (4096,)), (Q.Q6_K, (4096, 14336)), (Q.Q8_0, (14336, 4096))]
    for i in range(N_TENSORS):
        qt, shape = kinds[i % len(kinds)]
        infos.append(encode_tensor_info(f"blk.{i // 4}.tensor_{i % 4}.weight", shape, int(qt), offset))
        block, size = GGML_QUANT_SIZES[qt]
        n = 1
        for d in shape:
            n *= d
        offset = align_up(offset + n // block * size, 32)
    ti = b"".join(infos)
    header = encode_prefix(3, N_TENSORS, len(kvs)) + b"".join(kvs) + ti
    return header, ti, align_up(len(header), 32) + offset


def best(fn, rounds: int) -> tuple[float, float]:
    """Best wall time and best CPU time of `rounds` calls (CPU time is what to compare on a shared,
    loaded machine: it leaves out the time other processes hold the core)."""
    wall, cpu = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--merges", type=int, default=0)
    args = ap.parse_args()
    header, ti, size = synthetic_header(args.merges)
    h = parse_header(header, size, "synthetic")
    tokens_kv = h.kv_by_key["tokenizer.ggml.tokens"]

    def first_walk() -> None:
        _WALKED.clear()
        parse_header(header, size, "synthetic")

    results = {
        "parse_header, first walk": best(first_walk, args.rounds),
        "parse_header, memo replay": best(lambda: parse_header(header, size, "synthetic"), args.rounds),
        "parse_tensor_infos (2,000)": best(lambda: parse_tensor_infos(ti, "synthetic", 32), args.rounds),
        "decode_value (262,144 tokens)": best(lambda: decode_value(header, V.ARRAY, tokens_kv.value_start),
                                              args.rounds),
    }
    print(f"header {len(header):,} bytes, {N_TOKENS:,} tokens, {args.merges:,} merges, {N_TENSORS:,} tensors; "
          f"best of {args.rounds}")
    print(f"  {'':32s} {'wall':>8s} {'cpu':>8s} (ms)")
    for name, (wall, cpu) in results.items():
        print(f"  {name:32s} {wall * 1000:8.2f} {cpu * 1000:8.2f}")


if __name__ == "__main__":
    main()
