# -*- test-case-name: tests.integration.test_leases -*-
"""The commands about how long files are kept: rm, renew, usage (and put's --keep)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from dsss.client import catalog
from dsss.client.commands.common import (
    PROG,
    SHORT,
    CommandLineError,
    add_command,
    check_address,
    record,
    session_for,
    warn,
)
from dsss.client.config import Settings
from dsss.client.leasing import LeaseIncomplete, LeaseReport, check_report, release_leases, take_leases
from dsss.crypto.manifest import clean_name
from dsss.client.render import dump_json, human_size, local_date
from dsss.crypto.keys import load_key_file
from dsss.errors import DSSSError, NotFound
from dsss.leases import DEFAULT_KEEP, MAX_TERM, NOT_FOUND, OK, parse_duration

if TYPE_CHECKING:
    from dsss.client.tree import Kept

KEEP_HELP = (f"how long the network keeps the file unless renewed, e.g. 90d, 12h, 2w, 1y "
             f"(default {DEFAULT_KEEP // 86400}d)")
MIN_KEEP = 3600
"""Shortest --keep: an hour (a lease shorter than the time a put takes would not keep it)."""


def keep_seconds(text: str | None) -> int:
    """--keep DURATION in seconds (the default if None); CommandLineError if out of range."""
    if text is None:
        return DEFAULT_KEEP
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise CommandLineError(f"--keep: {e}") from None
    if not MIN_KEEP <= seconds <= MAX_TERM:
        raise CommandLineError(f"--keep must be from 1h to {MAX_TERM // (365 * 86400)}y")
    return seconds


def register(sub: Any) -> None:
    rm = add_command(sub, "rm", "drop this key's leases on files: the network frees their space", f"""examples:
  {PROG} rm {SHORT}
  {PROG} rm ADDRESS1 ADDRESS2

Releases this key's leases on each file's manifest and parts on every agent that holds them;
agents delete what no lease keeps any more, after a grace period (minutes). A file that another
key shared or leased keeps its blocks for as long as that key's leases run: rm says so. Only
this key's own leases are dropped: no one can delete another key's file.
""")
    rm.add_argument("addresses", nargs="+", metavar="ADDRESS")
    rm.set_defaults(func=cmd_rm)

    renew = add_command(sub, "renew", "keep files longer: take new leases on them", f"""examples:
  {PROG} renew {SHORT}                # kept 90 days from now
  {PROG} renew --keep 1y {SHORT}
  {PROG} renew --all                  # every file in this key's catalog

A file is kept while some key holds a live lease on it: `put` takes them for --keep (90 days
by default); renew before they end. An address someone shared with you can be renewed too:
that takes leases of your own, so the file stays when the sharer removes theirs.
""")
    renew.add_argument("addresses", nargs="*", metavar="ADDRESS")
    renew.add_argument("--all", action="store_true", help="every file in this key's catalog (not removed)")
    renew.add_argument("--keep", default=None, metavar="DURATION", help=KEEP_HELP)
    renew.set_defaults(func=cmd_renew)

    usage = add_command(sub, "usage", "what this key keeps on the network, and its quota", f"""examples:
  {PROG} usage
  {PROG} --json usage

Counts the files in this key's catalog whose leases have not ended, their size, and when the
first lease ends (renew before then). A server started with --clients also says how many bytes
this key's leases keep on its agents (every replica counted) and its quota; if the server
cannot be reached, only the catalog is shown, with a warning.
""")
    usage.set_defaults(func=cmd_usage)


def _entries(settings: Settings) -> dict[str, catalog.Entry]:
    entries, _ = catalog.read(catalog.catalog_path(settings.key))
    return {e.address: e for e in catalog.latest(entries)}


def _report_doc(report: LeaseReport) -> dict[str, Any]:
    return {
        "blocks": len(set(report.outcomes) | set(report.errors) | set(report.missing)),
        "holders": report.holders(),
        "shared-blocks": len(report.shared_blocks()),
        "errors": sorted({e for per in report.errors.values() for e in per.values()})[:5],
    }


def _unreleased(report: LeaseReport) -> int:
    """Block copies whose release some holder did not take (released, or already gone from
    that holder: either way not kept by this key there)."""
    unreleased = [b for b, per in report.outcomes.items()
                  if any(o.status not in (OK, NOT_FOUND) for o in per.values())]
    return sum(len(per) for per in report.errors.values()) + len(unreleased)


async def _release(session: Any, address: str, kept: "Kept") -> LeaseReport:
    """Release every block of `kept`; a tree's files first, its directories only once every file
    is released (so that a failed rm can be run again: the directories, still kept, name the
    files). LeaseIncomplete if some holder did not take a release."""
    report = await release_leases(session, [b for f in kept.files for b in f])
    if kept.directory and not _unreleased(report):
        more = await release_leases(session, kept.dirs)
        for name in ("outcomes", "errors"):
            getattr(report, name).update(getattr(more, name))
        report.missing += more.missing
    where = _unreleased(report)
    if where:
        raise LeaseIncomplete(
            f"{address}: released on some holders, but {where} block copies could not be "
            f"released now (their lease ends when it expires); run rm again later")
    return report


async def cmd_rm(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.tree import kept_blocks, printable

    addresses = list(dict.fromkeys(map(check_address, args.addresses)))
    key = load_key_file(settings.key)
    known = _entries(settings)
    session = await session_for(reactor, args, settings, key)
    docs: list[dict[str, Any]] = []
    failures: list[DSSSError] = []
    try:
        for address in addresses:
            try:
                kept = await kept_blocks(session, address, key)
                report = await _release(session, address, kept)
            except DSSSError as e:
                failures.append(e)
                docs.append({"address": address, "removed": False, "error": str(e), "code": e.code})
                continue
            shared = report.shared_blocks()
            entry = known.get(address)
            record(settings, catalog.Entry(
                address=address, name=clean_name(kept.name), size=kept.size, parts=kept.parts,
                created=entry.created if entry else int(time.time()), kind=catalog.KIND_REMOVED,
                source=entry.source if entry else None, directory=kept.directory))
            doc = {"address": address, "name": kept.name, "removed": True, **_report_doc(report)}
            if kept.directory:
                doc.update({"type": "directory", "files": kept.parts, "files-gone": len(kept.missing)})
            docs.append(doc)
            if not args.json:
                print(f"removed {address} {printable(kept.name)}"
                      + (f"/ ({kept.parts} files)" if kept.directory else ""))
                if kept.missing:
                    print(f"  {len(kept.missing)} of its files were gone already", file=sys.stderr)
                if shared:
                    print(f"  {len(shared)} of its blocks stay: another key holds leases on them "
                          f"(a shared file stays for its other owners)", file=sys.stderr)
    finally:
        await session.peers.close()
    if args.json:
        dump_json({"files": docs})
    if failures:
        raise failures[0] if len(addresses) == 1 else _summary(failures, len(addresses))
    return 0


def _summary(failures: list[DSSSError], total: int) -> DSSSError:
    first = failures[0]
    e = DSSSError(f"{first} (and {len(failures) - 1} more failed; {total - len(failures)} of {total} done)"
                  if len(failures) > 1 else f"{first}; {total - 1} of {total} done")
    e.exit_code, e.code = first.exit_code, first.code
    return e


async def cmd_renew(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.tree import kept_blocks, printable

    keep = keep_seconds(args.keep)
    known = _entries(settings)
    addresses = list(dict.fromkeys(map(check_address, args.addresses)))
    if args.all:
        addresses += [a for a, e in known.items() if e.kind != catalog.KIND_REMOVED and a not in addresses]
        if not addresses:
            raise CommandLineError(f"--all: no file in the catalog {catalog.catalog_path(settings.key)}")
    elif not addresses:
        raise CommandLineError(f"give at least one ADDRESS, or --all (see `{PROG} renew --help`)")
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    docs: list[dict[str, Any]] = []
    failures: list[DSSSError] = []
    try:
        for address in addresses:
            now = int(time.time())
            try:
                kept = await kept_blocks(session, address, key)
                if kept.missing:
                    raise NotFound(f"{printable('/'.join(kept.missing[0]))} and {len(kept.missing) - 1} more "
                                   f"file(s) of this tree are gone; nothing was renewed"
                                   if len(kept.missing) > 1 else
                                   f"{printable('/'.join(kept.missing[0]))} of this tree is gone; "
                                   f"nothing was renewed")
                report = await take_leases(session, kept.blocks(), keep, now)
                check_report(report, "renew")
            except DSSSError as e:
                if isinstance(e, NotFound):
                    e = NotFound(f"{address}: {e} (its leases may have ended: it is gone)")
                failures.append(e)
                docs.append({"address": address, "renewed": False, "error": str(e), "code": e.code})
                continue
            entry = known.get(address)
            kind = entry.kind if entry is not None and entry.kind != catalog.KIND_REMOVED else (
                catalog.KIND_PUT if entry is not None else catalog.KIND_LEASED)
            record(settings, catalog.Entry(
                address=address, name=clean_name(kept.name), size=kept.size, parts=kept.parts,
                created=entry.created if entry else now, kind=kind,
                source=entry.source if entry else None, directory=kept.directory, expires=now + keep))
            docs.append({"address": address, "name": kept.name, "renewed": True,
                         "expires": now + keep, **_report_doc(report)})
            if not args.json:
                shown = printable(kept.name) + ("/" if kept.directory else "")
                print(f"renewed {address} {shown} until {local_date(now + keep)}")
            partial = [b for b, per in report.errors.items() if per]
            if partial and not args.json:
                warn(f"{address}: {len(partial)} block(s) could not be renewed on every holder")
    finally:
        await session.peers.close()
    if args.json:
        dump_json({"files": docs})
    if failures:
        raise failures[0] if len(addresses) == 1 else _summary(failures, len(addresses))
    return 0


async def _server_usage(reactor: Any, settings: Settings) -> dict[str, Any] | None:
    """What a restricted server counts for this key (bytes leased, quota); None from an open
    server, which keeps no account of clients."""
    from dsss.client.discovery import DiscoveryClient

    discovery = DiscoveryClient(settings.server, reactor=reactor, key=load_key_file(settings.key))
    await discovery.info()
    if discovery._server_key is None:
        return None
    return await discovery.usage()


async def cmd_usage(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    try:
        server = await _server_usage(reactor, settings)
    except DSSSError as e:
        warn(f"the server did not say what it counts for this key: {e}")
        server = None
    now = int(time.time())
    kept = [e for e in _entries(settings).values()
            if e.kind != catalog.KIND_REMOVED and not e.shared and (e.expires is None or e.expires > now)]
    size = sum(e.size for e in kept)
    ends = [e.expires for e in kept if e.expires is not None]
    first = min(ends) if ends else None
    doc: dict[str, Any] = {"files": len(kept), "bytes": size, "first-expiry": first,
                           "catalog": str(catalog.catalog_path(settings.key))}
    if server is not None:
        doc["leased"], doc["quota"] = server["used"], server.get("quota")
    if args.json:
        dump_json(doc)
        return 0
    print(f"files:        {len(kept)}")
    print(f"size:         {human_size(size)} ({size} bytes, before replication)")
    print(f"first expiry: {local_date(first) if first is not None else '-'}")
    if server is not None:
        quota = server.get("quota")
        limit = f" of {human_size(quota)} ({quota} bytes)" if isinstance(quota, int) else " (no quota)"
        print(f"leased:       {human_size(server['used'])} ({server['used']} bytes, every replica){limit}")
    return 0
