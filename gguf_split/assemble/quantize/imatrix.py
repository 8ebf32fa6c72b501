"""Importance matrices (llama-imatrix's output), loaded exactly as llama-quantize loads them.

`llama-quantize --imatrix FILE` does not hand the file to llama.cpp's quantizer: the CLI
(tools/quantize/quantize.cpp with common/imatrix-loader.cpp) turns it into one float vector per tensor
name and passes those (`llama_model_quantize_params.imatrix`). Quantizing tensor by tensor must give
`ggml_quantize_chunk` the very same floats, so this module reproduces that loader, rounding included:

- GGUF files (what llama-imatrix writes now): tensors `<name>.in_sum2` and `<name>.counts`, both F32;
  counts are rounded to integers (`std::lround`), and the vector is `sums[j*ne0 + i] / float(count[j])`
  per expert j (float32 division), or 1 where a count is <= 0; values past `ncounts * ne0` stay 0. The
  file needs the KVs `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size` (else "missing
  imatrix metadata"). A tensor of another name is ignored.
- legacy `.dat` files: `n_entries` i32, then per entry name (i32 length + bytes, cut at a NUL), `ncall`
  i32, `nval` i32, `nval` f32 sums (a later entry of the same name replaces an earlier one); then,
  optionally, the chunk count (i32, even a partial one) and a dataset name (i32 length + bytes). The
  vector is `sums / float(ncall)` when ncall > 0, else the sums.
- a file that does not parse as GGUF is read as legacy (as llama.cpp does), except that a file starting
  with the GGUF magic is reported as a broken GGUF file.

What llama.cpp reports as a failure (or crashes on: zero counts, a non-u32 chunk count) is a
`GGUFSplitError` naming the file. (A non-finite value, which `llama_model_quantize` refuses, is checked
after filtering, by `recipe.make_recipe`, as llama.cpp sees only the filtered entries.)

`--include-weights` / `--exclude-weights` (substring filters) are `Imatrix.filtered`. The KVs the CLI adds
to its output (`quantize.imatrix.file`, `.dataset`, `.entries_count`, `.chunks_count`) are computed from an
`Imatrix` by `header.imatrix_kvs`.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

from ...errors import GGUFSplitError, os_problem
from ...format.gguf import MAGIC, GGUFFile

DATASETS_KEY = "imatrix.datasets"
CHUNK_COUNT_KEY = "imatrix.chunk_count"
CHUNK_SIZE_KEY = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
_I32 = struct.Struct("<i")
_LROUND_LIMIT = 2.0**63  # std::lround of a larger magnitude (or of inf/NaN) gives LONG_MIN on x86-64 / arm64


@dataclass(frozen=True, eq=False)
class Imatrix:
    """An importance matrix as llama-quantize hands it to llama.cpp: one float32 vector per tensor name.

    `datasets` and `chunk_count` feed the `quantize.imatrix.*` KVs; `sha256` (of the file) identifies the
    recipe in a split's records. Compared by identity (the vectors are numpy arrays)."""

    path: str
    entries: dict[str, np.ndarray]
    datasets: tuple[bytes, ...]
    chunk_count: int
    is_legacy: bool
    sha256: str
    excluded: tuple[str, ...] = field(default=())
    included: tuple[str, ...] = field(default=())

    def filtered(self, *, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> "Imatrix":
        """The CLI's `--include-weights` / `--exclude-weights`: keep (drop) the entries whose name contains
        one of the strings. The CLI refuses both at once; so does this."""
        inc, exc = tuple(include), tuple(exclude)
        if inc and exc:
            raise GGUFSplitError(self.path, "include and exclude filters cannot be used together (as in llama-quantize)")
        entries = dict(self.entries)
        if exc:
            entries = {k: v for k, v in entries.items() if not any(s in k for s in exc)}
        if inc:
            entries = {k: v for k, v in entries.items() if any(s in k for s in inc)}
        return Imatrix(self.path, entries, self.datasets, self.chunk_count, self.is_legacy, self.sha256,
                       self.excluded + exc, self.included + inc)

    def vector_digest(self, name: str) -> bytes | None:
        """sha256 of the vector given to the quantizer for `name` (part of a quantized tensor's identity)."""
        v = self.entries.get(name)
        return None if v is None else hashlib.sha256(v.tobytes()).digest()


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Load an imatrix file of either format; any problem is a GGUFSplitError naming `path`."""
    path = os.fspath(path)
    raw = _read(path)
    digest = hashlib.sha256(raw).hexdigest()
    if raw[:4] == MAGIC:
        imx = _load_gguf(path, digest)
    else:
        imx = _load_legacy(path, raw, digest)
    return imx


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise GGUFSplitError(path, "is a directory, not an imatrix file") from None
    except OSError as e:
        raise GGUFSplitError(path, f"cannot read imatrix: {os_problem(e)}") from None



# ---------------------------------------------------------------------------------------------------------
# GGUF format


def _load_gguf(path: str, digest: str) -> Imatrix:
    with GGUFFile(path) as f:
        h = f.header
        if not h.tensors:
            raise GGUFSplitError(path, "imatrix holds no entries")
        datasets: tuple[bytes, ...] = ()
        dkv = h.kv_by_key.get(DATASETS_KEY)
        if dkv is not None and dkv.vtype is GGUFValueType.ARRAY and dkv.subtype is GGUFValueType.STRING:
            datasets = tuple(_c_string(s) for s in f.kv_value(DATASETS_KEY))
        if DATASETS_KEY not in h.kv_by_key or CHUNK_COUNT_KEY not in h.kv_by_key or CHUNK_SIZE_KEY not in h.kv_by_key:
            raise GGUFSplitError(path, f"missing imatrix metadata ({DATASETS_KEY}, {CHUNK_COUNT_KEY}, {CHUNK_SIZE_KEY})")
        chunk_count = f.kv_value(CHUNK_COUNT_KEY, expect=GGUFValueType.UINT32)
        f.kv_value(CHUNK_SIZE_KEY, expect=GGUFValueType.UINT32)  # llama.cpp aborts on another type

        pairs: dict[str, list[Any]] = {}
        for t in h.tensors:
            for suffix, slot in ((SUMS_SUFFIX, 0), (COUNTS_SUFFIX, 1)):
                if t.name and t.name.endswith(suffix):
                    pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
                    break
        entries: dict[str, np.ndarray] = {}
        for name in sorted(pairs):
            sums_t, counts_t = pairs[name]
            if sums_t is None or counts_t is None:
                raise GGUFSplitError(path, f"imatrix entry {name!r} has {'no counts' if counts_t is None else 'no sums'}")
            for t in (sums_t, counts_t):
                if t.ggml_type != GGMLQuantizationType.F32:
                    raise GGUFSplitError(path, f"imatrix tensor {t.name!r} is {t.type_name}, not F32")
            sums = np.frombuffer(f.tensor_view(sums_t), dtype="<f4").astype(np.float32)
            counts = np.frombuffer(f.tensor_view(counts_t), dtype="<f4")
            entries[name] = _normalize(path, name, sums, counts)
    return Imatrix(path, entries, datasets, int(chunk_count), False, digest)


def _lround(x: float) -> int:
    """C's lround on x86-64/arm64: half away from zero; out of range, infinite or NaN gives LONG_MIN."""
    if not math.isfinite(x) or abs(x) >= _LROUND_LIMIT:
        return -(1 << 63)
    r = math.floor(abs(x) + 0.5)
    return int(r) if x >= 0 else -int(r)


def _normalize(path: str, name: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """quantize.cpp's load_imatrix for one GGUF entry: sums / count per expert (1 where count <= 0)."""
    ncounts = counts.size
    if ncounts == 0:  # llama-quantize divides by zero here
        raise GGUFSplitError(path, f"imatrix entry {name!r} has no counts")
    ne0 = sums.size // ncounts
    out = np.zeros(sums.size, dtype=np.float32)
    for j in range(ncounts):
        count = _lround(float(counts[j]))
        block = slice(j * ne0, (j + 1) * ne0)
        if count > 0:
            out[block] = sums[block] / np.float32(count)  # int64 -> float, then a float32 division
        else:
            out[block] = 1.0
    return out


# ---------------------------------------------------------------------------------------------------------
# legacy .dat format


class _Reader:
    """std::ifstream semantics over bytes: a short read returns what there was and sets `failed`."""

    def __init__(self, raw: bytes) -> None:
        self.raw, self.pos, self.failed = raw, 0, False

    def read(self, n: int) -> bytes:
        part = self.raw[self.pos : self.pos + n]
        self.pos += len(part)
        if len(part) < n:
            self.failed = True
        return part

    def i32(self) -> int:
        part = self.read(4)
        return int(_I32.unpack(part)[0]) if len(part) == 4 else int.from_bytes(part, "little")

    @property
    def left(self) -> int:
        return len(self.raw) - self.pos


def _load_legacy(path: str, raw: bytes, digest: str) -> Imatrix:
    r = _Reader(raw)
    n_entries = r.i32()
    if r.failed or n_entries < 1:
        raise GGUFSplitError(path, "not an imatrix file (neither GGUF nor llama-imatrix's legacy format): no entries")
    if n_entries > r.left // 12:  # each entry needs at least its name length, ncall and nval
        raise GGUFSplitError(path, f"truncated or not an imatrix: claims {n_entries} entries in {len(raw)} bytes")
    entries: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        length = r.i32()
        if length < 0:
            raise GGUFSplitError(path, f"imatrix entry {i + 1}: negative name length {length}")
        name = _c_string(r.read(length)).decode("utf-8", errors="surrogateescape")
        if r.failed:
            raise GGUFSplitError(path, f"truncated imatrix: name of entry {i + 1}")
        ncall = r.i32()
        nval = r.i32()
        if r.failed or nval < 1:
            raise GGUFSplitError(path, f"truncated imatrix: number of values of entry {i + 1} ({name!r})")
        data = r.read(4 * nval)
        if r.failed:
            raise GGUFSplitError(path, f"truncated imatrix: values of entry {i + 1} ({name!r})")
        sums = np.frombuffer(data, dtype="<f4").astype(np.float32)
        entries.pop(name, None)  # a repeated name replaces the earlier entry
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums
    chunk_count = 0
    datasets: tuple[bytes, ...] = ()
    if r.left:
        chunk_count = r.i32()  # a partial value counts, as std::istream::read leaves it
        if not r.failed:
            length = r.i32()
            if not r.failed and length > 0:
                dataset = r.read(length)
                if not r.failed:
                    datasets = (_c_string(dataset),)
    return Imatrix(path, entries, datasets, chunk_count, True, digest)


def _c_string(s: Any) -> bytes:
    """What C code sees of a string: its bytes up to the first NUL."""
    b = s if isinstance(s, bytes) else str(s).encode("utf-8")
    cut = b.find(b"\0")
    return b if cut < 0 else b[:cut]
