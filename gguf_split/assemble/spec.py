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
      threads: 2              # hashing and quantizing threads (default: all cores)
      quiet: false            # no progress bars
      quantize: null          # quantize full-precision inputs to this llama-quantize TYPE (Q4_K_M, ...)
      imatrix: null           # its importance matrix (llama-imatrix's GGUF or .dat file)
      quantize_template: null # a quantized model whose per-tensor types the quantized tasks take
      quantize_args: null     # more llama-quantize options ("--pure --output-tensor-type q8_0")
      allow_recipe_change: false  # add: quantize with another recipe than the split's

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

from ..errors import GGUFSplitError
from ..format.names import check_task_name
from .options import OPTIONS, SplitOptions

TOP_KEYS = {"output", "prefix", "tasks", "options"}
SPEC_OPTIONS = sorted(name for name in OPTIONS if name != "prefix")  # under `options:`; prefix is a top key


@dataclass
class Spec:
    """A checked spec: the tasks (name -> absolute path), the output directory, the options it sets."""

    tasks: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    options: SplitOptions = field(default_factory=SplitOptions)


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


def load_spec(path: str | os.PathLike[str], *, need_output: bool = True) -> Spec:
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


def parse_spec(data: Any, path: str, *, need_output: bool = True) -> Spec:
    """Validate an already-loaded spec; paths are resolved relative to the spec file's directory."""
    base = os.path.dirname(os.path.abspath(path))
    if not isinstance(data, dict):
        raise _fail(path, "", "a spec is a mapping with the keys tasks and output (see specs/example.yaml)")
    for key in data:
        if key not in TOP_KEYS:
            raise _fail(path, str(key), f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    return Spec(_tasks(data, path, base), _output(data, path, base, need_output), _options(data, path, base))


def _fail(path: str, key: str, problem: str) -> GGUFSplitError:
    return GGUFSplitError(path, f"{key}: {problem}" if key else problem)


def _tasks(data: dict[Any, Any], path: str, base: str) -> dict[str, str]:
    if "tasks" not in data:
        raise _fail(path, "tasks", "missing: map each task name to its GGUF file")
    tasks = data["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise _fail(path, "tasks", "must map at least one task name to a GGUF file")
    out: dict[str, str] = {}
    for name, file in tasks.items():
        if not isinstance(name, str):
            raise _fail(path, f"tasks.{name}", "task names are strings")
        try:
            check_task_name(name)
        except GGUFSplitError as e:
            raise _fail(path, f"tasks.{name}", e.problem) from None
        if not isinstance(file, str) or not file:
            raise _fail(path, f"tasks.{name}", "must be the path of a GGUF file")
        full = os.path.normpath(os.path.join(base, os.path.expanduser(file)))
        if not os.path.exists(full):
            raise _fail(path, f"tasks.{name}", f"file not found: {full}")
        if not os.path.isfile(full):
            raise _fail(path, f"tasks.{name}", f"not a file: {full}")
        out[name] = full
    return out


def _output(data: dict[Any, Any], path: str, base: str, need_output: bool) -> str | None:
    if "output" not in data:
        if need_output:
            raise _fail(path, "output", "missing: the directory to write the split into")
        return None
    if not isinstance(data["output"], str) or not data["output"]:
        raise _fail(path, "output", "must be a directory path")
    output = os.path.normpath(os.path.join(base, os.path.expanduser(data["output"])))
    if os.path.exists(output) and not os.path.isdir(output):
        raise _fail(path, "output", f"exists and is not a directory: {output}")
    return output


def _options(data: dict[Any, Any], path: str, base: str) -> SplitOptions:
    """`prefix:` and `options:`, checked by the options' one rule (options.check_value)."""
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise _fail(path, "options", "must be a mapping")
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in SPEC_OPTIONS:
            raise _fail(path, f"options.{key}", f"unknown option (known: {', '.join(SPEC_OPTIONS)})")
        if key in ("models_dir", "imatrix", "quantize_template") and isinstance(value, str) and value:
            value = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        values[key] = value
    if "prefix" in data:
        values["prefix"] = data["prefix"]
    return SplitOptions().merged(values, lambda name, problem: _fail(
        path, "prefix" if name == "prefix" else f"options.{name}", problem))
