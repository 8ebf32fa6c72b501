"""The one error type gguf-split lets escape.

Every problem with a user's input (a file, a spec, an output directory, a full disk) is reported as a
`GGUFSplitError` naming the file and the problem; the CLI prints it as one line and exits with code 2.
Anything else escaping is a bug in gguf-split.
"""

from __future__ import annotations

import os
from collections import deque


class GGUFSplitError(Exception):
    """A problem with a file or spec the user gave us: `str(err)` is "<path>: <problem>"."""

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


def os_problem(err: OSError) -> str:
    """A short text for an OSError, without the path (the caller names the file)."""
    return err.strerror or str(err)


STATE_ATTR = "gguf_split_state"


def add_state(exc: BaseException, state: str) -> BaseException:
    """Note on an interruption (or any exception that is not a GGUFSplitError) what stands after it, when a
    commit already happened: the command's last line then says so ("interrupted; the split in out is
    complete; ...") instead of claiming that no partial output was left. Notes accumulate in order."""
    notes = getattr(exc, STATE_ATTR, None)
    setattr(exc, STATE_ATTR, [*(notes or []), state])
    return exc


_COMMITTED: deque[str] = deque(maxlen=16)  # what this run committed, in words: see record_commit


def record_commit(state: str) -> None:
    """Remember that the run changed the user's state (`state`: "the change to out is complete"). An
    interruption can land after a commit and outside the block that notes it on the exception (while the
    report is printed, between two steps): the last line must still say what stands."""
    _COMMITTED.append(state)


def forget_commits() -> None:
    """A new command starts: nothing it did is committed yet."""
    _COMMITTED.clear()


def state_of(exc: BaseException) -> list[str]:
    """What stands after `exc`: the notes `add_state` put on it, then every commit of this run they do not
    already say (empty: nothing was committed)."""
    notes = getattr(exc, STATE_ATTR, None)
    out = list(notes) if isinstance(notes, list) else []
    return out + [s for s in dict.fromkeys(_COMMITTED) if s not in out]
