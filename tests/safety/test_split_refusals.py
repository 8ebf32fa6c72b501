"""Split and add: every refusal comes before any tensor byte is hashed; free space is checked before
writing; a full disk or an input rewritten mid-run is one clear error that leaves the output directory as
it was (absent, or the user's earlier split, complete).

"Before hashing" is proven two ways: in-process, the hasher is replaced by one that fails the test when
called; in a real process, an input is a sparse 1 TiB model that would take minutes to hash, so the
refusal must come within the subprocess timeout.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from helpers import base_tensors, write_model, one_line
from gguf_split import GGUFSplitError, add, restore, split, verify

scan_mod = importlib.import_module("gguf_split.assemble.scan")
split_mod = importlib.import_module("gguf_split.assemble.split")
commit_mod = importlib.import_module("gguf_split.disk.commit")

CHANGED = "blk.0.attn_q.weight"
TIB = 1 << 40


# ---------------------------------------------------------------------------------------------------------
# helpers


def changed(seed: int = 0, bump: int = 777) -> dict:
    tensors = base_tensors(seed)
    qt, shape, s = tensors[CHANGED]
    tensors[CHANGED] = (qt, shape, s + bump)
    return tensors


def tree(d: Path) -> dict[str, str] | None:
    """Every entry under `d` (hidden ones too): relative path -> sha256 or kind; None if `d` is absent."""
    if not d.exists():
        return None
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_raw_model(path: Path, *, arch: str, tensors: list[tuple[str, int, int]], alignment: int = 32,
                    fill: Callable[[int, int], bytes] | None = None, size: int | None = None) -> Path:
    """A hand-made GGUF v3 (struct only, not gguf-split's own encoder): F32 tensors (name, elements, data
    offset). The data section is left sparse (zeros) up to `size`, or filled by `fill(start, end)` for
    the bytes between tensors."""
    kvs = _str("general.architecture") + struct.pack("<I", 8) + _str(arch)
    infos = b"".join(_str(n) + struct.pack("<IQIQ", 1, elems, 0, off) for n, elems, off in tensors)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1) + kvs + infos
    data_start = -(-len(header) // alignment) * alignment
    end = max(off + 4 * elems for _, elems, off in tensors)
    with open(path, "wb") as f:
        f.write(header + bytes(data_start - len(header)))
        pos = 0
        for _, elems, off in sorted(tensors, key=lambda t: t[2]):
            if fill is not None and off > pos:
                f.write(fill(pos, off))
            f.seek(data_start + off)
            if elems * 4 < 1 << 20:
                f.write(bytes(range(256)) * (elems * 4 // 256) + bytes(elems * 4 % 256))
            pos = off + 4 * elems
        f.truncate(size if size is not None else data_start + -(-end // alignment) * alignment)
    return path


def sparse_huge_model(path: Path, arch: str = "llama") -> Path:
    """A valid model whose one tensor is 1 TiB of sparse zeros: hashing it would take many minutes."""
    elems = TIB // 4
    return write_raw_model(path, arch=arch, tensors=[("huge.weight", elems, 0)], size=None)


@pytest.fixture
def no_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the tensor hasher: a call fails the test (and is recorded, should the failure be caught)."""
    calls: list[str] = []

    def forbidden(inp, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(inp.path)
        raise AssertionError(f"hashed {inp.path} before refusing")

    monkeypatch.setattr(scan_mod, "_hash_file", forbidden)
    return calls


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "models"
    d.mkdir()
    return {
        "a": Path(write_model(d / "a.gguf", base_tensors(0))),
        "b": Path(write_model(d / "b.gguf", changed(0))),
        "c": Path(write_model(d / "c.gguf", changed(0, 999))),
        "gemma": Path(write_model(d / "gemma.gguf", base_tensors(0), arch="gemma")),
    }


def cli(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "gguf_split", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------------------
# refusals before hashing


def test_architecture_mismatch_is_refused_before_hashing(models: dict[str, Path], tmp_path: Path,
                                                         no_hashing: list[str]) -> None:
    with pytest.raises(GGUFSplitError, match="architecture differs") as e:
        split({"a": models["a"], "g": models["gemma"]}, tmp_path / "out")
    assert e.value.path == str(models["gemma"])
    assert no_hashing == [] and not (tmp_path / "out").exists()


def test_add_of_another_architecture_is_refused_before_hashing(models: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    split({"a": models["a"], "b": models["b"]}, out, file_cost=0)
    before = tree(out)
    calls: list[str] = []
    monkeypatch.setattr(scan_mod, "_hash_file", lambda inp, *a: calls.append(inp.path))
    with pytest.raises(GGUFSplitError, match="is a gemma model"):
        add(out, {"g": models["gemma"]})
    with pytest.raises(GGUFSplitError, match="already in the split"):
        add(out, {"a": models["c"]})
    assert calls == [] and tree(out) == before


def test_too_much_nonzero_padding_is_refused_before_hashing(tmp_path: Path, models: dict[str, Path],
                                                            no_hashing: list[str]) -> None:
    """17 MiB of non-zero bytes between two tensors: not padding any writer makes, refused while the
    headers and padding are read, before any tensor is hashed."""
    gap = 17 << 20
    bad = write_raw_model(tmp_path / "padded.gguf", arch="llama", tensors=[("a.weight", 64, 0), ("b.weight", 64, 256 + gap)],
                          fill=lambda s, e: b"\x55" * (e - s))
    with pytest.raises(GGUFSplitError, match="beyond alignment padding.*at most 16 MiB") as e:
        split({"a": models["a"], "p": bad}, tmp_path / "out", allow_unrelated=True)
    assert e.value.path == str(bad)
    assert no_hashing == [] and not (tmp_path / "out").exists()


def test_some_nonzero_padding_is_kept_byte_for_byte(tmp_path: Path, models: dict[str, Path]) -> None:
    """The other side of the limit: 1 MiB of non-zero padding is split, and restored exactly."""
    m = write_raw_model(tmp_path / "padded.gguf", arch="llama", tensors=[("a.weight", 64, 0), ("b.weight", 64, 256 + (1 << 20))],
                        fill=lambda s, e: bytes((i * 7 + 1) % 256 for i in range(s, e)))
    out = tmp_path / "out"
    split({"p": m, "a": models["a"]}, out, allow_unrelated=True)
    verify([out])
    r = restore(out, tmp_path / "r.gguf", task="p")
    assert Path(r.output).read_bytes() == m.read_bytes()


def _data_end(path: Path) -> int:
    from gguf_split.format.gguf import GGUFFile, align_up

    with GGUFFile(path) as f:
        return align_up(f.header.data_end(), f.header.alignment)


@pytest.mark.parametrize("where", ["tail", "gap"])
def test_a_huge_tail_or_gap_is_refused_in_seconds(tmp_path: Path, where: str) -> None:
    """A model followed by a 1 TiB sparse tail, or with 1 TiB between two tensors (bytes llama.cpp ignores):
    one line in a real process, within seconds, memory bounded (it once ran 9 minutes at 16 GB before it
    was killed)."""
    tensors = [("a.weight", 64, 0), ("b.weight", 64, 256 + (TIB if where == "gap" else 0))]
    m = write_raw_model(tmp_path / "m.gguf", arch="llama", tensors=tensors)
    if where == "tail":
        os.truncate(m, m.stat().st_size + TIB)
    assert m.stat().st_size > TIB and m.stat().st_blocks * 512 < 1 << 20
    # the child's peak RSS (file pages included) as its parent sees it: a fresh parent, this child only
    probe = ("import resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=30)\n"  # kills it
             "sys.stderr.write(p.stderr)\n"
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    args = [sys.executable, "-m", "gguf_split", "split", "-q", "-t", f"m={m}", "-o", str(tmp_path / "out")]
    p = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    code, peak_kib = map(int, p.stdout.split())
    line = one_line(code, p.stderr, m, "beyond alignment padding")
    assert "1,099,511,627,776 bytes" in line and "at most 16 MiB" in line
    assert ("truncate -s" in line) == (where == "tail")
    assert peak_kib < 300 << 10, f"peak RSS {peak_kib >> 10} MiB"
    assert not (tmp_path / "out").exists()


def test_one_byte_over_the_bound_is_refused_before_reading(tmp_path: Path, no_hashing: list[str]) -> None:
    """16 MiB + 1 byte past the padding is refused from the header alone, before any byte outside the
    tensors is read or hashed (16 MiB exactly is kept: the next test)."""
    m = write_raw_model(tmp_path / "m.gguf", arch="llama", tensors=[("a.weight", 64, 0), ("b.weight", 64, 256)])
    os.truncate(m, _data_end(m) + (16 << 20) + 1)
    with pytest.raises(GGUFSplitError, match=f"holds {(16 << 20) + 1:,} bytes after its tensor data") as e:
        split({"m": m}, tmp_path / "out")
    assert e.value.path == str(m) and f"truncate -s {_data_end(m)} " in e.value.problem
    assert no_hashing == [] and not (tmp_path / "out").exists()


def test_a_small_tail_comes_back_byte_for_byte(tmp_path: Path, models: dict[str, Path]) -> None:
    """16 MiB past the last tensor's padding (the bound), zero and not: split, verified, restored exactly."""
    for fill in (b"\0", b"\x55"):
        m = write_raw_model(tmp_path / "m.gguf", arch="llama", tensors=[("a.weight", 64, 0), ("b.weight", 64, 256)])
        with open(m, "ab") as f:
            f.write(fill * (16 << 20))
        out = tmp_path / f"out{fill.hex()}"
        split({"m": m}, out)
        verify([out])
        r = restore(out, tmp_path / "r.gguf", task="m", force=True)
        assert hashlib.sha256(Path(r.output).read_bytes()).digest() == hashlib.sha256(m.read_bytes()).digest()


def test_other_tasks_in_the_output_are_refused_before_hashing(models: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    split({"a": models["a"], "b": models["b"]}, out, file_cost=0)
    before = tree(out)
    calls: list[str] = []
    monkeypatch.setattr(scan_mod, "_hash_file", lambda inp, *a: calls.append(inp.path))
    for force in (False, True):
        with pytest.raises(GGUFSplitError, match=r"other tasks \(b\)") as e:
            split({"a": models["a"], "c": models["c"]}, out, force=force, file_cost=0)
        assert "--force" not in str(e.value)
    with pytest.raises(GGUFSplitError, match="use --force"):
        split({"a": models["a"], "b": models["c"]}, out, file_cost=0)
    with pytest.raises(GGUFSplitError, match="use --force"):
        split({"a": models["a"], "b": models["c"]}, out, file_cost=0, dry_run=True)
    assert calls == [] and tree(out) == before


def test_output_not_this_tasks_adaptor_is_refused_before_hashing(models: dict[str, Path], tmp_path: Path,
                                                                 no_hashing: list[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "adaptor-a.gguf").write_bytes(models["c"].read_bytes())  # a model under an adaptor's name
    before = tree(out)
    with pytest.raises(GGUFSplitError, match="not this task's adaptor") as e:
        split({"a": models["a"], "b": models["b"]}, out, force=True)
    assert "--force" not in str(e.value)
    assert no_hashing == [] and tree(out) == before


@pytest.mark.parametrize("case", ["architecture", "existing-split", "other-tasks"])
def test_refusal_of_a_1_tib_input_is_immediate(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    """A real process given a sparse 1 TiB model (minutes to hash) refuses within the timeout."""
    huge = sparse_huge_model(tmp_path / "huge.gguf", arch="gemma" if case == "architecture" else "llama")
    assert huge.stat().st_size > TIB and huge.stat().st_blocks * 512 < 1 << 20
    out = tmp_path / "out"
    if case != "architecture":
        split({"a": models["a"], "huge": models["b"]} if case == "existing-split" else {"a": models["a"], "b": models["b"]},
              out)
    before = tree(out)
    code, _, stderr = cli(["split", "-q", "-t", f"a={models['a']}", "-t", f"huge={huge}", "-o", str(out)], tmp_path,
                          timeout=30)
    fragment = {"architecture": "architecture differs", "existing-split": "use --force",
                "other-tasks": "other tasks (b)"}[case]
    one_line(code, stderr, huge if case == "architecture" else out, fragment)
    assert tree(out) == before


# ---------------------------------------------------------------------------------------------------------
# free space, full disk


class _Full:
    f_bavail = 3
    f_frsize = 4096
    f_bsize = 4096


@pytest.mark.parametrize("out_state", ["absent", "earlier-split"])
def test_free_space_is_checked_before_writing(models: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, out_state: str) -> None:
    """A file system with 12 KiB free: one line up front naming the directory, no file created."""
    out = tmp_path / "out"
    if out_state == "earlier-split":
        split({"a": models["a"], "b": models["b"]}, out, file_cost=0)
    before = tree(out)
    monkeypatch.setattr(os, "statvfs", lambda p: _Full())
    created: list[str] = []
    real_new = commit_mod.NewFile.__init__

    def spy(self, directory, final):  # noqa: ANN001
        created.append(final)
        real_new(self, directory, final)

    monkeypatch.setattr(commit_mod.NewFile, "__init__", spy)
    with pytest.raises(GGUFSplitError, match="not enough free space") as e:
        split({"a": models["a"], "b": models["c"]}, out, file_cost=0, force=True)
    assert e.value.path == str(out)
    assert created == [] and tree(out) == before


@pytest.mark.parametrize("fail_in", ["copy_file_range", "write"])
@pytest.mark.parametrize("out_state", ["absent", "earlier-split"])
def test_enospc_while_writing_leaves_the_output_as_it_was(models: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, fail_in: str,
                                                          out_state: str) -> None:
    """The disk fills up half-way through writing (the n-th write or kernel copy fails with ENOSPC): one
    error naming the output file, no temporary left, the earlier split intact and still verifying."""
    out = tmp_path / "out"
    if out_state == "earlier-split":
        split({"a": models["a"], "b": models["b"]}, out, file_cost=0)
    before = tree(out)
    real = getattr(os, fail_in)
    count = [0]

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003
        count[0] += 1
        if count[0] >= (3 if fail_in == "write" else 1):  # a re-split may copy one tensor only
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, fail_in, failing)
    with pytest.raises(GGUFSplitError, match="No space left on device") as e:
        split({"a": models["a"], "b": models["c"]}, out, file_cost=0, force=True)
    monkeypatch.setattr(os, fail_in, real)
    assert os.path.dirname(e.value.path) == str(out) and e.value.path.endswith(".gguf")
    assert "write failed" in e.value.problem
    assert tree(out) == before
    if before is not None:
        verify([out])


# ---------------------------------------------------------------------------------------------------------
# an input rewritten while it is split


def rewrite_after_hashing(monkeypatch: pytest.MonkeyPatch, victim: Path, *, keep_mtime: bool) -> None:
    """After hash_models returns (before anything is copied), overwrite a byte of `victim`'s own tensor
    (the one no other model has, so it is copied from this file) in place: same inode, same size; with
    keep_mtime its modification time is put back as it was."""
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(victim).tensors if t.name == CHANGED)
    at = int(t.data_offset) + 10
    real = split_mod.hash_models

    def hash_then_rewrite(models, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        real(models, *args, **kwargs)
        st = os.stat(victim)
        with open(victim, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
        if keep_mtime:
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(split_mod, "hash_models", hash_then_rewrite)


@pytest.mark.parametrize("out_state", ["absent", "earlier-split"])
def test_input_rewritten_between_hashing_and_copying(models: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, out_state: str) -> None:
    out = tmp_path / "out"
    if out_state == "earlier-split":
        split({"a": models["a"], "b": models["b"]}, out, file_cost=0)
    before = tree(out)
    rewrite_after_hashing(monkeypatch, models["c"], keep_mtime=False)
    with pytest.raises(GGUFSplitError, match="changed while it was being split") as e:
        split({"a": models["a"], "b": models["c"]}, out, file_cost=0, force=True)
    assert e.value.path == str(models["c"])
    assert tree(out) == before


def test_input_rewritten_with_its_mtime_put_back(models: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Even an in-place rewrite that puts the input's mtime back is caught: every written file is read back
    and checked against the digests before the commit; the error names the input."""
    out = tmp_path / "out"
    rewrite_after_hashing(monkeypatch, models["c"], keep_mtime=True)
    with pytest.raises(GGUFSplitError) as err:
        split({"a": models["a"], "b": models["c"]}, out, file_cost=0)
    assert err.value.path == str(models["c"]) and "changed while it was being split" in err.value.problem
    assert not out.exists()


@pytest.mark.parametrize("victim", ["shared", "adaptor"])
def test_a_writer_bug_is_caught_before_the_commit(models: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, victim: str) -> None:
    """A written file whose bytes differ from the plan (a writer bug, simulated by flipping a byte of the
    first tensor the copy writes into a shared file or an adaptor) is caught by the read-back check as each
    file is written: an internal error naming the file, nothing committed (a new split absent, a re-split's
    earlier split intact)."""
    copy_mod = importlib.import_module("gguf_split.disk.copy")
    out = tmp_path / "out"
    if victim == "adaptor":  # a re-split that keeps the shared files and writes new adaptors
        split({"a": models["a"], "b": models["b"]}, out, file_cost=0)
    before = tree(out)
    real = copy_mod.copy_bytes
    hit: list[str] = []

    def corrupting(src, offset, n, dst_fd, bar):  # noqa: ANN001
        real(src, offset, n, dst_fd, bar)
        name = os.readlink(f"/proc/self/fd/{dst_fd}")
        if not hit and ("adaptor-" in name) == (victim == "adaptor"):
            hit.append(name)
            at = os.lseek(dst_fd, 0, os.SEEK_CUR) - n
            fd = os.open(name, os.O_RDWR)
            try:
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x01]), at)
            finally:
                os.close(fd)

    monkeypatch.setattr(copy_mod, "copy_bytes", corrupting)
    with pytest.raises(GGUFSplitError, match="internal error: a written file does not match its records") as e:
        split({"a": models["a"], "b": models["c"]}, out, file_cost=0, force=True)
    final = os.path.basename(str(e.value.path))  # named by its final name, not the temporary's
    assert hit and f".{final}." in os.path.basename(hit[0]) and not final.startswith("."), (hit, e.value)
    assert tree(out) == before


def test_inputs_are_opened_read_only(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every open of an input (the models for split and add; the split's files for verify, info, restore
    and the loader) is read-only: os.open and open() are watched for write flags on those paths."""
    import builtins

    from gguf_split import open_split
    from gguf_split.splitdir.info import savings

    out = tmp_path / "out"
    split({"a": models["a"], "b": models["b"]}, out, file_cost=0)
    watched = {os.path.realpath(p) for p in models.values()} | {os.path.realpath(p) for p in out.iterdir()}
    writes: list[str] = []
    real_open, real_builtin_open = os.open, builtins.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC

    def spy_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(path) in watched and flags & write_flags:
            writes.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def spy_builtin_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) in watched and set(mode) & set("wax+"):
            writes.append(os.fspath(file))
        return real_builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(builtins, "open", spy_builtin_open)
    split({"a": models["a"], "b": models["b"]}, tmp_path / "again", file_cost=0)
    verify([out], sha256=True)
    savings(out)
    restore(out, tmp_path / "b.gguf", task="b")
    with open_split(out) as s:
        for name in s.load("b").tensors:
            s.load("b").tensors[name].data
    add(out, {"c": models["c"]})
    assert writes == [], f"opened for writing: {writes}"
    with open(models["a"], "r+b"):  # the spy itself works
        pass
    assert writes == [str(models["a"])]


# ---------------------------------------------------------------------------------------------------------
# files the new state keeps must be intact


def _flip_tensor_byte(path: Path) -> None:
    from gguf_split.format.gguf import GGUFFile

    with GGUFFile(path) as f:
        t = max(f.header.tensors, key=lambda t: t.nbytes)
        at = f.header.data_start + t.offset + t.nbytes // 2
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def test_add_refuses_a_damaged_file_it_would_reuse(tmp_path: Path) -> None:
    """`add` reuses a shipped shared file only if it is still what the adaptors recorded, byte for byte:
    a flipped tensor byte is refused with one error naming the file, and nothing is written."""
    a = write_model(tmp_path / "a.gguf", base_tensors())
    b = write_model(tmp_path / "b.gguf", changed())
    c = write_model(tmp_path / "c.gguf", changed(bump=999))
    out = tmp_path / "out"
    split({"a": a, "b": b}, out, file_cost=0)
    foundation = next(out.glob("foundation-*.gguf"))
    _flip_tensor_byte(foundation)
    before = tree(out)
    with pytest.raises(GGUFSplitError) as err:
        add(out, {"c": c}, file_cost=0)
    assert err.value.path == str(foundation) and "does not match" in err.value.problem
    assert tree(out) == before


def test_force_resplit_refuses_a_damaged_file_it_would_keep(tmp_path: Path) -> None:
    """A --force re-split keeps a file whose content it would write again, after one xxh3 sweep against what
    the adaptors recorded: a damaged one is refused (move it away or verify), not silently kept."""
    a = write_model(tmp_path / "a.gguf", base_tensors())
    b = write_model(tmp_path / "b.gguf", changed())
    out = tmp_path / "out"
    split({"a": a, "b": b}, out, file_cost=0)
    foundation = next(out.glob("foundation-*.gguf"))
    _flip_tensor_byte(foundation)
    before = tree(out)
    with pytest.raises(GGUFSplitError) as err:
        split({"a": a, "b": b}, out, file_cost=0, force=True)
    assert err.value.path == str(foundation) and "verify" in err.value.problem
    assert tree(out) == before
    foundation.unlink()  # moved away: the re-split writes it again, complete
    split({"a": a, "b": b}, out, file_cost=0, force=True)
    verify([out])
