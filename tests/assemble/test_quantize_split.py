"""split --quantize and add: every task of the quantized split is the file llama-quantize writes for it.

Oracle: `llama_model_quantize` (llama-quantize's core, in process, this build) run on each full-precision
model with the same TYPE and imatrix and the CLI's imatrix KVs (`quantize.llama_quantize`): each task's
restore must be that file byte for byte (names, types, bytes of every tensor, and every KV), its sha256 the
one the split recorded, and llama.cpp's logits of the split's task bitwise those of llama-quantize's file.
The family: a tiny F16 llama base and fine-tunes that change a few tensors (tests/helpers.py make_model), one
with an untied output head (its token_embd gets another type: planned per model, never assumed).

Skipped when llama_cpp cannot be imported, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

import llama_harness as H

if H.IMPORT_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{H.IMPORT_ERROR} (CI=true: the llama.cpp tests must run)", pytrace=False)
    pytest.skip(H.IMPORT_ERROR, allow_module_level=True)

from gguf_split import GGUFSplitError, add, restore, split, verify  # noqa: E402
from gguf_split.assemble import quantize as QZ  # noqa: E402
from gguf_split.assemble.quantize import family as FAM  # noqa: E402
from gguf_split.format.gguf import GGUFFile  # noqa: E402
from gguf_split.format.names import is_temp_dir  # noqa: E402
from gguf_split.format.records import AdaptorInfo, SplitFile  # noqa: E402
from gguf_split.splitdir.info import savings  # noqa: E402
from helpers import SMALL, make_model, matmul_inputs, random_entries, write_imatrix_dat, write_imatrix_gguf  # noqa: E402

CHANGES = {"base": [], "chat": ["blk.3.attn_q.weight", "blk.3.attn_v.weight"], "code": ["blk.7.ffn_up.weight"]}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("family")
    models = {t: make_model(d / f"{t}-f16.gguf", changed=c, **SMALL) for t, c in CHANGES.items()}
    entries = random_entries(matmul_inputs(**SMALL))
    return {"models": models, "dir": d, "imatrix": write_imatrix_gguf(d / "imatrix.gguf", entries),
            "dat": write_imatrix_dat(d / "imatrix.dat", entries),
            "untied": make_model(d / "untied-f16.gguf", output=True, changed=["blk.5.attn_output.weight"], **SMALL),
            "legal": make_model(d / "legal-f16.gguf", changed=["blk.1.ffn_down.weight"], **SMALL)}


def oracle(src: str, out: Path, qtype: str, imatrix: str | None, **kw: Any) -> Path:
    """The file llama-quantize (this build, the CLI's parameters and KVs) writes for `src`."""
    QZ.llama_quantize(src, out, QZ.make_recipe(qtype, imatrix, **kw), threads=2)
    return out


def restored(split_dir: Path, task: str, tmp: Path) -> Path:
    rep = restore(split_dir, f"{tmp / f'restored-{task}'}{os.sep}", task=task, force=True)
    return Path(rep.output)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("qtype, imatrix", [("Q4_K_M", "imatrix"), ("Q4_0", "dat"), ("Q6_K", None)])
def test_each_task_restores_to_llama_quantize_output(family: dict[str, Any], tmp_path: Path, qtype: str,
                                                     imatrix: str | None) -> None:
    imx = family[imatrix] if imatrix else None
    out = tmp_path / "split"
    report = split(family["models"], out, quantize=qtype, imatrix=imx, file_cost=0)
    q = report.quantize
    assert q is not None and not q.kept and {t.task for t in q.tasks} == set(CHANGES)
    # every unit quantized once: the base's quantized tensors, then one per changed tensor
    base_units = next(t for t in q.tasks if t.task == "base").quantized
    assert q.units == base_units + 3
    for t in q.tasks:
        assert t.new_units == len(CHANGES[t.task]) or t.task == "base"
        ref = oracle(family["models"][t.task], tmp_path / f"ref-{t.task}.gguf", qtype, imx)
        got = restored(out, t.task, tmp_path)
        assert got.name == f"{t.task}-{qtype}.gguf" and filecmp.cmp(got, ref, shallow=False), t.task
        assert t.sha256 == sha256(ref)
    # what the fine-tunes did not change is stored once
    assert report.output_bytes < 0.5 * report.input_bytes
    chat = next(t for t in report.tasks if t.task == "chat")
    assert set(chat.reasons) == set(CHANGES["chat"])
    verify([out])


def test_logits_of_quantized_tasks_equal_llama_quantize(family: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "split"
    split(family["models"], out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0)
    from gguf_split import open_split

    with open_split(out) as s:
        for task in ("base", "chat"):
            m = s.load(task)
            try:
                paths = m.llama_cpp_paths()
            finally:
                m.close()
            ref = oracle(family["models"][task], tmp_path / f"ref-{task}.gguf", "Q4_K_M", family["imatrix"])
            assert H.last_logits(paths) == H.last_logits([ref]), task


def test_records_info_and_dry_run(family: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "split"
    dry = split(family["models"], out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0, dry_run=True)
    assert not out.exists() and dry.quantize is not None and dry.quantize.units == 0
    real = split(family["models"], out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0)
    # the dry run plans the same split (units matched by key: no collision in this family)
    assert [(f.kind, f.position, f.tensors, f.bytes) for f in dry.files] == \
        [(f.kind, f.position, f.tensors, f.bytes) for f in real.files]
    assert [t.adaptor_bytes for t in dry.tasks] == [t.adaptor_bytes for t in real.tasks]
    with SplitFile(out / "adaptor-chat.gguf") as f:
        info = AdaptorInfo.read(f)
    q = info.quantize
    assert q is not None and q.recipe.qtype == "Q4_K_M" and q.recipe.imatrix_name == "imatrix.gguf"
    assert q.recipe.imatrix_sha256 == hashlib.sha256(Path(family["imatrix"]).read_bytes()).hexdigest()
    assert q.source_name == "chat-f16.gguf" and q.build["system_info"] and q.build["ggml_version"]
    assert info.sources[0].name == "chat-Q4_K_M.gguf"
    with GGUFFile(family["models"]["chat"]) as src:
        digests = {t.name: d for t, d in zip(src.header.tensors, _digests(src))}
    with GGUFFile(restored(out, "chat", tmp_path)) as qf:
        names = [t.name for t in qf.header.tensors]
    assert [q.source_digest(i) for i in range(len(names))] == [digests[n] for n in names]
    rows = {t["task"]: t for t in savings(out).tasks}
    assert rows["chat"]["quantized"]["type"] == "Q4_K_M" and rows["chat"]["quantized"]["from"]["name"] == "chat-f16.gguf"


def _digests(f: GGUFFile) -> list[bytes]:
    import xxhash

    return [xxhash.xxh3_128(f.tensor_view(t)).digest() for t in f.header.tensors]


def test_add_reuses_the_splits_units(family: dict[str, Any], tmp_path: Path) -> None:
    """A new F16 fine-tune with the split's recipe: every unchanged unit is taken from the split (none
    quantized again), only the changed tensor is quantized; an untied output head gets another token_embd
    type (detected). Both restore to llama-quantize's files; no shipped file changes."""
    out = tmp_path / "split"
    split(family["models"], out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0)
    shipped = {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in out.iterdir()}
    rep = add(out, {"legal": family["legal"], "untied": family["untied"]}, imatrix=family["imatrix"], file_cost=0)
    q = rep.split.quantize
    assert q is not None and q.notes == []  # same build: nothing to spot-check
    legal = next(t for t in q.tasks if t.task == "legal")
    untied = next(t for t in q.tasks if t.task == "untied")
    assert legal.new_units == 1
    # its changed tensor, its own output.weight, and token_embd at Q4_K (Q6_K when tied)
    assert untied.new_units == 3 and untied.types["Q4_K"] == legal.types["Q4_K"] + 1
    # taken from the split: every unit of base's (legal changed blk.1.ffn_down, which untied has as base has it)
    assert q.units == 4 and q.reused_units == legal.quantized
    for task in ("legal", "untied"):
        ref = oracle(family[task], tmp_path / f"ref-{task}.gguf", "Q4_K_M", family["imatrix"])
        assert filecmp.cmp(restored(out, task, tmp_path), ref, shallow=False), task
    assert {n: v for n, v in ((p.name, (p.stat().st_mtime_ns, sha256(p))) for p in out.iterdir())
            if n in shipped} == shipped


def test_add_needs_the_same_recipe(family: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "split"
    split({"base": family["models"]["base"]}, out, quantize="Q4_K_M", imatrix=family["imatrix"])
    legal = {"legal": family["legal"]}
    with pytest.raises(GGUFSplitError, match="give it again with --imatrix"):
        add(out, legal)
    with pytest.raises(GGUFSplitError, match=r"another recipe \(type Q8_0 instead of Q4_K_M\)"):
        add(out, legal, quantize="Q8_0", imatrix=family["imatrix"])
    with pytest.raises(GGUFSplitError, match="imatrix imatrix.dat instead of imatrix.gguf"):
        add(out, legal, imatrix=family["dat"])  # the same vectors, another file: the recipe names the file
    rep = add(out, legal, quantize="Q8_0", imatrix=family["imatrix"], allow_recipe_change=True)
    q = rep.split.quantize
    assert q is not None and q.reused_units == 0 and q.tasks[0].types.get("Q8_0")
    assert filecmp.cmp(restored(out, "legal", tmp_path),
                       oracle(family["legal"], tmp_path / "ref.gguf", "Q8_0", family["imatrix"]), shallow=False)


def test_add_on_another_build_spot_checks(family: dict[str, Any], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The split says which build quantized it; an add on another build re-quantizes a few reused units and
    says whether they came out the same (the stored bytes are kept either way)."""
    out = tmp_path / "split"
    split({"base": family["models"]["base"]}, out, quantize="Q4_K_M")
    real = QZ.backend().build_info()
    monkeypatch.setattr(QZ.Backend, "build_info", lambda self: {**real, "ggml_commit": "other"})
    rep = add(out, {"legal": family["legal"]})
    assert rep.split.quantize is not None
    [note] = rep.split.quantize.notes
    assert "is not the one that quantized the split" in note and "gave the same bytes" in note
    original = FAM.quantize_tensor

    def rounds_otherwise(*a: Any, **k: Any) -> Any:
        data = original(*a, **k).copy()
        data[0] ^= 1
        return data

    monkeypatch.setattr(FAM, "quantize_tensor", rounds_otherwise)
    rep = add(out, {"legal2": family["legal"]})
    assert rep.split.quantize is not None
    [note] = rep.split.quantize.notes
    assert f"rounds {FAM.SPOT_CHECKS} of {FAM.SPOT_CHECKS} reused tensors differently" in note
    # the stored bytes were kept: the new task shares them with base
    assert filecmp.cmp(restored(out, "legal2", tmp_path), restored(out, "legal", tmp_path), shallow=False)


def test_quantized_inputs_are_kept_and_templates_quantize_merges(family: dict[str, Any], tmp_path: Path) -> None:
    """An already quantized input is kept as it is; an export-lora-like merge over it (its changed tensors
    F16, the others the base's Q4_K_M bytes) is quantized to the base's types with --quantize-template and
    then shares every untouched tensor with the base."""
    base_q = oracle(family["models"]["base"], tmp_path / "base-q4.gguf", "Q4_K_M", None)
    merge = tmp_path / "chat-merged.gguf"
    _merge(base_q, family["models"]["chat"], CHANGES["chat"], merge)
    models = {"base": str(base_q), "chat": str(merge), "code": family["models"]["code"]}
    rep = split(models, tmp_path / "kept", quantize="Q4_K_M", file_cost=0, dry_run=True)
    assert rep.quantize is not None and set(rep.quantize.kept) == {"base", "chat"}
    assert "--quantize-template" in rep.quantize.kept["chat"]
    out = tmp_path / "templ"
    rep = split(models, out, quantize="Q4_K_M", quantize_template=base_q, file_cost=0)
    assert rep.quantize is not None and set(rep.quantize.kept) == {"base"}
    chat = next(t for t in rep.quantize.tasks if t.task == "chat")
    assert chat.quantized == 2 and chat.new_units == 2
    assert set(next(t for t in rep.tasks if t.task == "chat").reasons) == set(CHANGES["chat"])
    assert filecmp.cmp(restored(out, "base", tmp_path), base_q, shallow=False)  # kept: the user's own file
    ref = oracle(str(merge), tmp_path / "ref-chat.gguf", "Q4_K_M", None, template=base_q)
    assert filecmp.cmp(restored(out, "chat", tmp_path), ref, shallow=False)


def _merge(base_q: Path, tune: str, names: list[str], out: Path) -> None:
    """What llama-export-lora writes over a quantized base: the base's tensors, the changed ones F16."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    base, src = GGUFReader(base_q), GGUFReader(tune)
    w = GGUFWriter(out, "llama")
    for f in base.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    changed = {t.name: t for t in src.tensors if t.name in names}
    for t in base.tensors:
        s = changed.get(t.name, t)
        w.add_tensor(s.name, np.asarray(s.data), raw_shape=np.asarray(s.data).shape if s is t else None,
                     raw_dtype=s.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_the_unit_store_goes_with_the_transaction(family: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantized units live in a temporary directory of the output's transaction: gone after the commit,
    and after a failure (here: the planner fails after quantizing), with the old split untouched."""
    out = tmp_path / "split"
    split({"base": family["models"]["base"]}, out, quantize="Q8_0")
    before = {p.name: sha256(p) for p in out.iterdir()}
    from gguf_split.assemble import split as split_mod

    def boom(*a: Any, **k: Any) -> Any:
        assert any(is_temp_dir(p.name) for p in out.iterdir())  # the store exists while the split runs
        raise GGUFSplitError(None, "planner failed")

    monkeypatch.setattr(split_mod, "plan", boom)
    with pytest.raises(GGUFSplitError, match="planner failed"):
        split(family["models"], out, quantize="Q8_0", force=True)
    assert {p.name: sha256(p) for p in out.iterdir()} == before


def test_row_size_fallbacks_are_reported(tmp_path: Path) -> None:
    """A type the tensors' rows cannot take: llama-quantize falls back (Q4_K -> Q5_0 / Q8_0 here); the split
    does the same, says so per tensor, and restores to llama-quantize's file."""
    src = make_model(tmp_path / "odd-f16.gguf", **{**SMALL, "n_ff": 352})
    rep = split({"odd": src}, tmp_path / "split", quantize="Q4_K_M")
    assert rep.quantize is not None
    warnings = rep.quantize.tasks[0].warnings
    assert warnings[0] == f"{SMALL['n_layer']} tensors of 352 columns do not fit the mix's block size: 4 Q5_0, " \
                          "4 Q8_0 instead (llama-quantize's fallback)"
    assert rep.quantize.tasks[0].types.get("Q5_0") and rep.quantize.tasks[0].types.get("Q8_0")
    assert filecmp.cmp(restored(tmp_path / "split", "odd", tmp_path),
                       oracle(src, tmp_path / "ref.gguf", "Q4_K_M", None), shallow=False)


def test_quantized_name() -> None:
    assert FAM.quantized_name("chat-f16.gguf", "Q4_K_M") == "chat-Q4_K_M.gguf"
    assert FAM.quantized_name("SmolLM2-135M-BF16.gguf", "Q8_0") == "SmolLM2-135M-Q8_0.gguf"
    assert FAM.quantized_name("ggml-model-f16.gguf", "Q4_0") == "ggml-model-Q4_0.gguf"
    assert FAM.quantized_name("chat.gguf", "Q6_K") == "chat-Q6_K.gguf"
    assert FAM.quantized_name("f16x.gguf", "Q6_K") == "f16x-Q6_K.gguf"


def test_a_resplit_takes_the_units_the_directory_holds(family: dict[str, Any], tmp_path: Path) -> None:
    """split --force over a quantized split quantizes only the units it does not hold (here: legal's one
    changed tensor), and the result is still llama-quantize's files."""
    out = tmp_path / "split"
    split(family["models"], out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0)
    more = {**family["models"], "legal": family["legal"]}
    dry = split(more, out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0, force=True, dry_run=True)
    rep = split(more, out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0, force=True)
    for r in (dry, rep):
        assert r.quantize is not None and r.quantize.reused_units == 57 + 2 + 1  # base's, chat's and code's units
    assert rep.quantize is not None and rep.quantize.units == 1
    assert [f.bytes for f in dry.files] == [f.bytes for f in rep.files]
    ref = oracle(family["legal"], tmp_path / "ref-legal.gguf", "Q4_K_M", family["imatrix"])
    assert filecmp.cmp(restored(out, "legal", tmp_path), ref, shallow=False)
    verify([out])


def shard(src: str, prefix: Path, n: int = 2) -> str:
    """`src` as llama-gguf-split --split writes it: every KV and split.* in shard 1, the tensors spread in
    order, each later shard with its split.* KVs."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    r = GGUFReader(src)
    tensors = list(r.tensors)
    per = -(-len(tensors) // n)
    for k in range(n):
        w = GGUFWriter(f"{prefix}-{k + 1:05d}-of-{n:05d}.gguf", "llama")
        if k == 0:
            for f in r.fields.values():
                if not f.name.startswith("GGUF.") and f.name != "general.architecture":
                    w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
        else:
            w.kv_data[0].pop("general.architecture", None)
        w.add_uint16("split.no", k)
        w.add_uint16("split.count", n)
        w.add_int32("split.tensors.count", len(tensors))
        for t in tensors[k * per:(k + 1) * per]:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return f"{prefix}-00001-of-{n:05d}.gguf"


def test_a_sharded_input_is_quantized_whole_by_llama_cpp(family: dict[str, Any], tmp_path: Path) -> None:
    """Tensor by tensor reads one file; a model in shards falls back to llama_model_quantize on the whole
    model. Its restore is llama-quantize's file, and its unchanged tensors are shared with the base made tensor
    by tensor (the same bytes)."""
    sharded = shard(family["models"]["chat"], tmp_path / "chat-f16")
    models = {"base": family["models"]["base"], "chat": sharded}
    out = tmp_path / "split"
    rep = split(models, out, quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0)
    assert rep.quantize is not None
    chat = next(t for t in rep.quantize.tasks if t.task == "chat")
    assert chat.output == "chat-Q4_K_M.gguf" and "quantized as a whole" in chat.warnings[0]
    assert set(next(t for t in rep.tasks if t.task == "chat").reasons) == set(CHANGES["chat"])
    ref = oracle(sharded, tmp_path / "ref.gguf", "Q4_K_M", family["imatrix"])
    assert filecmp.cmp(restored(out, "chat", tmp_path), ref, shallow=False)
    dry = split(models, tmp_path / "dry", quantize="Q4_K_M", imatrix=family["imatrix"], file_cost=0, dry_run=True)
    # a dry run matches tensors quantized tensor by tensor by their unit keys: the whole model shares none
    assert dry.quantize is not None and dry.quantize.tasks[-1].task == "chat" and not (tmp_path / "dry").exists()
    rep = add(out, {"legal": family["legal"]}, imatrix=family["imatrix"])  # whole-model tasks give no units
    assert rep.split.quantize is not None and rep.split.quantize.reused_units == legal_units(rep) - 1


def legal_units(rep: Any) -> int:
    return next(t for t in rep.split.quantize.tasks if t.task == "legal").quantized
