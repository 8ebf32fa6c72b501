"""Kills at any moment and concurrent runs: a split directory always holds the complete old state or the
complete new one, and `verify` passes on it.

Why: a split, an add, a remove or a restore writes megabytes to gigabytes; a kill (OOM killer, SIGTERM,
Ctrl-C, power loss) can land anywhere, and users ship what is in the directory. gguf-split writes new
files under temporary names, fsyncs them, switches with one atomic rename of a commit journal, and deletes
old files only after the switch is durable (commit.py); readers honour a pending journal.

What is checked, with real processes (`python -m gguf_split`):
- a `--force` re-split, an `add` and a `remove`, each killed (SIGKILL) at every step of its commit in turn
  (the GGUF_SPLIT_TEST_KILL_AT hook): after each kill the directory is never empty, `verify` passes, and
  every task restores to one and the same version (all old or all new) byte for byte; the next run leaves
  no temporary file and no journal;
- re-splits killed by SIGKILL or SIGTERM at random moments (SIGTERM: exit 143, nothing left behind at once);
- restore killed at random moments: its output is absent or the original;
- concurrent runs on one directory (the lock, taken before any input is read, serialises them; the second
  says who it waits for), two concurrent adds of one task (one proceeds, one gets a clear error);
- Ctrl-C while hashing large inputs acts within a second.
The models are a few MB (F32 tensors) so a write takes long enough to be interrupted.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as Q

from helpers import write_model, command as cli
from gguf_split import add, split
from gguf_split.format.names import JOURNAL, TMP_SUFFIX
from gguf_split.splitdir.restore import restore
from gguf_split.splitdir.directory import SplitDir
from gguf_split.splitdir.verify import verify

SEED = 1123
TENSOR = (Q.F32, (512, 512))  # 1 MiB each


def models(root: Path, variant: int, tasks: tuple[str, ...] = ("chat", "code", "sum")) -> dict[str, Path]:
    """Models of 9 MiB: six tensors all tasks share, two that chat and code share (a second shared file),
    one of each task's own; `variant` changes every byte, so two variants share nothing but names."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, task in enumerate(tasks):
        tensors = {f"blk.{n}.ffn_up.weight": (*TENSOR, 100 * variant + n) for n in range(6)}
        pair = 50 if task in ("chat", "code") else 60 + i
        tensors.update({f"blk.{n}.ffn_down.weight": (*TENSOR, 1000 * (variant + 1) + pair + n) for n in range(2)})
        tensors["blk.0.attn_q.weight"] = (*TENSOR, 2000 * (variant + 1) + i)
        out[task] = Path(write_model(root / f"{task}-{variant}.gguf", tensors))
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(TMP_SUFFIX)) if d.exists() else []


def split_args(tasks: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["split", "-q", "--force", "-o", str(out), *extra]
    for name, path in tasks.items():
        args += ["-t", f"{name}={path}"]
    return cli(*args)


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def steps_of(args: list[str], tmp: Path, prepare) -> int:  # noqa: ANN001
    """How many commit steps a run takes (the GGUF_SPLIT_TEST_STEPS log of an uninterrupted run)."""
    prepare()
    log = tmp / "steps.log"
    log.unlink(missing_ok=True)
    p = run(args, {"GGUF_SPLIT_TEST_STEPS": str(log)})
    assert p.returncode == 0, p.stderr
    lines = log.read_text().splitlines()
    assert any("switched" in line for line in lines), lines
    return len(lines)


def state_of(d: Path, versions: dict[str, dict[str, str]], tmp: Path) -> str:
    """Which version the directory holds, checked: not empty, verify passes, every task restores byte for
    byte to one of the versions, and all tasks to the same one. `versions`: name -> task -> sha256."""
    sd = SplitDir.open(d)
    assert sd.tasks, f"no task in {d}: the directory lost the split"
    verify([d], threads=1)
    found = set()
    for task in sd.tasks:
        out = tmp / f"r-{task}.gguf"
        out.unlink(missing_ok=True)
        restore(d, out, task=task)
        digest = sha(out)
        names = {name for name, v in versions.items() if v.get(task) == digest}
        assert names, f"task {task} restored to bytes of no version"
        found.add(frozenset(names))
        out.unlink()
    common = frozenset.intersection(*found)
    assert common, f"a mix of versions: {found}"
    want = {name for name in common if set(versions[name]) == set(sd.tasks)}
    assert want, f"tasks {sd.tasks} are no version's complete task set"
    return sorted(want)[0]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("crash")
    return models(root / "x", 0), models(root / "y", 1), root


def digests(tasks: dict[str, Path]) -> dict[str, str]:
    return {t: sha(p) for t, p in tasks.items()}


# ---------------------------------------------------------------------------------------------------------
# a kill at every step


def test_force_resplit_killed_at_every_step(two_sets, tmp_path: Path) -> None:
    x, y, _ = two_sets
    d = tmp_path / "out"
    versions = {"x": digests(x), "y": digests(y)}
    args = split_args(y, d)

    def prepare() -> None:
        split(x, d, force=True)

    n = steps_of(args, tmp_path, prepare)
    assert n >= 10
    seen = set()
    for k in range(1, n + 1):
        prepare()
        assert state_of(d, versions, tmp_path) == "x"
        p = run(args, {"GGUF_SPLIT_TEST_KILL_AT": str(k)})
        assert p.returncode == -signal.SIGKILL, (k, p.stderr)
        seen.add(state_of(d, versions, tmp_path))
        # the next run in the directory finishes or discards what the killed one left
        split(x, d, force=True)
        assert temps(d) == [] and not (d / JOURNAL).exists()
        assert state_of(d, versions, tmp_path) == "x"
    assert seen == {"x", "y"}, "the kills landed before and after the switch"


def test_add_and_remove_killed_at_every_step(two_sets, tmp_path: Path) -> None:
    x, y, root = two_sets
    d = tmp_path / "out"
    extra = models(root / "extra", 5, ("new1", "new2"))
    before = {"old": digests(x), "new": {**digests(x), **digests(extra)}}
    add_args = cli("add", "-q", d, *[a for t, p in extra.items() for a in ("-t", f"{t}={p}")])
    remove_args = cli("remove", "-q", d, "new1", "new2")

    def fresh() -> None:
        shutil.rmtree(d, ignore_errors=True)
        split(x, d)

    for args, start, versions in ((add_args, fresh, before),
                                  (remove_args, lambda: (fresh(), add(d, extra)), before)):
        n = steps_of(args, tmp_path, start)
        shipped: dict[str, str] = {}
        for k in range(1, n + 1):
            start()
            shipped = {p.name: sha(p) for p in d.glob("*.gguf")}
            p = run(args, {"GGUF_SPLIT_TEST_KILL_AT": str(k)})
            assert p.returncode == -signal.SIGKILL, (k, p.stderr)
            state_of(d, versions, tmp_path)
            if args is add_args:  # an add never changes a shipped file, killed or not
                assert {n_: sha(d / n_) for n_ in shipped if (d / n_).exists()} == shipped
        assert shipped


# ---------------------------------------------------------------------------------------------------------
# kills at random moments


def watch_temps(args: list[str], d: Path) -> tuple[float, float]:
    """(total seconds, seconds during which temporary files were visible) of an uninterrupted run."""
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = last = None
    while p.poll() is None:
        if temps(d):
            last = time.perf_counter()
            first = first or last
        time.sleep(0.0005)
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    assert first is not None and last is not None, "never saw a temporary file: the write is too fast to watch"
    return time.perf_counter() - t0, last - first


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resplits_killed_at_random_moments(two_sets, tmp_path: Path, sig: int) -> None:
    """Alternate two input sets into one directory with --force and kill each run at a random moment; SIGTERM
    must clean up at once (exit 143, no temporary file left)."""
    x, y, _ = two_sets
    versions = {"x": digests(x), "y": digests(y)}
    d = tmp_path / "out"
    split(x, d)
    total, writing = watch_temps(split_args(y, d), d)
    rng = random.Random(SEED + sig)
    mid_write = 0
    for i in range(6):
        args = split_args((x, y)[i % 2], d)
        stale = set(temps(d))
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if i % 2:
            deadline = time.perf_counter() + 60
            while p.poll() is None and not set(temps(d)) - stale and time.perf_counter() < deadline:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.5 * writing))
        else:
            time.sleep(rng.uniform(0, total))
        alive = p.poll() is None
        mid_write += alive and bool(set(temps(d)) - stale)
        if alive:
            p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        if sig == signal.SIGTERM and alive and p.returncode != 0:
            # 143 and one line once gguf-split handles the signal; -15 if it came while Python was starting
            assert p.returncode in (143, -signal.SIGTERM), err
            if p.returncode == 143:
                assert err.strip().splitlines()[-1].startswith("gguf-split: terminated"), err
            assert temps(d) == [], "SIGTERM left temporary files"
        state_of(d, versions, tmp_path)
    assert mid_write >= 1, "no run was killed mid-write: the models are too small for this machine"
    run(split_args(x, d))
    assert temps(d) == [] and state_of(d, versions, tmp_path) == "x"


def test_restore_killed_at_random_moments(two_sets, tmp_path: Path) -> None:
    """The restored file is either absent or the original byte for byte; leftovers go with the next run."""
    x, _, _ = two_sets
    d = tmp_path / "split"
    split(x, d)
    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    target = out_dir / "chat.gguf"
    args = cli("restore", "-q", "--force", d / "adaptor-chat.gguf", "-o", target)
    total, writing = watch_temps(args, out_dir)
    original = sha(x["chat"])
    assert sha(target) == original
    rng = random.Random(SEED + 1)
    for i in range(6):
        target.unlink(missing_ok=True)
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, total))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert not target.exists() or sha(target) == original, f"run {i}: a partial or wrong restored file"
    assert run(args).returncode == 0
    assert temps(out_dir) == [] and sha(target) == original


# ---------------------------------------------------------------------------------------------------------
# concurrent runs


def test_concurrent_splits_same_tasks(two_sets, tmp_path: Path) -> None:
    """Two re-splits of different models with the same task names race into one directory: both succeed
    (the lock serialises them) and the directory holds one of the two."""
    x, y, _ = two_sets
    versions = {"x": digests(x), "y": digests(y)}
    d = tmp_path / "out"
    procs = [subprocess.Popen(split_args(s, d), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in (x, y)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    assert [r for r, _ in results] == [0, 0], results
    state_of(d, versions, tmp_path)
    assert temps(d) == []


def test_concurrent_adds_of_one_task(two_sets, tmp_path: Path) -> None:
    """Two adds of the same task name: one proceeds, the other gets one clear line (exit 2)."""
    x, _, root = two_sets
    d = tmp_path / "out"
    split(x, d)
    extra = models(root / "extra2", 6, ("new",))
    args = cli("add", "-q", d, "-t", f"new={extra['new']}")
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.communicate()[1]) for p in procs)
    assert results[0][0] == 0 and results[1][0] == 2, results
    assert "'new' is already in the split" in results[1][1] and "Traceback" not in results[1][1]
    state_of(d, {"all": {**digests(x), **digests(extra)}}, tmp_path)


def test_a_waiting_run_says_who_holds_the_lock(two_sets, tmp_path: Path) -> None:
    """The lock is taken before any input is read; a second run says whom it waits for, then proceeds."""
    x, _, _ = two_sets
    d = tmp_path / "out"
    d.mkdir()
    st = d.stat()
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        p = subprocess.Popen(cli("split", "-o", d, "-t", f"chat={x['chat']}"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.perf_counter() + 60
        while not any("->" in line and ident in line for line in Path("/proc/locks").read_text().splitlines()):
            assert p.poll() is None, "the run did not wait for the lock"
            assert time.perf_counter() < deadline, "the run never asked for the lock"
            time.sleep(0.05)
    finally:
        os.close(fd)  # releases the lock
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"waiting for another gguf-split run to finish with {d} (pid {os.getpid()}" in err


def test_output_directory_created_by_a_concurrent_run(two_sets, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs into a directory that does not exist yet: the one that loses the race to create it must go
    on (the lock serialises the two), not fail."""
    x, _, _ = two_sets
    d = tmp_path / "new"
    real = os.makedirs

    def other_run_wins(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        real(path, exist_ok=True)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", other_run_wins)
    split(x, d)
    monkeypatch.undo()
    verify([d])


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C while hashing large inputs


def sparse_model(path: Path, gib: int) -> Path:
    """A valid GGUF with one F32 tensor of `gib` GiB whose bytes are a hole (sparse: no disk space)."""
    from gguf.constants import GGUFValueType as V

    from gguf_split.format.gguf import align_up, encode_kv, encode_prefix, encode_tensor_info

    n = (gib << 30) // 4
    head = encode_prefix(3, 1, 1) + encode_kv("general.architecture", V.STRING, "llama")
    head += encode_tensor_info("big.weight", (n,), int(Q.F32), 0)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(align_up(len(head), 32) + 4 * n)
    return path


def test_ctrl_c_while_hashing_acts_within_a_second(tmp_path: Path) -> None:
    paths = [sparse_model(tmp_path / f"m{i}.gguf", 3) for i in range(4)]
    args = cli("split", "-q", "-o", tmp_path / "out", *[a for i, p in enumerate(paths) for a in ("-t", f"t{i}={p}")])
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # start-up, then hashing 12 GiB (several seconds here)
    assert p.poll() is None, "the run ended before it could be interrupted"
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 130, err
    assert err.strip() == "gguf-split: interrupted; no partial output was left behind", err
    assert elapsed < 1.0, f"took {elapsed:.2f} s to act on Ctrl-C"
    assert not (tmp_path / "out").exists()
