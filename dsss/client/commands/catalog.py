# -*- test-case-name: tests.integration.test_directories -*-
"""The catalog commands: `catalog backup` and `catalog restore ADDRESS`.

`backup` stores the local catalog on the network, sealed to this key only; `restore` adds a
backup's entries to the local catalog."""

from __future__ import annotations

import argparse
import io
import sys
import time
from typing import Any

from dsss.client import catalog
from dsss.client.commands.common import PROG, SHORT, CommandLineError, add_command, check_address, record, session_for
from dsss.client.config import Settings
from dsss.client.render import dump_json
from dsss.crypto.keys import load_key_file
from dsss.errors import DSSSError

MAX_BACKUP = 256 * 1024 * 1024
"""The largest catalog backup `restore` reads (a catalog line is about 200 bytes)."""


class NotABackup(DSSSError):
    code = "not-a-backup"


def register(sub: Any) -> None:
    p = add_command(sub, "catalog", "back up the local catalog to the network, or restore it", f"""examples:
  {PROG} catalog backup                 # prints ADDRESS: keep it with your key
  {PROG} catalog restore {SHORT}     # adds the entries this catalog lacks

The catalog (`<key file>.catalog`, what `ls` lists) names what this key stored. `backup` stores
it on the network as a file sealed to your key alone and prints its address; on a new machine,
with the same key, `restore ADDRESS` adds every entry the local catalog does not have (entries
already there are kept as they are). Each backup is recorded in the catalog, so the next backup
names the previous one.
""")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    backup = actions.add_parser("backup", help="store the catalog on the network; prints its address")
    backup.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    backup.set_defaults(func=cmd_backup)
    restore = actions.add_parser("restore", help="add a backup's entries to the local catalog")
    restore.add_argument("address", metavar="ADDRESS")
    restore.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    restore.set_defaults(func=cmd_restore)


async def cmd_backup(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.putflow import part_count, put_stream

    path = catalog.catalog_path(settings.key)
    entries, skipped = catalog.read(path)
    entries = catalog.latest(entries)
    if not entries:
        raise CommandLineError(f"nothing to back up: no entry in the catalog {path}")
    data = catalog.backup_bytes(entries, int(time.time()))
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    try:
        address = await put_stream(session, io.BytesIO(data), name=catalog.BACKUP_NAME, size=len(data),
                                   owner=key.public_key, part_size=settings.part_size)
    finally:
        await session.peers.close()
    record(settings, catalog.Entry(address=address, name=catalog.BACKUP_NAME, size=len(data),
                                   parts=part_count(len(data), settings.part_size), created=int(time.time())))
    if args.json:
        dump_json({"address": address, "entries": len(entries), "size": len(data), "catalog": str(path),
                   "skipped-lines": skipped})
    else:
        print(address, flush=True)
        print(f"backed up {len(entries)} catalog entries; keep this address with your key: "
              f"`{PROG} catalog restore ADDRESS` brings them back", file=sys.stderr)
    return 0


async def cmd_restore(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.getflow import get_to_stream

    address = check_address(args.address)
    key = load_key_file(settings.key)
    out = io.BytesIO()

    def small_enough(manifest: Any) -> None:
        if manifest.size > MAX_BACKUP:
            raise NotABackup(f"{address} is a file of {manifest.size} bytes, not a catalog backup")

    session = await session_for(reactor, args, settings, key)
    try:
        await get_to_stream(session, address, out, key=key, on_manifest=small_enough)
    finally:
        await session.peers.close()
    try:
        wanted = catalog.parse_backup(out.getvalue())
    except catalog.NotABackup as e:
        raise NotABackup(f"{address}: {e}") from None
    path = catalog.catalog_path(settings.key)
    have, _skipped = catalog.read(path)
    new = catalog.missing(have, wanted)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    catalog.append_many(path, new)
    present = len(catalog.latest(wanted)) - len(new)
    if args.json:
        dump_json({"address": address, "restored": len(new), "present": present, "catalog": str(path)})
    else:
        print(f"restored {len(new)} entries into {path} ({present} already there)")
    return 0
