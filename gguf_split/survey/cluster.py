"""Cluster: the per-file scans of a survey on a Dask distributed cluster (the `distributed` extra).

Why: past one machine (a hub, a company share with thousands of models) the work that grows is reading
and hashing every file; planning from the manifests is tiny. Each file is one independent task that
returns its manifest (kilobytes), so an existing engine runs it: Dask distributed (pure Python, one pip
install, `dask scheduler` and `dask worker ADDRESS` to start, retries and worker loss handled by its
scheduler). The plan, the report and any writing stay on the client.

Paths: workers open the paths the client gives (shared storage mounted at the same path everywhere, or the
same files at the same paths on every worker). `remote_scan(path)` runs on a worker: `scan_file`, returning
(gguf-split version, worker address, host name, the manifest or the problem's text); a file the worker
cannot read is one problem line naming the file and the worker. A task that raises is retried
(`retries=RETRIES`); a worker that dies (killed, out of memory) is replaced by its nanny and the scheduler
runs its tasks elsewhere, up to distributed's `allowed-failures`, after which that file is one problem line.

Keys: device and inode numbers differ between hosts on network storage, and clocks differ. The client
stats each file (after reading its own clock) before submitting it and again when the result comes; the
manifest is cached under the client's key and clock only when the client's two stats agree and the
worker saw the same size and mtime, else it serves this run only.

distributed's loggers are set to ERROR while the survey runs (their lines about connections, retries and
lost workers are not the user's business); a wrong address is one line.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import GGUFSplitError
from ..disk.progress import Reporter
from .discover import Problem
from ..disk.manifest import FileKey, FileManifest
from .manifest import scan_file

RETRIES = 2
CONNECT_TIMEOUT_S = 15
INSTALL_HINT = "pip install 'gguf-split[distributed]'"

Result = tuple[str, str, str, "FileManifest | str"]


def import_distributed() -> Any:
    """The `distributed` module, or one line saying how to install it."""
    try:
        return importlib.import_module("distributed")
    except ImportError:
        raise GGUFSplitError(None, f"--scheduler needs Dask distributed, which is not installed: {INSTALL_HINT}") from None


def remote_scan(path: str) -> Result:
    """What a worker runs for one file."""
    from .. import __version__

    worker = "?"
    try:
        worker = str(importlib.import_module("distributed").get_worker().address)
    except (ImportError, ValueError):
        pass
    host = socket.gethostname()
    try:
        return __version__, worker, host, scan_file(path)
    except GGUFSplitError as e:
        return __version__, worker, host, e.problem


@contextmanager
def quiet_logs() -> Iterator[None]:
    """distributed's loggers at ERROR for the duration (their levels put back after)."""
    names = ["distributed", *(n for n in logging.root.manager.loggerDict if n.startswith("distributed."))]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def scan_on_cluster(address: str, todo: Sequence[tuple[str, os.stat_result]], known: Any,
                    results: dict[str, FileManifest | Problem], bar: Reporter,
                    fn: Callable[[str], Result] = remote_scan) -> None:
    """Scan `todo` (path, stat) on the cluster at `address`; each result (a manifest, or a Problem) into
    `results`, manifests through `known.store` (cached) or `known.remember` (this run only)."""
    from .. import __version__

    distributed = import_distributed()
    with quiet_logs():
        try:
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise GGUFSplitError(None, f"--scheduler {address}: cannot connect to a Dask scheduler there ({e})") from None
        with client:
            run = uuid.uuid4().hex[:12]
            futures: dict[Any, tuple[str, int, os.stat_result]] = {}
            for i, (path, _st) in enumerate(todo):
                seen_ns = time.time_ns()  # before the stat: the cache's racy-clean rule, on the client's clock
                try:
                    before = os.stat(path)
                except OSError as e:
                    results[path] = Problem(path, f"cannot examine: {e.strerror or e}")
                    continue
                futures[client.submit(fn, path, key=f"gguf-split-scan-{run}-{i}", retries=RETRIES, pure=False)] = \
                    (path, seen_ns, before)
            for fut in distributed.as_completed(list(futures), loop=client.loop):
                path, seen_ns, before = futures[fut]
                results[path] = _take(fut, path, seen_ns, before, known, distributed, __version__)
                bar.advance(before.st_size)


def _take(fut: Any, path: str, seen_ns: int, before: os.stat_result, known: Any, distributed: Any,
          version: str) -> FileManifest | Problem:
    """One finished task: the manifest (cached under the client's key when that is sound), or a Problem."""
    try:
        got_version, worker, host, result = fut.result()
    except distributed.KilledWorker:
        return Problem(path, "its scan killed the workers that ran it, several times (out of memory?): skipped")
    except ImportError as e:
        raise GGUFSplitError(None, f"a worker cannot run gguf-split ({e}): install gguf-split {version} on every "
                                   "worker") from None
    except Exception as e:  # noqa: BLE001 - a task's own failure, re-raised here by distributed
        return Problem(path, f"scanning it on the cluster failed after {RETRIES} retries: {type(e).__name__}: {e}")
    if got_version != version:
        raise GGUFSplitError(None, f"worker {worker} ({host}) runs gguf-split {got_version}, this client "
                                   f"{version}: install the same version on every worker")
    if not isinstance(result, FileManifest):
        return Problem(path, f"{result} (on worker {worker}, host {host})")
    try:
        after = os.stat(path)
    except OSError:
        after = None
    mine = FileKey.of(before)
    if after is not None and FileKey.of(after) == mine and (result.key.size, result.key.mtime_ns) == \
            (mine.size, mine.mtime_ns):
        m = result.with_path(path, mine, seen_ns)
        known.store(m)
    else:
        m = result.with_path(path, FileKey.of(after) if after is not None else mine)
        known.remember(m)
    return m
