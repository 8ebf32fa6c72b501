"""Runtime loader: a task = its adaptor overlaid on its shared files, zero-copy.

    import gguf_split
    with gguf_split.open_split("out") as split:          # a split directory
        model = split.load("chat")                       # a task name (a str is always a task name)
        model.metadata["general.name"]                   # decoded on first use; GGUF types kept (.field())
        t = model.tensors["blk.0.attn_q.weight"]         # name, ggml type, shape, read-only mmap view
        t.to_numpy()                                     # dequantized float32 (gguf's quants)
        model.swap("code")                               # maps only the files `code` adds
        model.llama_cpp_paths()                          # the list for llama_model_load_from_splits

What it promises, and how:
- Zero-copy: opening and swapping read headers only; tensor bytes are views of read-only mmaps, paged in
  by the OS when first touched. Each file is mapped once per process (a registry keyed by device and
  inode, holding weak references): every task that uses a shared file reuses its mapping, and a mapping
  goes away when no task (and no view a caller holds) uses it any more, so `swap` maps only what the new
  task adds and unmaps what nothing uses, and loading and swapping 10,000 times keeps memory flat.
- Cost independent of model size: gguf-split writes its records first in every file, with a header index,
  so opening an adaptor reads its records and tensor infos and jumps over the tokenizer arrays; its seal
  (xxh3-128 of the header) is checked on every load (~1.5 ms for Gemma-3's 7 MB header): an edited header
  is refused, as `verify` refuses it. Shared files are checked against what the adaptor recorded.
- Names: `load("x")` takes a task name, always, found beside the path the split was opened with;
  a file is given as a `pathlib.Path` (or any os.PathLike): `load(Path("elsewhere/adaptor-x.gguf"))`.
- Threads: reads are safe from several threads; `swap` is atomic for readers (a lookup sees the old task
  or the new one, never a mix).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGUFValueType

from .errors import GGUFSplitError
from .gguf_format import KV, GGUFFile, TensorInfo, decode_value, parse_tensor_infos, to_numpy, type_name
from .naming import JOURNAL, adaptor_name, check_task_name, show
from .records import K_SRC_TENSOR_INFOS, ROLE_ADAPTOR, AdaptorInfo, SplitFile
from .splitdir import FileFinder, SplitDir, check_shared

__all__ = ["Split", "Foundation", "Model", "TaskModel", "Tensor", "Field", "Metadata", "open_model", "open_split"]


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor: GGUF shape order (ne0 first); `data` is a read-only view of the mapped file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: memoryview
    file: str  # the file its bytes live in

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_numpy(self) -> Any:
        """float32 array in numpy order (reversed shape), dequantized through gguf's quants."""
        return to_numpy(self.data, self.ggml_type, self.shape)


@dataclass(frozen=True, slots=True)
class Field:
    """A metadata value with its GGUF types (`subtype` is the element type of an array)."""

    key: str
    type: GGUFValueType
    subtype: GGUFValueType | None
    count: int
    value: Any


class Metadata(Mapping[str, Any]):
    """The model's KV metadata; a value is bounds-checked and decoded the first time it is asked for."""

    def __init__(self, file: GGUFFile, keys: list[str], lookup: Callable[[str], KV]) -> None:
        self._file = file
        self._keys = keys  # in file order
        self._key_set = set(keys)
        self._lookup = lookup  # key -> its checked KV record
        self._cache: dict[str, Field] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, file: GGUFFile) -> "Metadata":
        """A plain GGUF's metadata (its header was checked in full) or a gguf-split file's original KVs
        (each checked when first asked for)."""
        if isinstance(file, SplitFile):
            return cls(file, list(file.tail), file.tail_kv)
        return cls(file, [kv.key for kv in file.header.kvs], file.header.kv_by_key.__getitem__)

    def field(self, key: str) -> Field:
        got = self._cache.get(key)
        if got is not None:
            return got
        if key not in self:
            raise KeyError(key)
        kv = self._lookup(key)
        value = decode_value(self._file.mm, kv.vtype, kv.value_start)[0]
        got = Field(key, kv.vtype, kv.subtype, kv.count, value)
        with self._lock:
            self._cache[key] = got
        return got

    def value_type(self, key: str) -> GGUFValueType:
        return self.field(key).type

    def __getitem__(self, key: str) -> Any:
        return self.field(key).value

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set


def _view(f: GGUFFile, t: TensorInfo) -> memoryview:
    try:
        return f.tensor_view(t)
    except ValueError:  # closed by another thread between the check and the view
        raise GGUFSplitError(f.path, "file is closed") from None


class _Tensors(Mapping[str, Tensor]):
    """name -> Tensor over one or more files; views made on first use."""

    def __init__(self, files: Sequence[GGUFFile], order: Callable[[], list[str]] | None = None) -> None:
        self._index: dict[str, tuple[GGUFFile, TensorInfo]] = {}
        for f in files:
            for t in f.header.tensors:
                self._index[t.name] = (f, t)
        self._order = order
        self._names: list[str] | None = None
        self._cache: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        got = self._cache.get(name)
        if got is None:
            f, t = self._index[name]
            got = Tensor(t.name, t.ggml_type, t.shape, _view(f, t), f.path)
            self._cache[name] = got  # a racing thread may build an equal Tensor: harmless
        return got

    def info(self, name: str) -> TensorInfo:
        return self._index[name][1]

    def __iter__(self) -> Iterator[str]:
        if self._names is None:
            self._names = self._order() if self._order is not None else list(self._index)
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index


class Model:
    """A model's metadata and tensors. `open_model(path)` gives one for any GGUF file."""

    def __init__(self, file: GGUFFile) -> None:
        self._file = file
        self.path = file.path
        self.metadata = Metadata.of(file)
        self.tensors: Mapping[str, Tensor] = _Tensors([file])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | os.PathLike[str]) -> Model:
    """Open any GGUF file (a plain model) with the same zero-copy API; the header is parsed in full."""
    return Model(GGUFFile(path))


# ---------------------------------------------------------------------------------------------------------
# Shared mappings


class _Mapped:
    """One mapping of a gguf-split file, shared by every task in this process that uses it. Released (the
    map closed) when the last reference goes."""

    _registry: "weakref.WeakValueDictionary[tuple[int, int], _Mapped]" = weakref.WeakValueDictionary()
    _lock = threading.Lock()

    def __init__(self, file: SplitFile) -> None:
        self.file = file
        weakref.finalize(self, file.close)

    @classmethod
    def get(cls, path: str, check: Callable[[SplitFile], None]) -> "_Mapped":
        try:
            st = os.stat(path)
        except (OSError, ValueError) as e:
            raise GGUFSplitError(show(path), f"cannot open: {getattr(e, 'strerror', None) or e}") from None
        key = (st.st_dev, st.st_ino)
        with cls._lock:
            got = cls._registry.get(key)
            if got is not None and got.file.size == st.st_size:
                return got
        f = SplitFile(path, keep_fd=False)
        try:
            check(f)
        except BaseException:
            f.close()
            raise
        with cls._lock:
            got = cls._registry.get(f.identity)
            if got is None:
                got = cls(f)
                cls._registry[f.identity] = got
            else:
                f.close()
            return got

    @classmethod
    def count(cls) -> int:
        """Files mapped by the loader in this process (for tests and benchmarks)."""
        return len(cls._registry)


class _Overlay:
    """One task: its adaptor and shared files; everything a TaskModel swaps at once."""

    def __init__(self, adaptor_path: str, finder: FileFinder) -> None:
        ad = SplitFile(adaptor_path, keep_fd=False)
        try:
            ad.check_seal()
            info = AdaptorInfo.read(ad)
            shared = [_Mapped.get(finder.find(ref, info), lambda f, ref=ref: check_shared(f, ref, info))
                      for ref in info.files]
            files: list[GGUFFile] = [ad, *(m.file for m in shared)]
            n = sum(len(f.header.tensors) for f in files)
            tensors = _Tensors(files, lambda: self._model_order(ad, info, tensors))
            if len(tensors) != n or n != info.n_model_tensors:
                raise GGUFSplitError(ad.path, f"its files hold {n} tensors ({len(tensors)} distinct), the task has "
                                              f"{info.n_model_tensors}: a file of another split?")
        except BaseException:
            ad.close()
            raise
        self.adaptor = ad
        self.info = info
        self.shared = shared  # strong references: the mappings live as long as this overlay
        self.metadata = Metadata.of(ad)
        self.tensors = tensors
        weakref.finalize(self, ad.close)

    @staticmethod
    def _model_order(ad: SplitFile, info: AdaptorInfo, held: "_Tensors") -> list[str]:
        infos = parse_tensor_infos(ad.blob(K_SRC_TENSOR_INFOS), ad.path, 1)
        names = [t.name for t in infos]
        # the order comes from a record: it must name exactly the tensors the files hold (a forged record
        # that passes the seal must not make iteration yield names the mapping does not have)
        if len(names) != len(held) or len(set(names)) != len(names) or any(n not in held for n in names):
            raise GGUFSplitError(ad.path, "its record of the model's tensors does not match the task's files: "
                                          "damaged")
        return names

    def paths(self) -> list[str]:
        return [os.path.abspath(self.adaptor.path), *(os.path.abspath(m.file.path) for m in self.shared)]


class TaskModel:
    """A task: its adaptor's metadata, and its tensors from the adaptor and its shared files."""

    def __init__(self, split: "Split", adaptor_path: str) -> None:
        self.split = split
        self._lock = threading.Lock()
        self._overlay: _Overlay | None = _Overlay(adaptor_path, split.finder)

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
        return self._current.adaptor.path

    @property
    def metadata(self) -> Metadata:
        return self._current.metadata

    @property
    def tensors(self) -> Mapping[str, Tensor]:
        return self._current.tensors

    @property
    def files(self) -> list[str]:
        """The task's files: adaptor, then its shared files in position order."""
        return self._current.paths()

    def swap(self, task: str | os.PathLike[str]) -> None:
        """Become another task of the split: files both tasks use stay mapped; the others are unmapped when
        nothing uses them any more."""
        new = _Overlay(self.split.adaptor_path(task), self.split.finder)
        with self._lock:
            if self._overlay is None:
                raise GGUFSplitError(None, "task model is closed")
            self._overlay = new
        # The old overlay is not closed here: a reader may be inside a lookup on it (it took
        # `model.tensors` before this swap). It is unmapped when its last reference goes.

    def llama_cpp_paths(self) -> list[str]:
        """The split list for llama.cpp's `llama_model_load_from_splits`: adaptor first, then positions 1..k."""
        return self.files

    def close(self) -> None:
        with self._lock:
            self._overlay = None

    def __enter__(self) -> "TaskModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Split:
    """A split directory opened for loading: `load(task)` gives a TaskModel."""

    def __init__(self, directory: str, shared: Sequence[str | os.PathLike[str]] = ()) -> None:
        self.directory = directory
        self.finder = FileFinder(shared)
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

    def adaptor_path(self, task: str | os.PathLike[str]) -> str:
        """A task name (a str, always) resolved in the split directory; an os.PathLike is an adaptor file."""
        if self._closed:
            raise GGUFSplitError(show(self.directory), "split is closed")
        if isinstance(task, str):
            try:
                check_task_name(task)
            except GGUFSplitError as e:
                hint = " (to load a file, pass a pathlib.Path)" if os.sep in task or task.endswith(".gguf") else ""
                raise GGUFSplitError(None, e.problem + hint) from None
            by_name = os.path.join(self.directory, adaptor_name(task))
            # the fast path by name only when no killed run's commit is pending (SplitDir honours it)
            if os.path.isfile(by_name) and not os.path.lexists(os.path.join(self.directory, JOURNAL)):
                with SplitFile(by_name) as f:
                    if f.role == ROLE_ADAPTOR and f.get("gguf_split.task") == task:
                        return by_name
            return SplitDir.open(self.directory).adaptor(task)
        if isinstance(task, os.PathLike):
            return os.fspath(task)
        raise TypeError(f"task must be a task name (str) or a path (os.PathLike), not {type(task).__name__}")

    def load(self, task: str | os.PathLike[str]) -> TaskModel:
        model = TaskModel(self, self.adaptor_path(task))
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
