"""Step 1: every distinct tensor identity (a *version*) gets an int, and per version the bitmask of the
tasks that hold it: one dict lookup per tensor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .records import TensorId


@dataclass(frozen=True, slots=True)
class Versions:
    tasks: tuple[str, ...]  # input order: task i is bit i
    index: dict[TensorId, int]  # identity -> version number
    vers: list[TensorId]  # version number -> identity
    users: list[int]  # version number -> tasks holding it
    seqs: list[list[int]]  # per task: its versions in model order
    input_bytes: int  # sum of every task's tensor bytes

    @property
    def n(self) -> int:
        return len(self.tasks)


def index_versions(models: Mapping[str, Sequence[TensorId]]) -> Versions:
    """Number the versions in order of first appearance; refuse a task holding a tensor or a name twice."""
    tasks = tuple(models)
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
        _check_names(t, seq, vers)
        seqs.append(seq)
    return Versions(tasks, index, vers, users, seqs, input_bytes)


def _check_names(task: str, seq: list[int], vers: list[TensorId]) -> None:
    """Two versions of one name in one task would make llama.cpp's name lookup ambiguous."""
    names = {vers[v].name for v in seq}
    if len(names) == len(seq):
        return
    seen: set[str] = set()
    for v in seq:  # the first name met a second time
        if vers[v].name in seen:
            raise ValueError(f"task {task!r} has two tensors named {vers[v].name!r}")
        seen.add(vers[v].name)
