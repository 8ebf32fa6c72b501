"""`verify` catches every single-bit flip in a split: headers, tensor infos, padding and tensor data, of
every shared file and of each adaptor.

Why: a split replaces several models; a silently corrupted shared file would corrupt every task that
loads it. verify re-hashes each tensor against the xxh3-128 recorded at split time, checks each header
against its seal (an xxh3-128 of the header bytes), that padding is zero, that the size is what the split
wrote, and each shared file's whole-file xxh3-128 against what the adaptors recorded. These tests flip one
bit at a seeded random place of each region of each file (~130 cases over 3 files x 5 regions) and
require a GGUFSplitError naming the file, and the tensor when the flip is in tensor data. A flip must
also never let `restore` write a wrong file: restore refuses, or (where verify would have refused too)
never produces bytes other than the original's.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as Q

from helpers import base_tensors, write_model
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import GGUFFile, Header, iter_gaps
from gguf_split import restore, split, verify

ADAPTORS = ("adaptor-a.gguf", "adaptor-b.gguf")
REGIONS = ("prefix", "kvs", "tensor infos", "padding", "tensor data")
CASES_PER_CELL = 9  # 3 files x 5 regions x 9 = 135 flips
SEED = 20261123


@dataclass(frozen=True)
class Region:
    """Byte spans of one region of a file; `tensors[i]` names the tensor of spans[i] (data regions)."""

    spans: tuple[tuple[int, int], ...]
    tensors: tuple[str | None, ...]


def regions_of(h: Header) -> dict[str, Region]:
    """The five regions of a parsed file, as byte spans."""
    data = sorted(h.tensors, key=lambda t: t.offset)
    return {
        "prefix": Region(((0, 24),), (None,)),
        "kvs": Region(((24, h.tensor_info_start),), (None,)),
        "tensor infos": Region(((h.tensor_info_start, h.tensor_info_end),), (None,)),
        "padding": Region(tuple((s, e) for s, e in iter_gaps(h) if e > s), ()),
        "tensor data": Region(tuple((h.data_start + t.offset, h.data_start + t.offset + t.nbytes) for t in data),
                              tuple(t.name for t in data)),
    }


def pick(region: Region, rng: random.Random) -> tuple[int, str | None]:
    """A uniformly random byte of the region, and the tensor it belongs to (if any)."""
    total = sum(e - s for s, e in region.spans)
    p = rng.randrange(total)
    for i, (s, e) in enumerate(region.spans):
        if p < e - s:
            return s + p, region.tensors[i] if region.tensors else None
        p -= e - s
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split of two small models that differ in two tensors, one of them of a size that is not a multiple
    of the alignment (Q6_K, 840 bytes): every file then has padding inside its data section too."""
    root = tmp_path_factory.mktemp("bitflip")
    a = base_tensors(0)
    b = dict(a)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        qt, shape, seed = a[name]
        b[name] = (qt, shape, seed + 500)
    b["blk.2.extra.weight"] = (Q.Q6_K, (256, 3), 9)  # only in b: adaptor-b holds it alone
    write_model(root / "a.gguf", a)
    write_model(root / "b.gguf", b)
    # tiny: share anyway; uncut (three files, the 15 cells below)
    report = split({"a": root / "a.gguf", "b": root / "b.gguf"}, root / "split", file_cost=0, cut="none")
    assert report.shares_anything
    return root / "split"


def files_of(d: Path) -> tuple[str, ...]:
    """The shared files (whatever the planner named them), then the adaptors."""
    shared = sorted(n for n in os.listdir(d) if n.endswith(".gguf") and n not in ADAPTORS)
    with GGUFFile(d / shared[0]) as f:
        assert f.header.tensors, "the first shared file must hold tensors"
    return (shared[0], *ADAPTORS)


def run_verify(d: Path) -> None:
    verify([d], threads=1)


def flip(path: Path, at: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ (1 << bit)]))


def all_cases(d: Path) -> list[tuple[str, str, int, int, str | None]]:
    """(file, region, byte offset, bit, tensor) for every flip, seeded."""
    rng = random.Random(SEED)
    cases = []
    for name in files_of(d):
        with GGUFFile(d / name) as f:
            regions = regions_of(f.header)
        for region in REGIONS:
            assert regions[region].spans, f"{name} has no {region}: the fixture must give every file each region"
            for _ in range(CASES_PER_CELL):
                at, tensor = pick(regions[region], rng)
                cases.append((name, region, at, rng.randrange(8), tensor))
    return cases


def test_the_unflipped_split_verifies(split_dir: Path) -> None:
    run_verify(split_dir)


def test_every_single_bit_flip_is_caught(split_dir: Path) -> None:
    """One flip at a time (flipped back after), every one refused naming its file (and tensor)."""
    cases = all_cases(split_dir)
    assert len(cases) >= 100
    missed, misnamed = [], []
    for name, region, at, bit, tensor in cases:
        path = split_dir / name
        flip(path, at, bit)
        try:
            run_verify(split_dir)
            missed.append((name, region, at, bit))
        except GGUFSplitError as e:
            if e.path != str(path) or (tensor is not None and repr(tensor) not in e.problem):
                misnamed.append((name, region, at, bit, str(e)))
        finally:
            flip(path, at, bit)
    assert not missed, f"verify accepted {len(missed)} flipped files: {missed[:5]}"
    assert not misnamed, f"{len(misnamed)} errors do not name the file/tensor: {misnamed[:3]}"
    run_verify(split_dir)  # every flip was undone: the harness left the split intact


def test_cases_cover_every_file_and_region(split_dir: Path) -> None:
    """The seeded draw spreads over all 15 (file, region) cells and hits every tensor of the data regions."""
    cases = all_cases(split_dir)
    assert {(c[0], c[1]) for c in cases} == {(f, r) for f in files_of(split_dir) for r in REGIONS}
    assert len({c[4] for c in cases if c[4] is not None}) >= 5


def test_restore_never_writes_a_flipped_byte(split_dir: Path, tmp_path: Path) -> None:
    """restore of each task under a third of the flips (every region of every file): it refuses with a
    GGUFSplitError and leaves nothing, or (a flip in bytes the task does not read, e.g. the other adaptor)
    writes the original byte for byte."""
    originals = {t: (split_dir.parent / f"{t}.gguf").read_bytes() for t in ("a", "b")}
    out = tmp_path / "out"
    out.mkdir()
    refused = 0
    for k, (name, region, at, bit, _) in enumerate(all_cases(split_dir)):
        if k % 3:
            continue
        path = split_dir / name
        flip(path, at, bit)
        try:
            for task in ("a", "b"):
                try:
                    r = restore(split_dir, out, task=task, force=True)
                except GGUFSplitError:
                    refused += 1
                    assert not any(n.startswith(".") for n in os.listdir(out)), "temporary left behind"
                    continue
                assert Path(r.output).read_bytes() == originals[task], (name, region, at, bit, task)
        finally:
            flip(path, at, bit)
    assert refused >= 30
