"""Memory of several llama.cpp processes serving different tasks of one split (issue 4), measured as the sum
of their PSS (proportional set size: a page mapped by k processes counts 1/k in each), against the same
processes serving the original GGUFs.

Each server process (this script with --child) loads its model with stock llama.cpp (llama-cpp-python's
C API, default parameters: load mode mmap on the CPU backend), creates a context (n_ctx 256, 1 thread),
decodes a fixed prompt, prints READY and waits. With all three READY, the parent reads every process's
/proc/PID/smaps_rollup (Pss, Pss_File, Pss_Anon) and /proc/PID/smaps (Pss of the mappings of .gguf files).
Three sets of three processes run one after the other (never two sets at once, so no set shares pages
with another):
- split: each task's files ([adaptor-<task>.gguf, its shared files in order]) via
  llama_model_load_from_splits, tasks chat, code, summarize
  of a split of SmolLM2 base + its three fine-tunes (bench/common.py);
- original: the three original fine-tuned GGUFs;
- runtime: the same processes loading no model (interpreter, llama-cpp-python, llama.cpp libraries), the
  baseline for what is not model memory.

Goal: sum of PSS of the split set <= 1.1 x (the sizes of the files the three tasks load); reported as is and
without the runtime baseline, along with the split/original ratio.

Usage: python bench/bench_llama_pss.py [--model smollm2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import SMOLLM2, WORK, finetunes  # noqa: E402

TASKS = ("chat", "code", "summarize")
GOAL = 1.1
MIB = 1 << 20
ROLLUP_KEYS = ("Rss", "Pss", "Pss_File", "Pss_Anon")


# ---------------------------------------------------------------------------------------------------------
# child: one llama.cpp "server"


def child(paths: list[str]) -> None:
    """Load `paths` (none: runtime only), decode the prompt, report READY with llama.cpp's buffer sizes, and
    hold everything until stdin closes."""
    import llama_harness as H

    H.init()
    if not paths:
        ready({})
        return
    mark = H.log_mark()
    with H.loaded(paths) as model, H.context(model) as ctx:
        H.decode_last_logits(model, ctx)
        ready(buffer_sizes(H.log_since(mark, 0)))


def ready(info: dict[str, float]) -> None:
    print("READY " + json.dumps(info), flush=True)
    sys.stdin.read()


def buffer_sizes(log: Sequence[str]) -> dict[str, float]:
    """MiB per llama.cpp buffer kind from its log ('CPU_Mapped model buffer size = 92.10 MiB', 'CPU_REPACK
    ...', 'CPU KV buffer size ...', 'CPU compute buffer size ...'): mapped means served from the file pages,
    REPACK means copied into process memory in another layout."""
    sizes: dict[str, float] = {}
    for line in log:
        m = re.search(r"(\S+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB", line)
        if m:
            key = f"{m.group(1)} {m.group(2)}"
            sizes[key] = sizes.get(key, 0.0) + float(m.group(3))
    return sizes


# ---------------------------------------------------------------------------------------------------------
# parent: run sets of children, read their memory


@dataclass
class Proc:
    label: str
    info: dict[str, float]
    rollup: dict[str, int]  # kB
    gguf_pss: dict[str, int] = field(default_factory=dict)  # file name -> kB


@dataclass
class SetResult:
    name: str
    procs: list[Proc]

    def total(self, key: str) -> int:
        """Sum over the processes, bytes."""
        return sum(p.rollup[key] for p in self.procs) * 1024

    def files(self) -> list[str]:
        return sorted({f for p in self.procs for f in p.gguf_pss})

    @property
    def gguf_pss(self) -> int:
        return sum(sum(p.gguf_pss.values()) for p in self.procs) * 1024


def read_rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ROLLUP_KEYS:
                out[key] = int(rest.split()[0])
    return out


def read_gguf_pss(pid: int) -> dict[str, int]:
    """Pss (kB) of every mapping of a .gguf file, by file name."""
    out: dict[str, int] = {}
    current = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = os.path.basename(head[5]) if len(head) > 5 and head[5].endswith(".gguf") else None
            elif current and head[0] == "Pss:":
                out[current] = out.get(current, 0) + int(head[1])
    return out


def run_set(name: str, jobs: dict[str, list[str]]) -> SetResult:
    """Start one child per job, wait until all are READY, measure them all, then let them exit."""
    procs = {label: subprocess.Popen([sys.executable, __file__, "--child", *paths], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True) for label, paths in jobs.items()}
    try:
        infos = {}
        for label, p in procs.items():
            line = p.stdout.readline()
            if not line.startswith("READY "):
                raise SystemExit(f"{name}/{label}: child failed before READY (exit {p.wait()})")
            infos[label] = json.loads(line[6:])
        return SetResult(name, [Proc(label, infos[label], read_rollup(p.pid), read_gguf_pss(p.pid))
                                for label, p in procs.items()])
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
        for p in procs.values():
            p.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------------
# report


def mib(n: float) -> str:
    return f"{n / MIB:8.1f}"


def print_set(s: SetResult) -> None:
    print(f"\n{s.name}: per process (MiB)   {'Rss':>8} {'Pss':>8} {'Pss_File':>8} {'Pss_Anon':>8} {'gguf Pss':>8}"
          "   llama.cpp buffers (MiB)")
    for p in s.procs:
        r = p.rollup
        bufs = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p.info.items())) or "-"
        print(f"  {p.label:<22} {mib(r['Rss'] * 1024)} {mib(r['Pss'] * 1024)} {mib(r['Pss_File'] * 1024)} "
              f"{mib(r['Pss_Anon'] * 1024)} {mib(sum(p.gguf_pss.values()) * 1024)}   {bufs}")
    print(f"  {'sum':<22} {mib(s.total('Rss'))} {mib(s.total('Pss'))} {mib(s.total('Pss_File'))} "
          f"{mib(s.total('Pss_Anon'))} {mib(s.gguf_pss)}")
    files: dict[str, int] = {}
    for p in s.procs:
        for f, kb in p.gguf_pss.items():
            files[f] = files.get(f, 0) + kb * 1024
    if files:
        print("  gguf Pss by file, summed over processes: " + ", ".join(f"{f} {n / MIB:.1f}" for f, n in files.items()))


def report(split_set: SetResult, orig: SetResult, runtime: SetResult, files: dict[str, int]) -> None:
    """`files`: file name -> size of the files the 3 tasks load (adaptors, shared files), and of the 3
    originals."""
    for s in (split_set, orig, runtime):
        print_set(s)
    split_files = sum(files[f] for f in split_set.files())
    orig_files = sum(files[f] for f in orig.files())
    print("\nfile sizes (MiB): " + ", ".join(f"{f} {n / MIB:.1f}" for f, n in files.items()))
    base = runtime.total("Pss")
    sp, op = split_set.total("Pss"), orig.total("Pss")
    rows = [
        ("sum Pss, split (MiB)", sp / MIB),
        ("sum Pss, original (MiB)", op / MIB),
        ("sum Pss, runtime only (MiB)", base / MIB),
        ("sum Pss outside .gguf mappings, split (MiB)", (sp - split_set.gguf_pss) / MIB),
        ("sum Pss outside .gguf mappings, original (MiB)", (op - orig.gguf_pss) / MIB),
        ("split files: 3 adaptors + shared files (MiB)", split_files / MIB),
        ("original files: 3 GGUFs (MiB)", orig_files / MIB),
        (f"split Pss / split files (goal <= {GOAL})", sp / split_files),
        ("split .gguf Pss / split files", split_set.gguf_pss / split_files),
        ("(split Pss - runtime Pss) / split files", (sp - base) / split_files),
        ("split Pss / original Pss", sp / op),
        ("split .gguf Pss / original .gguf Pss", split_set.gguf_pss / orig.gguf_pss),
        ("original Pss / original files", op / orig_files),
    ]
    print()
    for label, value in rows:
        print(f"  {label:<50} {value:8.1f}" if "(MiB)" in label else f"  {label:<50} {value:8.3f}")
    for what, used in (("all Pss", sp), ("Pss of .gguf mappings", split_set.gguf_pss)):
        print(f"goal, {what} of the split <= {GOAL} x split files: {'met' if used <= GOAL * split_files else 'NOT met'}")


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--keep", action="store_true", help="keep the split directory under bench/work/")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return

    from gguf_split.assemble.split import split

    models = finetunes(args.model)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="llama_pss.", dir=WORK))
    try:
        rep = split({t: os.fspath(p) for t, p in models.items()}, tmp / "split")
        task_files = {t.task: [t.adaptor, *(os.path.join(rep.directory, f) for f in t.files)] for t in rep.tasks}
        served = [*dict.fromkeys(f for t in TASKS for f in task_files[t]), *(os.fspath(models[t]) for t in TASKS)]
        files = {os.path.basename(f): os.path.getsize(f) for f in served}
        print(f"{args.model}: split of {', '.join(models)} in {tmp}; serving {', '.join(TASKS)}")
        split_set = run_set("split [adaptor, shared files]", {f"{t} (split)": task_files[t] for t in TASKS})
        orig = run_set("original GGUFs", {f"{t} (original)": [os.fspath(models[t])] for t in TASKS})
        runtime = run_set("runtime only (no model)", {f"runtime {i}": [] for i in range(len(TASKS))})
        report(split_set, orig, runtime, files)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
