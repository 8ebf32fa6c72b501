"""Step 6d, reasons and stats: why each tensor of an adaptor is not shared (for the split report), and the
plan's statistics with its bounds (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from .bits import pc
from .choose import FamilyChoice
from .contents import Contents
from .family import Groups
from .fixed import FixedChoice
from .records import CAPPED, CHANGED, ONLY_HERE, RETYPED, TOO_SMALL, PlanStats
from .versions import Versions


@dataclass(frozen=True, slots=True)
class _NameInfo:
    holders: dict[str, int]  # name -> how many tasks hold a tensor of that name
    kind: dict[str, tuple[int, tuple[int, ...]] | None]  # name -> its (type, shape) if one for all, else None


def _name_info(vs: Versions) -> _NameInfo:
    holders: dict[str, int] = {}
    kind: dict[str, tuple[int, tuple[int, ...]] | None] = {}
    for v, x in enumerate(vs.vers):  # per version, not per tensor: a task holds a name once
        holders[x.name] = holders.get(x.name, 0) + pc(vs.users[v])
        k = (x.ggml_type, x.shape)
        if x.name not in kind:
            kind[x.name] = k
        elif kind[x.name] != k:
            kind[x.name] = None
    return _NameInfo(holders, kind)


def explain(vs: Versions, ct: Contents, fx: FixedChoice, gs: Groups, capped: bool, file_cost: int
            ) -> tuple[dict[str, dict[str, str]], int]:
    """(task -> own tensor name -> reason, bytes of the adaptor copies of versions >= 2 tasks hold)."""
    names = _name_info(vs)
    n = vs.n
    reasons: dict[str, dict[str, str]] = {}
    small = 0
    for i in range(n):
        why: dict[str, str] = {}
        for x in ct.own[i]:
            v = vs.index[x]
            if pc(vs.users[v]) >= 2:
                U = fx.eff[v]
                pays = gs.groups.get(U, 0) * (pc(U) - 1) > file_cost
                why[x.name] = CAPPED if capped and pays else TOO_SMALL
                small += x.nbytes
            elif n == 1 or names.holders[x.name] < n:
                why[x.name] = ONLY_HERE
            elif names.kind[x.name] is None:
                why[x.name] = RETYPED
            else:
                why[x.name] = CHANGED
        reasons[vs.tasks[i]] = why
    return reasons, small


def plan_stats(vs: Versions, ct: Contents, fx: FixedChoice, fc: FamilyChoice, small: int, file_cost: int
               ) -> PlanStats:
    stored = sum(x.nbytes for mine in ct.own for x in mine) + sum(x.nbytes for S in ct.masks for x in ct.content[S])
    dedup = sum(x.nbytes for v, x in enumerate(vs.vers) if v not in fx.in_fixed)
    nfiles = len(ct.masks)
    objective = stored + file_cost * nfiles
    lower = stored if fc.exact else max(fc.objective_bound - file_cost * nfiles, dedup)
    return PlanStats(stored, vs.input_bytes, dedup, fc.exact, min(lower, stored), small, objective=objective,
                     objective_bound=objective if fc.exact else fc.objective_bound, groups=nfiles)
