"""fplanes (gguf_split.pack.source.planes): exact round trips of F16/BF16 bit patterns, every bit pattern included,
sizes against plain zstd on weight-like data, and refusal of damaged chunks."""

from __future__ import annotations

import numpy as np
import pytest

from gguf_split.pack.source import planes


@pytest.mark.parametrize("kind", planes.KINDS)
def test_every_bit_pattern_round_trips(kind: str) -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)  # NaNs, infinities, subnormals, both zeros
    sym, rest = planes.split(bits, kind)
    assert np.array_equal(planes.join(sym, rest, kind), bits)
    assert np.array_equal(planes.decode(planes.encode(bits, kind, 3), kind, bits.size), bits)


def _weights(kind: str, n: int) -> np.ndarray:
    w = (np.random.default_rng(0).standard_normal(n) * 0.02).astype(np.float32)
    if kind == "F16":
        out: np.ndarray = w.astype(np.float16).view(np.uint16)
        return out
    u = w.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("kind", planes.KINDS)
def test_weights_code_smaller_than_zstd_and_near_entropy(kind: str) -> None:
    import zstandard

    bits = _weights(kind, 1 << 18)
    body = planes.encode(bits, kind, 19)
    assert np.array_equal(planes.decode(body, kind, bits.size), bits)
    assert len(body) < len(zstandard.ZstdCompressor(level=19).compress(bits.tobytes()))
    sym, _ = planes.split(bits, kind)
    bound = (planes.entropy0(sym) + 8) * bits.size / 8
    assert len(body) < bound * 1.01  # within 1 % of the layout's order-0 bound
    # raw mantissa noise is stored, not zstd'd (flags bit 1 clear)
    assert body[0] & 2 == 0


def test_damaged_chunks_are_refused() -> None:
    bits = _weights("F16", 4096)
    body = planes.encode(bits, "F16", 3)
    with pytest.raises(planes.PlanesError):
        planes.decode(body[:3], "F16", bits.size)
    with pytest.raises(planes.PlanesError):
        planes.decode(body[:-1], "F16", bits.size)
    with pytest.raises(planes.PlanesError):
        planes.decode(bytes([0x80]) + body[1:], "F16", bits.size)
    with pytest.raises(planes.PlanesError):
        planes.decode(body, "F16", bits.size + 1)
