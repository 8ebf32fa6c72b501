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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zstandard
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q
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


_tls_cctx: dict[tuple[int, int], zstandard.ZstdCompressor] = {}


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
    return a.reshape(-1, stride).T.tobytes()


def unshuffle(data: Any, stride: int) -> bytes:
    if stride <= 1:
        return bytes(data) if not isinstance(data, bytes) else data
    a = np.frombuffer(data, dtype=np.uint8)
    return a.reshape(stride, -1).T.tobytes()


def check_stride(g: Geometry, stride: int) -> None:
    if not isinstance(stride, int) or stride < 1 or g.row_bytes % stride:
        raise CodecError(f"shuffle stride {stride!r} does not divide the row size {g.row_bytes}")


# ---------------------------------------------------------------------------------------------------------
# Delta: prediction (the deterministic part)


def dequantize_rows(raw: Any, ggml_type: int, n_rows: int, row_elems: int) -> np.ndarray:
    """Rows of a base tensor as float32, through gguf's dequantizers (elementwise for DELTA_BASE_TYPES)."""
    qt = Q(ggml_type)
    if qt not in DELTA_BASE_TYPES:
        raise CodecError(f"{qt.name} cannot be a delta base")
    data = np.frombuffer(raw, dtype=np.uint8)
    if qt == Q.F32:
        return data.view(np.float32).reshape(n_rows, row_elems)
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
    d = np.empty((min(step, rows), n), dtype=np.float32)
    t = np.empty_like(d)
    for i0 in range(0, rows, step):
        i1 = min(rows, i0 + step)
        dd, tt = d[: i1 - i0], t[: i1 - i0]
        if r == 0:
            np.copyto(dd, base[i0:i1])
        else:
            np.multiply(bt[0, i0:i1, None], a[0][None, :], out=dd)
            for k in range(1, r):
                np.multiply(bt[k, i0:i1, None], a[k][None, :], out=tt)
                np.add(dd, tt, out=dd)
            np.add(base[i0:i1], dd, out=dd)
        _round_to(dd, out[i0:i1], target_type)
    return out


def _round_to(p: np.ndarray, out: np.ndarray, target_type: int) -> None:
    if target_type == Q.F16:
        np.copyto(out.view(np.float16), p, casting="unsafe")  # IEEE round to nearest even
    elif target_type == Q.BF16:
        out[...] = _gguf_quantize(p, Q.BF16).view(np.uint16).reshape(out.shape)  # integer rounding ops
    else:
        out[...] = p.view(np.uint32)


def factors_from_bytes(raw: Any, factor_type: str, r: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
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
    return bitmap.tobytes() + planes.tobytes()


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
    mask = np.unpackbits(raw[:nb], bitorder="little")
    if mask[n:].any():
        raise CodecError("residual bitmap has bits set past the chunk's end")
    idx = np.flatnonzero(mask[:n])
    if raw.size != nb + idx.size * width:
        raise CodecError(f"residual holds {raw.size} bytes, its bitmap calls for {nb + idx.size * width}")
    vals = np.ascontiguousarray(raw[nb:].reshape(width, -1).T).view(p.dtype.newbyteorder("<")).reshape(-1)
    vals = vals.astype(p.dtype, copy=False)
    if mode == "sub":
        one = p.dtype.type(1)
        v = (vals >> one) ^ (p.dtype.type(0) - (vals & one))  # un-zigzag, as an unsigned wrap-around value
        p[idx] = p[idx] + v
    elif mode == "xor":
        p[idx] = p[idx] ^ vals
    else:
        raise CodecError(f"unknown residual mode {mode!r}")
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


def _balanced(bt: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _storable(bt: np.ndarray, a: np.ndarray, factor_type: str) -> tuple[np.ndarray, np.ndarray] | None:
    if factor_type == "f16":
        if max(float(np.abs(bt).max(initial=0)), float(np.abs(a).max(initial=0))) >= _F16_MAX:
            return None
    dt = FACTOR_DTYPES[factor_type]
    return bt.astype(dt).astype(np.float32), a.astype(dt).astype(np.float32)


def plan_delta(target: RowReader, target_type: int, base: RowReader, base_type: int, g: Geometry, *,
               level: int, rows_per_chunk: int, seed: int = 0, max_rank: int = 64,
               sample_elems: int = 1 << 18, power: int = 2) -> DeltaPlan | None:
    """Find B and A for target ≈ base + B·A and pick rank, factor type and residual mode by the bytes they
    produce on a sample of rows (every row when the tensor is small). None when the base is not finite."""
    m, n = g.n_rows, g.row_elems
    tdtype, width = DELTA_TARGET_TYPES[Q(target_type)]
    kmax = max(0, min(max_rank, min(m, n) // 2))
    k = min(kmax + 8, min(m, n)) if kmax > 0 else 0
    rng = np.random.default_rng(seed)

    def diff(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = dequantize_rows(base(r0, r1), base_type, r1 - r0, n)
        tb = np.frombuffer(target(r0, r1), dtype=tdtype).reshape(r1 - r0, n)
        t = dequantize_rows(tb.view(np.uint8), target_type, r1 - r0, n)
        return b, tb, t - b

    # randomized range finder over row blocks with power iterations (the spectrum of a merged update is
    # signal + a flat floor of rounding noise; without them the noise tilts the subspace found):
    # Y = D·Ω, then `power` times Q = orth(Y), W = orth(Dᵀ·Q), Y = D·W; finally Z = Qᵀ·D = U S Vᵀ
    nblocks = g.chunk_count(rows_per_chunk)
    blocks = [g.chunk_span(i, rows_per_chunk) for i in range(nblocks)]

    def d_times(w: np.ndarray) -> np.ndarray:  # D·w, (m, k)
        y = np.empty((m, w.shape[1]), dtype=np.float32)
        for r0, r1 in blocks:
            b, _, d = diff(r0, r1)
            y[r0:r1] = np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0) @ w
        return y

    def dt_times(q: np.ndarray) -> np.ndarray:  # Dᵀ·q, (n, k)
        z = np.zeros((n, q.shape[1]), dtype=np.float64)
        for r0, r1 in blocks:
            _, _, d = diff(r0, r1)
            z += (np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0).T @ q[r0:r1]).astype(np.float64)
        return z

    for r0, r1 in blocks:
        b = dequantize_rows(base(r0, r1), base_type, r1 - r0, n)
        if not np.isfinite(b).all() or float(np.abs(b).max()) > 1e30:
            return None
    if k > 0:
        w = rng.standard_normal((n, k)).astype(np.float32)
        for it in range(power + 1):
            qm, _ = np.linalg.qr(d_times(w))
            z = dt_times(qm)  # (n, k) = (Qᵀ·D)ᵀ
            if it < power:
                w = np.linalg.qr(z)[0].astype(np.float32)
        uz, s, vt = np.linalg.svd(z.T, full_matrices=False)
        b_full = (qm @ (uz * s).astype(np.float32)).T  # (k, m)
        a_full = vt.astype(np.float32)  # (k, n)
        del qm
    else:
        s = np.zeros(0)
        b_full = np.zeros((0, m), np.float32)
        a_full = np.zeros((0, n), np.float32)

    # the sample: up to 4 evenly spread runs of rows
    sample_rows = max(1, min(m, sample_elems // n))
    if sample_rows >= m:
        spans = [(0, m)]
    else:
        run = max(1, sample_rows // 4)
        starts = np.linspace(0, m - run, 4).astype(int)
        spans = sorted({(int(s0), int(s0) + run) for s0 in starts})
    sampled = sum(r1 - r0 for r0, r1 in spans)
    scale = m / sampled
    samples = []
    for r0, r1 in spans:
        b, tb, _ = diff(r0, r1)
        samples.append((r0, r1, np.ascontiguousarray(b), tb))

    plain = 0
    stride = width
    for _, _, _, tb in samples:
        plain += len(compress(shuffle(tb.tobytes(), stride), level))
    plain_est = int(plain * scale)

    best: tuple[int, int, str, str] | None = None  # (bytes, rank, factor type, mode)
    cands: dict[int, int] = {}
    stored: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for r in _rank_candidates(s, kmax):
        bt_r, a_r = _balanced(b_full[:r], a_full[:r])
        for ft in ("f16", "f32"):
            st = _storable(bt_r, a_r, ft)
            if st is None:
                continue
            fbytes = r * (m + n) * np.dtype(FACTOR_DTYPES[ft]).itemsize
            if best is not None and fbytes >= best[0]:
                continue
            sizes = {mode: 0 for mode in RESIDUAL_MODES}
            for r0, r1, b, tb in samples:
                pred = predict_bits(b, st[0][:, r0:r1], st[1], target_type)
                for mode in RESIDUAL_MODES:
                    sizes[mode] += len(compress(residual_encode(tb, pred, mode), level))
            mode = min(sizes, key=sizes.__getitem__)
            total = fbytes + int(sizes[mode] * scale)
            cands[r] = min(cands.get(r, total), total)
            if best is None or total < best[0]:
                best = (total, r, ft, mode)
                stored[(r, ft)] = st
            if r == 0:
                break  # no factors: the factor type does not matter
    if best is None:
        return None
    total, r, ft, mode = best
    bt, a = stored[(r, ft)]
    return DeltaPlan(r, ft, mode, bt, a, total, plain_est, cands)


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
