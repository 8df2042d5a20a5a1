# -*- test-case-name: tests.integration.test_cli_commands,tests.integration.test_client -*-
"""The transfer commands: put (store files) and get (fetch them by address)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nacl.public import PrivateKey

from dsss.client import catalog
from dsss.client.commands.common import (
    PROG,
    SHORT,
    CommandLineError,
    add_command,
    check_address,
    error_line,
    manifest_doc,
    record,
    session_for,
)
from dsss.client.commands.leases import KEEP_HELP, keep_seconds
from dsss.client.config import Settings
from dsss.client.render import PutDisplay, byte_bar, count_bar, dump_json, stderr_is_terminal
from dsss.crypto.keys import load_key_file
from dsss.crypto.manifest import clean_name
from dsss.errors import DSSSError, LocalUsageError

if TYPE_CHECKING:
    from dsss.client.flows import Session
    from dsss.crypto.manifest import Manifest


def register(sub: Any) -> None:
    put = add_command(sub, "put", "store files; prints `ADDRESS FILE` for each", f"""examples:
  {PROG} put photo.jpg notes.txt       # one line per file: ADDRESS FILE
  {PROG} put --part-size 4M backup.tar > addresses.txt
  {PROG} --json put *.pdf              # one JSON object per line, one per file

Each file is also recorded in the catalog beside the key (see `ls`). On a terminal, progress
bars (overall and per file) and a summary line are drawn on stderr.
""")
    put.add_argument("files", nargs="+", metavar="FILE")
    put.add_argument("--part-size", default=None, metavar="SIZE",
                     help="plaintext bytes per part, e.g. 4096, 512K, 4M (default: config or 4M)")
    put.add_argument("--erasure", default=None, metavar="K/N",
                     help="store each part as N shares on N agents, any K of which give it back "
                          "(say 2/4: survives 2 lost agents like 3 replicas, in twice the file's size "
                          "instead of three times); off: whole replicas (default: config or off)")
    put.add_argument("--keep", default=None, metavar="DURATION", help=KEEP_HELP)
    put.set_defaults(func=cmd_put)

    get = add_command(sub, "get", "fetch files by their addresses", f"""examples:
  {PROG} get {SHORT} -o photo.jpg
  {PROG} get {SHORT} -o - | tar -tvf -
  {PROG} --json get {SHORT} -o photo.jpg
  {PROG} get ADDRESS1 ADDRESS2 ADDRESS3 -o photos/   # prints `ADDRESS PATH` for each

With several addresses (or when OUT is an existing directory), every file goes into the
directory OUT under the name it was stored with (its address if that name is `.` or `..`),
replacing a file of that name; several files are fetched at once, in one session. Each file
is written to a temporary file and renamed when complete, so a failed one leaves nothing.
Failures are listed on stderr, one line per address, and the exit code is that of the first.
""")
    get.add_argument("addresses", nargs="+", metavar="ADDRESS")
    get.add_argument("-o", "--output", required=True, metavar="OUT",
                     help="output file, or - for stdout; for several addresses, a directory "
                          "(each file gets the name it was stored with)")
    get.set_defaults(func=cmd_get)


async def cmd_put(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.flows import Progress, part_count, put_files

    for name in args.files:
        if not os.path.isfile(name):
            raise CommandLineError(f"{name}: not a readable file")
    key = load_key_file(settings.key)
    sizes = [os.path.getsize(name) for name in args.files]
    names = [clean_name(os.path.basename(name)) for name in args.files]  # as the manifest keeps them
    keep = keep_seconds(args.keep)
    session = await session_for(reactor, args, settings, key)
    session.keep = keep  # the put's leases (dsss/client/leasing.py)
    display = PutDisplay(sizes, enabled=stderr_is_terminal())
    # Several files are stored at once; their lines are printed (and recorded in the catalog)
    # in the order given, each as soon as it and every file before it has ended.
    ended: dict[int, tuple[str | None, BaseException | None]] = {}
    errors: list[tuple[int, BaseException]] = []
    printed = stored = 0

    def flush(*, all_ended: bool = False) -> None:
        nonlocal printed, stored
        for i in sorted(ended) if all_ended else range(printed, len(args.files)):
            if i not in ended:
                break
            address, error = ended.pop(i)
            printed = i + 1
            if address is None:
                assert error is not None
                errors.append((i, error))
                continue
            stored += 1
            name, size = args.files[i], sizes[i]
            parts = part_count(size, settings.part_size)
            now = int(time.time())
            entry = catalog.Entry(address=address, name=names[i], size=size,
                                  parts=parts, created=now, expires=now + keep)
            record(settings, entry)
            if args.json:
                display.write_line(json.dumps(
                    {"address": address, "file": name, "name": entry.name, "size": size, "parts": parts},
                    ensure_ascii=True,
                ))
            else:
                display.write_line(f"{address} {name}")

    def alone(i: int) -> bool:  # stored on its own (several parts), so it gets its own bar
        return len(args.files) == 1 or part_count(sizes[i], settings.part_size) > 1

    def started(i: int) -> Progress:
        return Progress(advance=display.start_file(names[i], sizes[i], own_bar=alone(i)))

    def done(i: int, address: str | None, error: BaseException | None) -> None:
        if address is not None:
            display.end_file(sizes[i], own_bar=alone(i))
        ended[i] = (address, error)
        flush()

    try:
        await put_files(session, list(args.files), sizes, owner=key.public_key,
                        part_size=settings.part_size, progress_for=started, on_done=done)
        flush(all_ended=True)
    finally:
        display.close(success=not errors and stored == len(args.files))
        await session.peers.close()
    for _i, error in errors:
        if not isinstance(error, (DSSSError, OSError)):
            raise error  # a bug: the traceback
    if not errors:
        return 0
    i, error = errors[0]
    if len(args.files) == 1 or not isinstance(error, DSSSError):
        raise error
    # Which file failed, and what became of the others (those printed above are stored).
    more = f" (and {len(errors) - 1} more failed)" if len(errors) > 1 else ""
    named = DSSSError(f"{args.files[i]}: {error}{more}; stored {stored} of {len(args.files)} files")
    named.exit_code, named.code = error.exit_code, error.code
    raise named


async def cmd_get(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.flows import get_to_stream

    addresses = list(dict.fromkeys(map(check_address, args.addresses)))
    if args.json and args.output == "-":
        raise CommandLineError("--json cannot be used with -o - (stdout carries the file)")
    if len(addresses) > 1 or (args.output != "-" and os.path.isdir(args.output)):
        return await _get_to_directory(reactor, args, settings, addresses)
    address = addresses[0]
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    try:
        if args.output == "-":
            out = sys.stdout.buffer
            await get_to_stream(session, address, out, key=key)
            out.flush()
            return 0
        manifest = await _get_to_file(session, address, Path(args.output), key)
    finally:
        await session.peers.close()
    if args.json:
        dump_json({**manifest_doc(address, manifest), "output": args.output})
    return 0


def _output_name(address: str, manifest: Manifest) -> str:
    """The name a file gets in `get ... -o DIR`: the name in its manifest (which has no `/`
    and no control characters), or its address if that name is empty, `.` or `..`."""
    return manifest.name if manifest.name not in ("", ".", "..") else address


async def _get_to_directory(
    reactor: Any, args: argparse.Namespace, settings: Settings, addresses: list[str]
) -> int:
    """`get ADDRESS... -o DIR`: every file into DIR under its own name, several at a time, in
    one session. Each file is written to a temporary file beside its final name and renamed
    only once it is complete; a file that fails leaves nothing. Lines (or JSON objects) come
    in the order of the addresses; failures are reported at the end, one line each."""
    from contextlib import contextmanager
    from typing import Iterator

    from dsss.client.flows import get_files

    if args.output == "-":
        raise CommandLineError("-o - takes one address; give a directory to get several files")
    directory = Path(args.output)
    if not directory.is_dir():
        raise CommandLineError(f"-o {args.output}: not a directory (several addresses go into one)")
    key = load_key_file(settings.key)
    claimed: dict[str, int] = {}  # output name -> the index of the address writing it
    ended: dict[int, tuple[Manifest | None, BaseException | None]] = {}
    failures: list[tuple[str, BaseException]] = []
    printed = 0
    advance, close_bar = count_bar(len(addresses), "files")

    @contextmanager
    def open_output(i: int, manifest: Manifest) -> Iterator[Any]:
        name = _output_name(addresses[i], manifest)
        if name in claimed:
            raise LocalUsageError(f"{addresses[claimed[name]]} is also named {name!r}; "
                                  f"get them into different directories")
        claimed[name] = i
        final = directory / name
        tmp = directory / f".{name}.dsss-{secrets.token_hex(4)}.part"
        try:
            with open(tmp, "xb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            del claimed[name]
            raise
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def flush() -> None:
        nonlocal printed
        while printed in ended:
            manifest, error = ended.pop(printed)
            address = addresses[printed]
            printed += 1
            if error is not None:
                failures.append((address, error))
                continue
            assert manifest is not None
            output = str(directory / _output_name(address, manifest))
            if args.json:
                print(json.dumps({**manifest_doc(address, manifest), "output": output},
                                 ensure_ascii=True), flush=True)
            else:
                print(f"{address} {output}", flush=True)

    def done(i: int, manifest: Manifest | None, error: BaseException | None) -> None:
        advance(1)
        ended[i] = (manifest, error)
        flush()

    session = await session_for(reactor, args, settings, key)
    try:
        await get_files(session, addresses, key=key, open_output=open_output, on_done=done)
    finally:
        close_bar()
        await session.peers.close()
    for _address, error in failures:
        if not isinstance(error, (DSSSError, OSError)):
            raise error  # a bug: the traceback
    for address, error in failures:
        if isinstance(error, DSSSError):
            message, code, kind = str(error), error.exit_code, error.code
        else:
            assert isinstance(error, OSError)
            where = f": {error.filename}" if getattr(error, "filename", None) else ""
            message, code, kind = f"{error.strerror or error}{where}", 1, "os"
        error_line(f"{address}: {message}")
        if args.json:
            dump_json({"address": address, "error": message, "code": kind, "exit-code": code})
    if failures:
        if len(addresses) > 1:
            error_line(f"fetched {len(addresses) - len(failures)} of {len(addresses)} files")
        first = failures[0][1]
        return first.exit_code if isinstance(first, DSSSError) else 1
    return 0


async def _get_to_file(session: Session, address: str, out: Path, key: PrivateKey) -> Manifest:
    from dsss.client.flows import Progress, get_to_stream

    tmp = out.with_name(f".{out.name}.dsss-{secrets.token_hex(4)}.part")
    bar: dict[str, Any] = {}

    def started(manifest: Manifest) -> None:
        bar["advance"], bar["close"] = byte_bar(manifest.size, manifest.name)

    progress = Progress(advance=lambda n: bar["advance"](n) if "advance" in bar else None)
    try:
        with open(tmp, "xb") as f:
            manifest = await get_to_stream(session, address, f, key=key, progress=progress,
                                           on_manifest=started)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        return manifest
    finally:
        if "close" in bar:
            bar["close"]()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


