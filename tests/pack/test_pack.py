"""Packs: byte-exact round trips, what the codecs choose, refusals, and a fuzz test with oracles.

The models are tiny GGUFs written with gguf's GGUFWriter: a base model (Q8_0, Q4_0, F32 tensors and a
tokenizer large enough to be a record of its own) and fine-tunes made the way llama-export-lora merges a
LoRA (base dequantized + B·A, written as F16; an F32 tensor stays F32), one with an untied output head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import xxhash
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_split.disk.progress import Progress, Reporter
from gguf_split.errors import GGUFSplitError
from gguf_split.format.names import check_bare_name
from gguf_split.pack import codec
from gguf_split.pack import format as fmt
from gguf_split.pack.reader import PackReader, read_index, unpack
from gguf_split.pack.transport import pack
from gguf_split.pack.report import PackReport
from gguf_split.pack.writer import pack_files
from helpers import pack_with_old_writer

N_EMBD, N_FF, N_VOCAB = 64, 128, 96

# name -> (type, numpy shape)
BASE = {
    "token_embd.weight": (Q.Q8_0, (N_VOCAB, N_EMBD)),
    "blk.0.attn_norm.weight": (Q.F32, (N_EMBD,)),
    "blk.0.attn_q.weight": (Q.Q8_0, (N_EMBD, N_EMBD)),
    "blk.0.attn_v.weight": (Q.Q4_0, (N_EMBD, N_EMBD)),
    "blk.0.ffn_up.weight": (Q.Q4_0, (N_FF, N_EMBD)),
    "blk.0.ffn_down.weight": (Q.Q8_0, (N_EMBD, N_FF)),
    "blk.0.ffn_gate.weight": (Q.F32, (N_FF, N_EMBD)),
    "output_norm.weight": (Q.F32, (N_EMBD,)),
}


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (qt, shape) in BASE.items():
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            w += 1.0
        out[name] = w if qt == Q.F32 else quantize(w, qt)
    return out


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], name: str) -> str:
    w = GGUFWriter(os.fspath(path), "llama")
    w.add_name(name)
    w.add_block_count(1)
    w.add_embedding_length(N_EMBD)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i:05d}" for i in range(1200)])  # > 4 KiB: one record for every file
    w.add_token_scores([-float(i) for i in range(1200)])
    for tname, (data, qt) in tensors.items():
        if qt in (Q.F32, Q.F16):
            w.add_tensor(tname, data)
        else:
            w.add_tensor(tname, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def _dequant(data: np.ndarray, qt: Q, shape: tuple[int, ...]) -> np.ndarray:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return codec.dequantize_rows(data.tobytes(), qt, rows, shape[-1]).reshape(shape)


def _merge(data: np.ndarray, qt: Q, shape: tuple[int, ...], seed: int, rank: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = _dequant(data, qt, shape)
    b = rng.standard_normal((shape[0], rank)).astype(np.float32) * 0.02
    a = rng.standard_normal((rank, shape[1])).astype(np.float32) / np.sqrt(shape[1])
    return w + 2.0 * (b @ a)


def make_set(d: Path, n_finetunes: int = 3) -> list[tuple[str, str]]:
    """base.gguf and fine-tunes: chat (attn_q, attn_v merged as F16), code (FFN merged: F16, and F32 for
    the F32 gate), summarize (an untied output.weight in F16)."""
    d.mkdir(parents=True, exist_ok=True)
    base = _weights(0)
    typed = {n: (base[n], BASE[n][0]) for n in BASE}
    out = [("base.gguf", _write(d / "base.gguf", typed, "base"))]
    tasks = {
        "chat": ["blk.0.attn_q.weight", "blk.0.attn_v.weight"],
        "code": ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.ffn_gate.weight"],
        "summarize": [],
    }
    for seed, (task, names) in enumerate(list(tasks.items())[:n_finetunes], start=1):
        t = dict(typed)
        for n in names:
            qt, shape = BASE[n]
            m = _merge(base[n], qt, shape, seed * 10 + len(n))
            t[n] = (m.astype(np.float32), Q.F32) if qt == Q.F32 else (m.astype(np.float16), Q.F16)
        if task == "summarize":
            m = _merge(base["token_embd.weight"], Q.Q8_0, (N_VOCAB, N_EMBD), 99)
            t["output.weight"] = (m.astype(np.float16), Q.F16)
        out.append((f"{task}.gguf", _write(d / f"{task}.gguf", t, task)))
    return out


def sha(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    return make_set(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def packed(models: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, PackReport]:
    out = tmp_path_factory.mktemp("pack") / "set.ggufpack"
    report = pack_files(models, out, kind="models", meta={"tasks": {"chat": "chat.gguf"}}, threads=2)
    return os.fspath(out), report


# ---------------------------------------------------------------------------------------------------------
# round trips and choices


def test_round_trip_is_byte_exact(models: list[tuple[str, str]], packed: tuple[str, PackReport],
                                  tmp_path: Path) -> None:
    path, report = packed
    rep = unpack(path, tmp_path / "out", threads=2)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(n for n, _ in models)  # no temporaries left
    for name, src in models:
        assert sha(tmp_path / "out" / name) == sha(src)
    assert rep.bytes_written == sum(os.path.getsize(p) for _, p in models)
    assert report.pack_bytes == os.path.getsize(path)
    assert report.pack_bytes < 0.5 * report.input_bytes


def test_codecs_chosen_by_their_bytes(packed: tuple[str, PackReport]) -> None:
    _, report = packed
    by = {(t.name, t.ggml_type): t for t in report.tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"):
        t = by[(name, "F16")]
        assert t.codec == "delta" and t.rank == 4, t
        assert t.stored_bytes < t.nbytes / 2
    gate = by[("blk.0.ffn_gate.weight", "F32")]  # an F32 target against its F32 base
    assert gate.codec == "delta" and gate.stored_bytes < gate.nbytes / 2
    out = by[("output.weight", "F16")]  # no other version by name: the tied embedding by shape
    assert out.codec == "delta" and out.base is not None and out.base.startswith("token_embd.weight")
    # every base tensor is stored once though it is in 4 files, the fine-tuned ones once each
    assert report.codecs["ref"].count == sum(t.occurrences - 1 for t in report.tensors) > 0
    assert all(t.codec != "delta" for t in report.tensors if t.ggml_type in ("Q8_0", "Q4_0"))


def test_repeated_kv_data_is_stored_once(models: list[tuple[str, str]], packed: tuple[str, PackReport]) -> None:
    path, report = packed
    with PackReader(path) as r:
        big = [b for b in r.blobs if b.size >= fmt.BIG_KV]
        # tokens and scores: the same in all 4 files, one record each
        assert len(big) == 2
        uses = [sum(1 for f in r.files for p in f.parts if p.kind == fmt.PART_BLOB and p.value == i)
                for i, b in enumerate(r.blobs) if b.size >= fmt.BIG_KV]
        assert uses == [len(models), len(models)]
    assert report.codecs["headers"].stored_bytes < report.codecs["headers"].input_bytes / 4


def test_read_index_lists_the_files(models: list[tuple[str, str]], packed: tuple[str, PackReport]) -> None:
    path, _ = packed
    ix = read_index(path)
    assert ix.kind == "models" and ix.meta == {"tasks": {"chat": "chat.gguf"}} and ix.version == 1
    assert [f.name for f in ix.files] == [n for n, _ in models]
    for f, (_, src) in zip(ix.files, models):
        data = Path(src).read_bytes()
        assert f.size == len(data)
        assert f.sha256 == hashlib.sha256(data).hexdigest()
        assert f.xxh3 == xxhash.xxh3_128_hexdigest(data)


def test_single_model_and_threads_one(models: list[tuple[str, str]], tmp_path: Path) -> None:
    name, src = models[1]
    p = tmp_path / "one.ggufpack"
    pack_files([(name, src)], p, threads=1)
    unpack(p, tmp_path / "o", threads=1)
    assert sha(tmp_path / "o" / name) == sha(src)


def test_pack_of_non_gguf_data_gaps(tmp_path: Path, models: list[tuple[str, str]]) -> None:
    """Non-zero bytes after the last tensor and in padding come back too."""
    src = Path(models[1][1]).read_bytes() + b"trailing bytes\x01"
    p = tmp_path / "x.gguf"
    p.write_bytes(src)
    pack_files([("x.gguf", p)], tmp_path / "x.ggufpack")
    unpack(tmp_path / "x.ggufpack", tmp_path / "o")
    assert (tmp_path / "o" / "x.gguf").read_bytes() == src


def test_unpack_memory_is_bounded_by_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 32 MiB tensor in chunks of 2^16 elements (256 KiB) unpacks holding a few chunks, not the tensor."""
    big = np.tile(np.arange(1024, dtype=np.float32) / 1024, (8192, 1))  # compressible: packs fast
    f = _write(tmp_path / "big.gguf", {"big.weight": (big, Q.F32)}, "big")
    monkeypatch.setattr(codec, "CHUNK_ELEMS", 1 << 16)
    pack_files([("big.gguf", f)], tmp_path / "big.ggufpack", threads=2)
    tracemalloc.start()
    try:
        unpack(tmp_path / "big.ggufpack", tmp_path / "o", threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sha(tmp_path / "o" / "big.gguf") == sha(f)
    assert peak < 4 << 20, peak


def test_pack_bytes_do_not_depend_on_threads(models: list[tuple[str, str]], packed: tuple[str, PackReport],
                                             tmp_path: Path) -> None:
    """Records are coded on a pool but written in one order: the same inputs give the same pack."""
    pack_files(models, tmp_path / "t1.ggufpack", kind="models", meta={"tasks": {"chat": "chat.gguf"}}, threads=1)
    pack_files(models, tmp_path / "t3.ggufpack", kind="models", meta={"tasks": {"chat": "chat.gguf"}}, threads=3)
    assert sha(tmp_path / "t1.ggufpack") == sha(tmp_path / "t3.ggufpack") == sha(packed[0])


def test_pack_bytes_equal_the_old_writer(models: list[tuple[str, str]], tmp_path: Path) -> None:
    """The staged writer writes the very bytes container.py wrote (the old package from git, in a child
    process): a refactoring of the writer must not change a pack. Skipped outside a git checkout."""
    tasks = {name[:-len(".gguf")]: path for name, path in models}
    tasks["x"] = _with_trailing_bytes(models[1][1], tmp_path)
    pack_with_old_writer(tasks, tmp_path / "old.ggufpack", tmp_path)
    pack(tmp_path / "new.ggufpack", tasks=tasks, threads=2)
    assert sha(tmp_path / "new.ggufpack") == sha(tmp_path / "old.ggufpack")


def _with_trailing_bytes(src: str, d: Path) -> str:
    p = d / "x.gguf"
    p.write_bytes(Path(src).read_bytes() + b"trailing bytes\x01")
    return os.fspath(p)


def test_ctrl_c_while_hashing_stops_every_job(tmp_path: Path) -> None:
    """Ctrl-C during the hashing: the interruption comes at once, the other file's sweep stops at its next
    piece (disk.jobs.run_jobs), and no pack nor temporary is left. (A pool without the cancel flag hashed
    both files to the end before the interruption got out.)"""
    import signal
    import threading

    big = np.tile(np.arange(1024, dtype=np.float32) / 1024, (8192, 1))  # 32 MiB each: 32 pieces to hash
    inputs = [(f"{n}.gguf", _write(tmp_path / f"{n}.gguf", {"w": (big + i, Q.F32)}, n)) for i, n in enumerate("ab")]
    hashed: list[int] = []
    main = threading.main_thread().ident
    assert main is not None

    class Interrupting(Progress):
        @contextlib.contextmanager
        def bar(self, description: str, total: int) -> Iterator[Reporter]:
            yield self

        def advance(self, n: int) -> None:
            hashed.append(n)
            if len(hashed) == 1:
                signal.pthread_kill(main, signal.SIGINT)  # a Ctrl-C: KeyboardInterrupt in the main thread
            time.sleep(0.01)  # a slow disk: every piece takes a while

    out = tmp_path / "out" / "p.ggufpack"
    with pytest.raises(KeyboardInterrupt):
        pack_files(inputs, out, threads=2, progress=Interrupting(quiet=True))
    seen = len(hashed)
    time.sleep(0.2)
    assert len(hashed) == seen  # nothing runs on
    assert sum(hashed) <= 4 << 20, sum(hashed)  # of 64 MiB: each job stopped within a piece or two
    assert not out.parent.exists()


def test_file_names_by_the_strict_rule() -> None:
    """A pack's names: one rule (names.check_bare_name, strict), each broken part named; the plain rule of
    gguf-split's own records keeps its message and still takes hidden names (its temporaries)."""
    cases = {"a/b": "bare file name", ".x": "bare file name", " a": "bare file name", "a ": "bare file name",
             "a\x01": "bare file name", "": "non-empty string", "é" * 128: "longer than 255 bytes",
             "\udcff.gguf": "not valid Unicode", 7: "non-empty string"}
    for name, fragment in cases.items():
        with pytest.raises(GGUFSplitError, match=fragment):
            check_bare_name(name, "w", strict=True)
    assert check_bare_name("é" * 127 + "x", None, strict=True)  # 255 bytes
    assert check_bare_name(".x.gguf-split-tmp", None) == ".x.gguf-split-tmp"
    with pytest.raises(GGUFSplitError, match="is not a plain file name: damaged or forged"):
        check_bare_name("../x", "w")


def test_map_ordered_keeps_order_and_window() -> None:
    """disk.jobs.map_ordered, the pack's record pipeline: results in the items' order however the pool
    finishes them, never more than `window` items in flight."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gguf_split.disk.jobs import map_ordered

    lock = threading.Lock()
    live, peak = [0], [0]

    def work(i: int) -> int:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(random.Random(i).random() / 200)
        with lock:
            live[0] -= 1
        return i * i

    submitted: list[int] = []

    def items() -> Iterator[int]:
        for i in range(60):
            submitted.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        got = []
        for i, r in map_ordered(pool, work, items(), window=3):
            assert len(submitted) - len(got) <= 3  # the window: items taken but not yet given back
            got.append((i, r))
    assert got == [(i, i * i) for i in range(60)] and peak[0] <= 3


# ---------------------------------------------------------------------------------------------------------
# refusals


def test_unknown_version_is_refused(packed: tuple[str, PackReport], tmp_path: Path) -> None:
    data = bytearray(Path(packed[0]).read_bytes())
    struct.pack_into("<I", data, 8, 3)
    p = tmp_path / "v3.ggufpack"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFSplitError, match="version 3 is not supported"):
        read_index(p)
    with pytest.raises(GGUFSplitError, match="version 3 is not supported"):
        unpack(p, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_not_a_pack(tmp_path: Path, models: list[tuple[str, str]]) -> None:
    with pytest.raises(GGUFSplitError, match="not a gguf-split pack"):
        read_index(models[0][1])
    (tmp_path / "tiny").write_bytes(b"GGUFPACK")
    with pytest.raises(GGUFSplitError, match="too short"):
        read_index(tmp_path / "tiny")
    with pytest.raises(GGUFSplitError, match="cannot open"):
        read_index(tmp_path / "missing")


def test_truncated_pack(packed: tuple[str, PackReport], tmp_path: Path) -> None:
    data = Path(packed[0]).read_bytes()
    p = tmp_path / "t.ggufpack"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFSplitError, match="truncated"):
        unpack(p, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_existing_outputs_need_force(packed: tuple[str, PackReport], models: list[tuple[str, str]],
                                     tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "chat.gguf").write_bytes(b"mine")
    with pytest.raises(GGUFSplitError, match="already exists"):
        unpack(packed[0], out)
    assert os.listdir(out) == ["chat.gguf"] and (out / "chat.gguf").read_bytes() == b"mine"
    unpack(packed[0], out, force=True)
    assert sha(out / "chat.gguf") == sha(dict(models)["chat.gguf"])


def test_pack_refusals(models: list[tuple[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "p.ggufpack"
    with pytest.raises(GGUFSplitError, match="same|twice|two inputs"):
        pack_files([("a.gguf", models[0][1]), ("a.gguf", models[1][1])], out)
    for bad in ("../a.gguf", "dir/a.gguf", ".hidden", "", "a\0b"):
        with pytest.raises(GGUFSplitError, match="file name"):
            pack_files([(bad, models[0][1])], out)
    with pytest.raises(GGUFSplitError, match="file name '.p.ggufpack' must be a bare file name"):
        pack_files(models[:1], tmp_path / ".p.ggufpack")  # unpack could not give it back either
    with pytest.raises(GGUFSplitError, match="not a GGUF|too short"):
        (tmp_path / "junk.gguf").write_bytes(b"junk" * 10)
        pack_files([("junk.gguf", tmp_path / "junk.gguf")], out)
    with pytest.raises(GGUFSplitError, match="JSON"):
        pack_files(models[:1], out, meta={"x": object()})
    assert not out.exists()
    pack_files(models[:1], out)
    with pytest.raises(GGUFSplitError, match="already exists"):
        pack_files(models[:1], out)
    pack_files(models[:1], out, force=True)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------------
# forged packs: a valid frame around contents that lie


def rewrite_index(data: bytes, change: Callable[[dict], None]) -> bytes:
    """The pack with its index changed by `change` and sealed again (checksums and tail right)."""
    ioff, _, ver, flags, magic = fmt.TAIL.unpack_from(data, len(data) - fmt.TAIL.size)
    kind, rc, _, _, blen, dec, _ = fmt.RECORD.unpack_from(data, ioff)
    body = data[ioff + fmt.RECORD.size : ioff + fmt.RECORD.size + blen]
    ix = json.loads(codec.decompress(body, dec))
    change(ix)
    raw = json.dumps(ix).encode()
    z = codec.compress(raw, 3)
    rec = fmt.RECORD.pack(fmt.KIND_INDEX, fmt.REC_ZSTD, 0, 0, len(z), len(raw), xxhash.xxh3_128_digest(z))
    return data[:ioff] + rec + z + fmt.TAIL.pack(ioff, len(rec) + len(z), ver, flags, magic)


def reseal_record(data: bytes, off: int, body: bytes, decoded: int | None = None) -> bytes:
    """Replace the body of the record at `off` (same length) and fix its checksum."""
    kind, rc, _, _, blen, dec, _ = fmt.RECORD.unpack_from(data, off)
    assert len(body) == blen
    rec = fmt.RECORD.pack(kind, rc, 0, 0, blen, dec if decoded is None else decoded,
                            xxhash.xxh3_128_digest(body))
    return data[:off] + rec + body + data[off + fmt.RECORD.size + blen :]


def _unpack_oracle(data: bytes, tmp: Path, originals: dict[str, str]) -> str:
    """Unpack `data`: either every file comes back with its original sha256, or GGUFSplitError and
    nothing is written. Returns "ok" or the error text."""
    p = tmp / "fuzz.ggufpack"
    p.write_bytes(data)
    out = tmp / "fuzz-out"
    try:
        unpack(p, out, threads=2)
    except GGUFSplitError as e:
        assert not out.exists(), os.listdir(out)
        assert "\n" not in str(e)
        return str(e)
    got = {n: sha(out / n) for n in os.listdir(out)}
    # a forged index may rename files (its checksums cannot tell): the files are the index's names, and
    # their contents are the originals
    assert sorted(got) == sorted(f.name for f in read_index(p).files)
    assert sorted(got.values()) == sorted(originals.values())
    for n in os.listdir(out):
        os.unlink(out / n)
    os.rmdir(out)
    return "ok"


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, str]]:
    d = tmp_path_factory.mktemp("small")
    models = make_set(d / "m", n_finetunes=1)
    pack_files(models, d / "s.ggufpack", threads=1)
    return (d / "s.ggufpack").read_bytes(), {n: sha(p) for n, p in models}


FORGERIES: list[tuple[str, Callable[[dict], None]]] = [
    ("huge file size", lambda ix: ix["files"][0].update(size=1 << 60)),
    ("huge zero run", lambda ix: ix["files"][0]["parts"].append(["z", 1 << 49]) or ix["files"][0].update(
        size=ix["files"][0]["size"] + (1 << 49))),
    ("path name", lambda ix: ix["files"][0].update(name="../evil.gguf")),
    ("absolute name", lambda ix: ix["files"][0].update(name="/tmp/evil.gguf")),
    ("duplicate name", lambda ix: ix["files"][1].update(name=ix["files"][0]["name"])),
    ("huge shape", lambda ix: ix["tensors"][0].update(shape=[1 << 40, 1 << 20])),
    ("bad type", lambda ix: ix["tensors"][0].update(type=12345)),
    ("bool type", lambda ix: ix["tensors"][0].update(type=True)),
    ("rank too big", lambda ix: [t.update(rank=1 << 30) for t in ix["tensors"] if t["codec"] == "delta"]),
    ("base is itself", lambda ix: [t.update(base=i) for i, t in enumerate(ix["tensors"]) if t["codec"] == "delta"]),
    ("base missing", lambda ix: [t.update(base=10 ** 9) for t in ix["tensors"] if t["codec"] == "delta"]),
    ("offset outside", lambda ix: ix["tensors"][0]["chunks"].__setitem__(0, 1 << 62)),
    ("offset negative", lambda ix: ix["tensors"][0]["chunks"].__setitem__(0, -40)),
    ("offset mid-record", lambda ix: ix["tensors"][0]["chunks"].__setitem__(0, ix["tensors"][0]["chunks"][0] + 3)),
    ("chunks swapped", lambda ix: ix["tensors"].__setitem__(0, {**ix["tensors"][0], "chunks": ix["tensors"][1]["chunks"]})),
    ("rows per chunk", lambda ix: ix["tensors"][0].update(rows_per_chunk=0)),
    ("stride", lambda ix: ix["tensors"][0].update(shuffle=7)),
    ("codec", lambda ix: ix["tensors"][0].update(codec="magic")),
    ("residual mode", lambda ix: [t.update(residual="add") for t in ix["tensors"] if t["codec"] == "delta"]),
    ("factor type", lambda ix: [t.update(factor_type="f64") for t in ix["tensors"] if t["codec"] == "delta"]),
    ("factor type object", lambda ix: [t.update(factor_type={"a": 1}) for t in ix["tensors"] if t["codec"] == "delta"]),
    ("residual list", lambda ix: [t.update(residual=["sub"]) for t in ix["tensors"] if t["codec"] == "delta"]),
    ("codec object", lambda ix: ix["tensors"][0].update(codec={"plain": 1})),
    ("wrong digest", lambda ix: ix["tensors"][0].update(xxh3="0" * 32)),
    ("wrong file sha", lambda ix: ix["files"][0].update(sha256="0" * 64)),
    ("blob size", lambda ix: ix["blobs"][0].update(size=ix["blobs"][0]["size"] + 1)),
    ("parts garbage", lambda ix: ix["files"][0].update(parts=[["t", "x"]])),
    ("not a dict", lambda ix: ix["files"].__setitem__(0, 5)),
    ("version", lambda ix: ix.update(version=2)),
    ("deep nesting", lambda ix: ix.update(meta=[[[[[[[[[[]]]]]]]]]])),
]


@pytest.mark.parametrize("what,change", FORGERIES, ids=[f[0] for f in FORGERIES])
def test_forged_index_is_refused(what: str, change: Callable[[dict], None], small_pack: tuple[bytes, dict[str, str]],
                                 tmp_path: Path) -> None:
    data, originals = small_pack
    result = _unpack_oracle(rewrite_index(data, change), tmp_path, originals)
    if what != "deep nesting":  # meta is the caller's: any JSON is fine
        assert result != "ok", what


def test_deeply_nested_json_index(small_pack: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    data, originals = small_pack

    def deep(ix: dict) -> None:
        ix["meta"] = "@@DEEP@@"

    forged = rewrite_index(data, deep)
    ioff = fmt.TAIL.unpack_from(forged, len(forged) - fmt.TAIL.size)[0]
    blen, dec = fmt.RECORD.unpack_from(forged, ioff)[4:6]
    raw = codec.decompress(forged[ioff + fmt.RECORD.size : ioff + fmt.RECORD.size + blen], dec)
    raw = raw.replace(b'"@@DEEP@@"', b"[" * 100000 + b"]" * 100000)
    z = codec.compress(raw, 3)
    rec = fmt.RECORD.pack(fmt.KIND_INDEX, fmt.REC_ZSTD, 0, 0, len(z), len(raw), xxhash.xxh3_128_digest(z))
    forged = forged[:ioff] + rec + z + fmt.TAIL.pack(ioff, len(rec) + len(z), 1, 0, fmt.MAGIC)
    assert "not valid JSON" in _unpack_oracle(forged, tmp_path, originals)


def test_forged_record_contents_are_caught(small_pack: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    """A record whose checksum was forged to match changed bytes: the tensor digest catches it."""
    data, originals = small_pack
    p = tmp_path / "s.ggufpack"
    p.write_bytes(data)
    with PackReader(p) as r:
        delta = next(t for t in r.tensors if t.codec == "delta")
        plain = next(t for t in r.tensors if t.codec == "plain" and r.data(t.chunks[0], None, "", 1 << 30))
        offs = [(delta.chunks[0], "residual"), (delta.factors, "factors"), (plain.chunks[0], "plain")]
    for off, what in offs:
        blen = fmt.RECORD.unpack_from(data, off)[4]
        body = bytearray(data[off + fmt.RECORD.size : off + fmt.RECORD.size + blen])
        rc = fmt.RECORD.unpack_from(data, off)[1]
        if rc == fmt.REC_STORED:
            body[len(body) // 2] ^= 0x10
            forged = reseal_record(data, off, bytes(body))
        else:  # a valid zstd frame of other bytes, same declared size
            dec = fmt.RECORD.unpack_from(data, off)[5]
            raw = bytearray(codec.decompress(bytes(body), dec))
            raw[len(raw) // 2] ^= 0x10
            z = codec.compress(bytes(raw), 3)
            kind = fmt.RECORD.unpack_from(data, off)[0]
            rec = fmt.RECORD.pack(kind, rc, 0, 0, len(z), dec, xxhash.xxh3_128_digest(z))
            # keep the record length: pad by moving nothing -- only possible when sizes match, else skip
            if len(z) != blen:
                forged = None
            else:
                forged = data[:off] + rec + z + data[off + fmt.RECORD.size + blen :]
        if forged is not None:
            assert _unpack_oracle(forged, tmp_path, originals) != "ok", what


# ---------------------------------------------------------------------------------------------------------
# fuzz: random mutations of the bytes


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    n = draw(st.integers(1, 3))
    ops = []
    for _ in range(n):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "int", "tail", "head"]))
        ops.append((kind, draw(st.integers(0, 1 << 62)), draw(st.integers(0, (1 << 64) - 1))))
    return ops


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in ops:
        if not b:
            break
        at = pos % len(b)
        if kind == "flip":
            b[at] ^= 1 << (val % 8)
        elif kind == "truncate":
            del b[at:]
        elif kind == "insert":
            b[at:at] = val.to_bytes(8, "little")[: 1 + val % 8]
        elif kind == "delete":
            del b[at : at + 1 + val % 16]
        elif kind == "int":  # an aligned 8-byte field anywhere: lengths, offsets, sizes
            at -= at % 8
            b[at : at + 8] = val.to_bytes(8, "little")[: len(b) - at]
        elif kind == "tail" and len(b) >= 32:  # the tail's index offset and length
            at = len(b) - 32 + (pos % 2) * 8
            b[at : at + 8] = val.to_bytes(8, "little")
        elif kind == "head" and len(b) >= 16:
            b[8 + pos % 8] = val & 0xFF
    return bytes(b)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=mutations())
def test_fuzz_unpack(ops: list[tuple[str, int, int]], small_pack: tuple[bytes, dict[str, str]],
                     tmp_path_factory: pytest.TempPathFactory) -> None:
    data, originals = small_pack
    tmp = tmp_path_factory.mktemp("fuzz")
    _unpack_oracle(_mutate(data, ops), tmp, originals)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(paths=st.lists(st.sampled_from(["files", "tensors", "blobs"]), min_size=1, max_size=3),
       picks=st.lists(st.integers(0, 1 << 30), min_size=3, max_size=3),
       value=st.one_of(st.integers(-(1 << 70), 1 << 70), st.text(max_size=5), st.none(), st.booleans(),
                       st.lists(st.integers(0, 1 << 40), max_size=3), st.floats(),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)))
def test_fuzz_forged_index_values(paths: list[str], picks: list[int], value: object,
                                  small_pack: tuple[bytes, dict[str, str]],
                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any one value of the index replaced (checksums kept right): still only the two outcomes."""
    data, originals = small_pack

    def change(ix: dict) -> None:
        for where in paths:
            items = ix[where]
            obj = items[picks[0] % len(items)]
            keys = sorted(obj)
            key = keys[picks[1] % len(keys)]
            if isinstance(obj[key], list) and obj[key] and picks[2] % 2:
                obj[key][picks[2] % len(obj[key])] = value
            else:
                obj[key] = value

    tmp = tmp_path_factory.mktemp("fuzzix")
    _unpack_oracle(rewrite_index(data, change), tmp, originals)


def test_read_index_fuzz_oracle(small_pack: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    """read_index: the index or GGUFSplitError, for every truncation point near the end and a sweep of flips."""
    data, _ = small_pack
    p = tmp_path / "r.ggufpack"
    cuts = list(range(len(data) - 200, len(data))) + list(range(0, 64))
    for cut in cuts:
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFSplitError):
            read_index(p)
    for i in range(len(data) - 48, len(data)):
        b = bytearray(data)
        b[i] ^= 0x40
        p.write_bytes(bytes(b))
        try:
            read_index(p)
        except GGUFSplitError:
            pass
