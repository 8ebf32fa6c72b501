"""Split: scan + plan + write + prove + commit, the library call behind `gguf-split split`.

Order of work, so that every refusal comes before the long part and nothing is left half done:
1. check names and options; take the output directory's lock (before reading any input);
2. open every input (headers, padding): refuse wrong files, shards without siblings, architecture
   mismatches and inputs the outputs would overwrite; then refuse an output that holds other tasks (they
   would be orphaned: `remove` or `add` them), or this split's tasks without `force`. Inputs come first so
   that an error suggests `--force` only when `--force` would get past it; all of this before any tensor
   is hashed;
3. hash, plan (plan.py, a pure function), check free space;
4. write every new file under a temporary name (shared files first, then the adaptors that record their
   sizes and digests), prove every task's restore from what was written, check the inputs did not change,
   and commit (commit.py): the old split stays complete until the switch, and its files that the new split
   does not use (adaptors under another prefix included) are deleted only after it. llama.cpp links the
   tool made for a task (links.py) change in the same commit: made with `link`, updated when the task's
   files change, never left pointing at an old file list;
5. the models directory (another directory, checked in step 1) is brought up to date after the commit; a
   failure or an interruption there says that the split is complete and how to finish.
A file the new split needs that the directory already holds (same name, same content id: a re-split that
changed one task keeps the others' shared files) is kept, not rewritten.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..disk.commit import Transaction, check_space
from ..errors import GGUFSplitError
from ..splitdir.links import LinkPlan, check_models_dir, models_dir_note, plan_links, stage_links, write_models_dir
from ..format.names import adaptor_name, check_prefix, check_task_name, hole_name, own_part_name, shared_name, show
from .plan import (DEFAULT_CUT, DEFAULT_FILE_COST, DEFAULT_MAX_SHARED_FILES, HOLE, MIN_SHARD_SIZE, OWN, Cut, Layout,
                   PlannedFile, TensorId, plan_layout)
from ..disk.progress import QUIET, Progress
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
from ..splitdir.restore import Copy, plan_restore
from .scan import ScannedModel, check_input_path, check_unchanged, hash_models, open_model
from ..disk.jobs import run_jobs
from ..disk.sweep import sweep_file
from ..splitdir.directory import SplitDir, TaskFiles
from ..splitdir.verify import check_file
from ..disk.copy import file_digests, write_gguf


@dataclass
class FileReport:
    """One file of the split (besides the adaptors)."""

    name: str
    kind: str  # "foundation", "shared", "hole" or "own"
    position: int
    tensors: int
    tensor_bytes: int
    bytes: int  # file size
    tasks: list[str]  # tasks that load it
    kept: bool = False  # already in the directory with the same content: not rewritten


@dataclass
class TaskReport:
    task: str
    sources: list[str]  # the original file(s)
    source_bytes: int
    adaptor: str
    adaptor_bytes: int  # file size
    tensors: int  # tensors in the adaptor
    tensor_bytes: int
    model_tensors: int
    model_tensor_bytes: int
    files: list[str]  # the task's other files, positions 1..k
    reasons: dict[str, str] = field(default_factory=dict)  # adaptor tensor -> why it is not shared
    missing: list[str] = field(default_factory=list)  # tensors other tasks have, this one does not
    links: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.sources[0]

    @property
    def shared_share(self) -> float:
        """Fraction of this model's tensor bytes served by shared files."""
        return 1 - self.tensor_bytes / self.model_tensor_bytes if self.model_tensor_bytes else 0.0


@dataclass
class SplitReport:
    directory: str
    files: list[FileReport]
    tasks: list[TaskReport]
    dedup_optimum: int  # every distinct tensor version once (tensor bytes)
    exact: bool  # the plan is proven minimal (else a greedy, within `lower_bound`)
    lower_bound: int
    small_group_bytes: int
    dry_run: bool = False
    removed: list[str] = field(default_factory=list)  # old files the commit deleted
    models_dir: str | None = None
    max_shard_size: int | None = None  # the limit the split was cut to, if any

    @property
    def oversize(self) -> list[tuple[str, int]]:
        """(file name, bytes) of every file over `max_shard_size`: each holds one tensor larger than the limit
        (a tensor cannot be cut; llama.cpp's own `--split-max-size` does the same)."""
        if self.max_shard_size is None:
            return []
        sizes = [(f.name, f.bytes) for f in self.files] + [(os.path.basename(t.adaptor), t.adaptor_bytes)
                                                           for t in self.tasks]
        return [(name, size) for name, size in sizes if size > self.max_shard_size]

    @property
    def input_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tasks)

    @property
    def output_bytes(self) -> int:
        return sum(f.bytes for f in self.files) + sum(t.adaptor_bytes for t in self.tasks)

    @property
    def saved_bytes(self) -> int:
        return self.input_bytes - self.output_bytes

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    @property
    def shares_anything(self) -> bool:
        return any(f.kind in ("foundation", "shared") for f in self.files)


def as_cut(value: Cut | str) -> Cut:
    """A cut given as a Cut or as its text ("none", "role", "role:6", "tensor"); ValueError/TypeError otherwise."""
    if isinstance(value, Cut):
        return value
    if not isinstance(value, str):
        raise TypeError(f"cut must be a Cut or one of none, role, role:N, tensor, not {value!r}")
    return Cut.parse(value)


def planner_options(*, max_shared_files: int | None, file_cost: int, max_shard_size: int | None,
                    cut: Cut) -> dict[str, Any]:
    """plan_layout's keywords for the tool's options: --max-shared-files bounds both the shared groups a task
    loads and every file it loads, holes included (plan/__init__.py)."""
    return dict(max_shared_files=max_shared_files, max_files=max_shared_files, file_cost=file_cost,
                max_shard_size=max_shard_size, cut=cut)


def check_options(tasks: Mapping[str, str | os.PathLike[str]], *, max_shared_files: int | None,
                  file_cost: int, max_shard_size: int | None) -> None:
    """Programming errors (wrong types, impossible values) are TypeError/ValueError, not GGUFSplitError."""
    if not isinstance(tasks, Mapping):
        raise TypeError(f"tasks must be a mapping of task name -> path, not {type(tasks).__name__}")
    if max_shared_files is not None and (not isinstance(max_shared_files, int) or max_shared_files < 1):
        raise ValueError(f"max_shared_files must be a whole number >= 1, not {max_shared_files!r}")
    if not isinstance(file_cost, int) or file_cost < 0:
        raise ValueError(f"file_cost must be a whole number of bytes >= 0, not {file_cost!r}")
    if max_shard_size is not None and (not isinstance(max_shard_size, int) or max_shard_size < MIN_SHARD_SIZE):
        raise ValueError(f"max_shard_size must be at least 1 MiB, not {max_shard_size!r}")


def open_models(tasks: Mapping[str, str | os.PathLike[str]], *, allow_unrelated: bool,
                protect: Sequence[str] = ()) -> dict[str, ScannedModel]:
    """Open every model (headers only) and check what can be checked before hashing."""
    models: dict[str, ScannedModel] = {}
    try:
        seen: dict[str, str] = {}
        for task, path in tasks.items():
            check_input_path(path)
            real = os.path.realpath(path)
            if real in seen:
                raise GGUFSplitError(show(path), f"is given twice (tasks {seen[real]!r} and {task!r})")
            seen[real] = task
            models[task] = open_model(task, path)
        archs = {t: m.architecture for t, m in models.items()}
        if not allow_unrelated and len(set(archs.values())) > 1:
            first = next(iter(models))
            other = next(t for t in models if archs[t] != archs[first])
            listing = ", ".join(f"{t}={a}" for t, a in archs.items())
            raise GGUFSplitError(models[other].path, f"general.architecture differs between tasks ({listing}); these "
                                                     "models cannot share tensors (pass --allow-unrelated to split anyway)")
        return models
    except BaseException:
        for m in models.values():
            m.close()
        raise


def split(tasks: Mapping[str, str | os.PathLike[str]], output: str | os.PathLike[str], *, prefix: str = "",
          force: bool = False, link: bool = False, allow_unrelated: bool = False,
          max_shared_files: int | None = DEFAULT_MAX_SHARED_FILES, file_cost: int = DEFAULT_FILE_COST,
          max_shard_size: int | None = None, threads: int | None = None, dry_run: bool = False,
          models_dir: str | os.PathLike[str] | None = None, progress: Progress = QUIET,
          cut: Cut | str = DEFAULT_CUT) -> SplitReport:
    """Split `tasks` (name -> GGUF path, or a sharded model's first shard) into `output`. `cut`: where shared
    groups are cut into files so that tasks added later reuse more (plan.Cut; "none" is 0.2's layout);
    `max_shared_files`: at most this many files per task besides its adaptor, holes included (None: no cap)."""
    check_options(tasks, max_shared_files=max_shared_files, file_cost=file_cost, max_shard_size=max_shard_size)
    cut = as_cut(cut)
    if not tasks:
        raise GGUFSplitError(None, "no tasks given")
    for task in tasks:
        check_task_name(task)
    check_prefix(prefix)
    out = os.fspath(output)
    if out == "":
        raise GGUFSplitError(None, "-o/--output: empty path")
    options = planner_options(max_shared_files=max_shared_files, file_cost=file_cost, max_shard_size=max_shard_size,
                              cut=cut)
    if models_dir is not None:
        check_models_dir(models_dir, tasks)  # before anything is read or written
    if dry_run:
        models = open_models(tasks, allow_unrelated=allow_unrelated)
        try:
            _check_existing(out, tasks, prefix, force) if os.path.isdir(out) else None
            hash_models(list(models.values()), progress, threads)
            layout = _plan(models, options)
            return _report(out, models, layout, _name_files(models, layout, prefix), {}, dry_run=True, prefix=prefix,
                           max_shard_size=max_shard_size)
        finally:
            for m in models.values():
                m.close()
    tx = Transaction(out, on_wait=progress.note, what="the split")
    models_dir_done = models_dir is None
    try:
        with tx:
            models = open_models(tasks, allow_unrelated=allow_unrelated)
            try:
                for m in models.values():
                    for inp in m.files:
                        if os.path.dirname(os.path.realpath(inp.path)) == os.path.realpath(tx.dir) and \
                                os.path.basename(inp.path) in {adaptor_name(t, prefix) for t in tasks}:
                            raise GGUFSplitError(inp.path, "output would overwrite an input file")
                old = _check_existing(tx.dir, tasks, prefix, force)
                hash_models(list(models.values()), progress, threads)
                layout = _plan(models, options)
                st = layout.stats
                if len(models) > 1 and not allow_unrelated and st is not None and st.dedup_optimum >= st.input_bytes:
                    a, b = list(models.values())[:2]
                    raise GGUFSplitError(b.path, f"has no tensor in common with {show(a.path)}: nothing to share "
                                                 "(pass --allow-unrelated to split anyway)")
                named = _name_files(models, layout, prefix)
                links = plan_links(tx.dir, tx.dir, [tx.path(n) for n in _names_before_and_after(old, named, models,
                                                                                               prefix)],
                                   task_paths_after(tx.dir, models, layout, named, prefix), set(models) if link else ())
                report = _write(tx, models, layout, named, old, prefix=prefix, progress=progress,
                                max_shard_size=max_shard_size, links=links)
            finally:
                for m in models.values():
                    m.close()
        if models_dir is not None:
            write_models_dir(report.directory, models_dir)
            models_dir_done = True
            report.models_dir = os.fspath(models_dir)
    except BaseException as e:
        if not tx.committed or models_dir_done or models_dir is None:
            raise
        raise tx.note(e, models_dir_note(out, models_dir)) from None
    return report


def _names_before_and_after(old: SplitDir | None, named: Sequence[NamedFile], models: Mapping[str, Any],
                            prefix: str) -> set[str]:
    """Every file name of the split before and after a change (what the tool's links may point at)."""
    names = old.file_names() if old is not None else set()
    return names | {nf.name for nf in named} | {adaptor_name(t, prefix) for t in models}


def task_paths_after(directory: str, models: Mapping[str, Any], layout: Layout, named: Sequence[NamedFile],
                     prefix: str) -> dict[str, list[str]]:
    """Each new task's files in llama.cpp order, as they will be named in `directory`."""
    return {t: [os.path.join(directory, adaptor_name(t, prefix)),
                *(os.path.join(directory, named[i].name) for i in layout.task_files[t])] for t in models}


def _plan(models: Mapping[str, ScannedModel], options: dict[str, Any]) -> Layout:
    ids = {t: m.tensor_ids() for t, m in models.items()}
    alignment = max(m.first.header.alignment for m in models.values())
    head = {t: m.header_bytes + 4096 + 200 * len(m.tensors) for t, m in models.items()}
    return plan_layout(ids, alignment=alignment, adaptor_header_bytes=head, **options)


@dataclass
class NamedFile:
    """A planned file with everything its bytes depend on: name, content id, header, sources."""

    planned: PlannedFile
    name: str
    kind: str
    cid: str
    tensors: list[OutTensor]
    built: BuiltHeader


def _name_files(models: Mapping[str, ScannedModel], layout: Layout, prefix: str, *,
                foundation: bool = True) -> list[NamedFile]:
    """Name every planned file after its content. The file every task of a split loads is the foundation
    (`foundation=False` for files added later to a split: they do not serve every task)."""
    all_tasks = set(models) if foundation else set()
    out: list[NamedFile] = []
    for pf in layout.files:
        holders = [models[t] for t in pf.tasks] if pf.kind != HOLE else []
        tensors = [_out_tensor(x, holders) for x in pf.tensors]
        if pf.kind == HOLE:
            alignment, arch = 32, None
        else:
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
        out.append(NamedFile(pf, name, kind, cid, tensors, built))
    return out


def _out_tensor(x: TensorId, holders: Sequence[ScannedModel]) -> OutTensor:
    for m in holders:
        if m.digests.get(x.name) == x.digest:
            src, offset = m.source_of(x.name)
            return OutTensor(x.name, x.shape, x.ggml_type, x.nbytes, x.digest, src, offset)
    raise AssertionError(f"planned tensor {x.name} has no source")


def _check_existing(directory: str, tasks: Mapping[str, Any], prefix: str, force: bool) -> SplitDir | None:
    """Refuse to orphan other tasks, or to replace this split's tasks without `force`."""
    if not os.path.isdir(directory):
        return None
    sd = SplitDir.open(directory)
    others = [t for t in sd.tasks if t not in tasks]
    if others:
        raise GGUFSplitError(show(directory), f"holds a split with other tasks ({', '.join(others)}) that this split "
                                              "does not include: add them with -t, remove them first (`gguf-split "
                                              "remove`), use `gguf-split add` to add tasks, or split into another "
                                              "directory")
    if sd.tasks and not force:
        raise GGUFSplitError(show(sd.adaptors[sd.tasks[0]]), "already exists (use --force to replace the split)")
    for task in tasks:
        name = adaptor_name(task, prefix)
        p = os.path.join(directory, name)
        if os.path.lexists(p) and (task not in sd.adaptors or sd.name_of(sd.adaptors[task]) != name):
            raise GGUFSplitError(show(p), "exists and is not this task's adaptor; move it away first")
    return sd


def _write(tx: Transaction, models: Mapping[str, ScannedModel], layout: Layout, named: list[NamedFile],
           old: SplitDir | None, *, prefix: str, progress: Progress,
           known: Mapping[str, FileRef] | None = None, max_shard_size: int | None = None,
           links: LinkPlan | None = None) -> SplitReport:
    """Write every new file, prove, commit. `known`: files already in the directory whose records (size,
    digests) were checked by the caller (add). `old`: the split the new one replaces (every file of it the
    new one does not use is deleted, whatever its prefix). `links`: link changes that go with the commit."""
    from concurrent.futures import ThreadPoolExecutor

    refs: dict[int, FileRef] = {}
    kept: set[int] = set()
    to_write: list[int] = []
    records = recorded_refs(old) if old is not None else {}
    for i, nf in enumerate(named):
        existing = tx.path(nf.name)
        if known is not None and nf.name in known:
            refs[i] = known[nf.name]
            kept.add(i)
        elif os.path.lexists(existing):
            refs[i] = keep_file(existing, nf.cid, records.get(nf.name, []), nf.planned.position)
            kept.add(i)
        else:
            to_write.append(i)
    adaptors: dict[str, Any] = {}
    need = sum(named[i].built.file_size for i in to_write)
    need += sum(m.header_bytes + sum(x.nbytes for x in layout.adaptor_tensors[t]) for t, m in models.items())
    check_space(tx.dir, need)
    hashers = ThreadPoolExecutor(2, thread_name_prefix="gguf-split-digest")
    temps: dict[int, str] = {}
    try:
        total = sum(named[i].planned.nbytes for i in to_write) + sum(
            sum(x.nbytes for x in layout.adaptor_tensors[t]) for t in models)
        with progress.bar("writing", total) as bar:
            futures = {i: hashers.submit(file_digests, named[i].built, named[i].tensors) for i in to_write}
            for i in to_write:
                nf = named[i]
                f = tx.new(nf.name)
                temps[i] = f.path
                built, tensors = nf.built, nf.tensors
                tx.write(f, lambda fd: write_gguf(fd, built, tensors, bar))
            for i in to_write:
                x, s = futures[i].result()
                nf = named[i]
                refs[i] = FileRef(nf.planned.position, nf.name, nf.cid, nf.built.file_size, x, s)
            for task, m in models.items():
                a_built, a_tensors = _adaptor(m, layout, named, refs, task)
                adaptors[task] = tx.new(adaptor_name(task, prefix))
                tx.write(adaptors[task], lambda fd: write_gguf(fd, a_built, a_tensors, bar))
    finally:
        hashers.shutdown(wait=True)
    tx.wait_synced()
    if max_shard_size is not None:
        sizes = [(named[i].name, named[i].built.file_size, len(named[i].tensors)) for i in to_write]
        sizes += [(adaptor_name(t, prefix), os.fstat(f.fd).st_size if not f.closed else os.path.getsize(f.path),
                   len(layout.adaptor_tensors[t])) for t, f in adaptors.items()]
        for name, size, n in sizes:
            if size > max_shard_size and n > 1:
                raise GGUFSplitError(name, f"internal error: {size} bytes, over the shard size {max_shard_size} "
                                           "(nothing was written). Please report this.")
    file_paths = {i: temps.get(i, tx.path(named[i].name)) for i in range(len(named))}
    _prove_all(models, layout, named, file_paths, {t: f.path for t, f in adaptors.items()})
    check_unchanged(list(models.values()))
    _check_written([(temps[i], [refs[i]]) for i in to_write] + [(f.path, []) for f in adaptors.values()], models)
    if links is not None:
        stage_links(tx, links)  # after the files: a new link appears after its file, an old one goes before
    removed: list[str] = []
    if old is not None:
        keep = {nf.name for nf in named} | {adaptor_name(t, prefix) for t in models}
        old_adaptors = {old.name_of(p) for p in old.adaptors.values()}
        for name in sorted(old.file_names() - keep, key=lambda n: (n not in old_adaptors, n)):
            tx.delete(name)  # adaptors before the files they list
            removed.append(name)
    tx.commit()
    report = _report(tx.dir, models, layout, named, refs, kept=kept, removed=removed, prefix=prefix,
                     max_shard_size=max_shard_size)
    if links is not None:
        for t in report.tasks:
            t.links = links.paths(t.task)
    return report


def _check_written(files: Sequence[tuple[str, list[FileRef]]], models: Mapping[str, ScannedModel]) -> None:
    """What was written is what was recorded: every new file is read back (from the page cache: cheap) and
    each tensor's xxh3-128, the padding and the whole file's digests checked against the records. This
    catches an input rewritten in place between hashing and copying (even with its mtime put back) and any
    writer bug, before anything is committed."""
    opened = [(SplitFile(path), refs) for path, refs in files]
    try:
        run_jobs(check_file, [(f, refs) for f, refs in opened], None)
    except GGUFSplitError as e:
        check_unchanged(list(models.values()))
        changed = _changed_input(models)
        if changed is not None:
            raise GGUFSplitError(changed, "changed while it was being split (its tensor bytes differ from what was "
                                          "hashed); nothing was written: run the split again") from None
        raise GGUFSplitError(e.path, f"internal error: a written file does not match its records ({e.problem}); "
                                     "nothing was written. Please report this.") from None
    finally:
        for f, _ in opened:
            f.close()


def _changed_input(models: Mapping[str, ScannedModel]) -> str | None:
    """The first input whose tensor bytes no longer match their digests (re-hashed from its mapping)."""
    import xxhash

    for m in models.values():
        for t, i in m.tensors:
            f = m.files[i].file
            if xxhash.xxh3_128(f.view(f.header.data_start + t.offset,
                                      f.header.data_start + t.offset + t.nbytes)).digest() != m.digests[t.name]:
                return f.path
    return None


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
                raise GGUFSplitError(show(path), "exists with other content than this split would write: move it "
                                                 "away")
            if records:
                check_file(f, records)
                return records[0]
            d = sweep_file(f, sha256=True)
    except GGUFSplitError as e:
        if "other content" in e.problem:
            raise
        raise GGUFSplitError(show(path), f"exists and is not the file this split would keep ({e.problem}): move it "
                                         "away or run `gguf-split verify`") from None
    return FileRef(position, os.path.basename(path), info.content_id, os.path.getsize(path), d.xxh3_hex, d.sha256 or "")


def _adaptor(m: ScannedModel, layout: Layout, named: list[NamedFile], refs: Mapping[int, FileRef],
             task: str) -> tuple[BuiltHeader, list[OutTensor]]:
    own = [_out_tensor(x, [m]) for x in layout.adaptor_tensors[task]]
    order = layout.task_files[task]
    files = [refs[i] for i in order]
    where: dict[str, int] = {x.name: 0 for x in layout.adaptor_tensors[task]}
    for pos, i in enumerate(order, start=1):
        for x in named[i].planned.tensors:
            where[x.name] = pos
    tensor_files = [where[t.name] for t, _ in m.tensors]
    source = m.source_records()
    kvs = adaptor_kvs(task=task, files=files, tensor_files=tensor_files, digests=b"".join(t.digest for t in own),
                      source=source, n_model_tensors=len(m.tensors), cut=str(layout.cut), cut_scheme=layout.cut.scheme)
    return build_header(kvs, source.kept_kvs, own, m.first.header.alignment), own


def _prove_all(models: Mapping[str, ScannedModel], layout: Layout, named: list[NamedFile],
               file_paths: Mapping[int, str], adaptor_paths: Mapping[str, str]) -> None:
    """Check, from the files just written, that restore rebuilds every input byte for byte (headers and the
    mapping of every tensor; tensor bytes were copied from the hashed inputs and verify re-hashes them)."""
    opened: dict[int, SplitFile] = {}
    try:
        for task, m in models.items():
            shared = []
            for i in layout.task_files[task]:
                if i not in opened:
                    opened[i] = SplitFile(file_paths[i])
                shared.append(opened[i])
            with SplitFile(adaptor_paths[task]) as ad:
                tf = TaskFiles(ad, AdaptorInfo.read(ad), shared)
                _prove(m, plan_restore(tf))
    finally:
        for f in opened.values():
            f.close()


def _prove(m: ScannedModel, plans: list[Any]) -> None:
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


def _report(directory: str, models: Mapping[str, ScannedModel], layout: Layout, named: list[NamedFile],
            refs: Mapping[int, FileRef], *, dry_run: bool = False, kept: set[int] | None = None,
            removed: list[str] | None = None, prefix: str = "", max_shard_size: int | None = None) -> SplitReport:
    """The split's report. A dry run's adaptor sizes are exact: each adaptor's header is built as the write
    builds it, from what it will record of every planned file (digests of the same length)."""
    kept = kept or set()
    planned = {i: refs[i] if i in refs else FileRef(nf.planned.position, nf.name, nf.cid, nf.built.file_size,
                                                    "0" * 32, "0" * 64) for i, nf in enumerate(named)}
    loaders: dict[int, list[str]] = {}  # file index -> the tasks that load it (a hole's come from the orders)
    for task_name, order in layout.task_files.items():
        for i in order:
            loaders.setdefault(i, []).append(task_name)
    files = [FileReport(nf.name, nf.kind, nf.planned.position, len(nf.tensors), nf.planned.nbytes,
                        refs[i].size if i in refs else nf.built.file_size, loaders.get(i, []), i in kept)
             for i, nf in enumerate(named)]
    all_names: dict[str, None] = {}
    for m in models.values():
        for t, _ in m.tensors:
            all_names.setdefault(t.name)
    tasks = []
    for task, m in models.items():
        own = layout.adaptor_tensors[task]
        path = os.path.join(directory, adaptor_name(task, prefix))
        size = os.path.getsize(path) if not dry_run and os.path.exists(path) else \
            _adaptor(m, layout, named, planned, task)[0].file_size
        have = {t.name for t, _ in m.tensors}
        tasks.append(TaskReport(task, [inp.path for inp in m.files], m.size, path, size, len(own),
                                sum(x.nbytes for x in own), len(m.tensors), m.tensor_bytes,
                                [named[i].name for i in layout.task_files[task]], dict(layout.reasons.get(task, {})),
                                [n for n in all_names if n not in have]))
    st = layout.stats
    return SplitReport(os.path.abspath(directory), files, tasks, st.dedup_optimum if st else 0,
                       st.exact if st else False, st.lower_bound if st else 0, st.small_group_bytes if st else 0,
                       dry_run=dry_run, removed=removed or [], max_shard_size=max_shard_size)
