"""The YAML spec and the CLI commands (split, info, restore, verify, link, demo), run in-process through
typer's CliRunner, plus `python -m gguf_split --help` as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader
from typer.testing import CliRunner

from conftest import base_tensors, sha256, write_model
from gguf_split.cli import app

ERROR_PREFIX = "gguf-split: error: "


def cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gguf-split ARGS`; any exception but SystemExit is a bug."""
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def ok(*args: str) -> str:
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    return stdout


def error_line(code: int, stderr: str) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert code == 2, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), stderr
    assert "Traceback" not in stderr
    return lines[0]


def directory_files(d: Path) -> dict[str, bytes | str]:
    """name -> bytes, or link target for symlinks."""
    return {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in d.iterdir()}


# ---------------------------------------------------------------------------------------------------------
# a project laid out as a user would: spec beside a models/ directory


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """tmp/project/models/{base,chat,code}.gguf (written by conftest's writer)."""
    models = tmp_path / "project" / "models"
    models.mkdir(parents=True)
    variants = {"base": {}, "chat": {"blk.0.attn_q.weight": 31}, "code": {"blk.0.ffn_down.weight": 32}}
    for name, changes in variants.items():
        tensors = base_tensors()
        for t, seed in changes.items():
            qt, shape, _ = tensors[t]
            tensors[t] = (qt, shape, seed)
        write_model(models / f"{name}.gguf", tensors)
    return tmp_path / "project"


SPEC = """\
output: out
prefix: p-
tasks:
  base: models/base.gguf
  chat: models/chat.gguf
  code: ./models/../models/code.gguf
options:
  force: true
  link: true
  threads: 2
  quiet: true
"""


def write_spec(project: Path, text: str, name: str = "spec.yaml") -> Path:
    path = project / name
    path.write_text(text)
    return path


def test_spec_split_resolves_paths_against_the_spec(project: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_spec(project, SPEC)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not be taken from the working directory
    ok("split", str(spec))
    out = project / "out"
    files = directory_files(out)
    assert set(files) == {"p-foundation.gguf", "p-adaptor-base.gguf", "p-adaptor-chat.gguf", "p-adaptor-code.gguf",
                          *(f"{t}-0000{i}-of-00002.gguf" for t in ("base", "chat", "code") for i in (1, 2))}
    assert files["chat-00001-of-00002.gguf"] == "p-adaptor-chat.gguf"
    assert files["chat-00002-of-00002.gguf"] == "p-foundation.gguf"
    assert os.listdir(elsewhere) == []
    # force: true in the spec lets a second run overwrite
    ok("split", str(spec))
    assert directory_files(out) == files


def test_cli_flags_give_the_same_files_as_the_spec(project: Path) -> None:
    ok("split", str(write_spec(project, SPEC)))
    models = project / "models"
    cli_out = project / "cli-out"
    args = ["split", "-q", "-o", str(cli_out), "--prefix", "p-", "--link", "--threads", "2"]
    for task in ("base", "chat", "code"):
        args += ["--task", f"{task}={models / f'{task}.gguf'}"]
    ok(*args)
    ok(*args, "--force")  # --force: the second run overwrites instead of refusing
    assert directory_files(cli_out) == directory_files(project / "out")


def test_cli_task_and_output_override_the_spec(project: Path) -> None:
    """Spec tasks plus a --task, and -o instead of the spec's output."""
    spec = write_spec(project, "output: out\ntasks:\n  base: models/base.gguf\n")
    ok("split", str(spec), "-q", "-t", f"chat={project / 'models' / 'chat.gguf'}", "-o", str(project / "other"))
    assert not (project / "out").exists()
    assert sorted(os.listdir(project / "other")) == ["adaptor-base.gguf", "adaptor-chat.gguf", "foundation.gguf"]


def test_cli_duplicate_task_name_is_refused(project: Path) -> None:
    models = project / "models"
    code, _, stderr = cli("split", "-q", "-o", str(project / "out"), "-t", f"base={models / 'base.gguf'}",
                          "-t", f"chat={models / 'chat.gguf'}", "-t", f"chat={models / 'code.gguf'}")
    assert "chat" in error_line(code, stderr)
    assert not (project / "out").exists()


TASKS = "tasks:\n  base: models/base.gguf\n  chat: models/chat.gguf\n"
SPEC_ERRORS = {
    "missing tasks": ("output: out\n", "tasks"),
    "empty tasks": ("output: out\ntasks: {}\n", "tasks"),
    "missing output": (TASKS, "output"),
    "unknown top-level key": ("output: out\noutptu: x\n" + TASKS, "outptu"),
    "unknown option": ("output: out\n" + TASKS + "options:\n  forse: true\n", "options.forse"),
    "threads not a number": ("output: out\n" + TASKS + "options:\n  threads: two\n", "options.threads"),
    "force a string": ("output: out\n" + TASKS + 'options:\n  force: "yes"\n', "options.force"),
    "threads zero": ("output: out\n" + TASKS + "options:\n  threads: 0\n", "options.threads"),
    "options not a mapping": ("output: out\n" + TASKS + "options: [force]\n", "options"),
    "task path not found": ("output: out\ntasks:\n  base: models/base.gguf\n  chat: models/nope.gguf\n", "tasks.chat"),
    "duplicate task name": ("output: out\n" + TASKS + "  chat: models/base.gguf\n", "duplicate key 'chat'"),
    "invalid task name": ("output: out\ntasks:\n  base: models/base.gguf\n  ../evil: models/chat.gguf\n", "tasks.../evil"),
    "task path not a string": ("output: out\ntasks:\n  base: models/base.gguf\n  chat: 3\n", "tasks.chat"),
    "invalid YAML": ("output: out\ntasks: [base: models/base.gguf\n", "invalid YAML"),
    "not a mapping": ("- output\n- tasks\n", "mapping"),
    "empty file": ("", "mapping"),
}


@pytest.mark.parametrize("case", list(SPEC_ERRORS))
def test_spec_error_names_spec_file_and_key(project: Path, case: str) -> None:
    text, key = SPEC_ERRORS[case]
    spec = write_spec(project, text)
    code, _, stderr = cli("split", str(spec))
    line = error_line(code, stderr)
    assert line.startswith(f"{ERROR_PREFIX}{spec}: "), line
    assert key in line, line
    assert not (project / "out").exists()


def test_missing_spec_file(project: Path) -> None:
    missing = project / "nope.yaml"
    assert str(missing) in error_line(*cli("split", str(missing))[::2])


# ---------------------------------------------------------------------------------------------------------
# info, restore, verify, link


@pytest.fixture
def split_dir(project: Path) -> Path:
    models = project / "models"
    out = project / "out"
    ok("split", "-q", "-o", str(out), *[a for t in ("base", "chat", "code") for a in ("-t", f"{t}={models / f'{t}.gguf'}")])
    return out


def info_json(*paths: Path) -> Any:
    return json.loads(ok("info", "--json", *map(str, paths)))


def test_info_json_on_split_dir_matches_file_sizes(project: Path, split_dir: Path) -> None:
    s = info_json(split_dir)
    inputs = {t: os.path.getsize(project / "models" / f"{t}.gguf") for t in ("base", "chat", "code")}
    outputs = sum(p.stat().st_size for p in split_dir.iterdir())
    assert s["input_bytes"] == sum(inputs.values())
    assert s["output_bytes"] == outputs
    assert s["saved_bytes"] == s["input_bytes"] - s["output_bytes"] > 0
    assert s["ratio"] == pytest.approx(outputs / sum(inputs.values()))
    assert s["foundation"]["bytes"] == (split_dir / "foundation.gguf").stat().st_size
    assert {a["task"]: a["source_bytes"] for a in s["adaptors"]} == inputs
    for a in s["adaptors"]:
        assert a["bytes"] == os.path.getsize(a["path"]) and a["foundation_match"] is True
    assert "split" in ok("info", str(split_dir))  # the table renders


def test_info_on_adaptor_and_plain_model(project: Path, split_dir: Path) -> None:
    model = project / "models" / "chat.gguf"
    adaptor = split_dir / "adaptor-chat.gguf"
    a = info_json(adaptor)
    assert (a["role"], a["task"]) == ("adaptor", "chat")
    assert a["file_bytes"] == adaptor.stat().st_size
    assert a["tensors"] == len(GGUFReader(adaptor).tensors)
    assert a["model_tensors"] == len(GGUFReader(model).tensors)
    assert a["source"]["name"] == "chat.gguf" and a["source"]["bytes"] == model.stat().st_size
    m = info_json(model)
    reader = GGUFReader(model)
    assert (m["role"], m["architecture"], m["split"]) == ("model", "llama", None)
    assert m["tensors"] == len(reader.tensors)
    assert m["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert m["kvs"] == reader.fields["GGUF.kv_count"].contents()
    assert "tensor_list" not in m
    both = info_json(adaptor, model)
    assert [x["role"] for x in both] == ["adaptor", "model"]
    assert str(model) in ok("info", str(model), "--tensors")


def test_restore_via_cli(project: Path, split_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "chat-restored.gguf"
    ok("restore", "-q", str(split_dir / "adaptor-chat.gguf"), "-o", str(target))
    assert sha256(target) == sha256(project / "models" / "chat.gguf")
    # existing output: refused without --force, replaced with it
    target.write_bytes(b"old")
    code, _, stderr = cli("restore", "-q", str(split_dir / "adaptor-chat.gguf"), "-o", str(target))
    assert str(target) in error_line(code, stderr) and target.read_bytes() == b"old"
    ok("restore", "-q", str(split_dir / "adaptor-code.gguf"), "-o", str(target), "--force",
       "-f", str(split_dir / "foundation.gguf"))
    assert sha256(target) == sha256(project / "models" / "code.gguf")


def test_verify_via_cli(split_dir: Path) -> None:
    assert "ok" in ok("verify", "-q", str(split_dir))
    assert "ok" in ok("verify", "-q", str(split_dir / "adaptor-chat.gguf"))  # its foundation is found beside it
    victim = split_dir / "adaptor-chat.gguf"
    reader = GGUFReader(victim)
    t = reader.tensors[0]
    raw = bytearray(victim.read_bytes())
    raw[t.data_offset] ^= 0x01
    victim.write_bytes(bytes(raw))
    line = error_line(*cli("verify", "-q", str(split_dir))[::2])
    assert str(victim) in line and repr(t.name) in line


def test_link_command(split_dir: Path) -> None:
    ok("link", "code", str(split_dir))
    assert os.readlink(split_dir / "code-00001-of-00002.gguf") == "adaptor-code.gguf"
    assert os.readlink(split_dir / "code-00002-of-00002.gguf") == "foundation.gguf"
    line = error_line(*cli("link", "nope", str(split_dir))[::2])
    assert "adaptor-nope.gguf" in line


def test_demo_restores_identical(tmp_path: Path) -> None:
    code, stdout, stderr = cli("demo", "-q", str(tmp_path / "demo"))
    assert code == 0, stderr
    restores = [line for line in stdout.splitlines() if line.startswith("restore ")]
    models = sorted((tmp_path / "demo" / "models").glob("*.gguf"))
    assert len(restores) == len(models) >= 2
    assert all("byte-identical" in line for line in restores)
    for m in models:  # and independently of the demo's own comparison
        assert sha256(tmp_path / "demo" / "restored" / m.name) == sha256(m)


def test_python_m_help(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "gguf_split", "--help"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    for command in ("split", "restore", "verify", "info", "demo"):
        assert command in p.stdout
