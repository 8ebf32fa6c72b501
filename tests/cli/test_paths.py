"""Command-line one-liners: odd paths (glob characters, names that are not UTF-8, devices, FIFOs,
directories), the demo's target, and the rule that an error suggests --force only where --force helps.

The console script runs as a real process (its stdout/stderr encodings are the user's); the rest runs
in-process through typer's CliRunner.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import base_tensors, write_model, one_line, ERROR_PREFIX
from gguf_split import open_split, split
from gguf_split.cli.app import app

CHANGED = "blk.0.attn_q.weight"


def changed(bump: int) -> dict:
    t = base_tensors(0)
    qt, shape, seed = t[CHANGED]
    t[CHANGED] = (qt, shape, seed + bump)
    return t


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "models"
    d.mkdir()
    return {"a": Path(write_model(d / "a.gguf", base_tensors(0))),
            "b": Path(write_model(d / "b.gguf", changed(777))),
            "c": Path(write_model(d / "c.gguf", changed(999)))}


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [os.fspath(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def console_script() -> list[str]:
    """The installed `gguf-split` entry point beside this interpreter, else `python -m gguf_split`."""
    script = Path(sys.executable).with_name("gguf-split")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gguf_split"]


def run_process(*args: str | bytes | Path, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    p = subprocess.run([*console_script(), *[os.fspath(a) for a in args]], capture_output=True, cwd=cwd, timeout=120,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------------------
# glob characters in a split directory's name


@pytest.mark.parametrize("name", ["g[1]", "star*dir", "what?", "[!a]*?"])
def test_split_directory_named_with_glob_characters(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    d = tmp_path / name
    code, _, stderr = run("split", "-q", "--file-cost", "0", "-t", f"a={models['a']}", "-t", f"b={models['b']}",
                          "-o", d)
    assert code == 0, stderr
    # a sibling whose name the glob would match, holding another split: it must not be picked up
    shutil.copytree(d, tmp_path / "g1")
    code, stdout, stderr = run("verify", "-q", d)
    assert code == 0 and "2 task(s)" in stdout, stderr
    code, stdout, stderr = run("info", d)
    assert code == 0 and "adaptor-a.gguf" in stdout, stderr
    code, stdout, stderr = run("info", d, "a", "--files")
    assert code == 0 and str(d / "adaptor-a.gguf") in stdout, stderr
    code, stdout, stderr = run("info", "--json", d)
    assert code == 0, stderr
    code, _, stderr = run("restore", "-q", d, "b", "-o", tmp_path / "restored.gguf")
    assert code == 0, stderr
    assert (tmp_path / "restored.gguf").read_bytes() == models["b"].read_bytes()
    code, _, stderr = run("link", "a", d)
    assert code == 0, stderr
    code, _, stderr = run("models-dir", d, tmp_path / f"served-{name}")
    assert code == 0, stderr
    with open_split(d) as s:
        assert sorted(s.tasks) == ["a", "b"]
        assert len(list(s.load("b").tensors)) == len(base_tensors(0))
    code, _, stderr = run("add", "-q", d, "-t", f"c={models['c']}")
    assert code == 0, stderr
    code, _, stderr = run("remove", "-q", d, "c")
    assert code == 0, stderr


# ---------------------------------------------------------------------------------------------------------
# file names that are not valid UTF-8


NOT_UTF8 = b"m\xff\xfe.gguf"
SHOWN = "m\\xff\\xfe.gguf"  # how gguf-split prints it


@pytest.mark.parametrize("env", [{}, {"LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"}], ids=["utf8", "ascii"])
def test_model_name_not_utf8(models: dict[str, Path], tmp_path: Path, env: dict[str, str]) -> None:
    """Printed escaped, never a UnicodeEncodeError; `split` refuses it (the split records the original
    name as UTF-8 text) before hashing, in one line; `info` describes it."""
    bad = os.fsencode(tmp_path) + b"/" + NOT_UTF8
    shutil.copy(models["b"], bad)
    code, out, err = run_process("info", bad, cwd=tmp_path, env=env)
    assert code == 0, err
    assert SHOWN.encode() in out and b"Traceback" not in err
    for args in (["split", "-q", "-t", b"x=" + bad, "-t", f"a={models['a']}", "-o", "out"],
                 ["split", "-q", bad, models["a"], "-o", "out"]):
        code, out, err = run_process(*args, cwd=tmp_path, env=env)
        text = err.decode("ascii")  # escaped: pure ASCII
        assert code == 2 and text.count("\n") == 1 and text.startswith(ERROR_PREFIX), text
        assert SHOWN in text and "Traceback" not in text
        assert not (tmp_path / "out").exists()
    # a damaged file with such a name: its error is one escaped line too
    broken = os.fsencode(tmp_path) + b"/x\xff.gguf"
    Path(os.fsdecode(broken)).write_bytes(b"not a model")
    code, _, err = run_process("info", broken, cwd=tmp_path, env=env)
    assert code == 2 and err.decode("ascii").startswith(ERROR_PREFIX) and b"x\\xff.gguf" in err


def test_split_directory_name_not_utf8(models: dict[str, Path], tmp_path: Path) -> None:
    """A split written into, verified in and restored from a directory whose name is not UTF-8."""
    d = os.fsencode(tmp_path) + b"/split\xff"
    code, out, err = run_process("split", "--file-cost", "0", "-t", f"a={models['a']}", "-t", f"b={models['b']}",
                                 "-o", d, cwd=tmp_path)
    assert code == 0 and b"split\\xff" in out, err
    for args in (["verify", d], ["info", d], ["restore", "-q", d, "b", "-o", "b.gguf"]):
        code, out, err = run_process(*args, cwd=tmp_path)
        assert code == 0, err
    assert (tmp_path / "b.gguf").read_bytes() == models["b"].read_bytes()


# ---------------------------------------------------------------------------------------------------------
# devices, FIFOs and directories as models


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_not_a_regular_file_as_a_model(models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """Named for what it is, through -t, a positional argument and `add`; never "file not found", and a
    FIFO never waits for a writer."""
    path = {"dev-zero": Path("/dev/zero"), "fifo": tmp_path / "pipe.gguf", "directory": tmp_path / "dir.gguf"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    what = {"dev-zero": "is a character device", "fifo": "is a FIFO", "directory": "is a directory"}[kind]
    split({"a": models["a"], "b": models["b"]}, tmp_path / "split")
    for args in (["split", "-q", "-t", f"x={path}", "-t", f"a={models['a']}", "-o", tmp_path / "out"],
                 ["split", "-q", path, models["a"], "-o", tmp_path / "out"],
                 ["add", "-q", tmp_path / "split", "-t", f"x={path}"]):
        code, _, stderr = run(*args)
        one_line(code, stderr, path, what)
        assert "not found" not in stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# demo


def test_demo_into_a_file(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, _, stderr = run("demo", "-q", f)
    one_line(code, stderr, f, "not a directory")
    assert f.read_text() == "mine"


def test_demo_where_its_subdirectory_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "split").write_text("mine")
    code, _, stderr = run("demo", "-q", tmp_path)
    one_line(code, stderr, tmp_path / "split", "not a directory")
    assert (tmp_path / "split").read_text() == "mine"


def test_demo_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, _, stderr = run("demo", "-q", f / "demo")
    one_line(code, stderr, f / "demo", "cannot create directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see test_demo_under_a_file")
def test_demo_into_a_read_only_directory(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        code, _, stderr = run("demo", "-q", d)
        one_line(code, stderr, d, "not writable")
        assert os.listdir(d) == []
    finally:
        d.chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_restore_into_a_read_only_directory(models: dict[str, Path], tmp_path: Path) -> None:
    split({"a": models["a"], "b": models["b"]}, tmp_path / "split")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        code, _, stderr = run("restore", "-q", tmp_path / "split", "b", "-o", d)
        one_line(code, stderr, d, "")
        assert "--force" not in stderr
    finally:
        d.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------
# an error suggests --force only where --force gets past it


def force_scenarios(models: dict[str, Path], tmp: Path) -> dict[str, list[str | Path]]:
    """Commands that fail with outputs in the way, most of them for another reason too."""
    s = tmp / "split"
    split({"a": models["a"], "b": models["b"]}, s, file_cost=0, cut="none")  # uncut: b's link names of 2 files
    (tmp / "restored").mkdir()
    shutil.copy(models["b"], tmp / "restored" / "b.gguf")
    truncated = tmp / "truncated.gguf"
    truncated.write_bytes(models["c"].read_bytes()[:-100])
    gemma = Path(write_model(tmp / "gemma.gguf", changed(5), arch="gemma"))
    damaged = tmp / "damaged"
    shutil.copytree(s, damaged)
    shared = next(p for p in damaged.iterdir() if p.name.startswith("foundation-"))
    data = bytearray(shared.read_bytes())
    data[100] ^= 1  # in its header: found before anything is written (damage to tensor bytes is found only
    shared.write_bytes(bytes(data))  # by reading them all, so an existing output is refused first there)
    (s / "b-00001-of-00002.gguf").mkdir()
    (tmp / "dirs" / "b.gguf").mkdir(parents=True)
    (tmp / "dirs" / "c.gguf").mkdir()  # task b's original once split-same-tasks has run with --force
    (tmp / "other").mkdir()
    (tmp / "other" / "a-00001-of-00002.gguf").write_text("a user's file")
    t = ["--file-cost", "0", "--cut", "none", "-o", s]
    return {
        "split-adaptor-of-output-as-input": ["split", "-q", "-t", f"a={s / 'adaptor-a.gguf'}", "-t", f"b={models['b']}", *t],
        "split-truncated-input": ["split", "-q", "-t", f"a={models['a']}", "-t", f"b={truncated}", *t],
        "split-architecture-differs": ["split", "-q", "-t", f"a={models['a']}", "-t", f"b={gemma}", *t],
        "split-same-file-twice": ["split", "-q", "-t", f"a={models['a']}", "-t", f"b={models['a']}", *t],
        "split-other-tasks": ["split", "-q", "-t", f"a={models['a']}", "-t", f"c={models['c']}", *t],
        "split-same-tasks": ["split", "-q", "-t", f"a={models['a']}", "-t", f"b={models['c']}", *t],
        "split-dry-run": ["split", "-q", "--dry-run", "-t", f"a={models['a']}", "-t", f"b={models['c']}", *t],
        "restore-over-own-file": ["restore", "-q", s, "a", "-o", s / "adaptor-a.gguf"],
        "restore-over-a-directory": ["restore", "-q", s, "b", "-o", tmp / "dirs"],
        "restore-over-another-tasks-adaptor": ["restore", "-q", s, "a", "-o", s / "adaptor-b.gguf"],
        "restore-over-another-splits-file": ["restore", "-q", s, "a", "-o", damaged / "adaptor-b.gguf"],
        "restore-damaged-over-existing": ["restore", "-q", damaged, "b", "-o", tmp / "restored" / "b.gguf"],
        "restore-over-existing": ["restore", "-q", s, "b", "-o", tmp / "restored" / "b.gguf"],
        "link-over-a-directory": ["link", "b", s],
        "link-over-a-file": ["link", "a", s, "--to", tmp / "other"],
        "add-existing-task": ["add", "-q", s, "-t", f"a={models['c']}"],
    }


def test_force_is_suggested_only_where_it_helps(models: dict[str, Path], tmp_path: Path) -> None:
    """Every error that suggests --force must be gone with --force: the command then succeeds."""
    suggested, refused = [], []
    for name, args in force_scenarios(models, tmp_path).items():
        code, _, stderr = run(*args)
        assert code == 2 and stderr.startswith(ERROR_PREFIX), (name, code, stderr)
        if "--force" not in stderr:
            refused.append(name)
            continue
        suggested.append(name)
        code, _, again = run(*args, "--force")
        assert code == 0, f"{name}: suggested --force, which does not help:\n  {stderr}  then: {again}"
    assert suggested == ["split-same-tasks", "split-dry-run", "restore-over-existing", "link-over-a-file"], suggested
    assert (tmp_path / "split" / "adaptor-b.gguf").is_file() and (tmp_path / "damaged" / "adaptor-b.gguf").is_file()


@pytest.mark.parametrize("which", ["adaptor", "shared"])
def test_restore_force_never_overwrites_a_split_file(models: dict[str, Path], tmp_path: Path, which: str) -> None:
    """restore --force onto another task's adaptor or shared file (of this split or another) is refused:
    a split's files are never replaced by a restore."""
    s = tmp_path / "split"
    split({"a": models["a"], "b": models["b"], "c": models["c"]}, s, file_cost=0)
    target = s / "adaptor-c.gguf" if which == "adaptor" else next(p for p in s.iterdir() if p.name.startswith("foundation-"))
    other = tmp_path / "other"
    shutil.copytree(s, other)
    before = {p.name: p.read_bytes() for p in s.iterdir()}
    for out in (target, other / target.name):
        code, _, stderr = run("restore", "-q", s, "a", "-o", out, "--force")
        one_line(code, stderr, out, "restore elsewhere")
    assert {p.name: p.read_bytes() for p in s.iterdir()} == before


# ---------------------------------------------------------------------------------------------------------
# the demo replaces its own files and nothing else


def test_demo_never_deletes_a_users_files(tmp_path: Path) -> None:
    """`gguf-split demo proj` in a project with its own models/ and split/ folders: refused in one line
    naming the user's file, which survives, and nothing is written; the demo's own earlier output is
    recognised (what its files hold, not their names) and replaced."""
    proj = tmp_path / "proj"
    (proj / "models").mkdir(parents=True)
    (proj / "split").mkdir()
    mine = proj / "models" / "my-llama.gguf"
    mine.write_text("important")
    keep = proj / "split" / "keep.txt"
    keep.write_text("x")
    code, _, stderr = run("demo", "-q", proj)
    one_line(code, stderr, mine, "not made by the demo")
    assert mine.read_text() == "important" and keep.read_text() == "x"
    assert sorted(p.name for p in proj.rglob("*")) == ["keep.txt", "models", "my-llama.gguf", "split"]
    mine.unlink()
    code, _, stderr = run("demo", "-q", proj)
    one_line(code, stderr, keep, "not made by the demo")
    assert keep.read_text() == "x" and list((proj / "models").iterdir()) == []
    keep.unlink()
    code, _, stderr = run("demo", "-q", proj)
    assert code == 0, stderr
    first = {p.relative_to(proj): p.read_bytes() for p in proj.rglob("*.gguf") if not p.is_symlink()}
    code, _, stderr = run("demo", "-q", proj)  # a re-run replaces the demo's own files
    assert code == 0, stderr
    assert {p.relative_to(proj): p.read_bytes() for p in proj.rglob("*.gguf") if not p.is_symlink()} == first


@pytest.mark.parametrize("where", ["models", "restored", "split"])
def test_demo_refuses_a_file_of_the_same_name_it_did_not_make(models: dict[str, Path], tmp_path: Path,
                                                              where: str) -> None:
    """A file at a name the demo writes (models/chat.gguf, restored/chat.gguf) or a split of the same task
    names in split/ that is not the demo's: refused, left as it was."""
    demo = tmp_path / "demo"
    code, _, stderr = run("demo", "-q", demo)
    assert code == 0, stderr
    if where == "split":
        shutil.rmtree(demo / "split")
        split({"chat": models["a"], "code": models["b"]}, demo / "split")  # a user's split, demo task names
    else:
        shutil.copy(models["a"], demo / where / "chat.gguf")  # a user's model named like a demo model
    before = {p: p.read_bytes() for p in demo.rglob("*") if p.is_file() and not p.is_symlink()}
    code, _, stderr = run("demo", "-q", demo)
    one_line(code, stderr, demo / where, "not")
    assert "demo" in stderr
    assert {p: p.read_bytes() for p in demo.rglob("*") if p.is_file() and not p.is_symlink()} == before


def test_demo_on_a_full_disk_is_one_line_and_leaves_no_partial_model(tmp_path: Path) -> None:
    """Writing a demo model fails half-way (a file-size limit, as a full disk): one line saying why (numpy's
    OSError has no errno: it once printed "None"), and no half-written model is left behind."""
    import resource
    import signal

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = subprocess.run([*console_script(), "demo", "-q", "d"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120, preexec_fn=small_files)
    one_line(p.returncode, p.stderr, tmp_path / "d" / "models", "cannot write the demo models")
    assert "None" not in p.stderr and "written" in p.stderr
    assert list((tmp_path / "d" / "models").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# names: `$` matches before a final newline; every name check is a whole-string match


def test_names_with_a_trailing_newline_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    for args in (["-t", f"chat\n={models['a']}", "-t", f"b={models['b']}"],
                 ["--prefix", "\n", "-t", f"a={models['a']}", "-t", f"b={models['b']}"],
                 ["--prefix", "p-\n", "-t", f"a={models['a']}", "-t", f"b={models['b']}"]):
        code, _, stderr = run("split", "-q", *args, "-o", out)
        line = one_line(code, stderr, "", "\\n")
        assert "task name" in line or "prefix" in line
    spec = tmp_path / "s.yaml"
    spec.write_text(f'output: out\ntasks:\n  "chat\\n": {models["a"]}\n  b: {models["b"]}\n')
    code, _, stderr = run("split", "-q", spec)
    one_line(code, stderr, spec, "tasks.chat")
    named = tmp_path / "chat\n.gguf"  # a positional model whose file name gives the task name
    shutil.copy(models["a"], named)
    code, _, stderr = run("split", "-q", named, models["b"], "-o", out)
    one_line(code, stderr, "", "-t NAME=PATH")
    assert not out.exists() and not (tmp_path / "out").exists()


def test_link_keeps_a_link_whose_name_only_ends_like_the_tasks(models: dict[str, Path], tmp_path: Path) -> None:
    """`link` removes its task's stale links; a user's link named "a-00001-of-00009.gguf\\n" is not one."""
    s = tmp_path / "split"
    split({"a": models["a"], "b": models["b"]}, s, file_cost=0)
    users = s / "a-00001-of-00009.gguf\n"
    users.symlink_to("elsewhere")
    stale = s / "a-00001-of-00009.gguf"
    stale.symlink_to("adaptor-a.gguf")
    code, _, stderr = run("link", "a", s)
    assert code == 0, stderr
    assert users.is_symlink() and not stale.is_symlink()


def test_shard_name_with_a_trailing_newline_is_not_a_first_shard(tmp_path: Path) -> None:
    from helpers import write_sharded

    first = Path(write_sharded(tmp_path / "m", base_tensors(0), 2))
    odd = tmp_path / "m-00001-of-00002.gguf\n"
    first.rename(odd)
    code, _, stderr = run("split", "-q", "-t", f"x={odd}", "-o", tmp_path / "out")
    one_line(code, stderr, "", "-00001-of-00002.gguf, so its other shards cannot be found")


def test_free_space_refusal_states_the_margin(models: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """"needs 0.3 MB, 0.6 MB free" read as a contradiction: the margin kept free is in the line, and the
    figures add up to the refusal."""
    import re

    class Statvfs:
        f_bavail, f_frsize, f_bsize = 150, 4096, 4096  # 0.6 MB free

    monkeypatch.setattr(os, "statvfs", lambda p: Statvfs())
    out = tmp_path / "out"
    code, _, stderr = run("split", "-q", "-t", f"a={models['a']}", "-t", f"b={models['b']}", "-o", out)
    line = one_line(code, stderr, out, "not enough free space")
    m = re.search(r"need ([\d.]+) MB plus a margin of ([\d.]+) MB kept free, ([\d.]+) MB free", line)
    assert m is not None, line
    need, margin, free = map(float, m.groups())
    assert need < free < need + margin
    assert not out.exists() or os.listdir(out) == []
