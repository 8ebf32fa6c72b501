"""Fuzzing with oracles: mutated models, mutated gguf-split records and mutated commit journals.

Why: every count, length, offset and record gguf-split reads comes from a file that may be truncated,
corrupted or hostile. The promise is one error naming the file, never a struct.error, IndexError,
MemoryError, RecursionError, UnicodeDecodeError, ValueError, OverflowError or a hang. Not crashing is not
enough, so each target has an oracle:
- a mutated model: the reader's parse of the bytes and of the file agree; `split` of it either raises
  GGUFSplitError and leaves no output directory, or succeeds, and then the split verifies and restores
  every task to its input bytes;
- a mutated adaptor or shared file (anywhere in the header, or only the contents of gguf-split's records,
  with the seal left broken or recomputed as a forger would): plan_restore, verify, info and the loader
  raise GGUFSplitError or accept it; when verify accepts it, restore gives the original byte for byte or
  refuses, and never leaves a temporary file;
- a mutated commit journal (bytes, or well-formed JSON holding hostile names): readers and a writer raise
  GGUFSplitError or honour it; nothing outside the split directory is touched; when verify accepts the
  directory, restore gives the original byte for byte or refuses.
The inputs are small valid files (conftest.write_model, and a real split of two of them) mutated by random
bit flips, byte insertions and deletions, truncations, and overwrites of the integer fields (lengths,
counts, types, dims, offsets: found by parsing) with huge or random values.

The mutation engine here is shared with bench/fuzz_header.py, the long-running version (a time budget,
distinct messages, a memory limit); these tests keep to a few hundred derandomized examples.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import struct
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable

import pytest
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import write_model
from gguf_split import open_split, restore, split, verify
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import GGUFFile, Header, decode_value, iter_gaps, parse_header, parse_tensor_infos
from gguf_split.splitdir.info import describe, savings, task_files
from gguf_split.runtime.loader import open_model
from gguf_split.format.names import JOURNAL, TMP_SUFFIX
from gguf_split.format.records import OWN_PREFIX
from gguf_split.splitdir.restore import plan_restore
from gguf_split.splitdir.directory import open_task
from gguf_split.assemble.update import remove

SLOW = 0.5  # seconds: no single input may take longer (a loop on a claimed count would take forever)
SLOW_WRITE = 5.0  # the same for targets that write and fsync a split (a loaded disk stalls fsync for a while)
HUGE_VALUES = (0, 1, 7, 13, 255, 1 << 15, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 60,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 32, (1 << 64) - 1)
KINDS = ("flip", "insert", "delete", "truncate", "int")

# ---------------------------------------------------------------------------------------------------------
# Mutations


@dataclass(frozen=True)
class Op:
    """One mutation. `pos` picks a byte of the focus spans (or, for "int", one of the integer fields),
    modulo their size, so any int is a valid draw."""

    kind: str  # flip | insert | delete | truncate | int
    pos: int
    arg: int = 0  # flip: bit; delete: byte count; int: the value written (masked to the field's width)
    data: bytes = b""  # insert: the bytes


Field = tuple[int, int]  # (offset, width in bytes) of an integer field
Span = tuple[int, int]


def _value_fields(data: bytes, vtype: int, pos: int, out: list[Field]) -> int:
    """Append the integer fields of the value at `pos` (string lengths, array types and counts); return
    its end. `data` is a valid file, so no bounds checks."""
    if vtype == V.STRING:
        out.append((pos, 8))
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
    if vtype != V.ARRAY:
        return pos + struct.calcsize({V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I",
                                      V.INT32: "i", V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q",
                                      V.FLOAT64: "d"}[V(vtype)])
    sub, count = struct.unpack_from("<IQ", data, pos)
    out += [(pos, 4), (pos + 4, 8)]
    pos += 12
    for _ in range(count):
        pos = _value_fields(data, sub, pos, out)
    return pos


def int_fields(data: bytes, h: Header) -> list[Field]:
    """Every integer field of a parsed header: prefix, KV key lengths, types, string lengths, array types
    and counts (nested too), tensor name lengths, n_dims, dims, ggml types, offsets."""
    out: list[Field] = [(4, 4), (8, 8), (16, 8)]
    for kv in h.kvs:
        out += [(kv.start, 8), (kv.value_start - 4, 4)]
        _value_fields(data, kv.vtype, kv.value_start, out)
    for t in h.tensors:
        out += _tensor_info_fields(t.start, len(t.name.encode()), len(t.shape))
    return out


def _tensor_info_fields(start: int, name_len: int, n_dims: int) -> list[Field]:
    at = start + 8 + name_len
    return [(start, 8), (at, 4), *((at + 4 + 8 * i, 8) for i in range(n_dims)),
            (at + 4 + 8 * n_dims, 4), (at + 4 + 8 * n_dims + 4, 8)]


def record_fields(data: bytes, h: Header) -> list[Field]:
    """Integer fields inside gguf-split's blob records (an adaptor's original tensor infos, replaced KVs,
    other shards' KVs and non-zero padding), on top of the header's own."""
    out: list[Field] = []
    for kv in h.kvs:
        body = kv.value_start + 12
        if kv.key == "gguf_split.source.tensor_infos":
            for t in parse_tensor_infos(data[body : kv.end], "<blob>", 1):
                out += _tensor_info_fields(body + t.start, len(t.name.encode()), len(t.shape))
        elif kv.key == "gguf_split.source.gaps":
            pos = body  # (u32 source, u64 offset, u64 length, bytes) per run
            while pos < kv.end:
                out += [(pos, 4), (pos + 4, 8), (pos + 12, 8)]
                pos += 20 + struct.unpack_from("<Q", data, pos + 12)[0]
        elif kv.key == "gguf_split.source.replaced_kvs":
            pos = body
            while pos < kv.end:
                out.append((pos, 4))
                key_len = struct.unpack_from("<Q", data, pos + 4)[0]
                out += [(pos + 4, 8), (pos + 12 + key_len, 4)]
                vtype = struct.unpack_from("<I", data, pos + 12 + key_len)[0]
                pos = _value_fields(data, vtype, pos + 16 + key_len, out)
    return out


def _own(h: Header) -> list:
    return [kv for kv in h.kvs if kv.key.startswith(OWN_PREFIX) or kv.key.startswith("split.")]


def record_spans(h: Header) -> list[Span]:
    """Byte spans of gguf-split's own records (`gguf_split.*` and `split.*` KVs)."""
    return [(kv.start, kv.end) for kv in _own(h)]


def record_values(h: Header) -> tuple[list[Field], list[Span]]:
    """The contents of gguf-split's records, without their length fields: (scalar values as int fields,
    byte spans of string texts, blob bodies and scalars). Mutating only these keeps the header parseable,
    so the mutation reaches the code that interprets the records."""
    widths = {V.UINT16: 2, V.UINT32: 4, V.INT32: 4, V.UINT64: 8}
    fields = [(kv.value_start, widths[kv.vtype]) for kv in _own(h) if kv.vtype in widths]
    body = {V.STRING: 8, V.ARRAY: 12}
    spans = [(kv.value_start + body.get(kv.vtype, 0), kv.end) for kv in _own(h)]
    return fields, [(s, e) for s, e in spans if e > s]


def model_values(h: Header) -> tuple[list[Field], list[Span]]:
    """A model's contents that keep it parseable when changed in place: scalar KV values (as int fields),
    string texts, padding (non-zero padding must come back byte for byte) and tensor data."""
    widths = {V.UINT16: 2, V.UINT32: 4, V.INT32: 4, V.UINT64: 8, V.INT64: 8}
    fields = [(kv.value_start, widths[kv.vtype]) for kv in h.kvs if kv.vtype in widths]
    spans = [(kv.value_start + 8, kv.end) for kv in h.kvs if kv.vtype == V.STRING and kv.end > kv.value_start + 8]
    spans += [(s, e) for s, e in iter_gaps(h) if e > s]
    spans += [(h.data_start + t.offset, h.data_start + t.offset + t.nbytes) for t in h.tensors]
    return fields, spans


def _pick(spans: list[Span], pos: int) -> int:
    total = sum(e - s for s, e in spans)
    p = pos % total
    for s, e in spans:
        if p < e - s:
            return s + p
        p -= e - s
    raise AssertionError("unreachable")


_INT_FORMATS = {2: "<H", 4: "<I", 8: "<Q"}


def mutate(data: bytes, ops: Iterable[Op], fields: list[Field], focus: list[Span], *,
           keep_length: bool = False) -> bytes:
    """Apply `ops` in order. Byte positions fall in `focus`; later ops see earlier ones' shifts.
    `keep_length` skips the ops that move bytes (so a record's contents change, not the header's shape)."""
    out = bytearray(data)
    for op in ops:
        at = min(_pick(focus, op.pos), len(out))
        if op.kind == "flip" and at < len(out):
            out[at] ^= 1 << (op.arg % 8)
        elif op.kind == "int":
            off, width = fields[op.pos % len(fields)]
            if off + width <= len(out):
                struct.pack_into(_INT_FORMATS[width], out, off, op.arg & ((1 << (8 * width)) - 1))
        elif keep_length:
            continue
        elif op.kind == "insert":
            out[at:at] = op.data
        elif op.kind == "delete":
            del out[at : at + max(1, op.arg % 64)]
        elif op.kind == "truncate":
            del out[at:]
    return bytes(out)


def random_op(rng: random.Random) -> Op:
    """The bench's draw of one Op (the tests draw them with hypothesis: ops())."""
    kind = rng.choice(KINDS)
    value = rng.choice(HUGE_VALUES) if rng.random() < 0.7 else rng.getrandbits(64)
    arg = {"flip": rng.randrange(8), "delete": rng.randrange(1, 64), "int": value}.get(kind, 0)
    data = rng.randbytes(rng.randrange(1, 17)) if kind == "insert" else b""
    return Op(kind, rng.getrandbits(32), arg, data)


def ops() -> st.SearchStrategy[list[Op]]:
    pos = st.integers(0, (1 << 32) - 1)
    value = st.one_of(st.sampled_from(HUGE_VALUES), st.integers(0, (1 << 64) - 1))
    one = st.one_of(
        st.builds(Op, st.just("flip"), pos, st.integers(0, 7)),
        st.builds(Op, st.just("insert"), pos, st.just(0), st.binary(min_size=1, max_size=16)),
        st.builds(Op, st.just("delete"), pos, st.integers(1, 63)),
        st.builds(Op, st.just("truncate"), pos),
        st.builds(Op, st.just("int"), pos, value),
    )
    return st.lists(one, min_size=1, max_size=4)


# ---------------------------------------------------------------------------------------------------------
# Targets: each returns the GGUFSplitError problem it got (None: the input was accepted); anything else
# escapes to the caller, which is the bug being looked for. A broken oracle is an AssertionError.


def _problem(fn: Callable[[], object]) -> str | None:
    try:
        fn()
    except GGUFSplitError as e:
        return e.problem
    return None


def write_new(path: Path, data: bytes) -> Path:
    """Write through a fresh inode (the loader caches open files by device and inode)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _read_everything(path: Path) -> None:
    """What `info` and the loader do with a plain GGUF: describe it, decode every value, view every tensor."""
    describe(path)
    with open_model(path) as m:
        for key in m.metadata:
            m.metadata[key]
        for name in m.tensors:
            m.tensors[name].data


def exercise_reader(data: bytes, path: Path) -> str | None:
    """parse_header on the bytes; GGUFFile, info and the loader on the same bytes as a file. The two
    parses must agree."""
    def from_bytes() -> None:
        h = parse_header(data, len(data), "<bytes>")
        for kv in h.kvs:
            decode_value(data, kv.vtype, kv.value_start)
        list(iter_gaps(h))

    in_memory = _problem(from_bytes)
    write_new(path, data)
    on_disk = _problem(lambda: _read_everything(path))
    assert (in_memory is None) == (on_disk is None), (in_memory, on_disk)
    return in_memory or on_disk


def no_temporaries(directory: Path) -> None:
    left = [n for n in os.listdir(directory) if n.endswith(TMP_SUFFIX)]
    assert not left, f"temporary files left in {directory}: {left}"


def exercise_split(corpus: "Corpus", model: bytes, directory: Path) -> str | None:
    """Split a good model `a` and the (mutated) model `b`. Oracle: a GGUFSplitError leaves no output
    directory; a split that succeeds verifies, and restores both tasks to their input bytes."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    good = directory / "a.gguf"
    good.write_bytes(corpus.model_a)
    bad = directory / "b.gguf"
    bad.write_bytes(model)
    out = directory / "out"
    problem = _problem(lambda: split({"a": good, "b": bad}, out, file_cost=0, threads=1))
    if problem is not None:
        assert not out.exists(), f"a refused split left {sorted(os.listdir(out))}"
        return problem
    verify([out], threads=1)
    restored = directory / "restored"
    restored.mkdir()
    for task, src in (("a", good), ("b", bad)):
        r = restore(out, restored, task=task)
        assert Path(r.output).read_bytes() == src.read_bytes(), f"task {task} restored to other bytes"
    no_temporaries(out)
    return None


def _load_task(directory: Path, task: str = "a") -> None:
    with open_split(directory) as s:
        model = s.load(task)
        for key in model.metadata:
            model.metadata[key]
        for name in model.tensors:
            model.tensors[name].data


def _plan(adaptor: Path) -> None:
    with open_task(adaptor) as tf:
        plan_restore(tf)


def restore_oracle(corpus: "Corpus", directory: Path, out: Path) -> str | None:
    """restore of task a: refused (GGUFSplitError, nothing left in `out`), or the original byte for byte."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    reports = []
    problem = _problem(lambda: reports.append(restore(directory, out, task="a")))
    if problem is not None:
        assert os.listdir(out) == [], f"a refused restore left {os.listdir(out)}"
        return problem
    # the original's name comes from a record (a resealed forgery may rename it, within `out`)
    written = Path(reports[0].output)
    assert os.listdir(out) == [written.name] and written.parent == out, (os.listdir(out), written)
    assert written.read_bytes() == corpus.original_a, "restore wrote other bytes than the original"
    return None


def exercise_split_files(corpus: "Corpus", adaptor: bytes, shared: bytes, directory: Path) -> list[str | None]:
    """plan_restore, verify, info and the runtime loader on a split directory holding adaptor-a and its
    shared file, either mutated. Oracle: when verify accepts them, restore gives the original or refuses."""
    directory.mkdir(parents=True, exist_ok=True)
    a = write_new(directory / "adaptor-a.gguf", adaptor)
    f = write_new(directory / corpus.shared_name, shared)
    verified = _problem(lambda: verify([directory], threads=1))
    problems = [_problem(lambda: _plan(a)), verified, _problem(lambda: _load_task(directory)),
                _problem(lambda: describe(a)), _problem(lambda: describe(f)), _problem(lambda: savings(directory)),
                _problem(lambda: task_files(directory, "a"))]
    if verified is None:
        problems.append(restore_oracle(corpus, directory, directory.parent / "restored"))
    return problems


def reseal(data: bytes) -> bytes:
    """Recompute a gguf-split header's seal after a mutation (what a forger would do), so verify gets past
    it to the records; unchanged if the header no longer parses."""
    import xxhash

    try:
        h = parse_header(data, len(data), "<bytes>")
    except GGUFSplitError:
        return data
    if not h.kvs or h.kvs[0].key != "gguf_split.header_xxh3" or h.kvs[0].end - h.kvs[0].value_start != 40:
        return data
    at = h.kvs[0].value_start + 8
    header = bytearray(data[: h.tensor_info_end])
    header[at : at + 32] = b"0" * 32
    out = bytearray(data)
    out[at : at + 32] = xxhash.xxh3_128(bytes(header)).hexdigest().encode()
    return bytes(out)


# The commit journal: a pending commit (adaptor-a.gguf renamed to a temporary, the journal renaming it
# back) mutated as bytes, or replaced by well-formed JSON holding hostile names.

SENTINEL = "outside.txt"  # beside the split directory: no journal may touch it
HOSTILE_NAMES = ("", ".", "..", "../outside.txt", "/etc/passwd", "a\0b", "sub/x.gguf", "adaptor-a.gguf",
                 "adaptor-b.gguf", "x" * 300, "\\\\evil", ".adaptor-a.gguf.1.abcd" + TMP_SUFFIX,
                 "." + TMP_SUFFIX, "../." + TMP_SUFFIX, "\udcff.gguf", "\n.gguf")


def pending_journal(corpus: "Corpus") -> tuple[str, bytes]:
    """(temporary name, journal bytes) of a commit that was switched but not applied."""
    tmp = f".adaptor-a.gguf.4242.0badf00d{TMP_SUFFIX}"
    body = {"gguf_split_journal": 1, "renames": [[tmp, "adaptor-a.gguf"]], "deletes": ["hole-9.gguf"]}
    return tmp, json.dumps(body, indent=1).encode()


def exercise_journal(corpus: "Corpus", journal: bytes, root: Path) -> list[str | None]:
    """A fresh copy of the split with adaptor-a as a pending rename and `journal` as its journal: readers
    (verify, info, restore, the loader), then a writer (remove b: it first rolls the journal forward).
    Oracles: only GGUFSplitError; nothing outside the directory changes; when verify accepts the
    directory, restore gives the original byte for byte or refuses."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    d = root / "split"
    shutil.copytree(corpus.split_dir, d)
    (root / SENTINEL).write_text("keep")
    tmp, _ = pending_journal(corpus)
    os.replace(d / "adaptor-a.gguf", d / tmp)
    (d / JOURNAL).write_bytes(journal)
    before_outside = sorted(os.listdir(root))
    verified = _problem(lambda: verify([d], threads=1))
    problems = [verified, _problem(lambda: savings(d)), _problem(lambda: _load_task(d)),
                _problem(lambda: task_files(d, "a"))]
    if verified is None:
        problems.append(restore_oracle(corpus, d, root / "restored"))
        shutil.rmtree(root / "restored")
    problems.append(_problem(lambda: remove(d, ["b"])))
    assert sorted(os.listdir(root)) == before_outside, "a journal changed files outside the split directory"
    assert (root / SENTINEL).read_text() == "keep"
    return problems


def journals() -> st.SearchStrategy[object]:
    """Well-formed JSON journals, from valid to hostile: names from HOSTILE_NAMES and the split's own files,
    wrong types and shapes, other versions."""
    names = st.sampled_from(HOSTILE_NAMES + ("hole-9.gguf", "adaptor-a.gguf", ".adaptor-a.gguf.4242.0badf00d"
                                             + TMP_SUFFIX))
    scalar = st.one_of(names, st.integers(-2, 2), st.none(), st.booleans())
    anything = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=3), inner, max_size=2)),
                            max_leaves=6)
    pair = st.one_of(st.lists(names, min_size=2, max_size=2), anything)
    return st.one_of(
        st.fixed_dictionaries({"gguf_split_journal": st.one_of(st.just(1), scalar),
                               "renames": st.one_of(st.lists(pair, max_size=3), anything),
                               "deletes": st.one_of(st.lists(names, max_size=3), anything)}),
        anything,
    )


# ---------------------------------------------------------------------------------------------------------
# Inputs


def fuzz_tensors(seed: int) -> dict:
    """Tiny tensors, so nearly every byte of the file is header."""
    return {"token_embd.weight": (Q.Q8_0, (32, 2), seed), "blk.0.attn_norm.weight": (Q.F32, (32,), seed + 1),
            "blk.0.attn_q.weight": (Q.F16, (32, 2), seed + 2), "output_norm.weight": (Q.F32, (8,), seed + 3)}


def _with_split_keys(w) -> None:  # noqa: ANN001 - a GGUFWriter
    w.add_uint16("split.no", 0)  # a single-file "split": not a shard, and the adaptor records it as replaced
    w.add_uint16("split.count", 1)


@dataclass(frozen=True)
class Target:
    """One file to mutate: where `shape` mutations go (anything, header-wide) and where `contents`
    mutations go (the values of gguf-split's records only, lengths kept)."""

    data: bytes
    fields: list[Field]
    focus: list[Span]
    value_fields: list[Field]
    value_focus: list[Span]

    def mutated(self, mutation: list[Op], *, contents_only: bool) -> bytes:
        if contents_only and self.value_focus:
            return mutate(self.data, mutation, self.value_fields + self.fields_in(self.value_focus), self.value_focus,
                          keep_length=True)
        return mutate(self.data, mutation, self.fields, self.focus)

    def fields_in(self, spans: list[Span]) -> list[Field]:
        return [(o, w) for o, w in self.fields if any(s <= o and o + w <= e for s, e in spans)]


@dataclass(frozen=True)
class Corpus:
    model: Target  # models/b.gguf, header-focused
    adaptor: Target  # split/adaptor-a.gguf
    shared: Target  # split/<the shared file adaptor-a lists first>
    journal: bytes  # a valid pending-commit journal
    model_a: bytes  # the good model split beside a mutated one
    original_a: bytes  # what task a restores to
    shared_name: str
    split_dir: Path  # split/: adaptor-a, adaptor-b and their shared files, unmutated

    @property
    def foundation(self) -> Target:  # the 0.1 name (bench/fuzz_header.py)
        return self.shared


def make_target(path: Path, *, records: bool) -> Target:
    data = path.read_bytes()
    with GGUFFile(path) as f:
        h = f.header
    header_span = [(0, h.tensor_info_end + 32)]
    if not records:
        return Target(data, int_fields(data, h), header_span, *model_values(h))
    value_fields, value_focus = record_values(h)
    return Target(data, int_fields(data, h) + record_fields(data, h), record_spans(h) + header_span,
                  value_fields, value_focus)


def build_corpus(root: Path) -> Corpus:
    """A small model, and a split of it with a sibling whose adaptor has every kind of record: replaced
    split.* KVs and a non-zero padding byte (the gaps record) as well as the tensor infos."""
    root.mkdir(parents=True, exist_ok=True)
    a = Path(write_model(root / "a.gguf", fuzz_tensors(0), kvs=_with_split_keys))
    b = Path(write_model(root / "b.gguf", {**fuzz_tensors(0), "blk.0.attn_q.weight": (Q.F16, (32, 2), 99)}))
    raw = bytearray(a.read_bytes())
    with GGUFFile(a) as f:
        gap = next(s for s, e in iter_gaps(f.header) if e > s)
    raw[gap] = 0x5A
    a.write_bytes(bytes(raw))
    d = root / "split"
    # tiny models: share anyway; uncut, so that one shared file holds every shared tensor (the richest target)
    report = split({"a": a, "b": b}, d, file_cost=0, cut="none")
    assert report.shares_anything
    with open_task(d / "adaptor-a.gguf") as tf:
        shared = Path(tf.shared[0].path)
        assert tf.shared[0].header.tensors
    corpus = Corpus(make_target(b, records=False), make_target(d / "adaptor-a.gguf", records=True),
                    make_target(shared, records=True), b"", b.read_bytes(), a.read_bytes(), shared.name, d)
    return Corpus(**{**corpus.__dict__, "journal": pending_journal(corpus)[1]})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("fuzz-corpus"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-work")


@pytest.fixture(scope="module", autouse=True)
def bounded_memory() -> Iterable[None]:
    """Address space capped at what the process has + 2 GiB while fuzzing: a claimed size that slipped
    through to an allocation fails loudly (MemoryError escapes) instead of swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmSize:")).split()[1]) * 1024
    cap = vm + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=timedelta(seconds=2), derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


FUZZ = fuzz(200)


def timed(fn: Callable[[], object], limit: float = SLOW) -> object:
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    assert elapsed < limit, f"one input took {elapsed:.2f} s"
    return result


# ---------------------------------------------------------------------------------------------------------
# Tests


def test_engine_finds_every_field_of_the_corpus(corpus: Corpus) -> None:
    """The int fields point at integers, not text: in a valid file every u32 field (version, value types,
    n_dims, ggml types, record positions) is small and every u64 (lengths, counts, dims, offsets) is below
    1 MiB, while 4 or 8 bytes of key text read as an integer are far larger."""
    for t in (corpus.model, corpus.adaptor, corpus.shared):
        assert len(set(t.fields)) == len(t.fields) > 40
        for off, width in t.fields:
            value = struct.unpack_from(_INT_FORMATS[width], t.data, off)[0]
            assert value < (64 if width == 4 else 1 << 20), (off, width, value)
    ad = corpus.adaptor
    kvs = parse_header(ad.data, len(ad.data), "a").kvs
    inside = {kv.key for kv in kvs for off, _ in ad.fields if kv.value_start + 12 <= off < kv.end}
    assert {"gguf_split.source.tensor_infos", "gguf_split.source.gaps", "gguf_split.source.replaced_kvs"} <= inside
    assert ad.fields_in(ad.value_focus) and ad.value_fields
    assert {"gguf_split.files.name", "gguf_split.files.xxh3", "gguf_split.tensor_files", "gguf_split.content_id"} & {
        kv.key for kv in kvs for s, e in ad.value_focus if kv.start <= s < kv.end}


def test_unmutated_corpus_is_accepted(corpus: Corpus, workdir: Path) -> None:
    """The baseline: without mutation every target accepts the inputs and every oracle holds (so a
    failure below is the mutation's)."""
    assert exercise_reader(corpus.model.data, workdir / "m.gguf") is None
    assert exercise_split(corpus, corpus.model.data, workdir / "split-run") is None
    assert exercise_split_files(corpus, corpus.adaptor.data, corpus.shared.data, workdir / "files") == [None] * 8
    assert exercise_journal(corpus, corpus.journal, workdir / "journal") == [None] * 6


def test_oracles_catch_a_wrong_restore(corpus: Corpus, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restore oracle is not vacuous: a restore that writes other bytes (its check disabled) fails it."""
    import importlib

    restore_mod = importlib.import_module("gguf_split.splitdir.restore")
    real = restore_mod.read_back
    monkeypatch.setattr(restore_mod, "copy_bytes", lambda src, off, n, fd, bar: os.write(fd, bytes(n)) and None)
    monkeypatch.setattr(restore_mod, "read_back", lambda path, bar: corpus_digest(corpus))
    with pytest.raises(AssertionError, match="other bytes"):
        exercise_split_files(corpus, corpus.adaptor.data, corpus.shared.data, workdir / "files")
    monkeypatch.setattr(restore_mod, "read_back", real)


def corpus_digest(corpus: Corpus) -> str:
    import xxhash

    return xxhash.xxh3_128(corpus.original_a).hexdigest()


@FUZZ
@given(mutation=ops())
def test_mutated_model_headers(corpus: Corpus, workdir: Path, mutation: list[Op]) -> None:
    data = corpus.model.mutated(mutation, contents_only=False)
    timed(lambda: exercise_reader(data, workdir / "m.gguf"))


@fuzz(80)
@given(mutation=ops(), contents_only=st.booleans())
def test_split_of_mutated_models_verifies_and_restores(corpus: Corpus, workdir: Path, mutation: list[Op],
                                                       contents_only: bool) -> None:
    """A mutated model (its header reshaped, or only its contents changed in place: KV values, padding,
    tensor data) split beside a good one: refused with GGUFSplitError (no output left), or split, and then
    the split verifies and restores both inputs byte for byte."""
    data = corpus.model.mutated(mutation, contents_only=contents_only)
    timed(lambda: exercise_split(corpus, data, workdir / "split-run"), SLOW_WRITE)


@FUZZ
@given(mutation=ops(), target=st.sampled_from(["adaptor", "shared"]), contents_only=st.booleans(),
       sealed=st.booleans())
def test_mutated_split_records(corpus: Corpus, workdir: Path, mutation: list[Op], target: str, contents_only: bool,
                               sealed: bool) -> None:
    """A mutated adaptor or shared file (its records' contents, or its shape), with the seal left broken or
    recomputed: plan_restore, verify, the loader and info raise GGUFSplitError or accept it; when verify
    accepts it, restore gives the original or refuses."""
    mutated = getattr(corpus, target).mutated(mutation, contents_only=contents_only)
    if sealed:
        mutated = reseal(mutated)
    pair = (mutated, corpus.shared.data) if target == "adaptor" else (corpus.adaptor.data, mutated)
    timed(lambda: exercise_split_files(corpus, *pair, workdir / "files"), SLOW_WRITE)  # restore writes


@fuzz(100)
@given(mutation=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                                   st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)), min_size=1, max_size=3))
def test_mutated_journal_bytes(corpus: Corpus, workdir: Path, mutation: list) -> None:
    """The pending commit's journal with bytes flipped, inserted, deleted or cut off."""
    data = bytearray(corpus.journal)
    for kind, pos, blob in mutation:
        at = pos % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= blob[0] or 1
        elif kind == "insert":
            data[at:at] = blob
        elif kind == "delete":
            del data[at : at + len(blob)]
        elif kind == "truncate":
            del data[at:]
    timed(lambda: exercise_journal(corpus, bytes(data), workdir / "journal"), SLOW_WRITE)


@fuzz(150)
@given(body=journals())
def test_forged_journals(corpus: Corpus, workdir: Path, body: object) -> None:
    """Well-formed JSON journals with hostile names, wrong types and shapes."""
    data = json.dumps(body).encode("utf-8", "surrogatepass")
    timed(lambda: exercise_journal(corpus, data, workdir / "journal"), SLOW_WRITE)
