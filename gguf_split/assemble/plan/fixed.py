"""Step 2, fixed files (`gguf-split add`): which existing shared files each new task loads.

Each task loads, among the fixed files whose every tensor it holds, those that save it the most bytes
(distinct positions, disjoint tensors, within the cap; the parts of one sharded `group` count once),
exhaustively up to `fixed_exact_max` candidates, else greedily. What they cover leaves the task's effective
user sets: the rest of the planner sees only what the chosen fixed files do not serve."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .records import FixedFile, Tuning
from .versions import Versions


@dataclass(frozen=True, slots=True)
class FixedCandidate:
    """A fixed file some task could load: every tensor of it is a version of the new tasks."""

    file: FixedFile
    vids: tuple[int, ...]  # its tensors' version numbers
    users: int  # the tasks that hold all of its tensors
    nbytes: int
    key: str  # its group (a sharded file's parts share one), for the cap


@dataclass(frozen=True, slots=True)
class FixedChoice:
    holes: dict[int, FixedFile]  # position -> the (first) fixed hole file there
    candidates: tuple[FixedCandidate, ...]
    chosen: tuple[tuple[int, ...], ...]  # per task: indexes into `candidates` of the files it loads
    load: tuple[int, ...]  # per task: fixed groups it loads (counted against the cap)
    used_positions: tuple[int, ...]  # per task: bitmask of the positions its fixed files take
    in_fixed: frozenset[int]  # versions that some fixed file holds (not counted in the dedup optimum)
    eff: tuple[int, ...]  # per version: the tasks that still need it (its users minus what fixed files serve)


def group_key(ff: FixedFile) -> str:
    return ff.group if ff.group is not None else "\0" + ff.name


def choose_fixed_files(vs: Versions, fixed_files: Sequence[FixedFile], caps: Sequence[int | None],
                       max_pos: Sequence[int | None], tuning: Tuning) -> FixedChoice:
    """caps: per task, at most this many fixed groups; max_pos: per task, only fixed files at positions up to
    this (a file at position p makes the task load p files at least, holes included). None: no limit."""
    holes, cands, in_fixed = _candidates(vs, fixed_files)
    eff = list(vs.users)
    n = vs.n
    chosen: list[tuple[int, ...]] = [()] * n
    load = [0] * n
    used = [0] * n
    for i in range(n):
        cap, top = caps[i], max_pos[i]
        mine = [k for k, f in enumerate(cands) if f.users >> i & 1 and (top is None or f.file.position <= top)]
        if not mine or cap == 0:
            continue
        mine.sort(key=lambda k: (-cands[k].nbytes, k))
        pick = choose_fixed(mine, cands, cap, tuning.fixed_exact_max)
        chosen[i] = tuple(pick)
        load[i] = len({cands[k].key for k in pick})
        for k in pick:
            used[i] |= 1 << cands[k].file.position
            for v in cands[k].vids:
                eff[v] &= ~(1 << i)
    return FixedChoice(holes, tuple(cands), tuple(chosen), tuple(load), tuple(used), frozenset(in_fixed),
                       tuple(eff))


def _candidates(vs: Versions, fixed_files: Sequence[FixedFile]
                ) -> tuple[dict[int, FixedFile], list[FixedCandidate], set[int]]:
    """(holes by position, the fixed files some task holds entirely, versions any fixed file holds)."""
    holes: dict[int, FixedFile] = {}
    cands: list[FixedCandidate] = []
    in_fixed: set[int] = set()
    everyone = (1 << vs.n) - 1
    for ff in fixed_files:
        if ff.position < 1:
            raise ValueError(f"fixed file {ff.name!r} has position {ff.position} (must be >= 1)")
        if not ff.tensors:
            holes.setdefault(ff.position, ff)
            continue
        mask, vids = everyone, []
        for x in ff.tensors:
            v = vs.index.get(x)
            if v is None:
                mask = 0
            else:
                in_fixed.add(v)
                vids.append(v)
                mask &= vs.users[v]
        if mask and len(set(vids)) == len(vids):
            cands.append(FixedCandidate(ff, tuple(vids), mask, sum(x.nbytes for x in ff.tensors), group_key(ff)))
    return holes, cands, in_fixed


def _fits(c: FixedCandidate, pos: set[int], vids: set[int], keys: set[str], cap: int | None) -> bool:
    if c.file.position in pos or not vids.isdisjoint(c.vids):
        return False
    return cap is None or c.key in keys or len(keys) < cap


def choose_fixed(cand: list[int], cands: Sequence[FixedCandidate], cap: int | None, exact_max: int) -> list[int]:
    """Among the fixed files a task may load (sorted by bytes, most first), the subset with distinct
    positions and disjoint tensors, within the cap (parts of one group count once), saving the most bytes:
    exhaustive up to `exact_max` candidates, else greedy in that order."""
    if len(cand) > exact_max:
        return _choose_greedily(cand, cands, cap)
    return _choose_exhaustively(cand, cands, cap)


def _choose_greedily(cand: list[int], cands: Sequence[FixedCandidate], cap: int | None) -> list[int]:
    pick: list[int] = []
    pos: set[int] = set()
    vids: set[int] = set()
    keys: set[str] = set()
    for k in cand:
        c = cands[k]
        if _fits(c, pos, vids, keys, cap):
            pick.append(k)
            pos.add(c.file.position)
            vids.update(c.vids)
            keys.add(c.key)
    return pick


def _choose_exhaustively(cand: list[int], cands: Sequence[FixedCandidate], cap: int | None) -> list[int]:
    """Branch and bound on (bytes saved, fewest groups); `rest[j]` bounds what candidates j.. can add."""
    best: tuple[int, int] = (-1, 0)
    best_pick: list[int] = []
    cur: list[int] = []
    rest = [0] * (len(cand) + 1)
    for j in range(len(cand) - 1, -1, -1):
        rest[j] = rest[j + 1] + cands[cand[j]].nbytes

    def go(j: int, saved: int, pos: set[int], vids: set[int], keys: set[str]) -> None:
        nonlocal best, best_pick
        score = (saved, -len(keys))
        if score > best:
            best, best_pick = score, list(cur)
        if j == len(cand) or saved + rest[j] < best[0]:
            return
        c = cands[cand[j]]
        if _fits(c, pos, vids, keys, cap):
            cur.append(cand[j])
            go(j + 1, saved + c.nbytes, pos | {c.file.position}, vids | set(c.vids), keys | {c.key})
            cur.pop()
        go(j + 1, saved, pos, vids, keys)

    go(0, 0, set(), set(), set())
    return sorted(best_pick)
