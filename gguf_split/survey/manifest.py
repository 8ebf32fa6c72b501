"""Scanning one file for a survey: its manifest (disk.manifest), whatever kind of file it is.

`scan_file` is a plain function of the path so that a Dask worker runs it as is (survey.cluster): a GGUF
file is checked and hashed in one sweep (its tensors and the whole file), a file gguf-split wrote gives
its header facts only (it is no model), a pack its index.
"""

from __future__ import annotations

import os
import threading
import time

from ..disk.manifest import OWN_FILE, PACK, FileKey, FileManifest, header_facts, manifest_of
from ..disk.progress import NO_BAR, Reporter
from ..disk.sweep import sweep_file
from ..errors import GGUFSplitError, os_problem
from ..format.gguf import GGUFFile

PACK_MAGIC = b"GGUFPACK"

def scan_file(path: str, bar: Reporter = NO_BAR, cancel: threading.Event | None = None) -> FileManifest:
    """Open, check and hash one file: a GGUF file (its tensors and the whole file in one sweep), a file of
    gguf-split's (header facts only: it is no model) or a pack (its index). A problem is one
    GGUFSplitError naming the file; a file that changes while it is read is refused (its digests would
    describe no version of it)."""
    recorded_ns = time.time_ns()  # before the first stat: the racy-clean rule must be conservative
    if _starts_with(path, PACK_MAGIC):
        return _scan_pack(path, recorded_ns)
    with GGUFFile(path) as f:
        before = FileKey.of(os.fstat(f.fd))
        facts = header_facts(f)
        if "role" in facts:
            return FileManifest(f.path, before, OWN_FILE, recorded_ns, facts=facts)
        d = sweep_file(f, bar=bar, cancel=cancel)
        after = FileKey.of(os.fstat(f.fd))
        if after != before:
            raise GGUFSplitError(f.path, "changed while it was being hashed; scan it again")
        return manifest_of(f, before, recorded_ns, d.xxh3, d.tensors)


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError as e:
        raise GGUFSplitError(path, f"cannot open: {os_problem(e)}") from None
    except ValueError:
        raise GGUFSplitError(path, "cannot open: the path holds a NUL byte") from None


def _scan_pack(path: str, recorded_ns: int) -> FileManifest:
    from ..pack.reader import read_index

    st = os.stat(path)
    index = read_index(path)
    meta = index.meta if isinstance(index.meta, dict) else {}
    tasks = meta.get("tasks")
    facts = {"pack_kind": index.kind if isinstance(index.kind, str) else "?", "files": len(index.files),
             "tasks": sorted(tasks) if isinstance(tasks, dict) else []}
    return FileManifest(path, FileKey.of(st), PACK, recorded_ns, facts=facts)
