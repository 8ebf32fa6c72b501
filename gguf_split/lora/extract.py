"""Extraction: a fine-tune's difference from its base as a llama.cpp LoRA adapter, and a report that
accounts for every tensor.

    report = extract_lora(open_model("chat.gguf"), open_model("base.gguf"), "chat-lora.gguf")
    print("\\n".join(report.lines()))

Why a module of its own: it is the one place that decides, tensor by tensor, what a LoRA can hold. The
steps, each a function: check the options and the output (before any work: an existing output is refused
unless force); triage every tensor of either model (identical, equal in value, not expressible, or a change
to factor); factor each change (math.fit: D = task − base in float32 against the dequantized base, a
truncated SVD, the rank fixed or chosen by the auto rule); hand the factors to the writer (write.py).

Tensors a LoRA cannot express are listed and refused (GGUFSplitError naming the task) unless
allow_partial=True, in which case they are left out and listed in the report: a tensor in one model only
(an untied `output.weight`, llama.cpp issue #9065), a changed shape, 1-D tensors (norms, biases: llama.cpp's
LoRA has no vector deltas), tensors of more than 2 dimensions, integer tensors, and `token_embd.weight` of a
base with a tied output head (llama.cpp would apply it to the output matmul in the flipped layout and
abort). The error reported per tensor is recomputed from the factors as written (after their F16
rounding), relative to ‖D‖_F, next to the rounding floor N/‖D‖_F of the task tensor's own storage.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import GGUFValueType

from ..disk.progress import QUIET, Progress
from ..errors import GGUFSplitError
from ..format.gguf import ARCHITECTURE_KEY, type_name
from ..format.model import Field
from .adapter import INT_TYPES, SUFFIX_A, SUFFIX_B, base_digest
from .math import OUTPUT, fit, is_token_embd, rounding_energy, square_norm
from .write import AdapterHeader, Factor, check_output, write_adapter

__all__ = ["DEFAULT_ALPHA", "DEFAULT_THRESHOLD", "LoraReport", "Refused", "TensorLora", "extract_lora",
           "extract_lora_from_files"]

DEFAULT_THRESHOLD = 0.01
DEFAULT_ALPHA = 1.0
_OUT_TYPES = {"F16": (Q.F16, np.float16), "F32": (Q.F32, np.float32)}


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class TensorLora:
    """One tensor of an extracted LoRA."""

    name: str
    shape: tuple[int, ...]  # the model tensor's ne
    rank: int
    rel_error: float  # ‖D − scale·B·A‖_F / ‖D‖_F, recomputed from the factors as written
    floor: float  # N / ‖D‖_F: the task tensor's own storage rounding, relative to the change
    change: float  # ‖D‖_F / ‖task tensor‖_F: how big the fine-tune's change is
    lora_bytes: int
    task_bytes: int  # the task tensor's own bytes
    method: str  # "svd" or "randomized svd (k=...)"
    bound: float | None  # the auto rule's bound on rel_error, √(τ² + floor²); None for a fixed rank

    @property
    def within(self) -> bool:
        """The error meets the auto rule's bound (fixed ranks: always True)."""
        return self.bound is None or self.rel_error <= self.bound * 1.0005


@dataclass(frozen=True)
class Refused:
    name: str
    reason: str
    task_bytes: int  # 0 when the task lacks the tensor


@dataclass
class LoraReport:
    output: str | None
    alpha: float
    dtype: str
    rank_rule: str  # "auto" or the fixed rank
    threshold: float
    tensors: list[TensorLora] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)  # left out (allow_partial) — never silently
    identical: int = 0  # tensors equal in both models (no delta)
    same_values: list[str] = field(default_factory=list)  # different bytes/type, equal values
    file_bytes: int = 0

    @property
    def lora_bytes(self) -> int:
        return sum(t.lora_bytes for t in self.tensors)

    @property
    def task_bytes(self) -> int:
        """The task's own tensors: every tensor that differs from the base (LoRA'd or refused)."""
        return sum(t.task_bytes for t in self.tensors) + sum(r.task_bytes for r in self.refused)

    @property
    def partial(self) -> bool:
        return bool(self.refused)

    def lines(self) -> list[str]:
        rule = (f"rank auto (relative error ≤ {self.threshold:g} beyond the storage rounding)"
                if self.rank_rule == "auto" else f"rank {self.rank_rule}")
        out = [f"LoRA {self.output or '(not written)'}: {len(self.tensors)} tensors, {rule}, alpha {self.alpha:g}, "
               f"{self.dtype} factors"]
        width = max((len(t.name) for t in self.tensors), default=10)
        for t in self.tensors:
            out.append(f"  {t.name:<{width}}  rank {t.rank:>4}  rel.error {t.rel_error:.2e} (floor {t.floor:.1e})  "
                       f"change {t.change:.1e}  {_size(t.lora_bytes):>9} vs {_size(t.task_bytes):>9}")
        for r in self.refused:
            out.append(f"  {r.name:<{width}}  LEFT OUT: {r.reason}")
        if self.same_values:
            out.append(f"  {len(self.same_values)} tensor(s) differ in bytes but not in value (no delta): "
                       + ", ".join(self.same_values))
        out.append(f"  {self.identical} tensor(s) identical to the base")
        total = f"total {_size(self.lora_bytes)} of factors ({_size(self.file_bytes)} file) vs " \
                f"{_size(self.task_bytes)} of the task's own tensors"
        if self.task_bytes:
            total += f" ({self.lora_bytes / self.task_bytes:.1%})"
        out.append(total)
        if self.refused:
            out.append(f"PARTIAL: {len(self.refused)} changed tensor(s) are not in the LoRA; served over the base it "
                       f"is not the task")
        return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ---------------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class _Options:
    rank: int | str  # "auto" or a fixed rank
    threshold: float
    alpha: float
    dtype: str  # "F16" or "F32"

    @classmethod
    def checked(cls, rank: int | str, threshold: float, alpha: float, dtype: str) -> "_Options":
        """The options, or ValueError naming the wrong one."""
        if rank != "auto" and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
            raise ValueError(f"rank must be 'auto' or a positive int, not {rank!r}")
        if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"threshold must be in (0, 1), not {threshold!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha != 0):
            raise ValueError(f"alpha must be a finite nonzero number, not {alpha!r} (0 would mean no alpha/r scaling)")
        if float(np.float32(alpha)) != float(alpha) or not math.isfinite(float(np.float32(alpha))):
            raise ValueError(f"alpha {alpha!r} is not exact in float32 (llama.cpp stores it as F32)")
        if dtype not in _OUT_TYPES:
            raise ValueError(f"dtype must be 'F16' or 'F32', not {dtype!r}")
        return cls(rank, float(threshold), float(alpha), dtype)

    @property
    def ggml_type(self) -> Q:
        return _OUT_TYPES[self.dtype][0]

    @property
    def np_dtype(self) -> type:
        return _OUT_TYPES[self.dtype][1]

    @property
    def rank_rule(self) -> str:
        """As the adapter records it (`gguf_split.lora.rank_rule`)."""
        return f"auto threshold={self.threshold:g}" if self.rank == "auto" else f"fixed {self.rank}"


# ---------------------------------------------------------------------------------------------------------
# Extraction


def extract_lora(task: Any, base: Any, out_path: str | os.PathLike[str] | None, *,
                 rank: int | str = "auto", threshold: float = DEFAULT_THRESHOLD, allow_partial: bool = False,
                 alpha: float = DEFAULT_ALPHA, dtype: str = "F16", progress: Progress = QUIET,
                 name: str | None = None, force: bool = False) -> LoraReport:
    """Write `task` − `base` as a llama.cpp LoRA GGUF at `out_path` (None: compute the report only), as a
    gguf-split commit (write.py): an existing file is replaced only with `force`. `task` and `base` are
    models (`.metadata`, `.tensors`): `open_model(...)` or a split's task.

    rank: "auto" (math.py's rule, with `threshold` τ) or a fixed int. alpha: written as `adapter.lora.alpha`
    (nonzero; r/alpha is folded into each tensor's factors). dtype: "F16" or "F32" factors. Tensors a LoRA
    cannot express raise GGUFSplitError naming the task unless allow_partial=True (then they are listed in
    report.refused). Identical tensors are skipped. A wrong option is a ValueError."""
    opts = _Options.checked(rank, threshold, alpha, dtype)
    task_path, inputs = _path_of(task), (_path_of(task), _path_of(base))
    if out_path is not None:
        check_output(out_path, force=force, inputs=inputs)
    arch = _architecture(task, base, task_path)
    report = LoraReport(None, opts.alpha, opts.dtype, "auto" if opts.rank == "auto" else str(opts.rank),
                        opts.threshold)
    todo = _triage(task.tensors, base.tensors, report)
    if report.refused and not allow_partial:
        listed = "; ".join(f"{r.name}: {r.reason}" for r in report.refused)
        raise GGUFSplitError(task_path, f"{len(report.refused)} changed tensor(s) cannot be expressed as a LoRA "
                                        f"(use --allow-partial to leave them out): {listed}")
    factors = _extract_all(todo, task, base, opts, report, progress)
    if out_path is not None:
        if not factors:
            raise GGUFSplitError(task_path, "no tensor differs from the base in a way a LoRA can hold: nothing to write")
        header = AdapterHeader(arch, _default_name(task, base) if name is None else name, opts.alpha,
                               opts.rank_rule, base_digest(base.tensors, [t.name for t in report.tensors]),
                               _hyperparameters(task.metadata, arch))
        report.file_bytes = write_adapter(out_path, header, factors, opts.ggml_type, force=force, inputs=inputs,
                                          progress=progress)
        report.output = os.fspath(out_path)
    return report


def extract_lora_from_files(task_path: str | os.PathLike[str], base_path: str | os.PathLike[str],
                            out_path: str | os.PathLike[str] | None, **kwargs: Any) -> LoraReport:
    """extract_lora on two plain GGUF model files."""
    from ..format.model import open_model

    with open_model(task_path) as task, open_model(base_path) as base:
        return extract_lora(task, base, out_path, **kwargs)


def _path_of(model: Any) -> str | None:
    for attr in ("path", "adaptor_path"):
        p = getattr(model, attr, None)
        if isinstance(p, (str, os.PathLike)):
            return os.fspath(p)
    return None


def _architecture(task: Any, base: Any, task_path: str | None) -> str:
    """The task's architecture, which must be the base's."""
    arch = task.metadata.get(ARCHITECTURE_KEY)
    base_arch = base.metadata.get(ARCHITECTURE_KEY)
    if not isinstance(arch, str):
        raise GGUFSplitError(task_path, "has no general.architecture")
    if arch != base_arch:
        raise GGUFSplitError(task_path, f"architecture {arch!r}, the base is {base_arch!r}: not a fine-tune of it")
    return arch


# ---------------------------------------------------------------------------------------------------------
# Triage: which tensors are a change a LoRA can hold


def _triage(tt: Mapping[str, Any], bt: Mapping[str, Any], report: LoraReport) -> list[str]:
    """Sort every tensor of either model into the report (identical, equal in value, refused) and return
    the names of the changes to factor, in the task's order."""
    todo: list[str] = []
    for n in list(tt) + [n for n in bt if n not in tt]:
        t, b = tt.get(n), bt.get(n)
        if t is not None and b is not None and _bytes_equal(t, b):
            report.identical += 1
        elif t is not None and b is not None and tuple(t.shape) == tuple(b.shape) and _values_equal(t, b):
            report.same_values.append(n)
        else:
            why = _why_not(n, t, b, bt)
            if why is None:
                todo.append(n)
            else:
                report.refused.append(Refused(n, why, t.nbytes if t is not None else 0))
    return todo


def _why_not(name: str, t: Any, b: Any, base_tensors: Mapping[str, Any]) -> str | None:
    """Why a changed tensor cannot be a LoRA target, or None."""
    if b is None:
        what = " (an untied output head: llama.cpp issue #9065)" if name == OUTPUT else ""
        return f"exists in the task only{what}; a LoRA can only change tensors the base has"
    if t is None:
        return "exists in the base only; a LoRA cannot remove a tensor"
    if tuple(t.shape) != tuple(b.shape):
        return f"shape changed: base ne {list(b.shape)}, task ne {list(t.shape)}"
    if t.ggml_type in INT_TYPES or b.ggml_type in INT_TYPES:
        return "integer tensor"
    if len(t.shape) == 1:
        return "a vector (norm or bias): llama.cpp's LoRA has no vector deltas (its loader skips *_norm.weight)"
    if len(t.shape) > 2:
        return f"{len(t.shape)}-D tensor: per-expert LoRAs are not supported here"
    if is_token_embd(name) and OUTPUT not in base_tensors:
        return ("the base ties its output head to token_embd (no output.weight): llama.cpp would apply a token_embd "
                "LoRA to the output matmul in the flipped layout and abort")
    return None


def _bytes_equal(t: Any, b: Any) -> bool:
    if t.ggml_type != b.ggml_type or tuple(t.shape) != tuple(b.shape) or len(t.data) != len(b.data):
        return False
    return bool(np.array_equal(np.frombuffer(t.data, np.uint8), np.frombuffer(b.data, np.uint8)))


def _values_equal(t: Any, b: Any) -> bool:
    if t.ggml_type == b.ggml_type:
        return False  # bytes differ (checked before) and the type is the same: values differ
    try:
        return bool(np.array_equal(t.to_numpy(), b.to_numpy()))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------------------
# Factoring the changes


@dataclass(frozen=True)
class _Extracted:
    summary: TensorLora
    a: Factor
    b: Factor


def _extract_all(todo: list[str], task: Any, base: Any, opts: _Options, report: LoraReport,
                 progress: Progress) -> list[Factor]:
    """Factor each change in `todo` (into the report) and return the adapter's tensors, A and B per target."""
    tt, bt = task.tensors, base.tensors
    factors: list[Factor] = []
    with progress.bar("extract", sum(tt[n].nbytes for n in todo)) as bar:
        for n in todo:
            got = _extract_one(n, tt[n], bt[n], opts, _path_of(task), _path_of(base))
            if got is None:
                report.same_values.append(n)  # the dequantized values are equal after all
            else:
                report.tensors.append(got.summary)
                factors += (got.a, got.b)
            bar.advance(tt[n].nbytes)
    return factors


def _extract_one(n: str, t: Any, b: Any, opts: _Options, task_path: str | None,
                 base_path: str | None) -> _Extracted | None:
    """One tensor's LoRA pair and its line of the report; None when the change is zero in float32."""
    tn = _dequantized(t, task_path)  # numpy order (n_out, n_in); token_embd (n_vocab, n_embd)
    d = np.ascontiguousarray(tn - _dequantized(b, base_path), dtype=np.float32)
    total = square_norm(d)
    if total == 0.0:
        return None
    if not math.isfinite(total):
        raise GGUFSplitError(task_path, f"{n}: the change from the base is not finite (NaN or infinite values): "
                                        f"no LoRA can hold it")
    floor2 = rounding_energy(t.ggml_type, t.data)
    bound2 = opts.threshold ** 2 * total + floor2
    try:
        f = fit(d, n, rank=opts.rank, bound2=bound2, total=total, alpha=opts.alpha, dtype=opts.np_dtype)
    except OverflowError as e:
        raise GGUFSplitError(task_path, str(e)) from None
    if is_token_embd(n):
        ne_a, ne_b = (f.rank, d.shape[0]), (f.rank, d.shape[1])
    else:
        ne_a, ne_b = (d.shape[1], f.rank), (f.rank, d.shape[0])
    summary = TensorLora(n, tuple(t.shape), f.rank, math.sqrt(f.error2 / total), math.sqrt(floor2 / total),
                         math.sqrt(total / max(square_norm(tn), 1e-300)), f.a.nbytes + f.b.nbytes, t.nbytes, f.method,
                         math.sqrt(bound2 / total) if opts.rank == "auto" else None)
    return _Extracted(summary, Factor(n + SUFFIX_A, ne_a, f.a), Factor(n + SUFFIX_B, ne_b, f.b))


def _dequantized(t: Any, path: str | None) -> np.ndarray:
    try:
        out: np.ndarray = t.to_numpy()
        return out
    except (NotImplementedError, ValueError, KeyError) as e:
        raise GGUFSplitError(path, f"{t.name}: cannot dequantize ggml type {type_name(t.ggml_type)}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# What the adapter's header says


def _default_name(task: Any, base: Any) -> str:
    return f"LoRA: {task.metadata.get('general.name', 'task')} over {base.metadata.get('general.name', 'base')}"


def _hyperparameters(md: Any, arch: str) -> list[Field]:
    """The task's `<arch>.*` KVs, with their GGUF types (llama.cpp ignores them in an adapter; they
    document what the LoRA was made for). Nested arrays and metadata without types are left out."""
    if not hasattr(md, "field"):
        return []
    out = []
    for key in md:
        if key.startswith(arch + "."):
            fld = md.field(key)
            if not (fld.type is GGUFValueType.ARRAY and fld.subtype is GGUFValueType.ARRAY):
                out.append(fld)
    return out
