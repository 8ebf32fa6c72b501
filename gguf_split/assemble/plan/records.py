"""The planner's public records: what goes in (tensor identities, fixed files) and what comes out (the
planned files, the layout, its statistics), the reasons a tensor stays in its adaptor, and the tuning
knobs of the search."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# reasons a tensor of a task is in its adaptor rather than a shared file (for the split report)
CHANGED = "changed"  # same name, type and shape as in another task, other bytes
RETYPED = "type/shape differs"  # the name exists in another task with another ggml type or shape
ONLY_HERE = "not in every model"  # some task has no tensor of this name
TOO_SMALL = "too small for a file"  # shared with other tasks, but its group saves less than a file costs
CAPPED = "over the file cap"  # shared with other tasks, but the cap on shared files left it out

DEFAULT_FILE_COST = 1 << 20
MIN_SHARD_SIZE = 1 << 20  # smallest max_shard_size: a part's header alone may take default_header_bound()
DEFAULT_MAX_SHARED_FILES = 32  # the tool's default cap on the files a task loads besides its adaptor

CUT_SCHEME = 1  # how tensor names map to (role, layer): see roles.py; recorded with every cut

SHARED, HOLE, OWN = "shared", "hole", "own"


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
    piece: str = ""  # which cut of its group it holds (e.g. "blk.ffn_up[16-23]"), "" when its group is whole

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
    groups: int = 0  # new shared groups holding tensors (a sharded group counts once; so does a cut one)
    pieces: int = 0  # new shared files the cut made of those groups (== groups when nothing was cut)
    holes: int = 0  # hole files loaded, summed over the tasks
    max_task_files: int = 0  # the most files one task loads besides its adaptor (holes and parts included)


CUT_KINDS = ("none", "role", "tensor")


@dataclass(frozen=True, slots=True)
class Cut:
    """Where shared groups are cut into files, so that a later fine-tune that changes some of a group's
    tensors can still reuse the files holding the others (`gguf-split add`):
    - "none": one file per group (gguf-split 0.2's layout);
    - "role": by tensor role (token_embd, blk.attn_q, blk.ffn_up, ...) and, with `layers` > 0, by blocks of
      that many layers (layer // layers);
    - "tensor": one file per tensor (the most a cut can reuse; for benchmarks).
    A cut is kept only where every piece saves more than a file costs, and within the cap. `scheme` names
    the name -> (role, layer) mapping (roles.py), recorded so that an `add` cuts as the split did."""

    kind: str = "none"
    layers: int = 0
    scheme: int = CUT_SCHEME

    def __post_init__(self) -> None:
        if self.kind not in CUT_KINDS:
            raise ValueError(f"cut must be one of none, role, role:N, tensor, not {self.kind!r}")
        if self.layers < 0 or self.layers and self.kind != "role":
            raise ValueError(f"layers per block ({self.layers}) apply to the role cut only, and must be >= 1")

    def __str__(self) -> str:
        return f"role:{self.layers}" if self.kind == "role" and self.layers else self.kind

    @classmethod
    def parse(cls, text: str, scheme: int = CUT_SCHEME) -> Cut:
        """"none", "role", "role:N" (blocks of N layers) or "tensor"."""
        kind, sep, n = text.strip().partition(":")
        if kind == "role" and sep:
            if not (n.isascii() and n.isdigit()) or int(n) < 1:
                raise ValueError(f"cut {text!r}: the layers per block must be a whole number >= 1")
            return cls(kind, int(n), scheme)
        if sep or kind not in CUT_KINDS:
            raise ValueError(f"cut must be none, role, role:N (blocks of N layers) or tensor, not {text!r}")
        return cls(kind, 0, scheme)


NO_CUT = Cut()
DEFAULT_CUT = Cut("role", 6)  # the tool's default: roles, blocks of 6 layers (bench/bench_grow.py, README)


@dataclass
class Layout:
    files: tuple[PlannedFile, ...]
    task_files: dict[str, tuple[int, ...]]  # task -> indexes into `files` for positions 1..k, in order
    adaptor_tensors: dict[str, tuple[TensorId, ...]]  # task -> tensors of its split-0 file, model order
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> adaptor tensor -> reason
    stats: PlanStats | None = None
    cut: Cut = NO_CUT  # the cut the plan used (to record in the split: `add` cuts the same way)


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


@dataclass(frozen=True, slots=True)
class Tuning:
    """The knobs above, read once per plan (`plan_layout` builds it from the package's constants, so a test
    that patches `plan.EXACT_MAX_TASKS` changes the next plan)."""

    exact_max_tasks: int = EXACT_MAX_TASKS
    exact_node_budget: int = EXACT_NODE_BUDGET
    fixed_exact_max: int = FIXED_EXACT_MAX
    greedy_subset_tests: int = GREEDY_SUBSET_TESTS
    greedy_pair_top: int = GREEDY_PAIR_TOP
    pair_bound_budget: int = PAIR_BOUND_BUDGET
    hole_search_max_groups: int = HOLE_SEARCH_MAX_GROUPS
