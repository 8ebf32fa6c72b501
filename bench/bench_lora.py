"""LoRA extraction and serving on real models: fidelity, bytes, time and memory (section *LoRA* of README.md).

Inputs: the model sets of bench/models.py (branch bench-infra): SmolLM2-135M-Instruct Q4_1 and Gemma-3-270M
Q4_K_M, each with fine-tunes made by llama.cpp's `llama-export-lora` from a random rank-8 LoRA (alpha 16,
F32 factors, recorded beside each set as lora-<task>.gguf): chat (attn_q, attn_v of every layer), code (FFN
of the top quarter), summarize (attn_q of the top layer); and smollm2-embd/vocab (token_embd, tied to the
output head, plus the top quarter's attention), which no llama.cpp LoRA can serve.

For each set: the base and its fine-tunes are split (gguf_split.split, two-file layout); each fine-tune is
extracted as a LoRA against the base (gguf_split.lora.extract_lora, rank auto, F16 factors) and:
- bytes: the extracted LoRA, the original LoRA export-lora merged, the task's own tensors, the task file;
- `merged()` against llama-export-lora: F16(gguf_split.lora.merged(base, original LoRA)) compared with the
  merged task's F16 tensors element by element (bitwise-equal fraction, max difference in F16 ulps);
- served through llama.cpp (gguf_split.lora.llama.LlamaLora: the base loaded once from its split files, mmap
  on; adapters switched with llama_set_adapters_lora, no reload), on a fixed set of prompts:
  * greedy: the merged task's 32-token greedy continuation of each prompt, against the continuations of
    the other settings (prompts whose 32 tokens are all identical; mean length of the agreeing prefix);
  * logits, teacher-forced along prompt + the merged task's continuation (every position): max |Δlogit|
    and KL(merged ‖ X), mean and max over positions, for X = base + extracted LoRA, base + original LoRA,
    base + original LoRA with its B perturbed by 1e-3 (relative, random), and the bare base;
  * yardsticks of pure rounding, along the same tokens: "kernels vs base" = the base against a copy of it
    whose LoRA-target tensors are stored as F16 (the same weights through the F16 matmul the merged model
    uses, no fine-tune at all), and "perturbed vs original" (both served); next to them "extracted vs
    original" (both served): what the extraction changes;
  * time: loading the model, the first set_loras (llama_adapter_lora_init), and a one-token decode right
    after switching adapter sets against one without a switch (the graph is re-reserved);
- memory (fresh processes, /proc/self/smaps_rollup after loading + one decode): the base split + one LoRA
  through the low-level API (mmap on), the same through llama-cpp-python's `Llama(model_path=..., lora_path=...)`
  (which turns mmap off), and the low-level API without a LoRA.

    python bench/bench_lora.py                     # smollm2, gemma3, smollm2-embd: ~45 min on 2 busy cores
    python bench/bench_lora.py --sets smollm2 --prompts 2 --tokens 8 --json out.json     # a quick look
Scratch files go to <work>/lora/ (<work> = $GGUF_SPLIT_BENCH_WORK or bench/work/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import WORK  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a Python function that returns the square of a number.",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Question: What is 12 times 7?\nAnswer:",
    "Summarize: The meeting was moved from Monday to Wednesday because the projector was broken.",
    "def fibonacci(n):",
    "Translate to French: Good morning, how are you?",
]
N_TOKENS = 32
TASK_ORDER = ("chat", "code", "summarize", "vocab")
SET_TASKS = {"smollm2-embd": ("vocab",)}  # its chat and code are smollm2's files


# ---------------------------------------------------------------------------------------------------------
# inputs


def model_set(name: str) -> tuple[dict[str, Path], dict[str, Any]]:
    """task -> path and the set's manifest; made by bench/models.py when it is there, else read as made."""
    try:
        import models  # bench/models.py (branch bench-infra)

        models.model_set(name)
    except ImportError:
        pass
    manifest = WORK / "sets" / name / "manifest.json"
    if not manifest.exists():
        raise SystemExit(f"{manifest} missing: make the set with bench/models.py --sets {name}")
    m = json.loads(manifest.read_text())
    return {t: Path(e["path"]) for t, e in m["tasks"].items()}, m


# ---------------------------------------------------------------------------------------------------------
# measures


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref: list[np.ndarray], other: list[np.ndarray]) -> dict[str, float]:
    """max |Δlogit| and KL(ref ‖ other) over every position of every prompt."""
    dmax, kls = 0.0, []
    for r, o in zip(ref, other):
        dmax = max(dmax, float(np.abs(r - o).max()))
        p, q = log_softmax(r), log_softmax(o)
        kls.append((np.exp(p) * (p - q)).sum(axis=-1))
    k = np.concatenate(kls)
    return {"max_dlogit": dmax, "kl_mean": float(k.mean()), "kl_max": float(k.max())}


def merged_vs_export_lora(base_path: Path, task_path: Path, lora_path: Path) -> dict[str, Any]:
    """F16(merged(base, original LoRA)) against the task's F16 tensors, element by element."""
    from gguf_split import open_model
    from gguf_split.lora import LoraAdapter, ScaledLora, merged

    equal = total = 0
    max_ulp = 0
    with open_model(base_path) as b, open_model(task_path) as t, LoraAdapter.open(lora_path) as ad:
        for name in ad.targets:
            got = merged(b.tensors[name].to_numpy(), [ScaledLora(ad, 1.0)], name).astype(np.float16)
            want = np.frombuffer(t.tensors[name].data, np.float16).reshape(got.shape)
            equal += int((got.view(np.int16) == want.view(np.int16)).sum())
            total += got.size
            max_ulp = max(max_ulp, int(np.abs(got.view(np.int16).astype(np.int32) - want.view(np.int16)).max()))
    return {"elements": total, "bitwise_equal": equal / total, "max_ulp": max_ulp}


def tensor_level(extracted: Path, original: Path) -> dict[str, float]:
    """‖scale·B·A (extracted) − scale·B·A (original)‖ / ‖scale·B·A (original)‖ per tensor: median and max."""
    from gguf_split.lora import LoraAdapter, lora_delta, lora_scale

    rel = []
    with LoraAdapter.open(extracted) as e, LoraAdapter.open(original) as o:
        for n, wo in o.weights.items():
            we = e.weights[n]
            do = lora_delta(wo.a.to_numpy(), wo.b.to_numpy(), n) * lora_scale(1.0, o.alpha, wo.rank)
            de = lora_delta(we.a.to_numpy(), we.b.to_numpy(), n) * lora_scale(1.0, e.alpha, we.rank)
            rel.append(float(np.linalg.norm(de - do) / np.linalg.norm(do)))
    return {"median": float(np.median(rel)), "max": float(np.max(rel))}


def perturbed(original: Path, out: Path, eps: float) -> Path:
    """The original LoRA with every B element multiplied by (1 + eps·N(0, 1)): a change far below the
    extraction's, to show how much any change of the served weights moves the logits."""
    from gguf import GGUFWriter

    from gguf_split.lora import LoraAdapter

    rng = np.random.default_rng(0)
    with LoraAdapter.open(original) as o:
        w = GGUFWriter(os.fspath(out), o.architecture)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", o.alpha)
        for n, wo in o.weights.items():
            b = wo.b.to_numpy()
            w.add_tensor(n + ".lora_a", wo.a.to_numpy())
            w.add_tensor(n + ".lora_b", (b * (1 + eps * rng.standard_normal(b.shape))).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def serve(paths: list[str], prompts: list[list[int]], runs: dict[str, list[tuple[str, float]]],
          sequences: list[list[int]] | None) -> dict[str, Any]:
    """One llama.cpp model; for each named LoRA setting: greedy continuations and teacher-forced logits
    along `sequences` (None: along each prompt + this setting's own greedy continuation). Times the load and
    every switch."""
    from gguf_split.lora.llama import LlamaLora

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    llm = LlamaLora(paths, n_ctx=512, n_batch=512, n_threads=2)
    out["load_s"] = time.perf_counter() - t0
    try:
        out["settings"] = {}
        for label, loras in runs.items():
            t1 = time.perf_counter()
            llm.set_loras(loras)  # the first time: llama_adapter_lora_init reads the adapter
            out.setdefault("first_set_s", {})[label] = time.perf_counter() - t1
            greedy = [llm.greedy(p, N_TOKENS) for p in prompts]
            seqs = sequences if sequences is not None else [p + g for p, g in zip(prompts, greedy)]
            logits = [llm.logits(s, all_positions=True) for s in seqs]
            out["settings"][label] = {"greedy": greedy, "logits": logits}
        if len(runs) > 1:
            # switching cost: a one-token decode right after changing the adapter set (the graph is
            # re-reserved) against the same decode without a change; medians of 7
            labels = list(runs)
            same, switched = [], []
            for i in range(7):
                llm.set_loras(runs[labels[-1]])
                t1 = time.perf_counter()
                llm.logits(prompts[0][:1])
                same.append(time.perf_counter() - t1)
                t1 = time.perf_counter()
                llm.set_loras(runs[labels[i % (len(labels) - 1)]])
                llm.logits(prompts[0][:1])
                switched.append(time.perf_counter() - t1)
            out["decode1_s"] = float(np.median(same))
            out["switch_decode1_s"] = float(np.median(switched))
    finally:
        llm.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# memory, in fresh processes


_MEM_CHILD = r"""
import json, sys
mode, lora, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
def rollup():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) >= 2 and parts[0].rstrip(":") in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous"):
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out
import llama_cpp
before = rollup()
if mode == "lowlevel":
    from gguf_split.lora.llama import LlamaLora, silence_llama_logs
    silence_llama_logs()
    llm = LlamaLora(paths, n_ctx=512, n_threads=2)
    if lora != "-":
        llm.set_loras([(lora, 1.0)])
    llm.logits(llm.tokenize("The capital of France is"))
else:
    llm = llama_cpp.Llama(model_path=paths[0], lora_path=None if lora == "-" else lora, n_ctx=512, n_threads=2,
                          verbose=False)
    llm.eval(llm.tokenize(b"The capital of France is"))
after = rollup()
print(json.dumps({"before": before, "after": after}))
"""


def memory(paths: list[str], first_split: str, lora: str) -> dict[str, Any]:
    res = {}
    for label, mode, lo, ps in [("low-level, mmap, no LoRA", "lowlevel", "-", paths),
                                ("low-level, mmap, + LoRA", "lowlevel", lora, paths),
                                ("Llama(lora_path=...), mmap off", "highlevel", lora, [first_split])]:
        r = subprocess.run([sys.executable, "-c", _MEM_CHILD, mode, lo, *ps], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"memory child {label} failed:\n{r.stderr[-3000:]}")
        res[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return res


# ---------------------------------------------------------------------------------------------------------


def run_set(name: str, scratch: Path, skip_memory: bool) -> dict[str, Any]:
    import shutil

    from gguf.constants import GGMLQuantizationType as Q

    import llama_harness as H
    from gguf_split.lora import LoraAdapter, extract_lora_from_files
    from gguf_split.lora.llama import LlamaLora, silence_llama_logs
    from gguf_split.assemble.split import split

    silence_llama_logs()
    paths, manifest = model_set(name)
    base = paths["base"]
    tasks = [t for t in SET_TASKS.get(name, TASK_ORDER) if t in paths]
    d = scratch / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    print(f"[{name}] splitting {len(paths)} models", file=sys.stderr)
    rep = split({t: str(p) for t, p in paths.items() if t in ("base", *tasks)}, d / "split", link=True)
    base_task = next(t for t in rep.tasks if t.task == "base")
    base_split = [base_task.adaptor, *(str(Path(rep.directory) / f) for f in base_task.files)]
    first_split = base_task.links[0]  # llama.cpp's name for the first file (link=True made it)

    result: dict[str, Any] = {"set": name, "tasks": {}}
    with LlamaLora([str(base)], n_ctx=512) as tok:
        prompts = [tok.tokenize(p) for p in PROMPTS]

    for task in tasks:
        entry = manifest["tasks"][task]
        orig_lora = entry.get("lora")
        r: dict[str, Any] = {"task_file_bytes": paths[task].stat().st_size, "original_lora_bytes":
                             Path(orig_lora).stat().st_size if orig_lora else None}
        print(f"[{name}/{task}] extracting", file=sys.stderr)
        out = d / f"{task}-lora.gguf"
        t0 = time.perf_counter()
        try:
            rep_l = extract_lora_from_files(paths[task], base, out)
        except Exception as e:  # refused: say so, then take what can be expressed
            r["refused_without_allow_partial"] = str(e)
            rep_l = extract_lora_from_files(paths[task], base, out, allow_partial=True)
        r["extract_s"] = time.perf_counter() - t0
        r["report"] = rep_l.lines()
        r["n_tensors"] = len(rep_l.tensors)
        r["ranks"] = sorted({t.rank for t in rep_l.tensors})
        r["rel_error_max"] = max(t.rel_error for t in rep_l.tensors)
        r["floor_max"] = max(t.floor for t in rep_l.tensors)
        r["all_within"] = all(t.within for t in rep_l.tensors)
        r["refused"] = [(x.name, x.reason) for x in rep_l.refused]
        r["lora_file_bytes"] = rep_l.file_bytes
        r["task_own_bytes"] = rep_l.task_bytes
        if orig_lora and not rep_l.refused:
            r["merged_vs_export_lora"] = merged_vs_export_lora(base, paths[task], Path(orig_lora))

        with LoraAdapter.open(out) as ad:
            targets = ad.targets
        kernels = d / f"{task}-kernels.gguf"
        H.retype_tensors(str(base), kernels, targets, Q.F16)

        print(f"[{name}/{task}] serving", file=sys.stderr)
        ref = serve([str(paths[task])], prompts, {"merged": []}, None)
        ref_greedy = ref["settings"]["merged"]["greedy"]
        sequences = [p + g for p, g in zip(prompts, ref_greedy)]
        runs = {"base": [], "extracted LoRA": [(str(out), 1.0)]}
        if orig_lora and not rep_l.refused:
            runs["original LoRA"] = [(orig_lora, 1.0)]
            runs["original, B·(1+1e-3·N)"] = [(str(perturbed(Path(orig_lora), d / f"{task}-perturbed.gguf",
                                                               1e-3)), 1.0)]
            r["tensor_level_vs_original"] = tensor_level(out, Path(orig_lora))
        served = serve(base_split, prompts, runs, sequences)
        kern = serve([str(kernels)], prompts, {"kernels": []}, sequences)

        def row_of(ref_s: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
            row = compare(ref_s["logits"], s["logits"])
            want = ref_s["greedy"]
            same = sum(g == w for g, w in zip(s["greedy"], want))
            agree = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), N_TOKENS)
                     for g, w in zip(s["greedy"], want)]
            row.update({"greedy_identical": f"{same}/{len(prompts)}", "greedy_prefix_mean": float(np.mean(agree))})
            return row

        m = ref["settings"]["merged"]
        r["vs_merged"] = {label: row_of(m, s) for label, s in served["settings"].items()}
        # the yardstick: the same weights through the F16 kernel, against the base (no fine-tune at all)
        r["kernels_vs_base"] = row_of(served["settings"]["base"], kern["settings"]["kernels"])
        if "original LoRA" in served["settings"]:
            # both served by llama.cpp over the same base: what the extraction alone changes
            r["extracted_vs_original"] = row_of(served["settings"]["original LoRA"],
                                                served["settings"]["extracted LoRA"])
            r["perturbed_vs_original"] = row_of(served["settings"]["original LoRA"],
                                                served["settings"]["original, B·(1+1e-3·N)"])
        r["first_set_s"] = served["first_set_s"]
        r["decode1_s"] = served.get("decode1_s")
        r["switch_decode1_s"] = served.get("switch_decode1_s")
        r["load_s"] = served["load_s"]
        if not skip_memory and task == "chat":
            print(f"[{name}/{task}] memory", file=sys.stderr)
            r["memory"] = memory(base_split, first_split, str(out))
        result["tasks"][task] = r
    return result


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def print_result(res: dict[str, Any]) -> None:
    print(f"\n=== {res['set']} ===")
    for task, r in res["tasks"].items():
        print(f"\n-- {task}: {r['n_tensors']} tensors as LoRA, ranks {r['ranks']}, max rel.error "
              f"{r['rel_error_max']:.2e} (max rounding floor {r['floor_max']:.2e}), all within bound "
              f"{r['all_within']}; extracted in {r['extract_s']:.1f} s")
        if r.get("refused_without_allow_partial"):
            print(f"   refused without --allow-partial: {r['refused_without_allow_partial'][:300]}")
        own = r["task_own_bytes"]
        print(f"   bytes: extracted LoRA {mib(r['lora_file_bytes'])} | original LoRA "
              f"{mib(r['original_lora_bytes']) if r['original_lora_bytes'] else '-'} | task's own tensors "
              f"{mib(own)} | task file {mib(r['task_file_bytes'])}")
        if "tensor_level_vs_original" in r:
            t = r["tensor_level_vs_original"]
            print(f"   scale·B·A, extracted vs original LoRA: relative difference median {t['median']:.2e}, "
                  f"max {t['max']:.2e}")
        if "merged_vs_export_lora" in r:
            m = r["merged_vs_export_lora"]
            print(f"   merged() vs llama-export-lora: {m['bitwise_equal']:.4%} of {m['elements']:,} F16 elements "
                  f"bitwise equal, max {m['max_ulp']} ulp")
        print(f"   {'vs merged task':<30} {'max|Δlogit|':>11} {'KL mean':>9} {'KL max':>9} {'greedy same':>11} "
              f"{'agree (tok)':>11}")
        rows = list(r["vs_merged"].items())
        rows.append(("yardstick: kernels vs base", r["kernels_vs_base"]))
        if "extracted_vs_original" in r:
            rows.append(("served: extracted vs original", r["extracted_vs_original"]))
            rows.append(("served: perturbed vs original", r["perturbed_vs_original"]))
        for label, row in rows:
            print(f"   {label:<30} {row['max_dlogit']:>11.3f} {row['kl_mean']:>9.2e} {row['kl_max']:>9.2e} "
                  f"{row['greedy_identical']:>11} {row['greedy_prefix_mean']:>11.1f}")
        first = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["first_set_s"].items())
        print(f"   model load (split files) {r['load_s'] * 1e3:.0f} ms; first set_loras: {first}")
        if r.get("switch_decode1_s"):
            print(f"   one-token decode {r['decode1_s'] * 1e3:.1f} ms; after switching adapters "
                  f"{r['switch_decode1_s'] * 1e3:.1f} ms (median of 7)")
        if "memory" in r:
            print(f"   {'process memory after load + decode':<34} {'Rss':>10} {'Anonymous':>10} {'+Anon':>10} "
                  f"{'Pss_File':>10}")
            for label, m in r["memory"].items():
                a, b = m["after"], m["before"]
                print(f"   {label:<34} {mib(a['Rss']):>10} {mib(a['Anonymous']):>10} "
                      f"{mib(a['Anonymous'] - b['Anonymous']):>10} {mib(a['Pss_File']):>10}")


def main() -> None:
    global N_TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["smollm2", "gemma3", "smollm2-embd"])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts (quick runs)")
    ap.add_argument("--tokens", type=int, default=N_TOKENS, help="greedy tokens per prompt")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--scratch", type=Path, default=WORK / "lora", help="scratch directory (default <work>/lora)")
    args = ap.parse_args()
    scratch = args.scratch
    N_TOKENS = args.tokens
    del PROMPTS[args.prompts:]
    results = []
    for name in args.sets:
        res = run_set(name, scratch, args.skip_memory)
        print_result(res)
        results.append(res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
