"""Tensor-by-tensor quantization gives exactly the file llama.cpp's quantizer writes.

Oracle: `llama_model_quantize` (llama-quantize's core, in process, same build) run on the same model with
the parameters the CLI passes (`quantize.llama_quantize`): the file `quantize_model` writes must be the
same bytes, header (KVs, tensor order, types, offsets, padding) and every tensor. Models are tiny F16 /
BF16 / F32 llama models (tests/helpers.py); imatrix files of both formats.

Skipped when llama_cpp cannot be imported, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import filecmp
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llama_harness as H

if H.IMPORT_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{H.IMPORT_ERROR} (CI=true: the llama.cpp tests must run)", pytrace=False)
    pytest.skip(H.IMPORT_ERROR, allow_module_level=True)

from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from gguf_split.assemble import quantize as QZ  # noqa: E402
from gguf_split.errors import GGUFSplitError  # noqa: E402
from gguf_split.format.gguf import GGUFFile  # noqa: E402

from helpers import SMALL, make_model, matmul_inputs, random_entries, write_imatrix_dat, write_imatrix_gguf  # noqa: E402

TYPES = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("quant")
    entries = random_entries(matmul_inputs(**SMALL))
    return {
        "f16": make_model(d / "f16.gguf", **SMALL),
        "imatrix.gguf": write_imatrix_gguf(d / "imatrix.gguf", entries),
        "imatrix.dat": write_imatrix_dat(d / "imatrix.dat", entries),
        "dir": str(d),
    }


def same_as_llama(src: str, recipe: QZ.Recipe, tmp: Path, **kw: Any) -> QZ.ModelPlan:
    """quantize_model's file equals llama_model_quantize's, byte for byte; returns the plan."""
    ref, mine = tmp / "ref.gguf", tmp / "mine.gguf"
    QZ.llama_quantize(src, ref, recipe, threads=2)
    plan = QZ.quantize_model(src, mine, recipe, **kw)
    if not filecmp.cmp(ref, mine, shallow=False):
        with GGUFFile(ref) as a, GGUFFile(mine) as b:
            ta = [(t.name, t.ggml_type, bytes(a.tensor_view(t))) for t in a.header.tensors]
            tb = [(t.name, t.ggml_type, bytes(b.tensor_view(t))) for t in b.header.tensors]
            diff = [x[0] for x, y in zip(ta, tb) if x != y]
            pytest.fail(f"differs from llama.cpp: {len(diff)} tensors ({diff[:4]}); header same: "
                        f"{a.raw(0, a.header.data_start) == b.raw(0, b.header.data_start)}")
    return plan


# every type with and without an imatrix; the legacy format (the same vectors by another loader) on two
CASES = [(t, i) for t in TYPES for i in (None, "imatrix.gguf")] + [("Q4_K_M", "imatrix.dat"), ("Q4_0", "imatrix.dat")]


@pytest.mark.parametrize("qtype, imatrix", CASES)
def test_tensor_by_tensor_equals_llama_quantize(work: dict[str, str], tmp_path: Path, qtype: str,
                                                imatrix: str | None) -> None:
    recipe = QZ.make_recipe(qtype, None if imatrix is None else work[imatrix])
    plan = same_as_llama(work["f16"], recipe, tmp_path)
    assert all(t.with_imatrix == (imatrix is not None) for t in plan.tensors if t.quantized)


def test_mixes_give_several_types_and_depend_on_the_imatrix(work: dict[str, str]) -> None:
    """llama.cpp decides the mix: Q4_K_M puts some attn_v / ffn_down at Q6_K and the tied token_embd at
    Q6_K; Q4_0 with an imatrix makes the first ffn_down (n_layer/8) Q4_1."""
    plan = QZ.plan_model(work["f16"], QZ.make_recipe("Q4_K_M"))
    types = {t.name: t.dst_type for t in plan.tensors}
    assert types["token_embd.weight"] == Q.Q6_K and types["blk.0.ffn_down.weight"] == Q.Q6_K
    assert types["blk.1.ffn_down.weight"] == Q.Q4_K and types["blk.0.attn_norm.weight"] == Q.F32
    # llama.cpp's order: tensors outside blocks first, then by layer, by name within
    names = [t.name for t in plan.tensors]
    assert names[:2] == ["output_norm.weight", "token_embd.weight"] and names[2] == "blk.0.attn_k.weight"
    plain = {t.name: t.dst_type for t in QZ.plan_model(work["f16"], QZ.make_recipe("Q4_0")).tensors}
    with_imx = {t.name: t.dst_type for t in QZ.plan_model(work["f16"], QZ.make_recipe("Q4_0", work["imatrix.dat"])).tensors}
    assert plain["blk.0.ffn_down.weight"] == Q.Q4_0 and with_imx["blk.0.ffn_down.weight"] == Q.Q4_1
    assert {n for n in plain if plain[n] != with_imx[n]} == {"blk.0.ffn_down.weight"}


def test_output_head_changes_token_embd_type(work: dict[str, str], tmp_path: Path) -> None:
    """A model whose tensor set differs (an untied output.weight) gets other types for the same tensor:
    planned per model, never assumed from the base."""
    untied = make_model(tmp_path / "untied.gguf", output=True, **SMALL)
    recipe = QZ.make_recipe("Q4_K_M")
    plan = same_as_llama(untied, recipe, tmp_path)
    types = {t.name: t.dst_type for t in plan.tensors}
    assert types["token_embd.weight"] == Q.Q4_K and types["output.weight"] == Q.Q6_K
    base = {t.name: t.dst_type for t in QZ.plan_model(work["f16"], recipe).tensors}
    assert base["token_embd.weight"] == Q.Q6_K


def test_row_size_fallbacks_are_llama_cpps_and_reported(tmp_path: Path) -> None:
    odd = make_model(tmp_path / "odd.gguf", **{**SMALL, "n_ff": 352})  # 352 % 256 != 0, % 32 == 0
    plan = same_as_llama(odd, QZ.make_recipe("Q4_K_M"), tmp_path)
    downs = {t.name: t.dst_type for t in plan.tensors if "ffn_down" in t.name}
    assert downs["blk.0.ffn_down.weight"] == Q.Q8_0 and downs["blk.1.ffn_down.weight"] == Q.Q5_0
    assert all(t.fallback for t in plan.tensors if "ffn_down" in t.name)
    assert sum("fallback" in w for w in plan.warnings) == SMALL["n_layer"]
    f16_fallback = make_model(tmp_path / "odd16.gguf", **{**SMALL, "n_ff": 272})  # 272 % 32 != 0: F16
    plan = same_as_llama(f16_fallback, QZ.make_recipe("Q4_K_M"), tmp_path)
    assert {t.dst_type for t in plan.tensors if "ffn_down" in t.name} == {Q.F16}


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_bf16_and_f32_sources(tmp_path: Path, dtype: str, work: dict[str, str]) -> None:
    src = make_model(tmp_path / f"{dtype}.gguf", dtype=dtype, **SMALL)
    same_as_llama(src, QZ.make_recipe("Q4_K_M", work["imatrix.gguf"]), tmp_path)
    same_as_llama(src, QZ.make_recipe("F16"), tmp_path)


def test_header_quirks_are_reproduced(tmp_path: Path) -> None:
    """gguf_set_kv's copy: a string cut at a NUL, a bool byte of 2 written as 1, general.file_type and
    general.quantization_version moved to the end, split.* removed, general.alignment (32) kept; a [n, 1]
    tensor written with one dim; a GGUF v2 source gives a v3 file."""
    def kvs(w: Any) -> None:
        w.add_uint32("general.alignment", 32)
        w.add_string("test.nul", "before\0after")
        w.add_array("test.strings", ["a\0b", "c"])
        w.add_bool("test.flag", True)
        w.add_uint32("general.quantization_version", 1)
        w.add_uint16("split.no", 0)
        w.add_uint16("split.count", 1)
        w.add_int32("split.tensors.count", 10)

    def extra(w: Any, rng: np.random.Generator) -> None:
        w.add_tensor("blk.0.extra.weight", rng.standard_normal((1, 256)).astype(np.float16))

    src = make_model(tmp_path / "quirks.gguf", kvs=kvs, extra=extra, **SMALL)
    raw = bytearray(Path(src).read_bytes())
    with GGUFFile(src) as f:
        flag = f.header.kv_by_key["test.flag"].value_start
        extra_info = f.header.tensor_by_name["blk.0.extra.weight"]
        assert len(extra_info.shape) == 2
    raw[flag] = 2
    raw[4:8] = struct.pack("<I", 2)
    Path(src).write_bytes(bytes(raw))
    same_as_llama(src, QZ.make_recipe("Q8_0"), tmp_path)
    with GGUFFile(tmp_path / "mine.gguf") as f:
        keys = [kv.key for kv in f.header.kvs]
        assert keys[-2:] == ["general.quantization_version", "general.file_type"]
        assert not any(k.startswith("split.") for k in keys)
        assert f.kv_value("test.nul") == "before" and f.kv_value("test.strings") == ["a", "c"]
        flag_at = f.header.kv_by_key["test.flag"].value_start
        assert f.raw(flag_at, flag_at + 1) == b"\x01" and f.header.version == 3
        assert f.kv_value("general.alignment") == 32
        assert f.header.tensor_by_name["blk.0.extra.weight"].shape == (256,)


def test_mixture_of_experts(tmp_path: Path) -> None:
    """3-D expert tensors: llama.cpp quantizes rows across experts, each expert with its slice of the
    imatrix (an expert without counts gets ones); the router stays F32."""
    dims = {**SMALL, "n_layer": 4, "n_expert": 4}
    moe = make_model(tmp_path / "moe.gguf", **dims)
    imx = write_imatrix_gguf(tmp_path / "moe-imatrix.gguf", random_entries(matmul_inputs(**dims), n_expert=4))
    for qtype in ("Q4_K_M", "Q4_0"):
        plan = same_as_llama(moe, QZ.make_recipe(qtype, imx), tmp_path)
        exps = [t for t in plan.tensors if "_exps" in t.name]
        assert exps and all(t.with_imatrix and len(t.shape) == 3 for t in exps)
        assert {t.dst_type for t in plan.tensors if "gate_inp" in t.name} == {Q.F32}


def test_requantizing_a_quantized_source(work: dict[str, str], tmp_path: Path) -> None:
    q8 = str(tmp_path / "q8.gguf")
    QZ.quantize_model(work["f16"], q8, QZ.make_recipe("Q8_0"))
    with pytest.raises(GGUFSplitError, match="requantizing is disabled"):
        QZ.plan_model(q8, QZ.make_recipe("Q4_K_M"))
    same_as_llama(q8, QZ.make_recipe("Q4_K_M", allow_requantize=True), tmp_path)
    # a quantized tensor already at its target type is copied, requantizing allowed or not
    plan = QZ.plan_model(q8, QZ.make_recipe("Q8_0"))
    assert not any(t.quantized for t in plan.tensors)


def test_cli_options(work: dict[str, str], tmp_path: Path) -> None:
    """--pure, --output-tensor-type, --token-embedding-type, --leave-output-tensor: llama.cpp applies them."""
    untied = make_model(tmp_path / "untied.gguf", output=True, **SMALL)
    plan = same_as_llama(untied, QZ.make_recipe("Q4_K_M", pure=True, output_tensor_type="q8_0",
                                                token_embedding_type="Q5_K"), tmp_path)
    types = {t.name: t.dst_type for t in plan.tensors}
    assert types["output.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q5_K
    assert {types[n] for n in types if n.startswith("blk.") and "norm" not in n} == {Q.Q4_K}
    plan = same_as_llama(untied, QZ.make_recipe("Q6_K", leave_output_tensor=True), tmp_path)
    assert {t.name: t.dst_type for t in plan.tensors}["output.weight"] == Q.F16
    with pytest.raises(GGUFSplitError, match="unknown ggml type"):
        QZ.make_recipe("Q4_K_M", output_tensor_type="q9")


def test_template_types(work: dict[str, str], tmp_path: Path) -> None:
    """A fine-tune quantized with a template's types (a quantized base): llama.cpp applies them as
    tensor-type overrides, the result equals llama_model_quantize with the same overrides."""
    template = str(tmp_path / "template.gguf")
    QZ.quantize_model(work["f16"], template, QZ.make_recipe("Q4_K_M"))
    tune = make_model(tmp_path / "tune.gguf", changed=["blk.3.attn_q.weight"], **SMALL)
    recipe = QZ.make_recipe("Q5_K_M", template=template)
    plan = same_as_llama(tune, recipe, tmp_path)
    assert {t.name: t.dst_type for t in plan.tensors} == QZ.template_types(template)
    untied = make_model(tmp_path / "untied.gguf", output=True, **SMALL)  # output.weight: not in the template
    plan = QZ.plan_model(untied, recipe)
    assert {t.name: t.dst_type for t in plan.tensors}["output.weight"] == Q.Q6_K


def test_chunking_and_threads_do_not_change_bytes(work: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are quantized independently: one call per tensor, tiny chunks on a pool, all the same."""
    recipe = QZ.make_recipe("Q4_K_M", work["imatrix.gguf"])
    plan = QZ.plan_model(work["f16"], recipe)
    from concurrent.futures import ThreadPoolExecutor
    with GGUFFile(work["f16"]) as f, ThreadPoolExecutor(2) as pool:
        for t in plan.tensors[:12]:
            src = f.tensor_view(f.header.tensor_by_name[t.name])
            vec = recipe.imatrix_vector(t.name) if t.with_imatrix else None
            results = set()
            for lo, hi, p in ((1 << 40, 1 << 40, None), (1, 1, pool), (1 << 12, 1 << 12, pool)):
                monkeypatch.setattr(QZ.tensor, "CHUNK_MIN_ELEMENTS", lo)
                monkeypatch.setattr(QZ.tensor, "CHUNK_MAX_ELEMENTS", hi)
                results.add(bytes(memoryview(QZ.quantize_tensor(src, t, vec, pool=p))))
            assert len(results) == 1, t.name


def test_unit_key() -> None:
    _, ftype = QZ.parse_quant_type("Q4_K_M")
    t = QZ.PlannedTensor("blk.0.attn_q.weight", (256, 256), Q.F16, Q.Q4_K)
    recipe = QZ.Recipe("Q4_K_M", ftype)
    renamed = QZ.PlannedTensor("blk.9.attn_q.weight", (256, 256), Q.F16, Q.Q4_K)
    assert QZ.unit_key(b"d", t, recipe) == QZ.unit_key(b"d", renamed, recipe)
    for other in (QZ.PlannedTensor(t.name, (256, 256), Q.F16, Q.Q6_K), QZ.PlannedTensor(t.name, (512, 128), Q.F16, Q.Q4_K)):
        assert QZ.unit_key(b"d", other, recipe) != QZ.unit_key(b"d", t, recipe)
    assert QZ.unit_key(b"e", t, recipe) != QZ.unit_key(b"d", t, recipe)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one GGUFSplitError naming the file, nothing written


def refused(tmp_path: Path, src: str, recipe_fn: Any, match: str, path: str | None = None) -> None:
    dst = tmp_path / "out.gguf"
    with pytest.raises(GGUFSplitError, match=match) as e:
        QZ.quantize_model(src, dst, recipe_fn())
    assert "\n" not in str(e.value)
    if path is not None:
        assert e.value.path == path
    assert not dst.exists() and not any(p.name.startswith("out.gguf") for p in tmp_path.iterdir())


def test_imatrix_for_another_model(work: dict[str, str], tmp_path: Path) -> None:
    sizes = {k: v * 2 for k, v in matmul_inputs(**SMALL).items()}  # same names, other widths
    wide = write_imatrix_gguf(tmp_path / "wide.gguf", random_entries(sizes))
    refused(tmp_path, work["f16"], lambda: QZ.make_recipe("Q4_K_M", wide), "has 512 values .* needs 256", wide)
    other = write_imatrix_dat(tmp_path / "other.dat", random_entries({"model.layers.0.q_proj": 256}))
    refused(tmp_path, work["f16"], lambda: QZ.make_recipe("Q4_K_M", other), "no imatrix entry matches", other)
    # token_embd's size may differ: llama.cpp quantizes it without the imatrix, and so does this
    sizes = {**matmul_inputs(**SMALL), "token_embd.weight": 7}
    odd = write_imatrix_gguf(tmp_path / "odd.gguf", random_entries(sizes))
    plan = same_as_llama(work["f16"], QZ.make_recipe("Q4_K_M", odd), tmp_path)
    assert not next(t for t in plan.tensors if t.name == "token_embd.weight").with_imatrix


def test_non_finite_imatrix(work: dict[str, str], tmp_path: Path) -> None:
    entries = random_entries(matmul_inputs(**SMALL))
    entries["blk.2.ffn_up.weight"][0][5] = np.inf
    bad = write_imatrix_gguf(tmp_path / "inf.gguf", entries)
    refused(tmp_path, work["f16"], lambda: QZ.make_recipe("Q4_K_M", bad), "non-finite", bad)
    # excluded, the entry is not given to llama.cpp
    QZ.plan_model(work["f16"], QZ.make_recipe("Q4_K_M", bad, exclude_weights=["ffn_up"]))


def test_corrupt_imatrix(work: dict[str, str], tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(work["imatrix.gguf"]).read_bytes()[:-100])
    refused(tmp_path, work["f16"], lambda: QZ.make_recipe("Q4_K_M", cut), "past the end of the file", str(cut))


def test_types_needing_an_imatrix(work: dict[str, str], tmp_path: Path) -> None:
    refused(tmp_path, work["f16"], lambda: QZ.make_recipe("IQ2_XXS"), "needs an importance matrix", work["f16"])
    with pytest.raises(GGUFSplitError, match="requires an imatrix"):  # llama.cpp agrees
        QZ.llama_quantize(work["f16"], tmp_path / "x.gguf", QZ.make_recipe("IQ2_XXS"))


def test_bad_models(work: dict[str, str], tmp_path: Path) -> None:
    from gguf import GGUFWriter
    orig = GGUFWriter.__init__

    def aligned(self: Any, *a: Any, **k: Any) -> None:
        orig(self, *a, **k)
        self.add_custom_alignment(64)

    GGUFWriter.__init__ = aligned  # type: ignore[method-assign]
    try:
        al64 = make_model(tmp_path / "al64.gguf", **SMALL)
    finally:
        GGUFWriter.__init__ = orig  # type: ignore[method-assign]
    refused(tmp_path, al64, lambda: QZ.make_recipe("Q4_K_M"), "alignment is 64", al64)

    nan = make_model(tmp_path / "nan.gguf", **SMALL)
    with GGUFFile(nan) as f:
        at = f.header.data_start + f.header.tensor_by_name["blk.1.ffn_up.weight"].offset + 40
    with open(nan, "r+b") as fh:
        fh.seek(at)
        fh.write(struct.pack("<H", 0x7E00))  # an F16 NaN
    refused(tmp_path, nan, lambda: QZ.make_recipe("Q4_K_M"), "'blk.1.ffn_up.weight' has invalid data", nan)
    with pytest.raises(GGUFSplitError, match="invalid data"):  # llama.cpp refuses it too
        QZ.llama_quantize(nan, tmp_path / "x.gguf", QZ.make_recipe("Q4_K_M"))

    unknown = tmp_path / "unknown.gguf"
    data = bytearray(Path(work["f16"]).read_bytes())
    i = data.find(b"llama")
    data[i : i + 5] = b"llamb"
    unknown.write_bytes(bytes(data))
    refused(tmp_path, str(unknown), lambda: QZ.make_recipe("Q4_K_M"), "llama.cpp cannot quantize this model", str(unknown))


def test_build_info_and_log_restored(work: dict[str, str]) -> None:
    """What a split records about the quantizer's build; and planning leaves llama.cpp's logger as it was
    (the harness's recorder still gets messages afterwards)."""
    info = QZ.backend().build_info()
    assert info["system_info"] and info["ggml_version"] and info["llama_cpp_python"]
    H.init()
    QZ.plan_model(work["f16"], QZ.make_recipe("Q8_0"))
    mark = H.log_mark()
    with pytest.raises(H.LlamaLoadError):
        H.load_model([os.devnull])
    assert H.log_since(mark, H.ERROR)


def test_without_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    monkeypatch.setattr(QZ.binding, "_backend", None)
    with pytest.raises(GGUFSplitError) as e:
        QZ.backend()
    assert str(e.value) == "quantizing needs llama.cpp's Python binding: pip install 'gguf-split[llama]'"
