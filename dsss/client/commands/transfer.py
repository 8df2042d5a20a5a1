# -*- test-case-name: tests.integration.test_cli_commands,tests.integration.test_client -*-
"""The transfer commands: put (store files) and get (fetch them by address)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nacl.public import PrivateKey
from twisted.internet import defer

from dsss.client import catalog
from dsss.client.commands import tree
from dsss.client.commands.common import (
    INTERRUPT,
    PROG,
    SHORT,
    CommandLineError,
    Interrupted,
    add_command,
    check_address,
    check_interrupted,
    error_line,
    manifest_doc,
    offline_if_known,
    printable,
    record,
    session_for,
)
from dsss.client.commands.leases import KEEP_HELP, keep_seconds
from dsss.client.config import Settings
from dsss.client.render import PutDisplay, byte_bar, count_bar, dump_json, human_size, stderr_is_terminal
from dsss.crypto.keys import load_key_file
from dsss.crypto.manifest import clean_name
from dsss.errors import DSSSError, LocalUsageError, NotFound, Unavailable

if TYPE_CHECKING:
    from dsss.client.session import Session
    from dsss.crypto.manifest import Manifest

NAME_MAX = 255
"""The longest file name (in bytes) on the file systems we write to."""


def register(sub: Any) -> None:
    put = add_command(sub, "put", "store files; prints `ADDRESS FILE` for each", f"""examples:
  {PROG} put photo.jpg notes.txt       # one line per file: ADDRESS FILE
  {PROG} put --part-size 4M backup.tar > addresses.txt
  {PROG} --json put *.pdf              # one JSON object per line, one per file

Each file is also recorded in the catalog beside the key (see `ls`). On a terminal, progress
bars (overall and per file) and a summary line are drawn on stderr. In the one-line output a
backslash and control characters in a file's name are written as escapes (\\\\, \\n, \\t).

Interrupted (Ctrl-C, SIGTERM), put exits with 130 (143) and says which files were not stored.
Putting the same unchanged file again sends only the parts not yet stored; it says how many it
skipped. The record of such an unfinished put is kept in <key file>.journal/.

  {PROG} put -r photos/                # ADDRESS photos/: the whole tree, one address
  tar -c src | {PROG} put - --name src.tar
""")
    put.add_argument("files", nargs="+", metavar="FILE",
                     help="files to store; with -r, directories; `-` reads stdin")
    put.add_argument("-r", "--recursive", action="store_true",
                     help="store each DIR as a tree (every file, then a directory manifest for each "
                          "directory): prints one address per tree; links and special files are skipped")
    put.add_argument("--name", default=None, metavar="NAME",
                     help="with `-`: the name to store stdin under (default: stdin)")
    put.add_argument("--part-size", default=None, metavar="SIZE",
                     help="plaintext bytes per part, e.g. 4096, 512K, 4M (default: config or 4M)")
    put.add_argument("--erasure", default=None, metavar="K/N",
                     help="store each part as N shares on N agents, any K of which give it back "
                          "(say 2/4: survives 2 lost agents like 3 replicas, in twice the file's size "
                          "instead of three times); off: whole replicas (default: config or off)")
    put.add_argument("--keep", default=None, metavar="DURATION", help=KEEP_HELP)
    put.set_defaults(func=cmd_put)

    get = add_command(sub, "get", "fetch files by their addresses", f"""examples:
  {PROG} get {SHORT}                     # into ./NAME, the name it was stored with
  {PROG} get {SHORT} -o photo.jpg
  {PROG} get {SHORT} -o - | tar -tvf -
  {PROG} --json get {SHORT} -o photo.jpg
  {PROG} get ADDRESS1 ADDRESS2 ADDRESS3 -o photos/   # prints `ADDRESS PATH` for each

Without -o, the file goes into the current directory under the name it was stored with (its
address if that name is `.` or `..`), and `ADDRESS PATH` is printed. With several addresses (or
when OUT is an existing directory), every file goes into the directory OUT (default: the
current directory) the same way; several files are fetched at once, in one session. An
existing file is never replaced without --force.

A file is written to OUT.dsss-partial (dsss-partial-ADDRESS16 when that name is too long) and
renamed to OUT when complete. Interrupted (Ctrl-C: exit code 130) or cut off from the network,
the partial file is kept, and the same get continues it: its parts are verified, and only the
rest is fetched. Any other failure removes it. Failures are listed on stderr, one line per
address, and the exit code is that of the first.
""")
    get.add_argument("addresses", nargs="+", metavar="ADDRESS")
    get.add_argument("-r", "--recursive", action="store_true",
                     help="ADDRESS is a directory (stored with put -r): restore the tree into OUT "
                          "(made if missing), with names, modes and times")
    get.add_argument("-o", "--output", default=None, metavar="OUT",
                     help="output file, or - for stdout, or a directory (each file gets the name "
                          "it was stored with); default: the stored name, in the current directory")
    get.add_argument("--force", action="store_true",
                     help="replace a file that exists already (with -r: files of the tree; default: "
                          "refuse, writing nothing)")
    get.set_defaults(func=cmd_get)


async def cmd_put(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.journal import PutJournal, journal_dir
    from dsss.client.putflow import part_count, put_files
    from dsss.client.streams import Progress

    if args.recursive:
        return await tree.cmd_put_tree(reactor, args, settings)
    if "-" in args.files:
        return await tree.cmd_put_stdin(reactor, args, settings)
    if args.name is not None:
        raise CommandLineError("--name goes with `-` (stdin); a file is stored under its own name")
    for name in args.files:
        check_source(name)
    key = load_key_file(settings.key)
    sizes = [os.path.getsize(name) for name in args.files]
    names = [clean_name(os.path.basename(name)) for name in args.files]  # as the manifest keeps them
    keep = keep_seconds(args.keep)
    session = await session_for(reactor, args, settings, key)
    try:
        await session.check_enough_agents(reactor)
    except DSSSError:
        await session.peers.close()
        raise
    session.keep = keep  # the put's leases (dsss/client/leasing.py)
    display = PutDisplay(sizes, enabled=stderr_is_terminal())
    # Several files are stored at once; their lines are printed (and recorded in the catalog)
    # in the order given, each as soon as it and every file before it has ended.
    ended: dict[int, tuple[str | None, BaseException | None]] = {}
    errors: list[tuple[int, BaseException]] = []
    journals: dict[int, PutJournal] = {}
    done_files: set[int] = set()
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
            done_files.add(i)
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
                display.write_line(f"{address} {printable(name)}")

    def alone(i: int) -> bool:  # stored on its own (several parts), so it gets its own bar
        return len(args.files) == 1 or part_count(sizes[i], settings.part_size) > 1

    def started(i: int) -> Progress:
        return Progress(advance=display.start_file(names[i], sizes[i], own_bar=alone(i)))

    def done(i: int, address: str | None, error: BaseException | None) -> None:
        if address is not None:
            display.end_file(sizes[i], own_bar=alone(i))
        ended[i] = (address, error)
        flush()

    def journaled(i: int, journal: PutJournal) -> None:
        journals[i] = journal

    try:
        try:
            await put_files(session, list(args.files), sizes, owner=key.public_key,
                            part_size=settings.part_size, progress_for=started, on_done=done,
                            journals=journal_dir(settings.key), on_journal=journaled)
            check_interrupted()
            flush(all_ended=True)
        finally:
            display.close(success=not errors and stored == len(args.files))
            await session.peers.close()
        check_interrupted()
    except defer.CancelledError:
        raise Interrupted(_put_interrupted(args.files, done_files, journals, settings.part_size, sizes)) from None
    for i, journal in sorted(journals.items()):
        if i in done_files and journal.skipped_parts:
            total = part_count(sizes[i], settings.part_size)
            print(f"dsss: {printable(args.files[i])}: {journal.skipped_parts} of {total} parts "
                  f"({human_size(journal.skipped_bytes)}) were already stored by an unfinished put; "
                  f"sent the other {total - journal.skipped_parts}", file=sys.stderr, flush=True)
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


def check_source(name: str) -> None:
    """A file `put` can store: a readable regular file (else a usage error, exit 2, saying why)."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise CommandLineError(f"{name}: no such file") from None
    except OSError as e:
        raise CommandLineError(f"{name}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CommandLineError(f"{name}: is a directory (use put -r to store it as a tree)")
    if not stat.S_ISREG(st.st_mode):
        raise CommandLineError(f"{name}: not a regular file (a pipe, a device or a socket)")
    if not os.access(name, os.R_OK):
        raise CommandLineError(f"{name}: permission denied")


def _put_interrupted(
    files: list[str], stored: set[int], journals: dict[int, Any], part_size: int, sizes: list[int]
) -> str:
    """What an interrupted put did and did not store, in one line."""
    from dsss.client.putflow import part_count

    missing = [i for i in range(len(files)) if i not in stored]
    if not missing:
        return f"all {len(files)} files were stored (listed above)"
    resume = ""
    partial = [i for i in missing if i in journals and journals[i].stored]
    if partial:
        i = partial[0]
        whose = "" if len(files) == 1 else f" of {printable(files[i])}"
        resume = (f"; {len(journals[i].stored)} of {part_count(sizes[i], part_size)} parts{whose} are "
                  f"stored: put it again to send only the rest")
    if len(files) == 1:
        return f"{printable(files[0])} was not stored{resume}"
    names = ", ".join(printable(files[i]) for i in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return f"stored {len(stored)} of {len(files)} files (listed above); not stored: {names}{more}{resume}"


def _output_check(out: Path, force: bool) -> None:
    """Refuse an output file that exists (without --force) or whose directory does not."""
    parent = out.parent
    if not parent.is_dir():
        raise CommandLineError(f"-o {out}: no directory {parent} to write it in")
    if (out.exists() or out.is_symlink()) and not force:
        raise CommandLineError(f"{out} exists; give --force to replace it")
    if out.is_dir():
        raise CommandLineError(f"{out} is a directory")


def partial_path(out: Path, address: str) -> Path:
    """Where `get -o OUT` keeps what it has fetched until OUT is complete: OUT.dsss-partial
    beside it, or dsss-partial-ADDRESS16 when that name would be longer than a name may be."""
    name = f"{out.name}.dsss-partial"
    if len(os.fsencode(name)) > NAME_MAX:
        name = f"dsss-partial-{address[:16]}"
    return out.with_name(name)


async def cmd_get(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.getflow import get_to_stream

    if args.recursive:
        return await tree.cmd_get_tree(reactor, args, settings)

    addresses = list(dict.fromkeys(map(check_address, args.addresses)))
    if args.json and args.output == "-":
        raise CommandLineError("--json cannot be used with -o - (stdout carries the file)")
    if len(addresses) > 1 or (args.output not in (None, "-") and os.path.isdir(args.output)):
        return await _get_to_directory(reactor, args, settings, addresses)
    address = addresses[0]
    out: Path | None = None
    if args.output not in (None, "-"):
        out = Path(args.output)
        _output_check(out, args.force)
    key = load_key_file(settings.key)
    session = await session_for(reactor, args, settings, key)
    try:
        if args.output == "-":
            stream = sys.stdout.buffer
            try:
                await get_to_stream(session, address, stream, key=key)
                check_interrupted()
            except defer.CancelledError:
                raise Interrupted("the file written to stdout is incomplete") from None
            stream.flush()
            return 0
        try:
            manifest, written = await _get_to_file(session, address, out, key, force=args.force)
        except NotFound as e:
            raise offline_if_known(settings, address, e) from None
    finally:
        await session.peers.close()
    if args.json:
        dump_json({**manifest_doc(address, manifest), "output": str(written)})
    elif args.output is None:
        print(f"{address} {printable(str(written))}")
    return 0


def _output_name(address: str, manifest: Manifest) -> str:
    """The name a file gets in `get ... -o DIR`: the name in its manifest (which has no `/`
    and no control characters), or its address if that name is empty, `.` or `..`."""
    return manifest.name if manifest.name not in ("", ".", "..") else address


async def _get_to_directory(
    reactor: Any, args: argparse.Namespace, settings: Settings, addresses: list[str]
) -> int:
    """`get ADDRESS... [-o DIR]`: every file into DIR (default: the current directory) under its
    own name, several at a time, in one session. Each file is written to a temporary file beside
    its final name and renamed only once it is complete; a file that fails leaves nothing, and
    an existing file is replaced only with --force. Lines (or JSON objects) come in the order of
    the addresses; failures are reported at the end, one line each."""
    from contextlib import contextmanager
    from typing import Iterator

    from dsss.client.getflow import get_files

    if args.output == "-":
        raise CommandLineError("-o - takes one address; give a directory to get several files")
    directory = Path(args.output if args.output is not None else ".")
    if not directory.is_dir():
        raise CommandLineError(f"-o {args.output}: not a directory (several addresses go into one)")
    key = load_key_file(settings.key)
    claimed: dict[str, int] = {}  # output name -> the index of the address writing it
    ended: dict[int, tuple[Manifest | None, BaseException | None]] = {}
    failures: list[tuple[str, BaseException]] = []
    fetched: list[str] = []
    printed = 0
    advance, close_bar = count_bar(len(addresses), "files")

    @contextmanager
    def open_output(i: int, manifest: Manifest) -> Iterator[Any]:
        name = _output_name(addresses[i], manifest)
        if name in claimed:
            raise LocalUsageError(f"{addresses[claimed[name]]} is also named {name!r}; "
                                  f"get them into different directories")
        final = directory / name
        if (final.exists() or final.is_symlink()) and not args.force:
            raise CommandLineError(f"{final} exists; give --force to replace it")
        claimed[name] = i
        # A short name: the final one may already be as long as a name can be.
        tmp = directory / f"dsss-{secrets.token_hex(4)}.part"
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
            fetched.append(output)
            if args.json:
                print(json.dumps({**manifest_doc(address, manifest), "output": output},
                                 ensure_ascii=True), flush=True)
            else:
                print(f"{address} {printable(output)}", flush=True)

    def done(i: int, manifest: Manifest | None, error: BaseException | None) -> None:
        advance(1)
        ended[i] = (manifest, error)
        flush()

    session = await session_for(reactor, args, settings, key)
    try:
        try:
            await get_files(session, addresses, key=key, open_output=open_output, on_done=done)
        finally:
            close_bar()
            await session.peers.close()
        check_interrupted()
    except defer.CancelledError:
        raise Interrupted(f"fetched {len(fetched)} of {len(addresses)} files (listed above); "
                          f"the others were not written") from None
    for _address, error in failures:
        if not isinstance(error, (DSSSError, OSError)):
            raise error  # a bug: the traceback
    for address, error in failures:
        if isinstance(error, NotFound):
            error = offline_if_known(settings, address, error)
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
        if isinstance(first, NotFound):
            first = offline_if_known(settings, failures[0][0], first)
        return first.exit_code if isinstance(first, DSSSError) else 1
    return 0


async def _get_to_file(
    session: Session, address: str, out: Path | None, key: PrivateKey, *, force: bool
) -> tuple[Manifest, Path]:
    """Fetch one file into `out` (None: its stored name in the current directory), through
    its partial file (see `partial_path`), renamed to `out` once complete. A partial left by an
    interrupted get of the same file is continued: its whole parts are verified first, and
    only the parts after them are fetched. Interrupted, or cut off from the network, the
    partial is kept (and named in the error); after any other failure it is removed."""
    from dsss.client.getflow import fetch_manifest, verified_parts, write_file
    from dsss.client.streams import Progress

    manifest, file_key = await fetch_manifest(session, address, key)
    if out is None:
        out = Path(_output_name(address, manifest))
        _output_check(out, force)
    partial = partial_path(out, address)
    start = kept = 0
    if partial.is_file() and manifest.inline is None:
        with open(partial, "rb") as f:
            start = await verified_parts(session, manifest, file_key, f)
        kept = sum(ref.plain for ref in manifest.parts[:start])
        os.truncate(partial, kept)
        if start:
            print(f"dsss: continuing {printable(str(out))}: the first {start} of {len(manifest.parts)} "
                  f"parts ({human_size(kept)}) were already in {printable(str(partial))}, verified",
                  file=sys.stderr, flush=True)
    advance, close = byte_bar(manifest.size, manifest.name)
    advance(kept)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | (0 if start else os.O_TRUNC), 0o644)
        with os.fdopen(fd, "wb") as f:
            f.seek(kept)
            await write_file(session, manifest, file_key, f, Progress(advance=advance), start=start)
            f.flush()
            os.fsync(f.fileno())
        check_interrupted()
        os.replace(partial, out)
        return manifest, out
    except BaseException as e:
        held = partial.stat().st_size if partial.is_file() else 0
        interrupted = isinstance(e, defer.CancelledError) or INTERRUPT.signum is not None
        if held and manifest.inline is None and (interrupted or isinstance(e, Unavailable)):
            note = (f"the first {human_size(held)} are kept in {printable(str(partial))}: "
                    f"the same get continues from there")
            if interrupted:
                raise Interrupted(f"{printable(str(out))} was not written; {note}") from None
            assert isinstance(e, Unavailable)
            kept_error = type(e)(f"{e}; {note}")
            raise kept_error from None
        try:
            partial.unlink()
        except FileNotFoundError:
            pass
        if interrupted:
            raise Interrupted(f"{printable(str(out))} was not written") from None
        raise
    finally:
        close()
