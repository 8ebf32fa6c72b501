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
whose task set they cover, respects a cap on shared groups per task (`max_shared_files`), cuts groups into
pieces along the boundaries fine-tunes change (`cut`: tensor role and blocks of layers) so that a task
added later reuses all that it did not change, keeps every task within `max_files` files holes included,
cuts files larger than `max_shard_size` into parts at consecutive positions, and assigns positions so that
few holes are needed. It never looks at file contents: same inputs, same plan (deterministic).

The objective: stored tensor bytes + `file_cost` x number of new shared groups holding tensors (a sharded
or cut group counts once; holes and fixed files are not counted; fewer holes is a secondary goal). The cut
is outside the objective: it changes no byte, only adds files (each piece pays for its own, see cut.py);
its parameters are recorded in the Layout (`Layout.cut`) so that `add` cuts new groups the same way.

The caps: `max_shared_files` bounds the groups (and fixed files) a task loads, the quantity the family
search and its bounds are about (a sharded or cut group counts once); `max_files` bounds every file a task
loads besides its adaptor: pieces, fixed files and holes (the parts of one piece cut by max_shard_size
count once; OWN parts, which max_shard_size forces, not at all). The cut stays within max_files; when the
holes of the uncut plan alone take a task over it, the plan is made again with fewer groups for that task
(then exact=False, the first bound kept). gguf-split passes the same N as both (default 32).

How (in brief), one module per step; each step is a pure function of the previous steps' records (small
frozen dataclasses):
1. versions.py: every tensor identity gets an int; per version a bitmask of its users (one dict lookup
   per tensor).
2. fixed.py, fixed files (`gguf-split add`): each task loads the fixed files, among those whose every
   tensor it holds, that save it the most bytes (distinct positions, disjoint tensors, the cap; parts of
   one `group` count once), exhaustively up to FIXED_EXACT_MAX candidates, else greedily. What they cover
   leaves the task's effective user sets.
3. family.py: versions are grouped by effective user set U (>= 2 tasks) with byte totals B(U). Choosing
   files is then a problem over groups only (see family.py): a family F of task sets, per group a packing
   of pairwise disjoint sets of F inside U; maximise sum_U B(U) pack(U, F) - file_cost |F| with each task
   in <= cap sets. choose.py takes the uncapped family when it fits the cap, else runs, up to
   EXACT_MAX_TASKS (5) tasks, exact.py: branch and bound over every task set of >= 2 tasks inside some
   group (intersections and arbitrary subsets included), seeded by the greedy, with an exact per-group
   packing. Proven minimal for <= 4 tasks always (<= 11 candidate sets) and for 5 tasks unless the search
   passes EXACT_NODE_BUDGET nodes (then exact=False with the bound of its root); larger, greedy.py: a lazy
   greedy. Uncapped, every group whose own file pays gets one; then candidates (the largest groups,
   intersections of the largest, and under a cap the clusters of a single-linkage agglomeration of tasks
   by the bytes they could share, bounds.py) are opened while one gains more than a file costs (under a
   cap: the most bytes per task slot first); opening S re-packs the groups it can serve.
4. contents.py: each file's versions (model order of the file's first task) and each task's own.
5. cut.py (roles.py: names -> role and layer): each group into pieces, the finest partition of its units
   in which every piece pays, then merged where a task's budget (max_files) requires.
6. shards.py (`max_shard_size`: longest fitting runs; an adaptor's split 0 takes the longest fitting
   prefix of its own tensors, the rest become OWN parts); positions.py (a group's pieces take consecutive
   positions; first fit by task-set size, every order tried for up to 6 groups to need the fewest holes,
   fewest tasks over max_files first; OWN parts fill their task's holes first); files.py (the
   PlannedFiles; holes reuse fixed hole files); reasons.py (reasons and stats: groups, pieces, holes).
All passes are linear in the number of tensors plus sorting, except the greedy's candidate x group subset
tests (bounded by GREEDY_SUBSET_TESTS), the cap bound (bounded by PAIR_BOUND_BUDGET) and the cut's
dynamic program (units x the units of one paying piece, per group).

Bounds (PlanStats): `objective_bound` <= the objective of every valid plan (given the fixed-file choice):
the exact search's optimum or its root bound; otherwise the dedup optimum and, under a cap, a per-task
bound (`pair_cap_bound`); the plan is reported exact whenever its objective meets the bound.
`lower_bound` = max(dedup optimum, objective_bound - file_cost x this plan's groups): no valid plan with at
most as many new shared groups stores fewer bytes; == stored_bytes when exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .attempt import Options, attempt, count_files, relieve
from .choose import FamilyChoice
from .reasons import explain, plan_stats
from .records import (CAPPED, CHANGED, CUT_SCHEME, DEFAULT_CUT, DEFAULT_FILE_COST, DEFAULT_MAX_SHARED_FILES,
                      EXACT_MAX_TASKS, EXACT_NODE_BUDGET, FIXED_EXACT_MAX, GREEDY_PAIR_TOP, GREEDY_SUBSET_TESTS, HOLE,
                      HOLE_SEARCH_MAX_GROUPS, MIN_SHARD_SIZE, NO_CUT, ONLY_HERE, OWN, PAIR_BOUND_BUDGET, RETYPED,
                      SHARED, TOO_SMALL, Cut, FixedFile, Layout, PlanStats, PlannedFile, TensorId, Tuning,
                      default_header_bound)
from .versions import index_versions

__all__ = [
    "CAPPED", "CHANGED", "CUT_SCHEME", "DEFAULT_CUT", "DEFAULT_FILE_COST", "DEFAULT_MAX_SHARED_FILES",
    "EXACT_MAX_TASKS", "EXACT_NODE_BUDGET", "FIXED_EXACT_MAX", "GREEDY_PAIR_TOP", "GREEDY_SUBSET_TESTS", "HOLE",
    "HOLE_SEARCH_MAX_GROUPS", "MIN_SHARD_SIZE", "NO_CUT", "ONLY_HERE", "OWN", "PAIR_BOUND_BUDGET", "RETYPED",
    "SHARED", "TOO_SMALL", "Cut", "FixedFile", "Layout", "PlanStats", "PlannedFile", "TensorId", "Tuning",
    "default_header_bound", "plan_layout",
]


def _tuning() -> Tuning:
    """The tuning constants as this module holds them now (tests patch them here)."""
    return Tuning(EXACT_MAX_TASKS, EXACT_NODE_BUDGET, FIXED_EXACT_MAX, GREEDY_SUBSET_TESTS, GREEDY_PAIR_TOP,
                  PAIR_BOUND_BUDGET, HOLE_SEARCH_MAX_GROUPS)


def _check_options(max_shared_files: int | None, max_files: int | None, file_cost: int, alignment: int,
                   max_shard_size: int | None) -> None:
    if max_shared_files is not None and max_shared_files < 0:
        raise ValueError(f"max_shared_files must be >= 0, not {max_shared_files}")
    if max_files is not None and max_files < 0:
        raise ValueError(f"max_files must be >= 0, not {max_files}")
    if file_cost < 0:
        raise ValueError(f"file_cost must be >= 0, not {file_cost}")
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, not {alignment}")
    if max_shard_size is not None and max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be > 0, not {max_shard_size}")


def plan_layout(models: Mapping[str, Sequence[TensorId]], *, max_shared_files: int | None = None,
                file_cost: int = DEFAULT_FILE_COST, max_shard_size: int | None = None, alignment: int = 32,
                adaptor_header_bytes: Mapping[str, int] | None = None,
                header_bound: Callable[[Sequence[TensorId]], int] = default_header_bound,
                fixed_files: Sequence[FixedFile] = (), cut: Cut = NO_CUT, max_files: int | None = None) -> Layout:
    """Place every tensor of every task (task -> its tensors in model order; task order matters only for
    ties). See the module docstring."""
    _check_options(max_shared_files, max_files, file_cost, alignment, max_shard_size)
    o = Options(max_shared_files, max_files, file_cost, max_shard_size, alignment, dict(adaptor_header_bytes or {}),
                 header_bound, fixed_files, cut, _tuning())
    vs = index_versions(models)
    caps = None if max_files is None else [max_files] * vs.n  # per task: shared groups it may load
    memo: dict[tuple[tuple[int, int], ...], FamilyChoice] = {}
    first = a = attempt(vs, o, caps, memo)
    step = 1
    while caps is not None and any(a.over):  # holes took a task over max_files: fewer groups for it
        b = relieve(vs, o, a)  # first without a new family search: the task leaves its topmost group
        if b is None:
            caps = [max(0, c - e * step) for c, e in zip(caps, a.over)]
            b = attempt(vs, o, caps, memo)
            step *= 2  # a retry moves holes to other tasks; ever larger steps bound the retries
        a = b
    fc = a.fc
    if a is not first:  # solved under tighter caps than asked: the first attempt's bound still holds
        fc = FamilyChoice(fc.fam, False, min(fc.objective_bound, first.fc.objective_bound))
    reasons, small = explain(vs, a.ct, a.fx, a.gs, max_shared_files is not None or max_files is not None,
                             file_cost)
    stats = plan_stats(vs, a.ct, a.fx, fc, small, file_cost)
    count_files(stats, a)
    return Layout(a.files, a.task_files, {t: a.sh.split0[i] for i, t in enumerate(vs.tasks)}, reasons, stats,
                  cut)


