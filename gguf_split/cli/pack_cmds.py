"""Transport commands: pack, unpack (the pack layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from .. import __version__
from ..errors import GGUFSplitError
from ..format.names import show
from .base import OPT_JSON, OPT_QUIET, OPT_TASK, OPT_THREADS, app, gather, progress, run_or_fail
from .render import out, print_json, size


@app.command("pack")
def pack_cmd(
    source: List[Path] = typer.Argument(None, help="A split directory, or model files / a spec (task = file stem).",
                                        show_default=False),
    task: List[str] = OPT_TASK,
    output: str = typer.Option(..., "--output", "-o", help="The pack file to write (NAME.ggufpack)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pack file."),
    threads: Optional[int] = OPT_THREADS,
    quiet: bool = OPT_QUIET,
    json_out: bool = OPT_JSON,
) -> None:
    """Pack a split (or models) into one file that gives every file back byte for byte, in far fewer bytes."""

    def run() -> Any:
        from ..pack.transport import pack

        sources = list(source or [])
        if len(sources) == 1 and sources[0].is_dir() and not task:
            return pack(output, split_dir=sources[0], force=force, threads=threads,
                        progress=progress(quiet or json_out))
        if any(s.is_dir() for s in sources):
            raise GGUFSplitError(None, "give one split directory, or model files (-t NAME=PATH), not both")
        spec = next((s for s in sources if s.suffix.lower() in (".yaml", ".yml")), None)
        spec_ = gather(spec, [s for s in sources if s != spec], task, need_output=False)
        if not spec_.tasks:
            raise GGUFSplitError(None, "nothing to pack: give a split directory, model files or -t NAME=PATH")
        return pack(output, tasks=spec_.tasks, force=force, threads=threads, progress=progress(quiet or json_out))

    r = run_or_fail(run)
    if json_out:
        from dataclasses import asdict

        print_json({"version": __version__, **asdict(r), "ratio": r.ratio})
        return
    out.print(f"packed {len(r.files)} files, {size(r.input_bytes)} -> {show(r.path)} {size(r.pack_bytes)} "
              f"({r.ratio:.1%}) in {r.seconds:.1f} s")
    for name, c in sorted(r.codecs.items()):
        if c.count:
            out.print(f"  {name:<8} {c.count:>5} x  {size(c.input_bytes):>12} -> {size(c.stored_bytes)}")


@app.command("unpack")
def unpack_cmd(
    pack_file: Path = typer.Argument(..., help="The pack file."),
    output: str = typer.Option(..., "--output", "-o", help="Directory to write into (created if missing)."),
    restore: bool = typer.Option(False, "--restore", help="A split's pack: give the original models directly."),
    force: bool = typer.Option(False, "--force", help="Replace existing files of the same names."),
    threads: Optional[int] = OPT_THREADS,
    quiet: bool = OPT_QUIET,
) -> None:
    """Give back every file of a pack, byte for byte (checked: xxh3 of every tensor, xxh3 and sha256 of every
    file, before anything is renamed into place)."""
    from ..pack.transport import unpack_to

    r = run_or_fail(lambda: unpack_to(pack_file, output, restore=restore, force=force, threads=threads,
                               progress=progress(quiet)))
    what = "models" if r.kind == "models" else "split files"
    kept = f", {len(r.kept)} of them already there byte for byte" if r.kept else ""
    out.print(f"unpacked {len(r.files)} {what} ({size(r.bytes_written)} written{kept}) into {show(r.out_dir)}"
              + (f": tasks {', '.join(r.tasks)}" if r.tasks else ""))
