"""A split directory as a new user and an attacker would treat it (issue 17, items 3, 4, 6, 8, 10, 11):
a re-split under another prefix, llama.cpp links the tool made, models directories that cannot be
written, and small API and CLI manners.

What is checked:
- `split --force` under another `--prefix` replaces every file of the old split (verify, info, the
  loader, remove and a further re-split all work on the result; every task restores byte for byte);
- links the tool made (symlinks with llama.cpp's split names pointing at the split's files) always list
  exactly the task's files in order: updated by a re-split that changes them (with or without --link),
  deleted with the task by `remove` (and 0.2's dangling leftovers with them); a user's files and links
  of such names are never touched, and a name `--link` needs that holds a file is refused before writing;
- a models directory that cannot be written (a file, a path under a file, an entry gguf-split did not
  make, read-only) is refused in one line before anything is written, by split, add, remove and
  models-dir; a models directory of a folder that is not a split is not created;
- a Ctrl-C at every step of `split --force --link --models-dir`: before the commit the old split stands
  and the last line says no partial output was left; after it, the new split stands and the last line
  says so, and how to bring the models directory up to date (which then works);
- `add` to a directory whose last task was removed points at `split`; `link --to FILE` says "not a
  directory"; `remove s chat chat` removes chat once; `verify("out")` takes one path.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import base_tensors, sha256, write_model, one_line, command as cli
from gguf_split import add, open_split, remove, split, verify
from gguf_split.cli.app import app
from gguf_split.splitdir.info import task_files
from gguf_split.splitdir.links import MODELS_STATE
from gguf_split.format.names import JOURNAL, TMP_SUFFIX
from gguf_split.splitdir.restore import restore



def variant(*changed: str, seed: int = 1) -> dict:
    """The base tensors with `changed` ones given other bytes."""
    t = base_tensors(0)
    for name in changed:
        qt, shape, s = t[name]
        t[name] = (qt, shape, s + 1000 * seed)
    return t


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """base; chat and code each change one tensor; chat2 changes what chat changes and one more (so a
    re-split with it changes the number of files of chat and base)."""
    d = tmp_path / "models"
    d.mkdir()
    specs = {"base": variant(), "chat": variant("blk.0.attn_q.weight"), "code": variant("blk.1.attn_q.weight"),
             "chat2": variant("blk.0.attn_q.weight", "blk.0.ffn_up.weight", seed=2)}
    return {name: Path(write_model(d / f"{name}.gguf", t)) for name, t in specs.items()}


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [os.fspath(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def listing(d: Path) -> dict[str, str]:
    """Every entry of `d`: a file's sha256, a link's target, a directory's mark."""
    if not d.exists():
        return {}
    return {p.name: ("-> " + os.readlink(p) if p.is_symlink() else "dir" if p.is_dir() else sha256(p))
            for p in d.iterdir()}


def link_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_symlink() and "-of-" in p.name)


def check_links(d: Path, linked: set[str]) -> None:
    """The tasks in `linked` have exactly their llama.cpp links, resolving to their files in order (what
    `info DIR TASK --files` lists); no other link of a split name exists in `d`."""
    want: dict[str, str] = {}
    for task in linked:
        files = [Path(r["path"]).resolve() for r in task_files(d, task).files]
        for k, f in enumerate(files):
            want[f"{task}-{k + 1:05d}-of-{len(files):05d}.gguf"] = str(f)
    have = {name: str((d / name).resolve()) for name in link_names(d)}
    assert have == want


def split_files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.is_file() and not p.is_symlink()}


# ---------------------------------------------------------------------------------------------------------
# item 3: a re-split under another prefix


def test_force_resplit_under_another_prefix_replaces_the_old_split(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    two = ["-t", f"base={models['base']}", "-t", f"chat={models['chat']}"]
    code, _, err = run("split", "-q", "--file-cost", "0", "--link", *two, "-o", r)
    assert code == 0, err
    first = split_files(r)
    code, _, err = run("split", "-q", "--file-cost", "0", "--force", "--prefix", "v2_", *two, "-o", r)
    assert code == 0, err
    assert split_files(r) and all(n.startswith("v2_") for n in split_files(r)), split_files(r)
    assert not first & split_files(r)
    check_links(r, {"base", "chat"})  # the links follow the new files
    for args in (["verify", "-q", r], ["info", r]):
        code, _, err = run(*args)
        assert code == 0, (args, err)
    for task in ("base", "chat"):
        out = tmp_path / f"{task}.restored.gguf"
        restore(r, out, task=task)
        assert sha256(out) == sha256(models[task])
        with open_split(r) as s:
            assert s.load(task).adaptor_path == str(r / f"v2_adaptor-{task}.gguf")
    # and back, without a prefix: again every old file goes
    code, _, err = run("split", "-q", "--file-cost", "0", "--force", *two, "-o", r)
    assert code == 0, err
    assert split_files(r) == first
    check_links(r, {"base", "chat"})
    code, _, err = run("remove", "-q", r, "chat")
    assert code == 0, err
    check_links(r, {"base"})
    verify(r)


def test_force_resplit_refuses_a_users_file_under_the_new_prefix(models: dict[str, Path], tmp_path: Path) -> None:
    """The new prefix's adaptor name holding a file that is not this task's adaptor: refused, nothing
    written (the re-split would have renamed over it)."""
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0)
    (r / "v2_adaptor-chat.gguf").write_bytes(models["code"].read_bytes())  # a model of the user's
    before = listing(r)
    code, _, err = run("split", "-q", "--force", "--prefix", "v2_", "-t", f"base={models['base']}",
                       "-t", f"chat={models['chat']}", "-o", r)
    one_line(code, err, r / "v2_adaptor-chat.gguf", "is not this task's adaptor")
    assert listing(r) == before


# ---------------------------------------------------------------------------------------------------------
# item 6: links the tool made follow their task


def test_resplit_without_link_updates_the_links_a_task_has(models: dict[str, Path], tmp_path: Path) -> None:
    """A re-split that changes a task's number of files, without --link: the links it had are updated (a
    stale base-00001-of-00002.gguf would hand llama.cpp the old list)."""
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0, link=True)
    before = link_names(r)
    report = split({"base": models["base"], "chat": models["chat2"], "code": models["code"]}, r, file_cost=0,
                   force=True)
    check_links(r, {"base", "chat"})  # code had none: it gets none
    assert link_names(r) != before
    assert {t.task: len(t.links) for t in report.tasks} == {"base": len(report.tasks[0].files) + 1,
                                                            "chat": len(report.tasks[1].files) + 1, "code": 0}


def test_remove_deletes_the_tasks_links(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    # uncut (cut none): few files per task, so that the names below (9 files) are not the tool's
    split({"base": models["base"], "chat": models["chat"], "code": models["code"]}, r, file_cost=0, link=True,
          cut="none")
    # a user's link of a split name pointing elsewhere, and a user's file of such a name: never touched
    (tmp_path / "elsewhere.gguf").write_text("x")
    os.symlink("../elsewhere.gguf", r / "code-00001-of-00009.gguf")
    (r / "code-00002-of-00009.gguf").write_text("a user's file")
    # a dangling link 0.2's `remove` left for a task that is gone: stale, it goes
    os.symlink("adaptor-old.gguf", r / "old-00001-of-00002.gguf")
    code, stdout, err = run("remove", r, "code")
    assert code == 0, err
    assert "llama.cpp link(s)" in stdout
    assert os.readlink(r / "code-00001-of-00009.gguf") == "../elsewhere.gguf"
    assert (r / "code-00002-of-00009.gguf").read_text() == "a user's file"
    os.unlink(r / "code-00001-of-00009.gguf")
    check_links(r, {"base", "chat"})
    assert not any(p.is_symlink() and not p.exists() for p in r.iterdir()), "a dangling link is left"
    remove(r, ["base", "chat"])
    check_links(r, set())


def test_add_fixes_the_dangling_links_of_a_task_name_it_brings_back(models: dict[str, Path], tmp_path: Path) -> None:
    """0.2's remove left code's links dangling; a later add of a task named code must not let them point
    at the new adaptor with the old file count."""
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0)
    for k in range(1, 5):
        target = "adaptor-code.gguf" if k == 1 else f"shared-{k}00000000000.gguf"
        os.symlink(target, r / f"code-{k:05d}-of-00004.gguf")
    add(r, {"code": models["code"]})
    check_links(r, {"code"})


def test_link_names_holding_files_are_refused_before_writing(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    r.mkdir()
    (r / "chat-00001-of-00002.gguf").write_text("a user's file")
    before = listing(r)
    code, _, err = run("split", "-q", "--link", "--file-cost", "0", "--cut", "none", "-t", f"base={models['base']}",
                       "-t", f"chat={models['chat']}", "-o", r)  # uncut: chat loads 2 files
    one_line(code, err, r / "chat-00001-of-00002.gguf", "is not a link")
    assert "--force" not in err  # split --force would not get past it
    assert listing(r) == before


def test_link_is_one_commit_and_replaces_its_stale_links(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0, cut="none")  # chat: 2 files
    os.symlink("adaptor-chat.gguf", r / "chat-00001-of-00007.gguf")  # a link of an older file list
    code, stdout, err = run("link", "chat", r)
    assert code == 0, err
    assert str(r / "chat-00001-of-00002.gguf") in stdout
    check_links(r, {"chat"})
    assert not [p for p in r.iterdir() if p.name.endswith(TMP_SUFFIX) or p.name == JOURNAL]
    elsewhere = tmp_path / "links"
    elsewhere.mkdir()
    code, _, err = run("link", "chat", r, "--to", elsewhere)
    assert code == 0, err
    assert [Path(os.path.realpath(elsewhere / n)) for n in sorted(os.listdir(elsewhere))] == \
        [Path(p["path"]).resolve() for p in task_files(r, "chat").files]


# ---------------------------------------------------------------------------------------------------------
# items 4 and 8: models directories checked before anything is written


@pytest.mark.parametrize("kind", ["file", "under-a-file", "entry-not-ours", "state-not-ours"])
@pytest.mark.parametrize("command", ["split", "split-fresh", "add", "remove", "models-dir"])
def test_models_dir_that_cannot_be_written_is_refused_before_writing(models: dict[str, Path], tmp_path: Path,
                                                                      kind: str, command: str) -> None:
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0)
    m = tmp_path / "M"
    if kind == "file":
        m.write_text("mine")
        target, named, what = m, m, "not a directory"
    elif kind == "under-a-file":
        m.write_text("mine")
        target, named, what = m / "sub", m / "sub", "is not a directory"
    elif kind == "entry-not-ours":
        (m / "base").mkdir(parents=True)
        target, named, what = m, m / "base", "not made by gguf-split"
    else:
        m.mkdir()
        (m / MODELS_STATE).write_text("mine")
        target, named, what = m, m / MODELS_STATE, "not made by gguf-split"
    args = {"split": ["split", "-q", "--force", "-t", f"base={models['base']}", "-t", f"chat={models['code']}",
                      "-o", r, "--models-dir", target],
            "split-fresh": ["split", "-q", "-t", f"base={models['base']}", "-t", f"chat={models['code']}",
                            "-o", tmp_path / "fresh", "--models-dir", target],
            "add": ["add", "-q", r, "-t", f"code={models['code']}", "--models-dir", target],
            "remove": ["remove", "-q", r, "chat", "--models-dir", target],
            "models-dir": ["models-dir", r, target]}[command]
    before, m_before = listing(r), listing(m) if m.is_dir() else m.read_text()
    code, _, err = run(*args)
    one_line(code, err, named, what)
    assert "Traceback" not in err
    assert listing(r) == before
    assert (listing(m) if m.is_dir() else m.read_text()) == m_before
    assert not (tmp_path / "fresh").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_models_dir_read_only_is_refused_before_writing(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for target in (ro, ro / "sub"):
            before = listing(r)
            code, _, err = run("models-dir", r, target)
            one_line(code, err, target, "not writable")
            code, _, err = run("remove", "-q", r, "chat", "--models-dir", target)
            one_line(code, err, target, "not writable")
            assert listing(r) == before and os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_models_dir_of_a_folder_that_is_not_a_split_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "notsplit").mkdir()
    code, _, err = run("models-dir", tmp_path / "notsplit", tmp_path / "OUT")
    one_line(code, err, tmp_path / "notsplit", "holds no gguf-split adaptor")
    assert not (tmp_path / "OUT").exists()


def test_ctrl_c_at_every_step_says_what_stands(models: dict[str, Path], tmp_path: Path) -> None:
    """`split --force --link --models-dir` interrupted (SIGINT, the CLI's Ctrl-C handling) at each step of
    its commit and of the models directory's update in turn: exit 130, and the last line says exactly what
    stands, which is what the directory holds; the command it suggests then brings the models directory
    up to date."""
    r, m = tmp_path / "R", tmp_path / "M"
    old = {"base": models["base"], "chat": models["chat"]}
    new = {"base": models["base"], "chat": models["chat2"]}
    args = cli("split", "-q", "--force", "--link", "--file-cost", "0", "-o", r, "--models-dir", m,
               *[a for t, p in new.items() for a in ("-t", f"{t}={p}")])
    log = tmp_path / "steps.log"

    def prepare() -> None:
        split(old, r, file_cost=0, force=True, link=True, models_dir=m)

    prepare()
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "GGUF_SPLIT_TEST_STEPS": str(log)})
    assert p.returncode == 0, p.stderr
    steps = log.read_text().splitlines()
    switched = next(i for i, s in enumerate(steps, 1) if s.endswith(" switched"))
    assert any("models-dir" in s for s in steps[switched:]), steps
    outcomes = set()
    for k in range(1, len(steps) + 1):
        prepare()
        p = subprocess.run(args, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "GGUF_SPLIT_TEST_KILL_AT": str(k), "GGUF_SPLIT_TEST_SIGNAL": "SIGINT"})
        assert p.returncode == 130, (k, p.stderr)
        last = p.stderr.strip().splitlines()[-1]
        restored = tmp_path / "chat.gguf"
        restore(r, restored, task="chat", force=True)
        is_new = sha256(restored) == sha256(new["chat"])
        # a Ctrl-C from the journal's write on waits until the switch is applied (commit.signals_deferred):
        # from there on the new split stands, and the line says so
        assert is_new or k < switched, k
        if not is_new:
            assert last == "gguf-split: interrupted; no partial output was left behind", (k, last)
        else:
            assert last.startswith(f"gguf-split: interrupted; the split in {r} is "), (k, last)
            assert f"the models directory {m} was not brought up to date: run `gguf-split models-dir {r} {m}`" \
                in last, (k, last)
            assert run("models-dir", r, m)[0] == 0
            assert sorted(os.listdir(m / "chat")) == sorted(
                f"chat-{i:05d}-of-{len(task_files(r, 'chat').files):05d}.gguf"
                for i in range(1, len(task_files(r, "chat").files) + 1))
        with open_split(r) as s:
            s.load("chat")
        verify(r)  # recovers nothing: a reader; a pending commit is honoured
        run("link", "base", r)  # a writer: finishes a commit a killed run switched to
        check_links(r, {"base", "chat"})
        outcomes.add(is_new)
    assert outcomes == {False, True}


# ---------------------------------------------------------------------------------------------------------
# items 10 and 11: small manners


def test_add_after_every_task_was_removed_points_at_split(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0, link=True)
    code, _, err = run("remove", "-q", r, "base", "chat")
    assert code == 0, err
    assert link_names(r) == []
    code, _, err = run("add", "-q", r, "-t", f"code={models['code']}")
    one_line(code, err, r, "gguf-split split")


def test_link_to_a_file_says_not_a_directory(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0)
    f = tmp_path / "afile"
    f.write_text("mine")
    code, _, err = run("link", "base", r, "--to", f)
    one_line(code, err, f, "not a directory")
    assert "no such" not in err
    code, _, err = run("link", "base", r, "--to", tmp_path / "missing")
    one_line(code, err, tmp_path / "missing", "no such directory")


def test_remove_a_task_named_twice_removes_it_once(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"], "code": models["code"]}, r, file_cost=0)
    code, stdout, err = run("remove", r, "chat", "chat")
    assert code == 0, err
    assert stdout.count("adaptor-chat.gguf") == 1 and "removed chat:" in stdout, stdout
    verify(r)


def test_verify_takes_one_path_or_a_list(models: dict[str, Path], tmp_path: Path) -> None:
    r = tmp_path / "R"
    split({"base": models["base"], "chat": models["chat"]}, r, file_cost=0)
    for arg in (str(r), r, [r], (str(r),), [r / "adaptor-chat.gguf", r / "adaptor-base.gguf"]):
        assert sorted(verify(arg).tasks) == ["base", "chat"], arg
    assert list(verify(r / "adaptor-chat.gguf").tasks) == ["chat"]
    with pytest.raises(TypeError):
        verify(os.fsencode(r))  # type: ignore[arg-type]
