"""imatrix loading: the vectors llama-quantize's loader (tools/quantize/quantize.cpp + common/
imatrix-loader.cpp) hands to llama.cpp, for both formats, and one clear error for a bad file.

The expected vectors are computed here from the loader's rules written out by hand (float32 division,
lround of counts, ones for empty experts); tests/test_quantize.py then shows llama.cpp quantizes with them
exactly as the tensor-by-tensor path does, and bench/bench_quantize.py checks the loader against the
llama-quantize CLI itself.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGUFValueType

from gguf_split.errors import GGUFSplitError
from gguf_split.assemble.quantize.imatrix import load_imatrix
from gguf_split.assemble.quantize import Recipe, imatrix_kvs, parse_quant_type

from helpers import dat_bytes, write_imatrix_gguf


def f32(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float32)


def test_gguf_vectors_are_sums_over_rounded_counts_per_expert(tmp_path: Path) -> None:
    sums = f32(3.0, 6.0, 1.0, 2.0, 5.0, 7.0, 9.0)  # 3 experts of 2 values; the 7th value is past ncounts*ne0
    counts = f32(2.5, 0.0, 3.49)  # lround: 3 (half away from zero), 0 (-> ones), 3
    imx = load_imatrix(write_imatrix_gguf(tmp_path / "m.gguf", {"a.weight": (sums, counts)}))
    want = np.array([np.float32(3.0) / np.float32(3), np.float32(6.0) / np.float32(3), 1, 1,
                     np.float32(5.0) / np.float32(3), np.float32(7.0) / np.float32(3), 0], np.float32)
    assert imx.entries["a.weight"].tobytes() == want.tobytes()
    assert not imx.is_legacy and imx.chunk_count == 10 and imx.datasets == (b"train.txt",)


def test_gguf_negative_and_huge_counts_give_ones(tmp_path: Path) -> None:
    imx = load_imatrix(write_imatrix_gguf(tmp_path / "m.gguf", {"a": (f32(4, 4, 4), f32(-2, 1e30, 0.4))}))
    assert imx.entries["a"].tolist() == [1.0, 1.0, 1.0]


def test_gguf_without_metadata_is_refused(tmp_path: Path) -> None:
    entries = {"a": (f32(1, 2), f32(1))}
    for missing in ("datasets", "chunk_count", "chunk_size"):
        p = write_imatrix_gguf(tmp_path / f"{missing}.gguf", entries, **{missing: None})
        with pytest.raises(GGUFSplitError, match="missing imatrix metadata") as e:
            load_imatrix(p)
        assert e.value.path == p


def test_gguf_bad_entries_are_refused(tmp_path: Path) -> None:
    only_sums = write_imatrix_gguf(tmp_path / "s.gguf", {}, extra=lambda w: w.add_tensor("a.in_sum2", f32(1, 2)))
    with pytest.raises(GGUFSplitError, match="'a' has no counts"):
        load_imatrix(only_sums)
    f16 = write_imatrix_gguf(tmp_path / "h.gguf", {}, extra=lambda w: (
        w.add_tensor("a.in_sum2", np.ones(2, np.float16)), w.add_tensor("a.counts", f32(1))))
    with pytest.raises(GGUFSplitError, match="not F32"):
        load_imatrix(f16)
    no_counts = write_imatrix_gguf(tmp_path / "z.gguf", {}, extra=lambda w: (
        w.add_tensor("a.in_sum2", f32(1, 2)), w.add_tensor("a.counts", np.zeros(0, np.float32))))
    with pytest.raises(GGUFSplitError):  # llama-quantize divides by zero here
        load_imatrix(no_counts)
    wrong_type = write_imatrix_gguf(tmp_path / "t.gguf", {"a": (f32(1), f32(1))}, chunk_count=None,
                                    extra=lambda w: w.add_int32("imatrix.chunk_count", 3))
    with pytest.raises(GGUFSplitError, match="chunk_count is a INT32"):  # llama.cpp aborts on it
        load_imatrix(wrong_type)


def test_gguf_other_tensors_are_ignored(tmp_path: Path) -> None:
    p = write_imatrix_gguf(tmp_path / "m.gguf", {"a": (f32(2), f32(2))}, extra=lambda w: w.add_tensor("x", f32(1)))
    assert list(load_imatrix(p).entries) == ["a"]


def test_legacy_vectors(tmp_path: Path) -> None:
    raw = dat_bytes([("a", 4, f32(2, 6)), ("b\0junk", 0, f32(5)), ("a", 2, f32(1, 3, 5))],
                    chunk_count=7, dataset=b"data\0set.txt")
    p = tmp_path / "m.dat"
    p.write_bytes(raw)
    imx = load_imatrix(p)
    assert imx.is_legacy and imx.chunk_count == 7 and imx.datasets == (b"data",)
    assert imx.entries["a"].tobytes() == (f32(1, 3, 5) / np.float32(2)).tobytes()  # the later entry wins
    assert imx.entries["b"].tolist() == [5.0]  # name cut at the NUL; ncall 0: sums as they are


def test_legacy_tail_is_optional_and_may_be_partial(tmp_path: Path) -> None:
    body = dat_bytes([("a", 1, f32(1))], chunk_count=None)
    cases = {b"": (0, ()), struct.pack("<i", 9): (9, ()), b"\x05\x01": (0x105, ()),
             struct.pack("<ii", 9, 0): (9, ()), struct.pack("<ii", 9, 4) + b"ab": (9, ()),
             struct.pack("<ii", 9, 2) + b"ab": (9, (b"ab",))}
    for i, (tail, (chunks, datasets)) in enumerate(cases.items()):
        p = tmp_path / f"t{i}.dat"
        p.write_bytes(body + tail)
        imx = load_imatrix(p)
        assert (imx.chunk_count, imx.datasets) == (chunks, datasets), tail


@pytest.mark.parametrize("raw, problem", [
    (b"", "no entries"),
    (struct.pack("<i", 0), "no entries"),
    (struct.pack("<i", 1) + struct.pack("<i", 5) + b"ab", "truncated"),
    (struct.pack("<i", 1) + struct.pack("<i", 50) + b"a" * 12, "name of entry 1"),
    (struct.pack("<i", 1) + struct.pack("<i", 1) + b"a" + struct.pack("<ii", 1, 0), "number of values"),
    (struct.pack("<i", 1) + struct.pack("<i", 1) + b"a" + struct.pack("<ii", 1, 3) + b"\0" * 8, "values of entry 1"),
    (struct.pack("<i", 1) + struct.pack("<i", -5) + b"a" * 20, "negative name length"),
    (struct.pack("<i", 1 << 30) + b"\0" * 64, "claims 1073741824 entries"),
    (b"GGUF\x03\0\0\0" + b"\xff" * 40, "claims"),  # a broken GGUF file is not read as legacy
])
def test_corrupt_files_are_one_error_naming_the_file(tmp_path: Path, raw: bytes, problem: str) -> None:
    p = tmp_path / "bad.dat"
    p.write_bytes(raw)
    with pytest.raises(GGUFSplitError, match=problem) as e:
        load_imatrix(p)
    assert e.value.path == str(p)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFSplitError, match="cannot read"):
        load_imatrix(tmp_path / "missing.dat")
    with pytest.raises(GGUFSplitError, match="directory"):
        load_imatrix(tmp_path)


def test_include_exclude_filters_are_substring_matches(tmp_path: Path) -> None:
    p = tmp_path / "m.dat"
    p.write_bytes(dat_bytes([(n, 1, f32(1)) for n in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight", "output.weight")]))
    imx = load_imatrix(p)
    assert set(imx.filtered(exclude=["ffn"]).entries) == {"blk.0.attn_q.weight", "output.weight"}
    assert set(imx.filtered(include=["attn", "output"]).entries) == {"blk.0.attn_q.weight", "output.weight"}
    with pytest.raises(GGUFSplitError, match="together"):
        imx.filtered(include=["a"], exclude=["b"])


def test_cli_kvs(tmp_path: Path) -> None:
    p = tmp_path / "m.dat"
    p.write_bytes(dat_bytes([("a", 1, f32(1)), ("b", 1, f32(1))], chunk_count=0, dataset="d" * 300))
    imx = load_imatrix(p)
    _, ftype = parse_quant_type("q4_k")
    long_label = "/x/" + "\u00e9" * 100  # cut at 127 bytes, through a character as strncpy does
    kvs = imatrix_kvs(Recipe("Q4_K_M", ftype, imx, long_label))
    assert kvs == [("quantize.imatrix.file", GGUFValueType.STRING, long_label.encode()[:127]),
                   ("quantize.imatrix.dataset", GGUFValueType.STRING, b"d" * 127),
                   ("quantize.imatrix.entries_count", GGUFValueType.UINT32, 2)]  # no chunks_count for 0 chunks
    assert imatrix_kvs(Recipe("Q4_K_M", ftype)) == []


def test_parse_quant_type() -> None:
    assert parse_quant_type("q4_k") == ("Q4_K_M", 15)
    assert parse_quant_type("Q5_K") == ("Q5_K_M", 17)
    assert parse_quant_type("iq4_xs") == ("IQ4_XS", 30)
    assert parse_quant_type("F32") == ("F32", 0)
    for bad in ("Q4", "GUESSED", "COPY", ""):
        with pytest.raises(GGUFSplitError, match="unknown quantization type"):
            parse_quant_type(bad)
