"""The `gguf-split` command: a thin layer over the library.

Manners, as a careful user of git, pip or llama.cpp's tools expects:
- every GGUFSplitError is one line on stderr, `gguf-split: error: <file>: <problem>`, exit code 2; click's
  usage errors too (`_OneLineErrors`: a bad option value, a missing argument, an unknown command); Ctrl-C
  exits 130 and SIGTERM 143 with one line, at any moment once the entry point runs (`_main`), leaving no
  partial output (every writer cleans up or commits atomically);
- file names that are not valid UTF-8 are printed with escapes, never crash the output;
- tables and reports are not wrapped when stdout is not a terminal (scripts and logs get whole lines);
- `--version`, and the version in `info --json`;
- start-up: `gguf-split --version` imports nothing heavy; typer and rich load only for commands, gguf
  and numpy only for the commands that need them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable, List, Optional, TypeVar

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import GGUFSplitError
from ..format.names import show

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
            sys.stderr.write(f"gguf-split: error: {_one_line(message)}{hint}\n")
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


class _Out:
    """Reports go to stdout as plain lines: never wrapped (scripts and logs get whole lines, a terminal
    wraps what is too wide), and cheap for thousands of rows (rich draws the progress bars only)."""

    def print(self, *args: Any) -> None:
        sys.stdout.write(" ".join(map(str, args)) + "\n")


out = _Out()


def _table(title: str, columns: tuple[str, ...], rows: Sequence[tuple[str, ...]], total: tuple[str, ...],
           left: tuple[str, ...] = ("file", "used by")) -> None:
    """An aligned plain-text table: title, header, rows, a rule, the total row."""
    widths = [max(len(r[i]) for r in [columns, *rows, total]) for i in range(len(columns))]

    def line(r: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if col in left else c.rjust(w) for c, w, col in zip(r, widths, columns)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out.print(title)
    for r in (columns, tuple("-" * w for w in widths)):
        out.print(line(r))
    for r in rows:
        out.print(line(r))
    out.print(rule)
    out.print(line(total))


_FILE_COLUMNS = ("file", "split.no", "tensors", "bytes", "used by")


def _files_table(title: str, files: list[tuple[str, int, str, int, list[str]]],
                 adaptors: list[tuple[str, str, int, str]], output_bytes: int, input_bytes: int) -> None:
    """The table `split`, `add` and `info DIR` print: every shared file with the tasks that load it, then
    every adaptor with the model(s) it replaces."""
    n = len(adaptors)
    rows = [(name, str(pos), tensors, _size(size), "all tasks" if len(users) == n and n > 1 else ", ".join(users))
            for name, pos, tensors, size, users in files]
    rows += [(name, "0", tensors, _size(size), replaces) for name, tensors, size, replaces in adaptors]
    _table(title, _FILE_COLUMNS, rows, ("total", "", "", _size(output_bytes), f"inputs {_size(input_bytes)}"))


def _one_line(text: str) -> str:
    """Control characters (text from a damaged file may hold them) escaped: an error stays one line and
    cannot drive the terminal; file names that are not UTF-8 are shown with escapes."""
    text = show(text)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"gguf-split: error: {_one_line(message)}\n")
    raise typer.Exit(code)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):  # a string value that is not UTF-8, kept as bytes as the file has it
        return value.decode("utf-8", "backslashreplace")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except GGUFSplitError as e:
        _fail(str(e))
    raise AssertionError("unreachable")


def _progress(quiet: bool) -> Any:
    from ..disk.progress import Progress

    return Progress(quiet)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _cut_option(value: Optional[str]) -> Optional[str]:
    """--cut, checked as the spec's key is; the canonical text (None: not given)."""
    if value is None:
        return None
    from ..assemble.plan import Cut

    try:
        return str(Cut.parse(value))
    except ValueError as e:
        raise GGUFSplitError(None, f"--cut: {e}") from None


_CUT_HELP = ("Cut shared groups into files by tensor role and blocks of N layers (role:N), by role only (role), "
             "per tensor (tensor) or not at all (none): finer cuts let `add` reuse more of a fine-tune's "
             "unchanged tensors, at more files per task")


def _size_option(name: str, value: Optional[str]) -> Optional[int]:
    """--file-cost / --max-shard-size, checked as the spec's keys are (spec.parse_size_option)."""
    if value is None:
        return None
    from ..assemble.spec import parse_size_option

    try:
        return parse_size_option(name.lstrip("-").replace("-", "_"), value)
    except ValueError as e:
        raise GGUFSplitError(None, f"{name}: {e}") from None


def _tasks_from(spec: Optional[Path], models: List[Path], task: List[str], *, need_output: bool) -> Any:
    """Options from a spec (a .yaml/.yml file among the positional arguments), then -t NAME=PATH, then
    positional models (task name = the file's stem, e.g. chat.gguf -> chat)."""
    from ..assemble.scan import check_input_path
    from ..assemble.spec import SplitOptions, load_spec

    positional = ([spec] if spec is not None else []) + list(models)
    specs = [p for p in positional if p.suffix.lower() in (".yaml", ".yml")]
    files = [p for p in positional if p not in specs]
    if len(specs) > 1:
        raise GGUFSplitError(None, "give at most one spec file")
    opts = load_spec(specs[0], need_output=need_output) if specs else SplitOptions()
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
    opts.tasks.update(given)
    return opts


def _stem(p: Path) -> str:
    """chat.gguf -> chat; name-00001-of-00003.gguf (a sharded model) -> name."""
    import re

    from ..format.names import check_task_name

    stem = re.sub(r"-\d{5}-of-\d{5}\Z", "", p.name[:-5] if p.name.endswith(".gguf") else p.stem)
    try:
        return check_task_name(stem)
    except GGUFSplitError as e:
        raise GGUFSplitError(show(p), f"{e.problem}: name the task with -t NAME=PATH") from None


# ---------------------------------------------------------------------------------------------------------
# split / add / remove

_REASONS = {
    "changed": "changed (no other task has these bytes)",
    "type/shape differs": "of another type or shape than in other tasks",
    "not in every model": "that not every task has",
    "too small for a file": "shared, but too small to pay for a file (--file-cost)",
    "over the file cap": "shared, but left out by --max-shared-files",
    "in another task's adaptor": "held by a task of the split in its adaptor only (no layout can reuse them)",
    "in a file it cannot load": "in a shared file of the split that also holds tensors this task changed",
}


def _print_split(report: Any, title: str = "split into", add: Any = None) -> None:
    """A split's report; with `add` (an AddReport), the lines about bytes describe the add: what it wrote
    against the new models, what it reused, what no layout could have reused."""
    n_tasks = len(report.tasks)
    _files_table(f"{title} {show(report.directory)}" + (" (dry run: nothing written)" if report.dry_run else ""),
                 [(f.name + (" (kept)" if f.kept else ""), f.position, str(f.tensors), f.bytes, f.tasks)
                  for f in report.files],
                 [(os.path.basename(t.adaptor), f"{t.tensors}/{t.model_tensors}", t.adaptor_bytes,
                   f"{t.task} (replaces {', '.join(os.path.basename(s) for s in t.sources)}, "
                   f"{_size(t.source_bytes)})") for t in report.tasks],
                 report.output_bytes, report.input_bytes)
    if add is not None:
        _print_add_bytes(add)
    elif not report.shares_anything:
        why = "one model" if n_tasks == 1 else "no group of shared tensors pays for a file (see --file-cost)"
        out.print(f"nothing is shared ({why}): the split is {_size(-report.saved_bytes)} larger than the inputs "
                  "(each adaptor adds gguf-split's records); it restores byte for byte all the same")
    else:
        out.print(f"the split is {report.ratio:.1%} of the inputs: saves {_size(report.saved_bytes)}; every "
                  f"distinct tensor once would take {_size(report.dedup_optimum)} of tensor bytes"
                  + ("" if report.exact else f" (greedy plan; lower bound {_size(report.lower_bound)})"))
    holes = {f.name for f in report.files if f.kind == "hole"}
    for t in report.tasks:
        counts: dict[str, list[str]] = {}
        for name, why in t.reasons.items():
            counts.setdefault(why, []).append(name)
        why = "; ".join(f"{len(v)} {_REASONS.get(k, k)}" for k, v in counts.items())
        out.print(f"  {t.task}: {t.tensors} tensors in its adaptor: {why or 'every tensor is in a shared file'}")
        n_holes = sum(os.path.basename(f) in holes for f in t.files)
        if len(t.files) > 1:
            out.print(f"    loads {len(t.files)} files besides its adaptor"
                      + (f", {n_holes} of them hole{'s' if n_holes > 1 else ''} (empty files that fill its list)"
                         if n_holes else ""))
        if t.missing:
            out.print(f"    has no {', '.join(t.missing)} (other tasks do)")
        if t.links:
            out.print(f"    llama.cpp: -m {show(t.links[0])}")
    if report.oversize:
        out.print(f"note: {len(report.oversize)} file(s) over --max-shard-size {_size(report.max_shard_size)}, "
                  "each one tensor larger than that (a tensor cannot be cut): "
                  + ", ".join(f"{name} ({_size(size)})" for name, size in report.oversize))
    if report.removed:
        out.print(f"removed {len(report.removed)} file(s) of the previous split no task uses any more: "
                  f"{', '.join(report.removed)}")
    if report.models_dir:
        out.print(f"llama-server: --models-dir {show(report.models_dir)}")


_SPEC_HELP = "A YAML split spec (.yaml/.yml) and/or model files (task name = file stem)."
_OPT_TASK = typer.Option([], "--task", "-t", help="NAME=PATH of a model; repeat for each task.")
_OPT_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or waiting messages.")
_OPT_JSON = typer.Option(False, "--json", help="Print the report as JSON.")
_OPT_SHARED = typer.Option([], "--shared", "-s", help="Where moved shared files are (a file or a directory); repeat.")
_OPT_FOUNDATION = typer.Option([], "--foundation", "-f", help="Same as --shared (the 0.1 name).", hidden=True)


@app.command("split")
def split_cmd(
    spec: Optional[Path] = typer.Argument(None, help=_SPEC_HELP, show_default=False),
    models: List[Path] = typer.Argument(None, help="More model files.", show_default=False),
    task: List[str] = _OPT_TASK,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output directory (the split)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="File-name prefix for every file of the split."),
    force: bool = typer.Option(False, "--force", help="Replace the split already in the output directory."),
    link: bool = typer.Option(False, "--link", help="Make <task>-0000k-of-0000N.gguf links for llama.cpp."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Also write llama-server's models directory."),
    allow_unrelated: bool = typer.Option(False, "--allow-unrelated",
                                         help="Split models of different architectures or with nothing in common."),
    max_shared_files: Optional[int] = typer.Option(None, "--max-shared-files", min=1,
                                                   help="At most N files per task besides its adaptor, holes "
                                                        "included (default 32)."),
    cut: Optional[str] = typer.Option(None, "--cut", help=_CUT_HELP + " (default role:6)."),
    file_cost: Optional[str] = typer.Option(None, "--file-cost",
                                            help="A group of shared tensors gets its own file only if it saves more "
                                                 "bytes than this (default 1MiB)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size",
                                                 help="Cut files larger than this (e.g. 20G) into several."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Hashing threads (default: all cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and report; write nothing."),
    quiet: bool = _OPT_QUIET,
    json_out: bool = _OPT_JSON,
) -> None:
    """Split models into a directory: per task adaptor-<task>.gguf plus the shared files it loads."""

    def run() -> Any:
        from ..assemble.plan import DEFAULT_CUT, DEFAULT_FILE_COST, DEFAULT_MAX_SHARED_FILES
        from ..assemble.split import split

        opts = _tasks_from(spec, models or [], task, need_output=output is None)
        if output is not None:
            opts.output = output
        if prefix is not None:
            opts.prefix = prefix
        opts.force |= force
        opts.link |= link
        opts.allow_unrelated |= allow_unrelated
        opts.quiet |= quiet or json_out
        if threads is not None:
            opts.threads = threads
        if max_shared_files is not None:
            opts.max_shared_files = max_shared_files
        if cut is not None:
            opts.cut = _cut_option(cut)
        if file_cost is not None:
            opts.file_cost = _size_option("--file-cost", file_cost)
        if max_shard_size is not None:
            opts.max_shard_size = _size_option("--max-shard-size", max_shard_size)
        if models_dir is not None:
            opts.models_dir = os.fspath(models_dir)
        if not opts.tasks:
            raise GGUFSplitError(None, "no tasks: give model files, -t NAME=PATH, or a spec file")
        if opts.output is None:
            raise GGUFSplitError(None, "no output directory: give -o DIR or `output:` in the spec")
        return split(opts.tasks, opts.output, prefix=opts.prefix, force=opts.force, link=opts.link,
                     allow_unrelated=opts.allow_unrelated, threads=opts.threads,
                     max_shared_files=opts.max_shared_files or DEFAULT_MAX_SHARED_FILES,
                     file_cost=opts.file_cost if opts.file_cost is not None else DEFAULT_FILE_COST,
                     max_shard_size=opts.max_shard_size, dry_run=dry_run, models_dir=opts.models_dir,
                     progress=_progress(opts.quiet), cut=opts.cut or DEFAULT_CUT)

    report = _run(run)
    if json_out:
        _print_json({"version": __version__, **_report_json(report)})
    else:
        _print_split(report)


def _report_json(report: Any) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(report)
    d.update(input_bytes=report.input_bytes, output_bytes=report.output_bytes, saved_bytes=report.saved_bytes,
             ratio=report.ratio, oversize=report.oversize)
    return d


@app.command("add")
def add_cmd(
    directory: Path = typer.Argument(..., help="The split directory."),
    models: List[Path] = typer.Argument(None, help=_SPEC_HELP, show_default=False),
    task: List[str] = _OPT_TASK,
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Also update llama-server's models directory."),
    allow_unrelated: bool = typer.Option(False, "--allow-unrelated", help="Add a model of another architecture."),
    max_shared_files: Optional[int] = typer.Option(None, "--max-shared-files", min=1,
                                                   help="At most N files per new task besides its adaptor, holes "
                                                        "included (default 32)."),
    cut: Optional[str] = typer.Option(None, "--cut", help=_CUT_HELP + " (default: as the split was cut)."),
    file_cost: Optional[str] = typer.Option(None, "--file-cost", help="Per-file cost for new shared files (1MiB)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Cut new files larger than this."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Hashing threads (default: all cores)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and report; write nothing."),
    quiet: bool = _OPT_QUIET,
    json_out: bool = _OPT_JSON,
) -> None:
    """Add tasks to a shipped split: no existing file changes; existing shared files are reused."""

    def run() -> Any:
        from ..assemble.plan import DEFAULT_FILE_COST, DEFAULT_MAX_SHARED_FILES
        from ..assemble.update import add

        spec = next((m for m in models or [] if m.suffix.lower() in (".yaml", ".yml")), None)
        opts = _tasks_from(spec, [m for m in models or [] if m != spec], task, need_output=False)
        if spec is not None and opts.output is not None and os.path.realpath(opts.output) != os.path.realpath(directory):
            raise GGUFSplitError(show(spec), f"output: {show(opts.output)} is not the split directory {show(directory)}")
        if not opts.tasks:
            raise GGUFSplitError(None, "no tasks to add: give model files, -t NAME=PATH, or a spec file")
        cost = _size_option("--file-cost", file_cost) if file_cost is not None else opts.file_cost
        return add(directory, opts.tasks,
                   max_shared_files=max_shared_files or opts.max_shared_files or DEFAULT_MAX_SHARED_FILES,
                   cut=_cut_option(cut) or opts.cut, file_cost=cost if cost is not None else DEFAULT_FILE_COST,
                   max_shard_size=_size_option("--max-shard-size", max_shard_size) or opts.max_shard_size,
                   allow_unrelated=allow_unrelated or opts.allow_unrelated, threads=threads or opts.threads,
                   dry_run=dry_run, models_dir=os.fspath(models_dir) if models_dir else opts.models_dir,
                   progress=_progress(quiet or json_out or opts.quiet))

    report = _run(run)
    if json_out:
        from dataclasses import asdict

        _print_json({"version": __version__, **asdict(report), "split": _report_json(report.split)})
        return
    _print_split(report.split, title="added to", add=report)


def _print_add_bytes(report: Any) -> None:
    n = len(report.split.tasks)
    new = "the new task" if n == 1 else f"the {n} new tasks"
    share = f" ({report.new_bytes / report.model_bytes:.1%})" if report.model_bytes else ""
    out.print(f"wrote {_size(report.new_bytes)} of tensors for {new}'s {_size(report.model_bytes)}{share}; reused "
              f"{_size(report.reused_bytes)} from files already in the split (tasks there: "
              f"{', '.join(report.existing_tasks)}; new shared files cut {report.cut})")
    if report.new_bytes > report.unique_bytes:
        out.print(f"  {_size(report.unique_bytes)} of it no task of the split holds; "
                  f"{_size(report.in_adaptors_bytes)} sits in other tasks' adaptors, which no layout can reuse "
                  "(shipped files never change)")
    if report.resplit_would_save > 0:
        out.print(f"a fresh split of all {len(report.existing_tasks) + n} tasks would store "
                  f"{_size(report.resplit_would_save)} less (it needs every original model; devices would then "
                  "download every file again)")
    else:
        out.print("a fresh split of all tasks would store no less")


@app.command("remove")
def remove_cmd(
    directory: Path = typer.Argument(..., help="The split directory."),
    names: List[str] = typer.Argument(..., help="Task names to remove."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Also update llama-server's models directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; delete nothing."),
    quiet: bool = _OPT_QUIET,
    json_out: bool = _OPT_JSON,
) -> None:
    """Remove tasks: their adaptors and every shared file no remaining task uses."""
    from ..assemble.update import remove

    r = _run(lambda: remove(directory, names, dry_run=dry_run, models_dir=models_dir, progress=_progress(quiet)))
    if json_out:
        from dataclasses import asdict

        _print_json({"version": __version__, **asdict(r)})
        return
    verb = "would delete" if r.dry_run else "deleted"
    out.print(f"removed {', '.join(r.removed_tasks)}: {verb} {len(r.deleted)} file(s), {_size(r.freed_bytes)}: "
              f"{', '.join(r.deleted)}" + (f"; and {len(r.links)} llama.cpp link(s) to them" if r.links else ""))


# ---------------------------------------------------------------------------------------------------------
# restore / verify / info


@app.command("restore")
def restore_cmd(
    source: Path = typer.Argument(..., help="adaptor-<task>.gguf, or the split directory (then TASK)."),
    task: Optional[str] = typer.Argument(None, help="The task to restore, with a split directory."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Output file, or directory: an existing one or DIR/ (created if "
                                              "missing), where the original file name(s) are used (default: here)."),
    shared: List[Path] = _OPT_SHARED,
    foundation: List[Path] = _OPT_FOUNDATION,
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
    quiet: bool = _OPT_QUIET,
) -> None:
    """Rebuild a task's original GGUF file(s), byte for byte (checked as read back from the disk)."""
    from ..splitdir.restore import restore

    r = _run(lambda: restore(source, output, task=task, shared=[*shared, *foundation], force=force,
                             progress=_progress(quiet)))
    for f in r.files:
        kept = "already there, " if f.kept else ""
        out.print(f"restored {r.task}: {show(f.path)} ({kept}{_size(f.size)}, xxh3-128 {f.xxh3}, identical to the "
                  "original)")


@app.command("verify")
def verify_cmd(
    paths: List[Path] = typer.Argument(..., help="Split directories and/or adaptor files."),
    shared: List[Path] = _OPT_SHARED,
    foundation: List[Path] = _OPT_FOUNDATION,
    sha256: bool = typer.Option(False, "--sha256", help="Also check every shared file's recorded sha256."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Hashing threads (default: all cores)."),
    quiet: bool = _OPT_QUIET,
    json_out: bool = _OPT_JSON,
) -> None:
    """Re-hash every file of every task against the digests recorded when it was written."""
    from ..splitdir.verify import verify

    r = _run(lambda: verify(paths, shared=[*shared, *foundation], sha256=sha256, threads=threads,
                            progress=_progress(quiet or json_out)))
    if json_out:
        from dataclasses import asdict

        _print_json({"version": __version__, "ok": True, **asdict(r)})
        return
    out.print(f"ok: {len(r.tasks)} task(s) ({', '.join(r.tasks)}), {r.files} files, {r.tensors} tensors, "
              f"{_size(r.bytes)} match their recorded digests")
    if r.unused:
        out.print(f"note: {len(r.unused)} shared file(s) no task uses: {', '.join(map(os.path.basename, r.unused))}")
    if r.pending_commit:
        out.print("note: a killed run's commit is pending; it is complete and is what was verified (the next "
                  "split/add/remove here tidies it)")


@app.command("info")
def info_cmd(
    paths: List[str] = typer.Argument(..., help="GGUF files, or a split directory (optionally with a TASK)."),
    files: bool = typer.Option(False, "--files", help="With DIR TASK: list exactly the files the task needs."),
    shared: List[Path] = _OPT_SHARED,
    json_out: bool = typer.Option(False, "--json", help="JSON for scripts."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
) -> None:
    """What a file holds; for a split directory which task uses which file, and the savings."""
    from ..splitdir.info import describe, savings, task_files

    found = [os.fspath(s) for s in shared]

    def run() -> list[tuple[Callable[[dict[str, Any]], None], dict[str, Any]]]:
        if _is_dir_and_task(paths, files):
            return [(_print_task_files, task_files(paths[0], paths[1], shared=found))]
        if files:
            raise GGUFSplitError(None, "--files needs a split directory and a task: info DIR TASK --files")
        return [(_print_savings, savings(p, shared=found)) if os.path.isdir(p)
                else (_print_pack, _describe_pack(p)) if _is_pack(p)
                else (lambda d: _print_file(d, tensors), describe(p)) for p in paths]

    items = _run(run)
    if json_out:
        for _, item in items:
            if not tensors:
                item.pop("tensor_list", None)
            item["version"] = __version__
        _print_json([item for _, item in items] if len(items) > 1 else items[0][1])
        return
    for show_item, item in items:
        show_item(item)


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


def _describe_pack(path: str) -> dict[str, Any]:
    from ..pack.transport import read_index

    i = read_index(path)
    return {"path": i.path, "role": "pack", "pack_version": i.version, "kind": i.kind, "meta": i.meta,
            "pack_bytes": i.pack_bytes, "tensors": i.tensors,
            "files": [{"name": f.name, "bytes": f.size, "sha256": f.sha256, "xxh3": f.xxh3} for f in i.files]}


def _print_pack(d: dict[str, Any]) -> None:
    total = sum(f["bytes"] for f in d["files"])
    out.print(f"{show(d['path'])}: gguf-split pack v{d['pack_version']} of {d['kind']}, {_size(d['pack_bytes'])} for "
              f"{len(d['files'])} files ({_size(total)}), {d['tensors']} distinct tensors")
    for f in d["files"]:
        out.print(f"  {f['name']}\t{f['bytes']}\tsha256 {f['sha256']}")


def _print_task_files(d: dict[str, Any]) -> None:
    for r in d["files"]:
        out.print(f"{show(r['path'])}\t{r['bytes']}\t{r['sha256'] or '-'}")
    out.print(f"task {d['task']}: {len(d['files'])} files, {_size(d['bytes'])}; give llama.cpp the first "
              "(llama_model_load_from_splits takes them in this order)")


def _print_savings(s: dict[str, Any]) -> None:
    _files_table(f"split {show(s['directory'])}",
                 [(f["name"], f["position"], str(f["tensors"]), f["bytes"], f["tasks"]) for f in s["files"]],
                 [(os.path.basename(t["path"]), str(t["tensors"]), t["bytes"],
                   f"{t['task']} (replaces {', '.join(t['sources'])}, {_size(t['source_bytes'])})") for t in s["tasks"]],
                 s["output_bytes"], s["input_bytes"])
    if s["ratio"] is not None:
        out.print(f"the split is {s['ratio']:.1%} of the inputs: saves {_size(s['saved_bytes'])}; "
                  f"{_size(s['over_optimum_bytes'])} over the dedup optimum (every distinct tensor once + "
                  "every adaptor's header)")
    if s["unused"]:
        out.print(f"note: shared file(s) no task uses: {', '.join(s['unused'])}")


def _print_file(d: dict[str, Any], tensors: bool) -> None:
    if d.get("hole"):
        out.print(f"{show(d['path'])}: hole, GGUF v{d['gguf_version']}, {_size(d['file_bytes'])}")
        out.print(f"  split.no {d['split_no']}, no tensors: fills position {d['split_no']} in the file list of a "
                  "task that loads no other file there (llama.cpp loads split.no 1..k without a gap)")
        return
    out.print(f"{show(d['path'])}: {d['role']}, GGUF v{d['gguf_version']}, {d['architecture'] or 'no architecture'}, "
              f"{_size(d['file_bytes'])}")
    out.print(f"  {d['tensors']} tensors ({_size(d['tensor_bytes'])}): "
              + ", ".join(f"{n} {k}" for k, n in sorted(d["types"].items())) if d["tensors"] else "  no tensors")
    if d["role"] == "shared":
        out.print(f"  shared file at split.no {d['split_no']}, content id {d['content_id']}")
    elif d["role"] == "adaptor":
        out.print(f"  task {d['task']}: {d['model_tensors']} tensors in the model, {d['tensors']} here; "
                  f"{d['kvs']} metadata keys")
        for f in d["files"]:
            out.print(f"  split.no {f['position']}: {f['name']} ({_size(f['bytes'])})")
        for s in d["sources"]:
            out.print(f"  restores {s['name']} ({_size(s['bytes'])}, xxh3-128 {s['xxh3']})")
    elif d.get("split"):
        out.print(f"  llama.cpp split metadata: {d['split']}")
    if tensors:
        for t in d["tensor_list"]:
            out.print(f"  {t['name']:<40} {t['type']:<8} {str(t['shape']):<24} {_size(t['bytes'])}")


# ---------------------------------------------------------------------------------------------------------
# llama.cpp: link / models-dir


@app.command("link")
def link_cmd(
    task: str = typer.Argument(..., help="Task name."),
    directory: Path = typer.Argument(..., help="Split directory."),
    to: Optional[Path] = typer.Option(None, "--to", help="Make the links in this directory (default: the split's)."),
    shared: List[Path] = _OPT_SHARED,
    foundation: List[Path] = typer.Option([], "--foundation", help="Same as --shared (the 0.1 name).", hidden=True),
    force: bool = typer.Option(False, "--force", help="Replace existing files of those names."),
) -> None:
    """Make <task>-0000k-of-0000N.gguf links to the task's files, the names llama.cpp's loader looks for."""
    from ..splitdir.links import link_task

    links = _run(lambda: link_task(directory, task, directory=to, force=force,
                                   shared=tuple(os.fspath(s) for s in [*shared, *foundation])))
    out.print(f"llama.cpp: llama-cli -m {show(links[0])}   ({len(links)} files)")


@app.command("models-dir")
def models_dir_cmd(
    directory: Path = typer.Argument(..., help="Split directory."),
    out_dir: Path = typer.Argument(..., help="The models directory to write or update."),
) -> None:
    """Write llama-server's router directory: OUT/<task>/<task>-0000k-of-0000N.gguf links, one per task."""
    from ..splitdir.links import write_models_dir

    r = _run(lambda: write_models_dir(directory, out_dir))
    changes = [f"{w} {', '.join(v)}" for w, v in (("added", r.added), ("updated", r.updated), ("removed", r.removed)) if v]
    out.print(f"{show(r.directory)}: {len(r.tasks)} task(s)" + (f"; {'; '.join(changes)}" if changes else "; up to date"))
    out.print(f"llama-server --models-dir {show(r.directory)}   (request \"model\": one of {', '.join(r.tasks)})")


# ---------------------------------------------------------------------------------------------------------
# LoRA


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
    quiet: bool = _OPT_QUIET,
    json_out: bool = _OPT_JSON,
) -> None:
    """The difference between a task and a base as a llama.cpp LoRA adapter (GGUF)."""

    def run() -> Any:
        from ..lora.extract import extract_lora, extract_lora_from_files

        if rank != "auto" and not rank.isdigit():
            raise GGUFSplitError(None, f"--rank {rank!r}: 'auto' or a whole number")
        r: int | str = int(rank) if rank.isdigit() else "auto"
        kw: dict[str, Any] = dict(rank=r, threshold=threshold, allow_partial=allow_partial, alpha=alpha,
                                  dtype="F32" if f32 else "F16", progress=_progress(quiet or json_out), force=force)
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

    report = _run(run)
    if json_out:
        from dataclasses import asdict

        _print_json({"version": __version__, **asdict(report), "lora_bytes": report.lora_bytes,
                     "task_bytes": report.task_bytes, "partial": report.partial})
        return
    for line in report.lines():
        out.print(line)


# ---------------------------------------------------------------------------------------------------------
# transport: pack / unpack


@app.command("pack")
def pack_cmd(
    source: List[Path] = typer.Argument(None, help="A split directory, or model files / a spec (task = file stem).",
                                        show_default=False),
    task: List[str] = _OPT_TASK,
    output: str = typer.Option(..., "--output", "-o", help="The pack file to write (NAME.ggufpack)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pack file."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads (default: all cores)."),
    quiet: bool = _OPT_QUIET,
    json_out: bool = _OPT_JSON,
) -> None:
    """Pack a split (or models) into one file that gives every file back byte for byte, in far fewer bytes."""

    def run() -> Any:
        from ..pack.transport import pack

        sources = list(source or [])
        if len(sources) == 1 and sources[0].is_dir() and not task:
            return pack(output, split_dir=sources[0], force=force, threads=threads,
                        progress=_progress(quiet or json_out))
        if any(s.is_dir() for s in sources):
            raise GGUFSplitError(None, "give one split directory, or model files (-t NAME=PATH), not both")
        spec = next((s for s in sources if s.suffix.lower() in (".yaml", ".yml")), None)
        opts = _tasks_from(spec, [s for s in sources if s != spec], task, need_output=False)
        if not opts.tasks:
            raise GGUFSplitError(None, "nothing to pack: give a split directory, model files or -t NAME=PATH")
        return pack(output, tasks=opts.tasks, force=force, threads=threads, progress=_progress(quiet or json_out))

    r = _run(run)
    if json_out:
        from dataclasses import asdict

        _print_json({"version": __version__, **asdict(r), "ratio": r.ratio})
        return
    out.print(f"packed {len(r.files)} files, {_size(r.input_bytes)} -> {show(r.path)} {_size(r.pack_bytes)} "
              f"({r.ratio:.1%}) in {r.seconds:.1f} s")
    for name, c in sorted(r.codecs.items()):
        if c.count:
            out.print(f"  {name:<8} {c.count:>5} x  {_size(c.input_bytes):>12} -> {_size(c.stored_bytes)}")


@app.command("unpack")
def unpack_cmd(
    pack_file: Path = typer.Argument(..., help="The pack file."),
    output: str = typer.Option(..., "--output", "-o", help="Directory to write into (created if missing)."),
    restore: bool = typer.Option(False, "--restore", help="A split's pack: give the original models directly."),
    force: bool = typer.Option(False, "--force", help="Replace existing files of the same names."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads (default: all cores)."),
    quiet: bool = _OPT_QUIET,
) -> None:
    """Give back every file of a pack, byte for byte (checked: xxh3 of every tensor, xxh3 and sha256 of every
    file, before anything is renamed into place)."""
    from ..pack.transport import unpack_to

    r = _run(lambda: unpack_to(pack_file, output, restore=restore, force=force, threads=threads,
                               progress=_progress(quiet)))
    what = "models" if r.kind == "models" else "split files"
    kept = f", {len(r.kept)} of them already there byte for byte" if r.kept else ""
    out.print(f"unpacked {len(r.files)} {what} ({_size(r.bytes_written)} written{kept}) into {show(r.out_dir)}"
              + (f": tasks {', '.join(r.tasks)}" if r.tasks else ""))


# ---------------------------------------------------------------------------------------------------------
# demo


@app.command("demo")
def demo_cmd(
    directory: Path = typer.Argument(Path("gguf-split-demo"), help="Where to build the demo (its own files are "
                                                                   "replaced on re-run)."),
    quiet: bool = _OPT_QUIET,
) -> None:
    """Build a small base model and three fine-tunes, split, verify, restore, and show the savings."""
    from ..demo import run_demo

    result = _run(lambda: run_demo(directory, _progress(quiet)))
    _print_split(result["split"])
    v = result["verify"]
    out.print(f"verify: {len(v.tasks)} tasks, {v.files} files, {v.tensors} tensors match their recorded digests")
    for task, same in result["restored_identical"].items():
        out.print(f"restore {task}: {'byte-identical to the original (sha256)' if same else 'DIFFERS'}")
    if not all(result["restored_identical"].values()):
        _fail("a restored model differs from its original", 1)


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
    app(args=argv, prog_name="gguf-split")
