"""Links: the names llama.cpp looks for, pointing at a split's files (symlinks, never copies).

llama.cpp finds the files of a multi-file model by name: given `<prefix>-00001-of-0000N.gguf` it opens
`<prefix>-0000k-of-0000N.gguf` beside it (`llama_split_path`). So:

- `link_task(split_dir, task)` makes `<task>-0000k-of-0000N.gguf` symlinks in the split directory (or
  another one) for the task's adaptor and each of its files; many tasks share one directory, since the
  names start with the task's. `llama-cli -m DIR/<task>-00001-of-0000N.gguf` runs the task.
- Links gguf-split made are kept right by every change of the split: a symlink with llama.cpp's split
  name for a task, whose target is a file of the split (or, dangling, a name of gguf-split's form in the
  split directory: left by 0.2's `remove`), is the tool's. `split`, `add` and `remove` update a task's
  links when its files change and delete them with the task, in the same commit as the files
  (`plan_links` + `stage_links`: temporary symlinks renamed by the journal, commit.py), so llama.cpp is
  never handed a stale file list; `split --link` and `link` make them the same way. Anything else with
  such a name is the user's: a symlink is replaced only when a task needs the name, a file never (unless
  `link --force`), a directory never.
- `write_models_dir(split_dir, out)` writes the directory llama-server's router mode reads
  (`llama-server --models-dir OUT`): one entry per task, `OUT/<task>/<task>-0000k-of-0000N.gguf`; a
  request's `"model": "<task>"` picks it. Every child process maps the same shared files, so the page
  cache holds them once. Each `OUT/<task>` is a symlink to a directory of links under
  `OUT/.gguf-split/`, switched with one atomic rename: a server starting at any moment sees a task's old
  file set or its new one, never a mix. Re-running brings OUT up to date (new tasks appear, removed ones
  go); entries gguf-split did not make are left alone. The models directory is another directory than the
  split's, so it is not part of the split's commit: `check_models_dir` refuses, before a split, add or
  remove writes anything, a target that is a file, lies under a file, cannot be created or written, or
  holds a task's entry gguf-split did not make; a failure or an interruption after the split's commit says
  that the split is complete and the models directory was not brought up to date, and how to do it.

Links are relative, so a split directory and its models directory can move together.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from ..disk.commit import Transaction, checkpoint, fsync_dir
from ..errors import GGUFSplitError, os_problem
from ..format.names import check_task_name, link_name, show, temp_name
from .directory import looks_like_split_name, open_tasks

MODELS_STATE = ".gguf-split"  # OUT/.gguf-split/<task>-<id>/: the link directories (not a model: no .gguf)


def task_paths(split_dir: str | os.PathLike[str], task: str,
               shared: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """The task's files in llama.cpp order (adaptor, then positions 1..k), checked."""
    with open_tasks(split_dir, [task], shared=shared) as opened:
        return opened.paths(task)


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


_LINK_RE = re.compile(r"(?P<task>.+)-\d{5}-of-\d{5}\.gguf")  # fullmatch: `$` matches before a final \n


def tool_links(directory: str | os.PathLike[str], split_dir: str | os.PathLike[str],
               split_files: Collection[str]) -> dict[str, list[str]]:
    """The links gguf-split made in `directory` for the split in `split_dir`: task -> link names. A link is
    the tool's when it is a symlink with llama.cpp's split name for a task and points at one of
    `split_files` (paths of the split's files), or dangles into the split directory at a name of
    gguf-split's form (a file a commit deleted). Nothing else is ever touched as one."""
    d = os.fspath(directory)
    split_real = os.path.realpath(split_dir)
    targets = {os.path.realpath(p) for p in split_files}
    out: dict[str, list[str]] = {}
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        raise GGUFSplitError(show(d), f"cannot list: {os_problem(e)}") from None
    for name in names:
        m = _LINK_RE.fullmatch(name)
        path = os.path.join(d, name)
        if m is None or not os.path.islink(path):
            continue
        real = os.path.realpath(path)
        dangling_ours = (not os.path.exists(real) and os.path.dirname(real) == split_real
                         and looks_like_split_name(os.path.basename(real)))
        if real in targets or dangling_ours:
            out.setdefault(m["task"], []).append(name)
    return out


@dataclass
class LinkPlan:
    """What a commit changes in one directory's links: new or retargeted links, and links to delete."""

    directory: str
    make: dict[str, str] = field(default_factory=dict)  # link name -> target (relative)
    delete: list[str] = field(default_factory=list)
    links: dict[str, list[str]] = field(default_factory=dict)  # task -> its link names after, in order

    def paths(self, task: str) -> list[str]:
        return [os.path.join(self.directory, n) for n in self.links.get(task, [])]


def plan_links(directory: str | os.PathLike[str], split_dir: str | os.PathLike[str], split_files: Collection[str],
               after: Mapping[str, Sequence[str] | None], requested: Collection[str] = (), *,
               force: bool = False, force_option: str | None = None) -> LinkPlan:
    """The link changes that go with a change of the split, checked before anything is written.

    `after`: task -> its file paths in llama.cpp order after the change (None: the task goes); tasks not in
    it keep their links as they are, except dangling ones (left by 0.2's `remove`: they go). A task in `requested`, or one that has links the tool made
    (`tool_links` over `split_files`: every file of the split before and after), gets exactly
    `<task>-0000k-of-0000N.gguf` for its files after; its other links go. A name a task needs that holds a
    directory, or a file (unless `force`), is refused; `force_option` names the option that would get past
    it."""
    d = os.fspath(directory)
    ours = tool_links(d, split_dir, split_files)
    ours_names = {n for names in ours.values() for n in names}
    plan = LinkPlan(d)
    for task, files in after.items():
        if files is None or (task not in requested and task not in ours):
            continue
        wanted = {link_name(task, i, len(files)): _rel(p, d) for i, p in enumerate(files)}
        for name, target in wanted.items():
            path = os.path.join(d, name)
            if name not in ours_names and os.path.lexists(path) and not os.path.islink(path):
                if os.path.isdir(path):
                    raise GGUFSplitError(show(path), "is a directory; move it away first")
                if not force:
                    how = f"use {force_option} to replace it" if force_option else "move it away first"
                    raise GGUFSplitError(show(path), f"exists and is not a link ({how})")
            if not (os.path.islink(path) and os.readlink(path) == target):
                plan.make[name] = target
        plan.links[task] = list(wanted)
    for task, names in ours.items():
        keep = set(plan.links.get(task, []))
        for name in names:
            if name in keep:
                continue
            if task in after or not os.path.exists(os.path.join(d, name)):  # dangling: stale whatever the task
                plan.delete.append(name)
    return plan


def stage_links(tx: Transaction, plan: LinkPlan) -> None:
    """Put a plan's links into a transaction on its directory: they change with its commit."""
    for name, target in plan.make.items():
        tx.link(name, target)
    for name in plan.delete:
        tx.delete(name)


def link_task(split_dir: str | os.PathLike[str], task: str, *, directory: str | os.PathLike[str] | None = None,
              force: bool = False, shared: Sequence[str | os.PathLike[str]] = ()) -> list[str]:
    """`<task>-0000k-of-0000N.gguf` symlinks for the task's files; returns them in order (give llama.cpp
    the first). Made in one commit (commit.py) in their directory; the task's stale links (another N) go;
    a file that is not a link is never replaced unless `force`."""
    check_task_name(task)
    split_dir = os.fspath(split_dir)
    d = os.fspath(directory) if directory is not None else split_dir
    if not os.path.isdir(d):
        raise GGUFSplitError(show(d), "not a directory" if os.path.lexists(d) else "no such directory")
    with Transaction(d, create=False) as tx:
        with open_tasks(split_dir, [task], shared=shared) as opened:
            paths = opened.paths(task)
            split_files = [*(os.path.join(split_dir, n) for n in opened.split.file_names()), *paths]
        plan = plan_links(d, split_dir, split_files, {task: paths}, {task}, force=force, force_option="--force")
        stage_links(tx, plan)
        tx.commit()
    return plan.paths(task)


@dataclass
class ModelsDirReport:
    directory: str
    tasks: dict[str, str] = field(default_factory=dict)  # task -> path to give llama.cpp (first file)
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def check_models_dir(out: str | os.PathLike[str], tasks: Collection[str] = ()) -> str:
    """Refuse, before anything is written, a models directory that cannot be written: a file, a path under
    a file or a missing directory, a directory without write permission, or an entry of one of `tasks`
    that gguf-split did not make. Returns the path."""
    o = os.fspath(out)
    if o == "":
        raise GGUFSplitError(None, "models directory: empty path")
    if os.path.lexists(o):
        if not os.path.isdir(o):
            raise GGUFSplitError(show(o), "exists and is not a directory")
        if not os.access(o, os.W_OK | os.X_OK):
            raise GGUFSplitError(show(o), "models directory is not writable")
        state = os.path.join(o, MODELS_STATE)
        if os.path.lexists(state) and (os.path.islink(state) or not os.path.isdir(state)):
            raise GGUFSplitError(show(state), "exists and was not made by gguf-split; move it away")
        for task in tasks:
            entry = os.path.join(o, task)
            if os.path.lexists(entry) and not os.path.islink(entry):
                raise GGUFSplitError(show(entry), "exists and was not made by gguf-split; move it away to serve "
                                                  f"task {task!r} from this models directory")
        return o
    parent = os.path.dirname(os.path.abspath(o))
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)  # created with it
    if not os.path.isdir(parent):
        raise GGUFSplitError(show(o), f"cannot create the models directory: {show(parent)} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GGUFSplitError(show(o), f"cannot create the models directory: {show(parent)} is not writable")
    return o


def models_dir_note(split_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """What stands when a split's change is committed but its models directory was not brought up to date."""
    return (f"the models directory {show(out)} was not brought up to date: run `gguf-split models-dir "
            f"{show(split_dir)} {show(out)}`")


def write_models_dir(split_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     shared: Sequence[str | os.PathLike[str]] = ()) -> ModelsDirReport:
    """Bring `out` up to date with the split's tasks (see the module docstring). The split is read (as of
    one state: splitdir.open_tasks) and every entry checked before `out` is created or changed."""
    from ..disk.commit import locked

    split_dir = os.fspath(split_dir)
    out = check_models_dir(out)
    with open_tasks(split_dir, shared=shared) as opened:
        paths = {task: opened.paths(task) for task in opened.tasks}
    check_models_dir(out, paths)
    report = ModelsDirReport(os.path.abspath(out))
    try:
        os.makedirs(os.path.join(out, MODELS_STATE), exist_ok=True)
        with locked(out):
            check_models_dir(out, paths)  # again, now that no other run changes it
            _write_entries(out, paths, report)
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else out
        raise GGUFSplitError(show(where), f"cannot write the models directory: {os_problem(e)}") from None
    return report


def _write_entries(out: str, paths: Mapping[str, list[str]], report: ModelsDirReport) -> None:
    state = os.path.join(out, MODELS_STATE)
    live: set[str] = set()
    for task, files in paths.items():
        ident = hashlib.sha256("\0".join(os.path.realpath(p) for p in files).encode()).hexdigest()[:12]
        gen = f"{task}-{ident}"
        gen_dir = os.path.join(state, gen)
        live.add(gen)
        entry = os.path.join(out, task)
        if not os.path.isdir(gen_dir):
            tmp = os.path.join(state, temp_name(gen))
            os.mkdir(tmp)
            for i, p in enumerate(files):
                os.symlink(_rel(p, tmp), os.path.join(tmp, link_name(task, i, len(files))))
            fsync_dir(tmp)
            os.replace(tmp, gen_dir)
        target = os.path.join(MODELS_STATE, gen)
        before = os.readlink(entry) if os.path.islink(entry) else None
        if before != target:
            checkpoint(f"models-dir {task}")
            _relink(entry, target)
            (report.updated if before is not None else report.added).append(task)
        report.tasks[task] = os.path.join(report.directory, task, link_name(task, 0, len(files)))
    for name in sorted(os.listdir(out)):
        entry = os.path.join(out, name)
        if name in paths or not os.path.islink(entry):
            continue
        target = os.readlink(entry)
        if target.startswith(MODELS_STATE + os.sep):  # ours, for a task the split no longer has
            checkpoint(f"models-dir remove {name}")
            os.unlink(entry)
            report.removed.append(name)
    fsync_dir(out)
    for name in os.listdir(state):
        if name not in live:
            shutil.rmtree(os.path.join(state, name), ignore_errors=True)
