"""Packs of a split directory and of models, end to end (the codecs and the format are test_pack.py's).

Oracles: sha256 of every file given back against the file packed; a split given back verifies and every
task restores byte for byte; `unpack --restore` gives the original models (a sharded one as its shards);
an unpack killed at every step of its commit leaves nothing or everything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import base_tensors, write_model, write_sharded
from gguf_split import GGUFSplitError, split, verify
from gguf_split.cli.app import app
from gguf_split.demo import make_demo_models
from gguf_split.splitdir.restore import restore
from gguf_split.pack.transport import pack, unpack_to


def sha(p: Path | str) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def regular(d: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    root = tmp_path_factory.mktemp("transport")
    models = make_demo_models(root / "models")
    split(models, root / "split", file_cost=0, link=True)
    return models, root / "split"


def test_split_pack_gives_back_the_split(demo, tmp_path: Path) -> None:
    models, split_dir = demo
    r = pack(tmp_path / "s.ggufpack", split_dir=split_dir)
    assert r.pack_bytes < sum(os.path.getsize(p) for p in split_dir.iterdir() if not p.is_symlink())
    out = tmp_path / "back"
    unpack_to(tmp_path / "s.ggufpack", out)
    assert regular(out) == regular(split_dir)  # links are not packed: every regular file, byte for byte
    verify([out])
    for task, path in models.items():
        assert sha(restore(out, tmp_path / f"{task}.gguf", task=task).output) == sha(path)


def test_unpack_restore_gives_the_original_models(demo, tmp_path: Path) -> None:
    models, split_dir = demo
    pack(tmp_path / "s.ggufpack", split_dir=split_dir)
    out = tmp_path / "models"
    r = unpack_to(tmp_path / "s.ggufpack", out, restore=True)
    assert sorted(r.tasks) == sorted(models)
    assert regular(out) == {os.path.basename(p): sha(p) for p in models.values()}
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the temporary split is gone


def test_models_pack_with_a_sharded_model(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    first = write_sharded(shards / "big", base_tensors(), 3)
    other = write_model(tmp_path / "other.gguf", base_tensors(1))
    pack(tmp_path / "m.ggufpack", tasks={"big": first, "other": other})
    out = tmp_path / "out"
    unpack_to(tmp_path / "m.ggufpack", out, restore=True)  # a models pack: --restore is the same
    want = {p.name: sha(p) for p in shards.iterdir()}
    want["other.gguf"] = sha(other)
    assert regular(out) == want


def test_models_with_one_file_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_model(tmp_path / "a" / "m.gguf", base_tensors())
    b = write_model(tmp_path / "b" / "m.gguf", base_tensors(2))
    with pytest.raises(GGUFSplitError, match="same file name"):
        pack(tmp_path / "x.ggufpack", tasks={"a": a, "b": b})
    assert not (tmp_path / "x.ggufpack").exists()


def test_unpack_refuses_existing_files_without_force(demo, tmp_path: Path) -> None:
    _, split_dir = demo
    pack(tmp_path / "s.ggufpack", split_dir=split_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "adaptor-chat.gguf").write_bytes(b"mine")
    with pytest.raises(GGUFSplitError, match="--force"):
        unpack_to(tmp_path / "s.ggufpack", out)
    assert [p.name for p in out.iterdir()] == ["adaptor-chat.gguf"]
    assert (out / "adaptor-chat.gguf").read_bytes() == b"mine"
    unpack_to(tmp_path / "s.ggufpack", out, force=True)
    assert regular(out) == regular(split_dir)


def test_unpack_again_keeps_files_already_in_place(demo, tmp_path: Path) -> None:
    """A file with the size and xxh3-128 the pack records is kept (a run killed after its switch can be run
    again without --force); another file of that name is still refused."""
    _, split_dir = demo
    pack(tmp_path / "s.ggufpack", split_dir=split_dir)
    out = tmp_path / "out"
    unpack_to(tmp_path / "s.ggufpack", out)
    inode = (out / "adaptor-chat.gguf").stat().st_ino
    (out / "adaptor-code.gguf").unlink()
    r = unpack_to(tmp_path / "s.ggufpack", out)
    assert regular(out) == regular(split_dir) and (out / "adaptor-chat.gguf").stat().st_ino == inode
    assert r.bytes_written == os.path.getsize(split_dir / "adaptor-code.gguf")
    assert len(r.kept) == len(regular(split_dir)) - 1
    (out / "adaptor-code.gguf").write_bytes(b"mine")
    with pytest.raises(GGUFSplitError, match="already exists"):
        unpack_to(tmp_path / "s.ggufpack", out)


def test_cli_pack_unpack_and_info(demo, tmp_path: Path) -> None:
    models, split_dir = demo
    runner = CliRunner()
    r = runner.invoke(app, ["pack", str(split_dir), "-o", str(tmp_path / "s.ggufpack"), "-q"])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["info", str(tmp_path / "s.ggufpack")])
    assert r.exit_code == 0 and "pack v1 of split" in r.stdout and "adaptor-chat.gguf" in r.stdout
    r = runner.invoke(app, ["unpack", str(tmp_path / "s.ggufpack"), "-o", str(tmp_path / "m"), "--restore", "-q"])
    assert r.exit_code == 0, r.stderr
    assert regular(tmp_path / "m") == {os.path.basename(p): sha(p) for p in models.values()}
    r = runner.invoke(app, ["unpack", str(tmp_path / "nope.ggufpack"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.stderr.startswith("gguf-split: error: ") and len(r.stderr.splitlines()) == 1


def test_unpack_killed_at_every_step_leaves_nothing_or_everything(demo, tmp_path: Path) -> None:
    _, split_dir = demo
    pk = tmp_path / "s.ggufpack"
    pack(pk, split_dir=split_dir)
    want = regular(split_dir)
    args = [sys.executable, "-m", "gguf_split", "unpack", "-q", str(pk), "-o"]
    log = tmp_path / "steps.log"
    p = subprocess.run([*args, str(tmp_path / "steps")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "GGUF_SPLIT_TEST_STEPS": str(log)})
    assert p.returncode == 0, p.stderr
    n = len(log.read_text().splitlines())
    assert n >= len(want) + 3
    outcomes = set()
    for k in range(1, n + 1):
        out = tmp_path / f"k{k}"
        p = subprocess.run([*args, str(out)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "GGUF_SPLIT_TEST_KILL_AT": str(k)})
        assert p.returncode == -signal.SIGKILL, p.stderr
        got = regular(out) if out.exists() else {}
        got = {name: digest for name, digest in got.items() if not name.startswith(".")}
        from gguf_split.splitdir.directory import SplitDir

        if out.exists() and SplitDir.open(out).pending:  # switched: readers see the new state
            verify([out])
            outcomes.add("new")
        else:
            assert got in ({}, want), k
            outcomes.add("new" if got else "none")
    assert outcomes == {"none", "new"}


# ---------------------------------------------------------------------------------------------------------
# unpack --restore: all models or none, outputs checked before anything is written, the user's paths named


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


def one_error(code: int, stderr: str, *named: str | Path) -> str:
    """Exit 2 and one line naming each of `named`, never the hidden temporary directory."""
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gguf-split: error: "), stderr
    for n in named:
        assert str(n) in lines[0], lines[0]
    assert ".gguf-split-" not in lines[0], lines[0]
    return lines[0]


def listing(d: Path) -> dict[str, str]:
    """Every entry of d, hidden ones included: name -> sha256 of a file, or "dir"."""
    return {p.name: "dir" if p.is_dir() else sha(p) for p in d.iterdir()} if d.exists() else {}


def originals(models: dict[str, str]) -> dict[str, str]:
    return {os.path.basename(p): sha(p) for p in models.values()}


@pytest.fixture(scope="module")
def split_pack(demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, split_dir = demo
    pk = tmp_path_factory.mktemp("pack") / "fam.ggufpack"
    pack(pk, split_dir=split_dir)
    return pk


def test_unpack_restore_refuses_an_existing_file_before_writing_anything(demo, split_pack: Path,
                                                                        tmp_path: Path) -> None:
    """The issue's case: ur/code.gguf exists; nothing may be written (0.2 wrote base and chat, then failed)."""
    models, _ = demo
    out = tmp_path / "ur"
    out.mkdir()
    (out / "code.gguf").write_bytes(b"the user's own code.gguf\n")
    before = listing(out)
    code, stdout, stderr = run_cli("unpack", "-q", split_pack, "-o", out, "--restore")
    line = one_error(code, stderr, out / "code.gguf")
    assert "--force" in line and stdout == ""
    assert listing(out) == before
    code, _, stderr = run_cli("unpack", "-q", split_pack, "-o", out, "--restore", "--force")
    assert code == 0, stderr
    assert listing(out) == originals(models)


def test_unpack_restore_run_again_keeps_what_is_in_place(demo, split_pack: Path, tmp_path: Path) -> None:
    """Models already there byte for byte (a run killed after its commit, run again) are kept, not refused
    and not rewritten; a model of other bytes is still refused."""
    models, _ = demo
    out = tmp_path / "m"
    unpack_to(split_pack, out, restore=True)
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    code, stdout, stderr = run_cli("unpack", "-q", split_pack, "-o", out, "--restore")
    assert code == 0, stderr
    assert "0 B written, 4 of them already there" in stdout
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == stats
    (out / "chat.gguf").unlink()
    r = unpack_to(split_pack, out, restore=True)
    assert listing(out) == originals(models)
    assert sorted(os.path.basename(p) for p in r.kept) == ["base.gguf", "code.gguf", "summarize.gguf"]
    assert r.bytes_written == os.path.getsize(models["chat"])


def test_unpack_restore_never_replaces_a_gguf_split_file(demo, split_pack: Path, tmp_path: Path) -> None:
    _, split_dir = demo
    out = tmp_path / "m"
    out.mkdir()
    shutil.copy(split_dir / "adaptor-code.gguf", out / "chat.gguf")
    before = listing(out)
    code, _, stderr = run_cli("unpack", "-q", split_pack, "-o", out, "--restore", "--force")
    assert "gguf-split adaptor file" in one_error(code, stderr, out / "chat.gguf")
    assert listing(out) == before


def corrupt_record(data: bytes) -> bytes:
    """The pack with one byte of its largest data record's body flipped (its checksum then fails)."""
    from gguf_split.pack import format as fmt
    from gguf_split.pack.reader import PackReader

    with PackReader(io_path(data)) as r:
        offs = [t.chunks[0] for t in r.tensors]
    off = max(offs, key=lambda o: fmt.RECORD.unpack_from(data, o)[4])
    b = bytearray(data)
    b[off + fmt.RECORD.size + 10] ^= 0x40
    return bytes(b)


def io_path(data: bytes) -> Path:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".ggufpack", delete=False)
    f.write(data)
    f.close()
    return Path(f.name)


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
def test_unpack_restore_of_a_corrupt_pack_leaves_nothing(split_pack: Path, tmp_path: Path, existing: bool) -> None:
    bad = tmp_path / "bad.ggufpack"
    bad.write_bytes(corrupt_record(split_pack.read_bytes()))
    out = tmp_path / "ur"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = listing(out)
    code, _, stderr = run_cli("unpack", "-q", bad, "-o", out, "--restore")
    assert "corrupt pack" in one_error(code, stderr, bad)
    assert out.exists() == existing and listing(out) == before  # 0.2 left an empty -o folder


def rewrite_index(data: bytes, change) -> bytes:  # noqa: ANN001
    """The pack with its index changed by `change(index dict)`, sealed again as a forger would."""
    import json

    import xxhash

    from gguf_split.pack import codec
    from gguf_split.pack import format as fmt

    ioff, _, ver, flags, magic = fmt.TAIL.unpack_from(data, len(data) - fmt.TAIL.size)
    blen, dec = fmt.RECORD.unpack_from(data, ioff)[4:6]
    ix = json.loads(codec.decompress(data[ioff + fmt.RECORD.size:ioff + fmt.RECORD.size + blen], dec))
    change(ix)
    raw = json.dumps(ix).encode()
    z = codec.compress(raw, 3)
    rec = fmt.RECORD.pack(fmt.KIND_INDEX, fmt.REC_ZSTD, 0, 0, len(z), len(raw), xxhash.xxh3_128_digest(z))
    return data[:ioff] + rec + z + fmt.TAIL.pack(ioff, len(rec) + len(z), ver, flags, magic)


def _first_task(ix: dict) -> str:
    return next(iter(ix["meta"]["tasks"]))


FORGED_META = [
    ("task name with a path", lambda ix: ix["meta"]["tasks"].update({"../x": ix["meta"]["tasks"].pop(_first_task(ix))}),
     "task name '../x'"),
    ("task name empty", lambda ix: ix["meta"]["tasks"].update({"": ix["meta"]["tasks"].pop(_first_task(ix))}),
     "task name is empty"),
    ("file name with a path", lambda ix: ix["meta"]["tasks"][_first_task(ix)].append("../x.gguf"),
     "must be a bare file name"),
    ("file not in the pack", lambda ix: ix["meta"]["tasks"][_first_task(ix)].append("other.gguf"),
     "which the pack does not hold"),
    ("file of the pack in no task", lambda ix: ix["meta"]["tasks"].pop(_first_task(ix)), "which no task"),
    ("files not a list", lambda ix: ix["meta"]["tasks"].update({_first_task(ix): "adaptor-base.gguf"}),
     "not a list"),
    ("meta not an object", lambda ix: ix.update(meta=["tasks c2", "base", "../x"]), "meta is not"),
    ("no tasks", lambda ix: ix.update(meta={"tasks": {}}), "meta is not"),
    ("kind unknown", lambda ix: ix.update(kind="weights"), "kind 'weights'"),
    ("kind not a string", lambda ix: ix.update(kind=["split"]), "kind"),
]


@pytest.mark.parametrize("what,change,fragment", FORGED_META, ids=[f[0] for f in FORGED_META])
@pytest.mark.parametrize("command", ["info", "unpack", "unpack --restore"])
def test_forged_meta_is_refused(split_pack: Path, tmp_path: Path, what: str, change, fragment: str,  # noqa: ANN001
                                command: str) -> None:
    """A pack's kind and meta are checked when its index is read: one line naming the pack, nothing
    printed from the forged meta, nothing written (0.2 printed "tasks c2, base, ../x")."""
    forged = tmp_path / "forged.ggufpack"
    forged.write_bytes(rewrite_index(split_pack.read_bytes(), change))
    out = tmp_path / "out"
    args = ["info", forged] if command == "info" else ["unpack", "-q", forged, "-o", out, *command.split()[1:]]
    code, stdout, stderr = run_cli(*args)
    line = one_error(code, stderr, forged)
    assert "corrupt pack" in line and fragment in line, line
    assert stdout == "" and not out.exists()


def test_models_pack_forged_as_a_split_is_refused_by_restore(tmp_path: Path) -> None:
    """0.2: exit 0, "unpacked 0 models". Now one line naming the pack and the file that is no adaptor."""
    a = write_model(tmp_path / "a.gguf", base_tensors())
    b = write_model(tmp_path / "b.gguf", base_tensors(1))
    pk = tmp_path / "m.ggufpack"
    pack(pk, tasks={"a": a, "b": b})
    forged = tmp_path / "forged.ggufpack"
    forged.write_bytes(rewrite_index(pk.read_bytes(), lambda ix: ix.update(kind="split")))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("unpack", "-q", forged, "-o", out, "--restore")
    line = one_error(code, stderr, forged)
    assert "a.gguf" in line and "not written by gguf-split" in line, line
    assert stdout == "" and not out.exists()


def test_split_pack_whose_meta_swaps_adaptors_is_refused(split_pack: Path, tmp_path: Path) -> None:
    def swap(ix: dict) -> None:
        t = ix["meta"]["tasks"]
        t["chat"], t["code"] = t["code"], t["chat"]

    forged = tmp_path / "forged.ggufpack"
    forged.write_bytes(rewrite_index(split_pack.read_bytes(), swap))
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run_cli("unpack", "-q", forged, "-o", out, "--restore")
    line = one_error(code, stderr, forged)
    assert "adaptor-code.gguf: is the adaptor of task 'code', the pack's index says 'chat'" in line, line
    assert listing(out) == {}


def test_two_tasks_restoring_to_one_name_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    m1 = write_model(tmp_path / "x" / "m.gguf", base_tensors())
    m2 = write_model(tmp_path / "y" / "m.gguf",
                     {**base_tensors(), "output_norm.weight": base_tensors(3)["output_norm.weight"]})
    split({"one": m1, "two": m2}, tmp_path / "split", file_cost=0)
    pk = tmp_path / "s.ggufpack"
    pack(pk, split_dir=tmp_path / "split")
    out = tmp_path / "out"
    code, _, stderr = run_cli("unpack", "-q", pk, "-o", out, "--restore")
    assert "'one' and 'two' both restore to m.gguf" in one_error(code, stderr, pk)
    assert not out.exists()


def test_leftovers_of_a_killed_run_go_with_the_next_run(demo, split_pack: Path, tmp_path: Path) -> None:
    """0.2 left `.gguf-split-unpack-XXXXXXXX/` (the whole split) behind when killed, and nothing removed it.
    The next run in the directory removes gguf-split's temporary directories, and nothing else."""
    models, split_dir = demo
    out = tmp_path / "ur"
    legacy = out / ".gguf-split-unpack-k2_x9abc" / "split"
    current = out / ".gguf-split-unpack.4242.0badcafe.gguf-split-tmpdir"
    for d in (legacy, current):
        d.mkdir(parents=True)
        shutil.copy(split_dir / "adaptor-chat.gguf", d / "adaptor-chat.gguf")
    (out / ".gguf-split-unpack-mine").mkdir()  # not a name gguf-split gives: the user's
    (out / ".cache").mkdir()
    (out / ".cache" / "x").write_text("keep")
    os.symlink(tmp_path, out / ".gguf-split-unpack.1.00000000.gguf-split-tmpdir")  # a link: removed, not followed
    code, _, stderr = run_cli("unpack", "-q", split_pack, "-o", out, "--restore", "--force")
    assert code == 0, stderr
    assert listing(out) == {**originals(models), ".gguf-split-unpack-mine": "dir", ".cache": "dir"}
    assert (out / ".cache" / "x").read_text() == "keep" and (tmp_path / "ur").exists()


def test_unpack_restore_of_a_split_with_a_sharded_model(tmp_path: Path) -> None:
    """A sharded task's shards and the other tasks' models appear together, each byte for byte."""
    shards = tmp_path / "shards"
    shards.mkdir()
    first = write_sharded(shards / "big", base_tensors(), 3)
    other = write_model(tmp_path / "other.gguf",
                        {**base_tensors(), "output_norm.weight": base_tensors(4)["output_norm.weight"]})
    split({"big": first, "other": other}, tmp_path / "split", file_cost=0)
    pk = tmp_path / "s.ggufpack"
    pack(pk, split_dir=tmp_path / "split")
    out = tmp_path / "out"
    r = unpack_to(pk, out, restore=True)
    want = {p.name: sha(p) for p in shards.iterdir()}
    want["other.gguf"] = sha(other)
    assert listing(out) == want and sorted(os.path.basename(p) for p in r.files) == sorted(want)


def test_unpack_restore_without_room_names_the_output_directory(split_pack: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    class Full:
        f_bavail, f_frsize, f_bsize = 2, 4096, 4096

    out = tmp_path / "ur"
    out.mkdir()
    monkeypatch.setattr(os, "statvfs", lambda p: Full())
    code, _, stderr = run_cli("unpack", "-q", split_pack, "-o", out, "--restore")
    line = one_error(code, stderr, out)
    assert "not enough free space" in line, line
    assert listing(out) == {}
