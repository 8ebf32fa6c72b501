"""`split --quantize` killed at every step: the directory holds the complete old split or the complete new
one, and the unit store (a temporary directory of the transaction) never outlives the next run.

Like tests/safety/test_crash.py (the GGUF_SPLIT_TEST_KILL_AT hook kills the process with SIGKILL at step k),
on a quantized split replaced by another quantized split (`--force`). The steps include "quantized units"
(the store complete, nothing else written yet) and every step of the commit. Each kill is followed by a
check of the state (verify, every task restores to one version's bytes), then a run that must clean up.
About 20 processes that each import llama.cpp: ~40 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

import llama_harness as H

if H.IMPORT_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{H.IMPORT_ERROR} (CI=true: the llama.cpp tests must run)", pytrace=False)
    pytest.skip(H.IMPORT_ERROR, allow_module_level=True)

from gguf_split import restore, split, verify  # noqa: E402
from gguf_split.format.names import JOURNAL, TMP_SUFFIX, is_temp_dir  # noqa: E402
from gguf_split.splitdir.directory import SplitDir  # noqa: E402
from helpers import SMALL, command, make_model  # noqa: E402

DIMS = {**SMALL, "n_layer": 4}


def family(root: Path, seed: int) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return {t: Path(make_model(root / f"{t}-f16.gguf", seed=seed, changed=c, **DIMS))
            for t, c in (("base", []), ("chat", ["blk.1.attn_q.weight"]), ("code", ["blk.3.ffn_up.weight"]))}


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(TMP_SUFFIX) or is_temp_dir(p.name)
                  or p.name == JOURNAL)


def state(d: Path, versions: dict[str, dict[str, str]], tmp: Path) -> str:
    """Which version the directory holds (verify passes; every task restores to that version's bytes)."""
    sd = SplitDir.open(d)
    assert sd.tasks, "the directory lost the split"
    verify([d], threads=1)
    got = {}
    for task in sd.tasks:
        out = Path(restore(d, f"{tmp / 'r'}{os.sep}", task=task, force=True).output)
        got[task] = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
    match = [name for name, v in versions.items() if v == got]
    assert len(match) == 1, f"a mix of versions: {got}"
    return match[0]


def test_split_quantize_killed_at_every_step(tmp_path: Path) -> None:
    x, y = family(tmp_path / "x", 0), family(tmp_path / "y", 1)
    d = tmp_path / "out"
    versions = {}
    for name, models in (("y", y), ("x", x)):  # each version's quantized files, as restore gives them
        split(models, d, quantize="Q4_K_M", force=True)
        versions[name] = {t: hashlib.sha256(Path(restore(d, f"{tmp_path / name}{os.sep}", task=t).output)
                                            .read_bytes()).hexdigest() for t in models}
    args = command("split", "-q", "--force", "--quantize", "Q4_K_M", "-o", d, *[a for t, p in y.items()
                                                                               for a in ("-t", f"{t}={p}")])
    log = tmp_path / "steps.log"
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                               "GGUF_SPLIT_TEST_STEPS": str(log)})
    assert p.returncode == 0, p.stderr
    steps = log.read_text().splitlines()
    assert any("quantized units" in s for s in steps) and any("switched" in s for s in steps)
    seen = set()
    for k in range(1, len(steps) + 1):
        split(x, d, quantize="Q4_K_M", force=True)
        assert leftovers(d) == [] and state(d, versions, tmp_path) == "x"
        p = subprocess.run(args, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "GGUF_SPLIT_TEST_KILL_AT": str(k)})
        assert p.returncode == -signal.SIGKILL, (k, p.stderr)
        if "quantized units" in steps[k - 1]:
            assert any(is_temp_dir(n) for n in leftovers(d)), "the store is in the output directory"
        seen.add(state(d, versions, tmp_path))
    split(x, d, quantize="Q4_K_M", force=True)  # the next run cleans up after the last kill
    assert leftovers(d) == []
    assert seen == {"x", "y"}


def test_ctrl_c_while_quantizing_leaves_nothing(tmp_path: Path) -> None:
    """A Ctrl-C once the units are quantized (the hook interrupts the process at that step, as a user
    would): exit 130, one line, the store gone at once, the old split as it was."""
    x, y = family(tmp_path / "x", 0), family(tmp_path / "y", 1)
    d = tmp_path / "out"
    split(x, d, quantize="Q8_0")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    log = tmp_path / "steps.log"
    args = command("split", "-q", "--force", "--quantize", "Q8_0", "-o", d, *[a for t, p in y.items()
                                                                             for a in ("-t", f"{t}={p}")])
    subprocess.run(args, capture_output=True, timeout=120, env={**os.environ, "GGUF_SPLIT_TEST_STEPS": str(log)},
                   check=True)
    split(x, d, quantize="Q8_0", force=True)
    step = next(i for i, s in enumerate(log.read_text().splitlines(), 1) if "quantized units" in s)
    p = subprocess.run(args, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GGUF_SPLIT_TEST_KILL_AT": str(step), "GGUF_SPLIT_TEST_SIGNAL": "SIGINT"})
    assert p.returncode == 130 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert leftovers(d) == []
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
