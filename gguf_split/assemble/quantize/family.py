"""A family quantized once: `split --quantize` and `add` make, from full-precision inputs, the models
llama-quantize would write, quantizing each distinct unit once.

The design (a contract for split, add, restore, verify, info and pack):
- **A quantized task is the file llama-quantize writes for its input** (this llama.cpp, this recipe): a
  virtual input (`QuantizedModel`) whose header is `quantized_header(...)` (pure Python) and whose tensors are
  quantized units. From there the split treats it as any input: the adaptor records that file (its header,
  size, whole-file xxh3-128), so `restore` gives back llama-quantize's file byte for byte without llama.cpp,
  and `verify`, `info` and `pack` work on the quantized bytes. The full-precision input is not kept.
- **A unit** is (source tensor digest, source type, shape, target type, imatrix vector): on one build, equal
  units give equal bytes (rows are quantized independently by a deterministic function of those), so each
  distinct unit is quantized once, into a unit store: one temporary file in the output directory's
  transaction (`Transaction.temp_dir`), removed when it ends, committed or not, and by the next run if this
  one is killed. A tensor the recipe leaves at its type (norms) is copied from the input.
- **Types come from llama.cpp, model by model** (mix.plan_model: a dry run of llama_model_quantize with the
  imatrix): a task whose tensor set differs from the base's may get other types, which is detected, never
  assumed.
- **Inputs that already hold quantized tensors are kept as they are** (they are what the user quantized;
  requantizing would lose precision and match nothing), and the report says so; with a template
  (`--quantize-template`, a quantized base the family must match) they are quantized to the template's
  types too, their tensors already at that type copied: an export-lora merge over a quantized base (merged
  tensors F16, the others the base's) then shares every untouched tensor with the base, byte for byte.
- **Records** (format.records.QuantizeRecords, in each quantized task's adaptor): the recipe (type, options,
  imatrix name and sha256, template), the build that quantized (Backend.build_info()), the input's name,
  size and xxh3-128, the quantized file's sha256, and per tensor the source digest, source type and unit key.
- **add** (`stored_units`, `add_recipe`): a new full-precision fine-tune must come with the split's recipe
  (the imatrix by sha256; another one is refused in one line unless --allow-recipe-change); every unit whose
  key the split already holds takes the stored bytes, on any build, and only new units are quantized. If
  this build differs from the one recorded, a few reused units are quantized again and compared, and a
  difference is reported (the new task then mixes two builds' roundings: still exact per tensor, see README).
- **Where tensor by tensor is not exact, llama.cpp quantizes the whole model** (`quantize_whole`: a model in
  shards, which the tensor-by-tensor path does not read): its output is scanned as any input, so its
  tensors are shared by their bytes; it records no unit keys.
- A dry run quantizes nothing: quantized tensors are matched by their unit keys (two different units that
  happen to give equal bytes count as different there).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import xxhash
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ...disk.commit import Transaction, check_space, checkpoint
from ...disk.copy import write_all, write_zeros
from ...disk.jobs import wait_for
from ...disk.progress import Progress
from ...disk.sweep import spans_of_layout, sweep, sweep_file
from ...errors import GGUFSplitError, os_problem
from ...format.gguf import GGUFFile, align_up, parse_header, parse_tensor_infos
from ...format.names import show
from ...format.records import (
    K_Q_TYPE,
    K_SRC_TENSOR_INFOS,
    UNIT_KEY_SIZE,
    QuantizeRecords,
    RecipeRecord,
    SplitFile,
)
from ...splitdir.directory import FileFinder, SplitDir, open_task
from ..options import SplitOptions, flag_of
from ..report import QuantizedTask, QuantizeReport
from ..scan import InputFile, ScannedModel, check_input_path, hash_models, open_input
from .binding import backend
from .header import imatrix_kvs, quantized_header
from .mix import FALLBACK_NOTE, ModelPlan, PlannedTensor, plan_model
from .recipe import Recipe, make_recipe, parse_quantize_args
from .tensor import default_threads, quantize_tensor, unit_key
from .whole import drop_pages, llama_quantize

STORE_ALIGNMENT = 64
NO_UNIT = bytes(UNIT_KEY_SIZE)  # the key a tensor without a unit records (a model llama.cpp quantized whole)
SPOT_CHECKS = 3  # reused units quantized again when this build differs from the split's
_FLOAT_NAME = re.compile(r"(?i)(?<![A-Za-z0-9])(f16|bf16|f32|fp16|fp32)(?![A-Za-z0-9])")


def is_quantized_type(ggml_type: int) -> bool:
    """A block holds more than one value (F32, F16, BF16 and the integer types hold one)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][0] > 1


def quantized_name(source_name: str, qtype: str) -> str:
    """The file name restore gives a quantized task: the input's, its last f16/bf16/f32 word replaced by the
    type (`chat-f16.gguf` -> `chat-Q4_K_M.gguf`), else the type appended (`chat.gguf` -> `chat-Q4_K_M.gguf`)."""
    stem = source_name[:-5] if source_name.lower().endswith(".gguf") else source_name
    stem = re.sub(r"-\d{5}-of-\d{5}\Z", "", stem)  # a sharded input's first shard: one file comes out
    found = list(_FLOAT_NAME.finditer(stem))
    if found:
        m = found[-1]
        return f"{stem[:m.start()]}{qtype}{stem[m.end():]}.gguf"
    return f"{stem}-{qtype}.gguf"


# ---------------------------------------------------------------------------------------------------------
# Virtual inputs


class VirtualFile(GGUFFile):
    """The file llama-quantize would write, of which only the header exists (an anonymous map): a GGUFFile
    whose tensor bytes live elsewhere (QuantizedModel.source_of says where)."""

    def __init__(self, path: str, header: bytes, size: int) -> None:
        self.path = path
        self.fd = -1
        self.size = size
        self.identity = (0, 0)
        self._mm = mmap.mmap(-1, max(1, len(header)))
        self._mm.write(header)
        self.header = parse_header(self._mm, size, path)


@dataclass(frozen=True)
class Unit:
    """Where one tensor's bytes are (a unit store, an input, a file of the split) and their xxh3-128."""

    src: GGUFFile
    offset: int
    nbytes: int
    digest: bytes


class DerivedModel(ScannedModel):
    """A task made from the user's full-precision input (`source`, kept open until the split is written: it
    must not change meanwhile, and copied tensors are read from it)."""

    source: ScannedModel

    @property
    def path(self) -> str:
        return self.source.path  # messages name the user's file

    def watched_files(self) -> list[InputFile]:
        return self.source.watched_files()

    def close(self) -> None:
        super().close()
        self.source.close()


class QuantizedModel(DerivedModel):
    """A task as the file llama-quantize writes for its input, made tensor by tensor: a virtual file whose
    tensors are units."""

    def __init__(self, source: ScannedModel, file: VirtualFile, digest: bytes, units: dict[str, Unit],
                 records: QuantizeRecords | None) -> None:
        super().__init__(source.task, [InputFile(file, source.files[0].stat, digest)],
                         [(t, 0) for t in file.header.tensors], {n: u.digest for n, u in units.items()}, records)
        self.source = source
        self.units = units

    def source_of(self, name: str) -> tuple[GGUFFile, int]:
        u = self.units[name]
        return u.src, u.offset


class WholeModel(DerivedModel):
    """A task llama.cpp quantized as a whole (`llama_model_quantize`, the fall-back where tensor by tensor is
    not exact: an input in shards): the file it wrote, scanned as any input."""

    def __init__(self, source: ScannedModel, quantized: ScannedModel, records: QuantizeRecords) -> None:
        super().__init__(source.task, quantized.files, quantized.tensors, quantized.digests, records)
        self.source = source


@dataclass
class Family:
    """The inputs after quantizing: every task (quantized ones as QuantizedModel), what was done, and the
    unit stores to close once the outputs are written."""

    models: dict[str, ScannedModel]
    report: QuantizeReport
    stores: list[GGUFFile] = field(default_factory=list)
    scratch: list[tempfile.TemporaryDirectory[str]] = field(default_factory=list)  # a dry run's whole models

    def close_stores(self) -> None:
        for f in self.stores:
            f.close()
        self.stores = []
        for d in self.scratch:
            d.cleanup()
        self.scratch = []


@dataclass
class StoredUnits:
    """What a split already holds, for `add`: unit key -> its bytes in the split's files, and the recipe and
    build of each quantized task."""

    units: dict[bytes, Unit] = field(default_factory=dict)
    recipes: dict[str, RecipeRecord] = field(default_factory=dict)
    builds: dict[str, dict[str, str]] = field(default_factory=dict)
    files: list[GGUFFile] = field(default_factory=list)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []


@dataclass
class _Planned:
    """One input to quantize: its plan (llama.cpp's types) and each planned tensor's unit key."""

    model: ScannedModel
    plan: ModelPlan
    keys: list[bytes]


# ---------------------------------------------------------------------------------------------------------
# Quantizing a family


def quantize_inputs(models: Mapping[str, ScannedModel], recipe: Recipe, *, tx: Transaction | None,
                    progress: Progress, threads: int | None = None, stored: StoredUnits | None = None) -> Family:
    """The family after quantizing: each full-precision input (hashed) becomes the model llama-quantize
    writes for it; inputs holding quantized tensors are kept (unless the recipe has a template). `tx` None:
    a dry run (nothing quantized). `stored`: units of the split being added to."""
    t0 = time.monotonic()
    be = backend()
    report = QuantizeReport(recipe.quant_type, recipe.options_text(), _name(recipe.imatrix.path)
                            if recipe.imatrix is not None else None, recipe.template_name or None, be.build_info(),
                            [], dry_run=tx is None)
    planned: dict[str, _Planned] = {}
    whole: dict[str, ScannedModel] = {}
    for task, m in models.items():
        why = kept_reason(m, recipe)
        if why is not None:
            report.kept[task] = why
            continue
        if len(m.files) > 1:
            whole[task] = m
            continue
        plan = plan_model(m.path, recipe)
        planned[task] = _Planned(m, plan, [unit_key(m.digests[t.name], t, recipe) for t in plan.tensors])
    known = dict(stored.units) if stored is not None else {}
    todo = _new_units(planned, known)
    family = Family(dict(models), report)
    units: dict[bytes, Unit] = {}
    if tx is not None and todo:
        units, store = _quantize_units(todo, recipe, tx.temp_dir("quantize"), progress, threads)
        family.stores.append(store)
        report.units, report.unit_bytes = len(units), sum(u.nbytes for u in units.values())
    report.reused_units = len({k for p in planned.values() for k, t in zip(p.keys, p.plan.tensors)
                               if t.quantized and k in known})
    if stored is not None and tx is not None:
        report.notes += spot_check(planned, known, stored, be.build_info(), threads)
    try:
        everything = {**known, **units}
        with ThreadPoolExecutor(threads or default_threads(), thread_name_prefix="gguf-split-digest") as pool:
            futures = {task: pool.submit(_virtual_model, p, everything, recipe, report.build, dry_run=tx is None)
                       for task, p in planned.items()}  # each streams its file's xxh3 and sha256 (GIL released)
            for task, fut in futures.items():
                qm = wait_for(cast("Future[object]", fut))
                assert isinstance(qm, QuantizedModel)
                family.models[task] = qm
                report.tasks.append(_task_report(task, planned[task], qm, todo, known, tx is None))
    except BaseException:
        for task in planned:
            m = family.models[task]
            if isinstance(m, QuantizedModel):
                m.first.close()  # its virtual file; the caller closes the inputs
        family.close_stores()
        raise
    quantize_whole(whole, recipe, tx, family, threads)
    report.seconds = time.monotonic() - t0
    return family


def _name(path: str) -> str:
    return os.path.basename(path)


def kept_reason(m: ScannedModel, recipe: Recipe) -> str | None:
    """Why an input is kept as it is (None: it is quantized). A model holding quantized tensors is what its
    author quantized: kept, unless it also holds full-precision matrices and a template says which types
    they take (an export-lora merge over a quantized base)."""
    quantized: dict[str, int] = {}
    matrices = 0
    for t, _ in m.tensors:
        if is_quantized_type(t.ggml_type):
            quantized[t.type_name] = quantized.get(t.type_name, 0) + 1
        elif len(t.shape) > 1:
            matrices += 1
    if not quantized or (matrices and recipe.tensor_types):
        return None
    held = ", ".join(f"{n} {k}" for k, n in sorted(quantized.items()))
    why = f"already quantized ({held}): kept as it is"
    if matrices:
        why += (f"; its {matrices} full-precision matrices (an export-lora merge over a quantized base?) stay so: "
                "--quantize-template BASE quantizes them to the base's types")
    return why


def _new_units(planned: Mapping[str, _Planned], known: Mapping[bytes, Unit]
               ) -> dict[bytes, tuple[_Planned, PlannedTensor]]:
    """Each distinct unit to quantize (not in `known`), with the first tensor that needs it."""
    todo: dict[bytes, tuple[_Planned, PlannedTensor]] = {}
    for p in planned.values():
        for key, t in zip(p.keys, p.plan.tensors):
            if t.quantized and key not in known and key not in todo:
                todo[key] = (p, t)
    return todo


def _quantize_units(todo: Mapping[bytes, tuple[_Planned, PlannedTensor]], recipe: Recipe, directory: str,
                    progress: Progress, threads: int | None) -> tuple[dict[bytes, Unit], GGUFFile]:
    """Quantize each unit once, streaming into the unit store (memory: one quantized tensor plus a chunk per
    thread); every core works on the rows of each tensor."""
    path = os.path.join(directory, "units")
    need = sum(align_up(_nbytes(t.dst_type, t.shape), STORE_ALIGNMENT) for _, t in todo.values())
    check_space(directory, need, "the quantized tensors")
    places: dict[bytes, tuple[int, int, bytes]] = {}
    n_threads = threads or default_threads()
    total = sum(_nbytes(t.src_type, t.shape) for _, t in todo.values())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        pos = 0
        with ThreadPoolExecutor(n_threads, thread_name_prefix="gguf-split-quantize") as pool, \
                progress.bar("quantizing", total) as bar:
            for key, (p, t) in todo.items():
                src, offset = p.model.source_of(t.name)
                n_src = _nbytes(t.src_type, t.shape)
                data = quantize_tensor(src.view(offset, offset + n_src), t,
                                       recipe.imatrix_vector(t.name) if t.with_imatrix else None,
                                       pool=pool if n_threads > 1 else None, path=p.model.path)
                write_zeros(fd, align_up(pos, STORE_ALIGNMENT) - pos)
                pos = align_up(pos, STORE_ALIGNMENT)
                write_all(fd, memoryview(data))
                places[key] = (pos, data.nbytes, xxhash.xxh3_128(memoryview(data)).digest())
                pos += data.nbytes
                del data
                drop_pages(src, offset, n_src)
                bar.advance(n_src)
        checkpoint("quantized units")
    except OSError as e:
        raise GGUFSplitError(os.path.dirname(directory), f"cannot write the quantized tensors: {os_problem(e)}") from None
    finally:
        os.close(fd)
    store = GGUFFile(path, parse=False)
    return {k: Unit(store, off, n, d) for k, (off, n, d) in places.items()}, store


def _nbytes(ggml_type: int, shape: Sequence[int]) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _virtual_model(p: _Planned, units: Mapping[bytes, Unit], recipe: Recipe, build: dict[str, str], *,
                   dry_run: bool) -> QuantizedModel:
    """The model llama-quantize writes for `p`'s input, from its header and the units; its whole-file
    digests streamed from the same bytes the outputs are written from (not in a dry run)."""
    m = p.model
    tensors = p.plan.tensors
    header = quantized_header(m.first, [(t.name, t.shape, t.dst_type) for t in tensors], recipe.ftype,
                              imatrix_kvs(recipe))
    size = len(header) + sum(align_up(_nbytes(t.dst_type, t.shape), 32) for t in tensors)
    path = os.path.join(os.path.dirname(m.path), quantized_name(os.path.basename(m.path), recipe.quant_type))
    vf = VirtualFile(path, header, size)
    by_name: dict[str, Unit] = {}
    for t, key, info in zip(tensors, p.keys, vf.header.tensors):
        if not t.quantized:
            src, offset = m.source_of(t.name)
            by_name[t.name] = Unit(src, offset, info.nbytes, m.digests[t.name])
        elif dry_run and key not in units:
            by_name[t.name] = Unit(m.first, 0, info.nbytes, key[:16])  # never read: a dry run writes nothing
        else:
            by_name[t.name] = units[key]
        if by_name[t.name].nbytes != info.nbytes:
            raise AssertionError(f"{t.name}: {by_name[t.name].nbytes} bytes quantized, the header says {info.nbytes}")
    digest, sha = bytes(16), "0" * 64  # a dry run's stand-ins, as long as the real ones: its sizes are exact
    if not dry_run:
        pieces = [(info.offset, info.nbytes, by_name[info.name].src, by_name[info.name].offset)
                  for info in vf.header.tensors]
        d = sweep(spans_of_layout(header, vf.header.data_start, pieces, size), sha256=True)
        digest, sha = d.xxh3, d.sha256 or ""
    source = m.files[0]
    records = QuantizeRecords(recipe.record(), build, os.path.basename(m.path), source.file.size,
                              source.digest.hex(), sha, b"".join(m.digests[t.name] for t in tensors),
                              tuple(t.src_type for t in tensors), b"".join(p.keys))
    return QuantizedModel(m, vf, digest, by_name, records)


def _task_report(task: str, p: _Planned, qm: QuantizedModel, todo: Mapping[bytes, tuple[_Planned, PlannedTensor]],
                 known: Mapping[bytes, Unit], dry_run: bool) -> QuantizedTask:
    types: dict[str, int] = {}
    for info in qm.first.header.tensors:
        types[info.type_name] = types.get(info.type_name, 0) + 1
    new = sum(1 for k, t in zip(p.keys, p.plan.tensors) if t.quantized and k in todo and todo[k][0] is p)
    quantized = sum(1 for t in p.plan.tensors if t.quantized)
    return QuantizedTask(task, p.model.path, os.path.basename(qm.first.path), types, quantized, new, quantized - new,
                         _warnings(p.plan), qm.quantized.sha256 if qm.quantized is not None and not dry_run else "")


def _warnings(plan: ModelPlan) -> list[str]:
    """The plan's warnings, llama-quantize's row-size fallbacks summed up in one line (a model whose width
    no k-quant block divides, SmolLM2's 576, falls back on most of its tensors)."""
    fallbacks: dict[str, int] = {}
    for t in plan.tensors:
        if t.fallback:
            name = GGMLQuantizationType(t.dst_type).name
            fallbacks[name] = fallbacks.get(name, 0) + 1
    out = [w for w in plan.warnings if not w.endswith(FALLBACK_NOTE)]
    if fallbacks:
        widths = sorted({t.shape[0] for t in plan.tensors if t.fallback})
        out.insert(0, f"{sum(fallbacks.values())} tensors of {', '.join(map(str, widths))} columns do not fit the "
                      f"mix's block size: {', '.join(f'{n} {k}' for k, n in sorted(fallbacks.items()))} instead "
                      "(llama-quantize's fallback)")
    return out


def quantize_whole(models: Mapping[str, ScannedModel], recipe: Recipe, tx: Transaction | None, family: Family,
                   threads: int | None) -> None:
    """Inputs in shards: llama.cpp quantizes each as a whole (llama_model_quantize with the CLI's parameters
    and imatrix KVs: exactly llama-quantize's file) into the transaction's temporary directory (a dry run:
    a temporary directory of the system's, removed with the family's stores). Their tensors are shared by
    bytes as any input's, but record no unit keys: `add` does not reuse them."""
    if not models:
        return
    if tx is not None:
        directory = tx.temp_dir("quantize")
    else:
        scratch = tempfile.TemporaryDirectory(prefix="gguf-split-dry-run-")
        family.scratch.append(scratch)
        directory = scratch.name
    for task, m in models.items():
        out = os.path.join(directory, quantized_name(os.path.basename(m.path), recipe.quant_type))
        llama_quantize(m.path, out, recipe, threads=threads or default_threads())
        checkpoint("quantized a whole model")
        q = open_input(task, out)
        try:
            hash_models([q], threads=threads)
            sha = sweep_file(q.first, sha256=True).sha256 or ""
        except BaseException:
            q.close()
            raise
        family.models[task] = wm = WholeModel(m, q, QuantizeRecords(
            recipe.record(), family.report.build, os.path.basename(m.path), m.size, m.files[0].digest.hex(), sha,
            b"".join(m.digests.get(t.name, bytes(16)) for t, _ in q.tensors),
            tuple(m.tensors[m.tensor_index(t.name)][0].ggml_type for t, _ in q.tensors),
            bytes(UNIT_KEY_SIZE) * len(q.tensors)))
        family.report.tasks.append(_whole_report(task, m, wm))


def _whole_report(task: str, m: ScannedModel, wm: WholeModel) -> QuantizedTask:
    types: dict[str, int] = {}
    changed = 0
    for t, _ in wm.tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
        changed += t.ggml_type != m.tensors[m.tensor_index(t.name)][0].ggml_type
    note = (f"a model in {len(m.files)} shards: quantized as a whole by llama.cpp (llama_model_quantize, "
            "llama-quantize's core); its tensors are shared by their bytes, but add will not reuse them")
    return QuantizedTask(task, m.path, os.path.basename(wm.first.path), types, changed, changed, 0, [note],
                         wm.quantized.sha256 if wm.quantized is not None else "")


# ---------------------------------------------------------------------------------------------------------
# add: the split's units and recipe


def spot_check(planned: Mapping[str, _Planned], known: Mapping[bytes, Unit], stored: StoredUnits,
               build: dict[str, str], threads: int | None) -> list[str]:
    """When this llama.cpp build is not the one that quantized the split, quantize a few of the units taken
    from the split again and compare: a difference is reported (the bytes kept are the split's)."""
    if not stored.builds or all(b == build for b in stored.builds.values()):
        return []
    reused = [(k, p, t) for p in planned.values() for k, t in zip(p.keys, p.plan.tensors)
              if t.quantized and k in known]
    picks = list({k: (p, t) for k, p, t in reused}.items())[:SPOT_CHECKS]
    if not picks:
        return []
    differ = []
    for key, (p, t) in picks:
        src, offset = p.model.source_of(t.name)
        data = quantize_tensor(src.view(offset, offset + _nbytes(t.src_type, t.shape)), t,
                               p.plan.recipe.imatrix_vector(t.name) if t.with_imatrix else None)
        if xxhash.xxh3_128(memoryview(data)).digest() != known[key].digest:
            differ.append(t.name)
    theirs = next(iter(stored.builds.values()))
    what = (f"this llama.cpp build ({_build_text(build)}) is not the one that quantized the split "
            f"({_build_text(theirs)})")
    if differ:
        return [f"{what}, and it rounds {len(differ)} of {len(picks)} reused tensors differently "
                f"({', '.join(differ)}): the reused tensors keep the split's bytes, the new ones get this build's, "
                "so the new task is not exactly what either build's llama-quantize writes"]
    return [f"{what}; {len(picks)} reused tensors quantized again here gave the same bytes"]


def _build_text(build: Mapping[str, str]) -> str:
    return f"llama-cpp-python {build.get('llama_cpp_python', '?')}, ggml {build.get('ggml_version', '?')}" \
           f" {build.get('ggml_commit', '')}".rstrip()


def stored_units(sd: SplitDir) -> StoredUnits:
    """Every quantized task's units in a split (unit key -> its bytes in the split's files), its recipe and
    build; the files stay open (they are read when an added task copies a unit) until `close`."""
    out = StoredUnits()
    cache: dict[str, SplitFile] = {}
    try:
        finder = FileFinder()
        for task in sd.tasks:
            tf = open_task(sd.adaptors[task], finder, cache=cache)
            out.files.append(tf.adaptor)
            q = tf.info.quantize
            if q is None:
                continue
            out.recipes[task], out.builds[task] = q.recipe, q.build
            held = {t.name: (f, t, d) for f in tf.files for t, d in zip(f.header.tensors, f.digests())}
            order = parse_tensor_infos(tf.adaptor.blob(K_SRC_TENSOR_INFOS), tf.adaptor.path, 1)
            for i, t in enumerate(order):
                f, info, digest = held[t.name]
                if q.unit_key(i) != NO_UNIT:  # a whole-model task's tensors carry no key
                    out.units.setdefault(q.unit_key(i), Unit(f, f.header.data_start + info.offset, info.nbytes, digest))
    except BaseException:
        out.files += cache.values()
        out.close()
        raise
    out.files += cache.values()
    return out


def reusable_units(sd: SplitDir) -> StoredUnits | None:
    """The units of the split a re-split (`--force`) replaces, when it has quantized tasks: equal unit keys
    are equal bytes, so they need not be quantized again. A split that cannot be read as a whole (a re-split
    is also how a damaged one is replaced) gives none."""
    if not any(_is_quantized_task(path) for path in sd.adaptors.values()):
        return None
    try:
        return stored_units(sd)
    except GGUFSplitError:
        return None


def _is_quantized_task(adaptor: str) -> bool:
    try:
        with SplitFile(adaptor) as f:
            return K_Q_TYPE in f.header.kv_by_key
    except GGUFSplitError:
        return False


def add_recipe(opts: SplitOptions, stored: StoredUnits, directory: str) -> Recipe | None:
    """The recipe an `add` quantizes with: the options' (checked against the split's unless
    allow_recipe_change), or, without --quantize, the split's own (its imatrix and template must be given
    again: the split records them by digest, not their contents). None: nothing to quantize with."""
    theirs = list(dict.fromkeys(stored.recipes.values()))
    if opts.quantize is None and not theirs:
        return recipe_of(opts)
    if opts.quantize is None:
        r = theirs[0]
        opts = dataclasses.replace(opts, quantize=r.qtype, quantize_args=opts.quantize_args or r.options or None)
        if r.imatrix_sha256 and opts.imatrix is None:
            raise GGUFSplitError(show(directory), f"its tasks were quantized with the imatrix {r.imatrix_name} (sha256 "
                                                  f"{r.imatrix_sha256[:16]}...): give it again with --imatrix FILE")
        if r.template_sha256 and opts.quantize_template is None:
            raise GGUFSplitError(show(directory), f"its tasks were quantized with the template {r.template_name}: "
                                                  "give it again with --quantize-template FILE")
    recipe = recipe_of(opts)
    assert recipe is not None
    if theirs and recipe.record() not in theirs and not opts.allow_recipe_change:
        first = theirs[0]
        what = "; ".join(first.differences(recipe.record()))
        raise GGUFSplitError(show(directory), f"its tasks were quantized with another recipe ({what}): the new "
                                              "task would share nothing it quantizes; give the split's recipe, or "
                                              "--allow-recipe-change")
    return recipe


def recipe_of(opts: SplitOptions) -> Recipe | None:
    """The recipe the options ask for (None without --quantize), read and checked before any model is
    hashed: an unreadable or corrupt imatrix or template, an unknown type, or no llama.cpp binding is one
    line naming the problem."""
    if opts.quantize is None:
        for name in ("imatrix", "quantize_template", "quantize_args"):
            if getattr(opts, name) is not None:
                raise GGUFSplitError(None, f"{flag_of(name)} is given without --quantize TYPE")
        return None
    backend()  # the install hint first: nothing else matters without llama.cpp
    if opts.quantize_template is not None:
        check_input_path(opts.quantize_template, "template model")
    return make_recipe(opts.quantize, opts.imatrix, template=opts.quantize_template,
                       **parse_quantize_args(opts.quantize_args or ""))
