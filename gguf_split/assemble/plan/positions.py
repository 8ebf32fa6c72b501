"""Step 7, positions and holes: each new shared group gets a start position (its parts take consecutive
positions) free for all its tasks; each task's OWN parts fill its gaps first; what stays free below a
task's last position is a hole. First fit in order of task-set size; for up to `hole_search_max_groups`
groups every order is tried, keeping the one that needs the fewest new hole files (then the fewest holes
over all tasks). Fixed hole files already in the directory are reused and do not count as new."""

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
    score: tuple[int, int]  # (new hole files, holes over all tasks): lower is better


def place(ct: Contents, sh: Shards, used0: Sequence[int], fixed_holes: set[int], max_search: int) -> Placement:
    masks = ct.masks
    nparts = [len(p) for p in sh.gparts]
    n_own = [len(p) for p in sh.own_parts]
    by_size = sorted(range(len(masks)),
                     key=lambda g: (-pc(masks[g]), -sum(x.nbytes for x in ct.content[masks[g]]), g))
    best = assign(by_size, masks, nparts, used0, n_own, fixed_holes)
    if 1 < len(masks) <= max_search and best.score[0] > 0:
        for perm in itertools.permutations(by_size):
            r = assign(perm, masks, nparts, used0, n_own, fixed_holes)
            if r.score < best.score:
                best = r
    return best


def assign(order: Sequence[int], masks: Sequence[int], nparts: Sequence[int], used0: Sequence[int],
           own_parts: Sequence[int], fixed_holes: set[int]) -> Placement:
    """First fit: each group (in `order`) at the lowest start where its parts' consecutive positions are free
    for all its tasks; then each task's own parts fill its gaps, lowest first, else go after its last
    position."""
    used = list(used0)
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
        mine, u = _fill_own(u, own_parts[t])
        own_pos.append(mine)
        holes.append([q for q in range(1, u.bit_length()) if not (u >> q) & 1])
    hole_positions = {q for h in holes for q in h}
    return Placement(starts, own_pos, holes, (len(hole_positions - fixed_holes), sum(len(h) for h in holes)))


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
