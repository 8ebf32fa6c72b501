"""`unpack --restore` killed or interrupted at any moment: the output directory holds none of the models or
all of them, and the next run (with or without --force) succeeds and leaves nothing hidden behind.

Why: 0.2 restored the tasks one by one, each committed on its own, from a split unpacked into a hidden
`.gguf-split-unpack-*` directory. A SIGKILL left 1-3 of 4 models and that directory (which no later run
removed); a SIGTERM could print "no partial output was left behind" with models on disk. Now the whole
run is one commit.Transaction (transport.py): the split goes to a temporary directory the transaction
owns, every model is a new file of it, one switch puts them all in place.

What is checked:
- a kill (SIGKILL) at every step of every commit the run makes (GGUF_SPLIT_TEST_KILL_AT; the run is
  forked from this process, so the loop takes seconds): before the switch no model is visible; after it,
  the journal names every model not yet renamed (readers and the next run complete it), so the visible
  models plus the journal's are all of them, each byte for byte;
- SIGTERM and SIGINT at random moments of real runs: exit 143/130 with one line, and at once (not only
  after the next run) no model or all of them, and no hidden file or directory;
- a signal during the switch's renames waits until they are done (commit.signals_deferred).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as Q
from typer.testing import CliRunner

from helpers import base_tensors, write_model, write_sharded
from gguf_split import split
from gguf_split._main import main
from gguf_split.cli.app import app
from gguf_split.disk.commit import Transaction, pending_view
from gguf_split.format.names import JOURNAL
from gguf_split.pack.transport import pack, unpack_to

commit_mod = importlib.import_module("gguf_split.disk.commit")

SEED = 1723


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def hidden(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".")) if d.exists() else []


def visible(d: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in d.iterdir() if not p.name.startswith(".")} if d.exists() else {}


def family(root: Path, tensors: dict) -> tuple[Path, dict[str, str]]:  # type: ignore[type-arg]
    """A split's pack of two tasks, one of them a fine-tune given as two shards (so one task restores to
    several files), and the sha256 of every original file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "shards").mkdir()
    tuned = dict(tensors)
    name = next(iter(tuned))
    qt, shape, seed = tuned[name]
    tuned[name] = (qt, shape, seed + 99)
    models = {"base": write_model(root / "base.gguf", tensors), "big": write_sharded(root / "shards" / "big", tuned, 2)}
    split(models, root / "split", file_cost=0)
    pk = root / "fam.ggufpack"
    pack(pk, split_dir=root / "split")
    want = {"base.gguf": sha(root / "base.gguf")}
    want.update({p.name: sha(p) for p in (root / "shards").iterdir()})
    return pk, want


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return family(tmp_path_factory.mktemp("small"), base_tensors())


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A few MB of F32 per model, so that a real run spends long enough writing to be interrupted."""
    tensors = {f"blk.{i}.ffn_up.weight": (Q.F32, (512, 512), 10 + i) for i in range(6)}
    return family(tmp_path_factory.mktemp("large"), tensors)


def warm_up(tmp: Path) -> None:
    """Parse an unpack command line once in this process: typer imports a lot on its first parse, which
    every forked child would otherwise repeat."""
    r = CliRunner().invoke(app, ["unpack", "-q", str(tmp / "none.ggufpack"), "-o", str(tmp / "none"), "--restore"])
    assert r.exit_code == 2


def no_fsync(fd: int) -> None:
    """A SIGKILL loses nothing the kernel holds (fsync matters for a power loss, which the kill loop does
    not simulate), and fsync is most of a small run's time on this disk."""


def spawn(argv: list[str], out: Path, *, env: dict[str, str] | None = None, fsync: bool = True) -> int:
    """Fork a child that runs gguf-split's entry point (_main.main, its signal handlers included) on ARGV,
    its stdout and stderr into `out`; everything is imported already, so it starts at once. Its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            sys.argv = ["gguf-split", *argv]
            os.environ.update(env or {})
            if not fsync:
                os.fsync = no_fsync
            commit_mod._steps = 0
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's exit code, or -signal if a signal killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def state(out: Path, want: dict[str, str]) -> str:
    """Which models `out` holds, "none" or "all", checked: none visible, or every one of them (visible, or
    named by the journal of a switched commit, which readers honour and the next run completes), each
    byte for byte."""
    view = pending_view(str(out)) if out.exists() else {}
    got = visible(out)
    for final, actual in view.items():
        assert actual is not None, f"the journal deletes {final}"
        got[final] = sha(out / actual)
    assert got in ({}, want), f"a partial or wrong set of models: {sorted(got)}"
    return "all" if got else "none"


def test_unpack_restore_killed_at_every_step(small: tuple[Path, dict[str, str]], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pk, want = small
    monkeypatch.setattr(os, "fsync", no_fsync)
    out = tmp_path / "out"
    args = ["unpack", "-q", str(pk), "-o", str(out), "--restore"]
    log = tmp_path / "steps.log"
    said = tmp_path / "said"
    warm_up(tmp_path)
    assert wait(spawn(args, said, env={"GGUF_SPLIT_TEST_STEPS": str(log)}, fsync=False)) == 0, said.read_text()
    steps = log.read_text().splitlines()
    assert visible(out) == want and hidden(out) == []
    assert any("switched" in s for s in steps), steps
    t0 = time.perf_counter()
    seen = set()
    for k in range(1, len(steps) + 1):
        shutil.rmtree(out)
        if k % 3 == 0:  # sometimes into a directory that exists already (it must stay)
            out.mkdir()
        code = wait(spawn(args, said, env={"GGUF_SPLIT_TEST_KILL_AT": str(k)}, fsync=False))
        assert code == -signal.SIGKILL, (k, steps[k - 1], code, said.read_text())
        seen.add(state(out, want))
        assert out.exists() or k % 3, f"step {k}: the existing output directory was removed"
        # the next run finishes or discards what the killed one left, with or without --force
        unpack_to(pk, out, restore=True, force=bool(k % 2))
        assert visible(out) == want, k
        assert hidden(out) == [], (k, steps[k - 1], hidden(out))
    assert seen == {"none", "all"}, "the kills landed before and after the switch"
    print(f"{len(steps)} steps in {time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_unpack_restore_interrupted_at_random_moments(large: tuple[Path, dict[str, str]], tmp_path: Path,
                                                      sig: int) -> None:
    """The signal lands while the run works in the output directory (its temporaries visible), at a random
    moment of that time: exit 143/130 with one line, and at once no model or all of them, nothing hidden."""
    pk, want = large
    out = tmp_path / "out"
    said = tmp_path / "said"
    args = ["unpack", "-q", str(pk), "-o", str(out), "--restore"]
    warm_up(tmp_path)
    t0 = time.perf_counter()
    pid = spawn(args, said)
    start = end = None
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if hidden(out):
            end = time.perf_counter() - t0
            start = start if start is not None else end
        time.sleep(0.0002)
    assert start is not None and end is not None, "never saw the run's temporaries"
    rng = random.Random(SEED + sig)
    outcomes = []
    for i in range(6):
        shutil.rmtree(out)
        t0 = time.perf_counter()
        pid = spawn(args, said)
        while not hidden(out) and time.perf_counter() - t0 < 60:
            time.sleep(0.0002)
        time.sleep(rng.uniform(0, 1.2 * (end - start)))
        working = bool(hidden(out))
        os.kill(pid, sig)
        code, text = wait(pid), said.read_text()
        if code != 0:
            assert code == (143 if sig == signal.SIGTERM else 130), text
            # none, or all if the signal came during the switch (it waits until every model is in place);
            # the line says which
            assert visible(out) in ({}, want) and not (out / JOURNAL).exists(), f"run {i}: some models left"
            said_line = f"gguf-split: {'terminated' if sig == signal.SIGTERM else 'interrupted'}; "
            stands = f"the change to {out} is complete" if visible(out) else "no partial output was left behind"
            assert text.strip() == said_line + stands, text
        else:  # the signal came after the run
            assert visible(out) == want and f"unpacked {len(want)} models" in text, text
        assert hidden(out) == [], f"run {i}: {hidden(out)} left behind at once"
        outcomes.append(("interrupted mid-work" if working else "interrupted") if code else "done")
        unpack_to(pk, out, restore=True, force=bool(i % 2))  # the next run
        assert visible(out) == want and hidden(out) == []
    assert "interrupted mid-work" in outcomes, outcomes


def test_a_signal_during_the_switch_waits_until_every_file_is_in_place(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the journal's renames are applied: the renames finish, then the signal acts."""

    class Stop(BaseException):
        pass

    def stop(signum: int, frame: object) -> None:
        raise Stop()

    real = commit_mod.checkpoint

    def signal_at_first_rename(label: str) -> None:
        real(label)
        if label.startswith("rename "):
            os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(commit_mod, "checkpoint", signal_at_first_rename)
    try:
        with pytest.raises(Stop):
            with Transaction(tmp_path / "d") as tx:
                for name in ("a.gguf", "b.gguf", "c.gguf"):
                    tx.write(tx.new(name), lambda fd, name=name: os.write(fd, name.encode()))
                tx.commit()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sorted(os.listdir(tmp_path / "d")) == ["a.gguf", "b.gguf", "c.gguf"]
    assert (tmp_path / "d" / "c.gguf").read_bytes() == b"c.gguf"
