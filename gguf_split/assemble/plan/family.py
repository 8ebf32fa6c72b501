"""Step 3, groups, and the model that step 4 optimises: the family of shared files, i.e. which task sets
get a file and which versions go where.

After the fixed files are chosen, every version v has an effective user set U(v) (the tasks that still
need it). All versions with the same U are placed alike, so the problem is over *groups* U with their
byte totals B(U). A plan chooses a family F of task sets (one file each) and per group a packing: files
of F with pairwise disjoint task sets, each a subset of U; a version of U is then stored once per file
of its packing plus once per task of U that no file covers:
    stored = sum_U B(U) * (|U| - sum_{S in pack(U)} (|S| - 1)),   objective = stored + file_cost * |F|
subject to: each task in at most cap files of F. (Positions, holes and shards never change the
objective: any family can be laid out, with holes.)  We maximise the net saving
    sum_U B(U) * pack(U, F) - file_cost * |F|,   pack(U, F) = max sum (|S| - 1) over disjoint S in F, S <= U."""

from __future__ import annotations

from dataclasses import dataclass

from .bits import pc
from .records import TensorId


class Family:
    __slots__ = ("files", "pack")

    def __init__(self) -> None:
        self.files: dict[int, None] = {}  # task-set masks, in the order they were opened
        self.pack: dict[int, list[int]] = {}  # group mask -> file masks of its packing


def net_saving(groups: dict[int, int], fam: Family, cost: int) -> int:
    used = {S for P in fam.pack.values() for S in P}
    return sum(B * sum(pc(S) - 1 for S in fam.pack.get(U, ())) for U, B in groups.items()) - cost * len(used)


def drop_unused(fam: Family) -> None:
    used = {S for P in fam.pack.values() for S in P}
    fam.files = {S: None for S in fam.files if S in used}


@dataclass(frozen=True, slots=True)
class Groups:
    groups: dict[int, int]  # effective user set of >= 2 tasks -> its bytes, in order of first appearance
    base: int  # stored bytes with everything in adaptors
    dedup_saving: int  # what storing every version once would save over `base`


def group_versions(vers: list[TensorId], eff: tuple[int, ...]) -> Groups:
    groups: dict[int, int] = {}
    for v, U in enumerate(eff):
        if U & (U - 1):
            groups[U] = groups.get(U, 0) + vers[v].nbytes
    groups = {U: B for U, B in groups.items() if B > 0}
    base = sum(vers[v].nbytes * pc(U) for v, U in enumerate(eff))
    return Groups(groups, base, sum(B * (pc(U) - 1) for U, B in groups.items()))
