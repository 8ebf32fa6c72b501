"""Writing a LoRA adapter file: llama.cpp's LoRA GGUF laid out and written atomically.

Why a module of its own: extraction decides what goes into an adapter; this says how those factors become
bytes on disk, and it is the only code of lora/ that writes.

The layout: GGUF v3, the KVs (what adapter.py reads, then the task's hyperparameters, which llama.cpp
ignores in an adapter but which document what the LoRA was made for), the tensor infos, every tensor
aligned to ALIGNMENT bytes.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import BinaryIO
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import GGUFSplitError, os_problem
from ..format.gguf import ARCHITECTURE_KEY, align_up, encode_kv, encode_prefix, encode_tensor_info
from ..format.model import Field
from .adapter import K_ADAPTER_TYPE, K_ALPHA, K_BASE_DIGEST, K_GENERAL_TYPE, K_NAME, K_RANK_RULE

__all__ = ["AdapterHeader", "Factor", "write_adapter", "write_atomically"]

ALIGNMENT = 32
GGUF_VERSION = 3


@dataclass(frozen=True)
class AdapterHeader:
    """What an adapter's KVs say."""

    architecture: str
    name: str
    alpha: float
    rank_rule: str  # "auto threshold=0.01" or "fixed 8"
    base_digest: str  # adapter.base_digest of the base's target tensors
    hyperparameters: Sequence[Field] = ()  # the task's `<architecture>.*` KVs

    def encode(self) -> list[bytes]:
        s = GGUFValueType.STRING
        kvs = [
            encode_kv(ARCHITECTURE_KEY, s, self.architecture),
            encode_kv(K_GENERAL_TYPE, s, "adapter"),
            encode_kv(K_NAME, s, self.name),
            encode_kv(K_ADAPTER_TYPE, s, "lora"),
            encode_kv(K_ALPHA, GGUFValueType.FLOAT32, float(self.alpha)),
            encode_kv(K_RANK_RULE, s, self.rank_rule),
            encode_kv(K_BASE_DIGEST, s, self.base_digest),
        ]
        return kvs + [encode_kv(f.key, f.type, f.value, f.subtype) for f in self.hyperparameters]


@dataclass(frozen=True)
class Factor:
    """One tensor of the adapter: its GGUF name (`<target>.lora_a` / `.lora_b`), ne, and the array (numpy
    order, the file's dtype)."""

    name: str
    ne: tuple[int, ...]
    data: np.ndarray


@dataclass(frozen=True)
class _Layout:
    header: bytes  # KVs and tensor infos, padded to ALIGNMENT
    offsets: list[int]  # each tensor's offset in the data section
    size: int  # of the whole file


def _layout(kvs: list[bytes], factors: Sequence[Factor], ggml_type: GGMLQuantizationType) -> _Layout:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    offsets, pos = [], 0
    for f in factors:
        offsets.append(pos)
        pos = align_up(pos + math.prod(f.ne) // block * type_size, ALIGNMENT)
    infos = b"".join(encode_tensor_info(f.name, f.ne, ggml_type, o) for f, o in zip(factors, offsets))
    header = encode_prefix(GGUF_VERSION, len(factors), len(kvs)) + b"".join(kvs) + infos
    header += bytes(align_up(len(header), ALIGNMENT) - len(header))
    return _Layout(header, offsets, len(header) + pos)


def _write(f: BinaryIO, layout: _Layout, factors: Sequence[Factor]) -> None:
    f.write(layout.header)
    pos = len(layout.header)
    for factor, offset in zip(factors, layout.offsets):
        start = len(layout.header) + offset
        f.write(bytes(start - pos))
        f.write(np.ascontiguousarray(factor.data).data.cast("B"))
        pos = start + factor.data.nbytes
    f.write(bytes(layout.size - pos))


def write_adapter(path: str | os.PathLike[str], header: AdapterHeader, factors: Sequence[Factor],
                  ggml_type: GGMLQuantizationType) -> int:
    """Write the adapter at `path` atomically; returns the file's size."""
    layout = _layout(header.encode(), factors, ggml_type)
    write_atomically(path, lambda f: _write(f, layout, factors))
    return layout.size


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write a file through `write(f)` into a temporary file beside `path`, fsync it, rename it into place,
    fsync the directory. A failure leaves no temporary file and `path` untouched. (One function, so the
    split's own output machinery can replace it.)"""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise GGUFSplitError(path, f"cannot write: {os_problem(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise GGUFSplitError(path, f"cannot write: {os_problem(e)}") from None
        raise
