"""Benchmark-side hashing: xxh3-128 of every tensor over mmap views (independent of gguf_split's scan), and
content-defined chunking of whole files with pyfastcdc.

Chunker (FastCDC 2020, pyfastcdc's Cython build): min 16 KiB, average 64 KiB, max 256 KiB, normalized
chunking level 1, gear seed 0. pyfastcdc documents the real mean chunk size as about avg + min (~80 KiB),
bench_layout prints the measured one. A chunk is identified by its length + xxh3-128 of its bytes.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ggufhdr import Header, read_header

CDC_MIN = 16 << 10
CDC_AVG = 64 << 10
CDC_MAX = 256 << 10
CDC_NC = 1
CDC_PARAMS = f"FastCDC 2020 (pyfastcdc), min {CDC_MIN >> 10} KiB, avg {CDC_AVG >> 10} KiB, max {CDC_MAX >> 10} KiB, NC {CDC_NC}"


@dataclass(frozen=True)
class Version:
    """One tensor version: name + ggml type + shape + digest (nbytes follows from type and shape)."""
    name: str
    type_name: str
    ne: tuple[int, ...]
    nbytes: int
    digest: bytes


@dataclass
class Hashed:
    path: Path
    header: Header
    size: int
    tensors: dict[str, Version]

    @property
    def header_bytes(self) -> int:
        return self.header.data_start


def _threads(threads: int | None) -> int:
    return threads or min(2, os.cpu_count() or 1)


def hash_file(path: str | os.PathLike[str], threads: int | None = None) -> Hashed:
    h = read_header(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        mv = memoryview(mm)
        try:
            def one(t):
                s = h.data_start + t.offset
                return xxhash.xxh3_128_digest(mv[s:s + t.nbytes])

            with ThreadPoolExecutor(_threads(threads)) as ex:
                digests = list(ex.map(one, h.tensors))
        finally:
            mv.release()
    return Hashed(Path(path), h, h.file_size,
                  {t.name: Version(t.name, t.type_name, t.ne, t.nbytes, d) for t, d in zip(h.tensors, digests)})


def hash_files(paths: dict[str, Path], threads: int | None = None) -> dict[str, Hashed]:
    return {k: hash_file(p, threads) for k, p in paths.items()}


def tensor_digests(path: str | os.PathLike[str]) -> dict[str, tuple]:
    """name -> (type name, ne, nbytes, digest): equal tuples mean byte-identical tensors."""
    return {n: (v.type_name, v.ne, v.nbytes, v.digest) for n, v in hash_file(path).tensors.items()}


def cdc_chunks(path: str | os.PathLike[str], start: int = 0, end: int | None = None) -> list[tuple[int, bytes]]:
    """(length, xxh3-128) of every FastCDC chunk of the file's bytes [start, end)."""
    from pyfastcdc import FastCDC

    cdc = FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=CDC_NC)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        out = [(c.length, xxhash.xxh3_128_digest(c.data)) for c in cdc.cut_buf(memoryview(mm)[start:end])]
        try:
            mm.close()
        except BufferError:  # a chunk view still alive: the mapping goes with the last reference
            pass
        return out


def cdc_dedup(paths: list[Path], regions: list[tuple[int, int | None]] | None = None) -> tuple[int, int, int]:
    """(distinct chunk bytes, all bytes, chunk count) over the files (or the given [start, end) region of each)."""
    seen: set[tuple[int, bytes]] = set()
    distinct = total = count = 0
    for i, p in enumerate(paths):
        start, end = regions[i] if regions else (0, None)
        for key in cdc_chunks(p, start, end):
            total += key[0]
            count += 1
            if key not in seen:
                seen.add(key)
                distinct += key[0]
    return distinct, total, count
