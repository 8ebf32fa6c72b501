"""Shared fixtures (the helpers they use, and the tests share, are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import base_tensors, write_model


@pytest.fixture
def model_factory(tmp_path: Path) -> Callable[..., str]:
    """model_factory("name", changes={tensor: seed or (type, shape, seed) or None}, **write_model kwargs):
    the base model with some tensors changed, added (new name) or removed (None)."""

    def make(name: str, changes: dict[str, Any] | None = None, **kwargs: Any) -> str:
        tensors = base_tensors()
        for t, change in (changes or {}).items():
            if change is None:
                tensors.pop(t, None)
            elif isinstance(change, int):
                qt, shape, _ = tensors[t]
                tensors[t] = (qt, shape, change)
            else:
                tensors[t] = change
        return write_model(tmp_path / f"{name}.gguf", tensors, **kwargs)

    return make
@pytest.fixture(autouse=True, scope="session")
def _private_manifest_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The CLI's split, add and survey keep per-file digests in the user's cache directory: tests use their
    own, never the real ~/.cache/gguf-split."""
    old = os.environ.get("GGUF_SPLIT_CACHE_DIR")
    os.environ["GGUF_SPLIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("manifest-cache"))
    yield
    if old is None:
        os.environ.pop("GGUF_SPLIT_CACHE_DIR", None)
    else:
        os.environ["GGUF_SPLIT_CACHE_DIR"] = old
