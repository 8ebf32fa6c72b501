"""Write: GGUF files assembled from header bytes and tensor bytes copied in the kernel.

Writing is the slow part of these machines (`cp` ~150 MB/s), so tensor bytes never pass through Python
objects on their way out: they move file to file with `os.copy_file_range` (a reflink or an in-kernel
copy), falling back to `os.write` of mmap views where the kernel cannot. Files are written by a
`commit.Transaction` (temporary name, fsync, atomic switch); each file is then read back and hashed
(disk.sweep) while the next is copied.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from ..errors import GGUFSplitError
from ..format.gguf import GGUFFile
from .progress import Reporter
from ..format.records import BuiltHeader, OutTensor

CHUNK = 64 << 20
_ZEROS = bytes(1 << 16)


def write_zeros(fd: int, n: int) -> None:
    while n > 0:
        n -= os.write(fd, _ZEROS[:min(n, len(_ZEROS))])


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_bytes(src: GGUFFile, offset: int, n: int, dst_fd: int, bar: Reporter) -> None:
    """Append `n` bytes of `src` from `offset` to `dst_fd` (at its current position), in the kernel."""
    kernel_copy = src.fd >= 0 and hasattr(os, "copy_file_range")
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


def write_gguf(fd: int, built: BuiltHeader, tensors: Sequence[OutTensor], bar: Reporter) -> None:
    """Header, zero padding to the data section, then every tensor at its offset, zero-padded to the
    alignment (the end too, as llama.cpp writes)."""
    write_all(fd, built.data)
    write_zeros(fd, built.data_start - len(built.data))
    pos = 0
    for t, offset in zip(tensors, built.offsets):
        write_zeros(fd, offset - pos)
        copy_bytes(t.src, t.src_offset, t.nbytes, fd, bar)
        pos = offset + t.nbytes
    write_zeros(fd, built.file_size - built.data_start - pos)
