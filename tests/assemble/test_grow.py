"""Growth (issue 19): splits cut shared groups by tensor role and blocks of layers and record the cut;
`add` cuts new groups the same way, reuses every shared file a new task holds byte-identical (whatever role
its fine-tune changed), and reports what it wrote against the new model; a split made before cuts existed
(no record) is read as uncut and grows as before; the loader opens and swaps tasks of many files.

Models: the demo's tiny llama (8 layers) and fine-tunes of it made as llama-export-lora makes them
(gguf_split.demo.make_finetune: the targeted tensors merged with a random LoRA, written F16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gguf_split.assemble.outputs as S  # where adaptors are built (adaptor_kvs)
from gguf_split import add, open_split, restore, split, verify
from gguf_split.assemble.plan import CUT_SCHEME
from gguf_split.assemble.update import recorded_cut
from gguf_split.demo import Dims, make_base_model, make_finetune, sha256
from gguf_split.errors import GGUFSplitError
from gguf_split.format.gguf import GGUFFile
from gguf_split.format.records import K_CUT, K_CUT_SCHEME, AdaptorInfo, SplitFile

DIMS = Dims(n_layer=8)
N = DIMS.n_layer
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TOP = range(N // 2, N)


def targets(roles: tuple[str, ...], layers: range = range(N)) -> list[str]:
    return [f"blk.{i}.{r}.weight" for i in layers for r in roles]


RECIPES: dict[str, list[str]] = {
    "qv": targets(("attn_q", "attn_v")),
    "qv2": targets(("attn_q", "attn_v")),
    "ffn": targets(("ffn_gate", "ffn_up", "ffn_down"), TOP),
    "alllin": targets(LINEAR),
    "embd": ["token_embd.weight"],
    **{f"top-{r}": targets((r,), TOP) for r in LINEAR},
}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("family")
    models = {"base": make_base_model(d / "base.gguf", dims=DIMS)}
    for seed, (task, names) in enumerate(RECIPES.items(), start=1):
        make_finetune(models["base"], d / f"{task}.gguf", names, seed=seed)
        models[task] = str(d / f"{task}.gguf")
    return models


def pick(family: dict[str, str], *tasks: str) -> dict[str, str]:
    return {t: family[t] for t in tasks}


def adaptor_info(directory: str | Path, task: str) -> AdaptorInfo:
    with SplitFile(Path(directory) / f"adaptor-{task}.gguf") as f:
        return AdaptorInfo.read(f)


def task_files(directory: str | Path, task: str) -> list[str]:
    return [fr.name for fr in adaptor_info(directory, task).files]


def shared_tensors(directory: str | Path) -> dict[str, set[tuple[str, bytes]]]:
    """shared file name -> its tensors as (name, digest)."""
    out = {}
    for p in Path(directory).iterdir():
        if p.name.startswith(("foundation-", "shared-")):
            with SplitFile(p) as f:
                out[p.name] = {(t.name, dg) for t, dg in zip(f.header.tensors, f.digests())}
    return out


def model_tensors(path: str) -> set[tuple[str, bytes]]:
    import xxhash

    with GGUFFile(path) as f:
        return {(t.name, xxhash.xxh3_128_digest(f.tensor_view(t))) for t in f.header.tensors}


def restores_byte_exact(directory: str | Path, models: dict[str, str], tmp_path: Path) -> None:
    for task, path in models.items():
        out = restore(Path(directory) / f"adaptor-{task}.gguf", tmp_path / f"restored-{task}.gguf", force=True).output
        assert sha256(out) == sha256(path), task


# --- the cut is recorded, and add follows it ------------------------------------------------------------------

def test_a_split_records_its_cut(family: dict[str, str], tmp_path: Path) -> None:
    r = split(pick(family, "base", "qv"), tmp_path / "default", file_cost=0)
    info = adaptor_info(r.directory, "qv")
    assert (info.cut, info.cut_scheme) == ("role:6", CUT_SCHEME)
    assert len(task_files(r.directory, "base")) > 3, "the foundation is cut by role"
    r = split(pick(family, "base", "qv"), tmp_path / "none", file_cost=0, cut="none")
    assert adaptor_info(r.directory, "base").cut == "none"
    assert len(task_files(r.directory, "base")) == 1, "one foundation, as gguf-split 0.2 made it"


def _without_cut_records(monkeypatch: pytest.MonkeyPatch, scheme: int | None = None) -> None:
    """Adaptors written as gguf-split 0.2 wrote them (no cut record), or with another name scheme."""
    real = S.adaptor_kvs

    def kvs(**kw):  # noqa: ANN003, ANN202
        if scheme is not None:
            return real(**{**kw, "cut_scheme": scheme})
        def key(kv: bytes) -> str:  # an encoded KV record starts with its key: u64 length, UTF-8 bytes
            return kv[8:8 + int.from_bytes(kv[:8], "little")].decode()
        return [kv for kv in real(**kw) if key(kv) not in (K_CUT, K_CUT_SCHEME)]
    monkeypatch.setattr(S, "adaptor_kvs", kvs)


def test_a_split_without_a_cut_record_grows_as_before(family: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.2 split (uncut, no record) reads as cut none; `add` keeps new shared files whole and reuses the
    old whole files wherever the new task holds them."""
    with monkeypatch.context() as m:
        _without_cut_records(m)
        r = split(pick(family, "base", "qv"), tmp_path / "s", file_cost=0, cut="none")
    with SplitFile(Path(r.directory) / "adaptor-base.gguf") as f:
        assert K_CUT not in f.header.kv_by_key
    assert adaptor_info(r.directory, "base").cut == "none"
    before = {p.name: p.stat().st_mtime_ns for p in Path(r.directory).iterdir()}
    a = add(r.directory, pick(family, "qv2"), file_cost=0)
    assert a.cut == "none"
    assert a.reused_bytes > 0 and task_files(r.directory, "qv2") == task_files(r.directory, "base")
    assert all(Path(r.directory, n).stat().st_mtime_ns == t for n, t in before.items()), "no shipped file changes"
    restores_byte_exact(r.directory, pick(family, "base", "qv", "qv2"), tmp_path)


def test_add_cuts_new_groups_as_the_split_was_cut(family: dict[str, str], tmp_path: Path) -> None:
    """Two new tasks sharing a new FFN: their shared group is cut when the split was (role:2), kept whole when
    it was not; an explicit cut overrides the record."""
    twin = str(tmp_path / "ffn-twin.gguf")
    make_finetune(family["base"], twin, RECIPES["ffn"], seed=3, kv_overrides={"general.name": "twin"})
    new = {"ffn": family["ffn"], "twin": twin}
    for cut in ("role:2", "none"):
        r = split(pick(family, "base", "qv"), tmp_path / cut.replace(":", "-"), file_cost=0, cut=cut)
        a = add(r.directory, new, file_cost=0)
        assert a.cut == cut
        ours = [f for f in a.split.files if not f.kept and f.kind == "shared" and set(f.tasks) == {"ffn", "twin"}]
        # their group: the new FFN and the base's q/v (which sit in the base's adaptor), cut within the cap
        assert len(ours) > 1 if cut != "none" else len(ours) == 1, [f.name for f in ours]
        assert all(len(task_files(r.directory, t)) <= 32 for t in new)
        assert adaptor_info(r.directory, "twin").cut == cut, "new adaptors record the cut too"
    r = split(pick(family, "base", "qv"), tmp_path / "override", file_cost=0, cut="none")
    assert add(r.directory, new, file_cost=0, cut="role").cut == "role"


def test_an_unknown_name_scheme_is_refused_naming_the_adaptor(family: dict[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _without_cut_records(m, scheme=CUT_SCHEME + 1)
        r = split(pick(family, "base", "qv"), tmp_path / "s", file_cost=0)
    with pytest.raises(GGUFSplitError) as e:
        add(r.directory, pick(family, "ffn"), file_cost=0)
    assert e.value.path.endswith("adaptor-base.gguf") and f"scheme {CUT_SCHEME + 1}" in e.value.problem
    add(r.directory, pick(family, "ffn"), file_cost=0, cut="role")  # a cut given by the caller: fine
    assert recorded_cut({"a": ("role:4", 1), "b": ("role:4", 1), "c": ("none", 1)}).layers == 4


# --- add reuses what a fine-tune of any role left alone ---------------------------------------------------------

@pytest.mark.parametrize("task", ["embd", "ffn", *(f"top-{r}" for r in LINEAR)])
def test_add_reuses_every_shared_file_the_new_task_holds(family: dict[str, str], task: str, tmp_path: Path) -> None:
    r = split(pick(family, "base", "qv"), tmp_path / "s", file_cost=0, cut="role:2")
    before = shared_tensors(r.directory)
    a = add(r.directory, pick(family, task), file_cost=0)
    mine = model_tensors(family[task])
    holdable = {name for name, ts in before.items() if ts <= mine}
    loaded = set(task_files(r.directory, task))
    assert holdable and holdable <= loaded, sorted(holdable - loaded)
    assert a.reused_bytes + a.new_bytes == a.model_bytes, "every tensor is either reused or written once"
    # what it writes: its changed tensors, the base's q/v (only in the base's adaptor), and the rest of any
    # block of the cut it changed part of (none here: the fine-tunes change whole blocks of two layers)
    assert a.new_bytes == a.unique_bytes + a.in_adaptors_bytes
    assert a.in_adaptors_bytes > 0 or task == "top-attn_q"
    verify([r.directory])
    restores_byte_exact(r.directory, pick(family, "base", "qv", task), tmp_path)


def test_a_sequence_of_adds_stays_near_a_fresh_split(family: dict[str, str], tmp_path: Path) -> None:
    """Split base + qv, then add the others one by one (default cut and cap): after each add every task
    verifies and restores byte for byte; the tensor bytes stay within 1.25x of a fresh split of all."""
    r = split(pick(family, "base", "qv"), tmp_path / "s", file_cost=0)
    done = ["base", "qv"]
    for task in ("qv2", "ffn", "alllin", "embd", "top-attn_k"):
        a = add(r.directory, pick(family, task), file_cost=0)
        done.append(task)
        verify([r.directory])
        restores_byte_exact(r.directory, pick(family, *done), tmp_path)
        assert a.stored_bytes <= 1.25 * a.fresh_split_bytes, (task, a.stored_bytes, a.fresh_split_bytes)
        assert max(len(task_files(r.directory, t)) for t in done) <= 32


# --- the report --------------------------------------------------------------------------------------------------

def test_the_add_report_describes_the_add(family: dict[str, str], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gguf_split.cli.app import app

    r = split(pick(family, "base", "qv"), tmp_path / "s", file_cost=0)
    res = CliRunner().invoke(app, ["add", r.directory, "-t", f"ffn={family['ffn']}", "--file-cost", "0"])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "of the inputs" not in text and "one model" not in text, "no split-wide savings lines for an add"
    line = next(x for x in text.splitlines() if x.startswith("wrote "))
    assert "of tensors for the new task's" in line and "reused" in line and "cut role:6" in line
    assert "sits in other tasks' adaptors" in text and "fresh split" in text
    # reasons told against the split: its FFN changed, the base's q/v (only in the base's adaptor) not reusable
    # (role:6 cuts ffn_up into layers 0-5 and 6-7: layers 0-3 ride with the changed 4-5, out of reach)
    from gguf_split.assemble.update import IN_ADAPTOR, IN_FILE

    a = add(r.directory, pick(family, "top-ffn_up"), file_cost=0, dry_run=True)
    (t,) = a.split.tasks
    assert sorted(t.reasons.values()) == sorted(["changed"] * len(TOP) + [IN_ADAPTOR] * 2 * N + [IN_FILE] * 4)
    assert "held by a task of the split in its adaptor only" in text and "that not every task has" not in text
    res = CliRunner().invoke(app, ["add", r.directory, "-t", f"embd={family['embd']}", "--file-cost", "0",
                                   "--json", "--dry-run"])
    d = json.loads(res.output)
    assert d["cut"] == "role:6" and d["reused_bytes"] + d["new_bytes"] == d["model_bytes"] > 0


def test_cut_flag_and_spec_key_are_checked(family: dict[str, str], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gguf_split.cli.app import app

    res = CliRunner().invoke(app, ["split", "-o", str(tmp_path / "x"), "-t", f"base={family['base']}",
                                   "-t", f"qv={family['qv']}", "--cut", "layers:3"])
    assert res.exit_code == 2 and "--cut:" in res.output and "role:N" in res.output
    spec = tmp_path / "s.yaml"
    spec.write_text(f"output: out\ntasks:\n  base: {family['base']}\n  qv: {family['qv']}\noptions:\n  cut: role:0\n")
    res = CliRunner().invoke(app, ["split", str(spec)])
    assert res.exit_code == 2 and "options.cut:" in res.output
    spec.write_text(f"output: out\ntasks:\n  base: {family['base']}\n  qv: {family['qv']}\n"
                    "options:\n  cut: none\n  file_cost: 0\n")
    res = CliRunner().invoke(app, ["split", str(spec), "-q"])
    assert res.exit_code == 0, res.output
    assert adaptor_info(tmp_path / "out", "qv").cut == "none"


# --- many files ----------------------------------------------------------------------------------------------------

def test_the_loader_opens_and_swaps_tasks_of_many_files(family: dict[str, str], tmp_path: Path) -> None:
    tasks = pick(family, "base", "qv", "ffn", "embd")
    r = split(tasks, tmp_path / "s", file_cost=0, cut="role:1")
    n = len(task_files(r.directory, "base"))
    assert n >= 24
    with open_split(r.directory) as sp:
        m = sp.load("base")
        for task in ("base", "qv", "ffn", "embd", "base"):
            if task != m.task:
                m.swap(task)
            assert len(m.llama_cpp_paths()) == 1 + len(task_files(r.directory, task))
            with GGUFFile(tasks[task]) as f:
                assert set(m.tensors) == {t.name for t in f.header.tensors}
                for t in f.header.tensors:
                    assert bytes(m.tensors[t.name].data) == bytes(f.tensor_view(t)), (task, t.name)
        m.close()
