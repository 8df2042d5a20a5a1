"""What the CLI's commands share: messages, checks, records, JSON documents, the session.

The program name, usage errors, one-line messages, address checks, the catalog record, JSON
documents and the session a command opens."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from dsss.client import catalog
from dsss.client.render import dump_json, human_size, local_date, utc_iso
from dsss.errors import DSSSError, LocalUsageError, Offline
from dsss.model import is_block_id, is_share_id

if TYPE_CHECKING:
    from nacl.public import PrivateKey

    from dsss.client.config import Settings
    from dsss.client.session import Session
    from dsss.crypto.manifest import Manifest

PROG = "python -m dsss.client"
# `check` (and `repair`) exit with this when a block has fewer healthy replicas than the target.
EXIT_DEGRADED = 7
SHORT = "3c13...131a"


class CommandLineError(LocalUsageError):
    """A bad command line (exit code 2)."""

    exit_code = 2


class Interrupted(Exception):
    """The command was stopped by SIGINT or SIGTERM; the message says what was and was not
    done (exit code 128 + the signal: 130, 143)."""


@dataclass
class InterruptState:
    """The signal that interrupted the running command, if one did."""

    signum: int | None = None


INTERRUPT = InterruptState()


def check_interrupted() -> None:
    """Raise CancelledError if the command was interrupted (for a flow that went on
    regardless: its parts swallow their cancellation)."""
    if INTERRUPT.signum is not None:
        raise defer.CancelledError()


def add_command(sub: Any, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with its one-line help, its examples and `--json`."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also accepted after the command; the global flag's default stays in force otherwise.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one JSON document on stdout (put, get -o DIR: one object per line)")
    return p


def warn(message: str) -> None:
    print(f"dsss: warning: {message}", file=sys.stderr, flush=True)


def error_line(message: str) -> None:
    print(f"dsss: error: {message}", file=sys.stderr, flush=True)


def fail(message: str, code: int = 1, *, json_mode: bool = False, kind: str = "error") -> int:
    """Report a failure (stderr, and a JSON object on stdout with --json); return its exit code."""
    error_line(message)
    if json_mode:
        dump_json({"error": message, "code": kind, "exit-code": code})
    return code


def check_address(text: str) -> str:
    """A file address as given (upper or lower case hex), in lower case."""
    address = text.strip().lower() if isinstance(text, str) else text
    if not is_block_id(address) or is_share_id(address):
        raise CommandLineError(f"not a file address (64 hex characters): {text!r}")
    return address


def printable(text: str) -> str:
    """`text` for a one-line output: a backslash, and control characters (a newline, a tab, an
    escape) written as Python escapes (`\\`, `\n`, `\t`, `\x1b`), so that each file stays on one
    line and a name cannot move the cursor. Other text, any script, is kept as it is."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def catalog_entry(settings: Settings, address: str) -> catalog.Entry | None:
    """The latest catalog entry for `address` (stored or shared by this key), if any."""
    try:
        entries, _ = catalog.read(catalog.catalog_path(settings.key))
    except OSError:
        return None
    found = [e for e in catalog.latest(entries) if e.address == address]
    return found[-1] if found else None


def offline_if_known(settings: Settings, address: str, error: DSSSError) -> DSSSError:
    """For a file no online agent has: Offline (exit 8) if the catalog says this key stored or
    shared it (so it was stored, and its holders are offline or lost it), else `error`."""
    entry = catalog_entry(settings, address)
    if entry is None:
        return error
    when = local_date(entry.created)
    return Offline(f"{address} was stored ({entry.name}, {human_size(entry.size)}, on {when} "
                   f"by your catalog), but no agent holding it is online now; try again later, "
                   f"when they are back")


def record(settings: Settings, entry: catalog.Entry) -> None:
    """Add to the catalog; a failure is a warning, never a failed put or share."""
    path = catalog.catalog_path(settings.key)
    try:
        catalog.append(path, entry)
    except OSError as e:
        warn(f"could not record {entry.address} in the catalog {path}: {e.strerror or e}")


def manifest_doc(address: str, m: Manifest) -> dict[str, Any]:
    return {
        "address": address,
        "name": m.name,
        "size": m.size,
        "part-size": m.part_size,
        "parts": len(m.parts),
        "inline": m.inline is not None,  # the file is carried inside its manifest
        "created": m.created,
        "created-utc": utc_iso(m.created),
    }


async def session_for(reactor: Any, args: argparse.Namespace, settings: Settings, key: PrivateKey) -> Session:
    """The session a command runs on: the settings, with the global options of its command line."""
    from dsss.client.session import SessionOptions, open_session

    overrides: dict[str, Any] = {
        "datagram_size": getattr(args, "datagram_size", None),
        "chain": getattr(args, "chain", None),
        "verbose": bool(getattr(args, "verbose", False)),
    }
    if getattr(args, "wait", None) is not None:
        overrides["wait"] = args.wait
    options = SessionOptions.from_settings(settings, **overrides)

    def waiting(message: str) -> None:
        print(f"dsss: {message}", file=sys.stderr, flush=True)

    return await open_session(reactor, options, key, on_wait=waiting)
