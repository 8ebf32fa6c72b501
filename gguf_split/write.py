"""Write: GGUF files assembled from header bytes and tensor bytes copied in the kernel, all-or-nothing.

Writing is the slow part of these machines, so tensor bytes never pass through Python objects: they move
file to file with `os.copy_file_range` (a reflink or an in-kernel copy), falling back to `os.write` of
mmap views. Every output goes to a hidden temporary file in the target directory, is fsynced, and is
renamed into place only when all outputs are complete: a failure (bad input, full disk, Ctrl-C) leaves the
directory as it was. An flock on the directory serialises concurrent runs into the same directory, so two
splits cannot leave a mixed set; temporary files left by a killed run are removed by the next run.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

from .errors import GGUFSplitError, os_problem
from .gguf_format import GGUFFile
from .progress import Reporter

CHUNK = 64 << 20
TMP_SUFFIX = ".gguf-split-tmp"
_ZEROS = bytes(1 << 16)


def write_zeros(fd: int, n: int) -> None:
    while n > 0:
        k = os.write(fd, _ZEROS[: min(n, len(_ZEROS))])
        n -= k


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        k = os.write(fd, view)
        view = view[k:]


def copy_bytes(src: GGUFFile, offset: int, n: int, dst_fd: int, bar: Reporter) -> None:
    """Append `n` bytes of `src` from `offset` to `dst_fd` (at its current position), in the kernel."""
    kernel_copy = True
    while n > 0:
        step = min(n, CHUNK)
        if kernel_copy:
            try:
                k = os.copy_file_range(src.fd, dst_fd, step, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                kernel_copy = False
                continue
            if k == 0:
                raise GGUFSplitError(src.path, "file shrank while being read")
        else:
            k = os.write(dst_fd, src.view(offset, offset + step))
        offset += k
        n -= k
        bar.advance(k)


def write_gguf(fd: int, header: bytes, data_start: int, pieces: Iterable[tuple[int, GGUFFile, int, int]],
               bar: Reporter, pad_to: int) -> None:
    """Write header, padding to `data_start`, then each (data offset, source, source offset, nbytes)
    in order, zero-padding between them, and pad the end to a multiple of `pad_to` (as llama.cpp does)."""
    write_all(fd, header)
    write_zeros(fd, data_start - len(header))
    pos = 0
    for offset, src, src_offset, nbytes in pieces:
        write_zeros(fd, offset - pos)
        copy_bytes(src, src_offset, nbytes, fd, bar)
        pos = offset + nbytes
    write_zeros(fd, -pos % pad_to)


class OutputDir:
    """All-or-nothing outputs in one directory: `tmp = out.new("foundation.gguf")`, write to
    `tmp.fd`, then `out.commit()`; leaving the `with` block without commit removes every trace."""

    def __init__(self, directory: str | os.PathLike[str], *, force: bool = False,
                 protect: Sequence[str] = ()) -> None:
        self.dir = os.path.abspath(os.fspath(directory))
        self.force = force
        self.protect = [os.path.abspath(p) for p in protect]
        self.created_dir = False
        self.lock_fd: int | None = None
        self.pending: list[_Temp] = []
        self.committed = False
        self._syncer: ThreadPoolExecutor | None = None

    def __enter__(self) -> "OutputDir":
        try:
            if os.path.exists(self.dir) and not os.path.isdir(self.dir):
                raise GGUFSplitError(self.dir, "output path exists and is not a directory")
            if not os.path.isdir(self.dir):
                try:
                    os.makedirs(self.dir)
                    self.created_dir = True
                except FileExistsError:  # a concurrent run made it first: fine, its lock serialises us
                    if not os.path.isdir(self.dir):
                        raise
            self.lock_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            self._remove_stale_temps()
        except OSError as e:
            self._cleanup()
            raise GGUFSplitError(self.dir, f"cannot write to output directory: {os_problem(e)}") from None
        except BaseException:
            self._cleanup()
            raise
        return self

    def _remove_stale_temps(self) -> None:
        # we hold the directory lock: any temporary file here belongs to a run that died
        for name in os.listdir(self.dir):
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError:
                    pass

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def check_target(self, name: str) -> str:
        final = self.path(name)
        for p in self.protect:
            if os.path.abspath(final) == p or (os.path.exists(final) and os.path.exists(p) and os.path.samefile(final, p)):
                raise GGUFSplitError(final, "output would overwrite an input file")
        if os.path.lexists(final) and not self.force:
            raise GGUFSplitError(final, "already exists (use --force to overwrite)")
        return final

    def new(self, name: str) -> "_Temp":
        final = self.check_target(name)
        tmp = self.path(f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise GGUFSplitError(final, f"cannot create: {os_problem(e)}") from None
        t = _Temp(final, tmp, fd)
        self.pending.append(t)
        return t

    def guard(self, t: "_Temp", fn: Callable[[int], None]) -> None:
        """Run `fn(t.fd)`, turning OS errors (a full disk) into one line naming the output file, then start
        its fsync in the background (fsync releases the GIL): the disk writes this file back while the
        caller writes the next one and proves the restore; commit() waits and reports any fsync error."""
        try:
            fn(t.fd)
        except OSError as e:
            raise GGUFSplitError(t.final, f"write failed: {os_problem(e)}") from None
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(1, thread_name_prefix="gguf-split-fsync")
        t.synced = self._syncer.submit(os.fsync, t.fd)

    def _wait_for_fsyncs(self) -> None:
        """Every fd stays open until its fsync has returned (a closed fd number could be reused)."""
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None

    def commit(self) -> None:
        """Rename the outputs into place. Several outputs (a foundation first, then the adaptors that need
        it) cannot be replaced at once: the old files they replace go first, in reverse order (adaptors,
        then their foundation), then the new ones in order, so a crash at any point leaves a consistent
        (possibly partial) set, never a new foundation beside old adaptors."""
        self._wait_for_fsyncs()
        for t in self.pending:
            try:
                if t.synced is not None:
                    t.synced.result()
            except OSError as e:
                raise GGUFSplitError(t.final, f"write failed: {os_problem(e)}") from None
        for t in self.pending:
            t.close()
        try:
            if len(self.pending) > 1:
                for t in reversed(self.pending):
                    if os.path.lexists(t.final):
                        os.unlink(t.final)
                self._sync_dir()
            for t in self.pending:
                os.replace(t.tmp, t.final)
        except OSError as e:
            raise GGUFSplitError(self.dir, f"cannot move the outputs into place: {os_problem(e)}") from None
        self.committed = True
        self._sync_dir()

    def _sync_dir(self) -> None:
        if self.lock_fd is not None:
            os.fsync(self.lock_fd)

    def _cleanup(self) -> None:
        self._wait_for_fsyncs()
        if not self.committed:
            for t in self.pending:
                t.close()
                try:
                    os.unlink(t.tmp)
                except OSError:
                    pass
            if self.created_dir:
                try:
                    os.rmdir(self.dir)
                except OSError:
                    pass
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def __exit__(self, *exc: object) -> None:
        self._cleanup()


class _Temp:
    def __init__(self, final: str, tmp: str, fd: int) -> None:
        self.final, self.tmp, self.fd = final, tmp, fd
        self.closed = False
        self.synced: Future[None] | None = None

    @property
    def name(self) -> str:
        return os.path.basename(self.final)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def link_names(task: str) -> tuple[str, str]:
    """llama.cpp's split file names for a task: split 0 (the adaptor) and split 1 (the foundation)."""
    return f"{task}-00001-of-00002.gguf", f"{task}-00002-of-00002.gguf"


def check_links(directory: str, task: str, adaptor_name: str, foundation_name: str, *, force: bool) -> None:
    """Refuse (before anything is written) to replace a file that is not already the right link."""
    for name, target in zip(link_names(task), (adaptor_name, foundation_name)):
        link = os.path.join(directory, name)
        if os.path.lexists(link) and not force and not (os.path.islink(link) and os.readlink(link) == target):
            raise GGUFSplitError(link, "already exists (use --force to replace it)")


def make_links(directory: str, task: str, adaptor_name: str, foundation_name: str, *, force: bool) -> list[str]:
    """`<task>-00001-of-00002.gguf` -> adaptor and `<task>-00002-of-00002.gguf` -> foundation, relative
    symlinks beside them, so `llama-cli -m DIR/<task>-00001-of-00002.gguf` finds both splits."""
    check_links(directory, task, adaptor_name, foundation_name, force=force)
    made = []
    for name, target in zip(link_names(task), (adaptor_name, foundation_name)):
        link = os.path.join(directory, name)
        if os.path.islink(link) and os.readlink(link) == target:
            made.append(link)
            continue
        tmp = os.path.join(directory, f".{os.path.basename(link)}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise GGUFSplitError(link, f"cannot create link: {os_problem(e)}") from None
        made.append(link)
    return made
