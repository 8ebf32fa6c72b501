"""Runtime loader: a task = its adaptor overlaid on its shared files, zero-copy.

    import gguf_split
    from pathlib import Path
    with gguf_split.open_split("out") as split:          # a split directory (or any file in it)
        model = split.load("chat")                       # a task name: a str is always a task name
        model.metadata["general.name"]                   # decoded on first use; GGUF types kept (.field())
        t = model.tensors["blk.0.attn_q.weight"]         # name, ggml type, shape, read-only mmap view
        t.to_numpy()                                     # dequantized float32 (gguf's quants)
        model.swap("code")                               # maps only the files `code` adds
        model.llama_cpp_paths()                          # the list for llama_model_load_from_splits
        other = split.load(Path("elsewhere/adaptor-x.gguf"))   # a file: an os.PathLike, never a str

What it promises, and how:
- Zero-copy: opening and swapping read headers only; tensor bytes are views of read-only mmaps, paged in
  by the OS when first touched.
- Each file is mapped once per process, adaptors and shared files alike: a registry keyed by device and
  inode (whatever path reaches the file: another directory of hard links, a bind mount, a symlink) holds
  weak references, so every task that uses a file reuses its mapping, and a mapping goes away as soon as
  no task, no `model.tensors` / `model.metadata` a reader took, and no view a caller holds uses it any
  more (reference counting: no garbage collection needed). `swap` maps only what the new task adds and
  unmaps what nothing uses; loading and swapping 10,000 times keeps memory flat. A file changed on disk
  (size, mtime or ctime: an edit with its mtime put back still changes the ctime) is mapped anew.
- Paths are the ones the task was reached by: tasks are found beside the path the split was opened with,
  a task's shared files beside its adaptor (or where `shared=` points), and `files`, `llama_cpp_paths()`
  and `Tensor.file` report those paths (absolute, symlinks kept), never the path another task mapped the
  same inode by.
- Checks: an adaptor's seal (xxh3-128 of its header) is checked on every load and swap (~1.5 ms for
  Gemma-3's 7 MB header): an edited header is refused, as `verify` refuses it. A shared file's seal and
  records are checked when it is mapped, and every load compares them with what its adaptor recorded
  (content id, position, size), whether the file was already mapped or not. A shared file mapped again
  (after every task let go of it) whose size and header bytes equal those this process checked before
  (compared in full: records.HeaderMemo) takes that parse and those checks instead of redoing them: a
  task of the default cut has up to 33 files, and parsing and checking them was most of its load. Tensor data is not hashed
  (that is `verify`'s job): opening stays independent of model size.
- Cost independent of model size: gguf-split writes its records first in every file, with a header index,
  so opening an adaptor reads its records and tensor infos and jumps over the tokenizer arrays.
- Names, one rule: a `str` is always a task name (never a path, even if a file of that name exists); it
  is looked up as `adaptor-<task>.gguf` beside the opened path, then by the adaptors' records (a prefixed
  split). A file is given as an os.PathLike (`pathlib.Path`); bytes and other types are a TypeError. So a
  task named `x.gguf` loads by name, and `load("out/adaptor-x.gguf")` is refused with a hint to pass a Path.
- Threads: reads are safe from several threads; `swap` is atomic for readers (a lookup sees the old task
  or the new one, never a mix); a failed load or swap changes nothing.
- Other processes: no lock is taken, ever. A load or swap maps a task's files as of one state of the
  directory (splitdir.read_consistently: read again if a commit changed the directory meanwhile); once
  mapped, a task stays whole whatever `add`, `remove` or a re-split do next (files are never changed in
  place: a deleted or replaced file stays mapped until the task lets go).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import GGUFSplitError
from ..format.gguf import parse_tensor_infos
from ..format.model import Field, Metadata, Model, Tensor, _renamed, _Tensors, open_model
from ..format.names import adaptor_name, check_task_name, show
from ..disk.commit import pending_view
from ..format.records import K_SRC_TENSOR_INFOS, K_TASK, ROLE_ADAPTOR, AdaptorInfo, HeaderMemo, SharedInfo, SplitFile
from ..splitdir.directory import FileFinder, SplitDir, directory_of, match_shared, read_consistently, read_shared

if TYPE_CHECKING:  # imported by the first apply_lora (TaskModel._lora_set), never by a load
    from ..lora.adapter import LoraAdapter
    from ..lora.overlay import LoraSet

__all__ = ["Split", "Foundation", "Model", "TaskModel", "Tensor", "Field", "Metadata", "open_model", "open_split"]


# ---------------------------------------------------------------------------------------------------------
# Shared mappings


HEADERS = HeaderMemo()  # shared files' headers, parsed and checked once per process while their bytes stay the same


class _Mapped:
    """One mapping of a gguf-split file (an adaptor or a shared file), shared by every task in this process
    that uses it, whatever path reached it. Closed when the last reference goes (views a caller still
    holds keep the map itself alive until they go too).

    The registry maps (device, inode) to a weak reference whose callback, run once the mapping is
    unreachable (the reference already dead: no lookup can revive it), removes the entry and closes the
    file: a plain dict and one weakref per file, where a WeakValueDictionary plus weakref.finalize cost
    ~5 us per file on every load. The lock is reentrant: a callback can run in a thread that holds it."""

    _registry: "dict[tuple[int, int], weakref.ref[_Mapped]]" = {}
    _lock = threading.RLock()

    def __init__(self, file: SplitFile, stamp: tuple[int, int, int] | None) -> None:
        self.file = file
        self.stamp = stamp  # (size, mtime, ctime) when mapped; None: never reused
        self.shared: SharedInfo | None = None  # its records, once checked as a shared file

    @classmethod
    def _lookup(cls, key: tuple[int, int]) -> "_Mapped | None":
        ref = cls._registry.get(key)
        return ref() if ref is not None else None

    @classmethod
    def _register(cls, key: tuple[int, int], mapped: "_Mapped") -> None:
        """Under the lock. A stale mapping this replaces stays with the tasks that use it (its map goes with it)."""
        cls._registry[key] = weakref.ref(mapped, partial(_Mapped._released, key, mapped.file))

    @classmethod
    def _released(cls, key: tuple[int, int], file: SplitFile, ref: "weakref.ref[_Mapped]") -> None:
        with cls._lock:
            if cls._registry.get(key) is ref:
                del cls._registry[key]
        file.close()

    @classmethod
    def get(cls, path: str, st: os.stat_result | None = None, *, shared: bool = False) -> "_Mapped":
        """The mapping of the file at `path`: the one this process has, unless the file changed since. `st`:
        the file's stat if the caller just took it (FileFinder found it). A `shared` file's header is parsed
        and checked once per process while its bytes stay the same (HEADERS)."""
        if st is None:
            try:
                st = os.stat(path)
            except (OSError, ValueError) as e:
                raise GGUFSplitError(show(path), f"cannot open: {getattr(e, 'strerror', None) or e}") from None
        key = (st.st_dev, st.st_ino)
        stamp: tuple[int, int, int] | None = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        got = cls._lookup(key)  # one dict read and a weakref call: atomic, no lock needed to look
        if got is not None and got.stamp == stamp:
            return got
        f = SplitFile(path, keep_fd=False, memo=HEADERS if shared else None)
        if f.identity != key or f.size != st.st_size:
            stamp = None  # replaced between the stat and the open: map it, but never reuse the mapping
        with cls._lock:
            got = cls._lookup(f.identity)
            if got is None or stamp is None or got.stamp != stamp:
                got = cls(f, stamp)
                cls._register(f.identity, got)
                return got
        f.close()  # another thread mapped it meanwhile
        return got

    @classmethod
    def count(cls) -> int:
        """Files mapped by the loader in this process (for tests and benchmarks)."""
        with cls._lock:
            refs = list(cls._registry.values())  # a callback run meanwhile (this thread) may remove an entry
        return sum(1 for ref in refs if ref() is not None)


class _OtherTask(GGUFSplitError):
    """The file named after a task holds another task (or no adaptor): look the task up by its records."""


def _model_order(ad: SplitFile, path: str) -> list[str]:
    """The task's tensor names in the original model's order (from the restore records)."""
    try:
        return [t.name for t in parse_tensor_infos(ad.blob(K_SRC_TENSOR_INFOS), ad.path, 1)]
    except GGUFSplitError as e:
        raise _renamed(e, ad, path) from None


class _Overlay:
    """One task: its adaptor and shared files; everything a TaskModel swaps at once. Holds its mappings;
    `metadata` and `tensors` hold what they read, so a reader that took them outlives a swap."""

    def __init__(self, adaptor_path: str, finder: FileFinder, task: str | None = None) -> None:
        ad = _Mapped.get(adaptor_path)
        f = ad.file
        if task is not None and (f.role != ROLE_ADAPTOR or f.get(K_TASK) != task):
            raise _OtherTask(show(adaptor_path), f"holds no adaptor of task {task!r}")
        try:
            f.check_seal()  # on every load: an edit after the file was mapped is refused too
            info = AdaptorInfo.read(f)
        except GGUFSplitError as e:
            raise _renamed(e, f, adaptor_path) from None
        if info.path != adaptor_path:
            info = replace(info, path=adaptor_path)  # its files are looked up beside the path given
        files: list[tuple[_Mapped, str]] = [(ad, os.path.abspath(adaptor_path))]
        for ref in info.files:
            path = finder.find(ref, info)
            m = _Mapped.get(path, finder.stats.get(path), shared=True)
            try:
                shared = m.shared
                if shared is None:
                    shared = m.shared = read_shared(m.file)
                match_shared(shared, m.file.size, path, ref, info)
            except GGUFSplitError as e:
                raise _renamed(e, m.file, path) from None
            files.append((m, os.path.abspath(path)))
        mapped = tuple(m for m, _ in files)
        tensors = _Tensors([(m.file, p) for m, p in files], partial(_model_order, f, adaptor_path), keep=mapped)
        n = sum(len(m.file.header.tensors) for m in mapped)
        if len(tensors) != n or n != info.n_model_tensors:
            raise GGUFSplitError(show(adaptor_path), f"its files hold {n} tensors ({len(tensors)} distinct), the task "
                                                     f"has {info.n_model_tensors}: a file of another split?")
        self.info = info
        self.paths = [p for _, p in files]
        self.metadata = Metadata.of(f, path=self.paths[0], keep=ad)
        self.tensors = tensors  # holds every mapping of the task (no reference cycle: freed at once)


class TaskModel:
    """A task: its adaptor's metadata, and its tensors from the adaptor and its shared files; optionally
    LoRA adapters on top (`apply_lora`): their A and B stay zero-copy views of the adapter files, and a
    targeted tensor comes back as a `LoraTensor` (the same bytes; `to_numpy(merged=True)` materializes
    base + the active LoRAs); removing them gives back exactly the original Tensor objects.

    The LoRA machinery (gguf_split.lora.overlay and what it imports) is imported when the first adapter
    is applied, not on load: most tasks never take one, and the import was most of a fresh process's
    first load."""

    def __init__(self, split: "Split", overlay: _Overlay) -> None:
        self.split = split
        self._lock = threading.Lock()
        self._overlay: _Overlay | None = overlay
        self._loras: LoraSet | None = None  # made by the first apply_lora

    def _lora_set(self) -> "LoraSet":
        with self._lock:
            if self._loras is None:
                from ..lora.overlay import LoraSet

                self._loras = LoraSet()
            return self._loras

    @property
    def _current(self) -> _Overlay:
        o = self._overlay
        if o is None:
            raise GGUFSplitError(None, "task model is closed")
        return o

    @property
    def task(self) -> str:
        return self._current.info.task

    @property
    def adaptor_path(self) -> str:
        return self._current.paths[0]

    @property
    def metadata(self) -> Metadata:
        return self._current.metadata

    @property
    def tensors(self) -> Mapping[str, Any]:
        """name -> Tensor (a LoraTensor where an active LoRA targets the name)."""
        tensors, loras = self._current.tensors, self._loras
        return tensors if loras is None else loras.wrap(tensors)

    def apply_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> "LoraAdapter":
        """Activate the llama.cpp LoRA adapter at `path` with `scale` (or change an active one's scale).
        Its architecture, target names and shapes are checked against the task (GGUFSplitError naming the
        file); only its header is read: O(adapter), whatever the model's size. Returns the LoraAdapter."""
        return self._lora_set().apply(self._current, path, scale)

    def remove_lora(self, path: str | os.PathLike[str]) -> None:
        """Deactivate an adapter: the task's tensors are again exactly the original views."""
        self._lora_set().discard(path)

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The active adapters, (absolute path, scale), in the order they were applied."""
        loras = self._loras
        return [] if loras is None else loras.active()

    @property
    def files(self) -> list[str]:
        """The task's files (absolute paths as reached, symlinks kept): adaptor, then positions 1..k."""
        return list(self._current.paths)

    def swap(self, task: str | os.PathLike[str]) -> None:
        """Become another task of the split (same naming rule as `Split.load`): files both tasks use stay
        mapped; the others are unmapped as soon as nothing uses them. On failure the task is unchanged."""
        new = self.split._overlay(task)
        if self._loras is not None:
            self._loras.check_against(new)  # active LoRAs stay on only if they fit the new task too
        with self._lock:
            if self._overlay is None:
                raise GGUFSplitError(None, "task model is closed")
            old, self._overlay = self._overlay, new
        # A reader may be inside a lookup on the old overlay (it took `model.tensors` before this swap):
        # dropping our reference unmaps its files only when the last reader lets go too.
        del old

    def llama_cpp_paths(self) -> list[str]:
        """The split list for llama.cpp's `llama_model_load_from_splits`: adaptor first, then positions 1..k."""
        return self.files

    def close(self) -> None:
        with self._lock:
            old, self._overlay = self._overlay, None
        del old

    def __enter__(self) -> "TaskModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PATH_HINT = " (a str is always a task name: to load a file, pass a pathlib.Path)"


class Split:
    """A split directory opened for loading: `load(task)` gives a TaskModel. Keeps no strong reference to
    the models it loaded: a model nothing references is released with its mappings."""

    def __init__(self, directory: str, shared: Sequence[str | os.PathLike[str]] = ()) -> None:
        self.directory = directory
        self._shared = tuple(os.fspath(p) for p in shared)
        FileFinder(self._shared)  # refuse a --shared path that does not exist now, not at the first load
        self._models: "weakref.WeakSet[TaskModel]" = weakref.WeakSet()
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, shared: Sequence[str | os.PathLike[str]] = ()) -> "Split":
        """A split directory, or any file in it (tasks are looked up beside the path as given)."""
        p = os.fspath(path)
        if os.path.isdir(p):
            return cls(p, shared)
        if not os.path.exists(p):
            raise GGUFSplitError(show(p), "no such file or directory")
        return cls(os.path.dirname(p) or ".", shared)

    @property
    def tasks(self) -> list[str]:
        """The tasks of the split (its adaptors, found by their records)."""
        return SplitDir.open(self.directory).tasks

    def _by_name(self, task: str) -> str | None:
        """`adaptor-<task>.gguf` beside the opened path, a pending commit honoured; None if absent."""
        name = adaptor_name(task)
        view = pending_view(self.directory)
        if name in view:
            actual = view[name]
            return os.path.join(self.directory, actual) if actual is not None else None
        path = os.path.join(self.directory, name)
        return path if os.path.isfile(path) else None

    def _by_records(self, task: str) -> str:
        sd = SplitDir.read_once(self.directory)  # the caller retries (read_consistently)
        if task not in sd.adaptors:
            have = ", ".join(sd.tasks) or "none"
            hint = _PATH_HINT if task.endswith(".gguf") else ""
            raise GGUFSplitError(show(self.directory), f"holds no task {task!r} (tasks: {have}){hint}")
        return sd.adaptors[task]

    def _overlay(self, task: str | os.PathLike[str]) -> _Overlay:
        """The task's files, mapped as of one state of the directory (splitdir.read_consistently): a commit
        running meanwhile is retried over, never seen half done; no lock is taken."""
        if self._closed:
            raise GGUFSplitError(show(self.directory), "split is closed")
        if isinstance(task, str):
            try:
                check_task_name(task)
            except GGUFSplitError as e:
                hint = _PATH_HINT if "/" in task or os.sep in task or task.endswith(".gguf") else ""
                raise GGUFSplitError(None, e.problem + hint) from None
            return read_consistently([self.directory], lambda: self._overlay_by_name(task))
        if isinstance(task, os.PathLike):
            path = os.fspath(task)
            if isinstance(path, str):
                return read_consistently([directory_of(path)], lambda: _Overlay(path, FileFinder(self._shared)))
        raise TypeError(f"task must be a task name (str) or a path (os.PathLike), not {type(task).__name__}")

    def _overlay_by_name(self, task: str) -> _Overlay:
        finder = FileFinder(self._shared)  # anew for each load: a commit finished since is seen
        path = self._by_name(task)
        if path is not None:
            try:
                return _Overlay(path, finder, task)
            except _OtherTask:
                pass
        return _Overlay(self._by_records(task), finder, task)

    def adaptor_path(self, task: str | os.PathLike[str]) -> str:
        """The adaptor `load(task)` would open: a task name (a str, always) resolved beside the opened
        path; an os.PathLike is an adaptor file."""
        if isinstance(task, str):
            check_task_name(task)
            return read_consistently([self.directory], lambda: self._adaptor_path(task))
        if isinstance(task, os.PathLike):
            return os.fspath(task)
        raise TypeError(f"task must be a task name (str) or a path (os.PathLike), not {type(task).__name__}")

    def _adaptor_path(self, task: str) -> str:
        path = self._by_name(task)
        if path is not None:
            with SplitFile(path) as f:
                if f.role == ROLE_ADAPTOR and f.get(K_TASK) == task:
                    return path
        return self._by_records(task)

    def load(self, task: str | os.PathLike[str]) -> TaskModel:
        """A task by name (a str, always), or the adaptor file given as an os.PathLike."""
        model = TaskModel(self, self._overlay(task))
        self._models.add(model)
        return model

    def close(self) -> None:
        """Close every task loaded through this split (views a caller still holds keep their map alive)."""
        self._closed = True
        for m in list(self._models):
            m.close()

    def __enter__(self) -> "Split":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_split(path: str | os.PathLike[str], *, shared: Sequence[str | os.PathLike[str]] = ()) -> Split:
    """Open a split directory (or the directory of a file in it) for loading tasks."""
    return Split.open(path, shared=shared)


class Foundation(Split):
    """The 0.1 name of `Split`: `Foundation.open("out/foundation-<id>.gguf")` opens the split beside it."""
