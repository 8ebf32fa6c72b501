"""The lean GGUF reader/writer (gguf_split.format.gguf) against gguf's own GGUFReader and GGUFWriter.

Why: gguf-split trusts its own struct walk instead of GGUFReader (too slow on big vocabularies), and
restores files by re-emitting byte spans it parsed. So the walk must agree with the reference reader on
every key, type, value and tensor record, and its spans and encoders must reproduce the file's bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V
from gguf.quants import dequantize

from helpers import base_tensors, write_model
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import (
    GGUFFile,
    KV,
    decode_value,
    encode_kv,
    encode_prefix,
    encode_tensor_info,
    parse_header,
    parse_kvs,
    parse_tensor_infos,
    to_numpy,
)

ALIGNMENTS = [None, 64, 128]  # None: GGUFWriter's default (32, no general.alignment key)


def extra_kvs(w: GGUFWriter) -> None:
    """Every scalar value type plus a bool array and an empty string, on top of write_model's KVs
    (which already hold strings, string arrays, f32 arrays and nested int/string arrays)."""
    w.add_uint8("test.u8", 250)
    w.add_int8("test.i8", -7)
    w.add_uint16("test.u16", 65000)
    w.add_int16("test.i16", -30000)
    w.add_int32("test.i32", -(1 << 30))
    w.add_uint64("test.u64", (1 << 63) + 5)
    w.add_key_value("test.empty", "", V.STRING)  # add_string skips empty values
    w.add_array("test.bools", [True, False, True])
    w.add_key_value("test.u64s", [1, 1 << 40], V.ARRAY, sub_type=V.UINT64)


def make_model(tmp_path: Path, alignment: int | None = None, name: str = "m.gguf") -> Path:
    return Path(write_model(tmp_path / name, base_tensors(), kvs=extra_kvs, alignment=alignment))


def real_fields(reader: GGUFReader) -> dict[str, Any]:
    """GGUFReader's fields without its pseudo fields for the fixed header (GGUF.version, ...)."""
    return {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def type_chain(buf: Any, kv: KV) -> list[V]:
    """Value type, element type, nested element type ... of a KV, read from its raw bytes, in the form
    GGUFReader reports `field.types` (the first element stands for all)."""
    types, pos, vtype = [kv.vtype], kv.value_start, kv.vtype
    while vtype is V.ARRAY:
        (sub,) = struct.unpack_from("<I", buf, pos)
        (count,) = struct.unpack_from("<Q", buf, pos + 4)
        vtype = V(sub)
        types.append(vtype)
        if vtype is not V.ARRAY or count == 0:
            break
        pos += 12  # the first inner array's element type
    return types


def flatten(value: Any) -> Any:
    """GGUFReader.contents() flattens arrays of arrays; flatten ours the same way to compare."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [x for v in value for x in flatten(v)]
    return value


# ---------------------------------------------------------------------------------------------------------
# agreement with GGUFReader


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_kvs_agree_with_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    path = make_model(tmp_path, alignment)
    reader = GGUFReader(path)
    fields = real_fields(reader)
    with GGUFFile(path) as f:
        h = f.header
        assert [kv.key for kv in h.kvs] == list(fields)
        for kv in h.kvs:
            field = fields[kv.key]
            assert type_chain(f.mm, kv) == list(field.types), kv.key
            assert kv.start == field.offset, kv.key
            assert kv.end - kv.start == sum(p.nbytes for p in field.parts), kv.key
            assert flatten(f.kv_value(kv.key)) == field.contents(), kv.key
        assert h.version == reader.fields["GGUF.version"].contents() == 3


def test_decoded_values_match_what_was_written(tmp_path: Path) -> None:
    """Nested arrays keep their structure (GGUFReader flattens them), strings decode as UTF-8."""
    with GGUFFile(make_model(tmp_path)) as f:
        assert f.kv_value("test.nested") == [[1, 2], [3]]
        assert f.kv_value("test.strings_nested") == [["x", "y"], ["z"]]
        assert f.kv_value("tokenizer.ggml.tokens") == ["<s>", "</s>", "a", "b", "\u00e9\u4e2d"]
        assert f.kv_value("test.u64") == (1 << 63) + 5
        assert f.kv_value("test.i64") == -(1 << 40)
        assert f.kv_value("test.bools") == [True, False, True]
        assert f.kv_value("test.empty") == ""
        assert f.header.kv_by_key["test.nested"].subtype is V.ARRAY
        assert f.header.kv_by_key["tokenizer.ggml.tokens"].count == 5


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_tensors_agree_with_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    path = make_model(tmp_path, alignment)
    reader = GGUFReader(path)
    with GGUFFile(path) as f:
        h = f.header
        assert h.alignment == reader.alignment == (alignment or 32)
        assert h.data_start == reader.data_offset
        assert h.data_start % h.alignment == 0
        assert [t.name for t in h.tensors] == [t.name for t in reader.tensors]
        for ours, ref in zip(h.tensors, reader.tensors):
            assert ours.ggml_type == ref.tensor_type, ours.name
            assert ours.shape == tuple(int(d) for d in ref.shape), ours.name
            assert h.data_start + ours.offset == ref.data_offset, ours.name
            assert ours.offset % h.alignment == 0, ours.name
            assert ours.nbytes == ref.n_bytes, ours.name
            assert ours.start == ref.field.offset, ours.name
            assert bytes(f.tensor_view(ours)) == ref.data.tobytes(), ours.name
        assert h.tensor_info_end == h.tensors[-1].end


# ---------------------------------------------------------------------------------------------------------
# encoders and spans


def test_header_reserialises_from_spans(tmp_path: Path) -> None:
    """Prefix + KV spans + tensor-info spans, concatenated, are the file's header bytes exactly."""
    path = make_model(tmp_path, 64)
    raw = path.read_bytes()
    with GGUFFile(path) as f:
        h = f.header
        kv_bytes = b"".join(f.raw(kv.start, kv.end) for kv in h.kvs)
        ti_bytes = b"".join(f.raw(t.start, t.end) for t in h.tensors)
        rebuilt = encode_prefix(h.version, len(h.tensors), len(h.kvs)) + kv_bytes + ti_bytes
        assert rebuilt == raw[: h.tensor_info_end]
        # the spans tile the header with no hole
        assert h.kvs[0].start == h.kv_start == 24
        assert all(a.end == b.start for a, b in zip(h.kvs, h.kvs[1:]))
        assert h.kvs[-1].end == h.tensor_info_start == h.tensors[0].start
        assert all(a.end == b.start for a, b in zip(h.tensors, h.tensors[1:]))
        # the rebuilt header alone parses to the same records
        again = parse_header(rebuilt, h.file_size, "rebuilt")
        assert [(k.key, k.start, k.end) for k in again.kvs] == [(k.key, k.start, k.end) for k in h.kvs]
        assert again.tensors == h.tensors


def test_encode_kv_reproduces_writer_bytes(tmp_path: Path) -> None:
    """Re-encoding each decoded KV gives GGUFWriter's bytes (nested arrays excluded: encode_value takes
    one element type, and gguf-split copies such KVs as raw spans)."""
    path = make_model(tmp_path)
    with GGUFFile(path) as f:
        checked = 0
        for kv in f.header.kvs:
            if kv.subtype is V.ARRAY:
                continue
            value = f.kv_value(kv.key)
            assert encode_kv(kv.key, kv.vtype, value, kv.subtype) == f.raw(kv.start, kv.end), kv.key
            checked += 1
        assert checked >= 15


ROUND_TRIP_KVS: list[tuple[str, V, Any, V | None]] = [
    ("a.u8", V.UINT8, 255, None),
    ("a.i8", V.INT8, -128, None),
    ("a.u16", V.UINT16, 65535, None),
    ("a.i16", V.INT16, -1, None),
    ("a.u32", V.UINT32, 1 << 31, None),
    ("a.i32", V.INT32, -(1 << 31), None),
    ("a.f32", V.FLOAT32, 0.5, None),
    ("a.bool", V.BOOL, False, None),
    ("a.str", V.STRING, "h\u00e9llo \u4e2d", None),
    ("", V.STRING, "", None),
    ("a.u64", V.UINT64, (1 << 64) - 1, None),
    ("a.i64", V.INT64, -(1 << 63), None),
    ("a.f64", V.FLOAT64, -1.25e300, None),
    ("a.strs", V.ARRAY, ["", "x", "\u00e9"], V.STRING),
    ("a.f32s", V.ARRAY, [1.5, -2.0], V.FLOAT32),
    ("a.i16s", V.ARRAY, [], V.INT16),
]


def test_encode_kv_round_trips_through_parse() -> None:
    records = [encode_kv(*case) for case in ROUND_TRIP_KVS]
    buf = b"".join(records)
    kvs = parse_kvs(buf, "mem")
    assert len(kvs) == len(ROUND_TRIP_KVS)
    pos = 0
    for kv, (key, vtype, value, subtype), rec in zip(kvs, ROUND_TRIP_KVS, records):
        assert (kv.key, kv.vtype, kv.subtype) == (key, vtype, subtype)
        assert (kv.start, kv.end) == (pos, pos + len(rec))
        decoded, end = decode_value(buf, kv.vtype, kv.value_start)
        assert decoded == value and end == kv.end, key
        pos += len(rec)
    # and through a full header, as GGUFReader sees it
    header = encode_prefix(3, 0, len(records)) + buf
    h = parse_header(header, len(header), "mem")
    assert [k.key for k in h.kvs] == [c[0] for c in ROUND_TRIP_KVS]


def test_encode_tensor_info_round_trips(tmp_path: Path) -> None:
    path = make_model(tmp_path, 128)
    with GGUFFile(path) as f:
        h = f.header
        encoded = [encode_tensor_info(t.name, t.shape, t.ggml_type, t.offset) for t in h.tensors]
        for t, rec in zip(h.tensors, encoded):
            assert rec == f.raw(t.start, t.end), t.name
        parsed = parse_tensor_infos(b"".join(encoded), "mem", h.alignment)
        assert [(t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in parsed] == \
               [(t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in h.tensors]
    # a tensor info of a 3-d F32 tensor, offset 0
    one = parse_tensor_infos(encode_tensor_info("x", (4, 3, 2), int(Q.F32), 0), "mem", 32)[0]
    assert (one.name, one.shape, one.nbytes) == ("x", (4, 3, 2), 4 * 3 * 2 * 4)


# ---------------------------------------------------------------------------------------------------------
# tensor values


def q8_0_reference(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 by hand: blocks of (f16 scale, 32 x int8), value = scale * q."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
    values = blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)
    return values.reshape(tuple(reversed(shape)))


PLAIN_FLOATS = {Q.F32: "<f4", Q.F16: "<f2"}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes make some NaN/inf scales
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F16, Q.F32, Q.BF16, Q.Q4_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_to_numpy_agrees_with_gguf_dequantize(tmp_path: Path, qtype: Q) -> None:
    path = make_model(tmp_path)
    reader = GGUFReader(path)
    with GGUFFile(path) as f:
        infos = [t for t in f.header.tensors if t.ggml_type == qtype]
        assert infos, f"fixture has no {qtype.name} tensor"
        for t in infos:
            raw = bytes(f.tensor_view(t))
            ours = to_numpy(raw, t.ggml_type, t.shape)
            ref_tensor = next(r for r in reader.tensors if r.name == t.name)
            block, size = GGML_QUANT_SIZES[qtype]
            rows = np.frombuffer(ref_tensor.data.tobytes(), dtype=np.uint8).reshape(-1, t.shape[0] // block * size)
            ref = np.asarray(dequantize(rows, qtype), dtype=np.float32).reshape(tuple(reversed(t.shape)))
            assert ours.dtype == np.float32 and ours.shape == tuple(reversed(t.shape))
            np.testing.assert_array_equal(ours, ref)
            if qtype in PLAIN_FLOATS:
                np.testing.assert_array_equal(ours, np.frombuffer(raw, PLAIN_FLOATS[qtype]).reshape(ours.shape))
            if qtype is Q.Q8_0:
                np.testing.assert_array_equal(ours, q8_0_reference(raw, t.shape))


# ---------------------------------------------------------------------------------------------------------
# versions


def patch_version(src: Path, dst: Path, version_field: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[4:8] = version_field
    dst.write_bytes(bytes(raw))
    return dst


def test_version_2_file_is_accepted(tmp_path: Path) -> None:
    v3 = make_model(tmp_path, 64)
    v2 = patch_version(v3, tmp_path / "v2.gguf", struct.pack("<I", 2))
    with GGUFFile(v3) as a, GGUFFile(v2) as b:
        assert (a.header.version, b.header.version) == (3, 2)
        assert [(k.key, k.vtype, k.start, k.end) for k in a.header.kvs] == \
               [(k.key, k.vtype, k.start, k.end) for k in b.header.kvs]
        assert a.header.tensors == b.header.tensors
        assert a.header.data_start == b.header.data_start
    assert GGUFReader(v2).fields["GGUF.version"].contents() == 2  # the reference reader agrees


@pytest.mark.parametrize("field, problem", [
    pytest.param(struct.pack("<I", 1), "version 1", id="v1"),
    pytest.param(struct.pack(">I", 3), "big-endian", id="big-endian"),
    pytest.param(struct.pack("<I", 4), "unsupported GGUF version 4", id="v4"),
])
def test_other_versions_are_refused_by_name(tmp_path: Path, field: bytes, problem: str) -> None:
    bad = patch_version(make_model(tmp_path), tmp_path / "bad.gguf", field)
    with pytest.raises(GGUFSplitError) as err:
        GGUFFile(bad)
    assert err.value.path == str(bad)
    assert problem in err.value.problem


# The walked-arrays memo: a vocabulary identical to one already walked costs one byte comparison.
MEMO_VOCAB = [f"token-{i:06d}" for i in range(8000)]  # above _WalkedArrays.MIN_COUNT


def memo_model(path: Path) -> tuple[str, int, int]:
    """A model with a large string array; returns (path, start, end) of its string records."""
    p = write_model(path, base_tensors(), kvs=lambda w: w.add_array("test.vocab", MEMO_VOCAB))
    with GGUFFile(p) as f:  # walked once: now remembered
        kv = f.header.kv_by_key["test.vocab"]
        return p, kv.value_start + 12, kv.end


def test_memo_replays_an_identical_vocabulary(tmp_path: Path) -> None:
    from gguf_split.format.gguf import _WALKED

    a, start, end = memo_model(tmp_path / "a.gguf")
    b, _, _ = memo_model(tmp_path / "b.gguf")
    data = Path(b).read_bytes()
    assert _WALKED.match(data, start, len(data), len(MEMO_VOCAB)) == end - start  # replayed, not walked
    with GGUFFile(b) as fb:
        assert fb.get("test.vocab") == MEMO_VOCAB


@pytest.mark.parametrize("where", ["first", "last"])
def test_memo_does_not_hide_a_changed_string_length(tmp_path: Path, where: str) -> None:
    good, start, end = memo_model(tmp_path / "good.gguf")
    raw = bytearray(Path(good).read_bytes())
    at = start if where == "first" else end - 8 - len(MEMO_VOCAB[-1])
    raw[at : at + 8] = (1 << 40).to_bytes(8, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw)
    with pytest.raises(GGUFSplitError, match="string of"):
        GGUFFile(bad)


def test_memo_does_not_hide_truncation(tmp_path: Path) -> None:
    good, start, end = memo_model(tmp_path / "good.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(Path(good).read_bytes()[: (start + end) // 2])
    with pytest.raises(GGUFSplitError, match="truncated"):
        GGUFFile(bad)
