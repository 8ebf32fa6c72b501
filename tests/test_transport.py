"""Packs of a split directory and of models, end to end (the codecs and the format are test_pack.py's).

Oracles: sha256 of every file given back against the file packed; a split given back verifies and every
task restores byte for byte; `unpack --restore` gives the original models (a sharded one as its shards);
an unpack killed at every step of its commit leaves nothing or everything.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import base_tensors, write_model, write_sharded
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
