"""Source coding for F16/BF16 tensors ("fplanes"): each weight's predictable bits (sign, exponent, top
mantissa bits) entropy-coded with rANS against the chunk's own frequencies, its mantissa noise stored.

Why: once a model's quants are nearly free (`requant`), the F16/BF16 source is most of a pack. The bits
of a trained weight differ in how predictable they are: the exponent of a roughly normal weight takes a
handful of values (~2.6 bits of 5 or 8), the top mantissa bits lean low (Benford: ~0.95 bit for the
first), the low mantissa bits are noise (8.0 bits of 8 measured on trained weights). zstd over interleaved bytes cannot
separate them (~92 % on trained F16 weights); byte planes can (ZipNN's observation), and an
arithmetic-class coder over the predictable part takes its entropy where zstd's Huffman literals lose
0.05-0.2 bit. (Coding each row's exponents against the row's median was measured too: with a table per
chunk it gains nothing on trained weights, and its byte a row costs 0.1 %.)

Layout of a chunk of n elements with bit patterns u (uint16):

    F16 : symbol = u >> 8   (sign, 5 exponent bits, 2 mantissa bits)   raw = u & 0xFF   R = 8
    BF16: symbol = u >> 5   (sign, 8 exponent bits, 2 mantissa bits)   raw = u & 0x1F   R = 5

Body (little-endian):
    u8  flags        bit 0: the raw part is one zstd frame (else stored); other bits 0
    u8  reserved     0
    u16 lanes        rANS lanes, 1 to 256 (see `rans`)
    u32 words        16-bit words of the rANS stream
    u32 raw_len      bytes of the raw part
    present          2^(16-R)/8 bytes: bit s (byte s/8, bit s%8) set when symbol s has a frequency
    u16 freq[m]      the frequencies of the m present symbols in increasing symbol order (>= 1, summing
                     to 2^15)
    u32 state[lanes] the rANS lanes' initial states
    u16 word[words]  the rANS stream of the n symbols
    raw part         the n raw values: F16 one byte each; BF16 5 bits each, least significant bit first
                     (value i at bits 5i .. 5i+4 of the stream, bit k = bit k % 8 of byte k // 8), the
                     last byte's unused bits zero
Measured (bench/bench_requant.py source): which bits go into the symbol was chosen on trained weights;
a second mantissa bit in BF16's symbol gains 0.04 point, a third in F16's nothing.
Decoding is integer operations only (rANS, shifts, masks, one zstd frame), so it is exact on every machine.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import numpy as np
import zstandard

from . import rans

Arr = np.ndarray
KINDS = ("F16", "BF16")
RAW_BITS = {"F16": 8, "BF16": 5}
_HEAD = struct.Struct("<BBHII")


class PlanesError(ValueError):
    pass


def _raw_bits(kind: str) -> int:
    if kind not in RAW_BITS:
        raise PlanesError(f"unknown kind {kind!r}")
    return RAW_BITS[kind]


def split(bits: Arr, kind: str) -> tuple[Arr, Arr]:
    """uint16 bit patterns -> (symbols, raw values)."""
    r = _raw_bits(kind)
    u = np.ascontiguousarray(bits, dtype=np.uint16).reshape(-1)
    return u >> r, u & ((1 << r) - 1)


def join(symbols: Arr, raw: Arr, kind: str) -> Arr:
    r = _raw_bits(kind)
    out: Arr = (symbols.astype(np.uint16) << r) | raw.astype(np.uint16)
    return out


def _pack_raw(raw: Arr, rbits: int) -> bytes:
    """R-bit values, least significant bit first: eight values fill R bytes (as one little-endian
    integer of 8R bits, value k at bits R*k ..)."""
    n = raw.size
    v = np.zeros(-(-n // 8) * 8, dtype=np.uint64)
    v[:n] = raw
    g = v.reshape(-1, 8)
    word = np.zeros(g.shape[0], dtype=np.uint64)
    for k in range(8):
        word |= g[:, k] << np.uint64(rbits * k)
    out = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :rbits].reshape(-1)
    return out[: (rbits * n + 7) // 8].tobytes()


def _unpack_raw(data: bytes, rbits: int, n: int) -> Arr:
    if len(data) != (n * rbits + 7) // 8:
        raise PlanesError(f"raw part holds {len(data)} bytes, {(n * rbits + 7) // 8} expected")
    buf = np.frombuffer(data, dtype=np.uint8)
    if rbits == 8:
        return buf
    groups = -(-n // 8)
    flat = np.zeros(groups * rbits, dtype=np.uint8)
    flat[: buf.size] = buf
    b = np.zeros((groups, 8), dtype=np.uint8)
    b[:, :rbits] = flat.reshape(groups, rbits)
    word = b.view("<u8").reshape(-1)
    mask = np.uint64((1 << rbits) - 1)
    out: Arr = np.stack([(word >> np.uint64(rbits * k)) & mask for k in range(8)], axis=1).reshape(-1)[:n]
    if (rbits * n) % 8 and buf[-1] >> ((rbits * n) % 8):
        raise PlanesError("raw part has bits set past its last value")
    return out


def _zstd(data: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(data)


def _unzstd(body: bytes, expected: int) -> bytes:
    if zstandard.frame_content_size(body) != expected:
        raise PlanesError(f"raw frame does not declare {expected} bytes")
    out: bytes = zstandard.ZstdDecompressor().decompress(body, max_output_size=expected)
    if len(out) != expected:
        raise PlanesError("raw frame decoded to the wrong size")
    return out


def encode(bits: Arr, kind: str, level: int = 19) -> bytes:
    """One chunk of F16/BF16 bit patterns in the fplanes layout."""
    rbits = _raw_bits(kind)
    sym, raw = split(bits, kind)
    if sym.size == 0:
        raise PlanesError("an empty chunk")
    counts = np.bincount(sym, minlength=1 << (16 - rbits))
    freq = rans.normalize(counts)
    states, words = rans.encode(sym, freq)
    raw_bytes = _pack_raw(raw, rbits)
    flags = 0
    z = _zstd(raw_bytes, level)
    if len(z) < len(raw_bytes):
        flags, raw_bytes = 1, z
    present = np.packbits(freq > 0, bitorder="little")
    return b"".join([_HEAD.pack(flags, 0, states.size, words.size, len(raw_bytes)), present.tobytes(),
                     freq[freq > 0].astype("<u2").tobytes(), states.astype("<u4").tobytes(),
                     words.astype("<u2").tobytes(), raw_bytes])


def _table(body: bytes, nsym: int) -> tuple[Arr, int]:
    """(frequencies over the alphabet, offset past the table)."""
    off = _HEAD.size
    if len(body) < off + nsym // 8:
        raise PlanesError("fplanes chunk shorter than its symbol table")
    present = np.unpackbits(np.frombuffer(body, dtype=np.uint8, count=nsym // 8, offset=off), bitorder="little")
    m = int(present.sum())
    off += nsym // 8
    if m == 0 or len(body) < off + 2 * m:
        raise PlanesError("bad frequency table")
    freq = np.zeros(nsym, dtype=np.int64)
    freq[present.astype(bool)] = np.frombuffer(body, dtype="<u2", count=m, offset=off)
    if (freq[present.astype(bool)] == 0).any():
        raise PlanesError("a present symbol of frequency 0")
    return freq, off + 2 * m


def decode(body: bytes, kind: str, n: int) -> Arr:
    """The n uint16 bit patterns of an fplanes chunk."""
    rbits = _raw_bits(kind)
    if n <= 0:
        raise PlanesError("an empty chunk")
    if len(body) < _HEAD.size:
        raise PlanesError("fplanes chunk shorter than its head")
    flags, reserved, lanes, nwords, raw_len = _HEAD.unpack_from(body)
    freq, off = _table(body, 1 << (16 - rbits))
    fixed = off + 4 * lanes + 2 * nwords
    if flags & ~1 or reserved or not 1 <= lanes <= rans.MAX_LANES or fixed + raw_len != len(body):
        raise PlanesError("bad fplanes head")
    states = np.frombuffer(body, dtype="<u4", count=lanes, offset=off)
    words = np.frombuffer(body, dtype="<u2", count=nwords, offset=off + 4 * lanes)
    try:
        sym = rans.decode(states, words, freq, n)
    except rans.RansError as e:
        raise PlanesError(str(e)) from None
    raw_part = body[fixed:]
    raw = _unpack_raw(_unzstd(raw_part, (n * rbits + 7) // 8) if flags & 1 else raw_part, rbits, n)
    return join(sym, raw, kind)


def entropy0(symbols: Arr, nsym: int = 256) -> float:
    """Order-0 empirical entropy in bits/symbol."""
    c = np.bincount(np.asarray(symbols).reshape(-1), minlength=nsym).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log2(p)).sum())


def _byte_planes(c: Arr, level: int) -> int:
    b = c.view(np.uint8).reshape(-1, 2)
    return sum(len(_zstd(np.ascontiguousarray(b[:, j]).tobytes(), level)) for j in (0, 1))


def compare(tensors: list[Arr], kind: str, *, chunk: int = 1 << 20, level: int = 19,
            log: Callable[..., Any] = print) -> dict[str, float]:
    """Sizes (fraction of the input) of: zstd over the raw bytes, 2 byte planes + zstd, fplanes; fplanes
    decode speed. `tensors` are 2-D (rows, ne0) bit patterns, chunked like the pack (whole rows, about
    `chunk` elements)."""
    import time

    total = sum(t.size * 2 for t in tensors)
    sizes = {"zstd": 0, "byte planes + zstd": 0, "fplanes": 0, "smaller of fplanes, zstd": 0}
    decode_s = 0.0
    for t in tensors:
        t2 = np.ascontiguousarray(t, dtype=np.uint16).reshape(-1, t.shape[-1])
        k = max(1, chunk // t2.shape[1])
        for r0 in range(0, t2.shape[0], k):
            c = t2[r0:r0 + k].reshape(-1)
            z = len(_zstd(c.tobytes(), level))
            sizes["zstd"] += z
            sizes["byte planes + zstd"] += _byte_planes(c, level)
            body = encode(c, kind, level)
            sizes["fplanes"] += len(body)
            sizes["smaller of fplanes, zstd"] += min(z, len(body))
            t0 = time.perf_counter()
            back = decode(body, kind, c.size)
            decode_s += time.perf_counter() - t0
            if not np.array_equal(back, c):
                raise PlanesError("fplanes round trip failed")
    out = {k: v / total for k, v in sizes.items()}
    out["fplanes decode MB/s"] = total / decode_s / 1e6
    log("    " + "  ".join(f"{k} {100 * v:.2f} %" if "MB/s" not in k else f"{k} {v:.0f}" for k, v in out.items()))
    return out
