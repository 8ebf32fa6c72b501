"""The package's shape, checked: layers import only downwards, no import circles, and functions stay short.

Why a test: the layers (format, disk, splitdir, assemble, lora, runtime, pack, survey, cli) are what lets
a newcomer find their room, and short functions are what lets a reviewer read one; both erode one commit
at a time unless something fails when they do. The limits are the ones README's Development section states.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gguf_split"
# bottom to top; a module may import its own layer and the ones below it (lazily too)
LAYERS = ["errors", "format", "disk", "splitdir", "assemble", "lora", "runtime", "pack", "survey", "app"]
APP = {"cli", "demo", "_main", "__main__", "__init__"}
MAX_LINES = 80
MAX_COMPLEXITY = 25


def layer_of(module: str) -> int:
    """module: dotted name under gguf_split ('assemble.split', 'errors', '__init__')."""
    top = module.split(".")[0]
    return LAYERS.index("app") if top in APP else LAYERS.index(top)


def modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(PKG).with_suffix("").parts)
        out.append((name, ast.parse(path.read_text(encoding="utf-8"), str(path))))
    return out


def imported(module: str, tree: ast.Module) -> list[tuple[int, str]]:
    """(line, target module under gguf_split) of every import of the package's own modules, lazy ones too."""
    package = module.split(".")[:-1] if not module.endswith("__init__") else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            if not target:  # `from .. import __version__`: the top package
                continue
            for alias in node.names:
                sub = [*target, alias.name]
                as_module = PKG.joinpath(*sub)
                out.append((node.lineno, ".".join(sub) if as_module.with_suffix(".py").exists()
                            or as_module.is_dir() else ".".join(target)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gguf_split."):
            out.append((node.lineno, node.module.removeprefix("gguf_split.")))
    return out


def test_layers_import_only_downwards() -> None:
    upward = []
    for module, tree in modules():
        if module.split(".")[0] in APP:
            continue
        for line, target in imported(module, tree):
            if layer_of(target) > layer_of(module):
                upward.append(f"gguf_split/{module.replace('.', '/')}.py:{line} imports {target}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    """No two modules import each other, through any chain (lazy imports count: a circle is still a pair of
    modules that cannot be read, tested or moved one without the other)."""
    trees = dict(modules())

    def module_of(target: str) -> str | None:
        return target if target in trees else target + ".__init__" if target + ".__init__" in trees else None

    graph = {m: {t for _, imp in imported(m, tree) if (t := module_of(imp)) not in (None, m)}
             for m, tree in trees.items()}
    circles = []
    for start in graph:  # a module that reaches itself is on a circle
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == start:
                circles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
    assert not circles, "modules on an import circle: " + ", ".join(sorted(circles))


def test_functions_are_short() -> None:
    long = []
    for module, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"gguf_split/{module.replace('.', '/')}.py:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


def test_functions_are_simple() -> None:
    """Cyclomatic complexity (ruff's C901, mccabe) at most MAX_COMPLEXITY; ruff comes with the test extra."""
    ruff = shutil.which("ruff") or (str(Path(sys.executable).with_name("ruff"))
                                    if Path(sys.executable).with_name("ruff").exists() else None)
    if ruff is None:
        if os.environ.get("CI", "").lower() == "true":
            raise AssertionError("ruff is missing: pip install -e '.[test]'")
        pytest.skip("ruff is not installed")
    p = subprocess.run([ruff, "check", "--no-cache", "--select", "C901", "--config",
                        f"lint.mccabe.max-complexity={MAX_COMPLEXITY}", str(PKG)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
