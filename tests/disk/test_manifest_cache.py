"""The manifest cache: each file hashed once, any change invalidates, a stale or damaged cache never gives a
wrong result, a split never trusts it for bytes it does not copy."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

import gguf_split.assemble.scan as scan_mod
import gguf_split.disk.manifest_cache as cache_mod
from gguf_split import restore, split, verify
from gguf_split.errors import GGUFSplitError
from gguf_split.disk.manifest_cache import FILE_NAME, ManifestCache, network_filesystem
from gguf_split.disk.manifest import FileKey, FileManifest, TensorEntry
from gguf_split.survey.manifest import scan_file

Factory = Callable[..., str]


@pytest.fixture
def trust_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files made by a test are seconds old: the racy-clean rule would (rightly) never trust their entries."""
    monkeypatch.setattr(cache_mod, "RACY_NS", 0)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the scanner hashes (sweeps), in order."""
    paths: list[str] = []
    real = scan_mod.sweep_file

    def spy(f: Any, **kw: Any) -> Any:
        paths.append(f.path)
        return real(f, **kw)

    monkeypatch.setattr(scan_mod, "sweep_file", spy)
    return paths


def family(model_factory: Factory) -> dict[str, str]:
    return {"base": model_factory("base"), "chat": model_factory("chat", {"blk.0.attn_q.weight": 77}),
            "code": model_factory("code", {"blk.1.attn_q.weight": 78})}


def notes() -> tuple[list[str], Callable[[str], None]]:
    got: list[str] = []
    return got, got.append


# ---------------------------------------------------------------------------------------------------------
# hashing once


def test_second_dry_run_hashes_nothing_and_reports_the_same(model_factory: Factory, tmp_path: Path,
                                                           trust_now: None, hashed: list[str]) -> None:
    tasks = family(model_factory)
    with ManifestCache(tmp_path / "cache") as cache:
        cold = split(tasks, tmp_path / "out", dry_run=True, file_cost=0, cache=cache)
        assert len(hashed) == 3 and cache.stored == 3
    with ManifestCache(tmp_path / "cache") as cache:
        warm = split(tasks, tmp_path / "out", dry_run=True, file_cost=0, cache=cache)
        assert cache.hits == 3
    assert len(hashed) == 3  # nothing hashed the second time
    assert [(f.name, f.bytes, f.tasks) for f in warm.files] == [(f.name, f.bytes, f.tasks) for f in cold.files]
    assert [(t.task, t.adaptor_bytes) for t in warm.tasks] == [(t.task, t.adaptor_bytes) for t in cold.tasks]


def test_dry_run_predicts_every_file_size_exactly(model_factory: Factory, tmp_path: Path) -> None:
    """The adaptors too (they were estimated from the input's header before): a survey's predicted bytes
    are what split writes."""
    tasks = family(model_factory)
    dry = split(tasks, tmp_path / "out", dry_run=True, file_cost=0)
    real = split(tasks, tmp_path / "out", file_cost=0)
    assert [(t.task, t.adaptor_bytes) for t in dry.tasks] == [(t.task, t.adaptor_bytes) for t in real.tasks]
    assert dry.output_bytes == real.output_bytes == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())


def test_any_change_to_a_file_invalidates_its_entry(model_factory: Factory, tmp_path: Path, trust_now: None,
                                                   hashed: list[str]) -> None:
    tasks = family(model_factory)
    with ManifestCache(tmp_path / "cache") as cache:
        split(tasks, tmp_path / "o", dry_run=True, file_cost=0, cache=cache)
    chat = Path(tasks["chat"])
    st = chat.stat()
    data = bytearray(chat.read_bytes())
    data[-100] ^= 0xFF  # a tensor byte; same size
    chat.write_bytes(data)
    os.utime(chat, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: ctime still moves
    assert chat.stat().st_mtime_ns == st.st_mtime_ns
    hashed.clear()
    with ManifestCache(tmp_path / "cache") as cache:
        report = split(tasks, tmp_path / "o", dry_run=True, file_cost=0, cache=cache)
    assert hashed == [tasks["chat"]]
    fresh = split(tasks, tmp_path / "o", dry_run=True, file_cost=0)
    assert [(f.name, f.tasks) for f in report.files] == [(f.name, f.tasks) for f in fresh.files]


def test_racy_clean_entries_are_neither_stored_nor_trusted(model_factory: Factory, tmp_path: Path) -> None:
    """A file changed less than RACY_NS before it was hashed may change again in the same timestamp tick."""
    path = model_factory("base")
    st = os.stat(path)
    assert not cache_mod.trusted_at(FileKey.of(st), st.st_ctime_ns + cache_mod.RACY_NS - 1)
    assert cache_mod.trusted_at(FileKey.of(st), st.st_ctime_ns + cache_mod.RACY_NS)
    with ManifestCache(tmp_path / "cache") as cache:
        m = scan_file(path)
        cache.store(m)  # the file was written a moment ago
        assert cache.stored == 0 and cache.lookup(path, st) is None
        old = FileManifest(m.path, m.key, m.kind, m.key.changed_ns + cache_mod.RACY_NS, m.xxh3, m.frame, m.tensors,
                           m.facts)
        cache.store(old)
        assert cache.stored == 1
        hit = cache.lookup(path, st)
        assert hit is not None and hit.tensors == m.tensors and hit.xxh3 == m.xxh3


# ---------------------------------------------------------------------------------------------------------
# a stale entry never makes a wrong split


def _forge(cache: ManifestCache, path: str, tensor: str, digest: bytes) -> None:
    """Put in the cache a manifest of `path` (its real key) that claims `tensor` has `digest`: what a file
    changed without a trace in its size and times (or a bug) would leave."""
    m = scan_file(path)
    tensors = tuple(TensorEntry(t.name, t.ggml_type, t.shape, t.offset, t.nbytes, digest if t.name == tensor else t.digest)
                    for t in m.tensors)
    cache.store(FileManifest(m.path, m.key, m.kind, m.recorded_ns, m.xxh3, m.frame, tensors, m.facts))


@pytest.mark.parametrize("chat_first", [False, True])
def test_a_stale_digest_is_caught_before_the_commit(model_factory: Factory, tmp_path: Path, trust_now: None,
                                                    chat_first: bool) -> None:
    """chat's blk.0.attn_q.weight differs from base's; a cache entry of chat claims it is base's, so the
    planner shares it. With base first, base's bytes are copied and chat's copy is never read from chat
    (recheck_cached must catch it); with chat first, chat's bytes are copied as the shared version (the
    written file's check catches it). Either way the run is refused, nothing is written, the entry is
    dropped, and the next run is right."""
    tasks = family(model_factory)
    order = {"chat": tasks["chat"], "base": tasks["base"], "code": tasks["code"]} if chat_first else tasks
    forged = "chat"
    real = {t: scan_file(p) for t, p in tasks.items()}
    q = {t: next(x.digest for x in m.tensors if x.name == "blk.0.attn_q.weight") for t, m in real.items()}
    assert q["chat"] != q["base"]
    with ManifestCache(tmp_path / "cache") as cache:
        _forge(cache, tasks[forged], "blk.0.attn_q.weight", q["base"])
        assert cache.stored == 1
        out = tmp_path / "out"
        with pytest.raises(GGUFSplitError) as err:
            split(order, out, file_cost=0, cache=cache)
        assert err.value.path in (tasks["chat"], tasks["base"])
        assert not out.exists() or not any(p.name.endswith(".gguf") for p in out.iterdir())
        assert cache.lookup(tasks[forged], os.stat(tasks[forged])) is None  # dropped
        split(order, out, file_cost=0, cache=cache)
    verify([out])
    (tmp_path / "restored").mkdir()
    for t, p in tasks.items():
        restored = restore(out, tmp_path / "restored" / f"{t}.gguf", task=t)
        assert Path(restored.files[0].path).read_bytes() == Path(p).read_bytes()


def test_split_with_a_warm_cache_reads_every_input_byte_once(model_factory: Factory, tmp_path: Path,
                                                            trust_now: None, hashed: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What the cache saves a split: no hashing pass; every tensor not copied is re-hashed, and only those."""
    tasks = family(model_factory)
    checked: list[int] = []
    real = scan_mod.recheck_cached

    def spy(models: Any, copied: Any, *a: Any, **kw: Any) -> None:
        checked.append(sum(t.nbytes for m in models for t, i in m.tensors
                           if (id(m.files[i].file), m.files[i].file.header.data_start + t.offset) not in copied))
        real(models, copied, *a, **kw)

    monkeypatch.setattr("gguf_split.assemble.outputs.recheck_cached", spy)
    with ManifestCache(tmp_path / "cache") as cache:
        split(tasks, tmp_path / "dry", dry_run=True, file_cost=0, cache=cache)
        hashed.clear()
        report = split(tasks, tmp_path / "out", file_cost=0, cache=cache)
    assert hashed == []
    stored = sum(f.tensor_bytes for f in report.files) + sum(t.tensor_bytes for t in report.tasks)
    total = sum(t.model_tensor_bytes for t in report.tasks)
    assert checked == [total - stored] and 0 < checked[0] < total


# ---------------------------------------------------------------------------------------------------------
# damaged, foreign, other versions, many runs at once


def test_a_file_that_is_not_a_database_is_moved_aside_and_rebuilt(model_factory: Factory, tmp_path: Path,
                                                                   trust_now: None) -> None:
    d = tmp_path / "cache"
    d.mkdir()
    (d / FILE_NAME).write_bytes(b"this is no database at all" * 200)
    got, note = notes()
    tasks = family(model_factory)
    with ManifestCache(d, note) as cache:
        assert cache.enabled
        split(tasks, tmp_path / "o", dry_run=True, file_cost=0, cache=cache)
        assert cache.stored == 3
    assert len(got) == 1 and "not a database" in got[0] and "rebuilding" in got[0]
    assert (d / (FILE_NAME + ".damaged")).read_bytes().startswith(b"this is no database")
    with ManifestCache(d) as cache:
        split(tasks, tmp_path / "o", dry_run=True, file_cost=0, cache=cache)
        assert cache.hits == 3


def test_a_damaged_database_of_ours_is_rebuilt(tmp_path: Path, model_factory: Factory, trust_now: None) -> None:
    d = tmp_path / "cache"
    base = model_factory("base")
    with ManifestCache(d) as cache:
        cache.store(scan_file(base))
        assert cache.lookup(base, os.stat(base)) is not None
    path = d / FILE_NAME
    data = bytearray(path.read_bytes())
    data[100:4096] = os.urandom(3996)  # the schema page (the header keeps our application id)
    path.write_bytes(data)
    got, note = notes()
    with ManifestCache(d, note) as cache:
        assert cache.enabled and cache.lookup(base, os.stat(base)) is None
    assert len(got) == 1 and "damaged" in got[0] and "rebuilding" in got[0]


def test_another_programs_database_is_left_alone(tmp_path: Path, model_factory: Factory) -> None:
    d = tmp_path / "cache"
    d.mkdir()
    db = sqlite3.connect(d / FILE_NAME)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.execute("INSERT INTO photos VALUES (1)")
    db.commit()
    db.close()
    before = (d / FILE_NAME).read_bytes()
    got, note = notes()
    tasks = family(model_factory)
    with ManifestCache(d, note) as cache:
        assert not cache.enabled
        report = split(tasks, tmp_path / "o", dry_run=True, file_cost=0, cache=cache)
    assert len(got) == 1 and "not a gguf-split manifest cache" in got[0]
    assert (d / FILE_NAME).read_bytes() == before
    assert report.tasks and report.shares_anything


def test_another_schema_version_is_rebuilt(tmp_path: Path, model_factory: Factory, trust_now: None) -> None:
    d = tmp_path / "cache"
    path = model_factory("base")
    with ManifestCache(d) as cache:
        cache.store(scan_file(path))
    db = sqlite3.connect(d / FILE_NAME)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    got, note = notes()
    with ManifestCache(d, note) as cache:
        assert cache.enabled and cache.lookup(path, os.stat(path)) is None
        cache.store(scan_file(path))
        assert cache.lookup(path, os.stat(path)) is not None
    assert len(got) == 1 and "schema version 99" in got[0]


def test_a_damaged_row_is_ignored(tmp_path: Path, model_factory: Factory, trust_now: None) -> None:
    path = model_factory("base")
    with ManifestCache(tmp_path / "c") as cache:
        cache.store(scan_file(path))
    db = sqlite3.connect(tmp_path / "c" / FILE_NAME)
    (body,) = db.execute("SELECT body FROM manifests").fetchone()
    db.execute("UPDATE manifests SET body = ?", (body[:-1] + bytes([body[-1] ^ 1]),))
    db.commit()
    db.close()
    with ManifestCache(tmp_path / "c") as cache:
        assert cache.lookup(path, os.stat(path)) is None and cache.ignored == 1


def _store_many(args: tuple[str, list[str]]) -> int:
    directory, paths = args
    cache_mod.RACY_NS = 0
    with ManifestCache(directory) as cache:
        for _ in range(20):
            for p in paths:
                cache.store(scan_file(p))
                assert cache.lookup(p, os.stat(p)) is not None
        return cache.stored


def test_several_runs_at_once(tmp_path: Path, model_factory: Factory) -> None:
    paths = [model_factory(f"m{i}", {"blk.0.attn_q.weight": 100 + i}) for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        stored = pool.map(_store_many, [(str(tmp_path / "c"), paths)] * 3)
    assert stored == [80, 80, 80]
    db = sqlite3.connect(tmp_path / "c" / FILE_NAME)
    assert db.execute("SELECT count(*) FROM manifests").fetchone()[0] == 4
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_network_filesystem_is_refused() -> None:
    info = ("22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
            "40 22 0:35 / /mnt/share rw,relatime shared:2 - nfs4 server:/export rw,vers=4.2\n")
    assert network_filesystem("/mnt/share/cache/gguf-split", mountinfo=info) == "nfs4"
    assert network_filesystem("/mnt/shared", mountinfo=info) is None
    assert network_filesystem("/home/me/.cache", mountinfo=info) is None


def test_cli_no_cache_and_cache_dir(model_factory: Factory, tmp_path: Path, trust_now: None) -> None:
    from gguf_split.cli.app import app

    tasks = family(model_factory)
    args = ["split", *[f"-t{t}={p}" for t, p in tasks.items()], "-o", str(tmp_path / "o"), "--dry-run",
            "--file-cost", "0"]
    r = CliRunner().invoke(app, [*args, "--no-cache"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "c").exists()
    r = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    with ManifestCache(tmp_path / "c") as cache:
        assert all(cache.lookup(p, os.stat(p)) is not None for p in tasks.values())
