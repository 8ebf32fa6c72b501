"""The LoRA command: extract-lora (the lora layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .. import __version__
from ..errors import GGUFSplitError
from ..format.names import show
from .base import OPT_JSON, OPT_QUIET, app, progress, run_or_fail
from .render import out, print_json


@app.command("extract-lora")
def extract_lora_cmd(
    source: Path = typer.Argument(..., help="A split directory (then TASK), or the fine-tuned model file."),
    task: Optional[str] = typer.Argument(None, help="The task to extract, with a split directory."),
    base: str = typer.Option(..., "--base", help="The base: a task of the split, or a model file."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The LoRA GGUF to write (omit: report only)."),
    rank: str = typer.Option("auto", "--rank", help="'auto' (smallest rank within --threshold) or a fixed rank."),
    threshold: float = typer.Option(0.01, "--threshold", help="auto: relative error allowed per tensor (0.01)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Leave out (and list) tensors a LoRA cannot express instead of refusing."),
    alpha: float = typer.Option(1.0, "--alpha", help="adapter.lora.alpha to write (r/alpha is folded into A, B)."),
    f32: bool = typer.Option(False, "--f32", help="F32 factors (default F16)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    quiet: bool = OPT_QUIET,
    json_out: bool = OPT_JSON,
) -> None:
    """The difference between a task and a base as a llama.cpp LoRA adapter (GGUF)."""

    def run() -> Any:
        from ..lora.extract import extract_lora, extract_lora_from_files

        if rank != "auto" and not rank.isdigit():
            raise GGUFSplitError(None, f"--rank {rank!r}: 'auto' or a whole number")
        r: int | str = int(rank) if rank.isdigit() else "auto"
        kw: dict[str, Any] = dict(rank=r, threshold=threshold, allow_partial=allow_partial, alpha=alpha,
                                  dtype="F32" if f32 else "F16", progress=progress(quiet or json_out), force=force)
        try:
            if source.is_dir():
                if task is None:
                    raise GGUFSplitError(show(source), "is a split directory: name the TASK to extract")
                from ..runtime.loader import open_split

                with open_split(source) as s:
                    t, b = s.load(task), s.load(base)
                    try:
                        return extract_lora(t, b, output, **kw)
                    finally:
                        t.close()
                        b.close()
            if task is not None:
                raise GGUFSplitError(None, "a TASK is given with a split directory only; with model files: "
                                           "extract-lora TASK.gguf --base BASE.gguf")
            return extract_lora_from_files(source, base, output, **kw)
        except ValueError as e:
            raise GGUFSplitError(None, str(e)) from None

    report = run_or_fail(run)
    if json_out:
        from dataclasses import asdict

        print_json({"version": __version__, **asdict(report), "lora_bytes": report.lora_bytes,
                     "task_bytes": report.task_bytes, "partial": report.partial})
        return
    for line in report.lines():
        out.print(line)
