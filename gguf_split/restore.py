"""Restore and verify: rebuild a task's original GGUF byte for byte; check a split against its records.

restore writes the plan of `layout.plan_restore` (header bytes, zero padding, tensor bytes copied from the
adaptor or the foundation) and hashes what it writes: the output is renamed into place only if its
xxh3-128 equals the original file's recorded digest.

verify re-hashes every tensor of the foundation and the adaptors against the digests recorded at split
time, checks each header against its seal, the padding and the file size, and refuses an adaptor whose
recorded foundation identity differs from the given foundation. It names the file and the tensor.
"""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from .errors import GGUFSplitError
from .gguf_format import GGUFFile, align_up, iter_gaps
from .layout import (
    K_FOUNDATION_FILE,
    K_FOUNDATION_ID,
    K_TASK,
    ROLE_ADAPTOR,
    ROLE_FOUNDATION,
    STR,
    Copy,
    SplitFile,
    check_pair,
    check_seal,
    computed_foundation_id,
    open_output,
    plan_restore,
    record,
    recorded_digests,
    require_role,
    role_of,
)
from .progress import QUIET, Progress, Reporter
from .scan import CHUNK, hash_view, is_zero
from .write import OutputDir, copy_bytes, write_all, write_zeros

_ZERO_CHUNK = bytes(1 << 20)


def foundation_for(adaptor: GGUFFile) -> str:
    """The foundation file recorded in an adaptor, beside it."""
    name = record(adaptor, K_FOUNDATION_FILE, STR)
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\0" in name:
        raise GGUFSplitError(adaptor.path, f"recorded foundation file name {name!r} is not a plain file name: "
                                           "damaged")
    return os.path.join(os.path.dirname(os.path.abspath(adaptor.path)), name)


@dataclass
class RestoreReport:
    task: str
    output: str
    size: int
    xxh3: str


def restore(adaptor: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
            foundation: str | os.PathLike[str] | None = None, force: bool = False,
            progress: Progress = QUIET) -> RestoreReport:
    """Rebuild the original model of `adaptor` (with its foundation) at `output` (default: the original
    file name in the current directory)."""
    with open_output(adaptor) as ad:
        require_role(ad, ROLE_ADAPTOR)
        check_seal(ad)  # the restore plan comes from this header: a damaged one must not drive the writes
        with open_output(foundation or foundation_for(ad)) as fnd:
            check_seal(fnd)
            rp = plan_restore(ad, fnd)
            out_path = os.path.abspath(output if output is not None else rp.source_name)
            with OutputDir(os.path.dirname(out_path), force=force, protect=[ad.path, fnd.path]) as out:
                tmp = out.new(os.path.basename(out_path))
                h = xxhash.xxh3_128()
                with progress.bar("restoring", rp.size) as bar:
                    out.guard(tmp, lambda fd: _write_spans(fd, rp.spans, h, bar))
                if h.hexdigest() != rp.xxh3:
                    raise GGUFSplitError(_culprit(rp.spans, ad.path), "restored bytes differ from the original's "
                                         "recorded digest; run `gguf-split verify` (nothing was written)")
                out.commit()
            return RestoreReport(rp.task, out_path, rp.size, rp.xxh3)


def _write_spans(fd: int, spans: list, h: "xxhash.xxh3_128", bar: Reporter) -> None:
    for span in spans:
        if isinstance(span, Copy):
            copy_bytes(span.src, span.offset, span.nbytes, fd, bar)
            view = span.src.view(span.offset, span.offset + span.nbytes)
            for s in range(0, len(view), CHUNK):
                h.update(view[s : s + CHUNK])
        elif isinstance(span, int):
            write_zeros(fd, span)
            n = span
            while n:
                k = min(n, len(_ZERO_CHUNK))
                h.update(_ZERO_CHUNK[:k])
                n -= k
            bar.advance(span)
        else:
            write_all(fd, span)
            h.update(span)
            bar.advance(len(span))


def _culprit(spans: list, adaptor: str) -> str:
    for span in spans:
        if isinstance(span, Copy):
            if xxhash.xxh3_128(span.src.view(span.offset, span.offset + span.nbytes)).digest() != span.digest:
                return f"{span.src.path}: tensor {span.tensor!r}"
    return adaptor  # every tensor matches: the adaptor's restore record is at fault


# ---------------------------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyReport:
    foundation: str
    foundation_id: str
    adaptors: dict[str, str] = field(default_factory=dict)  # task -> path
    tensors: int = 0
    bytes: int = 0


def _check_file(f: GGUFFile, bar: Reporter, threads: int) -> int:
    """Tensor digests, zero padding, exact size of a file whose seal was checked; returns the tensor
    bytes hashed."""
    h = f.header
    digests = recorded_digests(f)
    last = max((t.offset + t.nbytes for t in h.tensors), default=0)
    expected = h.data_start + align_up(last, h.alignment)
    if f.size != expected:
        raise GGUFSplitError(f.path, f"is {f.size} bytes, the split wrote {expected}: truncated or appended to")
    for start, end in iter_gaps(h):
        if not is_zero(f.view(start, end)):
            raise GGUFSplitError(f.path, f"padding at bytes {start}-{end} is not zero: corrupted")
        bar.advance(end - start)

    def one(i: int) -> None:
        t = h.tensors[i]
        if hash_view(f.tensor_view(t), bar) != digests[i]:
            raise GGUFSplitError(f.path, f"tensor {t.name!r} does not match its recorded digest: corrupted")

    order = sorted(range(len(h.tensors)), key=lambda i: -h.tensors[i].nbytes)
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, order))
    else:
        for i in order:
            one(i)
    return sum(t.nbytes for t in h.tensors)


def verify(foundation: str | os.PathLike[str], adaptors: list[str | os.PathLike[str]], *,
           progress: Progress = QUIET, threads: int | None = None) -> VerifyReport:
    threads = threads or min(os.cpu_count() or 1, 8)
    with open_output(foundation) as fnd:
        require_role(fnd, ROLE_FOUNDATION)
        check_seal(fnd)
        fid = str(record(fnd, K_FOUNDATION_ID, STR))
        if computed_foundation_id(fnd) != fid:
            raise GGUFSplitError(fnd.path, "its tensors do not match its recorded identity: corrupted")
        opened = []
        try:
            for a in adaptors:
                ad = open_output(a)
                opened.append(ad)
                require_role(ad, ROLE_ADAPTOR)
                check_seal(ad)
                check_pair(ad, fnd)
            total = sum(f.size - f.header.tensor_info_end for f in [fnd, *opened])
            report = VerifyReport(fnd.path, fid)
            with progress.bar("verifying", total) as bar:
                report.bytes += _check_file(fnd, bar, threads)
                report.tensors += len(fnd.header.tensors)
                for ad in opened:
                    report.bytes += _check_file(ad, bar, threads)
                    report.tensors += len(ad.header.tensors)
                    plan_restore(ad, fnd)  # the restore record parses and every tensor resolves
                    report.adaptors[str(record(ad, K_TASK, STR))] = ad.path
            return report
        finally:
            for ad in opened:
                ad.close()


def find_split(directory: str | os.PathLike[str]) -> tuple[str, list[str]]:
    """(foundation, adaptors) of a split directory, found by their gguf-split records."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise GGUFSplitError(directory, "not a directory")
    foundations, adaptors = [], []
    for path in sorted(glob.glob(os.path.join(directory, "*.gguf"))):
        if os.path.islink(path):
            continue  # llama.cpp names made by `gguf-split link`
        try:
            with SplitFile(path) as f:
                role = role_of(f)
        except GGUFSplitError:  # NotASplitFile included: another model in the directory
            if _looks_like_output(path):
                raise  # a damaged foundation or adaptor is what verify must report, not skip
            continue
        if role == ROLE_FOUNDATION:
            foundations.append(path)
        elif role == ROLE_ADAPTOR:
            adaptors.append(path)
    if not foundations:
        raise GGUFSplitError(directory, "holds no gguf-split foundation")
    if len(foundations) > 1:
        raise GGUFSplitError(directory, f"holds {len(foundations)} foundations ({', '.join(map(os.path.basename, foundations))}); "
                                        "name the files to use")
    return foundations[0], adaptors


def _looks_like_output(path: str) -> bool:
    """Named as gguf-split names its outputs: <prefix>foundation.gguf, <prefix>adaptor-<task>.gguf."""
    name = os.path.basename(path)
    return name.endswith("foundation.gguf") or "adaptor-" in name


def resolve_split_args(paths: list[str]) -> tuple[str, list[str]]:
    """verify/info arguments: a split directory, or files (a foundation and/or adaptors; an adaptor alone
    brings the foundation it records)."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return find_split(paths[0])
    foundation, adaptors = None, []
    for p in paths:
        with open_output(p) as f:
            role = role_of(f)
            if role == ROLE_FOUNDATION:
                if foundation is not None:
                    raise GGUFSplitError(p, f"a second foundation (first: {foundation})")
                foundation = p
            elif role == ROLE_ADAPTOR:
                adaptors.append(p)
            else:
                raise GGUFSplitError(p, "not a gguf-split foundation or adaptor")
    if foundation is None:
        with open_output(adaptors[0]) as f:
            foundation = foundation_for(f)
    return foundation, adaptors
