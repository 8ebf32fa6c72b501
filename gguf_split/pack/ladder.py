"""The codecs of a quantization ladder (pack format version 2): "requant" for a quantized tensor whose
full-precision version is in the pack, "fplanes" for F16/BF16 tensors (docs/pack-format.md has the bits).

Why: a model repository ships one model several times, its F16/BF16 source and quants of it, and each quant
is a deterministic function of the source. A "requant" tensor is stored as what differs between it and our
re-quantization of its source (`requant.quantize`, the same bytes on every machine; llama.cpp only serves
the tests as an oracle), in the quantizer's own terms (`requant.residual`), so a quant made by a llama.cpp
that rounds like ours costs a few bytes, and one that does not costs bytes in proportion to the blocks that
differ. The source then is most of the pack, and "fplanes" codes its predictable bits (sign, exponent, top
mantissa bits) with rANS and stores the mantissa noise (`source.planes`), falling back per chunk to the
plain shuffled zstd when that is smaller.

Chunks are coded here, one at a time (rows [r0, r1) of a tensor; a requant tensor's chunks line up with its
source's because both have the same shape and so the same rows per chunk); planning (which tensors, which
source) is in planning.py, the records in records.py, the reading in reader.py.

Importance matrices: a quant made with one re-derives only with the same vectors, and a GGUF quant records
only the imatrix file's name. When the imatrix file (llama-imatrix's GGUF: `<name>.in_sum2` and
`<name>.counts`, F32) is one of the packed files, a requant tensor may name those two tensors, and the
vectors are computed from them as llama-quantize loads them (`Weights.from_tensors`). Without them, a quant
made with an imatrix misses in every block, but the k-quants' codes still follow from the published
scales, so their residual stays a few % of the quant; the legacy types (Q4_0, Q5_0, ...) do not, and the
writer keeps them plain because it measures both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from . import codec
from .codec import CodecError
from .requant import REQUANT_TYPES, RequantError, quantize
from .requant.residual import ResidualError, apply_residual, encode_residual
from .source import planes

# the port's version: the algorithms of ggml 0.25.3's ggml-quants.c (a reader refuses a port it lacks)
PORT = "ggml-0.25.3"
PORTS = (PORT,)
SOURCE_TYPES = frozenset({Q.F16, Q.BF16, Q.F32})  # what a requant tensor may be re-derived from
FPLANES_TYPES = frozenset({Q.F16, Q.BF16})
# fplanes chunk modes: the first byte of a chunk's decoded record
MODE_PLANES = 0
MODE_PLAIN = 1
# engine of the re-quantization: "auto" (numba when installed, else numpy); the bytes do not depend on it
ENGINE_ENV = "GGUF_SPLIT_REQUANT_ENGINE"


def engine() -> str:
    return os.environ.get(ENGINE_ENV, "auto")


def can_requant(ggml_type: int) -> bool:
    return ggml_type in REQUANT_TYPES


# ---------------------------------------------------------------------------------------------------------
# requant


def source_rows(raw: Any, source_type: int, rows: int, row_elems: int) -> np.ndarray:
    """A source chunk as float32 rows, widened exactly as llama-quantize converts (F16, BF16) or as is."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if source_type == Q.F32:
        out: np.ndarray = data.view("<f4").astype(np.float32, copy=False)
    elif source_type == Q.F16:
        out = data.view("<f2").astype(np.float32)
    elif source_type == Q.BF16:
        out = (data.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        raise CodecError(f"type {source_type} cannot be a requant source")
    if out.size != rows * row_elems:
        raise CodecError(f"source chunk holds {out.size} values, {rows * row_elems} expected")
    return out.reshape(rows, row_elems)


@dataclass(frozen=True)
class Weights:
    """A tensor's importance vectors as llama-quantize uses them: `vectors` (n_mat, ne0) float32, row r of
    the tensor quantized with vector r // rows_per_mat (a 3-D tensor's experts: one vector each)."""

    vectors: np.ndarray
    rows_per_mat: int

    @classmethod
    def from_tensors(cls, sums_raw: Any, counts_raw: Any, shape: tuple[int, ...]) -> "Weights":
        """llama-quantize's load_imatrix (GGUF format): count = (float) lround(counts[j]); vector j =
        in_sum2[j] / count (float32) when count > 0, else all 1."""
        ne0 = shape[0]
        n_mat = shape[2] if len(shape) >= 3 else 1
        if len(shape) > 3:
            raise CodecError("importance vectors of a 4-D tensor")
        sums = np.frombuffer(sums_raw, dtype="<f4").astype(np.float32)
        counts = np.frombuffer(counts_raw, dtype="<f4").astype(np.float64)
        if sums.size != ne0 * n_mat or counts.size != n_mat:
            raise CodecError(f"importance data of {sums.size} sums and {counts.size} counts, {ne0 * n_mat} and "
                             f"{n_mat} expected")
        if not (np.isfinite(sums).all() and np.isfinite(counts).all() and (np.abs(counts) < 2.0 ** 62).all()):
            raise CodecError("importance data holds non-finite or huge values")
        c = (np.sign(counts) * np.floor(np.abs(counts) + 0.5)).astype(np.float32)  # lround, then (float)
        sums = sums.reshape(n_mat, ne0)
        ones = np.ones_like(sums)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where((c > 0)[:, None], sums / np.where(c > 0, c, np.float32(1))[:, None], ones)
        vectors = np.ascontiguousarray(v, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise CodecError("importance vectors are not finite")
        return cls(vectors, shape[1] if len(shape) >= 2 else 1)


def predict(x: np.ndarray, qtype: int, weights: Weights | None = None, r0: int = 0) -> np.ndarray:
    """Our re-quantization of source rows x (rows r0.. of the tensor): (rows, row_bytes) uint8, each row with
    its importance vector when `weights` are given."""
    if not np.isfinite(x).all():
        raise CodecError("the source holds NaN or infinite values")
    try:
        if weights is None:
            out: np.ndarray = quantize(x, qtype, None, engine=engine(), threads=1)
            return out
        parts = []
        k = weights.rows_per_mat
        i = 0
        while i < x.shape[0]:
            m = (r0 + i) // k
            j = min(x.shape[0], (m + 1) * k - r0)
            parts.append(quantize(x[i:j], qtype, weights.vectors[m], engine=engine(), threads=1))
            i = j
        return np.concatenate(parts)
    except (RequantError, IndexError) as e:
        raise CodecError(str(e)) from None


def residual_bound(rows: int, row_elems: int, qtype: int) -> int:
    """The most bytes a requant chunk's residual can hold: its bitmap and every block."""
    block, type_size = GGML_QUANT_SIZES[Q(qtype)]
    n_blocks = rows * row_elems // block
    return (n_blocks + 7) // 8 + n_blocks * type_size


def encode_requant_chunk(source_raw: Any, source_type: int, target_raw: Any, qtype: int, rows: int,
                         row_elems: int, level: int, weights: Weights | None = None, r0: int = 0) -> bytes:
    """One requant chunk: the zstd frame of its residual, after checking that decoding it gives the target."""
    x = source_rows(source_raw, source_type, rows, row_elems)
    pred = predict(x, qtype, weights, r0)
    target = np.frombuffer(target_raw, dtype=np.uint8).reshape(rows, -1)
    buf, _ = encode_residual(x, target, pred, qtype)
    body = codec.compress(buf, level)
    again = apply_residual(x, pred, codec.decompress(body, len(buf)), qtype)
    if not np.array_equal(again, target):
        raise CodecError("requant round trip failed")
    return body


def decode_requant_chunk(source_raw: Any, source_type: int, residual: bytes, qtype: int, rows: int,
                         row_elems: int, weights: Weights | None = None, r0: int = 0) -> bytes:
    """A requant chunk's bytes from its source chunk's bytes and its decoded residual."""
    x = source_rows(source_raw, source_type, rows, row_elems)
    try:
        out: bytes = apply_residual(x, predict(x, qtype, weights, r0), residual, qtype).tobytes()
    except ResidualError as e:
        raise CodecError(str(e)) from None
    return out


def requant_estimate(source_raw: Any, source_type: int, target_raw: Any, qtype: int, rows: int, row_elems: int,
                     level: int, weights: Weights | None = None, r0: int = 0) -> int | None:
    """The bytes a requant chunk of these rows would take (None when the source is not finite there)."""
    x = source_rows(source_raw, source_type, rows, row_elems)
    if not np.isfinite(x).all():
        return None
    pred = predict(x, qtype, weights, r0)
    buf, _ = encode_residual(x, np.frombuffer(target_raw, dtype=np.uint8).reshape(rows, -1), pred, qtype)
    return len(codec.compress(buf, level))


# ---------------------------------------------------------------------------------------------------------
# fplanes


def _kind(ggml_type: int) -> str:
    if ggml_type not in FPLANES_TYPES:
        raise CodecError(f"type {ggml_type} has no fplanes coding")
    return Q(ggml_type).name


def encode_fplanes_chunk(raw: Any, ggml_type: int, stride: int, level: int) -> tuple[bytes, bytes | None]:
    """(decoded record bytes, their zstd frame or None): the planes coding (mode 0, already entropy-coded,
    stored as it is) or, when the plain coding's zstd frame is smaller, mode 1 + the shuffled bytes and
    that frame."""
    bits = np.frombuffer(raw, dtype="<u2")
    coded = bytes([MODE_PLANES]) + planes.encode(bits, _kind(ggml_type), level)
    plain = bytes([MODE_PLAIN]) + codec.shuffle(raw, stride)
    z = codec.compress(plain, level)
    if len(z) < len(coded):
        return plain, z
    return coded, None


def fplanes_size(raw: Any, ggml_type: int, stride: int, level: int) -> int:
    """The bytes encode_fplanes_chunk's record body takes."""
    data, z = encode_fplanes_chunk(raw, ggml_type, stride, level)
    return len(data) if z is None else len(z)


def fplanes_bound(n_elems: int) -> int:
    """The most bytes a decoded fplanes record may claim (a reader's allocation limit)."""
    return 1 + 4 * n_elems + (1 << 16)


def decode_fplanes_chunk(data: bytes, ggml_type: int, stride: int, n_elems: int) -> bytes:
    """A chunk's bytes from its decoded fplanes record."""
    if not data:
        raise CodecError("empty fplanes record")
    mode, body = data[0], data[1:]
    if mode == MODE_PLAIN:
        if len(body) != 2 * n_elems:
            raise CodecError(f"fplanes plain chunk holds {len(body)} bytes, {2 * n_elems} expected")
        return codec.unshuffle(body, stride)
    if mode != MODE_PLANES:
        raise CodecError(f"unknown fplanes mode {mode}")
    try:
        out: bytes = planes.decode(bytes(body), _kind(ggml_type), n_elems).astype("<u2").tobytes()
    except (planes.PlanesError, ValueError) as e:
        raise CodecError(f"fplanes: {e}") from None
    return out
