"""Crashes mid-write and concurrent runs: the output directory only ever holds complete, verifiable files.

Why: a split or a restore writes megabytes to gigabytes; a kill (OOM killer, Ctrl-C twice, power loss)
can land anywhere. gguf-split writes every output to a hidden temporary file in the target directory,
fsyncs it and renames it into place only when all outputs are complete; the next run into that directory
removes leftover temporaries; a directory lock serialises concurrent runs.

What is checked, with real processes (`python -m gguf_split`) killed by SIGKILL:
- split and restore killed at seeded random moments (half of them timed from the start, half from the
  moment a temporary file appears, so they land mid-write): every visible output is byte-identical to the
  output of an uninterrupted run, the visible set verifies, inputs are unchanged, and the next run into the
  same directory leaves no temporary file behind;
- a kill between the renames of the commit (injected deterministically);
- two splits of different models racing into one directory: the result is one consistent split.
The models are a few MB (F32 tensors) so a write takes long enough to be interrupted.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as Q

from conftest import write_model
from gguf_split.errors import GGUFSplitError
from gguf_split.restore import find_split, verify
from gguf_split.split import split
from gguf_split.write import TMP_SUFFIX

RUNS = 8
SEED = 1123
TENSOR = (Q.F32, (512, 512))  # 1 MiB each


def models(root: Path, variant: int, tasks: tuple[str, ...] = ("chat", "code", "sum")) -> dict[str, Path]:
    """Models of 8 MiB: six shared tensors and two of each task's own; `variant` changes every byte, so
    two variants give two splits with nothing in common but the names."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, task in enumerate(tasks):
        tensors = {f"blk.{n}.ffn_up.weight": (*TENSOR, 100 * variant + n) for n in range(6)}
        tensors.update({f"blk.{n}.attn_q.weight": (*TENSOR, 1000 * (variant + 1) + 10 * i + n) for n in range(2)})
        out[task] = Path(write_model(root / f"{task}-{variant}.gguf", tensors))
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(d: Path) -> dict[str, str]:
    """Visible .gguf files of a directory -> sha256."""
    return {p.name: sha(p) for p in sorted(d.glob("*.gguf"))} if d.exists() else {}


def temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)) \
        if d.exists() else []


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "gguf_split", *map(str, args)]


def split_args(tasks: dict[str, Path], out: Path) -> list[str]:
    args = ["split", "-q", "--force", "-o", str(out)]
    for name, path in tasks.items():
        args += ["-t", f"{name}={path}"]
    return cli(*args)


def run(args: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p


def verify_dir(d: Path) -> None:
    foundation, adaptors = find_split(d)
    verify(foundation, adaptors, threads=1)


@dataclass
class Timing:
    total: float  # seconds from launch to exit
    writing: float  # seconds during which temporary files were visible (the write, up to the commit)


def timed_run(args: list[str], d: Path) -> Timing:
    """Run to completion, watching `d` for temporary files."""
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = last = None
    while p.poll() is None:
        if temps(d):
            last = time.perf_counter()
            first = first or last
        time.sleep(0.0005)
    end = time.perf_counter()
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    assert first is not None and last is not None, "never saw a temporary file: the write is too fast to watch"
    return Timing(end - t0, last - first)


def kill_at_random(args: list[str], d: Path, timing: Timing, rng: random.Random, armed: bool) -> bool:
    """Launch and SIGKILL: `armed`, at a random moment of the write (after its first temporary file shows);
    otherwise at a random moment since launch. Returns whether the kill landed mid-write (the process was
    running and had temporary files of its own)."""
    stale = set(temps(d))  # a killed run's leftovers must not arm the kill
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if armed:
        deadline = time.perf_counter() + 60
        while p.poll() is None and not set(temps(d)) - stale and time.perf_counter() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.5 * timing.writing))  # the first half: mid-write even on a busy machine
    else:
        time.sleep(rng.uniform(0, timing.total))
    alive = p.poll() is None
    if alive:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    return alive and bool(set(temps(d)) - stale)


def check_visible(d: Path, refs: list[dict[str, str]], when: str) -> None:
    """Every visible output is byte-identical to the file of that name of one reference split, all of the
    same one, and (when a foundation is visible) the directory verifies."""
    seen = outputs(d)
    if not seen:
        return
    origin = [r for r in refs if all(r.get(name) == digest for name, digest in seen.items())]
    assert origin, f"{when}: a partial file or a mix of two splits: {sorted(seen)}"
    assert "foundation.gguf" in seen, f"{when}: adaptors without their foundation: {sorted(seen)}"
    verify_dir(d)


def input_hashes(*sets: dict[str, Path]) -> dict[Path, str]:
    return {p: sha(p) for s in sets for p in s.values()}


# ---------------------------------------------------------------------------------------------------------
# split killed


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("crash")
    return models(root / "x", 0), models(root / "y", 1), root


def reference(tasks: dict[str, Path], d: Path) -> dict[str, str]:
    """The outputs (sha256) of an uninterrupted split (in-process: the same bytes, without the start-up)."""
    split(tasks, d)
    return outputs(d)


def test_split_killed_at_random_moments(two_sets, tmp_path: Path) -> None:
    """Alternate two input sets into one directory with --force, kill each run at a random moment: what is
    visible is always files of one split, each complete (or nothing), never a mix, never a partial file."""
    x, y, _ = two_sets
    before = input_hashes(x, y)
    refs = [reference(x, tmp_path / "ref-x"), reference(y, tmp_path / "ref-y")]
    timing = timed_run(split_args(x, tmp_path / "timed"), tmp_path / "timed")
    d = tmp_path / "out"
    rng = random.Random(SEED)
    killed_mid_write = 0
    for i in range(RUNS):
        killed_mid_write += kill_at_random(split_args((x, y)[i % 2], d), d, timing, rng, armed=i % 4 >= 2)
        check_visible(d, refs, f"run {i}")
    assert killed_mid_write >= 1, "no run was killed mid-write: the models are too small for this machine"
    run(split_args(x, d))
    assert temps(d) == [], "the next split did not remove the killed runs' temporary files"
    assert outputs(d) == refs[0]
    verify_dir(d)
    assert input_hashes(x, y) == before


def test_restore_killed_at_random_moments(two_sets, tmp_path: Path) -> None:
    """The restored file is either absent or the original byte for byte; leftovers go with the next run."""
    x, _, _ = two_sets
    d = tmp_path / "split"
    split(x, d)
    split_before = outputs(d)
    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    target = out_dir / "chat.gguf"
    args = cli("restore", "-q", "--force", d / "adaptor-chat.gguf", "-o", target)
    timing = timed_run(args, out_dir)
    original = sha(x["chat"])
    assert sha(target) == original
    rng = random.Random(SEED + 1)
    killed_mid_write = 0
    for i in range(RUNS):
        target.unlink(missing_ok=True)
        killed_mid_write += kill_at_random(args, out_dir, timing, rng, armed=i % 2 == 1)
        assert not target.exists() or sha(target) == original, f"run {i}: a partial or wrong restored file"
        assert [p.name for p in out_dir.iterdir() if not p.name.startswith(".")] in ([], [target.name])
    assert killed_mid_write >= 1, "no restore was killed mid-write"
    run(args)
    assert temps(out_dir) == [] and sha(target) == original
    assert outputs(d) == split_before and sha(x["chat"]) == original


# ---------------------------------------------------------------------------------------------------------
# a kill between the renames of the commit, injected

KILL_AFTER_FIRST_RENAME = """
import os, signal, sys
import gguf_split.write as w
real = os.replace
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if str(dst).endswith(".gguf"):
        os.kill(os.getpid(), signal.SIGKILL)
w.os.replace = replace
from gguf_split.cli import main
sys.argv = ["gguf-split", *sys.argv[1:]]
main()
"""


def test_kill_between_commit_renames_leaves_a_consistent_set(two_sets, tmp_path: Path) -> None:
    x, y, _ = two_sets
    d = tmp_path / "out"
    split(x, d)
    args = [sys.executable, "-c", KILL_AFTER_FIRST_RENAME, *split_args(y, d)[3:]]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr  # the injected kill happened
    assert outputs(d), "the kill came after a rename: something is visible"
    verify_dir(d)  # whatever is visible is one consistent (possibly partial) split


# ---------------------------------------------------------------------------------------------------------
# concurrent splits into one directory


def race(sets: list[dict[str, Path]], d: Path, stagger: float) -> list[subprocess.CompletedProcess]:
    """Start one split per input set into `d`, `stagger` seconds apart, and wait for all."""
    procs = []
    for tasks in sets:
        procs.append(subprocess.Popen(split_args(tasks, d), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(stagger)
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def check_one_split(d: Path) -> None:
    """verify DIR passes: one foundation, and every adaptor in the directory belongs to it."""
    foundation, adaptors = find_split(d)
    report = verify(foundation, adaptors, threads=1)
    assert len(report.adaptors) == len(adaptors)


def test_concurrent_splits_same_tasks(two_sets, tmp_path: Path) -> None:
    """Two splits of different models with the same task names race into one directory: both succeed
    (the lock serialises them) and the directory holds exactly one of the two splits."""
    x, y, _ = two_sets
    before = input_hashes(x, y)
    refs = [reference(x, tmp_path / "ref-x"), reference(y, tmp_path / "ref-y")]
    d = tmp_path / "out"
    results = race([x, y], d, 0.05)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert outputs(d) in refs
    check_one_split(d)
    assert temps(d) == [] and input_hashes(x, y) == before


def test_concurrent_splits_other_tasks(two_sets, tmp_path: Path) -> None:
    """Two splits with different task names into one directory: whatever each run answers (done, or
    refused with one error line), the directory afterwards is one consistent split."""
    _, _, root = two_sets
    ab, cd = models(root / "ab", 2, ("a", "b")), models(root / "cd", 3, ("c", "d"))
    d = tmp_path / "out"
    results = race([ab, cd], d, 0.0)
    for r in results:
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr
    assert any(r.returncode == 0 for r in results)
    check_one_split(d)


def test_check_one_split_detects_a_mix(two_sets, tmp_path: Path) -> None:
    """The checker above is not vacuous: a foundation of one split with an adaptor of the other fails it."""
    x, y, _ = two_sets
    split(x, tmp_path / "x")
    split(y, tmp_path / "y")
    (tmp_path / "x" / "adaptor-code.gguf").write_bytes((tmp_path / "y" / "adaptor-code.gguf").read_bytes())
    with pytest.raises(GGUFSplitError, match="belongs to foundation"):
        check_one_split(tmp_path / "x")


def test_output_directory_created_by_a_concurrent_run(two_sets, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs into a directory that does not exist yet: the one that loses the race to create it must go
    on (the lock serialises the two), not fail. The race is made certain by creating the directory right
    before this run's own makedirs, as the other run would."""
    x, _, _ = two_sets
    d = tmp_path / "new"
    real = os.makedirs

    def other_run_wins(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        real(path, exist_ok=True)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", other_run_wins)
    split(x, d)
    monkeypatch.undo()
    verify_dir(d)
