"""Step 6b, positions and holes: each new shared group gets a start position (its pieces and their parts take
consecutive positions, in the cut's order) free for all its tasks; each task's OWN parts fill its gaps
first; what stays free below a task's last position is a hole. First fit in order of task-set size; for up
to `hole_search_max_groups` groups every order is tried, keeping the one that takes the fewest tasks over
their file budget, then needs the fewest new hole files, then the fewest holes over all tasks. Fixed hole
files already in the directory are reused and do not count as new."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .bits import bits, pc
from .contents import Contents
from .shards import Shards


@dataclass(frozen=True, slots=True)
class Placement:
    starts: list[int]  # per group: its first position
    own_pos: list[list[int]]  # per task: the positions of its OWN parts
    holes: list[list[int]]  # per task: the positions it fills with a hole
    score: tuple[int, int, int]  # (files over budget, new hole files, holes over all tasks): lower is better


@dataclass(frozen=True, slots=True)
class _Need:
    """What a placement must fit, besides the groups' task sets."""

    used0: Sequence[int]  # per task: positions its fixed files take
    own_parts: Sequence[int]  # per task: its OWN parts
    fixed_holes: set[int]  # positions with a hole file in the directory already
    room: Sequence[int] | None  # per task: at most this many new pieces + holes (None: no limit)
    pieces: Sequence[int]  # per task: the new pieces it loads


def place(ct: Contents, sh: Shards, used0: Sequence[int], fixed_holes: set[int], max_search: int,
          room: Sequence[int] | None = None) -> Placement:
    masks = ct.masks
    nparts = [sh.nparts(g) for g in range(len(masks))]
    pieces = [0] * len(used0)
    for g, S in enumerate(masks):
        for t in bits(S):
            pieces[t] += len(sh.pieces[g])
    need = _Need(used0, [len(p) for p in sh.own_parts], fixed_holes, room, pieces)
    by_size = sorted(range(len(masks)),
                     key=lambda g: (-pc(masks[g]), -sum(x.nbytes for x in ct.content[masks[g]]), g))
    best = assign(by_size, masks, nparts, need)
    if 1 < len(masks) <= max_search and best.score[:2] > (0, 0):
        for perm in itertools.permutations(by_size):
            r = assign(perm, masks, nparts, need)
            if r.score < best.score:
                best = r
    return best


def assign(order: Sequence[int], masks: Sequence[int], nparts: Sequence[int], need: _Need) -> Placement:
    """First fit: each group (in `order`) at the lowest start where its parts' consecutive positions are free
    for all its tasks; then each task's own parts fill its gaps, lowest first, else go after its last
    position."""
    used = list(need.used0)
    starts = [0] * len(masks)
    for g in order:
        occ = 0
        for t in bits(masks[g]):
            occ |= used[t]
        run = (1 << nparts[g]) - 1
        a = 1
        while (occ >> a) & run:
            a += 1
        starts[g] = a
        for t in bits(masks[g]):
            used[t] |= run << a
    own_pos: list[list[int]] = []
    holes: list[list[int]] = []
    for t, u in enumerate(used):
        mine, u = _fill_own(u, need.own_parts[t])
        own_pos.append(mine)
        holes.append([q for q in range(1, u.bit_length()) if not (u >> q) & 1])
    hole_positions = {q for h in holes for q in h}
    over = 0
    if need.room is not None:
        over = sum(max(0, need.pieces[t] + len(holes[t]) - need.room[t]) for t in range(len(holes)))
    return Placement(starts, own_pos, holes, (over, len(hole_positions - need.fixed_holes),
                                              sum(len(h) for h in holes)))


def _fill_own(u: int, k: int) -> tuple[list[int], int]:
    """The positions of a task's k OWN parts (its free positions, lowest first) and its positions after."""
    mine: list[int] = []
    p = 1
    while len(mine) < k:
        if not (u >> p) & 1:
            mine.append(p)
            u |= 1 << p
        p += 1
    return mine, u
