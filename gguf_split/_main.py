"""The console script's entry point: as little as possible runs before Ctrl-C and SIGTERM are handled.

`gguf-split --version` answers without importing typer, rich, numpy or gguf. Everything else imports the
CLI inside the handlers, so an interruption at any moment, even while modules load, is one line and exit
code 130 (Ctrl-C) or 143 (SIGTERM), never a traceback. The handlers raise `Interrupted`, a BaseException
that is not a KeyboardInterrupt, so click does not turn it into "Aborted!" and every `with` block on the
way out still cleans up (temporary files removed, a commit either done or not started); an interruption
after a commit says what stands instead (errors.add_state: "the split in out is complete; ..."). Once the command
is done, the signals are ignored: Python's shutdown would otherwise restore the default actions, and a
Ctrl-C in that last instant would kill the finished process with no message.
"""

from __future__ import annotations

import signal
import sys

_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(BaseException):
    """Ctrl-C (SIGINT)."""


class Terminated(Interrupted):
    """SIGTERM or SIGHUP."""


def _interrupt(signum: int, _frame: object) -> None:
    raise Terminated(signum) if signum != signal.SIGINT else Interrupted(signum)


def _quiet_exit(code: int | str | None) -> None:
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


def main() -> None:
    code: int | str | None = 0
    try:
        for sig in _SIGNALS:
            signal.signal(sig, _interrupt)
        argv = sys.argv[1:]
        if argv in (["--version"], ["-V"]):
            from . import __version__

            sys.stdout.write(f"gguf-split {__version__}\n")
            sys.stdout.flush()
        else:
            for stream in (sys.stdout, sys.stderr):
                reconfigure = getattr(stream, "reconfigure", None)
                if reconfigure is not None:
                    reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 never crashes output
            from .cli.app import run

            run(argv)
    except SystemExit as e:
        code = e.code
    except (Interrupted, KeyboardInterrupt) as e:
        terminated = isinstance(e, Terminated)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
            from .errors import state_of

            stands = "; ".join(state_of(e)) or "no partial output was left behind"
            sys.stderr.write(f"gguf-split: {'terminated' if terminated else 'interrupted'}; {stands}\n")
        except Exception:  # noqa: BLE001 - stderr itself may be gone
            pass
        code = 143 if terminated else 130
    try:
        sys.stdout.flush()
    except (Interrupted, Exception):  # noqa: BLE001 - a closed pipe: the exit code still counts
        pass
    _quiet_exit(code)
