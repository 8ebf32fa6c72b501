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

The objective: stored tensor bytes + `file_cost` x number of shared files holding tensors (holes are not
counted; fewer holes is a secondary goal). Exact (a search) for small instances, a greedy otherwise; the
plan reports which, with a lower bound (the dedup optimum: every distinct tensor version once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    exact: bool  # True when the objective is proven minimal (a search), False for the greedy
    lower_bound: int  # a lower bound on stored_bytes under the cap (== stored_bytes when exact)
    small_group_bytes: int  # bytes of versions shared by >= 2 tasks that stay in several adaptors


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


def plan_layout(models: Mapping[str, Sequence[TensorId]], *, max_shared_files: int | None = None,
                file_cost: int = DEFAULT_FILE_COST, max_shard_size: int | None = None, alignment: int = 32,
                adaptor_header_bytes: Mapping[str, int] | None = None,
                header_bound: Callable[[Sequence[TensorId]], int] = default_header_bound,
                fixed_files: Sequence[FixedFile] = ()) -> Layout:
    """Place every tensor of every task (task -> its tensors in model order; task order matters only for
    ties). See the module docstring."""
    raise NotImplementedError
