"""split -> restore is byte-identical, and the split files hold exactly what llama.cpp and restore need.

Every expectation is computed here, independently of gguf-split: the inputs and outputs are read with
gguf's own GGUFReader, the set of shared tensors is derived from the inputs' raw bytes, and restores are
compared by sha256 of whole files.
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

from conftest import sha256
from gguf_split import GGUFSplitError, restore, split, verify
from gguf_split.plan import CHANGED, RETYPED
from gguf_split.split import SplitReport

ONLY_HERE = "not in every model"  # the reason the split report gives for a tensor some tasks lack
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

    def kv_types(self, key: str) -> tuple[int, ...]:
        return next(t for k, t, _ in self.kvs if k == key)


def read_gguf(path: str | os.PathLike[str]) -> Contents:
    reader = GGUFReader(path)
    raw = Path(path).read_bytes()
    kvs = [(k, tuple(int(t) for t in f.types), b"".join(p.tobytes() for p in f.parts))
           for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    tensors = {t.name: Tensor(int(t.tensor_type), tuple(int(d) for d in t.shape),
                              raw[t.data_offset : t.data_offset + t.n_bytes]) for t in reader.tensors}
    return Contents(kvs, tensors, reader.alignment, {t.name: int(t.data_offset) for t in reader.tensors})


def kv_value(path: str | os.PathLike[str], key: str) -> tuple[list[int], Any]:
    """(value types, value) of one KV, through GGUFReader."""
    f = GGUFReader(path).fields[key]
    return [int(t) for t in f.types], f.contents()


def is_split_key(key: str) -> bool:
    return key.startswith("gguf_split.") or key.startswith("split.")


# ---------------------------------------------------------------------------------------------------------
# expectations derived from the inputs alone


def expected_foundation(inputs: dict[str, Contents]) -> set[str]:
    """Names of tensors identical (type, shape, bytes) in every input."""
    first, *rest = inputs.values()
    return {n for n, t in first.tensors.items() if all(m.tensors.get(n) == t for m in rest)}


def expected_reasons(task: str, inputs: dict[str, Contents], shared: set[str]) -> dict[str, str]:
    own = inputs[task].tensors
    out = {}
    for name, t in own.items():
        if name in shared:
            continue
        others = [m.tensors.get(name) for k, m in inputs.items() if k != task]
        if any(o is None for o in others):
            out[name] = ONLY_HERE
        elif any((o.ggml_type, o.shape) != (t.ggml_type, t.shape) for o in others if o is not None):
            out[name] = RETYPED
        else:
            out[name] = CHANGED
    return out


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
    return {
        "base": make("base"),
        "merged": make("merged", {"blk.1.attn_q.weight": 402}, kvs=merged_keys),
    }


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
    raw[at[a] : at[a] + 8], raw[at[b] : at[b] + 8] = raw[at[b] : at[b] + 8], raw[at[a] : at[a] + 8]
    Path(path).write_bytes(bytes(raw))
    return path


def swapped_offsets(make: Factory) -> dict[str, str]:
    swapped = swap_tensor_offsets(make("swapped", {"output_norm.weight": 701}), "blk.0.attn_norm.weight",
                                  "output_norm.weight")
    return {"base": make("base"), "swapped": swapped}


SCENARIOS: dict[str, Callable[[Factory], dict[str, str]]] = {
    "kv_only": kv_only, "swapped_offsets": swapped_offsets,
    "mixed": mixed, "align64": align64, "align_mixed": align_mixed, "single": single,
    "split_count_1": split_count_1, "merged_split_keys": merged_split_keys, "nonzero_padding": nonzero_padding, "gguf_v2": gguf_v2,
}


# ---------------------------------------------------------------------------------------------------------
# checks


def check_restores(report: SplitReport, tasks: dict[str, str], where: Path) -> None:
    for t in report.tasks:
        out = where / f"{t.task}.gguf"
        r = restore(t.adaptor, out)
        assert sha256(out) == sha256(tasks[t.task]), t.task
        assert r.size == os.path.getsize(tasks[t.task])


def check_split_keys(report: SplitReport, inputs: dict[str, Contents]) -> None:
    """llama.cpp's split metadata, value types included (it reads them with typed getters)."""
    U16, I32 = int(V.UINT16), int(V.INT32)
    assert kv_value(report.foundation, "split.no") == ([U16], 1)
    for t in report.tasks:
        assert kv_value(t.adaptor, "split.no") == ([U16], 0)
        assert kv_value(t.adaptor, "split.count") == ([U16], 2)
        assert kv_value(t.adaptor, "split.tensors.count") == ([I32], len(inputs[t.task].tensors))


def check_aligned(c: Contents, what: str) -> None:
    assert all(off % c.alignment == 0 for off in c.offsets.values()), what


def check_contents(report: SplitReport, tasks: dict[str, str]) -> None:
    inputs = {task: read_gguf(p) for task, p in tasks.items()}
    shared = expected_foundation(inputs)
    found = read_gguf(report.foundation)
    check_aligned(found, "foundation")
    assert set(found.tensors) == shared
    assert report.foundation_tensors == len(shared)
    assert report.foundation_bytes == os.path.getsize(report.foundation)
    assert [t.task for t in report.tasks] == list(tasks)
    for t in report.tasks:
        src, ad = inputs[t.task], read_gguf(t.adaptor)
        check_aligned(ad, t.adaptor)
        assert ad.alignment == src.alignment
        assert not set(ad.tensors) & set(found.tensors), "a tensor name in both splits: llama.cpp refuses it"
        assert set(ad.tensors) == set(src.tensors) - shared
        for name, tensor in src.tensors.items():
            assert (ad.tensors.get(name) or found.tensors[name]) == tensor, (t.task, name)
        # the adaptor carries the model's KVs, same order, same types, same bytes
        assert [kv for kv in ad.kvs if not is_split_key(kv[0])] == [kv for kv in src.kvs if not is_split_key(kv[0])]
        # the report
        assert t.tensors == len(ad.tensors)
        assert t.tensor_bytes == sum(len(x.data) for x in ad.tensors.values())
        assert t.adaptor_bytes == os.path.getsize(t.adaptor)
        assert t.source_bytes == os.path.getsize(tasks[t.task])
        assert t.model_tensors == len(src.tensors)
        assert t.reasons == expected_reasons(t.task, inputs, shared)
        others = set().union(*(m.tensors for m in inputs.values()))
        assert set(t.missing) == others - set(src.tensors)
    check_split_keys(report, inputs)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_split_restores_byte_identical(model_factory: Factory, tmp_path: Path, scenario: str) -> None:
    tasks = SCENARIOS[scenario](model_factory)
    before = {p: sha256(p) for p in tasks.values()}
    report = split(tasks, tmp_path / "out")
    assert {p: sha256(p) for p in tasks.values()} == before, "inputs changed"
    check_contents(report, tasks)
    checked = verify(report.foundation, [t.adaptor for t in report.tasks])
    assert checked.tensors == report.foundation_tensors + sum(t.tensors for t in report.tasks)
    assert set(checked.adaptors) == set(tasks)
    check_restores(report, tasks, tmp_path / "restored")


def test_mixed_report_names_the_reasons(model_factory: Factory, tmp_path: Path) -> None:
    """Spelled out for the mixed scenario: what the user reads in the report."""
    report = split(mixed(model_factory), tmp_path / "out")
    by_task = {t.task: t for t in report.tasks}
    assert by_task["chat"].reasons["output.weight"] == ONLY_HERE
    assert by_task["chat"].reasons["blk.0.attn_q.weight"] == CHANGED
    assert by_task["code"].reasons["blk.0.ffn_up.weight"] == RETYPED
    assert by_task["code"].reasons["blk.1.attn_q.weight"] == RETYPED
    assert by_task["base"].reasons["blk.0.attn_v.weight"] == ONLY_HERE  # "small" removed it
    assert "blk.0.attn_v.weight" in by_task["small"].missing and "output.weight" in by_task["small"].missing
    assert "output.weight" not in by_task["chat"].missing
    # base keeps attn_v (small lacks it), attn_q and the F16 q (chat and code changed them) and ffn_up
    # (code retyped it) and output_norm (small changed it)
    assert by_task["base"].tensors == 5


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
    return tasks, split(tasks, tmp_path / "out")


@pytest.mark.parametrize("which", ["foundation", "adaptor"])
def test_verify_names_file_and_tensor_of_a_flipped_byte(mixed_split: tuple[dict[str, str], SplitReport],
                                                        which: str) -> None:
    _, report = mixed_split
    adaptors = [t.adaptor for t in report.tasks]
    verify(report.foundation, adaptors)
    victim = report.foundation if which == "foundation" else report.tasks[1].adaptor
    name = flip_tensor_byte(victim)
    with pytest.raises(GGUFSplitError) as err:
        verify(report.foundation, adaptors)
    assert os.path.samefile(err.value.path, victim)
    assert repr(name) in err.value.problem
    # restore refuses too, rather than write a model that differs from the original
    task = report.tasks[1] if which == "adaptor" else report.tasks[0]
    out = Path(report.directory).parent / "restored.gguf"
    with pytest.raises(GGUFSplitError):
        restore(task.adaptor, out)
    assert not out.exists()


def test_verify_refuses_foundation_of_another_split(model_factory: Factory, tmp_path: Path) -> None:
    base, chat = model_factory("base"), model_factory("chat", {"blk.0.attn_q.weight": 11})
    other = model_factory("other", {"token_embd.weight": 12})
    one = split({"base": base, "chat": chat}, tmp_path / "one")
    two = split({"base": base, "other": other}, tmp_path / "two")
    assert one.foundation_id != two.foundation_id
    foreign = two.tasks[0].adaptor
    with pytest.raises(GGUFSplitError) as err:
        verify(one.foundation, [foreign])
    assert err.value.path == foreign
    assert "foundation" in err.value.problem
    with pytest.raises(GGUFSplitError):
        restore(foreign, tmp_path / "mix.gguf", foundation=one.foundation)
    assert not (tmp_path / "mix.gguf").exists()


# ---------------------------------------------------------------------------------------------------------
# links and threads


def test_link_makes_llama_cpp_split_names(mixed_split: tuple[dict[str, str], SplitReport], tmp_path: Path) -> None:
    tasks, _ = mixed_split
    report = split(tasks, tmp_path / "linked", link=True)
    out = Path(report.directory)
    for t in report.tasks:
        first, second = out / f"{t.task}-00001-of-00002.gguf", out / f"{t.task}-00002-of-00002.gguf"
        assert os.readlink(first) == f"adaptor-{t.task}.gguf"
        assert os.readlink(second) == "foundation.gguf"
        assert first.resolve() == Path(t.adaptor).resolve() and second.resolve() == Path(report.foundation).resolve()
        assert t.links == [str(first), str(second)]


def directory_bytes(d: str | os.PathLike[str]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(d).iterdir()}


def test_thread_count_does_not_change_output(mixed_split: tuple[dict[str, str], SplitReport], tmp_path: Path) -> None:
    tasks, _ = mixed_split
    one = split(tasks, tmp_path / "t1", threads=1)
    two = split(tasks, tmp_path / "t2", threads=2)
    a, b = directory_bytes(one.directory), directory_bytes(two.directory)
    assert len(a) == 1 + len(tasks)
    assert a == b
