"""Commands that write a split: split, add, remove (the assemble layer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from .. import __version__
from ..errors import GGUFSplitError
from ..format.names import show
from .base import OPT_JSON, OPT_QUIET, OPT_TASK, OPT_THREADS, SPEC_HELP, app, flag_options, gather, progress, run_or_fail
from .render import out, print_add, print_json, print_split, report_json, size

_OPT_MAX_SHARED_FILES = typer.Option(None, "--max-shared-files", help="At most N files per task besides its adaptor, "
                                                                       "holes included (default 32).")
_CUT_HELP = ("Cut shared groups into files by tensor role and blocks of N layers (role:N), by role only (role), per "
             "tensor (tensor) or not at all (none): finer cuts let `add` reuse more of a fine-tune's unchanged "
             "tensors, at more files per task")
_OPT_FILE_COST = typer.Option(None, "--file-cost", help="A group of shared tensors gets its own file only if it saves "
                                                        "more bytes than this (default 1MiB).")
_OPT_MAX_SHARD_SIZE = typer.Option(None, "--max-shard-size", help="Cut files larger than this (e.g. 20G) into several.")
_OPT_DRY_RUN = typer.Option(False, "--dry-run", help="Plan and report; write nothing.")
_OPT_CACHE_DIR = typer.Option(None, "--cache-dir", help="Where per-file digests are kept (default: the user cache "
                                                        "directory, e.g. ~/.cache/gguf-split); a local disk.")
_OPT_NO_CACHE = typer.Option(False, "--no-cache", help="Hash every input; read and write no digest cache.")
_OPT_QUANTIZE = typer.Option(None, "--quantize", metavar="TYPE",
                             help="Quantize full-precision inputs to this llama-quantize type (Q4_K_M, Q8_0, ...) "
                                  "with one recipe, so what they share stays shared (needs the llama extra).")
_OPT_IMATRIX = typer.Option(None, "--imatrix", help="Importance matrix for --quantize (llama-imatrix's GGUF or .dat).")
_OPT_TEMPLATE = typer.Option(None, "--quantize-template",
                             help="A quantized model whose per-tensor types the quantized tasks take.")
_OPT_QUANTIZE_ARGS = typer.Option(None, "--quantize-args", metavar="'ARGS'",
                                  help="More llama-quantize options: --pure, --leave-output-tensor, --allow-requantize, "
                                       "--output-tensor-type T, --token-embedding-type T, --include-weights S, "
                                       "--exclude-weights S (give them as one argument: --quantize-args='--pure').")


@app.command("split")
def split_cmd(
    spec: Optional[Path] = typer.Argument(None, help=SPEC_HELP, show_default=False),
    models: List[Path] = typer.Argument(None, help="More model files.", show_default=False),
    task: List[str] = OPT_TASK,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output directory (the split)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="File-name prefix for every file of the split."),
    force: bool = typer.Option(False, "--force", help="Replace the split already in the output directory."),
    link: bool = typer.Option(False, "--link", help="Make <task>-0000k-of-0000N.gguf links for llama.cpp."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Also write llama-server's models directory."),
    allow_unrelated: bool = typer.Option(False, "--allow-unrelated",
                                         help="Split models of different architectures or with nothing in common."),
    max_shared_files: Optional[int] = _OPT_MAX_SHARED_FILES,
    cut: Optional[str] = typer.Option(None, "--cut", help=_CUT_HELP + " (default role:6)."),
    file_cost: Optional[str] = _OPT_FILE_COST,
    max_shard_size: Optional[str] = _OPT_MAX_SHARD_SIZE,
    threads: Optional[int] = OPT_THREADS,
    cache_dir: Optional[Path] = _OPT_CACHE_DIR,
    no_cache: bool = _OPT_NO_CACHE,
    quantize: Optional[str] = _OPT_QUANTIZE,
    imatrix: Optional[Path] = _OPT_IMATRIX,
    quantize_template: Optional[Path] = _OPT_TEMPLATE,
    quantize_args: Optional[str] = _OPT_QUANTIZE_ARGS,
    dry_run: bool = _OPT_DRY_RUN,
    quiet: bool = OPT_QUIET,
    json_out: bool = OPT_JSON,
) -> None:
    """Split models into a directory: per task adaptor-<task>.gguf plus the shared files it loads."""

    def run() -> Any:
        from ..assemble.options import SplitOptions
        from ..assemble.split import split

        flags = dict(prefix=prefix, force=force, link=link, models_dir=models_dir, allow_unrelated=allow_unrelated,
                     max_shared_files=max_shared_files, cut=cut, file_cost=file_cost, max_shard_size=max_shard_size,
                     threads=threads, cache_dir=cache_dir, no_cache=no_cache, quiet=quiet or json_out,
                     quantize=quantize, imatrix=imatrix, quantize_template=quantize_template,
                     quantize_args=quantize_args)
        flag_options(SplitOptions(), "split", **flags)  # a bad flag is refused before any file is looked at
        spec_ = gather(spec, models or [], task, need_output=output is None)
        opts = flag_options(spec_.options, "split", **flags)
        if not spec_.tasks:
            raise GGUFSplitError(None, "no tasks: give model files, -t NAME=PATH, or a spec file")
        out_dir = output if output is not None else spec_.output
        if out_dir is None:
            raise GGUFSplitError(None, "no output directory: give -o DIR or `output:` in the spec")
        return split(spec_.tasks, out_dir, opts, dry_run=dry_run, progress=progress(opts.quiet))

    report = run_or_fail(run)
    if json_out:
        print_json({"version": __version__, **report_json(report)})
    else:
        print_split(report)


@app.command("add")
def add_cmd(
    directory: Path = typer.Argument(..., help="The split directory."),
    models: List[Path] = typer.Argument(None, help=SPEC_HELP, show_default=False),
    task: List[str] = OPT_TASK,
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Also update llama-server's models directory."),
    allow_unrelated: bool = typer.Option(False, "--allow-unrelated", help="Add a model of another architecture."),
    max_shared_files: Optional[int] = _OPT_MAX_SHARED_FILES,
    cut: Optional[str] = typer.Option(None, "--cut", help=_CUT_HELP + " (default: as the split was cut)."),
    file_cost: Optional[str] = _OPT_FILE_COST,
    max_shard_size: Optional[str] = _OPT_MAX_SHARD_SIZE,
    threads: Optional[int] = OPT_THREADS,
    cache_dir: Optional[Path] = _OPT_CACHE_DIR,
    no_cache: bool = _OPT_NO_CACHE,
    quantize: Optional[str] = _OPT_QUANTIZE,
    imatrix: Optional[Path] = _OPT_IMATRIX,
    quantize_template: Optional[Path] = _OPT_TEMPLATE,
    quantize_args: Optional[str] = _OPT_QUANTIZE_ARGS,
    allow_recipe_change: bool = typer.Option(False, "--allow-recipe-change",
                                             help="Quantize with another recipe than the split's tasks were."),
    dry_run: bool = _OPT_DRY_RUN,
    quiet: bool = OPT_QUIET,
    json_out: bool = OPT_JSON,
) -> None:
    """Add tasks to a shipped split: no existing file changes; existing shared files are reused. A
    full-precision model added to a quantized split is quantized with the split's recipe."""

    def run() -> Any:
        from ..assemble.options import SplitOptions
        from ..assemble.update import add

        flags = dict(models_dir=models_dir, allow_unrelated=allow_unrelated, max_shared_files=max_shared_files,
                     cut=cut, file_cost=file_cost, max_shard_size=max_shard_size, threads=threads, cache_dir=cache_dir,
                     no_cache=no_cache, quiet=quiet or json_out, quantize=quantize, imatrix=imatrix,
                     quantize_template=quantize_template, quantize_args=quantize_args,
                     allow_recipe_change=allow_recipe_change)
        flag_options(SplitOptions(), "add", **flags)
        spec = next((m for m in models or [] if m.suffix.lower() in (".yaml", ".yml")), None)
        spec_ = gather(spec, [m for m in models or [] if m != spec], task, need_output=False)
        if spec is not None and spec_.output is not None and \
                os.path.realpath(spec_.output) != os.path.realpath(directory):
            raise GGUFSplitError(show(spec), f"output: {show(spec_.output)} is not the split directory {show(directory)}")
        if not spec_.tasks:
            raise GGUFSplitError(None, "no tasks to add: give model files, -t NAME=PATH, or a spec file")
        opts = flag_options(spec_.options, "add", **flags)
        return add(directory, spec_.tasks, opts, dry_run=dry_run, progress=progress(opts.quiet))

    report = run_or_fail(run)
    if json_out:
        from dataclasses import asdict

        print_json({"version": __version__, **asdict(report), "split": report_json(report.split)})
        return
    print_add(report)


@app.command("remove")
def remove_cmd(
    directory: Path = typer.Argument(..., help="The split directory."),
    names: List[str] = typer.Argument(..., help="Task names to remove."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Also update llama-server's models directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; delete nothing."),
    quiet: bool = OPT_QUIET,
    json_out: bool = OPT_JSON,
) -> None:
    """Remove tasks: their adaptors and every shared file no remaining task uses."""
    from ..assemble.update import remove

    r = run_or_fail(lambda: remove(directory, names, dry_run=dry_run, models_dir=models_dir, progress=progress(quiet)))
    if json_out:
        from dataclasses import asdict

        print_json({"version": __version__, **asdict(r)})
        return
    verb = "would delete" if r.dry_run else "deleted"
    out.print(f"removed {', '.join(r.removed_tasks)}: {verb} {len(r.deleted)} file(s), {size(r.freed_bytes)}: "
              f"{', '.join(r.deleted)}" + (f"; and {len(r.links)} llama.cpp link(s) to them" if r.links else ""))
