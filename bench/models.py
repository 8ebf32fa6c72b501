"""Real model sets for the benchmarks, made with llama.cpp's own tools (see tools.py) and cached under
`<work>/sets/<set>/` (`<work>` = $GGUF_SPLIT_BENCH_WORK or bench/work/).

`model_set(name)` -> {task: GGUF path}. Each set is made once: every fine-tune by `llama-export-lora` from a
random LoRA adapter written here with gguf's GGUFWriter, every quantization by `llama-quantize
--allow-requantize`; each new model is then loaded once in llama-cpp-python (`Llama(model_path=...,
n_ctx=64)`: 8 greedy tokens and the top next-token logit of the prompt), the result recorded in
`<work>/sets/<set>/manifest.json`. A set whose manifest lists all its files is reused as is.

Sets (n = layer count, top quarter = the last max(1, n // 4) layers):
- `smollm2`: SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, tied embeddings) as `base`, plus
  `chat` (attn_q and attn_v of every layer), `code` (ffn_gate/up/down of the top quarter),
  `summarize` (attn_q of the top layer, plus output.weight where the base has one: neither model here has
  an output head of its own, and export-lora only rewrites tensors the base has);
- `gemma3`: Gemma-3-270M Q4_K_M (gemma3, 18 layers, tied embeddings), the same recipe;
- `smollm2-embd`: SmolLM2's base, chat and code (the same files as `smollm2`) plus `vocab`, which changes
  token_embd (the largest tensor, 30 of the model's 98 MB; tied, so it is the output head too) and the
  attention (q, k, v, output) of the top quarter;
- `smollm2-quant`: a quantization ladder of SmolLM2, each rung requantized from the original Q4_1 file:
  see QUANT_LADDER.

LoRA adapters (llama.cpp's format, checked against src/llama-adapter.cpp and tools/export-lora of the
vendored llama.cpp): KVs general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (f32),
general.architecture = the base's; for a base tensor X with ne [n_in, n_out], X.lora_a has ne [n_in, r]
and X.lora_b ne [r, n_out]; for token_embd.weight (ne [n_embd, n_vocab]) A and B are flipped: lora_a has
ne [r, n_vocab] and lora_b ne [r, n_embd]. A, B ~ N(0, 0.02^2), F32, rank 8, alpha 16: export-lora adds
alpha / r * B.A (elements ~ 1e-3, small against the weights) and writes the merged tensor as F16.

    python bench/models.py                    # make (or reuse) every set, print sizes and what they share
    python bench/models.py --sets smollm2-quant --rebuild
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA3, SMOLLM2, WORK, model_path  # noqa: E402
from ggufhdr import read_header  # noqa: E402

SETS = ("smollm2", "gemma3", "smollm2-embd", "smollm2-quant")
RANK = 8
ALPHA = 16.0
SIGMA = 0.02
PROMPT = "The capital of France is"

# task -> (llama-quantize type, extra arguments); "q4_1" is the original file itself.
QUANT_LADDER: dict[str, tuple[str, list[str]]] = {
    "q8_0": ("Q8_0", []),
    "q5_1": ("Q5_1", []),
    "q5_0": ("Q5_0", []),
    "q4_0": ("Q4_0", []),
    "q4_0-embd-q4_0": ("Q4_0", ["--token-embedding-type", "q4_0"]),
    "q4_k_m": ("Q4_K_M", []),
}


def sets_dir() -> Path:
    return WORK / "sets"


def _layers(h) -> int:
    arch = h.kv["general.architecture"]
    return int(h.kv[f"{arch}.block_count"])


def lora_recipes(base: Path) -> dict[str, list[str]]:
    """task -> target tensors of the fine-tunes of `smollm2` and `gemma3` (and chat/code of smollm2-embd)."""
    h = read_header(base)
    n = _layers(h)
    top = range(n - max(1, n // 4), n)
    summarize = [f"blk.{n - 1}.attn_q.weight"] + (["output.weight"] if h.tensor("output.weight") else [])
    return {
        "chat": [f"blk.{i}.attn_{x}.weight" for i in range(n) for x in ("q", "v")],
        "code": [f"blk.{i}.ffn_{x}.weight" for i in top for x in ("gate", "up", "down")],
        "summarize": summarize,
    }


def embd_recipe(base: Path) -> list[str]:
    h = read_header(base)
    n = _layers(h)
    top = range(n - max(1, n // 4), n)
    return ["token_embd.weight"] + [f"blk.{i}.attn_{x}.weight" for i in top for x in ("q", "k", "v", "output")]


def write_lora(base: Path, out: Path, targets: list[str], *, seed: int, rank: int = RANK, alpha: float = ALPHA,
               dtype=np.float32) -> None:
    """A random LoRA adapter for `targets` of `base`, in llama.cpp's GGUF adapter format."""
    from gguf import GGUFWriter

    h = read_header(base)
    arch = h.kv["general.architecture"]
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".part")
    w = GGUFWriter(os.fspath(tmp), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for name in targets:
        t = h.tensor(name)
        if t is None:
            raise SystemExit(f"{base}: has no tensor {name}")
        if len(t.ne) != 2:
            raise SystemExit(f"{base}: {name} has ne {t.ne}, not a matrix")
        n_in, n_out = t.ne
        # numpy shapes are GGUF ne reversed
        if name == "token_embd.weight":  # A and B flipped: lora_a ne [r, n_vocab], lora_b ne [r, n_embd]
            a = rng.normal(0, SIGMA, (n_out, rank))
            b = rng.normal(0, SIGMA, (n_in, rank))
        else:  # lora_a ne [n_in, r], lora_b ne [r, n_out]
            a = rng.normal(0, SIGMA, (rank, n_in))
            b = rng.normal(0, SIGMA, (n_out, rank))
        w.add_tensor(name + ".lora_a", a.astype(dtype))
        w.add_tensor(name + ".lora_b", b.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def export_lora(base: Path, lora: Path, out: Path, threads: int = 2) -> float:
    from tools import tool

    tmp = out.with_suffix(".part.gguf")
    dt = _run([str(tool("llama-export-lora")), "-m", str(base), "--lora", str(lora), "-o", str(tmp),
               "-t", str(threads)], out.with_suffix(".log"))
    tmp.rename(out)
    return dt


def quantize(src: Path, out: Path, qtype: str, extra: list[str], threads: int = 2) -> float:
    from tools import tool

    tmp = out.with_suffix(".part.gguf")
    dt = _run([str(tool("llama-quantize")), "--allow-requantize", *extra, str(src), str(tmp), qtype, str(threads)],
              out.with_suffix(".log"))
    tmp.rename(out)
    return dt


_VERIFY = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
out = {}
for p in sys.argv[2:]:
    t0 = time.perf_counter()
    llm = Llama(model_path=p, n_ctx=64, n_threads=2, verbose=False)
    r = llm(sys.argv[1], max_tokens=8, temperature=0.0, top_k=1)
    llm.reset()
    llm.eval(llm.tokenize(sys.argv[1].encode()))
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    top = int(logits.argmax())
    out[p] = {"text": r["choices"][0]["text"], "next_token": top, "next_logit": round(float(logits[top]), 4),
              "seconds": round(time.perf_counter() - t0, 2)}
    del llm
print(json.dumps(out))
"""


def verify_load(paths: list[Path]) -> dict[str, dict]:
    """Load each model in llama-cpp-python (fresh process) and generate 8 greedy tokens; note the top next-token logit."""
    r = subprocess.run([sys.executable, "-c", _VERIFY, PROMPT, *map(str, paths)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-cpp-python could not load {paths}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _base(name: str) -> Path:
    return model_path(GEMMA3 if name == "gemma3" else SMOLLM2)


def _make(name: str, d: Path) -> dict[str, dict]:
    """Make the set's files in d; returns task -> manifest entry (without verification)."""
    base = _base(name)
    entries: dict[str, dict] = {"base" if name != "smollm2-quant" else "q4_1":
                                {"path": str(base), "recipe": "original file"}}
    if name in ("smollm2", "gemma3"):
        jobs = [(task, targets, seed) for seed, (task, targets) in enumerate(lora_recipes(base).items(), start=1)]
    elif name == "smollm2-embd":
        for task, e in model_set("smollm2").items():
            if task in ("chat", "code"):
                entries[task] = {"path": str(e), "recipe": "the same file as in set smollm2"}
        jobs = [("vocab", embd_recipe(base), 4)]
    elif name == "smollm2-quant":
        jobs = []
        for task, (qtype, extra) in QUANT_LADDER.items():
            out = d / f"{task}.gguf"
            dt = quantize(base, out, qtype, extra)
            entries[task] = {"path": str(out), "recipe": f"llama-quantize --allow-requantize {' '.join(extra)} "
                             f"<q4_1> {qtype}".replace("  ", " "), "make_s": round(dt, 1)}
            print(f"  {name}/{task}: {qtype} {' '.join(extra)} in {dt:.1f} s", file=sys.stderr)
    else:
        raise ValueError(name)
    for task, targets, seed in jobs:
        lora = d / f"lora-{task}.gguf"
        write_lora(base, lora, targets, seed=seed)
        out = d / f"{task}.gguf"
        dt = export_lora(base, lora, out)
        entries[task] = {"path": str(out), "recipe": f"llama-export-lora of a rank-{RANK} LoRA (alpha {ALPHA}, "
                         f"seed {seed}) on {len(targets)} tensors", "targets": targets, "make_s": round(dt, 1),
                         "lora": str(lora), "lora_bytes": lora.stat().st_size}
        print(f"  {name}/{task}: export-lora of {len(targets)} tensors in {dt:.1f} s", file=sys.stderr)
    return entries


def model_set(name: str, rebuild: bool = False) -> dict[str, Path]:
    """task -> GGUF path of a benchmark set, made (and verified) on first use."""
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; sets: {', '.join(SETS)}")
    d = sets_dir() / name
    manifest = d / "manifest.json"
    if manifest.exists() and not rebuild:
        m = json.loads(manifest.read_text())
        paths = {t: Path(e["path"]) for t, e in m["tasks"].items()}
        if all(p.exists() for p in paths.values()):
            return paths
    if rebuild:
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    entries = _make(name, d)
    made = time.perf_counter() - t0
    t1 = time.perf_counter()
    checks = verify_load([Path(e["path"]) for e in entries.values()])
    for e in entries.values():
        e["bytes"] = os.path.getsize(e["path"])
        e["verify"] = checks[e["path"]]
    m = {"set": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "make_s": round(made, 1),
         "verify_s": round(time.perf_counter() - t1, 1), "prompt": PROMPT, "tasks": entries}
    manifest.write_text(json.dumps(m, indent=1))
    return {t: Path(e["path"]) for t, e in entries.items()}


def manifest(name: str) -> dict:
    return json.loads((sets_dir() / name / "manifest.json").read_text())


def sharing(paths: dict[str, Path]) -> list[str]:
    """Lines describing which tensors each model shares byte-identical with the first (the base)."""
    from hashing import tensor_digests

    digests = {t: tensor_digests(p) for t, p in paths.items()}
    tasks = list(paths)
    ref = digests[tasks[0]]
    lines = []
    for t in tasks[1:]:
        same = [n for n, v in digests[t].items() if ref.get(n) == v]
        diff = [n for n, v in digests[t].items() if ref.get(n) != v]
        by_type: dict[str, int] = {}
        for n in diff:
            by_type[digests[t][n][0]] = by_type.get(digests[t][n][0], 0) + 1
        lines.append(f"{t}: {len(same)} tensors identical to {tasks[0]} "
                     f"({sum(digests[t][n][2] for n in same) / 1e6:.1f} MB), {len(diff)} differ "
                     f"({sum(digests[t][n][2] for n in diff) / 1e6:.1f} MB: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(by_type.items())) + ")")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--rebuild", action="store_true", help="make the chosen sets again")
    args = ap.parse_args()
    for name in args.sets:
        paths = model_set(name, rebuild=args.rebuild)
        m = manifest(name)
        print(f"{name}: made {m['date']} in {m['make_s']} s, verified in {m['verify_s']} s")
        for task, e in m["tasks"].items():
            v = e["verify"]
            print(f"  {task:16} {e['bytes']:>13,} B  {v['text']!r} logit {v.get('next_logit')}  ({e['recipe']})")
        for line in sharing(paths):
            print("   ", line)


if __name__ == "__main__":
    main()
