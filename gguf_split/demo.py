"""Demo models: a small llama-architecture base model and fine-tunes of it, made the way llama.cpp's
`llama-export-lora` makes them (a low-rank B·A added to chosen tensors, those written as F16, every other
tensor copied unchanged). `gguf-split demo` uses them to show a whole split needing no download; the tests
and benchmarks use the same builders.

The base model is a real llama.cpp model (SPM tokenizer with byte tokens, GQA attention, Q8_0 attention,
Q4_0 feed-forward, F32 norms, tied output head), small enough to build in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType
from gguf.quants import quantize

from .disk.progress import QUIET, Progress
from .errors import os_problem
from .format.gguf import GGUFFile, align_up, encode_kv, encode_prefix, encode_tensor_info, to_numpy

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like him into time has").split()


@dataclass(frozen=True)
class Dims:
    n_vocab: int = 3 + 256 + 61
    n_embd: int = 64
    n_layer: int = 4
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 256


def _vocab(d: Dims) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["\u2581" + w for w in WORDS]
    tokens += words[: d.n_vocab - len(tokens)]
    while len(tokens) < d.n_vocab:
        tokens.append(f"\u2581w{len(tokens)}")
    types = [2, 3, 3] + [6] * 256 + [1] * (d.n_vocab - 259)  # unknown, control, byte, normal
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(d.n_vocab - 259)]
    return tokens, scores, types


def add_tokenizer(w: GGUFWriter, d: Dims) -> None:
    """The small llama vocabulary's KVs (tokens, scores, types, special ids): enough for llama.cpp to load."""
    tokens, scores, types = _vocab(d)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def make_base_model(path: str | os.PathLike[str], *, dims: Dims = Dims(), seed: int = 0,
                    name: str = "gguf-split demo base", alignment: int | None = None) -> str:
    """Write a small llama model llama.cpp can load and run (random weights)."""
    d = dims
    rng = np.random.default_rng(seed)
    w = GGUFWriter(os.fspath(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name(name)
    w.add_context_length(d.n_ctx)
    w.add_embedding_length(d.n_embd)
    w.add_block_count(d.n_layer)
    w.add_feed_forward_length(d.n_ff)
    w.add_head_count(d.n_head)
    w.add_head_count_kv(d.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d.n_embd // d.n_head)
    w.add_vocab_size(d.n_vocab)
    w.add_file_type(7)  # mostly Q8_0
    add_tokenizer(w, d)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def weight(shape: tuple[int, ...], qtype: Q) -> tuple[np.ndarray, Q]:
        data = (rng.standard_normal(shape) * 0.08).astype(np.float32)
        return quantize(data, qtype), qtype

    def add(tname: str, shape: tuple[int, ...], qtype: Q) -> None:
        if qtype is Q.F32:
            w.add_tensor(tname, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            data, qt = weight(shape, qtype)
            w.add_tensor(tname, data, raw_dtype=qt)

    hd = d.n_embd // d.n_head
    add("token_embd.weight", (d.n_vocab, d.n_embd), Q.Q8_0)
    for i in range(d.n_layer):
        add(f"blk.{i}.attn_norm.weight", (d.n_embd,), Q.F32)
        add(f"blk.{i}.attn_q.weight", (d.n_embd, d.n_embd), Q.Q8_0)
        add(f"blk.{i}.attn_k.weight", (d.n_head_kv * hd, d.n_embd), Q.Q8_0)
        add(f"blk.{i}.attn_v.weight", (d.n_head_kv * hd, d.n_embd), Q.Q8_0)
        add(f"blk.{i}.attn_output.weight", (d.n_embd, d.n_embd), Q.Q8_0)
        add(f"blk.{i}.ffn_norm.weight", (d.n_embd,), Q.F32)
        add(f"blk.{i}.ffn_gate.weight", (d.n_ff, d.n_embd), Q.Q4_0)
        add(f"blk.{i}.ffn_up.weight", (d.n_ff, d.n_embd), Q.Q4_0)
        add(f"blk.{i}.ffn_down.weight", (d.n_embd, d.n_ff), Q.Q4_0)
    add("output_norm.weight", (d.n_embd,), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def lora_merge(w: np.ndarray, rng: np.random.Generator, rank: int = 8, alpha: float = 16.0) -> np.ndarray:
    """W + alpha/r · B·A with random A (r × n_in) and B (n_out × r), as export-lora merges an adapter."""
    n_out, n_in = w.shape[0], int(np.prod(w.shape[1:]))
    a = rng.standard_normal((rank, n_in)).astype(np.float32) / np.sqrt(n_in)
    b = rng.standard_normal((n_out, rank)).astype(np.float32) * 0.01
    merged: np.ndarray = (w.reshape(n_out, n_in) + (alpha / rank) * (b @ a)).reshape(w.shape)
    return merged


def make_finetune(src: str | os.PathLike[str], dst: str | os.PathLike[str], targets: Iterable[str], *,
                  seed: int = 1, rank: int = 8, untie_output: bool = False,
                  kv_overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Write `dst`: `src` with a random LoRA merged into each tensor in `targets` (written as F16, F32 stays
    F32, like llama-export-lora); every other tensor and KV copied unchanged. `untie_output` adds an
    `output.weight` (a fine-tuned copy of `token_embd.weight`) to a model with tied embeddings.
    String KVs in `kv_overrides` are replaced. Returns tensor name -> what was done."""
    rng = np.random.default_rng(seed)
    overrides = dict(kv_overrides or {})
    done: dict[str, str] = {}
    with GGUFFile(src) as f:
        h = f.header
        targets = set(targets)
        unknown = targets - set(h.tensor_by_name)
        if unknown:
            raise ValueError(f"{src}: no tensors {sorted(unknown)}")
        kv_raw = []
        for kv in h.kvs:
            if kv.key in overrides:
                kv_raw.append(encode_kv(kv.key, GGUFValueType.STRING, overrides.pop(kv.key)))
            else:
                kv_raw.append(f.raw(kv.start, kv.end))
        kv_raw += [encode_kv(k, GGUFValueType.STRING, v) for k, v in overrides.items()]

        plan: list[tuple[str, tuple[int, ...], int, Any]] = []  # name, shape, type, bytes-like
        for t in h.tensors:
            if t.name in targets:
                merged = lora_merge(to_numpy(f.tensor_view(t), t.ggml_type, t.shape), rng, rank)
                out_type = Q.F32 if t.ggml_type == Q.F32 else Q.F16
                data = merged.astype(np.float32 if out_type == Q.F32 else np.float16)
                plan.append((t.name, t.shape, out_type, data.tobytes()))
                done[t.name] = f"LoRA rank {rank} merged, {out_type.name}"
            else:
                plan.append((t.name, t.shape, t.ggml_type, f.tensor_view(t)))
        if untie_output and "output.weight" not in h.tensor_by_name:
            e = h.tensor_by_name["token_embd.weight"]
            merged = lora_merge(to_numpy(f.tensor_view(e), e.ggml_type, e.shape), rng, rank)
            plan.append(("output.weight", e.shape, Q.F16, merged.astype(np.float16).tobytes()))
            done["output.weight"] = "untied from token_embd.weight, F16"

        a = h.alignment
        offsets, pos = [], 0
        for _, shape, qt, data in plan:
            offsets.append(pos)
            pos = align_up(pos + len(data), a)
        infos = b"".join(encode_tensor_info(n, s, qt, o) for (n, s, qt, _), o in zip(plan, offsets))
        header = encode_prefix(h.version, len(plan), len(kv_raw)) + b"".join(kv_raw) + infos
        with open(dst, "wb") as out:
            out.write(header)
            out.write(bytes(align_up(len(header), a) - len(header)))
            for (_, _, _, data), o in zip(plan, offsets):
                out.write(data)
                out.write(bytes(align_up(len(data), a) - len(data)))
    return done


def layer_count(path: str | os.PathLike[str]) -> int:
    with GGUFFile(path) as f:
        return sum(1 for t in f.header.tensors if t.name.endswith(".attn_norm.weight"))


def make_demo_models(directory: str | os.PathLike[str], *, dims: Dims = Dims(), seed: int = 0) -> dict[str, str]:
    """base + three fine-tunes touching different tensor subsets (one adds an untied output.weight);
    `seed` gives the base model other weights (same tensors), as for another split."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    base = make_base_model(os.path.join(directory, "base.gguf"), dims=dims, seed=seed, name=_demo_model_name("base"))
    n = dims.n_layer
    chat = [f"blk.{i}.attn_{x}.weight" for i in range(n) for x in ("q", "v")]
    code = [f"blk.{i}.ffn_{x}.weight" for i in range(n // 2, n) for x in ("gate", "up", "down")]
    summarize = ["blk.0.attn_q.weight"]
    paths = {"base": base}
    for seed, (task, targets, untie) in enumerate((("chat", chat, False), ("code", code, False),
                                                   ("summarize", summarize, True)), start=1):
        p = os.path.join(directory, f"{task}.gguf")
        make_finetune(base, p, targets, seed=seed, untie_output=untie,
                      kv_overrides={"general.name": _demo_model_name(task)})
        paths[task] = p
    return paths


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


DEMO_FILE_COST = 0  # the demo's models are tiny: let every shared group get a file, to show the layout
DEMO_TASKS = ("base", "chat", "code", "summarize")  # the models make_demo_models writes, <task>.gguf
DEMO_SUBDIRS = ("models", "split", "restored")


def _demo_model_name(task: str) -> str:
    """general.name of the demo's model `task` (make_base_model's default and make_demo_models' overrides)."""
    return f"gguf-split demo {task}"


def _is_demo_model(path: str, task: str) -> bool:
    """A regular GGUF file whose general.name says it is the demo's model `task` (a model or its restore)."""
    from .errors import GGUFSplitError

    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        with GGUFFile(path) as f:
            return bool(f.get("general.name", expect=GGUFValueType.STRING) == _demo_model_name(task))
    except GGUFSplitError:
        return False


def _demo_split_files(directory: str) -> set[str]:
    """Names of the files in `directory` (DIR/split) that the demo made: the adaptors of its tasks (recognised
    by the model name they carry), the shared files they list, the llama.cpp links of its tasks, and
    gguf-split's own journal and temporaries. Raises if any adaptor there is not one of the demo's."""
    from .errors import GGUFSplitError
    from .format.names import JOURNAL, is_temp
    from .format.records import AdaptorInfo, SplitFile
    from .splitdir.directory import SplitDir

    try:
        sd = SplitDir.open(directory)
    except GGUFSplitError as e:
        raise GGUFSplitError(e.path, f"{e.problem}; the demo replaces only its own files") from None
    own = {JOURNAL}
    for task, path in sd.adaptors.items():
        name = sd.names.get(path, os.path.basename(path))
        try:
            with SplitFile(path) as f:
                ok = task in DEMO_TASKS and f.get("general.name") == _demo_model_name(task)
                listed = [r.name for r in AdaptorInfo.read(f).files] if ok else []
        except GGUFSplitError:
            ok = False
        if not ok:
            raise GGUFSplitError(path, f"is an adaptor (task {task!r}) not made by the demo, which replaces only its "
                                       "own files in split/: move it away or give the demo another directory")
        own.add(name)
        own.update(listed)
    for entry in os.listdir(directory):
        stem, sep, rest = entry.partition("-")
        if os.path.islink(os.path.join(directory, entry)) and stem in DEMO_TASKS and _is_link_tail(rest):
            own.add(entry)
        elif is_temp(entry):
            own.add(entry)
    return own


def _is_link_tail(rest: str) -> bool:
    """'00002-of-00005.gguf': the end of a llama.cpp link name (naming.link_name)."""
    import re

    return re.fullmatch(r"\d{5}-of-\d{5}\.gguf", rest) is not None


def _check_demo_directory(directory: str) -> None:
    """Refuse, in one line and before anything is written, when DIR/models, DIR/split or DIR/restored holds
    anything the demo did not make: the demo replaces its own files on a re-run and nothing else (a
    project's own models/ folder is never touched)."""
    from .errors import GGUFSplitError

    for sub in DEMO_SUBDIRS:
        path = os.path.join(directory, sub)
        if not os.path.lexists(path):
            continue
        if os.path.islink(path) or not os.path.isdir(path):
            raise GGUFSplitError(path, "exists and is not a directory (the demo uses this name)")
        try:
            entries = sorted(os.listdir(path))
        except OSError as e:
            raise GGUFSplitError(path, f"cannot list: {os_problem(e)}") from None
        if sub == "split":
            own = _demo_split_files(path)
        else:
            own = {f"{t}.gguf" for t in DEMO_TASKS if _is_demo_model(os.path.join(path, f"{t}.gguf"), t)}
        foreign = [e for e in entries if e not in own]
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise GGUFSplitError(os.path.join(path, foreign[0]),
                                 f"not made by the demo{more}, which replaces only its own files in {sub}/: move "
                                 "it away or give the demo another directory")


def _remove_demo_models(directory: str) -> None:
    """Delete the demo's own model files in `directory` (checked by _check_demo_directory), one by one."""
    for task in DEMO_TASKS:
        path = os.path.join(directory, f"{task}.gguf")
        if os.path.lexists(path):
            os.unlink(path)


def run_demo(directory: str | os.PathLike[str], progress: Progress = QUIET) -> dict[str, Any]:
    """Build the demo models in DIR/models, split them into DIR/split (with llama.cpp links), verify,
    restore each task into DIR/restored and compare sha256 with the original. A re-run replaces the
    demo's own files (recognised by what they hold: the demo models' names) and nothing else; anything
    else in those three directories is refused before anything is written."""
    from .disk.commit import check_space
    from .errors import GGUFSplitError
    from .splitdir.restore import restore
    from .assemble.split import split
    from .splitdir.verify import verify

    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise GGUFSplitError(directory, "exists and is not a directory: give the demo a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise GGUFSplitError(directory, f"cannot create directory: {os_problem(e)}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise GGUFSplitError(directory, "directory is not writable")
    check_space(directory, 8 << 20, "the demo")
    _check_demo_directory(directory)
    models_dir, restored_dir = os.path.join(directory, "models"), os.path.join(directory, "restored")
    try:
        for d in (models_dir, restored_dir):
            _remove_demo_models(d)
        models = make_demo_models(models_dir)
    except BaseException as e:
        try:
            _remove_demo_models(models_dir)  # a failed or interrupted build leaves no half-written model
        except OSError:
            pass
        if isinstance(e, OSError):
            raise GGUFSplitError(models_dir, f"cannot write the demo models: {os_problem(e)}") from None
        raise
    # force: DIR/split holds nothing but the demo's own split (checked above); the split replaces it atomically
    report = split(models, os.path.join(directory, "split"), force=True, link=True, file_cost=DEMO_FILE_COST,
                   progress=progress)
    checked = verify([report.directory], progress=progress)
    restored = {}
    os.makedirs(restored_dir, exist_ok=True)
    for t in report.tasks:
        r = restore(report.directory, restored_dir, task=t.task, progress=progress)
        restored[t.task] = sha256(r.output) == sha256(models[t.task])
    return {"split": report, "verify": checked, "restored_identical": restored}
