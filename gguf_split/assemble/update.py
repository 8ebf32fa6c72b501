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
from dataclasses import dataclass
from typing import Any

from ..disk.commit import Transaction
from ..disk.manifest import ManifestSource
from ..disk.progress import QUIET, Progress
from ..errors import GGUFSplitError
from ..format.names import adaptor_name, show
from ..format.records import K_Q_TYPE, FileRef, SplitFile
from ..splitdir.directory import FileFinder, SplitDir, TaskFiles, open_task
from ..splitdir.links import check_models_dir, models_dir_note, plan_links, stage_links, write_models_dir
from .options import SplitOptions
from .outputs import keep_file, name_files, recorded_refs, write_outputs
from .plan import CHANGED, CUT_SCHEME, ONLY_HERE, RETYPED, Cut, FixedFile, Layout, TensorId, plan_layout
from .report import AddReport, RemoveReport, SplitReport, split_report
from .scan import ScannedModel, hash_models, open_inputs
from .split import check_tasks, manifest_cache, plan, task_paths_after

NO_SPLIT_HINT = " (its last task was removed?): make a new split with `gguf-split split MODEL... -o DIR`"


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
    ex = _Existing({}, {}, {}, set(), {})
    try:
        for task in sd.tasks:
            tf = open_task(sd.adaptors[task], finder, cache=cache)
            ex.cuts[tf.adaptor.path] = (tf.info.cut, tf.info.cut_scheme)
            with tf.adaptor:
                ex.ids[task] = task_tensor_ids(tf)
                arch = tf.adaptor.get("general.architecture")
                if isinstance(arch, str):
                    ex.archs.add(arch)
                for ref, f in zip(tf.info.files, tf.shared):
                    if ref.name not in ex.fixed:
                        ex.fixed[ref.name] = FixedFile(ref.name, ref.position, tuple(
                            TensorId(t.name, t.ggml_type, t.shape, d, t.nbytes)
                            for t, d in zip(f.header.tensors, f.digests())))
                        ex.paths[ref.name] = f.path
    finally:
        for f in cache.values():
            f.close()
    return ex


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


def add(split_dir: str | os.PathLike[str], tasks: Mapping[str, str | os.PathLike[str]],
        options: SplitOptions | None = None, *, dry_run: bool = False, progress: Progress = QUIET,
        cache: ManifestSource | None = None, **option_values: Any) -> AddReport:
    """Add `tasks` (name -> GGUF path) to the split in `split_dir`. Options as for `split` (the planner's, and
    allow_unrelated, threads, models_dir); the new files take the split's own prefix."""
    opts = (options or SplitOptions()).merged(option_values)
    if isinstance(tasks, Mapping) and not tasks:
        raise GGUFSplitError(None, "no tasks to add")
    check_tasks(tasks)
    d = os.fspath(split_dir)
    sd0 = SplitDir.open(d)
    sd0.require_split(NO_SPLIT_HINT)
    if opts.models_dir is not None:
        check_models_dir(opts.models_dir, [*sd0.tasks, *tasks])  # before anything is read or written
    with manifest_cache(opts, progress, cache) as source:
        if dry_run:
            return _add(sd0, tasks, None, opts, progress, source)
        return _add_in(d, tasks, opts, progress, source)


def _add_in(d: str, tasks: Mapping[str, str | os.PathLike[str]], opts: SplitOptions, progress: Progress,
            cache: ManifestSource | None) -> AddReport:
    tx = Transaction(d, create=False, on_wait=progress.note, what="the split")
    models_dir_done = opts.models_dir is None
    try:
        with tx:
            sd = SplitDir.read_once(d)  # under the lock: the state the add changes
            sd.require_split(NO_SPLIT_HINT)
            report = _add(sd, tasks, tx, opts, progress, cache)
        if opts.models_dir is not None:
            write_models_dir(d, opts.models_dir)
            models_dir_done = True
            report.split.models_dir = opts.models_dir
    except BaseException as e:
        if opts.models_dir is None or not tx.committed or models_dir_done:
            raise
        raise tx.note(e, models_dir_note(d, opts.models_dir)) from None
    return report


def split_prefix(sd: SplitDir, wanted: str = "") -> str:
    """The file-name prefix the split was written with (read from its adaptors' names): files added to it
    carry the same. A different prefix asked for (`wanted`, e.g. a spec's) is refused."""
    found: dict[str, str] = {}
    for task, path in sd.adaptors.items():
        name, suffix = sd.name_of(path), adaptor_name(task)
        if name.endswith(suffix):
            found.setdefault(name[:-len(suffix)], name)
    if len(found) > 1:
        raise GGUFSplitError(show(sd.directory), f"its adaptors carry different prefixes ({', '.join(found.values())})"
                                                 ": damaged")
    prefix = next(iter(found), "")
    if wanted and wanted != prefix:
        raise GGUFSplitError(show(sd.directory), f"its files carry the prefix {prefix!r}, not {wanted!r}: added files "
                                                 "take the split's prefix")
    return prefix


def _add(sd: SplitDir, tasks: Mapping[str, str | os.PathLike[str]], tx: Transaction | None, opts: SplitOptions,
         progress: Progress, cache: ManifestSource | None = None) -> AddReport:
    clash = [t for t in tasks if t in sd.adaptors]
    if clash:
        raise GGUFSplitError(show(sd.adaptors[clash[0]]), f"task {clash[0]!r} is already in the split; remove it "
                                                          "first or choose another name")
    prefix = split_prefix(sd, opts.prefix)
    ex = _existing(sd)
    ids, fixed = ex.ids, ex.fixed
    cut = recorded_cut(ex.cuts) if opts.cut is None else Cut.parse(opts.cut)
    models = open_inputs(tasks, allow_unrelated=opts.allow_unrelated)
    family, stored = None, None
    try:
        _refuse_other_architecture(models, ex.archs, opts)
        recipe, stored = _recipe_and_units(sd, opts, models)
        # quantized: hashed afresh, as split does (split._cache_unless_quantizing says why)
        hash_models(list(models.values()), progress, opts.threads, cache if recipe is None else None)
        if recipe is not None:
            from .quantize.family import quantize_inputs

            family = quantize_inputs(models, recipe, tx=tx, progress=progress, threads=opts.threads, stored=stored)
            models = family.models
        layout = plan(models, opts, cut, fixed_files=list(fixed.values()))
        named = name_files(models, layout, prefix, foundation=False)
        known = _reused(layout, named, sd, ex.paths, check=tx is not None)
        reused_bytes = sum(pf.nbytes for t in models for i in layout.task_files[t]
                           for pf in [layout.files[i]] if pf.fixed is not None)
        split_rep = _write_added(sd, tx, models, layout, named, known, prefix, opts, progress)
        stored_bytes = sum(x.nbytes for f in fixed.values() for x in f.tensors) + _adaptor_tensor_bytes(ids, fixed)
        stored_bytes += layout.stats.stored_bytes if layout.stats else 0
        new_ids = {t: m.tensor_ids() for t, m in models.items()}
        fresh = plan_layout({**ids, **new_ids}, alignment=max(m.first.header.alignment for m in models.values()),
                            max_shared_files=opts.max_shared_files, max_files=opts.max_shared_files,
                            file_cost=opts.file_cost, max_shard_size=opts.max_shard_size, cut=cut)
        unique, in_adaptors = _new_bytes(ids, fixed, new_ids)
        _add_reasons(split_rep, ids, fixed, new_ids)
        split_rep.quantize = family.report if family is not None else None
        return AddReport(split_rep, reused_bytes, sd.tasks, stored_bytes,
                         fresh.stats.stored_bytes if fresh.stats else stored_bytes,
                         dry_run=tx is None, cut=str(cut), model_bytes=sum(x.nbytes for xs in new_ids.values() for x in xs),
                         new_bytes=layout.stats.stored_bytes if layout.stats else 0, unique_bytes=unique,
                         in_adaptors_bytes=in_adaptors)
    finally:
        for m in models.values():
            m.close()
        if family is not None:
            family.close_stores()
        if stored is not None:
            stored.close()


def _recipe_and_units(sd: SplitDir, opts: SplitOptions, models: Mapping[str, ScannedModel]) -> tuple[Any, Any]:
    """(the recipe the added tasks are quantized with or None, the split's quantized units or None), read
    before any model is hashed: a quantized split's recipe applies to a full-precision model added to it
    (an already quantized one is added as it is, as without --quantize)."""
    quantized = False
    for path in sd.adaptors.values():
        with SplitFile(path) as ad:
            quantized = quantized or K_Q_TYPE in ad.header.kv_by_key
    asked = any(getattr(opts, n) is not None for n in ("quantize", "imatrix", "quantize_template", "quantize_args"))
    if not quantized and not asked:
        return None, None
    from .quantize.family import add_recipe, is_quantized_type, stored_units

    if not asked and all(any(is_quantized_type(t.ggml_type) for t, _ in m.tensors) for m in models.values()):
        return None, None

    stored = stored_units(sd)
    try:
        return add_recipe(opts, stored, sd.directory), stored
    except BaseException:
        stored.close()
        raise


def _new_bytes(ids: Mapping[str, Sequence[TensorId]], fixed: Mapping[str, FixedFile],
               new_ids: Mapping[str, Sequence[TensorId]]) -> tuple[int, int]:
    """(bytes of the new tasks' tensors no existing task holds, bytes of those that existing tasks hold in their
    adaptors only), summed over the new tasks."""
    held = {x for xs in ids.values() for x in xs}
    in_files = {x for f in fixed.values() for x in f.tensors}
    unique = sum(x.nbytes for xs in new_ids.values() for x in xs if x not in held)
    return unique, sum(x.nbytes for xs in new_ids.values() for x in xs if x in held and x not in in_files)


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


def _refuse_other_architecture(models: Mapping[str, ScannedModel], archs: set[str], opts: SplitOptions) -> None:
    if opts.allow_unrelated or not archs:
        return
    for m in models.values():
        if m.architecture not in archs:
            raise GGUFSplitError(m.path, f"is a {m.architecture} model, the split holds {', '.join(sorted(archs))} "
                                         "models (pass --allow-unrelated to add it anyway)")


def _reused(layout: Layout, named: list[Any], sd: SplitDir, fixed_paths: Mapping[str, str],
            check: bool) -> dict[str, FileRef]:
    """The existing files the plan reuses, under their own names; with `check`, each proven intact, byte
    for byte and as every adaptor recorded it (keep_file), before anything is written."""
    known: dict[str, FileRef] = {}
    records = recorded_refs(sd)
    for pf, nf in zip(layout.files, named):
        if pf.fixed is not None:
            nf.name = pf.fixed
            if pf.fixed not in known:
                known[pf.fixed] = keep_file(fixed_paths[pf.fixed], None, records[pf.fixed], pf.position) \
                    if check else records[pf.fixed][0]
    return known


def _write_added(sd: SplitDir, tx: Transaction | None, models: Mapping[str, ScannedModel], layout: Layout,
                 named: list[Any], known: dict[str, FileRef], prefix: str, opts: SplitOptions,
                 progress: Progress) -> SplitReport:
    d = sd.directory
    if tx is None:
        return split_report(d, models, layout, named, {}, dry_run=True, prefix=prefix,
                            max_shard_size=opts.max_shard_size)
    after = task_paths_after(tx.dir, models, layout, named, prefix)
    split_files = [tx.path(n) for n in sd.file_names()] + [p for ps in after.values() for p in ps]
    links = plan_links(tx.dir, tx.dir, split_files, after)  # only tasks with the tool's links: 0.2 leftovers
    done = write_outputs(tx, models, layout, named, None, prefix=prefix, progress=progress, known=known,
                         max_shard_size=opts.max_shard_size, links=links)
    report = split_report(tx.dir, models, layout, named, done.refs, kept=done.kept, removed=done.removed,
                          prefix=prefix, max_shard_size=opts.max_shard_size)
    for t in report.tasks:
        t.links = links.paths(t.task)
    return report


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
