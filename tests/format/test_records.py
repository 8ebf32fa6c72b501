"""gguf-split's own records read through their fast paths: each must give exactly what the general, strict
reader gives, or step aside.

Why: the loader reads eight or more of its own records and a content id per file, and a task loads up
to 33 files; so SplitFile reads its records with gguf.read_known_kvs (one pass, a struct call or two per
record whose key and types are known in advance) and SharedInfo.read derives the content id from the
tensor-info bytes. Neither may accept what the strict reader refuses, nor read a record differently:
read_known_kv returns a KV only when read_kv_at returns the same KV, and None otherwise (the caller then
reads the record with read_kv_at, whose error is unchanged); a run of read_known_kvs holds only records
read_kv_at reads the same, back to back; content_id_of_records equals content_id over the decoded tensors.
"""

from __future__ import annotations

import mmap
import random
import struct
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGUFValueType as V
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import base_tensors, write_model
from gguf_split import split
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import (
    MAX_ARRAY_ELEMENTS,
    MAX_NAME_LENGTH,
    MAX_STRING_LENGTH,
    KV,
    _Cursor,
    _plain_name,
    decode_value,
    encode_kv,
    encode_tensor_info,
    parse_tensor_infos,
    read_known_kv,
    read_known_kvs,
    read_kv_at,
)
from gguf_split.format.records import (
    K_CONTENT_ID,
    K_DIGESTS,
    K_FILES_NAME,
    K_INDEX,
    K_ROLE,
    K_VERSION,
    OWN_RECORDS,
    SplitFile,
    _strings_checked,
    content_id,
    content_id_of_records,
)


@pytest.fixture(scope="module")
def cut_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two models split one file per tensor: an adaptor listing many files, and many shared files."""
    d = tmp_path_factory.mktemp("records")
    a = base_tensors(0)
    b = dict(a)
    qt, shape, seed = a["blk.0.attn_q.weight"]
    b["blk.0.attn_q.weight"] = (qt, shape, seed + 1)
    write_model(d / "a.gguf", a)
    write_model(d / "b.gguf", b)
    split({"a": d / "a.gguf", "b": d / "b.gguf"}, d / "split", file_cost=0, cut="tensor")
    return d / "split"


def general(buf: object, pos: int) -> KV | GGUFSplitError:
    try:
        return read_kv_at(buf, pos, "f.gguf")
    except GGUFSplitError as e:
        return e


def check_agrees(buf: object, pos: int) -> KV | None:
    """read_known_kv at `pos` is None, or exactly what the general reader reads there."""
    fast = read_known_kv(buf, pos, OWN_RECORDS)
    if fast is not None:
        assert general(buf, pos) == fast, (pos, fast)
    return fast


def check_run_agrees(buf: object, pos: int, limit: int = 1 << 20) -> list[KV]:
    """read_known_kvs from `pos` (up to the header index): records back to back from `pos`, each exactly
    what the general reader reads at its offset, at most `limit`, none after the index; the offset it
    returns is the end of the last (or `pos`)."""
    run, end = read_known_kvs(buf, pos, OWN_RECORDS, K_INDEX, limit)
    at = pos
    for kv in run:
        assert kv.start == at and general(buf, at) == kv, (at, kv)
        at = kv.end
    assert end == at and len(run) <= limit
    assert all(kv.key != K_INDEX for kv in run[:-1])
    return run


def own_records(path: Path) -> tuple[bytes, list[KV]]:
    with SplitFile(path) as f:
        return f.raw(0, f.header.tensor_info_end), list(f.header.kvs)


def test_every_record_gguf_split_writes_takes_the_fast_path(cut_split: Path) -> None:
    """Not vacuous: each of our records in an adaptor and in a shared file is read by read_known_kv, equal
    to the general reader's KV (the adaptor's string arrays of file names included)."""
    files = sorted(cut_split.glob("*.gguf"))
    assert len(files) > 8
    keys = set()
    for path in files:
        head, kvs = own_records(path)
        for kv in kvs:
            assert check_agrees(head, kv.start) == kv
            keys.add(kv.key)
    assert {K_CONTENT_ID, K_DIGESTS, K_FILES_NAME, K_ROLE, K_VERSION} <= keys


def test_any_other_record_steps_aside() -> None:
    """Another key, our key with another value type or element type: None, the general reader reads it."""
    nested = (struct.pack("<Q", len(K_DIGESTS)) + K_DIGESTS.encode()
              + struct.pack("<IIQIQB", V.ARRAY, V.ARRAY, 1, V.UINT8, 1, 7))  # an array of arrays of u8
    for raw in (encode_kv("general.name", V.STRING, "x"), encode_kv(K_VERSION, V.UINT64, 2),
                encode_kv(K_FILES_NAME, V.ARRAY, [1, 2], V.UINT64), nested,
                encode_kv(K_ROLE, V.ARRAY, ["a"], V.STRING)):
        assert read_known_kv(raw, 0, OWN_RECORDS) is None
        assert isinstance(general(raw, 0), KV)


def test_truncated_records_never_pass_the_fast_path(cut_split: Path) -> None:
    """Every record of a shared file and of an adaptor, cut at every byte: None wherever the general reader
    refuses the cut record, and the same KV wherever it still reads one."""
    for name in ("adaptor-a.gguf", sorted(p.name for p in cut_split.glob("foundation-*"))[0]):
        head, kvs = own_records(cut_split / name)
        for kv in kvs:
            for end in range(kv.start, kv.end + 1):
                got = check_agrees(head[:end], kv.start)
                assert (got is not None) == (end == kv.end and not isinstance(general(head[:end], kv.start),
                                                                                GGUFSplitError))


def test_mutated_records_agree_with_the_general_reader(cut_split: Path) -> None:
    """Random bit flips and huge integers written over the records (derandomized): at every record start,
    the fast path is None or the general reader's KV, never a KV the general reader refuses."""
    rng = random.Random(19)
    huge = (0, 1, 255, (1 << 31) - 1, 1 << 32, MAX_STRING_LENGTH, MAX_STRING_LENGTH + 1, 1 << 63, (1 << 64) - 1)
    for name in ("adaptor-b.gguf", sorted(p.name for p in cut_split.glob("foundation-*"))[0]):
        head, kvs = own_records(cut_split / name)
        end = kvs[-1].end
        for _ in range(300):
            data = bytearray(head)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(24, end - 8)
                if rng.random() < 0.5:
                    data[at] ^= 1 << rng.randrange(8)
                else:
                    data[at:at + 8] = struct.pack("<Q", rng.choice(huge))
            for kv in kvs:
                check_agrees(bytes(data), kv.start)


def sparse(path: Path, head: bytes, size: int) -> mmap.mmap:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


@pytest.mark.parametrize("over", [0, 1])
def test_limits_are_the_general_readers(tmp_path: Path, over: int) -> None:
    """A string of 2^30 bytes, an array of 2^30 digests, a file name of 2^30 bytes (in sparse files that
    hold them): read; one more: None, and the general reader's refusal stands."""
    key = struct.pack("<Q", len(K_CONTENT_ID)) + K_CONTENT_ID.encode()
    digests = struct.pack("<Q", len(K_DIGESTS)) + K_DIGESTS.encode()
    names = struct.pack("<Q", len(K_FILES_NAME)) + K_FILES_NAME.encode()
    n = MAX_STRING_LENGTH + over
    cases = {
        "string": key + struct.pack("<IQ", V.STRING, n),
        "array": digests + struct.pack("<IIQ", V.ARRAY, V.UINT8, MAX_ARRAY_ELEMENTS + over),
        "string in array": names + struct.pack("<IIQQsQ", V.ARRAY, V.STRING, 2, 1, b"x", n),
    }
    for what, head in cases.items():
        buf = sparse(tmp_path / "s.gguf", head, len(head) + n + 64)
        try:
            got = check_agrees(buf, 0)
            if over:
                assert got is None and isinstance(general(buf, 0), GGUFSplitError), what
            else:
                assert got is not None and got.end == len(head) + (MAX_ARRAY_ELEMENTS if what == "array" else n), what
        finally:
            buf.close()


TYPES = [q for q, (block, _) in GGML_QUANT_SIZES.items()]


@st.composite
def tensor_records(draw: st.DrawFn) -> list[tuple[str, tuple[int, ...], int]]:
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=6, unique=True))
    out = []
    for name in names:
        qt = draw(st.sampled_from(TYPES))
        block = GGML_QUANT_SIZES[qt][0]
        dims = draw(st.integers(0 if block == 1 else 1, 4))
        shape = tuple(draw(st.integers(1, 3)) * (block if i == 0 else 1) for i in range(dims))
        out.append((name, shape, int(qt)))
    return out


@settings(max_examples=200, deadline=None)
@given(records=tensor_records(), position=st.integers(1, 0xFFFF), alignment=st.sampled_from([1, 32, 4096]),
       arch=st.one_of(st.none(), st.text(max_size=8)), seed=st.integers(0, 1 << 30))
def test_content_id_from_records_is_the_content_id(records: list[tuple[str, tuple[int, ...], int]], position: int,
                                                   alignment: int, arch: str | None, seed: int) -> None:
    """Names of any Unicode text, 0 to 4 dimensions, every ggml type, random offsets: the content id read
    off the tensor-info bytes is content_id() of the decoded tensors (what split wrote)."""
    rng = random.Random(seed)
    buf = b"".join(encode_tensor_info(n, s, t, rng.randrange(1 << 20) * alignment) for n, s, t in records)
    infos = parse_tensor_infos(buf, "f.gguf", alignment)
    digests = bytes(rng.randrange(256) for _ in range(16 * len(infos)))
    want = content_id(position, alignment, arch,
                      [(t.name, t.shape, t.ggml_type, digests[16 * i:16 * i + 16]) for i, t in enumerate(infos)])
    assert content_id_of_records(buf, infos, digests, position, alignment, arch) == want


def test_a_decoded_record_keeps_its_type_check(cut_split: Path) -> None:
    """Our strings and numbers are decoded once per file; a caller expecting another type is still refused."""
    with SplitFile(next(cut_split.glob("foundation-*"))) as f:
        assert f.kv_value(K_ROLE) == "shared" and f.kv_value(K_ROLE) == "shared"
        with pytest.raises(GGUFSplitError, match="expected a UINT32"):
            f.kv_value(K_ROLE, expect=V.UINT32)
        assert f.kv_value(K_DIGESTS) is not f.kv_value(K_DIGESTS)  # a list: the caller's own


def test_runs_read_every_record_of_ours_in_one_pass(cut_split: Path) -> None:
    """Not vacuous: from the seal, one read_known_kvs call reads all of a file's records up to the header
    index, as the general reader does; with a limit, that many; SplitFile's records are exactly these."""
    for path in sorted(cut_split.glob("*.gguf")):
        head, kvs = own_records(path)
        assert check_run_agrees(head, kvs[0].start) == kvs and kvs[-1].key == K_INDEX
        for limit in range(len(kvs)):
            assert check_run_agrees(head, kvs[0].start, limit) == kvs[:limit]


def test_truncated_runs_stop_where_the_general_reader_would(cut_split: Path) -> None:
    """The records of an adaptor and of a shared file cut at every byte: a run holds exactly the records
    that lie whole before the cut (the general reader reads each), and stops at the first cut one."""
    for name in ("adaptor-a.gguf", sorted(p.name for p in cut_split.glob("foundation-*"))[0]):
        head, kvs = own_records(cut_split / name)
        for end in range(kvs[0].start, kvs[-1].end + 1):
            run = check_run_agrees(head[:end], kvs[0].start)
            assert run == [kv for kv in kvs if kv.end <= end]


def test_mutated_runs_agree_with_the_general_reader(cut_split: Path) -> None:
    """Random bit flips and huge integers over the records (derandomized): from every record start, a run is
    records the general reader reads the same, back to back; it stops at the first it cannot vouch for."""
    rng = random.Random(1919)
    huge = (0, 1, 255, (1 << 31) - 1, 1 << 32, MAX_STRING_LENGTH, MAX_STRING_LENGTH + 1, 1 << 63, (1 << 64) - 1)
    for name in ("adaptor-b.gguf", sorted(p.name for p in cut_split.glob("foundation-*"))[-1]):
        head, kvs = own_records(cut_split / name)
        end = kvs[-1].end
        for _ in range(300):
            data = bytearray(head)
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(24, end - 8)
                if rng.random() < 0.5:
                    data[at] ^= 1 << rng.randrange(8)
                else:
                    data[at:at + 8] = struct.pack("<Q", rng.choice(huge))
            for kv in kvs:
                check_run_agrees(bytes(data), kv.start)


def test_a_run_stops_at_a_record_it_does_not_know() -> None:
    """Ours, then another key: the run is ours and ends before it (the caller reads that one strictly);
    the same through a memoryview (its slices are not hashable: looked up as bytes)."""
    ours = encode_kv(K_ROLE, V.STRING, "shared") + encode_kv(K_VERSION, V.UINT32, 2)
    buf = ours + encode_kv("general.name", V.STRING, "x") + encode_kv(K_ROLE, V.STRING, "y")
    for b in (buf, memoryview(buf)):
        run, end = read_known_kvs(b, 0, OWN_RECORDS, K_INDEX, 10)
        assert [kv.key for kv in run] == [K_ROLE, K_VERSION] and end == len(ours)
        assert check_run_agrees(b, 0) == run


def strict_name(buf: bytes, pos: int) -> str | GGUFSplitError:
    try:
        return _Cursor(buf, pos, len(buf), "f.gguf").text("tensor name")
    except GGUFSplitError as e:
        return e


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(st.text(max_size=20), st.binary(max_size=20)), cut=st.integers(0, 40),
       length=st.one_of(st.none(), st.sampled_from([0, 1, MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1, 1 << 63])))
def test_tensor_names_read_inline_are_the_cursors(name: str | bytes, cut: int, length: int | None) -> None:
    """A tensor name (any text, any bytes: invalid UTF-8 too), its length field overwritten, cut anywhere:
    the inline read is None or exactly what _Cursor.text reads (which then reads it or refuses it)."""
    raw = name.encode() if isinstance(name, str) else name
    buf = (struct.pack("<Q", len(raw) if length is None else length) + raw + b"\0" * 12)[:cut]
    if len(buf) < 8:
        return
    fast = _plain_name(buf, 0, len(buf))
    strict = strict_name(buf, 0)
    assert fast is None or fast == strict
    if length is None and cut >= 8 + len(raw) and isinstance(strict, str):
        assert fast == strict  # not vacuous: a well-formed name takes the inline read



def test_string_arrays_of_ours_decode_as_decode_value(cut_split: Path) -> None:
    """Every string array of our records in every file (file names, ids, hashes, sources) and one holding
    text that is not UTF-8: SplitFile's decode without re-checking gives decode_value's list."""
    seen = 0
    for path in sorted(cut_split.glob("*.gguf")):
        with SplitFile(path) as f:
            for kv in f.header.kvs:
                if kv.vtype is V.ARRAY and kv.subtype is V.STRING:
                    assert f.kv_value(kv.key) == decode_value(f.mm, V.ARRAY, kv.value_start)[0]
                    seen += 1
    assert seen > 8
    raw = encode_kv(K_FILES_NAME, V.ARRAY, ["a", "", "é"], V.STRING)
    bad = raw.replace("é".encode(), b"\xff\xfe")  # same length, not UTF-8
    for buf in (raw, bad):
        kv = read_kv_at(buf, 0, "f.gguf")
        assert _strings_checked(buf, kv) == decode_value(buf, V.ARRAY, kv.value_start)[0]
    assert _strings_checked(bad, read_kv_at(bad, 0, "f.gguf"))[2] == b"\xff\xfe"


def test_header_memo_keeps_at_most_max_files(cut_split: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo is bounded: opening more files than MAX_FILES keeps the newest MAX_FILES; a file opened
    through it reads the same header as without it."""
    from gguf_split.format.records import HeaderMemo

    monkeypatch.setattr(HeaderMemo, "MAX_FILES", 3)
    memo = HeaderMemo()
    files = sorted(p for p in cut_split.glob("*.gguf") if not p.name.startswith("adaptor-"))
    assert len(files) > 3
    for path in files:
        with SplitFile(path, memo=memo) as f, SplitFile(path) as plain:
            assert f.header == plain.header and f.tail == plain.tail
    assert len(memo) == 3 and [k[0] for k in memo._entries] == [str(p) for p in files[-3:]]
