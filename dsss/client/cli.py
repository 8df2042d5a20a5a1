# -*- test-case-name: tests.integration.test_cli_commands,tests.integration.test_client -*-
"""`python -m dsss.client [OPTIONS] COMMAND ...`: the parser, the dispatch and errors to exit codes.

Each known error becomes one line and an exit code. The commands live in `dsss.client.commands`.

What a command produces goes to stdout (addresses, tables, reports; one JSON document with
`--json`, except `put` and a `get` into a directory, which write one JSON object per line, one
per file). Everything else
(progress bars on a terminal, warnings, errors) goes to stderr. Every known failure is one line
`dsss: error: ...` on stderr and a non-zero exit code; with `--json` the same error is also a JSON
object on stdout. A traceback is printed only for a bug.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

import dsss
from dsss.client.commands import catalog, files, health, keys, leases, serve, transfer
from dsss.client.commands.common import INTERRUPT, PROG, SHORT, CommandLineError, Interrupted, fail
from dsss.client.config import MAX_PARALLEL, settings_from
from dsss.client.session import DEFAULT_WAIT, MAX_WAIT
from dsss.client.render import dump_json
from dsss.errors import DSSSError

# The network side (treq, qh3, ...) is imported only by the commands that use it, so that
# keygen, pubkey, ls, config and --help start quickly.

__all__ = ["CommandLineError", "build_parser", "main", "run", "wants_json"]

EXIT_BROKEN_PIPE = 141
"""The exit code when the reader of stdout went away (as for a process killed by SIGPIPE)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors turned into our one-line error (and JSON, with --json)."""

    def error(self, message: str) -> Any:
        raise CommandLineError(f"{message} (see `{self.prog} --help`)")


EPILOG = f"""commands:
  keygen   create your key pair               pubkey   print your public key
  put      store files                        get      fetch files
  ls       list what this key stored          info     show a file's manifest
  share    let another key read a file        check    count each part's replicas
  repair   restore missing replicas           config   show the settings in force
  gateway  serve put and get over HTTP on this machine (a long-running client)
  catalog  back up the catalog to the network, or restore it

examples:
  {PROG} keygen
  {PROG} put photo.jpg notes.txt
  {PROG} put -r photos/                  # a whole tree: one address
  {PROG} get {SHORT} -o photo.jpg
  {PROG} --json ls
  {PROG} share {SHORT} --to bob.pub
  {PROG} --server http://192.0.2.10:8470 check --all

settings: command line > $DSSS_SERVER, $DSSS_KEY > config file ($DSSS_CONFIG or
~/.config/dsss/config.toml: server, key, part-size, parallel, erasure) > defaults.
Run `{PROG} COMMAND --help` for a command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Store files on a DSSS network, encrypted on this machine, and get them back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", default=None, metavar="URL",
                   help="discovery server URL (default: $DSSS_SERVER, config, http://127.0.0.1:8470)")
    p.add_argument("--key", default=None, metavar="FILE",
                   help="key file (default: $DSSS_KEY, config, ~/.config/dsss/key)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="config file (default: $DSSS_CONFIG or ~/.config/dsss/config.toml)")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help=f"parts in flight at once, 1 to {MAX_PARALLEL} (default 4)")
    p.add_argument("--datagram-size", type=int, default=None, metavar="BYTES",
                   help="largest QUIC datagram (default: 65000 on loopback, else 1452)")
    p.add_argument("--json", action="store_true", default=False,
                   help="machine-readable output: one JSON document on stdout")
    p.add_argument("--chain", action=argparse.BooleanOptionalAction, default=None,
                   help="store the copies of a part by sending it once, to the first agent of a "
                        "chain that passes it on, instead of sending every copy from here "
                        "(default: chain unless the server is on loopback, where there is no "
                        "uplink to save)")
    p.add_argument("--wait", type=_seconds, default=None, metavar="SECONDS",
                   help=f"keep trying a server that cannot be reached at the start for this long, "
                        f"with backoff, before giving up with exit code 4 (default {DEFAULT_WAIT:g}; 0: "
                        f"give up at once)")
    p.add_argument("-v", "--verbose", action="store_true", default=False,
                   help="also say on stderr which path reached each agent (direct or relay) and "
                        "how many bytes were uploaded")
    p.add_argument("--version", action="version", version=f"dsss {dsss.__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (keys, transfer, files, health, leases, serve, catalog):
        group.register(sub)
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= MAX_WAIT:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_WAIT:g} seconds")
    return value


async def run(reactor: Any, argv: Sequence[str]) -> int:
    """Parse `argv` and run its command (no signal handling: see `main`)."""
    args = build_parser().parse_args(list(argv))
    return await dispatch(reactor, args)


async def dispatch(reactor: Any, args: argparse.Namespace) -> int:
    settings = settings_from(
        config_option=args.config,
        server=args.server,
        key=args.key,
        part_size=getattr(args, "part_size", None),
        parallel=args.parallel,
        erasure=getattr(args, "erasure", None),
    )
    code: int = await args.func(reactor, args, settings)
    return code


def wants_json(argv: Sequence[str]) -> bool:
    """Whether --json is on the command line (before any `--`), known even if parsing fails."""
    args = list(argv)
    if "--" in args:
        args = args[: args.index("--")]
    return "--json" in args


GRACE = 10.0
"""Seconds an interrupted command gets to stop cleanly (close its connections, say what it
stored) before the process leaves anyway; a second signal leaves at once."""


def _interrupt_message(signum: int, detail: str) -> str:
    name = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}.get(signal.Signals(signum), str(signum))
    return f"interrupted ({name}){': ' + detail if detail else ''}"


def _quiet_stdout() -> None:
    """stdout's reader went away (`dsss ls | head`): send what is left nowhere, so that no
    later write or flush fails again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(reactor: Any, *argv: str) -> defer.Deferred[None]:
    """Run the command in `argv` under `react`. SIGINT and SIGTERM cancel a running command
    (put, get, ...: it says what was and was not stored, then exit code 130 or 143); the
    gateway keeps Twisted's own handling (a clean stop, exit code 0)."""
    json_mode = wants_json(argv)
    INTERRUPT.signum = None
    outer: defer.Deferred[None] = defer.Deferred()
    command: list[defer.Deferred[int]] = []
    reported: list[bool] = []

    def report(code: int, message: str, kind: str) -> int:
        if not reported:
            reported.append(True)
            fail(message, code, json_mode=json_mode, kind=kind)
        return code

    def interrupted(detail: str) -> int:
        signum = INTERRUPT.signum or signal.SIGINT
        message = _interrupt_message(signum, detail)
        if not reported:
            reported.append(True)
            print(f"dsss: {message}", file=sys.stderr, flush=True)
            if json_mode:
                dump_json({"error": message, "code": "interrupted", "exit-code": 128 + signum})
        return 128 + signum

    def finish(code: int) -> None:
        if not outer.called:
            if code:
                outer.errback(SystemExit(code))
            else:
                outer.callback(None)

    def interrupt(signum: int) -> None:
        if INTERRUPT.signum is not None:  # a second signal: leave now
            finish(interrupted(""))
            return
        INTERRUPT.signum = signum
        if command and not command[0].called:
            command[0].cancel()
        reactor.callLater(GRACE, lambda: finish(interrupted("")))

    def on_signal(signum: int, _frame: Any = None) -> None:
        reactor.callFromThread(interrupt, signum)

    async def go() -> int:
        try:
            args = build_parser().parse_args(list(argv))
            if not getattr(args, "own_signals", False):
                # The reactor installs these as its SIGINT and SIGTERM handlers when it starts
                # (instead of stopping itself, which would end the command with exit code 0).
                reactor.sigInt = reactor.sigTerm = on_signal
            d = defer.ensureDeferred(dispatch(reactor, args))
            command.append(d)
            return await d
        except Interrupted as e:
            return interrupted(str(e))
        except defer.CancelledError:
            if INTERRUPT.signum is None:
                raise
            return interrupted("")
        except DSSSError as e:
            if INTERRUPT.signum is not None:
                return interrupted(str(e))
            return report(e.exit_code, str(e), e.code)
        except BrokenPipeError:
            # The reader of our output went away (`| head`): not an error to report.
            _quiet_stdout()
            return EXIT_BROKEN_PIPE
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            return report(1, f"{e.strerror or e}{where}", "os")

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            if isinstance(result.value, SystemExit):  # --help, --version
                code = result.value.code
                finish(0 if code is None else code if isinstance(code, int) else 1)
                return
            result.printTraceback()
            if json_mode:
                dump_json({"error": "unexpected error (a bug); see the traceback on stderr",
                           "code": "bug", "exit-code": 70})
            finish(70)
            return
        finish(int(result))

    defer.ensureDeferred(go()).addBoth(done)
    return outer
