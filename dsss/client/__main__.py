"""The entry point of `python -m dsss.client` and the `dsss` script: start and leave fast.

Start-up and exit are part of every command's time (a put of 256 MiB takes a few seconds), so
this entry point spends as little as it can on either: the garbage collector is off while the
modules load (imports create many objects and no garbage; a put's collections are cheap once
`dsss.client.cli` has frozen what the imports made) and, once the command has ended and its
output is flushed, the process leaves with `os._exit` instead of tearing its modules down one
by one. Together about 0.17 s of the 0.9 s a command took on the benchmark machine.
"""

import gc
import os
import signal
import sys
from types import FrameType


class _EarlySignal(BaseException):
    """SIGINT or SIGTERM before the command could handle it (while the modules load)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _early(signum: int, _frame: FrameType | None) -> None:
    raise _EarlySignal(signum)


def entry() -> None:
    gc.disable()  # dsss.client.cli turns it back on once the command's modules are loaded
    # Until the reactor runs the command's own handlers, SIGINT (Python's KeyboardInterrupt,
    # which Twisted replaces only while it is in force) and SIGTERM stop with 130 or 143,
    # having done nothing.
    signal.signal(signal.SIGTERM, _early)
    try:
        from twisted.internet.task import react

        from dsss.client.cli import main

        react(main, sys.argv[1:])
    except (_EarlySignal, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, _EarlySignal) else signal.SIGINT
        name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
        print(f"dsss: interrupted ({name}) before the command started: nothing was done",
              file=sys.stderr)
        code: object = 128 + signum
    except SystemExit as e:
        code = e.code
    else:  # pragma: no cover - react always exits
        code = 0
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader of stdout went away (a pipe to `head`): quietly
        code = code or 141
    except (OSError, ValueError):  # stdout was closed
        code = code or 1
    # Every file the command wrote is closed (and a fetched file renamed into place) before
    # react returns; nothing is left for interpreter teardown to do but free memory.
    os._exit(code)


if __name__ == "__main__":
    entry()
