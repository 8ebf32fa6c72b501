"""Transport: a split directory or a set of models as one pack file, and back.

writer.py packs and reader.py unpacks any ordered set of GGUF files; this module says which files: a
split's files (every adaptor and every file a task uses, as the commit journal leaves them), or models
given as task -> path (a sharded model with all its shards). The pack records what it holds (`kind` "split" or
"models", and `meta` {"tasks": {task: [its file names, in order]}}); `read_index` checks that record
against the pack's files before anyone uses it (a forged or foreign pack is one line), so `unpack` can
give back the split, or with `restore=True` the original models directly.

`unpack --restore` of a split's pack is one commit.Transaction on the output directory: the split is
unpacked into a hidden temporary directory the transaction owns (its adaptors first, so the models' names
are known and checked before the rest is written), every task's models are written as new files of that
one transaction and checked as read back (restore.restore_into), and one commit puts them all in place:
all models appear or none; a killed run's leftovers are finished or removed by the next run in that
directory. Errors name the pack, the output directory or a model's final path, never the temporary.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from ..disk.commit import Transaction, check_space
from ..disk.progress import QUIET, Progress
from ..errors import GGUFSplitError
from ..format.names import check_bare_name, check_task_name, show
from ..format.records import AdaptorInfo, SourceFile, SplitFile
from ..splitdir.directory import FileFinder, open_task, open_tasks
from .index import PackIndex
from .reader import UnpackReport, unpack
from .reader import read_index as read_pack_index
from .report import PackReport
from .writer import pack_files

KIND_SPLIT = "split"
KIND_MODELS = "models"


def split_inputs(split_dir: str | os.PathLike[str]) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """The files of a split, checked as far as headers tell (every task's files present and the ones
    recorded), as of one state of the directory: ((name, path) in a stable order, task -> its file names
    in llama.cpp order)."""
    inputs: dict[str, str] = {}
    tasks: dict[str, list[str]] = {}
    with open_tasks(split_dir) as opened:
        sd = opened.split
        for task, tf in opened.tasks.items():
            names = [sd.name_of(sd.adaptors[task])]
            inputs.setdefault(names[0], tf.adaptor.path)
            for ref, f in zip(tf.info.files, tf.shared):
                inputs.setdefault(ref.name, f.path)
                names.append(ref.name)
            tasks[task] = names
    return sorted(inputs.items()), tasks


def model_inputs(tasks: Mapping[str, str | os.PathLike[str]]) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """The files of models (a sharded model: all its shards): ((name, path), task -> file names)."""
    from ..assemble.scan import open_input

    inputs: dict[str, str] = {}
    names: dict[str, list[str]] = {}
    for task, path in tasks.items():
        check_task_name(task)
        m = open_input(task, path)
        try:
            files = [inp.path for inp in m.files]
        finally:
            m.close()
        names[task] = []
        for p in files:
            name = os.path.basename(p)
            if name in inputs and os.path.realpath(inputs[name]) != os.path.realpath(p):
                raise GGUFSplitError(show(p), f"has the same file name as {show(inputs[name])}: a pack gives files "
                                              "back by name; rename one of them")
            inputs[name] = p
            names[task].append(name)
    return list(inputs.items()), names


def pack(output: str | os.PathLike[str], *, split_dir: str | os.PathLike[str] | None = None,
         tasks: Mapping[str, str | os.PathLike[str]] | None = None, force: bool = False,
         threads: int | None = None, progress: Progress = QUIET) -> PackReport:
    """Pack a split directory (`split_dir`) or models (`tasks`: name -> path) into `output`."""
    if (split_dir is None) == (tasks is None):
        raise ValueError("give exactly one of split_dir and tasks")
    if split_dir is not None:
        inputs, files = split_inputs(split_dir)
        kind = KIND_SPLIT
    else:
        assert tasks is not None
        if not tasks:
            raise GGUFSplitError(None, "no models to pack")
        inputs, files = model_inputs(tasks)
        kind = KIND_MODELS
    out = os.fspath(output)
    if out == "":
        raise GGUFSplitError(None, "-o/--output: empty path")
    if os.path.isdir(out):
        raise GGUFSplitError(show(out), "is a directory: give the pack's file name (NAME.ggufpack)")
    if any(os.path.realpath(p) == os.path.realpath(out) for _, p in inputs):
        raise GGUFSplitError(show(out), "is one of the inputs")
    return pack_files(inputs, out, kind=kind, meta={"tasks": files}, threads=threads, progress=progress,
                      force=force)


def read_index(pack_path: str | os.PathLike[str]) -> PackIndex:
    """The pack's index (pack.read_index), its kind and meta checked as gguf-split writes them
    (`pack_tasks`)."""
    index = read_pack_index(pack_path)
    pack_tasks(index)
    return index


def pack_tasks(index: PackIndex) -> dict[str, list[str]]:
    """Task -> its file names, from a pack's kind and meta, checked: kind "split" or "models"; meta
    {"tasks": {task: [file, ...]}} with task names by the task-name rule, file names by the file-name rule,
    every one a file of the pack, and every file of the pack some task's."""
    def forged(problem: str) -> GGUFSplitError:
        return GGUFSplitError(show(index.path), f"corrupt pack: {problem}")

    if index.kind not in (KIND_SPLIT, KIND_MODELS):
        raise forged(f"kind {str(index.kind)[:40]!r} is neither {KIND_SPLIT!r} nor {KIND_MODELS!r}")
    meta = index.meta
    tasks = meta.get("tasks") if isinstance(meta, dict) else None
    if not isinstance(tasks, dict) or not tasks:
        raise forged("meta is not {\"tasks\": {task: [file names]}}")
    in_pack = {f.name for f in index.files}
    used: set[str] = set()
    out: dict[str, list[str]] = {}
    for task, names in tasks.items():
        try:
            check_task_name(task)
        except GGUFSplitError as e:
            raise forged(f"meta: {e.problem}") from None
        if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
            raise forged(f"meta: task {task!r}: its files are not a list of distinct names")
        for name in names:
            try:
                check_bare_name(name, None, strict=True)
            except GGUFSplitError as e:
                raise forged(f"meta: task {task!r}: {e.problem}") from None
            if name not in in_pack:
                raise forged(f"meta: task {task!r} names {name!r}, which the pack does not hold")
        used.update(names)
        out[task] = list(names)
    stray = sorted(in_pack - used)
    if stray:
        raise forged(f"holds {stray[0]!r}, which no task of its meta names")
    return out


@dataclass
class TransportReport:
    """What `unpack_to` wrote: the pack's files (a split), or the original models (restore=True)."""

    out_dir: str
    kind: str
    files: list[str] = field(default_factory=list)  # paths of the outputs
    tasks: list[str] = field(default_factory=list)
    bytes_written: int = 0
    unpacked: UnpackReport | None = None
    kept: list[str] = field(default_factory=list)  # outputs already in place byte for byte: left as they were


def unpack_to(pack_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, restore: bool = False,
              force: bool = False, threads: int | None = None, progress: Progress = QUIET) -> TransportReport:
    """Unpack a pack into `out_dir`: byte-identical files (a split, or models). With `restore`, a split's
    pack gives the original models instead, all or none (a models pack gives its models either way)."""
    index = read_index(pack_path)
    tasks = pack_tasks(index)
    out = os.fspath(out_dir)
    if out == "":
        raise GGUFSplitError(None, "-o/--output: empty path")
    if not restore or index.kind != KIND_SPLIT:
        r = unpack(pack_path, out, force=force, threads=threads, progress=progress)
        return TransportReport(r.out_dir, index.kind, [os.path.join(r.out_dir, f.name) for f in r.files],
                               list(tasks), r.bytes_written, r, [os.path.join(r.out_dir, n) for n in r.kept])
    return _restore_models(index, tasks, out, force=force, threads=threads, progress=progress)


def _restore_models(index: PackIndex, tasks: dict[str, list[str]], out: str, *, force: bool, threads: int | None,
                    progress: Progress) -> TransportReport:
    """A split's pack -> its tasks' original models in `out`, as one transaction (module docstring)."""
    from ..splitdir.restore import check_outputs, plan_restore, restore_into

    pack_name = show(index.path)
    sizes = {f.name: f.size for f in index.files}
    report = TransportReport(os.path.abspath(out), KIND_MODELS, tasks=list(tasks))
    with Transaction(out, on_wait=progress.note) as tx:
        adaptors = {task: names[0] for task, names in tasks.items()}
        check_space(tx.dir, sum(sizes[n] for n in set(adaptors.values())), "the split's adaptors")
        tmp = tx.temp_dir("unpack")
        with _temporary_named(tmp, tx.dir, "unpacking {member}: {problem}"):
            first = unpack(index.path, tmp, files=sorted(set(adaptors.values())), threads=threads,
                           progress=progress)
        with _temporary_named(tmp, pack_name, "{member}: {problem}"):
            sources = {task: _sources(os.path.join(tmp, adaptors[task]), task, tasks[task][1:]) for task in tasks}
        outputs = [(task, src) for task in tasks for src in sources[task]]
        _check_distinct(pack_name, outputs)
        keep = check_outputs(tx.dir, [src.name for _, src in outputs], [src for _, src in outputs], force=force)
        report.files = [os.path.join(tx.dir, src.name) for _, src in outputs]
        report.kept = [p for p, k in zip(report.files, keep) if k]
        if all(keep):  # a run killed after its commit, run again: every model is already in place
            return report
        rest = sorted({name for names in tasks.values() for name in names} - set(adaptors.values()))
        models = sum(src.size for (_, src), kept in zip(outputs, keep) if not kept)
        check_space(tx.dir, sum(sizes[n] for n in rest) + models, "the split's files and the models")
        with _temporary_named(tmp, tx.dir, "unpacking {member}: {problem}"):
            second = unpack(index.path, tmp, files=rest, threads=threads, progress=progress) if rest else None
        report.unpacked = _merged(first, second)
        keep_of = dict(zip(((task, src.name) for task, src in outputs), keep))
        for task in tasks:
            with _temporary_named(tmp, pack_name, "{member}: {problem}"), \
                    open_task(os.path.join(tmp, adaptors[task]), FileFinder()) as tf:
                plans = plan_restore(tf)
                names = [p.name for p in plans]
                restored = restore_into(tx, tf, plans, names, [keep_of[(task, n)] for n in names], progress)
            report.bytes_written += sum(f.size for f in restored if not f.kept)
        tx.commit()
    return report


def _sources(adaptor: str, task: str, files: list[str]) -> list[SourceFile]:
    """The original files a task of the unpacked split restores to, from its adaptor alone, checked
    against the pack's meta: the adaptor is task's, and lists the files the meta lists."""
    with SplitFile(adaptor) as f:
        f.check_seal()
        info = AdaptorInfo.read(f)
    if info.task != task:
        raise GGUFSplitError(adaptor, f"is the adaptor of task {info.task!r}, the pack's index says {task!r}: forged")
    if [ref.name for ref in info.files] != files:
        raise GGUFSplitError(adaptor, "lists other files than the pack's index says: forged")
    return info.sources


def _check_distinct(pack: str, outputs: list[tuple[str, SourceFile]]) -> None:
    seen: dict[str, str] = {}
    for task, src in outputs:
        if src.name in seen:
            raise GGUFSplitError(pack, f"tasks {seen[src.name]!r} and {task!r} both restore to {src.name}: unpack "
                                       "the split without --restore, then restore each task with -o")
        seen[src.name] = task


def _merged(a: UnpackReport, b: UnpackReport | None) -> UnpackReport:
    if b is None:
        return a
    return UnpackReport(a.out_dir, a.files + b.files, a.bytes_written + b.bytes_written, a.seconds + b.seconds,
                        a.kept + b.kept)


@contextmanager
def _temporary_named(tmp: str, path: str, message: str) -> Iterator[None]:
    """An error about a file in the hidden temporary directory is reported against `path` (the pack, or
    the output directory) with `message` ({member}: the file's name in the pack, {problem}): the
    temporary is an internal detail, and gone when the message is read."""
    try:
        yield
    except GGUFSplitError as e:
        inside = tmp + os.sep
        where = e.path or ""
        if not (where == tmp or where.startswith(inside) or inside in e.problem):
            raise
        member = where[len(inside):] if where.startswith(inside) else ""
        problem = e.problem.replace(inside, "")
        text = message.format(member=member, problem=problem) if member else problem
        raise GGUFSplitError(path, text) from None


__all__ = ["pack", "unpack_to", "split_inputs", "model_inputs", "TransportReport", "KIND_SPLIT", "KIND_MODELS",
           "read_index", "pack_tasks"]



@dataclass
class PackInfo:
    """What `info NAME.ggufpack` shows: the pack's kind and meta, and every file it gives back."""

    path: str
    pack_version: int
    kind: Any
    meta: Any
    pack_bytes: int
    tensors: int  # distinct tensors stored
    files: list[dict[str, Any]]
    role: str = "pack"

    def to_json(self, tensors: bool = False) -> dict[str, Any]:
        return asdict(self)


def describe_pack(path: str | os.PathLike[str]) -> PackInfo:
    """A pack's index (kind and meta checked), without unpacking anything."""
    i = read_index(path)
    return PackInfo(i.path, i.version, i.kind, i.meta, i.pack_bytes, i.tensors,
                    [{"name": f.name, "bytes": f.size, "sha256": f.sha256, "xxh3": f.xxh3} for f in i.files])
