"""gguf-split: one shared foundation + small per-task adaptors for fine-tunes of one GGUF model.

Library entry points (the CLI is a thin layer over them):
- `split(tasks, output, ...)`: models -> foundation.gguf + adaptor-<task>.gguf (a llama.cpp two-file split);
- `restore(adaptor, output, ...)`: a task's original GGUF, byte for byte;
- `verify(foundation, adaptors)`: re-hash everything against the recorded digests;
- `GGUFFile`: a lean, strict, mmap-backed GGUF reader.
Every problem with an input is raised as `GGUFSplitError` naming the file.
"""

from .errors import GGUFSplitError
from .gguf_format import GGUFFile
from .restore import restore, verify
from .split import SplitReport, split

__all__ = ["GGUFFile", "GGUFSplitError", "SplitReport", "restore", "split", "verify"]
__version__ = "0.1.0"
