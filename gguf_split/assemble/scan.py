"""Scan: open each input model, check it can be split, and hash it (xxh3-128).

A model is one GGUF file, or several: a model shipped as llama.cpp shards (`name-00001-of-00003.gguf`, as
`llama-gguf-split` writes and hubs serve) is given by its first shard and read as one model: KVs from
shard 1, tensors from all shards in order, `split.count` and `split.tensors.count` checked.

Opening checks everything that can be checked from headers (and padding, which is small) before any
tensor byte is hashed, so a refusal comes at once. Bytes outside the tensors beyond alignment padding (a
tail after the tensor data, a gap between tensors: llama.cpp ignores them) are kept for restore up to
MAX_EXTRA_BYTES per file and refused beyond, from the header alone: a sparse 1 TiB tail costs nothing.
Hashing then computes, per input file, in one front-to-back sweep of its mmap (each piece feeds the
whole-file hasher and its tensor's hasher while it is in the CPU cache): every tensor's digest and the
whole file's (what `xxh128sum` prints, recorded so restore can prove its output). Files are hashed on a
thread pool (python-xxhash releases the GIL); Ctrl-C is acted on within a fraction of a second whatever
the input size: workers check a flag between 1 MiB pieces and the main thread never blocks on them
without a timeout.

An input rewritten in place while it is split would make the split's records lie: `check_unchanged`
compares each input's size, mtime and inode after the outputs are written with what they were at open.

Manifests (disk.manifest): given a `ManifestSource` (the manifest cache), `hash_models` takes a file's
digests from a manifest of that very file (same device, inode, size, mtime and ctime; same tensor
records; same frame, i.e. header and padding, re-hashed now: cheap) instead of reading its tensors, and
leaves a manifest of every file it hashes. Planning may trust that; writing may not: a tensor `split`
deduplicates into another model's copy is never read from its own input, so `recheck_cached` hashes,
before the commit, every tensor of a cached input that was not copied into a new file (copied ones are
checked in the files written), and a difference fails the run and drops the stale manifest.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from gguf.constants import GGUFValueType

from ..disk.jobs import run_jobs
from ..disk.manifest import FileKey, ManifestSource, frame_digest, manifest_of, matches_header
from ..disk.sweep import PIECE, TENSOR, Span, sweep, sweep_file
from ..errors import GGUFSplitError, os_problem
from ..format.gguf import ARCHITECTURE_KEY, GGUFFile, Header, TensorInfo, align_up, iter_gaps
from ..format.names import SHARD_NAME, show
from .plan import TensorId
from ..disk.progress import QUIET, Progress, Reporter
from ..format.records import (
    OWN_PREFIX,
    SPLIT_COUNT,
    SPLIT_KEYS,
    SPLIT_NO,
    SPLIT_TENSORS,
    QuantizeRecords,
    SourceFile,
    SourceRecords,
)

MAX_NONZERO_GAP_BYTES = 16 << 20  # more than this outside the tensors is not padding; refuse
# Bytes outside the tensors beyond alignment padding (a tail after the tensor data, a gap between tensors):
# llama.cpp ignores them and no writer makes them, but restore must give them back, so they are read, hashed
# and (if not zero) recorded. Kept up to this bound per file, refused beyond it (zero or not) before any of
# them is read: a 1 TiB sparse tail would otherwise be minutes of reading.
MAX_EXTRA_BYTES = 16 << 20


@dataclass
class InputFile:
    """One file of an input model, open, with what scanning found in it."""

    file: GGUFFile
    stat: tuple[int, int, int, int]  # dev, inode, size, mtime_ns at open
    digest: bytes = b""  # whole file, xxh3-128
    nonzero_gaps: list[tuple[int, bytes]] = field(default_factory=list)  # (file offset, bytes)
    cached: ManifestSource | None = None  # where its digests came from (None: hashed in this run)

    @property
    def path(self) -> str:
        return self.file.path


@dataclass
class ScannedModel:
    """One input model (one file, or a model's shards), open and hashed."""

    task: str
    files: list[InputFile]
    tensors: list[tuple[TensorInfo, int]]  # every tensor in source order, with the index of its file
    digests: dict[str, bytes] = field(default_factory=dict)  # tensor name -> xxh3-128
    quantized: QuantizeRecords | None = None  # a model quantized by the split (quantize.family.QuantizedModel)

    @property
    def path(self) -> str:
        return self.files[0].path

    @property
    def first(self) -> GGUFFile:
        return self.files[0].file

    @functools.cached_property
    def architecture(self) -> str | None:
        arch = self.first.get(ARCHITECTURE_KEY, expect=GGUFValueType.STRING)
        return arch if isinstance(arch, str) else None

    @property
    def size(self) -> int:
        return sum(f.file.size for f in self.files)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t, _ in self.tensors)

    @property
    def header_bytes(self) -> int:
        """Bytes of the first file's KVs (what the adaptor repeats)."""
        h = self.first.header
        return h.tensor_info_start

    def tensor_ids(self) -> list[TensorId]:
        return [TensorId(t.name, t.ggml_type, t.shape, self.digests[t.name], t.nbytes) for t, _ in self.tensors]

    def tensor_index(self, name: str) -> int:
        """The position of tensor `name` in `tensors`."""
        return self._index[name]

    def source_of(self, name: str) -> tuple[GGUFFile, int]:
        """(file, absolute offset) of a tensor's bytes."""
        t, i = self._by_name[name]
        f = self.files[i].file
        return f, f.header.data_start + t.offset

    def __post_init__(self) -> None:
        self._by_name = {t.name: (t, i) for t, i in self.tensors}
        self._index = {t.name: k for k, (t, _) in enumerate(self.tensors)}

    def watched_files(self) -> list[InputFile]:
        """The user's files this model is read from, which must not change while it is split (a quantized
        model's are its full-precision input's)."""
        return self.files

    def source_records(self) -> SourceRecords:
        """What the adaptor records so restore rebuilds every input file byte for byte."""
        files, infos, shard_kvs, gaps = [], [], [], []
        replaced = b""
        kept: list[bytes] = []
        for i, inp in enumerate(self.files):
            f, h = inp.file, inp.file.header
            files.append(SourceFile(os.path.basename(f.path), f.size, inp.digest.hex(), h.version, len(h.tensors)))
            infos.append(f.raw(h.tensor_info_start, h.tensor_info_end))
            if i == 0:
                replaced = b"".join(struct.pack("<I", j) + f.raw(kv.start, kv.end)
                                    for j, kv in enumerate(h.kvs) if kv.key in SPLIT_KEYS)
                kept = [f.raw(kv.start, kv.end) for kv in h.kvs if kv.key not in SPLIT_KEYS]
            else:
                kvs = f.raw(h.kv_start, h.tensor_info_start)
                shard_kvs.append(struct.pack("<QQ", len(h.kvs), len(kvs)) + kvs)
            gaps += [struct.pack("<IQQ", i, off, len(b)) + b for off, b in inp.nonzero_gaps]
        return SourceRecords(files, b"".join(infos), replaced, b"".join(shard_kvs), b"".join(gaps), kept)

    def close(self) -> None:
        for f in self.files:
            f.file.close()


def _stat(f: GGUFFile) -> tuple[int, int, int, int]:
    st = os.fstat(f.fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_input_path(path: str | os.PathLike[str], what: str = "model") -> None:
    """One clear line for a path that is not a readable regular file (before opening it)."""
    import stat as st_mod

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise GGUFSplitError(show(path), "file not found") from None
    except OSError as e:
        raise GGUFSplitError(show(path), f"cannot open: {os_problem(e)}") from None
    except ValueError:
        raise GGUFSplitError(show(path), "cannot open: the path holds a NUL byte") from None
    mode = st.st_mode
    kind = ("a directory" if st_mod.S_ISDIR(mode) else "a FIFO (named pipe)" if st_mod.S_ISFIFO(mode)
            else "a character device" if st_mod.S_ISCHR(mode) else "a block device" if st_mod.S_ISBLK(mode)
            else "a socket" if st_mod.S_ISSOCK(mode) else None)
    if kind is not None:
        raise GGUFSplitError(show(path), f"is {kind}, not a GGUF {what} file")


def _refuse_own_output(f: GGUFFile) -> None:
    if any(k.startswith(OWN_PREFIX) for k in f.header.kv_by_key):
        role = f.get("gguf_split.role", "output")
        hint = " (`gguf-split restore` gives the model back)" if role == "adaptor" else ""
        raise GGUFSplitError(f.path, f"is a gguf-split {role} file, not a model{hint}")


_INT_TYPES = {GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64,
              GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64}


def _check_name(path: str) -> None:
    """The adaptor records each original file's name (GGUF text is UTF-8) for restore to write it back."""
    try:
        os.path.basename(path).encode("utf-8")
    except UnicodeEncodeError:
        raise GGUFSplitError(show(path), "file name is not valid UTF-8: rename the file first (the split records "
                                         "the original file name, as UTF-8 text, for restore)") from None


def _int_kv(f: GGUFFile, key: str) -> int | None:
    """An integer KV (split.no and friends are u16/i32 in llama.cpp's files; any integer type is read),
    without decoding whatever else a file may have put under that key."""
    kv = f.header.kv_by_key.get(key)
    if kv is None or kv.vtype not in _INT_TYPES:
        return None
    v = f.kv_value(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def extra_bytes(h: Header) -> tuple[int, int]:
    """(bytes outside the tensors beyond alignment padding, how many of them follow the last tensor's
    padding): in each gap, what lies past the alignment boundary after the preceding header or tensor."""
    gaps = list(iter_gaps(h))
    extra = [max(0, e - align_up(s, h.alignment)) for s, e in gaps]
    tail = extra[-1] if gaps and gaps[-1][1] == h.file_size and gaps[-1][0] >= h.data_end() else 0
    return sum(extra), tail


def _check_extra_bytes(f: GGUFFile) -> None:
    h = f.header
    extra, tail = extra_bytes(h)
    if extra <= MAX_EXTRA_BYTES:
        return
    where = "after its tensor data" if tail == extra else "between or after its tensors"
    cut = f" (`truncate -s {f.size - tail} FILE` removes the tail)" if tail > MAX_EXTRA_BYTES else ""
    raise GGUFSplitError(f.path, f"holds {extra:,} bytes {where} beyond alignment padding, which llama.cpp ignores; "
                                 f"at most {MAX_EXTRA_BYTES >> 20} MiB of them are kept{cut}")


def open_input(task: str, path: str | os.PathLike[str]) -> ScannedModel:
    """Open a model (or the first shard of a sharded model, with its siblings) and check it is splittable."""
    check_input_path(path)
    first = GGUFFile(path)
    opened = [first]
    try:
        _refuse_own_output(first)
        count = _int_kv(first, SPLIT_COUNT)
        no = _int_kv(first, SPLIT_NO)
        if no not in (0, None) and count is not None and count > 1:
            raise GGUFSplitError(first.path, f"is shard {no + 1} of a {count}-file model: give its first shard "
                                             f"(…-00001-of-{count:05d}.gguf)")
        if no not in (0, None):
            raise GGUFSplitError(first.path, f"is shard {no + 1} of a split model (split.no = {no}): give its "
                                             "first shard")
        if count is not None and count > 1:
            opened += _open_siblings(first, count)
            total = _int_kv(first, SPLIT_TENSORS)
            n = sum(len(f.header.tensors) for f in opened)
            if total is not None and total != n:
                raise GGUFSplitError(first.path, f"its {count} shards hold {n} tensors, split.tensors.count says {total}")
        tensors: list[tuple[TensorInfo, int]] = []
        seen: dict[str, int] = {}
        for i, f in enumerate(opened):
            for t in f.header.tensors:
                if t.name in seen:
                    raise GGUFSplitError(f.path, f"tensor {t.name!r} is also in {opened[seen[t.name]].path}")
                seen[t.name] = i
                tensors.append((t, i))
        for f in opened:
            _check_name(f.path)
        for f in opened:
            _check_extra_bytes(f)  # from the header alone: before a byte outside the tensors is read
        files = [InputFile(f, _stat(f)) for f in opened]
        total_nonzero = 0
        for inp in files:
            for s, e in iter_gaps(inp.file.header):
                view = inp.file.view(s, e)
                if any(view[j:j + PIECE].tobytes().count(0) != len(view[j:j + PIECE]) for j in range(0, e - s, PIECE)):
                    total_nonzero += e - s
                    if total_nonzero > MAX_NONZERO_GAP_BYTES:
                        raise GGUFSplitError(inp.path, f"holds more than {MAX_NONZERO_GAP_BYTES >> 20} MiB of non-zero "
                                                       "bytes outside its tensors; not a file llama.cpp or gguf-py writes")
                    inp.nonzero_gaps.append((s, inp.file.raw(s, e)))
        return ScannedModel(task, files, tensors)
    except BaseException:
        for f in opened:
            f.close()
        raise


def _open_siblings(first: GGUFFile, count: int) -> list[GGUFFile]:
    name = os.path.basename(first.path)
    m = SHARD_NAME.fullmatch(name)
    if m is None or int(m["no"]) != 1 or int(m["count"]) != count:
        raise GGUFSplitError(first.path, f"is the first of {count} shards, but its name does not end in "
                                         f"-00001-of-{count:05d}.gguf, so its other shards cannot be found")
    directory = os.path.dirname(first.path)
    out: list[GGUFFile] = []
    try:
        for k in range(2, count + 1):
            p = os.path.join(directory, f"{m['prefix']}-{k:05d}-of-{count:05d}.gguf")
            if not os.path.lexists(p):
                raise GGUFSplitError(p, f"shard {k} of {count} of {show(first.path)} is missing")
            check_input_path(p)
            f = GGUFFile(p)
            out.append(f)
            _refuse_own_output(f)
            if _int_kv(f, SPLIT_NO) != k - 1 or _int_kv(f, SPLIT_COUNT) not in (count, None):
                raise GGUFSplitError(p, f"is not shard {k} of {count} of {show(first.path)} (split.no = "
                                        f"{f.get(SPLIT_NO)}, split.count = {f.get(SPLIT_COUNT)})")
            total = _int_kv(f, SPLIT_TENSORS)
            if total is not None and total != _int_kv(first, SPLIT_TENSORS):
                raise GGUFSplitError(p, f"is a shard of another model (split.tensors.count {total}, the first "
                                        f"shard says {first.get(SPLIT_TENSORS)})")
        return out
    except BaseException:
        for f in out:
            f.close()
        raise


def _hash_file(inp: InputFile, model: ScannedModel, bar: Reporter, cache: ManifestSource | None,
               cancel: threading.Event) -> None:
    """Tensor digests and the whole-file digest (recorded for restore) in one sweep; the manifest to `cache`
    when the file did not change meanwhile."""
    recorded_ns = time.time_ns()  # before the stat: the cache's racy-clean rule must be conservative
    before = FileKey.of(os.fstat(inp.file.fd))
    d = sweep_file(inp.file, bar=bar, cancel=cancel)
    for t, digest in zip(inp.file.header.tensors, d.tensors):
        model.digests[t.name] = digest
    inp.digest = d.xxh3
    if cache is not None and FileKey.of(os.fstat(inp.file.fd)) == before:
        cache.store(manifest_of(inp.file, before, recorded_ns, d.xxh3, d.tensors))


def _from_manifest(inp: InputFile, model: ScannedModel, cache: ManifestSource) -> bool:
    """Fill in a file's digests from a manifest of this very file, if `cache` has one."""
    found = cache.lookup(inp.path, os.fstat(inp.file.fd))
    if found is None or not matches_header(found, inp.file.header.tensors) or found.frame != frame_digest(inp.file):
        return False
    for t in found.tensors:
        model.digests[t.name] = t.digest
    inp.digest = found.xxh3
    inp.cached = cache
    return True


def hash_models(models: Sequence[ScannedModel], progress: Progress = QUIET, threads: int | None = None,
                cache: ManifestSource | None = None) -> None:
    """Fill in every model's tensor digests and every input file's digest (from `cache` where it holds a
    manifest of the file; what is hashed is left there)."""
    jobs = sorted(((inp, m) for m in models for inp in m.files if cache is None or not _from_manifest(inp, m, cache)),
                  key=lambda x: -x[0].file.size)
    total = sum(inp.file.size for inp, _ in jobs)
    with progress.bar("hashing", total) as bar:
        run_jobs(_hash_file, [(inp, m, bar, cache) for inp, m in jobs], threads)


def recheck_cached(models: Sequence[ScannedModel], copied: Collection[tuple[int, int]], progress: Progress = QUIET,
                   threads: int | None = None) -> None:
    """Before a commit: hash every tensor of an input whose digests came from a manifest, except those
    copied into a new file (`copied`: (id of the GGUFFile, absolute offset); the written files are checked
    against the digests), and refuse the run if one differs (the stale manifest is dropped)."""
    jobs: list[tuple[InputFile, ScannedModel, list[TensorInfo]]] = []
    for m in models:
        for i, inp in enumerate(m.files):
            start = inp.file.header.data_start
            todo = [t for t, j in m.tensors if j == i and (id(inp.file), start + t.offset) not in copied] \
                if inp.cached is not None else []
            if todo:
                jobs.append((inp, m, sorted(todo, key=lambda t: t.offset)))
    total = sum(t.nbytes for _, _, ts in jobs for t in ts)
    with progress.bar("checking", total) as bar:
        run_jobs(_recheck, [(inp, m, ts, bar) for inp, m, ts in jobs], threads)


def _recheck(inp: InputFile, model: ScannedModel, tensors: list[TensorInfo], bar: Reporter,
             cancel: threading.Event) -> None:
    f = inp.file
    spans = [Span(TENSOR, t.nbytes, f, f.header.data_start + t.offset) for t in tensors]
    for t, digest in zip(tensors, sweep(spans, bar=bar, cancel=cancel).tensors):
        if digest != model.digests[t.name]:
            forget_cached([model])
            raise GGUFSplitError(inp.path, f"tensor {t.name!r} differs from the digest cached for this file, although "
                                           "its size and times did not change; nothing was written: run again (the "
                                           "stale cache entry was dropped)")


def forget_cached(models: Sequence[ScannedModel]) -> None:
    """Drop the manifests the digests of these models' inputs came from (they were found stale)."""
    for m in models:
        for inp in m.files:
            if inp.cached is not None and inp.file.fd >= 0:
                inp.cached.forget(inp.path, os.fstat(inp.file.fd))


def check_unchanged(models: Sequence[ScannedModel]) -> None:
    """Refuse a split whose inputs changed while it ran (its records would describe other bytes)."""
    for m in models:
        for inp in m.watched_files():
            try:
                now = _stat(inp.file) if inp.file.fd >= 0 else None
                st = os.stat(inp.path)
            except OSError:
                now, st = None, None
            if now != inp.stat or st is None or (st.st_dev, st.st_ino) != inp.stat[:2]:
                raise GGUFSplitError(inp.path, "changed while it was being split (size, time or file replaced); "
                                               "nothing was written: run the split again")


def open_inputs(tasks: Mapping[str, str | os.PathLike[str]], *, allow_unrelated: bool) -> dict[str, ScannedModel]:
    """Open every model (headers only) and check what can be checked before hashing."""
    models: dict[str, ScannedModel] = {}
    try:
        seen: dict[str, str] = {}
        for task, path in tasks.items():
            check_input_path(path)
            real = os.path.realpath(path)
            if real in seen:
                raise GGUFSplitError(show(path), f"is given twice (tasks {seen[real]!r} and {task!r})")
            seen[real] = task
            models[task] = open_input(task, path)
        archs = {t: m.architecture for t, m in models.items()}
        if not allow_unrelated and len(set(archs.values())) > 1:
            first = next(iter(models))
            other = next(t for t in models if archs[t] != archs[first])
            listing = ", ".join(f"{t}={a}" for t, a in archs.items())
            raise GGUFSplitError(models[other].path, f"general.architecture differs between tasks ({listing}); these "
                                                     "models cannot share tensors (pass --allow-unrelated to split anyway)")
        return models
    except BaseException:
        for m in models.values():
            m.close()
        raise
