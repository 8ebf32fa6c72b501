"""Step 5, the cut: each new shared group into pieces (one file each) along the boundaries fine-tunes change,
so that a task added later that changes some of a group's tensors still loads the pieces holding the others.

A group's tensors fall into units (roles.py: a role within a block of layers, or a tensor); the units are
ordered (roles.unit_order: what fine-tunes change most often last) and a piece is always a run of
consecutive units, so merging two pieces means merging neighbours:
1. pays: the partition into runs with the most pieces such that every piece saves more than a file costs
   (bytes x (|tasks| - 1) > file_cost), among those the fewest pieces mixing roles, then the one whose
   largest piece is smallest (then a fixed tie rule): a dynamic program over the run ends. Tiny roles such
   as norms end up pooled with a neighbour; a group whose whole does not pay stays whole (the family chose
   it: its file pays);
2. the cap: each group's merges, cheapest first (two blocks of one role before two roles, then the fewest
   merged bytes), give nested partitions from its paying pieces down to one; from every group whole, the
   merges are undone most valuable first while every task of the group has room in its budget (a
   fine-tune that changes one role then still reuses the others).
The cut only adds files: bytes, groups and the objective are those of the uncut family. Deterministic:
the result depends on the names, sizes, task sets and parameters only."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from .bits import bits, pc
from .records import Cut, TensorId
from .roles import Unit, unit_of, unit_order


@dataclass(frozen=True, slots=True)
class Piece:
    label: str  # what it holds, e.g. "blk.ffn_up[16-23]" ("" for a whole group)
    tensors: tuple[TensorId, ...]  # in the group's write order


@dataclass(frozen=True, slots=True)
class _Run:
    units: tuple[Unit, ...]  # consecutive in the group's unit order
    nbytes: int
    role: str | None  # the role of all its units, None when it mixes roles


def _run(units: tuple[Unit, ...], nbytes: int) -> _Run:
    role = units[0][0]
    return _Run(units, nbytes, role if all(u[0] == role for u in units) else None)


def whole(content: Sequence[TensorId]) -> list[Piece]:
    return [Piece("", tuple(content))] if content else []


class GroupCut:
    """The units of one group and its current runs (pieces)."""

    __slots__ = ("content", "mask", "cut", "unit", "runs", "seq")

    def __init__(self, content: Sequence[TensorId], mask: int, cut: Cut) -> None:
        self.content, self.mask, self.cut = content, mask, cut
        self.unit = [unit_of(x, cut) for x in content] if cut.kind != "none" else [("", -1)] * len(content)
        size: dict[Unit, int] = {}
        for u, x in zip(self.unit, content):
            size[u] = size.get(u, 0) + x.nbytes
        self.runs = [_Run((u,), size[u], u[0]) for u in sorted(size, key=unit_order)]
        self.seq: list[tuple[int, int, int, int]] | None = None  # merge_sequence of these runs, once asked

    def copy(self) -> GroupCut:
        g = GroupCut.__new__(GroupCut)
        g.content, g.mask, g.cut, g.unit, g.runs = self.content, self.mask, self.cut, self.unit, list(self.runs)
        if self.seq is None:
            self.seq = self.merge_sequence()
        g.seq = self.seq
        return g

    def merge(self, i: int) -> None:
        """Merge run i with run i + 1."""
        a, b = self.runs[i], self.runs[i + 1]
        self.runs[i:i + 2] = [_run(a.units + b.units, a.nbytes + b.nbytes)]

    def cut_paying(self, cost: int) -> None:
        """Regroup the units into the partition described in the module docstring (step 1)."""
        units = [u for r in self.runs for u in r.units]
        sizes = [r.nbytes for r in self.runs] if all(len(r.units) == 1 for r in self.runs) else None
        assert sizes is not None, "cut_paying starts from one run per unit"
        ends = paying_partition(sizes, pc(self.mask) - 1, cost, [u[0] for u in units])
        runs, start = [], 0
        for end in ends:
            runs.append(_run(tuple(units[start:end]), sum(sizes[start:end])))
            start = end
        self.runs = runs
        self.seq = None

    def merge_sequence(self) -> list[tuple[int, int, int, int]]:
        """The merges that take the runs down to one, cheapest first: each (1 if it mixes roles else 0, merged
        bytes, left run, right run), runs by their index now; the cheapest is within one role, then the
        fewest merged bytes, then the leftmost. A heap over neighbour pairs with a linked list: O(r log r)."""
        if self.seq is not None:
            return self.seq
        runs = self.runs
        r = len(runs)
        nbytes = [x.nbytes for x in runs]
        role: list[str | None] = [x.role for x in runs]
        nxt, prv, alive = list(range(1, r + 1)), list(range(-1, r - 1)), [True] * r

        def key(i: int) -> tuple[int, int, int]:
            j = nxt[i]
            return (0 if role[i] == role[j] is not None else 1), nbytes[i] + nbytes[j], i

        heap = [key(i) for i in range(r - 1)]
        heapq.heapify(heap)
        out = []
        while heap:
            mixed, size, i = heapq.heappop(heap)
            j = nxt[i] if alive[i] else r
            if j >= r or (mixed, size, i) != key(i):
                continue  # stale: i merged away, or its right neighbour changed
            out.append((mixed, size, i, j))
            nbytes[i] += nbytes[j]
            role[i] = role[i] if role[i] == role[j] else None
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < r:
                prv[nxt[j]] = i
            for a in (prv[i], i):
                if a >= 0 and nxt[a] < r:
                    heapq.heappush(heap, key(a))
        return out

    def replay(self, merges: Sequence[tuple[int, int, int, int]]) -> None:
        """Apply merges from merge_sequence (each joins a run with its right neighbour)."""
        units = [list(x.units) for x in self.runs]
        nbytes = [x.nbytes for x in self.runs]
        alive = [True] * len(self.runs)
        for _, _, i, j in merges:
            units[i] += units[j]
            nbytes[i] += nbytes[j]
            alive[j] = False
        self.runs = [_run(tuple(units[i]), nbytes[i]) for i in range(len(self.runs)) if alive[i]]
        self.seq = None

    def pieces(self) -> list[Piece]:
        if len(self.runs) == 1:
            return whole(self.content)
        where = {u: k for k, r in enumerate(self.runs) for u in r.units}
        out: list[list[TensorId]] = [[] for _ in self.runs]
        for u, x in zip(self.unit, self.content):
            out[where[u]].append(x)
        return [Piece(label(r.units, self.cut), tuple(ts)) for r, ts in zip(self.runs, out)]


def cut_groups(contents: Sequence[Sequence[TensorId]], masks: Sequence[int], cut: Cut, cost: int) -> list[GroupCut]:
    """Every group cut as finely as `cut` allows while every piece pays for its file."""
    out = []
    for content, S in zip(contents, masks):
        g = GroupCut(content, S, cut)
        g.cut_paying(cost)
        out.append(g)
    return out


def paying_partition(sizes: Sequence[int], w: int, cost: int, roles: Sequence[str] | None = None) -> list[int]:
    """The ends of the runs of `sizes` (in order) with the most runs whose sum s pays (s * w > cost), then the
    fewest runs mixing roles (`roles`: one per size), then the smallest largest run (a tie: the last run
    starts as early as possible, recursively). One run (everything) when no partition pays."""
    n = len(sizes)
    if n <= 1:
        return [n] if n else []
    prefix = [0]
    for x in sizes:
        prefix.append(prefix[-1] + x)
    same = [0] * (n + 1)  # same[i]: the smallest j with roles[j:i] all one role
    for i in range(1, n + 1):
        same[i] = same[i - 1] if i > 1 and roles is not None and roles[i - 1] == roles[i - 2] else i - 1
    # best[i]: (runs, -mixed runs, -largest) of the best partition of sizes[:i] into paying runs, or None.
    # Any paying partition of sizes[:j] extends to sizes[:j + 1] (its last run grows), so the run count is
    # non-decreasing in j: the best last runs start in the range of starts j <= jmax(i) (the last start whose
    # run still pays) that reach the largest count; `first[c]` is the first j reaching count c.
    best: list[tuple[int, int, int] | None] = [(0, 0, 0)] + [None] * n
    back = [0] * (n + 1)
    first: dict[int, int] = {0: 0}
    jmax = -1
    for i in range(1, n + 1):
        while jmax + 1 < i and (prefix[i] - prefix[jmax + 1]) * w > cost:
            jmax += 1
        if jmax < 0:
            continue
        top = best[jmax]
        lo = 0 if top is None else first[top[0]]
        for j in range(lo, jmax + 1):
            b = best[j]
            if b is None or top is not None and b[0] != top[0]:
                continue
            s = prefix[i] - prefix[j]
            cand = (b[0] + 1, b[1] - (roles is not None and j < same[i]), min(b[2], -s))
            if best[i] is None or cand > best[i]:  # type: ignore[operator]
                best[i], back[i] = cand, j
        c = best[i]
        if c is not None:
            first.setdefault(c[0], i)
    if best[n] is None:
        return [n]
    ends, i = [], n
    while i:
        ends.append(i)
        i = back[i]
    return ends[::-1]


def fit_budget(groups: Sequence[GroupCut], target: Sequence[int]) -> None:
    """Merge pieces so that every task's pieces (summed over its groups) are within target where merging
    can do it. Each group's merges, cheapest first (GroupCut.merge_sequence), give nested partitions from
    its paying pieces down to one; starting from every group whole, the splits are undone most valuable
    first (a merge across roles, then the most merged bytes) while every task of the group has room."""
    seqs = [g.merge_sequence() for g in groups]
    count = [0] * len(target)
    for g in groups:
        for t in bits(g.mask):
            count[t] += 1
    pieces = [1] * len(groups)
    heap = [(-seq[-1][0], -seq[-1][1], k) for k, seq in enumerate(seqs) if seq]
    heapq.heapify(heap)
    while heap:
        _, _, k = heapq.heappop(heap)
        ts = list(bits(groups[k].mask))
        if any(count[t] >= target[t] for t in ts):
            continue  # counts only grow: this group stays as it is
        for t in ts:
            count[t] += 1
        pieces[k] += 1
        seq = seqs[k]
        if pieces[k] <= len(seq):
            m = seq[len(seq) - pieces[k]]
            heapq.heappush(heap, (-m[0], -m[1], k))
    for g, seq, p in zip(groups, seqs, pieces):
        g.replay(seq[:len(seq) + 1 - p])


def label(units: Sequence[Unit], cut: Cut) -> str:
    """"blk.ffn_up[16-23]", "token_embd", "attn_norm+ffn_norm+..." (at most three roles named)."""
    roles: dict[str, list[int]] = {}
    for role, block in units:
        roles.setdefault(role, []).append(block)
    names = []
    for role, blocks in roles.items():
        if cut.layers and blocks[0] >= 0:
            names.append(f"{role}[{min(blocks) * cut.layers}-{(max(blocks) + 1) * cut.layers - 1}]")
        else:
            names.append(role)
    return "+".join(names) if len(names) <= 3 else "+".join(names[:3]) + f"+{len(names) - 3} more"
