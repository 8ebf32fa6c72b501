"""The on-disk layout of a split: what gguf-split adds to the files it writes, and how a model is rebuilt.

foundation.gguf = llama.cpp split 1: `split.no` = 1 (u16), gguf-split's records, the shared tensors.
adaptor-<task>.gguf = llama.cpp split 0: gguf-split's records, `split.no` = 0, `split.count` = 2 (u16),
`split.tensors.count` (i32, the model's tensor count), then every KV of the original model in its order
(llama.cpp reads model metadata from split 0 only), then the task's own tensors.

gguf-split's records come first in each file (keys `gguf_split.*`), so a reader can find
`gguf_split.header_index` (the byte offsets of the tensor infos, the data section and every KV after the
index) without walking a 262k-token vocabulary; the first record, `gguf_split.header_xxh3`, seals the
whole header so `verify` catches any change to it. The adaptor also records what a bit-exact restore takes: the original
GGUF version, the original tensor-info block (names, shapes, types, data offsets, in order), any original
KV it had to replace (`split.*`) with its position, any non-zero padding byte, the original size and
whole-file xxh3-128 (what `xxh128sum` prints), and the foundation's identity.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable, Union

import xxhash
from gguf.constants import GGUFValueType

from .errors import GGUFSplitError
from .gguf_format import (
    ALIGNMENT_KEY,
    KV,
    WRITE_VERSION,
    GGUFFile,
    Header,
    TensorInfo,
    _check_data_layout,
    _Cursor,
    align_up,
    decode_value,
    encode_kv,
    encode_prefix,
    encode_tensor_info,
    read_kv_at,
    read_prefix,
    read_tensor_infos,
    read_tensor_infos_at,
)

FORMAT_VERSION = 1
ROLE_FOUNDATION = "foundation"
ROLE_ADAPTOR = "adaptor"

K_SEAL = "gguf_split.header_xxh3"  # hex xxh3-128 of this file's header with this value as 32 "0"s
K_VERSION = "gguf_split.version"
K_ROLE = "gguf_split.role"
K_TASK = "gguf_split.task"
K_INDEX = "gguf_split.header_index"  # u64 array: offsets of [tensor infos, data section, each KV after this one]
K_FOUNDATION_ID = "gguf_split.foundation.id"  # hex xxh3-128 of the foundation's tensor identities
K_FOUNDATION_FILE = "gguf_split.foundation.file"  # the foundation's file name, beside the adaptor
K_DIGESTS = "gguf_split.tensor_digests"  # u8 array: 16-byte xxh3-128 per tensor of this file, in order
K_SRC_NAME = "gguf_split.source.name"
K_SRC_SIZE = "gguf_split.source.size"
K_SRC_XXH3 = "gguf_split.source.xxh3"  # hex xxh3-128 of the whole original file
K_SRC_VERSION = "gguf_split.source.version"
K_SRC_TENSOR_INFOS = "gguf_split.source.tensor_infos"  # u8 array: the original tensor-info records
K_SRC_REPLACED_KVS = "gguf_split.source.replaced_kvs"  # u8 array: (u32 position + KV record) each
K_SRC_GAPS = "gguf_split.source.gaps"  # u8 array: (u64 offset, u64 length, bytes) of non-zero padding
K_SPLIT_NO, K_SPLIT_COUNT, K_SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (K_SPLIT_NO, K_SPLIT_COUNT, K_SPLIT_TENSORS)
OWN_PREFIX = "gguf_split."
U8, U16, U32, U64, I32, STR, ARR = (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32,
                                     GGUFValueType.UINT64, GGUFValueType.INT32, GGUFValueType.STRING,
                                     GGUFValueType.ARRAY)
DIGEST_SIZE = 16


def blob_kv(key: str, data: bytes) -> bytes:
    return encode_kv(key, ARR, data, U8)


def identity_record(t: TensorInfo | tuple[str, tuple[int, ...], int], digest: bytes) -> bytes:
    name, shape, ggml_type = (t.name, t.shape, t.ggml_type) if isinstance(t, TensorInfo) else t
    return encode_tensor_info(name, shape, ggml_type, 0) + digest


def foundation_id(records: Iterable[bytes]) -> str:
    """The foundation's identity: xxh3-128 over its tensors' (name, type, shape, digest), in order."""
    h = xxhash.xxh3_128()
    for r in records:
        h.update(r)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Writing headers


@dataclass
class PlannedTensor:
    """A tensor to write: where its bytes come from (an open input file and an offset in it)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int
    src: GGUFFile
    src_offset: int
    digest: bytes


def layout_data(tensors: list[PlannedTensor], alignment: int) -> list[int]:
    """Data-section offsets for `tensors` written one after another, each aligned."""
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        pos += (t.nbytes + alignment - 1) // alignment * alignment
    return offsets


def build_header(own_kvs: list[bytes], tail_kvs: list[bytes], tensors: list[PlannedTensor],
                 alignment: int) -> tuple[bytes, list[int], int]:
    """(header bytes without the padding to the data section, tensor data offsets, data section offset).

    `own_kvs` are gguf-split's records, written first; K_INDEX is inserted after them, then `tail_kvs`.
    """
    offsets = layout_data(tensors, alignment)
    infos = b"".join(encode_tensor_info(t.name, t.shape, t.ggml_type, o) for t, o in zip(tensors, offsets))
    n_kv = 1 + len(own_kvs) + 1 + len(tail_kvs)
    prefix = encode_prefix(WRITE_VERSION, len(tensors), n_kv)
    own = encode_kv(K_SEAL, STR, _UNSEALED) + b"".join(own_kvs)
    index_len = len(encode_kv(K_INDEX, ARR, [0] * (2 + len(tail_kvs)), U64))
    tail = b"".join(tail_kvs)
    kv_offsets, pos = [], len(prefix) + len(own) + index_len
    for kv in tail_kvs:
        kv_offsets.append(pos)
        pos += len(kv)
    ti_start = pos
    data_start = (ti_start + len(infos) + alignment - 1) // alignment * alignment
    index = encode_kv(K_INDEX, ARR, [ti_start, data_start, *kv_offsets], U64)
    header = prefix + own + index + tail + infos
    seal = xxhash.xxh3_128(header).hexdigest().encode()
    at = _seal_offset()
    return header[:at] + seal + header[at + len(seal) :], offsets, data_start


_UNSEALED = "0" * 32


def _seal_offset() -> int:
    """Byte offset of the seal's hex text: it is the first KV, right after the 24-byte prefix."""
    return 24 + len(encode_kv(K_SEAL, STR, _UNSEALED)) - 32


def check_seal(f: GGUFFile) -> None:
    """Any change to a gguf-split file's header (one flipped bit) breaks its seal."""
    first = f.header.kvs[0] if f.header.kvs else None
    at = _seal_offset()
    if first is None or first.key != K_SEAL or first.vtype is not STR or first.end != at + 32:
        raise GGUFSplitError(f.path, "header damaged: its seal record is missing or altered")
    header = bytearray(f.raw(0, f.header.tensor_info_end))
    recorded = bytes(header[at : at + 32])
    header[at : at + 32] = _UNSEALED.encode()
    if xxhash.xxh3_128(bytes(header)).hexdigest().encode() != recorded:
        raise GGUFSplitError(f.path, "header damaged: its bytes do not match the seal gguf-split wrote "
                                     "(modified or corrupted after the split)")


def foundation_kvs(architecture: str | None, fid: str, digests: bytes, alignment: int) -> list[bytes]:
    kvs = []
    if architecture is not None:
        kvs.append(encode_kv("general.architecture", STR, architecture))
    kvs += [
        encode_kv(K_VERSION, U32, FORMAT_VERSION),
        encode_kv(K_ROLE, STR, ROLE_FOUNDATION),
        encode_kv(K_FOUNDATION_ID, STR, fid),
        blob_kv(K_DIGESTS, digests),
        encode_kv(K_SPLIT_NO, U16, 1),
    ]
    if alignment != 32:
        kvs.append(encode_kv(ALIGNMENT_KEY, U32, alignment))
    return kvs


def adaptor_kvs(*, task: str, source: GGUFFile, source_digest: bytes, nonzero_gaps: list[tuple[int, bytes]],
                fid: str, foundation_file: str, digests: bytes) -> tuple[list[bytes], list[bytes]]:
    """(gguf-split's records, the original KVs kept in order) for an adaptor of `source`."""
    h = source.header
    replaced = b"".join(struct.pack("<I", i) + source.raw(kv.start, kv.end)
                        for i, kv in enumerate(h.kvs) if kv.key in SPLIT_KEYS)
    gaps = b"".join(struct.pack("<QQ", off, len(b)) + b for off, b in nonzero_gaps)
    own = [
        encode_kv(K_VERSION, U32, FORMAT_VERSION),
        encode_kv(K_ROLE, STR, ROLE_ADAPTOR),
        encode_kv(K_TASK, STR, task),
        encode_kv(K_FOUNDATION_ID, STR, fid),
        encode_kv(K_FOUNDATION_FILE, STR, foundation_file),
        blob_kv(K_DIGESTS, digests),
        encode_kv(K_SRC_NAME, STR, os.path.basename(source.path)),
        encode_kv(K_SRC_SIZE, U64, source.size),
        encode_kv(K_SRC_XXH3, STR, source_digest.hex()),
        encode_kv(K_SRC_VERSION, U32, h.version),
        blob_kv(K_SRC_TENSOR_INFOS, source.raw(h.tensor_info_start, h.tensor_info_end)),
        blob_kv(K_SRC_REPLACED_KVS, replaced),
        blob_kv(K_SRC_GAPS, gaps),
        encode_kv(K_SPLIT_NO, U16, 0),
        encode_kv(K_SPLIT_COUNT, U16, 2),
        encode_kv(K_SPLIT_TENSORS, I32, len(h.tensors)),
    ]
    kept = [source.raw(kv.start, kv.end) for kv in h.kvs if kv.key not in SPLIT_KEYS]
    return own, kept


# ---------------------------------------------------------------------------------------------------------
# Reading gguf-split's records back


class NotASplitFile(GGUFSplitError):
    """The file is a valid GGUF start but not written by gguf-split (no seal record first)."""


class SplitFile(GGUFFile):
    """A file gguf-split wrote, opened through its header index: gguf-split's own records and the tensor
    infos are read and checked; the original model's KVs (a 262k-token vocabulary, say) are located but
    not walked (`tail`: key -> record span, in file order; `get` checks and decodes one on demand).
    `header.kvs` holds gguf-split's records only. With keep_fd=False no descriptor is kept (the map has
    its own), so dropping the last reference releases everything (the runtime loader's swap relies on it).
    Their header is sealed: `check_seal` before trusting a file that may have been changed."""

    tail: dict[str, tuple[int, int]]

    def __init__(self, path: str | os.PathLike[str], *, keep_fd: bool = True) -> None:
        super().__init__(path, parse=False)
        try:
            if not keep_fd:
                os.close(self.fd)
                self.fd = -1
            self._parse_indexed()
        except BaseException:
            self.close()
            raise

    def _parse_indexed(self) -> None:
        mm, p = self.mm, self.path
        version, n_tensors, n_kv = read_prefix(mm, p)
        own: list[KV] = []
        pos, index = 24, None
        while len(own) < n_kv:
            kv = read_kv_at(mm, pos, p)
            if not own and kv.key != K_SEAL:
                raise NotASplitFile(p, "not written by gguf-split (no gguf-split seal record)")
            own.append(kv)
            pos = kv.end
            if kv.key == K_INDEX:
                index = kv
                break
        if index is None or index.vtype is not ARR or index.subtype is not U64:
            raise GGUFSplitError(p, "gguf-split header index is missing or damaged")
        values = decode_value(mm, index.vtype, index.value_start)[0]
        if len(values) != 2 + n_kv - len(own):
            raise GGUFSplitError(p, "header index does not match the header: damaged")
        ti_start, data_start, offsets = values[0], values[1], values[2:]
        # the original KVs follow the index back to back: pos = offsets[0] < offsets[1] < ... < ti_start
        starts = [*offsets, ti_start]
        if starts[0] != pos or any(a >= b for a, b in zip(starts, starts[1:])) or ti_start > self.size:
            raise GGUFSplitError(p, "header index offsets are out of order or out of range: damaged")
        own_keys = {kv.key for kv in own}
        if len(own_keys) != len(own):
            raise GGUFSplitError(p, "duplicate gguf-split record: damaged")
        tail: dict[str, tuple[int, int]] = {}
        alignment = 32
        for start, end in zip(offsets, starts[1:]):
            cur = _Cursor(mm, start, end, p)  # bounded by the next record: a damaged index cannot run on
            key = cur.text("metadata key")
            vtype = cur.value_type(f"value type of {key!r}")
            if key in tail or key in own_keys:
                raise GGUFSplitError(p, f"duplicate key {key!r}")
            tail[key] = (start, end)
            if key == ALIGNMENT_KEY:
                if vtype is not U32:
                    raise GGUFSplitError(p, f"{ALIGNMENT_KEY} must be a u32, not {vtype.name}")
                alignment = cur.u32(ALIGNMENT_KEY)
        for kv in own:
            if kv.key == ALIGNMENT_KEY:
                if kv.vtype is not U32:
                    raise GGUFSplitError(p, f"{ALIGNMENT_KEY} must be a u32, not {kv.vtype.name}")
                alignment = decode_value(mm, kv.vtype, kv.value_start)[0]
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFSplitError(p, f"{ALIGNMENT_KEY} = {alignment} is not a power of two")
        tensors = read_tensor_infos_at(mm, ti_start, n_tensors, alignment, p)
        if align_up(tensors[-1].end if tensors else ti_start, alignment) != data_start:
            raise GGUFSplitError(p, "header index: data offset does not match the tensor infos: damaged")
        self.header = Header(p, version, own, tensors, alignment, ti_start, data_start, self.size,
                             {kv.key: kv for kv in own}, {t.name: t for t in tensors})
        _check_data_layout(self.header)
        self.tail = tail

    def tail_kv(self, key: str) -> KV:
        """The original KV `key`, checked against the file (every length) and its index span."""
        start, end = self.tail[key]
        kv = read_kv_at(self.mm, start, self.path)
        if kv.end != end or kv.key != key:
            raise GGUFSplitError(self.path, f"metadata record {key!r} does not match the header index: damaged")
        return kv

    def get(self, key: str, default: object = None) -> object:
        if key in self.header.kv_by_key:
            return self.kv_value(key)
        if key in self.tail:
            kv = self.tail_kv(key)
            return decode_value(self.mm, kv.vtype, kv.value_start)[0]
        return default


def open_output(path: str | os.PathLike[str]) -> GGUFFile:
    """A gguf-split file through its index (SplitFile), any other GGUF parsed in full."""
    try:
        return SplitFile(path)
    except NotASplitFile:
        return GGUFFile(path)



def blob(f: GGUFFile, key: str) -> bytes:
    kv = f.header.kv_by_key.get(key)
    if kv is None or kv.vtype is not ARR or kv.subtype is not U8:
        raise GGUFSplitError(f.path, f"gguf-split record {key!r} is missing or damaged")
    return f.raw(kv.value_start + 12, kv.end)


def record(f: GGUFFile, key: str, vtype: GGUFValueType) -> object:
    kv = f.header.kv_by_key.get(key)
    if kv is None or kv.vtype is not vtype:
        raise GGUFSplitError(f.path, f"gguf-split record {key!r} is missing or damaged")
    return f.kv_value(key)


def role_of(f: GGUFFile) -> str | None:
    """gguf-split's role record of a file it wrote (opened as a SplitFile), else None."""
    if not isinstance(f, SplitFile):
        return None
    kv = f.header.kv_by_key.get(K_ROLE)
    return f.kv_value(K_ROLE) if kv is not None and kv.vtype is STR else None


def require_role(f: GGUFFile, role: str) -> None:
    actual = role_of(f)
    if actual != role:
        what = f"a gguf-split {actual}" if actual else "not written by gguf-split"
        raise GGUFSplitError(f.path, f"expected a gguf-split {role}, but this file is {what}")
    version = record(f, K_VERSION, U32)
    if version != FORMAT_VERSION:
        raise GGUFSplitError(f.path, f"written by a gguf-split with layout version {version}; this one reads {FORMAT_VERSION}")


def recorded_digests(f: GGUFFile) -> list[bytes]:
    raw = blob(f, K_DIGESTS)
    n = len(f.header.tensors)
    if len(raw) != n * DIGEST_SIZE:
        raise GGUFSplitError(f.path, f"gguf-split record {K_DIGESTS!r} holds {len(raw) // DIGEST_SIZE} digests "
                                     f"for {n} tensors: damaged")
    return [raw[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] for i in range(n)]


def computed_foundation_id(f: GGUFFile) -> str:
    return foundation_id(identity_record(t, d) for t, d in zip(f.header.tensors, recorded_digests(f)))


# ---------------------------------------------------------------------------------------------------------
# Restore plan: the original file as a list of spans


@dataclass(frozen=True)
class Copy:
    """`nbytes` from `src` at file offset `offset`; `digest` is what the split recorded for them."""

    src: GGUFFile
    offset: int
    nbytes: int
    digest: bytes
    tensor: str


Span = Union[bytes, int, Copy]  # literal bytes, a run of that many zero bytes, or a copy


@dataclass
class RestorePlan:
    task: str
    source_name: str
    size: int
    xxh3: str
    header: Header  # the original header, rebuilt (spans relative to `header_bytes`)
    header_bytes: bytes  # the original bytes [0, end of tensor infos)
    spans: list[Span]  # the whole original file, in order, header included


def check_pair(adaptor: GGUFFile, foundation: GGUFFile) -> None:
    """Refuse an adaptor paired with a foundation of another split (no silent mix of tasks)."""
    require_role(adaptor, ROLE_ADAPTOR)
    require_role(foundation, ROLE_FOUNDATION)
    want = record(adaptor, K_FOUNDATION_ID, STR)
    have = record(foundation, K_FOUNDATION_ID, STR)
    if want != have:
        raise GGUFSplitError(adaptor.path, f"belongs to foundation {want}, but {foundation.path} is foundation {have} "
                                           "(an adaptor from another split?)")


def plan_restore(adaptor: SplitFile, foundation: GGUFFile) -> RestorePlan:
    """Rebuild the original header from the adaptor's records and map every original byte to its source."""
    check_pair(adaptor, foundation)
    path = adaptor.path

    def damaged(what: str) -> GGUFSplitError:
        return GGUFSplitError(path, f"restore record damaged: {what}")

    kept = [adaptor.raw(start, end) for start, end in adaptor.tail.values()]
    raw_replaced = blob(adaptor, K_SRC_REPLACED_KVS)
    pos = 0
    try:
        while pos < len(raw_replaced):
            (where,) = struct.unpack_from("<I", raw_replaced, pos)
            rec_kv = read_kv_at(raw_replaced, pos + 4, path)
            kept.insert(where, raw_replaced[rec_kv.start : rec_kv.end])
            pos = rec_kv.end
    except (struct.error, GGUFSplitError):
        raise damaged(K_SRC_REPLACED_KVS) from None

    version = record(adaptor, K_SRC_VERSION, U32)
    size = record(adaptor, K_SRC_SIZE, U64)
    xxh3 = record(adaptor, K_SRC_XXH3, STR)
    name = record(adaptor, K_SRC_NAME, STR)
    infos = blob(adaptor, K_SRC_TENSOR_INFOS)
    kv_bytes = b"".join(kept)
    # The original's alignment is the adaptor's own (an adaptor keeps its model's general.alignment), so
    # the rebuilt header is checked without walking its KVs again.
    alignment = adaptor.header.alignment
    try:
        head = encode_prefix(int(version), 0, len(kept)) + kv_bytes
        tensors = read_tensor_infos(_Cursor(head + infos, len(head), len(head) + len(infos), path), None, alignment)
        header_bytes = encode_prefix(int(version), len(tensors), len(kept)) + kv_bytes + infos
        read_prefix(header_bytes, path)
        header = Header(path, int(version), [], tensors, alignment, len(head), align_up(len(header_bytes), alignment),
                        int(size), {}, {t.name: t for t in tensors})
        _check_data_layout(header)
    except GGUFSplitError as e:
        raise damaged(e.problem) from None

    gaps: dict[int, bytes] = {}
    raw_gaps = blob(adaptor, K_SRC_GAPS)
    pos = 0
    while pos < len(raw_gaps):
        if pos + 16 > len(raw_gaps):
            raise damaged(K_SRC_GAPS)
        off, n = struct.unpack_from("<QQ", raw_gaps, pos)
        gaps[off] = raw_gaps[pos + 16 : pos + 16 + n]
        pos += 16 + n

    own = {t.name: (t, d) for t, d in zip(adaptor.header.tensors, recorded_digests(adaptor))}
    shared = {t.name: (t, d) for t, d in zip(foundation.header.tensors, recorded_digests(foundation))}
    spans: list[Span] = [header_bytes]
    cursor = header.tensor_info_end

    def fill_gap(start: int, end: int) -> None:
        if start in gaps:
            b = gaps.pop(start)
            if len(b) != end - start:
                raise damaged(f"padding record at byte {start}")
            spans.append(b)
        else:
            spans.append(end - start)

    for t in sorted(header.tensors, key=lambda t: t.offset):
        start = header.data_start + t.offset
        if start > cursor:
            fill_gap(cursor, start)
        src_file, entry = (adaptor, own.get(t.name)) if t.name in own else (foundation, shared.get(t.name))
        if entry is None:
            raise GGUFSplitError(path, f"tensor {t.name!r} is in neither this adaptor nor {foundation.path}")
        st, digest = entry
        if (st.shape, st.ggml_type) != (t.shape, t.ggml_type):
            raise GGUFSplitError(src_file.path, f"tensor {t.name!r} is {st.type_name} {list(st.shape)}, the task "
                                                f"needs {t.type_name} {list(t.shape)}")
        spans.append(Copy(src_file, src_file.header.data_start + st.offset, st.nbytes, digest, t.name))
        cursor = start + t.nbytes
    if header.file_size > cursor:
        fill_gap(cursor, header.file_size)
    if gaps:
        raise damaged(K_SRC_GAPS)
    return RestorePlan(str(record(adaptor, K_TASK, STR)), str(name), int(size), str(xxh3), header, header_bytes, spans)

