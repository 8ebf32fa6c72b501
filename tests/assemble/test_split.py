"""split -> restore is byte-identical, and every task's files hold exactly what llama.cpp and restore need.

Every expectation is computed here, independently of gguf-split: inputs and outputs are read with gguf's
own GGUFReader, what must be shared is derived from the inputs' raw bytes, and restores are compared by
sha256 of whole files. The checks are the rules of llama.cpp's split loader: per task, the adaptor is
split 0 (`split.no` 0, `split.count` = number of files, `split.tensors.count` = number of tensors, typed
u16/u16/i32), its listed files carry `split.no` 1..k in order, and every tensor of the model is in exactly
one of them, with its original bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType as Q, GGUFValueType as V

from helpers import base_tensors, sha256, write_sharded
from gguf_split import GGUFSplitError, restore, split, verify
from gguf_split.assemble.plan import CHANGED, ONLY_HERE, RETYPED
from gguf_split.assemble.report import SplitReport

Factory = Callable[..., str]


# ---------------------------------------------------------------------------------------------------------
# reading GGUF files independently of gguf-split


@dataclass(frozen=True)
class Tensor:
    ggml_type: int
    shape: tuple[int, ...]
    data: bytes


@dataclass
class Contents:
    """A GGUF file as GGUFReader sees it: KV records (key, types, raw bytes) in order, tensors by name."""

    kvs: list[tuple[str, tuple[int, ...], bytes]]
    tensors: dict[str, Tensor]
    alignment: int
    offsets: dict[str, int]  # absolute file offsets of tensor data
    reader: GGUFReader

    def value(self, key: str) -> tuple[list[int], Any]:
        f = self.reader.fields[key]
        return [int(t) for t in f.types], f.contents()


def read_gguf(path: str | os.PathLike[str]) -> Contents:
    reader = GGUFReader(path)
    raw = Path(path).read_bytes()
    kvs = [(k, tuple(int(t) for t in f.types), b"".join(p.tobytes() for p in f.parts))
           for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    tensors = {t.name: Tensor(int(t.tensor_type), tuple(int(d) for d in t.shape),
                              raw[t.data_offset: t.data_offset + t.n_bytes]) for t in reader.tensors}
    return Contents(kvs, tensors, reader.alignment, {t.name: int(t.data_offset) for t in reader.tensors}, reader)


def is_split_key(key: str) -> bool:
    return key.startswith("gguf_split.") or key.startswith("split.")


def task_files(adaptor: str) -> list[str]:
    """The task's files in llama.cpp order, from the adaptor's records read with GGUFReader."""
    names = GGUFReader(adaptor).fields["gguf_split.files.name"].contents()
    return [adaptor, *(os.path.join(os.path.dirname(adaptor), n) for n in names)]


# ---------------------------------------------------------------------------------------------------------
# scenarios: task -> input model path


def chat_kvs(w: GGUFWriter) -> None:
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_array("chat.stop_words", ["<|end|>", "\u00e9\u4e2d", "x"])


def mixed(make: Factory) -> dict[str, str]:
    """Changed bytes, an untied output.weight in one task, a retyped and a reshaped tensor, a removed one,
    and different KVs."""
    return {
        "base": make("base"),
        "chat": make("chat", {"blk.0.attn_q.weight": 101, "output.weight": (Q.Q8_0, (64, 16), 102)}, kvs=chat_kvs),
        "code": make("code", {"blk.0.ffn_up.weight": (Q.Q6_K, (256, 8), 103),
                              "blk.1.attn_q.weight": (Q.F16, (64, 32), 104)}),
        "small": make("small", {"blk.0.attn_v.weight": None, "output_norm.weight": 105}),
    }


def overlapping(make: Factory) -> dict[str, str]:
    """Groups of tasks sharing different subsets: a two-file split would repeat tensors in adaptors."""
    return {
        "base": make("base"),
        "a": make("a", {"blk.0.attn_q.weight": 111}),
        "b": make("b", {"blk.0.attn_q.weight": 111, "blk.1.attn_q.weight": 112}),
        "c": make("c", {"blk.1.attn_q.weight": 112, "token_embd.weight": 113}),
        "d": make("d", {"token_embd.weight": 113}),
    }


def align64(make: Factory) -> dict[str, str]:
    return {
        "base": make("base", alignment=64),
        "a": make("a", {"blk.0.attn_v.weight": 201}, alignment=64),
        "b": make("b", {"blk.0.ffn_down.weight": 202, "output.weight": (Q.BF16, (64, 16), 203)}, alignment=64),
    }


def align_mixed(make: Factory) -> dict[str, str]:
    """Models with different alignments (32, 64, 128) in one split."""
    return {
        "a32": make("a32"),
        "b64": make("b64", {"blk.0.ffn_down.weight": 301}, alignment=64),
        "c128": make("c128", {"token_embd.weight": 302}, alignment=128),
    }


def single(make: Factory) -> dict[str, str]:
    return {"only": make("only")}


def merged_keys(w: GGUFWriter) -> None:
    """What `llama-gguf-split --merge` leaves behind, with a KV after them (so they are not last)."""
    w.add_uint16("split.no", 0)
    w.add_uint16("split.count", 0)
    w.add_int32("split.tensors.count", 8)
    w.add_string("general.after_split_keys", "x")


def split_count_1(make: Factory) -> dict[str, str]:
    """One split.* key (split.count = 1) in one input."""
    return {
        "base": make("base"),
        "count1": make("count1", {"blk.1.attn_q.weight": 401}, kvs=lambda w: w.add_uint16("split.count", 1)),
    }


def merged_split_keys(make: Factory) -> dict[str, str]:
    """All three split.* keys, split.count = 0, as a merged model carries them."""
    return {"base": make("base"), "merged": make("merged", {"blk.1.attn_q.weight": 402}, kvs=merged_keys)}


def padding_spans(path: str) -> list[tuple[int, int]]:
    """Spans of the file outside header records and tensor data, from GGUFReader's offsets."""
    reader = GGUFReader(path)
    last = reader.tensors[-1].field
    spans, pos = [], last.offset + sum(p.nbytes for p in last.parts)
    for t in sorted(reader.tensors, key=lambda t: t.data_offset):
        if t.data_offset > pos:
            spans.append((pos, int(t.data_offset)))
        pos = int(t.data_offset + t.n_bytes)
    return spans


def patch_padding(path: str, trailer: bytes = b"") -> str:
    """Make every padding span of `path` start with a non-zero byte, and append `trailer`."""
    spans = padding_spans(path)
    assert len(spans) >= 2, "the fixture should have header and inter-tensor padding"
    raw = bytearray(Path(path).read_bytes())
    for start, end in spans:
        raw[start] = 0xA5
        raw[end - 1] |= 0x01
    Path(path).write_bytes(bytes(raw) + trailer)
    return path


def nonzero_padding(make: Factory) -> dict[str, str]:
    return {
        "padded": patch_padding(make("padded")),
        "trailer": patch_padding(make("trailer", {"blk.0.attn_q.weight": 501}), trailer=b"\x01trailing junk"),
    }


def gguf_v2(make: Factory) -> dict[str, str]:
    v2 = make("v2", {"output_norm.weight": 601})
    raw = bytearray(Path(v2).read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    Path(v2).write_bytes(bytes(raw))
    return {"v3": make("v3"), "v2": v2}


def kv_only(make: Factory) -> dict[str, str]:
    """Same tensors, other KVs: every tensor is shared, the adaptors hold metadata only."""
    return {"base": make("base"), "chat": make("chat", kvs=chat_kvs)}


def swap_tensor_offsets(path: str, a: str, b: str) -> str:
    """Swap the data offsets of two same-size tensors in the header: the data section is then not in
    tensor-info order (legal GGUF; restore must not assume the order)."""
    reader = GGUFReader(path)
    ta, tb = (next(t for t in reader.tensors if t.name == n) for n in (a, b))
    assert ta.n_bytes == tb.n_bytes
    at = {t.name: t.field.offset + sum(p.nbytes for p in t.field.parts[:-1]) for t in (ta, tb)}
    raw = bytearray(Path(path).read_bytes())
    raw[at[a]: at[a] + 8], raw[at[b]: at[b] + 8] = raw[at[b]: at[b] + 8], raw[at[a]: at[a] + 8]
    Path(path).write_bytes(bytes(raw))
    return path


def swapped_offsets(make: Factory) -> dict[str, str]:
    swapped = swap_tensor_offsets(make("swapped", {"output_norm.weight": 701}), "blk.0.attn_norm.weight",
                                  "output_norm.weight")
    return {"base": make("base"), "swapped": swapped}


def sharded(make: Factory) -> dict[str, str]:
    """A model given as llama.cpp shards (by its first shard) beside plain models."""
    base = make("base")
    d = Path(base).parent / "sharded"
    d.mkdir()
    tensors = base_tensors()
    tensors["blk.1.attn_q.weight"] = (Q.F16, (64, 64), 801)
    first = write_sharded(d / "big", tensors, 3)
    return {"base": base, "big": first, "chat": make("chat", {"blk.0.attn_q.weight": 802})}


SCENARIOS: dict[str, Callable[[Factory], dict[str, str]]] = {
    "kv_only": kv_only, "swapped_offsets": swapped_offsets, "mixed": mixed, "overlapping": overlapping,
    "align64": align64, "align_mixed": align_mixed, "single": single, "split_count_1": split_count_1,
    "merged_split_keys": merged_split_keys, "nonzero_padding": nonzero_padding, "gguf_v2": gguf_v2,
    "sharded": sharded,
}


# ---------------------------------------------------------------------------------------------------------
# checks


def source_files(path: str) -> list[str]:
    """A model's files: itself, or all its shards (named as llama.cpp names them)."""
    c = read_gguf(path)
    keys = {k for k, _, _ in c.kvs}
    if "split.count" in keys and c.value("split.count")[1] > 1:
        n = c.value("split.count")[1]
        prefix = path[: -len("-00001-of-00003.gguf")]
        return [f"{prefix}-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    return [path]


def model_tensors(path: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for p in source_files(path):
        out.update(read_gguf(p).tensors)
    return out


def check_restores(report: SplitReport, tasks: dict[str, str], where: Path) -> None:
    where.mkdir(exist_ok=True)
    for t in report.tasks:
        r = restore(t.adaptor, where)
        originals = source_files(tasks[t.task])
        assert [os.path.basename(f.path) for f in r.files] == [os.path.basename(p) for p in originals]
        for f, p in zip(r.files, originals):
            assert sha256(f.path) == sha256(p), (t.task, p)
            assert f.size == os.path.getsize(p)


def check_task(adaptor: str, source: str) -> None:
    """llama.cpp's rules for the task's files, and every tensor with its original bytes exactly once."""
    files = task_files(adaptor)
    src_tensors = model_tensors(source)
    ad = read_gguf(adaptor)
    U16, I32 = int(V.UINT16), int(V.INT32)
    assert ad.value("split.no") == ([U16], 0)
    assert ad.value("split.count") == ([U16], len(files))
    assert ad.value("split.tensors.count") == ([I32], len(src_tensors))
    seen: dict[str, str] = {}
    for k, path in enumerate(files):
        c = ad if k == 0 else read_gguf(path)
        assert all(off % c.alignment == 0 for off in c.offsets.values()), path
        if k:
            assert c.value("split.no") == ([U16], k), path
        for name, tensor in c.tensors.items():
            assert name not in seen, f"{name} in {seen.get(name)} and {path}: llama.cpp refuses a duplicate"
            assert src_tensors.get(name) == tensor, (path, name)
            seen[name] = path
    assert set(seen) == set(src_tensors)
    # the adaptor carries the model's KVs (from its first shard), same order, same types, same bytes
    first = read_gguf(source_files(source)[0])
    assert [kv for kv in ad.kvs if not is_split_key(kv[0])] == [kv for kv in first.kvs if not is_split_key(kv[0])]


def check_contents(report: SplitReport, tasks: dict[str, str]) -> None:
    assert [t.task for t in report.tasks] == list(tasks)
    for t in report.tasks:
        check_task(t.adaptor, tasks[t.task])
        assert t.adaptor_bytes == os.path.getsize(t.adaptor)
        assert t.source_bytes == sum(os.path.getsize(p) for p in source_files(tasks[t.task]))
        assert t.model_tensors == len(model_tensors(tasks[t.task]))
    for f in report.files:
        assert f.bytes == os.path.getsize(os.path.join(report.directory, f.name))


def distinct_versions(tasks: dict[str, str]) -> dict[tuple[str, Tensor], set[str]]:
    out: dict[tuple[str, Tensor], set[str]] = {}
    for task, p in tasks.items():
        for name, t in model_tensors(p).items():
            out.setdefault((name, t), set()).add(task)
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_split_restores_byte_identical(model_factory: Factory, tmp_path: Path, scenario: str) -> None:
    tasks = SCENARIOS[scenario](model_factory)
    inputs = [p for path in tasks.values() for p in source_files(path)]
    before = {p: sha256(p) for p in inputs}
    report = split(tasks, tmp_path / "out", file_cost=0)
    assert {p: sha256(p) for p in inputs} == before, "inputs changed"
    check_contents(report, tasks)
    checked = verify([report.directory])
    assert set(checked.tasks) == set(tasks)
    assert checked.bytes == report.output_bytes
    check_restores(report, tasks, tmp_path / "restored")


@pytest.mark.parametrize("scenario", ["mixed", "overlapping", "align_mixed", "sharded"])
def test_every_distinct_tensor_is_stored_once(model_factory: Factory, tmp_path: Path, scenario: str) -> None:
    """With no per-file cost and no cap, the split stores the dedup optimum: every distinct tensor
    version exactly once (the oracle counts versions from the inputs' bytes)."""
    tasks = SCENARIOS[scenario](model_factory)
    report = split(tasks, tmp_path / "out", file_cost=0)
    stored: dict[tuple[str, Tensor], int] = {}
    for p in Path(report.directory).glob("*.gguf"):
        if p.is_symlink():
            continue
        for name, t in read_gguf(p).tensors.items():
            stored[(name, t)] = stored.get((name, t), 0) + 1
    versions = distinct_versions(tasks)
    assert set(stored) == set(versions)
    assert all(n == 1 for n in stored.values()), {k[0]: n for k, n in stored.items() if n > 1}
    assert report.dedup_optimum == sum(len(t.data) for _, t in versions)


def test_report_names_the_reasons(model_factory: Factory, tmp_path: Path) -> None:
    """What the user reads in the report: why each adaptor tensor is not shared (no cost, no cap: only
    tensors no other task has byte-identical stay in adaptors)."""
    tasks = mixed(model_factory)
    report = split(tasks, tmp_path / "out", file_cost=0)
    by_task = {t.task: t for t in report.tasks}
    versions = distinct_versions(tasks)
    for t in report.tasks:
        own = {name for (name, _), users in versions.items() if users == {t.task}}
        assert set(t.reasons) == own, t.task
    assert by_task["chat"].reasons["output.weight"] == ONLY_HERE
    assert by_task["chat"].reasons["blk.0.attn_q.weight"] == CHANGED
    assert by_task["code"].reasons["blk.0.ffn_up.weight"] == RETYPED
    assert by_task["code"].reasons["blk.1.attn_q.weight"] == RETYPED
    assert "blk.0.attn_v.weight" in by_task["small"].missing and "output.weight" in by_task["small"].missing
    assert "output.weight" not in by_task["chat"].missing


def test_default_file_cost_keeps_tiny_groups_in_adaptors(model_factory: Factory, tmp_path: Path) -> None:
    """The tiny test models save far less than 1 MiB per group: by default no shared file pays, and the
    report says nothing is shared; the split still restores."""
    tasks = overlapping(model_factory)
    report = split(tasks, tmp_path / "out")
    assert not report.shares_anything
    assert all(f.kind == "hole" or not f.tensors for f in report.files)
    check_contents(report, tasks)
    check_restores(report, tasks, tmp_path / "restored")


# ---------------------------------------------------------------------------------------------------------
# verify


def flip_tensor_byte(path: str, tensor: str | None = None) -> str:
    """Flip one byte in the middle of a tensor (the first one by default); return the tensor's name."""
    c = read_gguf(path)
    name = tensor or next(iter(c.tensors))
    at = c.offsets[name] + len(c.tensors[name].data) // 2
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    return name


@pytest.fixture
def mixed_split(model_factory: Factory, tmp_path: Path) -> tuple[dict[str, str], SplitReport]:
    tasks = mixed(model_factory)
    return tasks, split(tasks, tmp_path / "out", file_cost=0)


@pytest.mark.parametrize("which", ["shared", "adaptor"])
def test_verify_names_file_and_tensor_of_a_flipped_byte(mixed_split: tuple[dict[str, str], SplitReport],
                                                        which: str) -> None:
    _, report = mixed_split
    verify([report.directory])
    shared = next(f for f in report.files if f.tensors)
    victim = os.path.join(report.directory, shared.name) if which == "shared" else report.tasks[1].adaptor
    name = flip_tensor_byte(victim)
    with pytest.raises(GGUFSplitError) as err:
        verify([report.directory])
    assert os.path.samefile(err.value.path, victim)
    assert repr(name) in err.value.problem
    # restore refuses too, rather than write a model that differs from the original
    task = report.tasks[1] if which == "adaptor" else next(t for t in report.tasks if shared.name in t.files)
    out = Path(report.directory).parent / "restored.gguf"
    with pytest.raises(GGUFSplitError):
        restore(task.adaptor, out)
    assert not out.exists()


def test_shared_file_of_another_split_is_refused(model_factory: Factory, tmp_path: Path) -> None:
    """A shared file from another split under the recorded name (copied over it): verify, restore and the
    loader refuse it, naming the file, where llama.cpp alone would load it."""
    base, chat = model_factory("base"), model_factory("chat", {"blk.0.attn_q.weight": 11})
    other = model_factory("other", {"token_embd.weight": 12})
    one = split({"base": base, "chat": chat}, tmp_path / "one", file_cost=0)
    two = split({"base": base, "other": other}, tmp_path / "two", file_cost=0)
    # cut into pieces, the two splits have identical pieces too (same content, same name: harmless to copy);
    # take a piece of `one` that `two` does not have, and the piece of `two` at its position
    f_one = next(f for f in one.files if f.kind == "foundation" and f.name not in {g.name for g in two.files})
    f_two = next(f for f in two.files if f.kind == "foundation" and f.position == f_one.position)
    assert f_one.name != f_two.name
    target = Path(one.directory) / f_one.name
    target.write_bytes((Path(two.directory) / f_two.name).read_bytes())
    with pytest.raises(GGUFSplitError) as err:
        verify([one.directory])
    assert err.value.path == str(target) and "another split" in err.value.problem
    with pytest.raises(GGUFSplitError):
        restore(one.tasks[1].adaptor, tmp_path / "mix.gguf")
    assert not (tmp_path / "mix.gguf").exists()
    from gguf_split import open_split

    with pytest.raises(GGUFSplitError), open_split(one.directory) as s:
        s.load("chat")


# ---------------------------------------------------------------------------------------------------------
# links, threads, re-splits


def test_link_makes_llama_cpp_split_names(mixed_split: tuple[dict[str, str], SplitReport], tmp_path: Path) -> None:
    tasks, _ = mixed_split
    report = split(tasks, tmp_path / "linked", link=True, file_cost=0)
    out = Path(report.directory)
    for t in report.tasks:
        files = task_files(t.adaptor)
        n = len(files)
        links = [out / f"{t.task}-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
        assert t.links == [str(p) for p in links]
        for link, target in zip(links, files):
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
            assert link.resolve() == Path(target).resolve()


def directory_bytes(d: str | os.PathLike[str]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(d).iterdir()}


def test_thread_count_and_runs_do_not_change_output(mixed_split: tuple[dict[str, str], SplitReport],
                                                    tmp_path: Path) -> None:
    tasks, _ = mixed_split
    one = split(tasks, tmp_path / "t1", threads=1, file_cost=0)
    two = split(tasks, tmp_path / "t2", threads=2, file_cost=0)
    a, b = directory_bytes(one.directory), directory_bytes(two.directory)
    assert len(a) == len(tasks) + len(one.files)
    assert a == b


def test_force_resplit_keeps_unchanged_files_and_drops_unused_ones(model_factory: Factory, tmp_path: Path) -> None:
    """A re-split that changed one task rewrites what changed; files with the same content keep their
    inode and mtime (links and mappings stay valid); files no task uses any more are deleted."""
    tasks = overlapping(model_factory)
    out = tmp_path / "out"
    first = split(tasks, out, file_cost=0)
    stats = {f.name: os.stat(out / f.name) for f in first.files}
    tasks["d"] = model_factory("d2", {"token_embd.weight": 114})
    with pytest.raises(GGUFSplitError) as err:
        split(tasks, out, file_cost=0)
    assert "--force" in err.value.problem
    second = split(tasks, out, file_cost=0, force=True)
    names = {f.name for f in second.files}
    for f in second.files:
        if f.name in stats:
            assert f.kept
            st = os.stat(out / f.name)
            assert (st.st_ino, st.st_mtime_ns) == (stats[f.name].st_ino, stats[f.name].st_mtime_ns)
    gone = set(stats) - names
    assert gone and all(not (out / n).exists() for n in gone)
    assert set(second.removed) == gone
    check_contents(second, tasks)
    verify([out])


def test_split_refuses_to_orphan_other_tasks(model_factory: Factory, tmp_path: Path) -> None:
    tasks = overlapping(model_factory)
    out = tmp_path / "out"
    split(tasks, out, file_cost=0)
    before = directory_bytes(out)
    for force in (False, True):
        with pytest.raises(GGUFSplitError) as err:
            split({"a": tasks["a"], "b": tasks["b"]}, out, force=force)
        assert "other tasks" in err.value.problem and "remove" in err.value.problem
    assert directory_bytes(out) == before


def test_dry_run_writes_nothing(model_factory: Factory, tmp_path: Path) -> None:
    tasks = mixed(model_factory)
    dry = split(tasks, tmp_path / "out", dry_run=True, file_cost=0)
    assert not (tmp_path / "out").exists()
    real = split(tasks, tmp_path / "out", file_cost=0)
    assert [(f.name, f.bytes, f.tasks) for f in dry.files] == [(f.name, f.bytes, f.tasks) for f in real.files]
    assert [(t.task, t.files, t.tensors) for t in dry.tasks] == [(t.task, t.files, t.tensors) for t in real.tasks]


# ---------------------------------------------------------------------------------------------------------
# sharded inputs


def test_lone_or_foreign_shards_are_refused(tmp_path: Path) -> None:
    tensors = base_tensors()
    first = write_sharded(tmp_path / "m", tensors, 3)
    second = first.replace("-00001-of-", "-00002-of-")
    with pytest.raises(GGUFSplitError) as err:
        split({"x": second}, tmp_path / "o1")
    assert "shard 2 of a 3-file model" in err.value.problem and "first shard" in err.value.problem
    third = first.replace("-00001-of-", "-00003-of-")
    os.rename(third, third + ".away")
    with pytest.raises(GGUFSplitError) as err:
        split({"x": first}, tmp_path / "o2")
    assert err.value.path == third and "missing" in err.value.problem
    os.rename(third + ".away", third)
    other = write_sharded(tmp_path / "other", {**tensors, "extra.weight": (Q.F32, (64,), 9)}, 3)
    os.replace(other.replace("-00001-of-", "-00003-of-"), third)
    with pytest.raises(GGUFSplitError) as err:
        split({"x": first}, tmp_path / "o3")
    assert err.value.path == third and "another model" in err.value.problem
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))
