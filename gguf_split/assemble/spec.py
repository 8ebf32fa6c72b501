"""Spec: a YAML split spec turned into validated options, before any model is opened.

    output: out/              # the split directory (relative to the spec file)
    prefix: ""                # optional file-name prefix for every file of the split
    tasks:                    # task name -> GGUF file (relative to the spec file); a sharded model by
      chat: models/chat.gguf  #   its first shard (name-00001-of-0000N.gguf)
      code: models/code.gguf
    options:                  # all optional
      force: false            # replace the split already in `output` (same tasks)
      link: false             # also make <task>-0000k-of-0000N.gguf links for llama.cpp
      models_dir: null        # also write llama-server's --models-dir directory there
      allow_unrelated: false  # split models with different architectures or no tensor in common
      max_shared_files: 32    # at most this many files per task besides its adaptor, holes included
      cut: role:6             # cut shared groups by tensor role and blocks of 6 layers (none: one file per group)
      file_cost: 1MiB         # a group of shared tensors gets a file only if it saves more than this
      max_shard_size: null    # cut any file larger than this (e.g. 20G) into several
      threads: 2              # hashing threads (default: all cores)
      quiet: false            # no progress bars

`gguf-split add DIR SPEC` reads the same file: its tasks are added; `output`, if given, must be DIR.
Every problem is one GGUFSplitError naming the spec file and the key, e.g.
`specs/x.yaml: tasks.chat: file not found: /data/chat.gguf`. Duplicate keys are errors (YAML itself would
silently keep the last one). Sizes are bytes or a number with K, M, G, T (powers of 1000, as
`llama-gguf-split --split-max-size` reads them) or KiB, MiB, GiB, TiB (powers of 1024).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

import re

from ..errors import GGUFSplitError
from ..format.names import check_task_name
from .plan import MIN_SHARD_SIZE, Cut

TOP_KEYS = {"output", "prefix", "tasks", "options"}
OPTION_TYPES: dict[str, type] = {"force": bool, "link": bool, "allow_unrelated": bool, "threads": int, "quiet": bool,
                                 "max_shared_files": int, "file_cost": str, "max_shard_size": str, "models_dir": str,
                                 "cut": str}
SIZE_MINIMUM = {"file_cost": 0, "max_shard_size": MIN_SHARD_SIZE}  # the size options and their smallest value
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: object) -> int:
    """'20G' -> 20_000_000_000, '1MiB' -> 1_048_576, 4096 -> 4096; ValueError otherwise."""
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


def parse_size_option(key: str, value: object) -> int:
    """A size option (`file_cost`, `max_shard_size`) from a spec or the command line: a size, at least the
    option's minimum (a shard under 1 MiB could not hold a part's header); ValueError saying so otherwise."""
    n = parse_size(value)
    low = SIZE_MINIMUM[key]
    if n < low:
        raise ValueError(f"{value!r} is {n:,} bytes, under the minimum of {low >> 20}MiB ({low:,} bytes)")
    return n


@dataclass
class SplitOptions:
    """Everything `split` needs; the CLI builds the same object from its flags."""

    tasks: dict[str, str] = field(default_factory=dict)  # name -> absolute path
    output: str | None = None
    prefix: str = ""
    force: bool = False
    link: bool = False
    allow_unrelated: bool = False
    threads: int | None = None
    quiet: bool = False
    max_shared_files: int | None = None
    file_cost: int | None = None
    max_shard_size: int | None = None
    models_dir: str | None = None
    cut: str | None = None  # None: the default (split) or the split's recorded cut (add)


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _type_name(t: type) -> str:
    return {bool: "true or false", int: "a whole number", str: "a string"}.get(t, t.__name__)


def load_spec(path: str | os.PathLike[str], *, need_output: bool = True) -> SplitOptions:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as e:
        raise GGUFSplitError(path, f"cannot read spec: {e.strerror}") from None
    except UnicodeDecodeError:
        raise GGUFSplitError(path, "spec is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise GGUFSplitError(path, f"invalid YAML{where}: {problem}") from None
    return parse_spec(data, path, need_output=need_output)


def parse_spec(data: Any, path: str, *, need_output: bool = True) -> SplitOptions:
    """Validate an already-loaded spec; paths are resolved relative to the spec file's directory."""
    def fail(key: str, problem: str) -> GGUFSplitError:
        return GGUFSplitError(path, f"{key}: {problem}" if key else problem)

    base = os.path.dirname(os.path.abspath(path))
    if not isinstance(data, dict):
        raise fail("", "a spec is a mapping with the keys tasks and output (see specs/example.yaml)")
    for key in data:
        if key not in TOP_KEYS:
            raise fail(str(key), f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    opts = SplitOptions()

    if "tasks" not in data:
        raise fail("tasks", "missing: map each task name to its GGUF file")
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise fail("tasks", "must map at least one task name to a GGUF file")
    for name, file in tasks.items():
        if not isinstance(name, str):
            raise fail(f"tasks.{name}", "task names are strings")
        try:
            check_task_name(name)
        except GGUFSplitError as e:
            raise fail(f"tasks.{name}", e.problem) from None
        if not isinstance(file, str) or not file:
            raise fail(f"tasks.{name}", "must be the path of a GGUF file")
        full = os.path.normpath(os.path.join(base, os.path.expanduser(file)))
        if not os.path.exists(full):
            raise fail(f"tasks.{name}", f"file not found: {full}")
        if not os.path.isfile(full):
            raise fail(f"tasks.{name}", f"not a file: {full}")
        opts.tasks[name] = full

    if "output" not in data:
        if need_output:
            raise fail("output", "missing: the directory to write the split into")
    else:
        if not isinstance(data["output"], str) or not data["output"]:
            raise fail("output", "must be a directory path")
        opts.output = os.path.normpath(os.path.join(base, os.path.expanduser(data["output"])))
        if os.path.exists(opts.output) and not os.path.isdir(opts.output):
            raise fail("output", f"exists and is not a directory: {opts.output}")

    if "prefix" in data:
        if not isinstance(data["prefix"], str):
            raise fail("prefix", "must be a string")
        opts.prefix = data["prefix"]

    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise fail("options", "must be a mapping")
    for key, value in options.items():
        want = OPTION_TYPES.get(key)
        if want is None:
            raise fail(f"options.{key}", f"unknown option (known: {', '.join(sorted(OPTION_TYPES))})")
        if value is None and key in ("max_shared_files", "max_shard_size", "models_dir", "threads"):
            continue
        if key in SIZE_MINIMUM:
            try:
                value = parse_size_option(key, value)
            except ValueError as e:
                raise fail(f"options.{key}", str(e)) from None
        elif type(value) is not want:  # bool is an int subclass: be exact
            raise fail(f"options.{key}", f"must be {_type_name(want)}, not {value!r}")
        elif key == "cut":
            try:
                value = str(Cut.parse(str(value)))
            except ValueError as e:
                raise fail(f"options.{key}", str(e)) from None
        if key in ("threads", "max_shared_files") and value < 1:
            raise fail(f"options.{key}", "must be at least 1")
        if key == "models_dir":
            value = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        setattr(opts, key, value)
    return opts
