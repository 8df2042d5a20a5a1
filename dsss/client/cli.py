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
import traceback
from typing import Any, Sequence

from twisted.internet import defer

from dsss.client.commands import files, health, keys, serve, transfer
from dsss.client.commands.common import PROG, SHORT, CommandLineError, fail
from dsss.client.config import MAX_PARALLEL, settings_from
from dsss.client.render import dump_json
from dsss.errors import DSSSError

# The network side (treq, qh3, ...) is imported only by the commands that use it, so that
# keygen, pubkey, ls, config and --help start quickly.

__all__ = ["CommandLineError", "build_parser", "main", "run", "wants_json"]


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

examples:
  {PROG} keygen
  {PROG} put photo.jpg notes.txt
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
    p.add_argument("-v", "--verbose", action="store_true", default=False,
                   help="also say on stderr which path reached each agent (direct or relay)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (keys, transfer, files, health, serve):
        group.register(sub)
    return p


async def run(reactor: Any, argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
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


def main(reactor: Any, *argv: str) -> defer.Deferred[None]:
    json_mode = wants_json(argv)

    async def go() -> None:
        try:
            code = await run(reactor, argv)
        except DSSSError as e:
            code = fail(str(e), e.exit_code, json_mode=json_mode, kind=e.code)
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            code = fail(f"{e.strerror or e}{where}", 1, json_mode=json_mode, kind="os")
        except SystemExit as e:
            raise e
        except Exception:
            traceback.print_exc()
            if json_mode:
                dump_json({"error": "unexpected error (a bug); see the traceback on stderr",
                           "code": "bug", "exit-code": 70})
            code = 70
        if code:
            raise SystemExit(code)

    return defer.ensureDeferred(go())
