"""Fuzzing the readers: mutated real headers and mutated gguf-split records only ever raise GGUFSplitError.

Why: every count, length, offset and record gguf-split reads comes from a file that may be truncated,
corrupted or hostile. The promise is one error naming the file, never a struct.error, IndexError,
MemoryError, RecursionError, UnicodeDecodeError, ValueError, OverflowError or a hang. The inputs are small
valid files (conftest.write_model, and a real split of two of them) mutated by random bit flips, byte
insertions and deletions, truncations, and overwrites of the integer fields (lengths, counts, types,
dims, offsets: found by parsing) with huge or random values.

The mutation engine here is shared with bench/fuzz_header.py, the long-running version (a time budget,
distinct messages, a memory limit); these tests keep to a few hundred derandomized examples.
"""

from __future__ import annotations

import os
import random
import resource
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

from conftest import write_model
from gguf_split.errors import GGUFSplitError
from gguf_split.gguf_format import GGUFFile, Header, decode_value, iter_gaps, parse_header, parse_tensor_infos
from gguf_split.info import describe
from gguf_split.layout import OWN_PREFIX, open_output, plan_restore
from gguf_split.loader import Foundation, open_model
from gguf_split.restore import verify
from gguf_split.split import split

SLOW = 0.5  # seconds: no single input may take longer (a loop on a claimed count would take forever)
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
    """Integer fields inside gguf-split's blob records (an adaptor's original tensor infos, replaced KVs
    and non-zero padding), on top of the header's own."""
    out: list[Field] = []
    for kv in h.kvs:
        body = kv.value_start + 12
        if kv.key == "gguf_split.source.tensor_infos":
            for t in parse_tensor_infos(data[body : kv.end], "<blob>", 1):
                out += _tensor_info_fields(body + t.start, len(t.name.encode()), len(t.shape))
        elif kv.key == "gguf_split.source.gaps":
            pos = body
            while pos < kv.end:
                out += [(pos, 8), (pos + 8, 8)]
                pos += 16 + struct.unpack_from("<Q", data, pos + 8)[0]
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
# escapes to the caller, which is the bug being looked for.


def _problem(fn: Callable[[], object]) -> str | None:
    try:
        fn()
    except GGUFSplitError as e:
        return e.problem
    return None


def write_new(path: Path, data: bytes) -> Path:
    """Write through a fresh inode (the loader caches open foundations by device and inode)."""
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


def _load_task(foundation: Path, adaptor: Path) -> None:
    with Foundation.open(foundation) as fnd:
        model = fnd.load(adaptor)
        for key in model.metadata:
            model.metadata[key]
        for name in model.tensors:
            model.tensors[name].data


def _plan(foundation: Path, adaptor: Path) -> None:
    with open_output(adaptor) as ad, open_output(foundation) as fnd:
        plan_restore(ad, fnd)


def exercise_split_files(adaptor: bytes, foundation: bytes, directory: Path) -> list[str | None]:
    """plan_restore, verify and the runtime loader on an (adaptor, foundation) pair, either mutated."""
    a = write_new(directory / "adaptor-a.gguf", adaptor)
    f = write_new(directory / "foundation.gguf", foundation)
    return [_problem(lambda: _plan(f, a)), _problem(lambda: verify(f, [a], threads=1)),
            _problem(lambda: _load_task(f, a)), _problem(lambda: describe(a))]


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
    model: Target
    adaptor: Target
    foundation: Target


def make_target(path: Path, *, records: bool) -> Target:
    data = path.read_bytes()
    with GGUFFile(path) as f:
        h = f.header
    header_span = [(0, h.tensor_info_end + 32)]
    if not records:
        return Target(data, int_fields(data, h), header_span, [], [])
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
    split({"a": a, "b": b}, root / "split")
    return Corpus(make_target(b, records=False), make_target(root / "split" / "adaptor-a.gguf", records=True),
                  make_target(root / "split" / "foundation.gguf", records=True))


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


FUZZ = settings(max_examples=200, deadline=timedelta(seconds=2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def timed(fn: Callable[[], object]) -> object:
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    assert elapsed < SLOW, f"one input took {elapsed:.2f} s"
    return result


# ---------------------------------------------------------------------------------------------------------
# Tests


def test_engine_finds_every_field_of_the_corpus(corpus: Corpus) -> None:
    """The int fields point at integers, not text: in a valid file every u32 field (version, value types,
    n_dims, ggml types, record positions) is small and every u64 (lengths, counts, dims, offsets) is below
    1 MiB, while 4 or 8 bytes of key text read as an integer are far larger."""
    for t in (corpus.model, corpus.adaptor, corpus.foundation):
        assert len(set(t.fields)) == len(t.fields) > 40
        for off, width in t.fields:
            value = struct.unpack_from(_INT_FORMATS[width], t.data, off)[0]
            assert value < (64 if width == 4 else 1 << 20), (off, width, value)
    ad = corpus.adaptor
    kvs = parse_header(ad.data, len(ad.data), "a").kvs
    inside = {kv.key for kv in kvs for off, _ in ad.fields if kv.value_start + 12 <= off < kv.end}
    assert {"gguf_split.source.tensor_infos", "gguf_split.source.gaps", "gguf_split.source.replaced_kvs"} <= inside
    assert ad.fields_in(ad.value_focus) and ad.value_fields


def test_unmutated_corpus_is_accepted(corpus: Corpus, workdir: Path) -> None:
    """The baseline: without mutation every target accepts the inputs (so a failure below is the mutation's)."""
    assert exercise_reader(corpus.model.data, workdir / "m.gguf") is None
    assert exercise_split_files(corpus.adaptor.data, corpus.foundation.data, workdir) == [None] * 4


@FUZZ
@given(mutation=ops())
def test_mutated_model_headers(corpus: Corpus, workdir: Path, mutation: list[Op]) -> None:
    data = corpus.model.mutated(mutation, contents_only=False)
    timed(lambda: exercise_reader(data, workdir / "m.gguf"))


@FUZZ
@given(mutation=ops(), target=st.sampled_from(["adaptor", "foundation"]), contents_only=st.booleans(),
       sealed=st.booleans())
def test_mutated_split_records(corpus: Corpus, workdir: Path, mutation: list[Op], target: str, contents_only: bool,
                               sealed: bool) -> None:
    """A mutated adaptor or foundation (its records' contents, or its shape), with the seal left broken or
    recomputed: plan_restore, verify, the loader and info raise GGUFSplitError or accept it."""
    mutated = getattr(corpus, target).mutated(mutation, contents_only=contents_only)
    if sealed:
        mutated = reseal(mutated)
    pair = (mutated, corpus.foundation.data) if target == "adaptor" else (corpus.adaptor.data, mutated)
    timed(lambda: exercise_split_files(*pair, workdir))
