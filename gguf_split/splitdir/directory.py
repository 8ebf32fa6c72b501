"""Split directories: which tasks and files a directory holds, and the files one task needs.

A directory's split is the set of adaptors in it (one per task, found by their records, not by name);
each adaptor lists the files its task loads. A commit that a killed run left half done is honoured
(`commit.pending_view`): readers see the state it switched to. Shared files are looked up beside the
adaptor unless the caller points elsewhere (`--shared PATH`, a file or a directory, repeatable): a file
found is checked against what the adaptor recorded (position, content id, size), and its seal.

Readers take no lock (a writer holds its lock for the whole run, hashing included, and the runtime loader
must never wait for one), yet see one state: `read_consistently` runs a reader's listing and opening, and
runs it again when the directory changed meanwhile. Why that is enough: gguf-split never changes a file in
place (shared files are named after their content, adaptors and links are replaced by atomic renames, the
commit journal says what a half-done commit leads to), so a reader that has *opened* every file of a
state holds a consistent snapshot, whatever happens next; the only race is between listing a directory
and opening what it lists. The directory's entries (names and inode numbers, the journal's included) are
compared before and after: unchanged means no commit touched it in between, so what was opened is the
state that was listed. A failure in a directory that changed meanwhile (a file removed between the listing
and the open, say) is retried; one in a directory that did not change is real, and raised at once.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..disk.commit import pending_view
from ..errors import GGUFSplitError
from ..format.names import JOURNAL, is_temp, show
from ..format.records import ROLE_ADAPTOR, ROLE_SHARED, AdaptorInfo, FileRef, NotASplitFile, SharedInfo, SplitFile

SHARED_OPTION = "-s/--shared"


def looks_like_split_name(name: str) -> bool:
    """A name of gguf-split's form (what a damaged file of the split, or a link to a deleted one, is called)."""
    return any(part in name for part in ("adaptor-", "foundation", "shared-", "hole-"))


T = TypeVar("T")
READ_TRIES = 10  # a writer's commit lasts milliseconds; its next one comes after hashing and writing


def _entries(directories: Sequence[str]) -> tuple[tuple[str, ...] | None, ...]:
    """The entries of each directory that make its state: GGUF files and links (name and inode: a file
    replaced by a rename changes its inode) and the commit journal; temporaries left out (writing them
    changes no state), and so is whatever else a user keeps there."""
    out: list[tuple[str, ...] | None] = []
    for d in directories:
        try:
            with os.scandir(d) as it:
                out.append(tuple(sorted(f"{e.name}\0{e.inode()}" for e in it
                                        if e.name == JOURNAL or (e.name.endswith(".gguf") and not is_temp(e.name)))))
        except OSError:
            out.append(None)
    return tuple(out)


def read_consistently(directories: Iterable[str | os.PathLike[str]], attempt: Callable[[], T],
                      discard: Callable[[T], None] | None = None) -> T:
    """`attempt()` (list a split directory and open what it needs) as of one state of `directories`: run
    again while a commit changes them meanwhile (`discard` releases a result taken while they changed).
    A failure while nothing changed is tried once more and then raised: it is about the files, not about a
    race. (Once more, because a file deleted and made again between the two listings can look unchanged:
    file systems such as ext4 give the new file the inode number the old one freed. A file the reader holds
    open keeps its inode, so a read that succeeded cannot be fooled that way.)"""
    dirs = list(dict.fromkeys(os.fspath(d) for d in directories))
    failed_unchanged = False
    for n in range(READ_TRIES):
        before = _entries(dirs)
        try:
            result = attempt()
        except (GGUFSplitError, OSError):
            unchanged = _entries(dirs) == before
            if n + 1 == READ_TRIES or (unchanged and failed_unchanged):
                raise
            failed_unchanged = failed_unchanged or unchanged
        else:
            if _entries(dirs) == before:
                return result
            if discard is not None:
                discard(result)
        time.sleep(min(0.2, 0.002 * 2 ** n))
    raise GGUFSplitError(show(dirs[0]) if dirs else None, "kept changing while it was read (another process "
                                                          "writes to it without end?): try again")


def directory_of(path: str | os.PathLike[str]) -> str:
    """The directory whose state a path argument reads: itself, or the one holding the file."""
    p = os.fspath(path)
    return p if os.path.isdir(p) else (os.path.dirname(p) or ".")


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
        """The split as of one state of the directory (`read_consistently`)."""
        d = os.fspath(directory)
        return read_consistently([d], lambda: cls.read_once(d))

    @classmethod
    def read_once(cls, d: str) -> "SplitDir":
        """One listing, not retried: for a caller that holds the directory's lock, or retries around it."""
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
                if looks_like_split_name(name):
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

    def name_of(self, path: str) -> str:
        """A file's name in the split (its final name, even while a pending commit holds it under a temporary)."""
        return self.names.get(path, os.path.basename(path))

    def task_file_names(self, task: str) -> list[str]:
        """The names of a task's files in llama.cpp order (its adaptor, then positions 1..k), from its records."""
        path = self.adaptor(task)
        with SplitFile(path) as ad:
            return [self.name_of(path), *(ref.name for ref in AdaptorInfo.read(ad).files)]

    def file_names(self) -> set[str]:
        """The names of every gguf-split file of the directory (adaptors and shared files, used or not)."""
        return {self.name_of(p) for p in self.adaptors.values()} | set(self.shared)

    def adaptor(self, task: str) -> str:
        try:
            return self.adaptors[task]
        except KeyError:
            have = ", ".join(self.tasks) or "none"
            raise GGUFSplitError(show(self.directory), f"holds no task {task!r} (tasks: {have})") from None

    def require_split(self, hint: str = "") -> None:
        """Refuse a directory without a task; `hint` says what to do instead (e.g. start a split)."""
        if not self.adaptors:
            if any(os.path.basename(p) == "foundation.gguf" for p in self.other):
                hint = " (a split of gguf-split 0.1? see README: layout 1)"
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
        self._beside: dict[str, str] = {}  # adaptor path -> its directory (absolute)
        self.stats: dict[str, os.stat_result] = {}  # path found -> its stat when found (the loader maps it next)

    def _in_dir(self, directory: str, name: str) -> str | None:
        view = self._views.get(directory)
        if view is None:
            view = self._views[directory] = pending_view(directory) if os.path.isdir(directory) else {}
        if name in view:
            actual = view[name]
            return os.path.join(directory, actual) if actual is not None else None
        p = os.path.join(directory, name)
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        self.stats[p] = st
        return p

    def find(self, ref: FileRef, adaptor: AdaptorInfo) -> str:
        if ref.name in self.files:
            return self.files[ref.name]
        for d in self.dirs:
            p = self._in_dir(d, ref.name)
            if p is not None:
                return p
        beside = self._beside.get(adaptor.path)
        if beside is None:
            beside = self._beside[adaptor.path] = os.path.dirname(os.path.abspath(adaptor.path))
        p = self._in_dir(beside, ref.name)
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
    return f.remembered("shared", SharedInfo.read)  # read from the header's bytes: once per remembered header


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


@dataclass
class OpenTasks:
    """Tasks of a split directory listed and opened as of one state (`open_tasks`): each task's files are
    open, so they stay readable whatever a later commit renames or deletes. Shared files are opened once."""

    split: SplitDir
    tasks: dict[str, TaskFiles]  # in task order
    cache: dict[str, SplitFile]  # absolute path -> open shared file

    def paths(self, task: str) -> list[str]:
        """The task's files in llama.cpp order (absolute), each under its final name: a file a pending commit
        still holds under a temporary name is given the name the commit gives it (what a link must name)."""
        tf = self.tasks[task]
        names = [self.split.name_of(tf.adaptor.path), *(ref.name for ref in tf.info.files)]
        return [os.path.join(os.path.dirname(p), name) if is_temp(os.path.basename(p)) else p
                for p, name in zip(tf.paths(), names)]

    def close(self) -> None:
        for tf in self.tasks.values():
            tf.adaptor.close()
        for f in self.cache.values():
            f.close()

    def __enter__(self) -> "OpenTasks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tasks(directory: str | os.PathLike[str], tasks: Iterable[str] | None = None, *,
               shared: Sequence[str | os.PathLike[str]] = ()) -> OpenTasks:
    """Open `tasks` (default: every task; the directory must hold a split) of a split directory, checked
    as `open_task` checks them, as of one state of the directory (`read_consistently`)."""
    d = os.fspath(directory)
    wanted = None if tasks is None else list(tasks)

    def attempt() -> OpenTasks:
        sd = SplitDir.read_once(d)
        if wanted is None:
            sd.require_split()
        finder = FileFinder(shared)
        out = OpenTasks(sd, {}, {})
        try:
            for task in (sd.tasks if wanted is None else wanted):
                out.tasks[task] = open_task(sd.adaptor(task), finder, cache=out.cache)
        except BaseException:
            out.close()
            raise
        return out

    return read_consistently([d], attempt, OpenTasks.close)


def resolve_tasks(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[SplitDir]]:
    """verify/info arguments: split directories and/or adaptor files -> (adaptor paths, split directories)."""
    adaptors: list[str] = []
    dirs: list[SplitDir] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            sd = SplitDir.read_once(p)
            sd.require_split()
            adaptors += [sd.adaptors[t] for t in sd.tasks]
            dirs.append(sd)
        else:
            with SplitFile(p) as f:
                if f.role == ROLE_SHARED:
                    raise GGUFSplitError(show(p), "is a shared file: give the adaptors (or the split directory) "
                                                  "that use it")
                f.require(ROLE_ADAPTOR)
            adaptors.append(p)
    return adaptors, dirs
