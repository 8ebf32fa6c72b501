"""Bad input through the CLI: exit code 2, one line naming the file and the problem, no traceback, the
output directory exactly as it was (or still absent), and the inputs untouched.

Broken files are made from good GGUFWriter files, cut or patched at offsets found with gguf's GGUFReader
(not with gguf-split's own reader), so the tests do not depend on the code they check.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from typer.testing import CliRunner

from helpers import base_tensors, sha256, write_model
from gguf_split import restore, split
from gguf_split.cli.app import app
from gguf_split.assemble.report import SplitReport

Factory = Callable[..., str]
ERROR_PREFIX = "gguf-split: error: "


# ---------------------------------------------------------------------------------------------------------
# running and observing


def run_cli(tasks: dict[str, str], out: Path, *extra: str) -> tuple[int, str, str]:
    """`gguf-split split -q -t ... -o out` in-process: (exit code, stdout, stderr)."""
    args = ["split", "-q", *[f"--task={k}={v}" for k, v in tasks.items()], "-o", str(out), *extra]
    result = CliRunner().invoke(app, args)
    # anything but SystemExit escaping the command is a bug (a traceback for the user)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def run_module(args: list[str], cwd: Path, preexec_fn: Callable[[], None] | None = None) -> tuple[int, str, str]:
    """`python -m gguf_split ARGS` as a real process."""
    p = subprocess.run([sys.executable, "-m", "gguf_split", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=120, preexec_fn=preexec_fn)
    return p.returncode, p.stdout, p.stderr


Snapshot = dict[str, tuple[str, bytes | str]] | None


def snapshot(d: Path) -> Snapshot:
    """Every entry under `d` (hidden ones too) with its bytes or link target; None if `d` does not exist."""
    if not os.path.lexists(d):
        return None
    out: dict[str, tuple[str, bytes | str]] = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(d))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def input_state(paths: list[str]) -> dict[str, tuple[str, int]]:
    return {p: (sha256(p), os.stat(p).st_mtime_ns) for p in paths if os.path.isfile(p)}


def assert_one_line_error(code: int, stderr: str, culprit: str | Path, fragment: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(ERROR_PREFIX), stderr
    assert "Traceback" not in stderr
    assert str(culprit) in lines[0], f"{culprit} not named in: {lines[0]}"
    assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in: {lines[0]}"


# ---------------------------------------------------------------------------------------------------------
# broken inputs, each next to a good model "base"


class Case(NamedTuple):
    tasks: dict[str, str]
    culprit: str  # the file the error must name
    fragment: str  # a piece of the problem text


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def cut(src: str, at: int, tmp: Path) -> str:
    return write_bytes(tmp / "cut.gguf", Path(src).read_bytes()[:at])


def patched(src: str, at: int, data: bytes, tmp: Path, name: str = "patched.gguf") -> str:
    raw = bytearray(Path(src).read_bytes())
    raw[at : at + len(data)] = data
    return write_bytes(tmp / name, bytes(raw))


def replaced_once(src: str, old: bytes, new: bytes, tmp: Path) -> str:
    raw = Path(src).read_bytes()
    assert raw.count(old) == 1 and len(old) == len(new)
    return write_bytes(tmp / "replaced.gguf", raw.replace(old, new))


def kv_value_offset(reader: GGUFReader, key: str) -> int:
    """Offset of a KV's value: after the key's u64 length, the key, and the u32 value type."""
    return reader.fields[key].offset + 8 + len(key.encode()) + 4


def tensor_field_offset(reader: GGUFReader, index: int, part: int) -> int:
    """Offset of part `part` of tensor info `index` (parts: name length, name, n_dims, dims, type, offset)."""
    f = reader.tensors[index].field
    return f.offset + sum(p.nbytes for p in f.parts[:part])


def bad(make: Factory, tmp: Path, path: str, fragment: str) -> Case:
    return Case({"base": make("base"), "bad": path}, path, fragment)


def case_not_gguf(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, write_bytes(tmp / "notes.gguf", b"these are notes, not a model at all\n" * 4), "not a GGUF")


def case_empty(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, write_bytes(tmp / "empty.gguf", b""), "empty")


def case_too_short(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, write_bytes(tmp / "short.gguf", b"GGUF\x03\x00\x00\x00\x01"), "too short")


def case_cut_in_kvs(make: Factory, tmp: Path) -> Case:
    m = make("m")
    return bad(make, tmp, cut(m, GGUFReader(m).fields["tokenizer.ggml.tokens"].offset + 30, tmp), "truncated")


def case_cut_in_tensor_infos(make: Factory, tmp: Path) -> Case:
    m = make("m")
    return bad(make, tmp, cut(m, tensor_field_offset(GGUFReader(m), 3, 1) + 3, tmp), "truncated")


def case_cut_in_data(make: Factory, tmp: Path) -> Case:
    m = make("m")
    return bad(make, tmp, cut(m, int(GGUFReader(m).tensors[-1].data_offset) + 10, tmp), "truncated")


def case_huge_n_tensors(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, patched(make("m"), 8, struct.pack("<Q", 1 << 62), tmp), "tensors")


def case_huge_n_kv(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, patched(make("m"), 16, struct.pack("<Q", 1 << 62), tmp), "key/value pairs")


def case_one_kv_too_many(make: Factory, tmp: Path) -> Case:
    """n_kv + 1: the first tensor info is read as a KV, everything after it is misread."""
    m = make("m")
    n_kv = GGUFReader(m).fields["GGUF.kv_count"].contents()
    return bad(make, tmp, patched(m, 16, struct.pack("<Q", n_kv + 1), tmp), "")


def case_huge_string_length(make: Factory, tmp: Path) -> Case:
    m = make("m")
    return bad(make, tmp, patched(m, kv_value_offset(GGUFReader(m), "general.name"), struct.pack("<Q", 1 << 40), tmp),
               "truncated")


def case_huge_array_count(make: Factory, tmp: Path) -> Case:
    m = make("m")
    at = kv_value_offset(GGUFReader(m), "tokenizer.ggml.tokens") + 4  # after the element type
    return bad(make, tmp, patched(m, at, struct.pack("<Q", 1 << 50), tmp), "array claims")


def case_unknown_value_type(make: Factory, tmp: Path) -> Case:
    m = make("m")
    at = kv_value_offset(GGUFReader(m), "general.name") - 4
    return bad(make, tmp, patched(m, at, struct.pack("<I", 99), tmp), "unknown value type")


def case_unknown_ggml_type(make: Factory, tmp: Path) -> Case:
    m = make("m")
    return bad(make, tmp, patched(m, tensor_field_offset(GGUFReader(m), 0, 4), struct.pack("<I", 200), tmp),
               "unknown ggml type")


def case_tensor_offset_past_end(make: Factory, tmp: Path) -> Case:
    m = make("m")
    return bad(make, tmp, patched(m, tensor_field_offset(GGUFReader(m), 7, 5), struct.pack("<Q", 1 << 30), tmp),
               "past the end")


def case_misaligned_offset(make: Factory, tmp: Path) -> Case:
    m = make("m")
    reader = GGUFReader(m)
    at = tensor_field_offset(reader, 7, 5)
    offset = int(reader.tensors[7].data_offset - reader.data_offset)
    return bad(make, tmp, patched(m, at, struct.pack("<Q", offset + 4), tmp), "alignment")


def case_duplicate_tensor_names(make: Factory, tmp: Path) -> Case:
    m = make("m", {"blk.0.attn_k.weight": (Q.F32, (64,), 7)})
    return bad(make, tmp, replaced_once(m, b"blk.0.attn_k.weight", b"blk.0.attn_q.weight", tmp), "duplicate tensor name")


def case_duplicate_kv_keys(make: Factory, tmp: Path) -> Case:
    m = make("m", kvs=lambda w: (w.add_uint32("test.dup_a", 1), w.add_uint32("test.dup_b", 2)))
    return bad(make, tmp, replaced_once(m, b"test.dup_b", b"test.dup_a", tmp), "duplicate key")


def shard_kvs(no: int, count: int) -> Callable[[GGUFWriter], None]:
    """The split.* KVs of shard `no` of a `count`-file llama.cpp split."""

    def add(w: GGUFWriter) -> None:
        w.add_uint16("split.no", no)
        w.add_uint16("split.count", count)
        w.add_int32("split.tensors.count", 16)
    return add


def case_shard_0(make: Factory, tmp: Path) -> Case:
    """The first of 2 shards, named so that its sibling cannot be found."""
    return bad(make, tmp, make("shard", kvs=shard_kvs(0, 2)), "00001-of-00002")


def case_shard_1(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, make("shard", kvs=shard_kvs(1, 2)), "first shard")


def case_shard_sibling_missing(make: Factory, tmp: Path) -> Case:
    first = make("model-00001-of-00002", kvs=shard_kvs(0, 2))
    return Case({"base": make("base"), "bad": first}, str(tmp / "model-00002-of-00002.gguf"), "is missing")


def case_dev_zero(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, "/dev/zero", "is a character device")


def case_fifo(make: Factory, tmp: Path) -> Case:
    os.mkfifo(tmp / "pipe.gguf")
    return bad(make, tmp, str(tmp / "pipe.gguf"), "is a FIFO")


def case_directory(make: Factory, tmp: Path) -> Case:
    (tmp / "dir.gguf").mkdir()
    return bad(make, tmp, str(tmp / "dir.gguf"), "is a directory")


def earlier_split(make: Factory, tmp: Path) -> SplitReport:
    report = split({"base": make("base"), "chat": make("chat", {"blk.0.attn_q.weight": 9})}, tmp / "earlier",
                   file_cost=0)  # tiny models: share anyway, so there is a shared file
    assert report.shares_anything
    return report


def case_adaptor_as_input(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, earlier_split(make, tmp).tasks[1].adaptor, "gguf-split adaptor")


def case_shared_file_as_input(make: Factory, tmp: Path) -> Case:
    report = earlier_split(make, tmp)
    return bad(make, tmp, os.path.join(report.directory, report.files[0].name), "gguf-split shared")


def case_other_architecture(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, make("other", arch="gpt2"), "architecture")


def case_no_tensor_in_common(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, make("unrelated", {name: 777 + i for i, name in enumerate(base_tensors())}),
               "no tensor in common")


def case_missing_file(make: Factory, tmp: Path) -> Case:
    return bad(make, tmp, str(tmp / "nowhere.gguf"), "not found")


def case_same_file_twice(make: Factory, tmp: Path) -> Case:
    base = make("base")
    return Case({"a": base, "b": base}, base, "given twice")


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("out_state", ["absent", "present"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(model_factory: Factory, tmp_path: Path, case: str,
                                                   out_state: str) -> None:
    c = CASES[case](model_factory, tmp_path)
    out = tmp_path / "out"
    if out_state == "present":
        out.mkdir()
        (out / "keep.txt").write_text("not ours")
    before_out, before_in = snapshot(out), input_state(list(c.tasks.values()))
    code, stdout, stderr = run_cli(c.tasks, out)
    assert_one_line_error(code, stderr, c.culprit, c.fragment)
    assert stdout == ""
    assert snapshot(out) == before_out
    assert input_state(list(c.tasks.values())) == before_in


@pytest.mark.parametrize("case", ["not_gguf", "cut_in_data", "shard_0"])
def test_bad_input_in_a_real_process(model_factory: Factory, tmp_path: Path, case: str) -> None:
    c = CASES[case](model_factory, tmp_path)
    before_in = input_state(list(c.tasks.values()))
    args = ["split", "-q", *[a for k, v in c.tasks.items() for a in ("-t", f"{k}={v}")], "-o", str(tmp_path / "out")]
    code, stdout, stderr = run_module(args, tmp_path)
    assert_one_line_error(code, stderr, c.culprit, c.fragment)
    assert not (tmp_path / "out").exists()
    assert input_state(list(c.tasks.values())) == before_in


@pytest.mark.parametrize("case", ["other_architecture", "no_tensor_in_common"])
def test_allow_unrelated_splits_anyway(model_factory: Factory, tmp_path: Path, case: str) -> None:
    c = CASES[case](model_factory, tmp_path)
    code, _, stderr = run_cli(c.tasks, tmp_path / "out", "--allow-unrelated")
    assert code == 0, stderr
    for task, src in c.tasks.items():
        restored = tmp_path / f"{task}.restored.gguf"
        restore(tmp_path / "out" / f"adaptor-{task}.gguf", restored)
        assert sha256(restored) == sha256(src)


# ---------------------------------------------------------------------------------------------------------
# output directory problems


def two_models(make: Factory) -> dict[str, str]:
    return {"base": make("base"), "chat": make("chat", {"blk.0.attn_q.weight": 21})}


def test_output_parent_is_a_file(model_factory: Factory, tmp_path: Path) -> None:
    tasks = two_models(model_factory)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    out = blocker / "out"
    before_in = input_state(list(tasks.values()))
    code, _, stderr = run_cli(tasks, out)
    assert_one_line_error(code, stderr, out, "cannot create directory")
    assert blocker.read_text() == "a file, not a directory"
    assert input_state(list(tasks.values())) == before_in


def test_output_is_a_file(model_factory: Factory, tmp_path: Path) -> None:
    tasks = two_models(model_factory)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    code, _, stderr = run_cli(tasks, blocker)
    assert_one_line_error(code, stderr, blocker, "not a directory")
    assert blocker.read_text() == "a file, not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see test_output_parent_is_a_file")
def test_output_directory_not_writable(model_factory: Factory, tmp_path: Path) -> None:
    tasks = two_models(model_factory)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        before = snapshot(out)
        code, _, stderr = run_cli(tasks, out)
        assert_one_line_error(code, stderr, out, "")
        assert snapshot(out) == before
    finally:
        out.chmod(0o700)


FSIZE_LIMIT = 8192  # bytes: the inputs are ~20 KB, so is each adaptor (nothing shared at the default file cost); writing fails half-way


def small_disk() -> None:
    """preexec_fn: every file this process writes is capped (as on a full disk); EFBIG, not a signal."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


@pytest.mark.parametrize("out_state", ["absent", "present"])
def test_full_disk_leaves_output_as_it_was(model_factory: Factory, tmp_path: Path, out_state: str) -> None:
    tasks = two_models(model_factory)
    assert all(os.path.getsize(p) > FSIZE_LIMIT for p in tasks.values())
    out = tmp_path / "out"
    if out_state == "present":
        out.mkdir()
        (out / "keep.txt").write_text("not ours")
    before_out, before_in = snapshot(out), input_state(list(tasks.values()))
    args = ["split", "-q", "-t", f"base={tasks['base']}", "-t", f"chat={tasks['chat']}", "-o", str(out)]
    code, _, stderr = run_module(args, tmp_path, preexec_fn=small_disk)
    assert_one_line_error(code, stderr, out, "write failed")
    assert snapshot(out) == before_out
    assert input_state(list(tasks.values())) == before_in


def test_existing_outputs_need_force(model_factory: Factory, tmp_path: Path) -> None:
    first = two_models(model_factory)
    out = tmp_path / "out"
    code, _, stderr = run_cli(first, out, "--link", "--file-cost", "0")
    assert code == 0, stderr
    second = {"base": first["base"], "code": model_factory("code", {"blk.0.ffn_up.weight": 22})}
    inputs = list(first.values()) + list(second.values())
    before_out, before_in = snapshot(out), input_state(inputs)

    # the directory holds task chat, which this split does not include: refused, and --force cannot help
    for extra in ((), ("--force",)):
        code, _, stderr = run_cli(second, out, "--link", "--file-cost", "0", *extra)
        assert_one_line_error(code, stderr, out, "other tasks (chat)")
        assert "--force" not in stderr
        assert snapshot(out) == before_out

    # every task of the directory in the split: refused without --force (which it names), done with it
    third = {**second, "chat": first["chat"]}
    code, _, stderr = run_cli(third, out, "--link", "--file-cost", "0")
    assert_one_line_error(code, stderr, out / "adaptor-base.gguf", "use --force")
    assert snapshot(out) == before_out
    code, _, stderr = run_cli(third, out, "--link", "--file-cost", "0", "--force")
    assert code == 0, stderr
    after = snapshot(out)
    assert after is not None and before_out is not None
    assert after["adaptor-base.gguf"] != before_out["adaptor-base.gguf"], "adaptor not replaced"
    n = len(SplitFileNames.of(out, "code"))
    assert after[f"code-00001-of-{n:05d}.gguf"] == ("link", "adaptor-code.gguf")
    for task, src in third.items():
        restored = tmp_path / f"{task}.restored.gguf"
        restore(out / f"adaptor-{task}.gguf", restored)
        assert sha256(restored) == sha256(src)
    assert input_state(inputs) == before_in
    assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary files left behind"


class SplitFileNames:
    @staticmethod
    def of(directory: Path, task: str) -> list[str]:
        """The task's files in llama.cpp order, from gguf-split's records."""
        from gguf_split.splitdir.directory import open_task

        with open_task(directory / f"adaptor-{task}.gguf") as tf:
            return tf.paths()


def test_input_inside_output_directory_is_not_overwritten(tmp_path: Path) -> None:
    """An input named like an output, in the output directory, with --force: refused, input intact."""
    out = tmp_path / "out"
    out.mkdir()
    base = write_model(out / "adaptor-base.gguf", base_tensors())
    chat = write_model(tmp_path / "chat.gguf", {**base_tensors(), "blk.0.attn_q.weight": (Q.Q4_0, (64, 64), 23)})
    before_out, before_in = snapshot(out), input_state([base, chat])
    code, _, stderr = run_cli({"base": base, "chat": chat}, out, "--force")
    assert_one_line_error(code, stderr, base, "input")
    assert snapshot(out) == before_out
    assert input_state([base, chat]) == before_in


def test_background_fsync_failure_fails_the_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs are fsynced in a background thread while the next is written: a failing fsync (a full
    disk found at write-back) must still fail the split, naming the file, with nothing left behind."""
    import errno

    from gguf_split import GGUFSplitError

    a = write_model(tmp_path / "a.gguf", base_tensors())
    b = write_model(tmp_path / "b.gguf", {**base_tensors(), "output_norm.weight": (Q.F32, (64,), 99)})
    out = tmp_path / "out"
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if "adaptor-b" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(GGUFSplitError) as e:
        split({"a": a, "b": b}, out)
    assert "adaptor-b.gguf" in str(e.value) and "No space" in str(e.value)
    assert not out.exists()
