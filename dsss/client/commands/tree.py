# -*- test-case-name: tests.integration.test_directories -*-
"""The tree and stdin forms of put, get and ls: `put -r`, `get -r`, `ls ADDRESS`, `put -`.

`put`, `get` and `ls` (commands/transfer.py, files.py) hand over to these when given -r, an
address or `-`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Callable

from dsss.client import catalog
from dsss.client.commands.common import (
    CommandLineError,
    check_address,
    error_line,
    record,
    session_for,
    warn,
)
from dsss.client.commands.leases import keep_seconds
from dsss.client.config import Settings
from dsss.client.render import count_bar, dump_json, human_size, local_date, table, utc_iso
from dsss.crypto.directory import BadName, Directory, Entry, check_name
from dsss.crypto.keys import load_key_file
from dsss.client.tree import printable as shown
from dsss.crypto.manifest import clean_name
from dsss.errors import DSSSError

if TYPE_CHECKING:
    from dsss.client.tree import LocalFile
    from dsss.crypto.manifest import Manifest

STDIN_NAME = "stdin"
"""The name `put -` stores when no --name is given."""
SPOOL_CHUNK = 1024 * 1024
SKIPPED_SHOWN = 10


def _mode_string(kind: str, mode: int) -> str:
    bits = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return ("d" if kind == "d" else "-") + bits


def _ns_to_s(ns: int) -> int:
    return ns // 1_000_000_000


# --- put -r ----------------------------------------------------------------------------------------


async def cmd_put_tree(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    """`put -r DIR...`: each directory stored as a tree; one line (or JSON object) per tree."""
    from dsss.client.tree import put_tree, scan_tree

    if args.name is not None:
        raise CommandLineError("--name goes with `-` (stdin); put -r keeps every name as it is")
    for name in args.files:
        if name == "-":
            raise CommandLineError("put -r takes directories; `-` (stdin) is a file: put it without -r")
        if not os.path.isdir(name):
            raise CommandLineError(f"{name}: not a directory (put -r stores directories; put a file without -r)")
    keep = keep_seconds(getattr(args, "keep", None))
    scanned = [scan_tree(name) for name in args.files]  # every tree checked before anything is stored
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    session.keep = keep  # every file's and directory's leases (dsss/client/leasing.py)
    try:
        for given, (top, skipped) in zip(args.files, scanned):
            for s in skipped[:SKIPPED_SHOWN]:
                warn(f"not stored ({s.why}; links and special files are skipped): {shown(str(s.path))}")
            if len(skipped) > SKIPPED_SHOWN:
                warn(f"... and {len(skipped) - SKIPPED_SHOWN} more not stored")
            count = _count_files(top)
            advance, close = count_bar(count, shown(top.name or given))

            def stored(_f: LocalFile, _size: int, step: Callable[[int], None] = advance) -> None:
                step(1)

            try:
                result = await put_tree(session, top, owner=key.public_key, part_size=settings.part_size,
                                        on_file=stored)
            finally:
                close()
            now = int(time.time())
            record(settings, catalog.Entry(address=result.address, name=clean_name(top.name or str(given)),
                                           size=result.bytes, parts=result.files,
                                           created=now, directory=True, expires=now + keep))
            if args.json:
                print(json.dumps({"address": result.address, "directory": given, "name": top.name,
                                  "files": result.files, "directories": result.directories,
                                  "size": result.bytes, "skipped": [str(s.path) for s in skipped]},
                                 ensure_ascii=True), flush=True)
            else:
                print(f"{result.address} {shown(given)}", flush=True)
    finally:
        await session.peers.close()
    return 0


def _count_files(top: Any) -> int:
    todo, n = [top], 0
    while todo:
        d = todo.pop()
        n += len(d.files)
        todo.extend(d.dirs)
    return n


# --- put - -----------------------------------------------------------------------------------------


def spool(stream: IO[bytes]) -> BinaryIO:
    """Everything `stream` gives, in an unnamed temporary file (in $TMPDIR), rewound: `put`
    must know a file's size before it stores its first part."""
    out: BinaryIO = tempfile.TemporaryFile(prefix="dsss-stdin-")
    try:
        while True:
            chunk = stream.read(SPOOL_CHUNK)
            if not chunk:
                break
            out.write(chunk)
        out.flush()
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out


async def cmd_put_stdin(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    """`put - [--name NAME]`: what arrives on stdin, stored as one file named NAME (default
    `stdin`)."""
    from dsss.client.putflow import part_count, put_stream

    if args.files != ["-"]:
        raise CommandLineError("`-` (stdin) is stored on its own: put it in a command of its own")
    try:
        # One path component; control characters become `?`, as in a file's stored name.
        name = clean_name(check_name(args.name if args.name is not None else STDIN_NAME))
    except BadName as e:
        raise CommandLineError(f"--name: {e}") from None
    key = load_key_file(settings.key)
    with spool(sys.stdin.buffer) as data:
        size = os.fstat(data.fileno()).st_size
        session = await session_for(reactor, args, settings, key)
        try:
            address = await put_stream(session, data, name=name, size=size, owner=key.public_key,
                                       part_size=settings.part_size)
        finally:
            await session.peers.close()
    parts = part_count(size, settings.part_size)
    record(settings, catalog.Entry(address=address, name=name, size=size, parts=parts, created=int(time.time())))
    if args.json:
        print(json.dumps({"address": address, "file": "-", "name": name, "size": size, "parts": parts},
                         ensure_ascii=True), flush=True)
    else:
        print(f"{address} -", flush=True)
    return 0


# --- get -r ----------------------------------------------------------------------------------------


async def cmd_get_tree(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    """`get -r ADDRESS -o DIR [--force]`: the tree at ADDRESS into DIR (made if missing). With
    no -o (where the parser allows it), into the tree's stored name in the current directory."""
    from dsss.client.tree import fetch_tree, get_tree

    addresses = list(dict.fromkeys(map(check_address, args.addresses)))
    if len(addresses) != 1:
        raise CommandLineError("get -r takes one ADDRESS (one tree) at a time")
    address = addresses[0]
    output = getattr(args, "output", None)
    if output == "-":
        raise CommandLineError("get -r writes a directory; -o - (stdout) takes a file")
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    try:
        remote = await fetch_tree(session, address, key)
        target = Path(output) if output else Path(_default_name(address, remote.root))
        files = len(remote.files())
        advance, close = count_bar(files, shown(str(target)))
        try:
            result = await get_tree(session, remote, target, key=key, force=bool(getattr(args, "force", False)),
                                    on_file=lambda p, e: advance(1))
        finally:
            close()
    finally:
        await session.peers.close()
    for _path, error in result.failures:
        if not isinstance(error, (DSSSError, OSError)):
            raise error  # a bug: the traceback
    for path, error in result.failures[:SKIPPED_SHOWN]:
        message = str(error) if isinstance(error, DSSSError) else (
            f"{getattr(error, 'strerror', None) or error}")
        error_line(f"{shown(str(path))}: {message}")
    if args.json:
        dump_json({"address": address, "output": str(target), "files": result.files,
                   "directories": result.directories, "size": result.bytes, "replaced": result.replaced,
                   "failed": [{"path": str(p), "error": str(e)} for p, e in result.failures]})
    elif not result.failures:
        print(f"{address} {shown(str(target))}", flush=True)
    if result.failures:
        error_line(f"restored {result.files} of {files} files into {shown(str(target))}")
        first = result.failures[0][1]
        return first.exit_code if isinstance(first, DSSSError) else 1
    return 0


def _default_name(address: str, root: Directory) -> str:
    return root.name if root.name else address


# --- ls ADDRESS ------------------------------------------------------------------------------------


def _entry_doc(e: Entry) -> dict[str, Any]:
    return {"type": "directory" if e.kind == "d" else "file", "name": e.name, "size": e.size,
            "mode": e.mode, "mtime-ns": e.mtime, "mtime-utc": utc_iso(_ns_to_s(e.mtime)),
            "address": e.address}


async def cmd_ls_address(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    """`ls ADDRESS`: a directory's entries (a file's address: that one file)."""
    from dsss.client.tree import fetch_entry

    address = check_address(args.address)
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    try:
        found = await fetch_entry(session, address, key)
    finally:
        await session.peers.close()
    if isinstance(found, Directory):
        if args.json:
            dump_json({"address": address, "type": "directory", "name": found.name, "mode": found.mode,
                       "mtime-ns": found.mtime, "size": found.size,
                       "entries": [_entry_doc(e) for e in found.entries]})
            return 0
        rows = [[_mode_string(e.kind, e.mode), human_size(e.size), local_date(_ns_to_s(e.mtime)),
                 shown(e.name) + ("/" if e.kind == "d" else ""), e.address] for e in found.entries]
        if not rows:
            print(f"{shown(found.name) or address}: an empty directory", file=sys.stderr)
            return 0
        for line in table(["MODE", "SIZE", "DATE", "NAME", "ADDRESS"], rows, right=[1]):
            print(line)
        return 0
    m: Manifest = found
    if args.json:
        dump_json({"address": address, "type": "file", "name": m.name, "size": m.size,
                   "created": m.created, "created-utc": utc_iso(m.created)})
        return 0
    for line in table(["SIZE", "DATE", "NAME", "ADDRESS"],
                      [[human_size(m.size), local_date(m.created), shown(m.name), address]], right=[0]):
        print(line)
    return 0
