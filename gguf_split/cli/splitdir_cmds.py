"""Commands that read a split directory: restore, verify, info, link, models-dir (the splitdir layer)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, List, Optional

import typer

from .. import __version__
from ..errors import GGUFSplitError
from ..format.names import show
from .base import OPT_FOUNDATION, OPT_JSON, OPT_QUIET, OPT_SHARED, OPT_THREADS, app, progress, run_or_fail
from .render import out, print_info, print_json, register_info_printers, size


@app.command("restore")
def restore_cmd(
    source: Path = typer.Argument(..., help="adaptor-<task>.gguf, or the split directory (then TASK)."),
    task: Optional[str] = typer.Argument(None, help="The task to restore, with a split directory."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Output file, or directory: an existing one or DIR/ (created if "
                                              "missing), where the original file name(s) are used (default: here)."),
    shared: List[Path] = OPT_SHARED,
    foundation: List[Path] = OPT_FOUNDATION,
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
    quiet: bool = OPT_QUIET,
) -> None:
    """Rebuild a task's original GGUF file(s), byte for byte (checked as read back from the disk)."""
    from ..splitdir.restore import restore

    r = run_or_fail(lambda: restore(source, output, task=task, shared=[*shared, *foundation], force=force,
                             progress=progress(quiet)))
    for f in r.files:
        kept = "already there, " if f.kept else ""
        out.print(f"restored {r.task}: {show(f.path)} ({kept}{size(f.size)}, xxh3-128 {f.xxh3}, identical to the "
                  "original)")


@app.command("verify")
def verify_cmd(
    paths: List[Path] = typer.Argument(..., help="Split directories and/or adaptor files."),
    shared: List[Path] = OPT_SHARED,
    foundation: List[Path] = OPT_FOUNDATION,
    sha256: bool = typer.Option(False, "--sha256", help="Also check every shared file's recorded sha256."),
    threads: Optional[int] = OPT_THREADS,
    quiet: bool = OPT_QUIET,
    json_out: bool = OPT_JSON,
) -> None:
    """Re-hash every file of every task against the digests recorded when it was written."""
    from ..splitdir.verify import verify

    r = run_or_fail(lambda: verify(paths, shared=[*shared, *foundation], sha256=sha256, threads=threads,
                            progress=progress(quiet or json_out)))
    if json_out:
        from dataclasses import asdict

        print_json({"version": __version__, "ok": True, **asdict(r)})
        return
    out.print(f"ok: {len(r.tasks)} task(s) ({', '.join(r.tasks)}), {r.files} files, {r.tensors} tensors, "
              f"{size(r.bytes)} match their recorded digests")
    if r.unused:
        out.print(f"note: {len(r.unused)} shared file(s) no task uses: {', '.join(map(os.path.basename, r.unused))}")
    if r.pending_commit:
        out.print("note: a killed run's commit is pending; it is complete and is what was verified (the next "
                  "split/add/remove here tidies it)")


@app.command("info")
def info_cmd(
    paths: List[str] = typer.Argument(..., help="GGUF files, or a split directory (optionally with a TASK)."),
    files: bool = typer.Option(False, "--files", help="With DIR TASK: list exactly the files the task needs."),
    shared: List[Path] = OPT_SHARED,
    json_out: bool = typer.Option(False, "--json", help="JSON for scripts."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
) -> None:
    """What a file holds; for a split directory which task uses which file, and the savings."""
    from ..pack.transport import describe_pack
    from ..splitdir.info import describe, savings, task_files

    found = [os.fspath(s) for s in shared]

    def run() -> list[Any]:
        if _is_dir_and_task(paths, files):
            return [task_files(paths[0], paths[1], shared=found)]
        if files:
            raise GGUFSplitError(None, "--files needs a split directory and a task: info DIR TASK --files")
        return [savings(p, shared=found) if os.path.isdir(p) else describe_pack(p) if _is_pack(p) else describe(p)
                for p in paths]

    items = run_or_fail(run)
    if json_out:
        data = [{**item.to_json(tensors), "version": __version__} for item in items]
        print_json(data if len(data) > 1 else data[0])
        return
    register_info_printers()
    for item in items:
        print_info(item, tensors)


def _is_dir_and_task(paths: Sequence[str], files: bool) -> bool:
    """`info DIR TASK`: with --files always; otherwise when DIR is a directory and TASK names one of its
    tasks, or nothing on disk (a file of that name in the current directory does not turn TASK into a
    file to describe: `./NAME` does)."""
    if len(paths) != 2:
        return False
    if files:
        return True
    directory, name = paths
    if not os.path.isdir(directory):
        return False
    if not os.path.exists(name):
        return True
    from ..splitdir.directory import SplitDir

    try:
        return name in SplitDir.open(directory).adaptors
    except GGUFSplitError:
        return False  # describing the directory reports what is wrong with it


def _is_pack(path: str) -> bool:
    """Starts with the pack magic (opened without blocking, read only if it is a regular file: a FIFO
    would wait for a writer)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 8, 0) == b"GGUFPACK"
    except OSError:
        return False
    finally:
        os.close(fd)


@app.command("link")
def link_cmd(
    task: str = typer.Argument(..., help="Task name."),
    directory: Path = typer.Argument(..., help="Split directory."),
    to: Optional[Path] = typer.Option(None, "--to", help="Make the links in this directory (default: the split's)."),
    shared: List[Path] = OPT_SHARED,
    foundation: List[Path] = typer.Option([], "--foundation", help="Same as --shared (the 0.1 name).", hidden=True),
    force: bool = typer.Option(False, "--force", help="Replace existing files of those names."),
) -> None:
    """Make <task>-0000k-of-0000N.gguf links to the task's files, the names llama.cpp's loader looks for."""
    from ..splitdir.links import link_task

    links = run_or_fail(lambda: link_task(directory, task, directory=to, force=force,
                                   shared=tuple(os.fspath(s) for s in [*shared, *foundation])))
    out.print(f"llama.cpp: llama-cli -m {show(links[0])}   ({len(links)} files)")


@app.command("models-dir")
def models_dir_cmd(
    directory: Path = typer.Argument(..., help="Split directory."),
    out_dir: Path = typer.Argument(..., help="The models directory to write or update."),
) -> None:
    """Write llama-server's router directory: OUT/<task>/<task>-0000k-of-0000N.gguf links, one per task."""
    from ..splitdir.links import write_models_dir

    r = run_or_fail(lambda: write_models_dir(directory, out_dir))
    changes = [f"{w} {', '.join(v)}" for w, v in (("added", r.added), ("updated", r.updated), ("removed", r.removed)) if v]
    out.print(f"{show(r.directory)}: {len(r.tasks)} task(s)" + (f"; {'; '.join(changes)}" if changes else "; up to date"))
    out.print(f"llama-server --models-dir {show(r.directory)}   (request \"model\": one of {', '.join(r.tasks)})")
