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

How (in brief), one module per step; each step is a pure function of the previous steps' records (small
frozen dataclasses):
1. versions.py: every tensor identity gets an int; per version a bitmask of its users (one dict lookup per tensor).
2. fixed.py, fixed files (`gguf-split add`): each task loads the fixed files, among those whose every tensor it holds,
   that save it the most bytes (distinct positions, disjoint tensors, the cap; parts of one `group` count
   once), exhaustively up to FIXED_EXACT_MAX candidates, else greedily. What they cover leaves the task's
   effective user sets.
3. family.py: versions are grouped by effective user set U (>= 2 tasks) with byte totals B(U). Choosing files is then
   a problem over groups only (see family.py): a family F of task sets, per group a packing of pairwise
   disjoint sets of F inside U; maximise sum_U B(U) pack(U, F) - file_cost |F| with each task in <= cap sets.
   choose.py runs, up to EXACT_MAX_TASKS (5) tasks, exact.py: branch and bound over every task set of >= 2 tasks inside some group
     (intersections and arbitrary subsets included), seeded by the greedy, with an exact per-group packing.
     Proven minimal for <= 4 tasks always (<= 11 candidate sets) and for 5 tasks unless the search passes
     EXACT_NODE_BUDGET nodes (then exact=False with the bound of its root);
   larger, greedy.py: a lazy greedy. Uncapped, every group whose own file pays gets one; then candidates (the
     largest groups, intersections of the largest, and under a cap the clusters of a single-linkage
     agglomeration of tasks by the bytes they could share, bounds.py) are opened while one gains more than a file
     costs (under a cap: the most bytes per task slot first); opening S re-packs the groups it can serve.
4. contents.py (model order of the file's first task), shards.py (`max_shard_size`: longest fitting runs;
   an adaptor's split 0 takes the longest fitting prefix of its own tensors, the rest become OWN parts),
   positions.py (first fit by task-set size, every order tried for up to 6 groups to need the fewest
   holes; OWN parts fill their task's holes first), files.py (the PlannedFiles; holes reuse fixed hole
   files), reasons.py (reasons and stats).
All passes are linear in the number of tensors plus sorting, except the greedy's candidate x group subset
tests (bounded by GREEDY_SUBSET_TESTS) and the cap bound (bounded by PAIR_BOUND_BUDGET).

Bounds (PlanStats): `objective_bound` <= the objective of every valid plan (given the fixed-file choice):
the exact search's optimum or its root bound; otherwise the dedup optimum and, under a cap, a per-task
bound (`pair_cap_bound`); the plan is reported exact whenever its objective meets the bound.
`lower_bound` = max(dedup optimum, objective_bound - file_cost x this plan's groups): no valid plan with at
most as many new shared groups stores fewer bytes; == stored_bytes when exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .choose import choose_family
from .contents import fill_contents
from .family import group_versions
from .files import build_files
from .fixed import choose_fixed_files
from .positions import place
from .reasons import explain, plan_stats
from .records import (CAPPED, CHANGED, DEFAULT_FILE_COST, EXACT_MAX_TASKS, EXACT_NODE_BUDGET, FIXED_EXACT_MAX,
                      GREEDY_PAIR_TOP, GREEDY_SUBSET_TESTS, HOLE, HOLE_SEARCH_MAX_GROUPS, ONLY_HERE, OWN,
                      PAIR_BOUND_BUDGET, RETYPED, SHARED, TOO_SMALL, FixedFile, Layout, PlanStats, PlannedFile,
                      TensorId, Tuning, default_header_bound)
from .shards import cut_shards
from .versions import index_versions

__all__ = [
    "CAPPED", "CHANGED", "DEFAULT_FILE_COST", "EXACT_MAX_TASKS", "EXACT_NODE_BUDGET", "FIXED_EXACT_MAX",
    "GREEDY_PAIR_TOP", "GREEDY_SUBSET_TESTS", "HOLE", "HOLE_SEARCH_MAX_GROUPS", "ONLY_HERE", "OWN",
    "PAIR_BOUND_BUDGET", "RETYPED", "SHARED", "TOO_SMALL", "FixedFile", "Layout", "PlanStats", "PlannedFile",
    "TensorId", "Tuning", "default_header_bound", "plan_layout",
]


def _tuning() -> Tuning:
    """The tuning constants as this module holds them now (tests patch them here)."""
    return Tuning(EXACT_MAX_TASKS, EXACT_NODE_BUDGET, FIXED_EXACT_MAX, GREEDY_SUBSET_TESTS, GREEDY_PAIR_TOP,
                  PAIR_BOUND_BUDGET, HOLE_SEARCH_MAX_GROUPS)


def _check_options(max_shared_files: int | None, file_cost: int, alignment: int, max_shard_size: int | None) -> None:
    if max_shared_files is not None and max_shared_files < 0:
        raise ValueError(f"max_shared_files must be >= 0, not {max_shared_files}")
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
                fixed_files: Sequence[FixedFile] = ()) -> Layout:
    """Place every tensor of every task (task -> its tensors in model order; task order matters only for
    ties). See the module docstring."""
    _check_options(max_shared_files, file_cost, alignment, max_shard_size)
    tuning = _tuning()
    vs = index_versions(models)
    fx = choose_fixed_files(vs, fixed_files, max_shared_files, tuning)
    cap = [max_shared_files - load for load in fx.load] if max_shared_files is not None else None
    gs = group_versions(vs.vers, fx.eff)
    fc = choose_family(gs, vs.n, cap, max_shared_files, file_cost, tuning)
    ct = fill_contents(vs, fx.eff, fc.fam)
    sh = cut_shards(ct, vs.tasks, max_shard_size, alignment, dict(adaptor_header_bytes or {}), header_bound)
    pl = place(ct, sh, fx.used_positions, set(fx.holes), tuning.hole_search_max_groups)
    files, task_files = build_files(vs.tasks, ct, sh, pl, fx, fixed_files)
    reasons, small = explain(vs, ct, fx, gs, max_shared_files is not None, file_cost)
    stats = plan_stats(vs, ct, fx, fc, small, file_cost)
    return Layout(files, task_files, {t: sh.split0[i] for i, t in enumerate(vs.tasks)}, reasons, stats)
