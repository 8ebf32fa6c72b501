"""Packs of quantization ladders (format version 2: the "requant" and "fplanes" codecs).

Oracles: the quants are llama.cpp's own bytes (ggml_quantize_chunk of llama-cpp-python's libggml-base,
the code llama-quantize runs) for the source's rows, so "nearly free" is measured against what a hub
publishes; every round trip is byte-identical (sha256 of each file); a quant that does not match our
re-quantization (bits flipped, another importance matrix) still round-trips and costs bytes in
proportion; packs that need no version-2 codec stay version 1 and old packs are read; damage is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q

from gguf_split.errors import GGUFSplitError
from gguf_split.pack import format as fmt
from gguf_split.pack import ladder
from gguf_split.pack.reader import PackReader, read_index, unpack
from gguf_split.pack.report import PackReport
from gguf_split.pack.writer import pack_files
from helpers import pack_with_old_writer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ggml_oracle  # noqa: E402

needs_oracle = pytest.mark.skipif(not ggml_oracle.available(), reason="llama-cpp-python's libggml-base missing")

N_EMBD, N_FF, N_VOCAB = 256, 512, 96
SHAPES = {"token_embd.weight": (N_VOCAB, N_EMBD), "blk.0.attn_q.weight": (N_EMBD, N_EMBD),
          "blk.0.ffn_up.weight": (N_FF, N_EMBD), "blk.0.ffn_down.weight": (N_EMBD, N_FF)}
NORM = "blk.0.attn_norm.weight"
# a ladder: each rung's type per tensor (a mix like Q4_K_M: most tensors one type, some another)
RUNGS = {"Q8_0": {}, "Q6_K": {}, "Q4_K_M": {"blk.0.ffn_down.weight": Q.Q6_K, "token_embd.weight": Q.Q6_K},
         "Q4_0": {}, "Q5_1": {}, "Q3_K": {}}
RUNG_TYPE = {"Q8_0": Q.Q8_0, "Q6_K": Q.Q6_K, "Q4_K_M": Q.Q4_K, "Q4_0": Q.Q4_0, "Q5_1": Q.Q5_1, "Q3_K": Q.Q3_K}


@pytest.fixture(autouse=True)
def numpy_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numpy engine in these tests (the same bytes as numba's, which test_requant checks): no compile."""
    monkeypatch.setenv(ladder.ENGINE_ENV, "numpy")


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.02 * (1 + rng.random((s[0], 1)))).astype(np.float32)
            for n, s in SHAPES.items()}


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, int]]) -> str:
    w = GGUFWriter(os.fspath(path), "llama")
    w.add_name(path.stem)
    w.add_block_count(1)
    w.add_token_list([f"tok{i:05d}" for i in range(600)])
    for name, (data, qt) in tensors.items():
        if qt in (Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=Q(qt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def _as_source(w: np.ndarray, kind: str) -> tuple[np.ndarray, int, np.ndarray]:
    """(array to write, its type, float32 rows llama-quantize reads from it)."""
    if kind == "F16":
        h = w.astype(np.float16)
        return h, Q.F16, h.astype(np.float32)
    bits = (w.view(np.uint32) + 0x7FFF + ((w.view(np.uint32) >> 16) & 1)) >> 16
    b16 = bits.astype(np.uint16)
    return b16.view(np.uint8).reshape(w.shape[0], -1), Q.BF16, (b16.astype(np.uint32) << 16).view(np.float32)


def make_ladder(d: Path, kind: str = "F16", seed: int = 0, rungs: tuple[str, ...] = tuple(RUNGS),
                tweak: dict[str, object] | None = None, upcast: int | None = None) -> list[tuple[str, str]]:
    """model-<kind>.gguf plus one file per rung, each quant llama.cpp's bytes for the source's rows.
    `upcast`: the source is the dequantization of that type's quant of the weights (as the bench's ladders,
    made from a published quant)."""
    d.mkdir(parents=True, exist_ok=True)
    ws = _weights(seed)
    if upcast is not None:
        from gguf_split.pack import codec
        ws = {n: codec.dequantize_rows(ggml_oracle.quantize(w, upcast).tobytes(), upcast, w.shape[0], w.shape[1])
              for n, w in ws.items()}
    norm = (1 + 0.1 * np.random.default_rng(seed).standard_normal(N_EMBD)).astype(np.float32)
    src: dict[str, tuple[np.ndarray, int]] = {NORM: (norm, Q.F32)}
    rows: dict[str, np.ndarray] = {}
    for n, w in ws.items():
        arr, qt, rows[n] = _as_source(w, kind)
        src[n] = (arr, qt)
    files = [(f"model-{kind}.gguf", _write(d / f"model-{kind}.gguf", src))]
    for rung in rungs:
        q: dict[str, tuple[np.ndarray, int]] = {NORM: (norm, Q.F32)}
        for n in ws:
            qt = RUNGS[rung].get(n, RUNG_TYPE[rung])
            data = ggml_oracle.quantize(rows[n], qt)
            q[n] = (data, qt)
        if tweak and rung in tweak:
            q = tweak[rung](q)  # type: ignore[operator]
        files.append((f"model-{rung}.gguf", _write(d / f"model-{rung}.gguf", q)))
    return files


def sha(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _round_trip(files: list[tuple[str, str]], tmp: Path, name: str = "l.ggufpack",
                threads: int = 2) -> tuple[Path, PackReport]:
    pk = tmp / name
    report = pack_files(files, pk, threads=threads)
    out = tmp / (name + ".out")
    unpack(pk, out, threads=threads)
    for n, p in files:
        assert sha(out / n) == sha(p), n
    return pk, report


def _stored(report: PackReport, codec_name: str) -> int:
    return sum(t.stored_bytes for t in report.tensors if t.codec == codec_name)


@pytest.fixture(scope="module")
def f16_ladder(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    if not ggml_oracle.available():
        pytest.skip("llama-cpp-python's libggml-base missing")
    return make_ladder(tmp_path_factory.mktemp("ladder"))


@pytest.fixture(scope="module")
def f16_pack(f16_ladder: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PackReport]:
    mp = pytest.MonkeyPatch()
    mp.setenv(ladder.ENGINE_ENV, "numpy")
    try:
        return _round_trip(f16_ladder, tmp_path_factory.mktemp("pack"))
    finally:
        mp.undo()


# ---------------------------------------------------------------------------------------------------------
# round trips and costs


@needs_oracle
def test_ladder_round_trip_and_quants_nearly_free(f16_ladder: list[tuple[str, str]],
                                                  f16_pack: tuple[Path, PackReport]) -> None:
    """Every quant tensor re-derived from the F16 source; each costs under 1 % of its bytes; the source
    is fplanes-coded (random normal weights: near F16's floor of ~84 %); the pack is version 2."""
    pk, report = f16_pack
    quants = [t for t in report.tensors if t.ggml_type not in ("F16", "F32")]
    assert quants and all(t.codec == "requant" for t in quants), [(t.name, t.ggml_type, t.codec) for t in quants]
    for t in quants:
        assert t.stored_bytes < 0.01 * t.nbytes + 200, t
    sources = [t for t in report.tensors if t.ggml_type == "F16"]
    assert all(t.codec == "fplanes" for t in sources)
    assert sum(t.stored_bytes for t in sources) < 0.87 * sum(t.nbytes for t in sources)
    assert read_index(pk).version == 2
    ix = _index_json(pk.read_bytes())
    req = [t for t in ix["tensors"] if t["codec"] == "requant"]
    assert all(t["port"] == ladder.PORT and ix["tensors"][t["source"]]["type"] == Q.F16 for t in req)


@needs_oracle
def test_bf16_ladder_round_trip(tmp_path: Path) -> None:
    files = make_ladder(tmp_path / "m", "BF16", seed=3, rungs=("Q8_0", "Q4_K_M", "Q5_1"))
    _, report = _round_trip(files, tmp_path)
    quants = [t for t in report.tensors if t.ggml_type not in ("BF16", "F32")]
    assert all(t.codec == "requant" and t.stored_bytes < 0.01 * t.nbytes + 200 for t in quants)
    assert all(t.codec == "fplanes" for t in report.tensors if t.ggml_type == "BF16")


def _flip_bits(q: dict[str, tuple[np.ndarray, int]], name: str, blocks: int) -> dict[str, tuple[np.ndarray, int]]:
    data, qt = q[name]
    data = data.copy()
    flat = data.reshape(-1)
    rng = np.random.default_rng(7)
    for pos in rng.choice(flat.size, blocks, replace=False):
        flat[pos] ^= 1 << int(rng.integers(0, 8))
    q[name] = (data, qt)
    return q


@needs_oracle
def test_mismatched_quant_round_trips_and_costs_in_proportion(tmp_path: Path) -> None:
    """A published quant with a few flipped bytes (another build's rounding, or damage before packing) still
    round-trips; it costs more than the exact one, in proportion to the bytes that differ, far below plain."""
    name = "blk.0.ffn_up.weight"
    costs = {}
    for flips in (0, 8, 64):
        tweak = {"Q6_K": lambda q, f=flips: _flip_bits(q, name, f) if f else q}
        files = make_ladder(tmp_path / f"m{flips}", rungs=("Q6_K",), tweak=tweak)
        _, report = _round_trip(files, tmp_path, f"f{flips}.ggufpack")
        t = next(t for t in report.tensors if t.name == name and t.ggml_type == "Q6_K")
        assert t.codec == "requant"
        costs[flips] = t.stored_bytes
    assert costs[0] < costs[8] < costs[64] < 0.1 * (N_FF * N_EMBD * 210 // 256)
    assert costs[64] - costs[0] > 3 * (costs[8] - costs[0]) > 0


@needs_oracle
def test_quant_made_with_an_importance_matrix(tmp_path: Path) -> None:
    """A quant made with an importance matrix the pack does not hold: every block misses our plain
    re-quantization, yet the pack round-trips, and the writer takes requant only where it is smaller than
    plain coding (k-quants: the codes follow from the published scales)."""
    rng = np.random.default_rng(5)

    def with_imatrix(q: dict[str, tuple[np.ndarray, int]]) -> dict[str, tuple[np.ndarray, int]]:
        ws = _weights(0)
        for n, w in ws.items():
            qt = q[n][1]
            im = (rng.random(w.shape[1]) * 4 + 0.1).astype(np.float32)
            q[n] = (ggml_oracle.quantize(w.astype(np.float16).astype(np.float32), qt, im), qt)
        return q

    files = make_ladder(tmp_path / "m", rungs=("Q6_K", "Q4_0"), tweak={"Q6_K": with_imatrix, "Q4_0": with_imatrix})
    _, report = _round_trip(files, tmp_path)
    for t in report.tensors:
        if t.ggml_type in ("Q6_K", "Q4_0"):
            plain_like = t.nbytes * 0.8
            assert t.stored_bytes < plain_like or t.codec != "requant", t
    q6 = [t for t in report.tensors if t.ggml_type == "Q6_K"]
    assert all(t.codec == "requant" and t.stored_bytes < 0.25 * t.nbytes for t in q6), q6


def _imatrix_file(path: Path, seed: int) -> tuple[str, dict[str, np.ndarray]]:
    """An imatrix GGUF as llama-imatrix writes it (`<name>.in_sum2` (ne0, 1) and `<name>.counts` (1, 1), F32)
    and the vectors llama-quantize loads from it (tools/quantize/quantize.cpp: in_sum2 / counts, in float32;
    all ones where the count is 0)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(os.fspath(path), "imatrix")
    w.add_string("general.type", "imatrix")
    vectors = {}
    for i, (n, shape) in enumerate(SHAPES.items()):
        sums = (rng.random((1, shape[1])) * 50).astype(np.float32)
        count = np.array([[0.0 if i == 3 else 128.0 + i]], dtype=np.float32)
        w.add_tensor(n + ".in_sum2", sums)
        w.add_tensor(n + ".counts", count)
        vectors[n] = sums[0] / count[0, 0] if count[0, 0] > 0 else np.ones(shape[1], np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path), vectors


@needs_oracle
def test_quant_re_derived_with_the_packed_imatrix(tmp_path: Path) -> None:
    """Quants made with an importance matrix whose file is in the pack: re-derived with its vectors (one
    tensor of the matrix never saw input: its vector is all ones), nearly free, and the index names the
    in_sum2/counts tensors."""
    im_path, vectors = _imatrix_file(tmp_path / "imatrix.gguf", 9)

    def with_imatrix(q: dict[str, tuple[np.ndarray, int]]) -> dict[str, tuple[np.ndarray, int]]:
        for n, w in _weights(0).items():
            q[n] = (ggml_oracle.quantize(w.astype(np.float16).astype(np.float32), q[n][1], vectors[n]), q[n][1])
        return q

    files = make_ladder(tmp_path / "m", rungs=("Q6_K", "Q4_0", "Q3_K"),
                        tweak={r: with_imatrix for r in ("Q6_K", "Q4_0", "Q3_K")})
    pk, report = _round_trip(files + [("imatrix.gguf", im_path)], tmp_path)
    quants = [t for t in report.tensors if t.ggml_type in ("Q6_K", "Q4_0", "Q3_K")]
    assert len(quants) == 12 and all(t.codec == "requant" and t.stored_bytes < 0.01 * t.nbytes + 200 for t in quants)
    ix = _index_json(pk.read_bytes())
    names = {i: t["name"] for i, t in enumerate(ix["tensors"])}
    for t in ix["tensors"]:
        if t["codec"] == "requant":
            assert [names[j] for j in t["imatrix"]] == [t["name"] + ".in_sum2", t["name"] + ".counts"]


@needs_oracle
def test_source_upcast_from_a_quant_is_a_delta_of_it(tmp_path: Path) -> None:
    """A ladder whose F16 source is the upcast of its Q4_0 (a ladder made from a published quant): the Q4_0
    is stored plain and the source as its delta, the other quants re-derived from the source;
    the source costs under 5 % of its bytes instead of the ~80 % of coding it by itself."""
    files = make_ladder(tmp_path / "m", rungs=("Q8_0", "Q4_0", "Q6_K"), upcast=Q.Q4_0)
    _, report = _round_trip(files, tmp_path)
    by = {(t.name, t.ggml_type): t for t in report.tensors}
    for n in SHAPES:
        assert by[(n, "Q4_0")].codec in ("zstd", "raw")
        assert by[(n, "F16")].codec == "delta" and by[(n, "F16")].base == f"{n} (Q4_0)"
        assert by[(n, "F16")].stored_bytes < 0.05 * by[(n, "F16")].nbytes
        assert by[(n, "Q8_0")].codec == by[(n, "Q6_K")].codec == "requant"


@needs_oracle
def test_family_fine_tune_published_as_f16_and_quant(tmp_path: Path) -> None:
    """A fine-tune published as F16 and Q4_K next to its base's ladder: its quant is re-derived from its own
    F16 (matched by name and shape across files), the base's from the base's."""
    base = make_ladder(tmp_path / "base", rungs=("Q4_K_M",))
    tune = make_ladder(tmp_path / "tune", seed=1, rungs=("Q4_K_M",))
    files = base + [(n.replace("model", "tune"), p) for n, p in tune]
    pk, report = _round_trip(files, tmp_path)
    quants = [t for t in report.tensors if t.ggml_type in ("Q4_K", "Q6_K")]
    assert len(quants) == 8 and all(t.codec == "requant" and t.stored_bytes < 0.01 * t.nbytes + 200 for t in quants)


# ---------------------------------------------------------------------------------------------------------
# determinism, versions, refusals, damage


@needs_oracle
def test_unpack_same_bytes_with_numba_and_threads(f16_ladder: list[tuple[str, str]],
                                                  f16_pack: tuple[Path, PackReport], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing on 1 thread gives the pack 2 threads gave; unpacking with the numba engine (when installed)
    on 3 threads gives the files (the round trip checks every file's sha256)."""
    pk, _ = f16_pack
    pack_files(f16_ladder, tmp_path / "one.ggufpack", threads=1)
    assert sha(tmp_path / "one.ggufpack") == sha(pk)
    from gguf_split.pack import requant
    if requant.numba_available():
        monkeypatch.setenv(ladder.ENGINE_ENV, "numba")
    unpack(pk, tmp_path / "o", threads=3)
    for n, p in f16_ladder:
        assert sha(tmp_path / "o" / n) == sha(p)


@needs_oracle
def test_source_is_decoded_once_per_unpack(f16_ladder: list[tuple[str, str]], f16_pack: tuple[Path, PackReport],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacking the ladder decodes each fplanes chunk of the source once (the quants read the source back
    from the output already written), and the files are still byte-identical."""
    calls: list[int] = []
    real = ladder.decode_fplanes_chunk
    monkeypatch.setattr(ladder, "decode_fplanes_chunk", lambda *a: calls.append(1) or real(*a))
    quants_first = f16_ladder[1:] + f16_ladder[:1]  # the source's file last in the pack: unpack writes it first
    for i, (files, pk) in enumerate([(f16_ladder, f16_pack[0]),
                                     (quants_first, pack_files(quants_first, tmp_path / "q.ggufpack").path)]):
        calls.clear()
        unpack(pk, tmp_path / f"o{i}", threads=2)
        with PackReader(pk) as r:
            chunks = sum(len(t.chunks) for t in r.tensors if t.codec == "fplanes")
        assert chunks and len(calls) == chunks
        for n, p in files:
            assert sha(tmp_path / f"o{i}" / n) == sha(p)


def test_packs_without_a_ladder_stay_version_1(tmp_path: Path) -> None:
    """Quants without their source (no requant) and no F16/BF16 (no fplanes): a version-1 pack, which
    gguf-split before version 2 reads too."""
    rng = np.random.default_rng(0)
    from gguf.quants import quantize
    w = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    p = _write(tmp_path / "q.gguf", {"a.weight": (quantize(w, Q.Q8_0), Q.Q8_0), "n.weight": (w[0], Q.F32)})
    pk = tmp_path / "q.ggufpack"
    pack_files([("q.gguf", p)], pk)
    assert struct.unpack_from("<I", pk.read_bytes(), 8)[0] == 1 and read_index(pk).version == 1
    unpack(pk, tmp_path / "o")
    assert sha(tmp_path / "o" / "q.gguf") == sha(p)


@needs_oracle
def test_version_1_pack_of_the_old_writer_is_read(f16_ladder: list[tuple[str, str]], tmp_path: Path) -> None:
    """A pack written by the version-1 writer (the old package from git, in a child process) of the same
    ladder unpacks byte-identical with this reader. Skipped outside a git checkout."""
    pack_with_old_writer({n[:-len(".gguf")]: p for n, p in f16_ladder}, tmp_path / "v1.ggufpack", tmp_path)
    assert read_index(tmp_path / "v1.ggufpack").version == 1
    unpack(tmp_path / "v1.ggufpack", tmp_path / "o")
    for n, p in f16_ladder:
        assert sha(tmp_path / "o" / n) == sha(p)


def _index_json(data: bytes) -> dict:
    ioff, ilen = struct.unpack_from("<QQ", data, len(data) - 32)
    body = data[ioff + fmt.RecordHeader.SIZE: ioff + ilen]
    out: dict = json.loads(zstandard.ZstdDecompressor().decompress(body))
    return out


def _rewrite_index(data: bytes, ix: dict, extra: bytes = b"") -> bytes:
    """The pack with its index replaced (`extra` records, then a new index record and tail, after the old
    records)."""
    import xxhash
    ioff, _ = struct.unpack_from("<QQ", data, len(data) - 32)
    data, ioff = data[:ioff] + extra, ioff + len(extra)
    raw = json.dumps(ix).encode()
    z = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    head = fmt.RecordHeader(fmt.KIND_INDEX, fmt.REC_ZSTD, len(z), len(raw), xxhash.xxh3_128_digest(z)).encode()
    version = struct.unpack_from("<I", data, 8)[0]
    return data[:ioff] + head + z + fmt.Tail(ioff, len(head) + len(z), version).encode()


@needs_oracle
@pytest.mark.parametrize("field,value,message", [
    ("codec", "zfp9", "coded with 'zfp9', a codec this gguf-split does not know"),
    ("port", "ggml-9.9", "requant port 'ggml-9.9'"),
])
def test_unknown_codec_is_refused_naming_it(f16_pack: tuple[Path, PackReport], tmp_path: Path, field: str,
                                            value: str, message: str) -> None:
    pk, _ = f16_pack
    data = pk.read_bytes()
    ix = _index_json(data)
    t = next(t for t in ix["tensors"] if t["codec"] == "requant")
    t[field] = value
    forged = tmp_path / "new.ggufpack"
    forged.write_bytes(_rewrite_index(data, ix))
    for call in (lambda: read_index(forged), lambda: unpack(forged, tmp_path / "o")):
        with pytest.raises(GGUFSplitError, match=message) as e:
            call()
        assert str(forged) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


@needs_oracle
def test_version_1_pack_may_not_use_version_2_codecs(f16_pack: tuple[Path, PackReport], tmp_path: Path) -> None:
    pk, _ = f16_pack
    data = bytearray(pk.read_bytes())
    struct.pack_into("<I", data, 8, 1)
    forged = tmp_path / "v1.ggufpack"
    ix = _index_json(bytes(data))
    ix["version"] = 1
    forged.write_bytes(_rewrite_index(bytes(data), ix))
    with pytest.raises(GGUFSplitError, match="a codec this gguf-split does not know in a version 1 pack"):
        read_index(forged)


@needs_oracle
@pytest.mark.parametrize("change", ["self_source", "quant_source", "bad_shape_source", "requant_base_of_delta",
                                    "fplanes_on_quant", "imatrix_not_f32", "imatrix_missing"])
def test_forged_ladder_index_is_refused(f16_pack: tuple[Path, PackReport], tmp_path: Path, change: str) -> None:
    pk, _ = f16_pack
    data = pk.read_bytes()
    ix = _index_json(data)
    ts = ix["tensors"]
    req = next(i for i, t in enumerate(ts) if t["codec"] == "requant")
    other = next(i for i, t in enumerate(ts) if t["codec"] == "requant" and i != req)
    if change == "self_source":
        ts[req]["source"] = req
    elif change == "quant_source":
        ts[req]["source"] = other
    elif change == "bad_shape_source":
        ts[req]["source"] = next(i for i, t in enumerate(ts) if t["type"] == Q.F16 and t["shape"] != ts[req]["shape"])
    elif change == "requant_base_of_delta":
        f16 = next(i for i, t in enumerate(ts) if t["type"] == Q.F16)
        ts[f16].update(codec="delta", base=req, rank=0, factor_type="f16", residual="sub", factors=None)
    elif change == "imatrix_not_f32":
        ts[req]["imatrix"] = [ts[req]["source"], ts[req]["source"]]
    elif change == "imatrix_missing":
        ts[req]["imatrix"] = [len(ts), 0]
    else:
        ts[req]["codec"] = "fplanes"
        ts[req]["shuffle"] = 1
    forged = tmp_path / "f.ggufpack"
    forged.write_bytes(_rewrite_index(data, ix))
    with pytest.raises(GGUFSplitError, match="corrupt pack"):
        read_index(forged)


@needs_oracle
def test_every_bit_flip_in_ladder_records_is_caught(f16_pack: tuple[Path, PackReport], tmp_path: Path) -> None:
    """A flipped bit in a requant or fplanes record (header or body), or in the index, is refused with one
    line and nothing written: the records' xxh3-128, then each tensor's and file's digests."""
    pk, _ = f16_pack
    data = pk.read_bytes()
    ix = _index_json(data)
    spots = []
    for codec_name in ("requant", "fplanes"):
        t = next(t for t in ix["tensors"] if t["codec"] == codec_name)
        off = t["chunks"][0]
        blen = struct.unpack_from("<Q", data, off + 8)[0]
        spots += [off, off + 1, off + 20, off + fmt.RecordHeader.SIZE, off + fmt.RecordHeader.SIZE + blen - 1]
    rng = np.random.default_rng(1)
    for k, pos in enumerate(spots):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        p = tmp_path / f"b{k}.ggufpack"
        p.write_bytes(bytes(bad))
        with pytest.raises(GGUFSplitError, match="corrupt pack"):
            unpack(p, tmp_path / f"o{k}")
        assert not (tmp_path / f"o{k}").exists()


@needs_oracle
def test_forged_residual_with_a_valid_checksum_is_caught(f16_pack: tuple[Path, PackReport], tmp_path: Path) -> None:
    """A requant chunk replaced by another residual in a well-framed record (a hostile pack: every checksum
    valid) rebuilds other bytes, and the tensor's xxh3-128 refuses them."""
    import xxhash
    from gguf.constants import GGML_QUANT_SIZES

    pk, _ = f16_pack
    data = pk.read_bytes()
    ix = _index_json(data)
    t = next(t for t in ix["tensors"] if t["codec"] == "requant")
    block, ts = GGML_QUANT_SIZES[Q(t["type"])]
    rows = min(t["rows_per_chunk"], int(np.prod(t["shape"][1:])))
    nb = (rows * t["shape"][0] // block + 7) // 8
    res = bytes([1]) + bytes(nb - 1) + bytes([1]) + bytes(ts - 1)  # block 0 flagged, its first header bit flipped
    z = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(res)
    rec = fmt.RecordHeader(fmt.KIND_DATA, fmt.REC_ZSTD, len(z), len(res), xxhash.xxh3_128_digest(z)).encode()
    ioff, _ = struct.unpack_from("<QQ", data, len(data) - 32)
    t["chunks"][0] = ioff
    out = tmp_path / "h.ggufpack"
    out.write_bytes(_rewrite_index(data, ix, rec + z))
    with pytest.raises(GGUFSplitError, match="corrupt pack.*xxh3"):
        unpack(out, tmp_path / "o")
    assert not (tmp_path / "o").exists()
