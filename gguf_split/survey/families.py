"""Families: models from scanned files, candidate families from models, and what headers say about
related models that share little.

A model is one GGUF file, or the shards of one (`name-0000k-of-0000N.gguf`, llama.cpp's `split.*` keys):
it counts once, by its first shard. Files gguf-split wrote (adaptors, shared files) are gathered into the
splits they belong to (by directory), packs are listed as packs; neither is a model.

Candidate families: models of one architecture joined by the tensors they hold byte-identical (same
name, type, shape and xxh3-128). One pass over every tensor of every model (a dict from digest to its
first holder, a union-find over models): linear in the number of tensors. A tensor joins two models only
when it is a matrix (two dimensions or more) of at least 1/LINK_FRACTION of each one's mean tensor size:
vectors (norms, biases, rope tables) of models initialised alike are equal in unrelated models and would
chain them into one "family", and a split would not store them apart anyway (too small to pay for a
file). The survey then plans each candidate (run.py) and keeps it only where a split shares something.

Related models that share little: models whose tensors have the same names and shapes (one model's
configuration) and that are not in one family. Their headers may tell why: different types (one model
quantized to several types, a quantization ladder; or fine-tunes quantized to different types), or the
same type with different importance matrices (the `quantize.imatrix.*` keys llama-quantize writes: a
path, a dataset name and counts, so a hint, never proof).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xxhash
from gguf.constants import LlamaFileType

from .discover import Problem
from ..disk.manifest import MODEL, OWN_FILE, PACK, FileManifest, TensorEntry, dominant_type
from ..format.names import SHARD_NAME

LINK_FRACTION = 8
LADDER, TYPES, IMATRIX = "quantization ladder", "different types", "different importance matrices"


@dataclass
class Model:
    """One model: its files' manifests in shard order."""

    files: list[FileManifest]

    @property
    def path(self) -> str:
        return self.files[0].path

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def tensors(self) -> Iterable[TensorEntry]:
        for f in self.files:
            yield from f.tensors

    @property
    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files)

    @property
    def tensor_bytes(self) -> int:
        return sum(f.tensor_bytes for f in self.files)

    def fact(self, name: str) -> object:
        return self.files[0].fact(name)

    @property
    def architecture(self) -> str:
        arch = self.fact("architecture")
        return arch if isinstance(arch, str) else "?"

    @property
    def main_type(self) -> str:
        merged = FileManifest(self.path, self.files[0].key, MODEL, 0, tensors=tuple(self.tensors))
        return dominant_type(merged) or "-"

    @property
    def file_type(self) -> str | None:
        """general.file_type as llama-quantize names it (Q4_K_M, F16, ...), if the header records it."""
        value = self.fact("file_type")
        if not isinstance(value, int):
            return None
        try:
            name = LlamaFileType(value).name
        except ValueError:
            return f"ftype {value}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")

    @property
    def type(self) -> str:
        """What the model is quantized to: its recorded file type, else the type holding most of its bytes."""
        return self.file_type or self.main_type

    @property
    def label(self) -> str:
        """A human name: general.name (or basename), else the file's stem."""
        for key in ("name", "basename"):
            value = self.fact(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return file_stem(self.path)


@dataclass
class SplitFound:
    """A gguf-split split found among the paths: the directory, its tasks, its files."""

    directory: str
    tasks: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0


@dataclass
class PackFound:
    path: str
    kind: str
    tasks: list[str]
    bytes: int


@dataclass
class OtherFile:
    """A GGUF file that is no model (general.type says so: a LoRA adapter, an importance matrix, ...)."""

    path: str
    type: str
    bytes: int


@dataclass
class Related:
    """Models of one configuration that are not one family, and what their headers say about why."""

    why: str  # LADDER, TYPES or IMATRIX
    text: str
    members: list[str]  # paths


# --- models from files ----------------------------------------------------------------------------------

def file_stem(path: str) -> str:
    """chat.gguf -> chat; name-00001-of-00003.gguf -> name."""
    name = os.path.basename(path)
    m = SHARD_NAME.fullmatch(name)
    if m is not None:
        return m["prefix"]
    return name[:-5] if name.lower().endswith(".gguf") else os.path.splitext(name)[0]


@dataclass
class Found:
    """What the scanned files are."""

    models: list[Model] = field(default_factory=list)
    splits: list[SplitFound] = field(default_factory=list)
    packs: list[PackFound] = field(default_factory=list)
    others: list[OtherFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def assemble(manifests: Iterable[FileManifest]) -> Found:
    """Models (single files and complete shard sets), the splits, packs and other GGUF files (adapters,
    importance matrices) among the files, and the shards that make no complete model."""
    models: list[Model] = []
    others: list[OtherFile] = []
    splits: dict[str, SplitFound] = {}
    packs: list[PackFound] = []
    problems: list[Problem] = []
    shard_sets: dict[tuple[str, str, int], list[FileManifest]] = {}
    for m in manifests:
        if m.kind == PACK:
            tasks = m.fact("tasks")
            packs.append(PackFound(m.path, str(m.fact("pack_kind")), list(tasks) if isinstance(tasks, list) else [],
                                   m.size))
        elif m.kind == OWN_FILE:
            s = splits.setdefault(os.path.dirname(os.path.abspath(m.path)), SplitFound(os.path.dirname(m.path) or "."))
            s.files.append(m.path)
            s.bytes += m.size
            task = m.fact("task")
            if m.fact("role") == "adaptor" and isinstance(task, str):
                s.tasks.append(task)
        elif m.fact("general_type") not in (None, "model"):
            others.append(OtherFile(m.path, str(m.fact("general_type")), m.size))
        else:
            count = m.fact("split_count")
            if isinstance(count, int) and count > 1:
                name = SHARD_NAME.fullmatch(os.path.basename(m.path))
                if name is None or int(name["count"]) != count:
                    problems.append(Problem(m.path, f"is a shard of a {count}-file model, but its name does not end in "
                                                    f"-0000k-of-{count:05d}.gguf, so its other shards cannot be found"))
                    continue
                shard_sets.setdefault((os.path.dirname(m.path), name["prefix"], count), []).append(m)
            else:
                models.append(Model([m]))
    for (_d, _prefix, count), shards in shard_sets.items():
        model, problem = _shard_model(shards, count)
        if model is not None:
            models.append(model)
        elif problem is not None:
            problems.append(problem)
    for s in splits.values():
        s.tasks.sort()
    return Found(models, sorted(splits.values(), key=lambda s: s.directory), packs, others, problems)


def _shard_model(shards: list[FileManifest], count: int) -> tuple[Model | None, Problem | None]:
    by_no: dict[int, FileManifest] = {}
    for s in shards:
        no = s.fact("split_no")
        name = SHARD_NAME.fullmatch(os.path.basename(s.path))
        if not isinstance(no, int) or name is None or int(name["no"]) != no + 1 or no in by_no:
            return None, Problem(s.path, f"its split.no ({no}) does not match its name: not a shard of a "
                                         f"{count}-file model")
        by_no[no] = s
    missing = [k + 1 for k in range(count) if k not in by_no]
    if missing:
        first = by_no[min(by_no)]
        return None, Problem(first.path, f"shard(s) {', '.join(map(str, missing))} of this {count}-file model are "
                                         "missing or unreadable: the model is left out")
    return Model([by_no[k] for k in range(count)]), None


# --- candidate families ---------------------------------------------------------------------------------

def candidate_families(models: Sequence[Model]) -> list[list[int]]:
    """Groups (indexes into `models`, each group sorted, groups by first index) of at least two models of
    one architecture joined by tensors they hold byte-identical. Linear in the number of tensors."""
    parent = list(range(len(models)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    threshold = [m.tensor_bytes // max(1, m.tensor_count * LINK_FRACTION) for m in models]
    archs = [m.architecture for m in models]
    first: dict[bytes, tuple[int, TensorEntry]] = {}
    for i, m in enumerate(models):
        for t in m.tensors:
            held = first.setdefault(t.digest, (i, t))
            j, u = held
            if j == i or archs[j] != archs[i] or t.nbytes < max(threshold[i], threshold[j]) or \
                    sum(1 for n in t.shape if n > 1) < 2:
                continue
            if (u.name, u.ggml_type, u.shape) == (t.name, t.ggml_type, t.shape):
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(models)):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# --- task names and commands ----------------------------------------------------------------------------

def _clean(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "-", text)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:64]
    return name or "model"


def task_names(paths: Sequence[str]) -> list[str]:
    """A valid, distinct task name per model, from its file name (the parent directory's name added, then
    a number, where two clash)."""
    names = [_clean(file_stem(p)) for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(p)))
            names[i] = _clean(f"{parent}-{file_stem(p)}")[-64:].lstrip("_.+-") or names[i]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n[:60]}-{k + 1}")
    return out


# --- what headers say -----------------------------------------------------------------------------------

def signature(m: Model) -> bytes:
    """One configuration: the architecture and every tensor's name and shape (any order)."""
    h = xxhash.xxh3_128(m.architecture.encode())
    for name, shape in sorted((t.name, t.shape) for t in m.tensors):
        h.update(f"{name}:{','.join(map(str, shape))};".encode())
    return h.digest()


def _imatrix(m: Model) -> str:
    parts = [m.fact(k) for k in ("imatrix_file", "imatrix_dataset", "imatrix_entries", "imatrix_chunks")]
    if all(p is None for p in parts):
        return "none"
    file, dataset = parts[0], parts[1]
    shown = os.path.basename(file) if isinstance(file, str) else "?"
    return shown + (f" ({dataset})" if isinstance(dataset, str) and dataset else "")


def family_label(models: Sequence[Model]) -> str:
    """The models' common name: their label if they agree, else the words their labels start with, else the
    first one's."""
    labels = [m.label for m in models]
    if len(set(labels)) == 1:
        return labels[0]
    words = [label.split() for label in labels]
    common = []
    for column in zip(*words):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return " ".join(common) if common else labels[0]


def diagnose(models: Sequence[Model]) -> tuple[str, str] | None:
    """(why, text) when the headers of `models` (one configuration) say why they share little; None when
    they do not tell."""
    types = sorted({m.type for m in models})
    if len(types) > 1:
        origins = {m.label for m in models}
        if len(origins) == 1:
            return LADDER, (f"one model ({origins.pop()}) quantized to several types ({', '.join(types)}): a "
                            "quantization ladder. A tensor's bytes depend on its type, so they share only what they "
                            "keep in one type")
        return TYPES, (f"quantized to different types ({', '.join(types)}): a tensor's bytes depend on its type. "
                       "Quantize every fine-tune from full precision with one recipe (the same type, the same "
                       "importance matrix or none) to share what the fine-tunes left unchanged")
    matrices = sorted({_imatrix(m) for m in models})
    if len(matrices) > 1:
        return IMATRIX, (f"quantized with different importance matrices ({'; '.join(matrices)}; from the "
                         "quantize.imatrix.* keys llama-quantize writes: a hint, not proof). An importance matrix "
                         "changes the bytes of every tensor it is used for: quantize every fine-tune from full "
                         "precision with one recipe (the same type and the same importance matrix, or none)")
    return None


def family_note(models: Sequence[Model], shared: Sequence[float]) -> str | None:
    """Why the members of a family that share least (under half their tensor bytes) do, where headers
    tell: another type, or another importance matrix, than most of the family."""
    low = [m for m, s in zip(models, shared) if s < 0.5]
    if not low:
        return None
    common_type = max({m.type for m in models}, key=lambda t: sum(1 for m in models if m.type == t))
    names = ", ".join(file_stem(m.path) for m in low)
    other_type = [m for m in low if m.type != common_type]
    if other_type:
        rest = sorted({m.type for m in models if m not in low})
        return (f"{names} share{'s' if len(low) == 1 else ''} under half of their tensors: quantized to "
                f"{', '.join(sorted({m.type for m in low}))}, the rest of the family to {', '.join(rest)}; a "
                "tensor's bytes depend on its type")
    common_matrix = max({_imatrix(m) for m in models}, key=lambda k: sum(1 for m in models if _imatrix(m) == k))
    if any(_imatrix(m) != common_matrix for m in low):
        return (f"{names} share{'s' if len(low) == 1 else ''} under half of their tensors: quantized with another "
                f"importance matrix than most of the family ({common_matrix}; quantize.imatrix.* keys: a hint, not "
                "proof); quantize every fine-tune from full precision with one recipe")
    return None


def related(models: Sequence[Model], unit_of: Sequence[int]) -> list[Related]:
    """Groups of models of one configuration spread over several units (a family, or a model alone:
    `unit_of[i]`), where their headers say why they share little: their types (every model of the
    configuration), or, among the units of one type, their importance matrices."""
    by_sig: dict[bytes, list[int]] = {}
    for i, m in enumerate(models):
        if m.tensor_count:
            by_sig.setdefault(signature(m), []).append(i)
    out = []
    for members in by_sig.values():
        if len({unit_of[i] for i in members}) < 2:
            continue
        by_type: dict[str, list[int]] = {}
        for i in members:
            by_type.setdefault(models[i].type, []).append(i)
        groups = [members] if len(by_type) > 1 else []
        groups += [same for same in by_type.values() if len({unit_of[i] for i in same}) > 1]
        for group in groups:
            found = diagnose([models[i] for i in group])
            if found is not None and (found[0] != IMATRIX or len(by_type) == 1 or group is not members):
                out.append(Related(found[0], found[1], [models[i].path for i in group]))
    return out
