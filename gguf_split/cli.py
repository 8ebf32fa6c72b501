"""The `gguf-split` command: a thin layer over the library.

Every GGUFSplitError becomes one line on stderr, `gguf-split: error: <file>: <problem>`, and exit code 2;
usage errors also exit with 2 (typer's convention); Ctrl-C exits with 130 and leaves no partial output.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import GGUFSplitError
from .plan import CHANGED, ONLY_HERE, RETYPED
from .progress import Progress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Split fine-tuned GGUF models into one shared foundation + small per-task adaptors that stock "
         "llama.cpp loads as a two-file split; restore any task byte for byte.",
)
# markup=False: names, paths and metadata printed here come from files and may hold "[...]"
out = Console(markup=False) if sys.stdout.isatty() else Console(width=120, markup=False)  # no terminal: 120 wide
T = TypeVar("T")


def _one_line(text: str) -> str:
    """Control characters (text from a damaged file may hold them) escaped: the error stays one line and
    cannot drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"gguf-split: error: {_one_line(message)}\n")
    raise typer.Exit(code)


def _json_default(value: Any) -> str:
    """A string value that is not UTF-8 (kept as bytes, as the file has it), shown with escapes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except GGUFSplitError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    raise AssertionError("unreachable")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _split_table(report: Any) -> Table:
    table = Table(title=f"split into {report.directory}", title_justify="left")
    for col in ("file", "tensors", "bytes", "shared", "replaces"):
        table.add_column(col, justify="left" if col in ("file", "replaces") else "right", no_wrap=True)
    table.add_row(os.path.basename(report.foundation), str(report.foundation_tensors),
                  _size(report.foundation_bytes), "", "(all tasks)")
    for t in report.tasks:
        table.add_row(os.path.basename(t.adaptor), f"{t.tensors}/{t.model_tensors}", _size(t.adaptor_bytes),
                      f"{t.foundation_share:.0%}", f"{os.path.basename(t.source)} ({_size(t.source_bytes)})")
    table.add_section()
    table.add_row("total", "", _size(report.output_bytes), "", f"{_size(report.input_bytes)}")
    return table


_REASON_TEXT = {CHANGED: "with other bytes than another task's", RETYPED: "with another type or shape than "
                "another task's", ONLY_HERE: "that not every task has"}


def _print_split(report: Any) -> None:
    out.print(_split_table(report))
    out.print(f"output is {report.ratio:.1%} of the inputs: saves {_size(report.input_bytes - report.output_bytes)}. "
              "'shared' = the task's tensor bytes served by the foundation.")
    for t in report.tasks:
        counts: dict[str, list[str]] = {}
        for name, why in t.reasons.items():
            counts.setdefault(why, []).append(name)
        if counts:
            out.print(f"  {t.task}: {t.tensors} tensors of its own (" + "; ".join(
                f"{len(v)} {_REASON_TEXT.get(k, k)}" for k, v in counts.items()) + ")")
        only = counts.get(ONLY_HERE, [])
        if only:
            out.print(f"    kept in its adaptor, other tasks lack them: {', '.join(only)}")
        if t.missing:
            out.print(f"    has no {', '.join(t.missing)} (other tasks do)")
        if t.links:
            out.print(f"    llama.cpp: -m {t.links[0]}")


@app.command("split")
def split_cmd(
    spec: Optional[Path] = typer.Argument(None, help="YAML split spec (see specs/example.yaml)."),
    task: List[str] = typer.Option([], "--task", "-t", help="NAME=PATH of a model; repeat for each task."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="File-name prefix for the outputs."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    link: bool = typer.Option(False, "--link", help="Make <task>-00001-of-00002.gguf links for llama.cpp."),
    allow_unrelated: bool = typer.Option(False, "--allow-unrelated",
                                         help="Split models of different architectures or with no tensor in common."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Hashing threads (default: all cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Split models into foundation.gguf + adaptor-<task>.gguf (from a spec, --task options, or both)."""
    from .spec import SplitOptions, load_spec
    from .split import split

    def run() -> Any:
        opts = load_spec(spec) if spec is not None else SplitOptions()
        given: set[str] = set()
        for item in task:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise GGUFSplitError(None, f"--task {item!r}: expected NAME=PATH")
            if name in given:
                raise GGUFSplitError(None, f"--task {name}: task name given twice")
            given.add(name)
            if not os.path.isfile(path):
                raise GGUFSplitError(path, f"--task {name}: file not found")
            opts.tasks[name] = os.path.abspath(path)
        if output is not None:
            opts.output = os.fspath(output)
        if prefix is not None:
            opts.prefix = prefix
        opts.force |= force
        opts.link |= link
        opts.allow_unrelated |= allow_unrelated
        opts.quiet |= quiet or json_out
        if threads is not None:
            opts.threads = threads
        if not opts.tasks:
            raise GGUFSplitError(None, "no tasks: give a spec file or --task NAME=PATH")
        if opts.output is None:
            raise GGUFSplitError(None, "no output directory: give -o DIR or `output:` in the spec")
        return split(opts.tasks, opts.output, prefix=opts.prefix, force=opts.force, link=opts.link,
                     allow_unrelated=opts.allow_unrelated, threads=opts.threads, progress=Progress(opts.quiet))

    report = _run(run)
    if json_out:
        print(json.dumps(_split_json(report), indent=2, default=_json_default))
    else:
        _print_split(report)


def _split_json(report: Any) -> dict[str, Any]:
    return {
        "directory": report.directory, "foundation": report.foundation, "foundation_bytes": report.foundation_bytes,
        "foundation_tensors": report.foundation_tensors, "foundation_id": report.foundation_id,
        "input_bytes": report.input_bytes, "output_bytes": report.output_bytes, "ratio": report.ratio,
        "tasks": [{"task": t.task, "source": t.source, "source_bytes": t.source_bytes, "adaptor": t.adaptor,
                   "adaptor_bytes": t.adaptor_bytes, "tensors": t.tensors, "tensor_bytes": t.tensor_bytes,
                   "foundation_share": t.foundation_share, "reasons": t.reasons, "missing": t.missing,
                   "links": t.links} for t in report.tasks],
    }


@app.command("restore")
def restore_cmd(
    adaptor: Path = typer.Argument(..., help="adaptor-<task>.gguf"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Output file (default: the original file name, here)."),
    foundation: Optional[Path] = typer.Option(None, "--foundation", "-f",
                                              help="Foundation (default: the one recorded, beside the adaptor)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Rebuild a task's original GGUF, byte for byte (checked against its recorded xxh3-128)."""
    from .restore import restore

    r = _run(lambda: restore(adaptor, output, foundation=foundation, force=force, progress=Progress(quiet)))
    out.print(f"restored {r.task}: {r.output} ({_size(r.size)}, xxh3-128 {r.xxh3}, identical to the original)")


@app.command("verify")
def verify_cmd(
    paths: List[Path] = typer.Argument(..., help="A split directory, or a foundation and/or adaptors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Re-hash foundation and adaptors against the digests recorded at split time."""
    from .restore import resolve_split_args, verify

    def run() -> Any:
        foundation, adaptors = resolve_split_args([os.fspath(p) for p in paths])
        return verify(foundation, adaptors, progress=Progress(quiet))

    r = _run(run)
    tasks = ", ".join(r.adaptors) or "no adaptors"
    out.print(f"ok: {r.foundation} (foundation {r.foundation_id}) and {len(r.adaptors)} adaptor(s) ({tasks}): "
              f"{r.tensors} tensors, {_size(r.bytes)} match their recorded digests")


@app.command("info")
def info_cmd(
    paths: List[Path] = typer.Argument(..., help="GGUF files, or a split directory."),
    json_out: bool = typer.Option(False, "--json", help="JSON for scripts."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
) -> None:
    """What a foundation, an adaptor or any GGUF holds; for a split directory, the savings."""
    from .info import describe, savings

    def run() -> list[dict[str, Any]]:
        return [savings(p) if p.is_dir() else describe(p) for p in paths]

    items = _run(run)
    if json_out:
        if not tensors:
            for item in items:
                item.pop("tensor_list", None)
        print(json.dumps(items if len(items) > 1 else items[0], indent=2, default=_json_default))
        return
    for item in items:
        if "adaptors" in item:
            _print_savings(item)
        else:
            _print_file(item, tensors)


def _print_savings(s: dict[str, Any]) -> None:
    table = Table(title=f"split {s['directory']}", title_justify="left")
    for col in ("file", "tensors", "bytes", "replaces"):
        table.add_column(col, justify="left" if col in ("file", "replaces") else "right")
    f = s["foundation"]
    table.add_row(os.path.basename(f["path"]), str(f["tensors"]), _size(f["bytes"]), "shared")
    for a in s["adaptors"]:
        replaces = Text(f"{a['source']} ({_size(a['source_bytes'])})")
        if not a["foundation_match"]:
            replaces.append("  (other foundation!)", style="red")
        table.add_row(os.path.basename(a["path"]), str(a["tensors"]), _size(a["bytes"]), replaces)
    table.add_section()
    table.add_row("total", "", _size(s["output_bytes"]), f"inputs {_size(s['input_bytes'])}")
    out.print(table)
    if s["ratio"] is not None:
        out.print(f"output is {s['ratio']:.1%} of the inputs; saves {_size(s['saved_bytes'])}")


def _print_file(d: dict[str, Any], tensors: bool) -> None:
    out.print(Text.assemble((str(d["path"]), "bold"), f": {d['role']}, GGUF v{d['gguf_version']}, "
                            f"{d['architecture']}, {_size(d['file_bytes'])}"))
    out.print(f"  {d['tensors']} tensors ({_size(d['tensor_bytes'])}): "
              + ", ".join(f"{n} {k}" for k, n in sorted(d["types"].items())))
    if d["role"] == "foundation":
        out.print(f"  foundation id {d['foundation_id']}")
    elif d["role"] == "adaptor":
        src = d["source"]
        out.print(f"  task {d['task']}: {d['model_tensors']} tensors in the model, {d['tensors']} here, the rest "
                  f"in {d['foundation_file']} (foundation {d['foundation_id']})")
        out.print(f"  restores {src['name']} ({_size(src['bytes'])}, xxh3-128 {src['xxh3']}); {d['kvs']} metadata keys")
    elif d.get("split"):
        out.print(f"  llama.cpp split metadata: {d['split']}")
    if tensors:
        for t in d["tensor_list"]:
            out.print(f"  {t['name']:<40} {t['type']:<8} {str(t['shape']):<24} {_size(t['bytes'])}")


@app.command("link")
def link_cmd(
    task: str = typer.Argument(..., help="Task name."),
    directory: Path = typer.Argument(..., help="Split directory."),
    prefix: str = typer.Option("", "--prefix", help="File-name prefix used by the split."),
    force: bool = typer.Option(False, "--force", help="Replace existing files of those names."),
) -> None:
    """Make DIR/<task>-00001-of-00002.gguf (adaptor) and -00002-of-00002.gguf (foundation) links, the names
    llama.cpp's split loader looks for."""
    from .layout import K_FOUNDATION_FILE, ROLE_ADAPTOR, STR, open_output, record, require_role
    from .split import adaptor_name, check_task_name
    from .write import make_links

    def run() -> list[str]:
        check_task_name(task)
        a_name = adaptor_name(task, prefix)
        a_path = os.path.join(directory, a_name)
        with open_output(a_path) as ad:
            require_role(ad, ROLE_ADAPTOR)
            f_name = str(record(ad, K_FOUNDATION_FILE, STR))
        if not os.path.isfile(os.path.join(directory, f_name)):
            raise GGUFSplitError(os.path.join(directory, f_name), "foundation not found")
        return make_links(os.fspath(directory), task, a_name, f_name, force=force)

    links = _run(run)
    out.print(f"llama.cpp: llama-cli -m {links[0]}   (split 1 of 2: {os.path.basename(links[1])})")


@app.command("demo")
def demo_cmd(
    directory: Path = typer.Argument(Path("gguf-split-demo"), help="Where to build the demo (replaced on re-run)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Build a small base model and three fine-tunes, split, verify, restore, and show the savings."""
    from .demo import run_demo

    result = _run(lambda: run_demo(directory, Progress(quiet)))
    _print_split(result["split"])
    v = result["verify"]
    out.print(f"verify: {v.tensors} tensors match their recorded digests; foundation {v.foundation_id}")
    for task, same in result["restored_identical"].items():
        out.print(f"restore {task}: {'byte-identical to the original (sha256)' if same else 'DIFFERS'}")
    if not all(result["restored_identical"].values()):
        _fail("a restored model differs from its original", 1)


def main() -> None:
    app(prog_name="gguf-split")


if __name__ == "__main__":
    main()
