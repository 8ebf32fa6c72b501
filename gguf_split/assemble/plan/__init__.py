"""Plan: a pure function from the models' tensor identities to the files of a split.

A split is, per task, one adaptor (llama.cpp split 0: the task's metadata and the tensors it shares with
no other task) plus an ordered list of shared files at positions 1..k (their `split.no`). llama.cpp's
loader (2025 and 2026) allows exactly this:
- every tensor of a task appears exactly once among the task's files, and every tensor in those files is
  one the task uses: a shared file can serve exactly the tasks that hold all of its tensors byte-identical;
- a file's `split.no` is fixed in the file, so a file sits at the same position in every task that loads
  it, and two files loaded by one task need different positions;
- a task's positions run 1..k without holes; a *hole* file (no tensors, only `split.no`) fills a gap and
  can serve any task.

The planner groups tensor versions by the exact set of tasks that share them, gives a group its own file
when the bytes it saves pay for a file (`file_cost`), packs the versions of smaller groups into files
whose task set they cover, respects a cap on shared files per task (`max_shared_files`), cuts files larger
than `max_shard_size` into parts at consecutive positions, and assigns positions so that few holes are
needed. It never looks at file contents or names: same inputs, same plan (deterministic).

The objective: stored tensor bytes + `file_cost` x number of new shared groups holding tensors (a sharded
group counts once; holes and fixed files are not counted; fewer holes is a secondary goal).

How (in brief):
1. Every tensor identity gets an int; per version a bitmask of its users (one dict lookup per tensor).
2. Fixed files (`gguf-split add`): each task loads the fixed files, among those whose every tensor it holds,
   that save it the most bytes (distinct positions, disjoint tensors, the cap; parts of one `group` count
   once), exhaustively up to FIXED_EXACT_MAX candidates, else greedily. What they cover leaves the task's
   effective user sets.
3. Versions are grouped by effective user set U (>= 2 tasks) with byte totals B(U). Choosing files is then
   a problem over groups only (see `_Family`): a family F of task sets, per group a packing of pairwise
   disjoint sets of F inside U; maximise sum_U B(U) pack(U, F) - file_cost |F| with each task in <= cap sets.
   - up to EXACT_MAX_TASKS (5) tasks: branch and bound over every task set of >= 2 tasks inside some group
     (intersections and arbitrary subsets included), seeded by the greedy, with an exact per-group packing.
     Proven minimal for <= 4 tasks always (<= 11 candidate sets) and for 5 tasks unless the search passes
     EXACT_NODE_BUDGET nodes (then exact=False with the bound of its root);
   - larger: a lazy greedy. Uncapped, every group whose own file pays gets one; then candidates (the
     largest groups, intersections of the largest, and under a cap the clusters of a single-linkage
     agglomeration of tasks by the bytes they could share) are opened while one gains more than a file
     costs (under a cap: the most bytes per task slot first); opening S re-packs the groups it can serve.
4. Contents (model order of the file's first task), shards (`max_shard_size`: longest fitting runs; an
   adaptor's split 0 takes the longest fitting prefix of its own tensors, the rest become OWN parts),
   positions (first fit by task-set size, every order tried for up to 6 groups to need the fewest holes;
   OWN parts fill their task's holes first), holes (reusing fixed hole files), reasons and stats.
All passes are linear in the number of tensors plus sorting, except the greedy's candidate x group subset
tests (bounded by GREEDY_SUBSET_TESTS) and the cap bound (bounded by PAIR_BOUND_BUDGET).

Bounds (PlanStats): `objective_bound` <= the objective of every valid plan (given the fixed-file choice):
the exact search's optimum or its root bound; otherwise the dedup optimum and, under a cap, a per-task
bound (`_pair_cap_bound`); the plan is reported exact whenever its objective meets the bound.
`lower_bound` = max(dedup optimum, objective_bound - file_cost x this plan's groups): no valid plan with at
most as many new shared groups stores fewer bytes; == stored_bytes when exact.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

# reasons a tensor of a task is in its adaptor rather than a shared file (for the split report)
CHANGED = "changed"  # same name, type and shape as in another task, other bytes
RETYPED = "type/shape differs"  # the name exists in another task with another ggml type or shape
ONLY_HERE = "not in every model"  # some task has no tensor of this name
TOO_SMALL = "too small for a file"  # shared with other tasks, but its group saves less than a file costs
CAPPED = "over the file cap"  # shared with other tasks, but the cap on shared files left it out

DEFAULT_FILE_COST = 1 << 20


@dataclass(frozen=True, slots=True)
class TensorId:
    """What makes two tensors the same: name + ggml type + shape + xxh3-128 of the bytes (nbytes follows
    from type and shape; it is carried for sizes)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    digest: bytes
    nbytes: int


@dataclass(frozen=True, slots=True)
class FixedFile:
    """A shared file that already exists (`gguf-split add`): the planner may give it to new tasks at its
    position; it never changes it."""

    name: str
    position: int
    tensors: tuple[TensorId, ...]
    group: str | None = None  # parts of one sharded shared file share a group: they count once for the cap


SHARED, HOLE, OWN = "shared", "hole", "own"


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """One file besides the adaptors' split 0: a shared file (or one part of a sharded group), a hole, or
    an overflow part of one task's own tensors (`own`, only with `max_shard_size`)."""

    kind: str  # SHARED, HOLE or OWN
    position: int  # its split.no, >= 1
    tensors: tuple[TensorId, ...]  # in write order (empty for a hole)
    tasks: tuple[str, ...]  # the tasks that load it, in input order (every task may load a hole)
    group: int = -1  # shared files: index of its group (the parts of one sharded group share it)
    part: int = 0  # 0-based part index within its group
    parts: int = 1
    fixed: str | None = None  # the FixedFile's name when the plan reuses an existing file

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class PlanStats:
    stored_bytes: int  # tensor bytes the plan stores (adaptors + new shared files; fixed files excluded)
    input_bytes: int  # sum of every task's tensor bytes
    dedup_optimum: int  # every distinct tensor version of the (new) tasks once: a lower bound
    exact: bool  # True when the objective is proven minimal (given the fixed-file choice)
    lower_bound: int  # no valid plan with at most `groups` new shared groups stores less (== stored when exact)
    small_group_bytes: int  # bytes of the adaptor copies of versions shared by >= 2 tasks (TOO_SMALL, CAPPED)
    objective: int = 0  # stored_bytes + file_cost x groups (the quantity the planner minimises)
    objective_bound: int = 0  # a lower bound on the objective of any valid plan (== objective when exact)
    groups: int = 0  # new shared groups holding tensors (a sharded group counts once)


@dataclass
class Layout:
    files: tuple[PlannedFile, ...]
    task_files: dict[str, tuple[int, ...]]  # task -> indexes into `files` for positions 1..k, in order
    adaptor_tensors: dict[str, tuple[TensorId, ...]]  # task -> tensors of its split-0 file, model order
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> adaptor tensor -> reason
    stats: PlanStats | None = None


def default_header_bound(tensors: Sequence[TensorId]) -> int:
    """An upper bound on the header bytes of a shared file holding `tensors` (records, tensor infos,
    digests, padding to the data section): used to keep parts under `max_shard_size`."""
    return 64 * 1024 + sum(len(t.name.encode()) + 128 for t in tensors)


# --- tuning: where the exact search stops and the greedy's budgets ---------------------------------------
EXACT_MAX_TASKS = 5  # exact search (all task sets of >= 2 tasks are candidate files) up to this many tasks
EXACT_NODE_BUDGET = 10_000  # search nodes; a search that runs out reports exact=False with its bound
FIXED_EXACT_MAX = 16  # per task: the choice among loadable fixed files is exhaustive up to this many
GREEDY_SUBSET_TESTS = 2_000_000  # greedy: candidate x group subset tests (keeps it linear for many groups)
GREEDY_PAIR_TOP = 12  # greedy: intersections of the task sets of this many largest groups are candidates
PAIR_BOUND_BUDGET = 4_000_000  # cap bound: sum over groups of |U|^2 it may spend
HOLE_SEARCH_MAX_GROUPS = 6  # position assignment tries every order of up to this many groups (few holes)


def _pack_into(U: int, opened: Sequence[int]) -> list[int]:
    """Greedy packing of a group used by the task set `U` into opened files (task sets, in the order
    given): each file whose tasks all use the group and that shares no task with a file already chosen."""
    chosen, covered = [], 0
    for S in opened:
        if S & U == S and not S & covered:
            chosen.append(S)
            covered |= S
    return chosen


def _bits(mask: int) -> Iterator[int]:
    """The set bits of `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _pc(mask: int) -> int:
    return mask.bit_count()


# --- the family of shared files: which task sets get a file, and which versions go where --------------------
#
# After the fixed files are chosen, every version v has an effective user set U(v) (the tasks that still
# need it). All versions with the same U are placed alike, so the problem is over *groups* U with their
# byte totals B(U). A plan chooses a family F of task sets (one file each) and per group a packing: files
# of F with pairwise disjoint task sets, each a subset of U; a version of U is then stored once per file
# of its packing plus once per task of U that no file covers:
#     stored = sum_U B(U) * (|U| - sum_{S in pack(U)} (|S| - 1)),   objective = stored + file_cost * |F|
# subject to: each task in at most cap files of F. (Positions, holes and shards never change the
# objective: any family can be laid out, with holes.)  We maximise the net saving
#     sum_U B(U) * pack(U, F) - file_cost * |F|,   pack(U, F) = max sum (|S| - 1) over disjoint S in F, S <= U.


class _Family:
    __slots__ = ("files", "pack")

    def __init__(self) -> None:
        self.files: dict[int, None] = {}  # task-set masks, in the order they were opened
        self.pack: dict[int, list[int]] = {}  # group mask -> file masks of its packing


def _net_saving(groups: dict[int, int], fam: _Family, cost: int) -> int:
    used = {S for P in fam.pack.values() for S in P}
    return sum(B * sum(_pc(S) - 1 for S in fam.pack.get(U, ())) for U, B in groups.items()) - cost * len(used)


def _drop_unused(fam: _Family) -> None:
    used = {S for P in fam.pack.values() for S in P}
    fam.files = {S: None for S in fam.files if S in used}


def _greedy(groups: dict[int, int], n: int, cap: list[int] | None, cost: int, extra: Sequence[int] = ()) -> _Family:
    """Lazy greedy on net gain. Uncapped: every group that pays for its own file gets one first. Then
    candidate task sets (the largest groups, their pairwise intersections, and under a cap the part of a
    blocked set whose tasks still have room) are opened while one gains more than a file costs; opening S
    re-packs every group U >= S whose packing gains by swapping out the files S overlaps. `extra`: more
    candidate task sets (the clusters, under a cap)."""
    fam = _Family()
    order = {U: k for k, U in enumerate(groups)}
    own = {U: B * (_pc(U) - 1) for U, B in groups.items()}
    ranked = sorted(groups, key=lambda U: (-own[U], order[U]))
    load = [0] * n
    glist = list(groups)
    sup: dict[int, list[int]] = {}

    def supersets(S: int) -> list[int]:
        r = sup.get(S)
        if r is None:
            r = sup[S] = [U for U in glist if U & S == S]
        return r

    if cap is None:
        for U in ranked:
            if own[U] > cost:
                fam.files[U] = None
                fam.pack[U] = [U]
        # groups without a file of their own: pack them into the opened files they cover (largest first)
        opened = sorted(fam.files, key=lambda S: (-_pc(S), order[S]))
        if opened:
            for U in glist:
                if U in fam.files:
                    continue
                P = _pack_into(U, opened)
                if P:
                    fam.pack[U] = P

    # candidates: within a budget of subset tests against all groups
    k_top = max(8, GREEDY_SUBSET_TESTS // max(1, len(glist)))
    if cap is not None:  # at most n * cap / 2 files can open: look at a few times that many
        k_top = min(k_top, 2 * n * max(cap) + 32)
    cands: dict[int, int] = {}  # mask -> tie-break order
    for U in ranked[:k_top]:
        if U not in fam.files and own[U] > 0:
            cands.setdefault(U, len(cands))
    for S in extra:
        if S not in fam.files:
            cands.setdefault(S, len(cands))
    top = ranked[:GREEDY_PAIR_TOP]
    for a in range(len(top)):
        for b in range(a + 1, len(top)):
            inter = top[a] & top[b]
            if _pc(inter) >= 2 and inter not in fam.files:
                cands.setdefault(inter, len(cands))

    pack_get = fam.pack.get

    def gain(S: int) -> int:
        g, w = -cost, _pc(S) - 1
        for U in supersets(S):
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

    def key(S: int) -> float:
        # uncapped: the most net bytes first; under a cap a task's slots are what is scarce: the most net
        # bytes per task slot first (eight fine-tunes of one family in one file beat a file for 48 tasks
        # holding only what all 48 share, when each task may load one file)
        g = gain(S)
        return -g / S.bit_count() if cap is not None and g > 0 else -g

    uses: dict[int, int] = {}
    for P in fam.pack.values():
        for F in P:
            uses[F] = uses.get(F, 0) + 1

    def open_file(S: int) -> None:
        fam.files[S] = None
        for t in _bits(S):
            load[t] += 1
        w = _pc(S) - 1
        for U in supersets(S):
            P = fam.pack.get(U, [])
            lost = sum(_pc(F) - 1 for F in P if F & S)
            if w > lost:
                keep = []
                for F in P:
                    if F & S:
                        uses[F] -= 1
                        if uses[F] == 0:  # no group packs into F any more: close it, free its tasks' cap
                            del fam.files[F]
                            for t in _bits(F):
                                load[t] -= 1
                    else:
                        keep.append(F)
                fam.pack[U] = keep + [S]
                uses[S] = uses.get(S, 0) + 1

    heap = []
    for S, k in cands.items():
        # at most sum_{U >= S} B(U) (|S| - 1) - cost: a candidate that cannot pay is never opened
        if sum(groups[U] for U in supersets(S)) * (_pc(S) - 1) > cost:
            heap.append((key(S), k, S))
    heapq.heapify(heap)
    fresh: dict[int, int] = {S: 0 for S in cands}  # mask -> stamp its heap gain was computed at
    stamp, seen = 0, set(cands)
    while heap:
        neg, k, S = heapq.heappop(heap)
        if S in fam.files:
            continue
        if cap is not None:
            full = 0
            for t in _bits(S):
                if load[t] >= cap[t]:
                    full |= 1 << t
            if full:
                S2 = S & ~full
                if _pc(S2) >= 2 and S2 not in seen and S2 not in fam.files:
                    seen.add(S2)
                    fresh[S2] = stamp
                    heapq.heappush(heap, (key(S2), k, S2))
                continue
        if fresh[S] != stamp:
            fresh[S] = stamp
            heapq.heappush(heap, (key(S), k, S))
            continue
        if neg >= 0:
            break
        open_file(S)
        stamp += 1

    # last pass: a group without a file of its own may pack better into the final files
    if fam.files:
        opened = sorted(fam.files, key=lambda S: (-_pc(S), order.get(S, len(order))))
        for U in glist:
            if U in fam.files:
                continue
            P = _pack_into(U, opened)
            if sum(_pc(S) - 1 for S in P) > sum(_pc(S) - 1 for S in fam.pack.get(U, ())):
                fam.pack[U] = P
    _drop_unused(fam)
    return fam


class _SearchBudget(Exception):
    pass


def _exact(groups: dict[int, int], n: int, cap: list[int] | None, cost: int, incumbent: _Family,
           budget: int) -> tuple[_Family, bool, int]:
    """Branch and bound over families of task sets: every set of >= 2 tasks contained in some group is a
    candidate file (not only the groups themselves: under a cap an intersection or any subset may win).
    A candidate S can add at most m(S) = sum_{U >= S} B(U) (|S| - 1) - cost to any family, so candidates
    with m(S) <= 0 are dropped. Bound at a node: the packing value with every remaining cap-feasible
    candidate opened for free, and the current value plus the remaining candidates' m(S).
    Returns (family, proven optimal, an upper bound on the net saving of any family)."""
    glist = list(groups.items())
    cset: dict[int, None] = {}
    for U, _ in glist:
        sub = U
        while sub:
            if _pc(sub) >= 2:
                cset.setdefault(sub, None)
            sub = (sub - 1) & U
    msave = {S: sum(B for U, B in glist if U & S == S) * (_pc(S) - 1) - cost for S in cset}
    cands = sorted((S for S in cset if msave[S] > 0 and (cap is None or all(cap[t] > 0 for t in _bits(S)))),
                   key=lambda S: (-msave[S], -_pc(S), S))
    m = len(cands)
    wt = [_pc(S) - 1 for S in cands]
    subbits = {U: sum(1 << j for j, S in enumerate(cands) if U & S == S) for U, _ in glist}
    memo: dict[tuple[int, int], int] = {}

    def pack(M: int, avail: int) -> int:
        if M & (M - 1) == 0 or not avail:
            return 0
        key = (M, avail)
        r = memo.get(key)
        if r is not None:
            return r
        low = M & -M
        best = pack(M ^ low, avail & subbits_of_mask(M ^ low))
        for j in _bits(avail):
            S = cands[j]
            if S & low and S & M == S:
                v = wt[j] + pack(M ^ S, avail & subbits_of_mask(M ^ S))
                if v > best:
                    best = v
        memo[key] = best
        return best

    sub_memo: dict[int, int] = {}

    def subbits_of_mask(M: int) -> int:
        r = sub_memo.get(M)
        if r is None:
            r = sub_memo[M] = sum(1 << j for j, S in enumerate(cands) if M & S == S)
        return r

    def value(fmask: int, nfiles: int) -> int:
        return sum(B * pack(U, fmask & subbits[U]) for U, B in glist) - cost * nfiles

    def fmask_of(fam: _Family) -> int | None:
        idx = {S: j for j, S in enumerate(cands)}
        r = 0
        for S in fam.files:
            if S not in idx:
                return None
            r |= 1 << idx[S]
        return r

    best_val = _net_saving(groups, incumbent, cost)
    best_mask: int | None = None  # None: the incumbent
    fm = fmask_of(incumbent)
    if fm is not None and value(fm, len(incumbent.files)) > best_val:  # the optimal packing of its files
        best_val, best_mask = value(fm, len(incumbent.files)), fm
    nodes = 0
    load = [0] * n
    root_bound: list[int] = []

    sup_of = [[(U, B) for U, B in glist if U & S == S] for S in cands]

    def dfs(i: int, fmask: int, nfiles: int, room: dict[int, int]) -> None:
        # room: per group, what it can still gain over its packing in fmask
        nonlocal nodes, best_val, best_mask
        nodes += 1
        if nodes > budget:
            raise _SearchBudget
        here = full - sum(B * room[U] for U, B in glist) - cost * nfiles
        base_room = room
        if here > best_val:
            best_val, best_mask = here, fmask
        # remaining cap-feasible candidates. Any family below this node gains at most, for any lam_U in {0, 1}:
        #   sum_{lam_U=0} B(U) room(U) + sum_S max(0, sum_{U >= S, lam_U=1} B(U) min(|S|-1, room(U)) - cost)
        # (group U's gain is at most room(U), and at most the sum over the opened S <= U of min(|S|-1, room(U))).
        # lam = 1 everywhere first, then 0 for the groups that bound counts more than their room, twice.
        feas = [j for j in range(i, m) if cap is None or all(load[t] < cap[t] for t in _bits(cands[j]))]
        fm = fmask
        for j in feas:
            fm |= 1 << j
        # what each group can still gain: at most its packing with every feasible candidate opened
        room = {U: r and pack(U, fm & subbits[U]) - (_pc(U) - 1 - r) for U, r in room.items()}
        lam0: set[int] = set()
        ub, rest = None, 0
        for _ in range(3):
            extra, pos = 0, 0
            over: dict[int, int] = {}
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
            bound = here + extra + sum(B * room[U] for U, B in glist if U in lam0)
            if ub is None or bound < ub:
                ub = bound
            if not lam0:
                rest = pos  # a candidate with no possible gain below this node: an optimum without it exists
            more = {U for U, B in glist if U not in lam0 and over.get(U, 0) > room[U]}
            if not more:
                break
            lam0 |= more
        assert ub is not None  # set by the first pass of the loop above
        if not root_bound:
            root_bound.append(ub)
        if ub <= best_val or not rest:
            return
        j = (rest & -rest).bit_length() - 1  # the next candidate that still fits the cap
        S = cands[j]
        for t in _bits(S):
            load[t] += 1
        inner = dict(base_room)
        f2 = fmask | 1 << j
        for U, _ in sup_of[j]:
            inner[U] = _pc(U) - 1 - pack(U, f2 & subbits[U])
        dfs(j + 1, f2, nfiles + 1, inner)
        for t in _bits(S):
            load[t] -= 1
        dfs(j + 1, fmask, nfiles, base_room)

    full = sum(B * (_pc(U) - 1) for U, B in glist)
    done = True
    try:
        dfs(0, 0, 0, {U: _pc(U) - 1 for U, _ in glist})
    except _SearchBudget:
        done = False
    bound = best_val if done else max(best_val, root_bound[0] if root_bound else best_val)
    if best_mask is None:
        return incumbent, done, bound
    fam = _Family()
    chosen = [cands[j] for j in _bits(best_mask)]
    for U, _ in glist:  # reconstruct each group's optimal packing
        M, avail, P = U, best_mask & subbits[U], []
        while M & (M - 1) and avail:
            target = pack(M, avail)
            if target == 0:
                break
            low = M & -M
            if pack(M ^ low, avail & subbits_of_mask(M ^ low)) == target:
                M ^= low
                avail &= subbits_of_mask(M)
                continue
            for j in _bits(avail):
                S = cands[j]
                if S & low and S & M == S and wt[j] + pack(M ^ S, avail & subbits_of_mask(M ^ S)) == target:
                    P.append(S)
                    M ^= S
                    avail &= subbits_of_mask(M)
                    break
        if P:
            fam.pack[U] = P
    for S in chosen:
        fam.files[S] = None
    _drop_unused(fam)
    return fam, done, bound


def _pair_cap_bound(groups: dict[int, int], n: int, cap: list[int]) -> tuple[float, list[list[float]]] | None:
    """An upper bound on the gross saving under a cap: attribute a file's saving (|S|-1) bytes(F) to its
    tasks, (1 - 1/|S|) bytes(F) each; a version v in a file S has U(v) >= S, so its share is at most
    w(v) = (1 - 1/|U(v)|) nbytes. Task t loads at most cap[t] files, each with a partner u != t that every
    version in it is shared with, so t's share is at most the sum of its cap[t] largest W(t, u) =
    sum of w over versions shared by t and u (and at most its total w). A group adds its w to the pairs
    inside it, or (when it holds most tasks) to all of its tasks' rows and back off the pairs leaving it:
    sum over groups of min(|U|^2, |U| (n - |U|)) steps, plus n^2. Returns (bound, W); None when that is
    over budget."""
    if sum(min(_pc(U) ** 2, _pc(U) * (n - _pc(U))) for U in groups) > PAIR_BOUND_BUDGET:
        return None
    W = [[0.0] * n for _ in range(n)]
    row_all = [0.0] * n  # added to every pair of the row
    tot = [0.0] * n
    full = (1 << n) - 1
    for U, B in groups.items():
        k = _pc(U)
        w = B * (k - 1) / k
        members = list(_bits(U))
        if k * k <= k * (n - k):
            for t in members:
                tot[t] += w
                row = W[t]
                for u in members:
                    row[u] += w
        else:
            outside = list(_bits(full & ~U))
            for t in members:
                tot[t] += w
                row_all[t] += w
                row = W[t]
                for u in outside:
                    row[u] -= w
    for t in range(n):
        row, extra = W[t], row_all[t]
        for u in range(n):
            row[u] += extra
    total = 0.0
    for t in range(n):
        c = cap[t]
        if c <= 0:
            continue
        vals = sorted((W[t][u] for u in range(n) if u != t), reverse=True)
        total += min(sum(vals[:c]), tot[t])
    return total, W


def _clusters(W: list[list[float]], n: int) -> list[int]:
    """Task sets for the capped greedy to consider besides the groups: the clusters of a single-linkage
    agglomeration on W(t, u) (bytes t and u could share), every merge one candidate. Under a cap the
    best files are often such clusters (a family of fine-tunes holding what all of them share), which
    are intersections of many groups and not among the groups themselves."""
    pairs = sorted(((W[t][u], t, u) for t in range(n) for u in range(t + 1, n) if W[t][u] > 0),
                   key=lambda p: (-p[0], p[1], p[2]))
    root = list(range(n))
    members = [1 << t for t in range(n)]

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x
    out = []
    for _, t, u in pairs:
        a, b = find(t), find(u)
        if a != b:
            root[b] = a
            members[a] |= members[b]
            out.append(members[a])
    return out


# --- cutting files into parts under max_shard_size ----------------------------------------------------------

def _longest(i: int, end: int, fits: Callable[[int], bool]) -> int:
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


def _padded_prefix(ts: Sequence[TensorId], alignment: int) -> list[int]:
    ps = [0]
    acc = 0
    for x in ts:
        acc += -(-x.nbytes // alignment) * alignment
        ps.append(acc)
    return ps


def _cut(ts: Sequence[TensorId], limit: int | None, alignment: int,
         header_bound: Callable[[Sequence[TensorId]], int]) -> list[tuple[TensorId, ...]]:
    """Cut `ts` (in order) into parts of header_bound(part) + padded tensor bytes <= limit; a tensor that
    does not fit alone gets a part of its own."""
    ts = tuple(ts)
    if limit is None or not ts:
        return [ts] if ts else []
    ps = _padded_prefix(ts, alignment)
    parts, i = [], 0
    while i < len(ts):
        def fits(j: int, i: int = i) -> bool:
            return j == i or header_bound(ts[i:j]) + ps[j] - ps[i] <= limit
        j = _longest(i, len(ts), fits)
        if j == i:
            j = i + 1
        parts.append(ts[i:j])
        i = j
    return parts


# --- positions -----------------------------------------------------------------------------------------------

def _assign(order: Sequence[int], masks: Sequence[int], nparts: Sequence[int], used0: Sequence[int],
            own_parts: Sequence[int], fixed_holes: set[int]
            ) -> tuple[list[int], list[list[int]], list[list[int]], tuple[int, int]]:
    """First fit: each group (in `order`) at the lowest start where its parts' consecutive positions are free
    for all its tasks; then each task's own parts fill its gaps, lowest first, else go after its last
    position. Returns (starts, own positions per task, hole positions per task, score)."""
    used = list(used0)
    starts = [0] * len(masks)
    for g in order:
        occ = 0
        for t in _bits(masks[g]):
            occ |= used[t]
        run = (1 << nparts[g]) - 1
        a = 1
        while (occ >> a) & run:
            a += 1
        starts[g] = a
        for t in _bits(masks[g]):
            used[t] |= run << a
    own_pos: list[list[int]] = []
    holes: list[list[int]] = []
    for t, u in enumerate(used):
        mine: list[int] = []
        p = 1
        top = u.bit_length() - 1
        while len(mine) < own_parts[t]:
            if not (u >> p) & 1:
                mine.append(p)
                u |= 1 << p
            p += 1
        own_pos.append(mine)
        top = max(top, u.bit_length() - 1)
        holes.append([q for q in range(1, top + 1) if not (u >> q) & 1])
    hole_positions = {q for h in holes for q in h}
    score = (len(hole_positions - fixed_holes), sum(len(h) for h in holes))
    return starts, own_pos, holes, score


def plan_layout(models: Mapping[str, Sequence[TensorId]], *, max_shared_files: int | None = None,
                file_cost: int = DEFAULT_FILE_COST, max_shard_size: int | None = None, alignment: int = 32,
                adaptor_header_bytes: Mapping[str, int] | None = None,
                header_bound: Callable[[Sequence[TensorId]], int] = default_header_bound,
                fixed_files: Sequence[FixedFile] = ()) -> Layout:
    """Place every tensor of every task (task -> its tensors in model order; task order matters only for
    ties). See the module docstring."""
    if max_shared_files is not None and max_shared_files < 0:
        raise ValueError(f"max_shared_files must be >= 0, not {max_shared_files}")
    if file_cost < 0:
        raise ValueError(f"file_cost must be >= 0, not {file_cost}")
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, not {alignment}")
    if max_shard_size is not None and max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be > 0, not {max_shard_size}")
    tasks = list(models)
    n = len(tasks)
    hdr_bytes = dict(adaptor_header_bytes or {})
    capped = max_shared_files is not None

    # 1. versions and their users (one dict lookup per tensor)
    index: dict[TensorId, int] = {}
    vers: list[TensorId] = []
    users: list[int] = []
    seqs: list[list[int]] = []
    input_bytes = 0
    for i, t in enumerate(tasks):
        bit = 1 << i
        seq = []
        for x in models[t]:
            v = index.get(x)
            if v is None:
                index[x] = v = len(vers)
                vers.append(x)
                users.append(bit)
            elif users[v] & bit:
                raise ValueError(f"task {t!r} holds tensor {x.name!r} twice")
            else:
                users[v] |= bit
            seq.append(v)
            input_bytes += x.nbytes
        names = {vers[v].name for v in seq}
        if len(names) != len(seq):
            seen: set[str] = set()
            for v in seq:  # the first name met a second time
                if vers[v].name in seen:
                    raise ValueError(f"task {t!r} has two tensors named {vers[v].name!r}")
                seen.add(vers[v].name)
        seqs.append(seq)
    everyone = (1 << n) - 1

    # 2. fixed files: which each task loads (the most bytes, distinct positions, disjoint tensors, the cap)
    fixed_holes: dict[int, FixedFile] = {}
    fixed_real: list[tuple[FixedFile, list[int], int, int, str]] = []  # file, vids, tasks mask, bytes, group key
    group_size: dict[str, int] = {}
    in_fixed: set[int] = set()
    for ff in fixed_files:
        if ff.position < 1:
            raise ValueError(f"fixed file {ff.name!r} has position {ff.position} (must be >= 1)")
        if not ff.tensors:
            fixed_holes.setdefault(ff.position, ff)
            continue
        key = ff.group if ff.group is not None else "\0" + ff.name
        group_size[key] = group_size.get(key, 0) + 1
        mask, vids = everyone, []
        for x in ff.tensors:
            v = index.get(x)
            if v is None:
                mask = 0
            else:
                in_fixed.add(v)
                vids.append(v)
                mask &= users[v]
        if mask and len(set(vids)) == len(vids):
            fixed_real.append((ff, vids, mask, sum(x.nbytes for x in ff.tensors), key))
    eff = list(users)
    chosen_fixed: list[list[int]] = [[] for _ in range(n)]  # per task: indexes into fixed_real
    fixed_load = [0] * n
    used0 = [0] * n  # per task: bitmask of positions its fixed files take
    for i in range(n):
        cand = [k for k, f in enumerate(fixed_real) if f[2] >> i & 1]
        if not cand or max_shared_files == 0:
            continue
        cand.sort(key=lambda k: (-fixed_real[k][3], k))
        pick = _choose_fixed(cand, fixed_real, max_shared_files)
        chosen_fixed[i] = pick
        keys = {fixed_real[k][4] for k in pick}
        fixed_load[i] = len(keys)
        for k in pick:
            used0[i] |= 1 << fixed_real[k][0].position
            for v in fixed_real[k][1]:
                eff[v] &= ~(1 << i)
    cap = [max_shared_files - fixed_load[i] for i in range(n)] if max_shared_files is not None else None

    # 3. groups: effective user sets of >= 2 tasks, in order of first appearance
    groups: dict[int, int] = {}
    for v, U in enumerate(eff):
        if U & (U - 1):
            groups[U] = groups.get(U, 0) + vers[v].nbytes
    groups = {U: B for U, B in groups.items() if B > 0}
    base = sum(vers[v].nbytes * _pc(U) for v, U in enumerate(eff))  # everything in adaptors
    dedup_saving = sum(B * (_pc(U) - 1) for U, B in groups.items())

    # 4. the family of files
    if capped and max_shared_files == 0 or not groups:
        fam, exact, ub = _Family(), True, 0
    else:
        exact, ub, extra = False, dedup_saving, []
        if cap is not None and n > EXACT_MAX_TASKS:
            pb = _pair_cap_bound(groups, n, cap)
            if pb is not None:
                ub = min(ub, int(pb[0] * (1 + 1e-12)) + 1)
                extra = _clusters(pb[1], n)
        fam = _greedy(groups, n, cap, file_cost, extra)
        if n <= EXACT_MAX_TASKS:
            fam, exact, ub_search = _exact(groups, n, cap, file_cost, fam, EXACT_NODE_BUDGET)
            ub = min(ub, ub_search)
    net = _net_saving(groups, fam, file_cost)
    if net >= ub:
        exact = True
    objective = base - net
    objective_bound = objective if exact else base - max(ub, net)

    # 5. contents: each file's versions, in the model order of its first task
    covered = {U: sum(P) for U, P in fam.pack.items()}  # the packing's sets are disjoint: sum == union
    file_list = sorted(fam.files, key=lambda S: (-_pc(S), S))
    content: dict[int, list[TensorId]] = {S: [] for S in file_list}
    own: list[list[TensorId]] = []
    for i in range(n):
        bit = 1 << i
        mine_list: list[TensorId] = []
        for v in seqs[i]:
            U = eff[v]
            if not U & bit:
                continue  # from a fixed file
            if U & (U - 1) and covered.get(U, 0) & bit:
                for S in fam.pack[U]:
                    if S & -S == bit:
                        content[S].append(vers[v])
            else:
                mine_list.append(vers[v])
        own.append(mine_list)

    # 6. shards: shared groups into parts; each adaptor's split 0 takes the longest prefix that fits
    gparts = [_cut(content[S], max_shard_size, alignment, header_bound) for S in file_list]
    split0: list[tuple[TensorId, ...]] = []
    own_parts: list[list[tuple[TensorId, ...]]] = []
    for i, t in enumerate(tasks):
        mine = tuple(own[i])
        if max_shard_size is None:
            split0.append(mine)
            own_parts.append([])
            continue
        ps = _padded_prefix(mine, alignment)

        def fits0(j: int, mine: tuple[TensorId, ...] = mine, ps: list[int] = ps, t: str = t) -> bool:
            h = hdr_bytes[t] if t in hdr_bytes else header_bound(mine[:j])
            return j == 0 or h + ps[j] <= max_shard_size
        j = _longest(0, len(mine), fits0)
        split0.append(mine[:j])
        own_parts.append(_cut(mine[j:], max_shard_size, alignment, header_bound))

    # 7. positions: first fit (every order of a few groups, keeping the fewest holes)
    masks = file_list
    nparts = [len(p) for p in gparts]
    n_own = [len(p) for p in own_parts]
    fixed_hole_pos = set(fixed_holes)
    by_size = sorted(range(len(masks)), key=lambda g: (-_pc(masks[g]), -sum(x.nbytes for x in content[masks[g]]), g))
    best = _assign(by_size, masks, nparts, used0, n_own, fixed_hole_pos)
    if 1 < len(masks) <= HOLE_SEARCH_MAX_GROUPS and best[3][0] > 0:
        for perm in itertools.permutations(by_size):
            r = _assign(perm, masks, nparts, used0, n_own, fixed_hole_pos)
            if r[3] < best[3]:
                best = r
    starts, own_pos, hole_pos, _ = best

    # 8. the files
    def names_of(mask: int) -> tuple[str, ...]:
        return tuple(tasks[t] for t in _bits(mask))

    entries: list[tuple[tuple[int, int, int, int], PlannedFile, int]] = []  # (sort key, file, loaders mask)
    logical: list[tuple[int, int, int, object]] = []  # (first position, first task, mask, what) -> group index
    for g, S in enumerate(masks):
        logical.append((starts[g], (S & -S).bit_length(), S, ("new", g)))
    fixed_loaders: dict[int, int] = {}
    for i in range(n):
        for k in chosen_fixed[i]:
            fixed_loaders[k] = fixed_loaders.get(k, 0) | 1 << i
    fixed_keys: dict[str, list[int]] = {}
    for k in sorted(fixed_loaders):
        fixed_keys.setdefault(fixed_real[k][4], []).append(k)
    for key, ks in fixed_keys.items():
        first = min(fixed_real[k][0].position for k in ks)
        m = 0
        for k in ks:
            m |= fixed_loaders[k]
        logical.append((first, (m & -m).bit_length(), m, ("fixed", key)))
    logical.sort(key=lambda e: (e[0], e[1], e[2], str(e[3])))
    gindex = {e[3]: gi for gi, e in enumerate(logical)}
    for g, S in enumerate(masks):
        gi = gindex[("new", g)]
        for p, part in enumerate(gparts[g]):
            f = PlannedFile(SHARED, starts[g] + p, part, names_of(S), gi, p, len(gparts[g]))
            entries.append(((f.position, 0, gi, p), f, S))
    for key, ks in fixed_keys.items():
        gi = gindex[("fixed", key)]
        siblings = sorted((f for f in fixed_files if f.tensors and
                           (f.group if f.group is not None else "\0" + f.name) == key),
                          key=lambda f: (f.position, f.name))
        for k in ks:
            ff = fixed_real[k][0]
            pi = next(p for p, f in enumerate(siblings) if f is ff)
            f = PlannedFile(SHARED, ff.position, tuple(ff.tensors), names_of(fixed_loaders[k]), gi, pi,
                            len(siblings), fixed=ff.name)
            entries.append(((f.position, 0, gi, pi), f, fixed_loaders[k]))
    for i in range(n):
        for p, part in enumerate(own_parts[i]):
            f = PlannedFile(OWN, own_pos[i][p], part, (tasks[i],), -1, p, len(own_parts[i]))
            entries.append(((f.position, 1, i, p), f, 1 << i))
    hole_users: dict[int, int] = {}
    for i in range(n):
        for q in hole_pos[i]:
            hole_users[q] = hole_users.get(q, 0) | 1 << i
    for q, m in hole_users.items():
        fh = fixed_holes.get(q)
        f = PlannedFile(HOLE, q, (), names_of(m), fixed=fh.name if fh is not None else None)
        entries.append(((q, 2, 0, 0), f, m))
    entries.sort(key=lambda e: e[0])
    files = tuple(e[1] for e in entries)
    per_task: list[list[int]] = [[] for _ in range(n)]
    for fi, (_, f, m) in enumerate(entries):
        for ti in _bits(m):
            per_task[ti].append(fi)
    task_files = {tasks[i]: tuple(sorted(per_task[i], key=lambda fi: files[fi].position)) for i in range(n)}

    # 9. reasons and stats
    name_tasks: dict[str, int] = {}
    # name -> its (type, shape) if one for all, else None
    name_kind: dict[str, tuple[int, tuple[int, ...]] | None] = {}
    for v, x in enumerate(vers):  # per version, not per tensor: a task holds a name once
        name_tasks[x.name] = name_tasks.get(x.name, 0) + _pc(users[v])
        kind = (x.ggml_type, x.shape)
        if x.name not in name_kind:
            name_kind[x.name] = kind
        elif name_kind[x.name] != kind:
            name_kind[x.name] = None
    reasons: dict[str, dict[str, str]] = {}
    small = 0
    for i in range(n):
        why: dict[str, str] = {}
        for x in own[i]:
            v = index[x]
            if _pc(users[v]) >= 2:
                U = eff[v]
                pays = groups.get(U, 0) * (_pc(U) - 1) > file_cost
                why[x.name] = CAPPED if capped and pays else TOO_SMALL
                small += x.nbytes
            elif n == 1 or name_tasks[x.name] < n:
                why[x.name] = ONLY_HERE
            elif name_kind[x.name] is None:
                why[x.name] = RETYPED
            else:
                why[x.name] = CHANGED
        reasons[tasks[i]] = why
    stored = sum(x.nbytes for mine in own for x in mine) + sum(x.nbytes for S in masks for x in content[S])
    dedup = sum(x.nbytes for v, x in enumerate(vers) if v not in in_fixed)
    nfiles = len(masks)
    lower = max(objective_bound - file_cost * nfiles, dedup)
    if exact:
        lower = stored
    stats = PlanStats(stored, input_bytes, dedup, exact, min(lower, stored), small,
                      objective=stored + file_cost * nfiles, objective_bound=objective_bound if not exact
                      else stored + file_cost * nfiles, groups=nfiles)
    return Layout(files, task_files, {tasks[i]: split0[i] for i in range(n)}, reasons, stats)


def _choose_fixed(cand: list[int], fixed_real: Sequence[tuple[FixedFile, list[int], int, int, str]],
                  cap: int | None) -> list[int]:
    """Among the fixed files a task may load (sorted by bytes, most first), the subset with distinct
    positions and disjoint tensors, within the cap (parts of one group count once), saving the most bytes:
    exhaustive up to FIXED_EXACT_MAX candidates, else greedy in that order."""
    def ok(k: int, pos: set[int], vids: set[int], keys: set[str]) -> bool:
        ff, vs, _, _, key = fixed_real[k]
        if ff.position in pos or not vids.isdisjoint(vs):
            return False
        return cap is None or key in keys or len(keys) < cap

    if len(cand) > FIXED_EXACT_MAX:
        pick: list[int] = []
        pos: set[int] = set()
        vids: set[int] = set()
        keys: set[str] = set()
        for k in cand:
            if ok(k, pos, vids, keys):
                pick.append(k)
                pos.add(fixed_real[k][0].position)
                vids.update(fixed_real[k][1])
                keys.add(fixed_real[k][4])
        return pick
    best: tuple[int, int] = (-1, 0)
    best_pick: list[int] = []
    cur: list[int] = []

    rest = [0] * (len(cand) + 1)
    for j in range(len(cand) - 1, -1, -1):
        rest[j] = rest[j + 1] + fixed_real[cand[j]][3]

    def go(j: int, saved: int, pos: set[int], vids: set[int], keys: set[str]) -> None:
        nonlocal best, best_pick
        score = (saved, -len(keys))
        if score > best:
            best, best_pick = score, list(cur)
        if j == len(cand) or saved + rest[j] < best[0]:
            return
        k = cand[j]
        if ok(k, pos, vids, keys):
            ff, vs, _, b, key = fixed_real[k]
            cur.append(k)
            go(j + 1, saved + b, pos | {ff.position}, vids | set(vs), keys | {key})
            cur.pop()
        go(j + 1, saved, pos, vids, keys)

    go(0, 0, set(), set(), set())
    return sorted(best_pick)
