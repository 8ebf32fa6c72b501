"""Benchmark of `gguf-split split` on real models (issue 2): wall time against the I/O floor, header parse
time against gguf's GGUFReader, output bytes against the dedup optimum, hashing throughput per thread count.

Every figure is a ratio against a baseline measured in the same run on the same files, because these
machines are noisy: absolute seconds move by 2x from one minute to the next, ratios much less. Timed
figures are medians of `--repeats` runs, and the split and its floor are measured interleaved (read, cp,
split in each round) so drift hits both alike.

What is measured (page cache warm: every input is read once before any timing):
- split: `gguf_split.assemble.split.split(tasks, outdir, force=True)` in this process (no CLI start-up), on the base
  model and its three fine-tunes; the output directory is removed and the file system synced (untimed)
  before each run, so no run pays for the previous run's write-back or unlinks, and the vocabulary memo
  (gguf_format._WalkedArrays) is cleared, so each run walks the first input's vocabulary as a fresh
  `gguf-split` process does (the other inputs' identical vocabularies are replayed, as they would be).
- floor = read + write. read: each input read fully with 16 MiB `readinto` calls (the least any tool
  must do to see every input byte). write: GNU `cp` of the split's own outputs (same files, same bytes,
  same file count, sources in page cache) into an emptied directory on the same file system, then
  `sync FILE... DIR` (fsync of each copy and the directory), because the split fsyncs every output (in a
  background thread, while it writes the next output and proves the restore) and its directory before it
  returns. The split must also hash the inputs and prove its restore: the goal allows it 30% over the
  floor for that.
- header parse: `GGUFFile(path)` (open + mmap + strict parse + close), each run in a fresh interpreter
  (imports untimed; the goal's figure) and again in this process (where the vocabulary memo,
  gguf_format._WalkedArrays, replays the tokenizer arrays: a byte comparison instead of a walk), against
  `gguf.GGUFReader(path)` on each base model.
- bytes (`--parts bytes`, for the two-file layout it was written for: a split with `cut="none",
  max_shared_files=1`, a foundation and an adaptor a task): the outputs against the per-tensor dedup
  optimum and the two-file optimum. For the multi-file layout use bench_layout.py, which
  measures bytes on the export-lora sets against the optimum, the two-file layout and CDC.
- hashing: `gguf_split.assemble.scan.hash_models` with threads=1 and threads=2 (python-xxhash releases the GIL),
  in GB/s of the bytes it hashes (each input twice: the whole-file digest and the tensor digests), against
  plain xxh3-128 over each input's mmap (each input once) with 1 and 2 threads: the 2-thread baseline
  shows what the second core gives at the time of the run.
- phases: the split's wall time per phase (functions of the package wrapped with timers), to show where
  the time goes when the goal is missed.

Usage: python bench/bench_split.py [--models smollm2 gemma3] [--repeats 5] [--phases 3] [--json out.json]
       [--profile] (see --help)
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf_split
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA3, SMOLLM2, WORK, finetunes  # noqa: E402

from gguf_split.format.gguf import _WALKED, GGUFFile  # noqa: E402
from gguf_split.disk.progress import QUIET  # noqa: E402
from gguf_split.assemble.scan import hash_models, open_input  # noqa: E402
from gguf_split.assemble.split import split  # noqa: E402

READ_CHUNK = 16 << 20
SETTLE_SECONDS = 0.5  # after a sync, let the device finish discards before the next timed step
SPLIT_GOAL = 1.3  # split wall time <= 1.3 x the I/O floor
PARSE_GOAL = 100.0  # GGUFFile at least 100x faster than GGUFReader
MB = 1e6

TensorKey = tuple[str, int, tuple[int, ...], bytes]  # name, ggml type, shape, xxh3-128


# ---------------------------------------------------------------------------------------------------------
# Timing helpers


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Sample:
    """Seconds of repeated runs of one step; the median is the figure, min and max show the noise."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def show(self) -> str:
        return f"{self.median:.3f} s [{min(self.runs):.2f}-{max(self.runs):.2f}]"


def settle(*dirs: Path) -> None:
    """Remove `dirs` and flush the file system, untimed, so a timed step starts with no dirty pages."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE_SECONDS)


# ---------------------------------------------------------------------------------------------------------
# The I/O floor


def read_all(paths: list[Path]) -> int:
    """Read every byte of `paths` with large reads and return the byte count: the read half of the floor."""
    buf = bytearray(READ_CHUNK)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def cp_and_fsync(sources: list[Path], dest: Path) -> None:
    """`cp` the files into an empty `dest`, then fsync each copy and `dest` (`sync FILE...` fsyncs each
    named file): the write half of the floor, durable like the split's outputs."""
    dest.mkdir(parents=True)
    subprocess.run(["cp", *map(str, sources), str(dest)], check=True)
    subprocess.run(["sync", *(str(dest / s.name) for s in sources), str(dest)], check=True)


# ---------------------------------------------------------------------------------------------------------
# Measurements


def run_split(tasks: dict[str, str], out: Path, threads: int | None = None, **options: object) -> None:
    # as in a fresh `gguf-split` process: the first input's vocabulary is walked, the others replayed
    _WALKED.clear()
    split(tasks, out, force=True, threads=threads, **options)


def outputs_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".gguf")


def time_split_and_floor(tasks: dict[str, str], scratch: Path, repeats: int) -> dict[str, Sample]:
    """Interleaved rounds of: read the inputs, cp + fsync the split's outputs, run the split (default
    threads, then threads=1)."""
    inputs = [Path(p) for p in tasks.values()]
    ref, out, copy = scratch / "reference", scratch / "out", scratch / "cp"
    settle(ref)
    run_split(tasks, ref)  # warm-up: page cache, imports, and the files `cp` copies
    read_all(inputs)
    samples = {"read": Sample(), "cp": Sample(), "split": Sample(), "split threads=1": Sample()}
    for _ in range(repeats):
        samples["read"].runs.append(timed(lambda: read_all(inputs)))
        settle(copy)
        samples["cp"].runs.append(timed(lambda: cp_and_fsync(outputs_of(ref), copy)))
        settle(out)
        samples["split"].runs.append(timed(lambda: run_split(tasks, out)))
        settle(out)
        samples["split threads=1"].runs.append(timed(lambda: run_split(tasks, out, threads=1)))
    settle(copy, out)
    return samples


FRESH_PARSE = """
import sys, time
from gguf_split.format.gguf import GGUFFile
t0 = time.perf_counter()
GGUFFile(sys.argv[1]).close()
print(time.perf_counter() - t0)
"""


def parse_in_fresh_process(path: Path) -> float:
    """Seconds of one GGUFFile(path) in a new interpreter (imports not timed): what `gguf-split info`
    pays, with nothing learnt from an earlier parse. Run from this directory so that the interpreter
    imports the same gguf_split as this process (PYTHONPATH or the installed package)."""
    done = subprocess.run([sys.executable, "-c", FRESH_PARSE, str(path)], check=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent)
    return float(done.stdout)


def time_header_parse(path: Path, repeats: int, reader_runs: int) -> dict[str, Sample]:
    """GGUFFile (open + parse + close), in a fresh process and again in this one, against
    gguf.GGUFReader on the same file."""
    from gguf import GGUFReader

    def again() -> None:
        with GGUFFile(path):
            pass

    again()
    return {"fresh": Sample([parse_in_fresh_process(path) for _ in range(repeats)]),
            "again": Sample([timed(again) for _ in range(repeats)]),
            "GGUFReader": Sample([timed(lambda: GGUFReader(path, "r")) for _ in range(reader_runs)])}


def time_hashing(tasks: dict[str, str], repeats: int) -> dict[str, float]:
    """GB/s of the split's hashing step with 1 and 2 threads, against plain xxh3-128 over each input's
    mmap with 1 and 2 threads (what this machine gives right now: other load takes the second core)."""
    def scan(threads: int) -> tuple[float, int]:
        models = [open_input(t, p) for t, p in tasks.items()]
        try:
            nbytes = sum(2 * inp.file.size - inp.file.header.tensor_info_end for m in models for inp in m.files)
            return timed(lambda: hash_models(models, QUIET, threads)), nbytes
        finally:
            for m in models:
                m.close()

    def plain(threads: int) -> tuple[float, int]:
        files = [GGUFFile(p) for p in tasks.values()]
        try:
            with ThreadPoolExecutor(threads) as pool:
                digest = lambda f: xxhash.xxh3_128(f.view(0, f.size)).digest()  # noqa: E731
                return timed(lambda: list(pool.map(digest, files))), sum(f.size for f in files)
        finally:
            for f in files:
                f.close()

    result = {}
    for label, fn in (("plain xxh3, 1 thread", lambda: plain(1)), ("plain xxh3, 2 threads", lambda: plain(2)),
                      ("hash_models threads=1", lambda: scan(1)), ("hash_models threads=2", lambda: scan(2))):
        fn()
        runs = [fn() for _ in range(repeats)]
        result[label] = statistics.median(n / s for s, n in runs) / 1e9
    return result


# ---------------------------------------------------------------------------------------------------------
# Bytes


def tensor_keys(path: str | Path) -> dict[TensorKey, int]:
    """Every tensor of a GGUF as (name, type, shape, xxh3-128 of its bytes) -> byte count."""
    with GGUFFile(path) as f:
        return {(t.name, t.ggml_type, t.shape, xxhash.xxh3_128(f.tensor_view(t)).digest()): t.nbytes
                for t in f.header.tensors}


@dataclass
class OutputBytes:
    name: str
    size: int
    header: int  # header records (prefix, KVs, tensor infos)
    header_pad: int  # zeros between the header and the data section
    tensors: int
    tensor_pad: int  # zeros between and after tensors
    alignment: int
    keys: dict[TensorKey, int]


def output_bytes(path: Path) -> OutputBytes:
    with GGUFFile(path) as f:
        h = f.header
        tensor_bytes = sum(t.nbytes for t in h.tensors)
        return OutputBytes(path.name, f.size, h.tensor_info_end, h.data_start - h.tensor_info_end, tensor_bytes,
                           f.size - h.data_start - tensor_bytes, h.alignment, tensor_keys(path))


def byte_accounting(tasks: dict[str, str], out: Path) -> dict[str, object]:
    """Outputs against the inputs, the per-tensor dedup optimum and the two-file optimum, from digests
    computed here; also checks that the outputs hold exactly the tensors the two-file optimum places."""
    models = {t: tensor_keys(p) for t, p in tasks.items()}
    outs = {o.name: o for o in map(output_bytes, outputs_of(out))}
    unique: dict[TensorKey, int] = {}
    holders: dict[TensorKey, list[str]] = defaultdict(list)
    for task, keys in models.items():
        unique.update(keys)
        for k in keys:
            holders[k].append(task)
    common = {k for k, who in holders.items() if len(who) == len(models)}
    two_file = sum(unique[k] for k in common) + sum(n for keys in models.values() for k, n in keys.items()
                                                     if k not in common)
    # bytes a two-file split must repeat: tensors held by 2..n-1 of the models, once per extra holder
    repeated: dict[tuple[str, ...], int] = defaultdict(int)
    for k, who in holders.items():
        if 1 < len(who) < len(models):
            repeated[tuple(who)] += unique[k] * (len(who) - 1)
    foundation = [o for name, o in outs.items() if name.startswith("foundation-")]
    placement_ok = len(foundation) == 1 and set(foundation[0].keys) == common and all(
        set(outs[f"adaptor-{t}.gguf"].keys) == set(keys) - common for t, keys in models.items())
    total = lambda attr: sum(getattr(o, attr) for o in outs.values())  # noqa: E731
    padding = total("header_pad") + total("tensor_pad")
    pad_bound = sum(o.alignment * (len(o.keys) + 1) for o in outs.values())  # < one alignment per piece
    return {
        "inputs": sum(os.path.getsize(p) for p in tasks.values()),
        "outputs": total("size"),
        "output_tensors": total("tensors"),
        "headers": total("header"),
        "header_pad": total("header_pad"),
        "tensor_pad": total("tensor_pad"),
        "padding": padding,
        "padding_bound": pad_bound,
        "dedup_optimum": sum(unique.values()),
        "two_file_optimum": two_file,
        "repeated_by_group": {"+".join(g): n for g, n in sorted(repeated.items(), key=lambda x: -x[1])},
        "placement_ok": placement_ok,
        "per_output": {o.name: {k: v for k, v in asdict(o).items() if k != "keys"} | {"n_tensors": len(o.keys)}
                       for o in outs.values()},
    }


# ---------------------------------------------------------------------------------------------------------
# One model, the table, the command line


PARTS = ("time", "parse", "hash", "bytes", "phases")
DEFAULT_PARTS = ("time", "parse", "hash", "phases")  # bytes: see bench_layout.py


def bench_model(which: str, args: argparse.Namespace) -> dict[str, object]:
    """Every measurement of `args.parts` on one model's base + fine-tunes."""
    paths = finetunes(which)
    tasks = {t: str(p) for t, p in paths.items()}
    scratch = Path(args.work) / which
    result: dict[str, object] = {}

    def step(name: str, what: str) -> bool:
        if name in args.parts:
            print(f"[{which}] {what}...", file=sys.stderr)
        return name in args.parts

    if step("time", f"timing split and floor ({args.repeats} rounds)"):
        result["times"] = {k: s.runs for k, s in time_split_and_floor(tasks, scratch, args.repeats).items()}
    if step("parse", f"header parse (GGUFReader x{args.reader_runs})"):
        result["parse"] = {k: s.runs for k, s in time_header_parse(paths["base"], args.parse_runs,
                                                                   args.reader_runs).items()}
    if step("hash", "hashing"):
        result["hash_GBps"] = time_hashing(tasks, args.repeats)
    if step("bytes", "bytes"):
        two_file = scratch / "two-file"  # one shared file a task: the foundation, as 0.1 laid a split out
        if not two_file.is_dir():
            run_split(tasks, two_file, cut="none", max_shared_files=1)
        result["bytes"] = byte_accounting(tasks, two_file)
    if step("phases", f"phases ({args.phases} splits)"):
        result["phases"] = split_phases(tasks, scratch / "phases", args.phases)
    if args.profile:
        result["profile"] = profile_split(tasks, scratch / "profile")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


# where the split's wall time goes: (module, function, label); a function the package no longer has is skipped
PHASES = (
    ("gguf_split.assemble.split", "open_inputs", "open + parse inputs"),
    ("gguf_split.assemble.split", "hash_models", "hash (file + tensor digests)"),
    ("gguf_split.assemble.split", "plan_layout", "plan"),
    ("gguf_split.assemble.outputs", "build_header", "build headers"),
    ("gguf_split.assemble.outputs", "write_gguf", "write (copy tensors)"),
    ("os", "fsync", "fsync"),
    ("gguf_split.assemble.outputs", "prove_restores", "prove restore (parse outputs)"),
    ("gguf_split.assemble.outputs", "read_back_check", "read back + check + digest outputs (beside the copy)"),
)
OTHER = "other (lock, rename, close, report)"


@contextmanager
def phase_timers(acc: dict[str, float]) -> Iterator[None]:
    """Wrap the PHASES functions so each call adds its wall time to `acc[label]` (wall clock, unlike
    cProfile, which inflates the parser's many small calls ~2x)."""
    saved = []
    for module_name, attr, label in PHASES:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if fn is None:
            continue

        def wrapper(*a: object, _fn: Callable = fn, _label: str = label, **k: object) -> object:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.perf_counter() - t0

        setattr(module, attr, wrapper)
        saved.append((module, attr, fn))
    try:
        yield
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def split_phases(tasks: dict[str, str], out: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds per phase of `repeats` splits (each from an emptied, synced directory)."""
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        settle(out)
        acc: dict[str, float] = {}
        with phase_timers(acc):
            total = timed(lambda: run_split(tasks, out))
        acc[OTHER] = total - sum(acc.values())
        acc["total"] = total
        for label, seconds in acc.items():
            runs[label].append(seconds)
    settle(out)
    return dict(runs)


def profile_split(tasks: dict[str, str], out: Path) -> str:
    """cProfile of one split, top functions by cumulative time (cProfile inflates small calls ~2x)."""
    settle(out)
    prof = cProfile.Profile()
    prof.runcall(run_split, tasks, out)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(18)
    settle(out)
    return text.getvalue()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def time_rows(r: dict) -> list[tuple[str, str]]:
    t = {k: Sample(v) for k, v in r["times"].items()}
    floor = t["read"].median + t["cp"].median
    ratio = t["split"].median / floor
    return [
        ("split wall, median [min-max]", t["split"].show()),
        ("  split wall, threads=1", t["split threads=1"].show()),
        ("floor: read inputs (16 MiB reads)", t["read"].show()),
        ("floor: cp outputs + fsync", t["cp"].show()),
        ("floor total", f"{floor:.3f} s"),
        (f"split / floor (goal <= {SPLIT_GOAL})", f"{ratio:.2f}  {verdict(ratio <= SPLIT_GOAL)}"),
    ]


def parse_rows(r: dict) -> list[tuple[str, str]]:
    parse = {k: Sample(v) for k, v in r["parse"].items()}
    speedup = parse["GGUFReader"].median / parse["fresh"].median
    return [
        ("header parse GGUFFile, fresh process", f"{parse['fresh'].median * 1e3:.1f} ms"),
        ("  GGUFFile again, same process, memo warm", f"{parse['again'].median * 1e3:.1f} ms"),
        ("header parse GGUFReader", f"{parse['GGUFReader'].median:.2f} s"),
        (f"GGUFReader / GGUFFile fresh (goal >= {PARSE_GOAL:.0f})",
         f"{speedup:,.0f}x  {verdict(speedup >= PARSE_GOAL)}"),
    ]


def bytes_rows(r: dict) -> list[tuple[str, str]]:
    b = r["bytes"]
    structural = b["two_file_optimum"] - b["dedup_optimum"]
    over_dedup = b["outputs"] - b["dedup_optimum"] - b["headers"]
    two_file_exact = (b["output_tensors"] == b["two_file_optimum"] and b["placement_ok"]
                      and b["padding"] <= b["padding_bound"]
                      and b["outputs"] == b["two_file_optimum"] + b["headers"] + b["padding"])
    return [
        ("inputs (base + 3 fine-tunes)", f"{b['inputs'] / MB:,.1f} MB"),
        ("outputs (foundation + 4 adaptors)", f"{b['outputs'] / MB:,.1f} MB"),
        ("outputs / inputs", f"{b['outputs'] / b['inputs']:.3f}"),
        ("dedup optimum: distinct tensors", f"{b['dedup_optimum'] / MB:,.1f} MB"),
        ("output headers (4 carry all KVs)", f"{b['headers'] / MB:,.2f} MB"),
        ("padding (header / tensors)", f"{b['padding']:,} B ({b['header_pad']:,} / {b['tensor_pad']:,})"),
        ("outputs - (dedup optimum + headers)", f"{over_dedup / MB:,.2f} MB"),
        ("  of which tensors repeated by design", f"{structural / MB:,.2f} MB"),
        ("  of which padding", f"{b['padding']:,} B"),
        ("goal: outputs = dedup opt + headers + pad", verdict(over_dedup == b["padding"])),
        ("two-file optimum (shared once, rest/model)", f"{b['two_file_optimum'] / MB:,.1f} MB"),
        ("outputs = two-file opt + headers + pad", verdict(two_file_exact)),
    ]


def hash_rows(r: dict) -> list[tuple[str, str]]:
    h = r["hash_GBps"]

    def pair(one: str, two: str) -> list[tuple[str, str]]:
        return [(f"hash GB/s: {one}", f"{h[one]:.2f}"),
                (f"hash GB/s: {two}", f"{h[two]:.2f}  ({h[two] / h[one]:.2f}x)")]

    return (pair("plain xxh3, 1 thread", "plain xxh3, 2 threads")
            + pair("hash_models threads=1", "hash_models threads=2"))


SECTIONS = (("times", time_rows), ("parse", parse_rows), ("bytes", bytes_rows), ("hash_GBps", hash_rows))


def rows_for(r: dict) -> list[tuple[str, str]]:
    """The table rows of one model: (metric, figure), for the parts measured."""
    return [row for key, rows in SECTIONS if key in r for row in rows(r)]


def print_phases(results: dict[str, dict]) -> None:
    """Median seconds per phase of the split, per model (phases are medians of their own, so they need
    not add up to the total exactly)."""
    names = [n for n, r in results.items() if "phases" in r]
    if not names:
        return
    labels = list(dict.fromkeys(k for n in names for k in results[n]["phases"]))
    width = max(map(len, labels)) + 2
    runs = len(results[names[0]]["phases"]["total"])
    print(f"\nWhere the split's time goes (median of {runs} runs, wall clock; a phase run in a background thread "
          "overlaps the others, so 'other' can be negative):\n")
    print("| " + " | ".join(["phase".ljust(width), *(n.ljust(10) for n in names)]) + " |")
    print("|" + "|".join(["-" * (width + 2), *("-" * 12 for _ in names)]) + "|")
    for label in labels:
        cells = [f"{statistics.median(results[n]['phases'][label]):.3f} s" if label in results[n]["phases"] else "-"
                 for n in names]
        print("| " + " | ".join([label.ljust(width), *(c.ljust(10) for c in cells)]) + " |")


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    table = {m: dict(rows_for(r)) for m, r in results.items()}
    metrics = [k for k, _ in rows_for(results[names[0]])]
    if metrics:
        width = max(map(len, metrics)) + 2
        print("| " + " | ".join(["metric".ljust(width), *(n.ljust(30) for n in names)]) + " |")
        print("|" + "|".join(["-" * (width + 2), *("-" * 32 for _ in names)]) + "|")
        for metric in metrics:
            print("| " + " | ".join([metric.ljust(width), *(table[n][metric].ljust(30) for n in names)]) + " |")
    print_phases(results)
    for n in names:
        groups = results[n].get("bytes", {}).get("repeated_by_group")
        if groups:
            listing = ", ".join(f"{g}: {v / MB:.2f} MB" for g, v in groups.items())
            print(f"\n{n}: tensors held by some but not all models, extra copies by holder group: {listing}")
        if "profile" in results[n]:
            print(f"\n{n}: cProfile of one split\n{results[n]['profile']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=[SMOLLM2, GEMMA3], choices=[SMOLLM2, GEMMA3])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (median reported)")
    ap.add_argument("--reader-runs", type=int, default=1, help="GGUFReader runs (~8 s SmolLM2, ~27 s Gemma-3)")
    ap.add_argument("--parse-runs", type=int, default=9, help="GGUFFile runs (fresh processes, and in-process)")
    ap.add_argument("--work", default=str(WORK / "bench-split"), help="scratch directory (outputs, copies)")
    ap.add_argument("--json", help="also write all raw figures to this file")
    ap.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=PARTS,
                    help="measurements to run (default: all but bytes, which bench_layout.py measures)")
    ap.add_argument("--phases", type=int, default=3, help="splits timed phase by phase")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one split per model")
    ap.add_argument("--keep", action="store_true", help="keep the scratch outputs")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    results = {m: bench_model(m, args) for m in args.models}
    print(f"# gguf-split split benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, page cache warm, "
          f"package {Path(gguf_split.__file__).parent}, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=lambda x: x.hex()))


if __name__ == "__main__":
    main()
