"""GGUF files: a lean, strict header reader and a byte-exact header writer.

Why not `gguf.GGUFReader`: it builds numpy views for every array element and takes ~27 s on Gemma-3's
262k-token vocabulary here; a `struct` walk over an mmap takes ~0.1 s. Type tables (value types, ggml
types, block sizes) come from the installed `gguf` package, so a ggml type added there is known here.

The reader keeps every key/value pair and tensor-info record as a byte span of the file, so a header can be
written back byte for byte (bit-exact restore) without re-encoding anything. Every count, length and
offset read from the file is checked against the file size before it is used to allocate or loop: a
30-byte file can claim 2^63 tensors. And since a sparse file can hold what it claims (gigabytes of holes),
also against fixed limits: llama.cpp's 2^30 for string values and array counts, 2^16 - 1 bytes for keys
and tensor names (decoded at parse time); the parse never reads a value or tensor data into memory.
Tensor shapes follow llama.cpp's gguf.cpp (a 0-dim tensor is a scalar of one element; ne0 must be a
multiple of the block size). Only `GGUFSplitError` escapes, naming the file and the problem.

Layout (little-endian; see ../shared/NOTES.md): magic "GGUF", version u32 (2 or 3), n_tensors u64, n_kv u64,
n_kv KV records, n_tensors tensor-info records, zero padding to `general.alignment`, the data section.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Final, Iterator

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from ..errors import GGUFSplitError, os_problem

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
WRITE_VERSION = 3
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8  # deeper nesting is refused (llama.cpp writes at most 1 level)
# Lengths and counts a file may claim, whatever its size (a sparse file can be 2^40 bytes of holes):
MAX_STRING_LENGTH = 1 << 30  # llama.cpp's GGUF_MAX_STRING_LENGTH: a longer string value is refused
MAX_ARRAY_ELEMENTS = 1 << 30  # llama.cpp's GGUF_MAX_ARRAY_ELEMENTS, for every element type
# Keys and tensor names are decoded at parse time, so they get a limit that bounds the parse's memory: the
# GGUF spec's limit for keys (2^16 - 1 bytes). llama.cpp refuses tensor names of 64 bytes and more.
MAX_NAME_LENGTH = (1 << 16) - 1
ALIGNMENT_KEY = Keys.General.ALIGNMENT
ARCHITECTURE_KEY = Keys.General.ARCHITECTURE

# struct formats of the fixed-size value types; STRING and ARRAY are handled apart.
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
SCALAR_SIZES = {t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PREFIX = struct.Struct("<4sIQQ")
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_GGML_TYPES = {int(t): t for t in GGML_QUANT_SIZES}


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def type_name(ggml_type: int) -> str:
    t = _GGML_TYPES.get(ggml_type)
    return t.name if t is not None else f"type{ggml_type}"


@dataclass(slots=True, unsafe_hash=True)
class KV:
    """One key/value record, as the byte span [start, end) of its file.

    Read-only through `Final` (mypy --strict refuses an assignment) rather than frozen=True: one is made
    for every record read, eight or more per file on every load, and a frozen dataclass takes 1.5 us to
    build, 5x this. Hashed by value, as a frozen one is."""

    key: Final[str]
    vtype: Final[GGUFValueType]
    start: Final[int]  # offset of the record (its key's length field)
    value_start: Final[int]  # offset of the value, after the u32 value type
    end: Final[int]
    subtype: Final[GGUFValueType | None] = None  # element type, for arrays
    count: Final[int] = 1  # element count, for arrays


@dataclass(slots=True, unsafe_hash=True)
class TensorInfo:
    """One tensor-info record: `shape` is GGUF order (ne0, the fastest-moving dim, first).

    Read-only through `Final`, as KV (mypy --strict refuses an assignment): a load builds one per tensor
    of every file of the task, and frozen=True would triple what that costs. Hashed by value."""

    name: Final[str]
    shape: Final[tuple[int, ...]]
    ggml_type: Final[int]
    offset: Final[int]  # relative to the data section
    nbytes: Final[int]
    start: Final[int]  # byte span of the record in its file
    end: Final[int]

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


@dataclass
class Header:
    path: str
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    alignment: int
    tensor_info_start: int
    data_start: int
    file_size: int
    kv_by_key: dict[str, KV] = field(default_factory=dict)
    tensor_by_name: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def kv_start(self) -> int:
        return _PREFIX.size

    @property
    def tensor_info_end(self) -> int:
        return self.tensors[-1].end if self.tensors else self.tensor_info_start

    def data_end(self) -> int:
        """End of the last tensor's bytes (the data start when there is no tensor)."""
        return max((self.data_start + t.offset + t.nbytes for t in self.tensors), default=self.data_start)


class _WalkedArrays:
    """The bytes of the last few large string arrays walked and found sound (a tokenizer vocabulary).

    Fine-tunes of one model carry the same vocabulary byte for byte, and walking 262k strings in Python
    costs ~50 ms per file. An array whose bytes equal one already walked has the same string lengths, so
    one byte comparison replaces the walk; it can never accept bytes that were not walked."""

    MIN_COUNT = 4096
    KEEP = 4
    MAX_BYTES = 32 << 20  # a larger array is walked every time: the memo holds at most KEEP x MAX_BYTES

    def __init__(self) -> None:
        self._arrays: list[tuple[int, bytes]] = []  # (count, the array's string records), newest last
        self._lock = threading.Lock()

    def match(self, buf: Any, pos: int, size: int, count: int) -> int | None:
        """Byte length of the string records at `pos` if they equal an array walked before."""
        if count < self.MIN_COUNT:
            return None
        with self._lock:
            candidates = [raw for c, raw in self._arrays if c == count and len(raw) <= size - pos]
        for raw in candidates:
            if buf[pos : pos + len(raw)] == raw:
                return len(raw)
        return None

    def clear(self) -> None:
        """Forget every array (benchmarks use it to time a fresh process's first parse)."""
        with self._lock:
            self._arrays = []

    def remember(self, buf: Any, start: int, end: int, count: int) -> None:
        if count >= self.MIN_COUNT and end - start <= self.MAX_BYTES:
            raw = bytes(buf[start:end])
            with self._lock:
                self._arrays = [a for a in self._arrays if a[1] != raw][-(self.KEEP - 1) :] + [(count, raw)]


_WALKED = _WalkedArrays()


class _Cursor:
    """Bounds-checked reads from a buffer; every failure names the file and the byte offset."""

    __slots__ = ("buf", "pos", "size", "path")

    def __init__(self, buf: Any, pos: int, size: int, path: str) -> None:
        self.buf, self.pos, self.size, self.path = buf, pos, size, path

    def fail(self, problem: str, at: int | None = None) -> GGUFSplitError:
        return GGUFSplitError(self.path, f"{problem} (at byte {self.pos if at is None else at})")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {what} needs {n} bytes, {max(self.size - self.pos, 0)} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        v: int
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        v: int
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def length(self, what: str) -> int:
        """A u64 string length; `what` is formatted only on failure (this runs for every record)."""
        if self.pos + 8 > self.size:
            raise self.fail(f"truncated: {what} length needs 8 bytes, {max(self.size - self.pos, 0)} left")
        n: int
        (n,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return n

    def skip_string(self, what: str) -> None:
        n = self.length(what)
        self.need(n, what)
        if n > MAX_STRING_LENGTH:
            raise self.fail(f"{what}: string of {n} bytes is longer than llama.cpp's limit of {MAX_STRING_LENGTH} "
                            f"bytes", at=self.pos - 8)
        self.pos += n

    def text(self, what: str) -> str:
        """A key or tensor name (at most MAX_NAME_LENGTH bytes), decoded."""
        start = self.pos
        n = self.length(what)
        self.need(n, what)
        if n > MAX_NAME_LENGTH:
            raise self.fail(f"{what} is {n} bytes long, longer than the {MAX_NAME_LENGTH} bytes allowed", at=start)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8", at=start) from None

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(what)
        t = _VALUE_TYPES.get(raw)
        if t is None:
            raise self.fail(f"{what}: unknown value type {raw}", at=at)
        return t

    def skip_value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> tuple[GGUFValueType | None, int]:
        """Skip one value; for an array return (element type, count)."""
        if vtype is GGUFValueType.STRING:
            self.skip_string(what)
            return None, 1
        if vtype is not GGUFValueType.ARRAY:
            self.need(SCALAR_SIZES[vtype], what)
            self.pos += SCALAR_SIZES[vtype]
            return None, 1
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
        sub = self.value_type(f"{what} element type")
        count = self.u64(f"{what} element count")
        left = self.size - self.pos
        # every claim is checked against the bytes left before anything loops over it, then against llama.cpp's
        # limit (a sparse file can hold what a count claims)
        if sub is GGUFValueType.STRING:
            # each string needs at least its 8-byte length
            if count > left // 8:
                raise self.fail(f"{what}: array claims {count} strings, the file holds at most {left // 8}")
        elif sub is GGUFValueType.ARRAY:
            # each inner array needs at least its element type and count
            if count > left // 12:
                raise self.fail(f"{what}: array claims {count} arrays, the file holds at most {left // 12}")
        elif count * SCALAR_SIZES[sub] > left:
            raise self.fail(f"{what}: array claims {count} elements ({count * SCALAR_SIZES[sub]} bytes), "
                            f"{left} bytes left")
        if count > MAX_ARRAY_ELEMENTS:
            raise self.fail(f"{what}: array claims {count} elements, more than llama.cpp's limit of "
                            f"{MAX_ARRAY_ELEMENTS}", at=self.pos - 8)
        if sub is GGUFValueType.STRING:
            known = _WALKED.match(self.buf, self.pos, self.size, count)
            if known is not None:
                self.pos += known
                return sub, count
            buf, pos, size = self.buf, self.pos, self.size
            unpack = _U64.unpack_from
            for _ in range(count):
                if pos + 8 > size:
                    raise self.fail(f"truncated: {what} string length", at=pos)
                (n,) = unpack(buf, pos)
                pos += 8
                if n > size - pos:
                    raise self.fail(f"truncated: {what} string of {n} bytes", at=pos - 8)
                pos += n
            if pos - self.pos > MAX_STRING_LENGTH + 8 * count:  # only then can one string be too long
                self._check_string_lengths(what, count)
            _WALKED.remember(self.buf, self.pos, pos, count)
            self.pos = pos
        elif sub is GGUFValueType.ARRAY:
            for _ in range(count):
                self.skip_value(GGUFValueType.ARRAY, what, depth + 1)
        else:
            self.pos += count * SCALAR_SIZES[sub]
        return sub, count

    def _check_string_lengths(self, what: str, count: int) -> None:
        """Refuse a string longer than llama.cpp's limit in the string array at self.pos (walked already)."""
        buf, pos = self.buf, self.pos
        for i in range(count):
            (n,) = _U64.unpack_from(buf, pos)
            if n > MAX_STRING_LENGTH:
                raise self.fail(f"{what}: string {i} of {n} bytes is longer than llama.cpp's limit of "
                                f"{MAX_STRING_LENGTH} bytes", at=pos)
            pos += 8 + n


def read_kv(cur: _Cursor, i: int) -> KV:
    start = cur.pos
    key = cur.text(f"key of key/value pair {i}")
    vtype = cur.value_type(f"value type of {key!r}")
    value_start = cur.pos
    sub, count = cur.skip_value(vtype, f"value of {key!r}")
    return KV(key, vtype, start, value_start, cur.pos, sub, count)


def parse_kvs(buf: bytes, path: str) -> list[KV]:
    """Parse a run of KV records filling `buf` (as gguf-split stores them in its restore records)."""
    cur = _Cursor(buf, 0, len(buf), path)
    out: list[KV] = []
    while cur.pos < len(buf):
        out.append(read_kv(cur, len(out)))
    return out


def read_prefix(buf: Any, path: str) -> tuple[int, int, int]:
    """Check magic and version; return (version, n_tensors, n_kv)."""
    if len(buf) < _PREFIX.size:
        if len(buf) >= 4 and bytes(buf[:4]) != MAGIC:
            raise GGUFSplitError(path, "not a GGUF file (no GGUF magic)")
        raise GGUFSplitError(path, f"not a GGUF file: {len(buf)} bytes, too short for a GGUF header")
    magic, version, n_tensors, n_kv = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise GGUFSplitError(path, "not a GGUF file (no GGUF magic)")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFFFF == 0 and (version >> 24) in (1, 2, 3):
            raise GGUFSplitError(path, "big-endian GGUF is not supported (llama.cpp cannot load it on this machine either)")
        if version == 1:
            raise GGUFSplitError(path, "GGUF version 1 is obsolete and not supported; convert it again with current llama.cpp")
        raise GGUFSplitError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    return version, n_tensors, n_kv


def read_kv_at(buf: Any, pos: int, path: str) -> KV:
    """One checked KV record at byte `pos` of `buf`."""
    return read_kv(_Cursor(buf, pos, len(buf), path), 0)


# Records whose keys and types a reader knows in advance: key bytes -> (key, value type, element type, width:
# the byte size of a number or of an array's number element, 0 for strings).
KnownRecords = dict[bytes, tuple[str, GGUFValueType, "GGUFValueType | None", int]]
_TYPE_LENGTH = struct.Struct("<IQ")  # a string's value type and length; an array's element type and count
_TYPE_SUB_COUNT = struct.Struct("<IIQ")
_STRING, _ARRAY = GGUFValueType.STRING, GGUFValueType.ARRAY  # an enum member looked up on its class costs ~0.2 us
_LONGEST_KNOWN_KEY = 64


def known_records(types: dict[str, tuple[GGUFValueType, GGUFValueType | None]]) -> KnownRecords:
    """The table read_known_kvs takes: each key with its value type, and an array's element type (a string
    or a number: nested arrays are left to the general reader)."""
    out: KnownRecords = {}
    for key, (vtype, sub) in types.items():
        assert len(key.encode()) <= _LONGEST_KNOWN_KEY and (vtype is _ARRAY) == (sub is not None) and sub is not _ARRAY
        width = SCALAR_SIZES.get(sub if vtype is _ARRAY else vtype, 0)  # type: ignore[arg-type]
        out[key.encode()] = (key, vtype, sub, width)
    return out


def read_known_kvs(buf: Any, pos: int, known: KnownRecords, last: str | None = None,
                   limit: int = 1) -> tuple[list[KV], int]:
    """The records from byte `pos` of `buf` whose keys are `known` with the types given there, at most
    `limit`, up to and including the one keyed `last`: (those records, the offset after them). It stops
    early at a record it does not know, and at anything read_kv_at would refuse or look at closer (a
    truncation, a limit): the caller reads that one with read_kv_at, which gives the record or the error.
    So every KV this returns is the one read_kv_at returns at its offset; it never raises, and it reads no
    value into memory.

    Why: gguf-split's own records (a seal, a version, a role, digests, lists of files) are read on every
    load, eight or more per file, and a task loads up to 33 files: one pass with a struct call or two per
    record, where the general walk takes several method calls per field."""
    size = len(buf)
    out: list[KV] = []
    u64, type_length, type_sub_count = _U64.unpack_from, _TYPE_LENGTH.unpack_from, _TYPE_SUB_COUNT.unpack_from
    while len(out) < limit and 0 <= pos and pos + 8 <= size:
        (n,) = u64(buf, pos)
        at = pos + 8 + n  # the value type
        if n > _LONGEST_KNOWN_KEY or at + 4 > size:
            break
        key_bytes = buf[pos + 8 : at]
        spec = known.get(key_bytes if type(key_bytes) is bytes else bytes(key_bytes))  # a memoryview's is unhashable
        if spec is None:
            break
        key, vtype, sub, width = spec
        value_start = at + 4
        if vtype is _STRING:
            if value_start + 8 > size:
                break
            raw_type, m = type_length(buf, at)
            end = value_start + 8 + m
            if raw_type != vtype or m > MAX_STRING_LENGTH or end > size:
                break
            kv = KV(key, vtype, pos, value_start, end)
        elif vtype is _ARRAY:
            if value_start + 12 > size:
                break
            raw_type, raw_sub, count = type_sub_count(buf, at)
            if raw_type != vtype or raw_sub != sub or count > MAX_ARRAY_ELEMENTS:
                break
            end = value_start + 12 + count * width if width else _string_run_end(buf, value_start + 12, count, size)
            if not 0 <= end <= size:
                break
            kv = KV(key, vtype, pos, value_start, end, sub, count)
        else:
            end = value_start + width
            if end > size or _U32.unpack_from(buf, at)[0] != vtype:
                break
            kv = KV(key, vtype, pos, value_start, end)
        out.append(kv)
        pos = end
        if key == last:
            break
    return out, pos


def read_known_kv(buf: Any, pos: int, known: KnownRecords) -> KV | None:
    """The one record at `pos` as read_known_kvs reads it, or None (read it with read_kv_at)."""
    got = read_known_kvs(buf, pos, known)[0]
    return got[0] if got else None


def _string_run_end(buf: Any, pos: int, count: int, size: int) -> int:
    """End of `count` strings from `pos`, each within `size` and llama.cpp's string limit; -1 otherwise."""
    if count > (size - pos) // 8:
        return -1
    unpack = _U64.unpack_from
    for _ in range(count):
        if pos + 8 > size:
            return -1
        (n,) = unpack(buf, pos)
        pos += 8
        if n > size - pos or n > MAX_STRING_LENGTH:
            return -1
        pos += n
    return pos


def read_tensor_infos_at(buf: Any, pos: int, n_tensors: int, alignment: int, path: str) -> list[TensorInfo]:
    """`n_tensors` checked tensor-info records from byte `pos` of `buf`."""
    room = max(len(buf) - pos, 0)  # pos comes from a header index: it may lie past the end
    if n_tensors > room // 24:
        raise GGUFSplitError(path, f"header claims {n_tensors} tensors, the file can hold at most {room // 24}")
    return read_tensor_infos(_Cursor(buf, pos, len(buf), path), n_tensors, alignment)


def parse_header(buf: Any, size: int, path: str) -> Header:
    """Parse and check the GGUF header at the start of `buf` (bytes, mmap or memoryview) for a file of
    `size` bytes. `buf` may hold the header alone (a rebuilt header): reads are bounded by len(buf), the
    data-section checks by `size`."""
    version, n_tensors, n_kv = read_prefix(buf, path)
    cur = _Cursor(buf, _PREFIX.size, len(buf), path)
    # a KV record is at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least 8 + 4 + 4 + 8
    room = cur.size - cur.pos
    if n_kv > room // 13:
        raise cur.fail(f"header claims {n_kv} key/value pairs, the file can hold at most {room // 13}", at=16)
    if n_tensors > room // 24:
        raise cur.fail(f"header claims {n_tensors} tensors, the file can hold at most {room // 24}", at=8)

    kvs: list[KV] = []
    kv_by_key: dict[str, KV] = {}
    for i in range(n_kv):
        kv = read_kv(cur, i)
        if kv.key in kv_by_key:
            raise cur.fail(f"duplicate key {kv.key!r}", at=kv.start)
        kv_by_key[kv.key] = kv
        kvs.append(kv)

    alignment = GGUF_DEFAULT_ALIGNMENT
    akv = kv_by_key.get(ALIGNMENT_KEY)
    if akv is not None:
        if akv.vtype is not GGUFValueType.UINT32:
            raise cur.fail(f"{ALIGNMENT_KEY} must be a u32, not {akv.vtype.name}", at=akv.start)
        (alignment,) = _U32.unpack_from(buf, akv.value_start)
        if alignment == 0 or alignment & (alignment - 1):
            raise cur.fail(f"{ALIGNMENT_KEY} = {alignment} is not a power of two", at=akv.start)

    tensor_info_start = cur.pos
    tensors = read_tensor_infos(cur, n_tensors, alignment)
    by_name = {t.name: t for t in tensors}

    data_start = align_up(cur.pos, alignment)
    header = Header(path, version, kvs, tensors, alignment, tensor_info_start, data_start, size, kv_by_key, by_name)
    _check_data_layout(header)
    return header


_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]
_TYPE_OFFSET = struct.Struct("<IQ")
_BLOCK_SIZES = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}  # raw ggml type -> (block, type size)


def _plain_name(buf: Any, pos: int, size: int) -> str | None:
    """The name at `pos` (its u64 length readable) when it is what _Cursor.text reads without complaint:
    within the buffer, at most MAX_NAME_LENGTH bytes, valid UTF-8; None for anything else (text() then
    reads it and says what is wrong). One struct call and a decode, where text() makes several calls."""
    (n,) = _U64.unpack_from(buf, pos)
    if n > MAX_NAME_LENGTH or n > size - pos - 8:
        return None
    try:
        return str(buf[pos + 8 : pos + 8 + n], "utf-8")
    except UnicodeDecodeError:
        return None


def read_tensor_infos(cur: _Cursor, n_tensors: int | None, alignment: int) -> list[TensorInfo]:
    """Read `n_tensors` tensor-info records (None: until the end of the buffer) and check each.

    One struct call per group of fields and messages formatted only on failure: the runtime loader opens
    a task by reading its tensor infos, and must do so in a few milliseconds."""
    buf, size = cur.buf, cur.size
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    u64, dims_of, type_offset, block_sizes = _U64.unpack_from, _DIMS, _TYPE_OFFSET.unpack_from, _BLOCK_SIZES
    i = 0
    while (i < n_tensors) if n_tensors is not None else (cur.pos < size):
        start = cur.pos
        name = _plain_name(buf, start, size) if start + 8 <= size else None
        if name is not None:  # what cur.text reads there, read inline
            cur.pos = start + 8 + u64(buf, start)[0]
        else:
            try:
                name = cur.text("tensor name")
            except GGUFSplitError as e:  # name the record only on failure: formatting is the costly part
                raise GGUFSplitError(cur.path, e.problem.replace("tensor name", f"name of tensor {i}", 1)) from None
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}", at=start)
        pos = cur.pos
        if pos + 4 > size:
            raise cur.fail(f"truncated: dimension count of tensor {name!r}")
        (n_dims,) = _U32.unpack_from(buf, pos)
        if n_dims > MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS} are allowed", at=pos)
        at = pos + 4 + 8 * n_dims  # the type field
        if at + 12 > size:
            raise cur.fail(f"truncated: dimensions, type and offset of tensor {name!r} need {at + 12 - pos} "
                           f"bytes, {size - pos} left", at=pos)
        shape = dims_of[n_dims].unpack_from(buf, pos + 4)
        raw_type, offset = type_offset(buf, at)
        cur.pos = at + 12
        sizes = block_sizes.get(raw_type)
        if sizes is None:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {raw_type}", at=at)
        block, type_size = sizes
        n_elems = 1
        for d in shape:
            n_elems *= d
        if n_elems == 0:
            raise cur.fail(f"tensor {name!r} has a zero dimension {list(shape)}", at=at)
        if n_elems >= 1 << 63:
            raise cur.fail(f"tensor {name!r}: element count of shape {list(shape)} overflows", at=at)
        if block == 0 or type_size == 0:
            raise cur.fail(f"tensor {name!r} has ggml type {type_name(raw_type)}, which has no block size", at=at)
        # ne0 of a tensor with no dimensions is 1 (a scalar), as in llama.cpp's gguf.cpp, which refuses any
        # type whose block holds more than one element: such a tensor would have 0 bytes
        if (shape[0] % block) if shape else (block > 1):
            if not shape:
                raise cur.fail(f"tensor {name!r} has no dimensions (a scalar: 1 element), but a "
                               f"{type_name(raw_type)} block holds {block} elements", at=pos)
            raise cur.fail(f"tensor {name!r}: first dimension {shape[0]} is not a multiple of "
                           f"{type_name(raw_type)}'s block size {block}", at=at)
        if offset % alignment:
            raise cur.fail(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}", at=at + 4)
        names.add(name)
        tensors.append(TensorInfo(name, shape, raw_type, offset, n_elems // block * type_size, start, cur.pos))
        i += 1
    return tensors


def parse_tensor_infos(buf: bytes, path: str, alignment: int) -> list[TensorInfo]:
    """Parse a run of tensor-info records filling `buf` (spans are relative to `buf`)."""
    return read_tensor_infos(_Cursor(buf, 0, len(buf), path), None, alignment)


def _check_data_layout(h: Header) -> None:
    """Every tensor's bytes lie inside the file, and no two tensors overlap."""
    end_prev, prev = 0, None
    for t in sorted(h.tensors, key=lambda t: t.offset):
        if h.data_start + t.offset + t.nbytes > h.file_size:
            raise GGUFSplitError(h.path, f"tensor {t.name!r} ({t.nbytes} bytes at data offset {t.offset}) lies past the "
                                         f"end of the file: truncated or corrupt")
        if prev is not None and t.offset < end_prev:
            raise GGUFSplitError(h.path, f"tensors {prev.name!r} and {t.name!r} overlap in the data section")
        end_prev, prev = t.offset + t.nbytes, t


# ---------------------------------------------------------------------------------------------------------
# Values


def decode_value(buf: Any, vtype: GGUFValueType, pos: int, *, path: str | None = None,
                 end: int | None = None) -> tuple[Any, int]:
    """Decode one value at `pos` of `buf` (bytes, mmap or memoryview); return (value, end). Strings that
    are not valid UTF-8 come back as `bytes` (the file keeps them byte-exact).

    Meant for a value of a checked header, but safe on any bytes: every length and count is checked
    against the buffer (or `end`) before it drives an allocation or a loop, and anything wrong is one
    GGUFSplitError naming `path`. What it allocates is bounded by the bytes it decodes."""
    size = len(buf) if end is None else min(end, len(buf))
    t = vtype if isinstance(vtype, GGUFValueType) else _VALUE_TYPES.get(vtype)
    if t is None or not 0 <= pos <= size:
        raise GGUFSplitError(path, f"cannot decode a value of type {getattr(t, 'name', vtype)} at byte {pos} of {size}")
    return _decode(buf, t, pos, size, path, 0)


_NATIVE_LITTLE = sys.byteorder == "little"


def _decode(buf: Any, vtype: GGUFValueType, pos: int, size: int, path: str | None, depth: int) -> tuple[Any, int]:
    def fail(problem: str, at: int) -> GGUFSplitError:
        return GGUFSplitError(path, f"{problem} (at byte {at})")

    if vtype is GGUFValueType.STRING:
        if pos + 8 > size:
            raise fail("truncated: string length", pos)
        (n,) = _U64.unpack_from(buf, pos)
        if n > size - pos - 8:
            raise fail(f"truncated: string of {n} bytes, {size - pos - 8} left", pos)
        raw = buf[pos + 8 : pos + 8 + n]
        try:
            return str(raw, "utf-8"), pos + 8 + n
        except UnicodeDecodeError:
            return bytes(raw), pos + 8 + n
    if vtype is not GGUFValueType.ARRAY:
        width = SCALAR_SIZES[vtype]
        if width > size - pos:
            raise fail(f"truncated: {vtype.name} needs {width} bytes, {max(size - pos, 0)} left", pos)
        (v,) = struct.unpack_from(SCALAR_FORMATS[vtype], buf, pos)
        return v, pos + width
    if depth >= MAX_ARRAY_NESTING:
        raise fail(f"arrays nested deeper than {MAX_ARRAY_NESTING}", pos)
    if pos + 12 > size:
        raise fail("truncated: array element type and count", pos)
    (raw_sub,) = _U32.unpack_from(buf, pos)
    (count,) = _U64.unpack_from(buf, pos + 4)
    sub = _VALUE_TYPES.get(raw_sub)
    if sub is None:
        raise fail(f"unknown array element type {raw_sub}", pos)
    at, pos = pos, pos + 12
    left = size - pos
    if sub in SCALAR_SIZES:
        n = count * SCALAR_SIZES[sub]
        if n > left:
            raise fail(f"array claims {count} elements ({n} bytes), {left} bytes left", at)
        if not count:
            return [], pos
        fmt = SCALAR_FORMATS[sub][1]
        if _NATIVE_LITTLE and fmt != "?":  # one list, no intermediate tuple (a bool byte of 2 stays struct's)
            # typeshed types memoryview.cast() by literal format only; fmt is a code of SCALAR_FORMATS
            with memoryview(buf) as whole, whole[pos : pos + n] as part, part.cast("B") as b, b.cast(fmt) as typed:  # type: ignore[call-overload]
                return typed.tolist(), pos + n
        return list(struct.unpack_from(f"<{count}{fmt}", buf, pos)), pos + n
    if sub is GGUFValueType.STRING:
        if count > left // 8:
            raise fail(f"array claims {count} strings, the buffer holds at most {left // 8}", at)
        out: list[Any] = []
        append, unpack = out.append, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise fail("truncated: string length", pos)
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                raise fail(f"truncated: string of {n} bytes, {size - pos} left", pos - 8)
            raw = buf[pos : pos + n]
            pos += n
            try:
                append(str(raw, "utf-8"))
            except UnicodeDecodeError:
                append(bytes(raw))
        return out, pos
    if count > left // 12:
        raise fail(f"array claims {count} arrays, the buffer holds at most {left // 12}", at)
    out = []
    for _ in range(count):
        v, pos = _decode(buf, GGUFValueType.ARRAY, pos, size, path, depth + 1)
        out.append(v)
    return out, pos


def encode_value(vtype: GGUFValueType, value: Any, subtype: GGUFValueType | None = None) -> bytes:
    """Encode a value the way llama.cpp and gguf-py do (typed, little-endian)."""
    if vtype is GGUFValueType.STRING:
        raw = value if isinstance(value, (bytes, bytearray)) else str(value).encode("utf-8")
        return _U64.pack(len(raw)) + raw
    if vtype is GGUFValueType.ARRAY:
        if subtype is None:
            raise ValueError("an array needs its element type")
        if subtype in SCALAR_FORMATS:
            body = struct.pack(f"<{len(value)}{SCALAR_FORMATS[subtype][1]}", *value)
        else:
            body = b"".join(encode_value(subtype, v) for v in value)
        return _U32.pack(subtype) + _U64.pack(len(value)) + body
    return struct.pack(SCALAR_FORMATS[vtype], value)


def encode_kv(key: str, vtype: GGUFValueType, value: Any, subtype: GGUFValueType | None = None) -> bytes:
    return encode_value(GGUFValueType.STRING, key) + _U32.pack(vtype) + encode_value(vtype, value, subtype)


def encode_tensor_info(name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    parts = [encode_value(GGUFValueType.STRING, name), _U32.pack(len(shape))]
    parts += [_U64.pack(d) for d in shape]
    parts += [_U32.pack(ggml_type), _U64.pack(offset)]
    return b"".join(parts)


def encode_prefix(version: int, n_tensors: int, n_kv: int) -> bytes:
    return _PREFIX.pack(MAGIC, version, n_tensors, n_kv)


# ---------------------------------------------------------------------------------------------------------
# Files


class GGUFFile:
    """A GGUF file opened read-only and mapped: its checked header plus zero-copy views of its bytes.

    The map is shared by every view handed out; close() (or the context manager) releases it once no view
    is alive any more.
    """

    header: Header

    def __init__(self, path: str | os.PathLike[str], *, parse: bool = True) -> None:
        """Open and map `path`; with parse=False the caller parses the header itself (the runtime
        loader reads gguf-split's own files through their header index)."""
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        self.fd = -1
        fd, self._mm, st = open_mapped(self.path, min_size=1, too_small="empty file, not a GGUF file")
        self.fd = fd
        self.size = st.st_size
        self.identity = (st.st_dev, st.st_ino)
        if parse:
            try:
                self.header = parse_header(self._mm, self.size, self.path)
            except BaseException:
                self.close()
                raise

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            raise GGUFSplitError(self.path, "file is closed")
        return self._mm

    def view(self, start: int, end: int) -> memoryview:
        return memoryview(self.mm)[start:end]

    def tensor_view(self, t: TensorInfo, data_start: int | None = None) -> memoryview:
        s = (self.header.data_start if data_start is None else data_start) + t.offset
        return memoryview(self.mm)[s : s + t.nbytes]

    def kv_value(self, key: str, *, expect: GGUFValueType | None = None) -> Any:
        """The value of `key`; with `expect`, a KV of another type is refused before it is decoded (a
        caller wanting a scalar never decodes an array of 2^30 elements a hostile file put there)."""
        kv = self.header.kv_by_key[key]
        if expect is not None and kv.vtype is not expect:
            raise GGUFSplitError(self.path, f"{key} is a {kv.vtype.name}, expected a {expect.name}")
        return decode_value(self.mm, kv.vtype, kv.value_start, path=self.path)[0]

    def get(self, key: str, default: Any = None, *, expect: GGUFValueType | None = None) -> Any:
        return self.kv_value(key, expect=expect) if key in self.header.kv_by_key else default

    def raw(self, start: int, end: int) -> bytes:
        return bytes(self.mm[start:end])

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive: the map goes when it does
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_mapped(path: str, *, min_size: int, too_small: str) -> tuple[int, mmap.mmap, os.stat_result]:
    """(fd, read-only map of the whole file, its stat) of a regular file of at least `min_size` bytes;
    every failure is one GGUFSplitError naming the file (`too_small` for a short file)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (the fstat below refuses it)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise GGUFSplitError(path, f"cannot open: {os_problem(e)}") from None
    except ValueError:
        raise GGUFSplitError(path, "cannot open: the path holds a NUL byte") from None
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            raise GGUFSplitError(path, "not a regular file")
        if st.st_size < min_size:
            raise GGUFSplitError(path, too_small)
        return fd, mmap.mmap(fd, 0, access=mmap.ACCESS_READ), st
    except OSError as e:
        os.close(fd)
        raise GGUFSplitError(path, f"cannot map: {os_problem(e)}") from None
    except BaseException:
        os.close(fd)
        raise


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def iter_gaps(h: Header) -> Iterator[tuple[int, int]]:
    """Byte spans of the file that no header record and no tensor covers: the header padding, padding
    between tensors, and bytes after the last tensor. Writers zero-fill them."""
    pos = h.tensor_info_end
    for t in sorted(h.tensors, key=lambda t: t.offset):
        s = h.data_start + t.offset
        if s > pos:
            yield pos, s
        pos = max(pos, s + t.nbytes)
    if h.file_size > pos:
        yield pos, h.file_size


_PLAIN_DTYPES = {
    GGMLQuantizationType.I8: "<i1",
    GGMLQuantizationType.I16: "<i2",
    GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
    GGMLQuantizationType.F64: "<f8",
}


def to_numpy(raw: Any, ggml_type: int, shape: tuple[int, ...]) -> "Any":
    """A tensor's bytes as a numpy array in numpy order (reversed GGUF shape): float32 dequantized through
    gguf's quants for float and quantized types; integer tensors keep their integer dtype."""
    import numpy as np
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    qt = GGMLQuantizationType(ggml_type)
    np_shape = tuple(reversed(shape)) or (1,)
    data = np.frombuffer(raw, dtype=np.uint8)
    if qt in _PLAIN_DTYPES:
        return data.view(_PLAIN_DTYPES[qt]).reshape(np_shape)
    out = dequantize(data.reshape(quant_shape_to_byte_shape(np_shape, qt)), qt)
    return np.asarray(out, dtype=np.float32).reshape(np_shape)
