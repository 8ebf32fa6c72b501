"""Writing a pack: a set of GGUF files as one `NAME.ggufpack` that travels in far fewer bytes.

    pack_files([(name, path), ...], "set.ggufpack", kind="models", meta={...}) -> PackReport

The format is in docs/pack-format.md (its facts in format.py). The writer is a sequence of stages, each
working on what the one before produced:

1. hash       each file's sha256 and xxh3-128, each tensor's xxh3-128: one sweep per file   (inventory.py)
2. inventory  every distinct tensor and header piece once, each file as parts               (inventory.py)
3. plan       per tensor: plain (with its shuffle) or a delta against which base             (planning.py)
4. records    the data records in order of first use, coded on a pool, written in order     (records.py)
5. index      the index (index.py) as one zstd record, then the tail pointing at it          (here)

The pack is written through `disk.commit.write_files` (a hidden temporary, fsynced, renamed when complete),
so a failed or killed run leaves no pack, and an existing one only goes once the new one is in place.

Memory: tensors are handled in chunks of whole rows (about 2^20 elements), a bounded number at a time, so
packing holds a few chunks per thread plus, while a delta is planned, its (rows × ~72) float32 sketch;
never a whole tensor, except a single row larger than a chunk.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Sequence

import numpy as np
import zstandard

from ..disk.commit import buffered, write_files
from ..disk.jobs import default_threads
from ..disk.progress import QUIET, Progress
from ..errors import GGUFSplitError
from ..format.gguf import GGUFFile
from ..format.names import check_bare_name
from . import codec
from .format import (KIND_INDEX, MAX_INDEX_BYTES, MAX_META_BYTES, REC_ZSTD, VERSION_CODECS, RecordHeader, Tail,
                     encode_head)
from .index import BlobEntry, FileEntry, FileParts, Index, TensorEntry
from .inventory import Inventory, hash_files, take_inventory
from .planning import TensorPlan, plan_codecs
from .records import LEVEL_HEADERS, LEVEL_TENSORS, PackStream, Written, write_records
from .report import PackReport, pack_report


@dataclass(frozen=True)
class PackJob:
    """What pack_files was asked: the inputs' names, the output, and how to write it."""

    names: list[str]
    out_path: str
    kind: Any
    meta: Any
    threads: int
    level: int
    force: bool


def pack_files(inputs: Sequence[tuple[str, str | os.PathLike[str]]], out_path: str | os.PathLike[str], *,
               kind: Any = "models", meta: Any = None, threads: int | None = None,
               progress: Progress = QUIET, force: bool = False, level: int = LEVEL_TENSORS) -> PackReport:
    """Pack GGUF files into one pack at `out_path` (written to a temporary beside it, renamed when done).

    `inputs`: (name, path) in order; `name` is the bare file name unpack gives back. `kind` and `meta` are
    small JSON values stored in the index as they are (e.g. "split" and task -> file names)."""
    t_start = time.perf_counter()
    job = _checked_job(inputs, os.path.abspath(os.fspath(out_path)), kind, meta, default_threads(threads), level,
                       force)
    files: list[GGUFFile] = []
    try:
        for _, p in inputs:
            files.append(GGUFFile(p))
        for gf in files:
            if os.path.exists(job.out_path) and os.path.samefile(gf.path, job.out_path):
                raise GGUFSplitError(job.out_path, "the pack would overwrite one of its inputs")
        return _pack(files, job, progress, t_start)
    finally:
        for gf in files:
            gf.close()


def _checked_job(inputs: Sequence[tuple[str, str | os.PathLike[str]]], out_path: str, kind: Any, meta: Any,
                 threads: int, level: int, force: bool) -> PackJob:
    """The request, refused in one line before any input is opened: kind/meta not small plain JSON, no
    inputs, a name a pack cannot give back, two inputs of one name, an existing output without force, an
    output name unpack's rule refuses (a hidden one, say)."""
    try:
        index_extra = json.dumps({"kind": kind, "meta": meta}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GGUFSplitError(out_path, f"kind/meta are not plain JSON values: {e}") from None
    if len(index_extra) > MAX_META_BYTES:
        raise GGUFSplitError(out_path, "kind/meta are larger than 16 MiB")
    if not inputs:
        raise GGUFSplitError(out_path, "nothing to pack: no input files")
    names = [check_bare_name(n, os.fspath(p), strict=True) for n, p in inputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GGUFSplitError(out_path, f"two inputs have the file name {dup!r}")
    if os.path.lexists(out_path):
        if not force:
            raise GGUFSplitError(out_path, "already exists (use --force to replace it)")
        if os.path.isdir(out_path):
            raise GGUFSplitError(out_path, "is a directory")
    check_bare_name(os.path.basename(out_path), os.path.dirname(out_path), strict=True)
    return PackJob(names, out_path, kind, meta, threads, level, force)


def _pack(files: list[GGUFFile], job: PackJob, progress: Progress, t_start: float) -> PackReport:
    """The stages (module docstring), the records and index written as the pack's one new file."""
    inv = take_inventory(files, hash_files(files, job.threads, progress))
    plans = plan_codecs(inv.tensors, job.level, job.threads, progress)
    out_dir, out_name = os.path.split(job.out_path)
    result: list[tuple[int, Written]] = []

    def write_pack(f: BinaryIO) -> None:
        out = PackStream(f)
        version = pack_version(plans)
        out.write(encode_head(version))
        written = write_records(out, inv, plans, job.level, job.threads, progress, job.out_path)
        write_index(out, build_index(job, inv, plans, written), job.out_path, version)
        result.append((out.pos, written))

    write_files(out_dir, [(out_name, buffered(write_pack))], force=job.force)
    pack_bytes, written = result[0]
    return pack_report(job.out_path, pack_bytes, job.names, inv, plans, written, time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------------------
# Stage 5: the index and the tail


def pack_version(plans: list[TensorPlan]) -> int:
    """The lowest format version whose codecs the plans use: a pack that needs none of version 2's codecs
    is a version-1 pack, which older readers read."""
    return min(v for v, codecs in VERSION_CODECS.items() if all(p.codec in codecs for p in plans))


def build_index(job: PackJob, inv: Inventory, plans: list[TensorPlan], written: Written) -> Index:
    """The index's entries: where every record landed, and each file's digests and parts."""
    index = Index(job.kind, job.meta)
    index.blobs = [BlobEntry(b.size, b.digest.hex(), written.blobs[b.index].offset) for b in inv.blobs]
    index.tensors = [_tensor_entry(t.index, inv, plans, written) for t in inv.tensors]
    for name, f, d, parts in zip(job.names, inv.files, inv.digests, inv.parts):
        assert d.sha256 is not None
        index.files.append(FileParts(FileEntry(name, f.size, d.sha256, d.xxh3_hex), parts))
    return index


def _tensor_entry(i: int, inv: Inventory, plans: list[TensorPlan], written: Written) -> TensorEntry:
    t, plan, rec = inv.tensors[i], plans[i], written.tensors[i]
    e = TensorEntry(t.names[0], t.geo, t.digest.hex(), t.rows_per_chunk, plan.codec, rec.chunks, shuffle=plan.stride)
    if plan.delta is not None:
        e.base, e.rank, e.factor_type = plan.base, plan.delta.rank, plan.delta.factor_type
        e.residual, e.factors = plan.delta.mode, rec.factors
    e.source, e.imatrix = plan.source, plan.imatrix
    return e


def write_index(out: PackStream, index: Index, out_path: str, version: int) -> None:
    """The index as one zstd record (JSON, compact), then the tail pointing at it."""
    raw = json.dumps(index.to_json(version, writer_versions()), separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw) > MAX_INDEX_BYTES:
        raise GGUFSplitError(out_path, f"the index would be {len(raw)} bytes, over the limit of {MAX_INDEX_BYTES}")
    z = codec.compress(raw, LEVEL_HEADERS)
    offset = out.record(KIND_INDEX, REC_ZSTD, z, len(raw))
    out.write(Tail(offset, RecordHeader.SIZE + len(z), version).encode())


def writer_versions() -> dict[str, Any]:
    """The index's "writer": informational."""
    import gguf

    from .. import __version__

    return {"gguf_split": __version__, "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "numpy": np.__version__, "zstandard": zstandard.__version__}


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - informational only
        return None
