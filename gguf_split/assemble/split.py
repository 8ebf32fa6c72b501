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
from typing import Any

from ..disk.commit import Transaction
from ..disk.manifest import ManifestSource
from ..disk.manifest_cache import open_cache
from ..disk.progress import QUIET, Progress
from ..errors import GGUFSplitError
from ..format.names import adaptor_name, check_task_name, show
from ..splitdir.directory import SplitDir
from ..splitdir.links import check_models_dir, models_dir_note, plan_links, write_models_dir
from .options import SplitOptions, cut_of
from .outputs import NamedFile, name_files, write_outputs
from .plan import Cut, Layout, plan_layout
from .report import SplitReport, near_miss_report, split_report
from .scan import ScannedModel, hash_models, open_inputs


def check_tasks(tasks: object) -> None:
    """`tasks` is a non-empty mapping of valid task names (a library caller's mistake is a TypeError)."""
    if not isinstance(tasks, Mapping):
        raise TypeError(f"tasks must be a mapping of task name -> path, not {type(tasks).__name__}")
    if not tasks:
        raise GGUFSplitError(None, "no tasks given")
    for task in tasks:
        check_task_name(task)


def split(tasks: Mapping[str, str | os.PathLike[str]], output: str | os.PathLike[str],
          options: SplitOptions | None = None, *, dry_run: bool = False, progress: Progress = QUIET,
          cache: ManifestSource | None = None, **option_values: Any) -> SplitReport:
    """Split `tasks` (name -> GGUF path, or a sharded model's first shard) into `output`. Options: a
    SplitOptions, and/or its fields as keywords (`force=True, file_cost=0`), which take precedence.
    `cache`: where the inputs' manifests are looked up and left (default: the manifest cache the options
    name, disk.manifest_cache); planning trusts them, writing re-checks every input byte it does not copy."""
    opts = (options or SplitOptions()).merged(option_values)
    check_tasks(tasks)
    out = os.fspath(output)
    if out == "":
        raise GGUFSplitError(None, "-o/--output: empty path")
    if opts.models_dir is not None:
        check_models_dir(opts.models_dir, tasks)  # before anything is read or written
    with manifest_cache(opts, progress, cache) as source:
        if dry_run:
            return _dry_run(tasks, out, opts, progress, source)
        return _split(tasks, out, opts, progress, source)


def _split(tasks: Mapping[str, str | os.PathLike[str]], out: str, opts: SplitOptions, progress: Progress,
           cache: ManifestSource | None) -> SplitReport:
    tx = Transaction(out, on_wait=progress.note, what="the split")
    models_dir_done = opts.models_dir is None
    try:
        with tx:
            report = _split_in(tx, tasks, opts, progress, cache)
        if opts.models_dir is not None:
            write_models_dir(report.directory, opts.models_dir)
            models_dir_done = True
            report.models_dir = opts.models_dir
    except BaseException as e:
        if not tx.committed or models_dir_done or opts.models_dir is None:
            raise
        raise tx.note(e, models_dir_note(out, opts.models_dir)) from None
    return report


class manifest_cache:
    """`with manifest_cache(opts, progress, given) as cache:` the caller's manifest source, else the cache
    the options ask for (None with no_cache, or when it cannot be used: its notices say why), closed at the
    end if opened here."""

    def __init__(self, opts: SplitOptions, progress: Progress, given: ManifestSource | None = None) -> None:
        c = None if given is not None else open_cache(opts.cache_dir, no_cache=opts.no_cache, note=progress.note)
        self.cache = given if given is not None else c if c is not None and c.enabled else None
        self._opened = c

    def __enter__(self) -> ManifestSource | None:
        return self.cache

    def __exit__(self, *exc: object) -> None:
        if self._opened is not None:
            self._opened.close()


def _dry_run(tasks: Mapping[str, str | os.PathLike[str]], out: str, opts: SplitOptions, progress: Progress,
             cache: ManifestSource | None) -> SplitReport:
    models = open_inputs(tasks, allow_unrelated=opts.allow_unrelated)
    family = None
    try:
        if os.path.isdir(out):
            _check_existing(out, tasks, opts.prefix, opts.force)
        recipe = _recipe(opts)
        hash_models(list(models.values()), progress, opts.threads, _cache_unless_quantizing(cache, recipe))
        near = near_miss_report(models)
        if recipe is not None:
            old = SplitDir.open(out) if os.path.isdir(out) and opts.force else None
            family = _quantize(models, recipe, None, opts, progress, old)
            models = family.models
        report = plan_report(out, models, opts)
        report.quantize = family.report if family is not None else None
        report.near_misses = near
        return report
    finally:
        _close(models, family)


def _cache_unless_quantizing(cache: ManifestSource | None, recipe: Any) -> ManifestSource | None:
    """The manifest cache, unless the inputs are quantized: a source tensor's digest keys the unit quantized
    from it (and the units a re-split or `add` takes from the split's store), and a unit's input is never
    written as it is, so the read-back recheck of cached digests (outputs) would not cover it. Quantizing
    costs far more than hashing, so the inputs are hashed afresh."""
    return cache if recipe is None else None


def _recipe(opts: SplitOptions) -> Any:
    """The quantization recipe (quantize.family.recipe_of), None without --quantize; the quantize package is
    imported only when it is used (it pulls in numpy and, for quantizing, llama.cpp)."""
    if opts.quantize is None and opts.imatrix is None and opts.quantize_template is None and opts.quantize_args is None:
        return None
    from .quantize.family import recipe_of

    return recipe_of(opts)


def _quantize(models: Mapping[str, ScannedModel], recipe: Any, tx: Transaction | None, opts: SplitOptions,
              progress: Progress, old: SplitDir | None) -> Any:
    """Quantize the inputs; a re-split (`force`) takes the units the directory's split already holds (its
    files stay open until the outputs are written), as `add` does."""
    from .quantize.family import quantize_inputs, reusable_units

    stored = reusable_units(old) if old is not None else None
    try:
        family = quantize_inputs(models, recipe, tx=tx, progress=progress, threads=opts.threads, stored=stored)
    except BaseException:
        if stored is not None:
            stored.close()
        raise
    if stored is not None:
        family.stores += stored.files  # the family's models may copy from them: closed with its stores
    return family


def _close(models: Mapping[str, ScannedModel], family: Any) -> None:
    for m in models.values():
        m.close()
    if family is not None:
        family.close_stores()


def plan_report(output: str, models: Mapping[str, ScannedModel], opts: SplitOptions) -> SplitReport:
    """What a split of hashed `models` into `output` would write, without writing (a dry run, a survey):
    every file's exact size (adaptors built with placeholder digests of the same length)."""
    layout = plan(models, opts)
    return split_report(output, models, layout, name_files(models, layout, opts.prefix), {}, dry_run=True,
                        prefix=opts.prefix, max_shard_size=opts.max_shard_size)


def _split_in(tx: Transaction, tasks: Mapping[str, str | os.PathLike[str]], opts: SplitOptions,
              progress: Progress, cache: ManifestSource | None) -> SplitReport:
    """Under the directory's lock: open, refuse what must be refused, hash, plan, write, prove, commit."""
    models = open_inputs(tasks, allow_unrelated=opts.allow_unrelated)
    family = None
    try:
        mine = {adaptor_name(t, opts.prefix) for t in tasks}
        for m in models.values():
            for inp in m.watched_files():
                if os.path.dirname(os.path.realpath(inp.path)) == os.path.realpath(tx.dir) and \
                        os.path.basename(inp.path) in mine:
                    raise GGUFSplitError(inp.path, "output would overwrite an input file")
        old = _check_existing(tx.dir, tasks, opts.prefix, opts.force)
        recipe = _recipe(opts)
        hash_models(list(models.values()), progress, opts.threads, _cache_unless_quantizing(cache, recipe))
        if recipe is not None:
            family = _quantize(models, recipe, tx, opts, progress, old)
            models = family.models
        layout = plan(models, opts)
        _refuse_unrelated(models, layout, opts)
        named = name_files(models, layout, opts.prefix)
        after = task_paths_after(tx.dir, models, layout, named, opts.prefix)
        links = plan_links(tx.dir, tx.dir, [tx.path(n) for n in _names_before_and_after(old, named, models, opts.prefix)],
                           after, set(models) if opts.link else ())
        done = write_outputs(tx, models, layout, named, old, prefix=opts.prefix, progress=progress,
                             max_shard_size=opts.max_shard_size, links=links)
        report = split_report(tx.dir, models, layout, named, done.refs, kept=done.kept, removed=done.removed,
                              prefix=opts.prefix, max_shard_size=opts.max_shard_size)
        for t in report.tasks:
            t.links = links.paths(t.task)
        report.quantize = family.report if family is not None else None
        return report
    finally:
        _close(models, family)


def _refuse_unrelated(models: Mapping[str, ScannedModel], layout: Layout, opts: SplitOptions) -> None:
    st = layout.stats
    if len(models) > 1 and not opts.allow_unrelated and st is not None and st.dedup_optimum >= st.input_bytes:
        a, b = list(models.values())[:2]
        raise GGUFSplitError(b.path, f"has no tensor in common with {show(a.path)}: nothing to share "
                                     "(pass --allow-unrelated to split anyway)")


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


def plan(models: Mapping[str, ScannedModel], opts: SplitOptions, cut: Cut | None = None, **more: Any) -> Layout:
    """The planner on the models' tensor identities, with the options that shape a plan: --max-shared-files
    bounds both the shared groups a task loads and every file it loads, holes included (plan/__init__.py);
    `cut`: the cut to make (default: the options')."""
    ids = {t: m.tensor_ids() for t, m in models.items()}
    alignment = max(m.first.header.alignment for m in models.values())
    head = {t: m.header_bytes + 4096 + 200 * len(m.tensors) for t, m in models.items()}
    return plan_layout(ids, alignment=alignment, adaptor_header_bytes=head, max_shared_files=opts.max_shared_files,
                       max_files=opts.max_shared_files, file_cost=opts.file_cost, max_shard_size=opts.max_shard_size,
                       cut=cut if cut is not None else cut_of(opts), **more)


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
