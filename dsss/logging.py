# -*- test-case-name: tests.integration.test_operators -*-
"""Log output for the daemons: twisted.logger events as text or as one JSON object per line.

Text is twistd's default.

`twistd` owns logging: it opens the log observer before the application runs, from its own
options (`--logfile`, `--syslog`, `--logger`). JSON is chosen in one of two ways, both checked
with Twisted 26:

- `twistd -n --logfile=PATH dsss-server --log-format=json` (or `dsss-agent`): the tap's
  `postOptions` (which runs inside twistd's option parsing, before twistd picks its observer)
  sets twistd's `--logger` to `dsss.logging.json_logger`, which writes where twistd would have:
  `--logfile`, or stdout under `-n` without one, or `twistd.log`.
- `twistd -n --logger=dsss.logging.json_logger dsss-server`: the same observer, chosen directly.

Each line is `twisted.logger.eventAsJSON` of the event (so `eventsFromJSONLogFile` reads it back,
with `recordSeparator=""`), plus `log_text`, the formatted message (what the text log shows,
so a readiness line such as `DSSS server ready http=...` can be matched in either format),
and `log_traceback` for failures. Log calls in DSSS never pass keys, tokens or file data as
fields, so neither format contains them.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent, jsonFileLogObserver
from twisted.python import usage
from twisted.python.logfile import LogFile
from zope.interface import implementer

FORMATS = ("text", "json")
JSON_LOGGER = "dsss.logging.json_logger"

# Where twistd was told to log; recorded by the taps from twistd's own options.
_destination: dict[str, Any] = {"logfile": None, "nodaemon": True}


def json_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event as one line of JSON to `out`."""
    inner = jsonFileLogObserver(out, recordSeparator="")

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        extra: dict[str, Any] = {"log_text": formatEvent(event)}
        failure = event.get("log_failure")
        if failure is not None:
            extra["log_traceback"] = failure.getTraceback()
        inner({**event, **extra})

    return observe


def json_logger() -> ILogObserver:
    """Log observer factory for `twistd --logger=dsss.logging.json_logger`.

    Follows twistd's own rules for the destination: `--logfile=-`, or `-n` without `--logfile`,
    means stdout; otherwise the file given (default `twistd.log`), rotated by twistd's LogFile.
    """
    logfile, nodaemon = _destination["logfile"], _destination["nodaemon"]
    out: IO[str]
    if logfile == "-" or (nodaemon and not logfile):
        out = sys.stdout
    else:
        log_file = LogFile.fromFullPath(logfile or "twistd.log")
        _rotate_on_sigusr1(log_file)
        out = log_file
    return json_observer(out)


def _rotate_on_sigusr1(log_file: LogFile) -> None:
    """What twistd does for its text log: SIGUSR1 rotates the file (unless a handler is set)."""
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)


def apply_log_format(options: usage.Options) -> None:
    """For a tap's `postOptions`: check `--log-format` and, for json, switch twistd to it.

    `options.parent` is twistd's own ServerOptions when run by twistd (absent in tests that
    parse the tap's options alone).
    """
    fmt = options["log-format"]
    if fmt not in FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    parent = getattr(options, "parent", None)
    if parent is None:
        return
    _destination["logfile"] = parent.get("logfile") or None
    _destination["nodaemon"] = bool(parent.get("nodaemon"))
    if fmt != "json":
        return
    if parent.get("syslog"):
        raise usage.UsageError("--log-format=json cannot be combined with twistd's --syslog")
    if parent.get("logger") is None:
        parent["logger"] = JSON_LOGGER


LOG_FORMAT_OPTION = [
    "log-format",
    None,
    "text",
    "Log format: text, or json (one JSON object per line; see docs/operations.md).",
]
