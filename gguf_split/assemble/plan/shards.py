"""Step 6a, shards (`max_shard_size`): every piece of a new shared group is cut into parts at consecutive positions
(longest fitting runs); each adaptor's split 0 takes the longest fitting prefix of its own tensors, the rest
become OWN parts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .contents import Contents
from .cut import Piece
from .records import TensorId


@dataclass(frozen=True, slots=True)
class Shards:
    pieces: list[list[Piece]]  # per group (as Contents.masks): its pieces, in position order
    parts: list[list[list[tuple[TensorId, ...]]]]  # per group, per piece: its parts
    split0: list[tuple[TensorId, ...]]  # per task: the tensors of its adaptor
    own_parts: list[list[tuple[TensorId, ...]]]  # per task: its own tensors that overflow split 0

    def nparts(self, g: int) -> int:
        """The consecutive positions group g takes."""
        return sum(len(p) for p in self.parts[g])


def cut_shards(ct: Contents, pieces: list[list[Piece]], tasks: Sequence[str], limit: int | None, alignment: int,
               adaptor_header_bytes: Mapping[str, int], header_bound: Callable[[Sequence[TensorId]], int]
               ) -> Shards:
    parts = [[cut(p.tensors, limit, alignment, header_bound) for p in ps] for ps in pieces]
    split0: list[tuple[TensorId, ...]] = []
    own_parts: list[list[tuple[TensorId, ...]]] = []
    for i, t in enumerate(tasks):
        mine = tuple(ct.own[i])
        if limit is None:
            split0.append(mine)
            own_parts.append([])
            continue
        j = _split0_length(mine, limit, alignment, adaptor_header_bytes.get(t), header_bound)
        split0.append(mine[:j])
        own_parts.append(cut(mine[j:], limit, alignment, header_bound))
    return Shards(pieces, parts, split0, own_parts)


def _split0_length(mine: tuple[TensorId, ...], limit: int, alignment: int, header: int | None,
                   header_bound: Callable[[Sequence[TensorId]], int]) -> int:
    """How many of the task's own tensors its split 0 holds: the longest prefix under `limit` with its
    header (the adaptor's known header size, else the bound)."""
    ps = padded_prefix(mine, alignment)

    def fits0(j: int) -> bool:
        h = header if header is not None else header_bound(mine[:j])
        return j == 0 or h + ps[j] <= limit
    return longest(0, len(mine), fits0)


def longest(i: int, end: int, fits: Callable[[int], bool]) -> int:
    """The largest j in [i, end] with fits(j), given fits(i) and fits monotone (galloping + bisection)."""
    lo, step = i, 1
    while lo + step <= end and fits(lo + step):
        lo += step
        step *= 2
    hi = lo + step if lo + step <= end else end + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def padded_prefix(ts: Sequence[TensorId], alignment: int) -> list[int]:
    ps = [0]
    acc = 0
    for x in ts:
        acc += -(-x.nbytes // alignment) * alignment
        ps.append(acc)
    return ps


def cut(ts: Sequence[TensorId], limit: int | None, alignment: int,
        header_bound: Callable[[Sequence[TensorId]], int]) -> list[tuple[TensorId, ...]]:
    """Cut `ts` (in order) into parts of header_bound(part) + padded tensor bytes <= limit; a tensor that
    does not fit alone gets a part of its own."""
    ts = tuple(ts)
    if limit is None or not ts:
        return [ts] if ts else []
    ps = padded_prefix(ts, alignment)
    parts, i = [], 0
    while i < len(ts):
        def fits(j: int, i: int = i) -> bool:
            return j == i or header_bound(ts[i:j]) + ps[j] - ps[i] <= limit
        j = longest(i, len(ts), fits)
        if j == i:
            j = i + 1
        parts.append(ts[i:j])
        i = j
    return parts
