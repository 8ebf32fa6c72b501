"""Thread jobs: per-file work (hashing, checking, coding) on a pool, cancellable at once.

Why threads: the work is xxh3, sha256, zstd and numpy, which all release the GIL, and the files are
mapped, so threads share the page cache without copies. Why this module: Ctrl-C must act within a fraction
of a second whatever the input size, so workers check a `threading.Event` between pieces and the main
thread never blocks on them without a timeout; every command that runs jobs (scan, verify, the read-back
check, packs) gets that from one place. Two shapes: `run_jobs`, independent jobs that keep their own
results (hashing files, planning a pack's tensors), and `map_ordered`, a stream of pieces worked on the
pool and consumed in order (a pack's records as they are written, the pieces of a file being unpacked).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_THREADS = 8


class Cancelled(KeyboardInterrupt):
    """Raised inside a worker when the run is being cancelled (another job failed, or Ctrl-C)."""


def default_threads(threads: int | None = None) -> int:
    """`threads` if given, else every core (at most MAX_DEFAULT_THREADS: past that, disks are the limit)."""
    if threads is None:
        return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_THREADS))
    return max(1, int(threads))


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled()


def run_jobs(fn: Callable[..., None], jobs: Sequence[tuple[object, ...]], threads: int | None) -> None:
    """Run `fn(*job, cancel)` for every job on a thread pool; the first failure cancels the others and is
    raised once they have stopped (each within a piece: nothing runs on, or reads a file the caller closes,
    after the call has returned or raised). The main thread waits with a timeout, so a signal handler runs
    at once."""
    threads = default_threads(threads)
    cancel = threading.Event()
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            fn(*job, cancel)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gguf-split-job")
    try:  # the submissions too: a Ctrl-C may arrive while the first jobs already run
        futures: list[Future[None]] = [pool.submit(fn, *job, cancel) for job in jobs]
        for fut in futures:
            wait_for(fut)
    except BaseException:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def wait_for(fut: "Future[R]") -> R:
    """`fut.result()`, waking every 0.1 s so that a signal handler in the main thread runs promptly."""
    while True:
        try:
            return fut.result(timeout=0.1)
        except FutureTimeout:
            continue


def map_ordered(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in the order of `items`, `fn` run on `pool` with at most `window` items in flight
    (memory stays bounded however long the stream). Leaving early (an exception, a close) cancels what has
    not started and waits for what has, so nothing runs on after the caller has moved on."""
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                done, fut = pending.popleft()
                yield done, wait_for(fut)
        while pending:
            done, fut = pending.popleft()
            yield done, wait_for(fut)
    finally:
        for _, fut in pending:
            fut.cancel()
        for _, fut in pending:
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - the first failure is already on its way up
                pass
