"""Edge cases of llama-quantize's imatrix loader and KVs, checked against the CLI itself.

tests/assemble/test_quantize.py compares gguf_split.assemble.quantize with llama_model_quantize given the vectors this
project's loader computes; what proves the loader (and the `quantize.imatrix.*` KVs) is the llama-quantize
binary built from the same llama.cpp (bench/tools.py). For each case below, on the tests' tiny F16 llama
model (and a mixture-of-experts one), the CLI and `quantize_model` write a file and the two must be
byte-identical:

- GGUF imatrix: counts that lround rounds (2.5 -> 3), zero and negative counts (ones), an expert never
  routed to, entries for tensors the model lacks; the imatrix path longer than 127 bytes
  (`quantize.imatrix.file` is cut), datasets longer than 127 bytes;
- legacy .dat: ncall 0 (sums taken as they are), a repeated entry (the last wins), a name with a NUL (cut
  there), a partial trailing chunk count, a dataset with a NUL, no trailing data (no chunks_count KV);
- `--exclude-weights` / `--include-weights`; Q4_0 with an imatrix (the mix changes), IQ4_XS;
  `--pure`, `--output-tensor-type`, `--token-embedding-type`, `--leave-output-tensor` on an untied model.

    export GGUF_SPLIT_BENCH_WORK=/work/cache/bench-work
    python bench/check_quantize_cli.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from common import WORK  # noqa: E402
from helpers import SMALL, dat_bytes, make_model, matmul_inputs, random_entries, write_imatrix_gguf  # noqa: E402

from gguf_split.assemble import quantize as QZ  # noqa: E402

BIN = Path(os.environ.get("GGUF_SPLIT_LLAMA_BIN", WORK / "llama.cpp" / "build" / "bin"))


def cli(args: list[str], log: Path) -> None:
    r = subprocess.run([str(BIN / "llama-quantize"), *args], capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"llama-quantize {' '.join(args)} failed, see {log}")


def case(d: Path, name: str, model: str, qtype: str, imatrix: str | None, flags: list[str] = (),
         include: list[str] = (), exclude: list[str] = (), **options: object) -> bool:
    ref, ours = d / f"{name}-cli.gguf", d / f"{name}-ours.gguf"
    cli([*flags, *(["--imatrix", imatrix] if imatrix else []), model, str(ref), qtype, "2"], d / f"{name}.log")
    QZ.quantize_model(model, ours, QZ.make_recipe(qtype, imatrix, include_weights=include, exclude_weights=exclude,
                                                  **options))  # type: ignore[arg-type]
    same = ref.read_bytes() == ours.read_bytes()
    print(f"{'same' if same else 'DIFFERENT'}: {name}")
    return same


def main() -> None:
    if not (BIN / "llama-quantize").exists():
        raise SystemExit(f"llama-quantize is not built in {BIN} (python bench/tools.py)")
    with tempfile.TemporaryDirectory(prefix="qcli-") as tmp:
        d = Path(tmp)
        model = make_model(d / "f16.gguf", **SMALL)
        moe_dims = {**SMALL, "n_layer": 4, "n_expert": 4}
        moe = make_model(d / "moe.gguf", **moe_dims)
        untied = make_model(d / "untied.gguf", output=True, **SMALL)
        sizes = matmul_inputs(**SMALL)
        entries = random_entries(sizes)
        entries["blk.0.attn_q.weight"][1][0] = 2.5
        entries["blk.1.attn_q.weight"][1][0] = 0.0
        entries["blk.2.attn_q.weight"][1][0] = -3.0
        entries["not.in.model.weight"] = (np.ones(64, np.float32), np.ones(1, np.float32))
        long_dir = d / ("x" * 120)
        long_dir.mkdir()
        gguf = write_imatrix_gguf(long_dir / "imatrix.gguf", entries, datasets=["d" * 200, "second"], chunk_count=7)
        moe_imx = write_imatrix_gguf(d / "moe.gguf.imatrix", random_entries(matmul_inputs(**moe_dims), n_expert=4))

        rows = [(n, 3, v) for n, (v, _) in sorted(entries.items())]
        rows[0] = (rows[0][0], 0, rows[0][2])  # ncall 0
        rows.append((rows[1][0], 5, rows[1][2] * 2))  # repeated: the last wins
        rows[2] = (rows[2][0].encode() + b"\0junk", 4, rows[2][2])  # a NUL in the name
        dat = d / "imatrix.dat"
        dat.write_bytes(dat_bytes(rows, chunk_count=9, dataset=b"set\0.txt"))
        partial = d / "partial.dat"
        partial.write_bytes(dat_bytes(rows, chunk_count=None) + b"\x07\x01")
        bare = d / "bare.dat"
        bare.write_bytes(dat_bytes(rows, chunk_count=None))

        ok = all([
            case(d, "q4km-gguf", model, "Q4_K_M", gguf),
            case(d, "q4km-dat", model, "Q4_K_M", str(dat)),
            case(d, "q4km-partial-tail", model, "Q4_K_M", str(partial)),
            case(d, "q4km-no-tail", model, "Q4_K_M", str(bare)),
            case(d, "q4_0-gguf", model, "Q4_0", gguf),
            case(d, "iq4xs-dat", model, "IQ4_XS", str(dat)),
            case(d, "exclude", model, "Q4_K_M", gguf, ["--exclude-weights", "ffn_up"], exclude=["ffn_up"]),
            case(d, "include", model, "Q5_K_M", str(dat), ["--include-weights", "attn"], include=["attn"]),
            case(d, "pure-types", untied, "Q4_K_M", None, ["--pure", "--output-tensor-type", "q8_0",
                                                            "--token-embedding-type", "q5_k"],
                 pure=True, output_tensor_type="q8_0", token_embedding_type="q5_k"),
            case(d, "leave-output", untied, "Q5_K_S", gguf, ["--leave-output-tensor"], leave_output_tensor=True),
            case(d, "moe-q4km", moe, "Q4_K_M", moe_imx),
            case(d, "moe-q4_0", moe, "Q4_0", moe_imx),
        ])
    print("all identical" if ok else "SOME DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
