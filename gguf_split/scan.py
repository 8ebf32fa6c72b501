"""Scan: open each input model, check it can be split, and hash it (xxh3-128).

Per model we compute, from one mmap of the file:
- the xxh3-128 digest of every tensor's bytes (a tensor's identity is name + ggml type + shape + digest);
- the xxh3-128 digest of the whole file (what `xxh128sum` prints), recorded so restore can prove its output;
- the bytes outside every tensor and header record (padding): writers zero them; any non-zero byte there
  is kept so restore stays byte-exact.
Work items run on a thread pool: python-xxhash releases the GIL, so two threads hash ~2x as fast. Each
item walks its file front to back, so cold reads stay sequential.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from .errors import GGUFSplitError
from .gguf_format import ARCHITECTURE_KEY, GGUFFile, iter_gaps
from .progress import QUIET, Progress, Reporter

CHUNK = 16 << 20  # hash in 16 MiB pieces so progress moves and caches stay warm
MAX_NONZERO_GAP_BYTES = 16 << 20  # more than this outside the tensors is not padding; refuse
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
OWN_PREFIX = "gguf_split."


@dataclass
class ScannedModel:
    """One input model, open and hashed."""

    task: str
    file: GGUFFile
    digests: dict[str, bytes] = field(default_factory=dict)  # tensor name -> xxh3-128 (16 bytes)
    file_digest: bytes = b""
    nonzero_gaps: list[tuple[int, bytes]] = field(default_factory=list)  # (file offset, bytes)

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def header(self):  # noqa: ANN201 - a gguf_format.Header
        return self.file.header

    @property
    def architecture(self) -> str | None:
        arch = self.file.get(ARCHITECTURE_KEY)
        return arch if isinstance(arch, str) else None

    def close(self) -> None:
        self.file.close()


def hash_view(view: memoryview, bar: Reporter) -> bytes:
    h = xxhash.xxh3_128()
    for s in range(0, len(view), CHUNK):
        piece = view[s : s + CHUNK]
        h.update(piece)
        bar.advance(len(piece))
    return h.digest()


def is_zero(view: memoryview) -> bool:
    for s in range(0, len(view), CHUNK):
        piece = bytes(view[s : s + CHUNK])
        if piece.count(0) != len(piece):
            return False
    return True


def check_splittable(f: GGUFFile) -> None:
    """Refuse inputs that are themselves parts of a split: llama.cpp shards and gguf-split outputs."""
    kvs = f.header.kv_by_key
    if any(k.startswith(OWN_PREFIX) for k in kvs):
        role = f.get("gguf_split.role", "output")
        hint = " (`gguf-split restore` gives the model back)" if role == "adaptor" else ""
        raise GGUFSplitError(f.path, f"is a gguf-split {role}, not a model{hint}")
    count = f.get("split.count")
    if isinstance(count, int) and count > 1:
        raise GGUFSplitError(f.path, f"is shard {f.get('split.no', '?')} of a {count}-file split model; join it first "
                                     "with `llama-gguf-split --merge`")
    if "split.no" in kvs and f.get("split.no") not in (0, None):
        raise GGUFSplitError(f.path, f"is shard {f.get('split.no')} of a split model; join it first with "
                                     "`llama-gguf-split --merge`")


def open_model(task: str, path: str | os.PathLike[str]) -> ScannedModel:
    f = GGUFFile(path)
    try:
        check_splittable(f)
    except BaseException:
        f.close()
        raise
    return ScannedModel(task, f)


def _hash_tensors(m: ScannedModel, bar: Reporter) -> None:
    h, f = m.header, m.file
    for t in sorted(h.tensors, key=lambda t: t.offset):
        m.digests[t.name] = hash_view(f.tensor_view(t), bar)
    total_nonzero = 0
    for start, end in iter_gaps(h):
        gap = f.view(start, end)
        if not is_zero(gap):
            total_nonzero += end - start
            if total_nonzero > MAX_NONZERO_GAP_BYTES:
                raise GGUFSplitError(m.path, f"holds more than {MAX_NONZERO_GAP_BYTES >> 20} MiB of non-zero bytes "
                                             "outside its tensors; not a file llama.cpp or gguf-py writes")
            m.nonzero_gaps.append((start, bytes(gap)))
        bar.advance(end - start)


def _hash_file(m: ScannedModel, bar: Reporter) -> None:
    m.file_digest = hash_view(m.file.view(0, m.file.size), bar)


def hash_models(models: list[ScannedModel], progress: Progress = QUIET, threads: int | None = None) -> None:
    """Fill in every model's tensor digests, file digest and non-zero gaps."""
    threads = threads or min(os.cpu_count() or 1, 8)
    total = sum(2 * m.file.size - m.header.tensor_info_end for m in models)
    with progress.bar("hashing", total) as bar:
        items = [(fn, m) for m in models for fn in (_hash_file, _hash_tensors)]
        if threads <= 1:
            for fn, m in items:
                fn(m, bar)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gguf-split-hash") as pool:
            for fut in [pool.submit(fn, m, bar) for fn, m in items]:
                fut.result()
