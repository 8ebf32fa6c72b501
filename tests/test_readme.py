"""README is the user's manual: its Python example must run as written (after `gguf-split demo`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gguf_split.demo import make_demo_models

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = next(b for b in python_blocks() if "Foundation.open" in b)
    make_demo_models(tmp_path / "gguf-split-demo" / "models")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["paths"] == [str(tmp_path / "out" / "adaptor-code.gguf"), str(tmp_path / "out" / "foundation.gguf")]
    assert (tmp_path / "chat-restored.gguf").read_bytes() == (tmp_path / "gguf-split-demo/models/chat.gguf").read_bytes()
    assert namespace["w"].shape == (64, 64)  # blk.0.attn_q.weight of the demo model, numpy order
