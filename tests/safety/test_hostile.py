"""Hostile inputs through the CLI: every bad file, split or spec gets one line naming the file at fault, exit
code 2, no traceback, and nothing is written or changed anywhere.

Each row builds its hostile input by patching bytes of a small valid file (made with gguf's GGUFWriter by
conftest.write_model, or written by a real split) at offsets found by parsing that file with GGUFFile, so
the rows follow the layout instead of hard-coding it. docs/bad-inputs.md is the table of these rows and the
messages they get; test_docs_lists_every_family keeps the two in step.

The rows covering a reader failure run through both `split` and `info`; a few run through a real
`python -m gguf_split` process (the process boundary, a resource limit, a timeout).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import xxhash
from gguf import GGUFEndian, GGUFWriter
from typer.testing import CliRunner

from helpers import base_tensors, write_model
from gguf_split.cli.app import app
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import KV, GGUFFile, Header, TensorInfo, iter_gaps, parse_header
from gguf_split.assemble.split import split

ERROR_PREFIX = "gguf-split: error: "
DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-inputs.md"
HUGE = 1 << 60
CHANGED_TENSOR = "blk.0.attn_q.weight"  # b differs from a here: adaptor-b holds a tensor of its own

# ---------------------------------------------------------------------------------------------------------
# Byte offsets of the fields of a parsed header (GGUF layout: ../shared/NOTES.md)


def key_at(kv: KV) -> int:
    """First byte of a KV's key text (after its u64 length)."""
    return kv.start + 8


def vtype_at(kv: KV) -> int:
    return kv.value_start - 4


def count_at(kv: KV) -> int:
    """An array's u64 element count (after its u32 element type)."""
    return kv.value_start + 4


def ndims_at(t: TensorInfo) -> int:
    return t.start + 8 + len(t.name.encode())


def dim_at(t: TensorInfo, i: int) -> int:
    return ndims_at(t) + 4 + 8 * i


def type_at(t: TensorInfo) -> int:
    return dim_at(t, len(t.shape))


def offset_at(t: TensorInfo) -> int:
    return type_at(t) + 4


def put(data: bytearray, at: int, fmt: str, *values: int) -> None:
    struct.pack_into(fmt, data, at, *values)


def header_of(path: Path) -> Header:
    with GGUFFile(path) as f:
        return f.header


def reseal(data: bytearray) -> None:
    """Recompute a gguf-split file's header seal (what a deliberate forger would do): the seal is the hex
    xxh3-128 of the header bytes with the seal text itself as 32 '0's; it is the first KV's value."""
    h = _parse_bytes(data)
    seal = h.kvs[0]
    at = seal.value_start + 8
    header = bytearray(data[: h.tensor_info_end])
    header[at : at + 32] = b"0" * 32
    data[at : at + 32] = xxhash.xxh3_128(bytes(header)).hexdigest().encode()


def _parse_bytes(data: bytes | bytearray) -> Header:
    return parse_header(bytes(data), len(data), "<bytes>")


# ---------------------------------------------------------------------------------------------------------
# The world every row starts from: valid models, two real splits, an output directory with a file in it


@dataclass(frozen=True)
class World:
    root: Path

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def out(self) -> Path:
        return self.path("out")

    def model(self, name: str = "a") -> Path:
        return self.path("models", f"{name}.gguf")

    def variant(self, name: str, edit: Callable[[bytearray, Header], bytes | bytearray | None],
                src: Path | None = None) -> Path:
        """bad/<name>: a copy of `src` (default models/a.gguf) passed through `edit(bytes, parsed header)`,
        which patches the bytearray in place or returns new bytes."""
        src = src or self.model()
        data = bytearray(src.read_bytes())
        new = edit(data, header_of(src))
        dst = self.path("bad", name)
        dst.parent.mkdir(exist_ok=True)
        dst.write_bytes(bytes(data if new is None else new))
        return dst

    def split_copy(self, name: str, src: str = "split") -> Path:
        """bad/<name>/: a copy of a split directory, to damage."""
        dst = self.path("bad", name)
        shutil.copytree(self.path(src), dst)
        return dst

    def foundation(self, src: str = "split") -> str:
        """The name of the shared file every task of split/ (or other/) loads (named after its content)."""
        return foundation_name(self.path(src))


def foundation_name(directory: Path) -> str:
    names = [n for n in os.listdir(directory) if n.startswith("foundation-") and n.endswith(".gguf")]
    assert len(names) == 1, names
    return names[0]


def _changed(seed: int) -> dict:
    tensors = base_tensors(seed)
    qt, shape, s = tensors[CHANGED_TENSOR]
    tensors[CHANGED_TENSOR] = (qt, shape, s + 777)
    return tensors


def _split_kvs(no: int, count: int, total: int | None) -> Callable[[GGUFWriter], None]:
    def add(w: GGUFWriter) -> None:
        w.add_uint16("split.no", no)
        w.add_uint16("split.count", count)
        if total is not None:
            w.add_int32("split.tensors.count", total)
    return add


def write_big_endian(path: Path) -> None:
    """A real big-endian GGUF, as gguf-py writes it for s390x."""
    w = GGUFWriter(os.fspath(path), "llama", endianess=GGUFEndian.BIG)
    w.add_name("big-endian model")
    w.add_tensor("output_norm.weight", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_world(root: Path) -> World:
    w = World(root)
    models = w.path("models")
    models.mkdir(parents=True)
    write_model(w.model("a"), base_tensors(0))
    write_model(w.model("b"), _changed(0))
    write_model(w.model("c"), base_tensors(7))
    write_model(w.model("d"), _changed(7))
    write_model(w.model("unrelated"), base_tensors(3))
    write_model(w.model("gemma"), base_tensors(0), arch="gemma")
    write_model(w.model("aligned"), base_tensors(0), alignment=64)
    write_model(w.model("shard1"), base_tensors(0), kvs=_split_kvs(1, 3, None))
    write_model(w.model("shard0"), base_tensors(0), kvs=_split_kvs(0, 2, 16))
    write_big_endian(w.model("be"))
    # tiny models: file_cost=0 so that they share a file anyway (the default cost would share nothing)
    # the 0.2 layout (cut none): one foundation per split, which the rows below edit; the records they forge
    # are the same in a cut split
    split({"a": w.model("a"), "b": w.model("b")}, w.path("split"), file_cost=0, cut="none")
    split({"c": w.model("c"), "d": w.model("d")}, w.path("other"), file_cost=0, cut="none")
    w.out.mkdir()
    (w.out / "keep.txt").write_text("a file the user had here\n")
    return w


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "world"
    build_world(root)
    return root


@pytest.fixture
def world(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    root = tmp_path / "world"
    shutil.copytree(pristine, root, symlinks=True)
    monkeypatch.chdir(root)  # a default output (restore without -o) would land inside the snapshot
    return World(root)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: relative path -> sha256 of a file, or its kind (hidden files included)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            rel = os.fspath(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = f"link -> {os.readlink(p)}"
            else:
                out[rel] = stat.filemode(st.st_mode)[0]
    return out


# ---------------------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Call:
    args: list[str]
    named: str  # text the error line must hold: the file (or option) at fault


@dataclass(frozen=True)
class Row:
    id: str
    family: str  # its row in docs/bad-inputs.md
    build: Callable[[World], Call]
    keywords: tuple[str, ...]  # the error line holds one of them
    in_subprocess: bool = False
    xfail: str | None = None
    timeout: float = 20  # seconds, in a subprocess


def split_call(w: World, bad: Path, *, out: Path | None = None) -> Call:
    """`split` of the hostile file first and a good model second."""
    return Call(["split", "-q", "-t", f"bad={bad}", "-t", f"good={w.model('a')}", "-o", str(out or w.out)], str(bad))


def info_call(w: World, bad: Path) -> Call:
    return Call(["info", str(bad)], str(bad))


# Model-file edits: (data, parsed header of models/a.gguf) -> patched in place, or new bytes.
Edit = Callable[[bytearray, Header], "bytes | bytearray | None"]


def kv_of(h: Header, key: str) -> KV:
    return h.kv_by_key[key]


def tensor_of(h: Header, name: str) -> TensorInfo:
    return h.tensor_by_name[name]


def set_u32(where: Callable[[Header], int], value: int) -> Edit:
    return lambda d, h: put(d, where(h), "<I", value)


def set_u64(where: Callable[[Header], int], value: int) -> Edit:
    return lambda d, h: put(d, where(h), "<Q", value)


def set_dims(name: str, dims: tuple[int, ...]) -> Edit:
    def edit(d: bytearray, h: Header) -> None:
        t = tensor_of(h, name)
        for i, v in enumerate(dims):
            put(d, dim_at(t, i), "<Q", v)
    return edit


def rename_key(old: str, new: str) -> Edit:
    assert len(old) == len(new)
    return lambda d, h: d.__setitem__(slice(key_at(kv_of(h, old)), key_at(kv_of(h, old)) + len(old)), new.encode())


def rename_tensor(old: str, new: str) -> Edit:
    assert len(old) == len(new)

    def edit(d: bytearray, h: Header) -> None:
        at = tensor_of(h, old).start + 8
        d[at : at + len(old)] = new.encode()
    return edit


def poke(where: Callable[[Header], int], byte: int) -> Edit:
    return lambda d, h: d.__setitem__(where(h), byte)


def model_row(id: str, family: str, edit: Edit, keywords: tuple[str, ...], *, src: str = "a",
              also_info: bool = True) -> list[Row]:
    """A hostile model file, fed to `split` (and to `info`)."""
    def make(call: Callable[[World, Path], Call]) -> Callable[[World], Call]:
        return lambda w: call(w, w.variant(f"{id}.gguf", edit, w.model(src)))
    rows = [Row(f"split-{id}", family, make(split_call), keywords)]
    return rows + [Row(f"info-{id}", family, make(info_call), keywords)] if also_info else rows


def file_row(id: str, family: str, make_bad: Callable[[World], Path], keywords: tuple[str, ...],
             **kw: object) -> list[Row]:
    """A hostile file that is not a patched model (empty, a real big-endian GGUF...), fed to split and info."""
    return [Row(f"split-{id}", family, lambda w: split_call(w, make_bad(w)), keywords, **kw),
            Row(f"info-{id}", family, lambda w: info_call(w, make_bad(w)), keywords, **kw)]


@functools.lru_cache(maxsize=None)
def model_boundaries() -> tuple[tuple[str, int], ...]:
    """(label, byte offset) of every section boundary of models/a.gguf: inside the prefix, each KV (its start,
    after its value type, its last byte), each tensor info (start, last byte), and the data section (its start,
    each tensor's start, the last tensor byte). Computed at collection from a model made the same way."""
    with tempfile.TemporaryDirectory() as d:
        h = header_of(Path(write_model(Path(d, "m.gguf"), base_tensors(0))))
    cuts = [(f"prefix-at-{n}", n) for n in (4, 8, 16, 23)]
    for i, kv in enumerate(h.kvs):
        cuts += [(f"kv{i}-start", kv.start), (f"kv{i}-after-type", kv.value_start), (f"kv{i}-last-byte", kv.end - 1)]
    for i, t in enumerate(h.tensors):
        cuts += [(f"tensor-info{i}-start", t.start), (f"tensor-info{i}-last-byte", t.end - 1)]
    cuts.append(("data-start", h.data_start))
    cuts += [(f"tensor{i}-data-start", h.data_start + t.offset) for i, t in enumerate(h.tensors) if t.offset]
    cuts.append(("data-last-byte", h.data_end() - 1))
    return tuple(cuts)


def truncation_rows() -> list[Row]:
    rows = []
    for label, at in model_boundaries():
        rows += model_row(f"truncated-{label}", "truncated", lambda d, h, at=at: d[:at],
                          ("truncated", "too short", "can hold at most", "past the end", "holds at most", "bytes left"),
                          also_info=False)  # the same reader errors as through split: once is enough
    return rows


def tiny_claim(kind: str) -> bytes:
    """A file of at most 100 bytes whose single count or length claims 2^60 of something."""
    prefix = lambda n_tensors, n_kv: b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)  # noqa: E731
    key = lambda k: struct.pack("<Q", len(k)) + k  # noqa: E731
    body = {
        "n_kv": prefix(0, HUGE),
        "n_tensors": prefix(HUGE, 0),
        "key-length": prefix(0, 1) + struct.pack("<Q", HUGE) + b"k",
        "string-length": prefix(0, 1) + key(b"k") + struct.pack("<IQ", 8, HUGE),
        "array-count": prefix(0, 1) + key(b"k") + struct.pack("<IIQ", 9, 0, HUGE),
        "string-array-count": prefix(0, 1) + key(b"k") + struct.pack("<IIQ", 9, 8, HUGE),
        "nested-array-count": prefix(0, 1) + key(b"k") + struct.pack("<IIQ", 9, 9, HUGE),
        "inner-array-count": prefix(0, 1) + key(b"k") + struct.pack("<IIQIQ", 9, 9, 1, 0, HUGE),
        "tensor-elements": prefix(1, 0) + key(b"t") + struct.pack("<IQQIQ", 2, 1 << 30, 1 << 30, 0, 0),
    }[kind]
    return body + bytes(max(0, 100 - len(body)))


CLAIMS = ("n_kv", "n_tensors", "key-length", "string-length", "array-count", "string-array-count",
          "nested-array-count", "inner-array-count", "tensor-elements")


def nested_too_deep() -> bytes:
    """One KV holding arrays nested 9 deep (each holding the next), the innermost an empty u8 array."""
    depth = 9
    value = struct.pack("<I", 9) + b"".join(struct.pack("<IQ", 9, 1) for _ in range(depth - 1))
    value += struct.pack("<IQ", 0, 0)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + value


def reader_rows() -> list[Row]:
    """Hostile model files: the reader refuses each before allocating or looping on anything it claims."""
    rows: list[Row] = []
    rows += file_row("empty-file", "empty file", lambda w: w.variant("empty.gguf", lambda d, h: b""), ("empty",))
    rows += file_row("empty-file-subprocess", "empty file",
                     lambda w: w.variant("empty.gguf", lambda d, h: b""), ("empty",), in_subprocess=True)
    rows += model_row("wrong-magic", "wrong magic", lambda d, h: d.__setitem__(slice(0, 4), b"GGML"), ("magic",))
    rows += model_row("gguf-v1", "GGUF v1", lambda d, h: put(d, 4, "<I", 1), ("version 1",))
    rows += model_row("gguf-v99", "unknown GGUF version", lambda d, h: put(d, 4, "<I", 99), ("version 99",))
    rows += file_row("big-endian", "big-endian GGUF", lambda w: w.model("be"), ("big-endian",))
    rows += truncation_rows()
    rows += model_row("claims-2^60-kvs", "n_kv too large", lambda d, h: put(d, 16, "<Q", HUGE), ("key/value pairs",))
    rows += model_row("claims-2^60-tensors", "n_tensors too large", lambda d, h: put(d, 8, "<Q", HUGE),
                      ("tensors, the file can hold",))
    rows += [Row("split-claims-2^60-tokens-subprocess", "array count too large", lambda w: split_call(
        w, w.variant("tokens.gguf", set_u64(lambda h: count_at(kv_of(h, "tokenizer.ggml.tokens")), HUGE))),
        ("claims",), in_subprocess=True)]
    rows += model_row("key-length-2^60", "string length too large",
                      set_u64(lambda h: kv_of(h, "general.name").start, HUGE), ("truncated",))
    rows += model_row("string-value-length-2^60", "string length too large",
                      set_u64(lambda h: kv_of(h, "general.name").value_start, HUGE), ("truncated",))
    rows += model_row("tensor-name-length-2^60", "string length too large",
                      set_u64(lambda h: h.tensors[3].start, HUGE), ("truncated",))
    rows += model_row("f32-array-count-2^60", "array count too large",
                      set_u64(lambda h: count_at(kv_of(h, "tokenizer.ggml.scores")), HUGE), ("array claims",))
    rows += model_row("string-array-count-2^60", "array count too large",
                      set_u64(lambda h: count_at(kv_of(h, "tokenizer.ggml.tokens")), HUGE), ("claims",))
    rows += model_row("array-string-length-2^60", "string length too large",
                      set_u64(lambda h: kv_of(h, "tokenizer.ggml.tokens").value_start + 12, HUGE), ("truncated",))
    rows += model_row("nested-array-count-2^60", "nested array count too large",
                      set_u64(lambda h: count_at(kv_of(h, "test.nested")), HUGE), ("claims",))
    rows += model_row("inner-array-count-2^60", "nested array count too large",
                      set_u64(lambda h: kv_of(h, "test.nested").value_start + 12 + 4, HUGE), ("claims",))
    rows += file_row("arrays-nested-9-deep", "arrays nested too deep",
                     lambda w: w.variant("deep.gguf", lambda d, h: nested_too_deep()), ("nested deeper",))
    rows += model_row("key-not-utf8", "name not UTF-8", poke(lambda h: key_at(kv_of(h, "general.name")), 0xFF),
                      ("UTF-8",))
    rows += model_row("tensor-name-not-utf8", "name not UTF-8", poke(lambda h: h.tensors[2].start + 8, 0xC3),
                      ("UTF-8",))
    rows += model_row("unknown-value-type", "unknown value type",
                      set_u32(lambda h: vtype_at(kv_of(h, "llama.block_count")), 99), ("unknown value type",))
    rows += model_row("unknown-array-element-type", "unknown value type",
                      set_u32(lambda h: kv_of(h, "tokenizer.ggml.scores").value_start, 13), ("unknown value type",))
    rows += model_row("unknown-ggml-type-99", "unknown ggml type",
                      set_u32(lambda h: type_at(h.tensors[1]), 99), ("unknown ggml type",))
    rows += model_row("removed-ggml-type-q4_2", "unknown ggml type",
                      set_u32(lambda h: type_at(h.tensors[1]), 4), ("unknown ggml type",))
    rows += model_row("5-dims", "more than 4 dims", set_u32(lambda h: ndims_at(h.tensors[0]), 5), ("dimensions",))
    rows += model_row("zero-dim", "zero dim", set_dims(CHANGED_TENSOR, (64, 0)), ("zero dimension",))
    rows += model_row("dims-overflow", "overflowing dims", set_dims(CHANGED_TENSOR, (1 << 40, 1 << 40)),
                      ("overflows",))
    rows += model_row("dims-past-end", "dims larger than the file", set_dims(CHANGED_TENSOR, (64, 1 << 40)),
                      ("past the end",))
    rows += model_row("dim-not-block-multiple", "first dim not a multiple of the block size",
                      set_dims(CHANGED_TENSOR, (48, 64)),
                      ("block size",))
    rows += model_row("misaligned-offset", "tensor offset misaligned",
                      lambda d, h: put(d, offset_at(h.tensors[1]), "<Q", h.tensors[1].offset + 1), ("alignment",))
    rows += model_row("offset-2^60", "tensor offset out of range",
                      set_u64(lambda h: offset_at(h.tensors[1]), HUGE), ("past the end",))
    rows += model_row("offset-wraps-2^64", "tensor offset out of range",
                      set_u64(lambda h: offset_at(h.tensors[1]), (1 << 64) - 32), ("past the end",))
    rows += model_row("overlapping-tensors", "tensors overlap",
                      lambda d, h: put(d, offset_at(h.tensors[2]), "<Q", h.tensors[1].offset), ("overlap",))
    rows += model_row("duplicate-kv-key", "duplicate KV key",
                      rename_key("tokenizer.ggml.scores", "tokenizer.ggml.tokens"), ("duplicate key",))
    rows += model_row("duplicate-tensor-name", "duplicate tensor name",
                      rename_tensor("blk.1.attn_q.weight", "blk.0.attn_q.weight"), ("duplicate tensor name",))
    alignment_value = lambda h: kv_of(h, "general.alignment").value_start  # noqa: E731
    rows += model_row("alignment-i32", "general.alignment not u32",
                      set_u32(lambda h: vtype_at(kv_of(h, "general.alignment")), 5), ("must be a u32",), src="aligned")
    rows += model_row("alignment-48", "general.alignment not a power of two",
                      set_u32(alignment_value, 48), ("power of two",), src="aligned")
    rows += model_row("alignment-0", "general.alignment not a power of two",
                      set_u32(alignment_value, 0), ("power of two",), src="aligned")
    return rows


def kv_edit(key: str, edit: Callable[[bytearray, KV], None], *, sealed: bool = False) -> Edit:
    """Patch one gguf-split record of an adaptor; `sealed` recomputes the seal, as a forger would."""
    def apply(d: bytearray, h: Header) -> None:
        edit(d, h.kv_by_key[key])
        if sealed:
            reseal(d)
    return apply


def flip_tensor_byte(name: str) -> Edit:
    def edit(d: bytearray, h: Header) -> None:
        t = tensor_of(h, name)
        d[h.data_start + t.offset + t.nbytes // 2] ^= 0x10
    return edit


FOUNDATION = "<foundation>"  # stands for split/'s foundation-<id>.gguf, whatever its content id


def damaged_split(w: World, file: str, edit: Edit) -> Path:
    """bad/split/: a copy of split/ with `file` patched; returns the damaged file."""
    d = w.path("bad", "split")
    if not d.exists():
        shutil.copytree(w.path("split"), d)
    target = d / (foundation_name(d) if file == FOUNDATION else file)
    data = bytearray(target.read_bytes())
    new = edit(data, header_of(target))
    target.write_bytes(bytes(data if new is None else new))
    return target


def restore_call(adaptor: Path, w: World, *extra: str) -> Call:
    return Call(["restore", "-q", str(adaptor), "-o", str(w.out / "restored.gguf"), *extra], str(adaptor))


def forge_text(key: str, index: int, text: str) -> Edit:
    """Overwrite entry `index` of the string array record `key` (or the string record `key`) with `text`
    of the same byte length, and reseal: a forged record that passes the seal."""
    def edit(d: bytearray, h: Header) -> None:
        kv = h.kv_by_key[key]
        pos = kv.value_start + (12 if kv.vtype == 9 else 0)  # GGUFValueType.ARRAY
        for _ in range(index if kv.vtype == 9 else 0):
            pos += 8 + struct.unpack_from("<Q", d, pos)[0]
        n = struct.unpack_from("<Q", d, pos)[0]
        raw = text.encode()
        assert len(raw) == n, (text, n)
        d[pos + 8 : pos + 8 + n] = raw
        reseal(d)
    return edit


def same_length(prefix: str, n: int) -> str:
    """`prefix` padded with x to `n` characters, ending in .gguf."""
    assert len(prefix) + 5 <= n
    return prefix + "x" * (n - len(prefix) - 5) + ".gguf"


def write_journal(d: Path, body: str | bytes) -> None:
    (d / ".gguf-split-journal").write_bytes(body.encode() if isinstance(body, str) else body)


def journal(renames: list, deletes: list) -> str:
    import json

    return json.dumps({"gguf_split_journal": 1, "renames": renames, "deletes": deletes})


def split_file_rows() -> list[Row]:
    """Adaptors and shared files: paired wrongly, missing, moved, modified after the split, fed back to
    split, forged; and the commit journal of a split directory, damaged or forged."""
    ad_a, ad_b = "adaptor-a.gguf", "adaptor-b.gguf"
    name_kv = lambda d, kv: d.__setitem__(kv.value_start + 8, ord("X"))  # noqa: E731

    def verify_damaged(file: str, edit: Edit) -> Callable[[World], Call]:
        def build(w: World) -> Call:
            bad = damaged_split(w, file, edit)
            return Call(["verify", "-q", str(bad.parent)], str(bad))
        return build

    def verify_files(file: str, edit: Edit) -> Callable[[World], Call]:
        """verify of the two adaptors, by file (their shared file is found beside them)."""
        def build(w: World) -> Call:
            bad = damaged_split(w, file, edit)
            return Call(["verify", "-q", str(bad.parent / ad_a), str(bad.parent / ad_b)], str(bad))
        return build

    def restore_damaged(file: str, edit: Edit, adaptor: str = ad_a) -> Callable[[World], Call]:
        def build(w: World) -> Call:
            bad = damaged_split(w, file, edit)
            return Call(restore_call(bad.parent / adaptor, w).args, str(bad))
        return build

    def foreign_shared(command: str) -> Callable[[World], Call]:
        """other/'s foundation under the name split/'s adaptors record (a download mixed up two splits)."""
        def build(w: World) -> Call:
            d = w.split_copy("foreign")
            ours = d / w.foundation()
            shutil.copy(w.path("other", w.foundation("other")), ours)
            if command == "verify":
                return Call(["verify", "-q", str(d)], str(ours))
            return Call(restore_call(d / ad_a, w).args, str(ours))
        return build

    def foreign_via_option(w: World) -> Call:
        """restore -s DIR, DIR holding another split's file under our name."""
        elsewhere = w.path("bad", "elsewhere")
        elsewhere.mkdir(parents=True)
        shutil.copy(w.path("other", w.foundation("other")), elsewhere / w.foundation())
        return Call(restore_call(w.path("split", ad_a), w, "-s", str(elsewhere)).args, str(elsewhere / w.foundation()))

    def foreign_adaptor_in_dir(w: World) -> Call:
        d = w.split_copy("mixed")
        shutil.copy(w.path("other", "adaptor-c.gguf"), d / "adaptor-c.gguf")
        return Call(["verify", "-q", str(d)], str(d / w.foundation("other")))

    def missing_shared(command: str) -> Callable[[World], Call]:
        def build(w: World) -> Call:
            d = w.split_copy("noshared")
            (d / w.foundation()).unlink()
            args = {"restore": restore_call(d / ad_a, w).args, "verify": ["verify", "-q", str(d)],
                    "info": ["info", str(d)], "info-files": ["info", str(d), "a", "--files"]}[command]
            return Call(args, str(d / w.foundation()))
        return build

    def moved_adaptor(w: World) -> Call:
        """The adaptor copied elsewhere without its shared file: the error names the option to point at it."""
        moved = w.path("bad", "moved")
        moved.mkdir(parents=True)
        shutil.copy(w.path("split", ad_a), moved / ad_a)
        return Call(restore_call(moved / ad_a, w).args, str(moved / w.foundation()))

    def shared_option_missing(w: World) -> Call:
        return Call(restore_call(w.path("split", ad_a), w, "-s", str(w.path("nowhere"))).args, str(w.path("nowhere")))

    def damaged_record_info(w: World) -> Call:
        bad = damaged_split(w, ad_a, lambda d, h: d.__setitem__(
            key_at(h.kv_by_key["gguf_split.source.size"]) + len("gguf_split.source.siz"), ord("f")))
        return Call(["info", str(bad.parent)], str(bad))

    def inflated_size(w: World) -> Call:
        bad = damaged_split(w, ad_a, kv_edit("gguf_split.source.size", lambda d, kv: put(
            d, kv.value_start + 12, "<Q", struct.unpack_from("<Q", d, kv.value_start + 12)[0] + (1 << 40))))
        return Call(restore_call(bad, w).args, str(bad))

    def forged_shared_name(prefix: str) -> Callable[[World], Call]:
        """The adaptor's record of its shared file's name forged to point outside (resealed)."""
        def build(w: World) -> Call:
            n = len(w.foundation())
            bad = damaged_split(w, ad_a, forge_text("gguf_split.files.name", 0, same_length(prefix, n)))
            return Call(restore_call(bad, w).args, str(bad))
        return build

    def forged_source_name(name: str) -> Callable[[World], Call]:
        """The original file name restore writes (`a.gguf`, 6 bytes), forged to leave the output directory
        (resealed); restore -o DIR would write DIR/<name>."""
        def build(w: World) -> Call:
            bad = damaged_split(w, ad_a, forge_text("gguf_split.source.name", 0, name))
            return Call(["restore", "-q", str(bad), "-o", str(w.out)], str(bad))
        return build

    def journal_row(body: Callable[[World], str | bytes], command: str) -> Callable[[World], Call]:
        def build(w: World) -> Call:
            d = w.split_copy("journal")
            write_journal(d, body(w))
            args = {"verify": ["verify", "-q", str(d)], "info": ["info", str(d)],
                    "restore": ["restore", "-q", str(d), "a", "-o", str(w.out / "restored.gguf")],
                    "remove": ["remove", "-q", str(d), "b"],
                    "split": ["split", "-q", "--force", "--file-cost", "0", "-t", f"a={w.model('a')}", "-t",
                              f"b={w.model('b')}", "-o", str(d)],
                    "add": ["add", "-q", str(d), "-t", f"c={w.model('c')}"]}[command]
            return Call(args, str(d / ".gguf-split-journal"))
        return build

    def split_output_as_input(file: str) -> Callable[[World], Call]:
        return lambda w: split_call(w, w.path("split", w.foundation() if file == FOUNDATION else file))

    damaged_journal = "journal is damaged"
    rows = [
        Row("restore-foreign-shared-file", "shared file from another split", foreign_shared("restore"),
            ("another split",)),
        Row("restore-foreign-shared-file-subprocess", "shared file from another split", foreign_shared("restore"),
            ("another split",), in_subprocess=True),
        Row("verify-foreign-shared-file", "shared file from another split", foreign_shared("verify"),
            ("another split",)),
        Row("restore-foreign-shared-file-via-option", "shared file from another split", foreign_via_option,
            ("another split",)),
        Row("verify-dir-without-split", "directory without a split",
            lambda w: Call(["verify", "-q", str(w.path("models"))], str(w.path("models"))),
            ("holds no gguf-split adaptor",)),
        Row("restore-shared-file-missing", "shared file missing", missing_shared("restore"), ("-s/--shared",)),
        Row("verify-shared-file-missing", "shared file missing", missing_shared("verify"), ("-s/--shared",)),
        Row("info-shared-file-missing", "shared file missing", missing_shared("info"), ("-s/--shared",)),
        Row("info-files-shared-file-missing", "shared file missing", missing_shared("info-files"), ("-s/--shared",)),
        Row("verify-foreign-adaptor-in-dir", "shared file missing", foreign_adaptor_in_dir, ("-s/--shared",)),
        Row("restore-moved-adaptor", "adaptor moved without its shared files", moved_adaptor, ("-s/--shared",)),
        Row("restore-moved-adaptor-subprocess", "adaptor moved without its shared files", moved_adaptor,
            ("-s/--shared",), in_subprocess=True),
        Row("restore-shared-option-missing", "adaptor moved without its shared files", shared_option_missing,
            ("-s/--shared: no such file",)),
        Row("restore-shared-file-as-adaptor", "not an adaptor",
            lambda w: restore_call(w.path("split", w.foundation()), w), ("expected a gguf-split adaptor",)),
        Row("restore-model-as-adaptor", "not an adaptor",
            lambda w: restore_call(w.model("a"), w), ("not written by gguf-split",)),
        Row("verify-shared-file-as-adaptor", "not an adaptor",
            lambda w: Call(["verify", "-q", str(w.path("split", w.foundation()))], str(w.path("split", w.foundation()))),
            ("is a shared file",)),
        Row("verify-foundation-tensor-modified", "shared file modified after the split",
            verify_damaged(FOUNDATION, flip_tensor_byte("token_embd.weight")), ("'token_embd.weight' does not match",)),
        Row("restore-foundation-tensor-modified", "shared file modified after the split",
            restore_damaged(FOUNDATION, flip_tensor_byte("token_embd.weight")), ("'token_embd.weight'",)),
        Row("verify-foundation-header-modified", "shared file modified after the split",
            verify_damaged(FOUNDATION, kv_edit("general.architecture", name_kv)), ("header damaged",)),
        Row("restore-foundation-header-modified", "shared file modified after the split",
            restore_damaged(FOUNDATION, kv_edit("general.architecture", name_kv)), ("header damaged",)),
        Row("verify-foundation-padding-modified", "shared file modified after the split",
            verify_damaged(FOUNDATION, lambda d, h: d.__setitem__(next(iter_gaps(h))[0], 1)), ("padding",)),
        Row("verify-foundation-appended", "shared file modified after the split",
            verify_damaged(FOUNDATION, lambda d, h: d + bytes(h.alignment)), ("appended",)),
        Row("restore-foundation-appended", "shared file modified after the split",
            restore_damaged(FOUNDATION, lambda d, h: d + bytes(h.alignment)), ("appended",)),
        Row("verify-foundation-truncated", "shared file modified after the split",
            verify_files(FOUNDATION, lambda d, h: d[:-1]), ("past the end", "truncated")),
        Row("verify-foundation-record-forged", "shared file modified after the split",
            verify_damaged(FOUNDATION, kv_edit("gguf_split.content_id", name_kv, sealed=True)),
            ("content id",)),
        Row("verify-dir-foundation-truncated", "damaged file in a split directory",
            verify_damaged(FOUNDATION, lambda d, h: d[: h.data_start + 1]), ("past the end",)),
        Row("verify-dir-adaptor-truncated", "damaged file in a split directory",
            verify_damaged(ad_b, lambda d, h: d[: h.data_start + 1]), ("past the end",)),
        Row("verify-adaptor-tensor-modified", "adaptor modified after the split",
            verify_damaged(ad_b, flip_tensor_byte(CHANGED_TENSOR)), (f"'{CHANGED_TENSOR}' does not match",)),
        Row("restore-adaptor-tensor-modified", "adaptor modified after the split",
            restore_damaged(ad_b, flip_tensor_byte(CHANGED_TENSOR), ad_b), (f"'{CHANGED_TENSOR}'",)),
        Row("verify-adaptor-header-modified", "adaptor modified after the split",
            verify_damaged(ad_a, kv_edit("general.name", name_kv)), ("header damaged",)),
        Row("restore-adaptor-header-modified", "adaptor modified after the split",
            restore_damaged(ad_a, kv_edit("general.name", name_kv)), ("header damaged",)),
        Row("restore-adaptor-truncated", "adaptor modified after the split",
            restore_damaged(ad_b, lambda d, h: d[: h.data_start + 1], ad_b), ("past the end",)),
        Row("restore-adaptor-size-record-inflated", "adaptor modified after the split", inflated_size,
            ("header damaged",), in_subprocess=True),
        Row("info-dir-damaged-record", "adaptor modified after the split", damaged_record_info,
            ("header damaged",)),
        Row("restore-forged-shared-name-dotdot", "forged file name in an adaptor record", forged_shared_name("../"),
            ("not a plain file name",)),
        Row("restore-forged-shared-name-absolute", "forged file name in an adaptor record",
            forged_shared_name("/etc/"), ("not a plain file name",)),
        Row("restore-forged-original-name-dotdot", "forged file name in an adaptor record",
            forged_source_name("../a.g"), ("not a plain file name",)),
        Row("restore-forged-original-name-absolute", "forged file name in an adaptor record",
            forged_source_name("/tmp/x"), ("not a plain file name",)),
        Row("restore-newline-in-role-record", "control characters in a record",
            restore_damaged(ad_a, kv_edit("gguf_split.role", lambda d, kv: d.__setitem__(kv.value_start + 11, 10))),
            ("header damaged",)),
        Row("restore-newline-in-role-record-resealed", "control characters in a record",
            restore_damaged(ad_a, kv_edit("gguf_split.role", lambda d, kv: d.__setitem__(kv.value_start + 11, 10),
                                          sealed=True)), ("expected a gguf-split adaptor",)),
        Row("split-adaptor-as-input", "split output as input", split_output_as_input(ad_a),
            ("is a gguf-split adaptor",)),
        Row("split-shared-file-as-input", "split output as input", split_output_as_input(FOUNDATION),
            ("is a gguf-split shared",)),
        Row("split-shard1-as-input", "shard of a split model",
            lambda w: split_call(w, w.model("shard1")), ("shard 2 of a 3-file model",)),
        Row("split-shard0-as-input", "shard of a split model",
            lambda w: split_call(w, w.model("shard0")), ("first of 2 shards",)),
        Row("info-fifo-subprocess", "a FIFO instead of a file", lambda w: fifo_call(w, "info"), ("not a regular file",),
            in_subprocess=True, timeout=2),
        Row("split-fifo", "a FIFO, a device or a directory as a model", lambda w: split_call(w, fifo_path(w)),
            ("is a FIFO",)),
        Row("split-dev-zero", "a FIFO, a device or a directory as a model",
            lambda w: split_call(w, Path("/dev/zero")), ("is a character device",)),
        Row("split-directory", "a FIFO, a device or a directory as a model",
            lambda w: split_call(w, w.path("models")), ("is a directory",)),
    ]
    for command in ("verify", "info", "restore", "remove", "split", "add"):
        rows.append(Row(f"{command}-journal-not-json", "commit journal damaged",
                        journal_row(lambda w: "{not json", command), (damaged_journal,)))
    rows += [
        Row("verify-journal-not-utf8", "commit journal damaged", journal_row(lambda w: b"\xff\xfe\x00", "verify"),
            (damaged_journal,)),
        Row("verify-journal-nested-deep", "commit journal damaged", journal_row(lambda w: "[" * 100_000, "verify"),
            (damaged_journal,)),
        Row("verify-journal-wrong-shape", "commit journal damaged",
            journal_row(lambda w: journal([["a", "b", "c"]], []), "verify"), (damaged_journal,)),
        Row("verify-journal-other-version", "commit journal damaged",
            journal_row(lambda w: '{"gguf_split_journal": 99, "renames": [], "deletes": []}', "verify"),
            (damaged_journal,)),
        Row("remove-journal-renames-non-temporary", "commit journal forged",
            journal_row(lambda w: journal([["adaptor-a.gguf", "adaptor-z.gguf"]], []), "remove"),
            ("not a gguf-split temporary",)),
        Row("split-journal-renames-outside", "commit journal forged",
            journal_row(lambda w: journal([[".x.gguf-split-tmp", "../escaped.gguf"]], []), "split"),
            ("not a plain file name",)),
        Row("remove-journal-deletes-outside", "commit journal forged",
            journal_row(lambda w: journal([], [str(w.model("a"))]), "remove"), ("not a plain file name",)),
        Row("add-journal-deletes-parent", "commit journal forged",
            journal_row(lambda w: journal([], [".."]), "add"), ("not a plain file name",)),
        Row("verify-journal-deletes-outside", "commit journal forged",
            journal_row(lambda w: journal([], ["../models/a.gguf"]), "verify"), ("not a plain file name",)),
    ]
    return rows


def fifo_path(w: World) -> Path:
    fifo = w.path("bad", "fifo.gguf")
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    return fifo


def fifo_call(w: World, command: str) -> Call:
    fifo = fifo_path(w)
    return Call([command, str(fifo)], str(fifo))


def write_spec(w: World, text: str | bytes) -> Path:
    spec = w.path("spec.yaml")
    spec.write_bytes(text.encode() if isinstance(text, str) else text)
    return spec


def spec_row(id: str, family: str, text: str | bytes | Callable[[World], str], keywords: tuple[str, ...],
             **kw: object) -> Row:
    """A split spec (paths relative to the spec, which sits in the world's root)."""
    def build(w: World) -> Call:
        body = text(w) if callable(text) else text
        spec = write_spec(w, body)
        return Call(["split", "-q", str(spec)], str(spec))
    return Row(f"spec-{id}", family, build, keywords, **kw)


GOOD_TASKS = "tasks:\n  a: models/a.gguf\n  b: models/b.gguf\n"


def overwrite_input(w: World, name: str) -> str:
    """A spec whose input sits where the split would write: out/<name>."""
    shutil.copy(w.model("a"), w.out / name)
    return f"output: out\ntasks:\n  a: out/{name}\n  b: models/b.gguf\noptions:\n  force: true\n"


def spec_rows() -> list[Row]:
    return [
        spec_row("invalid-yaml", "spec: invalid YAML", "tasks: [a\n", ("invalid YAML",)),
        spec_row("not-utf8", "spec: invalid YAML", b"tasks:\n  a: \xff\xfe.gguf\n", ("UTF-8",)),
        spec_row("not-a-mapping", "spec: wrong types", "- a\n- b\n", ("a spec is a mapping",)),
        spec_row("missing-tasks", "spec: missing key", "output: out\n", ("tasks: missing",)),
        spec_row("missing-output", "spec: missing key", GOOD_TASKS, ("output: missing",)),
        spec_row("unknown-key", "spec: unknown key", GOOD_TASKS + "output: out\nouput: x\n", ("unknown key",)),
        spec_row("unknown-option", "spec: unknown key", GOOD_TASKS + "output: out\noptions:\n  forse: true\n",
                 ("unknown option",)),
        spec_row("threads-not-int", "spec: wrong types", GOOD_TASKS + "output: out\noptions:\n  threads: two\n",
                 ("whole number",)),
        spec_row("threads-zero", "spec: wrong types", GOOD_TASKS + "output: out\noptions:\n  threads: 0\n",
                 ("at least 1",)),
        spec_row("force-not-bool", "spec: wrong types", GOOD_TASKS + "output: out\noptions:\n  force: 'yes'\n",
                 ("true or false",)),
        spec_row("tasks-a-list", "spec: wrong types", "output: out\ntasks: [models/a.gguf]\n", ("tasks: must map",)),
        spec_row("task-path-not-string", "spec: wrong types", "output: out\ntasks:\n  a: 3\n", ("path of a GGUF",)),
        spec_row("output-not-string", "spec: wrong types", GOOD_TASKS + "output: 5\n", ("must be a directory",)),
        spec_row("prefix-not-string", "spec: wrong types", GOOD_TASKS + "output: out\nprefix: 5\n",
                 ("must be a string",)),
        spec_row("bad-task-name", "spec: bad task name", "output: out\ntasks:\n  ../a: models/a.gguf\n",
                 ("task name",)),
        spec_row("task-path-missing", "spec: path does not exist", "output: out\ntasks:\n  a: models/nope.gguf\n",
                 ("file not found",)),
        spec_row("task-path-is-dir", "spec: path does not exist", "output: out\ntasks:\n  a: models\n",
                 ("not a file",)),
        spec_row("output-is-a-file", "spec: path does not exist", GOOD_TASKS + "output: out/keep.txt\n",
                 ("not a directory",)),
        spec_row("duplicate-task-name", "duplicate task names",
                 "output: out\ntasks:\n  a: models/a.gguf\n  a: models/b.gguf\n", ("duplicate key",)),
        Row("spec-output-overwrites-adaptor-input", "output would overwrite an input",
            lambda w: Call(["split", "-q", str(write_spec(w, overwrite_input(w, "adaptor-a.gguf")))],
                           str(w.out / "adaptor-a.gguf")), ("overwrite an input",)),
        Row("spec-missing-file", "spec: path does not exist",
            lambda w: Call(["split", "-q", str(w.path("nope.yaml"))], str(w.path("nope.yaml"))), ("cannot read spec",)),
    ]


def cli_rows() -> list[Row]:
    def tasks(w: World, *items: str) -> list[str]:
        return [x for item in items for x in ("-t", item)]

    a, b = "models/a.gguf", "models/b.gguf"
    return [
        Row("cli-task-without-equals", "split options", lambda w: Call(["split", "-q", "-t", "chat", "-o", "out"],
                                                                        "--task 'chat'"), ("NAME=PATH",)),
        Row("cli-task-path-missing", "path does not exist", lambda w: Call(
            ["split", "-q", *tasks(w, f"a={w.path('nope.gguf')}", f"b={w.model('b')}"), "-o", "out"],
            str(w.path("nope.gguf"))), ("file not found",)),
        Row("cli-duplicate-task-name", "duplicate task names", lambda w: Call(
            ["split", "-q", *tasks(w, f"a={w.model('a')}", f"a={w.model('b')}"), "-o", "out"], "--task a"),
            ("given twice",)),
        Row("cli-same-file-twice", "duplicate task names", lambda w: Call(
            ["split", "-q", *tasks(w, f"a={w.model('a')}", f"b={w.model('a')}"), "-o", "out"], str(w.model("a"))),
            ("given twice",)),
        Row("cli-no-output", "split options", lambda w: Call(["split", "-q", *tasks(w, f"a={a}", f"b={b}")], "-o DIR"),
            ("no output directory",)),
        Row("cli-output-is-a-file", "path does not exist", lambda w: Call(
            ["split", "-q", *tasks(w, f"a={w.model('a')}", f"b={w.model('b')}"), "-o", str(w.out / "keep.txt")],
            str(w.out / "keep.txt")), ("not a directory",)),
        Row("cli-bad-input-output-dir-absent", "output directory not created", lambda w: split_call(
            w, w.variant("v1.gguf", lambda d, h: put(d, 4, "<I", 1)), out=w.path("new-out")), ("version 1",)),
        Row("cli-output-overwrites-input", "output would overwrite an input", lambda w: Call(
            ["split", "-q", "--force", *tasks(w, f"a={overwrite_cli(w)}", f"b={w.model('b')}"), "-o", str(w.out)],
            str(w.out / "adaptor-a.gguf")), ("overwrite an input",)),
        Row("cli-no-tensor-in-common", "unrelated models", lambda w: Call(
            ["split", "-q", *tasks(w, f"a={w.model('a')}", f"u={w.model('unrelated')}"), "-o", "out"],
            str(w.model("unrelated"))), ("no tensor in common",)),
        Row("cli-architecture-differs", "unrelated models", lambda w: Call(
            ["split", "-q", *tasks(w, f"a={w.model('a')}", f"g={w.model('gemma')}"), "-o", "out"],
            str(w.model("gemma"))), ("architecture differs",)),
        Row("restore-output-overwrites-adaptor", "output would overwrite an input", lambda w: Call(
            ["restore", "-q", "--force", str(w.path("split", "adaptor-a.gguf")), "-o",
             str(w.path("split", "adaptor-a.gguf"))], str(w.path("split", "adaptor-a.gguf"))),
            ("one of the split's own files",)),
        Row("restore-output-overwrites-shared-file", "output would overwrite an input", lambda w: Call(
            ["restore", "-q", "--force", str(w.path("split", "adaptor-a.gguf")), "-o",
             str(w.path("split", w.foundation()))], str(w.path("split", w.foundation()))),
            ("one of the split's own files",)),
        Row("restore-output-overwrites-shared-file-via-link", "output would overwrite an input", lambda w: Call(
            ["restore", "-q", "--force", str(w.path("split", "adaptor-a.gguf")), "-o", str(link_to_shared(w))],
            str(link_to_shared(w))), ("one of the split's own files",)),
        Row("restore-output-overwrites-other-tasks-adaptor", "output would overwrite an input", lambda w: Call(
            ["restore", "-q", "--force", str(w.path("split", "adaptor-a.gguf")), "-o",
             str(w.path("split", "adaptor-b.gguf"))], str(w.path("split", "adaptor-b.gguf"))),
            ("is a gguf-split adaptor file; restore elsewhere",)),
        Row("restore-output-overwrites-other-splits-file", "output would overwrite an input", lambda w: Call(
            ["restore", "-q", "--force", str(w.path("split", "adaptor-a.gguf")), "-o",
             str(w.path("other", w.foundation("other")))], str(w.path("other", w.foundation("other")))),
            ("is a gguf-split shared file; restore elsewhere",)),
        Row("restore-output-empty", "output exists", lambda w: Call(
            ["restore", "-q", str(w.path("split", "adaptor-a.gguf")), "-o", ""], "-o/--output"), ("empty path",)),
        Row("split-output-empty", "output exists", lambda w: Call(
            ["split", "-q", *tasks(w, f"a={w.model('a')}", f"b={w.model('b')}"), "-o", ""], "-o/--output"),
            ("empty path",)),
        Row("demo-into-a-file", "output exists", lambda w: Call(["demo", "-q", str(w.out / "keep.txt")],
                                                                str(w.out / "keep.txt")), ("not a directory",)),
        Row("demo-under-a-file", "output exists", lambda w: Call(["demo", "-q", str(w.out / "keep.txt" / "demo")],
                                                                 str(w.out / "keep.txt" / "demo")),
            ("cannot create directory",)),
        Row("restore-output-exists", "output exists", lambda w: Call(
            ["restore", "-q", str(w.path("split", "adaptor-a.gguf")), "-o", str(w.model("b"))], str(w.model("b"))),
            ("already exists",)),  # another model's file (a file already holding a's bytes is kept)
    ]


def link_to_shared(w: World) -> Path:
    """out/shared-link.gguf, a symlink to split/'s shared file (made once per world)."""
    link = w.out / "shared-link.gguf"
    if not os.path.lexists(link):
        os.symlink(w.path("split", w.foundation()), link)
    return link


def overwrite_cli(w: World) -> Path:
    shutil.copy(w.model("a"), w.out / "adaptor-a.gguf")
    return w.out / "adaptor-a.gguf"


ROWS: list[Row] = reader_rows() + split_file_rows() + spec_rows() + cli_rows()


def _params() -> list:
    return [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else [])
            for r in ROWS]


# ---------------------------------------------------------------------------------------------------------
# Running a row


def _limit_output() -> None:
    """In the child: no file may grow past 64 MiB (a runaway restore fails instead of filling the disk)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))


def run_cli(args: list[str], cwd: Path, in_subprocess: bool, timeout: float = 20) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gguf-split ARGS`, in-process or in a real child process."""
    if in_subprocess:
        p = subprocess.run([sys.executable, "-m", "gguf_split", *args], cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, preexec_fn=_limit_output)
        return p.returncode, p.stdout, p.stderr
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception other than the CLI's exit: a bug, show it whole
    return result.exit_code, result.stdout, result.stderr


def check_error_line(code: int, stdout: str, stderr: str, named: str, keywords: tuple[str, ...]) -> str:
    assert "Traceback" not in stderr + stdout, stderr
    assert code == 2, (code, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), line
    assert named in line, f"the error does not name {named!r}: {line}"
    problem = line[len(ERROR_PREFIX) :].replace(named, "")  # a keyword in a file name does not count
    assert any(k.lower() in problem.lower() for k in keywords), f"none of {keywords} in: {line}"
    return line


def documented_messages() -> dict[str, list[re.Pattern[str]]]:
    """docs/bad-inputs.md's table rows: family -> the messages of its last column, as patterns (`<f>` and
    the like stand for a path or a name, `…` for anything)."""
    out: dict[str, list[re.Pattern[str]]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("| ") or len(cells) != 3 or set(cells[0]) <= {"-"}:
            continue
        spans = [a or b for a, b in re.findall(r"``\s?(.+?)\s?``|`([^`]+)`", cells[2])]
        pats = []
        for text in spans:
            parts = re.split(r"(<[a-z0-9 -]+>|…)", text)
            rx = "".join(".+?" if p.startswith("<") and p.endswith(">") else ".*?" if p == "…" else re.escape(p)
                         for p in parts)
            pats.append(re.compile(rx))
        out.setdefault(cells[0], []).extend(pats)
    return out


DOCUMENTED = documented_messages()


@pytest.mark.parametrize("row", _params())
def test_hostile_input(row: Row, world: World) -> None:
    call = row.build(world)
    before = snapshot(world.root)
    code, stdout, stderr = run_cli(call.args, world.root, row.in_subprocess, row.timeout)
    line = check_error_line(code, stdout, stderr, call.named, row.keywords)
    assert snapshot(world.root) == before, "a failed run changed or wrote files"
    message = line[len(ERROR_PREFIX):]
    assert any(p.fullmatch(message) for p in DOCUMENTED.get(row.family, [])), \
        f"docs/bad-inputs.md, row {row.family!r}, does not give this message: {message}"


def test_info_json_of_non_utf8_string_value(world: World) -> None:
    """A string value that is not UTF-8 is legal to carry (split keeps it byte for byte), so `info --json`
    must print valid JSON for it (exit 0), or refuse it with one line (exit 2): never a traceback."""
    import json

    bad = world.variant("arch.gguf", poke(lambda h: kv_of(h, "general.architecture").value_start + 8, 0xFF))
    code, stdout, stderr = run_cli(["info", "--json", str(bad)], world.root, False)
    if code == 2:
        check_error_line(code, stdout, stderr, str(bad), ("UTF-8",))
    else:
        assert code == 0, stderr
        assert json.loads(stdout)["path"] == str(bad)


MARKUP = "[/x]"  # rich markup: a closing tag with no opening one raises MarkupError when rendered


@pytest.mark.parametrize("command", ["split", "info"])
def test_markup_in_file_text_is_printed_literally(command: str, tmp_path: Path) -> None:
    """Text from a file (here an architecture and a tensor name that look like rich markup) is printed as
    it is: the command succeeds and the text shows."""
    a = write_model(tmp_path / "a.gguf", base_tensors(0), arch=MARKUP)
    extra = {**base_tensors(0), MARKUP: (base_tensors(0)["output_norm.weight"][0], (64,), 5)}
    b = write_model(tmp_path / "b.gguf", extra, arch=MARKUP)  # MARKUP only in b: the split report names it
    args = (["split", "-q", "-t", f"a={a}", "-t", f"b={b}", "-o", str(tmp_path / "out")] if command == "split"
            else ["info", b])
    code, stdout, stderr = run_cli(args, tmp_path, False)
    assert code == 0, stderr
    assert MARKUP in stdout


# ---------------------------------------------------------------------------------------------------------
# Claims of huge sizes fail at once, without allocating or looping on them


def best_time_and_peak(path: Path) -> tuple[float, int, GGUFSplitError]:
    """Fastest of 3 GGUFFile opens (all must fail) and the peak Python allocation of one."""
    times, err = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        with pytest.raises(GGUFSplitError) as info:
            GGUFFile(path)
        times.append(time.perf_counter() - t0)
        err = info.value
    tracemalloc.start()
    try:
        with pytest.raises(GGUFSplitError):
            GGUFFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err is not None
    return min(times), peak, err


@pytest.mark.parametrize("kind", CLAIMS)
def test_claimed_sizes_fail_in_milliseconds(kind: str, tmp_path: Path) -> None:
    """A 100-byte file claiming 2^60 of something is refused in milliseconds with bounded memory: the
    claim is checked against the file size before anything is allocated or looped over."""
    data = tiny_claim(kind)
    assert len(data) <= 100
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(data)
    elapsed, peak, err = best_time_and_peak(path)
    assert err.path == str(path)
    assert elapsed < 0.01, f"{kind}: {elapsed * 1000:.1f} ms"
    assert peak < 64 << 10, f"{kind}: {peak} bytes allocated"


def test_deep_nesting_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "deep.gguf"
    path.write_bytes(nested_too_deep())
    elapsed, _, err = best_time_and_peak(path)
    assert "nested deeper" in err.problem and elapsed < 0.01


# ---------------------------------------------------------------------------------------------------------
# The harness itself


def test_field_offsets_match_the_parse(tmp_path: Path) -> None:
    """The offsets the rows patch are the fields they mean: read back, they give the parsed values."""
    path = Path(write_model(tmp_path / "m.gguf", base_tensors(0), alignment=64))
    data = path.read_bytes()
    h = header_of(path)
    for kv in h.kvs:
        assert data[key_at(kv) : key_at(kv) + len(kv.key)] == kv.key.encode()
        assert struct.unpack_from("<I", data, vtype_at(kv))[0] == kv.vtype
        if kv.subtype is not None:
            assert struct.unpack_from("<IQ", data, kv.value_start) == (kv.subtype, kv.count)
    for t in h.tensors:
        assert struct.unpack_from("<I", data, ndims_at(t))[0] == len(t.shape)
        assert tuple(struct.unpack_from("<Q", data, dim_at(t, i))[0] for i in range(len(t.shape))) == t.shape
        assert struct.unpack_from("<IQ", data, type_at(t)) == (t.ggml_type, t.offset)
        assert offset_at(t) + 8 == t.end


def test_reseal_makes_a_patched_header_pass_the_seal(tmp_path: Path) -> None:
    """reseal() really forges the seal (so the forged-record rows test what lies behind it)."""
    from gguf_split.format.records import SplitFile

    w = World(tmp_path)
    w.path("models").mkdir()
    write_model(w.model("a"), base_tensors(0))
    write_model(w.model("b"), _changed(0))
    split({"a": w.model("a"), "b": w.model("b")}, w.path("split"))
    target = w.path("split", "adaptor-a.gguf")
    data = bytearray(target.read_bytes())
    data[key_at(header_of(target).kv_by_key["general.name"]) + len("general.name") + 12] ^= 1
    target.write_bytes(bytes(data))
    with SplitFile(target) as f, pytest.raises(GGUFSplitError, match="header damaged"):
        f.check_seal()
    reseal(data)
    target.write_bytes(bytes(data))
    with SplitFile(target) as f:
        f.check_seal()


def test_world_is_valid(pristine: Path) -> None:
    """The unpatched inputs split, verify and restore: every failure above comes from its patch."""
    w = World(pristine)
    runner = CliRunner()
    assert runner.invoke(app, ["verify", "-q", str(w.path("split"))]).exit_code == 0
    assert runner.invoke(app, ["verify", "-q", str(w.path("other"))]).exit_code == 0
    for name in ("a", "aligned", "be", "shard1"):
        assert runner.invoke(app, ["info", str(w.model(name))]).exit_code == (2 if name == "be" else 0)


def test_docs_lists_every_family() -> None:
    """docs/bad-inputs.md has a row for every family of hostile input tested here."""
    text = DOC.read_text()
    missing = sorted({r.family for r in ROWS if f"| {r.family} |" not in text})
    assert not missing, f"docs/bad-inputs.md lacks rows for: {missing}"
