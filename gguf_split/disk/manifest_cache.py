"""The manifest cache: per-file manifests on the local disk, so each file is hashed once.

Where: `<user cache dir>/gguf-split/manifests.sqlite3` ($XDG_CACHE_HOME or ~/.cache on Linux,
~/Library/Caches on macOS, %LOCALAPPDATA% on Windows; $GGUF_SPLIT_CACHE_DIR or `--cache-dir` instead).
It must be on a local disk: SQLite's locking is unsafe on network filesystems, so a cache directory on
NFS, SMB and the like is refused with a notice (the run goes on without a cache).

Why SQLite (the standard library's): several runs at once (WAL mode: readers never wait, writers hold
the lock for one short transaction per file, a busy timeout rides out the rest), and a crash mid-write
leaves the last committed state.

Key and trust. A row is keyed by the file's device and inode and holds its size, mtime_ns and ctime_ns:
a lookup uses a row only when all five equal the file's fstat now, so any write, a file replaced under
the same name, a `touch` or a restored mtime (utime() sets ctime) means "hash again". Timestamps are
coarse on some filesystems (FAT 2 s, ext3 1 s, a file server's clock), so a write in the same tick as
our stat leaves them unchanged: git's racy-clean rule. A row recorded (clock read before the file was
first looked at) less than RACY_NS after the file's last change is never trusted (nor stored: it would
stay racy). Each row carries an xxh3-128 over its key, path and body: a row that fails it, or does not
decode, is ignored (a miss) and replaced.

Damage. The schema has a version (PRAGMA user_version) and the file an application id
(PRAGMA application_id). A file of ours of another schema version, or one SQLite finds damaged, is
rebuilt (deleted with its -wal/-shm and made anew); a file that is not SQLite at all is moved aside to
`manifests.sqlite3.damaged` and rebuilt; a database of another program (another application id, or
tables of its own) is left alone and not used. Each case is one notice. Any later SQLite error turns
the cache off for the rest of the run with one notice: the results never depend on the cache.

What the cache is trusted for: planning (survey, `--dry-run`). `split` and `add` check every input byte
they rely on against the cached digests before they commit (assemble.scan.recheck_cached).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable

import xxhash

from .manifest import FileKey, FileManifest, decode, encode

APPLICATION_ID = 0x67677370  # "ggsp"
SCHEMA_VERSION = 1
FILE_NAME = "manifests.sqlite3"
RACY_NS = 5 * 10**9  # FAT's 2 s granularity, with margin for a file server's clock
BUSY_TIMEOUT_S = 10.0
UNUSED_DAYS = 90  # rows no lookup used for this long are dropped (at most one sweep a day)
_DAY_NS = 86_400 * 10**9
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre",
               "gpfs", "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs",
               "fuse.cephfs", "fuse.juicefs"}
_SCHEMA = """
CREATE TABLE manifests (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    recorded_ns INTEGER NOT NULL, used_ns INTEGER NOT NULL,
    path BLOB NOT NULL, body BLOB NOT NULL, checksum BLOB NOT NULL,
    PRIMARY KEY (dev, ino));
CREATE INDEX manifests_path ON manifests (path);
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def default_cache_dir() -> str:
    """The platform's user cache directory for gguf-split ($GGUF_SPLIT_CACHE_DIR wins)."""
    env = os.environ.get("GGUF_SPLIT_CACHE_DIR")
    if env:
        return env
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        return os.path.join(os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local"),
                            "gguf-split", "Cache")
    if sys.platform == "darwin":
        return os.path.join(home, "Library", "Caches", "gguf-split")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(xdg if os.path.isabs(xdg) else os.path.join(home, ".cache"), "gguf-split")


def network_filesystem(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the network filesystem `path` is on (Linux: /proc/self/mountinfo), else None."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                mountinfo = fh.read()
        except OSError:
            return None
    lines = mountinfo.splitlines()
    real = os.path.realpath(path)
    best, fstype = "", ""
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right:
            continue
        mount = fields[4].encode().decode("unicode_escape")  # \040 for a space
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, right.split()[0]
    return fstype if fstype in _NETWORK_FS or fstype.startswith("nfs") else None


def _signed(n: int) -> int:
    """SQLite integers are signed 64-bit; st_dev and st_ino are unsigned."""
    return n - (1 << 64) if n >= (1 << 63) else n


def _checksum(key: FileKey, recorded_ns: int, path: bytes, body: bytes) -> bytes:
    head = struct.pack("<QQqqqq", key.dev & (2**64 - 1), key.ino & (2**64 - 1), key.size, key.mtime_ns,
                       key.ctime_ns, recorded_ns)
    return xxhash.xxh3_128(head + struct.pack("<Q", len(path)) + path + body).digest()


def trusted_at(key: FileKey, recorded_ns: int) -> bool:
    """The racy-clean rule: the file last changed at least RACY_NS before it was first looked at."""
    return recorded_ns - key.changed_ns >= RACY_NS


class ManifestCache:
    """The cache (a ManifestSource). `note` gets the one-line notices. Thread-safe (one connection, a lock:
    the scanner stores from its hashing threads). Use as a context manager, or call close()."""

    def __init__(self, directory: str | os.PathLike[str], note: Callable[[str], None] = lambda _m: None) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, FILE_NAME)
        self.note = note
        self.hits = self.misses = self.stored = self.ignored = 0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self._db = self._open()
        except (OSError, sqlite3.Error) as e:
            self._off(f"cannot be used ({e})")

    @property
    def enabled(self) -> bool:
        return self._db is not None

    # --- opening ----------------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection | None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fs = network_filesystem(self.directory)
        if fs is not None:
            self.note(f"notice: manifest cache {self.directory} is on a network filesystem ({fs}), where SQLite's "
                      "locking is unsafe: not caching (give --cache-dir on a local disk)")
            return None
        for _attempt in range(3):
            db = self._connect()
            try:
                verdict = self._classify(db)
            except sqlite3.DatabaseError as e:
                db.close()
                if self._unreadable(str(e)) is None:
                    return None
                continue
            if verdict == "ours":
                self._prune(db)
                return db
            db.close()
            if verdict == "foreign":
                self.note(f"notice: {self.path} is not a gguf-split manifest cache (another program's database?): "
                          "not used, left as it is (give --cache-dir elsewhere)")
                return None
            self.note(f"notice: manifest cache {self.path}: {verdict}; rebuilding it")
            self._delete_files()
        self.note(f"notice: manifest cache {self.path} could not be made ready: not caching in this run")
        return None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return db

    def _classify(self, db: sqlite3.Connection) -> str:
        """"ours" (ready: made now if the file was new), "foreign", or why ours must be rebuilt."""
        app = db.execute("PRAGMA application_id").fetchone()[0]
        if app == 0:
            db.execute("BEGIN IMMEDIATE")  # another run may be making it at this moment: decide under the lock
            try:
                app = db.execute("PRAGMA application_id").fetchone()[0]
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if app == 0 and tables == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    app = APPLICATION_ID
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if app != APPLICATION_ID:
            return "foreign"
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            return f"schema version {version}, this gguf-split uses {SCHEMA_VERSION}"
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("SELECT count(*) FROM manifests WHERE dev = 0 AND ino = 0").fetchone()
        return "ours"

    def _unreadable(self, problem: str) -> str | None:
        """SQLite cannot read the file: ours (by its header's application id) is rebuilt; a file that is not
        SQLite at all is moved aside and rebuilt; another program's database is left alone (None)."""
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(100)
        except OSError:
            head = b""
        if head.startswith(b"SQLite format 3\x00") and len(head) >= 72:
            if int.from_bytes(head[68:72], "big") != APPLICATION_ID:
                self.note(f"notice: {self.path} is a database SQLite cannot read ({problem}) and not gguf-split's: "
                          "not used, left as it is (give --cache-dir elsewhere)")
                return None
            self.note(f"notice: manifest cache {self.path} is damaged ({problem}); rebuilding it")
            self._delete_files()
            return "rebuilt"
        self.note(f"notice: manifest cache {self.path} is not a database ({problem}); moved to "
                  f"{FILE_NAME}.damaged, rebuilding it")
        os.replace(self.path, self.path + ".damaged")
        self._delete_files(main=False)
        return "moved"

    def _delete_files(self, main: bool = True) -> None:
        """The cache file and SQLite's companions (a stale -wal would be replayed into a new file)."""
        for suffix in ([""] if main else []) + ["-wal", "-shm", "-journal"]:
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass

    def _prune(self, db: sqlite3.Connection) -> None:
        """Drop rows no lookup used for UNUSED_DAYS days (files deleted or changed long ago); once a day."""
        now = time.time_ns()
        row = db.execute("SELECT value FROM meta WHERE name = 'pruned_ns'").fetchone()
        if row is not None and now - row[0] < _DAY_NS:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM manifests WHERE used_ns < ?", (now - UNUSED_DAYS * _DAY_NS,))
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('pruned_ns', ?)", (now,))
            db.execute("COMMIT")
        except sqlite3.OperationalError:  # busy: another run prunes, or will
            if db.in_transaction:
                db.execute("ROLLBACK")

    # --- use --------------------------------------------------------------------------------------------

    def _off(self, why: str) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self.note(f"notice: manifest cache {self.path} {why}: not caching in this run (results are not affected)")

    def _failed(self, e: sqlite3.Error) -> None:
        """A busy database skips one operation; anything else turns the cache off for this run (a damaged
        file is rebuilt by the next run that opens it)."""
        if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
            return
        self._off(f"failed ({e})")

    def lookup(self, path: str, st: os.stat_result) -> FileManifest | None:
        key = FileKey.of(st)
        with self._lock:
            if self._db is None:
                return None
            try:
                row = self._db.execute("SELECT size, mtime_ns, ctime_ns, recorded_ns, used_ns, path, body, checksum "
                                       "FROM manifests WHERE dev = ? AND ino = ?",
                                       (_signed(key.dev), _signed(key.ino))).fetchone()
            except sqlite3.Error as e:
                self._failed(e)
                return None
            found = self._trusted(row, key, path)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            now = time.time_ns()
            if now - row[4] > _DAY_NS:
                try:
                    self._db.execute("UPDATE manifests SET used_ns = ? WHERE dev = ? AND ino = ?",
                                     (now, _signed(key.dev), _signed(key.ino)))
                except sqlite3.Error as e:
                    self._failed(e)
            return found

    def _trusted(self, row: tuple[object, ...] | None, key: FileKey, path: str) -> FileManifest | None:
        if row is None:
            return None
        size, mtime_ns, ctime_ns, recorded_ns, _used, stored_path, body, checksum = row
        if (size, mtime_ns, ctime_ns) != (key.size, key.mtime_ns, key.ctime_ns):
            return None
        if not isinstance(recorded_ns, int) or not trusted_at(key, recorded_ns):
            return None
        if not (isinstance(stored_path, bytes) and isinstance(body, bytes)) or \
                checksum != _checksum(key, recorded_ns, stored_path, body):
            self.ignored += 1
            return None
        try:
            return decode(body, path, key, recorded_ns)
        except ValueError:
            self.ignored += 1
            return None

    def store(self, manifest: FileManifest) -> None:
        key = manifest.key
        if not trusted_at(key, manifest.recorded_ns):
            return  # racily clean: it would never be trusted
        path = os.fsencode(os.path.abspath(manifest.path))
        body = encode(manifest)
        row = (_signed(key.dev), _signed(key.ino), key.size, key.mtime_ns, key.ctime_ns, manifest.recorded_ns,
               time.time_ns(), path, body, _checksum(key, manifest.recorded_ns, path, body))
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM manifests WHERE path = ? AND NOT (dev = ? AND ino = ?)",
                                 (path, row[0], row[1]))
                self._db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                self._db.execute("COMMIT")
                self.stored += 1
            except sqlite3.Error as e:
                try:
                    if self._db is not None and self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._failed(e)

    def forget(self, path: str, st: os.stat_result) -> None:
        key = FileKey.of(st)
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("DELETE FROM manifests WHERE dev = ? AND ino = ?", (_signed(key.dev), _signed(key.ino)))
            except sqlite3.Error as e:
                self._failed(e)

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> "ManifestCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(cache_dir: str | os.PathLike[str] | None = None, *, no_cache: bool = False,
               note: Callable[[str], None] = lambda _m: None) -> ManifestCache | None:
    """The cache the CLI uses: `cache_dir` or the default one; None with `no_cache`."""
    if no_cache:
        return None
    return ManifestCache(cache_dir if cache_dir is not None else default_cache_dir(), note)
