"""The per-tensor codecs: exact round trips, determinism of the delta decoder, bounds on bad data."""

from __future__ import annotations

import ast
import inspect
import textwrap

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import quantize

from gguf_split.pack import codec
from gguf_split.pack.codec import CodecError

# ---------------------------------------------------------------------------------------------------------
# helpers


def merged(base_type: Q, target_type: Q, shape: tuple[int, int], rank: int, seed: int = 0,
           scale: float = 0.02) -> tuple[bytes, bytes]:
    """(base bytes, target bytes): target = base dequantized + B·A, rounded to target_type, the way
    llama-export-lora merges a LoRA (numpy shape (rows, row_elems))."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    base_raw = kquant(rng, base_type, w.size) if base_type in KQUANT_SCALES else quantize(w, base_type)
    base = codec.dequantize_rows(base_raw.tobytes(), base_type, shape[0], shape[1])
    b = rng.standard_normal((shape[0], rank)).astype(np.float32) * scale
    a = rng.standard_normal((rank, shape[1])).astype(np.float32) / np.sqrt(shape[1])
    t = base + b @ a
    target = quantize(t, target_type) if target_type == Q.BF16 else t.astype(
        np.float16 if target_type == Q.F16 else np.float32)
    return base_raw.tobytes(), np.ascontiguousarray(target).tobytes()


# gguf cannot quantize to K-quants: random blocks with sane float16 scales instead (byte offsets of the
# float16 fields in a block)
KQUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def kquant(rng: np.random.Generator, qt: Q, n_elems: int) -> np.ndarray:
    block, size = codec.block_sizes(qt)
    blocks = rng.integers(0, 256, (n_elems // block, size), dtype=np.uint8)
    for off in KQUANT_SCALES[qt]:
        blocks[:, off : off + 2] = rng.uniform(1e-4, 1e-3, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks


def reader(raw: bytes, row_bytes: int):
    return lambda r0, r1: memoryview(raw)[r0 * row_bytes : r1 * row_bytes]


def encode_decode(base_raw: bytes, base_type: Q, target_raw: bytes, target_type: Q, shape: tuple[int, int],
                  rows_per_chunk: int = 1 << 30) -> tuple[codec.DeltaPlan, int, bytes]:
    rows, n = shape
    g = codec.geometry(target_type, (n, rows))
    gb = codec.geometry(base_type, (n, rows))
    rpc = min(rows_per_chunk, rows)
    with codec.blas_single_threaded():
        plan = codec.plan_delta(reader(target_raw, g.row_bytes), target_type, reader(base_raw, gb.row_bytes),
                                base_type, g, level=3, rows_per_chunk=rpc)
    assert plan is not None
    bt, a = codec.factors_from_bytes(plan.factor_bytes(), plan.factor_type, plan.rank, rows, n)
    out, stored = [], len(plan.factor_bytes())
    for c in range(g.chunk_count(rpc)):
        r0, r1 = g.chunk_span(c, rpc)
        body = codec.encode_delta_chunk(plan, reader(base_raw, gb.row_bytes)(r0, r1), base_type,
                                        reader(target_raw, g.row_bytes)(r0, r1), target_type, r0, r1, n, 3)
        stored += len(body)
        res = codec.decompress(body, codec.zstandard.frame_content_size(body))
        out.append(codec.decode_delta_chunk(reader(base_raw, gb.row_bytes)(r0, r1), base_type, target_type,
                                            r1 - r0, n, np.ascontiguousarray(bt[:, r0:r1]), a, res, plan.mode))
    return plan, stored, b"".join(out)


# ---------------------------------------------------------------------------------------------------------
# delta round trips


@pytest.mark.parametrize("base_type,target_type", [(Q.Q4_0, Q.F16), (Q.Q8_0, Q.F16), (Q.Q4_K, Q.BF16),
                                                   (Q.F16, Q.F32), (Q.F32, Q.F16), (Q.Q6_K, Q.F16)])
def test_delta_round_trip_is_exact_and_small(base_type: Q, target_type: Q) -> None:
    shape = (96, 256)
    base_raw, target_raw = merged(base_type, target_type, shape, rank=4)
    plan, stored, out = encode_decode(base_raw, base_type, target_raw, target_type, shape, rows_per_chunk=40)
    assert out == target_raw
    assert plan.rank == 4  # the merged update's rank, found from the bytes alone
    assert stored < len(target_raw) / 3


def test_rank_search_finds_a_larger_rank() -> None:
    """A rank-24 update shows no gap in the first 16-component sketch: the planner must look further."""
    shape = (128, 256)
    base_raw, target_raw = merged(Q.Q8_0, Q.F16, shape, rank=24, scale=0.05)
    plan, stored, out = encode_decode(base_raw, Q.Q8_0, target_raw, Q.F16, shape)
    assert out == target_raw
    assert plan.rank == 24


def test_unrelated_base_still_round_trips() -> None:
    """Nothing to predict: rank 0, residual = the whole difference; still exact."""
    rng = np.random.default_rng(3)
    base_raw = quantize((rng.standard_normal((32, 64)) * 0.1).astype(np.float32), Q.Q8_0).tobytes()
    target_raw = (rng.standard_normal((32, 64)) * 0.1).astype(np.float16).tobytes()
    plan, _, out = encode_decode(base_raw, Q.Q8_0, target_raw, Q.F16, (32, 64))
    assert out == target_raw


def test_non_finite_base_is_not_a_base() -> None:
    base = np.full((8, 64), np.inf, dtype=np.float32).tobytes()
    target = np.zeros((8, 64), dtype=np.float16).tobytes()
    g = codec.geometry(Q.F16, (64, 8))
    assert codec.plan_delta(reader(target, 128), Q.F16, reader(base, 256), Q.F32, g, level=3,
                            rows_per_chunk=8) is None


def test_prediction_does_not_depend_on_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    base = rng.standard_normal((50, 96)).astype(np.float32)
    bt = rng.standard_normal((6, 50)).astype(np.float32)
    a = rng.standard_normal((6, 96)).astype(np.float32)
    ref = codec.predict_bits(base, bt, a, Q.F16)
    for sub in (1, 96, 97, 1000):
        monkeypatch.setattr(codec, "_SUB_ELEMS", sub)
        assert np.array_equal(codec.predict_bits(base, bt, a, Q.F16), ref)


def test_prediction_is_the_documented_elementwise_formula() -> None:
    rng = np.random.default_rng(6)
    base = rng.standard_normal((10, 32)).astype(np.float32)
    bt = rng.standard_normal((3, 10)).astype(np.float32)
    a = rng.standard_normal((3, 32)).astype(np.float32)
    d = np.outer(bt[0], a[0]).astype(np.float32)
    for k in (1, 2):
        d = (d + np.outer(bt[k], a[k]).astype(np.float32)).astype(np.float32)
    p = (base + d).astype(np.float32)
    assert np.array_equal(codec.predict_bits(base, bt, a, Q.F16), p.astype(np.float16).view(np.uint16))
    assert np.array_equal(codec.predict_bits(base, bt, a, Q.F32), p.view(np.uint32))
    assert np.array_equal(codec.predict_bits(base, bt, a, Q.BF16),
                          quantize(p, Q.BF16).view(np.uint16).reshape(p.shape))


# ---------------------------------------------------------------------------------------------------------
# determinism: no matmul on the decode path


DECODE_FUNCTIONS = ("predict_bits", "_f32_to_f16_bits", "_bf16_bits", "residual_apply", "decode_delta_chunk",
                    "dequantize_rows", "factors_from_bytes")
FORBIDDEN_CALLS = {"dot", "matmul", "einsum", "tensordot", "inner", "vdot", "sum", "cumsum", "prod", "mean",
                   "outer", "linalg", "fma"}


def _forbidden(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            found.append("@")
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
            found.append(node.attr)
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_CALLS:
            found.append(node.id)
    return found


@pytest.mark.parametrize("name", DECODE_FUNCTIONS)
def test_decode_functions_use_no_reduction_or_matmul(name: str) -> None:
    src = textwrap.dedent(inspect.getsource(getattr(codec, name)))
    assert _forbidden(ast.parse(src)) == []


@pytest.mark.parametrize("qt", sorted(codec.DELTA_BASE_TYPES - {Q.F32, Q.F16}, key=int))
def test_gguf_dequantizers_of_delta_bases_are_elementwise(qt: Q) -> None:
    """A later gguf could change a dequantizer: these are read again at every test run."""
    kind = getattr(gguf_quants, qt.name)
    src = textwrap.dedent(inspect.getsource(kind.dequantize_blocks))
    assert _forbidden(ast.parse(src)) == []


def test_decode_runs_with_matmul_and_friends_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (64, 128)
    base_raw, target_raw = merged(Q.Q8_0, Q.F16, shape, rank=3)
    g = codec.geometry(Q.F16, (128, 64))
    plan = codec.plan_delta(reader(target_raw, g.row_bytes), Q.F16, reader(base_raw, codec.geometry(Q.Q8_0, (128, 64)).row_bytes),
                            Q.Q8_0, g, level=3, rows_per_chunk=64)
    assert plan is not None and plan.rank == 3
    bt, a = codec.factors_from_bytes(plan.factor_bytes(), plan.factor_type, plan.rank, 64, 128)
    pred = codec.predict_bits(codec.dequantize_rows(base_raw, Q.Q8_0, 64, 128), bt, a, Q.F16)
    residual = codec.residual_encode(np.frombuffer(target_raw, np.uint16), pred, plan.mode)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("matmul-like call on the decode path")

    for fn in ("matmul", "dot", "einsum", "tensordot", "inner", "vdot", "outer", "sum", "cumsum"):
        monkeypatch.setattr(np, fn, boom)
    monkeypatch.setattr(np.linalg, "svd", boom)
    monkeypatch.setattr(np.linalg, "qr", boom)
    bt2, a2 = codec.factors_from_bytes(plan.factor_bytes(), plan.factor_type, plan.rank, 64, 128)
    out = codec.decode_delta_chunk(base_raw, Q.Q8_0, Q.F16, 64, 128, bt2, a2, residual, plan.mode)
    assert out == target_raw


# ---------------------------------------------------------------------------------------------------------
# float16 rounding


def test_f16_rounding_equals_numpy_cast() -> None:
    rng = np.random.default_rng(7)
    bits = [rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)]
    for lo in (0x38800000, 0x477FF000, 0x33000000, 0x3F800000, 0x7F800000):  # boundaries and specials
        bits.append(np.arange(lo - 4096, lo + 4096, dtype=np.uint32))
    allbits = np.concatenate(bits)
    allbits = np.concatenate([allbits, allbits | np.uint32(0x80000000)])
    x = allbits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    got = np.empty(x.shape, np.uint16)
    codec._f32_to_f16_bits(x.copy(), np.empty(x.shape, np.uint32), np.empty(x.shape, np.uint32), got)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], ref[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()


# ---------------------------------------------------------------------------------------------------------
# residuals


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("mode", codec.RESIDUAL_MODES)
def test_residual_round_trip(dtype: type, mode: str) -> None:
    rng = np.random.default_rng(8)
    info = np.iinfo(dtype)
    pred = rng.integers(0, int(info.max) + 1, 1001, dtype=np.uint64).astype(dtype)
    target = pred.copy()
    pick = rng.random(1001) < 0.2
    target[pick] = rng.integers(0, int(info.max) + 1, int(pick.sum()), dtype=np.uint64).astype(dtype)
    target[:4] = (0, info.max, 1, info.max - 1)
    buf = codec.residual_encode(target, pred, mode)
    assert len(buf) <= codec.residual_bound(1001, np.dtype(dtype).itemsize)
    assert np.array_equal(codec.residual_apply(pred.copy(), buf, mode), target)


def test_residual_refuses_bad_buffers() -> None:
    pred = np.zeros(10, np.uint16)
    good = codec.residual_encode(np.arange(10, dtype=np.uint16), pred, "sub")
    with pytest.raises(CodecError, match="bitmap"):
        codec.residual_apply(pred.copy(), good[:1], "sub")
    with pytest.raises(CodecError, match="calls for"):
        codec.residual_apply(pred.copy(), good + b"\0", "sub")
    padded = bytearray(good)
    padded[1] |= 0x80  # bit 15: past the 10 elements
    with pytest.raises(CodecError, match="past the chunk"):
        codec.residual_apply(pred.copy(), bytes(padded), "sub")
    with pytest.raises(CodecError, match="mode"):
        codec.residual_apply(pred.copy(), good, "add")


def test_decompress_checks_the_declared_size() -> None:
    z = codec.compress(b"x" * 1000, 3)
    assert codec.decompress(z, 1000) == b"x" * 1000
    with pytest.raises(CodecError, match="declares"):
        codec.decompress(z, 999)
    with pytest.raises(CodecError):
        codec.decompress(z[:-3], 1000)
    with pytest.raises(CodecError):
        codec.decompress(b"not zstd at all", 10)
    with pytest.raises(CodecError):
        codec.decompress(z + b"junk", 1000)


def test_factor_record_size_is_checked() -> None:
    with pytest.raises(CodecError, match="needs"):
        codec.factors_from_bytes(b"\0" * 10, "f16", 2, 3, 4)


def test_shuffle_round_trip() -> None:
    data = bytes(range(256)) * 3
    for stride in (1, 2, 4, 6, 16):
        assert codec.unshuffle(codec.shuffle(data, stride), stride) == data


def test_geometry_refuses_bad_shapes() -> None:
    with pytest.raises(CodecError):
        codec.geometry(Q.Q8_0, (33, 2))
    with pytest.raises(CodecError):
        codec.geometry(Q.F16, (0, 2))
    with pytest.raises(CodecError):
        codec.geometry(9999, (32,))
    with pytest.raises(CodecError):
        codec.geometry(Q.F32, (1 << 30, 1 << 30))
    g = codec.geometry(Q.F16, (1 << 20, 4))
    with pytest.raises(CodecError):
        codec.check_rows_per_chunk(g, 64)
    codec.check_rows_per_chunk(g, 1)
