"""Under a cap with many tasks: an upper bound on what any family can save (`pair_cap_bound`) and, from the
same pair matrix, candidate task sets for the greedy (`clusters`)."""

from __future__ import annotations

from .bits import bits, pc


def pair_cap_bound(groups: dict[int, int], n: int, cap: list[int], budget: int
                   ) -> tuple[float, list[list[float]]] | None:
    """An upper bound on the gross saving under a cap: attribute a file's saving (|S|-1) bytes(F) to its
    tasks, (1 - 1/|S|) bytes(F) each; a version v in a file S has U(v) >= S, so its share is at most
    w(v) = (1 - 1/|U(v)|) nbytes. Task t loads at most cap[t] files, each with a partner u != t that every
    version in it is shared with, so t's share is at most the sum of its cap[t] largest W(t, u) =
    sum of w over versions shared by t and u (and at most its total w). A group adds its w to the pairs
    inside it, or (when it holds most tasks) to all of its tasks' rows and back off the pairs leaving it:
    sum over groups of min(|U|^2, |U| (n - |U|)) steps, plus n^2. Returns (bound, W); None when that is
    over `budget`."""
    if sum(min(pc(U) ** 2, pc(U) * (n - pc(U))) for U in groups) > budget:
        return None
    W, tot = _pair_matrix(groups, n)
    total = 0.0
    for t in range(n):
        c = cap[t]
        if c <= 0:
            continue
        vals = sorted((W[t][u] for u in range(n) if u != t), reverse=True)
        total += min(sum(vals[:c]), tot[t])
    return total, W


def _pair_matrix(groups: dict[int, int], n: int) -> tuple[list[list[float]], list[float]]:
    """(W, per task its total w): see pair_cap_bound."""
    W = [[0.0] * n for _ in range(n)]
    row_all = [0.0] * n  # added to every pair of the row
    tot = [0.0] * n
    full = (1 << n) - 1
    for U, B in groups.items():
        k = pc(U)
        w = B * (k - 1) / k
        members = list(bits(U))
        if k * k <= k * (n - k):
            for t in members:
                tot[t] += w
                row = W[t]
                for u in members:
                    row[u] += w
        else:
            outside = list(bits(full & ~U))
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
    return W, tot


def clusters(W: list[list[float]], n: int) -> list[int]:
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
