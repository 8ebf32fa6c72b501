"""Benchmark of the runtime loader: open, load and swap times against a full parse of the same adaptor,
the memory of several tasks served from one split against the files they use, and memory over 10,000
load + swap cycles.

Inputs: bench/common.py's base model and its three fine-tunes (chat, code, summarize) of SmolLM2-135M and
Gemma-3-270M, split into $GGUF_SPLIT_BENCH_WORK/loader-<model>/ (`split(..., force=True)`, default file
cost) at the start of each run (`--reuse` keeps an existing split). Page cache warm: every input and
output is read once before any timing. No gguf.GGUFReader anywhere (8-27 s per big header here).

What is measured, in this process unless said otherwise (each time as wall median [min-max] and the
median CPU time of the thread: the machine is shared and noisy, CPU time shows the cost without the
time other processes took):
- open: `open_split(dir).load(task)` with nothing mapped (every model of the previous run dropped, and
  the run asserts the loader's registry is empty): it maps the adaptor and every shared file of the
  task, checks the adaptor's seal and every file's records. Cycling through the four tasks. Also once
  per fresh Python process (imports done, nothing opened: `--fresh` processes).
- first load: `open_split(dir).load(task)` in fresh processes that ran nothing but `from gguf_split import
  open_split` (which imports the loader, numpy and gguf): what a program that serves a task pays at start.
  Median over `--fresh` processes, with the modules the load itself imported (none: the LoRA machinery is
  imported by the first `apply_lora` only).
- load on an open split: `load(task)` while another model (base) holds the shared files mapped.
- swap: `model.swap(task)` cycling chat -> code -> summarize -> base, the only model: each swap maps the
  new adaptor and whatever shared file the old task did not use, and unmaps the rest. Also with every
  task held by another model (nothing to map: the checks alone), and once per fresh process.
- seal: `check_seal()` alone on the adaptor (xxh3-128 of its header), and the header's size.
- baselines, same run, same files: `GGUFFile(adaptor)`, a strict full parse of the same adaptor (every
  KV walked, the 262k-token vocabulary included), with the vocabulary memo (gguf_format._WalkedArrays)
  cleared before each run as in a fresh process; `open_model(original chat)` (the loader's path for any
  third-party GGUF), memo cleared and memo warm (a second fine-tune in the same process).
- memory: a fresh subprocess loads chat, code, summarize side by side from one split, hashing every
  byte of every tensor of each (xxh3 over the views: pages them in, copies nothing), and reads VmRSS
  and Pss after each step, minus its RSS after imports; compared with the bytes of the files those
  tasks use (each file once). Another does the same with the three original GGUFs (open_model).
- cycles: a fresh subprocess runs `m = split.load(a); m.swap(b); m.metadata[...]; bytes(one tensor);
  del m` 10,000 times (a, b cycling through the four tasks) with the garbage collector disabled, so
  only reference counting frees anything, and samples VmRSS, RssAnon, the number of mappings
  (/proc/self/maps lines, all and those of the split's files), the loader's registry and the open file
  descriptors. Printed against the sample after the first 100 cycles, as a ratio.

- many files against few (issue 19: "the Python loader's open and swap CPU time within 2x of the 4-file
  task's, same run"): the same four models also split with `cut="none"` (0.2's layout: task base loads
  4 files) into loader-<model>-few/, next to the default cut (role:6: base loads up to 33); task base
  opened (`open_split(dir).load("base")`, nothing mapped) and swapped (base -> chat -> base, the only
  model) in both, interleaved round by round (few, many, few, many, ...), so both see the same load on
  the machine; medians of CPU and wall time and their ratio, many / few. Open twice per round: first
  with the loader's header memo emptied (`open_first`: the process's first sight of those files, each
  header parsed and checked), then again (`open`: shared headers seen before are taken from the memo
  after a byte comparison, records.HeaderMemo).

Goals: open, swap and the first load of a fresh process <= 5 ms (Gemma's 262k-token vocabulary included);
many-file open and swap <= 2x the few-file ones (CPU time, same run); RSS of 3 tasks <= their files
+ 5 %; flat memory over 10,000 cycles.

Usage: python bench/bench_loader.py [--models smollm2 gemma3] [--repeats 101] [--fresh 7]
       [--cycles 10000] [--reuse] [--profile] [--files-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA3, SMOLLM2, WORK, finetunes  # noqa: E402

from gguf_split import GGUFFile, open_model, open_split  # noqa: E402
from gguf_split.format.gguf import _WALKED  # noqa: E402
from gguf_split.runtime.loader import HEADERS, _Mapped  # noqa: E402
from gguf_split.format.records import SplitFile  # noqa: E402
from gguf_split.assemble.split import split  # noqa: E402

TASKS = ("chat", "code", "summarize")  # the fine-tunes; "base" is a task of the split too
ALL = (*TASKS, "base")
OPEN_GOAL_MS = 5.0
FILES_GOAL = 2.0  # many-file open and swap against the few-file ones (issue 19)
FILES_TASK = "base"  # the task that loads the most files
RSS_GOAL = 1.05
FLAT_GOAL = 1.05
MB = 1e6
READ_CHUNK = 16 << 20


# ---------------------------------------------------------------------------------------------------------
# Timing


Run = tuple[float, float]  # seconds: wall clock, CPU time of this thread


def now() -> Run:
    return time.perf_counter(), time.thread_time()


def since(t0: Run) -> Run:
    wall, cpu = now()
    return wall - t0[0], cpu - t0[1]


def timed(fn: Callable[[], object]) -> Run:
    t0 = now()
    fn()
    return since(t0)


def median_ms(runs: list[Run], which: int = 0) -> float:
    return statistics.median(r[which] for r in runs) * 1e3


def show_ms(runs: list[Run]) -> str:
    walls = [r[0] * 1e3 for r in runs]
    return f"{median_ms(runs):.2f} ms [{min(walls):.2f}-{max(walls):.2f}], CPU {median_ms(runs, 1):.2f}"


def warm(paths: list[Path]) -> None:
    """Read every file once so no timed step waits for the disk."""
    buf = bytearray(READ_CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def time_open(directory: Path, tasks: list[str], repeats: int) -> list[Run]:
    """open_split + load with nothing mapped: the previous run's model is dropped (untimed) first."""
    runs = []
    for task in itertools.islice(itertools.cycle(tasks), repeats):
        assert _Mapped.count() == 0, "a file is still mapped: the run would reuse its mapping"
        t0 = now()
        model = open_split(directory).load(task)
        runs.append(since(t0))
        del model
    return runs


def time_load_shared(directory: Path, tasks: list[str], repeats: int) -> list[Run]:
    """load(task) while another model (base) keeps the shared files mapped."""
    runs = []
    with open_split(directory) as s, s.load("base"):
        for task in itertools.islice(itertools.cycle(tasks), repeats):
            t0 = now()
            model = s.load(task)
            runs.append(since(t0))
            model.close()
    return runs


def time_swap(directory: Path, tasks: list[str], repeats: int, hold_all: bool = False) -> list[Run]:
    """swap cycling through `tasks`; with `hold_all`, every task is also held by another model, so a swap
    maps nothing (the seal and record checks alone)."""
    with open_split(directory) as s, s.load(tasks[-1]) as model:
        holders = [s.load(t) for t in tasks] if hold_all else []
        runs = [timed(lambda: model.swap(t)) for t in itertools.islice(itertools.cycle(tasks), repeats)]
        del holders
        return runs


def time_many_few(dirs: dict[str, Path], repeats: int) -> dict[str, dict[str, list[Run]]]:
    """Task base opened (nothing mapped) and swapped to chat and back (each swap timed) in each directory,
    interleaved round by round: both layouts see the same load on the shared machine. Each round first
    opens base with the loader's header memo emptied ("open_first": the first time this process sees
    those files), drops it, then opens it again ("open": files seen before, nothing mapped)."""
    out: dict[str, dict[str, list[Run]]] = {k: {"open_first": [], "open": [], "swap": []} for k in dirs}
    for _ in range(repeats):
        for k, d in dirs.items():
            assert _Mapped.count() == 0, "a file is still mapped: the run would reuse its mapping"
            HEADERS.clear()
            t0 = now()
            model = open_split(d).load(FILES_TASK)
            out[k]["open_first"].append(since(t0))
            del model
            assert _Mapped.count() == 0, "a file is still mapped: the run would reuse its mapping"
            t0 = now()
            model = open_split(d).load(FILES_TASK)
            out[k]["open"].append(since(t0))
            out[k]["swap"].append(timed(lambda: model.swap("chat")))
            out[k]["swap"].append(timed(lambda: model.swap(FILES_TASK)))
            del model
    return out


def time_seal(adaptor: Path, repeats: int) -> tuple[list[Run], list[Run], int]:
    """check_seal on a mapping whose header pages are mapped already (warm), and on a fresh mapping of
    the file (page cache warm, but the process faults the header's pages in, as a load does)."""
    fresh = []
    for _ in range(repeats):
        with SplitFile(adaptor, keep_fd=False) as f:
            fresh.append(timed(f.check_seal))
    with SplitFile(adaptor) as f:
        return [timed(f.check_seal) for _ in range(repeats)], fresh, f.header.tensor_info_end


def time_parse(path: Path, repeats: int, memo: bool = False) -> list[Run]:
    """GGUFFile(path) (strict full parse) + close; unless `memo`, the vocabulary memo is cleared (untimed)
    first, so every run walks the tokenizer arrays as a fresh process's first open does."""
    runs = []
    for _ in range(repeats):
        if not memo:
            _WALKED.clear()
        t0 = now()
        GGUFFile(path).close()
        runs.append(since(t0))
    return runs


def time_open_model(path: Path, repeats: int, memo: bool = False) -> list[Run]:
    runs = []
    for _ in range(repeats):
        if not memo:
            _WALKED.clear()
        t0 = now()
        model = open_model(path)
        runs.append(since(t0))
        model.close()
    return runs


def profile_open(directory: Path, tasks: list[str], repeats: int) -> str:
    """cProfile of open + load + swap (cProfile inflates small calls ~2x: read the shares, not the times)."""
    def work() -> None:
        for task in itertools.islice(itertools.cycle(tasks), repeats):
            with open_split(directory) as s, s.load(task) as model:
                model.swap(tasks[0])

    prof = cProfile.Profile()
    prof.runcall(work)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(20)
    return text.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Fresh processes: first open, memory, cycles


def memory() -> dict[str, int]:
    """Bytes: VmRSS, RssFile, RssAnon (/proc/self/status), Rss and Pss (/proc/self/smaps_rollup)."""
    out = {}
    for source, keys in (("/proc/self/status", ("VmRSS", "RssFile", "RssAnon")),
                         ("/proc/self/smaps_rollup", ("Rss", "Pss"))):
        for line in Path(source).read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0]) * 1024
    return out


def touch(tensors: object) -> int:
    """Hash every byte of every tensor view (pages them in, copies nothing); returns the bytes read."""
    import xxhash

    total = 0
    for t in tensors.values():  # type: ignore[attr-defined]
        xxhash.xxh3_64_intdigest(t.data)
        total += t.nbytes
    return total


def child_memory(mode: str, paths: list[str]) -> dict[str, object]:
    """In a fresh process: memory after imports, then after loading and touching each model in turn.
    mode "split": paths = [split dir, task...]; mode "originals": paths = original GGUFs."""
    steps = [memory()]
    touched, files = [], []
    keep: list[object] = []
    if mode == "split":
        s = open_split(paths[0])
        for task in paths[1:]:
            model = s.load(task)
            keep.append(model)
            files.append(model.files)
            touched.append(touch(model.tensors))
            steps.append(memory())
    else:
        for p in paths:
            keep.append(open_model(p))
            touched.append(touch(keep[-1].tensors))  # type: ignore[attr-defined]
            steps.append(memory())
    return {"steps": steps, "touched": touched, "files": files}


def child_first_open(directory: str, task: str, other: str) -> dict[str, Run]:
    """In a fresh process (imports done): the first open + load, then the first swap."""
    t0 = now()
    model = open_split(directory).load(task)
    opened = since(t0)
    swapped = timed(lambda: model.swap(other))
    return {"open": opened, "swap": swapped}


FIRST_LOAD = """
import sys, time
from gguf_split import open_split
before = set(sys.modules)
t0, c0 = time.perf_counter(), time.thread_time()
model = open_split(sys.argv[1]).load(sys.argv[2])
wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
print(wall, cpu, *sorted(set(sys.modules) - before))
"""


def first_load(directory: Path, task: str) -> dict[str, object]:
    """In a fresh process that imported only `from gguf_split import open_split`: the first load of `task`,
    and the modules that load imported."""
    out = subprocess.run([sys.executable, "-c", FIRST_LOAD, str(directory), task], check=True, capture_output=True,
                         text=True).stdout.split()
    return {"run": (float(out[0]), float(out[1])), "imported": out[2:]}


def maps_count(directory: str) -> tuple[int, int]:
    """(all mappings of this process, mappings of files in `directory`) from /proc/self/maps."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    prefix = os.path.abspath(directory) + os.sep
    return len(lines), sum(1 for line in lines if prefix in line)


def child_cycles(directory: str, cycles: int) -> dict[str, object]:
    """In a fresh process, garbage collector off: `cycles` x (load, swap, read, drop), sampled."""
    s = open_split(directory)
    marks = sorted({100, *range(1000, cycles + 1, 1000), cycles})
    samples = []
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    for i in range(1, cycles + 1):
        model = s.load(ALL[i % 4])
        model.swap(ALL[(i + 1) % 4])
        model.metadata["general.architecture"]
        bytes(model.tensors["output_norm.weight"].data[:64])
        del model
        if i in marks:
            all_maps, split_maps = maps_count(directory)
            samples.append({"cycle": i, "seconds": time.perf_counter() - t0, **memory(), "maps": all_maps,
                            "split_maps": split_maps, "registry": _Mapped.count(),
                            "fds": len(os.listdir("/proc/self/fd")), "gc_objects": len(gc.get_objects())})
    gc.enable()
    return {"samples": samples}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------------------
# One model


def split_dir(which: str, originals: dict[str, Path], reuse: bool, cut: str | None = None) -> Path:
    """The split of `originals` with the default cut (many files), or with `cut` into loader-<model>-few/."""
    out = WORK / (f"loader-{which}" if cut is None else f"loader-{which}-few")
    if not (reuse and all((out / f"adaptor-{t}.gguf").exists() for t in originals)):
        print(f"[{which}] splitting into {out}...", file=sys.stderr)
        split({t: str(p) for t, p in originals.items()}, out, force=True, **({} if cut is None else {"cut": cut}))
    return out


def bench_files(which: str, out: Path, few: Path, args: argparse.Namespace) -> dict[str, object]:
    """Many files against few: task base's open and swap in both splits, interleaved (time_many_few)."""
    dirs = {"few": few, "many": out}
    counts = {}
    for k, d in dirs.items():
        with open_split(d) as s:
            counts[k] = len(s.load(FILES_TASK).files)
    print(f"[{which}] many files ({counts['many']}) against few ({counts['few']}) x{args.repeats}...", file=sys.stderr)
    time_many_few(dirs, 5)  # warm-up
    return {"counts": counts, **time_many_few(dirs, args.repeats)}


def bench_model(which: str, args: argparse.Namespace) -> dict[str, object]:
    originals = finetunes(which)
    out = split_dir(which, originals, args.reuse)
    few = split_dir(which, originals, args.reuse, cut="none")
    if args.files_only:
        warm([p for d in (out, few) for p in sorted(d.glob("*.gguf"))])
        return {"files": bench_files(which, out, few, args),
                "first_load": [first_load(out, "chat") for _ in range(args.fresh)]}
    adaptors = {t: out / f"adaptor-{t}.gguf" for t in originals}
    with open_split(out) as s:
        layout = {t: s.load(t).files for t in ALL}
    files = sorted({f for fs in layout.values() for f in fs})
    warm([Path(f) for f in files] + list(originals.values()))
    tasks = list(ALL)
    print(f"[{which}] open / load / swap x{args.repeats}...", file=sys.stderr)
    time_open(out, tasks, 5)  # warm-up
    n = args.repeats
    seal, seal_fresh, header_bytes = time_seal(adaptors["chat"], n)
    r: dict[str, object] = {
        "layout": {t: [os.path.basename(f) for f in fs] for t, fs in layout.items()},
        "sizes": {os.path.basename(f): os.path.getsize(f) for f in files},
        "original_sizes": {t: p.stat().st_size for t, p in originals.items()},
        "header_bytes": header_bytes,
        "open": time_open(out, tasks, n),
        "load_shared": time_load_shared(out, list(TASKS), n),
        "swap": time_swap(out, tasks, n),
        "swap_held": time_swap(out, tasks, n, hold_all=True),
        "seal": seal,
        "seal_fresh": seal_fresh,
        "parse_adaptor": time_parse(adaptors["chat"], max(5, n // 10)),
        "parse_adaptor_memo": time_parse(adaptors["chat"], max(5, n // 10), memo=True),
        "open_model": time_open_model(originals["chat"], max(5, n // 10)),
        "open_model_memo": time_open_model(originals["chat"], max(5, n // 10), memo=True),
        "fresh": [run_child("first-open", str(out), "chat", "code") for _ in range(args.fresh)],
        "first_load": [first_load(out, "chat") for _ in range(args.fresh)],
        "files": bench_files(which, out, few, args),
    }
    print(f"[{which}] memory in fresh processes...", file=sys.stderr)
    r["mem_split"] = run_child("memory", "split", str(out), *TASKS)
    r["mem_originals"] = run_child("memory", "originals", *(str(originals[t]) for t in TASKS))
    if args.cycles:
        print(f"[{which}] {args.cycles:,} load + swap cycles in a fresh process...", file=sys.stderr)
        r["cycles"] = run_child("cycles", str(out), str(args.cycles))
    if args.profile:
        r["profile"] = profile_open(out, tasks, 200)
    return r


# ---------------------------------------------------------------------------------------------------------
# The tables, the command line


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def rss_rows(r: dict) -> list[tuple[str, str]]:
    """RSS (minus the after-imports baseline) after 1, 2 and 3 tasks, against the bytes of their files."""
    sizes, osz = r["sizes"], r["original_sizes"]
    split_steps, orig_steps = r["mem_split"]["steps"], r["mem_originals"]["steps"]

    def grown(steps: list[dict], k: int, key: str = "VmRSS") -> int:
        return steps[k][key] - steps[0][key]

    def split_files(k: int) -> int:
        used = {os.path.basename(f) for fs in r["mem_split"]["files"][:k] for f in fs}
        return sum(sizes[f] for f in used)

    rows = []
    for k in range(1, len(TASKS) + 1):
        rss, files = grown(split_steps, k), split_files(k)
        orss, origs = grown(orig_steps, k), sum(osz[t] for t in TASKS[:k])
        rows.append((f"RSS {k} task(s) (Pss) / their files",
                     f"{rss / MB:,.1f} MB ({grown(split_steps, k, 'Pss') / MB:,.1f}) / {files / MB:,.1f} MB"
                     f" = {rss / files:.3f}"))
        rows.append((f"RSS {k} original(s) / files", f"{orss / MB:,.1f} MB / {origs / MB:,.1f} MB = {orss / origs:.3f}"))
    n = len(TASKS)
    rss_n, files_n = grown(split_steps, n), split_files(n)
    return rows + [
        ("RSS after imports (baseline, subtracted)", f"{split_steps[0]['VmRSS'] / MB:,.1f} MB"),
        (f"RSS {n} tasks <= files + {RSS_GOAL - 1:.0%}", f"{rss_n / files_n:.3f}  {verdict(rss_n <= RSS_GOAL * files_n)}"),
        (f"RSS {n} originals / RSS {n} tasks", f"{grown(orig_steps, n) / rss_n:.2f}x"),
    ]


def cycle_rows(r: dict) -> list[tuple[str, str]]:
    if "cycles" not in r:
        return []
    samples = r["cycles"]["samples"]
    first, last = samples[0], samples[-1]
    per_cycle = (last["seconds"] - first["seconds"]) / (last["cycle"] - first["cycle"]) * 1e3
    rows = [(f"{last['cycle']:,} cycles: ms per load + swap", f"{per_cycle:.2f} ms")]
    ok = True
    for key, what in (("VmRSS", "VmRSS"), ("RssAnon", "RssAnon")):
        ratio = last[key] / first[key]
        ok &= ratio <= FLAT_GOAL
        rows.append((f"{what} after {last['cycle']:,} / after {first['cycle']}",
                     f"{last[key] / MB:,.1f} / {first[key] / MB:,.1f} MB = {ratio:.3f}"))
    for key, what in (("maps", "mappings (all)"), ("split_maps", "mappings of split files"),
                      ("registry", "loader registry"), ("fds", "open descriptors"), ("gc_objects", "GC objects")):
        ok &= last[key] <= first[key] * FLAT_GOAL
        rows.append((f"{what} after {last['cycle']:,} / after {first['cycle']}", f"{last[key]:,} / {first[key]:,}"))
    rows.append((f"memory flat (<= {FLAT_GOAL:.2f}x)", verdict(ok)))
    return rows


def goal(runs: list[Run]) -> str:
    """The goal on the wall-clock median, and on the CPU median (what it would be on an idle machine)."""
    return (f"wall {verdict(median_ms(runs) <= OPEN_GOAL_MS)}, "
            f"CPU {verdict(median_ms(runs, 1) <= OPEN_GOAL_MS)}")


def files_rows(r: dict) -> list[tuple[str, str]]:
    """Many files against few: each side's medians, and the ratio against the goal (CPU and wall)."""
    f = r["files"]
    n_few, n_many = f["counts"]["few"], f["counts"]["many"]
    rows = []
    labels = {"open_first": "first open (header memo empty)", "open": "open (headers seen before)", "swap": "swap"}
    for what, label in labels.items():
        if what not in f["few"]:
            continue
        few, many = f["few"][what], f["many"][what]
        cpu, wall = median_ms(many, 1) / median_ms(few, 1), median_ms(many) / median_ms(few)
        rows += [
            (f"{label} of task {FILES_TASK}, few files (cut none)", f"{n_few} files: {show_ms(few)}"),
            (f"{label} of task {FILES_TASK}, many files (default cut)", f"{n_many} files: {show_ms(many)}"),
            (f"  {what}: many files / few <= {FILES_GOAL:g}x (same run)",
             f"CPU {cpu:.2f}x {verdict(cpu <= FILES_GOAL)}, wall {wall:.2f}x {verdict(wall <= FILES_GOAL)}"),
        ]
    return rows


def first_load_rows(r: dict) -> list[tuple[str, str]]:
    first = [f["run"] for f in r["first_load"]]
    imported = sorted({m for f in r["first_load"] for m in f["imported"]})
    return [
        ("first load after `from gguf_split import open_split`", show_ms(first)),
        (f"  first load <= {OPEN_GOAL_MS:g} ms (fresh processes)", goal(first)),
        ("  modules the first load imports", ", ".join(imported) or "none"),
    ]


def rows_for(r: dict) -> list[tuple[str, str]]:
    if "open" not in r:  # --files-only
        return first_load_rows(r) + files_rows(r)
    open_ms = median_ms(r["open"])
    fresh_open, fresh_swap = ([f[k] for f in r["fresh"]] for k in ("open", "swap"))
    parse_ms = median_ms(r["parse_adaptor"])
    rows = first_load_rows(r) + [
        ("open: open_split + load, nothing mapped", show_ms(r["open"])),
        (f"open <= {OPEN_GOAL_MS:g} ms", goal(r["open"])),
        ("  first open in a fresh bench process (everything imported)", show_ms(fresh_open)),
        (f"  first open <= {OPEN_GOAL_MS:g} ms", goal(fresh_open)),
        ("  load, shared files already mapped", show_ms(r["load_shared"])),
        ("swap (maps what the new task adds)", show_ms(r["swap"])),
        (f"swap <= {OPEN_GOAL_MS:g} ms", goal(r["swap"])),
        ("  swap, every file already mapped", show_ms(r["swap_held"])),
        ("  first swap in a fresh process", show_ms(fresh_swap)),
        (f"  first swap <= {OPEN_GOAL_MS:g} ms", goal(fresh_swap)),
        ("adaptor's seal, fresh mapping (header bytes)", f"{show_ms(r['seal_fresh'])} ({r['header_bytes'] / MB:.2f} MB)"),
        ("  header pages already mapped", show_ms(r["seal"])),
        ("baseline: GGUFFile(adaptor) full parse", f"{show_ms(r['parse_adaptor'])} = {parse_ms / open_ms:.1f}x open"),
        ("  vocabulary replayed from the memo", show_ms(r["parse_adaptor_memo"])),
        ("open_model(original chat)", show_ms(r["open_model"])),
        ("  vocabulary replayed from the memo", show_ms(r["open_model_memo"])),
    ]
    return rows + files_rows(r) + rss_rows(r) + cycle_rows(r)


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    table = {m: dict(rows_for(r)) for m, r in results.items()}
    metrics = list(dict.fromkeys(k for r in results.values() for k, _ in rows_for(r)))
    width = max(map(len, metrics)) + 2
    print("| " + " | ".join(["metric".ljust(width), *(n.ljust(50) for n in names)]) + " |")
    print("|" + "|".join(["-" * (width + 2), *("-" * 52 for _ in names)]) + "|")
    for metric in metrics:
        print("| " + " | ".join([metric.ljust(width), *(table[n].get(metric, "").ljust(50) for n in names)]) + " |")
    for n in names:
        r = results[n]
        if "layout" not in r:
            continue
        print(f"\n{n}: files (MB) and the tasks that load them")
        users: dict[str, list[str]] = {}
        for t, fs in r["layout"].items():
            for f in fs:
                users.setdefault(f, []).append(t)
        for f, size in r["sizes"].items():
            print(f"  {f:44} {size / MB:9,.1f}  {', '.join(users[f])}")
        print("  originals: " + ", ".join(f"{t} {s / MB:,.1f}" for t, s in r["original_sizes"].items()))
        if "cycles" in r:
            print(f"\n{n}: cycles (load + swap + drop, gc disabled)")
            print("  cycle    seconds  VmRSS MB  RssAnon MB  maps  split maps  registry  fds  gc objects")
            for s in r["cycles"]["samples"]:
                print(f"  {s['cycle']:>6,} {s['seconds']:9.1f} {s['VmRSS'] / MB:9.1f} {s['RssAnon'] / MB:11.1f} "
                      f"{s['maps']:5} {s['split_maps']:11} {s['registry']:9} {s['fds']:4} {s['gc_objects']:11,}")
        if "profile" in r:
            print(f"\n{n}: cProfile of 200 x (open + load + swap)\n{r['profile']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, rest = argv[1], argv[2:]
        if kind == "memory":
            result = child_memory(rest[0], rest[1:])
        elif kind == "cycles":
            result = child_cycles(rest[0], int(rest[1]))
        else:
            result = child_first_open(*rest)
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=[SMOLLM2, GEMMA3], choices=[SMOLLM2, GEMMA3])
    ap.add_argument("--repeats", type=int, default=101, help="timed runs of open / load / swap (median reported)")
    ap.add_argument("--fresh", type=int, default=7, help="fresh processes timing their first open + swap")
    ap.add_argument("--cycles", type=int, default=10_000, help="load + swap cycles of the memory run (0: skip)")
    ap.add_argument("--reuse", action="store_true", help="keep an existing split in $GGUF_SPLIT_BENCH_WORK/loader-<model>/")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of open + load + swap per model")
    ap.add_argument("--files-only", action="store_true",
                    help="only many files against few (and the first load of a fresh process)")
    ap.add_argument("--json", help="also write all raw figures to this file")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    results = {m: bench_model(m, args) for m in args.models}
    import gguf_split

    print(f"# gguf-split loader benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, page cache warm, package {Path(gguf_split.__file__).parent}; "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the "
          "cores: compare wall times with CPU times)")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
