"""Reports of split, add and remove: what was written (or, in a dry run, would be), per file and per task.

They are the library's results (exported by `gguf_split`, stable) and what the CLI prints or turns into
JSON. A report is built from the plan and the files named after it (`split_report`), so a dry run and a
real run describe the same split; a dry run's adaptor sizes are exact (each adaptor's header is built as
the write builds it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..format.names import adaptor_name
from ..format.nearmiss import NearMissReport, Version, near_misses
from ..format.records import FileRef
from .outputs import NamedFile, adaptor_header
from .plan import Layout
from .scan import ScannedModel


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
class QuantizedTask:
    """One task the split quantized: it stands for the file llama-quantize writes for its input."""

    task: str
    source: str  # the full-precision input (not kept: the split holds the quantized tensors)
    output: str  # the file name restore gives (llama-quantize's output for the input)
    types: dict[str, int]  # ggml type name -> tensors of that type in the result
    quantized: int  # tensors quantized (the others, norms say, are copied)
    new_units: int  # quantized in this run for this task (not seen in an earlier task or the split)
    reused: int  # quantized tensors whose bytes came from an earlier task of this run or from the split
    warnings: list[str] = field(default_factory=list)  # llama-quantize's fallbacks, entries it did without
    sha256: str = ""  # of the quantized file ("" in a dry run)


@dataclass
class QuantizeReport:
    """What `--quantize` did: the recipe, each quantized task, the inputs kept as they were."""

    qtype: str
    options: str  # llama-quantize's other options
    imatrix: str | None  # file name
    template: str | None
    build: dict[str, str]  # the llama.cpp build that quantized (versions, llama_print_system_info())
    tasks: list[QuantizedTask]
    kept: dict[str, str] = field(default_factory=dict)  # task -> why it was not quantized
    units: int = 0  # distinct tensors quantized in this run
    unit_bytes: int = 0  # their quantized bytes
    reused_units: int = 0  # distinct quantized tensors taken from the split (add) instead of quantized
    seconds: float = 0.0  # time spent asking llama.cpp for the types and quantizing
    notes: list[str] = field(default_factory=list)  # e.g. a build that rounds differently from the split's
    dry_run: bool = False  # units were not quantized: tensors are matched by their unit keys


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
    quantize: QuantizeReport | None = None  # what --quantize did
    near_misses: NearMissReport | None = None  # a dry run: inputs that differ only by quantization

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


@dataclass
class RemoveReport:
    directory: str
    removed_tasks: list[str]
    deleted: list[str] = field(default_factory=list)  # file names
    freed_bytes: int = 0
    dry_run: bool = False
    links: list[str] = field(default_factory=list)  # llama.cpp links of the removed tasks, deleted with them


def split_report(directory: str, models: Mapping[str, ScannedModel], layout: Layout, named: list[NamedFile],
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
            adaptor_header(m, layout, named, planned, task)[0].file_size
        have = {t.name for t, _ in m.tensors}
        tasks.append(TaskReport(task, [inp.path for inp in m.files], m.size, path, size, len(own),
                                sum(x.nbytes for x in own), len(m.tensors), m.tensor_bytes,
                                [named[i].name for i in layout.task_files[task]], dict(layout.reasons.get(task, {})),
                                [n for n in all_names if n not in have]))
    st = layout.stats
    return SplitReport(os.path.abspath(directory), files, tasks, st.dedup_optimum if st else 0,
                       st.exact if st else False, st.lower_bound if st else 0, st.small_group_bytes if st else 0,
                       dry_run=dry_run, removed=removed or [], max_shard_size=max_shard_size)


def near_miss_report(models: Mapping[str, ScannedModel]) -> NearMissReport:
    """Which inputs hold tensors that differ only by quantization (format.nearmiss), from hashed inputs."""
    def reader(m: ScannedModel, name: str, nbytes: int) -> Callable[[], memoryview]:
        def read() -> memoryview:
            f, offset = m.source_of(name)
            return f.view(offset, offset + nbytes)
        return read

    return near_misses({task: [Version(t.name, t.ggml_type, t.shape, m.digests[t.name], t.nbytes,
                                       reader(m, t.name, t.nbytes)) for t, _ in m.tensors]
                        for task, m in models.items()})
