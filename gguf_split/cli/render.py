"""Rendering results: plain aligned lines on stdout, and JSON.

Reports go to stdout as plain lines: never wrapped (scripts and logs get whole lines, a terminal wraps
what is too wide), cheap for thousands of rows (rich draws the progress bars only), and every name that is
not valid UTF-8 is shown with escapes. Each result type of the library has its printer here; `info`'s
results are typed, and `print_info` picks the printer by the result's type.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from functools import singledispatch
from typing import Any

from ..format.names import show


class _Out:
    def print(self, *args: Any) -> None:
        sys.stdout.write(" ".join(map(str, args)) + "\n")


out = _Out()


def one_line(text: str) -> str:
    """Control characters (text from a damaged file may hold them) escaped: an error stays one line and
    cannot drive the terminal; file names that are not UTF-8 are shown with escapes."""
    text = show(text)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):  # a string value that is not UTF-8, kept as bytes as the file has it
        return value.decode("utf-8", "backslashreplace")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def table(title: str, columns: tuple[str, ...], rows: Sequence[tuple[str, ...]], total: tuple[str, ...],
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


def files_table(title: str, files: list[tuple[str, int, str, int, list[str]]],
                adaptors: list[tuple[str, str, int, str]], output_bytes: int, input_bytes: int) -> None:
    """The table `split`, `add` and `info DIR` print: every shared file with the tasks that load it, then
    every adaptor with the model(s) it replaces."""
    n = len(adaptors)
    rows = [(name, str(pos), tensors, size(nbytes), "all tasks" if len(users) == n and n > 1 else ", ".join(users))
            for name, pos, tensors, nbytes, users in files]
    rows += [(name, "0", tensors, size(nbytes), replaces) for name, tensors, nbytes, replaces in adaptors]
    table(title, _FILE_COLUMNS, rows, ("total", "", "", size(output_bytes), f"inputs {size(input_bytes)}"))


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


def print_split(report: Any, title: str = "split into", add: Any = None) -> None:
    """The files table, the savings line, then per task why each tensor of its adaptor is not shared and how
    many files it loads. With `add` (an AddReport), the lines about bytes describe the add."""
    files_table(f"{title} {show(report.directory)}" + (" (dry run: nothing written)" if report.dry_run else ""),
                [(f.name + (" (kept)" if f.kept else ""), f.position, str(f.tensors), f.bytes, f.tasks)
                 for f in report.files],
                [(os.path.basename(t.adaptor), f"{t.tensors}/{t.model_tensors}", t.adaptor_bytes,
                  f"{t.task} (replaces {', '.join(os.path.basename(s) for s in t.sources)}, "
                  f"{size(t.source_bytes)})") for t in report.tasks],
                report.output_bytes, report.input_bytes)
    if add is not None:
        _print_add_bytes(add)
    else:
        _print_savings_line(report)
    if report.quantize is not None:
        _print_quantize(report.quantize)
    for line in report.near_misses.lines() if report.near_misses is not None else []:
        out.print(f"note: {line}")
    holes = {f.name for f in report.files if f.kind == "hole"}
    for t in report.tasks:
        _print_task_reasons(t, holes)
    if report.oversize:
        out.print(f"note: {len(report.oversize)} file(s) over --max-shard-size {size(report.max_shard_size)}, "
                  "each one tensor larger than that (a tensor cannot be cut): "
                  + ", ".join(f"{name} ({size(nbytes)})" for name, nbytes in report.oversize))
    if report.removed:
        out.print(f"removed {len(report.removed)} file(s) of the previous split no task uses any more: "
                  f"{', '.join(report.removed)}")
    if report.models_dir:
        out.print(f"llama-server: --models-dir {show(report.models_dir)}")


def _print_savings_line(report: Any) -> None:
    if not report.shares_anything:
        why = "one model" if len(report.tasks) == 1 else "no group of shared tensors pays for a file (see --file-cost)"
        out.print(f"nothing is shared ({why}): the split is {size(-report.saved_bytes)} larger than the inputs "
                  "(each adaptor adds gguf-split's records); it restores byte for byte all the same")
    else:
        out.print(f"the split is {report.ratio:.1%} of the inputs: saves {size(report.saved_bytes)}; every "
                  f"distinct tensor once would take {size(report.dedup_optimum)} of tensor bytes"
                  + ("" if report.exact else f" (greedy plan; lower bound {size(report.lower_bound)})"))


def _print_quantize(q: Any) -> None:
    """What --quantize did: the recipe and build, per task what it stands for and how many of its tensors
    were quantized here, the inputs kept as they were, and notes."""
    recipe = " ".join(x for x in (q.qtype, q.options, f"--imatrix {q.imatrix}" if q.imatrix else "",
                                  f"--quantize-template {q.template}" if q.template else "") if x)
    build = f"ggml {q.build.get('ggml_version', '?')} {q.build.get('ggml_commit', '')}".rstrip()
    total = sum(t.quantized for t in q.tasks)
    if q.dry_run:
        work = f"{sum(t.new_units for t in q.tasks):,} distinct tensors to quantize for {total:,} quantized tensors " \
               "(dry run: none quantized; tensors matched by unit key)"
    else:
        work = f"{q.units:,} distinct tensors quantized once ({size(q.unit_bytes)}) for {total:,} quantized tensors"
        work += f", {q.reused_units:,} taken from the split" if q.reused_units else ""
    out.print(f"quantized {len(q.tasks)} task(s) as llama-quantize {recipe} (llama.cpp {build}): {work}; "
              f"{q.seconds:.1f} s")
    for t in q.tasks:
        types = ", ".join(f"{n} {k}" for k, n in sorted(t.types.items(), key=lambda kv: -kv[1]))
        out.print(f"  {t.task}: {t.output} from {os.path.basename(t.source)} ({types}); {t.quantized} tensors "
                  f"quantized: {t.new_units} new, {t.reused} the same as another task's")
        for w in t.warnings:
            out.print(f"    {w}")
    for task, why in q.kept.items():
        out.print(f"  {task}: {why}")
    for note in q.notes:
        out.print(f"note: {note}")


def _print_quantized_records(q: dict[str, Any]) -> None:
    src = q["from"]
    recipe = " ".join(x for x in (q["type"], q["options"], f"--imatrix {q['imatrix']}" if q["imatrix"] else "",
                                  f"--quantize-template {q['template']}" if q["template"] else "") if x)
    out.print(f"  quantized by the split from {src['name']} ({size(src['bytes'])}, xxh3-128 {src['xxh3']}; not kept) "
              f"as llama-quantize {recipe} writes it: sha256 {q['sha256']}")
    if q["imatrix_sha256"]:
        out.print(f"  imatrix sha256 {q['imatrix_sha256']}")
    b = q["build"]
    out.print(f"  llama.cpp: llama-cpp-python {b.get('llama_cpp_python', '?')}, ggml {b.get('ggml_version', '?')} "
              f"{b.get('ggml_commit', '')}; {b.get('system_info', '')}")


def _print_task_reasons(t: Any, holes: set[str]) -> None:
    counts: dict[str, list[str]] = {}
    for name, why in t.reasons.items():
        counts.setdefault(why, []).append(name)
    why = "; ".join(f"{len(v)} {_REASONS.get(k, k)}" for k, v in counts.items())
    out.print(f"  {t.task}: {t.tensors} tensors in its adaptor: {why or 'every tensor is in a shared file'}")
    if len(t.files) > 1:
        n_holes = sum(os.path.basename(f) in holes for f in t.files)
        out.print(f"    loads {len(t.files)} files besides its adaptor"
                  + (f", {n_holes} of them hole{'s' if n_holes > 1 else ''} (empty files that fill its list)"
                     if n_holes else ""))
    if t.missing:
        out.print(f"    has no {', '.join(t.missing)} (other tasks do)")
    if t.links:
        out.print(f"    llama.cpp: -m {show(t.links[0])}")


def report_json(report: Any) -> dict[str, Any]:
    """A split report as JSON: its fields and its derived totals."""
    from dataclasses import asdict

    d = asdict(report)
    d.update(input_bytes=report.input_bytes, output_bytes=report.output_bytes, saved_bytes=report.saved_bytes,
             ratio=report.ratio, oversize=report.oversize)
    return d


def print_add(report: Any) -> None:
    print_split(report.split, title="added to", add=report)


def _print_add_bytes(report: Any) -> None:
    """What the add wrote against the new models (not the split-wide savings: the existing files were
    there before), what it reused, what no layout could reuse, and what a fresh split would save."""
    n = len(report.split.tasks)
    new = "the new task" if n == 1 else f"the {n} new tasks"
    share = f" ({report.new_bytes / report.model_bytes:.1%})" if report.model_bytes else ""
    out.print(f"wrote {size(report.new_bytes)} of tensors for {new}'s {size(report.model_bytes)}{share}; reused "
              f"{size(report.reused_bytes)} from files already in the split (tasks there: "
              f"{', '.join(report.existing_tasks)}; new shared files cut {report.cut})")
    if report.new_bytes > report.unique_bytes:
        out.print(f"  {size(report.unique_bytes)} of it no task of the split holds; "
                  f"{size(report.in_adaptors_bytes)} sits in other tasks' adaptors, which no layout can reuse "
                  "(shipped files never change)")
    if report.resplit_would_save > 0:
        out.print(f"a fresh split of all {len(report.existing_tasks) + n} tasks would store "
                  f"{size(report.resplit_would_save)} less (it needs every original model; devices would then "
                  "download every file again)")
    else:
        out.print("a fresh split of all tasks would store no less")


# ---------------------------------------------------------------------------------------------------------
# info: one printer per result type


@singledispatch
def print_info(info: Any, tensors: bool = False) -> None:
    raise TypeError(f"no printer for {type(info).__name__}")


def register_info_printers() -> None:
    """Bind the printers to the result types (imported here, not at module level: `render` is imported by
    every command, and the info types pull in the split-directory layer)."""
    from ..pack.transport import PackInfo
    from ..splitdir.info import FileInfo, SplitInfo, TaskFilesInfo

    print_info.register(FileInfo, _print_file)
    print_info.register(SplitInfo, _print_savings)
    print_info.register(TaskFilesInfo, _print_task_files)
    print_info.register(PackInfo, _print_pack)


def _print_pack(d: Any, tensors: bool = False) -> None:
    total = sum(f["bytes"] for f in d.files)
    out.print(f"{show(d.path)}: gguf-split pack v{d.pack_version} of {d.kind}, {size(d.pack_bytes)} for "
              f"{len(d.files)} files ({size(total)}), {d.tensors} distinct tensors")
    for f in d.files:
        out.print(f"  {f['name']}\t{f['bytes']}\tsha256 {f['sha256']}")


def _print_task_files(d: Any, tensors: bool = False) -> None:
    for r in d.files:
        out.print(f"{show(r['path'])}\t{r['bytes']}\t{r['sha256'] or '-'}")
    out.print(f"task {d.task}: {len(d.files)} files, {size(d.bytes)}; give llama.cpp the first "
              "(llama_model_load_from_splits takes them in this order)")


def _print_savings(s: Any, tensors: bool = False) -> None:
    files_table(f"split {show(s.directory)}",
                [(f["name"], f["position"], str(f["tensors"]), f["bytes"], f["tasks"]) for f in s.files],
                [(os.path.basename(t["path"]), str(t["tensors"]), t["bytes"],
                  f"{t['task']} (replaces {', '.join(t['sources'])}, {size(t['source_bytes'])}"
                  + (f"; {t['quantized']['type']} of {t['quantized']['from']['name']}" if t.get("quantized") else "")
                  + ")") for t in s.tasks],
                s.output_bytes, s.input_bytes)
    if s.ratio is not None:
        out.print(f"the split is {s.ratio:.1%} of the inputs: saves {size(s.saved_bytes)}; "
                  f"{size(s.over_optimum_bytes)} over the dedup optimum (every distinct tensor once + "
                  "every adaptor's header)")
    if s.unused:
        out.print(f"note: shared file(s) no task uses: {', '.join(s.unused)}")
    for line in s.near_miss_lines:
        out.print(f"note: {line}")


def _print_file(d: Any, tensors: bool = False) -> None:
    if d.hole:
        out.print(f"{show(d.path)}: hole, GGUF v{d.gguf_version}, {size(d.file_bytes)}")
        out.print(f"  split.no {d.split_no}, no tensors: fills position {d.split_no} in the file list of a "
                  "task that loads no other file there (llama.cpp loads split.no 1..k without a gap)")
        return
    out.print(f"{show(d.path)}: {d.role}, GGUF v{d.gguf_version}, {d.architecture or 'no architecture'}, "
              f"{size(d.file_bytes)}")
    out.print(f"  {d.tensors} tensors ({size(d.tensor_bytes)}): "
              + ", ".join(f"{n} {k}" for k, n in sorted(d.types.items())) if d.tensors else "  no tensors")
    if d.role == "shared":
        out.print(f"  shared file at split.no {d.split_no}, content id {d.content_id}")
    elif d.role == "adaptor":
        out.print(f"  task {d.task}: {d.model_tensors} tensors in the model, {d.tensors} here; {d.kvs} metadata keys")
        for f in d.files:
            out.print(f"  split.no {f['position']}: {f['name']} ({size(f['bytes'])})")
        for s in d.sources:
            out.print(f"  restores {s['name']} ({size(s['bytes'])}, xxh3-128 {s['xxh3']})")
        if d.quantized:
            _print_quantized_records(d.quantized)
    elif d.split:
        out.print(f"  llama.cpp split metadata: {d.split}")
    if tensors:
        for t in d.tensor_list:
            out.print(f"  {t['name']:<40} {t['type']:<8} {str(t['shape']):<24} {size(t['bytes'])}")
