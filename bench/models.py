"""Real model sets for the benchmarks, made with llama.cpp's own tools (see tools.py) and cached under
`<work>/sets/<set>/` (`<work>` = $GGUF_SPLIT_BENCH_WORK or bench/work/).

`model_set(name)` -> {task: GGUF path}. Each set is made once: every fine-tune by `llama-export-lora` from a
random LoRA adapter written here with gguf's GGUFWriter, every quantization by `llama-quantize
--allow-requantize`; each new model is then loaded once in llama-cpp-python (`Llama(model_path=...,
n_ctx=64)`: 8 greedy tokens and the top next-token logit of the prompt), the result recorded in
`<work>/sets/<set>/manifest.json`. A set whose manifest lists all its files is reused as is.

Sets (n = layer count, top quarter = the last max(1, n // 4) layers):
- `smollm2`: SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, tied embeddings) as `base`, plus
  `chat` (attn_q and attn_v of every layer), `code` (ffn_gate/up/down of the top quarter),
  `summarize` (attn_q of the top layer, plus output.weight where the base has one: neither model here has
  an output head of its own, and export-lora only rewrites tensors the base has);
- `gemma3`: Gemma-3-270M Q4_K_M (gemma3, 18 layers, tied embeddings), the same recipe;
- `smollm2-embd`: SmolLM2's base, chat and code (the same files as `smollm2`) plus `vocab`, which changes
  token_embd (the largest tensor, 30 of the model's 98 MB; tied, so it is the output head too) and the
  attention (q, k, v, output) of the top quarter;
- `smollm2-quant`: a quantization ladder of SmolLM2, each rung requantized from the original Q4_1 file:
  see QUANT_LADDER.

More sets for three features (all of them in ALL_SETS; `SETS`, the default of this script and of
bench_layout.py, stays the four above). `<m>` is `smollm2` or `gemma3`, the registry models above; top
third = the last max(1, n // 3) layers (SmolLM2 20-29, Gemma-3 12-17); linear = attn_q/k/v/output and
ffn_gate/up/down:
- `grow-<m>` (adding a fine-tune to an existing split): `base` and `qv` (the same files as `<m>`'s base and
  chat), plus `qv2` (q/v of every layer again, another seed), `ffn` (ffn_gate/up/down of the top third),
  `alllin` (every linear tensor of every layer), `embd` (token_embd alone). `grow_scenarios(name)` lists
  the (existing tasks, task to add) pairs a benchmark runs: base + qv, then add each other one;
- `f16-<m>` (quantizing a family): `base` = `llama-quantize --allow-requantize <registry> F16` (the same file
  as `ladder-<m>-f16`'s source) and three fine-tunes merged onto it by export-lora: `qv`, `ffn` (top
  third) and `topq` (attn_q of the top layer); export-lora keeps every untouched tensor a byte copy of the
  base (checked on every file it writes). Each model has an importance matrix made by `llama-imatrix` on
  `calibration_text()` (GGUF format, `imatrices(name)`), the base also in the legacy `.dat` format
  (`imatrices(name, "dat")`);
- `ladder-<m>-f16`, `ladder-<m>-bf16` (packs that re-derive quantizations): the F16 (BF16) source made from
  the registry model, plus LADDER's types quantized from it exactly as ggufpacker re-runs them
  (`llama-quantize <source> <out> <TYPE>`), files named `<stem>-<TYPE>.gguf` as ggufpacker expects;
  `ggufpacker_roundtrip(name)` packs one with ggufpacker (tools.ggufpacker_bin()) and unpacks it.

LoRA adapters (llama.cpp's format, checked against src/llama-adapter.cpp and tools/export-lora of the
vendored llama.cpp): KVs general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (f32),
general.architecture = the base's; for a base tensor X with ne [n_in, n_out], X.lora_a has ne [n_in, r]
and X.lora_b ne [r, n_out]; for token_embd.weight (ne [n_embd, n_vocab]) A and B are flipped: lora_a has
ne [r, n_vocab] and lora_b ne [r, n_embd]. A, B ~ N(0, 0.02^2), F32, rank 8, alpha 16: export-lora adds
alpha / r * B.A (elements ~ 1e-3, small against the weights) and writes the merged tensor as F16.

    python bench/models.py                    # make (or reuse) the sets of SETS, print sizes and sharing
    python bench/models.py --sets smollm2-quant --rebuild
    python bench/models.py --sets grow f16 ladder   # groups: base, grow, f16, ladder, all
    python bench/models.py --sets ladder-smollm2-f16 --ggufpacker   # + pack/unpack check with ggufpacker
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMMA3, SMOLLM2, WORK, model_path, sha256_file  # noqa: E402
from ggufhdr import read_header  # noqa: E402

SETS = ("smollm2", "gemma3", "smollm2-embd", "smollm2-quant")
MODELS = ("smollm2", "gemma3")  # the registry models of common.py
GROW_SETS = tuple(f"grow-{m}" for m in MODELS)
FAMILY_SETS = tuple(f"f16-{m}" for m in MODELS)
LADDER_SETS = tuple(f"ladder-{m}-{src}" for m in MODELS for src in ("f16", "bf16"))
ALL_SETS = SETS + GROW_SETS + FAMILY_SETS + LADDER_SETS
GROUPS = {"base": SETS, "grow": GROW_SETS, "f16": FAMILY_SETS, "ladder": LADDER_SETS, "all": ALL_SETS}
RANK = 8
ALPHA = 16.0
SIGMA = 0.02
PROMPT = "The capital of France is"

# task -> (llama-quantize type, extra arguments); "q4_1" is the original file itself.
QUANT_LADDER: dict[str, tuple[str, list[str]]] = {
    "q8_0": ("Q8_0", []),
    "q5_1": ("Q5_1", []),
    "q5_0": ("Q5_0", []),
    "q4_0": ("Q4_0", []),
    "q4_0-embd-q4_0": ("Q4_0", ["--token-embedding-type", "q4_0"]),
    "q4_k_m": ("Q4_K_M", []),
}

# Quantization ladders: llama-quantize types made from the F16 / BF16 source (task = the type in lowercase).
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
# File stems of the ladders' files: ggufpacker reads the type from the "-<TYPE>.gguf" suffix.
STEMS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "gemma-3-270m"}

# LoRA seeds of the new fine-tunes; qv uses chat's seed 1 and topq summarize's seed 3 (the same adapters as
# sets smollm2 / gemma3 have for those tensors), so a task means the same change on every base.
SEEDS = {"qv": 1, "topq": 3, "qv2": 11, "ffn": 12, "alllin": 13, "embd": 14}
GROW_ADD = ("qv2", "ffn", "alllin", "embd")  # tasks added to a split of base + qv

# llama-imatrix on the families: chunks of IMATRIX_CTX tokens of the calibration text, 2 threads.
IMATRIX_CTX = 128
CALIBRATION_SEED = 20
CALIBRATION_CHARS = 6000


def sets_dir() -> Path:
    return WORK / "sets"


def _layers(h) -> int:
    arch = h.kv["general.architecture"]
    return int(h.kv[f"{arch}.block_count"])


def lora_recipes(base: Path) -> dict[str, list[str]]:
    """task -> target tensors of the fine-tunes of `smollm2` and `gemma3` (and chat/code of smollm2-embd)."""
    h = read_header(base)
    n = _layers(h)
    top = range(n - max(1, n // 4), n)
    summarize = [f"blk.{n - 1}.attn_q.weight"] + (["output.weight"] if h.tensor("output.weight") else [])
    return {
        "chat": [f"blk.{i}.attn_{x}.weight" for i in range(n) for x in ("q", "v")],
        "code": [f"blk.{i}.ffn_{x}.weight" for i in top for x in ("gate", "up", "down")],
        "summarize": summarize,
    }


def embd_recipe(base: Path) -> list[str]:
    h = read_header(base)
    n = _layers(h)
    top = range(n - max(1, n // 4), n)
    return ["token_embd.weight"] + [f"blk.{i}.attn_{x}.weight" for i in top for x in ("q", "k", "v", "output")]


def _top_third(n: int) -> range:
    return range(n - max(1, n // 3), n)


def new_recipes(base: Path) -> dict[str, list[str]]:
    """task -> target tensors of the fine-tunes of the grow-* and f16-* sets (seeds in SEEDS)."""
    n = _layers(read_header(base))
    qv = [f"blk.{i}.attn_{x}.weight" for i in range(n) for x in ("q", "v")]
    linear = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    return {
        "qv": qv,
        "qv2": qv,
        "ffn": [f"blk.{i}.ffn_{x}.weight" for i in _top_third(n) for x in ("gate", "up", "down")],
        "alllin": [f"blk.{i}.{x}.weight" for i in range(n) for x in linear],
        "embd": ["token_embd.weight"],
        "topq": [f"blk.{n - 1}.attn_q.weight"],
    }


def write_lora(base: Path, out: Path, targets: list[str], *, seed: int, rank: int = RANK, alpha: float = ALPHA,
               dtype=np.float32) -> None:
    """A random LoRA adapter for `targets` of `base`, in llama.cpp's GGUF adapter format."""
    from gguf import GGUFWriter

    h = read_header(base)
    arch = h.kv["general.architecture"]
    rng = np.random.default_rng(seed)
    tmp = out.with_suffix(".part")
    w = GGUFWriter(os.fspath(tmp), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for name in targets:
        t = h.tensor(name)
        if t is None:
            raise SystemExit(f"{base}: has no tensor {name}")
        if len(t.ne) != 2:
            raise SystemExit(f"{base}: {name} has ne {t.ne}, not a matrix")
        n_in, n_out = t.ne
        # numpy shapes are GGUF ne reversed
        if name == "token_embd.weight":  # A and B flipped: lora_a ne [r, n_vocab], lora_b ne [r, n_embd]
            a = rng.normal(0, SIGMA, (n_out, rank))
            b = rng.normal(0, SIGMA, (n_in, rank))
        else:  # lora_a ne [n_in, r], lora_b ne [r, n_out]
            a = rng.normal(0, SIGMA, (rank, n_in))
            b = rng.normal(0, SIGMA, (n_out, rank))
        w.add_tensor(name + ".lora_a", a.astype(dtype))
        w.add_tensor(name + ".lora_b", b.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if r.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def export_lora(base: Path, lora: Path, out: Path, threads: int = 2, log: Path | None = None) -> float:
    from tools import tool

    tmp = out.with_suffix(".part.gguf")
    dt = _run([str(tool("llama-export-lora")), "-m", str(base), "--lora", str(lora), "-o", str(tmp),
               "-t", str(threads)], log or out.with_suffix(".log"))
    tmp.rename(out)
    return dt


def quantize(src: Path, out: Path, qtype: str, extra: list[str], threads: int | None = 2,
             log: Path | None = None) -> float:
    """llama-quantize src -> out. `extra` goes before the paths (e.g. ["--allow-requantize"]; the sets of
    SETS always pass it); threads None leaves llama-quantize's default (all cores), as ggufpacker runs it.
    The output is written under a temporary name and renamed when complete."""
    from tools import tool

    tmp = out.with_suffix(".part")  # not *.gguf: a ladder directory is scanned for *.gguf by ggufpacker
    cmd = [str(tool("llama-quantize")), *extra, str(src), str(tmp), qtype] + ([str(threads)] if threads else [])
    dt = _run(cmd, log or out.with_suffix(".log"))
    tmp.rename(out)
    return dt


def calibration_text(seed: int = CALIBRATION_SEED, chars: int = CALIBRATION_CHARS) -> str:
    """A few KB of plain, varied English for llama-imatrix: sentences built from fixed word lists, picked by
    SHA-256 of (seed, counter) so the text is the same on every machine and Python version."""
    counter = 0

    def index(n: int) -> int:
        nonlocal counter
        counter += 1
        h = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        return int.from_bytes(h[:8], "little") % n

    def pick(options: tuple[str, ...]) -> str:
        return options[index(len(options))]

    def number(lo: int, hi: int) -> int:
        return lo + index(hi - lo + 1)

    def cap(x: str) -> str:
        return x[0].upper() + x[1:]

    forms = (
        lambda: f"{cap(pick(_W['subject']))} {pick(_W['verb'])} {pick(_W['object'])} {pick(_W['adverb'])}.",
        lambda: (f"{cap(pick(_W['subject']))} {pick(_W['verb'])} {pick(_W['object'])} {pick(_W['place'])} "
                 f"{pick(_W['conj'])} {pick(_W['clause'])}."),
        lambda: f"{cap(pick(_W['conj']))} {pick(_W['clause'])}, {pick(_W['subject'])} {pick(_W['verb'])} "
                f"{pick(_W['object'])}.",
        lambda: f"In {number(1890, 2020)}, {pick(_W['subject'])} counted {number(2, 90)} {pick(_W['plural'])} "
                f"{pick(_W['place'])}.",
        lambda: f"\"{cap(pick(_W['clause']))},\" said {pick(_W['subject'])}, \"so we {pick(_W['verb'])} "
                f"{pick(_W['object'])} {pick(_W['adverb'])}.\"",
        lambda: f"Did {pick(_W['subject'])} know that {pick(_W['clause'])}? {cap(pick(_W['answer']))}.",
    )
    paragraphs: list[str] = []
    total = 0
    while total < chars:
        n = number(3, 7)
        para = " ".join(forms[index(len(forms))]() for _ in range(n))
        paragraphs.append(para)
        total += len(para) + 2
    return "\n\n".join(paragraphs) + "\n"


_W: dict[str, tuple[str, ...]] = {
    "subject": ("the old farmer", "a young engineer", "my neighbour", "the committee", "our teacher",
                "the small dog", "a tired traveller", "the city council", "her brother", "the orchestra",
                "a curious child", "the museum guide", "his grandmother", "the new manager",
                "a group of students", "the baker on the corner", "the captain", "a nurse from the hospital"),
    "verb": ("repaired", "painted", "described", "carried", "studied", "ignored", "discovered", "borrowed",
             "cleaned", "measured", "photographed", "sold", "planted", "explained", "built", "visited",
             "forgot", "recommended"),
    "object": ("the wooden bridge", "a letter from the bank", "three baskets of apples", "the broken clock",
               "an old map of the coast", "the garden wall", "a long report", "the kitchen window",
               "two tickets to the concert", "the village church", "a box of tools", "the evening news",
               "a recipe for bread", "the rules of the game", "a painting of the harbour", "the school roof"),
    "adverb": ("carefully", "quickly", "without a word", "for the second time", "with great patience",
               "early in the morning", "after lunch", "despite the rain", "in a hurry", "once again",
               "as quietly as possible", "before anyone noticed"),
    "place": ("near the station", "in the north of the country", "behind the school", "at the edge of the forest",
              "on the main square", "by the harbour", "in a quiet street", "under the old oak",
              "across the valley", "outside the library"),
    "conj": ("because", "although", "while", "after", "before", "since", "even though", "as soon as"),
    "clause": ("the weather was cold", "nobody else had time", "the shop was closed", "the price had gone up",
               "everyone was watching", "the lights went out", "the train was late", "it was a public holiday",
               "the river had flooded the road", "the letter arrived a week too late",
               "the results surprised the whole town", "the bell rang twice"),
    "plural": ("boats", "bicycles", "sheep", "windows", "visitors", "books", "lamps", "trees", "birds",
               "questions"),
    "answer": ("nobody could say for sure", "yes, and it changed everything", "not at first",
               "only the children remembered", "perhaps, but the records were lost"),
}


_VERIFY = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
out = {}
for p in sys.argv[2:]:
    t0 = time.perf_counter()
    llm = Llama(model_path=p, n_ctx=64, n_threads=2, verbose=False)
    r = llm(sys.argv[1], max_tokens=8, temperature=0.0, top_k=1)
    llm.reset()
    llm.eval(llm.tokenize(sys.argv[1].encode()))
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    top = int(logits.argmax())
    out[p] = {"text": r["choices"][0]["text"], "next_token": top, "next_logit": round(float(logits[top]), 4),
              "seconds": round(time.perf_counter() - t0, 2)}
    del llm
print(json.dumps(out))
"""


def verify_load(paths: list[Path]) -> dict[str, dict]:
    """Load each model in llama-cpp-python (fresh process) and generate 8 greedy tokens; note the top next-token logit."""
    r = subprocess.run([sys.executable, "-c", _VERIFY, PROMPT, *map(str, paths)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-cpp-python could not load {paths}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _base(name: str) -> Path:
    return model_path(GEMMA3 if name == "gemma3" else SMOLLM2)


def set_dir(name: str) -> Path:
    """Directory of a set's own files (a set may also list files of other sets)."""
    return sets_dir() / name


def _model_of(name: str) -> str:
    """Registry model (smollm2 / gemma3) of a grow-*, f16-* or ladder-* set."""
    for m in MODELS:
        if name in (f"grow-{m}", f"f16-{m}") or name.startswith(f"ladder-{m}-"):
            return m
    raise ValueError(name)


def _logs(d: Path, stem: str) -> Path:
    """Tool logs of the new sets go to <set>/logs/, out of the way of ggufpacker's scan of the directory."""
    return d / "logs" / f"{stem}.log"


def _make(name: str, d: Path) -> tuple[dict[str, dict], dict]:
    """Make the set's files in d; returns (task -> manifest entry, set-level facts), without verification."""
    if name in GROW_SETS:
        return _make_grow(_model_of(name), d)
    if name in FAMILY_SETS:
        return _make_family(_model_of(name), d)
    if name in LADDER_SETS:
        return _make_ladder(_model_of(name), name.rsplit("-", 1)[1].upper(), d)
    base = _base(name)
    entries: dict[str, dict] = {"base" if name != "smollm2-quant" else "q4_1":
                                {"path": str(base), "recipe": "original file"}}
    if name in ("smollm2", "gemma3"):
        jobs = [(task, targets, seed) for seed, (task, targets) in enumerate(lora_recipes(base).items(), start=1)]
    elif name == "smollm2-embd":
        for task, e in model_set("smollm2").items():
            if task in ("chat", "code"):
                entries[task] = {"path": str(e), "recipe": "the same file as in set smollm2"}
        jobs = [("vocab", embd_recipe(base), 4)]
    elif name == "smollm2-quant":
        jobs = []
        for task, (qtype, extra) in QUANT_LADDER.items():
            out = d / f"{task}.gguf"
            dt = quantize(base, out, qtype, ["--allow-requantize", *extra])
            entries[task] = {"path": str(out), "recipe": f"llama-quantize --allow-requantize {' '.join(extra)} "
                             f"<q4_1> {qtype}".replace("  ", " "), "make_s": round(dt, 1)}
            print(f"  {name}/{task}: {qtype} {' '.join(extra)} in {dt:.1f} s", file=sys.stderr)
    else:
        raise ValueError(name)
    for task, targets, seed in jobs:
        lora = d / f"lora-{task}.gguf"
        write_lora(base, lora, targets, seed=seed)
        out = d / f"{task}.gguf"
        dt = export_lora(base, lora, out)
        entries[task] = {"path": str(out), "recipe": f"llama-export-lora of a rank-{RANK} LoRA (alpha {ALPHA}, "
                         f"seed {seed}) on {len(targets)} tensors", "targets": targets, "make_s": round(dt, 1),
                         "lora": str(lora), "lora_bytes": lora.stat().st_size}
        print(f"  {name}/{task}: export-lora of {len(targets)} tensors in {dt:.1f} s", file=sys.stderr)
    return entries, {}


def check_merge(base: Path, merged: Path, targets: list[str]) -> dict:
    """What export-lora did, checked tensor by tensor: every tensor outside `targets` must be a byte copy of
    the base's (same type, same bytes), every target must differ and be F16 (F32 stays F32). Raises
    SystemExit otherwise; returns the counts for the manifest."""
    from hashing import tensor_digests

    ref, got = tensor_digests(base), tensor_digests(merged)
    if set(ref) != set(got):
        raise SystemExit(f"{merged}: tensor names differ from {base}: {sorted(set(ref) ^ set(got))[:5]}")
    wanted = set(targets)
    copied = [n for n in got if n not in wanted and got[n] == ref[n]]
    bad_copy = [n for n in got if n not in wanted and got[n] != ref[n]]
    unchanged = [n for n in wanted if got[n] == ref[n]]
    bad_type = [n for n in wanted if got[n][0] != ("F32" if ref[n][0] == "F32" else "F16")]
    if bad_copy or unchanged or bad_type:
        raise SystemExit(f"{merged}: export-lora did not merge as expected: untouched but changed "
                         f"{bad_copy[:3]}, targets unchanged {unchanged[:3]}, targets of an unexpected type "
                         f"{bad_type[:3]}")
    return {"untouched_identical": len(copied), "merged": len(wanted),
            "merged_bytes": sum(got[n][2] for n in wanted)}


def _finetune(base: Path, d: Path, task: str, targets: list[str], seed: int) -> dict:
    """One export-lora fine-tune of `base` in d (LoRA lora-<task>.gguf, model <task>.gguf), checked."""
    lora = d / f"lora-{task}.gguf"
    write_lora(base, lora, targets, seed=seed)
    out = d / f"{task}.gguf"
    dt = export_lora(base, lora, out, log=_logs(d, task))
    check = check_merge(base, out, targets)
    print(f"  {d.name}/{task}: export-lora of {len(targets)} tensors in {dt:.1f} s "
          f"({check['untouched_identical']} others byte copies of the base)", file=sys.stderr)
    return {"path": str(out), "recipe": f"llama-export-lora of a rank-{RANK} LoRA (alpha {ALPHA}, seed {seed}) "
            f"on {len(targets)} tensors", "targets": targets, "seed": seed, "make_s": round(dt, 1),
            "lora": str(lora), "lora_bytes": lora.stat().st_size, "merge_check": check}


def grow_scenarios(name: str) -> list[tuple[list[str], str]]:
    """(tasks of the existing split, task to add) pairs of a grow-* set: a split of base + qv, then one
    of qv2 (the same tensors as qv, other values), ffn (tensors qv and base share), alllin (nearly every
    tensor) or embd (the largest tensor)."""
    if name not in GROW_SETS:
        raise ValueError(f"{name} is not a grow set ({', '.join(GROW_SETS)})")
    return [(["base", "qv"], task) for task in GROW_ADD]


def _make_grow(model: str, d: Path) -> tuple[dict[str, dict], dict]:
    base = model_path(model)
    chat = model_set(model)["chat"]
    targets = new_recipes(base)
    entries: dict[str, dict] = {
        "base": {"path": str(base), "recipe": "original file (registry model)"},
        "qv": {"path": str(chat), "recipe": f"the same file as chat of set {model} (q/v of every layer, seed 1)",
               "targets": targets["qv"], "seed": SEEDS["qv"]},
    }
    for task in GROW_ADD:
        entries[task] = _finetune(base, d, task, targets[task], SEEDS[task])
    return entries, {"scenarios": grow_scenarios(f"grow-{model}")}


def source_model(model: str, ftype: str) -> tuple[Path, float | None]:
    """The F16 or BF16 conversion of a registry model (`llama-quantize --allow-requantize <model> <ftype>`),
    kept in ladder-<model>-<ftype>/ as `<stem>-<ftype>.gguf` (the ladder's source; f16-<model> lists the
    same file as its base). Made once; returns (path, seconds taken or None when it already existed)."""
    d = set_dir(f"ladder-{model}-{ftype.lower()}")
    out = d / f"{STEMS[model]}-{ftype}.gguf"
    if out.exists():
        return out, None
    d.mkdir(parents=True, exist_ok=True)
    dt = quantize(model_path(model), out, ftype, ["--allow-requantize"], log=_logs(d, out.stem))
    print(f"  {d.name}: {out.name} in {dt:.1f} s", file=sys.stderr)
    return out, dt


def _imatrix_args() -> list[str]:
    # batch = context: one chunk per batch, so the logits buffer holds 128 rows (Gemma-3: 262k each)
    return ["-c", str(IMATRIX_CTX), "-b", str(IMATRIX_CTX), "-t", "2"]


def make_imatrix(model: Path, out: Path, calibration: Path) -> float:
    """llama-imatrix over `calibration` (GGUF output, the tool's default format). Run in the calibration
    file's directory with relative names, so the dataset name recorded in the file is "calibration.txt"
    wherever the work directory is; written under a temporary name (the tool also saves midway)."""
    from tools import tool

    tmp = out.with_name("tmp-" + out.name)
    dt = _run([str(tool("llama-imatrix")), "-m", str(model.resolve()), "-f", calibration.name, "-o", tmp.name,
               *_imatrix_args()], _logs(out.parent, out.name), cwd=calibration.parent)
    tmp.rename(out)
    return dt


def imatrix_to_dat(src: Path, out: Path, model: Path) -> float:
    """The same importance matrix in llama.cpp's legacy format: `llama-imatrix --in-file <gguf>
    --output-format dat` without a text only converts (it wants -m but loads no model), with the chunk
    size the matrix was made with (the legacy format stores call counts = token counts / chunk size)."""
    from tools import tool

    tmp = out.with_name("tmp-" + out.name)
    dt = _run([str(tool("llama-imatrix")), "-m", str(model.resolve()), "--in-file", src.name, "-o", tmp.name,
               "--output-format", "dat", *_imatrix_args()], _logs(out.parent, out.name), cwd=src.parent)
    tmp.rename(out)
    return dt


def _make_family(model: str, d: Path) -> tuple[dict[str, dict], dict]:
    base, dt = source_model(model, "F16")
    targets = new_recipes(base)
    entries: dict[str, dict] = {"base": {
        "path": str(base), "recipe": f"llama-quantize --allow-requantize <registry {model}> F16 (the source of "
        f"ladder-{model}-f16)", **({"make_s": round(dt, 1)} if dt is not None else {})}}
    for task in ("qv", "ffn", "topq"):
        entries[task] = _finetune(base, d, task, targets[task], SEEDS[task])
    text = calibration_text()
    calibration = d / "calibration.txt"
    calibration.write_text(text, encoding="utf-8")
    for task, e in entries.items():
        out = d / f"{task}.imatrix.gguf"
        dt_i = make_imatrix(Path(e["path"]), out, calibration)
        e["imatrix"] = {"gguf": str(out)}
        e["imatrix_s"] = round(dt_i, 1)
        print(f"  {d.name}/{task}: imatrix in {dt_i:.1f} s", file=sys.stderr)
    dat = d / "base.imatrix.dat"
    imatrix_to_dat(d / "base.imatrix.gguf", dat, base)
    entries["base"]["imatrix"]["dat"] = str(dat)
    facts = {"calibration": {"path": str(calibration), "chars": len(text), "seed": CALIBRATION_SEED,
                             "sha256": hashlib.sha256(text.encode()).hexdigest()},
             "imatrix_args": _imatrix_args(), "imatrix_chunks": _imatrix_chunks(d / "base.imatrix.gguf")}
    return entries, facts


def _imatrix_chunks(path: Path) -> int:
    return int(read_header(path).kv.get("imatrix.chunk_count", 0))


def _make_ladder(model: str, ftype: str, d: Path) -> tuple[dict[str, dict], dict]:
    source, dt = source_model(model, ftype)
    src_task = ftype.lower()
    entries: dict[str, dict] = {src_task: {
        "path": str(source), "recipe": f"llama-quantize --allow-requantize <registry {model}> {ftype}",
        **({"make_s": round(dt, 1)} if dt is not None else {})}}
    for qtype in LADDER:
        out = d / f"{STEMS[model]}-{qtype}.gguf"
        dt_q = quantize(source, out, qtype, [], threads=None, log=_logs(d, out.stem))
        entries[qtype.lower()] = {"path": str(out), "recipe": f"llama-quantize <{ftype} source> {qtype}",
                                  "make_s": round(dt_q, 1)}
        print(f"  {d.name}/{qtype.lower()}: {qtype} in {dt_q:.1f} s", file=sys.stderr)
    return entries, {"source_task": src_task}


def _complete(m: dict) -> bool:
    """A manifest's set is usable when every file it lists (models and importance matrices) exists."""
    files = [e["path"] for e in m["tasks"].values()]
    files += [p for e in m["tasks"].values() for p in e.get("imatrix", {}).values()]
    return all(Path(p).exists() for p in files)


def model_set(name: str, rebuild: bool = False) -> dict[str, Path]:
    """task -> GGUF path of a benchmark set, made (and verified) on first use."""
    if name not in ALL_SETS:
        raise ValueError(f"unknown set {name!r}; sets: {', '.join(ALL_SETS)}")
    d = set_dir(name)
    manifest = d / "manifest.json"
    if manifest.exists() and not rebuild:
        m = json.loads(manifest.read_text())
        if _complete(m):
            return {t: Path(e["path"]) for t, e in m["tasks"].items()}
    if rebuild:
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    entries, facts = _make(name, d)
    made = time.perf_counter() - t0
    t1 = time.perf_counter()
    checks = verify_load([Path(e["path"]) for e in entries.values()])
    for e in entries.values():
        e["bytes"] = os.path.getsize(e["path"])
        e["verify"] = checks[e["path"]]
    m = {"set": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "make_s": round(made, 1),
         "verify_s": round(time.perf_counter() - t1, 1), "prompt": PROMPT, **facts, "tasks": entries}
    manifest.write_text(json.dumps(m, indent=1))
    return {t: Path(e["path"]) for t, e in entries.items()}


def imatrices(name: str, fmt: str = "gguf") -> dict[str, Path]:
    """task -> importance matrix of an f16-* set (made with the set): fmt "gguf" (llama-imatrix's default
    format, every task) or "dat" (the legacy format: the base only)."""
    if name not in FAMILY_SETS:
        raise ValueError(f"{name} has no importance matrices (sets with them: {', '.join(FAMILY_SETS)})")
    model_set(name)
    return {t: Path(e["imatrix"][fmt]) for t, e in manifest(name)["tasks"].items() if fmt in e.get("imatrix", {})}


def ladder_source(name: str) -> str:
    """The task of a ladder-* set that the others are quantized from ("f16" or "bf16")."""
    if name not in LADDER_SETS:
        raise ValueError(f"{name} is not a ladder set ({', '.join(LADDER_SETS)})")
    return name.rsplit("-", 1)[1]


def manifest(name: str) -> dict:
    return json.loads((sets_dir() / name / "manifest.json").read_text())


def sharing(paths: dict[str, Path]) -> list[str]:
    """Lines describing which tensors each model shares byte-identical with the first (the base), and the
    set's dedup optimum: every distinct tensor version once, against the sum of the models' tensor bytes."""
    from hashing import tensor_digests

    digests = {t: tensor_digests(p) for t, p in paths.items()}
    tasks = list(paths)
    ref = digests[tasks[0]]
    lines = []
    for t in tasks[1:]:
        same = [n for n, v in digests[t].items() if ref.get(n) == v]
        diff = [n for n, v in digests[t].items() if ref.get(n) != v]
        by_type: dict[str, int] = {}
        for n in diff:
            by_type[digests[t][n][0]] = by_type.get(digests[t][n][0], 0) + 1
        lines.append(f"{t}: {len(same)} tensors identical to {tasks[0]} "
                     f"({sum(digests[t][n][2] for n in same) / 1e6:.1f} MB), {len(diff)} differ "
                     f"({sum(digests[t][n][2] for n in diff) / 1e6:.1f} MB: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(by_type.items())) + ")")
    versions = {(n, v) for d in digests.values() for n, v in d.items()}
    total = sum(v[2] for d in digests.values() for v in d.values())
    distinct = sum(v[2] for _, v in versions)
    lines.append(f"distinct tensor versions: {len(versions)}, {distinct / 1e6:.1f} MB of {total / 1e6:.1f} MB of "
                 f"tensors in the {len(tasks)} files ({distinct / total:.3f})")
    return lines


def types(path: Path) -> str:
    """Tensor count per ggml type of a GGUF, e.g. "F16 182, F32 61"."""
    count: dict[str, int] = {}
    for t in read_header(path).tensors:
        count[t.type_name] = count.get(t.type_name, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(count.items(), key=lambda kv: -kv[1]))



def ggufpacker_roundtrip(name: str) -> dict:
    """Pack a ladder set's directory with ggufpacker (pointed at our llama-quantize), unpack every file
    again and compare it with the original by sha256. Writes <work>/ggufpacker/<set>/check.json (the pack
    stays beside it for the benchmarks to compare against) and returns the same dict."""
    from tools import GGUFPACKER, ggufpacker_bin, tool

    if name not in LADDER_SETS:
        raise ValueError(f"{name} is not a ladder set ({', '.join(LADDER_SETS)})")
    paths = model_set(name)
    exe = ggufpacker_bin()
    root = WORK / "ggufpacker" / name
    shutil.rmtree(root, ignore_errors=True)
    (root / "tmp").mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "GGUFPACKER_CACHE": str(root / "cache")}
    pack = root / f"{name}.ggufpack"

    def run(cmd: list[str], log: str) -> float:
        t0 = time.perf_counter()
        with open(root / log, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}); log {root / log}")
        return time.perf_counter() - t0

    pack_s = run([str(exe), "pack", str(set_dir(name)), "-o", str(pack), "--llama-quantize",
                  str(tool("llama-quantize"))], "pack.log")
    plans = {f["filename"]: f["plan"] for f in json.loads((pack / "manifest.json").read_text())["files"]}
    files = {}
    for task, p in paths.items():
        out = root / "out" / p.name
        dt = run([str(exe), "unpack", str(pack), p.name, "-o", str(out)], f"unpack-{task}.log")
        same = sha256_file(out) == sha256_file(p)
        files[task] = {"file": p.name, "plan": plans.get(p.name), "bytes": p.stat().st_size,
                       "unpack_s": round(dt, 1), "bit_exact": same}
        out.unlink()
        print(f"  ggufpacker {name}/{task}: {plans.get(p.name)}, unpacked in {dt:.1f} s, "
              f"{'bit-exact' if same else 'DIFFERS'}", file=sys.stderr)
    stats = subprocess.run([str(exe), "stats", str(pack)], capture_output=True, text=True, env=env).stdout
    result = {"set": name, "ggufpacker": GGUFPACKER, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "pack": str(pack), "pack_s": round(pack_s, 1),
              "pack_bytes": sum(f.stat().st_size for f in pack.rglob("*") if f.is_file()),
              "input_bytes": sum(p.stat().st_size for p in paths.values()),
              "all_bit_exact": all(f["bit_exact"] for f in files.values()), "files": files, "stats": stats}
    shutil.rmtree(root / "tmp", ignore_errors=True)
    (root / "check.json").write_text(json.dumps(result, indent=1))
    return result


def _expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for s in GROUPS.get(n, (n,)):
            if s not in out:
                out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(ALL_SETS) + list(GROUPS),
                    help="sets or groups of sets (" + "; ".join(f"{k}: {' '.join(v)}" for k, v in GROUPS.items()
                                                            if k != "all") + "; all)")
    ap.add_argument("--rebuild", action="store_true", help="make the chosen sets again")
    ap.add_argument("--ggufpacker", action="store_true",
                    help="also pack and unpack the chosen ladder sets with ggufpacker and check them bit-exact")
    args = ap.parse_args()
    for name in _expand(args.sets):
        paths = model_set(name, rebuild=args.rebuild)
        m = manifest(name)
        print(f"{name}: made {m['date']} in {m['make_s']} s, verified in {m['verify_s']} s; "
              f"{len(paths)} files, {sum(e['bytes'] for e in m['tasks'].values()):,} B; {set_dir(name)}")
        for task, e in m["tasks"].items():
            v = e["verify"]
            print(f"  {task:16} {e['bytes']:>13,} B  {v['text']!r} logit {v.get('next_logit')}  ({e['recipe']})")
            if name not in SETS:
                print(f"  {'':16} {types(Path(e['path']))}  {Path(e['path']).name}"
                      + (f"  made in {e['make_s']} s" if "make_s" in e else ""))
            for fmt, p in e.get("imatrix", {}).items():
                print(f"  {'':16} imatrix ({fmt}): {p} ({os.path.getsize(p):,} B)"
                      + (f", made in {e['imatrix_s']} s" if fmt == "gguf" else ""))
        if "scenarios" in m:
            print("    scenarios: " + "; ".join(f"{'+'.join(have)} then add {new}" for have, new in m["scenarios"]))
        if "calibration" in m:
            c = m["calibration"]
            print(f"    calibration: {c['path']} ({c['chars']} chars, sha256 {c['sha256'][:16]}), llama-imatrix "
                  f"{' '.join(m['imatrix_args'])}: {m['imatrix_chunks']} chunks")
        for line in sharing(paths):
            print("   ", line)
        if args.ggufpacker and name in LADDER_SETS:
            r = ggufpacker_roundtrip(name)
            print(f"    ggufpacker {r['ggufpacker']}: pack {r['pack_bytes']:,} B of {r['input_bytes']:,} B in "
                  f"{r['pack_s']} s; plans " + ", ".join(f"{t} {f['plan']}" for t, f in r["files"].items())
                  + f"; every file unpacked bit-exact: {r['all_bit_exact']}")


if __name__ == "__main__":
    main()
