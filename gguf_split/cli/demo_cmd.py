"""The demo command: build, split, verify and restore small models, no download needed."""

from __future__ import annotations

from pathlib import Path

import typer

from .base import OPT_QUIET, app, fail, progress, run_or_fail
from .render import out, print_split


@app.command("demo")
def demo_cmd(
    directory: Path = typer.Argument(Path("gguf-split-demo"), help="Where to build the demo (its own files are "
                                                                   "replaced on re-run)."),
    quiet: bool = OPT_QUIET,
) -> None:
    """Build a small base model and three fine-tunes, split, verify, restore, and show the savings."""
    from ..demo import run_demo

    result = run_or_fail(lambda: run_demo(directory, progress(quiet)))
    print_split(result["split"])
    v = result["verify"]
    out.print(f"verify: {len(v.tasks)} tasks, {v.files} files, {v.tensors} tensors match their recorded digests")
    for task, same in result["restored_identical"].items():
        out.print(f"restore {task}: {'byte-identical to the original (sha256)' if same else 'DIFFERS'}")
    if not all(result["restored_identical"].values()):
        fail("a restored model differs from its original", 1)
