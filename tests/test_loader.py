"""The runtime loader (gguf_split.loader) against the original models, read independently by gguf's GGUFReader.

Why: a task loaded from [adaptor, foundation] must be indistinguishable from its original GGUF (every tensor
byte, the tensor order, every KV with its GGUF types), while sharing one mapping of the foundation in the
process and reading nothing but headers to open or swap. Bad files (another split's adaptor, missing,
truncated, a damaged header index) must surface as GGUFSplitError naming the file, never as another
exception. Reads from several threads must stay consistent while another thread swaps tasks.
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType as Q, GGUFValueType as V
from gguf.quants import dequantize

from conftest import base_tensors, write_model
from gguf_split import Foundation, GGUFFile, GGUFSplitError, TaskModel, Tensor, open_model, verify
from gguf_split.layout import K_INDEX
from gguf_split.loader import _SharedFoundation
from gguf_split.split import split

MiB = 1 << 20
PAGE = mmap.PAGESIZE
TASKS = ("base", "chat", "code")


# ---------------------------------------------------------------------------------------------------------
# Fixtures: three related tiny models and their split


@dataclass
class Split:
    dir: Path
    foundation: Path
    originals: dict[str, Path]

    def adaptor(self, task: str) -> Path:
        return self.dir / f"adaptor-{task}.gguf"


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
def tasks(model_factory: Callable[..., str], tmp_path: Path) -> Split:
    originals = make_tasks(model_factory)
    report = split({t: str(p) for t, p in originals.items()}, tmp_path / "out")
    return Split(tmp_path / "out", Path(report.foundation), originals)


@pytest.fixture(autouse=True)
def registry_left_clean() -> Iterator[None]:
    """Every test closes what it opens: the process-wide registry must be as it was."""
    before = dict(_SharedFoundation.registry)
    yield
    gc.collect()
    assert _SharedFoundation.registry == before


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


def test_every_task_equals_its_original(tasks: Split) -> None:
    with Foundation.open(tasks.foundation) as fnd:
        for task, original in tasks.originals.items():
            with fnd.load(task) as model:
                assert model.task == task
                assert_model_matches(model, original)


def test_load_by_path_and_task_names(tasks: Split) -> None:
    with Foundation.open(tasks.foundation) as fnd:
        assert fnd.tasks() == sorted(TASKS)
        with fnd.load(tasks.adaptor("chat")) as model:
            assert model.task == "chat"
            assert_model_matches(model, tasks.originals["chat"])
            assert model.llama_cpp_paths() == [str(tasks.adaptor("chat").resolve()), str(tasks.foundation.resolve())]


def test_open_model_equals_gguf_reader(tasks: Split) -> None:
    with open_model(tasks.originals["code"]) as model:
        assert_model_matches(model, tasks.originals["code"])


def test_views_are_read_only(tasks: Split) -> None:
    with Foundation.open(tasks.foundation) as fnd, fnd.load("chat") as model:
        for t in model.tensors.values():
            assert t.data.readonly
            with pytest.raises(TypeError):
                t.data[0] = 0
            with pytest.raises(TypeError):
                t.data[:2] = b"xx"
            assert not np.frombuffer(t.data, dtype=np.uint8).flags.writeable


def test_to_numpy_matches_gguf_dequantize(tasks: Split) -> None:
    ref = {t.name: t for t in GGUFReader(tasks.originals["code"]).tensors}
    with Foundation.open(tasks.foundation) as fnd, fnd.load("code") as model:
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


def test_swap_changes_exactly_the_adaptor(tasks: Split) -> None:
    versions = {t: original_tensors(p) for t, p in tasks.originals.items()}
    base, chat = versions["base"], versions["chat"]
    shared_names = {n for n in base if all(v.get(n) == base[n] for v in versions.values())}
    chat_own = {t.name for t in GGUFReader(tasks.adaptor("chat")).tensors}
    assert chat_own == set(chat) - shared_names and {"blk.0.attn_q.weight", "blk.0.ffn_up.weight"} <= chat_own
    with Foundation.open(tasks.foundation) as fnd, fnd.load("base") as model:
        shared, mapping = fnd.shared, fnd.shared.file.mm
        before = snapshot(model)
        model.swap("chat")
        after = snapshot(model)
        assert model.task == "chat" and model.adaptor_path == str(tasks.adaptor("chat"))
        assert fnd.shared is shared and shared.file.mm is mapping  # the foundation was not mapped again
        assert_model_matches(model, tasks.originals["chat"])
        assert {n for n in after if before[n] != after[n]} == chat_own
        for n in shared_names:
            assert before[n] == after[n] and after[n][0] == str(tasks.foundation)  # same file, memory, bytes
        for n in chat_own:
            assert (before[n][0], after[n][0]) == (str(tasks.adaptor("base")), str(tasks.adaptor("chat")))
            assert (before[n][2], after[n][2]) == (base[n], chat[n])
        assert (model.metadata["test.task"], model.metadata.field("test.task").type) == ("chat", V.STRING)


def test_failed_swap_keeps_the_current_task(tasks: Split) -> None:
    with Foundation.open(tasks.foundation) as fnd, fnd.load("base") as model:
        with pytest.raises(GGUFSplitError) as e:
            model.swap("nosuchtask")
        assert e.value.path == str(tasks.dir / "adaptor-nosuchtask.gguf")
        assert model.task == "base"
        assert_model_matches(model, tasks.originals["base"])


def test_tasks_open_side_by_side(tasks: Split) -> None:
    with Foundation.open(tasks.foundation) as fnd:
        models = {t: fnd.load(t) for t in TASKS}
        for task, model in models.items():
            assert_model_matches(model, tasks.originals[task])
        for name in fnd.tensors:  # a shared tensor is one piece of memory for every task
            assert len({address(m.tensors[name].data) for m in models.values()}) == 1
            assert address(fnd.tensors[name].data) == address(models["base"].tensors[name].data)


def test_foundation_mapped_once_per_file(tasks: Split, tmp_path: Path) -> None:
    copy = tmp_path / "copy" / "foundation.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tasks.foundation, copy)
    hard_link = tmp_path / "link.gguf"
    os.link(tasks.foundation, hard_link)
    with Foundation.open(tasks.foundation) as a, Foundation.open(str(tasks.foundation)) as b, \
            Foundation.open(hard_link) as linked, Foundation.open(copy) as other:
        assert a is not b and a.shared is b.shared is linked.shared
        assert other.shared is not a.shared and other.shared.file.mm is not a.shared.file.mm
        assert a.id == other.id  # same content, separate mapping
        with a.load("chat") as ma, b.load("chat") as mb:
            assert address(ma.tensors["token_embd.weight"].data) == address(mb.tensors["token_embd.weight"].data)
        b.close()
        assert a.shared.file.identity in _SharedFoundation.registry  # still used by `a`
        with a.load("code") as model:
            assert_model_matches(model, tasks.originals["code"])


# ---------------------------------------------------------------------------------------------------------
# Refusals: another split's adaptor, missing, truncated and damaged files


def test_adaptor_of_another_split_is_refused(tasks: Split, model_factory: Callable[..., str], tmp_path: Path) -> None:
    other_model = model_factory("other", {"token_embd.weight": 999, "output_norm.weight": 998})
    other = split({"other": other_model}, tmp_path / "other")
    stranger = other.tasks[0].adaptor
    with Foundation.open(tasks.foundation) as fnd:
        with pytest.raises(GGUFSplitError) as e:
            fnd.load(stranger)
        assert e.value.path == stranger and "another split" in e.value.problem
        with fnd.load("chat") as model:
            with pytest.raises(GGUFSplitError) as e:
                model.swap(stranger)
            assert e.value.path == stranger
            assert_model_matches(model, tasks.originals["chat"])


def test_missing_files_are_named(tasks: Split, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "foundation.gguf"
    with pytest.raises(GGUFSplitError) as e:
        Foundation.open(missing)
    assert e.value.path == str(missing)
    with Foundation.open(tasks.foundation) as fnd:
        for ask, path in [("ghost", tasks.dir / "adaptor-ghost.gguf"), (str(tmp_path / "x.gguf"), tmp_path / "x.gguf")]:
            with pytest.raises(GGUFSplitError) as e:
                fnd.load(ask)
            assert e.value.path == str(path)


def cut_points(path: Path) -> dict[str, int]:
    """Byte counts to truncate a gguf-split file to: inside each part of its header and its data."""
    with GGUFFile(path) as f:
        h = f.header
        index = h.kv_by_key[K_INDEX]
        last_kv = h.kvs[-1]
        return {
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


def copy_split(tasks: Split, dest: Path) -> Split:
    shutil.copytree(tasks.dir, dest)
    return Split(dest, dest / tasks.foundation.name, tasks.originals)


def load_all(foundation: Path, adaptor: Path) -> None:
    """Open, load and read every KV and tensor: the only exception allowed out is GGUFSplitError."""
    with Foundation.open(foundation) as fnd, fnd.load(adaptor) as model:
        for key in model.metadata:
            model.metadata.field(key)
        for t in model.tensors.values():
            bytes(t.data)


@pytest.mark.parametrize("role", ["adaptor", "foundation"])
def test_truncated_files_are_named(tasks: Split, tmp_path: Path, role: str) -> None:
    target = tasks.adaptor("code") if role == "adaptor" else tasks.foundation
    points = cut_points(target)
    assert len(set(points.values())) == len(points)  # each cut lands somewhere else
    for where, size in points.items():
        work = copy_split(tasks, tmp_path / f"cut-{where}")
        victim = work.dir / target.name
        os.truncate(victim, size)
        with pytest.raises(GGUFSplitError) as e:
            load_all(work.foundation, work.adaptor("code"))
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


def test_damaged_header_index_is_refused(tasks: Split, tmp_path: Path) -> None:
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
        with Foundation.open(work.foundation) as fnd:
            with pytest.raises(GGUFSplitError) as e:
                fnd.load("chat")  # refused at load, before any value is asked for
            assert e.value.path == str(work.adaptor("chat")), (name, e.value)


def test_damaged_foundation_index_is_refused(tasks: Split, tmp_path: Path) -> None:
    at, values = read_index(tasks.foundation)
    assert len(values) == 2  # the foundation keeps no original KVs
    for name, new in {"tensor infos +8": [values[0] + 8, values[1]], "data +alignment": [values[0], values[1] + 32],
                      "data -alignment": [values[0], values[1] - 32]}.items():
        work = copy_split(tasks, tmp_path / name.replace(" ", "_"))
        patch_file(work.foundation, at + 12, struct.pack("<2Q", *new))
        with pytest.raises(GGUFSplitError) as e:
            Foundation.open(work.foundation)
        assert e.value.path == str(work.foundation), (name, e.value)


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
    split: Split
    data_start: dict[Path, int]
    window: int


@pytest.fixture
def big(tmp_path: Path) -> BigSplit:
    """Two tasks with large tensors: a shared one (foundation) and one that differs (adaptors)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("page residency is checked with Linux mincore and /proc/self/smaps")
    window = max(MiB, readahead_bytes(tmp_path))
    rows = max(16 * MiB, 2 * window) // (1024 * 4)  # F32 rows of 1024 elements
    originals = {}
    for task, seed in [("a", 8), ("b", 9)]:
        tensors = {**base_tensors(), "big.shared": (Q.F32, (1024, rows), 7), "big.task": (Q.F32, (1024, rows), seed)}
        originals[task] = Path(write_model(tmp_path / f"{task}.gguf", tensors))
    report = split({t: str(p) for t, p in originals.items()}, tmp_path / "out")
    s = Split(tmp_path / "out", Path(report.foundation), originals)
    starts = {}
    for p in [s.foundation, s.adaptor("a"), s.adaptor("b")]:
        with GGUFFile(p) as f:
            starts[p] = f.header.data_start
            assert f.size - f.header.data_start > window + 4 * MiB
    return BigSplit(s, starts, window)


def test_open_and_swap_read_no_tensor_data(big: BigSplit) -> None:
    """After eviction, open + load + swap (+ making every view and decoding every KV) leave the data
    sections out of the page cache, except the kernel's mmap read-around of the first header fault (up to
    the device's read_ahead_kb around it, 8 MiB here; hence the window); the process's own page tables
    (smaps Rss of each mapping) hold no more than the header plus the fault-around."""
    files = list(big.data_start)
    for p in files:
        evict(p)
        if resident_pages(p):
            pytest.skip(f"posix_fadvise(DONTNEED) does not evict pages on this file system ({p})")
    with Foundation.open(big.split.foundation) as fnd, fnd.load("a") as model:
        model.swap("b")
        names = list(model.tensors)
        views = [model.tensors[n] for n in names]  # views are made, not read
        dict(model.metadata)
        fnd_view = model.tensors["big.shared"]
        assert fnd_view.file == str(big.split.foundation) and model.tensors["big.task"].file == str(files[2])
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


def test_open_does_not_hash_data_but_verify_does(tasks: Split, tmp_path: Path) -> None:
    work = copy_split(tasks, tmp_path / "garbage")
    overwrite_data(work.foundation)
    with Foundation.open(work.foundation) as fnd, fnd.load("base") as model:
        model.swap("chat")
        original = original_tensors(tasks.originals["chat"])
        served = {n: bytes(t.data) for n, t in model.tensors.items() if t.file == str(work.foundation)}
        assert served and all(served[n] != original[n] for n in served)  # the garbage is what is served
    with pytest.raises(GGUFSplitError) as e:
        verify(work.foundation, [work.adaptor(t) for t in TASKS])
    assert e.value.path == str(work.foundation)


# ---------------------------------------------------------------------------------------------------------
# Threads and close


@contextmanager
def fast_thread_switches() -> Iterator[None]:
    """Switch threads every 10 µs instead of 5 ms, so readers interleave with a swap in progress."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_reads_stay_consistent_while_another_thread_swaps(tasks: Split) -> None:
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

    with Foundation.open(tasks.foundation) as fnd, fnd.load("base") as model, fast_thread_switches():
        threads = [threading.Thread(target=reader, args=(model, hold)) for hold in (False, False, True)]
        threads.append(threading.Thread(target=swapper, args=(model,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    assert not errors, repr(errors[0])
    assert reads[0] > 0


def test_lookups_begun_before_a_swap_still_work(tasks: Split) -> None:
    """The thread race above made deterministic: a reader took `model.tensors` / `model.metadata` just
    before another thread swapped; its lookups must still answer (from the old task), not fail."""
    base = original_tensors(tasks.originals["base"])
    with Foundation.open(tasks.foundation) as fnd, fnd.load("base") as model:
        tensors, metadata = model.tensors, model.metadata
        model.swap("chat")
        assert {n: bytes(t.data) for n, t in tensors.items()} == base
        assert metadata["test.task"] == "base"
        assert model.metadata["test.task"] == "chat"
        del tensors, metadata
        gc.collect()
        assert str(tasks.adaptor("base")) not in mapped_paths()  # released once the last reader let go


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_swaps_do_not_leak_maps_or_descriptors(tasks: Split) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with Foundation.open(tasks.foundation) as fnd, fnd.load("base") as model:
        model.swap("chat")
        fds = open_fds()
        for i in range(50):
            model.swap(TASKS[i % 3])
            assert model.task == TASKS[i % 3]
            for t in model.tensors.values():
                bytes(t.data)
        gc.collect()
        assert open_fds() == fds
        maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tasks.dir) in line]
        assert sorted({line.split()[-1] for line in maps}) == sorted([str(tasks.foundation), model.adaptor_path])


def mapped_paths() -> set[str]:
    return {line.split(maxsplit=5)[5] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_close_releases_the_maps(tasks: Split) -> None:
    fnd = Foundation.open(tasks.foundation)
    model = fnd.load("chat")
    key = fnd.shared.file.identity
    held = model.tensors["token_embd.weight"]  # a view the caller still holds after close
    expected = original_tensors(tasks.originals["chat"])["token_embd.weight"]
    for t in model.tensors.values():
        bytes(t.data)
    assert {str(tasks.foundation), str(tasks.adaptor("chat"))} <= mapped_paths()
    assert _SharedFoundation.registry[key] is fnd.shared

    fnd.close()
    assert key not in _SharedFoundation.registry
    for access in (lambda: model.tensors, lambda: model.metadata, lambda: model.swap("code"), lambda: fnd.tensors):
        with pytest.raises(GGUFSplitError):
            access()
    assert bytes(held.data) == expected  # a held view keeps its map alive ...
    assert held.file in mapped_paths()
    del held, t
    gc.collect()
    assert not {str(tasks.foundation), str(tasks.adaptor("chat"))} & mapped_paths()  # ... until it is dropped


def test_task_model_close_keeps_the_foundation(tasks: Split) -> None:
    with Foundation.open(tasks.foundation) as fnd:
        with fnd.load("chat") as model:
            pass
        with pytest.raises(GGUFSplitError):
            model.tensors
        assert str(tasks.adaptor("chat")) not in mapped_paths()
        assert str(tasks.foundation) in mapped_paths()
        with fnd.load("code") as again:
            assert_model_matches(again, tasks.originals["code"])
