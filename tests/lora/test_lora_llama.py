"""LoRA adapters extracted by gguf-split, served by stock llama.cpp (llama-cpp-python's low-level C API).

- A LoRA applied to a task of a split (its files through llama_model_load_from_splits) gives
  logits bitwise identical to the same LoRA applied to the original model file (every position, one and two
  adapters, several scales).
- A LoRA served over its base is close to the merged fine-tune it was extracted from, within a tolerance
  (below) — not bitwise: the merged tensors are F16 matmuls, the base's are Q8_0/Q4_0 matmuls (llama.cpp
  quantizes the activations to Q8 for them) plus a separate B·(A·x) in F16.
- Scales and adapter sets change without reloading the model, and coming back to a setting gives the same
  logits bit for bit.
- A token_embd LoRA: over a base with its own output head it is served correctly (the flipped A/B layout);
  over a tied head llama.cpp aborts the process (shown in a subprocess), and gguf-split refuses it first.

Tolerance for LoRA-served vs merged (tiny random models, 320-token vocabulary, every prompt position). The
yardstick is the kernels' own rounding: the base model against a copy of it whose LoRA-target tensors are
stored as F16 (the same weights, rounded to F16 and multiplied by the F16 kernel, as the merged model's are).
Served-vs-merged may differ by at most twice that copy's max |Δlogit| and three times its KL, and must agree
on the argmax wherever the merged model's top-2 margin exceeds twice its max |Δlogit|. Measured here:
0.9–1.2× in max |Δlogit| and 0.7–1.6× in KL, i.e. the LoRA adds nothing measurable to the kernels' rounding.
The fine-tune's own effect (base vs merged, max |Δlogit|) is about 4× the bound, so a LoRA at scale 0 or 0.5,
a wrong layout or a missing tensor fails it (checked for scales 0 and 0.5).

Skipped when llama_cpp cannot be imported, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llama_harness as H

if H.IMPORT_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{H.IMPORT_ERROR} (CI=true: the llama.cpp tests must run)", pytrace=False)
    pytest.skip(H.IMPORT_ERROR, allow_module_level=True)

from gguf import GGUFWriter  # noqa: E402

from gguf_split.demo import make_demo_models, make_finetune  # noqa: E402
from gguf_split.errors import GGUFSplitError  # noqa: E402
from gguf_split.lora import extract_lora_from_files  # noqa: E402
from gguf_split.lora.llama import LlamaLora  # noqa: E402
from gguf_split.assemble.split import split  # noqa: E402

PROMPT = list(H.PROMPT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    H.init()  # llama.cpp's log goes to the harness, not the terminal
    root = tmp_path_factory.mktemp("lora-llama")
    models = make_demo_models(root / "models")
    rep = split({t: models[t] for t in ("base", "chat", "code")}, root / "split", file_cost=0)
    from gguf_split import open_split

    with open_split(rep.directory) as s:
        base_files = s.load("base").llama_cpp_paths()
    assert len(base_files) > 2  # the base task loads several shared files
    loras = {t: extract_lora_from_files(models[t], models["base"], root / f"{t}-lora.gguf").output
             for t in ("chat", "code")}
    return {"models": models, "base_split": base_files, "loras": loras, "root": root}


def all_logits(paths: list[str], loras: list[tuple[str, float]] = ()) -> np.ndarray:  # type: ignore[assignment]
    with LlamaLora(paths) as llm:
        llm.set_loras(loras)
        return llm.logits(PROMPT, all_positions=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(ref ‖ other) per position."""
    p, q = log_softmax(ref), log_softmax(other)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def close_to_merged(served: np.ndarray, merged: np.ndarray, base: np.ndarray, kernel_copy: np.ndarray) -> tuple[bool, str]:
    """The module docstring's tolerance (all arrays: logits per position). `kernel_copy` is the base with
    the LoRA's targets stored as F16 (llama_harness.retype_tensors)."""
    d_served = np.abs(served - merged).max()
    d_kernel = np.abs(kernel_copy - base).max()
    kl_served, kl_kernel = kl(merged, served).max(), kl(base, kernel_copy).max()
    top2 = np.sort(merged, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * d_kernel
    argmax_ok = bool((served.argmax(-1) == merged.argmax(-1))[clear].all())
    ok = bool(d_served <= 2 * d_kernel and kl_served <= 3 * kl_kernel and argmax_ok)
    return ok, (f"max|Δ| served {d_served:.3g} vs kernels {d_kernel:.3g} (base vs merged "
                f"{np.abs(base - merged).max():.3g}); KL served {kl_served:.3g} vs kernels {kl_kernel:.3g}; "
                f"argmax ok {argmax_ok}")


def kernel_copy(base: str, lora: str, out: Path) -> np.ndarray:
    from gguf.constants import GGMLQuantizationType as Q

    from gguf_split.lora import LoraAdapter

    with LoraAdapter.open(lora) as ad:
        names = ad.targets
    return all_logits([H.retype_tensors(base, out, names, Q.F16)])


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loras", [
    [("chat", 1.0)], [("code", 1.0)], [("chat", 0.5)], [("chat", 1.0), ("code", 1.0)], [("code", -0.75), ("chat", 2.0)],
])
def test_lora_on_split_task_is_bitwise_the_lora_on_the_original(setup: dict[str, Any],
                                                                loras: list[tuple[str, float]]) -> None:
    chosen = [(setup["loras"][t], s) for t, s in loras]
    on_split = all_logits(setup["base_split"], chosen)
    on_file = all_logits([setup["models"]["base"]], chosen)
    assert on_split.tobytes() == on_file.tobytes()
    assert not np.array_equal(on_split, all_logits([setup["models"]["base"]]))  # the LoRA did something


@pytest.mark.parametrize("task", ["chat", "code"])
def test_lora_served_is_close_to_the_merged_fine_tune(setup: dict[str, Any], task: str) -> None:
    merged = all_logits([setup["models"][task]])
    base = all_logits(setup["base_split"])
    served = all_logits(setup["base_split"], [(setup["loras"][task], 1.0)])
    kernels = kernel_copy(setup["models"]["base"], setup["loras"][task], setup["root"] / f"kernels-{task}.gguf")
    ok, why = close_to_merged(served, merged, base, kernels)
    assert ok, why
    # the tolerance has teeth: the base itself, or the LoRA at half strength, fail it
    for scale in (0.0, 0.5):
        wrong = all_logits(setup["base_split"], [(setup["loras"][task], scale)])
        assert not close_to_merged(wrong, merged, base, kernels)[0], scale


def test_scales_and_sets_change_without_reloading(setup: dict[str, Any]) -> None:
    chat, code = setup["loras"]["chat"], setup["loras"]["code"]
    with LlamaLora(setup["base_split"]) as llm:
        model = llm._model
        bare = llm.logits(PROMPT)
        llm.set_loras([(chat, 1.0)])
        one = llm.logits(PROMPT)
        llm.set_loras([(chat, 0.5)])
        half = llm.logits(PROMPT)
        llm.set_loras([(chat, 0.5), (code, 1.0)])
        both = llm.logits(PROMPT)
        assert llm.loras == [(os.path.abspath(chat), 0.5), (os.path.abspath(code), 1.0)]
        llm.set_loras([])
        again_bare = llm.logits(PROMPT)
        llm.set_loras([(chat, 1.0)])
        again_one = llm.logits(PROMPT)
        llm.unload_adapter(code)
        with pytest.raises(ValueError, match="is active"):
            llm.unload_adapter(chat)
        assert llm._model is model  # one model all along
    assert len({x.tobytes() for x in (bare, one, half, both)}) == 4
    assert again_bare.tobytes() == bare.tobytes() and again_one.tobytes() == one.tobytes()
    # each setting equals a fresh process-state load with that setting
    with LlamaLora(setup["base_split"]) as fresh:
        fresh.set_loras([(chat, 0.5), (code, 1.0)])
        assert fresh.logits(PROMPT).tobytes() == both.tobytes()


def test_greedy_tokens_of_served_and_merged(setup: dict[str, Any]) -> None:
    """Greedy continuations (16 tokens) of LoRA-served and merged agree on the first token at least; the
    full comparison on real models is the benchmark (random tiny models have near-ties)."""
    with LlamaLora(setup["models"]["chat"]) as m:
        want = m.greedy(PROMPT, 16)
    with LlamaLora(setup["base_split"]) as llm:
        llm.set_loras([(setup["loras"]["chat"], 1.0)])
        got = llm.greedy(PROMPT, 16)
        base = LlamaLora(setup["base_split"])
        try:
            bare = base.greedy(PROMPT, 16)
        finally:
            base.close()
    assert got[0] == want[0]
    assert sum(a == b for a, b in zip(got, want)) >= sum(a == b for a, b in zip(bare, want))


def test_token_embd_lora_over_an_untied_base(tmp_path: Path) -> None:
    """The flipped token_embd layout as llama.cpp applies it: a fine-tune of token_embd (and attn_q) of a
    base with its own output head, served as a LoRA, is close to the merged model."""
    H.init()
    models = make_demo_models(tmp_path / "m")
    untied = tmp_path / "untied.gguf"
    make_finetune(models["base"], untied, [], untie_output=True)
    tuned = tmp_path / "tuned.gguf"
    make_finetune(untied, tuned, ["token_embd.weight", "blk.1.attn_q.weight"], seed=9)
    report = extract_lora_from_files(tuned, untied, tmp_path / "emb-lora.gguf")
    assert {t.name for t in report.tensors} == {"token_embd.weight", "blk.1.attn_q.weight"}
    merged = all_logits([str(tuned)])
    base = all_logits([str(untied)])
    served = all_logits([str(untied)], [(report.output, 1.0)])
    ok, why = close_to_merged(served, merged, base, kernel_copy(str(untied), report.output, tmp_path / "k.gguf"))
    assert ok, why


def tied_token_embd_lora(path: Path, n_embd: int = 64, n_vocab: int = 320, r: int = 4) -> Path:
    rng = np.random.default_rng(0)
    w = GGUFWriter(os.fspath(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r))
    w.add_tensor("token_embd.weight.lora_a", (rng.standard_normal((n_vocab, r)) * 0.01).astype(np.float32))
    w.add_tensor("token_embd.weight.lora_b", (rng.standard_normal((n_embd, r)) * 0.01).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_token_embd_lora_over_a_tied_head_aborts_llama_cpp_and_is_refused(setup: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    """The demo base ties its output head to token_embd. llama.cpp loads such a LoRA, then its output matmul
    (build_lora_mm on the tied tensor, same name) multiplies the flipped A with the hidden state and ggml's
    shape assertion aborts the process. gguf-split refuses the adapter before llama.cpp sees it."""
    lora = tied_token_embd_lora(tmp_path / "tied.gguf")
    script = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        import llama_harness as H
        L = H.init()
        with H.loaded([{setup['models']['base']!r}]) as model, H.context(model) as ctx:
            a = L.llama_adapter_lora_init(model, {os.fsencode(lora)!r})
            print("adapter loaded" if a else "adapter refused", flush=True)
            L.llama_set_adapters_lora(ctx, (L.llama_adapter_lora_p_ctypes * 1)(a), 1, (ctypes.c_float * 1)(1.0))
            H.decode_last_logits(model, ctx)
            print("decoded", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONFAULTHANDLER": ""})
    assert "adapter loaded" in run.stdout and "decoded" not in run.stdout
    assert run.returncode != 0 and "ggml_can_mul_mat" in run.stderr
    with LlamaLora(setup["base_split"]) as llm:
        with pytest.raises(GGUFSplitError, match="ties its output head") as err:
            llm.set_loras([(lora, 1.0)])
        assert err.value.path == str(lora)
        assert llm.loras == [] and llm.logits(PROMPT).size == 320  # still usable


def test_llama_refuses_bad_adapters_with_clear_errors(setup: dict[str, Any], tmp_path: Path) -> None:
    with LlamaLora(setup["base_split"]) as llm:
        with pytest.raises(GGUFSplitError, match="no general.type"):
            llm.set_loras([(setup["models"]["chat"], 1.0)])
        with pytest.raises(GGUFSplitError, match="cannot open"):
            llm.set_loras([(tmp_path / "missing.gguf", 1.0)])
        with pytest.raises(ValueError, match="twice"):
            llm.set_loras([(setup["loras"]["chat"], 1.0), (setup["loras"]["chat"], 0.5)])
