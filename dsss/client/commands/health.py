# -*- test-case-name: tests.integration.test_cli_commands -*-
"""The health commands: check (count each block's healthy replicas) and repair (restore them)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from nacl.public import PrivateKey

from dsss.client import catalog
from dsss.client.commands.common import (
    EXIT_DEGRADED,
    PROG,
    SHORT,
    CommandLineError,
    add_command,
    check_address,
    error_line,
    offline_if_known,
    session_for,
)
from dsss.client.config import Settings
from dsss.client.render import dump_json, table
from dsss.crypto.keys import load_key_file
from dsss.errors import DSSSError, NotFound

if TYPE_CHECKING:
    from dsss.client.maintenance import FileHealth, Repaired
    from dsss.client.session import Session

_HELP = {
    "check": ("count the healthy replicas of a file's manifest and parts", f"""examples:
  {PROG} check {SHORT}
  {PROG} check --verify {SHORT}          # also download and hash every copy
  {PROG} check --all                    # every file and share in your catalog

Exit code 0 when every block has the server's replica count, {EXIT_DEGRADED} when some have fewer.
"""),
    "repair": ("copy blocks that lost replicas to other agents until the count is reached", f"""examples:
  {PROG} repair {SHORT}
  {PROG} repair --verify --all

Blocks are copied from a healthy holder to agents that do not hold them yet. A share you made
(`share`) is checked and repaired like a file: its own manifest, and the parts it shares.
"""),
}


def register(sub: Any) -> None:
    for name, func in (("check", cmd_check), ("repair", cmd_repair)):
        c = add_command(sub, name, *_HELP[name])
        c.add_argument("addresses", nargs="*", metavar="ADDRESS")
        c.add_argument("--all", action="store_true",
                       help="every file stored with `put`, and every share made with `share`, in this "
                            "key's catalog")
        c.add_argument("--verify", action="store_true",
                       help="download every holder's copy and check its hash (slower)")
        c.set_defaults(func=func)


def _targets(args: argparse.Namespace, settings: Settings) -> list[tuple[str, str | None]]:
    """The files to check or repair, each as (address, source): `source` is, for a share this
    key made, the address it was shared from (see `maintenance.survey`)."""
    entries, _ = catalog.read(catalog.catalog_path(settings.key))
    latest = catalog.latest(entries)
    sources = {e.address: e.source for e in latest if e.shared and e.source is not None}
    given = list(map(check_address, args.addresses))
    if args.all:
        # A directory (put -r) is not a file: `check` surveys files' manifests and parts.
        found = [e.address for e in latest
                 if (not e.shared or e.source is not None) and not e.directory]
        if not found and not given:
            raise CommandLineError(f"--all: no file in the catalog {catalog.catalog_path(settings.key)}")
        given += found
    elif not given:
        raise CommandLineError(f"give at least one ADDRESS, or --all (see `{PROG} {args.command} --help`)")
    return [(a, sources.get(a)) for a in dict.fromkeys(given)]


def _wanted(health: FileHealth) -> str:
    """What each block of the file should have: `3 replicas`, or with erasure coding `3
    replicas (the manifest) or 1 (a share)`."""
    if health.manifest.erasure is None:
        return f"{health.target} replicas"
    return f"{health.target} replicas (the manifest) or 1 (a share)"


def _counted(health: FileHealth) -> str:
    """What a replica is in this report: verified by download, proven to the server, or (from
    a server that does not audit) claimed."""
    if health.verified:
        return "VERIFIED"
    return "PROVEN" if all(b.proven is not None for b in health.blocks) else "REPLICAS"


def _health_lines(health: FileHealth) -> list[str]:
    rows = []
    for b in health.blocks:
        note = ""
        if b.verdicts is not None:
            bad = [f"{v} at {h}" for h, v in sorted(b.verdicts.items()) if v != "ok"]
            note = "; ".join(bad)
        elif b.proven is not None and len(b.holders) > len(b.healthy):
            note = f"{len(b.holders) - len(b.healthy)} claimed, not proven"
        rows.append([b.role, f"{len(b.healthy)}/{b.target}", str(len(b.holders)), b.hash, note])
    headers = ["BLOCK", _counted(health), "CLAIMED", "HASH", ""]
    return ["  " + line for line in table(headers, rows, right=[1, 2])]


async def _each_file(
    reactor: Any, args: argparse.Namespace, settings: Settings, work: Any
) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """Run `work(session, key, address)` for every address; collect per-file errors as
    (message, exit code)."""
    targets = _targets(args, settings)
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    docs: list[dict[str, Any]] = []
    errors: list[tuple[str, int]] = []
    try:
        for address, source in targets:
            try:
                try:
                    docs.append(await work(session, key, address, source))
                except NotFound as e:
                    raise offline_if_known(settings, address, e) from None
            except DSSSError as e:
                message = f"{address}: {e}" if len(targets) > 1 else str(e)
                errors.append((message, e.exit_code))
                docs.append({"address": address, "ok": False, "error": message, "code": e.code})
    finally:
        await session.peers.close()
    return docs, errors


async def cmd_check(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import survey

    target = 0
    coded = False

    async def work(session: Session, key: PrivateKey, address: str, source: str | None) -> dict[str, Any]:
        nonlocal target, coded
        health = await survey(session, address, key, verify=args.verify, source=source)
        target = health.target
        coded = coded or health.manifest.erasure is not None
        if not args.json:
            print(f"{health.manifest.name}  {address}")
            for line in _health_lines(health):
                print(line)
            lost = len(health.lost)
            kind = {"VERIFIED": " (verified)", "PROVEN": " (proven)"}.get(_counted(health), "")
            print(f"  {len(health.blocks) - len(health.short)} of {len(health.blocks)} blocks have "
                  f"{_wanted(health)}{kind}; {len(health.short)} below"
                  + (f", {lost} with none (lost)" if lost else ""), flush=True)
        return {
            "address": address, "name": health.manifest.name, "ok": health.ok,
            "verified": health.verified, "short": len(health.short), "lost": len(health.lost),
            "blocks": [b.to_dict() for b in health.blocks],
        }

    docs, errors = await _each_file(reactor, args, settings, work)
    degraded = [d for d in docs if "error" not in d and not d["ok"]]
    if args.json:
        dump_json({"ok": not degraded and not errors, "target": target, "files": docs})
    for message, _code in errors:
        error_line(message)
    if errors:
        return errors[0][1]
    if degraded:
        blocks = sum(d["short"] for d in degraded)
        error_line(f"{blocks} block(s) in {len(degraded)} file(s) have fewer than {target} "
                    f"{'verified' if args.verify else 'proven'} replicas{' (a share: fewer than 1)' if coded else ''}; run `{PROG} repair`")
        return EXIT_DEGRADED
    return 0


async def cmd_repair(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import repair, survey

    problems: list[tuple[str, list[Repaired]]] = []
    target = 0

    async def work(session: Session, key: PrivateKey, address: str, source: str | None) -> dict[str, Any]:
        nonlocal target
        health = await survey(session, address, key, verify=args.verify, source=source)
        target = health.target
        results = await repair(session, health)
        failed = [r for r in results if r.error]
        if failed:
            problems.append((health.manifest.name, failed))
        added = sum(len(r.added) for r in results)
        if not args.json:
            if not results:
                print(f"{health.manifest.name}  {address}: all {len(health.blocks)} blocks have "
                      f"{_wanted(health)}; nothing to do")
            else:
                print(f"{health.manifest.name}  {address}: {len(results)} of {len(health.blocks)} "
                      f"blocks were below {_wanted(health)}; added {added} cop"
                      + ("y" if added == 1 else "ies"))
                rows = [[r.block.role, f"{len(r.block.healthy)} -> {len(r.block.healthy) + len(r.added)}",
                         r.block.hash, r.error or ""] for r in results]
                for line in table(["BLOCK", "REPLICAS", "HASH", ""], rows):
                    print("  " + line)
            sys.stdout.flush()
        return {
            "address": address, "name": health.manifest.name, "ok": not failed,
            "blocks": len(health.blocks), "repaired": [r.to_dict() for r in results],
            "added": added,
        }

    docs, errors = await _each_file(reactor, args, settings, work)
    if args.json:
        dump_json({"ok": not problems and not errors, "target": target, "files": docs})
    for message, _code in errors:
        error_line(message)
    if errors:
        return errors[0][1]
    if problems:
        count = sum(len(f) for _, f in problems)
        lost = any(r.lost for _, f in problems for r in f)
        name, failed = problems[0]
        error_line(f"{count} block(s) are still below {target} replicas; "
                    f"{name} {failed[0].block.role}: {failed[0].error}")
        return 3 if lost else 4
    return 0


