"""Split directories: which tasks and files a directory holds, and the files one task needs.

A directory's split is the set of adaptors in it (one per task, found by their records, not by name);
each adaptor lists the files its task loads. A commit that a killed run left half done is honoured
(`commit.pending_view`): readers see the state it switched to. Shared files are looked up beside the
adaptor unless the caller points elsewhere (`--shared PATH`, a file or a directory, repeatable): a file
found is checked against what the adaptor recorded (position, content id, size), and its seal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..disk.commit import pending_view
from ..errors import GGUFSplitError
from ..format.names import is_temp, show
from ..format.records import ROLE_ADAPTOR, ROLE_SHARED, AdaptorInfo, FileRef, NotASplitFile, SharedInfo, SplitFile

SHARED_OPTION = "-s/--shared"


def _looks_like_ours(name: str) -> bool:
    return any(part in name for part in ("adaptor-", "foundation", "shared-", "hole-"))


@dataclass
class SplitDir:
    """The gguf-split files of one directory (journal honoured)."""

    directory: str
    adaptors: dict[str, str] = field(default_factory=dict)  # task -> path holding its adaptor's bytes
    shared: dict[str, str] = field(default_factory=dict)  # file name -> path holding its bytes
    other: list[str] = field(default_factory=list)  # .gguf files that are not gguf-split's (models, ...)
    names: dict[str, str] = field(default_factory=dict)  # path holding a file's bytes -> its name in the split
    pending: bool = False  # a killed run's commit is being honoured

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> "SplitDir":
        d = os.fspath(directory)
        if not os.path.isdir(d):
            raise GGUFSplitError(show(d), "not a directory" if os.path.exists(d) else "no such directory")
        view = pending_view(d)
        out = cls(d, pending=bool(view))
        try:
            names = sorted(os.listdir(d))
        except OSError as e:
            raise GGUFSplitError(show(d), f"cannot list: {e.strerror}") from None
        names = [n for n in names if n.endswith(".gguf") and not is_temp(n) and n not in view]
        entries = [(n, os.path.join(d, n)) for n in names]
        entries += [(final, os.path.join(d, actual)) for final, actual in view.items() if actual is not None]
        for name, path in sorted(entries):
            if os.path.islink(path) or not os.path.isfile(path):
                continue  # llama.cpp link names made by `gguf-split link`
            out.names[path] = name
            try:
                with SplitFile(path) as f:
                    role = f.role
                    task = f.get("gguf_split.task") if role == ROLE_ADAPTOR else None
            except NotASplitFile:
                out.other.append(path)
                continue
            except GGUFSplitError:
                if _looks_like_ours(name):
                    raise  # a damaged adaptor or shared file is what verify must report, not skip
                out.other.append(path)
                continue
            if role == ROLE_ADAPTOR:
                if not isinstance(task, str):
                    raise GGUFSplitError(path, "adaptor without a task name: damaged")
                if task in out.adaptors:
                    raise GGUFSplitError(path, f"a second adaptor of task {task!r} (first: {show(out.adaptors[task])})")
                out.adaptors[task] = path
            elif role == ROLE_SHARED:
                out.shared[name] = path
            else:
                out.other.append(path)
        return out

    @property
    def tasks(self) -> list[str]:
        return sorted(self.adaptors)

    def adaptor(self, task: str) -> str:
        try:
            return self.adaptors[task]
        except KeyError:
            have = ", ".join(self.tasks) or "none"
            raise GGUFSplitError(show(self.directory), f"holds no task {task!r} (tasks: {have})") from None

    def require_split(self) -> None:
        if not self.adaptors:
            hint = " (a split of gguf-split 0.1? see README: layout 1)" if any(
                os.path.basename(p) == "foundation.gguf" for p in self.other) else ""
            raise GGUFSplitError(show(self.directory), f"holds no gguf-split adaptor{hint}")


class FileFinder:
    """Where a task's shared files are: beside its adaptor (journal honoured), or where `--shared` points."""

    def __init__(self, shared: Sequence[str | os.PathLike[str]] = ()) -> None:
        self.files: dict[str, str] = {}  # name -> path, from --shared FILE
        self.dirs: list[str] = []  # from --shared DIR
        for p in shared:
            p = os.fspath(p)
            if os.path.isdir(p):
                self.dirs.append(p)
            elif os.path.exists(p):
                self.files[os.path.basename(p)] = p
            else:
                raise GGUFSplitError(show(p), f"{SHARED_OPTION}: no such file or directory")
        self._views: dict[str, dict[str, str | None]] = {}

    def _in_dir(self, directory: str, name: str) -> str | None:
        view = self._views.get(directory)
        if view is None:
            view = self._views[directory] = pending_view(directory) if os.path.isdir(directory) else {}
        if name in view:
            actual = view[name]
            return os.path.join(directory, actual) if actual is not None else None
        p = os.path.join(directory, name)
        return p if os.path.isfile(p) else None

    def find(self, ref: FileRef, adaptor: AdaptorInfo) -> str:
        if ref.name in self.files:
            return self.files[ref.name]
        for d in self.dirs:
            p = self._in_dir(d, ref.name)
            if p is not None:
                return p
        p = self._in_dir(os.path.dirname(os.path.abspath(adaptor.path)), ref.name)
        if p is not None:
            return p
        where = f" nor in {', '.join(map(show, self.dirs))}" if self.dirs else ""
        raise GGUFSplitError(show(os.path.join(os.path.dirname(adaptor.path), ref.name)),
                             f"not found (file {ref.position} of task {adaptor.task!r}, beside {show(adaptor.path)}"
                             f"{where}); point at it with {SHARED_OPTION} PATH")


def check_shared(f: SplitFile, ref: FileRef, adaptor: AdaptorInfo) -> SharedInfo:
    """`f` is the file `adaptor` recorded at `ref.position`, sealed and intact (as far as headers tell)."""
    info = read_shared(f)
    match_shared(info, f.size, f.path, ref, adaptor)
    return info


def read_shared(f: SplitFile) -> SharedInfo:
    """A shared file's seal and records, checked: what `match_shared` compares with each adaptor's record
    (the runtime loader reads a file once per mapping and compares it with every task that uses it)."""
    f.check_seal()
    return SharedInfo.read(f)


def match_shared(info: SharedInfo, size: int, path: str, ref: FileRef, adaptor: AdaptorInfo) -> None:
    """The shared file at `path` (`size` bytes, records `info`) is the one `adaptor` recorded at `ref.position`."""
    if info.content_id != ref.content_id or info.position != ref.position:
        raise GGUFSplitError(path, f"is not the file task {adaptor.task!r} was split with ({show(adaptor.path)} "
                                   f"recorded content id {ref.content_id[:12]} at position {ref.position}, this file is "
                                   f"{info.content_id[:12]} at position {info.position}): a file of another split?")
    if size != ref.size:
        raise GGUFSplitError(path, f"is {size} bytes, {show(adaptor.path)} recorded {ref.size}: truncated or "
                                   "appended to")


@dataclass
class TaskFiles:
    """One task's files, open and checked against each other (seals, content ids, positions, sizes)."""

    adaptor: SplitFile
    info: AdaptorInfo
    shared: list[SplitFile]  # positions 1..k

    @property
    def files(self) -> list[SplitFile]:
        return [self.adaptor, *self.shared]

    def paths(self) -> list[str]:
        return [os.path.abspath(f.path) for f in self.files]

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "TaskFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_task(adaptor_path: str | os.PathLike[str], finder: FileFinder | None = None, *,
              cache: dict[str, SplitFile] | None = None) -> TaskFiles:
    """Open an adaptor and every file it lists; check the seals and that each file is the one recorded.
    With `cache` (path -> open file), shared files are opened once across tasks (and not closed here)."""
    finder = finder or FileFinder()
    ad = SplitFile(adaptor_path)
    shared: list[SplitFile] = []
    try:
        ad.check_seal()
        info = AdaptorInfo.read(ad)
        for ref in info.files:
            path = finder.find(ref, info)
            key = os.path.abspath(path)
            f = cache.get(key) if cache is not None else None
            if f is None:
                f = SplitFile(path)
                if cache is not None:
                    cache[key] = f
                else:
                    shared.append(f)
                check_shared(f, ref, info)
            else:  # opened (and its seal checked) for another task: still the file *this* task recorded?
                match_shared(SharedInfo.read(f), f.size, f.path, ref, info)
            if cache is not None:
                shared.append(f)
        count = len(ad.header.tensors) + sum(len(f.header.tensors) for f in shared)
        if count != info.n_model_tensors:
            raise GGUFSplitError(ad.path, f"its files hold {count} tensors, the task has {info.n_model_tensors}: "
                                          "a file of another split?")
        return TaskFiles(ad, info, shared)
    except BaseException:
        ad.close()
        if cache is None:
            for f in shared:
                f.close()
        raise


def resolve_tasks(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """verify/info arguments: split directories and/or adaptor files -> (adaptor paths, directories)."""
    adaptors: list[str] = []
    dirs: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            sd = SplitDir.open(p)
            sd.require_split()
            adaptors += [sd.adaptors[t] for t in sd.tasks]
            dirs.append(p)
        else:
            with SplitFile(p) as f:
                if f.role == ROLE_SHARED:
                    raise GGUFSplitError(show(p), "is a shared file: give the adaptors (or the split directory) "
                                                  "that use it")
                f.require(ROLE_ADAPTOR)
            adaptors.append(p)
    return adaptors, dirs
