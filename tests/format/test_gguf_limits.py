"""Limits of the strict GGUF reader: shapes llama.cpp refuses, and sizes a file claims but may not hold.

Why: gguf-split must refuse what llama.cpp's loader (ggml/src/gguf.cpp) refuses, and a header's counts,
lengths, dims and offsets come from the file: every claim must end in one GGUFSplitError naming the file,
in bounded time and memory, never in an allocation of the size claimed. Sparse files (`truncate`) make a
claim of a few GB "almost" true without using disk, so the reader cannot lean on a small file size.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V

from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import (
    GGUFFile,
    align_up,
    encode_kv,
    encode_prefix,
    encode_tensor_info,
    parse_tensor_infos,
)

BLOCK_TYPES = [q for q, (block, _) in GGML_QUANT_SIZES.items() if block > 1]
PLAIN_TYPES = [q for q, (block, _) in GGML_QUANT_SIZES.items() if block == 1]


def gguf_bytes(kvs: list[bytes], infos: list[bytes], *, data: bytes = b"", alignment: int = 32,
               n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """A GGUF from raw KV and tensor-info records, zero padding, then `data` at the data section."""
    head = encode_prefix(3, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(align_up(len(head), alignment) - len(head)) + data


def refused(path: Path) -> GGUFSplitError:
    with pytest.raises(GGUFSplitError) as err:
        GGUFFile(path)
    assert err.value.path == str(path)
    assert str(err.value) == f"{path}: {err.value.problem}"
    return err.value


# ---------------------------------------------------------------------------------------------------------
# Tensors with no dimensions, and tensors smaller than a block.
#
# llama.cpp (gguf.cpp, gguf_init_from_reader): ne[j] = 1 for every j >= n_dims, so a tensor with n_dims = 0
# is a scalar of 1 element; then "ne[0] % blck_size != 0" refuses it for every type whose block holds more
# than one element. A 0-dim F32 (or F16, I32, ...) tensor is a legitimate scalar: 1 element, type-size bytes.


def scalar_file(tmp_path: Path, qtype: int, shape: tuple[int, ...] = ()) -> Path:
    path = tmp_path / f"{Q(qtype).name}-{len(shape)}d.gguf"
    path.write_bytes(gguf_bytes([], [encode_tensor_info("s", shape, int(qtype), 0)], data=bytes(512)))
    return path


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_scalar_of_a_block_type_is_refused(tmp_path: Path, qtype: Q) -> None:
    """It used to be accepted with nbytes = 1 // block * type_size = 0."""
    block = GGML_QUANT_SIZES[qtype][0]
    err = refused(scalar_file(tmp_path, qtype))
    n_dims_at = 24 + 8 + 1  # prefix, name length, name "s"
    assert err.problem == (f"tensor 's' has no dimensions (a scalar: 1 element), but a {qtype.name} block "
                           f"holds {block} elements (at byte {n_dims_at})")


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(1,), (1, 1, 1, 1), "half-block"], ids=str)
def test_fewer_elements_than_a_block_are_refused(tmp_path: Path, qtype: Q, shape: Any) -> None:
    block = GGML_QUANT_SIZES[qtype][0]
    shape = (block // 2, 4) if shape == "half-block" else shape
    err = refused(scalar_file(tmp_path, qtype, shape))
    type_at = 24 + 8 + 1 + 4 + 8 * len(shape)
    assert err.problem == (f"tensor 's': first dimension {shape[0]} is not a multiple of {qtype.name}'s block "
                           f"size {block} (at byte {type_at})")


@pytest.mark.parametrize("qtype", PLAIN_TYPES, ids=lambda q: q.name)
def test_scalar_of_a_plain_type_is_one_element(tmp_path: Path, qtype: Q) -> None:
    with GGUFFile(scalar_file(tmp_path, qtype)) as f:
        (t,) = f.header.tensors
        assert (t.shape, t.nbytes) == ((), GGML_QUANT_SIZES[qtype][1])
        assert len(f.tensor_view(t)) == t.nbytes


def test_scalar_written_by_gguf_writer_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "scalar.gguf"
    w = GGUFWriter(os.fspath(path), "llama")
    w.add_tensor("scale", np.array(2.5, dtype=np.float32))
    w.add_tensor("v", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = {t.name: t for t in GGUFReader(path).tensors}
    with GGUFFile(path) as f:
        t = f.header.tensor_by_name["scale"]
        assert (t.shape, t.nbytes) == ((), 4) and t.nbytes == ref["scale"].n_bytes
        assert f.header.data_start + t.offset == ref["scale"].data_offset
        assert struct.unpack("<f", f.tensor_view(t)) == (2.5,)


SHAPES = [(), (1,), (3,), (1, 1, 1, 1), "block", "block,3", "2block,1,2,1", "block-1,2", "block+1"]


def concrete(shape: Any, block: int) -> tuple[int, ...]:
    if not isinstance(shape, str):
        return shape
    dims = []
    for d in shape.split(","):
        d = d.replace("2block", str(2 * block)).replace("block", str(block))
        dims.append(eval(d, {}))  # "64-1" and the like, from the list above only
    return tuple(dims)


def test_no_accepted_tensor_has_zero_bytes() -> None:
    """Every ggml type x a set of small shapes: accepted means nbytes = elements / block x type size > 0
    and ne0 a multiple of the block (ne0 = 1 with no dims); anything else (also a zero dim) is refused by name."""
    accepted = 0
    for qtype, (block, type_size) in GGML_QUANT_SIZES.items():
        for raw_shape in SHAPES:
            shape = concrete(raw_shape, block)
            rec = encode_tensor_info("t", shape, int(qtype), 0)
            n = int(np.prod(shape, dtype=object)) if shape else 1
            ne0 = shape[0] if shape else 1
            if ne0 % block or n == 0:  # (block-1, 2) of a plain type is (0, 2): no element
                with pytest.raises(GGUFSplitError, match=r"^mem: tensor 't'"):
                    parse_tensor_infos(rec, "mem", 32)
                continue
            (t,) = parse_tensor_infos(rec, "mem", 32)
            assert t.nbytes == n // block * type_size > 0, (qtype.name, shape)
            accepted += 1
    assert accepted > len(GGML_QUANT_SIZES) * 3


# ---------------------------------------------------------------------------------------------------------
# Claimed sizes near 2^31, 2^32, 2^63 and 2^64 in every field, in small files and in sparse files.

CLAIMS_U64 = [(1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 63, (1 << 64) - 1]
CLAIMS_U32 = [(1 << 31) - 1, 1 << 31, (1 << 32) - 1]
SPARSE_SIZE = 5 << 30  # a 5 GiB sparse file: claims up to 2^32 bytes are "almost" (or really) satisfiable
SCALAR_TYPES = [V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.FLOAT32, V.BOOL, V.UINT64, V.INT64,
                V.FLOAT64]
ELEMENT_SIZES = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
                 V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8, V.STRING: 8, V.ARRAY: 12}
TENSOR_SHAPE = (2, 1, 1, 1)  # I8: 2 bytes; every dim is there to patch


class Base:
    """A small valid GGUF (alignment KV, a string, an array of every element type, a nested array, one
    4-dim I8 tensor) and the byte offset and width of every field a claim can be patched into."""

    def __init__(self) -> None:
        fields: dict[str, tuple[int, int]] = {"n_tensors": (8, 8), "n_kv": (16, 8)}
        kvs, pos = [], 24

        def add(rec: bytes, key: str) -> int:
            nonlocal pos
            kvs.append(rec)
            start, pos = pos, pos + len(rec)
            return start + 8 + len(key) + 4  # the value

        fields["key-length"] = (24, 8)
        fields["alignment"] = (add(encode_kv("general.alignment", V.UINT32, 32), "general.alignment"), 4)
        fields["string-length"] = (add(encode_kv("k.str", V.STRING, "abc"), "k.str"), 8)
        for t in SCALAR_TYPES:
            key = f"k.arr.{t.name.lower()}"
            fields[f"count-{t.name.lower()}"] = (add(encode_kv(key, V.ARRAY, [1, 0], t), key) + 4, 8)
        at = add(encode_kv("k.arr.string", V.ARRAY, ["a", "b"], V.STRING), "k.arr.string")
        fields["count-string"] = (at + 4, 8)
        fields["string-in-array-length"] = (at + 12, 8)
        inner = [struct.pack("<IQ", V.UINT8, 2) + b"\1\2", struct.pack("<IQ", V.UINT8, 1) + b"\3"]
        nested = (struct.pack("<Q", 8) + b"k.nested" + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 2) + b"".join(inner))
        at = add(nested, "k.nested")
        fields["count-array"] = (at + 4, 8)
        fields["inner-array-count"] = (at + 12 + 4, 8)
        info = encode_tensor_info("t", TENSOR_SHAPE, int(Q.I8), 0)
        fields["tensor-name-length"] = (pos, 8)
        fields["n_dims"] = (pos + 9, 4)
        for i in range(4):
            fields[f"dim{i}"] = (pos + 13 + 8 * i, 8)
        fields["tensor-offset"] = (pos + 13 + 32 + 4, 8)
        self.data = gguf_bytes(kvs, [info], data=b"\7\7" + bytes(30))
        self.data_start = len(self.data) - 32
        self.fields = fields

    def patched(self, field: str, value: int) -> bytes:
        at, width = self.fields[field]
        out = bytearray(self.data)
        out[at : at + width] = value.to_bytes(width, "little")
        return bytes(out)

    def expect(self, field: str, value: int, size: int) -> str | None:
        """The problem the reader must give (a regex), or None where the file really holds the claim."""
        at, width = self.fields[field]
        left = size - at - width  # bytes after the field
        if field == "n_tensors":
            return rf"^header claims {value} tensors, the file can hold at most \d+ \(at byte 8\)$"
        if field == "n_kv":
            return rf"^header claims {value} key/value pairs, the file can hold at most \d+ \(at byte 16\)$"
        if field in ("key-length", "tensor-name-length"):
            what = "key of key/value pair 0" if field == "key-length" else "name of tensor 0"
            if value > left:
                return rf"^truncated: {what} needs {value} bytes, {left} left \(at byte {at + 8}\)$"
            return rf"^{what} is {value} bytes long, longer than the 65535 bytes allowed \(at byte {at}\)$"
        if field == "alignment":
            if value & (value - 1):
                return rf"^general\.alignment = {value} is not a power of two \(at byte 24\)$"
            return None if (1 << 31) + 2 <= size else r"^tensor 't' \(2 bytes at data offset 0\) lies past the end"
        if field == "string-length":
            if value > left:
                return rf"^truncated: value of 'k\.str' needs {value} bytes, {left} left \(at byte {at + 8}\)$"
            return (rf"^value of 'k\.str': string of {value} bytes is longer than llama\.cpp's limit of "
                    rf"1073741824 bytes \(at byte {at}\)$")
        if field.startswith("count-") or field == "inner-array-count":
            name = "nested" if field in ("count-array", "inner-array-count") else f"arr.{field[6:]}"
            sub = V.UINT8 if field == "inner-array-count" else V[field[6:].upper()]
            per = ELEMENT_SIZES[sub]
            if value * per > left if sub not in (V.STRING, V.ARRAY) else value > left // per:
                return rf"^value of 'k\.{name}': array claims {value} "
            return (rf"^value of 'k\.{name}': array claims {value} elements, more than llama\.cpp's limit of "
                    rf"1073741824 \(at byte {at}\)$")
        if field == "string-in-array-length":
            if value > left:
                return rf"^truncated: value of 'k\.arr\.string' string of {value} bytes \(at byte {at}\)$"
            return (rf"^value of 'k\.arr\.string': string 0 of {value} bytes is longer than llama\.cpp's "
                    rf"limit of 1073741824 bytes \(at byte {at}\)$")
        if field == "n_dims":
            return rf"^tensor 't' has {value} dimensions, at most 4 are allowed \(at byte {at}\)$"
        if field.startswith("dim"):
            shape = list(TENSOR_SHAPE)
            shape[int(field[3])] = value
            n = int(np.prod(shape, dtype=object))
            if n >= 1 << 63:
                return rf"^tensor 't': element count of shape \[{', '.join(map(str, shape))}\] overflows"
            return None if self.data_start + n <= size else rf"^tensor 't' \({n} bytes at data offset 0\) lies past"
        if field == "tensor-offset":
            if value % 32:
                return rf"^tensor 't': offset {value} is not a multiple of the alignment 32 \(at byte {at}\)$"
            return None if self.data_start + value + 2 <= size else rf"^tensor 't' \(2 bytes at data offset {value}\)"
        raise AssertionError(field)


BASE = Base()
CASES = [(f, v) for f, (_, width) in BASE.fields.items() for v in (CLAIMS_U64 if width == 8 else CLAIMS_U32)]


def case_id(case: tuple[str, int]) -> str:
    field, value = case
    return f"{field}={value:#x}"


def test_base_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "base.gguf"
    path.write_bytes(BASE.data)
    with GGUFFile(path) as f:
        assert f.kv_value("k.nested") == [[1, 2], [3]]
        assert f.kv_value("k.arr.string") == ["a", "b"]
        (t,) = f.header.tensors
        assert (t.shape, t.nbytes, bytes(f.tensor_view(t))) == (TENSOR_SHAPE, 2, b"\7\7")
        assert f.header.data_start == BASE.data_start
    reader = GGUFReader(path)  # the reference reader agrees on the fields the claims are patched into
    for field, (at, width) in BASE.fields.items():
        if field.startswith("count-") and field != "count-array":  # GGUFReader flattens nested arrays
            key = f"k.arr.{field[6:]}"
            assert struct.unpack_from("<Q", BASE.data, at)[0] == len(reader.fields[key].data), field
    assert struct.unpack_from("<Q", BASE.data, BASE.fields["tensor-offset"][0])[0] == 0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_claim_in_a_small_file(case: tuple[str, int], tmp_path: Path) -> None:
    """A file of a few hundred bytes: every claim is refused, in milliseconds, allocating next to nothing."""
    field, value = case
    path = tmp_path / "claim.gguf"
    path.write_bytes(BASE.patched(field, value))
    expected = BASE.expect(field, value, len(BASE.data))
    assert expected is not None
    times = []
    for _ in range(3):  # the best of 3: these machines are noisy
        t0 = time.perf_counter()
        err = refused(path)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    try:
        err = refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert __import__("re").search(expected, err.problem), err.problem
    assert min(times) < 0.05 and peak < 256 << 10, (times, peak)


SPARSE_RUNNER = r"""
import json, resource, sys, time, tracemalloc
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import GGUFFile

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

out = []
for path in json.load(sys.stdin):
    base = rss()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with GGUFFile(path) as f:
            got = {"ok": [[t.shape, t.nbytes, t.offset] for t in f.header.tensors], "data_start": f.header.data_start}
    except GGUFSplitError as e:
        got = {"error": e.problem, "path": e.path}
    got["seconds"] = time.perf_counter() - t0
    got["traced_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    got["rss_growth"] = rss() - base
    out.append(got)
json.dump(out, sys.stdout)
"""


def run_sparse(paths: list[Path]) -> list[dict[str, Any]]:
    """Open each file in one fresh interpreter (so the peak RSS it reports is this parse's own) and return
    what came of it: the problem or the tensors, time, traced peak, and the growth of the peak RSS."""
    warm = [str(paths[0])]  # imports and the first mmap grow the RSS once: parse one file untimed first
    proc = subprocess.run([sys.executable, "-c", SPARSE_RUNNER], input=json.dumps(warm + [str(p) for p in paths]),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[1:]


@pytest.fixture(scope="module")
def sparse_results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    """Every claim patched into a copy of the base file, extended to SPARSE_SIZE with holes."""
    d = tmp_path_factory.mktemp("sparse")
    paths = []
    for i, (field, value) in enumerate(CASES):
        path = d / f"{i:03d}-{field}.gguf"
        with open(path, "wb") as f:
            f.write(BASE.patched(field, value))
            f.truncate(SPARSE_SIZE)
        paths.append(path)
    assert os.stat(paths[0]).st_blocks * 512 < 1 << 20, "the file system does not keep sparse files sparse"
    results = run_sparse(paths)
    for p in paths:
        p.unlink()
    return dict(zip(CASES, results))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_claim_in_a_sparse_file(case: tuple[str, int], sparse_results: dict[tuple[str, int], dict[str, Any]]) -> None:
    """The same claims in a 5 GiB sparse file: refused by name where the file cannot hold them or llama.cpp
    would refuse them; accepted where the file really holds them (a 4 GiB tensor), but then nothing is read
    into memory. Either way in bounded time, with a peak RSS growth under 64 MiB."""
    field, value = case
    got = sparse_results[case]
    expected = BASE.expect(field, value, SPARSE_SIZE)
    if expected is None:
        assert "error" not in got, got["error"]
        (shape, nbytes, offset), = got["ok"]
        assert nbytes > 0 and got["data_start"] + offset + nbytes <= SPARSE_SIZE
    else:
        assert "error" in got, f"accepted: {got}"
        assert __import__("re").search(expected, got["error"]), got["error"]
        assert got["path"].endswith(".gguf")
    assert got["seconds"] < 0.5, got
    assert got["traced_peak"] < 256 << 10, got
    assert got["rss_growth"] < 64 << 20, got


def test_some_sparse_claims_are_really_held() -> None:
    """The matrix covers both outcomes: some claims (a 2^32-byte I8 tensor, a tensor at offset 2^32,
    alignment 2^31) fit in the sparse file and are accepted."""
    held = [c for c in CASES if BASE.expect(*c, SPARSE_SIZE) is None]
    assert ("dim0", 1 << 32) in held and ("tensor-offset", 1 << 32) in held and ("alignment", 1 << 31) in held
    assert len(held) < len(CASES) // 4


# ---------------------------------------------------------------------------------------------------------
# The limits themselves, at their boundaries (llama.cpp: GGUF_MAX_STRING_LENGTH, GGUF_MAX_ARRAY_ELEMENTS;
# the GGUF spec: keys of at most 2^16 - 1 bytes).

LIMIT = 1 << 30


def sparse_file(path: Path, head: bytes, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def parse_bounded(path: Path) -> tuple[Any, int]:
    """(GGUFFile's header, or the GGUFSplitError) and the traced peak of the parse."""
    tracemalloc.start()
    try:
        try:
            with GGUFFile(path) as f:
                got: Any = f.header
        except GGUFSplitError as e:
            got = e
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def one_kv_head(value: bytes, vtype: V = V.STRING, key: bytes = b"k") -> bytes:
    return encode_prefix(3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + value


@pytest.mark.parametrize("n", [LIMIT, LIMIT + 1])
def test_string_value_limit(tmp_path: Path, n: int) -> None:
    """A string value of up to 2^30 bytes is skipped (never read); one byte more is refused, as llama.cpp does."""
    head = one_kv_head(struct.pack("<Q", n))
    got, peak = parse_bounded(sparse_file(tmp_path / "s.gguf", head, len(head) + n + 64))
    assert peak < 64 << 10
    if n == LIMIT:
        assert got.kvs[0].end == len(head) + n
    else:
        assert got.problem == (f"value of 'k': string of {n} bytes is longer than llama.cpp's limit of {LIMIT} "
                               f"bytes (at byte {len(head) - 8})")


@pytest.mark.parametrize("sub", [V.UINT8, V.BOOL, V.UINT64], ids=lambda v: v.name)
@pytest.mark.parametrize("n", [LIMIT, LIMIT + 1])
def test_array_count_limit(tmp_path: Path, sub: V, n: int) -> None:
    head = one_kv_head(struct.pack("<IQ", sub, n), V.ARRAY)
    size = ELEMENT_SIZES[sub]
    got, peak = parse_bounded(sparse_file(tmp_path / "a.gguf", head, len(head) + n * size + 64))
    assert peak < 64 << 10
    if n == LIMIT:
        assert (got.kvs[0].count, got.kvs[0].end) == (n, len(head) + n * size)
    else:
        assert got.problem == (f"value of 'k': array claims {n} elements, more than llama.cpp's limit of {LIMIT} "
                               f"(at byte {len(head) - 8})")


def test_string_array_count_limit(tmp_path: Path) -> None:
    """2^30 + 1 strings fit in a 9 GB sparse file (8 zero bytes each: empty strings), but are refused before
    any is walked (2^30 would be walked, ~200 s: not run here)."""
    n = LIMIT + 1
    head = one_kv_head(struct.pack("<IQ", V.STRING, n), V.ARRAY)
    t0 = time.perf_counter()
    got, peak = parse_bounded(sparse_file(tmp_path / "a.gguf", head, len(head) + 8 * n + 64))
    assert time.perf_counter() - t0 < 0.5 and peak < 64 << 10
    assert got.problem == (f"value of 'k': array claims {n} elements, more than llama.cpp's limit of {LIMIT} "
                           f"(at byte {len(head) - 8})")


@pytest.mark.parametrize("n", [LIMIT, LIMIT + 1])
def test_string_in_array_limit(tmp_path: Path, n: int) -> None:
    """The second string of a string array claims n bytes: walked over (never read), refused past 2^30."""
    head = one_kv_head(struct.pack("<IQQsQ", V.STRING, 2, 1, b"a", n), V.ARRAY)
    got, peak = parse_bounded(sparse_file(tmp_path / "a.gguf", head, len(head) + n + 64))
    assert peak < 64 << 10
    if n == LIMIT:
        assert got.kvs[0].end == len(head) + n
    else:
        assert got.problem == (f"value of 'k': string 1 of {n} bytes is longer than llama.cpp's limit of {LIMIT} "
                               f"bytes (at byte {len(head) - 8})")


@pytest.mark.parametrize("n", [(1 << 16) - 1, 1 << 16])
def test_key_length_limit(tmp_path: Path, n: int) -> None:
    key = b"k" * n
    path = tmp_path / "k.gguf"
    path.write_bytes(one_kv_head(b"\1", V.UINT8, key))
    got, _ = parse_bounded(path)
    if n < 1 << 16:
        assert got.kvs[0].key == key.decode()
    else:
        assert got.problem == ("key of key/value pair 0 is 65536 bytes long, longer than the 65535 bytes allowed "
                               "(at byte 24)")


@pytest.mark.parametrize("n", [(1 << 16) - 1, 1 << 16])
def test_tensor_name_length_limit(tmp_path: Path, n: int) -> None:
    path = tmp_path / "t.gguf"
    path.write_bytes(gguf_bytes([], [encode_tensor_info("t" * n, (4,), int(Q.F32), 0)], data=bytes(32)))
    got, _ = parse_bounded(path)
    if n < 1 << 16:
        assert got.tensors[0].name == "t" * n
    else:
        assert got.problem == ("name of tensor 0 is 65536 bytes long, longer than the 65535 bytes allowed "
                               "(at byte 24)")


def test_a_key_of_gigabytes_in_a_sparse_file_is_not_read(tmp_path: Path) -> None:
    """It was copied and decoded (2 x 3 GB) before being refused as a duplicate or truncated."""
    n = 3 << 30
    head = encode_prefix(3, 0, 1) + struct.pack("<Q", n)
    t0 = time.perf_counter()
    got, peak = parse_bounded(sparse_file(tmp_path / "k.gguf", head, len(head) + n + 64))
    assert time.perf_counter() - t0 < 0.5 and peak < 64 << 10
    assert got.problem == f"key of key/value pair 0 is {n} bytes long, longer than the 65535 bytes allowed (at byte 24)"


def test_walked_arrays_memo_keeps_no_huge_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vocabulary memo copies a walked string array to replay it later: an array larger than
    _WalkedArrays.MAX_BYTES is walked and not copied (it used to copy any size: a sparse file of 2^29 empty
    strings cost 4 GB). The limit is lowered here to 256 KiB so that the walk is short under tracemalloc."""
    from gguf_split.format.gguf import _WALKED, _WalkedArrays

    assert 16 << 20 <= _WalkedArrays.MAX_BYTES <= 64 << 20  # a 262k-token vocabulary is ~4 MB
    monkeypatch.setattr(_WalkedArrays, "MAX_BYTES", 256 << 10, raising=False)
    n = _WalkedArrays.MAX_BYTES // 8 + 1  # empty strings: 8 bytes each
    head = one_kv_head(struct.pack("<IQ", V.STRING, n), V.ARRAY)
    path = sparse_file(tmp_path / "big-vocab.gguf", head, align_up(len(head) + 8 * n, 32))
    _WALKED.clear()
    got, peak = parse_bounded(path)
    assert got.kvs[0].count == n and got.kvs[0].end == len(head) + 8 * n
    assert peak < 128 << 10, f"{peak} bytes traced"
    assert _WALKED.match(path.read_bytes(), len(head), len(head) + 8 * n, n) is None
    # one string fewer fits: remembered, and replayed
    n -= 1
    head = one_kv_head(struct.pack("<IQ", V.STRING, n), V.ARRAY)
    path = sparse_file(tmp_path / "vocab.gguf", head, align_up(len(head) + 8 * n, 32))
    parse_bounded(path)
    assert _WALKED.match(path.read_bytes(), len(head), len(head) + 8 * n, n) == 8 * n


# ---------------------------------------------------------------------------------------------------------
# Element counts, byte sizes, offsets and the data start: arithmetic past 2^63 and 2^64.


@pytest.mark.parametrize("shape, qtype, problem", [
    ((1 << 32, 1 << 31), Q.F32, "element count of shape [4294967296, 2147483648] overflows"),
    (((1 << 64) - 1,), Q.I8, "element count of shape [18446744073709551615] overflows"),
    ((1 << 63,), Q.I8, "element count of shape [9223372036854775808] overflows"),
    ((1 << 16, 1 << 16, 1 << 16, 1 << 15), Q.F16, "element count of shape [65536, 65536, 65536, 32768] overflows"),
    # the largest count llama.cpp represents (2^63 - 1): nbytes ~2^65, far past any file
    (((1 << 63) - 1,), Q.F64, f"({((1 << 63) - 1) * 8} bytes at data offset 0) lies past the end"),
    ((1 << 32, (1 << 31) - 1), Q.F32, f"({(1 << 32) * ((1 << 31) - 1) * 4} bytes at data offset 0) lies past the end"),
    (((1 << 63) - 32,), Q.Q4_0, f"({((1 << 63) - 32) // 32 * 18} bytes at data offset 0) lies past the end"),
    (((1 << 63) - 256, 1), Q.Q8_K, f"({((1 << 63) - 256) // 256 * 292} bytes at data offset 0) lies past the end"),
], ids=str)
def test_element_count_and_byte_size_overflow(tmp_path: Path, shape: tuple[int, ...], qtype: Q, problem: str) -> None:
    path = tmp_path / "big.gguf"
    path.write_bytes(gguf_bytes([], [encode_tensor_info("t", shape, int(qtype), 0)], data=bytes(64)))
    err = refused(path)
    assert problem in err.problem and err.problem.startswith("tensor 't'")


@pytest.mark.parametrize("offset", [(1 << 64) - 32, (1 << 64) - 64, (1 << 63), (1 << 32) - 32])
def test_offset_plus_size_past_the_file(tmp_path: Path, offset: int) -> None:
    """offset + nbytes wraps past 2^64 in C; here it is compared with the file size as it is."""
    path = tmp_path / "off.gguf"
    path.write_bytes(gguf_bytes([], [encode_tensor_info("t", (64,), int(Q.F32), offset)], data=bytes(256)))
    err = refused(path)
    assert err.problem == (f"tensor 't' (256 bytes at data offset {offset}) lies past the end of the file: "
                           f"truncated or corrupt")


@pytest.mark.parametrize("alignment", [1 << 31, 1 << 30, 1 << 12])
def test_data_start_alignment(tmp_path: Path, alignment: int) -> None:
    """The data section starts at the end of the tensor infos rounded up to the alignment (up to 2^31):
    in a sparse file long enough the tensor is found there, in a file one byte too short it is refused."""
    kv = encode_kv("general.alignment", V.UINT32, alignment)
    info = encode_tensor_info("t", (8,), int(Q.F32), 0)
    head = encode_prefix(3, 1, 1) + kv + info
    path = sparse_file(tmp_path / "a.gguf", head, alignment + 32)
    got, peak = parse_bounded(path)
    assert peak < 64 << 10
    assert (got.data_start, got.tensors[0].nbytes) == (alignment, 32)
    os.truncate(path, alignment + 31)
    err = refused(path)
    assert err.problem == "tensor 't' (32 bytes at data offset 0) lies past the end of the file: truncated or corrupt"


# ---------------------------------------------------------------------------------------------------------
# decode_value: safe on any bytes (it used to trust its buffer: struct.error, ValueError, RecursionError,
# a silently short string, or a tuple and a list of the claimed count).

from gguf_split.format.gguf import decode_value  # noqa: E402


def arr(sub: V, count: int, body: bytes = b"") -> bytes:
    return struct.pack("<IQ", sub, count) + body


@pytest.mark.parametrize("buf, vtype, pos, problem", [
    pytest.param(struct.pack("<Q", 1 << 40) + b"abc", V.STRING, 0,
                 "truncated: string of 1099511627776 bytes, 3 left (at byte 0)", id="string-length"),
    pytest.param(b"\1\2\3", V.STRING, 0, "truncated: string length (at byte 0)", id="string-no-length"),
    pytest.param(b"\1\2", V.UINT32, 0, "truncated: UINT32 needs 4 bytes, 2 left (at byte 0)", id="scalar"),
    pytest.param(arr(V.UINT8, 1 << 60, b"xy"), V.ARRAY, 0,
                 "array claims 1152921504606846976 elements (1152921504606846976 bytes), 2 bytes left (at byte 0)", id="u8-count"),
    pytest.param(arr(V.FLOAT64, 3, bytes(16)), V.ARRAY, 0,
                 "array claims 3 elements (24 bytes), 16 bytes left (at byte 0)", id="f64-count"),
    pytest.param(arr(V.STRING, (1 << 64) - 1, bytes(16)), V.ARRAY, 0,
                 "array claims 18446744073709551615 strings, the buffer holds at most 2 (at byte 0)", id="string-count"),
    pytest.param(arr(V.STRING, 2, struct.pack("<Q", 1) + b"a" + struct.pack("<Q", 9) + b"b"), V.ARRAY, 0,
                 "truncated: string of 9 bytes, 1 left (at byte 21)", id="string-in-array"),
    pytest.param(arr(V.STRING, 2, struct.pack("<Q", 1) + b"a" + bytes(7)), V.ARRAY, 0,
                 "truncated: string length (at byte 21)", id="string-length-in-array"),
    pytest.param(arr(V.ARRAY, 1 << 62, bytes(24)), V.ARRAY, 0,
                 "array claims 4611686018427387904 arrays, the buffer holds at most 2 (at byte 0)", id="nested-count"),
    pytest.param(arr(V.ARRAY, 1, arr(V.UINT16, 5, b"\0\0")), V.ARRAY, 0,
                 "array claims 5 elements (10 bytes), 2 bytes left (at byte 12)", id="inner-count"),
    pytest.param(b"".join(arr(V.ARRAY, 1) for _ in range(9)) + arr(V.UINT8, 0), V.ARRAY, 0,
                 "arrays nested deeper than 8 (at byte 96)", id="nesting"),
    pytest.param(arr(13, 1, b"x"), V.ARRAY, 0, "unknown array element type 13 (at byte 0)", id="element-type"),
    pytest.param(arr(V.UINT8, 0), V.ARRAY, 5, "truncated: array element type and count (at byte 5)", id="array-header"),
    pytest.param(b"abc", 99, 0, "cannot decode a value of type 99 at byte 0 of 3", id="value-type"),
    pytest.param(b"abc", V.UINT8, 4, "cannot decode a value of type UINT8 at byte 4 of 3", id="position"),
])
def test_decode_value_refuses_what_the_buffer_does_not_hold(buf: bytes, vtype: Any, pos: int, problem: str) -> None:
    with pytest.raises(GGUFSplitError) as err:
        decode_value(buf, vtype, pos, path="f.gguf")
    assert (err.value.path, err.value.problem) == ("f.gguf", problem)


def test_decode_value_stops_at_end() -> None:
    rec = encode_kv("k", V.ARRAY, ["ab", "cd"], V.STRING)[1 + 8 + 4:]
    assert decode_value(rec, V.ARRAY, 0) == (["ab", "cd"], len(rec))
    assert decode_value(memoryview(rec), V.ARRAY, 0) == (["ab", "cd"], len(rec))
    with pytest.raises(GGUFSplitError, match=r"^truncated: string of 2 bytes, 1 left \(at byte 22\)$"):
        decode_value(rec + b"more bytes", V.ARRAY, 0, end=len(rec) - 1)


def test_decode_value_of_random_bytes_raises_only_gguf_split_error() -> None:
    """Every value type at every offset of mutated records: a value or a GGUFSplitError, nothing else."""
    rng = np.random.default_rng(7)
    base = b"".join(encode_kv(f"k{i}", V.ARRAY, v, sub) for i, (v, sub) in enumerate(
        [(["a", "\u00e9", ""], V.STRING), ([1, 2, 3], V.UINT16), ([0.5], V.FLOAT64), ([True], V.BOOL)]))
    outcomes = {"value": 0, "error": 0}
    for _ in range(300):
        buf = bytearray(base)
        for at in rng.integers(0, len(buf), size=3):
            buf[at] = int(rng.integers(0, 256))
        for vtype in V:
            for pos in range(0, len(buf), 3):
                try:
                    decode_value(bytes(buf), vtype, pos)
                    outcomes["value"] += 1
                except GGUFSplitError:
                    outcomes["error"] += 1
    assert outcomes["value"] > 1000 and outcomes["error"] > 1000


def test_decode_value_of_bool_bytes_other_than_0_and_1() -> None:
    assert decode_value(arr(V.BOOL, 3, b"\0\1\2"), V.ARRAY, 0)[0] == [False, True, True]


def test_decode_value_of_a_large_array_makes_one_list() -> None:
    """The values are decoded into one list (8 bytes a pointer), not a tuple and then a list (twice that)."""
    n = 1 << 21
    buf = arr(V.UINT8, n, bytes(n))
    tracemalloc.start()
    try:
        values, end = decode_value(buf, V.ARRAY, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (len(values), end, values[0]) == (n, len(buf), 0)
    assert peak < 8 * n * 1.25, peak


def test_get_with_expect_refuses_a_huge_array_before_decoding_it(tmp_path: Path) -> None:
    """general.architecture as a 2^30-element u8 array in a sparse file: a caller asking for a string gets
    an error, not a 2^30-element list (~8 GB)."""
    head = one_kv_head(struct.pack("<IQ", V.UINT8, LIMIT), V.ARRAY, b"general.architecture")
    path = sparse_file(tmp_path / "arch.gguf", head, len(head) + LIMIT + 64)
    with GGUFFile(path) as f:
        tracemalloc.start()
        try:
            with pytest.raises(GGUFSplitError) as err:
                f.get("general.architecture", expect=V.STRING)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert err.value.path == str(path) and peak < 64 << 10
        assert err.value.problem == "general.architecture is a ARRAY, expected a STRING"
        assert f.get("general.name", "none", expect=V.STRING) == "none"


def test_tensor_infos_at_a_position_past_the_end() -> None:
    """A header index can point past the file: zero tensors there are none, one is refused plainly (it
    said 'the file can hold at most -1', and refused even zero tensors)."""
    from gguf_split.format.gguf import read_tensor_infos_at

    assert read_tensor_infos_at(b"GGUF", 100, 0, 32, "f.gguf") == []
    with pytest.raises(GGUFSplitError) as err:
        read_tensor_infos_at(b"GGUF", 100, 1, 32, "f.gguf")
    assert err.value.problem == "header claims 1 tensors, the file can hold at most 0"
