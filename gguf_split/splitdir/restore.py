"""Restore: rebuild a task's original GGUF file(s) byte for byte, and prove it from what was written.

The restore plan rebuilds each original header from the adaptor's records (original tensor infos, the
KVs kept in the adaptor with the replaced `split.*` ones put back, other shards' KVs) and maps every
original byte to its source: header bytes, zero padding, recorded non-zero padding, tensor bytes in the
adaptor or one of the task's shared files (per the adaptor's tensor index).

What is written is what is checked: each output is written under a temporary name, fsynced, its cached
pages dropped (`posix_fadvise(DONTNEED)`), read back from the disk and hashed; it is renamed into place
only if that xxh3-128 equals the original's recorded digest. A short write, a disk error or a writer bug
therefore never puts a wrong file in place. Outputs of a sharded model appear together or not at all
(commit.Transaction); `restore_into` writes a task's outputs into a caller's transaction, so that several
tasks' models can appear together too (`unpack --restore`). Output names are checked before anything is
written (`check_outputs`): a file gguf-split wrote is never replaced, another existing file only with
`force`, and one that already holds the original's bytes is kept.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, Union

import xxhash

from ..disk.commit import Transaction, check_space, holds_bytes
from ..errors import GGUFSplitError
from ..format.gguf import (
    GGUFFile,
    Header,
    TensorInfo,
    _check_data_layout,
    _Cursor,
    align_up,
    encode_prefix,
    parse_header,
    read_kv_at,
    read_prefix,
    read_tensor_infos,
)
from ..format.names import JOURNAL, is_temp, is_temp_dir, show
from ..disk.progress import QUIET, Progress, Reporter
from ..format.records import (
    K_SRC_GAPS,
    K_SRC_REPLACED_KVS,
    K_SRC_SHARD_KVS,
    K_SRC_TENSOR_INFOS,
    SourceFile,
    SplitFile,
)
from .directory import FileFinder, SplitDir, TaskFiles, directory_of, open_task, read_consistently
from ..disk.copy import copy_bytes, write_all, write_zeros
from ..disk.sweep import read_back



@dataclass(frozen=True)
class Copy:
    """`nbytes` of `src` from file offset `offset`; `digest` is what the split recorded for them."""

    src: GGUFFile
    offset: int
    nbytes: int
    digest: bytes
    tensor: str


Span = Union[bytes, int, Copy]  # literal bytes, a run of that many zero bytes, or a copy


@dataclass
class RestorePlan:
    """One original file: its name, size, digest, rebuilt header, and every byte's source."""

    name: str
    size: int
    xxh3: str
    header: Header
    header_bytes: bytes  # the original bytes [0, end of tensor infos)
    spans: list[Span]


Held = dict[str, tuple[SplitFile, TensorInfo, bytes]]  # tensor name -> (file, its info there, recorded digest)


class _Records:
    """A cursor over an adaptor's restore records: the original tensor-info blocks of every source file in
    order, and the KVs of shards 2..n. Each original header is rebuilt from them in turn."""

    def __init__(self, ad: SplitFile) -> None:
        self.ad = ad
        self.infos = ad.blob(K_SRC_TENSOR_INFOS)
        self.shard_kvs = ad.blob(K_SRC_SHARD_KVS)
        self.ti_pos = 0
        self.shard_pos = 0

    def damaged(self, what: str) -> GGUFSplitError:
        return GGUFSplitError(self.ad.path, f"restore record damaged: {what}")

    def _with_infos(self, head: bytes, n_tensors: int, alignment: int) -> tuple[bytes, list[TensorInfo]]:
        """The original header bytes: `head` (prefix + KVs) + this file's tensor-info block, and its tensors."""
        rest = self.infos[self.ti_pos:]
        cur = _Cursor(head + rest, len(head), len(head) + len(rest), self.ad.path)
        tensors = read_tensor_infos(cur, n_tensors, alignment)
        header_bytes = head + rest[:cur.pos - len(head)]
        self.ti_pos += cur.pos - len(head)
        return header_bytes, tensors

    def first_header(self, src: SourceFile) -> tuple[bytes, Header]:
        ad = self.ad
        kvs = _first_kvs(ad, self.damaged)
        head = encode_prefix(src.version, src.n_tensors, len(kvs)) + b"".join(kvs)
        header_bytes, tensors = self._with_infos(head, src.n_tensors, ad.header.alignment)
        read_prefix(header_bytes, ad.path)
        # the original's alignment is the adaptor's own: the adaptor keeps its model's KVs
        header = Header(ad.path, src.version, [], tensors, ad.header.alignment, len(head),
                        align_up(len(header_bytes), ad.header.alignment), src.size, {},
                        {t.name: t for t in tensors})
        _check_data_layout(header)
        return header_bytes, header

    def shard_header(self, src: SourceFile) -> tuple[bytes, Header]:
        raw, pos = self.shard_kvs, self.shard_pos
        if pos + 16 > len(raw):
            raise self.damaged(K_SRC_SHARD_KVS)
        n_kv, n = struct.unpack_from("<QQ", raw, pos)
        kv_bytes = raw[pos + 16:pos + 16 + n]
        if len(kv_bytes) != n:
            raise self.damaged(K_SRC_SHARD_KVS)
        self.shard_pos += 16 + n
        head = encode_prefix(src.version, src.n_tensors, n_kv) + kv_bytes
        header_bytes, _ = self._with_infos(head, src.n_tensors, 1)
        return header_bytes, parse_header(header_bytes, src.size, self.ad.path)

    def all_used(self) -> bool:
        return self.ti_pos == len(self.infos) and self.shard_pos == len(self.shard_kvs)


def plan_restore(tf: TaskFiles) -> list[RestorePlan]:
    """The original file(s) of a task, from its (checked) files."""
    info = tf.info
    held: Held = {}
    for f in tf.files:
        for t, d in zip(f.header.tensors, f.digests()):
            held[t.name] = (f, t, d)
    records = _Records(tf.adaptor)
    gaps = _parse_gaps(tf.adaptor.blob(K_SRC_GAPS), len(info.sources), records.damaged)
    plans: list[RestorePlan] = []
    for i, src in enumerate(info.sources):
        try:
            header_bytes, header = records.first_header(src) if i == 0 else records.shard_header(src)
        except GGUFSplitError as e:
            raise records.damaged(e.problem) from None
        spans = _spans(header, header_bytes, held, gaps.get(i, {}), src.name, info.task, records.damaged)
        plans.append(RestorePlan(src.name, src.size, src.xxh3, header, header_bytes, spans))
    if not records.all_used() or sum(len(p.header.tensors) for p in plans) != info.n_model_tensors:
        raise records.damaged("source records do not add up")
    _check_tensor_files(tf, [t.name for p in plans for t in p.header.tensors])
    return plans


def _spans(header: Header, header_bytes: bytes, held: Held, file_gaps: dict[int, bytes], name: str, task: str,
           damaged: Callable[[str], GGUFSplitError]) -> list[Span]:
    """Every byte of one original file, in order: its header, tensors copied from the task's files, zero
    padding and the recorded non-zero padding (each record used exactly once)."""
    spans: list[Span] = [header_bytes]
    cursor = header.tensor_info_end

    def fill(start: int, end: int) -> None:
        b = file_gaps.pop(start, None)
        if b is None:
            spans.append(end - start)
        elif len(b) != end - start:
            raise damaged(f"padding record at byte {start} of {name}")
        else:
            spans.append(b)

    for t in sorted(header.tensors, key=lambda t: t.offset):
        start = header.data_start + t.offset
        if start > cursor:
            fill(cursor, start)
        entry = held.get(t.name)
        if entry is None:
            raise GGUFSplitError(header.path, f"tensor {t.name!r} is in none of the task's files")
        f, st, digest = entry
        if (st.shape, st.ggml_type) != (t.shape, t.ggml_type):
            raise GGUFSplitError(f.path, f"tensor {t.name!r} has another type or shape than task {task!r} needs")
        spans.append(Copy(f, f.header.data_start + st.offset, st.nbytes, digest, t.name))
        cursor = start + t.nbytes
    if header.file_size > cursor:
        fill(cursor, header.file_size)
    if file_gaps:
        raise damaged(K_SRC_GAPS)
    return spans


def _check_tensor_files(tf: TaskFiles, names: list[str]) -> None:
    """Each file of the task holds exactly the tensors the adaptor's tensor index puts there."""
    expected = {n: pos for n, pos in zip(names, tf.info.tensor_files)}
    for f_pos, f in enumerate(tf.files):
        for t in f.header.tensors:
            if expected.get(t.name) != f_pos:
                raise GGUFSplitError(f.path, f"holds tensor {t.name!r}, which task {tf.info.task!r} records "
                                             f"{'elsewhere' if t.name in expected else 'nowhere'}")


def _first_kvs(ad: SplitFile, damaged: Callable[[str], GGUFSplitError]) -> list[bytes]:
    kept = [ad.raw(start, end) for start, end in ad.tail.values()]
    raw = ad.blob(K_SRC_REPLACED_KVS)
    pos = 0
    try:
        while pos < len(raw):
            (where,) = struct.unpack_from("<I", raw, pos)
            kv = read_kv_at(raw, pos + 4, ad.path)
            if where > len(kept):
                raise struct.error("position")
            kept.insert(where, raw[kv.start:kv.end])
            pos = kv.end
    except (struct.error, GGUFSplitError):
        raise damaged(K_SRC_REPLACED_KVS) from None
    return kept


def _parse_gaps(raw: bytes, n_sources: int, damaged: Callable[[str], GGUFSplitError]) -> dict[int, dict[int, bytes]]:
    out: dict[int, dict[int, bytes]] = {}
    pos = 0
    while pos < len(raw):
        if pos + 20 > len(raw):
            raise damaged(K_SRC_GAPS)
        src, off, n = struct.unpack_from("<IQQ", raw, pos)
        b = raw[pos + 20:pos + 20 + n]
        if src >= n_sources or len(b) != n:
            raise damaged(K_SRC_GAPS)
        out.setdefault(src, {})[off] = b
        pos += 20 + n
    return out


# ---------------------------------------------------------------------------------------------------------
# restore


@dataclass
class RestoredFile:
    path: str
    size: int
    xxh3: str
    kept: bool = False  # the output already held exactly these bytes (checked), and was left as it was


@dataclass
class RestoreReport:
    task: str
    files: list[RestoredFile]

    @property
    def output(self) -> str:
        return self.files[0].path

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class Original(Protocol):
    """What an output must end up holding: `size` bytes whose xxh3-128 is `xxh3` (a RestorePlan, or an
    adaptor's record of an original file)."""

    @property
    def size(self) -> int: ...

    @property
    def xxh3(self) -> str: ...


def adaptor_for(path: str | os.PathLike[str], task: str | None) -> str:
    """An adaptor path from (adaptor file) or (split directory, task)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        sd = SplitDir.read_once(p)  # restore() lists and opens as of one state (read_consistently)
        if task is None:
            sd.require_split()
            raise GGUFSplitError(show(p), f"is a split directory: name the task to restore ({', '.join(sd.tasks)})")
        return sd.adaptor(task)
    if task is not None:
        with SplitFile(p) as f:
            own = f.get("gguf_split.task")
        if own != task:
            raise GGUFSplitError(show(p), f"is the adaptor of task {own!r}, not {task!r}")
    return p


def restore(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *, task: str | None = None,
            shared: Sequence[str | os.PathLike[str]] = (), force: bool = False,
            progress: Progress = QUIET) -> RestoreReport:
    """Rebuild a task's original model file(s). `path` is its adaptor, or the split directory with `task`.
    `output`: a file (a one-file model) or a directory (an existing one, or any path ending in a slash:
    created if missing), where the original file names are used; default: the current directory."""
    opened = read_consistently([directory_of(path)], lambda: open_task(adaptor_for(path, task), FileFinder(shared)),
                               TaskFiles.close)
    with opened as tf:
        plans = plan_restore(tf)
        out_dir, names = _outputs(output, plans)
        with Transaction(out_dir, on_wait=progress.note) as tx:
            keep = check_outputs(tx.dir, names, plans, force=force, inputs=tf.paths())
            check_space(tx.dir, sum(p.size for p, k in zip(plans, keep) if not k))
            done = restore_into(tx, tf, plans, names, keep, progress)
            tx.commit()
        return RestoreReport(tf.info.task, done)


def check_outputs(out_dir: str, names: Sequence[str], originals: Sequence[Original], *, force: bool,
                  inputs: Iterable[str] = ()) -> list[bool]:
    """Check, before anything is written, that the original files can be written as `names` in `out_dir`;
    per output, whether it is already in place (kept). Refused: a directory, a name gguf-split uses for
    its own temporaries, one of the `inputs`, a file gguf-split wrote (another task's adaptor, another
    split's shared file: never replaced, even with `force`), and any other existing file unless `force`.
    An existing file that already holds exactly the original's bytes (its size, and the xxh3-128 recorded
    when the model was split) is kept, so a run that was interrupted after its commit can be run again."""
    inputs = {os.path.realpath(p) for p in inputs}
    keep = []
    for name, original in zip(names, originals):
        final = os.path.join(out_dir, name)
        if is_temp(name) or is_temp_dir(name) or name == JOURNAL:
            raise GGUFSplitError(show(final), "is a name gguf-split uses for its temporary files: damaged or forged")
        if os.path.realpath(final) in inputs:
            raise GGUFSplitError(show(final), "is one of the split's own files; restore elsewhere")
        if os.path.isdir(final):
            raise GGUFSplitError(show(final), "is a directory")
        if not os.path.lexists(final):
            keep.append(False)
            continue
        role = _split_role(final)
        if role is not None:  # another task's, or another split's: --force must not destroy it
            raise GGUFSplitError(show(final), f"is a gguf-split {role} file; restore elsewhere")
        if holds_bytes(final, original.size, original.xxh3):
            keep.append(True)
        elif force:
            keep.append(False)
        else:
            raise GGUFSplitError(show(final), "already exists (use --force to replace it)")
    return keep


def restore_into(tx: Transaction, tf: TaskFiles, plans: Sequence[RestorePlan], names: Sequence[str],
                 keep: Sequence[bool], progress: Progress = QUIET) -> list[RestoredFile]:
    """Write a task's original files as new files of `tx` (not committed: the caller commits, perhaps with
    other tasks' files), fsynced, read back from the disk and checked against the recorded digests; an
    output `keep` marks (check_outputs) is left as it is. The files as they will be once committed."""
    todo = [(plan, name) for plan, name, kept in zip(plans, names, keep) if not kept]
    total = sum(plan.size for plan, _ in todo)
    written = []
    with progress.bar("restoring", total) as bar:
        for plan, name in todo:
            nf = tx.new(name)
            tx.write(nf, partial(_write_spans, spans=plan.spans, bar=bar))
            written.append(nf)
    tx.wait_synced()
    with progress.bar("checking", total) as bar:
        for (plan, _), nf in zip(todo, written):
            try:
                got = read_back(nf.path, bar)
            except GGUFSplitError as e:
                raise GGUFSplitError(nf.final_path, e.problem) from None
            if got != plan.xxh3:
                raise GGUFSplitError(_culprit(plan, tf.adaptor.path), f"the restored {plan.name} does not "
                                     "match the original's recorded digest; nothing was written (run "
                                     "`gguf-split verify`)")
    return [RestoredFile(os.path.join(tx.dir, name), plan.size, plan.xxh3, kept)
            for plan, name, kept in zip(plans, names, keep)]


def _split_role(path: str) -> str | None:
    """The role of a file gguf-split wrote ("adaptor", "shared"), None for any other file."""
    try:
        with SplitFile(path) as f:
            return f.role or "output"
    except GGUFSplitError:
        return None


def _is_dir_name(out: str) -> bool:
    """-o names a directory: an existing one, or any path ending in a separator."""
    return os.path.isdir(out) or out.endswith(os.sep) or (os.altsep is not None and out.endswith(os.altsep))


def _outputs(output: str | os.PathLike[str] | None, plans: list[RestorePlan]) -> tuple[str, list[str]]:
    """(output directory, file names) for -o: a directory gets the original names (and is created if
    missing: the transaction removes it again if nothing is written); a one-file model may be given a
    file name, whose directory must exist; a sharded model needs a directory."""
    names = [p.name for p in plans]
    if output is None:
        return os.getcwd(), names
    out = os.fspath(output)
    if out == "":
        raise GGUFSplitError(None, "-o/--output: empty path")
    if _is_dir_name(out):
        return os.path.abspath(out), names
    if len(plans) > 1:
        shards = f"this task's original is {len(plans)} files (shards): give a directory (-o DIR/)"
        if os.path.lexists(out):
            raise GGUFSplitError(show(out), f"is a file, but {shards}")
        if out.lower().endswith(".gguf"):
            raise GGUFSplitError(show(out), f"names one file, but {shards}")
        return os.path.abspath(out), names  # a new directory
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise GGUFSplitError(show(out), "its directory does not exist" if not os.path.exists(parent)
                             else "its parent is not a directory")
    return parent, [os.path.basename(out)]


def _write_spans(fd: int, spans: list[Span], bar: Reporter) -> None:
    for span in spans:
        if isinstance(span, Copy):
            copy_bytes(span.src, span.offset, span.nbytes, fd, bar)
        elif isinstance(span, int):
            write_zeros(fd, span)
            bar.advance(span)
        else:
            write_all(fd, span)
            bar.advance(len(span))


def _culprit(plan: RestorePlan, adaptor: str) -> str:
    for span in plan.spans:
        if isinstance(span, Copy):
            if xxhash.xxh3_128(span.src.view(span.offset, span.offset + span.nbytes)).digest() != span.digest:
                return f"{span.src.path}: tensor {span.tensor!r}"
    return adaptor
