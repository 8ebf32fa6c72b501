"""The source codec (gguf_split.pack.source): exact round trips of F16/BF16 bit patterns (every pattern
included), the rANS coder's numpy and numba paths giving the same bytes, sizes within reach of the
order-0 entropy and below zstd on weight-like data, and refusal of damaged chunks."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from gguf_split.pack.source import planes, rans

needs_numba = pytest.mark.skipif(not rans._numba_ready(), reason="numba not installed")


def _weights(kind: str, n: int, seed: int = 0) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    if kind == "F16":
        out: np.ndarray = w.astype(np.float16).view(np.uint16)
        return out
    u = w.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("kind", planes.KINDS)
def test_every_bit_pattern_round_trips(kind: str) -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)  # NaNs, infinities, subnormals, both zeros
    sym, raw = planes.split(bits, kind)
    assert np.array_equal(planes.join(sym, raw, kind), bits)
    assert np.array_equal(planes.decode(planes.encode(bits, kind, 3), kind, bits.size), bits)


@pytest.mark.parametrize("n", [1, 3, 255, 256, 257, 4099])
@pytest.mark.parametrize("kind", planes.KINDS)
def test_odd_sizes_round_trip(kind: str, n: int) -> None:
    """Partial last lane step, raw values not filling their last byte."""
    bits = _weights(kind, n, seed=n)
    assert np.array_equal(planes.decode(planes.encode(bits, kind, 3), kind, n), bits)


@pytest.mark.parametrize("kind", planes.KINDS)
def test_weights_code_smaller_than_zstd_and_near_entropy(kind: str) -> None:
    bits = _weights(kind, 1 << 18)
    body = planes.encode(bits, kind, 19)
    assert np.array_equal(planes.decode(body, kind, bits.size), bits)
    assert len(body) < len(zstandard.ZstdCompressor(level=19).compress(bits.tobytes()))
    sym, _ = planes.split(bits, kind)
    bound = (planes.entropy0(sym, 2048) + planes.RAW_BITS[kind]) * bits.size / 8
    assert len(body) < bound * 1.003  # the table and 64 lane states: 0.3 % of this 0.5 MB chunk at most
    assert body[0] & 1 == 0  # mantissa noise stored, not zstd'd


def test_rans_round_trip_and_engines_agree() -> None:
    rng = np.random.default_rng(1)
    sym = np.minimum(rng.geometric(0.05, 70_001), 300)
    freq = rans.normalize(np.bincount(sym, minlength=301))
    states, words = rans.encode(sym, freq)
    cum = rans.check_table(freq).astype(np.int64)
    f = freq.astype(np.int64)
    s2, w2 = rans._encode_numpy(sym.astype(np.int64), f, cum, rans.lanes_for(sym.size))
    assert np.array_equal(states, s2) and np.array_equal(words, w2)
    slot2sym = np.repeat(np.arange(len(freq), dtype=np.uint16), f)
    back, used = rans._decode_numpy(states.astype(np.int64), words, f, cum, slot2sym, sym.size)
    assert np.array_equal(back, sym) and used == words.size
    assert np.array_equal(rans.decode(states, words, freq, sym.size), sym)


@needs_numba
def test_rans_numba_path_is_the_numpy_path() -> None:
    from gguf_split.pack.source import rans_numba

    rng = np.random.default_rng(2)
    sym = rng.integers(0, 40, 9_999).astype(np.int64) ** 2 % 97
    freq = rans.normalize(np.bincount(sym, minlength=97))
    f = freq.astype(np.int64)
    cum = rans.check_table(freq).astype(np.int64)
    states, words = rans_numba.encode(sym, f, cum, 7)
    s2, w2 = rans._encode_numpy(sym, f, cum, 7)
    assert np.array_equal(states, s2) and np.array_equal(words, w2)


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_a_stream_that_ends_early_is_refused(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Words cut short: both engines refuse with RansError (the numba kernel reports it, rans raises it)."""
    if engine == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(rans, "_numba_ready", lambda: False)
    rng = np.random.default_rng(3)
    sym = rng.integers(0, 50, 20_000)
    freq = rans.normalize(np.bincount(sym, minlength=50))
    states, words = rans.encode(sym, freq)
    with pytest.raises(rans.RansError, match="ends early"):
        rans.decode(states, words[: words.size // 2], freq, sym.size)
    assert np.array_equal(rans.decode(states, words, freq, sym.size), sym)


def test_normalize_keeps_every_symbol_and_the_total() -> None:
    counts = np.array([10**9, 1, 0, 3, 1])
    f = rans.normalize(counts)
    assert int(f.sum()) == rans.PROB_SCALE and (f[counts > 0] >= 1).all() and f[2] == 0


def test_damaged_chunks_are_refused() -> None:
    bits = _weights("BF16", 4096)
    body = planes.encode(bits, "BF16", 3)
    for bad in (body[:3], body[:-1], bytes([0x80]) + body[1:], body + b"\0"):
        with pytest.raises(planes.PlanesError):
            planes.decode(bad, "BF16", bits.size)
    with pytest.raises(planes.PlanesError):
        planes.decode(body, "BF16", bits.size + 1)
    off = planes._HEAD.size + 256  # the first frequency: the table no longer sums to 2^15
    with pytest.raises(planes.PlanesError):
        planes.decode(body[:off] + bytes([body[off] ^ 1]) + body[off + 1:], "BF16", bits.size)
    words_at = len(body) - (4096 * 5 // 8) - 2  # the last rANS word: the lanes end in the wrong state
    damaged = body[:words_at] + bytes([body[words_at] ^ 0xFF]) + body[words_at + 1:]
    try:
        back = planes.decode(damaged, "BF16", bits.size)
    except planes.PlanesError:
        return
    assert not np.array_equal(back, bits)  # a flipped word may decode; the pack's xxh3 then refuses it


@pytest.mark.parametrize("kind", planes.KINDS)
def test_without_numba_the_same_bytes(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The numpy path (numba is optional) writes and reads the very same chunks."""
    bits = _weights(kind, 20_000, seed=5)
    body = planes.encode(bits, kind, 3)
    monkeypatch.setattr(rans, "_numba_ready", lambda: False)
    assert planes.encode(bits, kind, 3) == body
    assert np.array_equal(planes.decode(body, kind, bits.size), bits)
