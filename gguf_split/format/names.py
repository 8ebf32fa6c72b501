"""File names: the one place that says what gguf-split calls the files it writes, and which names it accepts.

A split directory holds, per task, `adaptor-<task>.gguf` (llama.cpp split 0 of the task), and shared files
named after their content, so that a file's name never changes meaning: a file with a given name always
holds the same bytes, whatever is added, re-split or removed later, and links to it (llama-server's models
directory, `gguf-split link`) never point at other bytes:

    foundation-<id>.gguf     the tensors every task of the split shares (as first split)
    shared-<id>.gguf         tensors a subset of the tasks shares
    hole-<n>.gguf            no tensors, only split.no = n: fills a gap in a task's list of files
    adaptor-<task>-part<k>-<id>.gguf   more of one task's own tensors (only with --max-shard-size)

`<id>` is the first 12 hex digits of the file's content id (gguf_split.content_id, recorded inside it).
An optional prefix goes in front of every name. Names that come from files (records, journals) are checked
with `check_bare_name` before they are joined to a directory: a forged `../x` or `/etc/x` is refused; the
names a pack gives back follow its strict mode (not hidden, no control characters, at most 255 bytes).
"""

from __future__ import annotations

import os
import re

from ..errors import GGUFSplitError

ID_CHARS = 12
TASK_MAX = 64
TASK_RULE = ("a task name is 1 to 64 characters: letters, digits and _ . + -, starting with a letter or digit "
             "(it becomes part of file names)")
# whole-string matches (fullmatch): `$` would also match before a final newline, and "chat\n" would pass
_TASK_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_PREFIX_CHARS = re.compile(r"[A-Za-z0-9_.+-]*")

NAME_MAX_BYTES = 255  # a strict name's limit, in UTF-8 bytes (check_bare_name)

TMP_SUFFIX = ".gguf-split-tmp"
TMP_DIR_SUFFIX = ".gguf-split-tmpdir"
JOURNAL = ".gguf-split-journal"
# gguf-split 0.2's `unpack --restore` left this directory behind when it was killed (tempfile's 8 characters)
_LEGACY_TMP_DIR = re.compile(r"\.gguf-split-unpack-[a-z0-9_]{8}")  # fullmatch: `$` matches before a final \n


def check_task_name(task: object, where: str | None = None) -> str:
    """Return `task` if it is a valid task name, else raise a GGUFSplitError that states the broken rule."""
    if not isinstance(task, str):
        raise GGUFSplitError(where, f"task name {task!r} is not a string")
    if not task:
        raise GGUFSplitError(where, f"task name is empty; {TASK_RULE}")
    if len(task) > TASK_MAX:
        raise GGUFSplitError(where, f"task name {task[:20]!r}... is {len(task)} characters long, at most {TASK_MAX} "
                                    "are allowed")
    if not _TASK_CHARS.fullmatch(task):
        bad = next((c for c in task if not re.fullmatch(r"[A-Za-z0-9_.+-]", c)), None)
        what = f"holds {bad!r}" if bad is not None else "starts with " + repr(task[0])
        raise GGUFSplitError(where, f"task name {task!r} {what}; {TASK_RULE}")
    return task


def check_prefix(prefix: str) -> str:
    if not _PREFIX_CHARS.fullmatch(prefix) or len(prefix) > 64:
        raise GGUFSplitError(None, f"prefix {prefix!r} may hold only letters, digits and _ . + - (at most 64)")
    return prefix


def check_bare_name(name: object, where: str | None, what: str = "file name", *, strict: bool = False) -> str:
    """`name` if it is a bare base name, safe to join to a directory: no directory part, not . or .., no NUL.

    Plain: the rule for names read from gguf-split's own records and journals (a forged `../x` is refused
    as "damaged or forged"). `strict`: the rule of a file a pack gives back (docs/pack-format.md), which
    names a file another machine creates from a downloaded pack: also not hidden (gguf-split's temporaries
    are hidden), no control character, no leading or trailing space, at most 255 bytes of UTF-8 (the
    limit of common file systems); its messages say which rule a pack's name or an input's breaks."""
    if not strict:
        if not _is_bare(name):
            raise GGUFSplitError(where, f"recorded {what} {name!r} is not a plain file name: damaged or forged")
        assert isinstance(name, str)
        return name
    if not isinstance(name, str) or not name:
        raise GGUFSplitError(where, f"{what} {name!r} is not a non-empty string")
    if not _is_bare(name) or name.startswith(".") or name != name.strip() or any(ord(c) < 32 for c in name):
        raise GGUFSplitError(where, f"{what} {name!r} must be a bare file name (no directory, not hidden, "
                                    "no control characters)")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise GGUFSplitError(where, f"{what} {name!r} is not valid Unicode") from None
    if size > NAME_MAX_BYTES:
        raise GGUFSplitError(where, f"{what} {name[:40]!r}... is longer than {NAME_MAX_BYTES} bytes")
    return name


def _is_bare(name: object) -> bool:
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and os.path.basename(name) == name)


def adaptor_name(task: str, prefix: str = "") -> str:
    return f"{prefix}adaptor-{task}.gguf"


def shared_name(content_id: str, *, foundation: bool = False, prefix: str = "") -> str:
    return f"{prefix}{'foundation' if foundation else 'shared'}-{content_id[:ID_CHARS]}.gguf"


def hole_name(position: int, prefix: str = "") -> str:
    return f"{prefix}hole-{position}.gguf"


def own_part_name(task: str, part: int, content_id: str, prefix: str = "") -> str:
    return f"{prefix}adaptor-{task}-part{part}-{content_id[:ID_CHARS]}.gguf"


# a llama.cpp shard (`llama_split_path`): <prefix>-0000k-of-0000N.gguf; always matched whole (fullmatch)
SHARD_NAME = re.compile(r"(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def link_name(task: str, index: int, count: int) -> str:
    """llama.cpp's split name (`llama_split_path`): index is 0-based, the name 1-based."""
    return f"{task}-{index + 1:05d}-of-{count:05d}.gguf"


def temp_name(final: str) -> str:
    """A hidden temporary name beside `final`; the pid and a random part make it unique."""
    return f".{final}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def temp_dir_name(purpose: str) -> str:
    """A hidden temporary directory's name (`purpose`: letters only, e.g. "unpack"), unique like temp_name."""
    return f".gguf-split-{purpose}.{os.getpid()}.{os.urandom(4).hex()}{TMP_DIR_SUFFIX}"


def is_temp_dir(name: str) -> bool:
    """A name only gguf-split gives a temporary directory (temp_dir_name, or 0.2's unpack leftover)."""
    return (name.startswith(".gguf-split-") and name.endswith(TMP_DIR_SUFFIX)) or bool(_LEGACY_TMP_DIR.fullmatch(name))


def show(path: str | os.PathLike[str] | bytes) -> str:
    """A path for a message: names that are not valid UTF-8 are shown with escapes, never raise."""
    if isinstance(path, bytes):
        return path.decode("utf-8", "backslashreplace")
    s = os.fspath(path)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
