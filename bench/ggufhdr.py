"""A small standalone GGUF header walk for the benchmarks (independent of gguf_split's readers, which are
being rewritten, and ~100x faster than gguf.GGUFReader, which takes 8-27 s per header here).

`read_header(path)` -> Header: version, the scalar KVs (arrays are skipped, only their extent is walked),
tensor infos (name, ne, ggml type, offset, nbytes) and `data_start`, the first byte of the data section
(= the header's size as counted by the benchmarks). Little-endian GGUF v2/v3 only; sizes are checked
against the file so a damaged file raises ValueError instead of looping.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types -> struct format of a scalar (8 = string, 9 = array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return str(self.ggml_type)


@dataclass
class Header:
    path: str
    version: int
    kv: dict[str, object] = field(default_factory=dict)  # scalars and strings; arrays as ("array", type, n)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = 32
    data_start: int = 0
    file_size: int = 0

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None


def tensor_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in ne:
        n *= d
    if ne and ne[0] % block:
        raise ValueError(f"ne0 {ne[0]} is not a multiple of the block size {block}")
    return n // block * size


class _Buf:
    def __init__(self, mm: mmap.mmap | bytes, size: int):
        self.mm, self.size, self.pos = mm, size, 0

    def take(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.size:
            raise ValueError(f"header runs past the end of the file (at byte {p}, wants {n})")
        self.pos = p + n
        return p

    def unpack(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.mm, self.take(n))

    def string(self) -> str:
        (n,) = self.unpack("Q")
        p = self.take(n)
        return bytes(self.mm[p:p + n]).decode("utf-8")

    def skip_string(self) -> None:
        (n,) = self.unpack("Q")
        self.take(n)

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("IQ")
            if etype in _SCALAR:
                self.take(count * struct.calcsize("<" + _SCALAR[etype]))
            elif etype == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(etype)
            return ("array", etype, count)
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_header(path: str | os.PathLike[str]) -> Header:
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path}: too small for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            b = _Buf(mm, size)
            magic, version, n_tensors, n_kv = b.unpack("4sIQQ")
            if magic != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file")
            if version not in (2, 3):
                raise ValueError(f"{path}: GGUF version {version} not supported (byte-swapped file?)")
            if n_tensors > size // 24 or n_kv > size // 12:
                raise ValueError(f"{path}: counts {n_tensors} tensors / {n_kv} KVs do not fit the file")
            h = Header(path, version, file_size=size)
            for _ in range(n_kv):
                key = b.string()
                (vtype,) = b.unpack("I")
                h.kv[key] = b.value(vtype)
            infos = []
            for _ in range(n_tensors):
                name = b.string()
                (nd,) = b.unpack("I")
                if nd > 4:
                    raise ValueError(f"{path}: tensor {name!r} has {nd} dims")
                ne = b.unpack("Q" * nd)
                gtype, off = b.unpack("IQ")
                infos.append((name, tuple(ne), gtype, off))
            align = h.kv.get("general.alignment", 32)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise ValueError(f"{path}: bad general.alignment {align!r}")
            h.alignment = align
            h.data_start = -(-b.pos // align) * align
            for name, ne, gtype, off in infos:
                nb = tensor_nbytes(ne, gtype)
                if h.data_start + off + nb > size:
                    raise ValueError(f"{path}: tensor {name!r} runs past the end of the file")
                h.tensors.append(TensorInfo(name, ne, gtype, off, nb))
            return h
