"""Models: any GGUF file's metadata and tensors, zero-copy (`open_model`), and the types every model of
gguf-split hands out (a plain file here, a split's task in loader.py): `Tensor` (a read-only view of the
mapped bytes), `Metadata` (KVs decoded on first use, GGUF types kept), `Field`.

    with gguf_split.open_model("chat.gguf") as m:
        m.metadata["general.architecture"]
        m.tensors["blk.0.attn_q.weight"].to_numpy()
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGUFValueType

from ..errors import GGUFSplitError
from .gguf import KV, GGUFFile, TensorInfo, decode_value, to_numpy, type_name
from .names import show
from .records import SplitFile

__all__ = ["Field", "Metadata", "Model", "Tensor", "open_model"]


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor: GGUF shape order (ne0 first); `data` is a read-only view of the mapped file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: memoryview
    file: str  # the file its bytes live in, by the path the task reached it

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


def _renamed(e: GGUFSplitError, f: GGUFFile, path: str) -> GGUFSplitError:
    """`e` about `f`, naming `path` instead: the path this task reached a file by, when the mapping was
    made through another (a hard link)."""
    if e.path == f.path and f.path != path:
        return GGUFSplitError(show(path), e.problem)
    return e


class Metadata(Mapping[str, Any]):
    """The model's KV metadata; a value is bounds-checked and decoded the first time it is asked for."""

    def __init__(self, file: GGUFFile, keys: list[str], lookup: Callable[[str], KV], *, path: str | None = None,
                 keep: object = None) -> None:
        self._file = file
        self._path = file.path if path is None else path  # named in errors
        self._keep = keep  # whatever must live as long as this (the adaptor's mapping)
        self._keys = keys  # in file order
        self._key_set = set(keys)
        self._lookup = lookup  # key -> its checked KV record
        self._cache: dict[str, Field] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, file: GGUFFile, *, path: str | None = None, keep: object = None) -> "Metadata":
        """A plain GGUF's metadata (its header was checked in full) or a gguf-split file's original KVs
        (each checked when first asked for)."""
        if isinstance(file, SplitFile):
            return cls(file, list(file.tail), file.tail_kv, path=path, keep=keep)
        return cls(file, [kv.key for kv in file.header.kvs], file.header.kv_by_key.__getitem__, path=path, keep=keep)

    def field(self, key: str) -> Field:
        got = self._cache.get(key)
        if got is not None:
            return got
        if key not in self:
            raise KeyError(key)
        try:
            kv = self._lookup(key)
            value = decode_value(self._file.mm, kv.vtype, kv.value_start)[0]
        except GGUFSplitError as e:
            raise _renamed(e, self._file, self._path) from None
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
    """name -> Tensor over one or more files (each with the path to report); views made on first use.
    `keep` lives as long as this mapping does (the mappings of the task it was taken from), so a reader
    that took `model.tensors` before a swap still reads the old task."""

    def __init__(self, files: Sequence[tuple[GGUFFile, str]], order: Callable[[], list[str]] | None = None,
                 keep: object = None) -> None:
        self._index: dict[str, tuple[GGUFFile, TensorInfo, str]] = {}
        for f, path in files:
            for t in f.header.tensors:
                self._index[t.name] = (f, t, path)
        self._order = order
        self._keep = keep
        self._names: list[str] | None = None
        self._cache: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        got = self._cache.get(name)
        if got is None:
            f, t, path = self._index[name]
            try:
                view = f.tensor_view(t)
            except ValueError:  # closed by another thread between the check and the view
                raise GGUFSplitError(show(path), "file is closed") from None
            except GGUFSplitError as e:
                raise _renamed(e, f, path) from None
            got = Tensor(t.name, t.ggml_type, t.shape, view, path)
            self._cache[name] = got  # a racing thread may build an equal Tensor: harmless
        return got

    def info(self, name: str) -> TensorInfo:
        return self._index[name][1]

    def __iter__(self) -> Iterator[str]:
        if self._names is None:
            names = self._order() if self._order is not None else list(self._index)
            # the order comes from a record: it must name exactly the tensors the files hold (a forged
            # record that passes the seal must not make iteration yield names the mapping does not have)
            if len(names) != len(self._index) or len(set(names)) != len(names) or \
                    any(n not in self._index for n in names):
                f, _, path = next(iter(self._index.values()))
                raise GGUFSplitError(show(path), "its record of the model's tensors does not match the task's "
                                                 "files: damaged")
            self._names = names
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
        self.tensors: Mapping[str, Tensor] = _Tensors([(file, file.path)])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | os.PathLike[str]) -> Model:
    """Open any GGUF file (a plain model) with the same zero-copy API; the header is parsed in full."""
    return Model(GGUFFile(path))
