"""Stock llama.cpp runs every task of a split exactly like the original model.

The demo models (a tiny llama model with an SPM vocabulary and three export-lora-style fine-tunes) are split
with named links; for every task, llama.cpp (llama-cpp-python's low-level C API) decodes a fixed prompt of
token ids from
  - the original GGUF,
  - [adaptor, foundation] given to llama_model_load_from_splits,
  - the `<task>-00001-of-00002.gguf` link alone (llama.cpp finds split 2 by its name),
  - the file `gguf_split.restore.restore` rebuilds,
and the last token's logits (all n_vocab float32) must be bitwise identical.

An adaptor paired with the foundation of another split: llama.cpp itself checks names, shapes and counts
only, so a foreign foundation with the same tensor names and shapes loads without a word and computes
other logits; gguf-split's verify (library and CLI) and restore refuse the pair, naming the adaptor.

Skipped when llama_cpp cannot be imported, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import filecmp
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import llama_harness as H

if H.IMPORT_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{H.IMPORT_ERROR} (CI=true: the llama.cpp tests must run)", pytrace=False)
    pytest.skip(H.IMPORT_ERROR, allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

from gguf_split.cli import app  # noqa: E402
from gguf_split.demo import Dims  # noqa: E402
from gguf_split.errors import GGUFSplitError  # noqa: E402
from gguf_split.gguf_format import GGUFFile  # noqa: E402
from gguf_split.restore import restore, verify  # noqa: E402
from gguf_split.split import SplitReport, split  # noqa: E402

TASKS = ("base", "chat", "code", "summarize")


@dataclass
class Split:
    models: dict[str, str]  # task -> original GGUF
    report: SplitReport

    def adaptor(self, task: str) -> str:
        return next(t.adaptor for t in self.report.tasks if t.task == task)

    @property
    def foundation(self) -> str:
        return self.report.foundation


def make_split(root: Path, tasks: tuple[str, ...] = TASKS, **demo_args: int) -> Split:
    models = H.demo_models(root / "models", **demo_args)
    chosen = {t: models[t] for t in tasks}
    return Split(chosen, split(chosen, root / "split", link=True))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Split:
    return make_split(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def original_logits(demo: Split) -> dict[str, bytes]:
    return {task: H.last_logits([path]) for task, path in demo.models.items()}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Split:
    """The same tasks made from a base model with other random weights: same tensor names, types, shapes."""
    return make_split(tmp_path_factory.mktemp("foreign"), base_seed=7)


def test_fine_tunes_give_distinct_finite_logits(original_logits: dict[str, bytes]) -> None:
    """The comparisons below can fail: every task's own tensors change the logits."""
    for task, raw in original_logits.items():
        values = np.frombuffer(raw, dtype=np.float32)
        assert values.size == Dims().n_vocab, task
        assert np.isfinite(values).all() and values.std() > 0, task
    for a, b in itertools.combinations(original_logits, 2):
        assert original_logits[a] != original_logits[b], (a, b)


@pytest.mark.parametrize("task", TASKS)
def test_split_list_gives_identical_logits(demo: Split, original_logits: dict[str, bytes], task: str) -> None:
    assert H.last_logits([demo.adaptor(task), demo.foundation]) == original_logits[task]


@pytest.mark.parametrize("task", TASKS)
def test_named_link_gives_identical_logits(demo: Split, original_logits: dict[str, bytes], task: str) -> None:
    first, second = (Path(demo.report.directory) / f"{task}-0000{i}-of-00002.gguf" for i in (1, 2))
    assert first.resolve() == Path(demo.adaptor(task)).resolve()
    assert second.resolve() == Path(demo.foundation).resolve()
    assert H.last_logits([first]) == original_logits[task]


@pytest.mark.parametrize("task", TASKS)
def test_restored_model_gives_identical_logits(demo: Split, original_logits: dict[str, bytes], task: str,
                                               tmp_path: Path) -> None:
    out = restore(demo.adaptor(task), tmp_path / f"{task}.gguf").output
    assert filecmp.cmp(out, demo.models[task], shallow=False)
    assert H.last_logits([out]) == original_logits[task]


def test_adaptor_alone_is_refused_by_llama_cpp(demo: Split) -> None:
    """Opened by its own name, an adaptor (split 0 of 2) does not run on its own: the link name is needed."""
    with pytest.raises(H.LlamaLoadError, match="invalid split file name"):
        H.load_model([demo.adaptor("chat")])


def _tensor_table(path: str) -> list[tuple[str, int, tuple[int, ...]]]:
    with GGUFFile(path) as f:
        return [(t.name, int(t.ggml_type), tuple(t.shape)) for t in f.header.tensors]


def _assert_gguf_split_refuses(adaptor: str, foundation: str) -> None:
    """verify (library and CLI) and restore refuse the pair and name the adaptor."""
    with pytest.raises(GGUFSplitError) as err:
        verify(foundation, [adaptor])
    assert err.value.path == adaptor
    with pytest.raises(GGUFSplitError) as err:
        restore(adaptor, Path(adaptor).with_name("never-written.gguf"), foundation=foundation)
    assert err.value.path == adaptor
    assert not Path(adaptor).with_name("never-written.gguf").exists()
    result = CliRunner().invoke(app, ["verify", "-q", foundation, adaptor])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"gguf-split: error: {adaptor}: ")


def test_foreign_foundation_with_same_tensors_loads_silently_with_other_logits(
        demo: Split, foreign: Split, original_logits: dict[str, bytes]) -> None:
    """llama.cpp checks tensor names, shapes and counts, not contents: it runs the mixed pair without a
    warning and computes logits of neither model. gguf-split refuses the pair."""
    assert _tensor_table(foreign.foundation) == _tensor_table(demo.foundation)
    assert open(foreign.foundation, "rb").read() != open(demo.foundation, "rb").read()
    adaptor = demo.adaptor("chat")
    mark = H.log_mark()
    with H.loaded([adaptor, foreign.foundation]) as model, H.context(model) as ctx:
        mixed = H.decode_last_logits(model, ctx)
    assert H.log_since(mark, H.WARN) == []
    assert mixed != original_logits["chat"]
    assert mixed != H.last_logits([foreign.models["chat"]])
    assert np.isfinite(np.frombuffer(mixed, dtype=np.float32)).all()
    _assert_gguf_split_refuses(adaptor, foreign.foundation)


@pytest.mark.parametrize("kind, llama_error", [
    ("other tensor set", r"tensor '[^']+' is duplicated"),
    ("other shapes", r"tensor '[^']+' has wrong shape"),
])
def test_foreign_foundation_with_other_tensors_is_refused_by_llama_cpp(
        demo: Split, tmp_path: Path, kind: str, llama_error: str) -> None:
    """A foundation of a split of other tasks holds tensors the adaptor also holds; one of a model with
    other dimensions has tensors of other shapes: llama.cpp refuses both, and so does gguf-split."""
    if kind == "other tensor set":
        other = make_split(tmp_path, ("base", "chat"), base_seed=7)
    else:
        other = make_split(tmp_path, n_ff=2 * Dims().n_ff)
    adaptor = demo.adaptor("code")
    with pytest.raises(H.LlamaLoadError, match=llama_error):
        H.load_model([adaptor, other.foundation])
    _assert_gguf_split_refuses(adaptor, other.foundation)
