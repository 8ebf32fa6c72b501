"""Runtime loader: a task = its adaptor overlaid on the shared foundation, zero-copy.

    from gguf_split import Foundation
    with Foundation.open("out/foundation.gguf") as fnd:
        model = fnd.load("chat")                      # or a path: fnd.load("out/adaptor-chat.gguf")
        model.metadata["general.name"]                # decoded on first use; GGUF types kept (.field())
        t = model.tensors["blk.0.attn_q.weight"]      # name, ggml type, shape, read-only mmap view
        t.to_numpy()                                  # dequantized float32 (gguf's quants)
        model.swap("code")                            # foundation stays mapped; only the adaptor changes
        model.llama_cpp_paths()                       # [adaptor, foundation] for llama_model_load_from_splits

What it promises, and how:
- Zero-copy: opening and swapping read headers only; tensor bytes are views of read-only mmaps, paged in
  by the OS when first touched. A foundation file is mapped once per process (a registry keyed by device
  and inode), however many `Foundation.open` calls and tasks use it.
- Cost independent of model size: gguf-split writes its own records first in every file, including a
  header index (offsets of the tensor infos, the data and every KV), so opening an adaptor reads its ~20
  records and its tensor infos and jumps over the tokenizer arrays; metadata values are decoded (and
  bounds-checked) only when asked for.
- Safety: an adaptor whose recorded foundation identity differs from the open foundation is refused;
  missing, truncated or hostile files raise `GGUFSplitError` naming the file, as the CLI reports.
- Threads: reads are safe from several threads; `swap` is atomic for readers (a lookup sees the old task
  or the new one, never a mix). `close()` (or leaving `with`) releases the maps; views still held by the
  caller keep their map alive until they are dropped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGUFValueType

from .errors import GGUFSplitError
from .gguf_format import (
    KV,
    GGUFFile,
    Header,
    TensorInfo,
    decode_value,
    parse_tensor_infos,
    to_numpy,
    type_name,
)
from .layout import (
    I32,
    K_FOUNDATION_ID,
    K_SPLIT_TENSORS,
    K_SRC_TENSOR_INFOS,
    K_TASK,
    ROLE_ADAPTOR,
    ROLE_FOUNDATION,
    STR,
    SplitFile,
    blob,
    record,
    require_role,
)

__all__ = ["Foundation", "Model", "TaskModel", "Tensor", "Field", "Metadata", "open_model"]


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor: GGUF shape order (ne0 first); `data` is a read-only view of the mapped file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: memoryview
    file: str  # the file its bytes live in (adaptor or foundation)

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


class _Tensors(Mapping[str, Tensor]):
    """name -> Tensor over one or two files (adaptor first, then foundation); views made on first use."""

    def __init__(self, sources: list[tuple[GGUFFile, Header]], order: "_Order") -> None:
        self._index: dict[str, tuple[GGUFFile, Header, TensorInfo]] = {}
        for f, h in reversed(sources):  # adaptor entries win
            for t in h.tensors:
                self._index[t.name] = (f, h, t)
        self._order = order
        self._cache: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        got = self._cache.get(name)
        if got is None:
            f, h, t = self._index[name]
            got = Tensor(t.name, t.ggml_type, t.shape, _view(f, t, h.data_start), f.path)
            self._cache[name] = got  # a racing thread may build an equal Tensor: harmless
        return got

    def info(self, name: str) -> TensorInfo:
        return self._index[name][2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order.names(self._index))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index


class _Order:
    """The original model's tensor order, parsed from the adaptor's restore record on first iteration."""

    def __init__(self, file: GGUFFile | None) -> None:
        self._file = file
        self._names: list[str] | None = None

    def names(self, index: Mapping[str, Any]) -> list[str]:
        if self._names is None:
            if self._file is None:
                self._names = list(index)
            else:
                infos = parse_tensor_infos(blob(self._file, K_SRC_TENSOR_INFOS), self._file.path, 1)
                self._names = [t.name for t in infos if t.name in index]
        return self._names


class Model:
    """A model's metadata and tensors. `open_model(path)` gives one for any GGUF file."""

    def __init__(self, file: GGUFFile) -> None:
        self._file = file
        h = file.header
        self.path = file.path
        self.metadata = Metadata.of(file)
        self.tensors: Mapping[str, Tensor] = _Tensors([(file, h)], _Order(None))

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
# gguf-split files through their header index


def _view(f: GGUFFile, t: TensorInfo, data_start: int) -> memoryview:
    try:
        return f.tensor_view(t, data_start)
    except ValueError:  # closed by another thread between the check and the view
        raise GGUFSplitError(f.path, "file is closed") from None


class _SharedFoundation:
    """One mapping of a foundation file, shared by every `Foundation` handle on it in this process."""

    registry: dict[tuple[int, int], "_SharedFoundation"] = {}
    lock = threading.Lock()

    def __init__(self, file: GGUFFile) -> None:
        self.file = file
        self.refs = 0
        require_role(file, ROLE_FOUNDATION)
        self.id = str(record(file, K_FOUNDATION_ID, STR))
        self.tensors = _Tensors([(file, file.header)], _Order(None))

    @classmethod
    def acquire(cls, path: str | os.PathLike[str]) -> "_SharedFoundation":
        try:
            st = os.stat(path)
        except (OSError, ValueError) as e:
            raise GGUFSplitError(path, f"cannot open: {getattr(e, 'strerror', None) or e}") from None
        with cls.lock:
            shared = cls.registry.get((st.st_dev, st.st_ino))
            if shared is None:
                f = SplitFile(path, keep_fd=False)
                try:
                    shared = cls(f)
                except BaseException:
                    f.close()
                    raise
                cls.registry[f.identity] = shared
            shared.refs += 1
            return shared

    def release(self) -> None:
        with self.lock:
            self.refs -= 1
            if self.refs == 0:
                self.registry.pop(self.file.identity, None)
                self.file.close()


class Foundation:
    """A foundation file, mapped once per process; `load()` overlays a task on it."""

    def __init__(self, shared: _SharedFoundation) -> None:
        self._shared: _SharedFoundation | None = shared
        self.path = shared.file.path
        self.id = shared.id
        self._models: list[TaskModel] = []

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "Foundation":
        return cls(_SharedFoundation.acquire(path))

    @property
    def shared(self) -> _SharedFoundation:
        if self._shared is None:
            raise GGUFSplitError(self.path, "foundation is closed")
        return self._shared

    @property
    def tensors(self) -> Mapping[str, Tensor]:
        """The shared tensors (every task has them)."""
        return self.shared.tensors

    def adaptor_path(self, task_or_path: str | os.PathLike[str]) -> str:
        """A path as given, or a task name resolved beside the foundation (same file-name prefix)."""
        p = os.fspath(task_or_path)
        if os.sep in p or p.endswith(".gguf"):
            return p
        directory, name = os.path.split(self.path)
        prefix = name[: -len("foundation.gguf")] if name.endswith("foundation.gguf") else ""
        return os.path.join(directory, f"{prefix}adaptor-{p}.gguf")

    def tasks(self) -> list[str]:
        """Task names of the adaptors beside this foundation (by file name; not opened)."""
        directory, name = os.path.split(self.path)
        prefix = (name[: -len("foundation.gguf")] if name.endswith("foundation.gguf") else "") + "adaptor-"
        return sorted(n[len(prefix) : -5] for n in os.listdir(directory or ".")
                      if n.startswith(prefix) and n.endswith(".gguf"))

    def load(self, task_or_path: str | os.PathLike[str]) -> "TaskModel":
        model = TaskModel(self, self.adaptor_path(task_or_path))
        self._models.append(model)
        return model

    def close(self) -> None:
        for m in self._models:
            m.close()
        self._models.clear()
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.release()

    def __enter__(self) -> "Foundation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Overlay:
    """One adaptor over the foundation: everything a TaskModel swaps at once."""

    def __init__(self, foundation: Foundation, path: str) -> None:
        f = SplitFile(path, keep_fd=False)
        try:
            require_role(f, ROLE_ADAPTOR)
            want = str(record(f, K_FOUNDATION_ID, STR))
            if want != foundation.id:
                raise GGUFSplitError(f.path, f"belongs to foundation {want}, but {foundation.path} is foundation "
                                             f"{foundation.id} (an adaptor from another split?)")
            fnd = foundation.shared.file
            clash = next((t.name for t in f.header.tensors if t.name in fnd.header.tensor_by_name), None)
            if clash is not None:
                raise GGUFSplitError(f.path, f"tensor {clash!r} is in both this adaptor and the foundation: damaged")
            self.metadata = Metadata.of(f)
            expected = record(f, K_SPLIT_TENSORS, I32)
            n = len(f.header.tensors) + len(fnd.header.tensors)
            if expected != n:
                raise GGUFSplitError(f.path, f"adaptor + foundation hold {n} tensors, the task has {expected}: damaged")
            self.task = str(record(f, K_TASK, STR))
            self.file = f
            self.tensors = _Tensors([(f, f.header), (fnd, fnd.header)], _Order(f))
        except BaseException:
            f.close()
            raise


class TaskModel:
    """A task: its adaptor's metadata and tensors over the shared foundation's tensors."""

    def __init__(self, foundation: Foundation, adaptor: str) -> None:
        self.foundation = foundation
        self._lock = threading.Lock()
        self._overlay: _Overlay | None = _Overlay(foundation, adaptor)

    @property
    def _current(self) -> _Overlay:
        o = self._overlay
        if o is None:
            raise GGUFSplitError(None, "task model is closed")
        return o

    @property
    def task(self) -> str:
        return self._current.task

    @property
    def adaptor_path(self) -> str:
        return self._current.file.path

    @property
    def metadata(self) -> Metadata:
        return self._current.metadata

    @property
    def tensors(self) -> Mapping[str, Tensor]:
        return self._current.tensors

    def swap(self, task_or_path: str | os.PathLike[str]) -> None:
        """Replace the adaptor (another task of the same foundation); the foundation stays mapped."""
        new = _Overlay(self.foundation, self.foundation.adaptor_path(task_or_path))
        with self._lock:
            if self._overlay is None:
                new.file.close()
                raise GGUFSplitError(None, "task model is closed")
            self._overlay = new
        # The old adaptor is not closed here: a reader may be inside a lookup on it (it took
        # `model.tensors` before this swap). It is unmapped when its last reference goes.

    def llama_cpp_paths(self) -> list[str]:
        """[adaptor, foundation]: the split list for llama.cpp's `llama_model_load_from_splits`."""
        return [os.path.abspath(self.adaptor_path), os.path.abspath(self.foundation.path)]

    def close(self) -> None:
        with self._lock:
            old, self._overlay = self._overlay, None
        if old is not None:
            old.file.close()

    def __enter__(self) -> "TaskModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
