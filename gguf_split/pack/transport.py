"""Transport: a split directory or a set of models as one pack file, and back.

pack.py packs and unpacks any ordered set of GGUF files; this module says which files: a split's files
(every adaptor and every file a task uses, as the commit journal leaves them), or models given as
task -> path (a sharded model with all its shards). The pack records what it holds (`kind` "split" or
"models", and per task its files), so `unpack` can give back the split, or with `restore=True` the
original models directly (a split pack is unpacked into a temporary directory, each task restored, the
temporary removed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import GGUFSplitError
from ..format.names import check_task_name, show
from .container import PackReport, UnpackReport, pack_files, read_index, unpack
from ..disk.progress import QUIET, Progress
from ..splitdir.directory import SplitDir, open_tasks

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
    from ..assemble.scan import open_model

    inputs: dict[str, str] = {}
    names: dict[str, list[str]] = {}
    for task, path in tasks.items():
        check_task_name(task)
        m = open_model(task, path)
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


@dataclass
class TransportReport:
    """What `unpack_to` wrote: the pack's files (a split), or the original models (restore=True)."""

    out_dir: str
    kind: str
    files: list[str] = field(default_factory=list)  # paths written
    tasks: list[str] = field(default_factory=list)
    bytes_written: int = 0
    unpacked: UnpackReport | None = None


def unpack_to(pack_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, restore: bool = False,
              force: bool = False, threads: int | None = None, progress: Progress = QUIET) -> TransportReport:
    """Unpack a pack into `out_dir`: byte-identical files (a split, or models). With `restore`, a split
    pack gives the original models instead (through a temporary split, removed afterwards)."""
    index = read_index(pack_path)
    kind = index.kind if isinstance(index.kind, str) else KIND_MODELS
    meta = index.meta if isinstance(index.meta, dict) else {}
    tasks = list(meta.get("tasks", {})) if isinstance(meta.get("tasks"), dict) else []
    out = os.fspath(out_dir)
    if out == "":
        raise GGUFSplitError(None, "-o/--output: empty path")
    if not restore or kind != KIND_SPLIT:
        r = unpack(pack_path, out, force=force, threads=threads, progress=progress)
        return TransportReport(os.path.abspath(out), kind, [os.path.join(r.out_dir, f.name) for f in r.files],
                               tasks, r.bytes_written, r)
    from ..splitdir.restore import restore as restore_task

    os.makedirs(out, exist_ok=True)
    report = TransportReport(os.path.abspath(out), KIND_MODELS, tasks=tasks)
    with tempfile.TemporaryDirectory(prefix=".gguf-split-unpack-", dir=out) as tmp:
        split_dir = os.path.join(tmp, "split")
        report.unpacked = unpack(pack_path, split_dir, threads=threads, progress=progress)
        for task in SplitDir.open(split_dir).tasks:
            restored = restore_task(split_dir, out, task=task, force=force, progress=progress)
            report.files += [f.path for f in restored.files]
            report.bytes_written += restored.size
        shutil.rmtree(split_dir, ignore_errors=True)
    return report


__all__ = ["pack", "unpack_to", "split_inputs", "model_inputs", "TransportReport", "KIND_SPLIT", "KIND_MODELS",
           "read_index"]

