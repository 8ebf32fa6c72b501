"""Plan: a pure function from the models' tensor identities to where each tensor goes.

A tensor goes to the foundation when every task has a tensor of that name with the same ggml type, shape
and digest. Everything else goes to the adaptor of each task that has it, with the reason recorded, so the
split can say what it did: nothing is dropped silently (llama.cpp bug #9065 dropped an untied
`output.weight`; here such a tensor lands in the adaptors of the models that have it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import GGUFSplitError

# reasons a tensor is in an adaptor
CHANGED = "changed"  # same name, type and shape as elsewhere, other bytes
RETYPED = "type/shape differs"  # the name exists elsewhere with another ggml type or shape
ONLY_HERE = "not in every model"  # some task has no tensor of this name


@dataclass(frozen=True, slots=True)
class TensorId:
    """What makes two tensors the same: name + ggml type + shape + xxh3-128 of the bytes."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    digest: bytes
    nbytes: int


@dataclass(frozen=True, slots=True)
class ModelTensors:
    """The plan's whole view of one model: its architecture and its tensors in file order."""

    architecture: str | None
    tensors: tuple[TensorId, ...]


@dataclass
class SplitPlan:
    foundation: list[TensorId]  # in the first task's tensor order
    adaptors: dict[str, list[TensorId]]  # task -> its tensors not in the foundation, in its own order
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> tensor name -> reason

    @property
    def foundation_bytes(self) -> int:
        return sum(t.nbytes for t in self.foundation)

    def adaptor_bytes(self, task: str) -> int:
        return sum(t.nbytes for t in self.adaptors[task])


def plan_split(models: dict[str, ModelTensors], *, allow_unrelated: bool = False,
               paths: dict[str, str] | None = None) -> SplitPlan:
    """Place every tensor of every task. Refuses (GGUFSplitError) models that cannot share a foundation,
    different architectures or no tensor in common, unless `allow_unrelated`."""
    if not models:
        raise GGUFSplitError(None, "no tasks to split")
    paths = paths or {}
    tasks = list(models)
    archs = {t: m.architecture for t, m in models.items()}
    if not allow_unrelated and len(set(archs.values())) > 1:
        listing = ", ".join(f"{t}={a}" for t, a in archs.items())
        first = tasks[0]
        other = next(t for t in tasks if archs[t] != archs[first])
        raise GGUFSplitError(paths.get(other, other), f"general.architecture differs between tasks ({listing}); these "
                             "models cannot share a foundation (pass --allow-unrelated to split anyway)")

    by_task = {t: {x.name: x for x in m.tensors} for t, m in models.items()}
    first = models[tasks[0]]
    foundation = [x for x in first.tensors if all(by_task[t].get(x.name) == x for t in tasks[1:])]
    in_foundation = {x.name for x in foundation}
    if len(tasks) > 1 and not foundation and not allow_unrelated:
        raise GGUFSplitError(paths.get(tasks[1], tasks[1]), f"has no tensor in common with {paths.get(tasks[0], tasks[0])}: "
                             "nothing to share (pass --allow-unrelated to split anyway)")

    adaptors: dict[str, list[TensorId]] = {}
    reasons: dict[str, dict[str, str]] = {}
    for t in tasks:
        own = [x for x in models[t].tensors if x.name not in in_foundation]
        adaptors[t] = own
        why: dict[str, str] = {}
        for x in own:
            others = [by_task[o].get(x.name) for o in tasks if o != t]
            if any(o is None for o in others):
                why[x.name] = ONLY_HERE
            elif any((o.ggml_type, o.shape) != (x.ggml_type, x.shape) for o in others if o is not None):
                why[x.name] = RETYPED
            else:
                why[x.name] = CHANGED
        reasons[t] = why
    return SplitPlan(foundation, adaptors, reasons)


def missing_tensors(models: dict[str, ModelTensors]) -> dict[str, list[str]]:
    """task -> names of tensors other tasks have and this one lacks (for the split report)."""
    all_names: dict[str, None] = {}
    for m in models.values():
        for x in m.tensors:
            all_names.setdefault(x.name)
    return {t: [n for n in all_names if n not in {x.name for x in m.tensors}] for t, m in models.items()}
