"""Spec: a YAML split spec turned into validated options, before any model is opened.

    output: out/              # directory for foundation.gguf and adaptor-<task>.gguf (relative to the spec)
    prefix: ""                # optional file-name prefix: <prefix>foundation.gguf, <prefix>adaptor-<task>.gguf
    tasks:                    # task name -> GGUF file (relative to the spec file)
      chat: models/chat.gguf
      code: models/code.gguf
    options:                  # all optional
      force: false            # overwrite existing outputs
      link: false             # also make <task>-00001-of-00002.gguf / -00002-of-00002.gguf links for llama.cpp
      allow_unrelated: false  # split models with different architectures or no tensor in common
      threads: 2              # hashing threads (default: all cores)
      quiet: false            # no progress bars

Every problem is one GGUFSplitError naming the spec file and the key, e.g.
`specs/x.yaml: tasks.chat: file not found: /data/chat.gguf`. Duplicate keys are errors (YAML itself would
silently keep the last one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import GGUFSplitError
from .split import check_task_name

TOP_KEYS = {"output", "prefix", "tasks", "options"}
OPTION_TYPES: dict[str, type] = {"force": bool, "link": bool, "allow_unrelated": bool, "threads": int, "quiet": bool}


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


def load_spec(path: str | os.PathLike[str]) -> SplitOptions:
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
    return parse_spec(data, path)


def parse_spec(data: Any, path: str) -> SplitOptions:
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
        raise fail("output", "missing: the directory to write the split into")
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
        if type(value) is not want:  # bool is an int subclass: be exact
            raise fail(f"options.{key}", f"must be {_type_name(want)}, not {value!r}")
        if key == "threads" and value < 1:
            raise fail("options.threads", "must be at least 1")
        setattr(opts, key, value)
    return opts
