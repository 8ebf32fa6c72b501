"""The runtime loader (gguf_split.runtime.loader) against the original models, read independently by gguf's GGUFReader.

Why: a task loaded from its adaptor and shared files must be indistinguishable from its original GGUF
(every tensor byte, the tensor order, every KV with its GGUF types), while mapping each file once in the
process (every task that uses a shared file reuses its mapping; a swap maps only what the new task adds
and unmaps what nothing uses any more) and reading nothing but headers to open or swap. Bad files
(another split's file, missing, truncated, an edited or damaged header) must surface as GGUFSplitError
naming the file, never as another exception and never as a wrong model. Reads from several threads must
stay consistent while another thread swaps tasks, and nothing may outlive its last user.

The split under test (`file_cost=0`, so that tiny models share): base, chat (two attention tensors
changed), code (two FFN tensors changed, one tensor only it has). It has a foundation (every task), a
shared file of base+chat, one of base+code, and a hole (the task whose shared file sits at position 3
loads `hole-2.gguf` at 2). What a task loads is read from its adaptor with GGUFReader, not the loader.

Mappings are counted in /proc/self/maps by (device, inode), so "mapped once" is what the kernel says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap
import os
import shutil
import struct
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType as Q, GGUFValueType as V
from gguf.quants import dequantize

from helpers import base_tensors, write_model
from gguf_split import Foundation, GGUFFile, GGUFSplitError, TaskModel, Tensor, open_model, open_split, split, verify
from gguf_split.runtime.loader import _Mapped
from gguf_split.format.records import K_INDEX, K_SEAL, seal_offset

MiB = 1 << 20
PAGE = mmap.PAGESIZE
TASKS = ("base", "chat", "code")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts mappings in /proc/self/maps")


# ---------------------------------------------------------------------------------------------------------
# Fixtures: three related tiny models and their split


@dataclass
class Made:
    """A split made for a test, and what it should hold, read with GGUFReader."""

    dir: Path
    originals: dict[str, Path]

    def adaptor(self, task: str) -> Path:
        return self.dir / f"adaptor-{task}.gguf"

    def listed(self, task: str) -> list[Path]:
        """The files the task's adaptor lists for positions 1..k, in order."""
        names = GGUFReader(self.adaptor(task)).fields["gguf_split.files.name"].contents()
        return [self.dir / n for n in names]

    def paths(self, task: str) -> list[Path]:
        """The task's llama.cpp split list: adaptor, then positions 1..k."""
        return [self.adaptor(task), *self.listed(task)]

    def named(self, prefix: str) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.name.startswith(prefix))

    @property
    def foundation(self) -> Path:
        (f,) = self.named("foundation-")
        return f

    @property
    def hole(self) -> Path:
        (h,) = self.named("hole-")
        return h

    @property
    def holed(self) -> str:
        """The task that loads the hole."""
        (t,) = [t for t in self.originals if self.hole in self.listed(t)]
        return t

    def only_used_by(self, *tasks: str) -> Path:
        """The shared file loaded by exactly these tasks."""
        (f,) = [p for p in self.named("shared-") if {t for t in self.originals if p in self.listed(t)} == set(tasks)]
        return f


def task_kv(task: str) -> Callable[[GGUFWriter], None]:
    """A KV whose value differs per task, so a swap must change metadata too."""
    return lambda w: w.add_string("test.task", task)


def make_tasks(factory: Callable[..., str]) -> dict[str, Path]:
    """base; chat = two attention tensors changed; code = two FFN tensors changed + one tensor only it has."""
    return {
        "base": Path(factory("base", kvs=task_kv("base"))),
        "chat": Path(factory("chat", {"blk.0.attn_q.weight": 101, "blk.0.attn_v.weight": 102}, kvs=task_kv("chat"))),
        "code": Path(factory("code", {"blk.0.ffn_up.weight": 201, "blk.0.ffn_down.weight": 202,
                                      "blk.1.ffn_gate.weight": (Q.Q8_0, (64, 32), 203)}, kvs=task_kv("code"))),
    }


@pytest.fixture
def tasks(model_factory: Callable[..., str], tmp_path: Path) -> Made:
    originals = make_tasks(model_factory)
    # gguf-split 0.2's layout (cut none): these tests are about its file kinds; tasks of many files:
    # test_grow.py
    split({t: str(p) for t, p in originals.items()}, tmp_path / "out", file_cost=0, cut="none")
    made = Made(tmp_path / "out", originals)
    # the layout the tests rely on: every kind of file, a task that loads two shared files and a hole
    assert made.listed("base") == [made.foundation, *made.named("shared-")]
    assert len(made.named("shared-")) == 2 and made.holed in ("chat", "code")
    assert made.only_used_by("base", "chat") and made.only_used_by("base", "code")
    return made


def copy_split(made: Made, dest: Path) -> Made:
    shutil.copytree(made.dir, dest)
    return Made(dest, made.originals)


def hard_link_copy(made: Made, dest: Path) -> Made:
    """The same files reached by another path: every file of the split hard-linked into `dest`."""
    dest.mkdir()
    for p in made.dir.iterdir():
        if p.is_file():
            os.link(p, dest / p.name)
    return Made(dest, made.originals)


# ---------------------------------------------------------------------------------------------------------
# What the kernel says is mapped


FileId = tuple[int, int]


def file_id(path: Path | str) -> FileId:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def mappings() -> Counter[FileId]:
    """(device, inode) -> number of mappings of that file in this process, from /proc/self/maps."""
    out: Counter[FileId] = Counter()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[4] != "0":
            major, minor = parts[3].split(":")
            out[(os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))] += 1
    return out


def mapped_count(paths: list[Path]) -> dict[str, int]:
    """How many times each file is mapped now (by file name: the tests' files have distinct names)."""
    now = mappings()
    return {p.name: now[file_id(p)] for p in paths}


def mapped_paths() -> set[str]:
    return {parts[5] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(parts := line.split(maxsplit=5)) == 6}


def map_range(address: int) -> tuple[int, int, FileId]:
    """The mapping holding `address`: (start, file offset of start, (device, inode))."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= address < hi:
            major, minor = parts[3].split(":")
            return lo, int(parts[2], 16), (os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
    raise AssertionError(f"address {address:#x} is in no mapping")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="session", autouse=True)
def maps_name_files_as_stat_does(tmp_path_factory: pytest.TempPathFactory) -> None:
    """/proc/self/maps must show a mapped file's device and inode as os.stat does (overlay file systems
    may not): every count below relies on it."""
    p = tmp_path_factory.mktemp("maps") / "probe.bin"
    p.write_bytes(b"x" * PAGE)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ):
        if mappings()[file_id(p)] != 1:
            pytest.skip("/proc/self/maps does not name files by their stat device and inode here")


@pytest.fixture(autouse=True)
def nothing_left_mapped(tmp_path: Path) -> Iterator[None]:
    """Every test releases what it loads: the registry is as it was, and no file of the test is mapped."""
    gc.collect()  # what earlier tests (other modules) left to the collector is not this test's
    before = _Mapped.count()
    yield
    gc.collect()
    assert _Mapped.count() == before
    assert not [p for p in mapped_paths() if p.startswith(str(tmp_path))]


# ---------------------------------------------------------------------------------------------------------
# The originals, read by gguf's own reader


_PACKER = GGUFWriter(None, "llama")  # only its value encoder is used, as the reference encoding


def reader_fields(path: Path) -> dict[str, Any]:
    """GGUFReader's fields without its pseudo fields for the fixed header (GGUF.version, ...)."""
    return {k: f for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def original_tensors(path: Path) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in GGUFReader(path).tensors}


def assert_metadata_matches(metadata: Mapping[str, Any], path: Path) -> None:
    """Same keys in the same order; each value with the same GGUF type, element type and encoding."""
    fields = reader_fields(path)
    assert list(metadata) == list(fields)
    assert len(metadata) == len(fields)
    for key, rf in fields.items():
        got = metadata.field(key)  # type: ignore[attr-defined]
        assert (got.key, got.type) == (key, rf.types[0])
        assert metadata[key] == got.value
        if got.type is V.ARRAY:
            assert got.subtype == rf.types[1]
        value_bytes = b"".join(p.tobytes() for p in rf.parts[3:])  # parts: key length, key, type, value...
        assert _PACKER._pack_val(got.value, got.type, add_vtype=False, sub_type=got.subtype) == value_bytes, key
        if len(rf.types) <= 2:  # GGUFReader flattens nested arrays; for the rest its decoding is comparable
            assert got.value == rf.contents(), key
            assert got.count == (len(rf.data) if got.type is V.ARRAY else 1)


def assert_tensors_match(tensors: Mapping[str, Tensor], path: Path) -> None:
    """Same names in the original order; each with the same type, shape and bytes."""
    ref = GGUFReader(path).tensors
    assert list(tensors) == [t.name for t in ref]
    assert len(tensors) == len(ref)
    for rt in ref:
        t = tensors[rt.name]
        assert (t.name, t.ggml_type, t.shape) == (rt.name, rt.tensor_type, tuple(int(d) for d in rt.shape))
        assert t.nbytes == rt.n_bytes
        assert bytes(t.data) == rt.data.tobytes(), rt.name


def assert_model_matches(model: Any, path: Path) -> None:
    assert_metadata_matches(model.metadata, path)
    assert_tensors_match(model.tensors, path)


def address(view: memoryview) -> int:
    """Where a view's bytes are in this process's memory."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


# ---------------------------------------------------------------------------------------------------------
# Equality with the originals


def test_every_task_equals_its_original(tasks: Made) -> None:
    """Opened as a directory, or (the 0.1 name) as any file of the split: the same tasks, each its original."""
    for opened in (open_split(tasks.dir), open_split(str(tasks.dir)), Foundation.open(tasks.foundation),
                   Foundation.open(tasks.named("shared-")[0]), Foundation.open(tasks.adaptor("code"))):
        with opened as s:
            assert s.tasks == sorted(TASKS)
            for task, original in tasks.originals.items():
                with s.load(task) as model:
                    assert model.task == task
                    assert_model_matches(model, original)


def test_load_by_name_or_path_gives_llama_cpp_its_files(tasks: Made) -> None:
    with open_split(tasks.dir) as s:
        for task in TASKS:
            expected = [str(p.resolve()) for p in tasks.paths(task)]
            for ask in (task, tasks.adaptor(task), Path(os.path.relpath(tasks.adaptor(task)))):
                with s.load(ask) as model:
                    assert model.task == task
                    assert model.llama_cpp_paths() == model.files == expected
                    assert model.adaptor_path == expected[0]
                    assert {t.file for t in model.tensors.values()} <= set(expected)
            with s.load(task) as model:
                assert_model_matches(model, tasks.originals[task])
        with s.load(tasks.holed) as model:  # the hole is in the list, at its position, and holds nothing
            assert str(tasks.hole.resolve()) in model.llama_cpp_paths()
            assert GGUFReader(tasks.hole).fields["split.no"].contents() == model.files.index(str(tasks.hole.resolve()))
            assert str(tasks.hole.resolve()) not in {t.file for t in model.tensors.values()}


def test_open_model_equals_gguf_reader(tasks: Made) -> None:
    with open_model(tasks.originals["code"]) as model:
        assert_model_matches(model, tasks.originals["code"])


def test_views_are_read_only_and_zero_copy(tasks: Made) -> None:
    """Each view is the file's bytes where the file is mapped: its address lies in a mapping of the very
    file it names, at the tensor's file offset (GGUFReader's), so nothing was copied."""
    with open_split(tasks.dir) as s, s.load("code") as model:
        ref = {t.name: t for t in GGUFReader(tasks.originals["code"]).tensors}
        offsets = {}
        for p in tasks.paths("code"):
            offsets.update({(str(p.resolve()), t.name): int(t.data_offset) for t in GGUFReader(p).tensors})
        for t in model.tensors.values():
            assert t.data.readonly
            with pytest.raises(TypeError):
                t.data[0] = 0
            with pytest.raises(TypeError):
                t.data[:2] = b"xx"
            assert not np.frombuffer(t.data, dtype=np.uint8).flags.writeable
            start, file_offset, fid = map_range(address(t.data))
            assert fid == file_id(t.file)
            assert address(t.data) - start + file_offset == offsets[(t.file, t.name)]
            assert address(model.tensors[t.name].data) == address(t.data)
            assert bytes(t.data) == ref[t.name].data.tobytes()


def test_to_numpy_matches_gguf_dequantize(tasks: Made) -> None:
    ref = {t.name: t for t in GGUFReader(tasks.originals["code"]).tensors}
    with open_split(tasks.dir) as s, s.load("code") as model:
        types = set()
        for name, t in model.tensors.items():
            np_shape = tuple(reversed(t.shape))
            with np.errstate(invalid="ignore", over="ignore"):  # random bytes hold NaN and inf scales
                expected = dequantize(ref[name].data, ref[name].tensor_type).reshape(np_shape)
                got = t.to_numpy()
            assert got.shape == np_shape and got.dtype == np.float32
            np.testing.assert_array_equal(got, expected.astype(np.float32), err_msg=name)
            types.add(t.ggml_type)
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K} <= types


# ---------------------------------------------------------------------------------------------------------
# Swap and sharing


def snapshot(model: TaskModel) -> dict[str, tuple[str, int, bytes]]:
    return {n: (t.file, address(t.data), bytes(t.data)) for n, t in model.tensors.items()}


@pytest.mark.parametrize("to", ["chat", "code"])
def test_swap_changes_exactly_what_differs(tasks: Made, to: str) -> None:
    """base -> `to`: a tensor with the same bytes in both stays the same memory of the same file; every
    other tensor changes to the new task's bytes; metadata follows."""
    versions = {t: original_tensors(p) for t, p in tasks.originals.items()}
    base, new = versions["base"], versions[to]
    same = {n for n in base if new.get(n) == base[n]}
    assert same and set(new) - same
    with open_split(tasks.dir) as s, s.load("base") as model:
        before = snapshot(model)
        model.swap(to)
        after = snapshot(model)
        assert model.task == to and model.adaptor_path == str(tasks.adaptor(to).resolve())
        assert_model_matches(model, tasks.originals[to])
        assert {n for n in after if before.get(n) != after[n]} == set(new) - same
        for n in same:
            assert before[n] == after[n]  # same file, same memory, same bytes
        for n in set(new) - same:
            assert after[n][2] == new[n] and after[n][0] == str(tasks.adaptor(to).resolve())
        assert (model.metadata["test.task"], model.metadata.field("test.task").type) == (to, V.STRING)


def test_swap_maps_only_what_the_new_task_adds(tasks: Made) -> None:
    """A swap maps the new task's files that are not mapped yet, keeps the ones both tasks use (same
    mapping), and unmaps at once (no garbage collection needed) what no task uses any more; a file another
    loaded task still uses stays mapped."""
    every = sorted({p for t in TASKS for p in tasks.paths(t)})
    to = tasks.holed
    added = set(tasks.paths(to)) - set(tasks.paths("base"))
    dropped = set(tasks.paths("base")) - set(tasks.paths(to))
    assert tasks.hole in added and tasks.adaptor(to) in added and len(dropped) == 2
    with open_split(tasks.dir) as s, s.load("base") as model:
        assert mapped_count(every) == {p.name: int(p in tasks.paths("base")) for p in every}
        kept = {n: address(model.tensors[n].data) for n in model.tensors if model.tensors[n].file in
                {str(p.resolve()) for p in tasks.paths(to)}}
        model.swap(to)
        assert mapped_count(every) == {p.name: int(p in tasks.paths(to)) for p in every}
        assert kept and all(address(model.tensors[n].data) == a for n, a in kept.items())
        model.swap("base")
        other = "code" if to == "chat" else "chat"
        with s.load(other) as holder:  # keeps its files mapped through the next swap
            model.swap(to)
            assert mapped_count(every) == {p.name: int(p in tasks.paths(to) or p in tasks.paths(other))
                                           for p in every}
            assert holder.task == other
        assert mapped_count(every) == {p.name: int(p in tasks.paths(to)) for p in every}


def test_failed_swap_keeps_the_current_task(tasks: Made, tmp_path: Path) -> None:
    work = copy_split(tasks, tmp_path / "work")
    hole, holed = work.hole, work.holed
    every = sorted({p for t in TASKS for p in work.paths(t)} - {hole})
    hole.unlink()  # the holed task can no longer load; the others can
    with open_split(work.dir) as s, s.load("base") as model:
        maps = mapped_count(every)
        for ask, named in [("nosuchtask", work.dir), (holed, hole),
                           (tmp_path / "adaptor-x.gguf", tmp_path / "adaptor-x.gguf")]:
            with pytest.raises(GGUFSplitError) as e:
                model.swap(ask)
            assert e.value.path == str(named) or e.value.path == str(Path(named).resolve()), (ask, e.value)
            del e
            gc.collect()  # the traceback held the failed attempt's mappings
            assert model.task == "base"
            assert mapped_count(every) == maps
        assert_model_matches(model, tasks.originals["base"])


def test_tasks_open_side_by_side(tasks: Made) -> None:
    """Every task loaded at once: each its original, a file used by several tasks is one piece of memory."""
    with open_split(tasks.dir) as s:
        models = {t: s.load(t) for t in TASKS}
        for task, model in models.items():
            assert_model_matches(model, tasks.originals[task])
        every = sorted({p for t in TASKS for p in tasks.paths(t)})
        assert mapped_count(every) == {p.name: 1 for p in every}
        by_file: dict[tuple[str, str], set[int]] = {}
        for m in models.values():
            for n, t in m.tensors.items():
                by_file.setdefault((t.file, n), set()).add(address(t.data))
        assert all(len(a) == 1 for a in by_file.values())
        shared_names = {n for (f, n) in by_file if "foundation-" in f}
        assert shared_names and all(len({m.tensors[n].file for m in models.values()}) == 1 for n in shared_names)
        for m in models.values():
            m.close()


def test_each_file_mapped_once_per_process(tasks: Made, tmp_path: Path) -> None:
    """Whatever path or call reaches a file (two opens of the directory, str or Path, the 0.1 name on any
    of its files, a hard link), it is mapped once; a copy is another file, mapped on its own."""
    copy = copy_split(tasks, tmp_path / "copy")
    linked = tasks.dir / "linked.gguf"  # a second name of adaptor-chat.gguf (its files are looked up beside it)
    os.link(tasks.adaptor("chat"), linked)
    with open_split(tasks.dir) as a, open_split(str(tasks.dir)) as b, Foundation.open(tasks.foundation) as c, \
            Foundation.open(tasks.adaptor("code")) as d, open_split(copy.dir) as other:
        models = [a.load("chat"), b.load("chat"), c.load("base"), d.load(linked), a.load("code"), b.load("code"),
                  other.load("chat")]
        every = sorted({p for t in TASKS for p in tasks.paths(t)})
        assert mapped_count(every) == {p.name: 1 for p in every}
        assert set(mapped_count([copy.foundation, copy.adaptor("chat")]).values()) == {1}
        emb = {address(m.tensors["token_embd.weight"].data) for m in models}
        assert len(emb) == 2  # this split's foundation, and the copy's
        assert models[3].files[0] == str(linked.resolve())  # the path it was given, the mapping it shares
        assert address(models[3].tensors["blk.0.attn_q.weight"].data) == \
            address(models[0].tensors["blk.0.attn_q.weight"].data)
        for i in (0, 2, 3, 4, 5):
            models[i].close()
        assert mapped_count([tasks.adaptor("chat")]) == {"adaptor-chat.gguf": 1}  # still used by models[1]
        del models
        assert mapped_count(every) == {p.name: 0 for p in every}
    linked.unlink()


def test_holes(tasks: Made, tmp_path: Path) -> None:
    """A hole is an empty file at its position: it is mapped like any file, serves no tensor, and the
    task that needs it fails without it (naming it) while the others still load."""
    r = GGUFReader(tasks.hole)
    assert not r.tensors and tasks.listed(tasks.holed).index(tasks.hole) + 1 == r.fields["split.no"].contents()
    del r  # GGUFReader maps the file too
    with open_split(tasks.dir) as s, s.load(tasks.holed) as model:
        assert mapped_count([tasks.hole]) == {tasks.hole.name: 1}
        assert_model_matches(model, tasks.originals[tasks.holed])
    work = copy_split(tasks, tmp_path / "work")
    hole, holed = work.hole, work.holed
    hole.unlink()
    with open_split(work.dir) as s:
        with pytest.raises(GGUFSplitError) as e:
            s.load(holed)
        assert e.value.path == str(hole) and "not found" in e.value.problem
        for t in set(TASKS) - {holed}:
            with s.load(t) as model:
                assert_model_matches(model, tasks.originals[t])


# ---------------------------------------------------------------------------------------------------------
# Refusals: another split's files, missing, truncated, edited and damaged files


def other_split(factory: Callable[..., str], tmp_path: Path) -> Made:
    """Another split of the same tensor names and types, other bytes."""
    originals = {"p": Path(write_model(tmp_path / "other-p.gguf", base_tensors(seed=7), kvs=task_kv("p")))}
    q = base_tensors(seed=7)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        qt, shape, seed = q[name]
        q[name] = (qt, shape, seed + 500)
    originals["q"] = Path(write_model(tmp_path / "other-q.gguf", q, kvs=task_kv("q")))
    split({t: str(p) for t, p in originals.items()}, tmp_path / "other", file_cost=0, cut="none")
    return Made(tmp_path / "other", originals)


def test_file_of_another_split_is_refused(tasks: Made, model_factory: Callable[..., str], tmp_path: Path) -> None:
    """A shared file replaced by another split's (same position, same tensor names) is refused, naming it;
    another split's adaptor put in this directory looks for its own files beside it, and names the one
    missing."""
    other = other_split(model_factory, tmp_path)
    work = copy_split(tasks, tmp_path / "work")
    shutil.copyfile(other.foundation, work.foundation)
    shutil.copyfile(other.adaptor("p"), work.dir / "adaptor-p.gguf")
    with open_split(work.dir) as s:
        with pytest.raises(GGUFSplitError) as e:
            s.load("base")
        assert e.value.path == str(work.foundation) and "another split" in e.value.problem
        with pytest.raises(GGUFSplitError) as e:
            s.load("p")
        assert e.value.path == str(work.dir / other.foundation.name) and "not found" in e.value.problem
    with open_split(tasks.dir) as s, s.load("chat") as model:
        with pytest.raises(GGUFSplitError) as e:
            model.swap(work.dir / "adaptor-p.gguf")
        assert model.task == "chat"


def reseal(path: Path) -> None:
    """What a forger does after editing a header: write the seal of the edited header (xxh3-128 of the
    header up to the end of the tensor infos, with the seal's hex zeroed)."""
    with GGUFFile(path) as f:
        end = f.header.tensor_info_end
    raw = bytearray(path.read_bytes()[:end])
    at = seal_offset()
    assert raw[at - 12 - len(K_SEAL):at - 12] == K_SEAL.encode()
    raw[at:at + 32] = b"0" * 32
    patch_file(path, at, xxhash.xxh3_128(bytes(raw)).hexdigest().encode())


def test_check_does_not_depend_on_what_is_mapped(tasks: Made, model_factory: Callable[..., str],
                                                 tmp_path: Path) -> None:
    """An adaptor that names this split's foundation but recorded another content id (a forged adaptor,
    resealed) is refused whether or not the foundation is already mapped by another task: a reused
    mapping is checked against what each adaptor recorded, as a fresh one is."""
    other = other_split(model_factory, tmp_path)
    forged = tasks.dir / "adaptor-p.gguf"
    shutil.copyfile(other.adaptor("p"), forged)
    raw = forged.read_bytes()
    assert raw.count(other.foundation.name.encode()) == 1 and len(other.foundation.name) == len(tasks.foundation.name)
    patch_file(forged, raw.index(other.foundation.name.encode()), tasks.foundation.name.encode())
    reseal(forged)
    for mapped_first in (False, True):
        with open_split(tasks.dir) as s:
            holder = s.load("chat") if mapped_first else None
            with pytest.raises(GGUFSplitError) as e:
                s.load("p")
            assert e.value.path == str(tasks.foundation.resolve()) or e.value.path == str(tasks.foundation)
            assert "another split" in e.value.problem, mapped_first
            del holder, e


def test_missing_files_are_named(tasks: Made, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for opener in (open_split, Foundation.open):
        with pytest.raises(GGUFSplitError) as e:
            opener(missing)
        assert e.value.path == str(missing)
    with open_split(tasks.dir) as s:
        with pytest.raises(GGUFSplitError) as e:
            s.load("ghost")
        assert e.value.path == str(tasks.dir) and "no task 'ghost'" in e.value.problem
        with pytest.raises(GGUFSplitError) as e:
            s.load(tmp_path / "x.gguf")
        assert e.value.path == str(tmp_path / "x.gguf")
    for victim in sorted({p for t in TASKS for p in tasks.listed(t)}):
        work = copy_split(tasks, tmp_path / f"no-{victim.name}")
        (work.dir / victim.name).unlink()
        with open_split(work.dir) as s:
            for t in TASKS:
                if victim in tasks.listed(t):
                    with pytest.raises(GGUFSplitError) as e:
                        s.load(t)
                    assert e.value.path == str(work.dir / victim.name) and "not found" in e.value.problem
                else:
                    s.load(t).close()


def cut_points(path: Path) -> dict[str, int]:
    """Byte counts to truncate a gguf-split file to: inside each part of its header and its data."""
    with GGUFFile(path) as f:
        h = f.header
        index = h.kv_by_key[K_INDEX]
        last_kv = h.kvs[-1]
        points = {
            "empty": 0,
            "magic": 3,
            "prefix": 20,
            "first KV": 24 + 5,
            "index": index.value_start + 14,
            "last KV": (last_kv.start + last_kv.end) // 2,
            "tensor infos": (h.tensor_info_start + h.tensor_info_end) // 2,
            "header padding": h.tensor_info_end + (h.data_start - h.tensor_info_end) // 2,
            "data start": h.data_start,
            "data": (h.data_start + h.data_end()) // 2,
            "last byte": h.data_end() - 1,
        }
        out: dict[str, int] = {}
        for where, at in points.items():  # a file without tensors has fewer distinct places
            if at < f.size and at not in out.values():
                out[where] = at
        return out


def load_all(directory: Path, task: str) -> None:
    """Open, load and read every KV and tensor: the only exception allowed out is GGUFSplitError."""
    with open_split(directory) as s, s.load(task) as model:
        for key in model.metadata:
            model.metadata.field(key)
        for t in model.tensors.values():
            bytes(t.data)


@pytest.mark.parametrize("role", ["adaptor", "foundation", "shared", "hole"])
def test_truncated_files_are_named(tasks: Made, tmp_path: Path, role: str) -> None:
    target, task = {
        "adaptor": (tasks.adaptor("code"), "code"),
        "foundation": (tasks.foundation, "chat"),
        "shared": (tasks.only_used_by("base", "code"), "code"),
        "hole": (tasks.hole, tasks.holed),
    }[role]
    points = cut_points(target)
    with GGUFFile(target) as f:
        padded = f.header.data_start > f.header.tensor_info_end  # a header may end exactly on the alignment
    assert len(points) >= (6 if role == "hole" else 10 + padded)
    for where, size in points.items():
        work = copy_split(tasks, tmp_path / f"cut-{where.replace(' ', '_')}")
        victim = work.dir / target.name
        os.truncate(victim, size)
        with pytest.raises(GGUFSplitError) as e:
            load_all(work.dir, task)
        assert e.value.path == str(victim), (where, e.value)


def index_patches(values: list[int]) -> dict[str, Callable[[list[int]], None]]:
    """Ways to damage a header index [tensor-info offset, data offset, KV offsets...]."""
    mid = 2 + (len(values) - 2) // 2

    def setter(i: int, delta: int | None = None, value: int | None = None) -> Callable[[list[int]], None]:
        def patch(v: list[int]) -> None:
            v[i] = value if value is not None else v[i] + (delta or 0)
        return patch

    def swap_pair(v: list[int]) -> None:
        v[mid], v[mid + 1] = v[mid + 1], v[mid]

    return {
        "tensor infos +8": setter(0, 8),
        "tensor infos -1": setter(0, -1),
        "tensor infos past end": setter(0, value=1 << 62),
        "data +alignment": setter(1, 32),
        "data -alignment": setter(1, -32),
        "first KV +1": setter(2, 1),
        "middle KV +1": setter(mid, 1),
        "middle KV -1": setter(mid, -1),
        "middle KV past end": setter(mid, value=1 << 63),
        "last KV +1": setter(len(values) - 1, 1),
        "two KVs swapped": swap_pair,
    }


def read_index(path: Path) -> tuple[int, list[int]]:
    """(file offset of the index's u32 element type, its u64 values)."""
    with GGUFFile(path) as f:
        kv = f.header.kv_by_key[K_INDEX]
        sub, count = struct.unpack_from("<IQ", f.mm, kv.value_start)
        assert sub == V.UINT64
        return kv.value_start, list(struct.unpack_from(f"<{count}Q", f.mm, kv.value_start + 12))


def patched(values: list[int], patch: Callable[[list[int]], None]) -> list[int]:
    out = list(values)
    patch(out)
    assert out != values
    return out


def patch_file(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_damaged_header_index_is_refused(tasks: Made, tmp_path: Path) -> None:
    at, values = read_index(tasks.adaptor("chat"))
    assert len(values) > 6
    cases = {name: (at + 12, struct.pack(f"<{len(values)}Q", *patched(values, patch)))
             for name, patch in index_patches(values).items()}
    cases["count +1"] = (at + 4, struct.pack("<Q", len(values) + 1))
    cases["count -1"] = (at + 4, struct.pack("<Q", len(values) - 1))
    cases["element type u32"] = (at, struct.pack("<I", V.UINT32))
    for name, (offset, data) in cases.items():
        work = copy_split(tasks, tmp_path / name.replace(" ", "_"))
        patch_file(work.adaptor("chat"), offset, data)
        with open_split(work.dir) as s:
            with pytest.raises(GGUFSplitError) as e:
                s.load("chat")  # refused at load, before any value is asked for
            assert e.value.path == str(work.adaptor("chat")), (name, e.value)


def test_damaged_shared_index_is_refused(tasks: Made, tmp_path: Path) -> None:
    for target in (tasks.foundation, tasks.only_used_by("base", "chat")):
        at, values = read_index(target)
        assert len(values) == 2  # a shared file keeps no original KVs
        for name, new in {"tensor infos +8": [values[0] + 8, values[1]],
                          "data +alignment": [values[0], values[1] + 32],
                          "data -alignment": [values[0], values[1] - 32]}.items():
            work = copy_split(tasks, tmp_path / f"{target.name}-{name.replace(' ', '_')}")
            patch_file(work.dir / target.name, at + 12, struct.pack("<2Q", *new))
            with open_split(work.dir) as s:
                with pytest.raises(GGUFSplitError) as e:
                    s.load("chat")
                assert e.value.path == str(work.dir / target.name), (name, e.value)


def kv_value_offset(path: Path, key: str) -> int:
    """File offset of a string KV's text, per GGUFReader."""
    f = GGUFReader(path).fields[key]
    assert f.types == [V.STRING]
    return int(f.offset) + sum(p.nbytes for p in f.parts[:4])


@pytest.mark.parametrize("where", ["adaptor", "shared"])
def test_edited_header_is_refused_as_verify_refuses_it(tasks: Made, tmp_path: Path, where: str) -> None:
    """One KV edited in place, lengths kept (a changed value that every parser accepts): verify rejects
    it, and so does the loader, at load and at swap, naming the file; the current task stays."""
    work = copy_split(tasks, tmp_path / "work")
    if where == "adaptor":
        victim, key, task = work.adaptor("chat"), "test.task", "chat"
    else:
        victim, key, task = work.only_used_by("base", "chat"), "general.architecture", "chat"
    at = kv_value_offset(victim, key)
    old = victim.read_bytes()[at:at + 4]
    patch_file(victim, at, old.upper() if old != old.upper() else old.lower())
    assert reader_fields(victim)[key].contents() != reader_fields(tasks.dir / victim.name)[key].contents()
    with pytest.raises(GGUFSplitError) as e:
        verify([work.dir])
    assert e.value.path == str(victim) and "seal" in e.value.problem
    with open_split(work.dir) as s:
        with pytest.raises(GGUFSplitError) as e:
            s.load(task)
        assert e.value.path == str(victim) and "seal" in e.value.problem
        with s.load("code") as model:
            with pytest.raises(GGUFSplitError) as e:
                model.swap(task)
            assert e.value.path == str(victim)
            assert model.task == "code"
            assert_model_matches(model, tasks.originals["code"])


def test_edit_after_load_is_seen_at_the_next_load(tasks: Made, tmp_path: Path) -> None:
    """A mapping kept for a loaded task is not taken on trust: an adaptor edited in place (same inode)
    after a task was loaded is refused by the next load of that task."""
    work = copy_split(tasks, tmp_path / "work")
    with open_split(work.dir) as s, s.load("chat") as first:
        at = kv_value_offset(work.adaptor("chat"), "test.task")
        patch_file(work.adaptor("chat"), at, b"CHAT")
        with pytest.raises(GGUFSplitError) as e:
            s.load("chat")
        assert e.value.path == str(work.adaptor("chat")) and "seal" in e.value.problem
        assert first.task == "chat"


def test_shared_headers_are_remembered_only_while_their_bytes_stay(tasks: Made, tmp_path: Path) -> None:
    """A shared file loaded again (nothing mapped meanwhile) takes its parse and checks from the loader's
    HeaderMemo; the same file then edited in place, same size, its mtime and atime put back (what a key of
    path, inode, size and mtime alone would take for unchanged), is refused at the next load, as without
    a memo; put back as it was, it loads again."""
    work = copy_split(tasks, tmp_path / "work")
    victim = work.only_used_by("base", "chat")
    in_shared = set()
    for f in work.listed("chat"):
        with GGUFFile(f) as g:
            in_shared |= {t.name for t in g.header.tensors}
    with open_split(work.dir) as s, s.load("chat") as model:
        first = {n: model.tensors.info(n) for n in model.tensors}
    assert in_shared and not in_shared - set(first)
    with open_split(work.dir) as s, s.load("chat") as model:
        again = {n: model.tensors.info(n) for n in model.tensors}
        assert again == first and all(again[n] is first[n] for n in in_shared)  # remembered: the same objects
        assert_model_matches(model, tasks.originals["chat"])
    st = victim.stat()
    at = kv_value_offset(victim, "general.architecture")
    old = victim.read_bytes()[at:at + 4]
    patch_file(victim, at, old.upper() if old != old.upper() else old.lower())
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    with open_split(work.dir) as s:
        with pytest.raises(GGUFSplitError) as e:
            s.load("chat")
        assert e.value.path == str(victim) and "seal" in e.value.problem
    patch_file(victim, at, old)
    with open_split(work.dir) as s, s.load("chat") as model:  # back as it was: loads again
        assert_model_matches(model, tasks.originals["chat"])


def test_a_mapped_file_edited_with_its_mtime_put_back_is_mapped_anew(tasks: Made, tmp_path: Path) -> None:
    """While a task holds a shared file's mapping, the file is edited in place (same size, mtime put back):
    the next load must not reuse the mapping (whose header was checked before the edit) but map the file
    anew and refuse it (its ctime changed; a stamp of size and mtime alone reused it)."""
    work = copy_split(tasks, tmp_path / "work")
    victim = work.only_used_by("base", "chat")
    with open_split(work.dir) as s, s.load("chat") as held:
        st = victim.stat()
        at = kv_value_offset(victim, "general.architecture")
        old = victim.read_bytes()[at:at + 4]
        patch_file(victim, at, old.upper() if old != old.upper() else old.lower())
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        with open_split(work.dir) as s2:
            with pytest.raises(GGUFSplitError) as e:
                s2.load("chat")
        assert e.value.path == str(victim) and "seal" in e.value.problem
        assert held.task == "chat"


def test_headers_too_long_to_remember_are_read_each_time(tasks: Made, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared header longer than HeaderMemo.READ (here: a few bytes) is parsed from the map on every
    load and gives the same task; a damaged one is refused with the same problem as without a memo."""
    from gguf_split.runtime.loader import HEADERS

    monkeypatch.setattr(type(HEADERS), "READ", 64)
    monkeypatch.setattr(type(HEADERS), "FIRST", 32)
    HEADERS.clear()
    for _ in range(2):
        with open_split(tasks.dir) as s, s.load("chat") as model:
            assert_model_matches(model, tasks.originals["chat"])
        remembered = list(HEADERS._entries.values())
        assert len(remembered) == len(tasks.listed("chat")) and all(r.head is None for r in remembered)
    HEADERS.clear()


# ---------------------------------------------------------------------------------------------------------
# Paths: tasks are found beside the path opened


def test_hard_linked_copy_finds_tasks_beside_the_path_opened(tasks: Made, tmp_path: Path) -> None:
    """The same files reached through two directories (hard links: same inodes, so one mapping each):
    each split finds its tasks and their files beside the path it was opened with, and reports those
    paths, whichever was mapped first; removing a file from one directory does not affect the other."""
    b = hard_link_copy(tasks, tmp_path / "b")
    c = tmp_path / "c"
    os.symlink(b.dir, c)  # a symlinked directory: paths as given, not resolved
    with open_split(tasks.dir) as sa, open_split(b.dir) as sb, Foundation.open(b.foundation) as fb, \
            open_split(c) as sc:
        ma = sa.load("chat")
        for s, where in ((sb, b.dir), (fb, b.dir), (sc, c)):
            m = s.load("chat")
            assert m.llama_cpp_paths() == m.files == [str(where.absolute() / p.name) for p in tasks.paths("chat")]
            assert {Path(t.file).parent for t in m.tensors.values()} == {where.absolute()}
            assert all(address(m.tensors[n].data) == address(ma.tensors[n].data) for n in m.tensors)
            m.close()
        every = sorted({p for t in TASKS for p in tasks.paths(t)})
        assert mapped_count(every) == {p.name: int(p in tasks.paths("chat")) for p in every}
        assert ma.files == [str(p.resolve()) for p in tasks.paths("chat")]
        # remove code's files from a: b still loads code, from b's files
        mb = sb.load("chat")
        code_only = tasks.only_used_by("base", "code")
        tasks.adaptor("code").unlink()
        code_only.unlink()
        with pytest.raises(GGUFSplitError) as e:
            sa.load("code")
        assert e.value.path == str(tasks.dir)
        with pytest.raises(GGUFSplitError) as e:
            sa.load("base")
        assert e.value.path == str(code_only) and "not found" in e.value.problem
        for s, where in ((sb, b.dir), (fb, b.dir)):
            with s.load("code") as m:
                assert m.files == [str(where.absolute() / p.name) for p in b.paths("code")]
                assert_model_matches(m, tasks.originals["code"])
        mb.swap("code")
        assert mb.files[0] == str(b.adaptor("code").absolute())
        ma.close()
        mb.close()


# ---------------------------------------------------------------------------------------------------------
# Names: a str is always a task name; a file is given as an os.PathLike


def test_task_named_like_a_file_loads_by_name(model_factory: Callable[..., str], tmp_path: Path) -> None:
    originals = make_tasks(model_factory)
    split({"x.gguf": str(originals["base"]), "chat": str(originals["chat"])}, tmp_path / "out", file_cost=0)
    adaptor = tmp_path / "out" / "adaptor-x.gguf.gguf"
    assert adaptor.is_file()
    with open_split(tmp_path / "out") as s:
        assert s.tasks == ["chat", "x.gguf"]
        for ask in ("x.gguf", adaptor, Path(os.path.relpath(adaptor))):
            with s.load(ask) as model:
                assert model.task == "x.gguf"
                assert_model_matches(model, originals["base"])
        with s.load("chat") as model:
            model.swap("x.gguf")
            assert model.task == "x.gguf"


def test_a_str_is_never_a_path(tasks: Made, monkeypatch: pytest.MonkeyPatch) -> None:
    """A str naming a file (absolute, relative to the working directory, or a file name in the split) is
    taken as a task name, refused with a hint to pass a pathlib.Path; the Path loads."""
    monkeypatch.chdir(tasks.dir)
    with open_split(tasks.dir) as s:
        for ask in (str(tasks.adaptor("chat")), "./adaptor-chat.gguf", "adaptor-chat.gguf", "chat.gguf"):
            with pytest.raises(GGUFSplitError) as e:
                s.load(ask)
            assert "pass a pathlib.Path" in e.value.problem, ask
            if "/" not in ask:
                assert e.value.path == str(tasks.dir) and f"no task {ask!r}" in e.value.problem
        for ask in (Path("adaptor-chat.gguf"), tasks.adaptor("chat")):
            with s.load(ask) as model:
                assert model.task == "chat"
        with pytest.raises(GGUFSplitError) as e:
            s.load("ghost")
        assert "pathlib" not in e.value.problem  # a plain unknown name gets no hint
        with pytest.raises(TypeError):
            s.load(b"chat")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Open and swap read headers only


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(path: Path) -> set[int]:
    """Pages of `path` in the page cache (mincore over a throw-away shared mapping, which touches nothing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
            if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return {i for i, v in enumerate(vec) if v & 1}
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def readahead_bytes(path: Path) -> int:
    """The kernel's readahead for `path`'s device: a fault on a header page may read this much around it."""
    dev = os.stat(path).st_dev
    try:
        return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text()) * 1024
    except (OSError, ValueError):
        return 0


def mapped_rss(path: Path) -> int:
    """Bytes of `path` mapped into this process's page tables (its mappings' Rss in /proc/self/smaps):
    what the loader touched, plus the kernel's fault-around, but not the readahead into the page cache."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:
            ours = len(head) == 6 and head[5] == str(path)
        elif ours and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@dataclass
class BigSplit:
    made: Made
    data_start: dict[Path, int]
    window: int


@pytest.fixture
def big(tmp_path: Path) -> BigSplit:
    """Two tasks with large tensors: a shared one (foundation) and one that differs (adaptors)."""
    window = max(MiB, readahead_bytes(tmp_path))
    rows = max(16 * MiB, 2 * window) // (1024 * 4)  # F32 rows of 1024 elements
    originals = {}
    for task, seed in [("a", 8), ("b", 9)]:
        tensors = {**base_tensors(), "big.shared": (Q.F32, (1024, rows), 7), "big.task": (Q.F32, (1024, rows), seed)}
        originals[task] = Path(write_model(tmp_path / f"{task}.gguf", tensors))
    # gguf-split 0.2's layout (cut none): these tests are about its file kinds; tasks of many files:
    # test_grow.py
    split({t: str(p) for t, p in originals.items()}, tmp_path / "out", file_cost=0, cut="none")
    made = Made(tmp_path / "out", originals)
    starts = {}
    for p in [made.foundation, made.adaptor("a"), made.adaptor("b")]:
        with GGUFFile(p) as f:
            starts[p] = f.header.data_start
            assert f.size - f.header.data_start > window + 4 * MiB
    assert made.listed("a") == made.listed("b") == [made.foundation]
    return BigSplit(made, starts, window)


def test_open_and_swap_read_no_tensor_data(big: BigSplit) -> None:
    """After eviction, open + load + swap (+ making every view and decoding every KV) leave the data
    sections out of the page cache, except the kernel's mmap read-around of the first header fault (up to
    the device's read_ahead_kb around it; hence the window); the process's own page tables (smaps Rss of
    each mapping) hold no more than the header plus the fault-around."""
    files = list(big.data_start)
    for p in files:
        evict(p)
        if resident_pages(p):
            pytest.skip(f"posix_fadvise(DONTNEED) does not evict pages on this file system ({p})")
    with open_split(big.made.dir) as s, s.load("a") as model:
        model.swap("b")
        names = list(model.tensors)
        views = [model.tensors[n] for n in names]  # views are made, not read
        dict(model.metadata)
        fnd_view = model.tensors["big.shared"]
        assert fnd_view.file == str(files[0].resolve()) and model.tensors["big.task"].file == str(files[2].resolve())
        for p in files[::2]:  # the files mapped now: foundation and adaptor b
            assert mapped_rss(p) <= big.data_start[p] + 256 * 1024, p
        for p in files:
            first = (big.data_start[p] + big.window + PAGE - 1) // PAGE
            late = sorted(i for i in resident_pages(p) if i >= first)
            assert not late, f"{p}: {len(late)} data pages read (first at byte {late[0] * PAGE})"
        # the measurements can see a read: touch the last page of the big shared tensor
        rss = mapped_rss(files[0])
        assert len(bytes(fnd_view.data[-PAGE:])) == PAGE and len(views) == len(names)
        last = (big.data_start[files[0]] + model.tensors.info("big.shared").offset + fnd_view.nbytes - 1) // PAGE
        if last not in resident_pages(files[0]):
            pytest.skip("mincore does not report page-cache residency here")
        assert mapped_rss(files[0]) > rss


def overwrite_data(path: Path) -> None:
    """Replace the whole data section with different bytes; the header stays intact."""
    with GGUFFile(path) as f:
        start, size = f.header.data_start, f.size
    rng = np.random.default_rng(12345)
    patch_file(path, start, rng.integers(0, 256, size - start, dtype=np.uint8).tobytes())


def test_open_does_not_hash_data_but_verify_does(tasks: Made, tmp_path: Path) -> None:
    work = copy_split(tasks, tmp_path / "garbage")
    overwrite_data(work.foundation)
    with open_split(work.dir) as s, s.load("base") as model:
        model.swap("chat")
        original = original_tensors(tasks.originals["chat"])
        served = {n: bytes(t.data) for n, t in model.tensors.items() if t.file == str(work.foundation.resolve())}
        assert served and all(served[n] != original[n] for n in served)  # the garbage is what is served
    with pytest.raises(GGUFSplitError) as e:
        verify([work.dir])
    assert e.value.path == str(work.foundation)


FIRST_LOAD_WITHOUT_LORA = """
import json, sys
from gguf_split import open_split

def lora_modules():
    return sorted(m for m in sys.modules if m == "gguf_split.lora" or m.startswith("gguf_split.lora."))

with open_split(sys.argv[1]) as s:
    m = s.load("chat")
    m.metadata["general.architecture"]
    for t in m.tensors.values():
        bytes(t.data[:4])
    m.tensors["blk.0.attn_q.weight"].to_numpy()
    m.swap("code")
    m.loras, m.llama_cpp_paths(), s.load("base").tensors["blk.0.attn_q.weight"]
    before = lora_modules()
    m.swap("chat")
    m.apply_lora(sys.argv[2])
    after = lora_modules()
    lora_tensor = type(m.tensors["blk.0.attn_q.weight"]).__name__
print(json.dumps({"before": before, "after": after, "lora_tensor": lora_tensor}))
"""


def test_no_lora_module_is_imported_until_a_lora_is_applied(tasks: Made, tmp_path: Path) -> None:
    """A fresh process that opens, loads, reads and swaps tasks imports nothing of gguf_split.lora (the import
    was most of a fresh process's first load: bench_loader.py measures it); the first apply_lora does."""
    import json
    import subprocess

    adapter = tmp_path / "chat-lora.gguf"  # rank 2 over blk.0.attn_q.weight (ne [64, 64])
    w = GGUFWriter(os.fspath(adapter), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 2.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((2, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((64, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    p = subprocess.run([sys.executable, "-c", FIRST_LOAD_WITHOUT_LORA, str(tasks.dir), str(adapter)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["before"] == []
    assert "gguf_split.lora.overlay" in got["after"] and got["lora_tensor"] == "LoraTensor"


# ---------------------------------------------------------------------------------------------------------
# Threads


@contextmanager
def fast_thread_switches() -> Iterator[None]:
    """Switch threads every 10 µs instead of 5 ms, so readers interleave with a swap in progress."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_reads_stay_consistent_while_another_thread_swaps(tasks: Made) -> None:
    versions = {t: original_tensors(tasks.originals[t]) for t in ("base", "chat")}
    allowed = {n: {versions["base"][n], versions["chat"][n]} for n in versions["base"]}
    task_values = {"base", "chat"}
    errors: list[BaseException] = []
    reads = [0]
    done = threading.Event()

    def reader(model: TaskModel, hold: bool) -> None:
        """Look every tensor up through the model, or (hold) through one `model.tensors` per pass."""
        try:
            while not done.is_set():
                held = model.tensors
                for name, ok in allowed.items():
                    tensors = held if hold else model.tensors
                    assert bytes(tensors[name].data) in ok, name
                    reads[0] += 1
                assert model.metadata["test.task"] in task_values
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            done.set()

    def swapper(model: TaskModel) -> None:
        try:
            for i in range(300):
                model.swap("chat" if i % 2 == 0 else "base")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    with open_split(tasks.dir) as s, s.load("base") as model, fast_thread_switches():
        threads = [threading.Thread(target=reader, args=(model, hold)) for hold in (False, False, True)]
        threads.append(threading.Thread(target=swapper, args=(model,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    assert not errors, repr(errors[0])
    assert reads[0] > 0


def test_concurrent_swaps_of_one_model_leave_a_whole_task(tasks: Made) -> None:
    """Several threads swapping the same model: it ends as one of the tasks asked for, whole (metadata,
    tensors and files of that task, nothing of another), and no mapping is left behind."""
    errors: list[BaseException] = []
    with open_split(tasks.dir) as s, s.load("base") as model, fast_thread_switches():
        def swapper(order: tuple[str, ...]) -> None:
            try:
                for i in range(60):
                    model.swap(order[i % len(order)])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=swapper, args=(o,)) for o in (TASKS, TASKS[::-1], ("chat", "code"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, repr(errors[0])
        task = model.task
        assert model.files == [str(p.resolve()) for p in tasks.paths(task)]
        assert_model_matches(model, tasks.originals[task])
        every = sorted({p for t in TASKS for p in tasks.paths(t)})
        assert mapped_count(every) == {p.name: int(p in tasks.paths(task)) for p in every}


def test_lookups_begun_before_a_swap_still_work(tasks: Made) -> None:
    """The thread race above made deterministic: a reader took `model.tensors` / `model.metadata` just
    before another thread swapped; its lookups must still answer (from the old task), not fail. The old
    task's files are unmapped as soon as the last reader lets go."""
    base = original_tensors(tasks.originals["base"])
    gone = set(tasks.paths("base")) - set(tasks.paths("chat"))
    with open_split(tasks.dir) as s, s.load("base") as model:
        tensors, metadata = model.tensors, model.metadata
        model.swap("chat")
        assert {n: bytes(t.data) for n, t in tensors.items()} == base
        assert metadata["test.task"] == "base"
        assert model.metadata["test.task"] == "chat"
        assert all(mapped_count(sorted(gone)).values())
        del tensors
        assert mapped_count(sorted(gone)) == {p.name: int(p == tasks.adaptor("base")) for p in gone}  # metadata
        del metadata
        assert not any(mapped_count(sorted(gone)).values())  # released once the last reader let go


# ---------------------------------------------------------------------------------------------------------
# Lifetime: nothing outlives its last user


def test_swaps_do_not_leak_maps_or_descriptors(tasks: Made) -> None:
    uses = {t: set(tasks.paths(t)) for t in TASKS}
    every = sorted(set().union(*uses.values()))
    with open_split(tasks.dir) as s, s.load("base") as model:
        model.swap("chat")
        gc.collect()
        fds = open_fds()
        for i in range(60):
            model.swap(TASKS[i % 3])
            assert model.task == TASKS[i % 3]
            for t in model.tensors.values():
                bytes(t.data)
            assert open_fds() <= fds
            assert mapped_count(every) == {p.name: int(p in uses[model.task]) for p in every}


def test_dropped_models_are_released(tasks: Made) -> None:
    """A model nothing references is gone at once (the split keeps no strong reference to what it
    loaded), with its mappings; hundreds of loads and swaps leave nothing behind."""
    every = sorted({p for t in TASKS for p in tasks.paths(t)})
    with open_split(tasks.dir) as s:
        model = s.load("chat")
        ref = weakref.ref(model)
        bytes(model.tensors["token_embd.weight"].data)
        del model
        assert ref() is None  # no garbage collection needed
        assert mapped_count(every) == {p.name: 0 for p in every}
        gc.collect()
        fds, registry = open_fds(), _Mapped.count()
        refs = []
        for i in range(300):
            m = s.load(TASKS[i % 3])
            m.swap(TASKS[(i + 1) % 3])
            bytes(m.tensors["output_norm.weight"].data)
            refs.append(weakref.ref(m))
            del m
            assert mapped_count(every) == {p.name: 0 for p in every}
        assert not any(r() for r in refs)
        assert open_fds() <= fds and _Mapped.count() == registry


def test_close_releases_the_maps(tasks: Made) -> None:
    s = open_split(tasks.dir)
    model = s.load("chat")
    other = s.load("code")
    held = model.tensors["token_embd.weight"]  # a view the caller still holds after close
    expected = original_tensors(tasks.originals["chat"])["token_embd.weight"]
    for t in model.tensors.values():
        bytes(t.data)
    del t
    files = sorted(set(tasks.paths("chat")) | set(tasks.paths("code")))
    assert all(mapped_count(files).values())

    s.close()
    for access in (lambda: model.tensors, lambda: model.metadata, lambda: model.swap("code"), lambda: other.task,
                   lambda: s.load("base")):
        with pytest.raises(GGUFSplitError):
            access()
    assert bytes(held.data) == expected  # a held view keeps its map alive ...
    assert mapped_count([Path(held.file)]) == {Path(held.file).name: 1}
    assert sum(mapped_count(files).values()) == 1
    del held
    assert not any(mapped_count(files).values())  # ... until it is dropped


def test_task_model_close_keeps_other_tasks_files(tasks: Made) -> None:
    with open_split(tasks.dir) as s:
        keep = s.load("base")
        with s.load("chat") as model:
            pass
        with pytest.raises(GGUFSplitError):
            model.tensors
        every = sorted({p for t in TASKS for p in tasks.paths(t)})
        assert mapped_count(every) == {p.name: int(p in tasks.paths("base")) for p in every}
        with s.load("code") as again:
            assert_model_matches(again, tasks.originals["code"])
        assert_model_matches(keep, tasks.originals["base"])
        keep.close()
