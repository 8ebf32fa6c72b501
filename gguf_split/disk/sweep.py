"""The hashing sweep: one front-to-back pass over a GGUF file's bytes (or the bytes a file will hold), feeding
every hasher a piece while it is in the CPU cache.

Why one mechanism: scanning inputs (tensor digests + the whole file's, recorded for restore), verifying a
split (the same digests compared, and the padding checked to be zero), keeping a file a re-split or `add`
reuses, checking what a split just wrote (and taking the digests its adaptors record from that read) and
hashing a pack's inputs are all the same walk: a header, then tensors and the gaps between
them in file order. Tensors never overlap (the format layer refuses it), so header, tensors and gaps tile
the file, and one pass gives the whole-file xxh3-128 (what `xxh128sum` prints), optionally its sha256
(~0.7 GB/s, so only where it is recorded), and every tensor's xxh3-128. Pieces are 1 MiB: small enough that
the second and third hasher find them in the CPU cache, large enough that Python's per-piece cost is
nothing; the cancel flag is checked between pieces (disk.jobs).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

from ..errors import GGUFSplitError, os_problem
from ..format.gguf import GGUFFile, iter_gaps
from .jobs import check_cancel
from .progress import NO_BAR, Reporter

PIECE = 1 << 20
READ_BACK = 16 << 20
_ZEROS = bytes(PIECE)

HEADER, TENSOR, GAP = "header", "tensor", "gap"


@dataclass(frozen=True, slots=True)
class Span:
    """`length` bytes of a file in order: from `source` at `offset` (a mapped file or literal bytes), or zeros
    when `source` is None. `role` says what the bytes are: the header, a tensor (its own digest is taken), or
    a gap (padding, which `zero_gaps` requires to be zero)."""

    role: str
    length: int
    source: GGUFFile | bytes | None = None
    offset: int = 0


@dataclass(frozen=True)
class Digests:
    xxh3: bytes  # whole file, xxh3-128
    sha256: str | None  # whole file, hex (only when asked)
    tensors: list[bytes]  # xxh3-128 of each TENSOR span, in file order

    @property
    def xxh3_hex(self) -> str:
        return self.xxh3.hex()


def file_spans(f: GGUFFile) -> list[Span]:
    """A file as spans: its header (to the end of the tensor infos), then its tensors and gaps in file order.
    Tensor digests come out in file order; `tensor_order(f)` gives the header index of each."""
    h = f.header
    spans: list[tuple[int, Span]] = [(0, Span(HEADER, h.tensor_info_end, f, 0))]
    for t in h.tensors:
        start = h.data_start + t.offset
        spans.append((start, Span(TENSOR, t.nbytes, f, start)))
    spans += [(s, Span(GAP, e - s, f, s)) for s, e in iter_gaps(h)]
    spans.sort(key=lambda x: x[0])
    return [s for _, s in spans]


def tensor_order(f: GGUFFile) -> list[int]:
    """The header index of each tensor in file order (the order of `Digests.tensors` of `file_spans`)."""
    h = f.header
    return sorted(range(len(h.tensors)), key=lambda i: h.tensors[i].offset)


def sweep(spans: Iterable[Span], *, sha256: bool = False, zero_gaps: str | None = None, bar: Reporter = NO_BAR,
          cancel: threading.Event | None = None) -> Digests:
    """Hash `spans` in one pass. `zero_gaps`: the path to name when a gap holds a non-zero byte (None: gaps are
    not checked)."""
    whole = xxhash.xxh3_128()
    sha = hashlib.sha256() if sha256 else None
    tensors: list[bytes] = []
    pos = 0
    for span in spans:
        own = xxhash.xxh3_128() if span.role == TENSOR else None
        for piece in _pieces(span):
            check_cancel(cancel)
            whole.update(piece)
            if sha is not None:
                sha.update(piece)
            if own is not None:
                own.update(piece)
            elif zero_gaps is not None and span.role == GAP and bytes(piece).count(0) != len(piece):
                raise GGUFSplitError(zero_gaps, f"padding at bytes {pos}-{pos + span.length} is not zero: corrupted")
            bar.advance(len(piece))
        if own is not None:
            tensors.append(own.digest())
        pos += span.length
    return Digests(whole.digest(), sha.hexdigest() if sha is not None else None, tensors)


def sweep_file(f: GGUFFile, *, sha256: bool = False, zero_gaps: bool = False, bar: Reporter = NO_BAR,
               cancel: threading.Event | None = None) -> Digests:
    """`sweep` of a whole file, with its tensor digests put back in header order."""
    d = sweep(file_spans(f), sha256=sha256, zero_gaps=f.path if zero_gaps else None, bar=bar, cancel=cancel)
    by_header = [b""] * len(d.tensors)
    for digest, i in zip(d.tensors, tensor_order(f)):
        by_header[i] = digest
    return Digests(d.xxh3, d.sha256, by_header)


def _pieces(span: Span) -> Iterable[bytes | memoryview]:
    src, n = span.source, span.length
    if src is None:
        for at in range(0, n, PIECE):
            yield _ZEROS[:min(PIECE, n - at)]
    elif isinstance(src, bytes):
        view = memoryview(src)[span.offset:span.offset + n]
        for at in range(0, n, PIECE):
            yield view[at:at + PIECE]
    else:
        for at in range(span.offset, span.offset + n, PIECE):
            yield src.view(at, min(at + PIECE, span.offset + n))


def spans_of_layout(header: bytes, data_start: int, pieces: Sequence[tuple[int, int, GGUFFile, int]],
                    file_size: int) -> list[Span]:
    """The spans of a file to be written: `header` bytes, zeros to `data_start`, then each tensor
    (data offset, length, source file, source offset) with zeros between, and zeros to `file_size`."""
    spans = [Span(HEADER, len(header), header), Span(GAP, data_start - len(header))]
    pos = data_start
    for offset, n, src, src_offset in pieces:
        at = data_start + offset
        if at > pos:
            spans.append(Span(GAP, at - pos))
        spans.append(Span(TENSOR, n, src, src_offset))
        pos = at + n
    if file_size > pos:
        spans.append(Span(GAP, file_size - pos))
    return spans


def read_back(path: str, bar: Reporter = NO_BAR) -> str:
    """xxh3-128 (hex) of what is on the disk: the file's cached pages are dropped first (it was fsynced), so
    the bytes come from the device, not from the writes' page cache (restore's proof of what it wrote)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise GGUFSplitError(path, f"cannot read back: {os_problem(e)}") from None
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = xxhash.xxh3_128()
        buf = bytearray(READ_BACK)
        view = memoryview(buf)
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            h.update(view[:n])
            bar.advance(n)
        return h.hexdigest()
    except OSError as e:
        raise GGUFSplitError(path, f"cannot read back: {os_problem(e)}") from None
    finally:
        os.close(fd)
