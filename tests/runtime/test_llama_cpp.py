"""Stock llama.cpp runs every task of a split exactly like the original model.

The demo models (a tiny llama model with an SPM vocabulary and three export-lora-style fine-tunes) are split
into a multi-file layout (a foundation, shared files for subsets of tasks, a hole); for every task,
llama.cpp (llama-cpp-python's low-level C API) decodes a fixed prompt of token ids from
  - the original GGUF,
  - the task's files given to llama_model_load_from_splits (adaptor, then split.no 1..k),
  - the `<task>-00001-of-0000N.gguf` link alone (llama.cpp finds the other files by name),
  - the file `gguf_split.restore` rebuilds,
and the last token's logits (all n_vocab float32) must be bitwise identical. The same holds for a split
with --max-shard-size, for a split made from a sharded model (given as llama.cpp shards), and for a task
added later with `add` (no existing file changes).

A shared file of another split: llama.cpp itself checks names, shapes and counts only, so a foreign file
with the same tensor names and shapes loads without a word and computes other logits; gguf-split's verify
(library and CLI), restore and loader refuse it, naming the file.

Skipped when llama_cpp cannot be imported, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import filecmp
import hashlib
import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import llama_harness as H

if H.IMPORT_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{H.IMPORT_ERROR} (CI=true: the llama.cpp tests must run)", pytrace=False)
    pytest.skip(H.IMPORT_ERROR, allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

from gguf_split import add, open_split, restore, split, verify  # noqa: E402
from gguf_split.cli.app import app  # noqa: E402
from gguf_split.demo import Dims  # noqa: E402
from gguf_split.errors import GGUFSplitError  # noqa: E402
from gguf_split.format.gguf import GGUFFile  # noqa: E402
from gguf_split.assemble.report import SplitReport  # noqa: E402

TASKS = ("base", "chat", "code", "summarize")


@dataclass
class Split:
    models: dict[str, str]  # task -> original GGUF (its first shard if sharded)
    report: SplitReport

    def task(self, task: str):  # noqa: ANN201
        return next(t for t in self.report.tasks if t.task == task)

    def files(self, task: str) -> list[str]:
        with open_split(self.report.directory) as s:
            m = s.load(task)
            try:
                return m.llama_cpp_paths()
            finally:
                m.close()


def make_split(root: Path, tasks: tuple[str, ...] = TASKS, *, split_args: dict | None = None,
               **demo_args: int) -> Split:
    models = H.demo_models(root / "models", **demo_args)
    chosen = {t: models[t] for t in tasks}
    return Split(chosen, split(chosen, root / "split", link=True, **{"file_cost": 0, **(split_args or {})}))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Split:
    return make_split(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def original_logits(demo: Split) -> dict[str, bytes]:
    return {task: H.last_logits([path]) for task, path in demo.models.items()}


def test_fine_tunes_give_distinct_finite_logits(original_logits: dict[str, bytes]) -> None:
    """The comparisons below can fail: every task's own tensors change the logits."""
    for task, raw in original_logits.items():
        values = np.frombuffer(raw, dtype=np.float32)
        assert values.size == Dims().n_vocab, task
        assert np.isfinite(values).all() and values.std() > 0, task
    for a, b in itertools.combinations(original_logits, 2):
        assert original_logits[a] != original_logits[b], (a, b)


def test_the_demo_split_is_really_multi_file(demo: Split) -> None:
    """More than one shared file, tasks loading different sets, and a hole: the cases llama.cpp must take."""
    kinds = [f.kind for f in demo.report.files]
    assert kinds.count("shared") >= 2 and "foundation" in kinds and "hole" in kinds
    assert len({tuple(demo.task(t).files) for t in TASKS}) == len(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_split_list_gives_identical_logits(demo: Split, original_logits: dict[str, bytes], task: str) -> None:
    files = demo.files(task)
    assert len(files) == 1 + len(demo.task(task).files)
    assert H.last_logits(files) == original_logits[task]


@pytest.mark.parametrize("task", TASKS)
def test_named_link_gives_identical_logits(demo: Split, original_logits: dict[str, bytes], task: str) -> None:
    links = [Path(p) for p in demo.task(task).links]
    assert [p.resolve() for p in links] == [Path(p).resolve() for p in demo.files(task)]
    assert H.last_logits([links[0]]) == original_logits[task]


@pytest.mark.parametrize("task", TASKS)
def test_restored_model_gives_identical_logits(demo: Split, original_logits: dict[str, bytes], task: str,
                                               tmp_path: Path) -> None:
    out = restore(demo.task(task).adaptor, tmp_path / f"{task}.gguf").output
    assert filecmp.cmp(out, demo.models[task], shallow=False)
    assert H.last_logits([out]) == original_logits[task]


def test_adaptor_alone_is_refused_by_llama_cpp(demo: Split) -> None:
    """Opened by its own name, an adaptor (split 0 of k) does not run on its own: the link name is needed."""
    with pytest.raises(H.LlamaLoadError, match="invalid split file name"):
        H.load_model([demo.task("chat").adaptor])


def test_max_shard_size_split_gives_identical_logits(tmp_path: Path) -> None:
    """Every file at most the shard size (a lone larger tensor gets a file of its own) and every task still
    runs in llama.cpp bitwise like its original."""
    limit = 1 << 20
    s = make_split(tmp_path, split_args={"max_shard_size": limit}, n_embd=256, n_ff=512, n_layer=12)
    biggest = max(t.nbytes for m in s.models.values() for t in GGUFFile(m).header.tensors)
    sizes = [os.path.getsize(p) for p in Path(s.report.directory).glob("*.gguf") if not p.is_symlink()]
    assert all(n <= max(limit, biggest + (64 << 10)) for n in sizes), sizes
    plain = split(s.models, tmp_path / "plain", file_cost=0, cut="none")  # one file per group, no limit
    assert len(s.report.files) > len(plain.files)  # the limit (and the default cut) made more files
    assert max(f.bytes for f in plain.files) > limit
    for task, path in s.models.items():
        assert H.last_logits(s.files(task)) == H.last_logits([path]), task
    verify([s.report.directory])


def test_split_of_sharded_inputs_gives_identical_logits(demo: Split, tmp_path: Path) -> None:
    """A model given as llama.cpp shards is read as one model; its task runs like the sharded original,
    and restore gives back every shard byte for byte under its name."""
    d = tmp_path / "shards"
    d.mkdir()
    first = _shard_copy(demo.models["code"], d / "code")
    paths = sorted(d.glob("code-*.gguf"))
    assert len(paths) == 3 and all(GGUFFile(p).get("split.count") == 3 for p in paths)
    original = H.last_logits([first])
    assert original == H.last_logits([demo.models["code"]])  # the shards are the same model
    s = split({"base": demo.models["base"], "code": first}, tmp_path / "split", file_cost=0)
    code = next(t for t in s.tasks if t.task == "code")
    with open_split(s.directory) as sp:
        m = sp.load("code")
        files = m.llama_cpp_paths()
        m.close()
    assert H.last_logits(files) == original
    out = tmp_path / "restored"
    r = restore(code.adaptor, out)
    assert [Path(f.path).name for f in r.files] == [p.name for p in paths]
    for f, p in zip(r.files, paths):
        assert filecmp.cmp(f.path, p, shallow=False)


def _shard_copy(model: str, prefix: Path) -> str:
    """Three shards of `model` written with gguf-split's own encoders (KVs and tensor bytes copied byte for
    byte; shard 1 keeps every KV), as llama-gguf-split lays them out."""
    from gguf.constants import GGUFValueType as V

    from gguf_split.format.gguf import align_up, encode_kv, encode_prefix, encode_tensor_info

    f = GGUFFile(model)
    h = f.header
    n, names = 3, [t.name for t in h.tensors]
    per = -(-len(names) // n)
    for k in range(n):
        part = h.tensors[k * per:(k + 1) * per]
        kvs = [f.raw(kv.start, kv.end) for kv in h.kvs] if k == 0 else []
        kvs += [encode_kv("split.no", V.UINT16, k), encode_kv("split.count", V.UINT16, n),
                encode_kv("split.tensors.count", V.INT32, len(names))]
        offsets, pos = [], 0
        for t in part:
            offsets.append(pos)
            pos = align_up(pos + t.nbytes, h.alignment)
        infos = b"".join(encode_tensor_info(t.name, t.shape, t.ggml_type, o) for t, o in zip(part, offsets))
        head = encode_prefix(3, len(part), len(kvs)) + b"".join(kvs) + infos
        with open(f"{prefix}-{k + 1:05d}-of-{n:05d}.gguf", "wb") as out:
            out.write(head + bytes(align_up(len(head), h.alignment) - len(head)))
            for t, o in zip(part, offsets):
                out.write(f.raw(h.data_start + t.offset, h.data_start + t.offset + t.nbytes))
                out.write(bytes(align_up(t.nbytes, h.alignment) - t.nbytes))
    f.close()
    return f"{prefix}-00001-of-{n:05d}.gguf"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_added_task_gives_identical_logits_and_changes_no_file(tmp_path: Path) -> None:
    """`add` a fine-tune to a shipped split: its logits equal its original's, and every existing file keeps
    its bytes (sha256) and mtime; every task still restores."""
    models = H.demo_models(tmp_path / "models")
    s = split({t: models[t] for t in ("base", "chat")}, tmp_path / "split", file_cost=0)
    before = {p.name: (sha(p), p.stat().st_mtime_ns) for p in Path(s.directory).iterdir()}
    r = add(s.directory, {t: models[t] for t in ("code", "summarize")}, file_cost=0)
    after = {p.name: (sha(p), p.stat().st_mtime_ns) for p in Path(s.directory).iterdir() if p.name in before}
    assert after == before
    with open_split(s.directory) as sp:
        for task in ("code", "summarize", "base", "chat"):
            m = sp.load(task)
            assert H.last_logits(m.llama_cpp_paths()) == H.last_logits([models[task]]), task
            m.close()
    for task in ("base", "chat", "code", "summarize"):
        out = restore(s.directory, tmp_path / f"r-{task}.gguf", task=task).output
        assert filecmp.cmp(out, models[task], shallow=False)
    assert r.split.tasks and verify([s.directory]).tasks.keys() == {"base", "chat", "code", "summarize"}


def test_tasks_of_many_files_give_identical_logits_add_after_add(tmp_path: Path) -> None:
    """Issue 19: a split cut finely (role:1, free files) makes every task load 20-32 files, holes included;
    llama.cpp runs each bitwise like its original. Then the other tasks are added one at a time, each
    reusing the cut files it holds: after every add, every task's logits, restore byte for byte, verify."""
    models = H.demo_models(tmp_path / "models", n_layer=8)
    originals = {task: H.last_logits([path]) for task, path in models.items()}
    s = split({t: models[t] for t in ("base", "chat")}, tmp_path / "split", file_cost=0, cut="role:1")
    done = ["base", "chat"]

    def check() -> None:
        with open_split(s.directory) as sp:
            for task in done:
                m = sp.load(task)
                files = m.llama_cpp_paths()
                m.close()
                assert 1 + 1 <= len(files) <= 1 + 32, (task, len(files))
                assert H.last_logits(files) == originals[task], task
        for task in done:
            out = restore(s.directory, tmp_path / f"r-{task}.gguf", task=task, force=True).output
            assert filecmp.cmp(out, models[task], shallow=False), task
        verify([s.directory])

    with open_split(s.directory) as sp:
        assert len(sp.load("base").llama_cpp_paths()) >= 1 + 20
    check()
    for task in ("code", "summarize"):
        r = add(s.directory, {task: models[task]}, file_cost=0)
        assert r.reused_bytes > 0 and r.cut == "role:1"
        done.append(task)
        check()


def test_foreign_shared_file_loads_silently_in_llama_cpp_but_gguf_split_refuses(demo: Split, tmp_path: Path,
                                                                                  original_logits: dict[str, bytes]
                                                                                  ) -> None:
    """llama.cpp checks tensor names, shapes and counts, not contents: a foundation of another split with
    the same tensors runs without a warning and computes logits of neither model. gguf-split refuses."""
    foreign = make_split(tmp_path / "foreign", base_seed=7)
    mine = demo.files("chat")
    theirs = foreign.files("chat")
    assert [Path(p).name.split("-")[0] for p in mine] == [Path(p).name.split("-")[0] for p in theirs]
    mixed_files = [mine[0], theirs[1], *mine[2:]]
    mark = H.log_mark()
    with H.loaded(mixed_files) as model, H.context(model) as ctx:
        mixed = H.decode_last_logits(model, ctx)
    assert H.log_since(mark, H.WARN) == []
    assert mixed != original_logits["chat"]
    assert np.isfinite(np.frombuffer(mixed, dtype=np.float32)).all()
    # the foreign foundation copied over ours, under our name: every gguf-split path refuses, naming it
    copy = tmp_path / "copy"
    shutil.copytree(demo.report.directory, copy, symlinks=True)
    ours = copy / Path(mine[1]).name
    ours.write_bytes(Path(theirs[1]).read_bytes())
    with pytest.raises(GGUFSplitError) as err:
        verify([copy])
    assert err.value.path == str(ours)
    with pytest.raises(GGUFSplitError) as err:
        restore(copy / "adaptor-chat.gguf", tmp_path / "never.gguf")
    assert err.value.path == str(ours) and not (tmp_path / "never.gguf").exists()
    with pytest.raises(GGUFSplitError), open_split(copy) as sp:
        sp.load("chat")
    result = CliRunner().invoke(app, ["verify", "-q", str(copy)])
    assert result.exit_code == 2 and result.stderr.startswith(f"gguf-split: error: {ours}: ")
