"""Start-up time of the `gguf-split` command against `python -c pass`, measured in the same run.

Why: every command used to import gguf and numpy (~0.18 s) and typer and rich (~0.07 s) before doing
anything; `--version` now answers before any of them is imported, and the commands import what they need.
Goal (issue "a first hour without surprises"): `gguf-split --version` within 0.12 s of `python -c pass`.

    python bench/bench_startup.py [--runs 21]

Each command is started as a fresh process, interleaved with the baseline (A B A B ...), so a drift of the
machine's speed hits both; medians and [min-max] are printed, and the difference of medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "gguf-split --version": ["gguf-split", "--version"],
    "gguf-split --help": ["gguf-split", "--help"],
    "python -c 'import gguf_split'": [sys.executable, "-c", "import gguf_split"],
    "python -c 'import gguf_split.assemble.split'": [sys.executable, "-c", "import gguf_split.assemble.split"],
}
BASELINE = [sys.executable, "-c", "pass"]


def once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    exe = shutil.which("gguf-split")
    if exe is None:
        raise SystemExit("gguf-split is not on PATH: pip install -e . first")
    print(f"{'command':<38} {'median':>9} {'[min-max]':>17} {'- baseline':>11}")
    for name, cmd in COMMANDS.items():
        once(cmd), once(BASELINE)  # warm the page cache and the bytecode cache
        base, mine = [], []
        for _ in range(args.runs):
            base.append(once(BASELINE))
            mine.append(once(cmd))
        b, m = statistics.median(base), statistics.median(mine)
        print(f"{'python -c pass':<38} {b * 1000:>7.1f}ms [{min(base) * 1000:5.1f}-{max(base) * 1000:5.1f}ms]")
        verdict = "  goal <= 120 ms: " + ("PASS" if m - b <= 0.12 else "FAIL") if name.endswith("--version") else ""
        print(f"{name:<38} {m * 1000:>7.1f}ms [{min(mine) * 1000:5.1f}-{max(mine) * 1000:5.1f}ms] "
              f"{(m - b) * 1000:>+9.1f}ms{verdict}")


if __name__ == "__main__":
    main()
