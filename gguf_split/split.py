"""Split: scan + plan + write + prove, the library call behind `gguf-split split`.

The split proves every task's restore before it reports success, without reading tensor data a second
time: it rebuilds each original header from the adaptor it has just written and compares it byte for byte
with the original's, checks that every original tensor resolves (adaptor or foundation) to a tensor of the
same type, shape and digest, and that the padding restore would write equals the original's.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

from .errors import GGUFSplitError
from .layout import (
    K_FOUNDATION_FILE,
    ROLE_ADAPTOR,
    Copy,
    PlannedTensor,
    SplitFile,
    adaptor_kvs,
    build_header,
    foundation_id,
    foundation_kvs,
    identity_record,
    open_output,
    plan_restore,
    role_of,
)
from .plan import ModelTensors, SplitPlan, TensorId, missing_tensors, plan_split
from .progress import QUIET, Progress
from .scan import ScannedModel, hash_models, open_model
from .write import OutputDir, check_links, make_links, write_gguf

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")


def foundation_name(prefix: str = "") -> str:
    return f"{prefix}foundation.gguf"


def adaptor_name(task: str, prefix: str = "") -> str:
    return f"{prefix}adaptor-{task}.gguf"


def check_task_name(task: str, where: str | None = None) -> None:
    if not TASK_NAME.match(task):
        raise GGUFSplitError(where, f"task name {task!r} must start with a letter or digit and hold only letters, "
                                    "digits and _ . + - (it becomes part of a file name)")


@dataclass
class TaskReport:
    task: str
    source: str
    source_bytes: int
    adaptor: str
    adaptor_bytes: int  # file size
    tensors: int  # tensors in the adaptor
    tensor_bytes: int  # their bytes
    model_tensors: int  # tensors of the whole model
    model_tensor_bytes: int
    reasons: dict[str, str] = field(default_factory=dict)  # adaptor tensor -> why it is not shared
    missing: list[str] = field(default_factory=list)  # tensors other tasks have, this one does not
    links: list[str] = field(default_factory=list)

    @property
    def foundation_share(self) -> float:
        """Fraction of this model's tensor bytes served by the foundation."""
        return 1 - self.tensor_bytes / self.model_tensor_bytes if self.model_tensor_bytes else 0.0


@dataclass
class SplitReport:
    directory: str
    foundation: str
    foundation_bytes: int  # file size
    foundation_tensors: int
    foundation_id: str
    tasks: list[TaskReport]

    @property
    def input_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tasks)

    @property
    def output_bytes(self) -> int:
        return self.foundation_bytes + sum(t.adaptor_bytes for t in self.tasks)

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.input_bytes if self.input_bytes else 0.0


def _model_tensors(m: ScannedModel) -> ModelTensors:
    return ModelTensors(m.architecture, tuple(TensorId(t.name, t.ggml_type, t.shape, m.digests[t.name], t.nbytes)
                                              for t in m.header.tensors))


def split(tasks: dict[str, str | os.PathLike[str]], output: str | os.PathLike[str], *, prefix: str = "",
          force: bool = False, link: bool = False, allow_unrelated: bool = False, threads: int | None = None,
          progress: Progress = QUIET) -> SplitReport:
    """Split `tasks` (name -> GGUF path) into `output`/foundation.gguf + adaptor-<task>.gguf."""
    if not tasks:
        raise GGUFSplitError(None, "no tasks given")
    for task in tasks:
        check_task_name(task)
    if prefix and not re.match(r"^[A-Za-z0-9_.+-]*$", prefix):
        raise GGUFSplitError(None, f"prefix {prefix!r} may hold only letters, digits and _ . + -")
    models: dict[str, ScannedModel] = {}
    try:
        seen: dict[str, str] = {}
        for task, path in tasks.items():
            real = os.path.realpath(path)
            if real in seen:
                raise GGUFSplitError(path, f"is given twice (tasks {seen[real]!r} and {task!r})")
            seen[real] = task
            models[task] = open_model(task, path)
        hash_models(list(models.values()), progress, threads)
        summary = {t: _model_tensors(m) for t, m in models.items()}
        plan = plan_split(summary, allow_unrelated=allow_unrelated, paths={t: m.path for t, m in models.items()})
        return _write(models, summary, plan, output, prefix=prefix, force=force, link=link, progress=progress)
    finally:
        for m in models.values():
            m.close()


def _write(models: dict[str, ScannedModel], summary: dict[str, ModelTensors], plan: SplitPlan,
           output: str | os.PathLike[str], *, prefix: str, force: bool, link: bool, progress: Progress) -> SplitReport:
    alignment = max(m.header.alignment for m in models.values())
    found_src = {t: m for m in reversed(list(models.values())) for t in m.header.tensor_by_name}

    def planned(x: TensorId, m: ScannedModel) -> PlannedTensor:
        t = m.header.tensor_by_name[x.name]
        return PlannedTensor(x.name, x.shape, x.ggml_type, x.nbytes, m.file, m.header.data_start + t.offset, x.digest)

    f_tensors = [planned(x, found_src[x.name]) for x in plan.foundation]
    fid = foundation_id(identity_record((t.name, t.shape, t.ggml_type), t.digest) for t in f_tensors)
    archs = {m.architecture for m in models.values()}
    f_kvs = foundation_kvs(archs.pop() if len(archs) == 1 else None, fid,
                           b"".join(t.digest for t in f_tensors), alignment)
    f_header, f_offsets, f_data = build_header(f_kvs, [], f_tensors, alignment)
    f_name = foundation_name(prefix)

    outputs: list[tuple[str, bytes, int, list[PlannedTensor], list[int], int]] = [
        (f_name, f_header, f_data, f_tensors, f_offsets, alignment)]
    for task, m in models.items():
        a_tensors = [planned(x, m) for x in plan.adaptors[task]]
        own, kept = adaptor_kvs(task=task, source=m.file, source_digest=m.file_digest, nonzero_gaps=m.nonzero_gaps,
                                fid=fid, foundation_file=f_name, digests=b"".join(t.digest for t in a_tensors))
        header, offsets, data = build_header(own, kept, a_tensors, m.header.alignment)
        outputs.append((adaptor_name(task, prefix), header, data, a_tensors, offsets, m.header.alignment))

    total = sum(t.nbytes for o in outputs for t in o[3])
    inputs = [m.path for m in models.values()]
    with OutputDir(output, force=force, protect=inputs) as out:
        temps = {}
        for name, *_ in outputs:
            out.check_target(name)
        check_no_orphans(out.dir, prefix, set(models), f_name)
        if link:
            for task in models:
                check_links(out.dir, task, adaptor_name(task, prefix), f_name, force=force)
        with progress.bar("writing", total) as bar:
            for name, header, data, tensors, offsets, align in outputs:
                tmp = out.new(name)
                temps[name] = tmp
                pieces = [(o, t.src, t.src_offset, t.nbytes) for t, o in zip(tensors, offsets)]
                out.guard(tmp, lambda fd, h=header, d=data, p=pieces, a=align: write_gguf(fd, h, d, p, bar, a))
        _prove(models, {t: temps[adaptor_name(t, prefix)].tmp for t in models}, temps[f_name].tmp)
        out.commit()
        reports = []
        for task, m in models.items():
            a_path = out.path(adaptor_name(task, prefix))
            links = make_links(out.dir, task, os.path.basename(a_path), f_name, force=force) if link else []
            a_tensors = plan.adaptors[task]
            reports.append(TaskReport(task, m.path, m.file.size, a_path, os.path.getsize(a_path), len(a_tensors),
                                      sum(x.nbytes for x in a_tensors), len(m.header.tensors),
                                      sum(t.nbytes for t in m.header.tensors), plan.reasons[task],
                                      missing_tensors(summary)[task], links))
        f_path = out.path(f_name)
        return SplitReport(out.dir, f_path, os.path.getsize(f_path), len(plan.foundation), fid, reports)


def check_no_orphans(directory: str, prefix: str, tasks: set[str], f_name: str) -> None:
    """Replacing `f_name` would strand the adaptors of other tasks that use it (they could no longer be
    restored or loaded, and the directory would no longer verify): refuse, before anything is written."""
    keep = {adaptor_name(t, prefix) for t in tasks}
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), f"{glob.escape(prefix)}adaptor-*.gguf"))):
        if os.path.basename(path) in keep or os.path.islink(path):
            continue
        try:
            with open_output(path) as f:
                uses = f.get(K_FOUNDATION_FILE) if role_of(f) == ROLE_ADAPTOR else None
        except GGUFSplitError:
            continue
        if uses == f_name:
            raise GGUFSplitError(path, f"uses {f_name}, which this split would replace, and its task is not in "
                                       "this split: add the task, remove this file, or split into another directory")


def _prove(models: dict[str, ScannedModel], adaptor_tmp: dict[str, str], foundation_tmp: str) -> None:
    """Check, from the files just written, that restore would rebuild every input byte for byte."""
    with SplitFile(foundation_tmp) as fnd:
        for task, m in models.items():
            with SplitFile(adaptor_tmp[task]) as ad:
                rp = plan_restore(ad, fnd)
                src = m.file
                h = m.header

                def fail(what: str) -> GGUFSplitError:
                    return GGUFSplitError(m.path, f"internal error: the split could not prove its restore ({what}); "
                                                  "nothing was written. Please report this.")

                if rp.size != src.size or rp.xxh3 != m.file_digest.hex():
                    raise fail("size or digest record")
                if rp.header_bytes != src.raw(0, h.tensor_info_end):
                    raise fail("header bytes differ")
                gaps = dict(m.nonzero_gaps)
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
