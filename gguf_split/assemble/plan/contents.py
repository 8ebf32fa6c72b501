"""Step 4, contents: each new shared file's versions, in the model order of its first task, and what each
task keeps as its own (its adaptor, and with `max_shard_size` its overflow parts)."""

from __future__ import annotations

from dataclasses import dataclass

from .bits import pc
from .family import Family
from .records import TensorId
from .versions import Versions


@dataclass(frozen=True, slots=True)
class Contents:
    masks: list[int]  # the family's task sets, most tasks first (ties by mask): group g is masks[g]
    content: dict[int, list[TensorId]]  # task set -> the tensors of its file, write order
    own: list[list[TensorId]]  # per task: the tensors no shared file serves it, model order


def fill_contents(vs: Versions, eff: tuple[int, ...], fam: Family) -> Contents:
    covered = {U: sum(P) for U, P in fam.pack.items()}  # the packing's sets are disjoint: sum == union
    masks = sorted(fam.files, key=lambda S: (-pc(S), S))
    content: dict[int, list[TensorId]] = {S: [] for S in masks}
    own: list[list[TensorId]] = []
    for i in range(vs.n):
        bit = 1 << i
        mine: list[TensorId] = []
        for v in vs.seqs[i]:
            U = eff[v]
            if not U & bit:
                continue  # from a fixed file
            if U & (U - 1) and covered.get(U, 0) & bit:
                for S in fam.pack[U]:
                    if S & -S == bit:  # the file's first task places the version
                        content[S].append(vs.vers[v])
            else:
                mine.append(vs.vers[v])
        own.append(mine)
    return Contents(masks, content, own)
