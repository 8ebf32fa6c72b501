"""Per-tensor codecs of a gguf-split pack (see docs/pack-format.md).

A tensor of the pack is cut into chunks of whole rows (a row = ne0 elements, the fastest-moving GGUF
dimension). Each chunk is coded one of two ways, fixed per tensor:

- **plain**: the chunk's bytes, optionally byte-shuffled (byte j of every s-byte group together, s = the
  ggml block or element size), then zstd (or stored when zstd does not shrink them);
- **delta** (targets of type F16, BF16, F32): the target is predicted from another tensor of the same shape
  (the *base*, any type whose gguf dequantizer is elementwise, see `DELTA_BASE_TYPES`) plus a rank-r
  product B·A, rounded to the target type; what is stored is B, A and the exact difference between the
  target's bits and the predicted bits (the *residual*), which is zero almost everywhere.

Decoding is deterministic on every machine: the prediction uses only elementwise IEEE float32 operations
in a fixed order (numpy's elementwise +, ×, and casts are correctly rounded; no matmul, dot, einsum, sum
or BLAS, whose rounding differs between CPUs and libraries):

    d    = B[:,0]⊗A[0] ; d = d + B[:,k]⊗A[k]  for k = 1 .. r-1      (float32, k in order)
    p    = base + d                                               (float32; p = base when r = 0)
    bits = round p to the target type (F16: IEEE round-to-nearest-even; BF16: gguf's rounding; F32: as is)

The encoder builds its prediction with the very same function (`predict_bits`) and checks each chunk's
round trip before the chunk is written. Finding B and A (the encoder's business) uses BLAS freely.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import zstandard
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
from gguf import quants as _gguf_quants
from gguf.quants import dequantize as _gguf_dequantize
from gguf.quants import quantize as _gguf_quantize

# rows per chunk: as many whole rows as hold about this many elements (at least one row)
CHUNK_ELEMS = 1 << 20
# a reader refuses chunks larger than this many elements, unless a chunk is a single row
MAX_CHUNK_ELEMS = 1 << 24
MAX_RANK = 1024
# rows of a chunk the prediction handles at a time (keeps its r passes in cache; results do not depend on it)
_SUB_ELEMS = 1 << 15

# Targets the delta codec predicts: ggml type -> (bit-pattern dtype, width in bytes)
DELTA_TARGET_TYPES: dict[int, tuple[Any, int]] = {Q.F16: (np.uint16, 2), Q.BF16: (np.uint16, 2), Q.F32: (np.uint32, 4)}

# Types whose gguf dequantizer was read and found to use elementwise numpy operations only (integer bit
# unpacking, float16->float32 casts, one float32 multiply, add or subtract per step, each its own ufunc,
# so nothing can be fused into an FMA). Other types (IQ*, TQ*, MXFP4, ...) are never used as delta bases.
DELTA_BASE_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                              Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})

FACTOR_DTYPES: dict[str, Any] = {"f16": np.float16, "f32": np.float32}
RESIDUAL_MODES = ("sub", "xor")

_F16_MAX = 65504.0


@contextmanager
def blas_single_threaded() -> Iterator[None]:
    """BLAS/LAPACK in one thread (the encoder runs its own pool): with OpenBLAS's 2 threads a 576×72 QR
    took 1.6-2.2 s here, against 1.5 ms in one thread."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # no stubs published
    except ImportError:  # pragma: no cover - a dependency; without it planning is only slower
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class CodecError(ValueError):
    """Data that does not decode (the caller names the pack and the record)."""


# ---------------------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Geometry:
    """A tensor's shape as rows: `n_rows` rows of `row_elems` elements, `row_bytes` bytes each."""

    ggml_type: int
    shape: tuple[int, ...]
    row_elems: int
    n_rows: int
    row_bytes: int

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def n_elems(self) -> int:
        return self.n_rows * self.row_elems

    def chunk_count(self, rows_per_chunk: int) -> int:
        return -(-self.n_rows // rows_per_chunk)

    def chunk_span(self, i: int, rows_per_chunk: int) -> tuple[int, int]:
        """Rows [r0, r1) of chunk i."""
        r0 = i * rows_per_chunk
        return r0, min(self.n_rows, r0 + rows_per_chunk)


def block_sizes(ggml_type: int) -> tuple[int, int]:
    try:
        return GGML_QUANT_SIZES[Q(ggml_type)]
    except ValueError:
        raise CodecError(f"unknown ggml type {ggml_type}") from None


def geometry(ggml_type: int, shape: tuple[int, ...]) -> Geometry:
    block, type_size = block_sizes(ggml_type)
    if not shape or any(d < 1 for d in shape) or len(shape) > 4:
        raise CodecError(f"bad tensor shape {list(shape)}")
    row = shape[0]
    if block == 0 or row % block:
        raise CodecError(f"first dimension {row} is not a multiple of the block size {block}")
    n_rows = math.prod(shape[1:])
    if row * n_rows >= 1 << 50:
        raise CodecError(f"tensor shape {list(shape)} is too large")
    return Geometry(ggml_type, tuple(shape), row, n_rows, row // block * type_size)


def default_rows_per_chunk(g: Geometry) -> int:
    return max(1, CHUNK_ELEMS // g.row_elems)


def check_rows_per_chunk(g: Geometry, rows_per_chunk: int) -> None:
    if not isinstance(rows_per_chunk, int) or rows_per_chunk < 1:
        raise CodecError(f"rows per chunk {rows_per_chunk!r} is not a positive integer")
    if rows_per_chunk > 1 and rows_per_chunk * g.row_elems > MAX_CHUNK_ELEMS:
        raise CodecError(f"chunks of {rows_per_chunk} rows of {g.row_elems} elements exceed the limit of "
                         f"{MAX_CHUNK_ELEMS} elements")


def natural_stride(ggml_type: int) -> int:
    """The shuffle stride matching a type's layout: its block bytes (quantized) or element bytes."""
    block, type_size = block_sizes(ggml_type)
    return type_size


# ---------------------------------------------------------------------------------------------------------
# zstd




def compress(data: Any, level: int) -> bytes:
    # a ZstdCompressor is not safe to share between threads: make one per call (cheap next to the data)
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(data)


def decompress(body: Any, expected: int) -> bytes:
    """Decompress one zstd frame that must decode to exactly `expected` bytes (checked before allocating)."""
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise CodecError(f"not a zstd frame ({e})") from None
    if size != expected:
        raise CodecError(f"zstd frame declares {size} bytes, {expected} expected")
    try:
        dctx = zstandard.ZstdDecompressor()
        obj = dctx.decompressobj()
        out = obj.decompress(body)
        if not obj.eof or obj.unused_data:
            raise CodecError("zstd frame is truncated or followed by stray bytes")
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt zstd data ({e})") from None
    if len(out) != expected:
        raise CodecError(f"zstd frame decoded to {len(out)} bytes, {expected} expected")
    return out


# ---------------------------------------------------------------------------------------------------------
# Plain chunks


def shuffle(data: Any, stride: int) -> bytes:
    if stride <= 1:
        return bytes(data)
    a = np.frombuffer(data, dtype=np.uint8)
    out: bytes = a.reshape(-1, stride).T.tobytes()
    return out


def unshuffle(data: Any, stride: int) -> bytes:
    if stride <= 1:
        return bytes(data) if not isinstance(data, bytes) else data
    a = np.frombuffer(data, dtype=np.uint8)
    if stride == 2:  # F16/BF16: two plane copies into the columns, ~8x numpy's transposed copy here
        n = a.size // 2
        pairs = np.empty((n, 2), dtype=np.uint8)
        pairs[:, 0] = a[:n]
        pairs[:, 1] = a[n:]
        return pairs.tobytes()
    out: bytes = a.reshape(stride, -1).T.tobytes()
    return out


def check_stride(g: Geometry, stride: int) -> None:
    if not isinstance(stride, int) or stride < 1 or g.row_bytes % stride:
        raise CodecError(f"shuffle stride {stride!r} does not divide the row size {g.row_bytes}")


# ---------------------------------------------------------------------------------------------------------
# Delta: prediction (the deterministic part)


def dequantize_rows(raw: Any, ggml_type: int, n_rows: int, row_elems: int) -> np.ndarray:
    """Rows of a base tensor as float32, through gguf's dequantizers (elementwise for DELTA_BASE_TYPES).

    gguf's per-type `dequantize_blocks` is called on the chunk's blocks directly: its `dequantize` applies
    the same function to groups of rows (3.4x slower here); elementwise, the results are the same."""
    qt = Q(ggml_type)
    if qt not in DELTA_BASE_TYPES:
        raise CodecError(f"{qt.name} cannot be a delta base")
    data = np.frombuffer(raw, dtype=np.uint8)
    if qt == Q.F32:
        return data.view(np.float32).reshape(n_rows, row_elems)
    if qt == Q.F16:
        return _gguf_dequantize(data, qt).reshape(n_rows, row_elems)
    block, type_size = GGML_QUANT_SIZES[qt]
    if data.size % type_size:
        raise CodecError(f"{data.size} bytes are not whole {qt.name} blocks")
    kind = getattr(_gguf_quants, qt.name, None)
    if kind is not None and hasattr(kind, "dequantize_blocks"):
        out = kind.dequantize_blocks(data.reshape(-1, type_size))
    else:  # pragma: no cover - another gguf layout: its public entry point, same results
        out = _gguf_dequantize(data.reshape(n_rows, -1), qt)
    return np.asarray(out, dtype=np.float32).reshape(n_rows, row_elems)


def check_float_environment() -> None:
    """Refuse to predict when float32 subnormals are flushed to zero (some libraries switch the CPU into
    flush-to-zero mode when loaded): predictions would differ from the encoder's."""
    x = np.array([1.1754944e-38], dtype=np.float32)
    if not (x * np.float32(0.5))[0] > 0:
        raise CodecError("this process flushes float32 subnormals to zero (a loaded library set FTZ/DAZ); "
                         "delta-coded tensors cannot be rebuilt exactly here")


def predict_bits(base: np.ndarray, bt: np.ndarray, a: np.ndarray, target_type: int) -> np.ndarray:
    """The predicted bit patterns (uint16 or uint32, shape of `base`) of a target chunk.

    base: (rows, n) float32; bt: (r, rows) float32 (B transposed, this chunk's rows); a: (r, n) float32.
    Elementwise float32 operations only, in the order given in the module docstring."""
    dtype, _ = DELTA_TARGET_TYPES[Q(target_type)]
    rows, n = base.shape
    r = bt.shape[0]
    out = np.empty((rows, n), dtype=dtype)
    step = max(1, _SUB_ELEMS // n)
    h0 = min(step, rows)
    d = np.empty((h0, n), dtype=np.float32)
    t = np.empty_like(d)
    s = np.empty((h0, n), dtype=np.uint32)
    for i0 in range(0, rows, step):
        i1 = min(rows, i0 + step)
        dd, tt, ss = d[: i1 - i0], t[: i1 - i0], s[: i1 - i0]
        if r == 0:
            np.copyto(dd, base[i0:i1])
        else:
            np.multiply(bt[0, i0:i1, None], a[0][None, :], out=dd)
            for k in range(1, r):
                np.multiply(bt[k, i0:i1, None], a[k][None, :], out=tt)
                np.add(dd, tt, out=dd)
            np.add(base[i0:i1], dd, out=dd)
        if target_type == Q.F16:
            _f32_to_f16_bits(dd, ss, tt.view(np.uint32), out[i0:i1])
        elif target_type == Q.BF16:
            out[i0:i1] = _bf16_bits(dd)
        else:
            out[i0:i1] = dd.view(np.uint32)
    return out


_F16_LO = np.uint32(0x38800000)  # 2^-14, the smallest normal float16
_F16_SPAN = np.uint32(0x477FF000 - 0x38800000)  # up to 65520, where rounding reaches infinity


def _f32_to_f16_bits(p: np.ndarray, s: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """float32 -> float16 bit patterns, IEEE round to nearest even (numpy's own cast, but 5x faster): integer
    operations for results in the normal float16 range, numpy's cast for the rare others (subnormal,
    overflow, inf, NaN). `s` and `w` are uint32 scratch of p's shape; `p` is overwritten."""
    u = p.view(np.uint32)
    np.right_shift(u, 16, out=s)
    np.bitwise_and(s, 0x8000, out=s)  # sign, in float16 position
    np.bitwise_and(u, 0x7FFFFFFF, out=u)  # |p|
    np.subtract(u, _F16_LO, out=w)  # wraps below 2^-14
    special = w >= _F16_SPAN
    np.right_shift(u, 13, out=w)
    np.bitwise_and(w, 1, out=w)
    np.add(w, 0x0FFF, out=w)
    np.add(w, u, out=w)  # round half to even at bit 13
    np.right_shift(w, 13, out=w)
    np.subtract(w, 112 << 10, out=w)  # rebias the exponent: 127 - 15 = 112
    np.bitwise_or(w, s, out=w)
    np.copyto(out, w, casting="unsafe")
    if special.any():
        orig = (u[special] | (s[special] << np.uint32(16))).view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            out[special] = orig.astype(np.float16).view(np.uint16)


def _bf16_bits(p: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns with gguf's rounding (integer operations)."""
    kind = getattr(_gguf_quants, "BF16", None)
    if kind is not None and hasattr(kind, "quantize_blocks"):
        bits: np.ndarray = kind.quantize_blocks(p.reshape(-1, 1)).view(np.uint16).reshape(p.shape)
        return bits
    return _gguf_quantize(p, Q.BF16).view(np.uint16).reshape(p.shape)  # pragma: no cover


Factors = tuple[np.ndarray, np.ndarray]  # (Bᵀ (r, m), A (r, n)) float32, exactly representable in their type


def factors_from_bytes(raw: Any, factor_type: str, r: int, m: int, n: int) -> Factors:
    """(Bt (r, m), A (r, n)) as float32 from a factor record: Bt then A, row-major, little-endian."""
    dt = np.dtype(FACTOR_DTYPES[factor_type]).newbyteorder("<")
    need = r * (m + n) * dt.itemsize
    if len(raw) != need:
        raise CodecError(f"factor record holds {len(raw)} bytes, rank {r} needs {need}")
    arr = np.frombuffer(raw, dtype=dt)
    bt = arr[: r * m].reshape(r, m).astype(np.float32)
    a = arr[r * m :].reshape(r, n).astype(np.float32)
    return bt, a


def factors_to_bytes(bt: np.ndarray, a: np.ndarray, factor_type: str) -> bytes:
    dt = np.dtype(FACTOR_DTYPES[factor_type]).newbyteorder("<")
    return bt.astype(dt).tobytes() + a.astype(dt).tobytes()


# ---------------------------------------------------------------------------------------------------------
# Delta: residuals
#
# A residual buffer for n elements of width w bytes: a bitmap of ceil(n/8) bytes (bit i, little-endian bit
# order, set where the residual is not zero; bits past n are zero), then the c nonzero values (c = bits set)
# as w byte planes (all low bytes, then the next bytes, ...). "sub": value = zigzag(target - predicted) of
# the bit patterns taken mod 2^(8w) as signed; "xor": value = target ^ predicted.


def residual_encode(target: np.ndarray, pred: np.ndarray, mode: str) -> bytes:
    t = target.reshape(-1)
    p = pred.reshape(-1)
    width = t.dtype.itemsize
    if mode == "sub":
        diff = t - p  # wraps mod 2^(8w)
        mask = diff != 0
        v = diff[mask].view(np.int16 if width == 2 else np.int32)
        vals = ((v << 1) ^ (v >> (8 * width - 1))).view(t.dtype)
    elif mode == "xor":
        x = t ^ p
        mask = x != 0
        vals = x[mask]
    else:
        raise CodecError(f"unknown residual mode {mode!r}")
    bitmap = np.packbits(mask, bitorder="little")
    planes = vals.astype(vals.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(-1, width).T
    out: bytes = bitmap.tobytes() + planes.tobytes()
    return out


def residual_bound(n: int, width: int) -> int:
    """Largest residual buffer for n elements."""
    return (n + 7) // 8 + n * width


def residual_apply(pred: np.ndarray, buf: Any, mode: str) -> np.ndarray:
    """Add a residual buffer to predicted bits in place (the decoder's side); returns `pred` flattened."""
    p = pred.reshape(-1)
    n = p.size
    width = p.dtype.itemsize
    nb = (n + 7) // 8
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size < nb:
        raise CodecError(f"residual of {raw.size} bytes is shorter than its bitmap ({nb} bytes)")
    mask = np.unpackbits(raw[:nb], bitorder="little").view(bool)
    if mask[n:].any():
        raise CodecError("residual bitmap has bits set past the chunk's end")
    mask = mask[:n]
    count = int(np.count_nonzero(mask))
    if raw.size != nb + count * width:
        raise CodecError(f"residual holds {raw.size} bytes, its bitmap calls for {nb + count * width}")
    if count == 0:
        return p
    vals = np.ascontiguousarray(raw[nb:].reshape(width, -1).T).view(p.dtype.newbyteorder("<")).reshape(-1)
    vals = vals.astype(p.dtype, copy=False)
    if mode == "sub":
        one = p.dtype.type(1)
        vals = (vals >> one) ^ (p.dtype.type(0) - (vals & one))  # un-zigzag, as an unsigned wrap-around value
    elif mode != "xor":
        raise CodecError(f"unknown residual mode {mode!r}")
    dense = np.zeros(n, dtype=p.dtype)
    dense[mask] = vals
    if mode == "sub":
        np.add(p, dense, out=p)  # mod 2^(8w)
    else:
        np.bitwise_xor(p, dense, out=p)
    return p


# ---------------------------------------------------------------------------------------------------------
# Delta: decoding one chunk


def decode_delta_chunk(base_raw: Any, base_type: int, target_type: int, rows: int, row_elems: int,
                       bt: np.ndarray, a: np.ndarray, residual: Any, mode: str) -> bytes:
    """A delta chunk's bytes from the base chunk's bytes, this chunk's factor rows and its residual."""
    base = dequantize_rows(base_raw, base_type, rows, row_elems)
    pred = predict_bits(base, bt, a, target_type)
    return residual_apply(pred, residual, mode).tobytes()


# ---------------------------------------------------------------------------------------------------------
# Delta: the encoder's search (BLAS allowed here: only the factors it finds are stored)


@dataclass
class DeltaPlan:
    rank: int
    factor_type: str
    mode: str
    bt: np.ndarray  # (r, m) float32, exactly representable in factor_type
    a: np.ndarray  # (r, n) float32, likewise
    estimate: int  # estimated bytes (factors + compressed residuals)
    plain_estimate: int
    candidates: dict[int, int]  # rank -> estimated bytes

    def factor_bytes(self) -> bytes:
        return factors_to_bytes(self.bt, self.a, self.factor_type)


RowReader = Callable[[int, int], Any]  # (r0, r1) -> raw bytes of rows [r0, r1)


def _rank_candidates(s: np.ndarray, kmax: int) -> list[int]:
    cands = {0}
    cands.update(r for r in (1, 2, 4, 8, 16, 32, 64, 128) if r <= kmax)
    for r in range(1, min(len(s), kmax + 1)):
        if s[r] <= 0 or s[r - 1] / s[r] > 2.0:  # a gap in the spectrum: the true rank of an update
            cands.add(r)
    return sorted(c for c in cands if c <= kmax)


def _balanced(bt: np.ndarray, a: np.ndarray) -> Factors:
    """Scale each component so that B's column and A's row have the same largest magnitude."""
    bt = bt.astype(np.float32).copy()
    a = a.astype(np.float32).copy()
    for k in range(bt.shape[0]):
        mb, ma = float(np.abs(bt[k]).max()), float(np.abs(a[k]).max())
        if mb > 0 and ma > 0:
            s = math.sqrt(mb / ma)
            bt[k] /= s
            a[k] *= s
    return bt, a


def _storable(bt: np.ndarray, a: np.ndarray, factor_type: str) -> Factors | None:
    if factor_type == "f16":
        if max(float(np.abs(bt).max(initial=0)), float(np.abs(a).max(initial=0))) >= _F16_MAX:
            return None
    dt = FACTOR_DTYPES[factor_type]
    return bt.astype(dt).astype(np.float32), a.astype(dt).astype(np.float32)


# D = target - base is kept in memory while planning when it has at most this many elements (256 MiB of
# float32), else recomputed from the inputs on each pass
_PLAN_CACHE_ELEMS = 1 << 26
SKETCH_FIRST = 16  # components of the first sketch (+8 oversampling); a larger one only without a clear gap
SKETCH_GROWTH = 4
CLEAR_GAP = 4.0  # a ratio of consecutive singular values this large: the rank of an update, found
SAMPLE_RUNS = 4


def plan_delta(target: RowReader, target_type: int, base: RowReader, base_type: int, g: Geometry, *,
               level: int, rows_per_chunk: int, seed: int = 0, max_rank: int = 128,
               sample_elems: int = 1 << 17, power: int = 1) -> DeltaPlan | None:
    """Find B and A for target ≈ base + B·A and pick rank, factor type and residual mode by the bytes they
    produce on a sample of rows (every row when the tensor is small). None when the base is not finite.

    In steps: the base checked finite; D = target - base factorized by a randomized SVD (`_factorize`);
    a sample of rows (`_Sample`) on which every candidate is measured by its compressed bytes; the rank
    searched (`_RankSearch.run`); at the chosen rank, the residual mode and the factors' type
    (`_RankSearch.finish`)."""
    pair = _DeltaPair(target, target_type, base, base_type, g, rows_per_chunk)
    if not pair.base_is_finite():
        return None
    kmax = max(0, min(max_rank, min(g.n_rows, g.row_elems) // 2))
    s, b_full, a_full, kmax = _factorize(pair, kmax, np.random.default_rng(seed), power)
    sample = _Sample.take(pair, sample_elems, level)
    search = _RankSearch(b_full, a_full, kmax, sample)
    search.run(s)
    return search.finish()


@dataclass
class _DeltaPair:
    """A target and its base, read by rows, cut in the pack's chunks (the blocks every pass walks)."""

    target: RowReader
    target_type: int
    base: RowReader
    base_type: int
    g: Geometry
    rows_per_chunk: int

    def __post_init__(self) -> None:
        self.m, self.n = self.g.n_rows, self.g.row_elems
        self.tdtype, self.width = DELTA_TARGET_TYPES[Q(self.target_type)]
        k = self.rows_per_chunk
        self.blocks = [self.g.chunk_span(i, k) for i in range(self.g.chunk_count(k))]

    def rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """(base as float32, target's bit patterns) of rows [r0, r1)."""
        b = dequantize_rows(self.base(r0, r1), self.base_type, r1 - r0, self.n)
        tb = np.frombuffer(self.target(r0, r1), dtype=self.tdtype).reshape(r1 - r0, self.n)
        return b, tb

    def diff(self, r0: int, r1: int) -> np.ndarray:
        """target - base on rows [r0, r1), float32, non-finite values as 0."""
        b, tb = self.rows(r0, r1)
        d = dequantize_rows(tb.view(np.uint8), self.target_type, r1 - r0, self.n) - b
        finite: np.ndarray = np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0, copy=False)
        return finite

    def base_is_finite(self) -> bool:
        for r0, r1 in self.blocks:
            b = dequantize_rows(self.base(r0, r1), self.base_type, r1 - r0, self.n)
            if not np.isfinite(b).all() or float(np.abs(b).max(initial=0)) > 1e30:
                return False
        return True


def _factorize(pair: _DeltaPair, kmax: int, rng: np.random.Generator,
               power: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(singular values, Bᵀ, A, the largest rank worth trying) of D = target - base: a sketch of
    SKETCH_FIRST (+8) components first, SKETCH_GROWTH times larger while no clear gap shows in it."""
    m, n = pair.m, pair.n
    cache = [pair.diff(r0, r1) for r0, r1 in pair.blocks] if m * n <= _PLAN_CACHE_ELEMS else None

    def d_block(i: int) -> np.ndarray:
        return cache[i] if cache is not None else pair.diff(*pair.blocks[i])

    s = np.zeros(0)
    b_full = np.zeros((0, m), np.float32)
    a_full = np.zeros((0, n), np.float32)
    reach = SKETCH_FIRST
    while kmax > 0:
        kk_max = min(kmax, reach)
        s, b_full, a_full = _range_svd(d_block, pair.blocks, m, n, min(kk_max + 8, min(m, n)), rng, power)
        top = s[: kk_max + 1]
        clear_gap = any(top[r] <= 0 or top[r - 1] / top[r] >= CLEAR_GAP for r in range(1, len(top)))
        if clear_gap or kk_max >= kmax:
            kmax = kk_max
            break
        reach *= SKETCH_GROWTH
    return s, b_full, a_full, kmax


def _range_svd(d_block: Callable[[int], np.ndarray], blocks: list[tuple[int, int]], m: int, n: int, kk: int,
               rng: np.random.Generator, power: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A randomized range finder with power iterations (the spectrum of a merged update is the update's
    rank-r signal over a flat floor of rounding noise; without one the noise tilts the subspace found):
    Y = D·Ω; `power` times: Q = orth(Y), W = orth(Dᵀ·Q), Y = D·W; then Z = Qᵀ·D = U S Vᵀ. Returns
    (S, (Q·U·S)ᵀ, Vᵀ) for kk components."""
    w = rng.standard_normal((n, kk)).astype(np.float32)
    for it in range(power + 1):
        y = np.empty((m, kk), dtype=np.float32)
        for i, (r0, r1) in enumerate(blocks):
            y[r0:r1] = d_block(i) @ w
        qm, _ = np.linalg.qr(y)
        del y
        z = np.zeros((n, kk), dtype=np.float64)
        for i, (r0, r1) in enumerate(blocks):
            z += d_block(i).T @ qm[r0:r1]
        if it < power:
            w = np.linalg.qr(z)[0].astype(np.float32)
    uz, sv, vt = np.linalg.svd(z.T, full_matrices=False)
    return sv, (qm @ (uz * sv).astype(np.float32)).T, vt.astype(np.float32)


class _Sample:
    """Rows a candidate is measured on: every row of a small tensor, else SAMPLE_RUNS evenly spread runs;
    estimates are scaled from them to the whole tensor."""

    def __init__(self, pair: _DeltaPair, spans: list[tuple[int, int]], level: int) -> None:
        self.pair, self.level = pair, level
        self.scale = pair.m / sum(r1 - r0 for r0, r1 in spans)
        self.rows = [(r0, r1, *pair.rows(r0, r1)) for r0, r1 in spans]

    @classmethod
    def take(cls, pair: _DeltaPair, sample_elems: int, level: int) -> "_Sample":
        m = pair.m
        sample_rows = max(1, min(m, sample_elems // pair.n))
        if sample_rows >= m:
            return cls(pair, [(0, m)], level)
        run = max(1, sample_rows // SAMPLE_RUNS)
        starts = np.linspace(0, m - run, SAMPLE_RUNS).astype(int)
        return cls(pair, sorted({(int(s0), int(s0) + run) for s0 in starts}), level)

    def plain_bytes(self) -> int:
        """The target's estimated bytes as a plain tensor (shuffled, zstd)."""
        w = self.pair.width
        return int(self.scale * sum(len(compress(shuffle(tb.tobytes(), w), self.level)) for *_, tb in self.rows))

    def residual_bytes(self, st: Factors, modes: tuple[str, ...]) -> dict[str, int]:
        """Each residual mode's estimated bytes with factors `st`."""
        sizes = {mode: 0 for mode in modes}
        for r0, r1, b, tb in self.rows:
            pred = predict_bits(b, np.ascontiguousarray(st[0][:, r0:r1]), st[1], self.pair.target_type)
            for mode in modes:
                sizes[mode] += len(compress(residual_encode(tb, pred, mode), self.level))
        return {mode: int(v * self.scale) for mode, v in sizes.items()}


class _RankSearch:
    """The rank by the bytes it produces, cheapest questions first: none, the spectrum's largest gap,
    then the ladder (`_rank_candidates`) up and down from it, each way until two in a row do worse than
    the best so far (or their factors alone would)."""

    def __init__(self, b_full: np.ndarray, a_full: np.ndarray, kmax: int, sample: _Sample) -> None:
        self.b_full, self.a_full, self.kmax, self.sample = b_full, a_full, kmax, sample
        self.cands: dict[int, int] = {}  # rank -> estimated bytes
        self.parts: dict[int, Factors] = {}

    def factor_bytes(self, r: int, ft: str) -> int:
        pair = self.sample.pair
        return int(r * (pair.m + pair.n) * np.dtype(FACTOR_DTYPES[ft]).itemsize)

    def storable(self, r: int, ft: str) -> Factors | None:
        return _storable(*_balanced(self.b_full[:r], self.a_full[:r]), ft)

    def try_rank(self, r: int) -> None:
        if r in self.cands or r > self.kmax:
            return
        ft = "f16"
        st = self.storable(r, ft)
        if st is None:
            ft = "f32"
            st = self.storable(r, ft)
        if st is None:
            return
        if self.cands and self.factor_bytes(r, ft) >= min(self.cands.values()):
            return
        self.cands[r] = self.factor_bytes(r, ft) + self.sample.residual_bytes(st, ("sub",))["sub"]
        self.parts[r] = st

    def run(self, s: np.ndarray) -> None:
        self.try_rank(0)
        ladder = _rank_candidates(s, self.kmax)[1:]  # powers of two and the spectrum's gaps, ascending
        if not ladder:
            return
        ratios = [(s[r - 1] / s[r] if s[r] > 0 else np.inf, r) for r in range(1, min(len(s), self.kmax + 1))]
        start = max(ratios)[1] if ratios else ladder[0]
        self.try_rank(start)
        for direction in (1, -1):  # up from the largest gap, then down, each until two in a row do worse
            worse = 0
            for r in (ladder if direction > 0 else ladder[::-1]):
                if (r - start) * direction <= 0:
                    continue
                before = min(self.cands.values())
                self.try_rank(r)
                worse = worse + 1 if r not in self.cands or self.cands[r] >= before else 0
                if worse >= 2:
                    break

    def finish(self) -> DeltaPlan:
        """At the best rank: xor against sub, float32 factors against float16."""
        r = min(self.cands, key=lambda c: (self.cands[c], c))
        st = self.parts[r]
        ft = "f16" if r == 0 or bool((st[0].astype(np.float16).astype(np.float32) == st[0]).all()) else "f32"
        options: list[tuple[int, str, str, Factors]] = []
        for mode, size in self.sample.residual_bytes(st, RESIDUAL_MODES).items():
            options.append((self.factor_bytes(r, ft) + size, ft, mode, st))
        if r > 0 and ft == "f16":
            st32 = self.storable(r, "f32")
            if st32 is not None:
                size = self.sample.residual_bytes(st32, ("sub",))["sub"]
                options.append((self.factor_bytes(r, "f32") + size, "f32", "sub", st32))
        total, ft, mode, st = min(options, key=lambda o: o[0])
        return DeltaPlan(r, ft, mode, st[0], st[1], total, self.sample.plain_bytes(), self.cands)


def encode_delta_chunk(plan: DeltaPlan, base_raw: Any, base_type: int, target_raw: Any, target_type: int,
                       r0: int, r1: int, row_elems: int, level: int) -> bytes:
    """One delta chunk: the compressed residual, after checking that decoding it gives `target_raw` back."""
    tdtype, width = DELTA_TARGET_TYPES[Q(target_type)]
    rows = r1 - r0
    base = dequantize_rows(base_raw, base_type, rows, row_elems)
    bt = np.ascontiguousarray(plan.bt[:, r0:r1])
    pred = predict_bits(base, bt, plan.a, target_type)
    target = np.frombuffer(target_raw, dtype=tdtype)
    body = compress(residual_encode(target, pred, plan.mode), level)
    # the round trip through the decoder's own functions
    again = residual_apply(pred, decompress(body, _frame_size(body)), plan.mode)
    if not np.array_equal(again, target):
        raise CodecError("delta round trip failed")
    return body


def _frame_size(body: bytes) -> int:
    return zstandard.frame_content_size(body)
