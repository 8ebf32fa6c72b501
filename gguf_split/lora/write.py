"""Writing a LoRA adapter file: llama.cpp's LoRA GGUF laid out, and committed as every output of
gguf-split is.

Why a module of its own: extraction decides what goes into an adapter; this says how those factors become
bytes on disk, and it is the only code of lora/ that writes. It writes through `disk.commit.write_files`
(one Transaction: the output's directory locked, a hidden temporary fsynced, one atomic rename of a
journal, a killed run's leftovers finished or removed by the next gguf-split run in that directory), so a
kill at any moment leaves the old file or the new one, never a part. An existing output is refused unless
`force`, and an input model never becomes the output.

The layout: GGUF v3, the KVs (what adapter.py reads, then the task's hyperparameters, which llama.cpp
ignores in an adapter but which document what the LoRA was made for), the tensor infos, every tensor
aligned to ALIGNMENT bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..disk.commit import Transaction, check_space, write_files
from ..disk.copy import write_all, write_zeros
from ..disk.progress import QUIET, Progress
from ..errors import GGUFSplitError
from ..format.gguf import ARCHITECTURE_KEY, align_up, encode_kv, encode_prefix, encode_tensor_info
from ..format.model import Field
from ..format.names import show
from .adapter import K_ADAPTER_TYPE, K_ALPHA, K_BASE_DIGEST, K_GENERAL_TYPE, K_NAME, K_RANK_RULE

__all__ = ["AdapterHeader", "Factor", "check_output", "write_adapter"]

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


def _write(fd: int, layout: _Layout, factors: Sequence[Factor]) -> None:
    write_all(fd, layout.header)
    pos = len(layout.header)
    for f, offset in zip(factors, layout.offsets):
        start = len(layout.header) + offset
        write_zeros(fd, start - pos)
        write_all(fd, np.ascontiguousarray(f.data).data.cast("B"))
        pos = start + f.data.nbytes
    write_zeros(fd, layout.size - pos)


def check_output(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str] | None] = ()) -> None:
    """Refuse, naming `path`, an output that cannot be written or must not be replaced: its directory is
    missing, it is a directory, it is one of the `inputs` (the models extracted from; even with force),
    or it exists and not `force`."""
    p = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise GGUFSplitError(show(p), "its directory does not exist" if not os.path.lexists(parent)
                             else "its parent is not a directory")
    if os.path.isdir(p):
        raise GGUFSplitError(show(p), "is a directory")
    if not os.path.exists(p):
        if os.path.lexists(p) and not force:  # a dangling symlink: replaced only with force, like a file
            raise GGUFSplitError(show(p), "already exists (use --force to replace it)")
        return
    for src in inputs:
        if src is not None and os.path.exists(src) and os.path.samefile(src, p):
            raise GGUFSplitError(show(p), "is an input model: the LoRA would replace it")
    if not force:
        raise GGUFSplitError(show(p), "already exists (use --force to replace it)")


def write_adapter(path: str | os.PathLike[str], header: AdapterHeader, factors: Sequence[Factor],
                  ggml_type: GGMLQuantizationType, *, force: bool = False,
                  inputs: Sequence[str | os.PathLike[str] | None] = (), progress: Progress = QUIET) -> int:
    """Write the adapter at `path` through a Transaction in its directory (see the module docstring);
    `check_output` is asked again under the directory's lock. Returns the file's size."""
    layout = _layout(header.encode(), factors, ggml_type)
    final = os.path.abspath(os.fspath(path))

    def check(tx: Transaction) -> None:
        check_output(path, force=force, inputs=inputs)
        check_space(tx.dir, layout.size, "the LoRA")

    write_files(os.path.dirname(final), [(os.path.basename(final), lambda fd: _write(fd, layout, factors))],
                force=force, create=False, check=check, on_wait=progress.note)
    return layout.size
