"""Source coding prototype for F16/BF16 tensors: the predictable bits (sign, exponent, top mantissa bits)
entropy-coded in one byte plane, the mantissa's noise stored apart.

Why: once the quants of a model are nearly free (`requant_codec`), the F16/BF16 source is most of a
pack. The bits of a trained weight differ in how predictable they are: the exponent of a roughly normal
weight takes a handful of values (entropy ~2.6 bits of 5 or 8), the low mantissa bits are noise (8.0
bits of 8 measured on trained weights). A general-purpose compressor over the interleaved bytes cannot
separate them (zstd -19 on whole F16 tensors: ~91 %); byte planes can (ZipNN's observation).

The layout ("fplanes"), per chunk of n elements:
    F16 : sym[i]  = bits >> 8        (sign, 5 exponent bits, 2 top mantissa bits)
          rest[i] = bits & 0xFF      (8 low mantissa bits)
    BF16: sym[i]  = (bits >> 7) & 0xFF                 (the 8 exponent bits)
          rest[i] = ((bits >> 8) & 0x80) | (bits & 0x7F) (sign and the 7 mantissa bits)
    body: u8 flags (bit 0: sym plane is a zstd frame, else stored; bit 1: same for rest),
          u32 length of the sym part, the sym part, the rest part (to the end)
Decoding is a zstd frame (Huffman-coded literals: ~1 GB/s) and a few integer numpy operations, so it is
exact on every machine and runs at hundreds of MB/s.

Measured (bench/bench_requant.py source, see the report): on trained weights the sym plane codes within
~0.03 bits/element of its order-0 entropy, so this layout sits ~0.2 % above the order-0 bound; a
context model (exponent given the row's and the column's typical exponent) would gain ~0.5 % more of
the tensor, which only an adaptive arithmetic/rANS coder can take (not prototyped here: the targets of
84 % F16 / 66 % BF16 lie between the two).
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import numpy as np
import zstandard

Arr = np.ndarray
KINDS = ("F16", "BF16")


class PlanesError(ValueError):
    pass


def split(bits: Arr, kind: str) -> tuple[Arr, Arr]:
    """uint16 bit patterns -> (sym plane, rest plane), uint8 each."""
    u = np.ascontiguousarray(bits, dtype=np.uint16).reshape(-1)
    if kind == "F16":
        return (u >> 8).astype(np.uint8), (u & 0xFF).astype(np.uint8)
    if kind == "BF16":
        return ((u >> 7) & 0xFF).astype(np.uint8), (((u >> 8) & 0x80) | (u & 0x7F)).astype(np.uint8)
    raise PlanesError(f"unknown kind {kind!r}")


def join(sym: Arr, rest: Arr, kind: str) -> Arr:
    s = sym.astype(np.uint16)
    r = rest.astype(np.uint16)
    if kind == "F16":
        out: Arr = (s << 8) | r
    elif kind == "BF16":
        out = ((r & 0x80) << 8) | (s << 7) | (r & 0x7F)
    else:
        raise PlanesError(f"unknown kind {kind!r}")
    return out


def _zstd(data: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(data)


def _unzstd(body: bytes, expected: int) -> bytes:
    if zstandard.frame_content_size(body) != expected:
        raise PlanesError(f"plane frame does not declare {expected} bytes")
    out: bytes = zstandard.ZstdDecompressor().decompress(body, max_output_size=expected)
    if len(out) != expected:
        raise PlanesError("plane frame decoded to the wrong size")
    return out


def encode(bits: Arr, kind: str, level: int = 19) -> bytes:
    """One chunk of F16/BF16 bit patterns in the fplanes layout (each plane zstd'd when that is smaller)."""
    sym, rest = split(bits, kind)
    flags = 0
    parts = []
    for i, plane in enumerate((sym, rest)):
        raw = plane.tobytes()
        z = _zstd(raw, level)
        if len(z) < len(raw):
            flags |= 1 << i
            parts.append(z)
        else:
            parts.append(raw)
    return struct.pack("<BI", flags, len(parts[0])) + parts[0] + parts[1]


def decode(body: bytes, kind: str, n: int) -> Arr:
    """The n uint16 bit patterns of an fplanes chunk."""
    if len(body) < 5:
        raise PlanesError("fplanes chunk shorter than its 5-byte head")
    flags, sym_len = struct.unpack_from("<BI", body)
    if flags & ~3 or 5 + sym_len > len(body):
        raise PlanesError("bad fplanes head")
    parts = (body[5:5 + sym_len], body[5 + sym_len:])
    planes = []
    for i, part in enumerate(parts):
        raw = _unzstd(part, n) if flags & (1 << i) else part
        if len(raw) != n:
            raise PlanesError(f"plane {i} holds {len(raw)} bytes, {n} expected")
        planes.append(np.frombuffer(raw, dtype=np.uint8))
    return join(planes[0], planes[1], kind)


def entropy0(symbols: Arr, nsym: int = 256) -> float:
    """Order-0 empirical entropy in bits/symbol."""
    c = np.bincount(np.asarray(symbols).reshape(-1), minlength=nsym).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum())


def compare(tensors: list[Arr], kind: str, *, chunk: int = 1 << 20, level: int = 19,
            log: Callable[..., Any] = print) -> dict[str, float]:
    """Sizes (fraction of the input) of: zstd over the raw bytes, 2 byte planes + zstd, fplanes, and the
    order-0 entropy bound of fplanes' layout; fplanes decode speed. Chunked like the pack: per tensor,
    `chunk` elements at most."""
    import time

    pieces = [np.ascontiguousarray(t, dtype=np.uint16).reshape(-1) for t in tensors]
    total = sum(p.nbytes for p in pieces)
    n_all = sum(p.size for p in pieces)
    sizes = {"zstd": 0, "byte planes + zstd": 0, "fplanes": 0}
    decode_s = 0.0
    h_sym = 0.0
    for c in (p[i:i + chunk] for p in pieces for i in range(0, p.size, chunk)):
        sizes["zstd"] += len(_zstd(c.tobytes(), level))
        b = c.view(np.uint8).reshape(-1, 2)
        sizes["byte planes + zstd"] += sum(len(_zstd(np.ascontiguousarray(b[:, j]).tobytes(), level)) for j in (0, 1))
        body = encode(c, kind, level)
        sizes["fplanes"] += len(body)
        t0 = time.perf_counter()
        back = decode(body, kind, c.size)
        decode_s += time.perf_counter() - t0
        if not np.array_equal(back, c):
            raise PlanesError("fplanes round trip failed")
        sym, _ = split(c, kind)
        h_sym += entropy0(sym) * c.size
    bound = (h_sym + 8 * n_all) / 8
    out = {k: v / total for k, v in sizes.items()}
    out["order-0 bound"] = bound / total
    out["fplanes decode MB/s"] = total / decode_s / 1e6
    log("    " + "  ".join(f"{k} {100 * v:.2f} %" if "MB/s" not in k else f"{k} {v:.0f}" for k, v in out.items()))
    return out
