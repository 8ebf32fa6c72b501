"""`gguf-split split --quantize` as a user runs it: its flags and spec keys, and every bad input (a type
llama-quantize does not know, an imatrix for another model, a corrupt imatrix, no llama.cpp binding) is one
line naming the problem, exit code 2, and nothing written.

Runs the command in process (typer's CliRunner) except where the environment matters (no binding: a real
process whose llama_cpp import fails). Needs the llama extra, like tests/assemble/test_quantize_split.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import llama_harness as H

if H.IMPORT_ERROR is not None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{H.IMPORT_ERROR} (CI=true: the llama.cpp tests must run)", pytrace=False)
    pytest.skip(H.IMPORT_ERROR, allow_module_level=True)

from gguf_split.cli.app import app  # noqa: E402
from helpers import (  # noqa: E402
    SMALL,
    command,
    dat_bytes,
    make_model,
    matmul_inputs,
    one_line,
    random_entries,
    write_imatrix_gguf,
)


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qcli")
    make_model(d / "base-f16.gguf", **SMALL)
    make_model(d / "chat-f16.gguf", changed=["blk.2.attn_q.weight"], **SMALL)
    write_imatrix_gguf(d / "imatrix.gguf", random_entries(matmul_inputs(**SMALL)))
    return d


def test_split_quantize_from_a_spec(models: Path, tmp_path: Path) -> None:
    """Spec keys under options:, the imatrix path relative to the spec; the report says what was quantized."""
    spec = tmp_path / "family.yaml"
    spec.write_text(f"output: out\ntasks:\n  base: {models / 'base-f16.gguf'}\n  chat: {models / 'chat-f16.gguf'}\n"
                    f"options:\n  quantize: q4_k\n  imatrix: {os.path.relpath(models / 'imatrix.gguf', tmp_path)}\n"
                    "  quantize_args: --leave-output-tensor\n  file_cost: 0\n")
    code, out, err = cli("split", spec)
    assert code == 0, err
    assert "quantized 2 task(s) as llama-quantize Q4_K_M --leave-output-tensor --imatrix imatrix.gguf" in out
    assert "chat: chat-Q4_K_M.gguf from chat-f16.gguf" in out
    code, out, err = cli("info", tmp_path / "out")
    assert code == 0 and "(replaces chat-Q4_K_M.gguf" in out and "Q4_K_M of chat-f16.gguf" in out


BAD = {
    "type": (["--quantize", "Q9_Z"], None, "--quantize: unknown quantization type 'Q9_Z'"),
    "imatrix alone": (["--imatrix", "{d}/imatrix.gguf"], None, "--imatrix is given without --quantize TYPE"),
    "args": (["--quantize", "Q4_0", "--quantize-args=--keep-split"], None,
             "'--keep-split' is not a llama-quantize option gguf-split passes on"),
    "other model": (["--quantize", "Q4_K_M", "--imatrix", "{t}/other.gguf"], "{t}/other.gguf",
                    "no imatrix entry matches a tensor of"),
    "other sizes": (["--quantize", "Q4_K_M", "--imatrix", "{t}/wide.gguf"], "{t}/wide.gguf",
                    "has 512 values but"),
    "corrupt": (["--quantize", "Q4_K_M", "--imatrix", "{t}/cut.gguf"], "{t}/cut.gguf", "past the end of the file"),
    "corrupt dat": (["--quantize", "Q4_K_M", "--imatrix", "{t}/cut.dat"], "{t}/cut.dat", "truncated imatrix"),
    "missing": (["--quantize", "Q4_K_M", "--imatrix", "{t}/nothing.dat"], "{t}/nothing.dat", "cannot read imatrix"),
    "needs imatrix": (["--quantize", "IQ2_XXS"], "{d}/base-f16.gguf", "needs an importance matrix"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_quantize_input_is_one_line_and_writes_nothing(models: Path, tmp_path: Path, case: str) -> None:
    write_imatrix_gguf(tmp_path / "other.gguf", random_entries({"model.layers.0.q_proj": 256}))
    write_imatrix_gguf(tmp_path / "wide.gguf", random_entries({k: 2 * v for k, v in matmul_inputs(**SMALL).items()}))
    (tmp_path / "cut.gguf").write_bytes((models / "imatrix.gguf").read_bytes()[:-300])
    (tmp_path / "cut.dat").write_bytes(dat_bytes([("a.weight", 3, [1.0] * 256)])[:-20])
    args, named, fragment = BAD[case]
    fmt = {"d": models, "t": tmp_path}
    out = tmp_path / "out"
    code, _, err = cli("split", models / "base-f16.gguf", models / "chat-f16.gguf", "-o", out,
                       *[a.format(**fmt) for a in args])
    one_line(code, err, named.format(**fmt) if named else "", fragment)
    assert not out.exists()


def test_without_the_llama_extra_one_line_says_how_to_install_it(models: Path, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no llama.cpp here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    p = subprocess.run(command("split", models / "base-f16.gguf", "-o", out, "--quantize", "Q4_K_M"),
                       capture_output=True, text=True, env=env, timeout=120)
    assert one_line(p.returncode, p.stderr, "", "pip install 'gguf-split[llama]'") == \
        "gguf-split: error: quantizing needs llama.cpp's Python binding: pip install 'gguf-split[llama]'"
    assert not out.exists()
