"""LoRA extraction, adapter files and merged tensors (gguf_split.lora), without llama.cpp.

What must hold, and how it is checked independently of the code under test:
- extraction reproduces the task: the merged tensor computed from the adapter file (A and B read back from
  the file, llama.cpp's scale rule) is compared with the task's own tensor, and the error recomputed here must
  equal the report's and meet the rank rule's bound;
- the auto rank is the smallest rank meeting the documented rule, checked against numpy's SVD of the delta;
- the file follows llama.cpp's layout (KV types, A ne [n_in, r], B ne [r, n_out], token_embd flipped, alpha
  F32), read back with gguf's GGUFReader (an independent parser) on these tiny files;
- what a LoRA cannot express is refused by name, and written out (listed) only with allow_partial;
- the composition over the current loader: LoRA'd tensors keep the base views, removing a LoRA gives back the
  very same Tensor objects, switching reads the adapter's header only.
llama.cpp itself applying these files is tests/test_lora_llama.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType as V
from gguf.quants import quantize

import gguf_split.lora.math as lora_math
from gguf_split import GGUFSplitError, open_model, open_split
from gguf_split.demo import make_base_model, make_demo_models
from gguf_split.lora import (
    LoraAdapter,
    LoraModel,
    LoraTensor,
    ScaledLora,
    extract_lora,
    extract_lora_from_files,
    merged,
)
from gguf_split.assemble.split import split

# ---------------------------------------------------------------------------------------------------------
# Helpers


def write_gguf(path: Path, tensors: dict[str, Any], *, arch: str = "llama", kvs: dict[str, Any] | None = None,
               general_type: str | None = None) -> Path:
    """A GGUF with tensors given as numpy arrays (numpy order: reversed ne; float32/float16 kept) or
    (float32 array, quantized type)."""
    w = GGUFWriter(os.fspath(path), arch)
    if general_type:
        w.add_type(general_type)
    w.add_uint32(f"{arch}.block_count", 2)
    w.add_name(path.stem)
    for k, v in (kvs or {}).items():
        if isinstance(v, tuple):
            w.add_key_value(k, v[0], v[1])
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_float32(k, v)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            data, qt = t
            w.add_tensor(name, quantize(data.astype(np.float32), qt), raw_dtype=qt)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def low_rank(rng: np.random.Generator, n_out: int, n_in: int, rank: int, size: float = 0.05) -> np.ndarray:
    """An exactly rank-`rank` float32 matrix (numpy order) with well-separated singular values."""
    u = np.linalg.qr(rng.standard_normal((n_out, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((n_in, rank)))[0]
    s = size * np.sqrt(n_out * n_in) * np.linspace(1.0, 0.3, rank) / np.sqrt(rank)
    return ((u * s) @ v.T).astype(np.float32)


def read_back(path: Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], int, np.ndarray]]]:
    """KVs (name -> (type, value)) and tensors (name -> (ne, ggml type, numpy data)) by gguf's own reader."""
    r = GGUFReader(path)
    kvs = {}
    for f in r.fields.values():
        if f.types and f.types[0] == V.STRING:
            kvs[f.name] = (V.STRING, bytes(f.parts[-1]).decode())
        elif f.types:
            kvs[f.name] = (f.types[0], f.parts[-1][0] if f.types[0] != V.ARRAY else None)
    ts = {t.name: ([int(x) for x in t.shape], int(t.tensor_type), np.array(t.data)) for t in r.tensors}
    return kvs, ts


def llama_cpp_delta(ts: dict[str, tuple[list[int], int, np.ndarray]], target: str, alpha: float,
                    user_scale: float = 1.0) -> np.ndarray:
    """The delta llama.cpp adds, written out with ggml's element indexing (not gguf_split.lora's code):
    a tensor of ne [n0, n1] has element (i0, i1) at numpy [i1, i0]. build_lora_mm: y = W·x + s·B·(A·x),
    i.e. delta(i_in, i_out) = Σ_k A(i_in, k)·B(k, i_out); token_embd (build_inp_embd): A ne [r, n_vocab],
    B ne [r, n_embd], delta(j, t) = Σ_k B(k, j)·A(k, t). s = scale·alpha/r with r = B's ne0."""
    a_ne, _, a = ts[target + ".lora_a"]
    b_ne, _, b = ts[target + ".lora_b"]
    a, b = a.astype(np.float64), b.astype(np.float64)
    r = b_ne[0]
    s = np.float32(np.float32(user_scale * alpha) / np.float32(r)) if alpha else np.float32(user_scale)
    if target.endswith("token_embd.weight"):
        # numpy a[t, k] = A(k, t); b[j, k] = B(k, j); delta numpy [t, j] = delta(j, t)
        return float(s) * np.einsum("tk,jk->tj", a, b)
    # numpy a[k, i_in] = A(i_in, k); b[i_out, k] = B(k, i_out); delta numpy [i_out, i_in]
    return float(s) * np.einsum("ki,ok->oi", a, b)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_demo_models(tmp_path_factory.mktemp("lora-demo"))


# ---------------------------------------------------------------------------------------------------------
# Extraction reproduces the task


@pytest.mark.parametrize("task", ["chat", "code"])
def test_extracted_lora_reproduces_the_demo_fine_tune(demo: dict[str, str], tmp_path: Path, task: str) -> None:
    out = tmp_path / f"{task}.gguf"
    report = extract_lora_from_files(demo[task], demo["base"], out)
    kvs, ts = read_back(out)
    assert kvs["general.type"] == (V.STRING, "adapter")
    assert kvs["adapter.type"] == (V.STRING, "lora")
    assert kvs["general.architecture"] == (V.STRING, "llama")
    assert kvs["adapter.lora.alpha"][0] == V.FLOAT32
    alpha = float(kvs["adapter.lora.alpha"][1])
    with open_model(demo[task]) as t, open_model(demo["base"]) as b:
        changed = [n for n in t.tensors if bytes(t.tensors[n].data) != bytes(b.tensors[n].data)]
        assert sorted(x.name for x in report.tensors) == sorted(changed) and changed
        assert report.identical == len(t.tensors) - len(changed)
        for entry in report.tensors:
            n = entry.name
            n_in, n_out = t.tensors[n].shape
            assert ts[n + ".lora_a"][0] == [n_in, entry.rank]
            assert ts[n + ".lora_b"][0] == [entry.rank, n_out]
            assert ts[n + ".lora_a"][1] == ts[n + ".lora_b"][1] == int(Q.F16)
            # the demo merges are rank 8; their rounding to F16 is all the rest
            assert entry.rank == 8
            d = t.tensors[n].to_numpy().astype(np.float64) - b.tensors[n].to_numpy()
            err = np.linalg.norm(d - llama_cpp_delta(ts, n, alpha)) / np.linalg.norm(d)
            assert err == pytest.approx(entry.rel_error, rel=1e-4)
            assert entry.within and entry.rel_error < 0.01
            assert entry.task_bytes == t.tensors[n].nbytes
            assert entry.lora_bytes == ts[n + ".lora_a"][2].nbytes + ts[n + ".lora_b"][2].nbytes
    assert report.lora_bytes < report.task_bytes
    assert report.file_bytes == out.stat().st_size
    assert not report.refused and not report.partial


def test_exact_low_rank_delta_gives_its_rank(tmp_path: Path) -> None:
    """F32 task = F32 base + an exactly rank-5 change: auto finds 5, F32 factors reproduce it to float32
    precision, and the merged tensor (gguf_split.lora.merged, from the file's A and B) equals the task."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 80)).astype(np.float32)
    d = low_rank(rng, 48, 80, 5)
    base = write_gguf(tmp_path / "base.gguf", {"blk.0.attn_q.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {"blk.0.attn_q.weight": w + d})
    report = extract_lora_from_files(task, base, tmp_path / "l.gguf", dtype="F32", alpha=16.0)
    (entry,) = report.tensors
    assert entry.rank == 5 and entry.rel_error < 1e-5
    with LoraAdapter.open(tmp_path / "l.gguf") as ad:
        assert ad.alpha == 16.0 and ad.weights["blk.0.attn_q.weight"].rank == 5
        got = merged(w, [ScaledLora(ad, 1.0)], "blk.0.attn_q.weight")
        np.testing.assert_allclose(got, w + d, atol=1e-5)
        half = merged(w, [ScaledLora(ad, 0.5)], "blk.0.attn_q.weight")
        np.testing.assert_allclose(half, w + 0.5 * d, atol=1e-5)
        assert np.array_equal(merged(w, [ScaledLora(ad, 1.0)], "not.a.target"), w)


def test_fixed_rank_error_is_the_svd_tail(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    d = low_rank(rng, 40, 64, 6)
    base = write_gguf(tmp_path / "base.gguf", {"blk.0.ffn_up.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {"blk.0.ffn_up.weight": w + d})
    report = extract_lora_from_files(task, base, tmp_path / "l.gguf", rank=2, dtype="F32")
    (entry,) = report.tensors
    s = np.linalg.svd((w + d).astype(np.float64) - w, compute_uv=False)
    assert entry.rank == 2 and entry.bound is None and entry.within
    assert entry.rel_error == pytest.approx(np.sqrt((s[2:] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
    big = extract_lora_from_files(task, base, None, rank=1000, dtype="F32")
    assert big.tensors[0].rank == 40  # capped at min(n_in, n_out)


@pytest.mark.parametrize("threshold", [0.3, 0.05, 0.01, 0.001])
def test_auto_rank_is_the_smallest_meeting_the_threshold(tmp_path: Path, threshold: float) -> None:
    """A change with geometrically decaying singular values (no clear rank) in F32 (rounding floor ~0):
    the auto rank is exactly the smallest r whose SVD tail is within τ of ‖D‖."""
    rng = np.random.default_rng(5)
    u = np.linalg.qr(rng.standard_normal((60, 40)))[0]
    v = np.linalg.qr(rng.standard_normal((50, 40)))[0]
    d = ((u * (0.7 ** np.arange(40))) @ v.T).astype(np.float32)
    w = rng.standard_normal((60, 50)).astype(np.float32)
    base = write_gguf(tmp_path / "base.gguf", {"blk.0.attn_output.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {"blk.0.attn_output.weight": w + d})
    (entry,) = extract_lora_from_files(task, base, None, threshold=threshold, dtype="F32").tensors
    s = np.linalg.svd((w + d).astype(np.float64) - w, compute_uv=False)
    tail = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1] / (s ** 2).sum())  # tail[r] = relative error at rank r
    want = int(np.nonzero(tail[1:] <= threshold)[0][0]) + 1
    assert entry.rank == want
    assert entry.rel_error <= threshold and tail[want - 1] > threshold
    assert entry.floor < 1e-5


def test_rounding_floor_keeps_a_small_f16_change_at_its_rank(tmp_path: Path) -> None:
    """A small rank-4 change merged into an F16 tensor: its F16 rounding is ~10 % of the change, full rank.
    The floor term stops at rank 4 (the error then equals the rounding); a 1 % threshold alone would need a
    near-full rank."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((64, 96)) * 0.1).astype(np.float32)
    d = low_rank(rng, 64, 96, 4, size=0.0005)
    task_w = (w + d).astype(np.float16)
    base = write_gguf(tmp_path / "base.gguf", {"blk.0.attn_k.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {"blk.0.attn_k.weight": task_w})
    (entry,) = extract_lora_from_files(task, base, None, dtype="F32").tensors
    actual = task_w.astype(np.float64) - w
    s = np.linalg.svd(actual, compute_uv=False)
    rel = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1] / (s ** 2).sum())
    assert rel[4] > 0.05  # the rounding is far above 1 % of this change
    assert entry.rank == 4
    assert entry.floor > 0.05 and entry.rel_error <= np.hypot(0.01, entry.floor) and entry.within
    # the rounding floor, measured: the error at rank 4 is the rounding the F16 file itself added
    rounding = task_w.astype(np.float64) - (w.astype(np.float64) + d)
    assert entry.rel_error <= np.linalg.norm(rounding) / np.linalg.norm(actual) * 1.01


def test_quantized_base_delta_against_its_dequantized_values(tmp_path: Path) -> None:
    """The task adds a rank-3 change to the dequantized Q4_0 base and stores F16 (llama-export-lora's way):
    the extracted rank is 3."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((32, 64)) * 0.1).astype(np.float32)
    base = write_gguf(tmp_path / "base.gguf", {"blk.0.ffn_down.weight": (w, Q.Q4_0)})
    with open_model(base) as b:
        wq = b.tensors["blk.0.ffn_down.weight"].to_numpy()
    task = write_gguf(tmp_path / "task.gguf",
                      {"blk.0.ffn_down.weight": (wq + low_rank(rng, 32, 64, 3, 0.01)).astype(np.float16)})
    (entry,) = extract_lora_from_files(task, base, None).tensors
    assert entry.rank == 3 and entry.within


def test_randomized_svd_agrees_with_the_full_svd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big tensors go through the randomized SVD (forced here on a small one): same rank as the full SVD
    and an error (recomputed from the factors) within the bound."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((400, 300)).astype(np.float32)
    d = low_rank(rng, 400, 300, 12) + (rng.standard_normal((400, 300)) * 1e-4).astype(np.float32)
    base = write_gguf(tmp_path / "base.gguf", {"blk.0.ffn_gate.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {"blk.0.ffn_gate.weight": w + d})
    full = extract_lora_from_files(task, base, None, dtype="F32").tensors[0]
    monkeypatch.setattr(lora_math, "FULL_SVD_MAX", 16)
    fast = extract_lora_from_files(task, base, None, dtype="F32").tensors[0]
    assert full.method == "svd" and fast.method.startswith("randomized")
    assert fast.rank == full.rank == 12
    assert fast.rel_error == pytest.approx(full.rel_error, rel=1e-3) and fast.within
    fixed = extract_lora_from_files(task, base, None, dtype="F32", rank=12).tensors[0]
    assert fixed.method.startswith("randomized") and fixed.rel_error == pytest.approx(full.rel_error, rel=1e-3)


def test_token_embd_is_flipped_when_the_base_has_an_output_head(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    emb = rng.standard_normal((100, 32)).astype(np.float32)  # ne [n_embd 32, n_vocab 100]
    out = rng.standard_normal((100, 32)).astype(np.float32)
    d = low_rank(rng, 100, 32, 3)
    base = write_gguf(tmp_path / "base.gguf", {"token_embd.weight": emb, "output.weight": out})
    task = write_gguf(tmp_path / "task.gguf", {"token_embd.weight": emb + d, "output.weight": out})
    report = extract_lora_from_files(task, base, tmp_path / "l.gguf", dtype="F32", alpha=4.0)
    assert [(t.name, t.rank) for t in report.tensors] == [("token_embd.weight", 3)]
    _, ts = read_back(tmp_path / "l.gguf")
    assert ts["token_embd.weight.lora_a"][0] == [3, 100]  # [r, n_vocab]
    assert ts["token_embd.weight.lora_b"][0] == [3, 32]  # [r, n_embd]
    np.testing.assert_allclose(emb + llama_cpp_delta(ts, "token_embd.weight", 4.0), emb + d, atol=1e-5)
    with LoraAdapter.open(tmp_path / "l.gguf") as ad, open_model(base) as b:
        ad.check_against(b)
        np.testing.assert_allclose(merged(emb, [ScaledLora(ad, 1.0)], "token_embd.weight"), emb + d, atol=1e-5)


def test_identical_and_equal_valued_tensors_are_skipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    same = (rng.standard_normal((16, 32)) * 4).round().astype(np.float32)  # exact in F16
    base = write_gguf(tmp_path / "base.gguf", {"a.weight": w, "b.weight": same, "c.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {"a.weight": w, "b.weight": same.astype(np.float16),
                                               "c.weight": w + low_rank(rng, 16, 32, 2)})
    report = extract_lora_from_files(task, base, None)
    assert report.identical == 1 and report.same_values == ["b.weight"]
    assert [t.name for t in report.tensors] == ["c.weight"]
    with pytest.raises(GGUFSplitError, match="nothing to write"):
        extract_lora_from_files(base, base, tmp_path / "none.gguf")
    assert not (tmp_path / "none.gguf").exists()


# ---------------------------------------------------------------------------------------------------------
# What a LoRA cannot express


def test_inexpressible_tensors_are_refused_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    w = rng.standard_normal((20, 32)).astype(np.float32)
    norm = np.ones(32, np.float32)
    base = write_gguf(tmp_path / "base.gguf", {
        "token_embd.weight": w, "blk.0.attn_norm.weight": norm, "blk.0.attn_q.weight": w[:, :20].copy(),
        "blk.0.attn_k.weight": w, "blk.0.ffn_up.weight": w, "blk.0.gone.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {
        "token_embd.weight": w + low_rank(rng, 20, 32, 2),  # tied output head in the base
        "blk.0.attn_norm.weight": norm * 1.5,  # a vector
        "blk.0.attn_q.weight": w,  # other shape
        "blk.0.attn_k.weight": w + low_rank(rng, 20, 32, 2),  # fine
        "blk.0.ffn_up.weight": w,
        "output.weight": w})  # task only (an untied head)
    with pytest.raises(GGUFSplitError) as err:
        extract_lora_from_files(task, base, tmp_path / "l.gguf")
    msg = str(err.value)
    assert err.value.path == str(task)
    reasons = {"token_embd.weight": "ties its output head", "blk.0.attn_norm.weight": "vector",
               "blk.0.attn_q.weight": "shape changed", "output.weight": "task only", "blk.0.gone.weight": "base only"}
    starts = sorted((msg.index(f"{name}: "), name) for name in reasons)
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(msg), "")]):
        assert reasons[name] in msg[start:end], (name, msg[start:end])
    assert "blk.0.attn_k.weight" not in msg and "--allow-partial" in msg
    assert not (tmp_path / "l.gguf").exists() and os.listdir(tmp_path) == ["base.gguf", "task.gguf"]

    report = extract_lora_from_files(task, base, tmp_path / "l.gguf", allow_partial=True)
    assert report.partial and {r.name for r in report.refused} == {
        "token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight", "output.weight", "blk.0.gone.weight"}
    assert [t.name for t in report.tensors] == ["blk.0.attn_k.weight"]
    assert any("PARTIAL" in line for line in report.lines())
    assert any("output.weight" in line and "LEFT OUT" in line for line in report.lines())
    _, ts = read_back(tmp_path / "l.gguf")
    assert sorted(ts) == ["blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b"]
    # the task's own tensors count the refused ones too (the bytes a full task would carry)
    assert report.task_bytes == sum(r.task_bytes for r in report.refused) + report.tensors[0].task_bytes


def test_demo_untied_output_is_refused(demo: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(GGUFSplitError, match=r"output.weight: exists in the task only.*#9065"):
        extract_lora_from_files(demo["summarize"], demo["base"], tmp_path / "s.gguf")
    report = extract_lora_from_files(demo["summarize"], demo["base"], tmp_path / "s.gguf", allow_partial=True)
    assert [r.name for r in report.refused] == ["output.weight"]
    assert [t.name for t in report.tensors] == ["blk.0.attn_q.weight"]


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    w = np.ones((8, 32), np.float32)
    base = write_gguf(tmp_path / "base.gguf", {"x.weight": w}, arch="gemma3")
    task = write_gguf(tmp_path / "task.gguf", {"x.weight": w * 2})
    with pytest.raises(GGUFSplitError, match="architecture 'llama', the base is 'gemma3'"):
        extract_lora_from_files(task, base, None)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_change_that_is_not_finite_is_refused_by_name(tmp_path: Path, value: float) -> None:
    """A NaN or an infinity in a changed tensor (a broken fine-tune) is one error naming the task and the
    tensor, not numpy's "SVD did not converge"."""
    w = np.ones((16, 32), np.float32)
    bad = w * 2
    bad[3, 5] = value
    base = write_gguf(tmp_path / "base.gguf", {"x.weight": w})
    task = write_gguf(tmp_path / "task.gguf", {"x.weight": bad})
    with pytest.raises(GGUFSplitError, match="x.weight: the change from the base is not finite") as err:
        extract_lora_from_files(task, base, None)
    assert err.value.path == str(task)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"rank": "big"}, "rank"), ({"rank": True}, "rank"), ({"threshold": 0}, "threshold"),
    ({"threshold": 1.5}, "threshold"), ({"alpha": 0}, "alpha"), ({"alpha": 0.1}, "float32"),
    ({"dtype": "Q8_0"}, "dtype"),
])
def test_bad_arguments_are_value_errors(demo: dict[str, str], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        extract_lora_from_files(demo["chat"], demo["base"], None, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Writing


def test_an_existing_output_is_kept_unless_force(demo: dict[str, str], tmp_path: Path) -> None:
    """The adapter is written like every gguf-split output: an existing file is refused and kept byte for
    byte unless force, then replaced whole; nothing is left beside it (no temporary, no journal)."""
    out = tmp_path / "chat-lora.gguf"
    out.write_bytes(b"the user's file")
    with pytest.raises(GGUFSplitError, match="already exists") as err:
        extract_lora_from_files(demo["chat"], demo["base"], out)
    assert err.value.path == str(out) and out.read_bytes() == b"the user's file"
    report = extract_lora_from_files(demo["chat"], demo["base"], out, force=True)
    with LoraAdapter.open(out) as ad:
        assert sorted(ad.targets) == sorted(t.name for t in report.tensors)
    assert out.stat().st_size == report.file_bytes and os.listdir(tmp_path) == ["chat-lora.gguf"]


def test_a_failed_write_leaves_the_old_file(demo: dict[str, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk in the middle of the adapter: one error naming the output, the old file intact, no
    temporary left."""
    import errno

    import gguf_split.lora.write as write

    out = tmp_path / "chat-lora.gguf"
    out.write_bytes(b"old")

    def full_disk(fd: int, *args: Any) -> None:
        os.write(fd, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "_write", full_disk)
    with pytest.raises(GGUFSplitError, match="No space left on device") as err:
        extract_lora_from_files(demo["chat"], demo["base"], out, force=True)
    assert err.value.path == str(out) and out.read_bytes() == b"old" and os.listdir(tmp_path) == ["chat-lora.gguf"]


@pytest.mark.parametrize("where, problem", [("no/such/dir.gguf", "its directory does not exist"),
                                           (".", "is a directory")])
def test_an_output_that_cannot_be_a_file_is_refused_first(demo: dict[str, str], tmp_path: Path, where: str,
                                                          problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by name before any tensor is factored."""
    import gguf_split.lora.extract as extract

    monkeypatch.setattr(extract, "_extract_all", lambda *a: pytest.fail("extraction ran"))
    out = tmp_path / where
    with pytest.raises(GGUFSplitError, match=problem) as err:
        extract_lora_from_files(demo["chat"], demo["base"], out, force=True)
    assert err.value.path == str(out) and not (tmp_path / "no").exists()


def test_extract_lora_killed_at_every_step(demo: dict[str, str], tmp_path: Path) -> None:
    """`extract-lora --force` over an existing adapter, killed (SIGKILL) at every step of its commit in turn
    (the GGUF_SPLIT_TEST_KILL_AT hook, as tests/test_crash.py does): the output is always the complete old
    adapter or the complete new one, and the next run in the directory leaves no temporary and no journal."""
    import signal
    import subprocess
    import sys

    from gguf_split.format.names import JOURNAL, TMP_SUFFIX

    out = tmp_path / "lora.gguf"
    old = extract_lora_from_files(demo["chat"], demo["base"], tmp_path / "old.gguf", rank=2)
    new = extract_lora_from_files(demo["chat"], demo["base"], tmp_path / "new.gguf")
    versions = {(tmp_path / "old.gguf").read_bytes(): "old", (tmp_path / "new.gguf").read_bytes(): "new"}
    assert len(versions) == 2 and old.file_bytes != new.file_bytes
    args = [sys.executable, "-m", "gguf_split", "extract-lora", demo["chat"], "--base", demo["base"], "-o", str(out),
            "--force", "-q"]

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, **env})

    def leftovers() -> list[str]:
        return sorted(n for n in os.listdir(tmp_path) if n.endswith(TMP_SUFFIX) or n == JOURNAL)

    log = tmp_path / "steps.log"
    out.write_bytes((tmp_path / "old.gguf").read_bytes())
    assert run(GGUF_SPLIT_TEST_STEPS=str(log)).returncode == 0
    steps = log.read_text().splitlines()
    assert versions[out.read_bytes()] == "new" and any("switched" in line for line in steps), steps
    seen = set()
    for k in range(1, len(steps) + 1):
        out.write_bytes((tmp_path / "old.gguf").read_bytes())
        p = run(GGUF_SPLIT_TEST_KILL_AT=str(k))
        assert p.returncode == -signal.SIGKILL, (k, p.stderr)
        seen.add(versions[out.read_bytes()])  # KeyError: a partial or foreign file
        if leftovers():
            extract_lora_from_files(demo["chat"], demo["base"], tmp_path / "next.gguf", force=True)
            assert leftovers() == [] and versions[out.read_bytes()] in ("old", "new")
    assert seen == {"old", "new"}, "the kills landed before and after the switch"


def test_output_over_an_input_is_refused(demo: dict[str, str], tmp_path: Path) -> None:
    import shutil

    task = shutil.copy(demo["chat"], tmp_path / "chat.gguf")
    before = Path(task).read_bytes()
    with pytest.raises(GGUFSplitError, match="is an input model") as err:
        extract_lora_from_files(task, demo["base"], task)
    assert Path(task).read_bytes() == before and err.value.path == str(task)


def test_extraction_is_deterministic_and_split_tasks_equal_files(demo: dict[str, str], tmp_path: Path) -> None:
    """From the split's TaskModels (the duck type the new loader keeps) the adapter is byte-identical to the
    one extracted from the two model files."""
    rep = split({t: demo[t] for t in ("base", "chat", "code")}, tmp_path / "split", file_cost=0)
    extract_lora_from_files(demo["chat"], demo["base"], tmp_path / "files.gguf")
    extract_lora_from_files(demo["chat"], demo["base"], tmp_path / "again.gguf")
    with open_split(rep.directory) as fnd:
        chat, base = fnd.load("chat"), fnd.load("base")
        extract_lora(chat, base, tmp_path / "split.gguf")
    one = (tmp_path / "files.gguf").read_bytes()
    assert one == (tmp_path / "again.gguf").read_bytes() == (tmp_path / "split.gguf").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Opening adapters: what llama.cpp would abort on or refuse is refused here, naming the file


def adapter_file(path: Path, tensors: dict[str, np.ndarray], *, alpha: Any = 8.0, arch: str = "llama",
                 general_type: str | None = "adapter", adapter_type: Any = "lora") -> Path:
    kvs: dict[str, Any] = {}
    if adapter_type is not None:
        kvs["adapter.type"] = adapter_type if isinstance(adapter_type, str) else (adapter_type, V.UINT32)
    if alpha is not None:
        kvs["adapter.lora.alpha"] = alpha if isinstance(alpha, float) else (alpha, V.FLOAT64)
    return write_gguf(path, tensors, arch=arch, kvs=kvs, general_type=general_type)


def ab(n_in: int, n_out: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((r, n_in)).astype(np.float32), rng.standard_normal((n_out, r)).astype(np.float32))


@pytest.mark.parametrize("case, match", [
    ("model file", "general.type"),
    ("other general.type", "not 'adapter'"),
    ("adapter.type not lora", "not 'lora'"),
    ("adapter.type not a string", "needs a string"),
    ("alpha F64", "F32 and aborts"),
    ("lora_b missing", r"has no x.weight.lora_b"),
    ("unexpected suffix", "neither a .lora_a nor a .lora_b"),
    ("ranks do not chain", "do not chain"),
    ("token_embd ranks differ", "different ranks"),
    ("3-D", "3 dimensions"),
])
def test_bad_adapter_files_are_refused(tmp_path: Path, case: str, match: str) -> None:
    a, b = ab(32, 16, 4)
    p = tmp_path / "bad.gguf"
    if case == "model file":
        write_gguf(p, {"x.weight": b @ a})
    elif case == "other general.type":
        adapter_file(p, {"x.weight.lora_a": a, "x.weight.lora_b": b}, general_type="model")
    elif case == "adapter.type not lora":
        adapter_file(p, {"x.weight.lora_a": a, "x.weight.lora_b": b}, adapter_type="control_vector")
    elif case == "adapter.type not a string":
        adapter_file(p, {"x.weight.lora_a": a, "x.weight.lora_b": b}, adapter_type=1)
    elif case == "alpha F64":
        adapter_file(p, {"x.weight.lora_a": a, "x.weight.lora_b": b}, alpha=8)
    elif case == "lora_b missing":
        adapter_file(p, {"x.weight.lora_a": a})
    elif case == "unexpected suffix":
        adapter_file(p, {"x.weight.lora_a": a, "x.weight.lora_b": b, "x.bias": a[0]})
    elif case == "ranks do not chain":
        adapter_file(p, {"x.weight.lora_a": a, "x.weight.lora_b": ab(32, 16, 5)[1]})
    elif case == "token_embd ranks differ":
        adapter_file(p, {"token_embd.weight.lora_a": np.ones((100, 4), np.float32),
                         "token_embd.weight.lora_b": np.ones((32, 5), np.float32)})
    elif case == "3-D":
        adapter_file(p, {"x.weight.lora_a": np.ones((2, 4, 32), np.float32), "x.weight.lora_b": b})
    with pytest.raises(GGUFSplitError, match=match) as err:
        LoraAdapter.open(p)
    assert err.value.path == str(p)


def test_adapter_views_are_zero_copy_and_alpha_defaults_to_zero(tmp_path: Path) -> None:
    """A file without alpha: llama.cpp reads 0 and then applies the user scale alone (no alpha/r). Norm
    vectors are skipped as llama.cpp's loader skips them."""
    a, b = ab(32, 16, 4)
    p = adapter_file(tmp_path / "l.gguf", {"x.weight.lora_a": a, "x.weight.lora_b": b,
                                           "blk.0.attn_norm.weight": np.ones(32, np.float32)}, alpha=None)
    with LoraAdapter.open(p) as ad:
        assert ad.alpha == 0.0 and ad.ignored == ["blk.0.attn_norm.weight"]
        w = ad.weights["x.weight"]
        assert w.rank == 4 and w.target_shape == (32, 16) and w.a.shape == (32, 4) and w.b.shape == (4, 16)
        assert w.a.data.readonly and w.a.data.obj is w.b.data.obj  # views of one read-only map
        base = np.zeros((16, 32), np.float32)
        np.testing.assert_allclose(merged(base, [ScaledLora(ad, 0.5)], "x.weight"), 0.5 * (b @ a), rtol=1e-6)


def test_check_against_the_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    model = write_gguf(tmp_path / "model.gguf", {"x.weight": w, "token_embd.weight": w})
    a, b = ab(32, 16, 4)
    good = adapter_file(tmp_path / "good.gguf", {"x.weight.lora_a": a, "x.weight.lora_b": b})
    wrong_arch = adapter_file(tmp_path / "arch.gguf", {"x.weight.lora_a": a, "x.weight.lora_b": b}, arch="gemma3")
    missing = adapter_file(tmp_path / "missing.gguf", {"y.weight.lora_a": a, "y.weight.lora_b": b})
    a2, b2 = ab(16, 32, 4)
    transposed = adapter_file(tmp_path / "shape.gguf", {"x.weight.lora_a": a2, "x.weight.lora_b": b2})
    tied = adapter_file(tmp_path / "tied.gguf", {"token_embd.weight.lora_a": rng.standard_normal((16, 4)).astype(np.float32),
                                                 "token_embd.weight.lora_b": rng.standard_normal((32, 4)).astype(np.float32)})
    with open_model(model) as m:
        with LoraAdapter.open(good) as ad:
            ad.check_against(m)
            with pytest.raises(GGUFSplitError, match="no base digest"):
                ad.check_against(m, same_base=True)
        for path, match in [(wrong_arch, "architecture 'gemma3', the model is 'llama'"),
                            (missing, "'y.weight' does not exist in the model"),
                            (transposed, r"fit a tensor of ne \[16, 32\], the model's has ne \[32, 16\]"),
                            (tied, "ties its output head")]:
            with LoraAdapter.open(path) as ad, pytest.raises(GGUFSplitError, match=match) as err:
                ad.check_against(m)
            assert err.value.path == str(path)


def test_base_digest_tells_the_base_apart(demo: dict[str, str], tmp_path: Path) -> None:
    other = make_base_model(tmp_path / "other.gguf", seed=5)
    extract_lora_from_files(demo["chat"], demo["base"], tmp_path / "l.gguf")
    with LoraAdapter.open(tmp_path / "l.gguf") as ad, open_model(demo["base"]) as b, open_model(other) as o, \
            open_model(demo["code"]) as code:
        ad.check_against(b, same_base=True)
        ad.check_against(code, same_base=True)  # code does not touch chat's tensors
        ad.check_against(o)  # same names and shapes: llama.cpp would take it
        with pytest.raises(GGUFSplitError, match="extracted against other base tensors"):
            ad.check_against(o, same_base=True)


# ---------------------------------------------------------------------------------------------------------
# Applying adapters over the current loader (composition)


@pytest.fixture
def split_demo(demo: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    rep = split({t: demo[t] for t in ("base", "chat", "code")}, tmp_path / "split", file_cost=0)
    loras = {t: extract_lora_from_files(demo[t], demo["base"], tmp_path / f"{t}-lora.gguf").output
             for t in ("chat", "code")}
    return {"split": rep.directory, "loras": loras, "models": demo}


def test_apply_and_remove_over_a_split_task(split_demo: dict[str, Any]) -> None:
    with open_split(split_demo["split"]) as fnd, open_model(split_demo["models"]["chat"]) as chat, \
            open_model(split_demo["models"]["code"]) as code:
        task = fnd.load("base")
        m = LoraModel(task)
        originals = {n: m.tensors[n] for n in task.tensors}
        assert m.loras == [] and m.tensors is task.tensors
        chat_lora = split_demo["loras"]["chat"]
        ad = m.apply_lora(chat_lora)
        assert m.loras == [(os.path.abspath(chat_lora), 1.0)]
        for n, t in originals.items():
            got = m.tensors[n]
            if n in ad.weights:
                assert isinstance(got, LoraTensor) and got.base is t and got.data is t.data
                assert got.shape == t.shape and got.ggml_type == t.ggml_type and got.file == t.file
                np.testing.assert_array_equal(got.to_numpy(), t.to_numpy())
                want = chat.tensors[n].to_numpy()
                d = want - t.to_numpy()
                assert np.linalg.norm(got.to_numpy(merged=True) - want) < 0.01 * np.linalg.norm(d)
            else:
                assert got is t
        # a second adapter with other targets; then rescale the first; then remove both
        m.apply_lora(split_demo["loras"]["code"], scale=1.0)
        n_code = "blk.3.ffn_up.weight"
        d_code = code.tensors[n_code].to_numpy() - originals[n_code].to_numpy()
        assert np.linalg.norm(m.tensors[n_code].to_numpy(merged=True) - code.tensors[n_code].to_numpy()) \
            < 0.01 * np.linalg.norm(d_code)
        m.apply_lora(chat_lora, scale=0.5)
        assert [s for _, s in m.loras] == [0.5, 1.0]
        n_chat = "blk.0.attn_q.weight"
        half = m.tensors[n_chat].to_numpy(merged=True) - originals[n_chat].to_numpy()
        full = merged(originals[n_chat].to_numpy(), [ScaledLora(ad, 1.0)], n_chat) - originals[n_chat].to_numpy()
        np.testing.assert_allclose(half, 0.5 * full, rtol=1e-5, atol=1e-7)
        m.remove_lora(chat_lora)
        m.remove_lora(split_demo["loras"]["code"])
        assert m.loras == [] and all(m.tensors[n] is t for n, t in originals.items())
        with pytest.raises(GGUFSplitError, match="not an active LoRA"):
            m.remove_lora(chat_lora)


def test_apply_refuses_a_lora_that_does_not_fit(split_demo: dict[str, Any], tmp_path: Path) -> None:
    a, b = ab(64, 64, 4)
    bad = adapter_file(tmp_path / "bad.gguf", {"blk.0.attn_k.weight.lora_a": a, "blk.0.attn_k.weight.lora_b": b})
    with open_split(split_demo["split"]) as fnd:
        m = LoraModel(fnd.load("base"))
        with pytest.raises(GGUFSplitError, match="attn_k.weight: LoRA A ne") as err:
            m.apply_lora(bad)
        assert err.value.path == str(bad) and m.loras == []


def test_switching_reads_the_adapter_header_only(split_demo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_lora parses the adapter's header and maps it; no tensor of the model or the adapter is read
    (to_numpy is never called) until a merged tensor is asked for."""
    import gguf_split.format.model as model_module  # the adapter's tensors are format.model.Tensor views

    calls: list[Any] = []
    real = model_module.to_numpy
    monkeypatch.setattr(model_module, "to_numpy", lambda *a: calls.append(a) or real(*a))
    with open_split(split_demo["split"]) as fnd:
        m = LoraModel(fnd.load("base"))
        for _ in range(3):
            m.apply_lora(split_demo["loras"]["chat"])
            m.apply_lora(split_demo["loras"]["code"], 0.25)
            m.remove_lora(split_demo["loras"]["chat"])
            m.remove_lora(split_demo["loras"]["code"])
        assert calls == []
        m.apply_lora(split_demo["loras"]["chat"])
        m.tensors["blk.0.attn_q.weight"].to_numpy(merged=True)
        assert len(calls) == 3  # the base tensor, and A and B of its LoRA


def test_report_lines_name_every_tensor(demo: dict[str, str]) -> None:
    report = extract_lora_from_files(demo["code"], demo["base"], None)
    text = "\n".join(report.lines())
    for t in report.tensors:
        assert t.name in text
    assert "rank    8" in text and "of the task's own tensors" in text and report.output is None


def test_readers_see_whole_adapter_sets_while_another_thread_switches(split_demo: dict[str, Any]) -> None:
    """A reader takes `m.tensors` once and sees one adapter set: every LoRA'd tensor of one lookup pass
    carries the same adapters, and its bytes are always the base's."""
    import threading

    chat, code = split_demo["loras"]["chat"], split_demo["loras"]["code"]
    with open_split(split_demo["split"]) as fnd:
        task = fnd.load("base")
        m = LoraModel(task)
        originals = {n: task.tensors[n] for n in task.tensors}
        stop, problems = threading.Event(), []

        def read() -> None:
            while not stop.is_set():
                view = m.tensors
                sets = set()
                for n, t in originals.items():
                    got = view[n]
                    if got.data is not t.data:
                        problems.append(f"{n}: other bytes")
                    if isinstance(got, LoraTensor):
                        sets.add(tuple(sorted((x.adapter.path, x.scale) for x in got.loras)))
                if len(sets) > 1:
                    problems.append(f"mixed adapter sets {sets}")

        readers = [threading.Thread(target=read) for _ in range(2)]
        for r in readers:
            r.start()
        try:
            for i in range(40):
                m.apply_lora(chat, scale=1.0 + i % 3)
                m.remove_lora(chat)
                m.apply_lora(code)
                m.remove_lora(code)
        finally:
            stop.set()
            for r in readers:
                r.join()
        assert problems == []
        assert all(m.tensors[n] is t for n, t in originals.items())


def test_task_model_applies_and_removes_loras(split_demo: dict[str, Any]) -> None:
    """The loader's own TaskModel: apply_lora / remove_lora / loras; the views stay the file's bytes;
    removing gives back exactly the original Tensor objects; a swap keeps adapters that fit the new task."""
    chat_lora = split_demo["loras"]["chat"]
    with open_split(split_demo["split"]) as s, open_model(split_demo["models"]["chat"]) as chat:
        m = s.load("base")
        originals = {n: m.tensors[n] for n in m.tensors}
        ad = m.apply_lora(chat_lora)
        assert m.loras == [(os.path.abspath(chat_lora), 1.0)]
        n = "blk.0.attn_q.weight"
        got = m.tensors[n]
        assert isinstance(got, LoraTensor) and got.base is originals[n] and got.data is originals[n].data
        want = chat.tensors[n].to_numpy()
        assert np.linalg.norm(got.to_numpy(merged=True) - want) < 0.01 * np.linalg.norm(want - got.to_numpy())
        assert m.tensors["blk.0.ffn_up.weight"] is originals["blk.0.ffn_up.weight"]
        m.remove_lora(chat_lora)
        assert m.loras == [] and all(m.tensors[k] is t for k, t in originals.items())
        m.apply_lora(chat_lora, 0.5)
        m.swap("code")  # same shapes: the adapter stays on
        assert m.task == "code" and m.loras == [(os.path.abspath(chat_lora), 0.5)]
        assert isinstance(m.tensors[n], LoraTensor)
        assert ad.targets


def test_task_model_refuses_a_lora_that_does_not_fit(split_demo: dict[str, Any], tmp_path: Path) -> None:
    a, b = ab(64, 64, 4)
    bad = adapter_file(tmp_path / "bad.gguf", {"blk.0.attn_k.weight.lora_a": a, "blk.0.attn_k.weight.lora_b": b})
    with open_split(split_demo["split"]) as s:
        m = s.load("base")
        with pytest.raises(GGUFSplitError) as err:
            m.apply_lora(bad)
        assert err.value.path == str(bad) and m.loras == []


def test_cli_extract_lora_from_a_split_and_from_files(demo: dict[str, str], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gguf_split.cli.app import app

    split({t: demo[t] for t in ("base", "chat", "summarize")}, tmp_path / "split", file_cost=0)
    runner = CliRunner()
    r = runner.invoke(app, ["extract-lora", str(tmp_path / "split"), "chat", "--base", "base",
                            "-o", str(tmp_path / "a.gguf"), "-q"])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["extract-lora", demo["chat"], "--base", demo["base"], "-o", str(tmp_path / "b.gguf"), "-q"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    # an untied output head cannot be a LoRA: refused in one line, listed with --allow-partial
    r = runner.invoke(app, ["extract-lora", str(tmp_path / "split"), "summarize", "--base", "base",
                            "-o", str(tmp_path / "s.gguf")])
    assert r.exit_code == 2 and "output.weight" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "s.gguf").exists()
    r = runner.invoke(app, ["extract-lora", str(tmp_path / "split"), "summarize", "--base", "base",
                            "-o", str(tmp_path / "s.gguf"), "--allow-partial"])
    assert r.exit_code == 0 and "LEFT OUT" in r.stdout and "PARTIAL" in r.stdout
    r = runner.invoke(app, ["extract-lora", str(tmp_path / "split"), "chat", "--base", "base",
                            "-o", str(tmp_path / "a.gguf")])
    assert r.exit_code == 2 and "--force" in r.stderr
