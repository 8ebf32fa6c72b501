"""Links: the names llama.cpp looks for, pointing at a split's files (symlinks, never copies).

llama.cpp finds the files of a multi-file model by name: given `<prefix>-00001-of-0000N.gguf` it opens
`<prefix>-0000k-of-0000N.gguf` beside it (`llama_split_path`). So:

- `link_task(split_dir, task)` makes `<task>-0000k-of-0000N.gguf` symlinks in the split directory (or
  another one) for the task's adaptor and each of its files; many tasks share one directory, since the
  names start with the task's. `llama-cli -m DIR/<task>-00001-of-0000N.gguf` runs the task.
- `write_models_dir(split_dir, out)` writes the directory llama-server's router mode reads
  (`llama-server --models-dir OUT`): one entry per task, `OUT/<task>/<task>-0000k-of-0000N.gguf`; a
  request's `"model": "<task>"` picks it. Every child process maps the same shared files, so the page
  cache holds them once. Each `OUT/<task>` is a symlink to a directory of links under
  `OUT/.gguf-split/`, switched with one atomic rename: a server starting at any moment sees a task's old
  file set or its new one, never a mix. Re-running brings OUT up to date (new tasks appear, removed ones
  go); entries gguf-split did not make are left alone.

Links are relative, so a split directory and its models directory can move together.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

from .commit import fsync_dir
from .errors import GGUFSplitError, os_problem
from .naming import check_task_name, link_name, show, temp_name
from .splitdir import FileFinder, SplitDir, open_task

MODELS_STATE = ".gguf-split"  # OUT/.gguf-split/<task>-<id>/: the link directories (not a model: no .gguf)


def task_paths(split_dir: str | os.PathLike[str], task: str,
               shared: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """The task's files in llama.cpp order (adaptor, then positions 1..k), checked."""
    sd = SplitDir.open(split_dir)
    with open_task(sd.adaptor(task), FileFinder(shared)) as tf:
        return tf.paths()


def _relink(link: str, target: str) -> None:
    """Make `link` a symlink to `target`, atomically (a temporary link renamed over it)."""
    directory = os.path.dirname(link)
    tmp = os.path.join(directory, temp_name(os.path.basename(link)))
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise GGUFSplitError(show(link), f"cannot create link: {os_problem(e)}") from None


def _rel(target: str, directory: str) -> str:
    return os.path.relpath(os.path.realpath(target), os.path.realpath(directory))


_LINK_RE = re.compile(r"(?P<task>.+)-\d{5}-of-(?P<n>\d{5})\.gguf")  # fullmatch: `$` matches before a final \n


def link_task(split_dir: str | os.PathLike[str], task: str, *, directory: str | os.PathLike[str] | None = None,
              force: bool = False, shared: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """`<task>-0000k-of-0000N.gguf` symlinks for the task's files; returns them in order (give llama.cpp
    the first). Stale links of the task with another N are removed; a file that is not a link is never
    replaced unless `force`."""
    check_task_name(task)
    paths = task_paths(split_dir, task, shared)
    d = os.fspath(directory) if directory is not None else os.fspath(split_dir)
    if not os.path.isdir(d):
        raise GGUFSplitError(show(d), "no such directory")
    n = len(paths)
    wanted = {link_name(task, i, n): p for i, p in enumerate(paths)}
    for name, target in wanted.items():
        link = os.path.join(d, name)
        if os.path.isdir(link) and not os.path.islink(link):
            raise GGUFSplitError(show(link), "is a directory; move it away first")  # --force cannot replace it
        if os.path.lexists(link) and not os.path.islink(link) and not force:
            raise GGUFSplitError(show(link), "exists and is not a link (use --force to replace it)")
    made = []
    for name, target in wanted.items():
        link = os.path.join(d, name)
        rel = _rel(target, d)
        if not (os.path.islink(link) and os.readlink(link) == rel):
            _relink(link, rel)
        made.append(link)
    for name in os.listdir(d):
        m = _LINK_RE.fullmatch(name)
        if m and m["task"] == task and name not in wanted and os.path.islink(os.path.join(d, name)):
            os.unlink(os.path.join(d, name))
    fsync_dir(d)
    return made


@dataclass
class ModelsDirReport:
    directory: str
    tasks: dict[str, str] = field(default_factory=dict)  # task -> path to give llama.cpp (first file)
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def write_models_dir(split_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     shared: Sequence[str | os.PathLike[str]] = ()) -> ModelsDirReport:
    """Bring `out` up to date with the split's tasks (see the module docstring)."""
    from .commit import locked

    split_dir = os.fspath(split_dir)
    out = os.fspath(out)
    if out == "":
        raise GGUFSplitError(None, "models directory: empty path")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise GGUFSplitError(show(out), "exists and is not a directory")
    os.makedirs(os.path.join(out, MODELS_STATE), exist_ok=True)
    sd = SplitDir.open(split_dir)
    sd.require_split()
    report = ModelsDirReport(os.path.abspath(out))
    with locked(out):
        state = os.path.join(out, MODELS_STATE)
        live: set[str] = set()
        for task in sd.tasks:
            paths = task_paths(split_dir, task, shared)
            ident = hashlib.sha256("\0".join(os.path.realpath(p) for p in paths).encode()).hexdigest()[:12]
            gen = f"{task}-{ident}"
            gen_dir = os.path.join(state, gen)
            live.add(gen)
            entry = os.path.join(out, task)
            if os.path.lexists(entry) and not os.path.islink(entry):
                raise GGUFSplitError(show(entry), "exists and was not made by gguf-split; move it away to serve task "
                                                  f"{task!r} from this models directory")
            if not os.path.isdir(gen_dir):
                tmp = os.path.join(state, temp_name(gen))
                os.mkdir(tmp)
                for i, p in enumerate(paths):
                    os.symlink(_rel(p, tmp), os.path.join(tmp, link_name(task, i, len(paths))))
                fsync_dir(tmp)
                os.replace(tmp, gen_dir)
            target = os.path.join(MODELS_STATE, gen)
            before = os.readlink(entry) if os.path.islink(entry) else None
            if before != target:
                _relink(entry, target)
                (report.updated if before is not None else report.added).append(task)
            report.tasks[task] = os.path.join(report.directory, task, link_name(task, 0, len(paths)))
        for name in sorted(os.listdir(out)):
            entry = os.path.join(out, name)
            if name in sd.adaptors or not os.path.islink(entry):
                continue
            target = os.readlink(entry)
            if target.startswith(MODELS_STATE + os.sep):  # ours, for a task the split no longer has
                os.unlink(entry)
                report.removed.append(name)
        fsync_dir(out)
        for name in os.listdir(state):
            if name not in live:
                shutil.rmtree(os.path.join(state, name), ignore_errors=True)
    return report
