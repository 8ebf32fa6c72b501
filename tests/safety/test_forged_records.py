"""Forged records through the library (the CLI rows are in test_hostile.py): a record that passes the seal
(a forger recomputes it) but lies must be refused with GGUFSplitError, never followed outside the split
directory, never turned into a KeyError or a wrong byte.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import base_tensors, write_model
from gguf_split import GGUFSplitError, open_split, restore, split, verify
from gguf_split.format.gguf import GGUFFile
from test_hostile import CHANGED_TENSOR, forge_text, foundation_name, same_length


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    a = base_tensors(0)
    b = dict(a)
    qt, shape, seed = a[CHANGED_TENSOR]
    b[CHANGED_TENSOR] = (qt, shape, seed + 777)
    write_model(tmp_path / "a.gguf", a)
    write_model(tmp_path / "b.gguf", b)
    # one foundation (cut none), as test_hostile's rows: the records forged below are the same in a cut split
    split({"a": tmp_path / "a.gguf", "b": tmp_path / "b.gguf"}, tmp_path / "split", file_cost=0, cut="none")
    return tmp_path / "split"


def forge(path: Path, edit) -> None:  # noqa: ANN001 - a test_hostile Edit
    data = bytearray(path.read_bytes())
    with GGUFFile(path) as f:
        new = edit(data, f.header)
    path.write_bytes(bytes(data if new is None else new))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_loader_refuses_a_forged_tensor_list(split_dir: Path) -> None:
    """The adaptor's record of the original tensor infos (the loader's iteration order) names a tensor no
    file of the task holds: iterating the task's tensors raises GGUFSplitError, not KeyError."""
    ad = split_dir / "adaptor-a.gguf"
    with GGUFFile(ad) as f:
        kv = f.header.kv_by_key["gguf_split.source.tensor_infos"]
        blob = f.raw(kv.value_start + 12, kv.end)
    at = blob.index(b"output_norm.weight")
    data = bytearray(ad.read_bytes())
    data[kv.value_start + 12 + at] = ord("X")  # Xutput_norm.weight
    from test_hostile import reseal

    reseal(data)
    ad.write_bytes(bytes(data))
    with open_split(split_dir) as s:
        model = s.load("a")
        with pytest.raises(GGUFSplitError, match="does not match the task's files"):
            list(model.tensors)
    with pytest.raises(GGUFSplitError):
        verify([split_dir])


@pytest.mark.parametrize("prefix", ["../", "/etc/"])
def test_loader_and_verify_refuse_a_forged_shared_name(split_dir: Path, prefix: str) -> None:
    """A shared file name forged to point outside the directory: refused by name, before any file
    outside is opened (a real file is put where the forged name points)."""
    n = len(foundation_name(split_dir))
    forged = same_length(prefix, n)
    if prefix == "../":
        shutil.copy(split_dir / foundation_name(split_dir), split_dir.parent / forged[3:])  # the bait
    forge(split_dir / "adaptor-a.gguf", forge_text("gguf_split.files.name", 0, forged))
    with pytest.raises(GGUFSplitError, match="not a plain file name"):
        with open_split(split_dir) as s:
            s.load("a")
    with pytest.raises(GGUFSplitError, match="not a plain file name"):
        verify([split_dir])


@pytest.mark.parametrize("name", ["../a.g", "/tmp/x", "..\\a.g"])
def test_restore_refuses_a_forged_original_name(split_dir: Path, tmp_path: Path, name: str) -> None:
    """The original file name restore writes, forged to leave the output directory: refused, and nothing
    written anywhere under tmp_path (nor at /tmp/x)."""
    forge(split_dir / "adaptor-a.gguf", forge_text("gguf_split.source.name", 0, name))
    out = tmp_path / "out"
    out.mkdir()
    before = tree(tmp_path)
    existed = os.path.lexists("/tmp/x")
    with pytest.raises(GGUFSplitError, match="not a plain file name"):
        restore(split_dir, out, task="a")
    assert tree(tmp_path) == before
    assert os.path.lexists("/tmp/x") == existed


def test_loader_honours_a_pending_commit(split_dir: Path) -> None:
    """A killed `remove a` left its journal (switched, not applied): every reader sees task a gone, the
    loader's load-by-name too (it must not load the adaptor the commit deletes)."""
    import json

    (split_dir / ".gguf-split-journal").write_text(json.dumps(
        {"gguf_split_journal": 1, "renames": [], "deletes": ["adaptor-a.gguf"]}))
    assert list(verify([split_dir]).tasks) == ["b"]
    with open_split(split_dir) as s:
        assert s.tasks == ["b"]
        with pytest.raises(GGUFSplitError, match="holds no task 'a'"):
            s.load("a")
        assert len(list(s.load("b").tensors)) == len(base_tensors(0))


def test_every_adaptor_is_compared_with_a_file_other_tasks_opened_first(split_dir: Path) -> None:
    """verify and info open each shared file once for all tasks; the second task's record of it (here a
    forged content id, resealed) is still compared with it, not skipped because the file is open already."""
    name = foundation_name(split_dir)
    with GGUFFile(split_dir / "adaptor-b.gguf") as f:
        kv = f.header.kv_by_key["gguf_split.files.content_id"]
        raw = f.raw(kv.start, kv.end)
    cid = GGUFFile(split_dir / name).get("gguf_split.content_id")
    assert cid.encode() in raw
    forge(split_dir / "adaptor-b.gguf", forge_text("gguf_split.files.content_id", 0, "0" * len(cid)))
    with pytest.raises(GGUFSplitError, match="another split") as err:
        verify([split_dir])
    assert err.value.path == str(split_dir / name)
    from gguf_split.splitdir.info import savings

    with pytest.raises(GGUFSplitError, match="another split"):
        savings(split_dir)
