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

TYPE_CHECKING = False  # mypy takes this name as true; at run time `typing` is not imported for it

__version__ = "0.2.0"

_LAZY = {
    "GGUFSplitError": ("errors", "GGUFSplitError"),
    "SplitOptions": ("assemble.options", "SplitOptions"),
    "split": ("assemble.split", "split"),
    "SplitReport": ("assemble.report", "SplitReport"),
    "TaskReport": ("assemble.report", "TaskReport"),
    "FileReport": ("assemble.report", "FileReport"),
    "QuantizeReport": ("assemble.report", "QuantizeReport"),
    "QuantizedTask": ("assemble.report", "QuantizedTask"),
    "add": ("assemble.update", "add"),
    "remove": ("assemble.update", "remove"),
    "AddReport": ("assemble.report", "AddReport"),
    "RemoveReport": ("assemble.report", "RemoveReport"),
    "restore": ("splitdir.restore", "restore"),
    "RestoreReport": ("splitdir.restore", "RestoreReport"),
    "verify": ("splitdir.verify", "verify"),
    "VerifyReport": ("splitdir.verify", "VerifyReport"),
    "open_split": ("runtime.loader", "open_split"),
    "Split": ("runtime.loader", "Split"),
    "Foundation": ("runtime.loader", "Foundation"),
    "TaskModel": ("runtime.loader", "TaskModel"),
    "Model": ("format.model", "Model"),
    "Tensor": ("format.model", "Tensor"),
    "Field": ("format.model", "Field"),
    "Metadata": ("format.model", "Metadata"),
    "open_model": ("format.model", "open_model"),
    "GGUFFile": ("format.gguf", "GGUFFile"),
    "link_task": ("splitdir.links", "link_task"),
    "write_models_dir": ("splitdir.links", "write_models_dir"),
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


if TYPE_CHECKING:
    from typing import Any

    from .assemble.options import SplitOptions
    from .assemble.report import (
        AddReport,
        FileReport,
        QuantizedTask,
        QuantizeReport,
        RemoveReport,
        SplitReport,
        TaskReport,
    )
    from .assemble.split import split
    from .assemble.update import add, remove
    from .errors import GGUFSplitError
    from .format.gguf import GGUFFile
    from .format.model import Field, Metadata, Model, Tensor, open_model
    from .runtime.loader import Foundation, Split, TaskModel, open_split
    from .splitdir.links import link_task, write_models_dir
    from .splitdir.restore import RestoreReport, restore
    from .splitdir.verify import VerifyReport, verify
