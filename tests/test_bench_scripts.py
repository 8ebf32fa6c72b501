"""Every benchmark script still starts: `python bench/X.py --help` prints its usage.

Why a test: the benchmarks import the package's modules and the tests' helpers by path, and they run on
model sets CI does not have, so a move in the package or in tests/ (the house's restructure moved both)
breaks them without any test failing; fuzz_header.py imported tests/test_fuzz.py months after it had moved.
Starting each one (its imports, its argument parser) catches that much in a few seconds. What a benchmark
measures is checked by running it (bench/README.md gives each command).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# scripts with a command line; the rest of bench/ are modules they import (common, hashing, ggufhdr, ...)
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py")
                 if p.name.startswith(("bench_", "fuzz_")) or p.name in ("models.py", "tools.py"))
MODULES_ONLY = {"bench_family_quantize.py"}  # bench_quantize.py's family mode, no command line of its own


def test_the_list_is_not_empty() -> None:
    assert {"bench_split.py", "bench_pack.py", "fuzz_header.py", "models.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in MODULES_ONLY])
def test_a_benchmark_starts(script: str, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    if p.returncode != 0 and "No module named 'llama_cpp'" in p.stderr and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(f"{script} needs the llama extra")
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]


def test_a_module_of_a_benchmark_imports(tmp_path: Path) -> None:
    for name in MODULES_ONLY:
        p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); "
                            f"import {name.removesuffix('.py')}"], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]
