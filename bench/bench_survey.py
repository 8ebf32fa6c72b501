"""Benchmark of `gguf-split survey` and the manifest cache (issue 21).

Parts (`--parts`, default all):
- big: what the cache saves planning on large inputs. Four synthetic models of `--big-gib` GiB (default 3;
  a base of 64 MiB F16 tensors and three fine-tunes that change two tensors each; random bytes written
  once, fsynced, no holes, under <work>/survey/big/ and reused). Cold: an empty cache and every input's
  page cache dropped (posix_fadvise DONTNEED per file, no root needed), so every byte comes from the disk;
  warm: the same again (page cache dropped again) with the cache the cold run filled. Timed for
  `split --dry-run` (the library call) and for `survey`; goal: warm >= 4x faster than cold.
- sets: the real bench sets (bench/models.py, made by llama.cpp's tools under <work>/sets/) mixed with
  unrelated models (demo-built llama models of other seeds) and a quantization ladder, as links in one
  folder: survey cold and warm; families found, checked against the sets (every family set is exactly one
  family, every unrelated model is alone; the ladder is reported as found); and for every family the
  predicted split bytes against the bytes of an actual split of it (`split`, with the warm cache: it
  re-hashes what it does not copy) into <work>/survey/splits/ (removed after): equal.
- split (not in the default parts: it writes 2 x 3.4 GiB): a real split of the big models without a cache
  and with a warm one, page cache dropped each time: wall time and bytes read from the disk (/proc/self/io).
- scale: 1,000 small synthetic models (90 families of 10, 100 alone): survey time cold and warm, peak
  RSS; and the family grouping's time on 10x more tensors (linear: ~10x).

Usage: python bench/bench_survey.py [--parts big split sets scale] [--big-gib 3] [--json out.json]
Work directory: $GGUF_SPLIT_BENCH_WORK (else bench/work/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import WORK  # noqa: E402

from gguf.constants import GGMLQuantizationType, GGUFValueType  # noqa: E402

from gguf_split import split  # noqa: E402
from gguf_split.format.gguf import align_up, encode_kv, encode_prefix, encode_tensor_info  # noqa: E402
from gguf_split.disk.manifest_cache import RACY_NS, ManifestCache  # noqa: E402
from gguf_split.survey.run import survey  # noqa: E402

SURVEY = WORK / "survey"
TENSOR = 64 << 20  # bytes per synthetic tensor: F16 4096 x 8192
PIECE = 16 << 20
FAMILY_SETS = ("smollm2", "gemma3", "f16-smollm2", "f16-gemma3")
LADDER_SET = "ladder-smollm2-bf16"
GOAL = 4.0


def drop_page_cache(paths: list[str]) -> None:
    """Evict the files' pages (clean pages go at once; the files were fsynced when written)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- big: cold against warm -----------------------------------------------------------------------------

def write_big(path: Path, n_tensors: int, changed: set[int], seed: int) -> None:
    kvs = [encode_kv("general.architecture", GGUFValueType.STRING, "llama"),
           encode_kv("general.name", GGUFValueType.STRING, "survey bench")]
    infos = [encode_tensor_info(f"blk.{i}.ffn_up.weight", (4096, 8192), GGMLQuantizationType.F16, i * TENSOR)
             for i in range(n_tensors)]
    header = encode_prefix(3, n_tensors, len(kvs)) + b"".join(kvs) + b"".join(infos)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(header + bytes(align_up(len(header), 32) - len(header)))
        for i in range(n_tensors):
            rng = np.random.default_rng(seed * 1000 + i if i in changed else i)
            for _ in range(TENSOR // PIECE):
                f.write(rng.bytes(PIECE))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


def big_models(gib: int) -> dict[str, str]:
    d = SURVEY / f"big-{gib}g"
    d.mkdir(parents=True, exist_ok=True)
    n = gib * (1 << 30) // TENSOR
    tasks = {}
    for k, task in enumerate(("base", "chat", "code", "math")):
        p = d / f"{task}.gguf"
        if not p.exists():
            print(f"  writing {p} ({gib} GiB)", flush=True)
            write_big(p, n, set() if k == 0 else {2 * k, 2 * k + 1}, k)
        tasks[task] = str(p)
    newest = max(os.stat(p).st_ctime_ns for p in tasks.values())
    wait = (newest + RACY_NS - time.time_ns()) / 1e9
    if wait > 0:  # files this young are (rightly) never trusted by the cache
        time.sleep(wait)
    return tasks


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def part_big(gib: int) -> dict[str, Any]:
    tasks = big_models(gib)
    paths = list(tasks.values())
    total = sum(os.path.getsize(p) for p in paths)
    out: dict[str, Any] = {"inputs_gib": round(total / (1 << 30), 2)}
    with tempfile.TemporaryDirectory(dir=SURVEY) as tmp:
        for what in ("split --dry-run", "survey"):
            cache_dir = Path(tmp) / what.split()[0]
            runs = {}
            for run in ("cold", "warm"):
                drop_page_cache(paths)
                with ManifestCache(cache_dir) as cache:
                    if what == "survey":
                        seconds, r = timed(lambda: survey([Path(paths[0]).parent], cache=cache))
                        result = (r.families[0].split_bytes, r.scan.hashed_files)
                    else:
                        seconds, r = timed(lambda: split(tasks, Path(tmp) / "out", dry_run=True, cache=cache))
                        result = (r.output_bytes, cache.hits)
                runs[run] = {"seconds": round(seconds, 3), "result": result}
            assert runs["cold"]["result"][0] == runs["warm"]["result"][0], runs
            ratio = runs["cold"]["seconds"] / runs["warm"]["seconds"]
            out[what] = {**runs, "ratio": round(ratio, 1), "cold_read_gb_s": round(total / runs["cold"]["seconds"] / 1e9, 2)}
            verdict = "meets" if ratio >= GOAL else "MISSES"
            print(f"big ({out['inputs_gib']} GiB in 4 models) {what}: cold {runs['cold']['seconds']:.2f} s "
                  f"({out[what]['cold_read_gb_s']} GB/s from disk), warm {runs['warm']['seconds']:.3f} s: "
                  f"{ratio:.1f}x faster warm ({verdict} the goal of >= {GOAL:.0f}x)", flush=True)
    return out


def read_bytes() -> int:
    """Bytes this process (its threads) had fetched from storage (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line.split()[1] for line in f if line.startswith("read_bytes:")))


def part_split(gib: int) -> dict[str, Any]:
    """A real split of the big models without a cache and with a warm one (page cache dropped for the
    inputs each time): what the cache saves a split, whose inputs it must still check."""
    from contextlib import nullcontext

    tasks = big_models(gib)
    paths = list(tasks.values())
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=SURVEY) as tmp:
        cache_dir = Path(tmp) / "cache"
        with ManifestCache(cache_dir) as cache:
            split(tasks, Path(tmp) / "dry", dry_run=True, cache=cache)  # fills the cache, untimed
        for run in ("no cache", "warm cache"):
            target = Path(tmp) / "out"
            os.sync()
            drop_page_cache(paths)
            before = read_bytes()
            with (ManifestCache(cache_dir) if run == "warm cache" else nullcontext()) as cache:
                seconds, report = timed(lambda: split(tasks, target, cache=cache))
            out[run] = {"seconds": round(seconds, 1), "read_gib": round((read_bytes() - before) / (1 << 30), 2),
                        "written_gib": round(report.output_bytes / (1 << 30), 2)}
            shutil.rmtree(target)
        a, b = out["no cache"], out["warm cache"]
        print(f"big split ({sum(map(os.path.getsize, paths)) / (1 << 30):.0f} GiB in, {a['written_gib']} GiB out): "
              f"no cache {a['seconds']} s reading {a['read_gib']} GiB from disk, warm cache {b['seconds']} s reading "
              f"{b['read_gib']} GiB", flush=True)
    return out


# --- sets: families on real models ----------------------------------------------------------------------

def set_tasks(name: str) -> dict[str, str] | None:
    manifest = WORK / "sets" / name / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        tasks = {t: e["path"] for t, e in m["tasks"].items()}
        if all(os.path.exists(p) for p in tasks.values()):
            return tasks
    try:
        import models

        return {t: str(p) for t, p in models.model_set(name).items()}
    except Exception as e:  # noqa: BLE001 - a set this checkout cannot make is reported and left out
        print(f"  set {name}: not available ({e})")
        return None


def mix_folder() -> tuple[Path, dict[str, dict[str, str]], list[str]]:
    """<work>/survey/mix/<set>/<task>.gguf links to every set's models, plus unrelated models."""
    from gguf_split.demo import Dims, make_base_model

    mix = SURVEY / "mix"
    shutil.rmtree(mix, ignore_errors=True)
    sets: dict[str, dict[str, str]] = {}
    for name in (*FAMILY_SETS, LADDER_SET):
        tasks = set_tasks(name)
        if tasks is None:
            continue
        (mix / name).mkdir(parents=True)
        sets[name] = {}
        for task, path in tasks.items():
            link = mix / name / f"{task}.gguf"
            os.symlink(os.path.realpath(path), link)
            sets[name][task] = str(link)
    unrelated_dir = SURVEY / "unrelated"
    unrelated_dir.mkdir(parents=True, exist_ok=True)
    unrelated = []
    for seed in (11, 12, 13):
        p = unrelated_dir / f"other-{seed}.gguf"
        if not p.exists():
            make_base_model(p, dims=Dims(), seed=seed)
        (mix / "unrelated").mkdir(parents=True, exist_ok=True)
        os.symlink(p, mix / "unrelated" / p.name)
        unrelated.append(str(mix / "unrelated" / p.name))
    return mix, sets, unrelated


def part_sets() -> dict[str, Any]:
    mix, sets, unrelated = mix_folder()
    real = {os.path.realpath(p) for tasks in sets.values() for p in tasks.values()} | \
        {os.path.realpath(p) for p in unrelated}
    out: dict[str, Any] = {"sets": {k: list(v) for k, v in sets.items()}}
    with tempfile.TemporaryDirectory(dir=SURVEY) as tmp:
        cache_dir = Path(tmp) / "cache"
        reports = {}
        for run in ("cold", "warm"):
            drop_page_cache(sorted(real))
            with ManifestCache(cache_dir) as cache:
                seconds, reports[run] = timed(lambda: survey([mix], cache=cache))
            out[run] = {"seconds": round(seconds, 2), "hashed_files": reports[run].scan.hashed_files,
                        "hashed_gb": round(reports[run].scan.hashed_bytes / 1e9, 2)}
        r = reports["warm"]
        total = r.scan.bytes
        print(f"sets: {r.scan.files} files, {total / 1e9:.2f} GB: survey cold {out['cold']['seconds']:.1f} s, warm "
              f"{out['warm']['seconds']:.2f} s ({out['cold']['seconds'] / out['warm']['seconds']:.1f}x)")
        out["families"] = check_families(r, sets, unrelated)
        out["splits"] = check_predictions(r, cache_dir, Path(tmp))
    return out


def _real(p: str) -> str:
    return os.path.realpath(p)


def check_families(r: Any, sets: dict[str, dict[str, str]], unrelated: list[str]) -> list[dict[str, Any]]:
    """Every family set lies in one family (exactly its models, or with models of another set they share
    bytes with: then what joins them is shown); every unrelated model is alone; the ladder as found."""
    family_of = {_real(m.path): k for k, f in enumerate(r.families) for m in f.members}
    set_of = {_real(p): name for name, tasks in sets.items() for p in tasks.values()}
    found = []
    for name, tasks in sets.items():
        members = {_real(p) for p in tasks.values()}
        ks = sorted({family_of.get(p, -1) for p in members})
        if name == LADDER_SET:
            groups = [sorted(Path(p).name for p in members if family_of.get(p, -1) == k) for k in ks]
            rel = [x.why for x in r.related if members & {_real(p) for p in x.members}]
            print(f"  ladder {name}: by family {dict(zip(ks, groups))} (-1: alone); related notes: {rel}")
            found.append({"set": name, "ladder": True, "groups": dict(zip(ks, groups)), "related": rel})
            continue
        one = len(ks) == 1 and ks[0] >= 0
        others = sorted({set_of.get(_real(m.path), "?") for m in r.families[ks[0]].members} - {name}) if one else []
        what = "NOT in one family" if not one else "one family, exactly its models" if not others else \
            f"in one family, with models of {', '.join(others)} (they share bytes: {_joins(r.families[ks[0]])})"
        print(f"  set {name}: {what}")
        found.append({"set": name, "one_family": one, "with": others})
    alone = {_real(m.path) for m in r.alone}
    ok = all(_real(p) in alone for p in unrelated)
    print(f"  unrelated models: {'all alone' if ok else 'NOT all alone'}")
    found.append({"unrelated_alone": ok})
    return found


def _joins(f: Any) -> str:
    """The tensors every member of a family holds byte-identical (what its foundation would hold)."""
    from gguf_split.assemble.scan import hash_models, open_input

    models = [open_input(m.task, m.path) for m in f.members]
    try:
        hash_models(models)
        common = set.intersection(*({(t.name, m.digests[t.name]) for t, _ in m.tensors} for m in models))
        size = {t.name: t.nbytes for t, _ in models[0].tensors}
        big = sorted(common, key=lambda x: -size[x[0]])[:2]
        return ", ".join(f"{n} ({size[n] / 1e6:.1f} MB)" for n, _ in big) + f"; {len(common)} tensors in all"
    finally:
        for m in models:
            m.close()


def check_predictions(r: Any, cache_dir: Path, tmp: Path) -> list[dict[str, Any]]:
    out = []
    for k, f in enumerate(r.families):
        target = tmp / f"split-{k}"
        with ManifestCache(cache_dir) as cache:
            seconds, report = timed(lambda: split({m.task: m.path for m in f.members}, target, cache=cache))
        written = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
        same = written == f.split_bytes == report.output_bytes
        print(f"  family {k + 1} ({f.label}, {len(f.members)} models): predicted {f.split_bytes:,} bytes, split "
              f"wrote {written:,} ({'equal' if same else 'DIFFERENT'}); split with the warm cache {seconds:.1f} s")
        out.append({"label": f.label, "members": len(f.members), "predicted": f.split_bytes, "written": written,
                    "equal": same, "split_seconds": round(seconds, 1)})
        shutil.rmtree(target)
    return out


# --- scale ----------------------------------------------------------------------------------------------

_SCALE = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[2] + "/survey")
from test_survey import make_many
from gguf_split.disk.manifest_cache import RACY_NS, ManifestCache
from gguf_split.survey.run import survey
root = Path(sys.argv[1])
make_many(root / "many", 90, 10, 100)
time.sleep(RACY_NS / 1e9)
out = {}
for run in ("cold", "warm"):
    with ManifestCache(root / "cache") as cache:
        t0 = time.perf_counter()
        rep = survey([root / "many"], cache=cache, file_cost=0)
        out[run] = round(time.perf_counter() - t0, 2)
assert sorted(len(f.members) for f in rep.families) == [10] * 90 and len(rep.alone) == 100
out["rss_mib"] = round(int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) / 1024)
print(json.dumps(out))
"""


def part_scale() -> dict[str, Any]:
    import subprocess

    from gguf_split.survey.families import Model, candidate_families
    from gguf_split.disk.manifest import FileKey, FileManifest, TensorEntry

    with tempfile.TemporaryDirectory(dir=SURVEY) as tmp:
        run = subprocess.run([sys.executable, "-c", _SCALE, tmp, str(Path(__file__).resolve().parents[1] / "tests")],
                             capture_output=True, text=True, check=True)
        out: dict[str, Any] = json.loads(run.stdout)
    print(f"scale: 1,000 files (90 families of 10, 100 alone), survey cold {out['cold']} s, warm {out['warm']} s; "
          f"peak RSS of the process {out['rss_mib']} MiB")

    def synthetic(n_models: int, n_tensors: int) -> list[Model]:
        rng = np.random.default_rng(0)
        base = [rng.bytes(16) for _ in range(n_tensors)]
        models = []
        for i in range(n_models):
            digests = [d if j % 10 else rng.bytes(16) for j, d in enumerate(base)] if i % 10 else \
                [rng.bytes(16) for _ in range(n_tensors)]
            if i % 10 == 0:
                base = digests
            models.append(Model([FileManifest(f"/m{i}", FileKey(0, i, 0, 0, 0), "model", 0, tensors=tuple(
                TensorEntry(f"t{j}", 1, (64, 64), 0, 8192, d) for j, d in enumerate(digests)))]))
        return models

    times = {}
    for n in (1_000, 10_000):
        models = synthetic(n, 100)
        times[n * 100] = round(min(timed(lambda: candidate_families(models))[0] for _ in range(3)), 3)
    out["grouping_seconds_by_tensors"] = times
    small, big = times[100_000], times[1_000_000]
    print(f"grouping: {small:.3f} s for 100k tensors, {big:.3f} s for 1M ({big / small:.1f}x for 10x the tensors)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["big", "sets", "scale"], choices=["big", "split", "sets", "scale"])
    ap.add_argument("--big-gib", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    SURVEY.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if "big" in args.parts:
        results["big"] = part_big(args.big_gib)
    if "split" in args.parts:
        results["split"] = part_split(args.big_gib)
    if "sets" in args.parts:
        results["sets"] = part_sets()
    if "scale" in args.parts:
        results["scale"] = part_scale()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
