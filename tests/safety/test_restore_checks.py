"""Restore checks what it wrote, checks free space first, and never replaces a user's file with a bad one.

The writer is sabotaged in-process (a corrupted byte in the kernel copy, a short write of a literal span,
a skipped zero run, ENOSPC from the disk, a file system reporting no free space) and restore must refuse
with one line (through the CLI), rename nothing into place, leave no temporary file, and leave an earlier
output of the same name as it was.
"""

from __future__ import annotations

import errno
import importlib
import os
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from helpers import base_tensors, write_model, one_line
from gguf_split import GGUFSplitError, restore, split
from gguf_split.cli.app import app
from gguf_split.format.names import TMP_SUFFIX

restore_mod = importlib.import_module("gguf_split.splitdir.restore")
commit_mod = importlib.import_module("gguf_split.disk.commit")

CHANGED = "blk.0.attn_q.weight"
EARLIER = b"the user's earlier restore, not to be lost\n"


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    a = base_tensors(0)
    b = dict(a)
    qt, shape, seed = a[CHANGED]
    b[CHANGED] = (qt, shape, seed + 777)
    write_model(tmp_path / "a.gguf", a)
    write_model(tmp_path / "b.gguf", b)
    split({"a": tmp_path / "a.gguf", "b": tmp_path / "b.gguf"}, tmp_path / "split", file_cost=0)
    out = tmp_path / "out"
    out.mkdir()
    return {"root": tmp_path, "split": tmp_path / "split", "out": out, "b": tmp_path / "b.gguf"}


def run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def temporaries(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(TMP_SUFFIX) or n.startswith(".")]


# Sabotage of the span writer: each replaces one function restore writes with by a faulty version.


def corrupt_copy(real: Callable) -> Callable:
    """The kernel copy of one tensor puts one wrong byte in the output (a writer bug, a bad disk)."""
    def copy_bytes(src, offset, n, fd, bar):  # noqa: ANN001
        real(src, offset, n, fd, bar)
        os.lseek(fd, -1, os.SEEK_CUR)
        os.write(fd, b"\x5a")
    return copy_bytes


def short_literal(real: Callable) -> Callable:
    """A literal span (the header) loses its last byte, as a short write nobody retried would."""
    def write_all(fd, data):  # noqa: ANN001
        real(fd, bytes(data)[:-1])
    return write_all


def skipped_zeros(real: Callable) -> Callable:
    """A zero run is not written at all (a seek-past bug): later bytes land at the wrong offsets."""
    def write_zeros(fd, n):  # noqa: ANN001
        return None
    return write_zeros


SABOTAGE = {"copy_bytes": corrupt_copy, "write_all": short_literal, "write_zeros": skipped_zeros}


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-earlier-output"])
@pytest.mark.parametrize("target", list(SABOTAGE))
def test_restore_checks_what_it_wrote(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, target: str,
                                      earlier: bool) -> None:
    out = world["out"] / "b.gguf"
    if earlier:
        out.write_bytes(EARLIER)
    monkeypatch.setattr(restore_mod, target, SABOTAGE[target](getattr(restore_mod, target)))
    args = ["restore", "-q", str(world["split"]), "b", "-o", str(world["out"])] + (["--force"] if earlier else [])
    code, stdout, stderr = run(args)
    line = one_line(code, stderr, world["split"], "does not match the original's recorded digest")
    assert "nothing was written" in line
    assert stdout == ""
    assert os.listdir(world["out"]) == (["b.gguf"] if earlier else [])
    if earlier:
        assert out.read_bytes() == EARLIER
    assert temporaries(world["out"]) == []


def test_sabotage_is_real(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the read-back check, the sabotaged writer would have put a wrong file in place."""
    monkeypatch.setattr(restore_mod, "copy_bytes", corrupt_copy(restore_mod.copy_bytes))
    monkeypatch.setattr(restore_mod, "read_back", lambda path, bar: _digest_of(world["b"]))
    r = restore(world["split"], world["out"], task="b")
    assert Path(r.output).read_bytes() != world["b"].read_bytes()


def _digest_of(p: Path) -> str:
    import xxhash

    return xxhash.xxh3_128(p.read_bytes()).hexdigest()


def test_restore_output_directory_gets_the_original_name(world: dict[str, Path]) -> None:
    code, stdout, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", str(world["out"])])
    assert code == 0, stderr
    assert os.listdir(world["out"]) == ["b.gguf"]
    assert (world["out"] / "b.gguf").read_bytes() == world["b"].read_bytes()
    assert str(world["out"] / "b.gguf") in stdout
    # the same again: the file already holds the original (checked), so it is kept as it is
    before = os.stat(world["out"] / "b.gguf")
    code, stdout, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", str(world["out"])])
    assert code == 0, stderr
    assert "already there" in stdout
    after = os.stat(world["out"] / "b.gguf")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # another file of that name: refused without --force (which it names, and which then works)
    (world["out"] / "b.gguf").write_bytes(EARLIER)
    code, _, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", str(world["out"])])
    one_line(code, stderr, world["out"] / "b.gguf", "use --force")
    assert (world["out"] / "b.gguf").read_bytes() == EARLIER
    code, _, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", str(world["out"]), "--force"])
    assert code == 0, stderr
    assert (world["out"] / "b.gguf").read_bytes() == world["b"].read_bytes()


def test_restore_empty_output_is_refused(world: dict[str, Path]) -> None:
    code, _, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", ""])
    one_line(code, stderr, "-o/--output", "empty path")


class _Full:
    f_bavail = 2
    f_frsize = 4096
    f_bsize = 4096


def test_free_space_is_checked_before_writing(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """No room: one line up front naming the output directory; nothing written (the span writer is never
    called), an earlier output kept."""
    (world["out"] / "b.gguf").write_bytes(EARLIER)
    monkeypatch.setattr(os, "statvfs", lambda p: _Full())
    monkeypatch.setattr(restore_mod, "_write_spans", lambda *a: pytest.fail("wrote before checking free space"))
    code, _, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", str(world["out"]), "--force"])
    one_line(code, stderr, world["out"], "not enough free space")
    assert os.listdir(world["out"]) == ["b.gguf"] and (world["out"] / "b.gguf").read_bytes() == EARLIER


@pytest.mark.parametrize("fail_in", ["copy_file_range", "write"])
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-earlier-output"])
def test_enospc_while_restoring(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch, fail_in: str,
                                earlier: bool) -> None:
    """The disk fills up mid-write: one line naming the output file, nothing left, an earlier output kept."""
    out = world["out"] / "b.gguf"
    if earlier:
        out.write_bytes(EARLIER)
    real = getattr(os, fail_in)
    count = [0]

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003
        count[0] += 1
        if count[0] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, fail_in, failing)
    code, _, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", str(world["out"])]
                          + (["--force"] if earlier else []))
    monkeypatch.setattr(os, fail_in, real)
    assert count[0] >= 2, f"{fail_in} was not reached"
    one_line(code, stderr, out, "No space left on device")
    assert os.listdir(world["out"]) == (["b.gguf"] if earlier else [])
    if earlier:
        assert out.read_bytes() == EARLIER


def test_failed_fsync_fails_the_restore(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An error found at write-back (fsync) is an error too, naming the output."""
    real = os.fsync

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(TMP_SUFFIX):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(GGUFSplitError, match="Input/output error") as e:
        restore(world["split"], world["out"], task="b")
    assert e.value.path == str(world["out"] / "b.gguf")
    assert os.listdir(world["out"]) == []


# -o: a directory is an existing one or any path ending in a slash; a sharded model needs a directory


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_restore_into_a_missing_directory(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                          relative: bool) -> None:
    """0.2: `-o newdir/` said "/current/dir/: is a directory". A missing directory is created."""
    monkeypatch.chdir(world["root"])
    target = "newdir/" if relative else f"{world['root'] / 'newdir'}/"
    code, stdout, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", target])
    assert code == 0, stderr
    assert os.listdir(world["root"] / "newdir") == ["b.gguf"]
    assert (world["root"] / "newdir" / "b.gguf").read_bytes() == world["b"].read_bytes()
    assert str(world["root"] / "newdir" / "b.gguf") in stdout


def test_a_failed_restore_leaves_no_new_directory(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restore_mod, "copy_bytes", corrupt_copy(restore_mod.copy_bytes))
    code, _, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", f"{world['root'] / 'newdir'}/"])
    one_line(code, stderr, world["split"], "does not match the original's recorded digest")
    assert not (world["root"] / "newdir").exists()


def test_restore_into_a_path_under_a_file(world: dict[str, Path]) -> None:
    (world["out"] / "notes.txt").write_text("mine")
    code, _, stderr = run(["restore", "-q", str(world["split"]), "b", "-o", f"{world['out'] / 'notes.txt'}/"])
    one_line(code, stderr, world["out"] / "notes.txt", "not a directory")
    assert os.listdir(world["out"]) == ["notes.txt"]


@pytest.fixture
def sharded(tmp_path: Path) -> dict[str, Path]:
    from helpers import write_sharded

    (tmp_path / "shards").mkdir()
    first = write_sharded(tmp_path / "shards" / "big", base_tensors(), 3)
    split({"big": first}, tmp_path / "split")
    return {"root": tmp_path, "split": tmp_path / "split", "shards": tmp_path / "shards"}


def test_sharded_model_restored_to_a_gguf_name_is_refused(sharded: dict[str, Path]) -> None:
    """0.2: `-o single.gguf` silently became a directory named single.gguf holding the 3 shards."""
    target = sharded["root"] / "single.gguf"
    code, _, stderr = run(["restore", "-q", str(sharded["split"]), "big", "-o", str(target)])
    line = one_line(code, stderr, target, "3 files (shards)")
    assert "give a directory" in line
    assert not target.exists()


@pytest.mark.parametrize("slash", [True, False], ids=["dir-slash", "dir-name"])
def test_sharded_model_restored_to_a_directory(sharded: dict[str, Path], slash: bool) -> None:
    target = sharded["root"] / "restored"
    code, _, stderr = run(["restore", "-q", str(sharded["split"]), "big", "-o", str(target) + ("/" if slash else "")])
    assert code == 0, stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == \
        {p.name: p.read_bytes() for p in sharded["shards"].iterdir()}
