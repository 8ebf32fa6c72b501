"""Scan: open each input model, check it can be split, and hash it (xxh3-128).

Per model we compute, from one mmap of the file:
- the xxh3-128 digest of every tensor's bytes (a tensor's identity is name + ggml type + shape + digest);
- the xxh3-128 digest of the whole file (what `xxh128sum` prints), recorded so restore can prove its output;
- the bytes outside every tensor and header record (padding): writers zero them; any non-zero byte there
  is kept so restore stays byte-exact.
Models are hashed on a thread pool (python-xxhash releases the GIL: two threads hash ~1.5-2x as fast),
each in one front-to-back sweep that feeds every piece to both hashers while it is in the CPU cache, so
cold reads stay sequential and memory is read once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash

from .errors import GGUFSplitError
from .gguf_format import ARCHITECTURE_KEY, GGUFFile, iter_gaps
from .layout import OWN_PREFIX
from .progress import QUIET, Progress, Reporter

CHUNK = 16 << 20  # hash in 16 MiB pieces so progress moves and caches stay warm
MAX_NONZERO_GAP_BYTES = 16 << 20  # more than this outside the tensors is not padding; refuse


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


SWEEP_PIECE = 1 << 20  # small enough that the second hasher finds the piece still in the CPU cache


def _hash_model(m: ScannedModel, bar: Reporter) -> None:
    """Tensor digests, non-zero gaps and the whole-file digest in one front-to-back sweep: each piece feeds
    the whole-file hasher and the hasher of the tensor it belongs to while it is in the CPU cache, so the
    file is read from memory once instead of twice (the parser guarantees tensors do not overlap, so the
    header, the tensors and the gaps tile the file)."""
    h, f = m.header, m.file
    whole = xxhash.xxh3_128()
    whole.update(f.view(0, h.tensor_info_end))
    spans = [(h.data_start + t.offset, h.data_start + t.offset + t.nbytes, t.name) for t in h.tensors]
    spans += [(s, e, None) for s, e in iter_gaps(h)]
    total_nonzero = 0
    for s, e, name in sorted(spans):
        own = xxhash.xxh3_128() if name is not None else None
        for at in range(s, e, SWEEP_PIECE):
            piece = f.view(at, min(at + SWEEP_PIECE, e))
            whole.update(piece)
            if own is not None:
                own.update(piece)
            bar.advance(2 * len(piece))
        if name is not None:
            m.digests[name] = own.digest()
        elif not is_zero(f.view(s, e)):
            total_nonzero += e - s
            if total_nonzero > MAX_NONZERO_GAP_BYTES:
                raise GGUFSplitError(m.path, f"holds more than {MAX_NONZERO_GAP_BYTES >> 20} MiB of non-zero bytes "
                                             "outside its tensors; not a file llama.cpp or gguf-py writes")
            m.nonzero_gaps.append((s, f.raw(s, e)))
    bar.advance(h.tensor_info_end)
    m.file_digest = whole.digest()


def hash_models(models: list[ScannedModel], progress: Progress = QUIET, threads: int | None = None) -> None:
    """Fill in every model's tensor digests, file digest and non-zero gaps."""
    threads = threads or min(os.cpu_count() or 1, 8)
    total = sum(2 * m.file.size - m.header.tensor_info_end for m in models)
    with progress.bar("hashing", total) as bar:
        items = [(_hash_model, m) for m in sorted(models, key=lambda m: -m.file.size)]
        if threads <= 1:
            for fn, m in items:
                fn(m, bar)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gguf-split-hash") as pool:
            for fut in [pool.submit(fn, m, bar) for fn, m in items]:
                fut.result()
