"""Step 4, the greedy: lazy greedy on net gain over candidate task sets.

Uncapped, every group that pays for its own file gets one first. Then candidate task sets (the largest
groups, their pairwise intersections, and under a cap the part of a blocked set whose tasks still have
room, plus `extra`: the clusters of the pair bound) are opened while one gains more than a file costs;
opening S re-packs every group U >= S whose packing gains by swapping out the files S overlaps. A last
pass re-packs the groups without a file of their own into the final files."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from .bits import bits, pack_into, pc
from .family import Family, drop_unused
from .records import Tuning


def greedy_family(groups: dict[int, int], n: int, cap: list[int] | None, cost: int, tuning: Tuning,
                  extra: Sequence[int] = ()) -> Family:
    g = _Greedy(groups, n, cap, cost)
    if cap is None:
        g.open_paying_groups()
    cands = g.candidates(extra, tuning)
    g.count_uses()
    g.run(cands)
    g.repack()
    drop_unused(g.fam)
    return g.fam


class _Greedy:
    __slots__ = ("groups", "n", "cap", "cost", "fam", "order", "own", "ranked", "load", "glist", "sup", "uses")

    def __init__(self, groups: dict[int, int], n: int, cap: list[int] | None, cost: int) -> None:
        self.groups, self.n, self.cap, self.cost = groups, n, cap, cost
        self.fam = Family()
        self.order = {U: k for k, U in enumerate(groups)}
        own = self.own = {U: B * (pc(U) - 1) for U, B in groups.items()}
        self.ranked = sorted(groups, key=lambda U: (-own[U], self.order[U]))
        self.load = [0] * n
        self.glist = list(groups)
        self.sup: dict[int, list[int]] = {}
        self.uses: dict[int, int] = {}  # file mask -> how many groups pack into it

    def supersets(self, S: int) -> list[int]:
        r = self.sup.get(S)
        if r is None:
            r = self.sup[S] = [U for U in self.glist if U & S == S]
        return r

    def open_paying_groups(self) -> None:
        """Uncapped: every group whose own file pays gets one; the others pack into those they cover."""
        fam = self.fam
        for U in self.ranked:
            if self.own[U] > self.cost:
                fam.files[U] = None
                fam.pack[U] = [U]
        # groups without a file of their own: pack them into the opened files they cover (largest first)
        opened = sorted(fam.files, key=lambda S: (-pc(S), self.order[S]))
        if opened:
            for U in self.glist:
                if U in fam.files:
                    continue
                P = pack_into(U, opened)
                if P:
                    fam.pack[U] = P

    def candidates(self, extra: Sequence[int], tuning: Tuning) -> dict[int, int]:
        """mask -> tie-break order: within a budget of subset tests against all groups."""
        files, ranked = self.fam.files, self.ranked
        k_top = max(8, tuning.greedy_subset_tests // max(1, len(self.glist)))
        if self.cap is not None:  # at most n * cap / 2 files can open: look at a few times that many
            k_top = min(k_top, 2 * self.n * max(self.cap) + 32)
        cands: dict[int, int] = {}
        for U in ranked[:k_top]:
            if U not in files and self.own[U] > 0:
                cands.setdefault(U, len(cands))
        for S in extra:
            if S not in files:
                cands.setdefault(S, len(cands))
        top = ranked[:tuning.greedy_pair_top]
        for a in range(len(top)):
            for b in range(a + 1, len(top)):
                inter = top[a] & top[b]
                if pc(inter) >= 2 and inter not in files:
                    cands.setdefault(inter, len(cands))
        return cands

    def count_uses(self) -> None:
        for P in self.fam.pack.values():
            for F in P:
                self.uses[F] = self.uses.get(F, 0) + 1

    def gain(self, S: int) -> int:
        """What opening S would add to the net saving now."""
        groups, pack_get = self.groups, self.fam.pack.get
        g, w = -self.cost, pc(S) - 1
        for U in self.supersets(S):
            P = pack_get(U)
            if not P:
                g += groups[U] * w
                continue
            lost = 0
            for F in P:
                if F & S:
                    lost += F.bit_count() - 1
            if w > lost:
                g += groups[U] * (w - lost)
        return g

    def key(self, S: int) -> float:
        """Uncapped: the most net bytes first; under a cap a task's slots are what is scarce: the most net
        bytes per task slot first (eight fine-tunes of one family in one file beat a file for 48 tasks
        holding only what all 48 share, when each task may load one file)."""
        g = self.gain(S)
        return -g / S.bit_count() if self.cap is not None and g > 0 else -g

    def open_file(self, S: int) -> None:
        fam, uses, load = self.fam, self.uses, self.load
        fam.files[S] = None
        for t in bits(S):
            load[t] += 1
        w = pc(S) - 1
        for U in self.supersets(S):
            P = fam.pack.get(U, [])
            lost = sum(pc(F) - 1 for F in P if F & S)
            if w <= lost:
                continue
            keep = []
            for F in P:
                if not F & S:
                    keep.append(F)
                    continue
                uses[F] -= 1
                if uses[F] == 0:  # no group packs into F any more: close it, free its tasks' cap
                    del fam.files[F]
                    for t in bits(F):
                        load[t] -= 1
            fam.pack[U] = keep + [S]
            uses[S] = uses.get(S, 0) + 1

    def run(self, cands: dict[int, int]) -> None:
        """Open the best candidate while it gains; gains are recomputed lazily (a stale one is re-pushed)."""
        heap = []
        for S, k in cands.items():
            # at most sum_{U >= S} B(U) (|S| - 1) - cost: a candidate that cannot pay is never opened
            if sum(self.groups[U] for U in self.supersets(S)) * (pc(S) - 1) > self.cost:
                heap.append((self.key(S), k, S))
        heapq.heapify(heap)
        fresh: dict[int, int] = {S: 0 for S in cands}  # mask -> stamp its heap gain was computed at
        stamp, seen = 0, set(cands)
        while heap:
            neg, k, S = heapq.heappop(heap)
            if S in self.fam.files:
                continue
            if self.cap is not None and self._blocked(S, k, heap, fresh, stamp, seen):
                continue
            if fresh[S] != stamp:
                fresh[S] = stamp
                heapq.heappush(heap, (self.key(S), k, S))
                continue
            if neg >= 0:
                break
            self.open_file(S)
            stamp += 1

    def _blocked(self, S: int, k: int, heap: list[tuple[float, int, int]], fresh: dict[int, int], stamp: int,
                 seen: set[int]) -> bool:
        """Under the cap: S holds a task with no slot left. Its part whose tasks have room becomes a
        candidate (once)."""
        assert self.cap is not None
        full = 0
        for t in bits(S):
            if self.load[t] >= self.cap[t]:
                full |= 1 << t
        if not full:
            return False
        S2 = S & ~full
        if pc(S2) >= 2 and S2 not in seen and S2 not in self.fam.files:
            seen.add(S2)
            fresh[S2] = stamp
            heapq.heappush(heap, (self.key(S2), k, S2))
        return True

    def repack(self) -> None:
        """Last pass: a group without a file of its own may pack better into the final files."""
        fam = self.fam
        if not fam.files:
            return
        order = self.order
        opened = sorted(fam.files, key=lambda S: (-pc(S), order.get(S, len(order))))
        for U in self.glist:
            if U in fam.files:
                continue
            P = pack_into(U, opened)
            if sum(pc(S) - 1 for S in P) > sum(pc(S) - 1 for S in fam.pack.get(U, ())):
                fam.pack[U] = P
