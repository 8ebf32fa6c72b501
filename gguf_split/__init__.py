"""gguf-split: store a family of fine-tunes of one GGUF model with every distinct tensor once.

Library entry points (the CLI is a thin layer over them):
- `split(tasks, output, ...)`: models -> a split directory: per task `adaptor-<task>.gguf` (llama.cpp
  split 0) plus the shared files it loads (`foundation-<id>.gguf`, `shared-<id>.gguf`, ...);
- `add(split_dir, tasks)` / `remove(split_dir, names)`: grow or shrink a shipped split, never changing a
  shipped file;
- `restore(adaptor_or_dir, output, task=...)`: a task's original GGUF file(s), byte for byte;
- `verify(paths)`: re-hash everything against the recorded digests;
- `open_split(dir).load(task)`: the runtime loader, a task's tensors as zero-copy views over shared
  mappings (`swap` changes task); `open_model(path)` for any GGUF file;
- `GGUFFile`: a lean, strict, mmap-backed GGUF reader.
Every problem with an input is raised as `GGUFSplitError` naming the file.

Submodules are imported on first use (`gguf_split.split` pulls in numpy-free code only; the loader and
the demo import numpy and gguf's quants when used), so `import gguf_split` and `gguf-split --version`
stay fast. This module imports only standard modules the interpreter has loaded at start-up (not even
`typing`): the console script runs it before its entry point can install its signal handlers, and that
window is kept as short as possible (see `_main`).
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # mypy takes this name as true; at run time `typing` is not imported for it

__version__ = "0.2.0"

_LAZY = {
    "GGUFSplitError": ("errors", "GGUFSplitError"),
    "split": ("split", "split"),
    "SplitReport": ("split", "SplitReport"),
    "TaskReport": ("split", "TaskReport"),
    "FileReport": ("split", "FileReport"),
    "add": ("update", "add"),
    "remove": ("update", "remove"),
    "AddReport": ("update", "AddReport"),
    "RemoveReport": ("update", "RemoveReport"),
    "restore": ("restore", "restore"),
    "RestoreReport": ("restore", "RestoreReport"),
    "verify": ("verify", "verify"),
    "VerifyReport": ("verify", "VerifyReport"),
    "open_split": ("loader", "open_split"),
    "Split": ("loader", "Split"),
    "Foundation": ("loader", "Foundation"),
    "TaskModel": ("loader", "TaskModel"),
    "Model": ("model", "Model"),
    "Tensor": ("model", "Tensor"),
    "Field": ("model", "Field"),
    "Metadata": ("model", "Metadata"),
    "open_model": ("model", "open_model"),
    "GGUFFile": ("gguf_format", "GGUFFile"),
    "link_task": ("links", "link_task"),
    "write_models_dir": ("links", "write_models_dir"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    spec = _LAZY.get(name)
    if spec is None:
        raise AttributeError(f"module 'gguf_split' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{spec[0]}", __name__), spec[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """Three functions share their name with the submodule that defines them (`split`, `restore`,
    `verify`). Importing a submodule makes Python set it as an attribute of the package, which would hide
    the function; the package keeps the function instead (the submodule stays in sys.modules)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and _LAZY[name][0] == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from typing import Any

    from .errors import GGUFSplitError
    from .gguf_format import GGUFFile
    from .links import link_task, write_models_dir
    from .loader import Foundation, Split, TaskModel, open_split
    from .model import Field, Metadata, Model, Tensor, open_model
    from .restore import RestoreReport, restore
    from .split import FileReport, SplitReport, TaskReport, split
    from .update import AddReport, RemoveReport, add, remove
    from .verify import VerifyReport, verify
