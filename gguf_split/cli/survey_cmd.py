"""`gguf-split survey PATH...`: which of these models are one family, and what would a split save?

The library call is gguf_split.survey.run.survey; this module parses the options, opens the manifest cache
and prints the report (plain lines, or `--json`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from .. import __version__
from ..format.names import show
from .base import OPT_THREADS, app, flag_options, progress, run_or_fail
from .render import out, print_json, size


@app.command("survey")
def survey_cmd(
    paths: List[Path] = typer.Argument(..., help="Folders (searched recursively for *.gguf) and GGUF files.",
                                       show_default=False),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir",
                                             help="Where to keep per-file digests (default: the user cache "
                                                  "directory, e.g. ~/.cache/gguf-split). Must be a local disk."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Hash every file; read and write no cache."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help="Scan on a Dask cluster (tcp://HOST:8786; the distributed extra)."),
    file_cost: Optional[str] = typer.Option(None, "--file-cost", help="As for split (default 1MiB)."),
    max_shared_files: Optional[int] = typer.Option(None, "--max-shared-files", help="As for split."),
    threads: Optional[int] = OPT_THREADS,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notices."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Find GGUF models, hash each file once (cached), group them into families that share tensors, and
    say what a split of each would store and save (with the command to run)."""

    def run() -> Any:
        from ..assemble.options import SplitOptions
        from ..disk.manifest_cache import open_cache
        from ..survey.run import survey

        opts = flag_options(SplitOptions(), "survey", file_cost=file_cost, max_shared_files=max_shared_files,
                            threads=threads, cache_dir=cache_dir, no_cache=no_cache, quiet=quiet or json_out)
        bar = progress(opts.quiet)
        if json_out and not quiet:
            bar.notes = True  # notices go to stderr: the JSON on stdout stays clean
        cache = open_cache(opts.cache_dir, no_cache=opts.no_cache, note=bar.note)
        try:
            return survey([os.fspath(p) for p in paths], opts, cache=cache if cache is None or cache.enabled else None,
                          scheduler=scheduler, progress=bar)
        finally:
            if cache is not None:
                cache.close()

    report = run_or_fail(run)
    if json_out:
        print_json({"version": __version__, **report.to_json()})
    else:
        print_survey(report)


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def print_survey(r: Any) -> None:
    s = r.scan
    n_models = sum(len(f.members) for f in r.families) + len(r.alone)
    where = f" on {s.scheduler}" if s.scheduler else ""
    out.print(f"surveyed {s.files} file(s), {size(s.bytes)}: {n_models} model(s) in {len(r.families)} "
              f"famil{'y' if len(r.families) == 1 else 'ies'}, {len(r.alone)} alone; hashed {s.hashed_files} file(s) "
              f"({size(s.hashed_bytes)}){where}, {s.cached_files} from the cache; {s.seconds:.1f} s")
    for k, f in enumerate(r.families, start=1):
        out.print("")
        out.print(f"family {k}: {f.label} ({f.architecture}), {len(f.members)} models, {size(f.input_bytes)}: a split "
                  f"stores {size(f.split_bytes)}, saves {size(f.saved_bytes)} ({_pct(f.saved_bytes, f.input_bytes)}); "
                  f"every distinct tensor once: {size(f.dedup_bytes)}")
        width = max(len(m.task) for m in f.members)
        for m in f.members:
            out.print(f"  {m.task.ljust(width)}  {size(m.bytes):>12}  {m.type:<7} {m.shared:>4.0%} shared  {show(m.path)}")
        for note in f.notes:
            out.print(f"  note: {note}")
        out.print(f"  {f.command}")
    if r.related:
        out.print("")
        out.print("related, but sharing little (one configuration: the same tensor names and shapes):")
        family_of = {m.path: k for k, f in enumerate(r.families, start=1) for m in f.members}
        for rel in r.related:
            names = list(dict.fromkeys(f"family {family_of[p]}" if p in family_of else show(p) for p in rel.members))
            out.print(f"  {', '.join(names)}: {rel.text}")
    if r.alone:
        out.print("")
        out.print(f"alone (no family): {len(r.alone)}")
        for m in r.alone:
            out.print(f"  {show(m.path)}  {m.architecture} {m.type} {size(m.bytes)}")
    for sp in r.splits:
        out.print(f"gguf-split split: {show(sp.directory)} (tasks {', '.join(sp.tasks) or '-'}; {len(sp.files)} files, "
                  f"{size(sp.bytes)})")
    for p in r.packs:
        out.print(f"gguf-split pack: {show(p.path)} ({p.kind}{': ' + ', '.join(p.tasks) if p.tasks else ''}; "
                  f"{size(p.bytes)})")
    for o in r.others:
        out.print(f"not a model ({o.type}): {show(o.path)}")
    for problem in r.skipped:
        out.print(f"skipped {problem}")
