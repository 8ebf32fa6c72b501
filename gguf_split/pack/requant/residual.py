"""The "requant" tensor codec (prototype): a quantized tensor stored as its difference from our
deterministic re-quantization (`requant.quantize`) of a full-precision source tensor in the same pack.

Why this shape: when the publisher's llama.cpp rounds like ours, the difference is empty, and the tensor
costs a bitmap of zero bits (a few bytes after zstd). When it does not (another llama.cpp version, a build
that contracts multiplies and adds into FMAs, another source file), the misses are scattered blocks, so
the residual is written in the quantizer's own terms and costs bytes in proportion to the blocks that
differ:

    bitmap    ceil(n_blocks/8) bytes: bit b (byte b/8, bit b%8, least significant first) set where block b
              is not the predicted block; bits past n_blocks zero
    headers   for the c flagged blocks, their scale bytes (`port.HEADER_BYTES`, h bytes a block) XOR
              the predicted block's, as h byte planes (byte 0 of every flagged block, then byte 1, ...)
    codes     the remaining t - h bytes of each flagged block XOR the codes *re-derived from the corrected
              header* (`port.codes_from_headers`: the k-quants' codes are a function of the source and
              the block's scales; other types keep the predicted codes), as t - h byte planes

so a k-quant block whose only miss is a scale picked differently by the search costs its header bytes
(mostly zero bits after XOR), not its 84-210 bytes. The buffer is then one zstd frame, like every
record of the pack.

Decoding a chunk (rows r0..r1 of the source and of the quant, the same shape):
    x     = the source chunk as float32 (F16/BF16 widen exactly, as llama-quantize converts)
    pred  = requant.quantize(x, type, imatrix)             (deterministic, see requant.port)
    flagged blocks: header = pred header XOR stored; codes = codes_from_headers(x, block with header)
                    XOR stored
The encoder runs the same decoder over its output before writing (a round trip per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from . import port

Arr = np.ndarray


class ResidualError(ValueError):
    pass


def _header_cols(qtype: int) -> tuple[Arr, Arr]:
    """(header byte offsets, code byte offsets) within a block of `qtype`."""
    _, type_size = GGML_QUANT_SIZES[Q(qtype)]
    head = np.concatenate([np.arange(a, b) for a, b in port.HEADER_BYTES[Q(qtype)]])
    codes = np.setdiff1d(np.arange(type_size), head)
    return head, codes


def _block_elems(qtype: int) -> int:
    block, _ = GGML_QUANT_SIZES[Q(qtype)]
    return int(block)


def _rederive(x_blocks: Arr, blocks: Arr, qtype: int) -> Arr:
    """codes_from_headers on single blocks: x_blocks (c, block elems), blocks (c, type size)."""
    if len(blocks) == 0:
        empty: Arr = blocks.copy()
        return empty
    out: Arr = port.codes_from_headers(x_blocks, blocks, qtype)
    return out


@dataclass
class ResidualStats:
    blocks: int
    flagged: int
    header_changed: int  # flagged blocks whose header differs
    codes_changed: int  # flagged blocks whose codes differ from those re-derived from their header


def encode_residual(x: Arr, target: Arr, pred: Arr, qtype: int) -> tuple[bytes, ResidualStats]:
    """The residual buffer (uncompressed) that turns `pred` into `target`; both (R, row_bytes) uint8,
    x the source rows (R, n) float32."""
    _, type_size = GGML_QUANT_SIZES[Q(qtype)]
    t = np.ascontiguousarray(target, dtype=np.uint8).reshape(-1, type_size)
    p = np.ascontiguousarray(pred, dtype=np.uint8).reshape(-1, type_size)
    if t.shape != p.shape:
        raise ResidualError(f"target has {t.shape[0]} blocks, prediction {p.shape[0]}")
    flagged = (t != p).any(axis=1)
    idx = np.flatnonzero(flagged)
    head, codes = _header_cols(qtype)
    hx = t[idx][:, head] ^ p[idx][:, head]
    fixed = p[idx].copy()
    fixed[:, head] = t[idx][:, head]
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, _block_elems(qtype))[idx]
    base = _rederive(xb, fixed, qtype)
    cx = t[idx][:, codes] ^ base[:, codes]
    bitmap = np.packbits(flagged, bitorder="little")
    buf = bitmap.tobytes() + np.ascontiguousarray(hx.T).tobytes() + np.ascontiguousarray(cx.T).tobytes()
    stats = ResidualStats(int(t.shape[0]), int(idx.size), int(hx.any(axis=1).sum()), int(cx.any(axis=1).sum()))
    return buf, stats


def apply_residual(x: Arr, pred: Arr, buf: bytes, qtype: int) -> Arr:
    """The decoder's side: the target bytes (R, row_bytes) from the prediction and the residual buffer."""
    _, type_size = GGML_QUANT_SIZES[Q(qtype)]
    out = np.array(pred, dtype=np.uint8, copy=True)
    p = out.reshape(-1, type_size)
    n_blocks = p.shape[0]
    nb = (n_blocks + 7) // 8
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size < nb:
        raise ResidualError(f"residual of {raw.size} bytes is shorter than its bitmap ({nb} bytes)")
    flagged = np.unpackbits(raw[:nb], bitorder="little").view(bool)
    if flagged[n_blocks:].any():
        raise ResidualError("residual bitmap has bits set past the chunk's blocks")
    idx = np.flatnonzero(flagged[:n_blocks])
    c = idx.size
    if raw.size != nb + c * type_size:
        raise ResidualError(f"residual holds {raw.size} bytes, its bitmap calls for {nb + c * type_size}")
    if c == 0:
        return out
    head, codes = _header_cols(qtype)
    hx = raw[nb: nb + c * head.size].reshape(head.size, c).T
    cx = raw[nb + c * head.size:].reshape(codes.size, c).T
    fixed = p[idx].copy()
    fixed[:, head] ^= hx
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, _block_elems(qtype))[idx]
    base = _rederive(xb, fixed, qtype)
    fixed[:, codes] = base[:, codes] ^ cx
    p[idx] = fixed
    return out
