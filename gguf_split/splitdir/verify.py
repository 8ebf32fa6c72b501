"""Verify: check a split against its records, every byte of every file, naming the file and tensor.

For every task: its adaptor's seal and records; each file it lists is found (a missing one is named with
the option that points at it), sealed, the one recorded (content id, position, size); the restore plan
resolves every original tensor. For every distinct file, once however many tasks use it: its exact size,
zero padding, every tensor's xxh3-128 against the recorded digest, and the whole file's xxh3-128 (and
with `sha256=True` its sha256) against what each adaptor that lists it recorded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import GGUFSplitError
from ..disk.jobs import run_jobs
from ..disk.sweep import sweep_file, tensor_order
from ..format.gguf import align_up
from ..format.names import show
from ..disk.progress import NO_BAR, QUIET, Progress, Reporter
from ..format.records import FileRef, SplitFile
from .restore import plan_restore
from .directory import FileFinder, SplitDir, TaskFiles, directory_of, open_task, read_consistently, resolve_tasks


@dataclass
class VerifyReport:
    tasks: dict[str, str] = field(default_factory=dict)  # task -> adaptor path
    files: int = 0  # distinct files checked (adaptors included)
    tensors: int = 0
    bytes: int = 0  # every byte of every file
    unused: list[str] = field(default_factory=list)  # shared files in the directories no task lists
    pending_commit: bool = False  # a killed run's commit was honoured (the next write finishes it)


def check_file(f: SplitFile, want: Sequence[FileRef], sha256: bool = False, bar: Reporter = NO_BAR,
               cancel: threading.Event | None = None) -> None:
    """`f`, read front to back once, holds exactly what was recorded: its size, zero padding, every tensor's
    xxh3-128 (its own records) and the whole file's xxh3-128 (and sha256) that each of `want` recorded."""
    h = f.header
    last = max((t.offset + t.nbytes for t in h.tensors), default=0)
    expected = h.data_start + align_up(last, h.alignment)
    if f.size != expected:
        raise GGUFSplitError(f.path, f"is {f.size} bytes, the split wrote {expected}: truncated or appended to")
    recorded = f.digests()
    d = sweep_file(f, sha256=sha256, zero_gaps=True, bar=bar, cancel=cancel)
    for i in tensor_order(f):
        if d.tensors[i] != recorded[i]:
            raise GGUFSplitError(f.path, f"tensor {h.tensors[i].name!r} does not match its recorded digest: corrupted")
    for ref in want:
        if ref.xxh3 != d.xxh3_hex:
            raise GGUFSplitError(f.path, f"its bytes do not match the xxh3-128 recorded for {ref.name} "
                                         "(the header is intact): corrupted")
        if d.sha256 is not None and ref.sha256 != d.sha256:
            raise GGUFSplitError(f.path, f"its sha256 differs from the one recorded for {ref.name}: corrupted")


def verify(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
           shared: Sequence[str | os.PathLike[str]] = (), sha256: bool = False, progress: Progress = QUIET,
           threads: int | None = None) -> VerifyReport:
    """Verify split directories and/or adaptor files (each with every file it lists): one path or a list.
    The files are listed and opened as of one state of their directories (splitdir.read_consistently),
    then read: a commit running meanwhile changes nothing that is verified."""
    if isinstance(paths, bytes) or not isinstance(paths, (str, os.PathLike, Iterable)):
        raise TypeError(f"paths must be a path or a list of paths, not {type(paths).__name__}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise GGUFSplitError(None, "nothing to verify: give a split directory or adaptor files")
    opened = read_consistently([directory_of(p) for p in paths], lambda: _open_all(paths, shared), _Opened.close)
    report = VerifyReport()
    try:
        report.tasks = {tf.info.task: tf.adaptor.path for tf in opened.tasks}
        files: dict[str, tuple[SplitFile, list[FileRef]]] = {}
        for tf in opened.tasks:
            files[os.path.abspath(tf.adaptor.path)] = (tf.adaptor, [])
        for key, f in opened.cache.items():
            files[key] = (f, opened.want.get(key, []))
        total = sum(f.size for f, _ in files.values())
        with progress.bar("verifying", total) as bar:
            jobs = sorted(((f, refs, sha256, bar) for f, refs in files.values()), key=lambda j: -j[0].size)
            run_jobs(check_file, jobs, threads)
        report.files = len(files)
        report.tensors = sum(len(f.header.tensors) for f, _ in files.values())
        report.bytes = sum(f.size for f, _ in files.values())
        for sd in opened.dirs:
            report.pending_commit |= sd.pending
            report.unused += [p for p in sd.shared.values() if os.path.abspath(p) not in opened.cache]
        return report
    finally:
        opened.close()


@dataclass
class _Opened:
    """Every task verify checks, open: adaptors, shared files (once), and what each adaptor recorded."""

    tasks: list[TaskFiles] = field(default_factory=list)
    cache: dict[str, SplitFile] = field(default_factory=dict)
    want: dict[str, list[FileRef]] = field(default_factory=dict)  # shared file -> every record of it
    dirs: list[SplitDir] = field(default_factory=list)

    def close(self) -> None:
        for tf in self.tasks:
            tf.adaptor.close()
        for f in self.cache.values():
            f.close()


def _open_all(paths: Sequence[str | os.PathLike[str]], shared: Sequence[str | os.PathLike[str]]) -> _Opened:
    """List the arguments' tasks and open (and check, as far as headers tell) every file they use."""
    out = _Opened()
    try:
        adaptors, out.dirs = resolve_tasks(paths)
        finder = FileFinder(shared)
        seen: dict[str, str] = {}
        for a in adaptors:
            tf = open_task(a, finder, cache=out.cache)
            out.tasks.append(tf)
            if tf.info.task in seen:
                raise GGUFSplitError(tf.adaptor.path, f"a second adaptor of task {tf.info.task!r} "
                                                      f"(first: {show(seen[tf.info.task])})")
            seen[tf.info.task] = tf.adaptor.path
            for ref, f in zip(tf.info.files, tf.shared):
                out.want.setdefault(os.path.abspath(f.path), []).append(ref)
            plan_restore(tf)
    except BaseException:
        out.close()
        raise
    return out
