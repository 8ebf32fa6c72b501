"""Quantizing a family: `split --quantize` against llama-quantize on each model then `split`, and the core
(tensor-by-tensor quantization) against the llama-quantize CLI on one model.

Family mode (the default; issue 20's benchmark): the F16 families of bench/models.py, `f16-smollm2` and
`f16-gemma3` (base = the registry model dequantized with `llama-quantize --allow-requantize ... F16`; qv, ffn,
topq = export-lora merges of random LoRAs onto it), one recipe: TYPE with the base's importance matrix
(llama-imatrix's GGUF output). Per set:
- time (wall and CPU, user + sys) and peak memory (anonymous RSS, sampled every 10 ms: mapped input pages
  are the page cache's, not the process's) of
    baseline: `llama-quantize --imatrix IMX <task>.gguf <task>-TYPE.gguf TYPE THREADS` for every task, then
              `gguf-split split` of the quantized models;
    ours:     `gguf-split split --quantize TYPE --imatrix IMX` of the F16 models;
  interleaved over --repeat rounds (this machine's load drifts), medians;
- exactness: every task restored from our split against the CLI's file: whole-file sha256, the tensors and
  KVs that differ (none expected: the imatrix path string is the same), and llama.cpp's logits of the
  split's task against the CLI's file (bitwise, llama-cpp-python);
- bytes: our split against the baseline split, the dedup optimum and the quantized models;
- identical tensors: per fine-tune, the share of its tensors (and bytes) identical to the base's;
- scaling with the share of changed bytes: the base alone split with --quantize, then each fine-tune added
  (`add`), timed, against the share of its source bytes that had to be quantized;
- near misses: the tasks quantized each with its own importance matrix by the CLI (what a family made
  model by model looks like), then `split --dry-run`: its near-miss lines.

Model mode (`--mode model`, the earlier check of the core): for each imatrix variant (none, GGUF, .dat) the
CLI and `quantize_model` on one F16 model, every tensor and KV compared, timed.

    export GGUF_SPLIT_BENCH_WORK=/work/cache/bench-work
    python bench/bench_quantize.py [--sets f16-smollm2,f16-gemma3] [--type Q4_K_M] [--threads 2] [--repeat 2]
    python bench/bench_quantize.py --mode model [--model gemma3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import GEMMA3, SMOLLM2, WORK, model_path, sha256_file  # noqa: E402

OUT = WORK / "quantize"
BIN = Path(os.environ.get("GGUF_SPLIT_LLAMA_BIN", WORK / "llama.cpp" / "build" / "bin"))

_OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from gguf_split.assemble import quantize as QZ
src, dst, qtype, imatrix, threads = sys.argv[1:6]
recipe = QZ.make_recipe(qtype, imatrix or None)
t1 = time.perf_counter()
plan = QZ.plan_model(src, recipe)
t2 = time.perf_counter()
QZ.quantize_model(src, dst, recipe, threads=int(threads), plan=plan)
t3 = time.perf_counter()
print(json.dumps({"import_recipe": t1 - t0, "dry_run": t2 - t1, "quantize_model": t3 - t2,
                  "warnings": plan.warnings[:3], "n_warnings": len(plan.warnings)}))
"""

_INPROCESS = r"""
import json, sys, time
from gguf_split.assemble import quantize as QZ
src, dst, qtype, imatrix, threads = sys.argv[1:6]
recipe = QZ.make_recipe(qtype, imatrix or None)
t0 = time.perf_counter()
QZ.llama_quantize(src, dst, recipe, threads=int(threads))
print(json.dumps({"llama_model_quantize": time.perf_counter() - t0}))
"""


def tool(name: str) -> Path | None:
    p = BIN / name
    return p if p.exists() else None


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int, float, str]:
    """(wall s, peak RSS KiB, CPU s (user + sys), stdout) of a command run under /usr/bin/time."""
    stats = log.with_suffix(".time")
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats), *cmd], capture_output=True, text=True,
                       env=env)
    dt = time.perf_counter() - t0
    log.write_text(r.stdout + r.stderr)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}), see {log}:\n{r.stderr[-2000:]}")
    rss, user, system = stats.read_text().split()[-3:]
    return dt, int(rss), float(user) + float(system), r.stdout



def make_f16(which: str, base: Path) -> Path:
    f16 = OUT / f"{which}-f16.gguf"
    if f16.exists():
        return f16
    OUT.mkdir(parents=True, exist_ok=True)
    part = f16.with_suffix(".part.gguf")
    q = tool("llama-quantize")
    if q is not None:
        timed([str(q), "--allow-requantize", str(base), str(part), "F16", "2"], OUT / f"make-{which}-f16.log")
    else:
        from gguf_split.assemble import quantize as QZ
        QZ.llama_quantize(base, part, QZ.make_recipe("F16", allow_requantize=True), threads=2)
    part.rename(f16)
    return f16


def make_imatrices(which: str, f16: Path) -> dict[str, Path]:
    """imatrix files of both formats, from llama-imatrix when it is built."""
    out = {"gguf": OUT / f"{which}-imatrix.gguf", "dat": OUT / f"{which}-imatrix.dat"}
    if all(p.exists() for p in out.values()):
        return out
    exe = tool("llama-imatrix")
    if exe is not None:
        text = OUT / "calibration.txt"
        text.write_text((HERE.parent / "README.md").read_text() + (HERE / "README.md").read_text())
        for fmt, p in out.items():
            timed([str(exe), "-m", str(f16), "-f", str(text), "-o", str(p), "-c", "128", "--chunks", "16",
                   "-t", "2", "--output-format", fmt], OUT / f"{which}-imatrix-{fmt}.log")
        print(f"imatrix: llama-imatrix on {text.stat().st_size} bytes of text, 16 chunks of 128 tokens")
    else:
        from gguf_split.format.gguf import GGUFFile
        from helpers import random_entries, write_imatrix_dat, write_imatrix_gguf
        with GGUFFile(f16) as f:
            sizes = {t.name: t.shape[0] for t in f.header.tensors if len(t.shape) >= 2}
        entries = random_entries(sizes)
        write_imatrix_gguf(out["gguf"], entries)
        write_imatrix_dat(out["dat"], entries)
        print("imatrix: llama-imatrix is not built; random imatrix files written in Python")
    return out


def compare(cli: Path, ours: Path) -> dict[str, object]:
    from gguf_split.format.gguf import GGUFFile, decode_value

    with GGUFFile(cli) as a, GGUFFile(ours) as b:
        ta, tb = a.header.tensors, b.header.tensors
        order = [t.name for t in ta] == [t.name for t in tb]
        by_b = b.header.tensor_by_name
        diff_tensors = [t.name for t in ta if t.name not in by_b or t.ggml_type != by_b[t.name].ggml_type
                        or a.tensor_view(t) != b.tensor_view(by_b[t.name])]

        def kvs(f: GGUFFile) -> dict[str, object]:
            return {kv.key: (kv.vtype.name, decode_value(f.mm, kv.vtype, kv.value_start)[0]) for kv in f.header.kvs}

        ka, kb = kvs(a), kvs(b)
        diff_kvs = sorted(k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k))
        types: dict[str, int] = {}
        for t in ta:
            types[t.type_name] = types.get(t.type_name, 0) + 1
        return {"tensors": len(ta), "same_order": order, "tensors_differing": diff_tensors,
                "kv_order_same": list(ka) == list(kb), "kvs_differing": {k: (ka.get(k), kb.get(k)) for k in diff_kvs},
                "imatrix_kvs": {k: v for k, v in ka.items() if k.startswith("quantize.")}, "types": types}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="family", choices=["family", "model"])
    ap.add_argument("--sets", default="f16-smollm2,f16-gemma3", help="family mode: the F16 sets")
    ap.add_argument("--model", default=SMOLLM2, choices=[SMOLLM2, GEMMA3], help="model mode: the model")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default: 2 in family mode, 3 in model mode)")
    ap.add_argument("--variants", default="none,gguf,dat")
    ap.add_argument("--no-near-miss", action="store_true", help="family mode: skip the per-task-imatrix run")
    ap.add_argument("--keep", action="store_true", help="keep the quantized outputs in <work>/quantize/")
    args = ap.parse_args()
    if args.mode == "family":
        from bench_family_quantize import run_family
        args.repeat = args.repeat or 2
        run_family(args)
        return
    args.repeat = args.repeat or 3
    q = tool("llama-quantize")
    if q is None:
        raise SystemExit(f"llama-quantize is not built in {BIN} (python bench/tools.py)")
    f16 = make_f16(args.model, model_path(args.model))
    imx = make_imatrices(args.model, f16)
    print(f"model: {f16} ({f16.stat().st_size / 1e6:.0f} MB), type {args.type}, {args.threads} threads, "
          f"medians of {args.repeat}")
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    results = {}
    for variant in args.variants.split(","):
        imatrix = "" if variant == "none" else str(imx[variant])
        cli_out, ours_out, inproc_out = (OUT / f"{args.model}-{args.type}-{variant}-{n}.gguf"
                                         for n in ("cli", "ours", "inproc"))
        cli_cmd = [str(q), *(["--imatrix", imatrix] if imatrix else []), str(f16), str(cli_out), args.type,
                   str(args.threads)]
        ours_cmd = [sys.executable, "-c", _OURS, str(f16), str(ours_out), args.type, imatrix, str(args.threads)]
        inproc_cmd = [sys.executable, "-c", _INPROCESS, str(f16), str(inproc_out), args.type, imatrix,
                      str(args.threads)]
        runs: dict[str, list[tuple[float, int, float]]] = {"cli": [], "ours": [], "inproc": []}
        inner: list[dict[str, object]] = []
        for _ in range(args.repeat):  # interleaved: the machine's load drifts
            for name, cmd in (("cli", cli_cmd), ("ours", ours_cmd), ("inproc", inproc_cmd)):
                {"cli": cli_out, "ours": ours_out, "inproc": inproc_out}[name].unlink(missing_ok=True)
                wall, rss, cpu, stdout = timed(cmd, OUT / f"{args.model}-{variant}-{name}.log",
                                               None if name == "cli" else env)
                runs[name].append((wall, rss, cpu))
                if name == "ours":
                    inner.append(json.loads(stdout.strip().splitlines()[-1]))
        cmp = compare(cli_out, ours_out)
        same_file = sha256_file(cli_out) == sha256_file(ours_out)
        if not args.keep:
            for p in (cli_out, ours_out, inproc_out):
                p.unlink(missing_ok=True)
        med = {n: (statistics.median(w for w, _, _ in r), max(m for _, m, _ in r), statistics.median(c for _, _, c in r))
               for n, r in runs.items()}
        results[variant] = {"compare": cmp, "same_file": same_file, "wall_s": {n: round(v[0], 2) for n, v in med.items()},
                            "peak_rss_mb": {n: round(v[1] / 1024) for n, v in med.items()},
                            "cpu_s": {n: round(v[2], 2) for n, v in med.items()},
                            "ours_inner_s": {k: round(statistics.median(float(i[k]) for i in inner), 3)  # type: ignore[arg-type]
                                             for k in ("import_recipe", "dry_run", "quantize_model")},
                            "warnings": inner[-1]["warnings"], "n_warnings": inner[-1]["n_warnings"]}
        r = results[variant]
        print(f"\n[{variant}] tensors {cmp['tensors']} ({cmp['types']}): differing {len(cmp['tensors_differing'])}"
              f"{' ' + str(cmp['tensors_differing'][:5]) if cmp['tensors_differing'] else ''}; same order "
              f"{cmp['same_order']}; KVs differing {list(cmp['kvs_differing']) or 'none'}; "
              f"whole file identical: {same_file}")
        if cmp["imatrix_kvs"]:
            print(f"  CLI's imatrix KVs: {cmp['imatrix_kvs']}")
        print(f"  wall (s): CLI {r['wall_s']['cli']}, gguf-split {r['wall_s']['ours']} (of which {r['ours_inner_s']}), "
              f"llama_model_quantize in process {r['wall_s']['inproc']}")
        print(f"  CPU (s, user + sys): CLI {r['cpu_s']['cli']}, gguf-split {r['cpu_s']['ours']}, "
              f"in process {r['cpu_s']['inproc']}")
        print(f"  peak RSS (MB): CLI {r['peak_rss_mb']['cli']}, gguf-split {r['peak_rss_mb']['ours']}, "
              f"in process {r['peak_rss_mb']['inproc']}")
        if r["n_warnings"]:
            print(f"  {r['n_warnings']} warnings, e.g. {r['warnings']}")
    (OUT / f"results-{args.model}-{args.type}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
