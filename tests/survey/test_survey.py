"""`gguf-split survey`: families found, their predicted split bytes equal to a real split, related models
explained from their headers, bad inputs skipped on one line each, each file hashed once, 1,000 files."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from typer.testing import CliRunner

import gguf_split.disk.manifest_cache as cache_mod
from helpers import BASE_TENSORS, base_tensors, write_model, write_sharded
from gguf_split import split
from gguf_split.cli.app import app
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import GGUFFile
from gguf_split.disk.manifest_cache import ManifestCache
from gguf_split.survey.families import IMATRIX, LADDER, TYPES, Model, candidate_families, diagnose, task_names
from gguf_split.disk.manifest import FileKey, FileManifest, TensorEntry
from gguf_split.survey.run import survey

Factory = Callable[..., str]


def finetune(seed: int = 0, **changes: int) -> dict[str, tuple[Q, tuple[int, ...], int]]:
    tensors = base_tensors(seed)
    for name, s in changes.items():
        qt, shape, _ = tensors[name.replace("__", ".")]
        tensors[name.replace("__", ".")] = (qt, shape, s)
    return tensors


def quantized_as(qtype: Q, seed: int) -> dict[str, tuple[Q, tuple[int, ...], int]]:
    """The base model's configuration with every quantized tensor of another type (norms stay F32)."""
    return {n: ((Q.F32, shape, 9000 + i) if qt == Q.F32 else (qtype, shape, seed * 100 + i))
            for i, (n, (qt, shape)) in enumerate(BASE_TENSORS.items())}


def folder(tmp_path: Path) -> dict[str, str]:
    """Two families (fine-tunes of two bases), an unrelated model, a quantization ladder, fine-tunes
    quantized with different importance matrices, a sharded member."""
    d = tmp_path / "models"
    (d / "team" / "deep").mkdir(parents=True)
    p: dict[str, str] = {}
    p["a-base"] = write_model(d / "a-base.gguf", base_tensors(0))
    p["a-chat"] = write_model(d / "a-chat.gguf", finetune(0, blk__0__attn_q__weight=101))
    p["a-code"] = write_model(d / "team" / "a-code.gguf", finetune(0, blk__1__attn_q__weight=102))
    p["a-shards"] = write_sharded(d / "team" / "deep" / "a-sharded", finetune(0, output_norm__weight=103), 3)
    p["b-base"] = write_model(d / "b-base.gguf", base_tensors(1), arch="qwen2")
    p["b-tune"] = write_model(d / "b-tune.gguf", finetune(1, blk__0__attn_v__weight=104), arch="qwen2")
    p["other"] = write_model(d / "other.gguf", base_tensors(2))
    for k, qt in enumerate((Q.Q8_0, Q.Q4_0)):
        p[f"ladder-{qt.name}"] = write_model(d / f"ladder-{qt.name}.gguf", quantized_as(qt, 50 + k), arch="phi3",
                                             kvs=lambda w, qt=qt: w.add_file_type(7 if qt == Q.Q8_0 else 2))
    for k, mat in enumerate(("chat.imatrix", "code.imatrix")):
        def kvs(w: GGUFWriter, mat: str = mat) -> None:
            w.add_string("quantize.imatrix.file", f"/data/{mat}")
            w.add_string("quantize.imatrix.dataset", "wiki.train.raw")
            w.add_int32("quantize.imatrix.entries_count", 7)
            w.add_int32("quantize.imatrix.chunks_count", 100)

        p[f"imat-{k}"] = write_model(d / f"imat-{k}.gguf", quantized_as(Q.Q4_0, 70 + k), kvs=kvs, arch="gemma3")
    return p


@pytest.fixture
def trust_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "RACY_NS", 0)


def test_families_alone_and_related(tmp_path: Path) -> None:
    p = folder(tmp_path)
    r = survey([tmp_path / "models"], file_cost=0)
    fams = {frozenset(m.path for m in f.members): f for f in r.families}
    a = frozenset([p["a-base"], p["a-chat"], p["a-code"], p["a-shards"]])
    b = frozenset([p["b-base"], p["b-tune"]])
    assert set(fams) == {a, b}
    assert fams[b].architecture == "qwen2" and fams[a].architecture == "llama"
    sharded = next(m for m in fams[a].members if m.path == p["a-shards"])
    assert len(sharded.files) == 3 and sharded.task == "a-sharded"
    assert sorted(m.path for m in r.alone) == sorted([p["other"], *(v for k, v in p.items() if k[:3] in ("lad", "ima"))])
    why = {r_.why: sorted(r_.members) for r_ in r.related}
    assert why[LADDER] == sorted([p["ladder-Q8_0"], p["ladder-Q4_0"]])
    assert why[IMATRIX] == sorted([p["imat-0"], p["imat-1"]])
    imatrix_text = next(r_.text for r_ in r.related if r_.why == IMATRIX)
    assert "chat.imatrix" in imatrix_text and "code.imatrix" in imatrix_text and "hint" in imatrix_text
    assert not r.skipped and r.scan.hashed_files == 13  # 11 files + 2 more shards


def test_predicted_bytes_equal_the_split_the_suggested_command_makes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = survey(["models"], file_cost=0)
    assert len(r.families) == 2
    for f in r.families:
        args = shlex.split(f.command)
        assert args[:2] == ["gguf-split", "split"] and args[-2] == "-o"
        result = CliRunner().invoke(app, [*args[1:], "-q"])
        assert result.exit_code == 0, result.output
        written = sum(q.stat().st_size for q in Path(args[-1]).iterdir())
        assert written == f.split_bytes and f.saved_bytes == f.input_bytes - written > 0
        assert f.input_bytes == sum(m.bytes for m in f.members)


def test_models_no_shared_file_joins_are_separate_families(tmp_path: Path) -> None:
    """Two pairs of fine-tunes whose bases share one small matrix (not worth a file at this file cost): the
    candidate holds all four, the plan joins them by no file, so they are two families (two splits store
    what one would)."""
    a, b = base_tensors(0), base_tensors(1)
    b["blk.0.attn_q.weight"] = a["blk.0.attn_q.weight"]
    paths = {}
    for name, tensors in (("a1", a), ("b1", b)):
        paths[name] = write_model(tmp_path / f"{name}.gguf", tensors)
        changed = dict(tensors)
        qt, shape, _ = changed["output_norm.weight"]
        changed["output_norm.weight"] = (qt, shape, 4242 + len(paths))
        paths[name[0] + "2"] = write_model(tmp_path / f"{name[0]}2.gguf", changed)
    r = survey([tmp_path], file_cost=8000)
    assert sorted(sorted(Path(m.path).name for m in f.members) for f in r.families) == \
        [["a1.gguf", "a2.gguf"], ["b1.gguf", "b2.gguf"]]


def test_default_options_are_what_split_would_do(model_factory: Factory, tmp_path: Path) -> None:
    """With split's default file cost (1 MiB), tiny models share nothing: no family; say so."""
    model_factory("base")
    model_factory("chat", {"blk.0.attn_q.weight": 5})
    r = survey([tmp_path])
    assert r.families == [] and len(r.alone) == 2
    assert split({"base": str(tmp_path / "base.gguf"), "chat": str(tmp_path / "chat.gguf")}, tmp_path / "o",
                 dry_run=True).shares_anything is False


def test_own_splits_and_packs_are_listed_as_such(model_factory: Factory, tmp_path: Path) -> None:
    from gguf_split.pack.transport import pack

    base = model_factory("base")
    chat = model_factory("chat", {"blk.0.attn_q.weight": 5})
    split({"base": base, "chat": chat}, tmp_path / "shipped", file_cost=0)
    pack(tmp_path / "family.ggufpack", split_dir=tmp_path / "shipped")
    r = survey([tmp_path], file_cost=0)
    assert [(s.tasks, len(s.files)) for s in r.splits] == [(["base", "chat"], len(os.listdir(tmp_path / "shipped")))]
    assert [(pk.kind, pk.tasks) for pk in r.packs] == [("split", ["base", "chat"])]
    assert [sorted(m.path for m in f.members) for f in r.families] == [sorted([base, chat])]
    result = CliRunner().invoke(app, ["survey", str(tmp_path), "--file-cost", "0", "--no-cache"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("gguf-split split: ") and "(tasks base, chat;" in line for line in lines)
    assert any(line.startswith("gguf-split pack: ") and "family.ggufpack (split: base, chat;" in line for line in lines)
    assert lines[0].startswith("surveyed ") and "2 model(s) in 1 family, 0 alone" in lines[0]


def test_bad_inputs_are_skipped_one_line_each(model_factory: Factory, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    good = [model_factory("base"), model_factory("chat", {"blk.0.attn_q.weight": 5})]
    (tmp_path / "notes.gguf").write_text("not a model\n")
    data = Path(good[0]).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])  # tensor data cut short
    (tmp_path / "loop").mkdir()
    os.symlink("..", tmp_path / "loop" / "up")
    os.symlink("self.gguf", tmp_path / "self.gguf")
    os.symlink("gone.gguf", tmp_path / "dangling.gguf")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "x.gguf").write_bytes(data)
    (tmp_path / "secret.gguf").write_bytes(data)
    real_scandir, real_open = os.scandir, open

    def scandir(path: Any) -> Any:  # tests run as root: a permission error is simulated
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    def fake_open(path: Any, *a: Any, **kw: Any) -> Any:
        if os.fspath(path).endswith("secret.gguf"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr("builtins.open", fake_open)
    r = survey([tmp_path], file_cost=0)
    got = {Path(p.path).name: p.problem for p in r.skipped}
    assert set(got) == {"notes.gguf", "cut.gguf", "up", "self.gguf", "dangling.gguf", "locked", "secret.gguf"}
    assert "not a GGUF file" in got["notes.gguf"] and "loop" in got["up"] and "loop" in got["self.gguf"]
    assert "dangling" in got["dangling.gguf"] and "Permission denied" in got["locked"]
    assert "Permission denied" in got["secret.gguf"] and "truncated" in got["cut.gguf"]
    assert all("\n" not in str(p) for p in r.skipped)
    assert [sorted(m.path for m in f.members) for f in r.families] == [sorted(good)]
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["survey", str(tmp_path), "--file-cost", "0", "--no-cache"])
    assert result.exit_code == 0
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 5  # locked and secret.gguf read fine without the simulated errors


def test_a_missing_argument_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFSplitError) as err:
        survey([tmp_path / "nope"])
    assert "no such file" in err.value.problem
    result = CliRunner().invoke(app, ["survey", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope: no such file or directory" in result.output


def test_scheduler_without_distributed_says_how_to_install_it(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # an import of it fails
    result = CliRunner().invoke(app, ["survey", str(tmp_path), "--scheduler", "tcp://127.0.0.1:8786"])
    assert result.exit_code == 2
    assert result.output == ("gguf-split: error: --scheduler needs Dask distributed, which is not installed: "
                             "pip install 'gguf-split[distributed]'\n")


def test_json(tmp_path: Path) -> None:
    p = folder(tmp_path)
    result = CliRunner().invoke(app, ["survey", str(tmp_path / "models"), "--json", "--file-cost", "0", "--no-cache"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"version", "families", "alone", "related", "splits", "packs", "skipped", "scan"} <= set(data)
    fam = next(f for f in data["families"] if p["b-base"] in f["members"])
    assert fam["members"] == [p["b-base"], p["b-tune"]] and fam["tasks"] == {"b-base": p["b-base"], "b-tune": p["b-tune"]}
    assert fam["split_bytes"] < fam["input_bytes"] and fam["saved_bytes"] == fam["input_bytes"] - fam["split_bytes"]
    assert fam["command"].startswith("gguf-split split ")
    assert p["other"] in data["alone"]


def test_a_second_survey_hashes_nothing(tmp_path: Path, trust_now: None) -> None:
    folder(tmp_path)
    with ManifestCache(tmp_path / "cache") as cache:
        cold = survey([tmp_path / "models"], cache=cache, file_cost=0)
    with ManifestCache(tmp_path / "cache") as cache:
        warm = survey([tmp_path / "models"], cache=cache, file_cost=0)
    assert cold.scan.hashed_files == 13 and warm.scan.hashed_files == 0 and warm.scan.cached_files == 13
    assert [(f.split_bytes, [m.path for m in f.members]) for f in warm.families] == \
        [(f.split_bytes, [m.path for m in f.members]) for f in cold.families]


# ---------------------------------------------------------------------------------------------------------
# parts


def _model(stem: str, tensors: list[tuple[str, int, bytes]], **facts: Any) -> Model:
    entries = tuple(TensorEntry(n, Q.Q4_0, (64, 64) if size > 256 else (64,), 0, size, d) for n, size, d in tensors)
    return Model([FileManifest(f"/m/{stem}.gguf", FileKey(0, 0, 0, 0, 0), "model", 0, tensors=entries,
                               facts={"architecture": "llama", **facts})])


def test_a_small_shared_tensor_joins_no_family() -> None:
    """Norms and rope tables are equal in unrelated models initialised alike; a small matrix too."""
    big = [(f"t{i}", 4096, bytes([i]) * 16) for i in range(8)]
    tiny = _model("tiny", [("small", 300, b"s" * 16), *[(n, s, b"t" + d[1:]) for n, s, d in big]])
    a = _model("a", [*big, ("norm", 256, b"n" * 16)])
    b = _model("b", [(n, s, d[::-1] + b"b") for n, s, d in big] + [("norm", 256, b"n" * 16)])
    c = _model("c", [*big[:4], *[(n, s, b"c" * 16) for n, s, _ in big[4:]]])
    a = _model("a", [*big, ("norm", 256, b"n" * 16), ("small", 300, b"s" * 16)])
    assert candidate_families([a, b, c, tiny]) == [[0, 2]]


def test_types_differ_between_fine_tunes_of_other_names() -> None:
    a = _model("a", [("t", 1, b"a" * 16)], file_type=15, name="Chat")
    b = _model("b", [("t", 1, b"b" * 16)], file_type=7, name="Code")
    found = diagnose([a, b])
    assert found is not None and found[0] == TYPES and "(Q4_K_M, Q8_0)" in found[1]
    assert diagnose([a, _model("c", [("t", 1, b"c" * 16)], file_type=15, name="X")]) is None


def test_task_names_are_valid_and_distinct() -> None:
    names = task_names(["/x/chat.gguf", "/y/chat.gguf", "/z/Llama 3 (8B).Q4_K_M.gguf", "/w/-odd-00001-of-00002.gguf",
                        "/v/chat.gguf"])
    assert names[0] != names[1] and len(set(names)) == 5
    from gguf_split.format.names import check_task_name

    assert all(check_task_name(n) == n for n in names)
    assert names[2] == "Llama-3-8B-.Q4_K_M" and names[3] == "odd"


# ---------------------------------------------------------------------------------------------------------
# scale


def make_many(directory: Path, families: int, per_family: int, alone: int) -> None:
    """families x per_family models (each family: a base and fine-tunes changing one tensor) plus `alone`
    unrelated models: one template written with GGUFWriter, its tensor bytes rewritten per model."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    template = Path(write_model(directory / "template.tmp", base_tensors(0)))
    data = template.read_bytes()
    with GGUFFile(template) as f:
        spans = [(f.header.data_start + t.offset, t.nbytes) for t in f.header.tensors]
    template.unlink()
    big = max(range(len(spans)), key=lambda i: spans[i][1])

    def write(path: Path, seed: int, changed_seed: int | None) -> None:
        buf = bytearray(data)
        rng = np.random.default_rng(seed)
        for i, (at, n) in enumerate(spans):
            r = np.random.default_rng(changed_seed) if i == big and changed_seed is not None else rng
            buf[at:at + n] = r.integers(0, 256, n, dtype=np.uint8).tobytes()
        path.write_bytes(buf)

    for fam in range(families):
        sub = directory / f"family-{fam:03d}"
        sub.mkdir(exist_ok=True)
        for k in range(per_family):
            write(sub / f"m{fam:03d}-{k:02d}.gguf", 1000 + fam, None if k == 0 else 100_000 + fam * 100 + k)
    for k in range(alone):
        write(directory / f"alone-{k:03d}.gguf", 500_000 + k, None)


_SCALE = r"""
import json, sys, time
from gguf_split.survey.run import survey
small = survey([sys.argv[1]], file_cost=0)
def peak_kib():  # this process's own peak RSS (ru_maxrss would include the parent's, from before the exec)
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
rss_small = peak_kib()
t0 = time.perf_counter()
r = survey([sys.argv[2]], file_cost=0)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rss_small_kib": rss_small,
                  "rss_kib": peak_kib(),
                  "families": sorted(len(f.members) for f in r.families), "alone": len(r.alone),
                  "skipped": len(r.skipped), "files": r.scan.files}))
"""


def test_a_thousand_files_in_seconds_and_bounded_memory(tmp_path: Path) -> None:
    make_many(tmp_path / "small", 2, 5, 10)
    make_many(tmp_path / "many", 90, 10, 100)
    env = {**os.environ, "GGUF_SPLIT_CACHE_DIR": str(tmp_path / "cache")}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _SCALE, str(tmp_path / "small"), str(tmp_path / "many")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    print(f"1,000 files: {got['seconds']:.1f} s survey, max RSS {got['rss_kib'] / 1024:.0f} MiB "
          f"({got['rss_small_kib'] / 1024:.0f} MiB after 20 files); {time.perf_counter() - t0:.1f} s in all")
    assert got["files"] == 1000 and got["families"] == [10] * 90 and got["alone"] == 100 and got["skipped"] == 0
    assert got["rss_kib"] - got["rss_small_kib"] < 64 * 1024  # 1,000 files, no per-file growth worth the name
    assert got["seconds"] < 120
