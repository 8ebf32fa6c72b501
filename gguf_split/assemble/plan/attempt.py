"""The steps chained into one plan, and the retries that keep every task within `max_files` (see the
package docstring): `attempt` runs fixed files -> family -> contents -> cut -> positions -> files under
per-task group caps; `relieve` takes a task over its budget out of its topmost new group (that file keeps
serving the others) and lays the same family out again, without a new family search."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .bits import pc
from .choose import FamilyChoice, choose_family
from .contents import Contents, fill_contents
from .cut import Piece, cut_groups, fit_budget, whole
from .family import Family, Groups, group_versions
from .files import build_files
from .fixed import FixedChoice, choose_fixed_files
from .positions import Placement, place
from .records import HOLE, SHARED, Cut, FixedFile, PlanStats, PlannedFile, TensorId, Tuning
from .shards import Shards, cut_shards
from .versions import Versions

_NO_LIMIT = 1 << 40  # a per-task cap that never binds


@dataclass(frozen=True, slots=True)
class Options:
    max_shared_files: int | None
    max_files: int | None
    file_cost: int
    max_shard_size: int | None
    alignment: int
    adaptor_header_bytes: dict[str, int]
    header_bound: Callable[[Sequence[TensorId]], int]
    fixed_files: Sequence[FixedFile]
    cut: Cut
    tuning: Tuning


@dataclass(frozen=True, slots=True)
class Attempt:
    fx: FixedChoice
    gs: Groups
    fc: FamilyChoice
    ct: Contents
    sh: Shards
    pl: Placement
    files: tuple[PlannedFile, ...]
    task_files: dict[str, tuple[int, ...]]
    over: list[int]  # per task: files over its budget (holes included)


def attempt(vs: Versions, o: Options, group_caps: list[int] | None,
             memo: dict[tuple[tuple[int, int], ...], FamilyChoice]) -> Attempt:
    """One plan: each task loads at most group_caps[t] groups (and max_shared_files), and at most max_files
    files holes included, where cutting allows (None: max_shared_files only)."""
    caps = [_min(o.max_shared_files, None if group_caps is None else group_caps[i]) for i in range(vs.n)]
    fx = choose_fixed_files(vs, o.fixed_files, caps, [o.max_files] * vs.n, o.tuning)
    cap = None if all(c is None for c in caps) else \
        [(_NO_LIMIT if c is None else c) - load for c, load in zip(caps, fx.load)]
    gs = group_versions(vs.vers, fx.eff)
    nothing = 0 if caps and all(c == 0 for c in caps) else o.max_shared_files  # no task may load a new file
    fc = choose_family(gs, vs.n, cap, nothing, o.file_cost, o.tuning, memo)
    return lay_out(vs, o, fx, gs, fc)


def lay_out(vs: Versions, o: Options, fx: FixedChoice, gs: Groups, fc: FamilyChoice) -> Attempt:
    """Contents, cut, positions and files of a chosen family; per task, how far it is over max_files."""
    ct = fill_contents(vs, fx.eff, fc.fam)
    room = None if o.max_files is None else [o.max_files - load for load in fx.load]
    sh, pl = _cut_and_place(vs, o, ct, fx, room)
    files, task_files = build_files(vs.tasks, ct, sh, pl, fx, o.fixed_files)
    over = [0] * vs.n
    if o.max_files is not None:
        counts = _files_per_task(files, task_files)
        over = [max(0, counts[t] - o.max_files) for t in vs.tasks]
    return Attempt(fx, gs, fc, ct, sh, pl, files, task_files, over)


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _cut_and_place(vs: Versions, o: Options, ct: Contents, fx: FixedChoice, room: list[int] | None
                   ) -> tuple[Shards, Placement]:
    """Cut the groups (cut.py) and place them; under a budget, merge pieces until every task's new pieces
    plus holes fit its room, where merging can do it (holes are known only once placed: retry)."""
    if o.cut.kind == "none":  # one piece per group: no units to work out
        return _shard_and_place(vs, o, ct, fx, [whole(ct.content[S]) for S in ct.masks], room)
    groups = cut_groups([ct.content[S] for S in ct.masks], ct.masks, o.cut, o.file_cost)
    if room is None or all(len(g.runs) <= 1 for g in groups):
        return _shard_and_place(vs, o, ct, fx, [g.pieces() for g in groups], room)
    uncut = [g.copy() for g in groups]
    fit_budget(uncut, [0] * vs.n)
    _, pl0 = _shard_and_place(vs, o, ct, fx, [g.pieces() for g in uncut], room)
    target = [r - len(h) for r, h in zip(room, pl0.holes)]
    while True:
        trial = [g.copy() for g in groups]
        fit_budget(trial, target)
        sh, pl = _shard_and_place(vs, o, ct, fx, [g.pieces() for g in trial], room)
        over = _over_room(ct, sh, pl, room)
        if not any(over):
            return sh, pl
        if all(len(g.runs) <= 1 for g in trial):
            return sh, pl  # the uncut plan itself is over: the caller lowers the family's caps
        mine = [t for t in range(vs.n) if over[t] and any(g.mask >> t & 1 and len(g.runs) > 1 for g in trial)]
        for t in mine or range(vs.n):  # an over task with nothing left to merge: holes from others' pieces
            target[t] -= max(over[t], 1)


def _shard_and_place(vs: Versions, o: Options, ct: Contents, fx: FixedChoice, pieces: list[list[Piece]],
                     room: list[int] | None) -> tuple[Shards, Placement]:
    sh = cut_shards(ct, pieces, vs.tasks, o.max_shard_size, o.alignment, o.adaptor_header_bytes, o.header_bound)
    pl = place(ct, sh, fx.used_positions, set(fx.holes), o.tuning.hole_search_max_groups, room)
    return sh, pl


def _over_room(ct: Contents, sh: Shards, pl: Placement, room: list[int]) -> list[int]:
    pieces = [0] * len(room)
    for g, S in enumerate(ct.masks):
        for t in range(len(room)):
            if S >> t & 1:
                pieces[t] += len(sh.pieces[g])
    return [max(0, pieces[t] + len(pl.holes[t]) - room[t]) for t in range(len(room))]


def _files_per_task(files: Sequence[PlannedFile], task_files: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Files a task loads besides its adaptor, as the cap counts them: a shared file (the parts of one cut by
    max_shard_size once) or a hole; OWN parts are not counted (max_shard_size forces them)."""
    out = {}
    for t, idx in task_files.items():
        mine = [files[i] for i in idx]
        out[t] = len({f.group for f in mine if f.kind == SHARED}) + sum(f.kind == HOLE for f in mine)
    return out


def count_files(stats: PlanStats, a: Attempt) -> None:
    stats.pieces = len({f.group for f in a.files if f.kind == SHARED and f.fixed is None})
    stats.holes = sum(a.files[i].kind == HOLE for idx in a.task_files.values() for i in idx)
    stats.max_task_files = max((len(idx) for idx in a.task_files.values()), default=0)


def relieve(vs: Versions, o: Options, a: Attempt) -> Attempt | None:
    """Each task over max_files leaves its topmost new group (the file then serves the group's other tasks;
    a group left with one task closes), and the family is laid out again. None when an over task has no
    new group to leave (its files over the budget are fixed ones): the caller plans with lower caps."""
    fam = a.fc.fam
    cur = {S: S for S in fam.files}  # the family's task sets as tasks leave them
    files, pack = dict(fam.files), {U: list(P) for U, P in fam.pack.items()}
    for t in (t for t in range(vs.n) if a.over[t]):
        mine = [g for g, S in enumerate(a.ct.masks) if S >> t & 1]  # as laid out
        if not mine:
            return None
        top = a.ct.masks[max(mine, key=lambda g: (a.pl.starts[g], g))]
        if cur[top] != top:
            continue  # another task just left it: the layout may already fit t (the next round tells)
        old, new = cur[top], cur[top] & ~(1 << t)
        new = new if pc(new) >= 2 else 0
        for S, now in cur.items():  # every group laid out as `old` (two may have become one task set)
            if now == old:
                cur[S] = new
        _replace(files, pack, old, new or None)
    out = Family()
    out.files, out.pack = files, {U: P for U, P in pack.items() if P}
    return lay_out(vs, o, a.fx, a.gs, FamilyChoice(out, False, a.fc.objective_bound))


def _replace(files: dict[int, None], pack: dict[int, list[int]], old: int, new: int | None) -> None:
    """The file of task set `old` now serves `new` (None: it closes), in the family and every packing."""
    del files[old]
    if new is not None:
        files[new] = None
    for U, P in pack.items():
        if old in P:
            P.remove(old)
            if new is not None and new not in P:
                P.append(new)
