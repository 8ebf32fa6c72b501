"""The command line's base: the typer app, its one-line error manners, and what every command shares.

Manners, as a careful user of git, pip or llama.cpp's tools expects:
- every GGUFSplitError is one line on stderr, `gguf-split: error: <file>: <problem>`, exit code 2; click's
  usage errors too (`_OneLineErrors`: a bad option value, a missing argument, an unknown command); Ctrl-C
  exits 130 and SIGTERM 143 with one line, at any moment once the entry point runs (`_main`), leaving no
  partial output (every writer cleans up or commits atomically);
- start-up: `gguf-split --version` imports nothing heavy; typer and rich load only for commands, gguf
  and numpy only for the commands that need them (command modules import the library inside the command).
Commands live in their own modules by layer (assemble_cmds, splitdir_cmds, pack_cmds, lora_cmds,
demo_cmd) and register on `app`; `render` prints results; `cli.app` assembles them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer
from typer.core import TyperGroup

from ..errors import GGUFSplitError
from ..format.names import show
from .render import one_line

T = TypeVar("T")


def _click_error_types() -> tuple[type[Exception], type[Exception] | None]:
    """click's error base class, and the error that stands for "no arguments: show the help" (click 8.2+),
    found through typer's public BadParameter: typer >= 0.20 carries its own copy of click."""
    mro = typer.BadParameter.__mro__
    base = next(c for c in mro if c.__name__ == "ClickException")
    usage = next(c for c in mro if c.__name__ == "UsageError")
    return base, getattr(sys.modules[usage.__module__], "NoArgsIsHelpError", None)


class _OneLineErrors(TyperGroup):
    """click's usage errors (a bad option value, a missing argument, an unknown command or option) as one
    line, `gguf-split: error: ... (see `gguf-split CMD --help`)`, exit code 2, like every other refusal
    (click and rich draw a box of five lines)."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        kw = dict(standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, **kw)
        error, show_help = _click_error_types()
        try:
            rv = super().main(args, prog_name, complete_var, **kw)
        except error as e:
            if show_help is not None and isinstance(e, show_help):
                e.show()  # type: ignore[attr-defined]  # `gguf-split` alone: the help
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            sub = ctx.command_path.partition(" ")[2] if ctx is not None else ""  # the root's name may be "root"
            hint = f" (see `{' '.join(['gguf-split', sub]).rstrip()} --help`)"
            message = e.format_message().rstrip(".")  # type: ignore[attr-defined]
            sys.stderr.write(f"gguf-split: error: {one_line(message)}{hint}\n")
            sys.exit(2)
        except typer.Abort:
            sys.stderr.write("gguf-split: aborted\n")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # an Exit(code) comes back as its code


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Store fine-tunes of one GGUF model with every distinct tensor once: per task a small adaptor plus "
         "shared files that stock llama.cpp loads as an ordinary multi-file split; restore any model byte "
         "for byte.",
)


def fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"gguf-split: error: {one_line(message)}\n")
    raise typer.Exit(code)


def run_or_fail(fn: Callable[[], T]) -> T:
    """The command's work; a GGUFSplitError is its one line and exit code 2."""
    try:
        return fn()
    except GGUFSplitError as e:
        fail(str(e))
    raise AssertionError("unreachable")


def progress(quiet: bool) -> Any:
    from ..disk.progress import Progress

    return Progress(quiet)


SPEC_HELP = "A YAML split spec (.yaml/.yml) and/or model files (task name = file stem)."
OPT_TASK = typer.Option([], "--task", "-t", help="NAME=PATH of a model; repeat for each task.")
OPT_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or waiting messages.")
OPT_JSON = typer.Option(False, "--json", help="Print the report as JSON.")
OPT_SHARED = typer.Option([], "--shared", "-s", help="Where moved shared files are (a file or a directory); repeat.")
OPT_FOUNDATION = typer.Option([], "--foundation", "-f", help="Same as --shared (the 0.1 name).", hidden=True)
OPT_THREADS = typer.Option(None, "--threads", help="Threads (default: all cores).")


def gather(spec: Optional[Path], models: List[Path], task: List[str], *, need_output: bool) -> Any:
    """A spec (a .yaml/.yml file among the positional arguments; an empty one if none), with the tasks of
    -t NAME=PATH and of positional models (task name = the file's stem, e.g. chat.gguf -> chat) added."""
    from ..assemble.scan import check_input_path
    from ..assemble.spec import Spec, load_spec

    positional = ([spec] if spec is not None else []) + list(models)
    specs = [p for p in positional if p.suffix.lower() in (".yaml", ".yml")]
    files = [p for p in positional if p not in specs]
    if len(specs) > 1:
        raise GGUFSplitError(None, "give at most one spec file")
    loaded = load_spec(specs[0], need_output=need_output) if specs else Spec()
    given: dict[str, str] = {}
    for item in task:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise GGUFSplitError(None, f"-t/--task {item!r}: expected NAME=PATH (for example -t chat=chat.gguf)")
        if name in given:
            raise GGUFSplitError(None, f"-t/--task {name}: task name given twice")
        check_input_path(path)
        given[name] = os.path.abspath(path)
    for p in files:
        check_input_path(p)
        name = _stem(p)
        if name in given:
            raise GGUFSplitError(show(p), f"task name {name!r} (from the file name) is also given for "
                                          f"{show(given[name])}: name them with -t NAME=PATH")
        given[name] = os.path.abspath(p)
    loaded.tasks.update(given)
    return loaded


def _stem(p: Path) -> str:
    """chat.gguf -> chat; name-00001-of-00003.gguf (a sharded model) -> name."""
    import re

    from ..format.names import check_task_name

    stem = re.sub(r"-\d{5}-of-\d{5}\Z", "", p.name[:-5] if p.name.endswith(".gguf") else p.stem)
    try:
        return check_task_name(stem)
    except GGUFSplitError as e:
        raise GGUFSplitError(show(p), f"{e.problem}: name the task with -t NAME=PATH") from None


def flag_options(base: Any, command: str, **flags: Any) -> Any:
    """`base` (the spec's options) with the flags the user gave (one merge rule: a flag given, a value that
    is not None, wins; a boolean flag left off is not given), checked by the options' one rule; a bad
    value is one line naming the flag."""
    from ..assemble.options import flag_of

    values = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in flags.items()
              if v is not None and v is not False}
    return base.merged(values, lambda name, problem: GGUFSplitError(
        None, f"{flag_of(name)}: {problem} (see `gguf-split {command} --help`)"))
