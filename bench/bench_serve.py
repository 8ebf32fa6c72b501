"""Serving every task from one llama-server: a split's models directory against the original models.

What it does, in one run (needs the `llama-server` binary: `python bench/tools.py` builds it from the
llama.cpp that llama-cpp-python's source distribution carries; see bench/README.md):
1. splits a real model set (bench/models.py; default `smollm2`: SmolLM2-135M Q4_1 + three fine-tunes
   merged with llama-export-lora) and writes its models directory (`gguf-split models-dir`); a second
   models directory links each original model as `<task>/<task>.gguf`;
2. for each directory, with and without `--no-repack`: starts `llama-server --models-dir DIR` (router
   mode, `--models-max` = number of tasks, so every task gets its own child process), sends the same greedy
   request to every task (the request's `model` field picks it), and once every child has answered, reads
   each child's /proc/PID/smaps: the proportional set size (Pss) of the mapped .gguf files and the
   anonymous Pss (private memory: KV cache, compute buffers, repacked weights);
3. checks that every task answers the same text from the split as from its original, and prints, for both
   directories: the sum of the children's file Pss and anonymous Pss, and the bytes on disk.
Goals (issue "grow and shrink a shipped split; serve every task"): every reply equal; file Pss of the split
<= 1.05 x the split's bytes in use; total Pss below the originals' by at least the bytes the split shares.

    python bench/bench_serve.py [--set smollm2] [--tokens 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK  # noqa: E402
from models import model_set  # noqa: E402
from tools import tool  # noqa: E402

PROMPT = "The three most useful kitchen tools are"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(port: int, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_up(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("llama-server did not come up")


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(p.name))
    return out


def pss(pid: int) -> tuple[int, int]:
    """(Pss of mapped .gguf files, anonymous Pss) of a process, in bytes."""
    files = 0
    current = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and not parts[0].endswith(":"):  # a mapping's header line
            current = parts[5] if len(parts) >= 6 else ""
        elif parts and parts[0] == "Pss:" and current is not None and current.endswith(".gguf"):
            files += int(parts[1]) * 1024
    anon = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "Pss_Anon:":
            anon = int(parts[1]) * 1024
    return files, anon


def serve(models_dir: Path, tasks: list[str], tokens: int, repack: bool) -> dict:
    port = free_port()
    args = [str(tool("llama-server")), "--models-dir", str(models_dir), "--models-max", str(len(tasks)),
            "--port", str(port), "--host", "127.0.0.1", "-c", "512", "-np", "1", "-t", "1"]
    if not repack:
        args.append("--no-repack")
    log = open(WORK / f"serve-{models_dir.name}-{'repack' if repack else 'norepack'}.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_up(port, proc)
        replies = {}
        for task in tasks:
            r = request(port, {"model": task, "prompt": PROMPT, "n_predict": tokens, "temperature": 0,
                               "top_k": 1, "seed": 1, "cache_prompt": False})
            replies[task] = r["content"]
        time.sleep(1.0)
        kids = children(proc.pid)
        per = {k: pss(k) for k in kids}
        used = [k for k, (f, _) in per.items() if f > 0]
        return {"replies": replies, "children": len(used), "file_pss": sum(per[k][0] for k in used),
                "anon_pss": sum(per[k][1] for k in used)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def tensor_bytes(paths: list[Path]) -> int:
    """Tensor data bytes of distinct files (what llama.cpp maps; it reads headers with plain reads)."""
    from gguf_split.format.records import open_split_file

    seen, total = set(), 0
    for p in paths:
        st = os.stat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            with open_split_file(p) as f:
                total += sum(t.nbytes for t in f.header.tensors)
    return total


def disk_bytes(paths: list[Path]) -> int:
    seen, total = set(), 0
    for p in paths:
        st = os.stat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="smollm2")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--json")
    args = ap.parse_args()
    import gguf_split

    models = model_set(args.set)
    tasks = list(models)
    root = WORK / "serve" / args.set
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    report = gguf_split.split({t: str(p) for t, p in models.items()}, root / "split")
    gguf_split.write_models_dir(root / "split", root / "served-split")
    orig = root / "served-originals"
    for t, p in models.items():
        (orig / t).mkdir(parents=True)
        os.symlink(p, orig / t / f"{t}.gguf")
    split_files = [Path(f) for t in tasks for f in gguf_split.open_split(root / "split").load(t).llama_cpp_paths()]
    split_bytes = disk_bytes(split_files)
    orig_bytes = disk_bytes([Path(p) for p in models.values()])
    shared = orig_bytes - split_bytes
    shared_tensors = tensor_bytes([Path(p) for p in models.values()]) - tensor_bytes(split_files)
    results = {}
    for repack in (True, False):
        for name, d in (("split", root / "served-split"), ("originals", orig)):
            results[(name, repack)] = serve(d, tasks, args.tokens, repack)
    equal = all(results[("split", r)]["replies"] == results[("originals", r)]["replies"] for r in (True, False))
    mb = 1e6
    print(f"# bench_serve {time.strftime('%Y-%m-%d %H:%M')}, set {args.set} ({len(tasks)} tasks), "
          f"{args.tokens} greedy tokens, one child per task")
    print(f"bytes on disk: split {split_bytes / mb:.1f} MB, originals {orig_bytes / mb:.1f} MB "
          f"(the split shares {shared / mb:.1f} MB, of which tensor data {shared_tensors / mb:.1f} MB: llama.cpp "
          "maps tensor data and reads headers with plain reads)")
    print(f"| {'':<22} | {'file Pss':>10} | {'anon Pss':>10} | {'total Pss':>10} |")
    for repack in (True, False):
        for name in ("split", "originals"):
            r = results[(name, repack)]
            print(f"| {name + (' (repack)' if repack else ' (no repack)'):<22} | {r['file_pss'] / mb:>8.1f}MB |"
                  f" {r['anon_pss'] / mb:>8.1f}MB | {(r['file_pss'] + r['anon_pss']) / mb:>8.1f}MB |")
    print(f"every reply equal (split vs originals, both settings): {'PASS' if equal else 'FAIL'}")
    for repack in (True, False):
        s, o = results[("split", repack)], results[("originals", repack)]
        ratio = s["file_pss"] / split_bytes
        saved = (o["file_pss"] + o["anon_pss"]) - (s["file_pss"] + s["anon_pss"])
        tag = "repack" if repack else "no repack"
        print(f"[{tag}] file Pss / split bytes in use = {ratio:.3f} (goal <= 1.05: {'PASS' if ratio <= 1.05 else 'FAIL'});"
              f" total Pss saved {saved / mb:.1f} MB vs tensor bytes shared {shared_tensors / mb:.1f} MB "
              f"({'PASS' if saved >= shared_tensors else 'FAIL'}; vs all bytes shared {shared / mb:.1f} MB: "
              f"{'PASS' if saved >= shared else 'FAIL'})")
    if not equal:
        for t in tasks:
            print(t, repr(results[("split", True)]["replies"][t]), repr(results[("originals", True)]["replies"][t]))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}-{'repack' if k[1] else 'norepack'}": v
                                               for k, v in results.items()}, indent=1))
    del report


if __name__ == "__main__":
    main()
