"""Task sets as int bitmasks (bit i = the i-th task in input order) and the packing of a group into files."""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def bits(mask: int) -> Iterator[int]:
    """The set bits of `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def pc(mask: int) -> int:
    """How many tasks the set holds."""
    return mask.bit_count()


def pack_into(U: int, opened: Sequence[int]) -> list[int]:
    """Greedy packing of a group used by the task set `U` into opened files (task sets, in the order
    given): each file whose tasks all use the group and that shares no task with a file already chosen."""
    chosen, covered = [], 0
    for S in opened:
        if S & U == S and not S & covered:
            chosen.append(S)
            covered |= S
    return chosen
