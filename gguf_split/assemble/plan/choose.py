"""Step 4: choose the family of shared files: the greedy (greedy.py), then up to `exact_max_tasks` tasks
the exact branch and bound (exact.py) seeded by it; under a cap with more tasks, the greedy is given the
clusters of the pair bound (bounds.py) as candidates and bounded by it. The bound says whether the
result is proven optimal (`exact`) and how far from optimal it can be."""

from __future__ import annotations

from dataclasses import dataclass

from .bits import bits
from .bounds import clusters, pair_cap_bound
from .exact import exact_family
from .family import Family, Groups, net_saving
from .greedy import greedy_family
from .records import Tuning


@dataclass(frozen=True, slots=True)
class FamilyChoice:
    fam: Family
    exact: bool  # the net saving is proven maximal
    objective_bound: int  # a lower bound on the objective of any valid plan


def choose_family(gs: Groups, n: int, cap: list[int] | None, max_shared_files: int | None, cost: int,
                  tuning: Tuning, memo: dict[tuple[tuple[int, int], ...], FamilyChoice] | None = None
                  ) -> FamilyChoice:
    """Under a cap, the uncapped family is taken when it fits (its bound holds for the capped problem too, and
    a cap that does not bind then changes nothing); otherwise the capped search runs. `memo` keeps uncapped
    families by their groups (plan_layout's retries under lower caps see the same groups again)."""
    if cap is not None and max_shared_files != 0 and gs.groups:
        key = tuple(gs.groups.items())
        free = memo.get(key) if memo is not None else None
        if free is None:
            free = _choose(gs, n, None, None, cost, tuning)
            if memo is not None:
                memo[key] = free
        if _fits(free.fam, n, cap):
            return free
    return _choose(gs, n, cap, max_shared_files, cost, tuning)


def _fits(fam: Family, n: int, cap: list[int]) -> bool:
    load = [0] * n
    for S in fam.files:
        for t in bits(S):
            load[t] += 1
    return all(load[t] <= cap[t] for t in range(n))


def _choose(gs: Groups, n: int, cap: list[int] | None, max_shared_files: int | None, cost: int,
            tuning: Tuning) -> FamilyChoice:
    groups = gs.groups
    if max_shared_files == 0 or not groups:
        fam, exact, ub = Family(), True, 0
    else:
        exact, ub, extra = False, gs.dedup_saving, []
        if cap is not None and n > tuning.exact_max_tasks:
            pb = pair_cap_bound(groups, n, cap, tuning.pair_bound_budget)
            if pb is not None:
                ub = min(ub, int(pb[0] * (1 + 1e-12)) + 1)
                extra = clusters(pb[1], n)
        fam = greedy_family(groups, n, cap, cost, tuning, extra)
        if n <= tuning.exact_max_tasks:
            fam, exact, ub_search = exact_family(groups, n, cap, cost, fam, tuning.exact_node_budget)
            ub = min(ub, ub_search)
    net = net_saving(groups, fam, cost)
    if net >= ub:
        exact = True
    objective = gs.base - net
    return FamilyChoice(fam, exact, objective if exact else gs.base - max(ub, net))
