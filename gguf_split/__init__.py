"""gguf-split: one shared foundation + small per-task adaptors for fine-tunes of one GGUF model.

Library entry points (the CLI is a thin layer over them):
- `split(tasks, output, ...)`: models -> foundation.gguf + adaptor-<task>.gguf (a llama.cpp two-file split);
- `restore(adaptor, output, ...)`: a task's original GGUF, byte for byte;
- `verify(foundation, adaptors)`: re-hash everything against the recorded digests;
- `Foundation.open(path).load(task)`: the runtime loader, a task's tensors as zero-copy views over one
  shared mapping of the foundation (`swap` changes task); `open_model(path)` for any GGUF file;
- `GGUFFile`: a lean, strict, mmap-backed GGUF reader.
Every problem with an input is raised as `GGUFSplitError` naming the file.
"""

from .errors import GGUFSplitError
from .gguf_format import GGUFFile
from .loader import Field, Foundation, Metadata, Model, TaskModel, Tensor, open_model
from .restore import restore, verify
from .split import SplitReport, split

__all__ = ["Field", "Foundation", "GGUFFile", "GGUFSplitError", "Metadata", "Model", "SplitReport", "TaskModel",
           "Tensor", "open_model", "restore", "split", "verify"]
__version__ = "0.1.0"
