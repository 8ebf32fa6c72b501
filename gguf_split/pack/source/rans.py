"""A static rANS entropy coder for the source planes: symbols of a chunk coded against one frequency table
to within ~0.01 bit of their order-0 entropy (zstd's Huffman literals lose 0.05-0.2 bit on these).

Why rANS and this shape: the predictable part of a float16/bfloat16 weight (sign, exponent, top mantissa
bits) has a skewed, chunk-specific distribution over a few hundred symbols; an arithmetic-class coder
takes its entropy, Huffman cannot. rANS decodes with one table lookup, a multiply and an add per symbol.
Everything is integer arithmetic, so the bytes are the same on every machine and the two
implementations (numpy, vectorised across lanes; numba, scalar, when installed) agree by construction
(tests check it anyway).

The coder (ryg's rans_word, interleaved): PROB_BITS = 15 (frequencies sum to 2^15, every coded symbol at
least 1), state x in [2^16, 2^32), 16-bit renormalisation words. Element i of the chunk belongs to lane
i % lanes (1 <= lanes <= MAX_LANES, the number of states stored); the lanes share one word stream.
Decoding element i:

    s = the symbol whose slot range [cum[s], cum[s] + freq[s]) holds x & (2^15 - 1)
    x = freq[s] * (x >> 15) + (x & (2^15 - 1)) - cum[s]
    if x < 2^16: x = (x << 16) | next word of the stream

elements in order 0, 1, 2, ... (so within a step of `lanes` elements, lanes in order). The encoder picks
lanes = n // 4096 (1 to 256): each lane's state costs 4 bytes, and the numpy decoder's speed grows with
the lanes it runs side by side. The encoder runs the
inverse from the last element to the first (x >= freq << 17: emit x & 0xFFFF, x >>= 16; then
x = ((x // freq) << 15) + x % freq + cum), starting every lane at 2^16, and stores each lane's final
state (the decoder's initial one) and the emitted words in reverse order.
"""

from __future__ import annotations

import importlib.util

import numpy as np

Arr = np.ndarray
PROB_BITS = 15
PROB_SCALE = 1 << PROB_BITS
MAX_LANES = 256
RANS_L = 1 << 16


def lanes_for(n: int) -> int:
    """The encoder's lane count for n symbols: one per 4096, 1 to MAX_LANES."""
    return max(1, min(MAX_LANES, n // 4096))


class RansError(ValueError):
    """A coded stream that does not decode (damaged or hostile)."""


def normalize(counts: Arr) -> Arr:
    """Frequencies summing to 2^15 from symbol counts (every counted symbol at least 1): proportional,
    rounded down, the remainder to the most frequent symbol (deterministic; only the encoder runs it)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total <= 0:
        raise RansError("no symbols to code")
    freq = (counts * PROB_SCALE) // total
    freq[(counts > 0) & (freq == 0)] = 1
    top = int(np.argmax(counts))
    freq[top] += PROB_SCALE - int(freq.sum())
    if freq[top] < 1:  # more distinct symbols than the precision allows a fair share: take from the largest
        raise RansError("too many distinct symbols for the coder's precision")
    out: Arr = freq.astype(np.uint32)
    return out


def check_table(freq: Arr) -> Arr:
    """The cumulative table of a frequency table read from a pack (refusing one that does not sum to 2^15)."""
    f = np.asarray(freq, dtype=np.int64)
    if f.ndim != 1 or (f < 0).any() or int(f.sum()) != PROB_SCALE:
        raise RansError("frequency table does not sum to 2^15")
    cum: Arr = np.concatenate([[0], np.cumsum(f)[:-1]]).astype(np.uint32)
    return cum


def _numba_ready() -> bool:
    return importlib.util.find_spec("numba") is not None


def encode(symbols: Arr, freq: Arr) -> tuple[Arr, Arr]:
    """(lane states uint32 (lanes_for(n),), words uint16) coding `symbols` (each with freq > 0)."""
    sym = np.ascontiguousarray(symbols, dtype=np.int64)
    cum = check_table(freq)
    f = np.asarray(freq, dtype=np.int64)
    if sym.size and (f[sym] == 0).any():
        raise RansError("a symbol outside the frequency table")
    if _numba_ready():
        from . import rans_numba
        states, words = rans_numba.encode(sym, f, cum.astype(np.int64), lanes_for(sym.size))
        return states, words
    return _encode_numpy(sym, f, cum.astype(np.int64), lanes_for(sym.size))


def decode(states: Arr, words: Arr, freq: Arr, n: int) -> Arr:
    """The n symbols (uint16) of a stream; refuses a stream that runs out or leaves words unread."""
    cum = check_table(freq)
    slot2sym = np.repeat(np.arange(len(freq), dtype=np.uint16), np.asarray(freq, dtype=np.int64))
    st = np.asarray(states, dtype=np.uint32)
    if st.ndim != 1 or not 1 <= st.size <= MAX_LANES or (st < RANS_L).any():
        raise RansError("bad lane states")
    w = np.ascontiguousarray(words, dtype=np.uint16)
    if _numba_ready():
        from . import rans_numba
        out, used = rans_numba.decode(st.astype(np.int64), w, np.asarray(freq, dtype=np.int64),
                                      cum.astype(np.int64), slot2sym, n, st.size)
    else:
        out, used = _decode_numpy(st.astype(np.int64), w, np.asarray(freq, dtype=np.int64), cum.astype(np.int64),
                                  slot2sym, n)
    if used < 0:
        raise RansError("the coded stream ends early")
    if used != w.size:
        raise RansError("the coded stream does not end where its words end")
    result: Arr = out
    return result


def _encode_numpy(sym: Arr, f: Arr, cum: Arr, lanes: int) -> tuple[Arr, Arr]:
    n = sym.size
    x = np.full(lanes, RANS_L, dtype=np.int64)
    out: list[Arr] = []
    steps = (n + lanes - 1) // lanes
    for k in range(steps - 1, -1, -1):
        lo = k * lanes
        m = min(lanes, n - lo)
        s = sym[lo:lo + m]
        fs = f[s]
        xs = x[:m]
        emit = xs >= (fs << 17)
        out.append(((xs[emit] & 0xFFFF)[::-1]).astype(np.uint16))  # lanes m-1 .. 0 emit in that order
        xs = np.where(emit, xs >> 16, xs)
        x[:m] = ((xs // fs) << PROB_BITS) + xs % fs + cum[s]
    emitted = np.concatenate(out) if out else np.zeros(0, np.uint16)
    words: Arr = np.ascontiguousarray(emitted[::-1])
    states: Arr = x.astype(np.uint32)
    return states, words


def _decode_numpy(x: Arr, words: Arr, f: Arr, cum: Arr, slot2sym: Arr, n: int) -> tuple[Arr, int]:
    out = np.empty(n, dtype=np.uint16)
    pos = 0
    mask = PROB_SCALE - 1
    w = words.astype(np.int64)
    lanes = x.size
    for lo in range(0, n, lanes):
        m = min(lanes, n - lo)
        xs = x[:m]
        s = slot2sym[xs & mask]
        out[lo:lo + m] = s
        xs = f[s] * (xs >> PROB_BITS) + (xs & mask) - cum[s]
        need = xs < RANS_L
        k = int(need.sum())
        if k:
            if pos + k > w.size:
                raise RansError("the coded stream ends early")
            xs[need] = (xs[need] << 16) | w[pos:pos + k]
            pos += k
        x[:m] = xs
    return out, pos
