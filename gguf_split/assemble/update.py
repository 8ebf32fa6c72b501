"""Grow and shrink a shipped split: `add` tasks, `remove` tasks; no shipped file ever changes.

Users ship a split once (to phones, edge boxes, a hub) and publish new fine-tunes for months. `add`
writes adaptors for the new tasks, reusing every existing shared file whose tensors a new task holds
byte-identical at its position, and new shared files among the new tasks where they pay off; the
originals of the existing tasks are not needed, and no existing file is touched (same bytes, same mtime).
New shared files are cut as the split's records say its files were cut (`gguf_split.cut`; a split made
before cuts existed records none and keeps 0.2's layout), unless the caller names another cut.
`remove` deletes tasks' adaptors and every shared file no remaining task uses, never one still in use.
Both commit like `split` (commit.py): a kill at any moment leaves the old or the new state. The llama.cpp
links the tool made (links.py) change in the same commit: a removed task's go, a task that gets files
whose names such links already carry (a 0.2 `remove` left them dangling) has them made right. A models
directory is checked before anything is written and brought up to date after the commit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..disk.commit import Transaction
from ..errors import GGUFSplitError
from ..splitdir.links import check_models_dir, models_dir_note, plan_links, stage_links, write_models_dir
from ..format.names import check_task_name, show
from .plan import (CHANGED, CUT_SCHEME, DEFAULT_FILE_COST, DEFAULT_MAX_SHARED_FILES, ONLY_HERE, RETYPED, Cut,
                   FixedFile, TensorId, plan_layout)
from ..disk.progress import QUIET, Progress
from ..format.records import FileRef, SplitFile
from .scan import hash_models
from .split import (
    SplitReport,
    _name_files,
    _report,
    _write,
    as_cut,
    check_options,
    keep_file,
    open_models,
    planner_options,
    recorded_refs,
    task_paths_after,
)
from ..splitdir.directory import FileFinder, SplitDir, TaskFiles, open_task


@dataclass
class AddReport:
    split: SplitReport  # the new tasks: their adaptors and the files they load
    reused_bytes: int  # tensor bytes the new tasks load from files that were already there
    existing_tasks: list[str]
    stored_bytes: int  # tensor bytes of the whole split after the add
    fresh_split_bytes: int  # what a fresh split of all tasks would store
    dry_run: bool = False
    cut: str = "none"  # how the new shared files were cut (the split's recorded cut unless one was given)
    model_bytes: int = 0  # tensor bytes of the new models
    new_bytes: int = 0  # tensor bytes the add writes: the new adaptors and new shared files
    unique_bytes: int = 0  # of the new models' tensors, those no existing task holds (what any add must write)
    in_adaptors_bytes: int = 0  # tensors the new tasks hold that sit in existing tasks' adaptors (no layout can
    #                             reuse them: shipped files never change)

    @property
    def resplit_would_save(self) -> int:
        return max(0, self.stored_bytes - self.fresh_split_bytes)


# why a tensor of a new task sits in its adaptor, told against the split (the planner saw the new tasks only)
IN_ADAPTOR = "in another task's adaptor"  # a task of the split holds these bytes, in its adaptor only
IN_FILE = "in a file it cannot load"  # a shared file holds them, with tensors this task changed


def _add_reasons(report: SplitReport, ids: Mapping[str, Sequence[TensorId]], fixed: Mapping[str, FixedFile],
                 new_ids: Mapping[str, Sequence[TensorId]]) -> None:
    """Reasons for the new adaptors' tensors against the whole split: a tensor no task of the split has is
    changed (or of another type or shape, or in no model of the split); one it has sits in another task's
    adaptor or in a shared file the new task cannot load. Reasons about the new tasks among themselves
    (too small for a file, over the cap) stay."""
    held = {x for xs in ids.values() for x in xs}
    in_files = {x for f in fixed.values() for x in f.tensors}
    kinds: dict[str, set[tuple[int, tuple[int, ...]]]] = {}
    for xs in ids.values():
        for x in xs:
            kinds.setdefault(x.name, set()).add((x.ggml_type, x.shape))
    for t in report.tasks:
        mine = {x.name: x for x in new_ids[t.task]}
        for name, why in t.reasons.items():
            if why not in (CHANGED, RETYPED, ONLY_HERE):
                continue
            x = mine[name]
            if x in in_files:
                t.reasons[name] = IN_FILE
            elif x in held:
                t.reasons[name] = IN_ADAPTOR
            elif name not in kinds:
                t.reasons[name] = ONLY_HERE
            else:
                t.reasons[name] = CHANGED if (x.ggml_type, x.shape) in kinds[name] else RETYPED


@dataclass
class RemoveReport:
    directory: str
    removed_tasks: list[str]
    deleted: list[str] = field(default_factory=list)  # file names
    freed_bytes: int = 0
    dry_run: bool = False
    links: list[str] = field(default_factory=list)  # llama.cpp links of the removed tasks, deleted with them


def task_tensor_ids(tf: TaskFiles) -> list[TensorId]:
    """A task's tensor identities in model order, from records only (no tensor data read)."""
    from ..format.gguf import parse_tensor_infos
    from ..format.records import K_SRC_TENSOR_INFOS

    held: dict[str, TensorId] = {}
    for f in tf.files:
        for t, d in zip(f.header.tensors, f.digests()):
            held[t.name] = TensorId(t.name, t.ggml_type, t.shape, d, t.nbytes)
    order = parse_tensor_infos(tf.adaptor.blob(K_SRC_TENSOR_INFOS), tf.adaptor.path, 1)
    return [held[t.name] for t in order if t.name in held]


@dataclass
class _Existing:
    ids: dict[str, list[TensorId]]  # task -> tensor ids, model order
    fixed: dict[str, FixedFile]  # shared file name -> what the planner may reuse
    paths: dict[str, str]  # shared file name -> path
    archs: set[str]
    cuts: dict[str, tuple[str, int]]  # adaptor path -> (recorded cut, its name scheme)


def _existing(sd: SplitDir) -> _Existing:
    """What `add` needs of a split, from its records (no tensor data read)."""
    finder = FileFinder()
    cache: dict[str, SplitFile] = {}
    ids: dict[str, list[TensorId]] = {}
    fixed: dict[str, FixedFile] = {}
    paths: dict[str, str] = {}
    archs: set[str] = set()
    cuts: dict[str, tuple[str, int]] = {}
    try:
        for task in sd.tasks:
            tf = open_task(sd.adaptors[task], finder, cache=cache)
            cuts[tf.adaptor.path] = (tf.info.cut, tf.info.cut_scheme)
            with tf.adaptor:
                ids[task] = task_tensor_ids(tf)
                arch = tf.adaptor.get("general.architecture")
                if isinstance(arch, str):
                    archs.add(arch)
                for ref, f in zip(tf.info.files, tf.shared):
                    if ref.name not in fixed:
                        fixed[ref.name] = FixedFile(ref.name, ref.position, tuple(
                            TensorId(t.name, t.ggml_type, t.shape, d, t.nbytes)
                            for t, d in zip(f.header.tensors, f.digests())))
                        paths[ref.name] = f.path
    finally:
        for f in cache.values():
            f.close()
    return _Existing(ids, fixed, paths, archs, cuts)


def recorded_cut(cuts: Mapping[str, tuple[str, int]]) -> Cut:
    """The cut a split's adaptors record (the one most of them record; a split made before cuts existed:
    none). A damaged record, or a name scheme this version does not know, is refused naming the adaptor."""
    parsed: dict[Cut, int] = {}
    for path, (text, scheme) in cuts.items():
        try:
            cut = Cut.parse(text, scheme)
        except ValueError:
            raise GGUFSplitError(show(path), f"records cut {text!r}, which this version does not know: damaged, "
                                             "or written by a newer gguf-split (pass --cut to choose one)") from None
        if cut.kind != "none" and scheme != CUT_SCHEME:
            raise GGUFSplitError(show(path), f"its shared files were cut with tensor-name scheme {scheme}, which this "
                                             f"version does not know (it knows {CUT_SCHEME}); pass --cut to choose a "
                                             "cut, or use the gguf-split that made the split")
        parsed[cut] = parsed.get(cut, 0) + 1
    if not parsed:
        return Cut()
    return max(parsed, key=lambda c: (parsed[c], str(c) == "none", str(c)))


def add(split_dir: str | os.PathLike[str], tasks: Mapping[str, str | os.PathLike[str]], *,
        max_shared_files: int | None = DEFAULT_MAX_SHARED_FILES, file_cost: int = DEFAULT_FILE_COST,
        max_shard_size: int | None = None, allow_unrelated: bool = False, threads: int | None = None,
        dry_run: bool = False, models_dir: str | os.PathLike[str] | None = None, prefix: str = "",
        progress: Progress = QUIET, cut: Cut | str | None = None) -> AddReport:
    """Add `tasks` (name -> GGUF path) to the split in `split_dir`. `cut`: how to cut new shared files (None:
    as the split's records say its files were cut; "none" for a split made by gguf-split 0.2)."""
    check_options(tasks, max_shared_files=max_shared_files, file_cost=file_cost, max_shard_size=max_shard_size)
    given_cut = None if cut is None else as_cut(cut)
    if not tasks:
        raise GGUFSplitError(None, "no tasks to add")
    for t in tasks:
        check_task_name(t)
    d = os.fspath(split_dir)
    sd0 = SplitDir.open(d)
    sd0.require_split(" (its last task was removed?): make a new split with `gguf-split split MODEL... -o DIR`")
    if models_dir is not None:
        check_models_dir(models_dir, [*sd0.tasks, *tasks])  # before anything is read or written
    options = dict(max_shared_files=max_shared_files, file_cost=file_cost, max_shard_size=max_shard_size,
                   cut=given_cut)
    if dry_run:
        return _add(d, sd0, tasks, None, options, allow_unrelated, threads, prefix, progress)
    tx = Transaction(d, create=False, on_wait=progress.note, what="the split")
    models_dir_done = models_dir is None
    try:
        with tx:
            sd = SplitDir.read_once(d)  # under the lock: the state the add changes
            sd.require_split(" (its last task was removed?): make a new split with `gguf-split split MODEL... "
                             "-o DIR`")
            report = _add(d, sd, tasks, tx, options, allow_unrelated, threads, prefix, progress)
        if models_dir is not None:
            write_models_dir(d, models_dir)
            models_dir_done = True
            report.split.models_dir = os.fspath(models_dir)
    except BaseException as e:
        if models_dir is None or not tx.committed or models_dir_done:
            raise
        raise tx.note(e, models_dir_note(d, models_dir)) from None
    return report


def _add(d: str, sd: SplitDir, tasks: Mapping[str, str | os.PathLike[str]], tx: Transaction | None,
         given: dict[str, Any], allow_unrelated: bool, threads: int | None, prefix: str,
         progress: Progress) -> AddReport:
    clash = [t for t in tasks if t in sd.adaptors]
    if clash:
        raise GGUFSplitError(show(sd.adaptors[clash[0]]), f"task {clash[0]!r} is already in the split; remove it "
                                                          "first or choose another name")
    ex = _existing(sd)
    ids, fixed, fixed_paths, archs = ex.ids, ex.fixed, ex.paths, ex.archs
    cut = given["cut"] if given["cut"] is not None else recorded_cut(ex.cuts)
    options = planner_options(max_shared_files=given["max_shared_files"], file_cost=given["file_cost"],
                              max_shard_size=given["max_shard_size"], cut=cut)
    models = open_models(tasks, allow_unrelated=allow_unrelated)
    try:
        if not allow_unrelated:
            for t, m in models.items():
                if archs and m.architecture not in archs:
                    raise GGUFSplitError(m.path, f"is a {m.architecture} model, the split holds {', '.join(sorted(archs))} "
                                                 "models (pass --allow-unrelated to add it anyway)")
        hash_models(list(models.values()), progress, threads)
        new_ids = {t: m.tensor_ids() for t, m in models.items()}
        alignment = max(m.first.header.alignment for m in models.values())
        head = {t: m.header_bytes + 4096 + 200 * len(m.tensors) for t, m in models.items()}
        layout = plan_layout(new_ids, alignment=alignment, adaptor_header_bytes=head,
                             fixed_files=list(fixed.values()), **options)
        named = _name_files(models, layout, prefix, foundation=False)
        known: dict[str, FileRef] = {}
        records = recorded_refs(sd)
        for pf, nf in zip(layout.files, named):
            if pf.fixed is not None:
                nf.name = pf.fixed
                if pf.fixed not in known:  # still intact, byte for byte, and as every adaptor recorded it
                    known[pf.fixed] = keep_file(fixed_paths[pf.fixed], None, records[pf.fixed], pf.position) \
                        if tx is not None else records[pf.fixed][0]
        reused_bytes = sum(pf.nbytes for t in models for i in layout.task_files[t]
                           for pf in [layout.files[i]] if pf.fixed is not None)
        if tx is None:
            split_report = _report(d, models, layout, named, {}, dry_run=True, prefix=prefix,
                                   max_shard_size=given["max_shard_size"])
        else:
            after = task_paths_after(tx.dir, models, layout, named, prefix)
            split_files = [tx.path(n) for n in sd.file_names()] + [p for ps in after.values() for p in ps]
            links = plan_links(tx.dir, tx.dir, split_files, after)  # only tasks with the tool's links: 0.2 leftovers
            split_report = _write(tx, models, layout, named, None, prefix=prefix, progress=progress, known=known,
                                  max_shard_size=given["max_shard_size"], links=links)
        stored_before = sum(x.nbytes for f in fixed.values() for x in f.tensors)
        stored_before += _adaptor_tensor_bytes(ids, fixed)
        stored = stored_before + (layout.stats.stored_bytes if layout.stats else 0)
        fresh = plan_layout({**ids, **new_ids}, alignment=alignment, **options)
        unique, in_adaptors = _new_bytes(ids, fixed, new_ids)
        _add_reasons(split_report, ids, fixed, new_ids)
        return AddReport(split_report, reused_bytes, sd.tasks, stored,
                         fresh.stats.stored_bytes if fresh.stats else stored, dry_run=tx is None, cut=str(cut),
                         model_bytes=sum(x.nbytes for xs in new_ids.values() for x in xs),
                         new_bytes=layout.stats.stored_bytes if layout.stats else 0, unique_bytes=unique,
                         in_adaptors_bytes=in_adaptors)
    finally:
        for m in models.values():
            m.close()


def _new_bytes(ids: Mapping[str, Sequence[TensorId]], fixed: Mapping[str, FixedFile],
               new_ids: Mapping[str, Sequence[TensorId]]) -> tuple[int, int]:
    """(bytes of the new tasks' tensors no existing task holds, bytes of those that existing tasks hold in their
    adaptors only), summed over the new tasks."""
    held = {x for xs in ids.values() for x in xs}
    in_files = {x for f in fixed.values() for x in f.tensors}
    unique = sum(x.nbytes for xs in new_ids.values() for x in xs if x not in held)
    return unique, sum(x.nbytes for xs in new_ids.values() for x in xs if x in held and x not in in_files)


def _adaptor_tensor_bytes(ids: Mapping[str, Sequence[TensorId]], fixed: Mapping[str, FixedFile]) -> int:
    in_files = {x for f in fixed.values() for x in f.tensors}
    return sum(x.nbytes for xs in ids.values() for x in xs if x not in in_files)


def remove(split_dir: str | os.PathLike[str], names: Sequence[str], *, dry_run: bool = False,
           models_dir: str | os.PathLike[str] | None = None, progress: Progress = QUIET) -> RemoveReport:
    """Remove tasks: their adaptors, every file no remaining task uses, and the llama.cpp links the tool made
    for them (links.py), in one commit. A task named twice is removed once."""
    if isinstance(names, str):
        raise TypeError("names must be a sequence of task names, not a str")
    names = list(dict.fromkeys(names))
    if not names:
        raise GGUFSplitError(None, "no tasks to remove")
    d = os.fspath(split_dir)
    if models_dir is not None:
        check_models_dir(models_dir)  # before anything is written (its entries: once the tasks are known)

    def run(tx: Transaction | None) -> RemoveReport:
        sd = SplitDir.open(d) if tx is None else SplitDir.read_once(d)  # under the lock: the state it changes
        sd.require_split()
        for n in names:
            sd.adaptor(n)
        if models_dir is not None:
            check_models_dir(models_dir, [t for t in sd.tasks if t not in names])
        files = {task: sd.task_file_names(task) for task in sd.tasks}
        keep = {name for task in sd.tasks if task not in names for name in files[task]}
        report = RemoveReport(os.path.abspath(d), list(names), dry_run=tx is None)
        for task in names:
            p = sd.adaptors[task]
            report.deleted.append(sd.name_of(p))
            report.freed_bytes += os.path.getsize(p)
        for name in sorted({n for task in names for n in files[task][1:]} - keep):
            path = sd.shared.get(name)
            if path is not None:
                report.deleted.append(name)
                report.freed_bytes += os.path.getsize(path)
        after: dict[str, list[str] | None] = {task: None if task in names else [os.path.join(d, n) for n in f]
                                              for task, f in files.items()}
        links = plan_links(d, d, [os.path.join(d, n) for n in sd.file_names()], after)
        report.links = sorted(links.delete)
        if tx is not None:
            stage_links(tx, links)  # the links go first, then the adaptors, then the files they list
            for name in report.deleted:
                tx.delete(name)
            tx.commit()
        return report

    if dry_run:
        return run(None)
    tx = Transaction(d, create=False, on_wait=progress.note, what="the split")
    models_dir_done = models_dir is None
    try:
        with tx:
            report = run(tx)
        if models_dir is not None:
            write_models_dir(d, models_dir)
            models_dir_done = True
    except BaseException as e:
        if models_dir is None or not tx.committed or models_dir_done:
            raise
        raise tx.note(e, models_dir_note(d, models_dir)) from None
    return report
