"""Info: what a file holds, what a split directory saves, and which files one task needs.

The results are typed (FileInfo, SplitInfo, TaskFilesInfo): the CLI picks how to print one by its type,
and `to_json()` gives what `info --json` prints.

Reads headers only (no tensor data), so it is instant on any model size. A split directory is checked as
far as headers tell (seals, every task's files present and the ones recorded): an inconsistent split is
an error, as in `verify`, not a line in a table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from ..format.gguf import ARCHITECTURE_KEY, GGUFFile
from ..format.records import (
    K_CONTENT_ID,
    K_TASK,
    ROLE_ADAPTOR,
    ROLE_SHARED,
    SPLIT_KEYS,
    AdaptorInfo,
    QuantizeRecords,
    SplitFile,
    open_split_file,
    role_of,
)
from .directory import OpenTasks, open_tasks

_ROLE_KEYS = {  # the keys of FileInfo that only some roles have, and which roles print them
    "content_id": ("shared",), "split_no": ("shared",), "hole": ("shared",),
    "task": ("adaptor",), "model_tensors": ("adaptor",), "files": ("adaptor",), "sources": ("adaptor",),
    "quantized": ("adaptor",),
    "split": ("model",),
}


@dataclass
class FileInfo:
    """One GGUF file: a model, or one of gguf-split's (an adaptor, a shared file, a hole)."""

    path: str
    role: str  # "model", "adaptor" or "shared"
    file_bytes: int
    gguf_version: int
    architecture: Any
    alignment: int
    tensors: int
    tensor_bytes: int
    header_bytes: int
    types: dict[str, int]
    kvs: int  # an adaptor: the original model's KVs it carries; any other file: its KVs
    tensor_list: list[dict[str, Any]] = field(default_factory=list)
    content_id: Any = None  # shared
    split_no: int | None = None  # shared
    hole: bool | None = None  # shared: no tensors, only a split.no filling a gap in some task's file list
    task: Any = None  # adaptor
    model_tensors: int | None = None  # adaptor
    files: list[dict[str, Any]] | None = None  # adaptor: its positions 1..k
    sources: list[dict[str, Any]] | None = None  # adaptor: the original file(s) it restores
    quantized: dict[str, Any] | None = None  # adaptor of a task the split quantized: recipe, build, input
    split: dict[str, Any] | None = None  # model: llama.cpp's split.* KVs, if any

    def to_json(self, tensors: bool = False) -> dict[str, Any]:
        d = asdict(self)
        for key, roles in _ROLE_KEYS.items():
            if self.role not in roles:
                d.pop(key)
        if not tensors:
            d.pop("tensor_list")
        return d


@dataclass
class SplitInfo:
    """A split directory: every file with the tasks that load it, every task, and what the split saves."""

    directory: str
    tasks: list[dict[str, Any]]
    files: list[dict[str, Any]]
    unused: list[str]
    pending_commit: bool
    input_bytes: int
    output_bytes: int
    saved_bytes: int
    ratio: float | None
    dedup_optimum_bytes: int
    over_optimum_bytes: int
    near_misses: list[dict[str, Any]] = field(default_factory=list)  # pairs of tasks, format.nearmiss
    near_miss_lines: list[str] = field(default_factory=list)

    def to_json(self, tensors: bool = False) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskFilesInfo:
    """Exactly the files one task needs, in llama.cpp order (position 0 is its adaptor)."""

    task: str
    files: list[dict[str, Any]]
    bytes: int

    def to_json(self, tensors: bool = False) -> dict[str, Any]:
        return asdict(self)


def describe(path: str | os.PathLike[str]) -> FileInfo:
    """What one GGUF file holds (header only)."""
    with open_split_file(path) as f:
        h = f.header
        role = role_of(f) or "model"
        if isinstance(f, SplitFile):
            f.check_seal()  # its records are read below: refuse a damaged header with one clear error
        info = FileInfo(f.path, role, f.size, h.version, f.get(ARCHITECTURE_KEY), h.alignment, len(h.tensors),
                        sum(t.nbytes for t in h.tensors), h.data_start, _type_counts(f), len(h.kvs),
                        [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes}
                         for t in h.tensors])
        if isinstance(f, SplitFile) and role == ROLE_SHARED:
            f.require(ROLE_SHARED)
            info.content_id, info.split_no, info.hole = f.get(K_CONTENT_ID), f.split_no(), not h.tensors
        elif isinstance(f, SplitFile) and role == ROLE_ADAPTOR:
            _describe_adaptor(f, info)
        else:
            info.split = {k: f.get(k) for k in SPLIT_KEYS if k in h.kv_by_key} or None
        return info


def _describe_adaptor(f: SplitFile, info: FileInfo) -> None:
    a = AdaptorInfo.read(f)
    info.task, info.model_tensors, info.kvs = f.get(K_TASK), a.n_model_tensors, len(f.tail)
    info.files = [{"position": r.position, "name": r.name, "content_id": r.content_id, "bytes": r.size,
                   "sha256": r.sha256} for r in a.files]
    info.sources = [{"name": s.name, "bytes": s.size, "xxh3": s.xxh3} for s in a.sources]
    info.quantized = quantized_info(a.quantize)


def quantized_info(q: QuantizeRecords | None) -> dict[str, Any] | None:
    """What a quantized task's records say: the recipe, the build that quantized it, the full-precision input
    it was made from (not kept) and the sha256 of the file restore gives (llama-quantize's output)."""
    if q is None:
        return None
    r = q.recipe
    return {"type": r.qtype, "options": r.options, "imatrix": r.imatrix_name or None,
            "imatrix_sha256": r.imatrix_sha256 or None, "template": r.template_name or None,
            "from": {"name": q.source_name, "bytes": q.source_size, "xxh3": q.source_xxh3},
            "sha256": q.sha256, "build": q.build}


def _type_counts(f: GGUFFile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in f.header.tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts


def savings(directory: str | os.PathLike[str], *, shared: Sequence[str] = ()) -> SplitInfo:
    """Files of a split directory, which tasks use each, and what the split saves (as of one state of the
    directory: splitdir.open_tasks)."""
    with open_tasks(directory, shared=shared) as opened:
        tasks, users, optimum = _tasks_and_users(opened)
        cache = opened.cache
        files: list[dict[str, Any]] = [{"name": os.path.basename(p), "path": p, "bytes": f.size, "tensors": len(f.header.tensors),
                  "position": f.split_no(), "tasks": users.get(os.path.abspath(p), [])}
                 for p, f in sorted(cache.items(), key=lambda kv: (kv[1].split_no(), kv[0]))]
        sd = opened.split
        from ..format.nearmiss import Version, near_misses  # only here: `info FILE` stays a header read

        near = near_misses({task: [Version(t.name, t.ggml_type, t.shape, d, t.nbytes, partial(f.tensor_view, t))
                                   for f in tf.files for t, d in zip(f.header.tensors, f.digests())]
                            for task, tf in opened.tasks.items()})
    unused = [os.path.basename(p) for p in sd.shared.values() if os.path.abspath(p) not in cache]
    inputs = sum(t["source_bytes"] for t in tasks)
    total = sum(f["bytes"] for f in files) + sum(t["bytes"] for t in tasks)
    return SplitInfo(os.fspath(directory), tasks, files, unused, sd.pending, inputs, total, inputs - total,
                     total / inputs if inputs else None, optimum, total - optimum,
                     [{"tasks": list(p.tasks), "tensors": p.tensors, "bytes": p.bytes} for p in near.pairs],
                     near.lines())


def _tasks_and_users(opened: OpenTasks) -> tuple[list[dict[str, Any]], dict[str, list[str]], int]:
    """Per task its row; per shared file (absolute path) the tasks that load it; the dedup optimum (every
    distinct tensor version once + every adaptor's header)."""
    users: dict[str, list[str]] = {}
    tasks: list[dict[str, Any]] = []
    versions: dict[tuple[str, int, tuple[int, ...], bytes], int] = {}
    header_bytes = 0
    for task, tf in opened.tasks.items():
        for f in tf.files:
            for t, d in zip(f.header.tensors, f.digests()):
                versions[(t.name, t.ggml_type, t.shape, d)] = t.nbytes
            if f is not tf.adaptor:
                users.setdefault(os.path.abspath(f.path), []).append(task)
        header_bytes += tf.adaptor.header.data_start
        tasks.append({"task": task, "path": tf.adaptor.path, "bytes": tf.adaptor.size,
                      "tensors": len(tf.adaptor.header.tensors),
                      "files": [os.path.basename(f.path) for f in tf.shared],
                      "sources": [s.name for s in tf.info.sources],
                      "source_bytes": sum(s.size for s in tf.info.sources),
                      "quantized": quantized_info(tf.info.quantize)})
    return tasks, users, sum(versions.values()) + header_bytes


def task_files(directory: str | os.PathLike[str], task: str, *, shared: Sequence[str] = ()) -> TaskFilesInfo:
    """Exactly the files one task needs (e.g. to download just those from a hub), in llama.cpp order."""
    with open_tasks(directory, [task], shared=shared) as opened:
        tf = opened.tasks[task]
        rows: list[dict[str, Any]] = [{"position": 0, "path": tf.adaptor.path, "bytes": tf.adaptor.size,
                                       "sha256": None}]
        rows += [{"position": r.position, "path": f.path, "bytes": f.size, "sha256": r.sha256}
                 for r, f in zip(tf.info.files, tf.shared)]
        return TaskFilesInfo(task, rows, sum(r["bytes"] for r in rows))
