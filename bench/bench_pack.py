"""Pack benchmark: bytes and speed of `gguf_split.pack` (writer, reader) on real model sets, against the baselines.

For each set (base + 3 fine-tunes), in one run:
- inputs: the sum of the input files;
- pack: `pack_files` of the inputs (the models, not a split of them) in a fresh process, bytes, wall
  time -> MB/s of input, peak anonymous memory (RssAnon sampled every 10 ms, over the process's own after
  imports; mapped input and pack pages are file-backed and not counted) against the bound
  2 x the largest tensor + 256 MB;
- unpack: `unpack` into an empty directory (fsync included) in a fresh process, MB/s of output, peak
  anonymous memory likewise, every file's sha256 checked against the input's; then pack and unpack again,
  untimed, under tracemalloc (numpy reports its buffers to it): the peak of everything allocated;
- split: `gguf_split.assemble.split.split` of the same models, the sum of its output files ("n/a" if it fails);
- zstd -19: the CLI `zstd -19 -T2` on each input file on its own, the sum (cached by path/size/mtime);
- CDC + zstd: content-defined chunks of every input (FastCDC 2020 via pyfastcdc: min 16 KiB, avg 64 KiB,
  max 256 KiB, normalized level 1, as the bench-infra branch's bench/hashing.py; or, when pyfastcdc is
  missing, a 32-byte-window Gear hash cut on its top 16 bits with the same min/max), each distinct chunk
  (xxh3-128) stored once and compressed on its own with zstd -19 (cached).
Goals (the issue): the SmolLM2 set <= 120 MB; every set below zstd -19 and below CDC + zstd; unpack
>= 100 MB/s of output averaged over a set on 2 cores.

`--ladder` packs the ladder-* sets (an F16 or BF16 source and the Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 that
llama-quantize made from it; bench/models.py) and prints per set: each file's cost in the pack (the records
of the tensors and header pieces it is the first file to hold) as a fraction of its size (the source: goals
<= 0.84 F16, <= 0.66 BF16; each quant beyond the source: goal <= 2 %), the whole pack against ggufpacker's
(<work>/ggufpacker/<set>/check.json, made by `models.py --ggufpacker`), the per-file zstd -9 sum and the
version-1 pack of `--v1-tree` (default: `git archive` of V1_WRITER, the last commit writing format 1,
packed in the same run), and unpack MB/s on `--threads` threads with its peak anonymous memory (goal >= 50
MB/s on 2).

Sets: the real ones made with llama.cpp's `llama-export-lora` by the bench-infra branch's bench/models.py,
read from `<work>/sets/<set>/manifest.json` when present (`--source export-lora`), else the
export-lora-style fine-tunes of bench/common.py (`--source common`); `auto` (default) prefers the first.

`--against TREE` instead packs and unpacks each set with this package and with TREE's (a checkout, or
`git archive` of a commit: the speed before a change), interleaved, the median of `--rounds` runs each,
and says whether both wrote the same bytes.

`--compressors` instead compares compressors (zstd levels, zlib, lzma, brotli and lz4 when installed) on
real pack data from the SmolLM2 set: byte-shuffled quantized tensors, delta residuals, header records;
ratio and single-thread compress / decompress MB/s (thread CPU time, robust to a shared machine).

    python bench/bench_pack.py                           # both sets
    python bench/bench_pack.py --sets smollm2 --json out.json
    python bench/bench_pack.py --compressors
    python bench/bench_pack.py --ladder                  # the quantization ladders (issue 22), see below
    git archive HEAD~3 | tar -x -C /tmp/before && python bench/bench_pack.py --against /tmp/before --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# a child of --against runs the other tree's package (GGUF_SPLIT_BENCH_TREE), everything else this one
sys.path.insert(0, os.environ.get("GGUF_SPLIT_BENCH_TREE") or str(HERE.parent))
from common import WORK, finetunes  # noqa: E402

from gguf_split.format.gguf import GGUFFile  # noqa: E402
from gguf_split.pack import codec  # noqa: E402

CDC_MIN, CDC_AVG, CDC_MAX = 16 << 10, 64 << 10, 256 << 10
CACHE = WORK / "bench-pack-cache.json"


# ---------------------------------------------------------------------------------------------------------
# inputs


def model_set(name: str, source: str) -> tuple[dict[str, Path], str]:
    manifest = WORK / "sets" / name / "manifest.json"
    if source in ("auto", "export-lora") and manifest.exists():
        m = json.loads(manifest.read_text())
        tasks = {t: Path(v["path"]) for t, v in m["tasks"].items()}
        if all(p.exists() for p in tasks.values()):
            return tasks, f"llama-export-lora set ({manifest})"
    if source == "export-lora":
        raise SystemExit(f"{manifest}: no llama-export-lora set (make it with bench/models.py on bench-infra)")
    return finetunes(name), "bench/common.py export-lora-style fine-tunes"


def input_names(tasks: dict[str, Path]) -> list[tuple[str, Path]]:
    return [(f"{task}.gguf", p) for task, p in tasks.items()]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cache() -> dict[str, Any]:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _cached(key: str, fn: Callable[[], Any]) -> Any:
    c = _cache()
    if key in c:
        return c[key]
    v = fn()
    c = _cache()
    c[key] = v
    CACHE.write_text(json.dumps(c, indent=1))
    return v


def _file_key(p: Path) -> str:
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------------------------
# memory


class AnonPeak:
    """Peak RssAnon of this process while in the block (sampled every 10 ms)."""

    def __enter__(self) -> "AnonPeak":
        self.peak = self.start = self._now()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._now())


def largest_tensor(paths: list[Path]) -> int:
    best = 0
    for p in paths:
        with GGUFFile(p) as f:
            best = max([best] + [t.nbytes for t in f.header.tensors])
    return best


# ---------------------------------------------------------------------------------------------------------
# baselines


def zstd19(p: Path, level: int = 19) -> int:
    def run() -> int:
        out = subprocess.run(["zstd", f"-{level}", "-T2", "-q", "-c", str(p)], check=True, stdout=subprocess.PIPE)
        return len(out.stdout)
    return _cached(f"zstd{level if level != 19 else 19}:{_file_key(p)}", run)


LADDER_ZSTD = 9  # --ladder's zstd baseline level: -19 takes ~10 min a ladder here (~3 MB/s)


def _gear_chunks(buf: memoryview) -> list[tuple[int, int]]:
    """Fallback chunker: Gear hash over a 32-byte window (h = sum g[b] << k, k < 32, mod 2^32, computed by
    doubling), cut after a byte whose hash has its top 16 bits zero, min 16 KiB, max 256 KiB."""
    table = np.random.default_rng(0).integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32)
    data = np.frombuffer(buf, dtype=np.uint8)
    cuts: list[int] = []
    block = 64 << 20
    for s in range(0, len(data), block):
        lo = max(0, s - 32)
        h = table[data[lo : s + block]]
        for k in (1, 2, 4, 8, 16):
            h2 = h.copy()
            h2[k:] += h[:-k] << np.uint32(k)
            h = h2
        hits = np.flatnonzero((h & np.uint32(0xFFFF0000)) == 0) + lo
        cuts.extend(int(c) + 1 for c in hits[hits >= s])
    out, start = [], 0
    i = 0
    n = len(data)
    while start < n:
        end = min(n, start + CDC_MAX)
        while i < len(cuts) and cuts[i] < start + CDC_MIN:
            i += 1
        if i < len(cuts) and cuts[i] <= end:
            end = cuts[i]
        out.append((start, end))
        start = end
    return out


def cdc_zstd(paths: list[Path]) -> dict[str, Any]:
    try:
        from pyfastcdc import FastCDC

        chunker = "FastCDC 2020 (pyfastcdc), min 16 KiB, avg 64 KiB, max 256 KiB, NC 1"

        def chunks(mv: memoryview) -> list[tuple[int, int]]:
            cdc = FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=1)
            out, pos = [], 0
            for c in cdc.cut_buf(mv):
                out.append((pos, pos + c.length))
                pos += c.length
            return out
    except ImportError:
        chunker = "Gear 32-byte window, top 16 bits, min 16 KiB, max 256 KiB (pyfastcdc missing)"
        chunks = _gear_chunks

    def run() -> dict[str, Any]:
        import mmap

        import zstandard
        from concurrent.futures import ThreadPoolExecutor

        seen: set[bytes] = set()
        distinct = total = n = 0
        compressed = 0
        with ThreadPoolExecutor(2) as pool:
            for p in paths:
                with open(p, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    mv = memoryview(mm)
                    todo = []
                    for a, b in chunks(mv):
                        key = xxhash.xxh3_128_digest(mv[a:b])
                        total += b - a
                        n += 1
                        if key not in seen:
                            seen.add(key)
                            distinct += b - a
                            todo.append((a, b))

                    def comp(ab: tuple[int, int]) -> int:
                        return len(zstandard.ZstdCompressor(level=19).compress(mv[ab[0] : ab[1]]))

                    compressed += sum(pool.map(comp, todo))
                    mv.release()
                    mm.close()
        return {"chunker": chunker, "chunks": n, "distinct": distinct, "total": total, "zstd19": compressed}

    return _cached("cdc:" + ",".join(_file_key(p) for p in paths) + ":" + chunker, run)


def split_bytes(tasks: dict[str, Path], scratch: Path) -> int | None:
    try:
        from gguf_split.assemble.split import split
    except Exception:  # noqa: BLE001 - the lead is rewriting split: report n/a
        return None
    out = scratch / "split"
    shutil.rmtree(out, ignore_errors=True)
    try:
        split({t: str(p) for t, p in tasks.items()}, str(out), force=True)
        return sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    except Exception as e:  # noqa: BLE001
        print(f"  split failed: {e}", file=sys.stderr)
        return None
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# the measurement


def measure(name: str, source: str, scratch: Path, threads: int, baselines: bool, trace: bool) -> dict[str, Any]:
    tasks, origin = model_set(name, source)
    inputs = input_names(tasks)
    paths = [p for _, p in inputs]
    total = sum(p.stat().st_size for p in paths)
    for p in paths:  # warm the page cache: time the codecs, not the first read from disk
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    print(f"{name}: {len(paths)} inputs, {total / 1e6:.1f} MB ({origin})", file=sys.stderr)
    scratch.mkdir(parents=True, exist_ok=True)
    pk = scratch / f"{name}.ggufpack"
    if pk.exists():
        pk.unlink()
    load0 = os.getloadavg()[0]
    meta = {"tasks": {t: f"{t}.gguf" for t in tasks}}
    cp = child("pack", {"inputs": [(n, str(p)) for n, p in inputs], "out": str(pk), "meta": meta,
                        "threads": threads})
    out = scratch / f"{name}-out"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    runs = []
    for _ in range(3):  # unpack is quick: the median of 3 fresh runs (the machine is shared)
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"], check=False)
        runs.append(child("unpack", {"pack": str(pk), "out": str(out), "threads": threads}))
    runs.sort(key=lambda c: c["seconds"])
    cu = runs[1]
    traced = {}
    if trace:  # untimed runs under tracemalloc: the peak of every allocation numpy and Python make
        tp = scratch / f"{name}-traced.ggufpack"
        traced["pack"] = child("pack", {"inputs": [(n, str(p)) for n, p in inputs], "out": str(tp), "meta": meta,
                                        "threads": threads, "trace": True})["traced_peak"]
        tp.unlink()
        shutil.rmtree(out, ignore_errors=True)
        traced["unpack"] = child("unpack", {"pack": str(pk), "out": str(out), "threads": threads,
                                            "trace": True})["traced_peak"]
    t_pack, t_unpack = cp["seconds"], cu["seconds"]
    identical = all(sha256(out / n) == sha256(p) for n, p in inputs)
    shutil.rmtree(out, ignore_errors=True)
    big = largest_tensor(paths)
    r: dict[str, Any] = {
        "set": name, "origin": origin, "inputs": total, "files": len(paths), "pack": cp["pack_bytes"],
        "pack_s": round(t_pack, 2), "unpack_s": round(t_unpack, 2), "identical": identical,
        "unpack_range": [round(runs[0]["seconds"], 2), round(runs[-1]["seconds"], 2)],
        "pack_MBps": total / t_pack / 1e6, "unpack_MBps": cu["bytes"] / t_unpack / 1e6,
        "mem_pack": cp["peak_anon"], "mem_unpack": cu["peak_anon"], "mem_base": cp["base_anon"],
        "traced_pack": traced.get("pack"), "traced_unpack": traced.get("unpack"),
        "mem_bound": 2 * big + (256 << 20), "largest_tensor": big, "threads": threads,
        "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
        "codecs": cp["codecs"], "kinds": cp["kinds"],
    }
    if baselines:
        r["split"] = split_bytes(tasks, scratch)
        print(f"  zstd -19 of {len(paths)} files (cached after the first run) ...", file=sys.stderr)
        r["zstd19"] = sum(zstd19(p) for p in paths)
        print("  CDC + zstd -19 (cached after the first run) ...", file=sys.stderr)
        r["cdc"] = cdc_zstd(paths)
    return r


LADDERS = ("ladder-smollm2-f16", "ladder-smollm2-bf16", "ladder-gemma3-f16", "ladder-gemma3-bf16")


# main just before the ladder merge (d404a4a): the last writer of pack format version 1
V1_WRITER = "7917642e0ab51ae1e6f5f391951124f1f3b3733e"


def _v1_tree(scratch: Path) -> Path:
    """`git archive V1_WRITER` of this checkout: the version-1 writer the ladders are compared with."""
    import io
    import tarfile

    d = scratch / "v1-tree"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(HERE.parent), "archive", "--format=tar", V1_WRITER, "gguf_split"],
                         check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(d)
    return d


def file_costs(pack: Path) -> list[tuple[str, int, int]]:
    """(file name, size, bytes of the records it is the first file to need: its new header pieces and
    tensors, with every record they decode from that no earlier file needed) of each file, in order."""
    from gguf_split.pack.format import RecordHeader
    from gguf_split.pack.reader import PackReader

    with PackReader(pack) as r:
        seen: set[tuple[str, int]] = set()

        def rec(off: int) -> int:
            return RecordHeader.SIZE + RecordHeader.read(r.mm, off).body_length

        def cost(kind: str, i: int) -> int:
            if (kind, i) in seen:
                return 0
            seen.add((kind, i))
            if kind == "b":
                return rec(r.blobs[i].record)
            t = r.tensors[i]
            own = sum(rec(c) for c in t.chunks) + (rec(t.factors) if t.factors is not None else 0)
            dep = t.base if t.base is not None else t.source
            return own + (cost("t", dep) if dep is not None else 0)

        return [(f.entry.name, f.entry.size, sum(cost(p.kind, p.value) for p in f.parts if p.kind in "bt"))
                for f in r.files]


def measure_ladder(name: str, scratch: Path, threads: int, v1_tree: Path) -> dict[str, Any]:
    """One ladder set: our pack (version 2), the version-1 writer's, per-file costs, unpack speed and
    memory, against ggufpacker's pack and zstd -19."""
    tasks, origin = model_set(name, "export-lora")
    src_task = json.loads((WORK / "sets" / name / "manifest.json").read_text()).get("source_task")
    inputs = [(p.name, p) for p in tasks.values()]
    total = sum(p.stat().st_size for _, p in inputs)
    print(f"{name}: {len(inputs)} files, {total / 1e6:.1f} MB", file=sys.stderr)
    scratch.mkdir(parents=True, exist_ok=True)
    pk, pk1, out = scratch / f"{name}.ggufpack", scratch / f"{name}-v1.ggufpack", scratch / f"{name}-out"
    args = {"inputs": [(n, str(p)) for n, p in inputs], "meta": {"tasks": {t: p.name for t, p in tasks.items()}},
            "threads": threads}
    for p in (pk, pk1):
        p.unlink(missing_ok=True)
    cp = child("pack", {**args, "out": str(pk)})
    print(f"  pack {cp['seconds']:.1f} s, {cp['pack_bytes'] / 1e6:.1f} MB", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    cu = child("unpack", {"pack": str(pk), "out": str(out), "threads": threads})
    identical = all(sha256(out / n) == sha256(p) for n, p in inputs)
    shutil.rmtree(out, ignore_errors=True)
    print(f"  unpack {cu['seconds']:.1f} s, identical {identical}", file=sys.stderr)
    c1 = child("pack", {**args, "out": str(pk1)}, v1_tree)
    pk1.unlink(missing_ok=True)
    print(f"  v1 pack {c1['pack_bytes'] / 1e6:.1f} MB", file=sys.stderr)
    gp_file = WORK / "ggufpacker" / name / "check.json"
    gp = json.loads(gp_file.read_text()).get("pack_bytes") if gp_file.exists() else None
    src_name = tasks[src_task].name if src_task in tasks else inputs[0][0]
    return {"set": name, "origin": origin, "inputs": total, "pack": cp["pack_bytes"], "pack_s": cp["seconds"],
            "unpack_s": cu["seconds"], "unpack_MBps": cu["bytes"] / cu["seconds"] / 1e6,
            "mem_unpack": cu["peak_anon"], "mem_pack": cp["peak_anon"], "identical": identical,
            "v1_pack": c1["pack_bytes"], "ggufpacker": gp, "zstd": sum(zstd19(p, LADDER_ZSTD) for _, p in inputs),
            "source": src_name, "files": file_costs(pk), "codecs": cp["codecs"], "threads": threads,
            "load": round(os.getloadavg()[0], 2)}


def ladder_table(results: list[dict[str, Any]]) -> str:
    out = []
    for r in results:
        out.append(f"{r['set']}: pack {r['pack'] / 1e6:,.1f} MB of {r['inputs'] / 1e6:,.1f} MB "
                   f"(ggufpacker {_mb(r['ggufpacker'])}, our v1 {_mb(r['v1_pack'])}, zstd -{LADDER_ZSTD} {_mb(r['zstd'])}); "
                   f"pack {r['pack_s']:.1f} s; unpack {r['unpack_s']:.1f} s = {r['unpack_MBps']:.0f} MB/s on "
                   f"{r['threads']} threads, peak {r['mem_unpack'] / 2**20:.0f} MiB anon; byte-identical "
                   f"{'yes' if r['identical'] else 'NO'}; load {r['load']}")
        out.append("| file | size | cost in the pack | of its size |")
        out.append("|---|---:|---:|---:|")
        for n, size, cost in r["files"]:
            what = "x" if n == r["source"] else "%"
            frac = f"{cost / size:.3f}x" if what == "x" else f"{100 * cost / size:.3f} %"
            out.append(f"| {n} | {size / 1e6:,.1f} MB | {cost / 1e6:,.2f} MB | {frac} |")
        out.append("")
    return "\n".join(out)


def child(what: str, args: dict[str, Any], tree: Path | None = None) -> dict[str, Any]:
    """Run a pack or unpack in a fresh process; its wall time and peak anonymous memory over its baseline
    after imports (a fresh process: the parent's freed heap cannot hide the child's allocations). `tree`:
    run another tree's package instead of this one."""
    env = {**os.environ, "GGUF_SPLIT_BENCH_TREE": str(tree)} if tree is not None else None
    r = subprocess.run([sys.executable, __file__, "--child", what, json.dumps(args)], check=True,
                       stdout=subprocess.PIPE, text=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# against another tree


def against(name: str, source: str, scratch: Path, threads: int, other: Path, rounds: int) -> dict[str, Any]:
    """Pack and unpack one set with this package and with `other` (a checkout, or `git archive` of a
    commit), interleaved (this, other, other, this, ...) so that a shared machine's load falls on both;
    the median of `rounds` runs of each, and whether both wrote the same pack bytes."""
    tasks, origin = model_set(name, source)
    inputs = input_names(tasks)
    total = sum(p.stat().st_size for _, p in inputs)
    meta = {"tasks": {t: f"{t}.gguf" for t in tasks}}
    print(f"{name}: {total / 1e6:.1f} MB ({origin}); this tree against {other}, {rounds} rounds", file=sys.stderr)
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[float]]] = {"this": {"pack": [], "unpack": []}, "other": {"pack": [], "unpack": []}}
    digests: dict[str, set[str]] = {"this": set(), "other": set()}
    for i in range(rounds):
        order = ["this", "other"] if i % 2 == 0 else ["other", "this"]
        for who in order:
            tree = other if who == "other" else None
            pk, out = scratch / f"{name}-{who}.ggufpack", scratch / f"{name}-{who}-out"
            pk.unlink(missing_ok=True)
            cp = child("pack", {"inputs": [(n, str(p)) for n, p in inputs], "out": str(pk), "meta": meta,
                                "threads": threads}, tree)
            runs[who]["pack"].append(cp["seconds"])
            digests[who].add(sha256(pk))
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            runs[who]["unpack"].append(child("unpack", {"pack": str(pk), "out": str(out), "threads": threads},
                                             tree)["seconds"])
            shutil.rmtree(out, ignore_errors=True)
            print(f"  round {i + 1} {who}: pack {cp['seconds']:.2f} s, unpack {runs[who]['unpack'][-1]:.2f} s",
                  file=sys.stderr)
    med = {who: {k: sorted(v)[len(v) // 2] for k, v in r.items()} for who, r in runs.items()}
    return {"set": name, "inputs": total, "runs": runs, "median": med,
            "same_bytes": len(digests["this"] | digests["other"]) == 1, "load": round(os.getloadavg()[0], 2)}


def against_table(results: list[dict[str, Any]]) -> str:
    out = ["| set | pack s this / other (median) | MB/s this / other | unpack s this / other | MB/s this / other "
           "| same pack bytes |", "|---|---|---|---|---|---|"]
    for r in results:
        m, mb = r["median"], r["inputs"] / 1e6
        out.append(f"| {r['set']} | {m['this']['pack']:.2f} / {m['other']['pack']:.2f} | "
                   f"{mb / m['this']['pack']:.0f} / {mb / m['other']['pack']:.0f} | "
                   f"{m['this']['unpack']:.2f} / {m['other']['unpack']:.2f} | "
                   f"{mb / m['this']['unpack']:.0f} / {mb / m['other']['unpack']:.0f} | "
                   f"{'yes' if r['same_bytes'] else 'NO'} |")
    return "\n".join(out)


def _pack_api() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(pack_files, unpack) of the package on sys.path: pack/writer.py and pack/reader.py, or a tree from
    before issue 18 (pack/container.py) that --against compares with."""
    try:
        from gguf_split.pack.reader import unpack
        from gguf_split.pack.writer import pack_files
    except ImportError:
        from gguf_split.pack.container import pack_files, unpack  # type: ignore[no-redef]
    return pack_files, unpack


def run_child(what: str, args: dict[str, Any]) -> None:
    if args.get("trace"):
        import tracemalloc

        tracemalloc.start()
    with AnonPeak() as mem:
        t0 = time.perf_counter()
        pack_files, unpack = _pack_api()
        if what == "pack":
            rep = pack_files([tuple(x) for x in args["inputs"]], args["out"], kind="models", meta=args["meta"],
                             threads=args["threads"])
            res = {"pack_bytes": rep.pack_bytes, "codecs": {k: vars(v) for k, v in rep.codecs.items()},
                   "kinds": kinds(rep)}
        else:
            urep = unpack(args["pack"], args["out"], threads=args["threads"])
            res = {"bytes": urep.bytes_written}
        res["seconds"] = time.perf_counter() - t0
    res.update(peak_anon=mem.peak - mem.start, base_anon=mem.start)
    if args.get("trace"):
        res["traced_peak"] = tracemalloc.get_traced_memory()[1]
    print(json.dumps(res))


def _role(name: str) -> str:
    base = name.rsplit(".", 1)[0] if name.endswith(".weight") else name
    return base.split(".")[-1] if base.startswith("blk.") else base


def kinds(rep: Any) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[int]] = {}
    for t in rep.tensors:
        key = (t.codec, t.ggml_type, _role(t.name) if t.codec == "delta" else "*")
        g = groups.setdefault(key, [0, 0, 0, set()])  # type: ignore[list-item]
        g[0] += 1
        g[1] += t.nbytes
        g[2] += t.stored_bytes
        if t.rank is not None:
            g[3].add(t.rank)  # type: ignore[union-attr]
    return [{"codec": c, "type": ty, "role": role, "count": g[0], "bytes": g[1], "stored": g[2],
             "ratio": g[1] / max(1, g[2]), "ranks": sorted(g[3])}  # type: ignore[arg-type]
            for (c, ty, role), g in sorted(groups.items())]


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.1f} MB"


def table(results: list[dict[str, Any]]) -> str:
    names = [r["set"] for r in results]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        rows.append((label, [fn(r) for r in results]))

    row("inputs (base + 3 fine-tunes)", lambda r: _mb(r["inputs"]))
    row("pack", lambda r: f"{_mb(r['pack'])} = {r['pack'] / r['inputs']:.3f} in")
    row("split (foundation + adaptors)", lambda r: _mb(r.get("split")) + (
        f" = {r['split'] / r['inputs']:.3f} in" if r.get("split") else ""))
    row("zstd -19 of each input", lambda r: _mb(r.get("zstd19")) + (
        f" = {r['zstd19'] / r['inputs']:.3f} in" if r.get("zstd19") else ""))
    row("64 KiB CDC, distinct chunks", lambda r: _mb(r["cdc"]["distinct"]) if "cdc" in r else "n/a")
    row("64 KiB CDC + zstd -19", lambda r: (f"{_mb(r['cdc']['zstd19'])} = {r['cdc']['zstd19'] / r['inputs']:.3f} in"
                                           if "cdc" in r else "n/a"))
    row("pack / zstd -19 (goal < 1)", lambda r: f"{r['pack'] / r['zstd19']:.3f}" if r.get("zstd19") else "n/a")
    row("pack / CDC+zstd (goal < 1)", lambda r: f"{r['pack'] / r['cdc']['zstd19']:.3f}" if "cdc" in r else "n/a")
    row("pack wall, MB/s of input", lambda r: f"{r['pack_s']:.1f} s, {r['pack_MBps']:.0f} MB/s")
    row("SmolLM2 goal: pack <= 120 MB", lambda r: ("PASS" if r["pack"] <= 120e6 else "FAIL") if r["set"] == "smollm2"
        else "-")
    row("unpack wall (median of 3), MB/s of output",
        lambda r: f"{r['unpack_s']:.1f} s [{r['unpack_range'][0]:.1f}-{r['unpack_range'][1]:.1f}], "
                  f"{r['unpack_MBps']:.0f} MB/s {'PASS' if r['unpack_MBps'] >= 100 else 'FAIL'}")
    row("unpack byte-identical (sha256)", lambda r: "yes" if r["identical"] else "NO")
    row("peak anon memory pack / unpack", lambda r: f"{_mb(r['mem_pack'])} / {_mb(r['mem_unpack'])} (+{_mb(r['mem_base'])} imports)")
    row("tracemalloc peak pack / unpack", lambda r: f"{_mb(r.get('traced_pack'))} / {_mb(r.get('traced_unpack'))}")
    row("bound 2 x largest tensor + 256 MB", lambda r: f"{_mb(r['mem_bound'])} (largest {_mb(r['largest_tensor'])})")
    row("load average before / after", lambda r: f"{r['load_before']} / {r['load_after']}")
    w0 = max(len(x[0]) for x in rows)
    ws = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    out = [f"| {'metric'.ljust(w0)} | " + " | ".join(n.ljust(w) for n, w in zip(names, ws)) + " |",
           f"|{'-' * (w0 + 2)}|" + "|".join("-" * (w + 2) for w in ws) + "|"]
    for label, vals in rows:
        out.append(f"| {label.ljust(w0)} | " + " | ".join(v.ljust(w) for v, w in zip(vals, ws)) + " |")
    return "\n".join(out)


def kinds_table(results: list[dict[str, Any]]) -> str:
    out = ["| set | codec | type | tensors (role) | count | bytes in | stored | ratio | ranks |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for k in r["kinds"]:
            out.append(f"| {r['set']} | {k['codec']} | {k['type']} | {k['role']} | {k['count']} | {_mb(k['bytes'])} | "
                       f"{_mb(k['stored'])} | {k['ratio']:.2f} | {','.join(map(str, k['ranks'])) or '-'} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# compressors


def compressor_samples(source: str) -> dict[str, bytes]:
    tasks, _ = model_set("smollm2", source)
    base = GGUFFile(tasks["base"])
    quant = []
    for t in base.header.tensors:
        if t.type_name in ("Q4_1", "Q8_0") and sum(map(len, quant)) < (16 << 20):
            quant.append(codec.shuffle(base.tensor_view(t), codec.natural_stride(t.ggml_type)))
    residuals = []
    others = [GGUFFile(p) for t, p in tasks.items() if t != "base"]
    with codec.blas_single_threaded():
        for f in others:
            for t in f.header.tensors:
                if t.type_name != "F16" or t.name not in base.header.tensor_by_name or len(residuals) >= 12:
                    continue
                b = base.header.tensor_by_name[t.name]
                g, gb = codec.geometry(t.ggml_type, t.shape), codec.geometry(b.ggml_type, b.shape)
                tv, bv = f.tensor_view(t), base.tensor_view(b)
                p = codec.plan_delta(lambda r0, r1: tv[r0 * g.row_bytes : r1 * g.row_bytes], t.ggml_type,
                                     lambda r0, r1: bv[r0 * gb.row_bytes : r1 * gb.row_bytes], b.ggml_type, g,
                                     level=3, rows_per_chunk=codec.default_rows_per_chunk(g))
                if p is None:
                    continue
                bdq = codec.dequantize_rows(bv, b.ggml_type, g.n_rows, g.row_elems)
                pred = codec.predict_bits(bdq, p.bt, p.a, t.ggml_type)
                residuals.append(codec.residual_encode(np.frombuffer(tv, np.uint16), pred, "sub"))
    headers = []
    for p in tasks.values():
        with GGUFFile(p) as f:
            headers.append(f.raw(0, f.header.tensor_info_end))
    return {"quantized tensors, shuffled (Q4_1+Q8_0)": b"".join(quant),
            "delta residuals (F16, sparse sub)": b"".join(residuals),
            "GGUF headers (4 files)": b"".join(headers)}


def compressors() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    import zstandard

    c: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {}
    for lvl in (1, 3, 9, 19):
        c[f"zstandard {lvl}"] = (lambda d, lvl=lvl: zstandard.ZstdCompressor(level=lvl).compress(d),
                                 lambda z: zstandard.ZstdDecompressor().decompress(z))
    for lvl in (6, 9):
        c[f"zlib {lvl}"] = (lambda d, lvl=lvl: zlib.compress(d, lvl), zlib.decompress)
    c["lzma 6 (xz)"] = (lambda d: lzma.compress(d, preset=6), lzma.decompress)
    try:
        import brotli

        for q in (5, 11):
            c[f"brotli {q}"] = (lambda d, q=q: brotli.compress(d, quality=q), brotli.decompress)
    except ImportError:
        pass
    try:
        import lz4.frame

        c["lz4 frame 0"] = (lambda d: lz4.frame.compress(d), lz4.frame.decompress)
        c["lz4 frame hc 9"] = (lambda d: lz4.frame.compress(d, compression_level=9), lz4.frame.decompress)
    except ImportError:
        pass
    return c


def compare_compressors(source: str) -> str:
    samples = compressor_samples(source)
    out = ["| data | compressor | ratio (out/in) | compress MB/s | decompress MB/s |", "|---|---|---|---|---|"]
    for label, data in samples.items():
        for name, (comp, decomp) in compressors().items():
            t0 = time.thread_time()
            z = comp(data)
            t1 = time.thread_time()
            back = decomp(z)
            t2 = time.thread_time()
            assert back == data
            out.append(f"| {label} ({len(data) / 1e6:.1f} MB) | {name} | {len(z) / len(data):.4f} | "
                       f"{len(data) / max(t1 - t0, 1e-9) / 1e6:.0f} | {len(data) / max(t2 - t1, 1e-9) / 1e6:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--source", choices=("auto", "export-lora", "common"), default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=WORK / "bench-pack")
    ap.add_argument("--no-baselines", action="store_true", help="skip split, zstd -19 and CDC")
    ap.add_argument("--compressors", action="store_true", help="compare compressors instead")
    ap.add_argument("--no-trace", action="store_true", help="skip the tracemalloc runs")
    ap.add_argument("--against", type=Path, metavar="TREE",
                    help="compare pack and unpack times with another tree's package (interleaved runs)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each package with --against")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ladder", action="store_true", help="the quantization ladders (ladder-* sets) instead")
    ap.add_argument("--v1-tree", type=Path, help="--ladder: the tree whose version-1 writer packs the ladders "
                                                  "too (default: git archive V1_WRITER, main before format 2)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        run_child(a.child[0], json.loads(a.child[1]))
        return
    if a.ladder:
        sets = [s for s in a.sets if s.startswith("ladder-")] or list(LADDERS)
        res = [measure_ladder(s, a.scratch, a.threads, a.v1_tree or _v1_tree(a.scratch)) for s in sets]
        print(ladder_table(res))
        if a.json:
            a.json.write_text(json.dumps(res, indent=1, default=str))
        return
    if a.compressors:
        print(compare_compressors(a.source))
        return
    if a.against:
        res = [against(s, a.source, a.scratch, a.threads, a.against.resolve(), a.rounds) for s in a.sets]
        print(against_table(res))
        if a.json:
            a.json.write_text(json.dumps(res, indent=1, default=str))
        return
    results = [measure(s, a.source, a.scratch, a.threads, not a.no_baselines, not a.no_trace) for s in a.sets]
    print(table(results))
    print()
    print(kinds_table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
