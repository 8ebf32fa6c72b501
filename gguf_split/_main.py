"""The console script's entry point: Ctrl-C and SIGTERM are handled from its first statement on.

Its first statement installs the handlers; before it only the interpreter's start-up and the imports of
`gguf_split/__init__.py` (kept to a few standard modules already loaded by then) and of this module run.
A signal in that window, before any code of ours, cannot be caught: SIGTERM kills the process (exit -15)
and Ctrl-C is Python's KeyboardInterrupt. From the first statement on, an interruption is one line and
exit code 130 (Ctrl-C) or 143 (SIGTERM, SIGHUP), never a traceback, while modules load or the command
runs. `gguf-split --version` answers without importing typer, rich, numpy or gguf; everything else
imports the CLI under the handlers.

The handlers raise `Interrupted`, a BaseException that is not a KeyboardInterrupt, so click does not turn
it into "Aborted!" and every `with` block on the way out still cleans up (temporary files removed, a commit
either done or not started); an interruption after a commit says what stands instead (errors.add_state:
"the split in out is complete; ..."). Once the outcome is decided (the command returned, or the interruption is
being reported), `_decided` is set and the handlers do nothing: a signal then can neither interrupt the
one-line message nor raise where nothing catches it. At exit the signals are ignored, since Python's
shutdown would restore the default actions and a Ctrl-C in that last instant would kill the finished
process with no message. Installing the handlers is the entry point's job, never `import gguf_split`'s:
a library user's own handlers are left alone.
"""

from __future__ import annotations

import signal
import sys

_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None), signal.SIGINT) if s is not None)
_decided = False  # the command is done (its exit code fixed): a signal changes nothing any more...
_delivering = False  # ...except while its output is still being written (a reader may have stopped reading)


class Interrupted(BaseException):
    """Ctrl-C (SIGINT)."""


class Terminated(Interrupted):
    """SIGTERM or SIGHUP."""


def _interrupt(signum: int, _frame: object) -> None:
    if _decided and not _delivering:
        return
    raise Terminated(signum) if signum != signal.SIGINT else Interrupted(signum)


def main() -> None:
    global _decided
    try:
        try:
            signal.signal(signal.SIGTERM, _interrupt)  # the first statement (`try` adds no instruction)
            for sig in _SIGNALS:  # until here a Ctrl-C is Python's KeyboardInterrupt: caught below as ours
                signal.signal(sig, _interrupt)
            code = _command(sys.argv[1:])
        finally:
            _decided = True  # a signal before this line raised in the command; after it, it is ignored
        _deliver_output()
    except (Interrupted, KeyboardInterrupt) as e:
        _decided = True
        code = _report_interruption(isinstance(e, Terminated), e)
    except Exception as e:
        cause = _interruption_behind(e)
        if cause is None:
            raise
        _decided = True
        code = _report_interruption(isinstance(cause, Terminated), cause)
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


def _command(argv: list[str]) -> int | str | None:
    """Run the command line; its exit code."""
    try:
        if argv in (["--version"], ["-V"]):
            from . import __version__

            sys.stdout.write(f"gguf-split {__version__}\n")
        else:
            for stream in (sys.stdout, sys.stderr):
                reconfigure = getattr(stream, "reconfigure", None)
                if reconfigure is not None:
                    reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 never crashes output
            from .cli.app import run

            run(argv)
    except SystemExit as e:
        return e.code
    return 0


def _deliver_output() -> None:
    """Flush what the command printed. A signal while this blocks (a pipe nobody reads) still ends the run
    with one line: Ctrl-C and SIGTERM never leave a process hanging on its output."""
    global _delivering
    _delivering = True
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed pipe: the exit code still counts
        pass
    finally:
        _delivering = False


def _interruption_behind(e: BaseException) -> BaseException | None:
    """The interruption an exception was raised from, if any. Python wraps an exception raised while a class
    is being made (a signal landing in a dataclass's `__set_name__` as a module is imported) in a
    RuntimeError; the interruption is still the whole story."""
    seen: set[int] = set()
    at: BaseException | None = e
    while at is not None and id(at) not in seen:
        if isinstance(at, (Interrupted, KeyboardInterrupt)):
            return at
        seen.add(id(at))
        at = at.__cause__ or at.__context__
    return None


def _report_interruption(terminated: bool, e: BaseException) -> int:
    """One line: what stands after a commit the interruption came after, or that nothing was left behind."""
    try:
        from .errors import state_of

        stands = "; ".join(state_of(e)) or "no partial output was left behind"
        sys.stderr.write(f"gguf-split: {'terminated' if terminated else 'interrupted'}; {stands}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - stderr itself may be gone
        pass
    return 143 if terminated else 130
