"""What the CLI's commands share: messages, checks, records, JSON documents, the session.

The program name, usage errors, one-line messages, address checks, the catalog record, JSON
documents and the session a command opens."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from dsss.client import catalog
from dsss.client.render import dump_json, utc_iso
from dsss.errors import LocalUsageError
from dsss.model import is_block_id, is_share_id

if TYPE_CHECKING:
    from nacl.public import PrivateKey

    from dsss.client.config import Settings
    from dsss.client.flows import Session
    from dsss.crypto.manifest import Manifest

PROG = "python -m dsss.client"
# `check` (and `repair`) exit with this when a block has fewer healthy replicas than the target.
EXIT_DEGRADED = 7
SHORT = "3c13...131a"


class CommandLineError(LocalUsageError):
    """A bad command line (exit code 2)."""

    exit_code = 2


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
    if not is_block_id(text) or is_share_id(text):
        raise CommandLineError(f"not a file address (64 lowercase hex characters): {text!r}")
    return text


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

    options = SessionOptions.from_settings(
        settings,
        datagram_size=getattr(args, "datagram_size", None),
        chain=getattr(args, "chain", None),
        verbose=bool(getattr(args, "verbose", False)),
    )
    return await open_session(reactor, options, key)
