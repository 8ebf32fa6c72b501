"""Step 4, the exact search (up to `exact_max_tasks` tasks): branch and bound over families of task sets.

Every set of >= 2 tasks contained in some group is a candidate file (not only the groups themselves: under
a cap an intersection or any subset may win). A candidate S can add at most
m(S) = sum_{U >= S} B(U) (|S| - 1) - cost to any family, so candidates with m(S) <= 0 are dropped. Bound
at a node: the packing value with every remaining cap-feasible candidate opened for free, and the current
value plus the remaining candidates' m(S). Proven minimal for <= 4 tasks always (<= 11 candidate sets) and
for 5 tasks unless the search passes its node budget (then not exact, with the bound of its root)."""

from __future__ import annotations

from .bits import bits, pc
from .family import Family, drop_unused, net_saving


class _SearchBudget(Exception):
    pass


def exact_family(groups: dict[int, int], n: int, cap: list[int] | None, cost: int, incumbent: Family,
                 budget: int) -> tuple[Family, bool, int]:
    """Returns (family, proven optimal, an upper bound on the net saving of any family)."""
    s = _Search(groups, n, cap, cost, budget)
    s.seed(groups, incumbent)
    done = True
    try:
        s.dfs(0, 0, 0, {U: pc(U) - 1 for U, _ in s.glist})
    except _SearchBudget:
        done = False
    bound = s.best_val if done else max(s.best_val, s.root_bound[0] if s.root_bound else s.best_val)
    if s.best_mask is None:
        return incumbent, done, bound
    return s.family(s.best_mask), done, bound


class _Search:
    __slots__ = ("glist", "cap", "cost", "budget", "cands", "wt", "subbits", "memo", "sub_memo", "sup_of",
                 "best_val", "best_mask", "nodes", "load", "root_bound", "full")

    def __init__(self, groups: dict[int, int], n: int, cap: list[int] | None, cost: int, budget: int) -> None:
        self.glist = glist = list(groups.items())
        self.cap, self.cost, self.budget = cap, cost, budget
        self.cands = cands = _candidates(glist, cap, cost)
        self.wt = [pc(S) - 1 for S in cands]
        self.subbits = {U: sum(1 << j for j, S in enumerate(cands) if U & S == S) for U, _ in glist}
        self.memo: dict[tuple[int, int], int] = {}
        self.sub_memo: dict[int, int] = {}
        self.sup_of = [[(U, B) for U, B in glist if U & S == S] for S in cands]
        self.best_val = 0  # the net saving of the best family found (see seed)
        self.best_mask: int | None = None  # None: the incumbent
        self.nodes = 0
        self.load = [0] * n
        self.root_bound: list[int] = []
        self.full = sum(B * (pc(U) - 1) for U, B in glist)

    def seed(self, groups: dict[int, int], incumbent: Family) -> None:
        """Start from the greedy's family, with the optimal packing of its files if that is better."""
        self.best_val = net_saving(groups, incumbent, self.cost)
        fm = self._fmask_of(incumbent)
        if fm is not None and self.value(fm, len(incumbent.files)) > self.best_val:
            self.best_val, self.best_mask = self.value(fm, len(incumbent.files)), fm

    def pack(self, M: int, avail: int) -> int:
        """max sum (|S| - 1) over disjoint candidates of `avail` inside the task set M (memoised)."""
        if M & (M - 1) == 0 or not avail:
            return 0
        key = (M, avail)
        r = self.memo.get(key)
        if r is not None:
            return r
        low = M & -M
        best = self.pack(M ^ low, avail & self.subbits_of_mask(M ^ low))
        cands, wt = self.cands, self.wt
        for j in bits(avail):
            S = cands[j]
            if S & low and S & M == S:
                v = wt[j] + self.pack(M ^ S, avail & self.subbits_of_mask(M ^ S))
                if v > best:
                    best = v
        self.memo[key] = best
        return best

    def subbits_of_mask(self, M: int) -> int:
        r = self.sub_memo.get(M)
        if r is None:
            r = self.sub_memo[M] = sum(1 << j for j, S in enumerate(self.cands) if M & S == S)
        return r

    def value(self, fmask: int, nfiles: int) -> int:
        return sum(B * self.pack(U, fmask & self.subbits[U]) for U, B in self.glist) - self.cost * nfiles

    def _fmask_of(self, fam: Family) -> int | None:
        idx = {S: j for j, S in enumerate(self.cands)}
        r = 0
        for S in fam.files:
            if S not in idx:
                return None
            r |= 1 << idx[S]
        return r

    def dfs(self, i: int, fmask: int, nfiles: int, room: dict[int, int]) -> None:
        """Candidates i.. are open or closed below this node; room: per group, what it can still gain over
        its packing in fmask."""
        self.nodes += 1
        if self.nodes > self.budget:
            raise _SearchBudget
        here = self.full - sum(B * room[U] for U, B in self.glist) - self.cost * nfiles
        if here > self.best_val:
            self.best_val, self.best_mask = here, fmask
        ub, rest = self._bound(i, fmask, room, here)
        if not self.root_bound:
            self.root_bound.append(ub)
        if ub <= self.best_val or not rest:
            return
        j = (rest & -rest).bit_length() - 1  # the next candidate that still fits the cap
        S = self.cands[j]
        for t in bits(S):
            self.load[t] += 1
        inner = dict(room)
        f2 = fmask | 1 << j
        for U, _ in self.sup_of[j]:
            inner[U] = pc(U) - 1 - self.pack(U, f2 & self.subbits[U])
        self.dfs(j + 1, f2, nfiles + 1, inner)
        for t in bits(S):
            self.load[t] -= 1
        self.dfs(j + 1, fmask, nfiles, room)

    def _bound(self, i: int, fmask: int, room: dict[int, int], here: int) -> tuple[int, int]:
        """(an upper bound on any family below this node, the candidates that can still gain).

        Any family below the node gains at most, for any lam_U in {0, 1}:
          sum_{lam_U=0} B(U) room(U) + sum_S max(0, sum_{U >= S, lam_U=1} B(U) min(|S|-1, room(U)) - cost)
        (group U's gain is at most room(U), and at most the sum over the opened S <= U of min(|S|-1, room(U))).
        lam = 1 everywhere first, then 0 for the groups that bound counts more than their room, twice."""
        cap, cands, load = self.cap, self.cands, self.load
        feas = [j for j in range(i, len(cands)) if cap is None or all(load[t] < cap[t] for t in bits(cands[j]))]
        fm = fmask
        for j in feas:
            fm |= 1 << j
        # what each group can still gain: at most its packing with every feasible candidate opened
        room = {U: r and self.pack(U, fm & self.subbits[U]) - (pc(U) - 1 - r) for U, r in room.items()}
        lam0: set[int] = set()
        ub, rest = None, 0
        for _ in range(3):
            extra, pos, over = self._relaxed(feas, room, lam0)
            bound = here + extra + sum(B * room[U] for U, B in self.glist if U in lam0)
            if ub is None or bound < ub:
                ub = bound
            if not lam0:
                rest = pos  # a candidate with no possible gain below this node: an optimum without it exists
            more = {U for U, B in self.glist if U not in lam0 and over.get(U, 0) > room[U]}
            if not more:
                break
            lam0 |= more
        assert ub is not None  # set by the first pass of the loop above
        return ub, rest

    def _relaxed(self, feas: list[int], room: dict[int, int], lam0: set[int]) -> tuple[int, int, dict[int, int]]:
        """(sum over feasible candidates of their positive relaxed gain, those candidates, per group the
        sum of min(|S|-1, room) they count)."""
        extra, pos = 0, 0
        over: dict[int, int] = {}
        cost, wt, sup_of = self.cost, self.wt, self.sup_of
        for j in feas:
            w = wt[j]
            g = -cost
            for U, B in sup_of[j]:
                if U not in lam0 and room[U]:
                    g += B * min(w, room[U])
            if g > 0:
                extra += g
                pos |= 1 << j
                for U, B in sup_of[j]:
                    over[U] = over.get(U, 0) + min(w, room[U])
        return extra, pos, over

    def family(self, fmask: int) -> Family:
        """The family of the candidates in fmask, with each group's optimal packing."""
        fam = Family()
        for U, _ in self.glist:
            P = self._packing(U, fmask & self.subbits[U])
            if P:
                fam.pack[U] = P
        for j in bits(fmask):
            fam.files[self.cands[j]] = None
        drop_unused(fam)
        return fam

    def _packing(self, U: int, avail: int) -> list[int]:
        """An optimal packing of U into the candidates of `avail`, following the memoised values."""
        M, P = U, []
        while M & (M - 1) and avail:
            target = self.pack(M, avail)
            if target == 0:
                break
            low = M & -M
            if self.pack(M ^ low, avail & self.subbits_of_mask(M ^ low)) == target:
                M ^= low
                avail &= self.subbits_of_mask(M)
                continue
            for j in bits(avail):
                S = self.cands[j]
                if S & low and S & M == S and self.wt[j] + self.pack(M ^ S, avail & self.subbits_of_mask(M ^ S)) \
                        == target:
                    P.append(S)
                    M ^= S
                    avail &= self.subbits_of_mask(M)
                    break
        return P


def _candidates(glist: list[tuple[int, int]], cap: list[int] | None, cost: int) -> list[int]:
    """Every task set of >= 2 tasks inside some group that can pay for its file (and whose tasks may load
    a file), the most promising first."""
    cset: dict[int, None] = {}
    for U, _ in glist:
        sub = U
        while sub:
            if pc(sub) >= 2:
                cset.setdefault(sub, None)
            sub = (sub - 1) & U
    msave = {S: sum(B for U, B in glist if U & S == S) * (pc(S) - 1) - cost for S in cset}
    return sorted((S for S in cset if msave[S] > 0 and (cap is None or all(cap[t] > 0 for t in bits(S)))),
                  key=lambda S: (-msave[S], -pc(S), S))
