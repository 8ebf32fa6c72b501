"""Discover: the files a survey scans under the paths it is given.

A file given by name is scanned whatever its name. A directory is searched recursively for `*.gguf` and
`*.ggufpack` (any case); hidden entries (a name starting with a dot: temporary files, partial downloads,
gguf-split's own temporaries) are passed over. Symbolic links are followed (a hub's cache links snapshot
names to blobs), each file and each directory counted once however many paths reach it; a link that
leads back into a directory being walked (a loop), a dangling link, a directory that cannot be listed
and an entry that cannot be examined are each one problem line, and the walk goes on.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import GGUFSplitError, os_problem
from ..format.names import show

SUFFIXES = (".gguf", ".ggufpack")


@dataclass(frozen=True)
class Problem:
    """A path the survey skipped, and why (one line)."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{show(self.path)}: {self.problem}"


@dataclass
class Found:
    files: list[str]  # in a stable order (the arguments' order, each directory's entries sorted)
    problems: list[Problem]


def check_roots(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The paths as given, each existing (a typo in an argument is an error, not a skipped entry)."""
    out = []
    for p in paths:
        path = os.fspath(p)
        try:
            os.stat(path)
        except FileNotFoundError:
            raise GGUFSplitError(show(path), "no such file or directory") from None
        except OSError as e:
            if not os.path.lexists(path):
                raise GGUFSplitError(show(path), f"cannot open: {os_problem(e)}") from None
        except ValueError:
            raise GGUFSplitError(show(path), "the path holds a NUL byte") from None
        out.append(path)
    return out


def discover(paths: Iterable[str | os.PathLike[str]]) -> Found:
    """Every file to scan under `paths`, and every entry skipped with its reason."""
    found = Found([], [])
    seen_files: set[tuple[int, int]] = set()
    seen_dirs: set[tuple[int, int]] = set()
    for root in paths:
        path = os.fspath(root)
        st = _stat(path, found)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk(path, (st.st_dev, st.st_ino), found, seen_files, seen_dirs)
        else:
            _add_file(path, st, found, seen_files, given=True)
    return found


def _stat(path: str, found: Found) -> os.stat_result | None:
    """The stat of what `path` leads to; a problem line (and None) when it cannot be followed."""
    try:
        return os.stat(path)
    except OSError as e:
        found.problems.append(Problem(path, _link_problem(e) if os.path.islink(path) else
                                      f"cannot examine: {os_problem(e)}"))
        return None


def _link_problem(e: OSError) -> str:
    return ("symbolic link loop" if e.errno == errno.ELOOP else "dangling symbolic link" if e.errno == errno.ENOENT
            else f"cannot follow the symbolic link: {os_problem(e)}")


def _entry_stat(entry: os.DirEntry[str], candidate: bool, found: Found) -> os.stat_result | None:
    """The stat of a directory entry worth a look (a candidate file, a directory, a link to either); a link
    that cannot be followed is a problem when it could be a model or is a loop (a dangling link of another
    name is not the survey's business)."""
    try:
        if not (candidate or entry.is_symlink() or entry.is_dir(follow_symlinks=False)):
            return None
        return entry.stat()  # follows links
    except OSError as e:
        if entry.is_symlink():
            if candidate or e.errno == errno.ELOOP:
                found.problems.append(Problem(entry.path, _link_problem(e)))
        else:
            found.problems.append(Problem(entry.path, f"cannot examine: {os_problem(e)}"))
        return None


def _add_file(path: str, st: os.stat_result, found: Found, seen: set[tuple[int, int]], *, given: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        if given:
            found.problems.append(Problem(path, "not a regular file"))
        return
    ident = (st.st_dev, st.st_ino)
    if ident not in seen:
        seen.add(ident)
        found.files.append(path)


def _walk(top: str, ident: tuple[int, int], found: Found, seen_files: set[tuple[int, int]],
          seen_dirs: set[tuple[int, int]]) -> None:
    """Depth first, entries sorted; `ancestors` tells a loop (a link back up) from a directory reached
    twice by different paths (walked once, silently)."""
    stack: list[tuple[str, tuple[int, int], frozenset[tuple[int, int]]]] = [(top, ident, frozenset())]
    while stack:
        directory, ident, ancestors = stack.pop()
        if ident in ancestors:
            found.problems.append(Problem(directory, "symbolic link loop (leads back into a directory above it): "
                                                     "not followed"))
            continue
        if ident in seen_dirs:
            continue
        seen_dirs.add(ident)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            found.problems.append(Problem(directory, f"cannot list the directory: {os_problem(e)}"))
            continue
        below = ancestors | {ident}
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            candidate = entry.name.lower().endswith(SUFFIXES)
            st = _entry_stat(entry, candidate, found)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((entry.path, (st.st_dev, st.st_ino), below))
            elif candidate:
                _add_file(entry.path, st, found, seen_files, given=False)
        stack.extend(reversed(subdirs))
