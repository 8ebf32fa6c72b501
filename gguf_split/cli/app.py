"""The `gguf-split` command: a thin layer over the library, assembled from its command modules.

`run(argv)` is what the entry point (`gguf_split._main`) calls once its signal handlers are in place.
The commands register themselves on the typer app (`base.app`) when their modules are imported here, one
module per layer of the library: assemble_cmds (split, add, remove), splitdir_cmds (restore, verify,
info, link, models-dir), lora_cmds (extract-lora), pack_cmds (pack, unpack), survey_cmd, demo_cmd.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__
from ..errors import forget_commits
from . import assemble_cmds, demo_cmd, lora_cmds, pack_cmds, splitdir_cmds, survey_cmd  # noqa: F401 - they register
from .base import app

__all__ = ["app", "run"]


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"gguf-split {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """gguf-split"""


def run(argv: list[str]) -> None:
    """Run the command line (exits through SystemExit, as click does)."""
    forget_commits()  # what an earlier command of this process committed is not this one's state
    app(args=argv, prog_name="gguf-split")
