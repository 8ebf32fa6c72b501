"""Commit: all-or-nothing changes to one directory, safe against a kill or a power loss at any moment.

Why: a user's directory must always hold either the complete old state or the complete new one (the
split they shipped, or the one they asked for), never a mix and never nothing. The protocol:

1. Lock. An flock on the directory serialises gguf-split runs on it (taken before any input is read).
   Then recover: roll forward a journal left by a killed run; remove temporary files no journal names,
   and temporary directories (their names say they are gguf-split's: names.is_temp_dir).
2. Write. Every new file goes to a hidden temporary name in the directory and is fsynced; a new symlink
   (llama.cpp's link names) is made under a temporary name the same way. Nothing visible changes, and
   every new entry is complete and durable (the directory is fsynced too) before anything points at it.
   Intermediate files (a split unpacked to restore its models) go to a hidden temporary directory the
   transaction owns (`Transaction.temp_dir`), removed when it ends, committed or not.
3. Switch. The journal (the renames and deletions to do) is written to a temporary, fsynced and renamed
   to `.gguf-split-journal`, then the directory is fsynced: from this instant the new state *is* the state.
4. Apply. Each temporary is renamed to its final name; fsync the directory; the files the journal lists
   are deleted (old files, only now that the switch is durable); fsync; the journal goes; fsync.

Readers (verify, info, restore, the loader) honour a journal (`pending_view`): they see the state it
leads to. A kill before step 3 leaves the old state plus temporaries the next run removes; after it, the
new state, which the next run in this directory completes. Ctrl-C, SIGTERM and SIGHUP wait while the
switch is applied and while an abandoned transaction is cleaned up (both are a few renames and unlinks,
`signals_deferred`), so a run stopped by a signal has always finished one or the other. Files shared between tasks are named after
their content (naming.py), so a new file never takes an old file's name with other bytes.

An interruption (Ctrl-C, SIGTERM) after the switch does not undo it: the exception leaves with a note
(`errors.add_state`) saying that the new state stands, so the command's last line says so instead of
"no partial output".

A test hook makes the process kill itself at step k (`GGUF_SPLIT_TEST_KILL_AT=k`; with
`GGUF_SPLIT_TEST_SIGNAL=SIGINT` it interrupts itself instead, as a Ctrl-C would) and can log the steps
(`GGUF_SPLIT_TEST_STEPS=file`), so a test can kill or interrupt a run at every step.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, BinaryIO

import xxhash

from ..errors import GGUFSplitError, add_state, os_problem, record_commit
from ..format.names import JOURNAL, TMP_SUFFIX, check_bare_name, is_temp, is_temp_dir, show, temp_dir_name, temp_name

JOURNAL_VERSION = 1
SPACE_MARGIN = 16 << 20  # keep this much free beyond what a run needs

_steps = 0


def checkpoint(label: str) -> None:
    """A point where a test may kill the process (SIGKILL: no cleanup, like a power cut or the OOM killer)
    or send it another signal (GGUF_SPLIT_TEST_SIGNAL, e.g. SIGINT: the handlers run as for a Ctrl-C)."""
    global _steps
    _steps += 1
    log = os.environ.get("GGUF_SPLIT_TEST_STEPS")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_steps} {label}\n")
    if os.environ.get("GGUF_SPLIT_TEST_KILL_AT") == str(_steps):
        os.kill(os.getpid(), getattr(signal, os.environ.get("GGUF_SPLIT_TEST_SIGNAL", "SIGKILL")))


_DEFERRED_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then act as they would have: for short
    steps that must not stop half way (applying a commit's switch, cleaning up an abandoned one). Only
    signals with a Python handler are deferred, and only in the main thread (where handlers run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []
    saved: dict[int, Callable[[int, FrameType | None], Any]] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append((signum, frame))

    for sig in _DEFERRED_SIGNALS:
        handler = signal.getsignal(sig)
        if callable(handler):
            saved[sig] = handler
            signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if caught:
            signum, frame = caught[0]
            saved[signum](signum, frame)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not supported here (Windows): renames are as durable as the platform makes them
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def check_space(directory: str, needed: int, what: str = "the outputs") -> None:
    """Refuse up front, in one line, when `directory`'s file system cannot hold `needed` more bytes."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if needed + SPACE_MARGIN > free:
        raise GGUFSplitError(directory, f"not enough free space: {what} need {_mb(needed)} plus a margin of "
                                        f"{_mb(SPACE_MARGIN)} kept free, {_mb(free)} free")


def holds_bytes(path: str, size: int, xxh3: str) -> bool:
    """`path` is a regular file (or a link to one) of `size` bytes whose xxh3-128 is `xxh3`: an output
    that is already in place, which a run can keep instead of refusing it or writing it again."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == xxh3


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 10**10 else f"{n / 1e9:,.2f} GB"


# ---------------------------------------------------------------------------------------------------------
# The journal


@dataclass
class Journal:
    renames: list[tuple[str, str]] = field(default_factory=list)  # (temporary name, final name)
    deletes: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return json.dumps({"gguf_split_journal": JOURNAL_VERSION, "renames": self.renames,
                           "deletes": self.deletes}, indent=1).encode()

    @classmethod
    def read(cls, directory: str) -> "Journal | None":
        path = os.path.join(directory, JOURNAL)
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 24)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise GGUFSplitError(path, f"cannot read the commit journal: {os_problem(e)}") from None
        try:
            data = json.loads(raw)
            if data.get("gguf_split_journal") != JOURNAL_VERSION:
                raise ValueError(f"journal version {data.get('gguf_split_journal')!r}")
            renames = [(check_bare_name(a, path), check_bare_name(b, path)) for a, b in data["renames"]]
            deletes = [check_bare_name(d, path) for d in data["deletes"]]
        except GGUFSplitError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise GGUFSplitError(path, f"commit journal is damaged ({e}); remove it only if you know the last "
                                       "gguf-split run here finished") from None
        if any(not is_temp(a) for a, _ in renames):
            raise GGUFSplitError(path, "commit journal renames a file that is not a gguf-split temporary: damaged")
        return cls(renames, deletes)


def pending_view(directory: str) -> dict[str, str | None]:
    """What a journal left by an unfinished commit changes, as final name -> the name that holds its
    bytes now (the temporary, or the final name once renamed), or None for a file it deletes. Empty when
    no commit is pending. Readers apply it so they see the state the commit leads to."""
    j = Journal.read(directory)
    if j is None:
        return {}
    view: dict[str, str | None] = {name: None for name in j.deletes}
    for tmp, final in j.renames:
        view[final] = tmp if os.path.lexists(os.path.join(directory, tmp)) else final
    return view


def roll_forward(directory: str, journal: Journal) -> None:
    """Step 4: idempotent, so a kill in the middle is completed by the next run."""
    for tmp, final in journal.renames:
        src = os.path.join(directory, tmp)
        if os.path.lexists(src):
            checkpoint(f"rename {final}")
            os.replace(src, os.path.join(directory, final))
    fsync_dir(directory)
    checkpoint("renames durable")
    for name in journal.deletes:
        try:
            checkpoint(f"delete {name}")
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    fsync_dir(directory)
    checkpoint("deletes durable")
    try:
        os.unlink(os.path.join(directory, JOURNAL))
    except FileNotFoundError:
        pass
    fsync_dir(directory)


# ---------------------------------------------------------------------------------------------------------
# Locking


def _lock_holder(directory: str) -> str | None:
    """Who holds the flock on `directory` (Linux: from /proc/locks), for the waiting message."""
    try:
        st = os.stat(directory)
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:1234567 0 EOF"; waiters are marked "->"
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == ident:
                    pid = parts[4]
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as c:
                            cmd = c.read(300).replace(b"\0", b" ").decode("utf-8", "replace").strip()
                    except OSError:
                        cmd = ""
                    return f"pid {pid}" + (f": {cmd}" if cmd else "")
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextmanager
def locked(directory: str, on_wait: Callable[[str], None] | None = None) -> Iterator[int]:
    """Hold the directory's flock (POSIX); on Windows there is no lock (single-user use)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield -1
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise GGUFSplitError(directory, f"cannot open directory: {os_problem(e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                who = _lock_holder(directory)
                on_wait(f"waiting for another gguf-split run to finish with {show(directory)}"
                        + (f" ({who})" if who else ""))
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Transactions


class NewFile:
    """A file being written under a temporary name; `final` is the name it gets at commit. With
    `link_target`, a symlink to that target instead of a file (nothing to write or fsync)."""

    def __init__(self, directory: str, final: str, link_target: str | None = None) -> None:
        self.final = final
        self.link_target = link_target
        self.tmp = temp_name(final)
        self.path = os.path.join(directory, self.tmp)
        self.final_path = os.path.join(directory, final)
        self.fd = -1
        self.synced: Future[None] | None = None
        self.closed = False

    def open(self) -> "NewFile":
        """Create the file (registered with its owner first, so an interruption cannot leak it)."""
        if self.link_target is not None:
            try:
                os.symlink(self.link_target, self.path)
            except OSError as e:
                raise GGUFSplitError(self.final_path, f"cannot create link: {os_problem(e)}") from None
            self.closed = True
            return self
        try:
            # read and write: a writer may read back what it wrote (unpack reads a ladder's source back)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as e:
            raise GGUFSplitError(self.final_path, f"cannot create: {os_problem(e)}") from None
        return self

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.fd >= 0:
                os.close(self.fd)

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Transaction:
    """All-or-nothing changes to one directory (see the module docstring):

        with Transaction(dir) as tx:
            f = tx.new("adaptor-chat.gguf"); tx.write(f, lambda fd: ...)
            tx.delete("shared-old.gguf")
            tx.commit()

    Leaving the block without commit() removes every temporary and leaves the directory as it was (it is
    removed again if the transaction created it and it is empty). An exception leaving the block after the
    switch carries a note saying that the new state stands (`what`: how to name it, e.g. "the split")."""

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True,
                 on_wait: Callable[[str], None] | None = None, what: str | None = None) -> None:
        self.dir = os.path.abspath(os.fspath(directory))
        self.create = create
        self.on_wait = on_wait
        self.what = what
        self.applied = False  # the committed renames and deletions are all done
        self.created_dir = False
        self.files: list[NewFile] = []
        self.temp_dirs: list[str] = []
        self.deletes: list[str] = []
        self.committed = False
        self._lock: contextmanager | None = None  # type: ignore[valid-type]
        self._syncer: ThreadPoolExecutor | None = None

    def __enter__(self) -> "Transaction":
        try:
            if os.path.lexists(self.dir) and not os.path.isdir(self.dir):
                raise GGUFSplitError(self.dir, "exists and is not a directory")
            if not os.path.isdir(self.dir):
                if not self.create:
                    raise GGUFSplitError(self.dir, "no such directory")
                try:
                    os.makedirs(self.dir)
                    self.created_dir = True
                except FileExistsError:
                    if not os.path.isdir(self.dir):
                        raise GGUFSplitError(self.dir, "exists and is not a directory") from None
                except OSError as e:
                    raise GGUFSplitError(self.dir, f"cannot create directory: {os_problem(e)}") from None
            self._lock = locked(self.dir, self.on_wait)
            self._lock.__enter__()
            self.recover()
            if not os.access(self.dir, os.W_OK):
                raise GGUFSplitError(self.dir, "directory is not writable")
        except BaseException:
            self._cleanup()
            raise
        return self

    def recover(self) -> None:
        """Finish a commit a killed run switched to; remove temporaries of runs that died before: files
        with a temporary name, and directories with a temporary directory's name (nothing else)."""
        journal = Journal.read(self.dir)
        if journal is not None:
            try:
                roll_forward(self.dir, journal)
            except OSError as e:
                raise GGUFSplitError(self.dir, f"cannot finish the interrupted commit: {os_problem(e)}") from None
        try:
            names = os.listdir(self.dir)
        except OSError as e:
            raise GGUFSplitError(self.dir, f"cannot list directory: {os_problem(e)}") from None
        for name in names:  # we hold the lock: a temporary belongs to a run that died
            if is_temp_dir(name):
                _remove_temp_dir(os.path.join(self.dir, name))
            elif is_temp(name):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError:
                    pass

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def temp_dir(self, purpose: str) -> str:
        """A new hidden directory in the transaction's directory for intermediate files (not part of the
        commit): removed with everything in it when the transaction ends, committed or not, and by the
        next run's recover if this one is killed."""
        path = self.path(temp_dir_name(purpose))
        self.temp_dirs.append(path)  # registered first: an interruption cannot leak it
        try:
            os.mkdir(path, 0o700)
        except OSError as e:
            raise GGUFSplitError(self.dir, f"cannot create a temporary directory: {os_problem(e)}") from None
        return path

    def new(self, final: str) -> NewFile:
        f = NewFile(self.dir, final)
        self.files.append(f)
        return f.open()

    def link(self, final: str, target: str) -> NewFile:
        """A symlink `final` -> `target` that appears at commit (replacing what has that name then)."""
        f = NewFile(self.dir, final, target)
        self.files.append(f)
        return f.open()

    def write(self, f: NewFile, fn: Callable[[int], None]) -> None:
        """Run `fn(f.fd)` (OS errors, a full disk, become one line naming the final file), then fsync it in
        the background while the caller writes the next file (fsync releases the GIL)."""
        try:
            fn(f.fd)
        except OSError as e:
            raise GGUFSplitError(f.final_path, f"write failed: {os_problem(e)}") from None
        checkpoint(f"wrote {f.final}")
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="gguf-split-fsync")
        f.synced = self._syncer.submit(os.fsync, f.fd)

    def wait_synced(self) -> None:
        """Every new file is durable (fsync returned) and closed; raises the first fsync error."""
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        for f in self.files:
            try:
                if f.synced is not None:
                    f.synced.result()
                elif f.link_target is None:
                    os.fsync(f.fd)
            except OSError as e:
                raise GGUFSplitError(f.final_path, f"write failed: {os_problem(e)}") from None
            finally:
                f.close()
        checkpoint("all files durable")

    def delete(self, name: str) -> None:
        self.deletes.append(name)

    def commit(self) -> None:
        self.wait_synced()
        journal = Journal([(f.tmp, f.final) for f in self.files],
                          [d for d in self.deletes if d not in {f.final for f in self.files}])
        if not journal.renames and not journal.deletes:
            self.committed = True
            return
        try:
            fsync_dir(self.dir)  # the temporaries' names (and new symlinks) are durable before the journal names them
        except OSError as e:
            raise GGUFSplitError(self.dir, f"cannot commit: {os_problem(e)}") from None
        jfile = NewFile(self.dir, JOURNAL)
        journal_path = os.path.join(self.dir, JOURNAL)
        with signals_deferred():  # the journal, the switch and its renames: a signal waits until all are done
            try:
                jfile.open()
                try:
                    data = journal.encode()
                    view = memoryview(data)
                    while view:
                        view = view[os.write(jfile.fd, view):]
                    os.fsync(jfile.fd)
                finally:
                    jfile.close()
                checkpoint("journal written")
                os.replace(jfile.path, journal_path)
            except BaseException as e:  # an OSError, or an interruption signals_deferred let through
                # Failed just after the rename? The journal then stands and the temporary is gone: the switch
                # happened, and the new files must not be discarded.
                if os.path.lexists(journal_path) and not os.path.lexists(jfile.path):
                    self.committed = True  # the next run finishes it
                else:
                    jfile.discard()
                if isinstance(e, OSError):
                    raise GGUFSplitError(self.dir, f"cannot commit: {os_problem(e)}") from None
                raise
            self.committed = True  # the new state is the state from here on
            try:
                fsync_dir(self.dir)
                checkpoint("switched")
                roll_forward(self.dir, journal)
            except OSError as e:
                raise GGUFSplitError(self.dir, f"committed, but could not finish moving files into place "
                                               f"({os_problem(e)}); the next gguf-split run here finishes it") from None
            self.applied = True  # before a deferred signal is let through at the end of this block
            if not is_temp_dir(os.path.basename(self.dir)):  # the user's state, not a step inside another's
                record_commit(self.state())

    def state(self) -> str:
        """What stands once the switch is done, in words (for a failure or an interruption after it)."""
        what = f"{self.what} in {show(self.dir)}" if self.what else f"the change to {show(self.dir)}"
        if self.applied:
            return f"{what} is complete"
        return f"{what} is committed (the next gguf-split run there finishes moving its files into place)"

    def _cleanup(self) -> None:
        with signals_deferred():  # a second Ctrl-C must not leave temporaries behind
            if self._syncer is not None:
                self._syncer.shutdown(wait=True)
                self._syncer = None
            for d in self.temp_dirs:
                _remove_temp_dir(d)
            self.temp_dirs = []
            if not self.committed:
                for f in self.files:
                    f.discard()
                if self.created_dir:
                    try:
                        os.rmdir(self.dir)
                    except OSError:
                        pass
            if self._lock is not None:
                lock, self._lock = self._lock, None
                lock.__exit__(None, None, None)

    def note(self, exc: BaseException, *more: str) -> BaseException:
        """After the switch, say on `exc` what stands: this transaction's new state (once), then `more`
        (what a later step, e.g. the models directory, did not do). A GGUFSplitError comes back as a new
        one with it in its problem; anything else (an interruption) carries it (errors.add_state)."""
        if not self.committed or is_temp_dir(os.path.basename(self.dir)):
            return exc  # nothing stands yet; or a transaction inside another's temporary directory, which
            # is not the user's state (the split `unpack --restore` unpacks before restoring its models)
        noted: set[int] = getattr(exc, "_gguf_split_noted", set())
        notes = ([] if id(self) in noted else [self.state()]) + list(more)
        if isinstance(exc, GGUFSplitError):
            return GGUFSplitError(exc.path, "; ".join([exc.problem, *notes])) if notes else exc
        for text in notes:
            add_state(exc, text)
        setattr(exc, "_gguf_split_noted", noted | {id(self)})
        return exc

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._cleanup()
        if isinstance(exc, BaseException) and not isinstance(exc, GGUFSplitError):
            self.note(exc)


def _remove_temp_dir(path: str) -> None:
    """Remove a temporary directory and what it holds (never following a symbolic link out of it)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------
# A few whole files at once


def write_files(directory: str | os.PathLike[str], files: Sequence[tuple[str, Callable[[int], None]]], *,
                force: bool = False, keep: Callable[[str, str], bool] | None = None, create: bool = True,
                check: Callable[[Transaction], None] | None = None,
                on_wait: Callable[[str], None] | None = None) -> list[str]:
    """Write each (name, write) into `directory`, all or nothing, as one Transaction: the outputs of a
    command that makes a few whole files (a pack, an unpack, a LoRA adapter). `write(fd)` writes (and
    checks) the file's bytes; any exception discards every temporary and leaves the directory as it was.

    Under the directory's lock, before anything is written: `check(tx)` (the caller's own refusals, e.g.
    free space), then each name: a directory in the way is refused; an existing entry is kept when
    `keep(name, path)` says it already holds the bytes, else refused unless `force`. `create`: make the
    directory if missing (it goes again if nothing was written). Returns the names kept."""
    directory = os.path.abspath(os.fspath(directory))
    names = [name for name, _ in files]
    for name in names:
        check_bare_name(name, directory)
    if len(set(names)) != len(names):
        raise GGUFSplitError(directory, "two outputs have the same name")
    with Transaction(directory, create=create, on_wait=on_wait) as tx:
        if check is not None:
            check(tx)
        kept = _kept_outputs(tx, names, force, keep)
        for name, write in files:
            if name not in kept:
                tx.write(tx.new(name), write)
        tx.commit()
    return kept


def _kept_outputs(tx: Transaction, names: Sequence[str], force: bool,
                  keep: Callable[[str, str], bool] | None) -> list[str]:
    """The names whose existing file is kept; refuses a directory, and an existing entry unless `force`."""
    kept: list[str] = []
    for name in names:
        path = tx.path(name)
        if not os.path.lexists(path):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            raise GGUFSplitError(path, "is a directory: cannot replace it with a file")
        if keep is not None and keep(name, path):
            kept.append(name)
        elif not force:
            raise GGUFSplitError(path, "already exists (use --force to replace it)")
    return kept


def buffered(write: Callable[[BinaryIO], None], size: int = 1 << 20) -> Callable[[int], None]:
    """A `write(fd)` for write_files from a writer of a file object: many small writes (a pack's records)
    go through a `size`-byte buffer over a duplicate of the descriptor, flushed before the fsync."""
    def fill(fd: int) -> None:
        with os.fdopen(os.dup(fd), "wb", buffering=size) as f:
            write(f)
            f.flush()

    return fill


__all__ = ["Transaction", "NewFile", "Journal", "buffered", "checkpoint", "check_space", "fsync_dir", "holds_bytes",
           "locked", "pending_view", "roll_forward", "signals_deferred", "write_files", "TMP_SUFFIX"]
