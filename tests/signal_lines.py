"""Run gguf-split's entry point once per line of `_main.py` it executes, each time in a fresh forked child
that sends itself a signal as that line is reached; print one JSON record per run (the last run reaches no
line of its own: the undisturbed outcome).

    python signal_lines.py SIGNUM ARGS...

A line event comes before the line's first instruction, and a pending Python signal handler runs at the
next call or backward jump, which is where the interpreter would run it had the signal come from outside:
every point of `main()` at which a real signal can act is covered. `try:` lines compile to no instruction
and are skipped (a handler run by the tracer there would raise outside the `try` it opens, which no real
signal can). The parent imports the CLI once, so each child costs a fork.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback
from types import FrameType
from typing import Any, Callable, Optional

import gguf_split._main as entry
import gguf_split.cli.app  # imported before forking: children start with it loaded

SOURCE = open(entry.__file__, encoding="utf-8").read().splitlines()
Tracer = Callable[[FrameType, str, Any], Optional["Tracer"]]


def child(sig: int, argv: list[str], k: int, out: str, err: str, note: str) -> None:
    os.dup2(os.open(out, os.O_WRONLY), 1)
    os.dup2(os.open(err, os.O_WRONLY), 2)
    seen = 0

    def on_line(frame: FrameType, event: str, arg: Any) -> Tracer:
        nonlocal seen
        if event == "line" and SOURCE[frame.f_lineno - 1].strip() != "try:":
            if seen == k:
                handler = signal.getsignal(sig)
                with open(note, "w") as f:  # whose handler the signal meets: gguf-split's, or the default
                    f.write("ours" if handler is entry._interrupt or handler == signal.SIG_IGN else "default")
                os.kill(os.getpid(), sig)
            seen += 1
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Optional[Tracer]:
        return on_line if frame.f_code.co_filename == entry.__file__ else None

    sys.argv = ["gguf-split", *argv]
    code = 0
    sys.settrace(on_call)
    try:
        entry.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # what would reach the interpreter: a traceback
        traceback.print_exc()
        code = 1
    sys.settrace(None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def warm_up(argv: list[str]) -> None:
    """Run the command once in the parent, output discarded: every module it imports is loaded before the
    children fork (tracing them all in every child is slow)."""
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        gguf_split.cli.app.run(argv)
    except SystemExit:
        pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)


def main() -> None:
    sig, argv = int(sys.argv[1]), sys.argv[2:]
    if argv not in (["--version"], ["-V"]):
        warm_up(argv)
    with tempfile.TemporaryDirectory() as d:
        for k in range(10_000):
            out, err, note = (os.path.join(d, f"{k}.{x}") for x in ("out", "err", "note"))
            for p in (out, err, note):
                open(p, "w").close()
            pid = os.fork()
            if pid == 0:
                child(sig, argv, k, out, err, note)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            with open(note) as f, open(out) as o, open(err) as e:
                sent = f.read() or None
                print(json.dumps({"k": k, "code": code, "sent": sent, "stdout": o.read(), "stderr": e.read()}),
                      flush=True)
            if sent is None:  # the run ended before its k-th line: every line has had its signal
                return
    raise AssertionError("main() never ended")


if __name__ == "__main__":
    main()
