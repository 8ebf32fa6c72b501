"""Options of `split` and `add`: one type that a spec parses, the command line fills and the API takes.

Why one type (mergekit's MergeOptions pattern): an option used to be defined in five places (the spec's
table, two CLI commands, two library signatures) with two merge rules, so `add` and `split` disagreed on
what a flag given as 0 meant. Here every option is declared once (`OPTIONS`: its keyword and spec key, its
flag, its kind, its default, its bounds) and checked by one rule (`check_value`), whoever gave it; the
caller only says where it came from, so the message names the spec key, the flag or the keyword.

Options come in layers: the defaults, then a spec (`prefix:` and `options:`), then the command line.
One merge rule (`SplitOptions.merged`): a layer sets what it names, a value that is not None; so a flag the
user did not give never undoes a spec key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import GGUFSplitError
from ..format.names import check_prefix
from .plan import DEFAULT_CUT, DEFAULT_FILE_COST, DEFAULT_MAX_SHARED_FILES, MIN_SHARD_SIZE, Cut

BOOL, COUNT, SIZE, PATH, TEXT = "bool", "count", "size", "path", "text"

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


@dataclass(frozen=True)
class Option:
    """One option: `name` is its keyword and its spec key (under `options:`, or at the top for `prefix`)."""

    name: str
    flag: str
    kind: str  # BOOL, COUNT (a whole number >= 1), SIZE (bytes, or a number with a unit), PATH, TEXT
    help: str
    minimum: int = 0  # SIZE: the smallest value accepted


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("prefix", "--prefix", TEXT, "File-name prefix for every file of the split."),
    Option("force", "--force", BOOL, "Replace the split already in the output directory."),
    Option("link", "--link", BOOL, "Make <task>-0000k-of-0000N.gguf links for llama.cpp."),
    Option("models_dir", "--models-dir", PATH, "Also write (or update) llama-server's models directory there."),
    Option("allow_unrelated", "--allow-unrelated", BOOL,
           "Split models of different architectures or with nothing in common."),
    Option("max_shared_files", "--max-shared-files", COUNT, "At most N files per task besides its adaptor, holes "
                                                            "included (default 32)."),
    Option("cut", "--cut", TEXT, "Cut shared groups into files by tensor role and blocks of N layers (role:N), by "
                                 "role (role), per tensor (tensor) or not (none): finer cuts let `add` reuse more of a "
                                 "fine-tune's unchanged tensors, at more files per task (default role:6; add: as the "
                                 "split was cut)."),
    Option("file_cost", "--file-cost", SIZE, "A group of shared tensors gets its own file only if it saves more "
                                             "bytes than this (default 1MiB)."),
    Option("max_shard_size", "--max-shard-size", SIZE, "Cut files larger than this (e.g. 20G) into several.",
           minimum=MIN_SHARD_SIZE),
    Option("threads", "--threads", COUNT, "Hashing and quantizing threads (default: all cores)."),
    Option("quiet", "--quiet", BOOL, "No progress bars or waiting messages."),
    Option("cache_dir", "--cache-dir", PATH, "Where per-file digests are kept (default: the user cache directory, "
                                             "e.g. ~/.cache/gguf-split); must be a local disk."),
    Option("no_cache", "--no-cache", BOOL, "Hash every input; read and write no digest cache."),
    Option("quantize", "--quantize", TEXT, "Quantize the full-precision inputs to this llama-quantize TYPE "
                                           "(Q4_K_M, Q8_0, ...) with one recipe, so what they share stays shared."),
    Option("imatrix", "--imatrix", PATH, "The importance matrix for --quantize (llama-imatrix's GGUF or .dat file)."),
    Option("quantize_template", "--quantize-template", PATH,
           "A quantized model whose per-tensor types the quantized tasks take (e.g. the base of export-lora "
           "merges)."),
    Option("quantize_args", "--quantize-args", TEXT,
           "More llama-quantize options, as it takes them: --pure, --leave-output-tensor, --allow-requantize, "
           "--output-tensor-type T, --token-embedding-type T, --include-weights S, --exclude-weights S."),
    Option("allow_recipe_change", "--allow-recipe-change", BOOL,
           "add: quantize with another recipe than the split's tasks were quantized with."),
)}


def parse_size(text: object) -> int:
    """'20G' -> 20_000_000_000, '1MiB' -> 1_048_576, 4096 -> 4096; ValueError otherwise. K, M, G, T are powers
    of 1000, as `llama-gguf-split --split-max-size` reads them; KiB, MiB, GiB, TiB powers of 1024."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m[2].upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use bytes or a number with K, M, G, T, KiB, MiB, GiB, TiB)")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def check_value(name: str, value: Any) -> Any:
    """The checked value of option `name` (sizes parsed, paths made str). None stays None (not given).
    TypeError for a value of the wrong type, ValueError for one out of range; the message says what is
    allowed, without naming the option (the caller names it the way the user gave it)."""
    opt = OPTIONS.get(name)
    if opt is None:
        raise TypeError(f"unknown option {name!r} (known: {', '.join(OPTIONS)})")
    if value is None:
        return None
    if opt.kind == BOOL:
        if type(value) is not bool:
            raise TypeError(f"must be true or false, not {value!r}")
        return value
    if opt.kind == COUNT:
        if type(value) is not int:
            raise TypeError(f"must be a whole number, not {value!r}")
        if value < 1:
            raise ValueError(f"must be at least 1, not {value}")
        return value
    if opt.kind == SIZE:
        n = parse_size(value)
        if n < opt.minimum:
            raise ValueError(f"{value!r} is {n:,} bytes, under the minimum of {opt.minimum >> 20}MiB "
                             f"({opt.minimum:,} bytes)")
        return n
    if opt.kind == PATH:
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise TypeError(f"must be a path, not {value!r}")
        return os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {value!r}")
    if name in ("quantize", "quantize_args"):
        return _check_quantize(name, value)
    if name == "prefix":
        try:
            check_prefix(value)
        except GGUFSplitError as e:
            raise ValueError(e.problem) from None
    if name == "cut":
        return str(Cut.parse(value))  # ValueError saying what a cut is
    return value


def _check_quantize(name: str, value: str) -> str:
    """A TYPE llama-quantize knows (canonical: q4_k -> Q4_K_M), or llama-quantize options gguf-split passes on
    (the recipe module is imported only when one is given: it pulls in numpy)."""
    from .quantize.recipe import parse_quant_type, parse_quantize_args

    if name == "quantize":
        try:
            return parse_quant_type(value)[0]
        except GGUFSplitError as e:
            raise ValueError(e.problem) from None
    parse_quantize_args(value)
    return value


@dataclass(frozen=True)
class SplitOptions:
    """Every option of `split` and `add`, with its default. Build it with `SplitOptions().merged(...)`."""

    prefix: str = ""
    force: bool = False
    link: bool = False
    models_dir: str | None = None
    allow_unrelated: bool = False
    max_shared_files: int | None = DEFAULT_MAX_SHARED_FILES  # every file besides the adaptor, holes included
    cut: str | None = None  # None: split cuts DEFAULT_CUT, add as the split's records say it was cut
    file_cost: int = DEFAULT_FILE_COST
    max_shard_size: int | None = None
    threads: int | None = None
    quiet: bool = False
    cache_dir: str | None = None  # the manifest cache (disk.manifest_cache); None: the user cache directory
    no_cache: bool = False
    quantize: str | None = None
    imatrix: str | None = None
    quantize_template: str | None = None
    quantize_args: str | None = None
    allow_recipe_change: bool = False

    def merged(self, values: Mapping[str, Any],
               blame: Callable[[str, str], GGUFSplitError] | None = None) -> "SplitOptions":
        """A copy with each value of `values` that is not None, checked. Errors are TypeError/ValueError (a
        library caller's mistake); with `blame`, the GGUFSplitError `blame(name, problem)` makes, naming the
        value the way the user gave it (a spec key, a flag)."""
        changes: dict[str, Any] = {}
        for name, value in values.items():
            try:
                checked = check_value(name, value)
            except (TypeError, ValueError) as e:
                if blame is None:
                    raise type(e)(f"{name}: {e}") from None
                raise blame(name, str(e)) from None
            if checked is not None:
                changes[name] = checked
        return dataclasses.replace(self, **changes)

    def given(self) -> dict[str, Any]:
        """The options that differ from the defaults (for reports and records)."""
        default = SplitOptions()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


def flag_of(name: str) -> str:
    return OPTIONS[name].flag


def cut_of(opts: SplitOptions) -> Cut:
    """The cut `split` makes with these options (an `add` without a cut given follows the split's records)."""
    return DEFAULT_CUT if opts.cut is None else Cut.parse(opts.cut)
