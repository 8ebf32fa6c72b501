"""Kills on a split directory's whole state: its files and the llama.cpp links the tool made (issue 17,
items 3 and 6).

What is checked, with real processes: a `--force` re-split under another prefix of a split whose tasks
have links, and a `remove` of a task with links, each killed (SIGKILL) at every step of its commit in turn
(GGUF_SPLIT_TEST_KILL_AT): after each kill the directory holds the complete old or new split (verify
passes, every task restores to one version), and once the next run finished the commit, every link
resolves to its task's files in order and no link dangles. The models are tiny (the steps, not the bytes,
matter here), so each loop takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

from helpers import command as cli
from gguf_split import split, verify
from gguf_split.disk.commit import Transaction
from gguf_split.splitdir.info import task_files
from gguf_split.format.names import JOURNAL, TMP_SUFFIX
from gguf_split.splitdir.restore import restore
from gguf_split.splitdir.directory import SplitDir
from test_races import small_models


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def state_of(d: Path, versions: dict[str, dict[str, str]], tmp: Path) -> tuple[str, set[str]]:
    """(version, tasks) the directory holds: verify passes, every task restores to one version."""
    sd = SplitDir.open(d)
    assert sd.tasks, f"no task in {d}"
    verify([d], threads=1)
    found = []
    for task in sd.tasks:
        out = tmp / f"r-{task}.gguf"
        restore(d, out, task=task, force=True)
        found.append({name for name, v in versions.items() if v.get(task) == sha(out)})
        out.unlink()
    common = set.intersection(*found)
    assert common, f"a mix of versions: {found}"
    return sorted(common)[0], set(sd.tasks)


def finish(d: Path) -> None:
    """What the next run does first: finish (or discard) what a killed one left."""
    with Transaction(d, create=False):
        pass
    assert not (d / JOURNAL).exists() and not [p for p in d.iterdir() if p.name.endswith(TMP_SUFFIX)]


def check_links(d: Path, linked: set[str]) -> None:
    """Exactly the links of `linked`, each resolving to its task's files in llama.cpp order; none dangles."""
    want: dict[str, Path] = {}
    for task in linked:
        files = [Path(r["path"]).resolve() for r in task_files(d, task).files]
        for k, f in enumerate(files):
            want[f"{task}-{k + 1:05d}-of-{len(files):05d}.gguf"] = f
    have = {p.name: p.resolve() for p in d.iterdir() if p.is_symlink()}
    assert have == want


def steps_of(args: list[str], tmp: Path, prepare) -> int:  # noqa: ANN001
    prepare()
    log = tmp / "steps.log"
    log.unlink(missing_ok=True)
    p = run(args, {"GGUF_SPLIT_TEST_STEPS": str(log)})
    assert p.returncode == 0, p.stderr
    return len(log.read_text().splitlines())


def test_prefix_change_of_a_linked_split_killed_at_every_step(tmp_path: Path) -> None:
    pair = ("chat", "code")  # two tasks: every kind of step (files, links, deletions), fewer steps
    x, y = small_models(tmp_path / "x", 0, pair), small_models(tmp_path / "y", 1, pair)
    versions = {"x": {t: sha(p) for t, p in x.items()}, "y": {t: sha(p) for t, p in y.items()}}
    d = tmp_path / "out"
    args = cli("split", "-q", "--force", "--file-cost", "0", "--prefix", "v2_", "-o", d,
               *[a for t, p in y.items() for a in ("-t", f"{t}={p}")])

    def prepare() -> None:
        split(x, d, force=True, file_cost=0, link=True)

    n = steps_of(args, tmp_path, prepare)
    check_links(d, set(x))  # the re-split without --link kept the tasks' links, on the new files
    assert all(p.name.startswith("v2_") for p in d.iterdir() if not p.is_symlink())
    seen = set()
    for k in range(1, n + 1):
        prepare()
        p = run(args, {"GGUF_SPLIT_TEST_KILL_AT": str(k)})
        assert p.returncode == -signal.SIGKILL, (k, p.stderr)
        version, _ = state_of(d, versions, tmp_path)
        seen.add(version)
        finish(d)
        check_links(d, set(x))
    assert seen == {"x", "y"}


def test_remove_of_a_linked_task_killed_at_every_step(tmp_path: Path) -> None:
    x = small_models(tmp_path / "x", 0)
    versions = {"x": {t: sha(p) for t, p in x.items()}}
    d = tmp_path / "out"
    args = cli("remove", "-q", d, "code")

    def prepare() -> None:
        split(x, d, force=True, file_cost=0, link=True)

    n = steps_of(args, tmp_path, prepare)
    outcomes = set()
    for k in range(1, n + 1):
        prepare()
        p = run(args, {"GGUF_SPLIT_TEST_KILL_AT": str(k)})
        assert p.returncode == -signal.SIGKILL, (k, p.stderr)
        _, tasks = state_of(d, versions, tmp_path)
        finish(d)
        check_links(d, tasks)
        outcomes.add(frozenset(tasks))
    assert outcomes == {frozenset(x), frozenset(x) - {"code"}}


