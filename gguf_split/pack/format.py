"""The pack container's format facts in one place: magic, version, the head, record and tail layouts, the
record kinds and codecs, the tensor codec and part names, and the limits a reader applies (as gguf-py's
constants.py keeps GGUF's). docs/pack-format.md is the specification; the writer, the index and the
reader take every number and name from here.

    head      16 bytes   magic, u32 version, u32 flags
    records   ...        each a 40-byte RecordHeader + body
    index     1 record   kind INDEX, body = a zstd frame of UTF-8 JSON
    tail      32 bytes   u64 index offset, u64 index length, u32 version, u32 flags, magic
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview | mmap.mmap

MAGIC = b"GGUFPACK"
VERSION = 2  # what this writer writes
READABLE_VERSIONS = (1, 2)  # what this reader reads
SUFFIX = ".ggufpack"

HEAD = struct.Struct("<8sII")  # magic, version, flags
RECORD = struct.Struct("<BBHIQQ16s")  # kind, codec, reserved u16, reserved u32, body length, decoded length, xxh3
TAIL = struct.Struct("<QQII8s")  # index record offset, index record length, version, flags, magic

# record kinds
KIND_DATA = 1
KIND_INDEX = 2
# record codecs: the body is the bytes, or one zstd frame that declares its content size
REC_STORED = 0
REC_ZSTD = 1

# tensor codecs (the index's "codec"; codec.py codes them)
CODEC_PLAIN = "plain"
CODEC_DELTA = "delta"
CODEC_REQUANT = "requant"  # version 2: a quant as the residual against our re-quantization of its source
CODEC_FPLANES = "fplanes"  # version 2: F16/BF16 sign/exponent planes rANS-coded, mantissa noise stored
# the codecs each version knows (a reader refuses any other, naming it)
VERSION_CODECS = {1: (CODEC_PLAIN, CODEC_DELTA), 2: (CODEC_PLAIN, CODEC_DELTA, CODEC_REQUANT, CODEC_FPLANES)}

# parts of a file (the index's "parts"): ["b", blob index], ["t", tensor index], ["z", zero bytes]
PART_BLOB = "b"
PART_TENSOR = "t"
PART_ZEROS = "z"

# limits a reader applies before allocating anything a pack merely claims
MAX_INDEX_BYTES = 256 << 20  # decoded JSON index
MAX_RECORD_BYTES = 1 << 30  # any one decoded record (a chunk is far smaller)
MAX_FILE_BYTES = 1 << 50
MAX_META_BYTES = 16 << 20  # the caller's kind and meta, as JSON (a writer's limit)

# how gguf-split cuts a GGUF header into blobs (a reader need not know): KV records at least this long are
# blobs of their own, so a tokenizer every file holds is stored once
BIG_KV = 4096


class Corrupt(Exception):
    """A pack whose contents break the format (the reader turns it into GGUFSplitError naming the pack)."""


class UnknownCodec(Corrupt):
    """A tensor coded with a codec (or a requant port) this version does not know: a newer writer's pack."""


def need(cond: bool, problem: str) -> None:
    if not cond:
        raise Corrupt(problem)


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a file as the index lists it: `kind` PART_BLOB, PART_TENSOR or PART_ZEROS, `value` the
    blob or tensor index, or the number of zero bytes."""

    kind: str
    value: int

    def to_json(self) -> list[object]:
        return [self.kind, self.value]


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """The 40 bytes in front of every record's body."""

    kind: int
    codec: int
    body_length: int
    decoded_length: int
    digest: bytes  # xxh3-128 of the body
    reserved: tuple[int, int] = (0, 0)

    SIZE = RECORD.size

    def encode(self) -> bytes:
        return RECORD.pack(self.kind, self.codec, *self.reserved, self.body_length, self.decoded_length, self.digest)

    @classmethod
    def read(cls, buf: Buffer, offset: int) -> "RecordHeader":
        kind, codec, r1, r2, body_length, decoded, digest = RECORD.unpack_from(buf, offset)
        return cls(kind, codec, body_length, decoded, digest, (r1, r2))


@dataclass(frozen=True, slots=True)
class Tail:
    """The last 32 bytes: where the index record is, and the version again."""

    index_offset: int
    index_length: int
    version: int = VERSION
    flags: int = 0
    magic: bytes = MAGIC

    SIZE = TAIL.size

    def encode(self) -> bytes:
        return TAIL.pack(self.index_offset, self.index_length, self.version, self.flags, self.magic)

    @classmethod
    def read(cls, buf: Buffer, file_size: int) -> "Tail":
        return cls(*TAIL.unpack_from(buf, file_size - TAIL.size))


def encode_head(version: int = VERSION) -> bytes:
    return HEAD.pack(MAGIC, version, 0)
