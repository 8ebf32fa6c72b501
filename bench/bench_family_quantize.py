"""Family mode of bench_quantize.py (see its docstring): `split --quantize` against llama-quantize per model
then `split`, on the F16 sets of bench/models.py."""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import WORK, sha256_file  # noqa: E402
from models import imatrices, model_set  # noqa: E402
from tools import tool  # noqa: E402

OUT = WORK / "quantize-family"
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}


# ---------------------------------------------------------------------------------------------------------
# running and measuring


class Run:
    """One command: wall seconds, CPU seconds of the process tree (user + sys), peak anonymous RSS (MiB,
    sampled every 10 ms) and peak RSS (with the mapped page cache), stdout."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        self.anon = self.rss = 0
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    status = Path(f"/proc/{p.pid}/status").read_text()
                except OSError:
                    return
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                self.anon = max(self.anon, int(fields.get("RssAnon", "0 kB").split()[0]) // 1024)
                self.rss = max(self.rss, int(fields.get("VmRSS", "0 kB").split()[0]) // 1024)
                stop.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = p.communicate()
        stop.set()
        sampler.join()
        self.wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.stdout = out
        log.write_text(out + err)
        if p.returncode:
            raise SystemExit(f"{cmd[:3]} failed ({p.returncode}), see {log}:\n{err[-2000:]}")


def gguf_split(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "gguf_split", *map(str, args)]


def task_args(models: dict[str, Path]) -> list[str]:
    return [a for t, p in models.items() for a in ("-t", f"{t}={p}")]



def med(values: list[float]) -> float:
    return round(statistics.median(values), 2)


# ---------------------------------------------------------------------------------------------------------
# the parts


def baseline(models: dict[str, Path], imx: Path, qtype: str, threads: int, d: Path) -> tuple[list[Run], dict[str, Path]]:
    """llama-quantize on every model, then split: the runs and the quantized files."""
    q = tool("llama-quantize")
    runs, quantized = [], {}
    for task, src in models.items():
        out = d / f"{task}-{qtype}.gguf"
        out.unlink(missing_ok=True)
        runs.append(Run([str(q), "--imatrix", str(imx), str(src), str(out), qtype, str(threads)],
                        d / f"cli-{task}.log"))
        quantized[task] = out
    shutil.rmtree(d / "split", ignore_errors=True)
    runs.append(Run(gguf_split("split", "-q", "--json", "--threads", threads, "-o", d / "split",
                               *task_args(quantized)), d / "split.log"))
    return runs, quantized


def ours(models: dict[str, Path], imx: Path, qtype: str, threads: int, d: Path) -> Run:
    shutil.rmtree(d / "ours", ignore_errors=True)
    return Run(gguf_split("split", "-q", "--json", "--threads", threads, "--quantize", qtype, "--imatrix", imx,
                          "-o", d / "ours", *task_args(models)), d / "ours.log")


def exactness(d: Path, quantized: dict[str, Path]) -> dict[str, Any]:
    """Each task restored from our split against the CLI's file: sha256, differing tensors/KVs, logits."""
    from gguf_split import open_split, restore

    import llama_harness as H

    out: dict[str, Any] = {}
    with open_split(d / "ours") as s:
        for task, cli in quantized.items():
            r = Path(restore(d / "ours", f"{d / 'restored'}{os.sep}", task=task, force=True).output)
            m = s.load(task)
            try:
                paths = m.llama_cpp_paths()
            finally:
                m.close()
            same = sha256_file(r) == sha256_file(cli)
            out[task] = {"restored": r.name, "identical_file": same, "diff": None if same else diff(cli, r),
                         "logits_bitwise": H.last_logits(paths) == H.last_logits([cli])}
            r.unlink()
    return out


def diff(a: Path, b: Path) -> dict[str, Any]:
    from gguf_split.format.gguf import GGUFFile, decode_value

    with GGUFFile(a) as fa, GGUFFile(b) as fb:
        tb = fb.header.tensor_by_name
        tensors = [t.name for t in fa.header.tensors if t.name not in tb or t.ggml_type != tb[t.name].ggml_type
                   or fa.tensor_view(t) != fb.tensor_view(tb[t.name])]
        ka = {kv.key: decode_value(fa.mm, kv.vtype, kv.value_start)[0] for kv in fa.header.kvs}
        kb = {kv.key: decode_value(fb.mm, kv.vtype, kv.value_start)[0] for kv in fb.header.kvs}
        return {"tensors": tensors, "kvs": sorted(k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k))}


def identical_share(quantized: dict[str, Path]) -> dict[str, Any]:
    """Per fine-tune: its tensors (and bytes) identical to the base's quantized ones."""
    from hashing import tensor_digests

    digests = {t: tensor_digests(p) for t, p in quantized.items()}
    base = digests.pop("base")
    return {t: {"tensors": sum(1 for n, v in d.items() if base.get(n) == v), "of": len(d),
                "bytes_share": round(sum(v[2] for n, v in d.items() if base.get(n) == v) / sum(v[2] for v in d.values()), 3)}
            for t, d in digests.items()}


def scaling(models: dict[str, Path], imx: Path, qtype: str, threads: int, d: Path) -> list[dict[str, Any]]:
    """The base split alone, then each fine-tune added: time against the share of its bytes quantized."""
    target = d / "grow"
    shutil.rmtree(target, ignore_errors=True)
    rows = []
    for i, (task, src) in enumerate(models.items()):
        verb = ["split", "--threads", threads, "-o", target] if i == 0 else ["add", target, "--threads", threads]
        r = Run(gguf_split(*verb, "-q", "--json", "--quantize", qtype, "--imatrix", imx, "-t", f"{task}={src}"),
                d / f"grow-{task}.log")
        rep = json.loads(r.stdout)
        q = (rep.get("split") or rep)["quantize"]
        total = sum(sum(x["types"].values()) for x in q["tasks"])
        rows.append({"task": task, "verb": verb[0], "wall_s": round(r.wall, 2), "cpu_s": round(r.cpu, 2),
                     "units_quantized": q["units"], "unit_bytes": q["unit_bytes"], "reused_units": q["reused_units"],
                     "tensors": total, "quantize_s": round(q["seconds"], 2)})
    return rows


def near_miss(models: dict[str, Path], per_task: dict[str, Path], qtype: str, threads: int, d: Path) -> list[str]:
    """The family as llama-quantize makes it model by model, each with its own imatrix: what split --dry-run
    says about it."""
    q = tool("llama-quantize")
    own = {}
    for task, src in models.items():
        out = d / f"own-{task}-{qtype}.gguf"
        if not out.exists():
            Run([str(q), "--imatrix", str(per_task[task]), str(src), str(out), qtype, str(threads)],
                d / f"own-{task}.log")
        own[task] = out
    r = Run(gguf_split("split", "--dry-run", "-o", d / "own-split", *task_args(own)), d / "own-split.log")
    return [line for line in r.stdout.splitlines() if "only by quantization" in line or "in all, one recipe" in line]


# ---------------------------------------------------------------------------------------------------------


def run_family(args: Any) -> None:
    results = {}
    for name in args.sets.split(","):
        models = model_set(name)
        per_task = imatrices(name)
        imx = per_task["base"]
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        f16_bytes = sum(p.stat().st_size for p in models.values())
        print(f"\n== {name}: {', '.join(models)} ({f16_bytes / 1e6:.0f} MB of F16), {args.type} with {imx.name}, "
              f"{args.threads} threads, {args.repeat} rounds")
        base_runs: list[list[Run]] = []
        our_runs: list[Run] = []
        quantized: dict[str, Path] = {}
        for _ in range(args.repeat):  # interleaved: the machine's load drifts
            runs, quantized = baseline(models, imx, args.type, args.threads, d)
            base_runs.append(runs)
            our_runs.append(ours(models, imx, args.type, args.threads, d))
        res = summarize(base_runs, our_runs)
        report = json.loads(our_runs[-1].stdout)
        base_report = json.loads(base_runs[-1][-1].stdout)
        res["bytes"] = {"quantized_models": report["input_bytes"], "ours": report["output_bytes"],
                        "baseline_split": base_report["output_bytes"], "dedup_optimum_tensors": report["dedup_optimum"],
                        "units": report["quantize"]["units"], "unit_bytes": report["quantize"]["unit_bytes"]}
        res["exactness"] = exactness(d, quantized)
        res["identical"] = identical_share(quantized)
        res["scaling"] = scaling(models, imx, args.type, args.threads, d)
        res["near_miss"] = [] if args.no_near_miss else near_miss(models, per_task, args.type, args.threads, d)
        results[name] = res
        show(name, res)
        if not args.keep:
            for p in quantized.values():
                p.unlink(missing_ok=True)
            for sub in ("split", "ours", "grow", "restored", "own-split"):
                shutil.rmtree(d / sub, ignore_errors=True)
    (OUT / f"results-family-{args.type}.json").write_text(json.dumps(results, indent=1, default=str))


def summarize(base_runs: list[list[Run]], our_runs: list[Run]) -> dict[str, Any]:
    b_wall = [sum(r.wall for r in runs) for runs in base_runs]
    b_cpu = [sum(r.cpu for r in runs) for runs in base_runs]
    return {"baseline": {"wall_s": med(b_wall), "cpu_s": med(b_cpu),
                         "quantize_wall_s": med([sum(r.wall for r in runs[:-1]) for runs in base_runs]),
                         "split_wall_s": med([runs[-1].wall for runs in base_runs]),
                         "peak_anon_mib": max(r.anon for runs in base_runs for r in runs),
                         "peak_rss_mib": max(r.rss for runs in base_runs for r in runs)},
            "ours": {"wall_s": med([r.wall for r in our_runs]), "cpu_s": med([r.cpu for r in our_runs]),
                     "peak_anon_mib": max(r.anon for r in our_runs), "peak_rss_mib": max(r.rss for r in our_runs)},
            "ratio_wall": round(statistics.median(o.wall / w for o, w in zip(our_runs, b_wall)), 3),
            "ratio_cpu": round(statistics.median(o.cpu / c for o, c in zip(our_runs, b_cpu)), 3)}


def show(name: str, r: dict[str, Any]) -> None:
    b, o, by = r["baseline"], r["ours"], r["bytes"]
    print(f"time: llama-quantize x{len(r['exactness'])} + split {b['wall_s']} s wall ({b['quantize_wall_s']} + "
          f"{b['split_wall_s']}), {b['cpu_s']} s CPU; split --quantize {o['wall_s']} s wall, {o['cpu_s']} s CPU: "
          f"{r['ratio_wall']}x wall, {r['ratio_cpu']}x CPU")
    print(f"memory (peak anonymous / with mapped pages, MiB): llama-quantize {b['peak_anon_mib']} / {b['peak_rss_mib']}, "
          f"split --quantize {o['peak_anon_mib']} / {o['peak_rss_mib']}")
    print(f"bytes: quantized models {by['quantized_models'] / 1e6:.1f} MB, split --quantize {by['ours'] / 1e6:.1f} MB, "
          f"split of the CLI's files {by['baseline_split'] / 1e6:.1f} MB, dedup optimum (tensors) "
          f"{by['dedup_optimum_tensors'] / 1e6:.1f} MB; {by['units']} units quantized ({by['unit_bytes'] / 1e6:.1f} MB)")
    for task, e in r["exactness"].items():
        print(f"  {task}: restore = llama-quantize's file: {e['identical_file']}"
              f"{'' if e['identical_file'] else ' ' + str(e['diff'])}; logits bitwise: {e['logits_bitwise']}")
    for task, i in r["identical"].items():
        print(f"  {task}: {i['tensors']}/{i['of']} tensors identical to base's ({i['bytes_share']:.1%} of its bytes)")
    for row in r["scaling"]:
        print(f"  {row['verb']} {row['task']}: {row['wall_s']} s wall, {row['cpu_s']} s CPU; quantized "
              f"{row['units_quantized']} units ({row['unit_bytes'] / 1e6:.1f} MB), {row['reused_units']} from the split")
    for line in r["near_miss"]:
        print(f"  per-task imatrix: {line}")
