# -*- test-case-name: tests.integration.test_cli_commands -*-
"""The commands about stored files: ls (the local catalog), info (a manifest), share."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from nacl.public import PublicKey

from dsss.client import catalog
from dsss.client.commands import tree
from dsss.client.commands.common import (
    PROG,
    SHORT,
    CommandLineError,
    add_command,
    catalog_entry,
    check_address,
    manifest_doc,
    offline_if_known,
    record,
    session_for,
    warn,
)
from dsss.client.config import Settings
from dsss.client.leasing import leases_at
from dsss.client.render import dump_json, human_size, local_date, table, utc_iso
from dsss.crypto.keys import load_key_file, parse_public_key, public_key_hex
from dsss.errors import LocalUsageError, NotFound


def register(sub: Any) -> None:
    ls = add_command(sub, "ls", "list the files this key has stored or shared (from the local catalog), "
                     "or a stored directory's entries", f"""examples:
  {PROG} ls
  {PROG} ls --json | jq -r '.files[].address'
  {PROG} ls ADDRESS                    # a directory stored with put -r: its entries

The catalog is `<key file>.catalog`, written by put and share on this machine. It is not rebuilt
from the network: back it up with `{PROG} catalog backup` (and keep the key).
""")
    ls.add_argument("address", nargs="?", default=None, metavar="ADDRESS",
                    help="list this directory's entries (from the network) instead of the catalog")
    ls.set_defaults(func=cmd_ls)
    info = add_command(sub, "info", "show a file's manifest and how many replicas each part has now", f"""examples:
  {PROG} info {SHORT}
  {PROG} --json info {SHORT}

Nothing but the manifest is downloaded.
""")
    info.add_argument("address", metavar="ADDRESS")
    info.set_defaults(func=cmd_info)
    sh = add_command(sub, "share", "let another key read a file, without uploading its parts again", f"""examples:
  {PROG} share {SHORT} --to 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
  {PROG} share {SHORT} --to bob.pub      # a file holding the public key

Prints `NEW-ADDRESS NAME`. Give the recipient NEW-ADDRESS; they fetch it with their own key:
  {PROG} get NEW-ADDRESS -o photo.jpg
""")
    sh.add_argument("address", metavar="ADDRESS")
    sh.add_argument("--to", required=True, metavar="PUBLIC_KEY",
                    help="the recipient's public key (64 hex characters, as `pubkey` prints) or a file holding it")
    sh.set_defaults(func=cmd_share)


async def cmd_ls(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    if args.address is not None:
        return await tree.cmd_ls_address(reactor, args, settings)
    path = catalog.catalog_path(settings.key)
    entries, skipped = catalog.read(path)
    entries = [e for e in catalog.latest(entries) if e.kind != catalog.KIND_REMOVED]
    if skipped:
        warn(f"skipped {skipped} damaged line(s) in {path}")
    if args.json:
        dump_json({
            "catalog": str(path),
            "files": [{**e.to_dict(), "created-utc": utc_iso(e.created)} for e in entries],
            "skipped-lines": skipped,
        })
        return 0
    if not entries:
        print(f"no files recorded in {path} yet", file=sys.stderr)
        return 0
    rows = []
    for e in entries:
        name = e.name + ("/" if e.directory else "")
        name = name if not e.shared else f"{name} ({e.kind.replace('-', ' ')})"
        expires = local_date(e.expires) if e.expires is not None else "-"
        rows.append([name, human_size(e.size), local_date(e.created), expires, e.address])
    for line in table(["NAME", "SIZE", "DATE", "EXPIRES", "ADDRESS"], rows, right=[1]):
        print(line)
    return 0


async def cmd_info(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import survey

    address = check_address(args.address)
    key = load_key_file(settings.key)
    entry = catalog_entry(settings, address)
    source = entry.source if entry is not None and entry.shared else None
    session = await session_for(reactor, args, settings, key)
    try:
        health = await survey(session, address, key, source=source)
        held = await leases_at(session, address)
    except NotFound as e:
        raise offline_if_known(settings, address, e) from None
    finally:
        await session.peers.close()
    m = health.manifest
    counts = health.part_counts()
    manifest_count = len(health.blocks[0].healthy)
    mine = session.leases.owner if session.leases is not None else ""
    if args.json:
        dump_json({
            **manifest_doc(address, m),
            "leases": {str(a): (v if isinstance(v, str) else
                                [{"owner": o, "expires": e, "yours": o == mine} for o, e in v])
                       for a, v in sorted(held.items(), key=lambda kv: str(kv[0]))},
            "replicas": {
                "target": health.target,
                "manifest": manifest_count,
                "min": min(counts) if counts else None,
                "max": max(counts) if counts else None,
                "parts": counts,
                **({"per": "share", "part-target": m.erasure.n, "needed": m.erasure.k}
                   if m.erasure is not None else {}),
            },
            "part-hashes": [p.hash for p in m.parts] if m.erasure is None else [list(p.shares) for p in m.parts],
        })
        return 0
    if counts:
        lo, hi = min(counts), max(counts)
        label = "parts" if m.erasure is None else "shares per part"
        parts = f"{label} {lo}" if lo == hi else f"{label} {lo} to {hi}"
        short = sum(1 for c in counts if c < health.part_target())
        if short:
            parts += f" ({short} below target)"
        if m.erasure is not None:
            parts += f" of {m.erasure.n}, any {m.erasure.k} of which give a part back"
    else:
        parts = "no parts"
    inline = " (the file is inside its manifest)" if m.inline is not None else ""
    rows = [
        ["address", address],
        ["name", m.name],
        ["size", f"{human_size(m.size)} ({m.size} bytes)"],
        ["part size", f"{human_size(m.part_size)} ({m.part_size} bytes)"],
        ["parts", f"{len(m.parts)}{inline}"],
        ["created", f"{local_date(m.created)} (local time)"],
        ["replicas", f"manifest {manifest_count} (target {health.target}), {parts}" if m.erasure is not None
         else f"manifest {manifest_count}, {parts}; target {health.target}"],
    ]
    for agent, leases in sorted(held.items(), key=lambda kv: str(kv[0])):
        if isinstance(leases, str):
            text = f"? ({leases})"
        else:
            yours = [e for o, e in leases if o == mine]
            text = f"yours until {local_date(yours[0])}" if yours else "none of yours"
            if len(leases) > len(yours):
                text += f", {len(leases) - len(yours)} other key(s)"
        rows.append(["lease", f"{agent}: {text}"])
    for name, value in rows:
        print(f"{name + ':':<11}{value}")
    return 0


async def cmd_share(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import share

    address = check_address(args.address)
    recipient = parse_recipient(args.to)
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    try:
        new_address, manifest = await share(session, address, key, recipient)
    finally:
        await session.peers.close()
    to_hex = public_key_hex(recipient)
    record(settings, catalog.Entry(
        address=new_address, name=manifest.name, size=manifest.size, parts=len(manifest.parts),
        created=int(time.time()), kind=catalog.shared_kind(to_hex), source=address,
    ))
    if args.json:
        dump_json({"address": new_address, "source": address, "to": to_hex,
                   "name": manifest.name, "size": manifest.size})
    else:
        print(f"{new_address} {manifest.name}")
    return 0



def parse_recipient(text: str) -> PublicKey:
    """`--to`: 64 hex characters, or a file whose first word (comments aside) is one."""
    candidate = text.strip()
    if len(candidate) == 64:
        try:
            return parse_public_key(candidate)
        except LocalUsageError:
            pass
    path = Path(text).expanduser()
    if not path.is_file():
        raise CommandLineError(
            f"--to: {text!r} is neither a public key (64 hex characters) nor a file holding one"
        )
    try:
        content = path.read_bytes()[:65536].decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandLineError(f"--to: cannot read {path}: {e}") from None
    if "dsss-key-v1" in content:
        raise CommandLineError(
            f"--to: {path} is a private key file; give the recipient's public key "
            f"(`{PROG} pubkey` prints it)"
        )
    for line in content.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            return parse_public_key(line.split()[0])
        except LocalUsageError:
            break
    raise CommandLineError(f"--to: {path} does not hold a public key (64 hex characters)")


