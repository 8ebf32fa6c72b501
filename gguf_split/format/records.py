"""Records: what gguf-split writes into its files besides the tensors, and how it reads them back.

Every file gguf-split writes starts with its own KV records (keys `gguf_split.*`):
- `gguf_split.header_xxh3`, first: the seal, xxh3-128 (hex) of the whole header with this value zeroed;
  any change to a header (one flipped bit, an edited KV) breaks it;
- `gguf_split.version` (layout version), `gguf_split.role` ("adaptor" or "shared");
- `gguf_split.tensor_digests`: xxh3-128 of every tensor of this file, 16 bytes each, in order;
- `gguf_split.header_index`, last of gguf-split's records: byte offsets of the tensor infos, the data
  section and every KV after it, so a reader finds everything without walking a 262k-token vocabulary.

A shared file (split k >= 1 of the tasks that load it) adds `gguf_split.content_id` (xxh3-128 over its
position, alignment, architecture and its tensors' names, types, shapes and digests) and `split.no`. It
names no task: adding tasks later never rewrites a shipped file.

An adaptor (split 0 of its task) adds the task name; the ordered list of the task's other files
(`gguf_split.files.*`: name, content id, size, xxh3-128 and sha256 of the whole file, for positions 1..k);
the task's tensor index (`gguf_split.tensor_files`: for every tensor of the model, the position of the
file holding it); what a bit-exact restore takes (`gguf_split.source.*`, one entry per original file: a
model given as llama.cpp shards has several): name, size, whole-file xxh3-128, GGUF version, tensor count,
the original tensor-info records, the original KVs it had to replace (`split.*`) with their positions, the
other shards' KVs, and any non-zero padding byte; then `split.no` = 0, `split.count`, `split.tensors.count`,
and every KV of the original model in its order (llama.cpp reads model metadata from split 0 only).

An adaptor of a task made by quantizing (`split --quantize`) adds `gguf_split.quantize.*` (QuantizeRecords):
the recipe (llama-quantize's TYPE and file type, its other options, the imatrix's file name and sha256, a
template's name and the sha256 of its types), the llama.cpp build that quantized it (versions and
`llama_print_system_info()`), the full-precision input it was made from (name, size, xxh3-128), the sha256
of the quantized file restore gives, and per tensor (in the quantized file's order) the source tensor's xxh3-128, its source type and
its unit key (what `add` matches to reuse the stored bytes). Adaptors without them (every split made
before) are plain tasks.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import xxhash
from gguf.constants import GGUFValueType, Keys

from ..errors import GGUFSplitError
from .gguf import (
    ALIGNMENT_KEY,
    ARCHITECTURE_KEY,
    KV,
    WRITE_VERSION,
    GGUFFile,
    Header,
    KnownRecords,
    SCALAR_FORMATS,
    TensorInfo,
    _check_data_layout,
    _Cursor,
    align_up,
    decode_value,
    encode_kv,
    encode_prefix,
    encode_tensor_info,
    known_records,
    read_known_kvs,
    read_kv_at,
    read_prefix,
    read_tensor_infos_at,
)
from .names import check_bare_name

LAYOUT_VERSION = 2
ROLE_ADAPTOR = "adaptor"
ROLE_SHARED = "shared"
ROLE_FOUNDATION_V1 = "foundation"  # layout 1 (gguf-split 0.1)

U8, U16, U32, U64, I32, STR, ARR = (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32,
                                     GGUFValueType.UINT64, GGUFValueType.INT32, GGUFValueType.STRING,
                                     GGUFValueType.ARRAY)
SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)

OWN_PREFIX = "gguf_split."
K_SEAL = "gguf_split.header_xxh3"
K_VERSION = "gguf_split.version"
K_ROLE = "gguf_split.role"
K_INDEX = "gguf_split.header_index"
K_DIGESTS = "gguf_split.tensor_digests"
K_CONTENT_ID = "gguf_split.content_id"
K_TASK = "gguf_split.task"
K_FILES_NAME = "gguf_split.files.name"
K_FILES_ID = "gguf_split.files.content_id"
K_FILES_SIZE = "gguf_split.files.size"
K_FILES_XXH3 = "gguf_split.files.xxh3"
K_FILES_SHA256 = "gguf_split.files.sha256"
K_TENSOR_FILES = "gguf_split.tensor_files"
K_CUT = "gguf_split.cut"  # how shared groups were cut into files ("none", "role", "role:6", "tensor"); absent: none
K_CUT_SCHEME = "gguf_split.cut_scheme"  # the tensor name -> (role, layer) mapping the cut used (assemble/plan/roles.py)
K_SRC_NAME = "gguf_split.source.name"
K_SRC_SIZE = "gguf_split.source.size"
K_SRC_XXH3 = "gguf_split.source.xxh3"
K_SRC_VERSION = "gguf_split.source.version"
K_SRC_NTENSORS = "gguf_split.source.tensor_count"
K_SRC_TENSOR_INFOS = "gguf_split.source.tensor_infos"
K_SRC_REPLACED_KVS = "gguf_split.source.replaced_kvs"
K_SRC_SHARD_KVS = "gguf_split.source.shard_kvs"
K_SRC_GAPS = "gguf_split.source.gaps"
K_Q_TYPE = "gguf_split.quantize.type"
K_Q_FTYPE = "gguf_split.quantize.ftype"
K_Q_OPTIONS = "gguf_split.quantize.options"
K_Q_IMATRIX_NAME = "gguf_split.quantize.imatrix.name"
K_Q_IMATRIX_SHA256 = "gguf_split.quantize.imatrix.sha256"
K_Q_TEMPLATE_NAME = "gguf_split.quantize.template.name"
K_Q_TEMPLATE_SHA256 = "gguf_split.quantize.template.types_sha256"
K_Q_BUILD_KEYS = "gguf_split.quantize.build.keys"
K_Q_BUILD_VALUES = "gguf_split.quantize.build.values"
K_Q_SRC_NAME = "gguf_split.quantize.source.name"
K_Q_SRC_SIZE = "gguf_split.quantize.source.size"
K_Q_SRC_XXH3 = "gguf_split.quantize.source.xxh3"
K_Q_SHA256 = "gguf_split.quantize.sha256"
K_Q_SRC_DIGESTS = "gguf_split.quantize.source.tensor_digests"
K_Q_SRC_TYPES = "gguf_split.quantize.source.tensor_types"
K_Q_UNIT_KEYS = "gguf_split.quantize.unit_keys"
UNIT_KEY_SIZE = 32  # sha256

# Every record gguf-split writes among its own (before the header index), with its value type: read with
# a few struct calls (gguf.read_known_kv); anything else in their place goes through the general reader.
_OWN_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    K_SEAL: (STR, None), K_VERSION: (U32, None), K_ROLE: (STR, None), K_INDEX: (ARR, U64), K_DIGESTS: (ARR, U8),
    K_CONTENT_ID: (STR, None), K_TASK: (STR, None), K_CUT: (STR, None), K_CUT_SCHEME: (U32, None),
    K_FILES_NAME: (ARR, STR), K_FILES_ID: (ARR, STR), K_FILES_SIZE: (ARR, U64), K_FILES_XXH3: (ARR, STR),
    K_FILES_SHA256: (ARR, STR), K_TENSOR_FILES: (ARR, U16), K_SRC_NAME: (ARR, STR), K_SRC_SIZE: (ARR, U64),
    K_SRC_XXH3: (ARR, STR), K_SRC_VERSION: (ARR, U32), K_SRC_NTENSORS: (ARR, U64), K_SRC_TENSOR_INFOS: (ARR, U8),
    K_SRC_REPLACED_KVS: (ARR, U8), K_SRC_SHARD_KVS: (ARR, U8), K_SRC_GAPS: (ARR, U8), SPLIT_NO: (U16, None),
    SPLIT_COUNT: (U16, None), SPLIT_TENSORS: (I32, None), ARCHITECTURE_KEY: (STR, None), ALIGNMENT_KEY: (U32, None),
}
OWN_RECORDS: KnownRecords = known_records(_OWN_TYPES)
_NUMBERS = {t: struct.Struct(SCALAR_FORMATS[t]) for t in (U16, U32, I32)}
_U64 = struct.Struct("<Q")


def _strings_checked(buf: Any, kv: KV) -> list[str | bytes]:
    """The strings of a string-array record the strict reader (or read_known_kvs) read from `buf`: every
    length was checked to fit, and together they fill the record to kv.end. What decode_value gives (a
    string that is not valid UTF-8 as bytes), without checking again: an adaptor lists each of its up
    to 32 files in four string arrays, read on every load."""
    blob = bytes(buf[kv.value_start + 12 : kv.end])
    out: list[str | bytes] = []
    append, unpack, pos = out.append, _U64.unpack_from, 0
    for _ in range(kv.count):
        (n,) = unpack(blob, pos)
        raw = blob[pos + 8 : pos + 8 + n]
        pos += 8 + n
        try:
            append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            append(raw)
    return out


def _decode_checked(buf: Any, kv: KV) -> object:
    """The value of one of our string or number records, `kv` a record the strict reader read from `buf`
    (its span checked against the file): what decode_value gives, without checking the span again."""
    if kv.vtype is STR:
        raw = buf[kv.value_start + 8 : kv.end]
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            return bytes(raw)
    number = _NUMBERS.get(kv.vtype)
    return number.unpack_from(buf, kv.value_start)[0] if number is not None else decode_value(buf, kv.vtype,
                                                                                               kv.value_start)[0]


DIGEST_SIZE = 16
HEX_DIGEST = 32
PREFIX_SIZE = 24  # magic, version, n_tensors, n_kv
_UNSEALED = "0" * HEX_DIGEST
_NOT_DECODED = object()
MAX_POSITIONS = 0xFFFF  # split.no is a u16


def blob_kv(key: str, data: bytes) -> bytes:
    return encode_kv(key, ARR, data, U8)


def identity_record(name: str, shape: tuple[int, ...], ggml_type: int, digest: bytes) -> bytes:
    return encode_tensor_info(name, shape, ggml_type, 0) + digest


def content_id(position: int, alignment: int, architecture: str | None,
               tensors: Iterable[tuple[str, tuple[int, ...], int, bytes]]) -> str:
    """A shared file's identity: everything its bytes depend on (its position is in the file)."""
    h = _content_id_start(position, alignment, architecture)
    for name, shape, ggml_type, digest in tensors:
        h.update(identity_record(name, shape, ggml_type, digest))
    return h.hexdigest()


def _content_id_start(position: int, alignment: int, architecture: str | None) -> "xxhash.xxh3_128":
    h = xxhash.xxh3_128()
    h.update(b"gguf-split shared file\0" + struct.pack("<IHI", LAYOUT_VERSION, position, alignment))
    h.update((architecture or "").encode() + b"\0")
    return h


_NO_OFFSET = bytes(8)


def content_id_of_records(buf: Any, tensors: Sequence[TensorInfo], digests: bytes, position: int, alignment: int,
                          architecture: str | None) -> str:
    """content_id() of a file's tensors from their tensor-info records in `buf`, without re-encoding them.

    A record is encode_tensor_info(name, shape, type, offset) byte for byte: the reader decodes the name
    as strict UTF-8 (re-encoding gives its bytes back) and takes n_dims, dims and type as written; so the
    record with its last 8 bytes (the offset) zeroed is the identity record's first part. `digests`: one
    16-byte digest per tensor, in order (the file's tensor_digests record, its length checked)."""
    h = _content_id_start(position, alignment, architecture)
    parts: list[bytes] = []
    at = 0
    for t in tensors:
        parts += (buf[t.start : t.end - 8], _NO_OFFSET, digests[at : at + DIGEST_SIZE])
        at += DIGEST_SIZE
    h.update(b"".join(parts))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Writing headers


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its identity and where its bytes come from (an open input and an offset)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int
    digest: bytes
    src: GGUFFile
    src_offset: int


def data_offsets(tensors: Sequence[OutTensor], alignment: int) -> list[int]:
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        pos += align_up(t.nbytes, alignment)
    return offsets


@dataclass
class BuiltHeader:
    data: bytes  # header bytes up to the end of the tensor infos (padding to data_start not included)
    data_start: int
    offsets: list[int]  # tensor data offsets
    file_size: int  # data_start + every tensor, each padded to the alignment (as llama.cpp writes)


def build_header(own_kvs: Sequence[bytes], tail_kvs: Sequence[bytes], tensors: Sequence[OutTensor],
                 alignment: int) -> BuiltHeader:
    """A sealed, indexed header: the seal, `own_kvs` (gguf-split's records), the index, `tail_kvs` (the
    original model's KVs, byte for byte), then the tensor infos."""
    offsets = data_offsets(tensors, alignment)
    infos = b"".join(encode_tensor_info(t.name, t.shape, t.ggml_type, o) for t, o in zip(tensors, offsets))
    n_kv = 1 + len(own_kvs) + 1 + len(tail_kvs)
    prefix = encode_prefix(WRITE_VERSION, len(tensors), n_kv)
    own = encode_kv(K_SEAL, STR, _UNSEALED) + b"".join(own_kvs)
    index_len = len(encode_kv(K_INDEX, ARR, [0] * (2 + len(tail_kvs)), U64))
    kv_offsets, pos = [], len(prefix) + len(own) + index_len
    for kv in tail_kvs:
        kv_offsets.append(pos)
        pos += len(kv)
    ti_start = pos
    data_start = align_up(ti_start + len(infos), alignment)
    index = encode_kv(K_INDEX, ARR, [ti_start, data_start, *kv_offsets], U64)
    header = prefix + own + index + b"".join(tail_kvs) + infos
    seal = xxhash.xxh3_128(header).hexdigest().encode()
    at = seal_offset()
    data_len = offsets[-1] + align_up(tensors[-1].nbytes, alignment) if tensors else 0
    return BuiltHeader(header[:at] + seal + header[at + len(seal):], data_start, offsets, data_start + data_len)


def seal_offset() -> int:
    """Byte offset of the seal's hex text: it is the first KV, right after the 24-byte prefix."""
    return _SEAL_AT


_SEAL_AT = PREFIX_SIZE + len(encode_kv(K_SEAL, STR, _UNSEALED)) - HEX_DIGEST
_UNSEALED_BYTES = _UNSEALED.encode()


def shared_kvs(*, position: int, cid: str, digests: bytes, architecture: str | None, alignment: int) -> list[bytes]:
    kvs = [
        encode_kv(K_VERSION, U32, LAYOUT_VERSION),
        encode_kv(K_ROLE, STR, ROLE_SHARED),
        encode_kv(K_CONTENT_ID, STR, cid),
        blob_kv(K_DIGESTS, digests),
        encode_kv(SPLIT_NO, U16, position),
    ]
    if architecture is not None:
        kvs.append(encode_kv(ARCHITECTURE_KEY, STR, architecture))
    if alignment != 32:
        kvs.append(encode_kv(ALIGNMENT_KEY, U32, alignment))
    return kvs


@dataclass(slots=True, unsafe_hash=True)
class FileRef:
    """One entry of an adaptor's list of files: the file at `position` (its split.no) for this task.
    Read-only through `Final` (mypy --strict refuses an assignment), not frozen=True: every load builds
    one per file of the task (up to 32), and a frozen dataclass costs 3x as much to build."""

    position: Final[int]
    name: Final[str]
    content_id: Final[str]
    size: Final[int]
    xxh3: Final[str]  # whole file, hex xxh3-128 (what `xxh128sum` prints)
    sha256: Final[str]


@dataclass(frozen=True)
class SourceFile:
    """One original file of a task (a model, or one shard of a model given as llama.cpp shards)."""

    name: str
    size: int
    xxh3: str
    version: int
    n_tensors: int


@dataclass
class SourceRecords:
    """What an adaptor records to rebuild the original file(s) byte for byte (built by scan)."""

    files: list[SourceFile]
    tensor_infos: bytes  # every source file's tensor-info block, in order
    replaced_kvs: bytes  # source 0: (u32 position + the KV record) for each split.* KV it had
    shard_kvs: bytes  # sources 1..n-1: (u64 n_kv, u64 byte length, the KV records) each
    gaps: bytes  # (u32 source, u64 offset, u64 length, bytes) of every non-zero padding run
    kept_kvs: list[bytes]  # source 0's KVs except split.*, in order: the adaptor's tail


@dataclass(frozen=True)
class RecipeRecord:
    """How a quantized task was made (llama-quantize's parameters), as recorded: equal recipes give equal
    bytes for equal source tensors on one llama.cpp build."""

    qtype: str  # llama-quantize's TYPE, canonical (Q4_K_M)
    ftype: int  # its llama_ftype (general.file_type of the result)
    options: str = ""  # llama-quantize's other options, canonical ("--pure --output-tensor-type q8_0")
    imatrix_name: str = ""  # file name ("" without an imatrix)
    imatrix_sha256: str = ""
    template_name: str = ""  # a template model whose per-tensor types were taken ("" without)
    template_sha256: str = ""  # sha256 of the template's (tensor name, type) list

    def differences(self, other: "RecipeRecord") -> list[str]:
        """What differs from `other`, in words (empty: the same recipe)."""
        out = []
        if (self.qtype, self.options) != (other.qtype, other.options):
            out.append(f"type {other.qtype} {other.options}".rstrip() + f" instead of {self.qtype} {self.options}".rstrip())
        if self.imatrix_sha256 != other.imatrix_sha256:
            out.append(f"imatrix {other.imatrix_name or 'none'} instead of {self.imatrix_name or 'none'}"
                       + (f" (sha256 {self.imatrix_sha256[:12]}...)" if self.imatrix_sha256 else ""))
        if self.template_sha256 != other.template_sha256:
            out.append(f"template {other.template_name or 'none'} instead of {self.template_name or 'none'}")
        return out


@dataclass(frozen=True)
class QuantizeRecords:
    """A quantized task's records (see the module docstring): per-tensor lists in the quantized file's order."""

    recipe: RecipeRecord
    build: dict[str, str]  # the llama.cpp build that quantized it (Backend.build_info())
    source_name: str  # the full-precision input (not kept)
    source_size: int
    source_xxh3: str
    sha256: str  # of the quantized file (what restore gives back)
    source_digests: bytes  # xxh3-128 of each source tensor, 16 bytes each
    source_types: tuple[int, ...]
    unit_keys: bytes  # UNIT_KEY_SIZE bytes each

    def kvs(self) -> list[bytes]:
        r = self.recipe
        return [
            encode_kv(K_Q_TYPE, STR, r.qtype),
            encode_kv(K_Q_FTYPE, U32, r.ftype),
            encode_kv(K_Q_OPTIONS, STR, r.options),
            encode_kv(K_Q_IMATRIX_NAME, STR, r.imatrix_name),
            encode_kv(K_Q_IMATRIX_SHA256, STR, r.imatrix_sha256),
            encode_kv(K_Q_TEMPLATE_NAME, STR, r.template_name),
            encode_kv(K_Q_TEMPLATE_SHA256, STR, r.template_sha256),
            encode_kv(K_Q_BUILD_KEYS, ARR, list(self.build), STR),
            encode_kv(K_Q_BUILD_VALUES, ARR, list(self.build.values()), STR),
            encode_kv(K_Q_SRC_NAME, STR, self.source_name),
            encode_kv(K_Q_SRC_SIZE, U64, self.source_size),
            encode_kv(K_Q_SRC_XXH3, STR, self.source_xxh3),
            encode_kv(K_Q_SHA256, STR, self.sha256),
            blob_kv(K_Q_SRC_DIGESTS, self.source_digests),
            encode_kv(K_Q_SRC_TYPES, ARR, list(self.source_types), U32),
            blob_kv(K_Q_UNIT_KEYS, self.unit_keys),
        ]

    @classmethod
    def read(cls, f: "SplitFile", n_tensors: int) -> "QuantizeRecords | None":
        """The records of an adaptor (None: not a quantized task), checked against its `n_tensors`."""
        if K_Q_TYPE not in f.header.kv_by_key:
            return None
        ftype = f.record(K_Q_FTYPE, U32)
        size = f.record(K_Q_SRC_SIZE, U64)
        assert isinstance(ftype, int) and isinstance(size, int)
        recipe = RecipeRecord(f.text(K_Q_TYPE), ftype, f.text(K_Q_OPTIONS), f.text(K_Q_IMATRIX_NAME),
                        f.text(K_Q_IMATRIX_SHA256), f.text(K_Q_TEMPLATE_NAME), f.text(K_Q_TEMPLATE_SHA256))
        keys = f.array(K_Q_BUILD_KEYS, STR)
        build = dict(zip(keys, f.array(K_Q_BUILD_VALUES, STR, len(keys))))
        digests, units = f.blob(K_Q_SRC_DIGESTS), f.blob(K_Q_UNIT_KEYS)
        types = f.array(K_Q_SRC_TYPES, U32, n_tensors)
        if len(digests) != n_tensors * DIGEST_SIZE or len(units) != n_tensors * UNIT_KEY_SIZE:
            raise GGUFSplitError(f.path, "gguf-split quantize records do not match the model's tensors: damaged")
        return cls(recipe, build, f.text(K_Q_SRC_NAME), size, f.text(K_Q_SRC_XXH3), f.text(K_Q_SHA256), digests,
                   tuple(types), units)

    def unit_key(self, i: int) -> bytes:
        return self.unit_keys[i * UNIT_KEY_SIZE:(i + 1) * UNIT_KEY_SIZE]

    def source_digest(self, i: int) -> bytes:
        return self.source_digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]


def adaptor_kvs(*, task: str, files: Sequence[FileRef], tensor_files: Sequence[int], digests: bytes,
                source: SourceRecords, n_model_tensors: int, cut: str = "none", cut_scheme: int = 1,
                quantize: QuantizeRecords | None = None) -> list[bytes]:
    """gguf-split's records of an adaptor (the tail, source.kept_kvs, follows the index). `cut` and
    `cut_scheme`: how the split cut its shared groups, so that a later `add` cuts new ones the same way;
    `quantize`: a quantized task's recipe and provenance."""
    s = source
    return [
        encode_kv(K_VERSION, U32, LAYOUT_VERSION),
        encode_kv(K_ROLE, STR, ROLE_ADAPTOR),
        encode_kv(K_TASK, STR, task),
        encode_kv(K_CUT, STR, cut),
        encode_kv(K_CUT_SCHEME, U32, cut_scheme),
        encode_kv(K_FILES_NAME, ARR, [f.name for f in files], STR),
        encode_kv(K_FILES_ID, ARR, [f.content_id for f in files], STR),
        encode_kv(K_FILES_SIZE, ARR, [f.size for f in files], U64),
        encode_kv(K_FILES_XXH3, ARR, [f.xxh3 for f in files], STR),
        encode_kv(K_FILES_SHA256, ARR, [f.sha256 for f in files], STR),
        encode_kv(K_TENSOR_FILES, ARR, list(tensor_files), U16),
        blob_kv(K_DIGESTS, digests),
        encode_kv(K_SRC_NAME, ARR, [f.name for f in s.files], STR),
        encode_kv(K_SRC_SIZE, ARR, [f.size for f in s.files], U64),
        encode_kv(K_SRC_XXH3, ARR, [f.xxh3 for f in s.files], STR),
        encode_kv(K_SRC_VERSION, ARR, [f.version for f in s.files], U32),
        encode_kv(K_SRC_NTENSORS, ARR, [f.n_tensors for f in s.files], U64),
        blob_kv(K_SRC_TENSOR_INFOS, s.tensor_infos),
        blob_kv(K_SRC_REPLACED_KVS, s.replaced_kvs),
        blob_kv(K_SRC_SHARD_KVS, s.shard_kvs),
        blob_kv(K_SRC_GAPS, s.gaps),
        *(quantize.kvs() if quantize is not None else []),
        encode_kv(SPLIT_NO, U16, 0),
        encode_kv(SPLIT_COUNT, U16, len(files) + 1),
        encode_kv(SPLIT_TENSORS, I32, n_model_tensors),
    ]


# ---------------------------------------------------------------------------------------------------------
# Reading gguf-split's files back


class NotASplitFile(GGUFSplitError):
    """A valid GGUF start, but not written by gguf-split (no seal record first)."""


@dataclass(slots=True)
class _Remembered:
    """One header as a SplitFile parsed it from `head` (a copy of the file's first bytes) in a file of `size`
    bytes; `header` None: the header did not fit in HeaderMemo.READ bytes (parsed from the map each time)."""

    size: int
    head: bytes | None = None
    header: Header | None = None
    tail: dict[str, tuple[int, int]] | None = None
    sealed: bool = False  # check_seal passed on `head`
    derived: dict[str, object] = field(default_factory=dict)  # SplitFile.remembered: computed from `head`


T = TypeVar("T")


class HeaderMemo:
    """Headers of gguf-split files parsed and checked in this process, per (path, device, inode): a file
    opened again (a task loaded again, a swap back) whose size and header bytes are the remembered ones is
    given the remembered parse, seal check and derived records (SharedInfo) instead of doing them again.

    Why it is safe: the key only finds a candidate; a hit needs the file's size and every byte of its
    header (0 to the end of the tensor infos) equal to the copy the parse read, compared in full on each
    open. Every check on a header is a function of exactly those bytes, that size and the path, and is
    computed from the copy (never from the map, which another process could change meanwhile), so a hit
    gives exactly what parsing and checking again would: an edited, truncated or replaced file, a reused
    inode, a restored mtime all miss. The tensor data is not covered, as it is not by a fresh parse.
    Headers longer than READ bytes (an adaptor's holds the vocabulary) are not kept: parsed from the map
    each time, as without a memo. At most MAX_FILES entries (oldest dropped first), MAX_FILES * READ bytes."""

    FIRST = 16 << 10  # read first: a shared file's header is a few KiB
    READ = 64 << 10  # then this much, if the header is longer
    MAX_FILES = 4096

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int, int], _Remembered] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> _Remembered | None:
        return self._entries.get(key)

    def put(self, key: tuple[str, int, int], entry: _Remembered) -> _Remembered:
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self.MAX_FILES:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = entry
        return entry

    def clear(self) -> None:
        """Forget everything (benchmarks use it to time a process's first open of each file)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class SplitFile(GGUFFile):
    """A file gguf-split wrote, opened through its header index: gguf-split's records and the tensor infos
    are read and checked; the original model's KVs (a 262k-token vocabulary, say) are located but not
    walked (`tail`: key -> record span, in file order; `get` checks and decodes one on demand).
    `header.kvs` holds gguf-split's records only. With keep_fd=False no descriptor is kept (the map has its
    own), so dropping the last reference releases everything. `check_seal()` before trusting a header."""

    tail: dict[str, tuple[int, int]]

    def __init__(self, path: str | os.PathLike[str], *, keep_fd: bool = True, memo: HeaderMemo | None = None) -> None:
        """With `memo`, a header parsed and checked before is taken from it (HeaderMemo says when)."""
        self._values: dict[str, Any] = {}  # our records' strings and numbers, once decoded (kv_value)
        self._head: bytes | None = None  # the copy of the header every header read uses (a memo's), else None
        self._remembered: _Remembered | None = None
        self._just_compared = False  # the header was compared with the remembered copy by this open
        super().__init__(path, parse=False)
        try:
            if memo is not None:
                self._open_remembered(memo)
            if not keep_fd:
                os.close(self.fd)
                self.fd = -1
            if memo is None:
                self._parse_indexed(self.mm)
        except BaseException:
            self.close()
            raise

    def _open_remembered(self, memo: HeaderMemo) -> None:
        """The remembered header if this file's size and header bytes are the remembered ones; else parse a
        copy of the file's first bytes (the map if the header is longer) and remember that. The bytes are
        read with pread, not through the map: the header's page is not faulted in (~8 us a file)."""
        key = (self.path, *self.identity)
        mm = self.mm
        got = memo.get(key)
        if got is not None and got.size == self.size:
            if got.head is None:
                self._parse_indexed(mm)
                return
            if os.pread(self.fd, len(got.head), 0) == got.head:
                assert got.header is not None and got.tail is not None
                self.header, self.tail, self._head, self._remembered = got.header, got.tail, got.head, got
                self._just_compared = True
                return
        copy = b""
        for n in sorted({min(self.size, memo.FIRST), min(self.size, memo.READ)}):
            copy = os.pread(self.fd, n, 0)
            try:
                self._parse_indexed(copy)  # reads within the copy only: success there is success on the file
                break
            except GGUFSplitError:
                if len(copy) == self.size:
                    raise
        else:
            self._parse_indexed(mm)  # a header longer than READ (or a damaged one: this says what is wrong)
            memo.put(key, _Remembered(self.size))
            return
        self._head = copy[: self.header.tensor_info_end]
        self._remembered = memo.put(key, _Remembered(self.size, self._head, self.header, self.tail))
        self._just_compared = True

    @property
    def header_bytes(self) -> Any:
        """What header reads read: the remembered copy of the header (HeaderMemo), else the map."""
        mm = self.mm  # refused once closed, either way
        return self._head if self._head is not None else mm

    def remembered(self, name: str, compute: Callable[["SplitFile"], T]) -> T:
        """compute(self), once per remembered header: `compute` must read the header through header_bytes
        and this file's records only (so its result is a function of the remembered bytes and the path)."""
        got = self._remembered
        if got is None:
            return compute(self)
        if name not in got.derived:
            got.derived[name] = compute(self)
        return got.derived[name]  # type: ignore[return-value]

    def _parse_indexed(self, mm: Any) -> None:
        """Parse the header from `mm`: the map, or a copy of the file's first bytes (reads stay within it)."""
        p = self.path
        version, n_tensors, n_kv = read_prefix(mm, p)
        own, index = self._own_records(mm, n_kv)
        ti_start, data_start, offsets = self._index_offsets(mm, index, n_kv, len(own), own[-1].end)
        by_key = {kv.key: kv for kv in own}
        if len(by_key) != len(own):
            raise GGUFSplitError(p, "duplicate gguf-split record: damaged")
        tail, alignment = self._locate_tail(mm, offsets, ti_start, by_key)
        alignment = self._own_alignment(mm, by_key.get(ALIGNMENT_KEY), alignment)
        tensors = read_tensor_infos_at(mm, ti_start, n_tensors, alignment, p)
        if align_up(tensors[-1].end if tensors else ti_start, alignment) != data_start:
            raise GGUFSplitError(p, "header index: data offset does not match the tensor infos: damaged")
        self.header = Header(p, version, own, tensors, alignment, ti_start, data_start, self.size,
                             by_key, {t.name: t for t in tensors})
        _check_data_layout(self.header)
        self.tail = tail

    def _own_records(self, mm: Any, n_kv: int) -> tuple[list[KV], KV]:
        """gguf-split's records: from the seal (first) to the header index (last of ours)."""
        own: list[KV] = []
        pos = PREFIX_SIZE
        while len(own) < n_kv:
            run, pos = read_known_kvs(mm, pos, OWN_RECORDS, K_INDEX, n_kv - len(own))
            if not run:  # one the fast path leaves to the strict reader (which reads it or says what is wrong)
                run = [read_kv_at(mm, pos, self.path)]
                pos = run[0].end
            if not own and run[0].key != K_SEAL:
                raise NotASplitFile(self.path, "not written by gguf-split (no gguf-split seal record)")
            own += run
            kv = run[-1]  # a run ends at the index
            if kv.key == K_INDEX:
                if kv.vtype is not ARR or kv.subtype is not U64:
                    break
                return own, kv
        raise GGUFSplitError(self.path, "gguf-split header index is missing or damaged")

    def _index_offsets(self, mm: Any, index: KV, n_kv: int, n_own: int, after_own: int) -> tuple[int, int, list[int]]:
        """(tensor-info start, data start, each original KV's offset) from the index, checked: in order,
        in range, the first right after our records (the original KVs follow the index back to back)."""
        if index.count != 2 + n_kv - n_own:  # checked before decoding: the count comes from the file
            raise GGUFSplitError(self.path, "header index does not match the header: damaged")
        values = struct.unpack_from(f"<{index.count}Q", mm, index.value_start + 12)  # a checked record
        ti_start, data_start, offsets = values[0], values[1], list(values[2:])
        starts = [*offsets, ti_start]
        if (starts[0] != after_own or ti_start > self.size
                or (offsets and any(a >= b for a, b in zip(starts, starts[1:])))):
            raise GGUFSplitError(self.path, "header index offsets are out of order or out of range: damaged")
        return ti_start, data_start, offsets

    def _locate_tail(self, mm: Any, offsets: list[int], ti_start: int,
                     own_keys: Container[str]) -> tuple[dict[str, tuple[int, int]], int]:
        """The original KVs located by the index (key -> record span), not decoded; the alignment among them."""
        tail: dict[str, tuple[int, int]] = {}
        alignment = 32
        for start, end in zip(offsets, [*offsets[1:], ti_start]):
            cur = _Cursor(mm, start, min(end, len(mm)), self.path)  # bounded by the next record: a damaged index cannot run on
            key = cur.text("metadata key")
            vtype = cur.value_type(f"value type of {key!r}")
            if key in tail or key in own_keys:
                raise GGUFSplitError(self.path, f"duplicate key {key!r}")
            tail[key] = (start, end)
            if key == ALIGNMENT_KEY:
                if vtype is not U32:
                    raise GGUFSplitError(self.path, f"{ALIGNMENT_KEY} must be a u32, not {vtype.name}")
                alignment = cur.u32(ALIGNMENT_KEY)
        return tail, alignment

    def _own_alignment(self, mm: Any, kv: KV | None, alignment: int) -> int:
        """A shared file records its alignment among our records (`kv`); either way it must be a power of two."""
        if kv is not None:
            if kv.vtype is not U32:
                raise GGUFSplitError(self.path, f"{ALIGNMENT_KEY} must be a u32, not {kv.vtype.name}")
            alignment = decode_value(mm, kv.vtype, kv.value_start)[0]
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFSplitError(self.path, f"{ALIGNMENT_KEY} = {alignment} is not a power of two")
        return alignment

    def __enter__(self) -> "SplitFile":
        return self

    def tail_kv(self, key: str) -> KV:
        """The original KV `key`, checked against the file (every length) and its index span."""
        start, end = self.tail[key]
        kv = read_kv_at(self.header_bytes, start, self.path)
        if kv.end != end or kv.key != key:
            raise GGUFSplitError(self.path, f"metadata record {key!r} does not match the header index: damaged")
        return kv

    def kv_value(self, key: str, *, expect: GGUFValueType | None = None) -> Any:
        """As GGUFFile.kv_value; a string or number of our records is decoded once (a load asks for a file's
        role, version and position several times). Arrays are decoded on every call: the caller owns the list."""
        if expect is not None:
            return super().kv_value(key, expect=expect)
        return self._value(self.header.kv_by_key[key])

    def _value(self, kv: KV) -> Any:
        """The value of `kv`, one of this file's records (checked by the parse)."""
        got = self._values.get(kv.key, _NOT_DECODED)
        if got is _NOT_DECODED:
            if kv.vtype is ARR:
                if kv.subtype is STR:
                    return _strings_checked(self.header_bytes, kv)
                return decode_value(self.header_bytes, ARR, kv.value_start, path=self.path)[0]
            got = self._values[kv.key] = _decode_checked(self.header_bytes, kv)
        return got

    def get(self, key: str, default: object = None, *, expect: GGUFValueType | None = None) -> object:
        if key in self.header.kv_by_key:
            return self.kv_value(key, expect=expect)
        if key in self.tail:
            kv = self.tail_kv(key)
            if expect is not None and kv.vtype is not expect:
                raise GGUFSplitError(self.path, f"{key} is a {kv.vtype.name}, expected a {expect.name}")
            return decode_value(self.header_bytes, kv.vtype, kv.value_start)[0]
        return default

    # -- gguf-split's own records ------------------------------------------------------------------------

    def check_seal(self) -> None:
        """Any change to the header (one flipped bit, an edited KV) breaks the seal: ~1.5 ms for a 7 MB
        header (Gemma-3's tokenizer), so the loader checks it on every open. A header taken from a
        HeaderMemo is compared with the remembered copy, byte for byte (the first check after the open takes
        the open's comparison), and the seal is checked once per copy (on the copy); a header that changed
        since is checked on the map, as any other."""
        first = self.header.kvs[0] if self.header.kvs else None
        at = _SEAL_AT
        if first is None or first.key != K_SEAL or first.vtype is not STR or first.end != at + HEX_DIGEST:
            raise GGUFSplitError(self.path, "header damaged: its seal record is missing or altered")
        got, self._just_compared, compared = self._remembered, False, self._just_compared
        if got is not None and got.head is not None and (compared or self.mm[: len(got.head)] == got.head):
            if not got.sealed:
                self._check_seal_of(got.head)
                got.sealed = True
            return
        self._check_seal_of(self.mm)

    def _check_seal_of(self, buf: Any) -> None:
        at = _SEAL_AT
        with memoryview(buf) as whole:
            h = xxhash.xxh3_128(whole[:at])
            h.update(_UNSEALED_BYTES)
            h.update(whole[at + HEX_DIGEST : self.header.tensor_info_end])
            sealed = h.hexdigest().encode() == whole[at : at + HEX_DIGEST]
        if not sealed:
            raise GGUFSplitError(self.path, "header damaged: its bytes do not match the seal gguf-split wrote "
                                            "(modified or corrupted after the split)")

    def record(self, key: str, vtype: GGUFValueType, subtype: GGUFValueType | None = None) -> object:
        kv = self.header.kv_by_key.get(key)
        if kv is None or kv.vtype is not vtype or (subtype is not None and kv.subtype is not subtype):
            raise GGUFSplitError(self.path, f"gguf-split record {key!r} is missing or damaged")
        return self._value(kv)

    def text(self, key: str) -> str:
        v = self.record(key, STR)
        if not isinstance(v, str):
            raise GGUFSplitError(self.path, f"gguf-split record {key!r} is not valid UTF-8: damaged")
        return v

    def blob(self, key: str) -> bytes:
        kv = self.header.kv_by_key.get(key)
        if kv is None or kv.vtype is not ARR or kv.subtype is not U8:
            raise GGUFSplitError(self.path, f"gguf-split record {key!r} is missing or damaged")
        return bytes(self.header_bytes[kv.value_start + 12 : kv.end])

    def array(self, key: str, subtype: GGUFValueType, n: int | None = None) -> list:  # type: ignore[type-arg]
        values = self.record(key, ARR, subtype)
        assert isinstance(values, list)
        if n is not None and len(values) != n:
            raise GGUFSplitError(self.path, f"gguf-split record {key!r} holds {len(values)} entries, {n} expected: "
                                            "damaged")
        if subtype is STR and any(not isinstance(v, str) for v in values):
            raise GGUFSplitError(self.path, f"gguf-split record {key!r} is not valid UTF-8: damaged")
        return values

    @property
    def role(self) -> str | None:
        kv = self.header.kv_by_key.get(K_ROLE)
        if kv is None or kv.vtype is not STR:
            return None
        v = self._value(kv)
        return v if isinstance(v, str) else None

    @property
    def layout_version(self) -> int | None:
        kv = self.header.kv_by_key.get(K_VERSION)
        return self._value(kv) if kv is not None and kv.vtype is U32 else None

    def require(self, role: str) -> None:
        """This file is a gguf-split `role` of the layout this version reads."""
        version = self.layout_version
        if version == 1:
            raise GGUFSplitError(self.path, "written by gguf-split 0.1 (layout 1), which this version reads only to "
                                            "restore: run `gguf-split restore` on its adaptors, then split the "
                                            "restored models again")
        if version != LAYOUT_VERSION:
            raise GGUFSplitError(self.path, f"written by a gguf-split with layout version {version}; this one reads "
                                            f"{LAYOUT_VERSION}")
        actual = self.role
        if actual != role:
            what = f"a gguf-split {actual} file" if actual else "not a gguf-split file"
            raise GGUFSplitError(self.path, f"expected a gguf-split {role} file, but this is {what}")

    def digest_bytes(self) -> bytes:
        """Every tensor's digest, 16 bytes each, in order (the record's length checked)."""
        raw = self.blob(K_DIGESTS)
        n = len(self.header.tensors)
        if len(raw) != n * DIGEST_SIZE:
            raise GGUFSplitError(self.path, f"gguf-split record {K_DIGESTS!r} holds {len(raw) // DIGEST_SIZE} digests "
                                            f"for {n} tensors: damaged")
        return raw

    def digests(self) -> list[bytes]:
        raw = self.digest_bytes()
        return [raw[i:i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]

    def split_no(self) -> int:
        v = self.record(SPLIT_NO, U16)
        assert isinstance(v, int)
        return v


def open_split_file(path: str | os.PathLike[str], *, keep_fd: bool = True) -> GGUFFile:
    """A gguf-split file through its index (SplitFile), any other GGUF parsed in full."""
    try:
        return SplitFile(path, keep_fd=keep_fd)
    except NotASplitFile:
        return GGUFFile(path)


# ---------------------------------------------------------------------------------------------------------
# Parsed records


@dataclass
class SharedInfo:
    """A shared file's records (its header was sealed and is checked by the caller)."""

    path: str
    position: int
    content_id: str
    architecture: str | None
    n_tensors: int

    @classmethod
    def read(cls, f: SplitFile) -> "SharedInfo":
        f.require(ROLE_SHARED)
        cid = f.text(K_CONTENT_ID)
        position = f.split_no()
        if position < 1:
            raise GGUFSplitError(f.path, f"shared file with split.no {position}: damaged")
        arch = f.get(ARCHITECTURE_KEY)
        architecture = arch if isinstance(arch, str) else None
        expect = content_id_of_records(f.header_bytes, f.header.tensors, f.digest_bytes(), position, f.header.alignment,
                                       architecture)
        if expect != cid:
            raise GGUFSplitError(f.path, "its tensors do not match its recorded content id: damaged")
        return cls(f.path, position, cid, architecture, len(f.header.tensors))


@dataclass
class AdaptorInfo:
    """An adaptor's records, parsed and cross-checked (not against other files: see splitdir/restore)."""

    path: str
    task: str
    files: list[FileRef]  # positions 1..k
    tensor_files: list[int]  # per model tensor (source order): position of the file holding it
    sources: list[SourceFile]
    n_model_tensors: int
    cut: str = "none"  # how the split cut its shared groups; splits made before cuts existed (0.2) record none
    cut_scheme: int = 1
    quantize: QuantizeRecords | None = None  # a quantized task's recipe and provenance

    @classmethod
    def read(cls, f: SplitFile) -> "AdaptorInfo":
        f.require(ROLE_ADAPTOR)
        p = f.path
        task = f.text(K_TASK)
        names = f.array(K_FILES_NAME, STR)
        k = len(names)
        if k > MAX_POSITIONS - 1:
            raise GGUFSplitError(p, f"lists {k} files: damaged")
        ids = f.array(K_FILES_ID, STR, k)
        sizes = f.array(K_FILES_SIZE, U64, k)
        xxh = f.array(K_FILES_XXH3, STR, k)
        sha = f.array(K_FILES_SHA256, STR, k)
        files = [FileRef(i + 1, check_bare_name(n, p, "shared file name"), cid, s, x, h)
                 for i, (n, cid, s, x, h) in enumerate(zip(names, ids, sizes, xxh, sha))]
        if len({fr.name for fr in files}) != k:
            raise GGUFSplitError(p, "lists one file at two positions: damaged")
        src_names = f.array(K_SRC_NAME, STR)
        n_src = len(src_names)
        if n_src < 1:
            raise GGUFSplitError(p, "records no source file: damaged")
        sources = [SourceFile(check_bare_name(n, p, "original file name"), s, x, v, c) for n, s, x, v, c in zip(
            src_names, f.array(K_SRC_SIZE, U64, n_src), f.array(K_SRC_XXH3, STR, n_src),
            f.array(K_SRC_VERSION, U32, n_src), f.array(K_SRC_NTENSORS, U64, n_src))]
        n_model = sum(s.n_tensors for s in sources)
        if f.record(SPLIT_TENSORS, I32) != n_model or f.record(SPLIT_COUNT, U16) != k + 1 or f.split_no() != 0:
            raise GGUFSplitError(p, "split.* records do not match gguf-split's records: damaged")
        tensor_files = f.array(K_TENSOR_FILES, U16, n_model)
        if any(pos > k for pos in tensor_files):
            raise GGUFSplitError(p, "tensor index names a file position the task does not have: damaged")
        if sum(1 for pos in tensor_files if pos == 0) != len(f.header.tensors):
            raise GGUFSplitError(p, "tensor index does not match the adaptor's own tensors: damaged")
        cut, scheme = "none", 1
        if K_CUT in f.header.kv_by_key:
            cut = f.text(K_CUT)
            scheme = f.record(K_CUT_SCHEME, U32)  # type: ignore[assignment]
        return cls(p, task, files, tensor_files, sources, n_model, cut, scheme, QuantizeRecords.read(f, n_model))

    def paths(self) -> list[str]:
        """The task's llama.cpp split list: this adaptor, then its files in order (beside it)."""
        d = os.path.dirname(os.path.abspath(self.path))
        return [os.path.abspath(self.path), *(os.path.join(d, fr.name) for fr in self.files)]


def role_of(f: GGUFFile) -> str | None:
    return f.role if isinstance(f, SplitFile) else None
