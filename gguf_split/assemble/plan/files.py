"""Step 6c, the files: new shared pieces and their parts, reused fixed files, OWN parts and holes as
PlannedFiles, ordered by position, and per task the files it loads. Logical groups (a piece of a new group,
or the parts of one fixed group) are numbered by their first position, then first task, then task set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .bits import bits
from .contents import Contents
from .fixed import FixedChoice, group_key
from .positions import Placement
from .records import HOLE, OWN, SHARED, FixedFile, PlannedFile
from .shards import Shards

_NamesOf = Callable[[int], tuple[str, ...]]  # task set -> its task names, in input order


@dataclass(frozen=True, slots=True)
class _Entry:
    order: tuple[int, int, int, int]  # (position, kind rank, group or task, part): the files' order
    file: PlannedFile
    loaders: int  # the tasks that load it


@dataclass(frozen=True, slots=True)
class _Logical:
    first: int  # its first position
    first_task: int  # bit length of its lowest task
    mask: int  # the tasks that load it
    what: tuple[str, int | str, int]  # ("new", group index, piece index) or ("fixed", group key, 0)

    def order(self) -> tuple[int, int, int, str]:
        return self.first, self.first_task, self.mask, str(self.what)


def build_files(tasks: Sequence[str], ct: Contents, sh: Shards, pl: Placement, fx: FixedChoice,
                fixed_files: Sequence[FixedFile]) -> tuple[tuple[PlannedFile, ...], dict[str, tuple[int, ...]]]:
    """(the files, task -> indexes of the files it loads, by position)."""
    def names_of(mask: int) -> tuple[str, ...]:
        return tuple(tasks[t] for t in bits(mask))

    loaders = _fixed_loaders(fx, len(tasks))
    fixed_keys: dict[str, list[int]] = {}
    for k in sorted(loaders):
        fixed_keys.setdefault(fx.candidates[k].key, []).append(k)
    gindex = _group_index(ct, sh, pl, fx, loaders, fixed_keys)
    entries: list[_Entry] = []
    for g, S in enumerate(ct.masks):
        start = pl.starts[g]
        for k, piece in enumerate(sh.pieces[g]):
            gi, parts = gindex[("new", g, k)], sh.parts[g][k]
            for p, part in enumerate(parts):
                f = PlannedFile(SHARED, start + p, part, names_of(S), gi, p, len(parts), piece=piece.label)
                entries.append(_Entry((f.position, 0, gi, p), f, S))
            start += len(parts)
    entries += _fixed_entries(fx, fixed_files, loaders, fixed_keys, gindex, names_of)
    for i in range(len(tasks)):
        for p, part in enumerate(sh.own_parts[i]):
            f = PlannedFile(OWN, pl.own_pos[i][p], part, (tasks[i],), -1, p, len(sh.own_parts[i]))
            entries.append(_Entry((f.position, 1, i, p), f, 1 << i))
    entries += _hole_entries(pl, fx, names_of)
    entries.sort(key=lambda e: e.order)
    files = tuple(e.file for e in entries)
    per_task: list[list[int]] = [[] for _ in tasks]
    for fi, e in enumerate(entries):
        for ti in bits(e.loaders):
            per_task[ti].append(fi)
    task_files = {tasks[i]: tuple(sorted(per_task[i], key=lambda fi: files[fi].position)) for i in range(len(tasks))}
    return files, task_files


def _fixed_loaders(fx: FixedChoice, n: int) -> dict[int, int]:
    """fixed candidate -> the tasks that load it."""
    loaders: dict[int, int] = {}
    for i in range(n):
        for k in fx.chosen[i]:
            loaders[k] = loaders.get(k, 0) | 1 << i
    return loaders


def _group_index(ct: Contents, sh: Shards, pl: Placement, fx: FixedChoice, loaders: dict[int, int],
                 fixed_keys: dict[str, list[int]]) -> dict[tuple[str, int | str, int], int]:
    logical = []
    for g, S in enumerate(ct.masks):
        start = pl.starts[g]
        for k, parts in enumerate(sh.parts[g]):
            logical.append(_Logical(start, (S & -S).bit_length(), S, ("new", g, k)))
            start += len(parts)
    for key, ks in fixed_keys.items():
        m = 0
        for k in ks:
            m |= loaders[k]
        first = min(fx.candidates[k].file.position for k in ks)
        logical.append(_Logical(first, (m & -m).bit_length(), m, ("fixed", key, 0)))
    logical.sort(key=_Logical.order)
    return {e.what: gi for gi, e in enumerate(logical)}


def _fixed_entries(fx: FixedChoice, fixed_files: Sequence[FixedFile], loaders: dict[int, int],
                   fixed_keys: dict[str, list[int]], gindex: dict[tuple[str, int | str, int], int],
                   names_of: _NamesOf) -> list[_Entry]:
    """The reused fixed files; a part's index and count are among all parts of its group in the directory."""
    out = []
    for key, ks in fixed_keys.items():
        gi = gindex[("fixed", key, 0)]
        siblings = sorted((f for f in fixed_files if f.tensors and group_key(f) == key),
                          key=lambda f: (f.position, f.name))
        for k in ks:
            ff = fx.candidates[k].file
            pi = next(p for p, f in enumerate(siblings) if f is ff)
            f = PlannedFile(SHARED, ff.position, tuple(ff.tensors), names_of(loaders[k]), gi, pi, len(siblings),
                            fixed=ff.name)
            out.append(_Entry((f.position, 0, gi, pi), f, loaders[k]))
    return out


def _hole_entries(pl: Placement, fx: FixedChoice, names_of: _NamesOf) -> list[_Entry]:
    """One hole file per position any task needs a hole at (the fixed one there, if any)."""
    hole_users: dict[int, int] = {}
    for i, hs in enumerate(pl.holes):
        for q in hs:
            hole_users[q] = hole_users.get(q, 0) | 1 << i
    out = []
    for q, m in hole_users.items():
        fh = fx.holes.get(q)
        f = PlannedFile(HOLE, q, (), names_of(m), fixed=fh.name if fh is not None else None)
        out.append(_Entry((q, 2, 0, 0), f, m))
    return out
