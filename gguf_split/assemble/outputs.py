"""Outputs: the files a plan becomes, written, proven and committed; shared by `split` and `add`.

Every planned file is named after its content (`name_files`: a shared file's name is its content id, so a
name never changes meaning), built from the inputs that hold its tensors, and written under a temporary
name (`write_outputs`); then, before anything is visible, three proofs: every task's restore is planned
from what was written and must rebuild each input's header and tensor map exactly (`prove_restores`);
the inputs did not change meanwhile; and every written file is read back and must hold the digests its
records claim (`read_back_check`, as each file is written: this catches an input rewritten in place between hashing and copying, even
with its mtime put back, and any writer bug). Only then does the commit switch the directory over. A file
the new state needs that the directory already holds is kept, after one sweep proves it is intact
(`keep_file`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..disk.commit import NewFile, Transaction, check_space
from ..disk.copy import write_gguf
from ..disk.progress import Progress, Reporter
from ..disk.sweep import Digests, sweep_file
from ..errors import GGUFSplitError
from ..format.names import adaptor_name, hole_name, own_part_name, shared_name, show
from ..format.records import (
    AdaptorInfo,
    BuiltHeader,
    FileRef,
    OutTensor,
    SharedInfo,
    SplitFile,
    adaptor_kvs,
    build_header,
    content_id,
    shared_kvs,
)
from ..splitdir.directory import SplitDir, TaskFiles
from ..splitdir.links import LinkPlan, stage_links
from ..splitdir.restore import Copy, RestorePlan, plan_restore
from ..splitdir.verify import check_file
from .plan import HOLE, OWN, Layout, PlannedFile, TensorId
from .scan import ScannedModel, check_unchanged, forget_cached, recheck_cached


class ContentMismatch(GGUFSplitError):
    """A file of the directory has the name of a file the new state needs, but other content: never kept,
    never replaced (the user moves it away)."""


@dataclass
class NamedFile:
    """A planned file with everything its bytes depend on: name, content id, header, sources."""

    planned: PlannedFile
    name: str
    kind: str  # "foundation", "shared", "hole" or "own"
    cid: str
    tensors: list[OutTensor]
    built: BuiltHeader


def name_files(models: Mapping[str, ScannedModel], layout: Layout, prefix: str, *,
               foundation: bool = True) -> list[NamedFile]:
    """Name every planned file after its content. The file every task of a split loads is the foundation
    (`foundation=False` for files added later to a split: they do not serve every task)."""
    all_tasks = set(models) if foundation else set()
    return [_named(pf, models, all_tasks, prefix) for pf in layout.files]


def _named(pf: PlannedFile, models: Mapping[str, ScannedModel], all_tasks: set[str], prefix: str) -> NamedFile:
    holders = [models[t] for t in pf.tasks] if pf.kind != HOLE else []
    tensors = [out_tensor(x, holders) for x in pf.tensors]
    alignment, arch = 32, None
    if pf.kind != HOLE:
        alignment = max(m.first.header.alignment for m in holders)
        archs = {m.architecture for m in holders}
        arch = archs.pop() if len(archs) == 1 else None
    cid = content_id(pf.position, alignment, arch, ((t.name, t.shape, t.ggml_type, t.digest) for t in tensors))
    built = build_header(shared_kvs(position=pf.position, cid=cid, digests=b"".join(t.digest for t in tensors),
                                    architecture=arch, alignment=alignment), [], tensors, alignment)
    if pf.kind == HOLE:
        name, kind = hole_name(pf.position, prefix), "hole"
    elif pf.kind == OWN:
        name, kind = own_part_name(pf.tasks[0], pf.part + 1, cid, prefix), "own"
    else:
        kind = "foundation" if set(pf.tasks) == all_tasks and len(all_tasks) > 1 else "shared"
        name = shared_name(cid, foundation=kind == "foundation", prefix=prefix)
    return NamedFile(pf, name, kind, cid, tensors, built)


def out_tensor(x: TensorId, holders: Sequence[ScannedModel]) -> OutTensor:
    """Where a planned tensor's bytes come from: the first input that holds them."""
    for m in holders:
        if m.digests.get(x.name) == x.digest:
            src, offset = m.source_of(x.name)
            return OutTensor(x.name, x.shape, x.ggml_type, x.nbytes, x.digest, src, offset)
    raise AssertionError(f"planned tensor {x.name} has no source")


def adaptor_header(m: ScannedModel, layout: Layout, named: list[NamedFile], refs: Mapping[int, FileRef],
                   task: str) -> tuple[BuiltHeader, list[OutTensor]]:
    """A task's adaptor: its own tensors, the records of its files (`refs`) and of its original file(s)."""
    own = [out_tensor(x, [m]) for x in layout.adaptor_tensors[task]]
    order = layout.task_files[task]
    where: dict[str, int] = {x.name: 0 for x in layout.adaptor_tensors[task]}
    for pos, i in enumerate(order, start=1):
        for x in named[i].planned.tensors:
            where[x.name] = pos
    source = m.source_records()
    kvs = adaptor_kvs(task=task, files=[refs[i] for i in order], tensor_files=[where[t.name] for t, _ in m.tensors],
                      digests=b"".join(t.digest for t in own), source=source, n_model_tensors=len(m.tensors),
                      cut=str(layout.cut), cut_scheme=layout.cut.scheme,
                      quantize=m.quantized)
    return build_header(kvs, source.kept_kvs, own, m.first.header.alignment), own


# ---------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class Written:
    """What `write_outputs` did: the record of every planned file (written or kept), and what it deleted."""

    refs: dict[int, FileRef]
    kept: set[int] = field(default_factory=set)
    removed: list[str] = field(default_factory=list)


def write_outputs(tx: Transaction, models: Mapping[str, ScannedModel], layout: Layout, named: list[NamedFile],
                  old: SplitDir | None, *, prefix: str, progress: Progress,
                  known: Mapping[str, FileRef] | None = None, max_shard_size: int | None = None,
                  links: LinkPlan | None = None) -> Written:
    """Write every new file, prove, commit. `known`: files already in the directory whose records (size,
    digests) were checked by the caller (add). `old`: the split the new one replaces (every file of it the
    new one does not use is deleted, whatever its prefix). `links`: link changes that go with the commit."""
    done = _sort_kept(tx, named, old, known)
    to_write = [i for i in range(len(named)) if i not in done.refs]
    need = sum(named[i].built.file_size for i in to_write)
    need += sum(m.header_bytes + sum(x.nbytes for x in layout.adaptor_tensors[t]) for t, m in models.items())
    check_space(tx.dir, need)
    _recheck_cached(models, layout, named, to_write, progress)
    temps, adaptors = _write_files(tx, models, layout, named, to_write, done.refs, prefix, progress)
    if max_shard_size is not None:
        _check_shard_sizes(named, to_write, layout, adaptors, prefix, max_shard_size)
    paths = {i: temps.get(i, tx.path(named[i].name)) for i in range(len(named))}
    prove_restores(models, layout, paths, {t: f.path for t, f in adaptors.items()})  # while the fsyncs finish
    tx.wait_synced()
    check_unchanged(list(models.values()))
    if links is not None:
        stage_links(tx, links)  # after the files: a new link appears after its file, an old one goes before
    if old is not None:
        done.removed = _stage_deletes(tx, old, named, models, prefix)
    tx.commit()
    return done


def _recheck_cached(models: Mapping[str, ScannedModel], layout: Layout, named: list[NamedFile], to_write: list[int],
                    progress: Progress) -> None:
    """Digests from the manifest cache are checked before anything is written: every input byte that will
    not be copied into a new file is hashed again now (copied bytes are checked in the files written, by
    read_back_check), so a stale manifest can never produce a wrong split."""
    copied = {(id(t.src), t.src_offset) for i in to_write for t in named[i].tensors}
    copied |= {(id(f), offset) for t, m in models.items() for x in layout.adaptor_tensors[t]
               for f, offset in [m.source_of(x.name)]}
    recheck_cached(list(models.values()), copied, progress)


def _sort_kept(tx: Transaction, named: list[NamedFile], old: SplitDir | None,
               known: Mapping[str, FileRef] | None) -> Written:
    """The planned files the directory already holds intact (kept, with their records); the rest is written."""
    done = Written({})
    records = recorded_refs(old) if old is not None else {}
    for i, nf in enumerate(named):
        if known is not None and nf.name in known:
            done.refs[i] = known[nf.name]
        elif os.path.lexists(tx.path(nf.name)):
            done.refs[i] = keep_file(tx.path(nf.name), nf.cid, records.get(nf.name, []), nf.planned.position)
        else:
            continue
        done.kept.add(i)
    return done


def _write_files(tx: Transaction, models: Mapping[str, ScannedModel], layout: Layout, named: list[NamedFile],
                 to_write: list[int], refs: dict[int, FileRef], prefix: str,
                 progress: Progress) -> tuple[dict[int, str], dict[str, NewFile]]:
    """Shared files first, largest first, then the adaptors, which record their digests. Each file is read
    back as soon as it is written (`read_back_check`, on another core while the kernel copies the next):
    one pass checks every tensor against the digest hashed from the inputs and gives the whole-file xxh3
    and sha256 the adaptors record. Largest first: the adaptors wait for every check, and a large file's
    sha256 (a serial stream at ~0.7 GB/s) then overlaps the smaller files' copies instead of trailing
    after the last one."""
    temps: dict[int, str] = {}
    adaptors: dict[str, NewFile] = {}
    total = sum(named[i].planned.nbytes for i in to_write) + sum(
        sum(x.nbytes for x in layout.adaptor_tensors[t]) for t in models)
    with ThreadPoolExecutor(2, thread_name_prefix="gguf-split-check") as checkers, \
            progress.bar("writing", total) as bar:
        checks: dict[int, Future[Digests]] = {}
        for i in sorted(to_write, key=lambda i: -named[i].built.file_size):
            f = _write_one(tx, named[i].name, named[i].built, named[i].tensors, bar)
            temps[i] = f.path
            checks[i] = checkers.submit(read_back_check, f, [t.digest for t in named[i].tensors], True)
        for i in to_write:
            d = _checked(checks[i], models)
            nf = named[i]
            refs[i] = FileRef(nf.planned.position, nf.name, nf.cid, nf.built.file_size, d.xxh3_hex, d.sha256 or "")
        adaptor_checks = []
        for task, m in models.items():
            built, tensors = adaptor_header(m, layout, named, refs, task)
            adaptors[task] = _write_one(tx, adaptor_name(task, prefix), built, tensors, bar)
            adaptor_checks.append(checkers.submit(read_back_check, adaptors[task], [t.digest for t in tensors],
                                                  False))
        for fut in adaptor_checks:
            _checked(fut, models)
    return temps, adaptors


def _write_one(tx: Transaction, name: str, built: BuiltHeader, tensors: list[OutTensor], bar: Reporter) -> NewFile:
    f = tx.new(name)
    tx.write(f, lambda fd: write_gguf(fd, built, tensors, bar))
    return f


def _check_shard_sizes(named: list[NamedFile], to_write: list[int], layout: Layout, adaptors: Mapping[str, NewFile],
                       prefix: str, max_shard_size: int) -> None:
    """No written file holding more than one tensor is over the shard size (a planner bug otherwise)."""
    sizes = [(named[i].name, named[i].built.file_size, len(named[i].tensors)) for i in to_write]
    sizes += [(adaptor_name(t, prefix), os.fstat(f.fd).st_size if not f.closed else os.path.getsize(f.path),
               len(layout.adaptor_tensors[t])) for t, f in adaptors.items()]
    for name, size, n in sizes:
        if size > max_shard_size and n > 1:
            raise GGUFSplitError(name, f"internal error: {size} bytes, over the shard size {max_shard_size} "
                                       "(nothing was written). Please report this.")


def _stage_deletes(tx: Transaction, old: SplitDir, named: list[NamedFile], models: Mapping[str, Any],
                   prefix: str) -> list[str]:
    """Every file of the replaced split the new one does not use, adaptors before the files they list."""
    keep = {nf.name for nf in named} | {adaptor_name(t, prefix) for t in models}
    old_adaptors = {old.name_of(p) for p in old.adaptors.values()}
    removed = sorted(old.file_names() - keep, key=lambda n: (n not in old_adaptors, n))
    for name in removed:
        tx.delete(name)
    return removed


# ---------------------------------------------------------------------------------------------------------
# Proofs before the commit


def read_back_check(new: NewFile, planned: Sequence[bytes], sha256: bool) -> Digests:
    """What was written is what was planned: the new file is read back (from the page cache: cheap) and each
    tensor's xxh3-128 and the zero padding checked, in one sweep that also gives the whole file's digests.
    This catches an input rewritten in place between hashing and copying (even with its mtime put back)
    and any writer bug, before anything is committed. Errors name the file by its final name."""
    try:
        with SplitFile(new.path) as f:
            d = sweep_file(f, sha256=sha256, zero_gaps=True)
            for t, got, want, recorded in zip(f.header.tensors, d.tensors, planned, f.digests()):
                if got != want or recorded != want:
                    raise GGUFSplitError(new.final_path, f"tensor {t.name!r} does not match its recorded digest")
            if len(d.tensors) != len(planned):
                raise GGUFSplitError(new.final_path, f"holds {len(d.tensors)} tensors, {len(planned)} were planned")
            return d
    except GGUFSplitError as e:
        raise GGUFSplitError(new.final_path, e.problem) from None


def _checked(fut: "Future[Digests]", models: Mapping[str, ScannedModel]) -> Digests:
    """A read-back check's result; a mismatch names the input that changed, or is an internal error."""
    try:
        return fut.result()
    except GGUFSplitError as e:
        check_unchanged(list(models.values()))
        forget_cached(list(models.values()))  # a cached digest may be what differs: the next run hashes
        changed = _changed_input(models)
        if changed is not None:
            raise GGUFSplitError(changed, "changed while it was being split (its tensor bytes differ from what was "
                                          "hashed); nothing was written: run the split again") from None
        raise GGUFSplitError(e.path, f"internal error: a written file does not match its records ({e.problem}); "
                                     "nothing was written. Please report this.") from None


def _changed_input(models: Mapping[str, ScannedModel]) -> str | None:
    """The first input whose tensor bytes no longer match their digests (re-hashed from its mapping)."""
    import xxhash

    for m in models.values():
        for t, _ in m.tensors:
            f, offset = m.source_of(t.name)
            if xxhash.xxh3_128(f.view(offset, offset + t.nbytes)).digest() != m.digests[t.name]:
                return f.path
    return None


def prove_restores(models: Mapping[str, ScannedModel], layout: Layout, file_paths: Mapping[int, str],
                   adaptor_paths: Mapping[str, str]) -> None:
    """Check, from the files just written, that restore rebuilds every input byte for byte (headers and the
    mapping of every tensor; tensor bytes were copied from the hashed inputs and read_back_check re-hashed them)."""
    opened: dict[int, SplitFile] = {}
    try:
        for task, m in models.items():
            shared = []
            for i in layout.task_files[task]:
                if i not in opened:
                    opened[i] = SplitFile(file_paths[i])
                shared.append(opened[i])
            with SplitFile(adaptor_paths[task]) as ad:
                _prove(m, plan_restore(TaskFiles(ad, AdaptorInfo.read(ad), shared)))
    finally:
        for f in opened.values():
            f.close()


def _prove(m: ScannedModel, plans: list[RestorePlan]) -> None:
    def fail(what: str) -> GGUFSplitError:
        return GGUFSplitError(m.path, f"internal error: the split could not prove its restore ({what}); nothing was "
                                      "written. Please report this.")

    if len(plans) != len(m.files):
        raise fail("number of files")
    for rp, inp in zip(plans, m.files):
        src, h = inp.file, inp.file.header
        if rp.size != src.size or rp.xxh3 != inp.digest.hex() or rp.name != os.path.basename(src.path):
            raise fail("size, name or digest record")
        if rp.header_bytes != src.raw(0, h.tensor_info_end):
            raise fail("header bytes differ")
        gaps = dict(inp.nonzero_gaps)
        pos = 0
        for span in rp.spans:
            if isinstance(span, Copy):
                t = h.tensor_by_name[span.tensor]
                if pos != h.data_start + t.offset or span.nbytes != t.nbytes or span.digest != m.digests[t.name]:
                    raise fail(f"tensor {t.name!r}")
                pos += span.nbytes
            elif isinstance(span, int):
                if pos in gaps:
                    raise fail(f"padding at byte {pos}")
                pos += span
            else:
                if pos and gaps.get(pos) != span:
                    raise fail(f"padding at byte {pos}")
                pos += len(span)
        if pos != src.size:
            raise fail("file size")


# ---------------------------------------------------------------------------------------------------------
# Files the directory already holds


def recorded_refs(sd: SplitDir) -> dict[str, list[FileRef]]:
    """file name -> what every adaptor of the directory recorded for it (size, content id, digests)."""
    out: dict[str, list[FileRef]] = {}
    for task in sd.tasks:
        with SplitFile(sd.adaptors[task]) as ad:
            for ref in AdaptorInfo.read(ad).files:
                out.setdefault(ref.name, []).append(ref)
    return out


def keep_file(path: str, cid: str | None, records: Sequence[FileRef], position: int) -> FileRef:
    """A shared file already in the directory that the new state keeps (a --force re-split of unchanged
    content, a file `add` reuses): it must hold exactly the content `cid` names (None: its own, for add)
    and be intact, byte for byte. When the directory's adaptors recorded it (they must agree), one xxh3
    sweep checks it against those records and their sha256 is kept; a file no adaptor records (left by a
    killed run before 0.2's journal, say) is hashed in full. One read either way."""
    if any(r != records[0] for r in records):
        raise GGUFSplitError(show(path), "the split's adaptors record different digests for this file: damaged "
                                         "(run `gguf-split verify`)")
    try:
        with SplitFile(path) as f:
            f.check_seal()
            info = SharedInfo.read(f)
            if cid is not None and info.content_id != cid:
                raise ContentMismatch(show(path), "exists with other content than this split would write: move it "
                                                  "away")
            if records:
                check_file(f, records)
                return records[0]
            d = sweep_file(f, sha256=True)
    except ContentMismatch:
        raise
    except GGUFSplitError as e:
        raise GGUFSplitError(show(path), f"exists and is not the file this split would keep ({e.problem}): move it "
                                         "away or run `gguf-split verify`") from None
    return FileRef(position, os.path.basename(path), info.content_id, os.path.getsize(path), d.xxh3_hex,
                   d.sha256 or "")
