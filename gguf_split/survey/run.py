"""The survey: which of these models are one family, and what would a split of each save?

1. discover the files under the paths (discover.py);
2. scan each file once: its manifest from the cache when the cache holds one for the file as it is now,
   else hashed, here on a thread pool or on a Dask cluster (cluster.py), and left in the cache;
3. models from files (shards joined, gguf-split's own splits and packs set apart), candidate families
   from shared tensors (families.py);
4. plan each candidate as `split` would with the given options (`assemble.split.plan_report`: the bytes
   split would write, every file's size exact): the headers of its members are read again (adaptors repeat
   them), no tensor byte; a candidate whose split shares nothing is no family. Members a split would give
   nothing shared are left out and the rest planned again;
5. what headers say about related models that share little (families.related).
Every file that cannot be used is one `Problem` line in the report and the survey goes on.
"""

from __future__ import annotations

import os
import re
import shlex
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import GGUFSplitError
from ..assemble.options import SplitOptions
from ..disk.jobs import run_jobs
from ..disk.progress import QUIET, Progress, Reporter
from .discover import Problem, check_roots, discover
from .families import (
    Model,
    OtherFile,
    PackFound,
    Related,
    SplitFound,
    assemble,
    candidate_families,
    family_label,
    family_note,
    related,
    task_names,
)
from ..disk.manifest import FileKey, FileManifest, ManifestSource
from .manifest import scan_file

MAX_REPLANS = 3


@dataclass
class MemberReport:
    task: str
    path: str
    files: list[str]  # the model's files (its shards)
    bytes: int
    type: str  # the ggml type holding most of its tensor bytes
    shared: float  # fraction of its tensor bytes a split serves from shared files


@dataclass
class FamilyReport:
    architecture: str
    label: str
    members: list[MemberReport]
    input_bytes: int
    split_bytes: int  # every file `split` would write with these options (adaptors included)
    dedup_bytes: int  # tensor bytes of every distinct tensor once (the optimum no split beats)
    shared_files: int
    output: str
    command: str
    notes: list[str] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return self.input_bytes - self.split_bytes


@dataclass
class ModelInfo:
    path: str
    architecture: str
    bytes: int
    type: str
    label: str


@dataclass
class ScanStats:
    files: int = 0  # files scanned (models, shards, gguf-split files, packs)
    bytes: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    cached_files: int = 0  # manifests the cache had
    seconds: float = 0.0
    cache: str | None = None  # the cache file used
    scheduler: str | None = None


@dataclass
class SurveyReport:
    families: list[FamilyReport]
    alone: list[ModelInfo]
    related: list[Related]
    splits: list[SplitFound]
    packs: list[PackFound]
    others: list[OtherFile]  # GGUF files that are no models (LoRA adapters, importance matrices, ...)
    skipped: list[Problem]
    scan: ScanStats

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "families": [{**asdict(f), "members": [m.path for m in f.members], "tasks": {m.task: m.path for m in f.members},
                          "member_info": [asdict(m) for m in f.members], "saved_bytes": f.saved_bytes}
                         for f in self.families],
            "alone": [m.path for m in self.alone],
            "alone_info": [asdict(m) for m in self.alone],
            "related": [asdict(r) for r in self.related],
            "splits": [asdict(s) for s in self.splits],
            "packs": [asdict(p) for p in self.packs],
            "others": [asdict(o) for o in self.others],
            "skipped": [{"path": p.path, "problem": p.problem} for p in self.skipped],
            "scan": asdict(self.scan),
        }


class KnownManifests:
    """The manifests of this run (by file key: however a path reaches the file), over the cache: what the
    planning step's scanner (assemble.scan.hash_models) asks instead of hashing again."""

    def __init__(self, backing: ManifestSource | None) -> None:
        self.backing = backing
        self._by_key: dict[FileKey, FileManifest] = {}
        self._lock = threading.Lock()

    def remember(self, m: FileManifest) -> None:
        with self._lock:
            self._by_key[m.key] = m

    def lookup(self, path: str, st: os.stat_result) -> FileManifest | None:
        with self._lock:
            m = self._by_key.get(FileKey.of(st))
        if m is not None:
            return m.with_path(path)
        return self.backing.lookup(path, st) if self.backing is not None else None

    def store(self, manifest: FileManifest) -> None:
        self.remember(manifest)
        if self.backing is not None:
            self.backing.store(manifest)

    def forget(self, path: str, st: os.stat_result) -> None:
        with self._lock:
            self._by_key.pop(FileKey.of(st), None)
        if self.backing is not None:
            self.backing.forget(path, st)


def survey(paths: Iterable[str | os.PathLike[str]], options: SplitOptions | None = None, *,
           cache: ManifestSource | None = None, scheduler: str | None = None, progress: Progress = QUIET,
           **option_values: Any) -> SurveyReport:
    """Survey the GGUF files under `paths` (see the module docstring). Each family is planned as `split`
    would with `options` (the split options; keywords as for split, e.g. file_cost=0). `cache`: a
    ManifestCache (or any ManifestSource); `scheduler`: a Dask scheduler's address to scan on (the
    `distributed` extra)."""
    opts = (options or SplitOptions()).merged(option_values)
    threads = opts.threads
    t0 = time.perf_counter()
    if scheduler is not None:
        from .cluster import import_distributed

        import_distributed()  # before any work: without the extra, one line saying how to install it
    roots = check_roots(paths)
    found = discover(roots)
    skipped = list(found.problems)
    known = KnownManifests(cache)
    stats = ScanStats(cache=getattr(cache, "path", None), scheduler=scheduler)
    manifests = scan_files(found.files, known, stats, skipped, scheduler=scheduler, threads=threads, progress=progress)
    found_kinds = assemble(manifests)
    models = found_kinds.models
    skipped += found_kinds.problems
    families, unit_of = plan_families(models, known, opts, skipped, threads)
    alone = [ModelInfo(m.path, m.architecture, m.size, m.type, m.label)
             for i, m in enumerate(models) if unit_of[i] < 0]
    units = [u if u >= 0 else -1 - i for i, u in enumerate(unit_of)]  # a model alone is a unit of its own
    stats.seconds = time.perf_counter() - t0
    return SurveyReport(families, alone, related(models, units), found_kinds.splits, found_kinds.packs,
                        found_kinds.others, skipped, stats)


# --- scanning -------------------------------------------------------------------------------------------

def scan_files(files: Sequence[str], known: KnownManifests, stats: ScanStats, skipped: list[Problem], *,
               scheduler: str | None, threads: int | None, progress: Progress) -> list[FileManifest]:
    """Every file's manifest, in the order of `files` (cached, else scanned); problems go to `skipped`."""
    results: dict[str, FileManifest | Problem] = {}
    todo: list[tuple[str, os.stat_result]] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError as e:
            results[path] = Problem(path, f"cannot examine: {e.strerror or e}")
            continue
        hit = known.lookup(path, st)
        if hit is not None:
            known.remember(hit)
            results[path] = hit
            stats.cached_files += 1
        else:
            todo.append((path, st))
    total = sum(st.st_size for _, st in todo)
    with progress.bar("hashing", total) as bar:
        if scheduler is not None and todo:
            from .cluster import scan_on_cluster

            scan_on_cluster(scheduler, todo, known, results, bar)
        else:
            run_jobs(_scan_one, [(path, known, results, bar) for path, _ in todo], threads)
    out = []
    for path in files:
        r = results[path]
        if isinstance(r, Problem):
            skipped.append(r)
            continue
        out.append(r)
        stats.files += 1
        stats.bytes += r.size
    stats.hashed_files = sum(1 for p, _ in todo if isinstance(results[p], FileManifest))
    stats.hashed_bytes = sum(st.st_size for p, st in todo if isinstance(results[p], FileManifest))
    return out


def _scan_one(path: str, known: KnownManifests, results: dict[str, FileManifest | Problem], bar: Reporter,
              cancel: threading.Event) -> None:
    try:
        m = scan_file(path, bar, cancel)
    except GGUFSplitError as e:
        results[path] = Problem(path, e.problem)
        return
    known.store(m)
    results[path] = m


# --- families -------------------------------------------------------------------------------------------

def plan_families(models: Sequence[Model], known: KnownManifests, options: SplitOptions,
                  skipped: list[Problem], threads: int | None) -> tuple[list[FamilyReport], list[int]]:
    """The families among the candidates, and per model its family's index (-1: alone)."""
    unit_of = [-1] * len(models)
    families: list[FamilyReport] = []
    outputs: set[str] = set()
    index = {m.path: i for i, m in enumerate(models)}
    for group in candidate_families(models):
        for report in plan_family([models[i] for i in group], known, options, skipped, threads, outputs):
            for m in report.members:
                unit_of[index[m.path]] = len(families)
            families.append(report)
    order = sorted(range(len(families)), key=lambda k: -families[k].saved_bytes)  # the largest saving first
    new_index = {old: new for new, old in enumerate(order)}
    return [families[k] for k in order], [new_index[u] if u >= 0 else -1 for u in unit_of]


def plan_family(members: Sequence[Model], known: KnownManifests, options: SplitOptions, skipped: list[Problem],
                threads: int | None, outputs: set[str]) -> list[FamilyReport]:
    """Plan a candidate as `split` would: no family when the split shares nothing, several when its shared
    files fall into groups of tasks no file joins (separate splits would store them as well)."""
    from ..assemble.scan import ScannedModel, hash_models, open_input

    names = task_names([m.path for m in members])
    by_task = dict(zip(names, members))
    opened: dict[str, ScannedModel] = {}
    try:
        for name, m in by_task.items():
            try:
                opened[name] = open_input(name, m.path)
            except GGUFSplitError as e:
                skipped.append(Problem(m.path, e.problem))
        hash_models(list(opened.values()), QUIET, threads, known)
        return _plan_tasks(list(opened), opened, by_task, options, outputs)
    finally:
        for sm in opened.values():
            sm.close()


def _plan_tasks(tasks: list[str], opened: Mapping[str, Any], by_task: Mapping[str, Model], options: SplitOptions,
                outputs: set[str]) -> list[FamilyReport]:
    from ..assemble.split import plan_report

    for attempt in range(MAX_REPLANS):
        if len(tasks) < 2:
            return []
        output = _output_name([by_task[t] for t in tasks], outputs)
        report = plan_report(output, {t: opened[t] for t in tasks}, options)
        if not report.shares_anything:
            return []
        parts = _joined(tasks, report)
        if len(parts) > 1:
            return [f for part in parts for f in _plan_tasks(part, opened, by_task, options, outputs)]
        nothing = {t.task for t in report.tasks if t.shared_share <= 0}
        if not nothing or attempt == MAX_REPLANS - 1:
            break
        tasks = [t for t in tasks if t not in nothing]
    outputs.add(output)
    chosen = [by_task[t] for t in tasks]
    share = {t.task: t.shared_share for t in report.tasks}
    notes = [n for n in [family_note(chosen, [share[t] for t in tasks])] if n is not None]
    return [FamilyReport(chosen[0].architecture, family_label(chosen),
                         [MemberReport(t, m.path, [f.path for f in m.files], m.size, m.type, share[t])
                          for t, m in zip(tasks, chosen)],
                         report.input_bytes, report.output_bytes, report.dedup_optimum,
                         sum(1 for f in report.files if f.kind in ("foundation", "shared")), output,
                         split_command(dict(zip(tasks, chosen)), output, options), notes)]


def _joined(tasks: Sequence[str], report: Any) -> list[list[str]]:
    """The groups of tasks (2 or more) that the plan's shared files join."""
    parent = {t: t for t in tasks}

    def root(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    for f in report.files:
        if f.kind in ("foundation", "shared"):
            for t in f.tasks[1:]:
                parent[root(t)] = root(f.tasks[0])
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(root(t), []).append(t)
    return [g for g in groups.values() if len(g) > 1]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-._+").lower()[:40] or "family"


def _output_name(members: Sequence[Model], taken: set[str]) -> str:
    """A directory name for the suggested command, after the family's first model; not taken by another
    family of this report, nor existing here."""
    base = "split-" + _slug(family_label(members))
    name, k = base, 1
    while name in taken or os.path.lexists(name):
        k += 1
        name = f"{base}-{k}"
    return name


def _cli_task_name(path: str) -> str:
    """The task name `gguf-split split` gives a model named on its command line (cli: chat.gguf -> chat)."""
    name = os.path.basename(path)
    stem = name[:-5] if name.endswith(".gguf") else os.path.splitext(name)[0]
    return re.sub(r"-\d{5}-of-\d{5}\Z", "", stem)


def split_command(tasks: Mapping[str, Model], output: str, options: SplitOptions) -> str:
    """The `gguf-split split` command that makes this family's split (models as plain arguments where the
    task name is the file's, else -t NAME=PATH), with the planner's options that differ from the defaults."""
    from ..assemble.options import flag_of

    args = ["gguf-split", "split"]
    for task, m in tasks.items():
        args += [m.path] if _cli_task_name(m.path) == task else ["-t", f"{task}={m.path}"]
    for name, value in options.given().items():
        if name in ("file_cost", "max_shared_files", "max_shard_size"):
            args += [flag_of(name), str(value)]
    return shlex.join([*args, "-o", output])
