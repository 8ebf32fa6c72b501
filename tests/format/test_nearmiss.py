"""Near misses: tensors that differ only by quantization are told from fine-tuned ones, and split --dry-run
and info say so.

Models are written here with gguf's own quantizers (gguf.quants, no llama.cpp): the same float weights
quantized twice, once slightly perturbed in a few values (what another imatrix or build does: a few rounding
choices change), against weights with a low-rank change on top (a LoRA merge). The expected verdicts
follow from the test's definition (format/nearmiss.py) and are checked through the command line too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import quantize
from typer.testing import CliRunner

from gguf_split.cli.app import app
from gguf_split.format.nearmiss import Version, near_misses

ROWS, COLS = 256, 512
TENSORS = ("blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.attn_q.weight", "blk.1.ffn_up.weight")


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.05 * rng.standard_normal((ROWS, COLS))).astype(np.float32) for n in TENSORS}


LEVELS = {Q.Q4_0: 16, Q.Q5_0: 32, Q.Q8_0: 256}


def requantized(w: np.ndarray, seed: int, qtype: Q) -> np.ndarray:
    """The same weights with a few values (1 in 20) nudged by about a fifth of a quantization step, so that some
    rounding choices change, as another imatrix or build changes them."""
    rng = np.random.default_rng(seed)
    out = w.copy()
    pick = rng.random(w.shape) < 0.05
    step = 6 * 0.05 / (LEVELS[qtype] - 1)  # a block of 32 values spans about 6 standard deviations
    out[pick] += 0.2 * step * rng.standard_normal(int(pick.sum())).astype(np.float32)
    return out


def lora(w: np.ndarray, seed: int, qtype: Q) -> np.ndarray:
    """A rank-8 change whose elements are about a quarter of a quantization step."""
    scale = 0.25 * 6 * 0.05 / (LEVELS[qtype] - 1) / np.abs(w).mean()
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((ROWS, 8)) @ rng.standard_normal((8, COLS))
    return (w + scale * np.abs(w).mean() * d / np.abs(d).mean()).astype(np.float32)


def write(path: Path, tensors: dict[str, np.ndarray], qtype: Q) -> Path:
    w = GGUFWriter(path, "llama")
    w.add_name("near miss test")
    for name, x in tensors.items():
        w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(COLS, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def family(tmp_path: Path, qtype: Q) -> dict[str, Path]:
    """base; chat: base requantized, attn_q of layer 0 fine-tuned; code: base requantized, ffn_up of layer 1
    fine-tuned; both also hold blk.1.attn_q exactly as base does."""
    w = weights(0)
    chat = {n: requantized(x, 1, qtype) for n, x in w.items()}
    chat["blk.0.attn_q.weight"] = lora(w["blk.0.attn_q.weight"], 2, qtype)
    code = {n: requantized(x, 3, qtype) for n, x in w.items()}
    code["blk.1.ffn_up.weight"] = lora(w["blk.1.ffn_up.weight"], 4, qtype)
    chat["blk.1.attn_q.weight"] = code["blk.1.attn_q.weight"] = w["blk.1.attn_q.weight"]
    return {t: write(tmp_path / f"{t}.gguf", x, qtype) for t, x in (("base", w), ("chat", chat), ("code", code))}


def versions(path: Path) -> list[Version]:
    import xxhash

    from gguf_split.format.gguf import GGUFFile

    f = GGUFFile(path)
    return [Version(t.name, t.ggml_type, t.shape, xxhash.xxh3_128(f.tensor_view(t)).digest(), t.nbytes,
                    lambda t=t: f.tensor_view(t)) for t in f.header.tensors]


def test_requantized_tensors_are_near_misses_fine_tuned_ones_are_not(tmp_path: Path) -> None:
    for qtype in (Q.Q4_0, Q.Q8_0, Q.Q5_0):
        models = family(tmp_path, qtype)
        report = near_misses({t: versions(p) for t, p in models.items()})
        pairs = {p.tasks: sorted(p.tensors) for p in report.pairs}
        assert pairs == {
            ("base", "chat"): ["blk.0.ffn_up.weight", "blk.1.ffn_up.weight"],
            ("base", "code"): ["blk.0.attn_q.weight", "blk.0.ffn_up.weight"],
            ("chat", "code"): ["blk.0.ffn_up.weight"],
        }, qtype.name
        nbytes = next(v.nbytes for v in versions(models["base"]) if v.name == "blk.0.ffn_up.weight")
        # one recipe would make blk.0.ffn_up one version instead of three, blk.0.attn_q and blk.1.ffn_up two
        # instead of three (the fine-tuned one stays)
        assert report.bytes == 4 * nbytes
        assert report.pairs[0].line().startswith(f"{report.pairs[0].tasks[0]} and {report.pairs[0].tasks[1]} differ "
                                                 "in 2 tensors only by quantization (different imatrix?): quantize "
                                                 "from full precision with one recipe to share")


def test_dry_run_and_info_say_so(tmp_path: Path) -> None:
    models = family(tmp_path, Q.Q4_0)
    args = [a for t, p in models.items() for a in ("-t", f"{t}={p}")]
    runner = CliRunner()
    r = runner.invoke(app, ["split", "--dry-run", "-o", str(tmp_path / "out"), "--file-cost", "0", *args])
    assert r.exit_code == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if "only by quantization" in line]
    assert len(notes) == 3 and "note: base and chat differ in 2 tensors only by quantization" in r.stdout
    assert "in all, one recipe from full precision would share" in r.stdout
    r = runner.invoke(app, ["split", "-q", "-o", str(tmp_path / "out"), "--file-cost", "0", *args])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["info", str(tmp_path / "out")])
    assert r.exit_code == 0 and "note: base and chat differ in 2 tensors only by quantization" in r.stdout
    r = runner.invoke(app, ["info", "--json", str(tmp_path / "out")])
    assert '"near_misses"' in r.stdout
