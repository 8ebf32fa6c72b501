"""The YAML spec and the CLI commands (split, add, remove, info, restore, verify, link, models-dir, demo), run
in-process through typer's CliRunner, plus the console script as a real process (--version, --help, piped
output)."""

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

from helpers import base_tensors, sha256, write_model
from gguf_split import GGUFSplitError
from gguf_split.cli.app import app

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
  file_cost: 0
"""


def write_spec(project: Path, text: str, name: str = "spec.yaml") -> Path:
    path = project / name
    path.write_text(text)
    return path


def regular_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.is_symlink()}


def test_spec_split_resolves_paths_against_the_spec(project: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_spec(project, SPEC)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not be taken from the working directory
    ok("split", str(spec))
    out = project / "out"
    files = directory_files(out)
    assert {"p-adaptor-base.gguf", "p-adaptor-chat.gguf", "p-adaptor-code.gguf"} <= set(files)
    assert any(n.startswith("p-foundation-") for n in files)
    assert all(n.startswith("p-") or "-of-" in n for n in files)
    first = next(n for n in files if n.startswith("chat-00001-of-"))
    assert files[first] == "p-adaptor-chat.gguf"
    assert os.listdir(elsewhere) == []
    # force: true in the spec lets a second run replace the split (identical here)
    ok("split", str(spec))
    assert directory_files(out) == files


def test_cli_flags_give_the_same_files_as_the_spec(project: Path) -> None:
    ok("split", str(write_spec(project, SPEC)))
    models = project / "models"
    cli_out = project / "cli-out"
    args = ["split", "-q", "-o", str(cli_out), "--prefix", "p-", "--link", "--threads", "2", "--file-cost", "0"]
    for task in ("base", "chat", "code"):
        args += ["--task", f"{task}={models / f'{task}.gguf'}"]
    ok(*args)
    code, _, stderr = cli(*args)  # a second run without --force is refused, naming --force
    assert "--force" in error_line(code, stderr)
    ok(*args, "--force")
    assert regular_files(cli_out) == regular_files(project / "out")


def test_positional_models_take_their_file_stem_as_task_name(project: Path) -> None:
    models = project / "models"
    ok("split", "-q", str(models / "base.gguf"), str(models / "chat.gguf"), "-o", str(project / "pos"),
       "--file-cost", "0")
    assert {"adaptor-base.gguf", "adaptor-chat.gguf"} <= set(os.listdir(project / "pos"))
    # a clash of stems is one clear line pointing at -t NAME=PATH
    other = project / "other"
    other.mkdir()
    (other / "chat.gguf").write_bytes((models / "code.gguf").read_bytes())
    code, _, stderr = cli("split", "-q", str(models / "chat.gguf"), str(other / "chat.gguf"), "-o", str(project / "x"))
    line = error_line(code, stderr)
    assert "-t NAME=PATH" in line and "'chat'" in line
    assert not (project / "x").exists()


def test_cli_task_and_output_override_the_spec(project: Path) -> None:
    """Spec tasks plus a --task, and -o instead of the spec's output."""
    spec = write_spec(project, "output: out\ntasks:\n  base: models/base.gguf\noptions:\n  file_cost: 0\n")
    ok("split", str(spec), "-q", "-t", f"chat={project / 'models' / 'chat.gguf'}", "-o", str(project / "other"))
    assert not (project / "out").exists()
    names = sorted(os.listdir(project / "other"))
    assert names[:2] == ["adaptor-base.gguf", "adaptor-chat.gguf"] and names[2].startswith("foundation-")


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
    "cap zero": ("output: out\n" + TASKS + "options:\n  max_shared_files: 0\n", "options.max_shared_files"),
    "bad size": ("output: out\n" + TASKS + "options:\n  max_shard_size: 20 gallons\n", "options.max_shard_size"),
    "options not a mapping": ("output: out\n" + TASKS + "options: [force]\n", "options"),
    "task path not found": ("output: out\ntasks:\n  base: models/base.gguf\n  chat: models/nope.gguf\n", "tasks.chat"),
    "duplicate task name": ("output: out\n" + TASKS + "  chat: models/base.gguf\n", "duplicate key 'chat'"),
    "invalid task name": ("output: out\ntasks:\n  base: models/base.gguf\n  ../evil: models/chat.gguf\n", "tasks.../evil"),
    "task name too long": ("output: out\ntasks:\n  base: models/base.gguf\n  " + "x" * 70 + ": models/chat.gguf\n",
                           "at most 64"),
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


def test_task_name_errors_state_the_broken_rule() -> None:
    from gguf_split.format.names import check_task_name

    with pytest.raises(GGUFSplitError) as err:
        check_task_name("x" * 65)
    assert "65 characters long, at most 64" in err.value.problem and "holds" not in err.value.problem
    with pytest.raises(GGUFSplitError) as err:
        check_task_name("a b")
    assert "holds ' '" in err.value.problem
    with pytest.raises(GGUFSplitError) as err:
        check_task_name("-x")
    assert "starts with '-'" in err.value.problem


def test_missing_spec_file(project: Path) -> None:
    missing = project / "nope.yaml"
    assert str(missing) in error_line(*cli("split", str(missing))[::2])


# ---------------------------------------------------------------------------------------------------------
# info, restore, verify, link, models-dir, add, remove


@pytest.fixture
def split_dir(project: Path) -> Path:
    models = project / "models"
    out = project / "out"
    ok("split", "-q", "-o", str(out), "--file-cost", "0",
       *[a for t in ("base", "chat", "code") for a in ("-t", f"{t}={models / f'{t}.gguf'}")])
    return out


def info_json(*paths: Path | str) -> Any:
    return json.loads(ok("info", "--json", *map(str, paths)))


def test_info_json_on_split_dir_matches_file_sizes(project: Path, split_dir: Path) -> None:
    s = info_json(split_dir)
    inputs = {t: os.path.getsize(project / "models" / f"{t}.gguf") for t in ("base", "chat", "code")}
    outputs = sum(p.stat().st_size for p in split_dir.iterdir())
    assert s["input_bytes"] == sum(inputs.values())
    assert s["output_bytes"] == outputs
    assert s["saved_bytes"] == s["input_bytes"] - s["output_bytes"] > 0
    assert s["ratio"] == pytest.approx(outputs / sum(inputs.values()))
    assert {t["task"]: t["source_bytes"] for t in s["tasks"]} == inputs
    for t in s["tasks"]:
        assert t["bytes"] == os.path.getsize(t["path"])
    for f in s["files"]:
        assert f["bytes"] == os.path.getsize(f["path"])
        for task in f["tasks"]:  # who uses a file is what each adaptor lists
            assert f["name"] in next(t for t in s["tasks"] if t["task"] == task)["files"]
    from gguf_split import __version__

    assert s["version"] == __version__
    assert "split" in ok("info", str(split_dir))  # the table renders


def test_info_task_files_lists_what_llama_cpp_needs(split_dir: Path) -> None:
    d = info_json(split_dir, "code")
    paths = [r["path"] for r in d["files"]]
    names = GGUFReader(split_dir / "adaptor-code.gguf").fields["gguf_split.files.name"].contents()
    assert paths == [str(split_dir / "adaptor-code.gguf"), *(str(split_dir / n) for n in names)]
    for r in d["files"][1:]:
        assert r["sha256"] == sha256(r["path"])
    text = ok("info", str(split_dir), "code", "--files")
    assert all(p in text for p in paths)


def test_info_on_adaptor_and_plain_model(project: Path, split_dir: Path) -> None:
    model = project / "models" / "chat.gguf"
    adaptor = split_dir / "adaptor-chat.gguf"
    a = info_json(adaptor)
    assert (a["role"], a["task"]) == ("adaptor", "chat")
    assert a["file_bytes"] == adaptor.stat().st_size
    assert a["tensors"] == len(GGUFReader(adaptor).tensors)
    assert a["model_tensors"] == len(GGUFReader(model).tensors)
    assert a["sources"] == [{"name": "chat.gguf", "bytes": model.stat().st_size, "xxh3": a["sources"][0]["xxh3"]}]
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


def test_info_exits_2_on_an_inconsistent_split(project: Path, split_dir: Path) -> None:
    """A split whose files do not belong together is an error (exit 2), as in verify, not a table note."""
    other = project / "other"
    ok("split", "-q", "-o", str(other), "--file-cost", "0", "-t", f"a={project / 'models' / 'base.gguf'}",
       "-t", f"b={project / 'models' / 'code.gguf'}")
    # the two splits' cut pieces may coincide (same content, same name); take one that differs
    theirs = {p.name for p in other.iterdir()}
    shared = next(p for p in sorted(split_dir.iterdir()) if p.name.startswith("foundation-") and p.name not in theirs)
    foreign = next(p for p in sorted(other.iterdir()) if p.name.startswith("foundation-") and p.name not in
                   {q.name for q in split_dir.iterdir()})
    shared.write_bytes(foreign.read_bytes())
    line = error_line(*cli("info", str(split_dir))[::2])
    assert str(shared) in line and "another split" in line
    line = error_line(*cli("link", "chat", str(split_dir))[::2])
    assert str(shared) in line


def test_restore_via_cli(project: Path, split_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "chat-restored.gguf"
    ok("restore", "-q", str(split_dir / "adaptor-chat.gguf"), "-o", str(target))
    assert sha256(target) == sha256(project / "models" / "chat.gguf")
    # existing output: refused without --force, replaced with it
    target.write_bytes(b"old")
    code, _, stderr = cli("restore", "-q", str(split_dir / "adaptor-chat.gguf"), "-o", str(target))
    line = error_line(code, stderr)
    assert str(target) in line and "--force" in line and target.read_bytes() == b"old"
    ok("restore", "-q", str(split_dir), "code", "-o", str(target), "--force")
    assert sha256(target) == sha256(project / "models" / "code.gguf")
    # into a directory: the original file name inside it
    where = tmp_path / "into"
    where.mkdir()
    ok("restore", "-q", str(split_dir), "base", "-o", str(where))
    assert sha256(where / "base.gguf") == sha256(project / "models" / "base.gguf")


def test_moved_shared_files_are_found_with_the_shared_option(project: Path, split_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in list(split_dir.iterdir()):
        if not p.name.startswith("adaptor-"):
            p.rename(moved / p.name)
    line = error_line(*cli("restore", "-q", str(split_dir / "adaptor-chat.gguf"), "-o", str(tmp_path / "x.gguf"))[::2])
    assert "-s/--shared" in line and "not found" in line
    ok("restore", "-q", str(split_dir / "adaptor-chat.gguf"), "-o", str(tmp_path / "x.gguf"), "-s", str(moved))
    assert sha256(tmp_path / "x.gguf") == sha256(project / "models" / "chat.gguf")
    assert "ok" in ok("verify", "-q", str(split_dir), "--shared", str(moved))


def test_verify_via_cli(split_dir: Path) -> None:
    assert "ok" in ok("verify", "-q", str(split_dir))
    assert "ok" in ok("verify", "-q", "--sha256", str(split_dir / "adaptor-chat.gguf"))  # its files beside it
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
    names = GGUFReader(split_dir / "adaptor-code.gguf").fields["gguf_split.files.name"].contents()
    n = 1 + len(names)
    assert os.readlink(split_dir / f"code-00001-of-{n:05d}.gguf") == "adaptor-code.gguf"
    for k, name in enumerate(names, start=2):
        assert os.readlink(split_dir / f"code-{k:05d}-of-{n:05d}.gguf") == name
    line = error_line(*cli("link", "nope", str(split_dir))[::2])
    assert "'nope'" in line and "tasks: base, chat, code" in line


def test_models_dir_tracks_the_split(project: Path, split_dir: Path, tmp_path: Path) -> None:
    """llama-server's router reads OUT/<task>/<task>-0000k-of-0000N.gguf; re-running follows add/remove."""
    out = tmp_path / "served"
    ok("models-dir", str(split_dir), str(out))
    for task in ("base", "chat", "code"):
        files = sorted((out / task).iterdir())
        names = GGUFReader(split_dir / f"adaptor-{task}.gguf").fields["gguf_split.files.name"].contents()
        assert [p.resolve() for p in files] == [(split_dir / f"adaptor-{task}.gguf").resolve(),
                                                *((split_dir / n).resolve() for n in names)]
        assert files[0].name == f"{task}-00001-of-{len(files):05d}.gguf"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["base", "chat", "code"]
    ok("remove", "-q", str(split_dir), "chat", "--models-dir", str(out))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["base", "code"]
    ok("add", "-q", str(split_dir), "-t", f"chat2={project / 'models' / 'chat.gguf'}", "--file-cost", "0",
       "--models-dir", str(out))
    first = next((out / "chat2").glob("chat2-00001-of-*.gguf"))
    assert first.resolve() == (split_dir / "adaptor-chat2.gguf").resolve()
    assert "up to date" in ok("models-dir", str(split_dir), str(out))


def test_add_and_remove_via_cli(project: Path, split_dir: Path, tmp_path: Path) -> None:
    models = project / "models"
    before = {p.name: (sha256(p), p.stat().st_mtime_ns) for p in split_dir.iterdir()}
    code, _, stderr = cli("add", "-q", str(split_dir), "-t", f"chat={models / 'code.gguf'}")
    assert "already in the split" in error_line(code, stderr)
    dry = ok("add", str(split_dir), "-t", f"more={models / 'chat.gguf'}", "--dry-run", "--file-cost", "0")
    assert "dry run" in dry and not (split_dir / "adaptor-more.gguf").exists()
    ok("add", "-q", str(split_dir), "-t", f"more={models / 'chat.gguf'}", "--file-cost", "0")
    assert {p.name: (sha256(p), p.stat().st_mtime_ns) for p in split_dir.iterdir() if p.name in before} == before
    ok("restore", "-q", str(split_dir), "more", "-o", str(tmp_path / "more.gguf"))
    assert sha256(tmp_path / "more.gguf") == sha256(models / "chat.gguf")
    assert "would delete" in ok("remove", str(split_dir), "more", "--dry-run")
    assert (split_dir / "adaptor-more.gguf").exists()
    ok("remove", "-q", str(split_dir), "more")
    assert not (split_dir / "adaptor-more.gguf").exists()
    assert "ok" in ok("verify", "-q", str(split_dir))


def test_demo_restores_identical(tmp_path: Path) -> None:
    code, stdout, stderr = cli("demo", "-q", str(tmp_path / "demo"))
    assert code == 0, stderr
    restores = [line for line in stdout.splitlines() if line.startswith("restore ")]
    models = sorted((tmp_path / "demo" / "models").glob("*.gguf"))
    assert len(restores) == len(models) >= 2
    assert all("byte-identical" in line for line in restores)
    for m in models:  # and independently of the demo's own comparison
        assert sha256(tmp_path / "demo" / "restored" / m.name) == sha256(m)
    shared = [p for p in (tmp_path / "demo" / "split").glob("*.gguf")
              if not p.is_symlink() and not p.name.startswith("adaptor-") and not p.name.startswith("hole-")]
    assert len(shared) >= 2, "the demo must show more than one shared file"


# ---------------------------------------------------------------------------------------------------------
# the console script as a real process


def script(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "gguf-split"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gguf_split"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, **(env or {})})


def test_version_and_help(tmp_path: Path) -> None:
    from gguf_split import __version__

    p = script("--version", cwd=tmp_path)
    assert (p.returncode, p.stdout) == (0, f"gguf-split {__version__}\n")
    p = subprocess.run([sys.executable, "-m", "gguf_split", "--help"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    for command in ("split", "add", "remove", "restore", "verify", "info", "link", "models-dir", "demo"):
        assert command in p.stdout


def test_version_imports_nothing_heavy(tmp_path: Path) -> None:
    """`--version` answers before typer, rich, numpy or gguf are imported (start-up time)."""
    code = ("import sys; sys.argv=['gguf-split','--version']\n"
            "from gguf_split._main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('typer', 'rich', 'numpy', 'gguf') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr


def test_a_signal_while_a_class_is_made_is_one_line(tmp_path: Path) -> None:
    """A SIGTERM landing in a dataclass's `__set_name__` while a module is imported reaches main() wrapped in
    Python's RuntimeError("Error calling __set_name__"): still one line and 143, never a traceback (seen once
    in the random-signals test under load)."""
    code = ("import os, signal, sys, gguf_split.cli.app as app\n"
            "class Boom:\n"
            "    def __set_name__(self, owner, name):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "def run(argv):\n"
            "    type('Made', (), {'x': Boom()})\n"
            "app.run = run\n"
            "sys.argv = ['gguf-split', 'info', 'x.gguf']\n"
            "from gguf_split._main import main\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (p.returncode, p.stderr) == (143, "gguf-split: terminated; no partial output was left behind\n")


def test_a_signal_after_the_commit_says_what_stands(project: Path, tmp_path: Path) -> None:
    """Ctrl-C after the split is committed, outside the transaction's block (while its report is printed):
    the last line says the split is complete, not that nothing was left (seen once in the unpack kill test
    under load)."""
    out = tmp_path / "out"
    code = ("import os, signal, sys, gguf_split.cli.assemble_cmds as cmds\n"
            "def printing(report, *a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "cmds.print_split = printing\n"
            f"sys.argv = ['gguf-split', 'split', '-q', {str(project / 'models' / 'base.gguf')!r}, "
            f"{str(project / 'models' / 'chat.gguf')!r}, '-o', {str(out)!r}]\n"
            "from gguf_split._main import main\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert (p.returncode, p.stderr) == (130, f"gguf-split: interrupted; the split in {out} is complete\n")
    assert (out / "adaptor-chat.gguf").is_file()


def test_piped_output_is_not_wrapped(project: Path, split_dir: Path) -> None:
    """Tables and reports keep whole lines when stdout is a pipe (scripts, logs)."""
    p = script("info", str(split_dir), cwd=project, env={"COLUMNS": "40"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    row = next(line for line in lines if "adaptor-chat.gguf" in line)
    assert "replaces chat.gguf" in row  # the whole row on one line, not wrapped at 40 (or 120) columns
    assert any(len(line) > 120 for line in lines) or all("…" not in line for line in lines)


def test_one_model_split_says_nothing_is_shared(project: Path) -> None:
    text = ok("split", "-q", "-t", f"only={project / 'models' / 'base.gguf'}", "-o", str(project / "one"))
    assert "nothing is shared (one model)" in text and "saves -" not in text


def _sigint_caught(pid: int) -> bool:
    """Whether gguf-split has installed its handlers: SIGTERM (bit 15 of SigCgt in /proc/PID/status) is
    caught, which Python alone never does (its own SIGINT handler is there from the start)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (15 - 1)))
    except OSError:
        pass
    return False


def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(project: Path) -> None:
    """From the moment gguf-split handles signals (the first thing it does: polled in /proc), Ctrl-C at a
    random moment while modules load or the command runs gives one line and exit code 130, never a
    traceback and never click's "Aborted!"."""
    import random
    import signal
    import time

    rng = random.Random(7)
    exe = Path(sys.executable).parent / "gguf-split"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gguf_split"]
    models = project / "models"
    commands = [["info", str(models / "chat.gguf")], ["--help"],
                ["split", "-q", "-o", str(project / "sig"), "-t", f"a={models / 'base.gguf'}",
                 "-t", f"b={models / 'chat.gguf'}", "--force"]]
    interrupted = 0
    for i in range(12):
        p = subprocess.Popen([*cmd, *commands[i % 3]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.perf_counter() + 30
        while not _sigint_caught(p.pid) and p.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.4))
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        if p.returncode == 0:
            continue  # it finished before the signal
        interrupted += 1
        assert p.returncode == 130, err
        assert err == "gguf-split: interrupted; no partial output was left behind\n", err
    assert interrupted >= 4
    assert not list((project / "sig").glob(".*tmp")) if (project / "sig").exists() else True


# ---------------------------------------------------------------------------------------------------------
# every refusal is one line: option values, click's own usage errors, info's arguments


@pytest.mark.parametrize("size", ["20K", "1M", "0", "1048575"])
def test_shard_size_under_1mib_is_one_line(project: Path, split_dir: Path, size: str) -> None:
    """--max-shard-size and the spec's max_shard_size are checked alike (a ValueError traceback before)."""
    models = project / "models"
    for args in (["split", "-q", "-o", str(project / "x"), "-t", f"a={models / 'base.gguf'}", "--max-shard-size", size],
                 ["add", "-q", str(split_dir), "-t", f"x={models / 'base.gguf'}", "--max-shard-size", size]):
        line = error_line(*cli(*args)[::2])
        assert "--max-shard-size" in line and "1MiB" in line and repr(size) in line
    spec = write_spec(project, "output: x\n" + TASKS + f"options:\n  max_shard_size: {size}\n")
    line = error_line(*cli("split", str(spec))[::2])
    assert f"{spec}: options.max_shard_size" in line and "1MiB" in line
    assert not (project / "x").exists()
    ok("split", "-q", "--dry-run", "-o", str(project / "x"), "-t", f"a={models / 'base.gguf'}", "--max-shard-size",
       "1MiB")


@pytest.mark.parametrize("args, fragment", [
    (["split", "x.gguf", "-o", "out", "--threads", "0"], "--threads"),
    (["split", "x.gguf", "-o", "out", "--max-shared-files", "0"], "--max-shared-files"),
    (["add", "out", "--threads", "two"], "--threads"),
    (["restore"], "Missing argument"),
    (["info", "--bogus", "x"], "--bogus"),
    (["nonsense"], "nonsense"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    """click's usage errors, like a spec's: one line with a pointer to the command's help, exit 2."""
    code, _, stderr = cli(*args)
    line = error_line(code, stderr)
    assert fragment in line and "--help" in line, line
    p = script(*args, cwd=tmp_path)  # the console script prints the same line
    assert (p.returncode, p.stderr) == (2, stderr), p.stderr


def test_info_on_adaptors_describes_them(split_dir: Path) -> None:
    """`info adaptor-x.gguf` (one or several): their description, not a KeyError (--json worked)."""
    text = ok("info", str(split_dir / "adaptor-chat.gguf"))
    assert "adaptor" in text and "task chat: " in text and "restores chat.gguf" in text
    text = ok("info", str(split_dir / "adaptor-chat.gguf"), str(split_dir / "adaptor-code.gguf"))
    assert "task chat: " in text and "task code: " in text


def test_info_dir_task_with_a_file_of_that_name_here(split_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`info DIR TASK` means the task even when a file named TASK is in the current directory (`./TASK`
    describes the file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat").write_bytes((split_dir / "adaptor-code.gguf").read_bytes())
    text = ok("info", str(split_dir), "chat")
    assert text.splitlines()[-1].startswith("task chat: ") and str(split_dir / "adaptor-chat.gguf") in text
    text = ok("info", str(split_dir), "./chat")
    assert "./chat: adaptor" in text and "task code: " in text


def test_info_files_names_a_missing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = error_line(*cli("info", "nodir", "chat", "--files")[::2])
    assert line == f"{ERROR_PREFIX}nodir: no such directory", line
    assert "DIR TASK --files" in error_line(*cli("info", "a", "b", "c", "--files")[::2])


def test_info_describes_a_hole_as_a_hole(project: Path) -> None:
    """A hole has no tensors and no architecture: info says what it is for and its split.no."""
    code, stdout, stderr = cli("demo", "-q", str(project / "demo"))
    assert code == 0, stderr
    hole = next((project / "demo" / "split").glob("hole-*.gguf"))
    n = hole.name[len("hole-"):-len(".gguf")]
    text = ok("info", str(hole))
    assert f"{hole}: hole" in text and f"split.no {n}, no tensors" in text
    assert "None" not in text and "0 tensors" not in text
    d = info_json(hole)
    assert (d["role"], d["hole"], d["split_no"], d["tensors"]) == ("shared", True, int(n), 0)


# ---------------------------------------------------------------------------------------------------------
# the split report


def test_report_heads_every_task_even_with_an_empty_adaptor(project: Path) -> None:
    """The demo's base has no tensor of its own: its lines still come under a heading of their own."""
    code, stdout, stderr = cli("demo", "-q", str(project / "demo"))
    assert code == 0, stderr
    lines = stdout.splitlines()
    for task in ("base", "chat", "code", "summarize"):
        head = next(i for i, line in enumerate(lines) if line.startswith(f"  {task}: "))
        assert lines[head + 1].startswith("    ")  # its own lines (llama.cpp: ...) follow its heading
    assert "  base: 0 tensors in its adaptor: every tensor is in a shared file" in lines


@pytest.mark.parametrize("options", [[], ["--file-cost", "0"], ["--max-shard-size", "1MiB"], ["--prefix", "p-"]])
def test_dry_run_sizes_are_exact(project: Path, options: list[str]) -> None:
    """--dry-run reports every file's size as the split then writes it (adaptors were ~4 KiB short)."""
    models = project / "models"
    args = ["split", "-q", "--json", "-o", str(project / "out"),
            *[a for t in ("base", "chat", "code") for a in ("-t", f"{t}={models / f'{t}.gguf'}")], *options]
    dry, real = json.loads(ok(*args, "--dry-run")), json.loads(ok(*args))
    assert dry["dry_run"] and not real["dry_run"]
    sizes = {os.path.basename(t["adaptor"]): t["adaptor_bytes"] for t in real["tasks"]}
    assert {os.path.basename(t["adaptor"]): t["adaptor_bytes"] for t in dry["tasks"]} == sizes
    assert {f["name"]: f["bytes"] for f in dry["files"]} == {f["name"]: f["bytes"] for f in real["files"]}
    assert dry["output_bytes"] == real["output_bytes"] == sum(p.stat().st_size for p in (project / "out").iterdir())
    add = json.loads(ok("add", "--json", "--dry-run", str(project / "out"), "-t", f"more={models / 'chat.gguf'}",
                        *[o for o in options if o != "--prefix" and o != "p-"]))
    ok("add", "-q", str(project / "out"), "-t", f"more={models / 'chat.gguf'}",
       *[o for o in options if o != "--prefix" and o != "p-"])
    added = add["split"]["tasks"][0]
    assert added["adaptor_bytes"] == os.path.getsize(project / "out" / added["adaptor"])


def test_report_names_files_over_the_shard_size(tmp_path: Path) -> None:
    """A tensor larger than --max-shard-size cannot be cut: its file is over the limit, and the report says
    so (in the text and in --json)."""
    from gguf.constants import GGMLQuantizationType as Q

    big = {**base_tensors(), "blk.9.big.weight": (Q.F32, (262_272,), 5)}  # 1,049,088 bytes
    other = {**big, "blk.9.big.weight": (Q.F32, (262_272,), 6)}
    a, b = write_model(tmp_path / "a.gguf", big), write_model(tmp_path / "b.gguf", other)
    args = ["split", "-o", str(tmp_path / "out"), "-t", f"a={a}", "-t", f"b={b}", "--max-shard-size", "1MiB"]
    for extra in (["--dry-run"], []):
        text = ok(*args, *extra)
        note = next(line for line in text.splitlines() if line.startswith("note: "))
        assert "over --max-shard-size 1.0 MiB" in note and "a tensor cannot be cut" in note
        data = json.loads(ok(*args, *extra, "--json", "--force"))
        over = dict(data["oversize"])
        assert over and all(size > 1 << 20 for size in over.values())
        assert all(name in note for name in over)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir() if not p.is_symlink()}
    assert {n for n, s in sizes.items() if s > 1 << 20} == set(over)
    quiet = ok("split", "-q", "-o", str(tmp_path / "small"), "-t", f"a={tmp_path / 'a.gguf'}", "--dry-run")
    assert "note:" not in quiet


# ---------------------------------------------------------------------------------------------------------
# signals at every moment of the entry point, and at random early moments of a real process

INTERRUPTED = {2: "gguf-split: interrupted; no partial output was left behind\n",
               15: "gguf-split: terminated; no partial output was left behind\n"}


@pytest.mark.parametrize("sig", [15, 2], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", ["version", "info", "info-error"])
def test_a_signal_at_every_line_of_the_entry_point(project: Path, command: str, sig: int) -> None:
    """A signal at each line main() executes (tests/signal_lines.py), in turn: the command's own outcome,
    or 130/143 with the one line, never a traceback. Only SIGTERM before its handler is installed, the
    first statement, kills silently (-15): before that, no code of ours has run. (A SIGTERM just after a
    command printed its result once gave a traceback from the exit path, 2 runs in 40.)"""
    args = {"version": ["--version"], "info": ["info", str(project / "models" / "chat.gguf")],
            "info-error": ["info", str(project / "nope.gguf")]}[command]
    p = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "signal_lines.py"), str(sig), *args],
                       capture_output=True, text=True, cwd=project, timeout=120)
    assert p.returncode == 0, p.stderr
    runs = [json.loads(line) for line in p.stdout.splitlines()]
    undisturbed = runs[-1]
    assert undisturbed["sent"] is None and undisturbed["code"] == (2 if command == "info-error" else 0)
    assert undisturbed["stdout" if command != "info-error" else "stderr"]
    before_handlers = [r for r in runs if r["sent"] == "default"]  # SIGINT: Python's KeyboardInterrupt
    assert len(runs) > 15
    assert len(before_handlers) <= 1 if sig == 15 else all(r["code"] == 130 for r in before_handlers)
    for r in runs[:-1]:
        assert "Traceback" not in r["stderr"], r
        if r["sent"] == "default" and sig == 15:
            assert (r["code"], r["stdout"], r["stderr"]) == (-15, "", ""), r
        elif r["code"] == 128 + sig:
            assert r["stderr"].endswith(INTERRUPTED[sig]), r
            own = r["stderr"][:-len(INTERRUPTED[sig])]
            assert own in ("", undisturbed["stderr"]), r  # at most the command's own error line before it
            assert r["stdout"] in ("", undisturbed["stdout"]), r
        else:
            assert (r["code"], r["stdout"], r["stderr"]) == (undisturbed["code"], undisturbed["stdout"],
                                                             undisturbed["stderr"]), r
    assert sum(r["code"] == 128 + sig for r in runs) >= 10  # signals met the handlers, not only the end
    assert sum(r["code"] == undisturbed["code"] and r["sent"] == "ours" for r in runs) >= 3  # ignored once done


def _signal_state(pid: int) -> int:
    """SigCgt | SigIgn of a process: bit 14 set once gguf-split handles SIGTERM (Python alone never does)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields.get("SigCgt", "0"), 16) | int(fields.get("SigIgn", "0"), 16)


def test_signals_at_random_early_moments_of_a_real_process(project: Path) -> None:
    """Ctrl-C and SIGTERM at random moments of the first ~150 ms of the console script (interpreter start-up,
    imports, the command), for at most ~25 s. Once gguf-split has installed its handlers (seen in /proc before
    the signal is sent), the outcome is the command's own or 130/143 with the one line. Before that, only
    the interpreter can answer: SIGTERM kills (-15) and Ctrl-C may be Python's KeyboardInterrupt, whose
    traceback then shows start-up code and at most our package's __init__ and _main modules being imported."""
    import random
    import re
    import signal
    import time

    rng = random.Random(17)
    exe = Path(sys.executable).parent / "gguf-split"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gguf_split"]
    args = ["info", str(project / "models" / "chat.gguf")]
    expected = script(*args, cwd=project).stdout
    deadline = time.monotonic() + 25
    handled = early = 0
    for i in range(80):
        if time.monotonic() > deadline:
            break
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        p = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=project)
        time.sleep(rng.uniform(0, 0.15))
        ours = bool(_signal_state(p.pid) & (1 << (signal.SIGTERM - 1)))
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        if ours:  # gguf-split's handlers were in place when the signal was sent
            handled += p.returncode != 0
            expect = (0, expected, "") if p.returncode == 0 else (128 + sig, out, INTERRUPTED[sig])
            assert (p.returncode, out, err) == expect, err
            continue
        early += 1  # before them only the interpreter answers; what it prints is its own
        if "Traceback" in err:
            assert "KeyboardInterrupt" in err, err
            assert set(re.findall(r"gguf_split[/\\](\w+)\.py", err)) <= {"__init__", "_main"}, err
        elif p.returncode == 128 + sig:  # the handlers came in before the signal landed
            assert err == INTERRUPTED[sig], err
        else:
            assert p.returncode in (0, -signal.SIGTERM, -signal.SIGINT) and err == "", err
        if p.returncode == 0:
            assert out == expected
    assert handled >= 5, (handled, early)


# ---------------------------------------------------------------------------------------------------------
# one options type: the spec, the command line and the library check a value by the same rule


@pytest.mark.parametrize("key, value, spec_text", [
    ("threads", 0, "0"),
    ("max_shared_files", 0, "0"),
    ("max_shard_size", "10K", "10K"),
    ("file_cost", "lots", "lots"),
    ("force", "yes", "'yes'"),
    ("prefix", "a/b", "a/b"),
])
def test_an_option_is_checked_by_one_rule(project: Path, key: str, value: object, spec_text: str) -> None:
    """The same bad value given in a spec, as a flag and as a library keyword is refused with the same
    problem text, each naming it the way it was given; nothing is written."""
    from gguf_split import SplitOptions

    with pytest.raises((TypeError, ValueError)) as api:
        SplitOptions().merged({key: value})
    problem = str(api.value).split(": ", 1)[1]
    where = "" if key == "prefix" else "options:\n  "
    spec = write_spec(project, "output: out\n" + TASKS + f"{where}{key}: {spec_text}\n")
    line = error_line(*cli("split", str(spec))[::2])
    spec_key = "prefix" if key == "prefix" else f"options.{key}"
    assert line == f"gguf-split: error: {spec}: {spec_key}: {problem}", line
    if key != "force":  # a boolean flag takes no value
        flag = "--" + key.replace("_", "-")
        line = error_line(*cli("split", str(project / "models" / "base.gguf"), "-o", str(project / "x"), flag,
                               str(value))[::2])
        assert line.startswith(f"gguf-split: error: {flag}: {problem}"), line
    assert not (project / "out").exists() and not (project / "x").exists()


def test_a_bad_flag_is_refused_before_any_file_is_looked_at(tmp_path: Path) -> None:
    line = error_line(*cli("split", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "x"), "--threads", "0")[::2])
    assert "--threads: must be at least 1, not 0" in line and "--help" in line, line


def test_flags_override_the_spec_and_a_flag_not_given_keeps_it(project: Path) -> None:
    """One merge rule: a value given wins; a flag left off does not undo the spec (here `file_cost: 0` and
    `force: true`, then --file-cost 1MiB on the command line)."""
    spec = write_spec(project, "output: out\n" + TASKS + "options:\n  file_cost: 0\n  force: true\n")
    ok("split", "-q", str(spec))
    ok("split", "-q", str(spec))  # force from the spec: replaced, no flag needed
    report = json.loads(ok("split", str(spec), "--json", "--dry-run", "--file-cost", "1MiB"))
    assert not any(f["kind"] in ("foundation", "shared") for f in report["files"])  # tiny models: no file pays
    report = json.loads(ok("split", str(spec), "--json", "--dry-run"))
    assert any(f["kind"] in ("foundation", "shared") for f in report["files"])


def test_add_keeps_the_splits_prefix(project: Path) -> None:
    """`add` to a split made with --prefix writes its files with that prefix (it wrote adaptor-x.gguf beside
    fam-adaptor-base.gguf)."""
    models, out = project / "models", project / "out"
    ok("split", "-q", "--prefix", "fam-", "--file-cost", "0", "-o", str(out), "-t", f"base={models / 'base.gguf'}",
       "-t", f"chat={models / 'chat.gguf'}")
    ok("add", "-q", str(out), "--file-cost", "0", "-t", f"code={models / 'code.gguf'}")
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".gguf")
    assert "fam-adaptor-code.gguf" in names and all(n.startswith("fam-") for n in names), names
    ok("verify", str(out))
    spec = write_spec(project, TASKS.replace("base:", "other:").replace("chat:", "other2:") + "prefix: v2-\n",
                      "add.yaml")
    line = error_line(*cli("add", str(out), str(spec))[::2])
    assert "prefix 'fam-', not 'v2-'" in line, line
