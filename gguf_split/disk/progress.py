"""Progress bars with bytes/s on stderr (rich, through typer), or nothing at all with `--quiet` or when
stderr is not a terminal (logs and pipes get the result lines only, and an error stays one line)."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Protocol


class Reporter(Protocol):
    def advance(self, n: int) -> None: ...


class _NoBar:
    def advance(self, n: int) -> None:
        pass


NO_BAR: Reporter = _NoBar()  # a bar that shows nothing (quiet runs, inner checks)


class Progress:
    """`with progress.bar("hashing", total_bytes) as bar: bar.advance(n)`; thread-safe."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet or not sys.stderr.isatty()  # no bars
        self.notes = not quiet  # one-line notices on stderr (e.g. waiting for another run's lock)

    def note(self, message: str) -> None:
        if self.notes:
            sys.stderr.write(f"gguf-split: {message}\n")
            sys.stderr.flush()

    @contextmanager
    def bar(self, description: str, total: int) -> Iterator[Reporter]:
        if self.quiet:
            yield NO_BAR
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        columns = (TextColumn("{task.description:<10}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with RichProgress(*columns, console=Console(stderr=True), transient=False) as rp:
            task = rp.add_task(description, total=max(total, 1))
            lock = threading.Lock()

            class _Bar:
                def advance(self, n: int) -> None:
                    with lock:
                        rp.advance(task, n)

            yield _Bar()
            rp.update(task, completed=max(total, 1))


QUIET = Progress(quiet=True)
