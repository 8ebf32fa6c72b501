"""README is the user's manual: its Python example must run as written (after `gguf-split demo`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gguf_split.demo import make_demo_models

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = next(b for b in python_blocks() if "open_split" in b)
    make_demo_models(tmp_path / "gguf-split-demo" / "models")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102 - our own README
    paths = namespace["paths"]
    assert paths[0] == str(tmp_path / "out" / "adaptor-code.gguf")
    assert len(paths) > 2 and all(Path(p).exists() for p in paths)
    assert (tmp_path / "chat-restored.gguf").read_bytes() == (tmp_path / "gguf-split-demo/models/chat.gguf").read_bytes()
    assert namespace["w"].shape == (64, 64)  # blk.0.attn_q.weight of the demo model, numpy order


def test_example_spec_runs_as_the_readme_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a checkout: `gguf-split demo && gguf-split split specs/example.yaml` (the spec's paths point at
    the demo's models beside specs/)."""
    import shutil

    from gguf_split import split as run_split
    from gguf_split.demo import run_demo
    from gguf_split.assemble.spec import load_spec

    shutil.copytree(README.parent / "specs", tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    run_demo("gguf-split-demo")
    assert "gguf-split demo && gguf-split split specs/example.yaml" in README.read_text(encoding="utf-8")
    spec = load_spec(tmp_path / "specs" / "example.yaml")
    report = run_split(spec.tasks, spec.output, spec.options)  # what `gguf-split split SPEC` runs
    assert len(report.tasks) == 4 and report.shares_anything


def test_readme_llama_cpp_python_recipe_runs(tmp_path: Path) -> None:
    """The high-level llama-cpp-python recipe, on a linked task of the demo split (skipped without the
    `llama` extra, except under CI=true)."""
    import os

    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"llama_cpp: {e}")
    from gguf_split.demo import run_demo

    report = run_demo(tmp_path / "demo")["split"]
    link = next(t for t in report.tasks if t.task == "chat").links[0]
    block = next(b for b in python_blocks() if "from llama_cpp import Llama" in b)
    code = block.replace('"out/chat-00001-of-00003.gguf"', repr(link))
    assert code != block, "the README recipe's model path changed: update this test"
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["llm"].n_vocab() == 320  # type: ignore[attr-defined]
