# -*- test-case-name: tests.integration.test_cli_commands,tests.integration.test_client -*-
"""`python -m dsss.client [OPTIONS] COMMAND ...`: keygen, pubkey, put, get, ls, info, share,
check, repair, config.

What a command produces goes to stdout (addresses, tables, reports; one JSON document with
`--json`, except `put` and a `get` into a directory, which write one JSON object per line, one
per file). Everything else
(progress bars on a terminal, warnings, errors) goes to stderr. Every known failure is one line
`dsss: error: ...` on stderr and a non-zero exit code; with `--json` the same error is also a JSON
object on stdout. A traceback is printed only for a bug.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import secrets
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlsplit

from nacl.public import PrivateKey, PublicKey
from twisted.internet import defer

from dsss.client import catalog
from dsss.client.config import MAX_PARALLEL, Settings, settings_from
from dsss.client.render import (
    PutDisplay,
    byte_bar,
    count_bar,
    dump_json,
    human_size,
    local_date,
    stderr_is_terminal,
    table,
    utc_iso,
)
from dsss.crypto.keys import generate_key_file, load_key_file, parse_public_key, public_key_hex
from dsss.crypto.manifest import clean_name
from dsss.errors import DSSSError, LocalUsageError
from dsss.model import is_block_id, is_share_id

if TYPE_CHECKING:
    from dsss.client.flows import Session
    from dsss.client.maintenance import FileHealth, Repaired
    from dsss.crypto.manifest import Manifest

# The network side (treq, qh3, ...) is imported only by the commands that use it, so that
# keygen, pubkey, ls, config and --help start quickly.

PROG = "python -m dsss.client"
# `check` (and `repair`) exit with this when a block has fewer healthy replicas than the target.
EXIT_DEGRADED = 7
SHORT = "3c13...131a"


class CommandLineError(LocalUsageError):
    """A bad command line (exit code 2)."""

    exit_code = 2


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

_COMMANDS: dict[str, tuple[str, str]] = {
    "keygen": ("create a new key pair in the key file", f"""examples:
  {PROG} keygen                         # ~/.config/dsss/key, prints the public key
  {PROG} --key ~/work.key keygen
  DSSS_KEY=~/work.key {PROG} keygen

An existing key file is never overwritten (exit code 2).
"""),
    "pubkey": ("print your public key (give it to people who share files with you)", f"""examples:
  {PROG} pubkey > me.pub
  {PROG} --key ~/work.key pubkey
"""),
    "put": ("store files; prints `ADDRESS FILE` for each", f"""examples:
  {PROG} put photo.jpg notes.txt       # one line per file: ADDRESS FILE
  {PROG} put --part-size 4M backup.tar > addresses.txt
  {PROG} --json put *.pdf              # one JSON object per line, one per file

Each file is also recorded in the catalog beside the key (see `ls`). On a terminal, progress
bars (overall and per file) and a summary line are drawn on stderr.
"""),
    "get": ("fetch files by their addresses", f"""examples:
  {PROG} get {SHORT} -o photo.jpg
  {PROG} get {SHORT} -o - | tar -tvf -
  {PROG} --json get {SHORT} -o photo.jpg
  {PROG} get ADDRESS1 ADDRESS2 ADDRESS3 -o photos/   # prints `ADDRESS PATH` for each

With several addresses (or when OUT is an existing directory), every file goes into the
directory OUT under the name it was stored with (its address if that name is `.` or `..`),
replacing a file of that name; several files are fetched at once, in one session. Each file
is written to a temporary file and renamed when complete, so a failed one leaves nothing.
Failures are listed on stderr, one line per address, and the exit code is that of the first.
"""),
    "ls": ("list the files this key has stored or shared (from the local catalog)", f"""examples:
  {PROG} ls
  {PROG} ls --json | jq -r '.files[].address'

The catalog is `<key file>.catalog`, written by put and share on this machine. It is not rebuilt
from the network: keep it (and the key) backed up.
"""),
    "info": ("show a file's manifest and how many replicas each part has now", f"""examples:
  {PROG} info {SHORT}
  {PROG} --json info {SHORT}

Nothing but the manifest is downloaded.
"""),
    "share": ("let another key read a file, without uploading its parts again", f"""examples:
  {PROG} share {SHORT} --to 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
  {PROG} share {SHORT} --to bob.pub      # a file holding the public key

Prints `NEW-ADDRESS NAME`. Give the recipient NEW-ADDRESS; they fetch it with their own key:
  {PROG} get NEW-ADDRESS -o photo.jpg
"""),
    "check": ("count the healthy replicas of a file's manifest and parts", f"""examples:
  {PROG} check {SHORT}
  {PROG} check --verify {SHORT}          # also download and hash every copy
  {PROG} check --all                    # every file in your catalog

Exit code 0 when every block has the server's replica count, {EXIT_DEGRADED} when some have fewer.
"""),
    "repair": ("copy blocks that lost replicas to other agents until the count is reached", f"""examples:
  {PROG} repair {SHORT}
  {PROG} repair --verify --all

Blocks are copied from a healthy holder to agents that do not hold them yet.
"""),
    "gateway": ("serve put and get over HTTP on this machine, as a long-running client", f"""examples:
  {PROG} gateway                                   # http://127.0.0.1:8472/
  {PROG} gateway --listen tcp:9000:interface=127.0.0.1
  curl -H "Authorization: Bearer $(cat ~/.config/dsss/gateway.token)" \\
       -T photo.jpg "http://127.0.0.1:8472/files?name=photo.jpg"
  curl -H "Authorization: Bearer $(cat ~/.config/dsss/gateway.token)" \\
       -o photo.jpg http://127.0.0.1:8472/files/ADDRESS

PUT /files stores the request body (201, JSON with the address; recorded in `ls`), GET
/files/ADDRESS streams a file back. Every request needs the token kept in gateway.token
beside the key (made on first start, mode 0600). Runs until interrupted (SIGINT, SIGTERM).
"""),
    "config": ("show the settings in force and where each one comes from", f"""examples:
  {PROG} config
  DSSS_CONFIG=./test.toml {PROG} --json config
"""),
}


def _subparser(sub: Any, name: str) -> argparse.ArgumentParser:
    help_text, epilog = _COMMANDS[name]
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also accepted after the command; the global flag's default stays in force otherwise.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one JSON document on stdout (put, get -o DIR: one object per line)")
    return p


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

    _subparser(sub, "keygen")
    _subparser(sub, "pubkey")

    put = _subparser(sub, "put")
    put.add_argument("files", nargs="+", metavar="FILE")
    put.add_argument("--part-size", default=None, metavar="SIZE",
                     help="plaintext bytes per part, e.g. 4096, 512K, 4M (default: config or 4M)")
    put.add_argument("--erasure", default=None, metavar="K/N",
                     help="store each part as N shares on N agents, any K of which give it back "
                          "(say 2/4: survives 2 lost agents like 3 replicas, in twice the file's size "
                          "instead of three times); off: whole replicas (default: config or off)")

    get = _subparser(sub, "get")
    get.add_argument("addresses", nargs="+", metavar="ADDRESS")
    get.add_argument("-o", "--output", required=True, metavar="OUT",
                     help="output file, or - for stdout; for several addresses, a directory "
                          "(each file gets the name it was stored with)")

    _subparser(sub, "ls")

    info = _subparser(sub, "info")
    info.add_argument("address", metavar="ADDRESS")

    sh = _subparser(sub, "share")
    sh.add_argument("address", metavar="ADDRESS")
    sh.add_argument("--to", required=True, metavar="PUBLIC_KEY",
                    help="the recipient's public key (64 hex characters, as `pubkey` prints) or a file holding it")

    for name in ("check", "repair"):
        c = _subparser(sub, name)
        c.add_argument("addresses", nargs="*", metavar="ADDRESS")
        c.add_argument("--all", action="store_true",
                       help="every file stored with `put` in this key's catalog")
        c.add_argument("--verify", action="store_true",
                       help="download every holder's copy and check its hash (slower)")

    gw = _subparser(sub, "gateway")
    gw.add_argument("--listen", default=None, metavar="ENDPOINT",
                    help="where to listen, a Twisted endpoint string (default: tcp:8472:interface=127.0.0.1)")
    gw.add_argument("--token-file", default=None, metavar="FILE",
                    help="the token requests must carry (default: gateway.token beside the key; made if missing)")
    gw.add_argument("--part-size", default=None, metavar="SIZE",
                    help="plaintext bytes per part of a stored file (default: config or 4M)")
    gw.add_argument("--erasure", default=None, metavar="K/N",
                    help="store files' parts as N shares, any K of which give a part back, or off "
                         "(default: config or off; see `put --help`)")

    _subparser(sub, "config")
    return p


# --- helpers -------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"dsss: warning: {message}", file=sys.stderr, flush=True)


def _error_line(message: str) -> None:
    print(f"dsss: error: {message}", file=sys.stderr, flush=True)


def _fail(message: str, code: int = 1, *, json_mode: bool = False, kind: str = "error") -> int:
    _error_line(message)
    if json_mode:
        dump_json({"error": message, "code": kind, "exit-code": code})
    return code


def _check_address(text: str) -> str:
    if not is_block_id(text) or is_share_id(text):
        raise CommandLineError(f"not a file address (64 lowercase hex characters): {text!r}")
    return text


def _datagram_size(args: argparse.Namespace, host: str) -> int:
    from dsss.quic import LOOPBACK_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE_LIMIT

    if args.datagram_size is not None:
        if not 1200 <= args.datagram_size <= MAX_DATAGRAM_SIZE_LIMIT:
            raise LocalUsageError(f"--datagram-size must be between 1200 and {MAX_DATAGRAM_SIZE_LIMIT}")
        return int(args.datagram_size)
    return LOOPBACK_DATAGRAM_SIZE if ipaddress.ip_address(host).is_loopback else 1452


async def _resolve(reactor: Any, host: str) -> str:
    """The server's IP address: UDP datagrams go to an address, not a name."""
    from dsss.client.discovery import ServerUnreachable

    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return str(await reactor.resolve(host))
    except Exception:
        raise ServerUnreachable(f"cannot resolve the server's host name {host!r}") from None


def _collect_garbage_again() -> None:
    """`python -m dsss.client` loads its modules with the garbage collector off (see
    `dsss.client.__main__`); once the network stack is loaded, the objects the imports made are
    frozen (never scanned again) and collection is back on, so a long transfer's memory stays
    bounded."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


async def _session(reactor: Any, args: argparse.Namespace, settings: Settings, key: PrivateKey) -> Session:
    from dsss.client.discovery import DiscoveryClient
    from dsss.client.flows import Session
    from dsss.client.peer import PeerNetwork

    _collect_garbage_again()
    # With the key, requests are signed when the server admits only listed clients.
    discovery = DiscoveryClient(settings.server, reactor=reactor, key=key)
    info = await discovery.info()
    host = await _resolve(reactor, urlsplit(settings.server).hostname or "127.0.0.1")
    bind = "::" if ":" in host else "0.0.0.0"
    from dsss.client.pathcache import paths_file

    peers = PeerNetwork(reactor, (host, info.udp_port), bind_host=bind,
                        max_datagram_size=_datagram_size(args, host), paths_file=paths_file(settings.key))
    if getattr(args, "verbose", False):
        def report(paths: dict[str, str]) -> None:
            _print_paths(paths)
            if peers.uploaded:
                print(f"dsss: uploaded {peers.uploaded} bytes, {peers.copies_made} copies stored",
                      file=sys.stderr)

        peers.on_close = report
    await peers.start()
    discovery.local_address = peers.local_address  # agents behind our NAT: across our LAN
    chain = getattr(args, "chain", None)
    if chain is None:
        chain = not ipaddress.ip_address(host).is_loopback
    from twisted.internet.threads import deferToThreadPool

    def offload(f: Any, *a: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)

    return Session(discovery=discovery, peers=peers, replicas=info.replicas, parallel=settings.parallel,
                   chain=chain, offload=offload, erasure=settings.erasure)


def _print_paths(paths: dict[str, str]) -> None:
    for address, path in sorted(paths.items()):
        print(f"dsss: path {address} {path}", file=sys.stderr)


def _record(settings: Settings, entry: catalog.Entry) -> None:
    """Add to the catalog; a failure is a warning, never a failed put or share."""
    path = catalog.catalog_path(settings.key)
    try:
        catalog.append(path, entry)
    except OSError as e:
        _warn(f"could not record {entry.address} in the catalog {path}: {e.strerror or e}")


def _recipient(text: str) -> PublicKey:
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


def _manifest_doc(address: str, m: Manifest) -> dict[str, Any]:
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


# --- commands ------------------------------------------------------------------------------------


async def cmd_keygen(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    key = generate_key_file(settings.key)
    if args.json:
        dump_json({"public-key": public_key_hex(key), "key-file": str(settings.key)})
    else:
        print(public_key_hex(key))
        print(f"wrote {settings.key}", file=sys.stderr)
    return 0


async def cmd_pubkey(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    key = load_key_file(settings.key)
    if args.json:
        dump_json({"public-key": public_key_hex(key), "key-file": str(settings.key)})
    else:
        print(public_key_hex(key))
    return 0


async def cmd_config(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    values = {
        "server": settings.server,
        "key": str(settings.key),
        "part-size": settings.part_size,
        "parallel": settings.parallel,
        "erasure": str(settings.erasure) if settings.erasure is not None else "off",
    }
    if args.json:
        dump_json({**values, "config-file": str(settings.config_file) if settings.config_file else None,
                   "sources": settings.sources})
        return 0
    for name, value in values.items():
        print(f"{name:<9} = {value}  ({settings.sources[name]})")
    print(f"config file: {settings.config_file or 'none'}")
    return 0


async def cmd_ls(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    path = catalog.catalog_path(settings.key)
    entries, skipped = catalog.read(path)
    entries = catalog.latest(entries)
    if skipped:
        _warn(f"skipped {skipped} damaged line(s) in {path}")
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
        name = e.name if not e.shared else f"{e.name} ({e.kind.replace('-', ' ')})"
        rows.append([name, human_size(e.size), local_date(e.created), e.address])
    for line in table(["NAME", "SIZE", "DATE", "ADDRESS"], rows, right=[1]):
        print(line)
    return 0


async def cmd_put(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.flows import Progress, part_count, put_files

    for name in args.files:
        if not os.path.isfile(name):
            raise CommandLineError(f"{name}: not a readable file")
    key = load_key_file(settings.key)
    sizes = [os.path.getsize(name) for name in args.files]
    names = [clean_name(os.path.basename(name)) for name in args.files]  # as the manifest keeps them
    session = await _session(reactor, args, settings, key)
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
            entry = catalog.Entry(address=address, name=names[i], size=size,
                                  parts=parts, created=int(time.time()))
            _record(settings, entry)
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

    addresses = list(dict.fromkeys(map(_check_address, args.addresses)))
    if args.json and args.output == "-":
        raise CommandLineError("--json cannot be used with -o - (stdout carries the file)")
    if len(addresses) > 1 or (args.output != "-" and os.path.isdir(args.output)):
        return await _get_to_directory(reactor, args, settings, addresses)
    address = addresses[0]
    key = load_key_file(settings.key)
    session = await _session(reactor, args, settings, key)
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
        dump_json({**_manifest_doc(address, manifest), "output": args.output})
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
                print(json.dumps({**_manifest_doc(address, manifest), "output": output},
                                 ensure_ascii=True), flush=True)
            else:
                print(f"{address} {output}", flush=True)

    def done(i: int, manifest: Manifest | None, error: BaseException | None) -> None:
        advance(1)
        ended[i] = (manifest, error)
        flush()

    session = await _session(reactor, args, settings, key)
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
        _error_line(f"{address}: {message}")
        if args.json:
            dump_json({"address": address, "error": message, "code": kind, "exit-code": code})
    if failures:
        if len(addresses) > 1:
            _error_line(f"fetched {len(addresses) - len(failures)} of {len(addresses)} files")
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


async def cmd_info(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import survey

    address = _check_address(args.address)
    key = load_key_file(settings.key)
    session = await _session(reactor, args, settings, key)
    try:
        health = await survey(session, address, key)
    finally:
        await session.peers.close()
    m = health.manifest
    counts = health.part_counts()
    manifest_count = len(health.blocks[0].healthy)
    if args.json:
        dump_json({
            **_manifest_doc(address, m),
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
    for name, value in rows:
        print(f"{name + ':':<11}{value}")
    return 0


async def cmd_share(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import share

    address = _check_address(args.address)
    recipient = _recipient(args.to)
    key = load_key_file(settings.key)
    session = await _session(reactor, args, settings, key)
    try:
        new_address, manifest = await share(session, address, key, recipient)
    finally:
        await session.peers.close()
    to_hex = public_key_hex(recipient)
    _record(settings, catalog.Entry(
        address=new_address, name=manifest.name, size=manifest.size, parts=len(manifest.parts),
        created=int(time.time()), kind=catalog.shared_kind(to_hex), source=address,
    ))
    if args.json:
        dump_json({"address": new_address, "source": address, "to": to_hex,
                   "name": manifest.name, "size": manifest.size})
    else:
        print(f"{new_address} {manifest.name}")
    return 0


def _targets(args: argparse.Namespace, settings: Settings) -> list[str]:
    if args.all:
        entries, _ = catalog.read(catalog.catalog_path(settings.key))
        found = [e.address for e in catalog.latest(entries) if not e.shared]
        if not found and not args.addresses:
            raise CommandLineError(f"--all: no file in the catalog {catalog.catalog_path(settings.key)}")
        return list(dict.fromkeys([*map(_check_address, args.addresses), *found]))
    if not args.addresses:
        raise CommandLineError(f"give at least one ADDRESS, or --all (see `{PROG} {args.command} --help`)")
    return list(dict.fromkeys(map(_check_address, args.addresses)))


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
    addresses = _targets(args, settings)
    key = load_key_file(settings.key)
    session = await _session(reactor, args, settings, key)
    docs: list[dict[str, Any]] = []
    errors: list[tuple[str, int]] = []
    try:
        for address in addresses:
            try:
                docs.append(await work(session, key, address))
            except DSSSError as e:
                message = f"{address}: {e}" if len(addresses) > 1 else str(e)
                errors.append((message, e.exit_code))
                docs.append({"address": address, "ok": False, "error": message, "code": e.code})
    finally:
        await session.peers.close()
    return docs, errors


async def cmd_check(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import survey

    target = 0
    coded = False

    async def work(session: Session, key: PrivateKey, address: str) -> dict[str, Any]:
        nonlocal target, coded
        health = await survey(session, address, key, verify=args.verify)
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
        _error_line(message)
    if errors:
        return errors[0][1]
    if degraded:
        blocks = sum(d["short"] for d in degraded)
        _error_line(f"{blocks} block(s) in {len(degraded)} file(s) have fewer than {target} "
                    f"{'verified' if args.verify else 'proven'} replicas{' (a share: fewer than 1)' if coded else ''}; run `{PROG} repair`")
        return EXIT_DEGRADED
    return 0


async def cmd_repair(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from dsss.client.maintenance import repair, survey

    problems: list[tuple[str, list[Repaired]]] = []
    target = 0

    async def work(session: Session, key: PrivateKey, address: str) -> dict[str, Any]:
        nonlocal target
        health = await survey(session, address, key, verify=args.verify)
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
        _error_line(message)
    if errors:
        return errors[0][1]
    if problems:
        count = sum(len(f) for _, f in problems)
        lost = any(r.lost for _, f in problems for r in f)
        name, failed = problems[0]
        _error_line(f"{count} block(s) are still below {target} replicas; "
                    f"{name} {failed[0].block.role}: {failed[0].error}")
        return 3 if lost else 4
    return 0


async def cmd_gateway(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import globalLogBeginner

    from dsss.client.gateway import (
        DEFAULT_LISTEN,
        Gateway,
        gateway_log_observer,
        gateway_site,
        load_or_make_token,
        token_path_for,
    )

    listen = args.listen or DEFAULT_LISTEN
    try:
        endpoint = serverFromString(reactor, listen)
    except (ValueError, TypeError, KeyError) as e:
        raise CommandLineError(f"--listen: not an endpoint string ({e}): {listen!r}") from None
    key = load_key_file(settings.key)
    token_path = Path(args.token_file) if args.token_file else token_path_for(settings.key)
    token = load_or_make_token(token_path)
    session = await _session(reactor, args, settings, key)
    gateway = Gateway(session, key, server=settings.server, part_size=settings.part_size,
                      catalog_path=catalog.catalog_path(settings.key))
    try:
        port = await endpoint.listen(gateway_site(gateway, token))
    except Exception as e:
        await session.peers.close()
        raise DSSSError(f"--listen {listen}: cannot listen: {e}") from None
    # A long-running process: its log (requests, failed transfers) goes to stderr.
    globalLogBeginner.beginLoggingTo([gateway_log_observer(sys.stderr)], redirectStandardIO=False)
    host = port.getHost()
    where = f"[{host.host}]" if ":" in getattr(host, "host", "") else getattr(host, "host", "?")
    print(f"dsss gateway: listening on http://{where}:{getattr(host, 'port', '?')}/ "
          f"(token in {token_path}); Ctrl-C stops it", flush=True)
    stopped: defer.Deferred[None] = defer.Deferred()

    async def shut_down() -> None:
        await defer.maybeDeferred(port.stopListening)
        await session.peers.close()

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(shut_down()))
    await stopped  # until the reactor stops (SIGINT, SIGTERM): react then exits with 0
    return 0


_HANDLERS = {
    "keygen": cmd_keygen,
    "pubkey": cmd_pubkey,
    "config": cmd_config,
    "ls": cmd_ls,
    "put": cmd_put,
    "get": cmd_get,
    "info": cmd_info,
    "share": cmd_share,
    "check": cmd_check,
    "repair": cmd_repair,
    "gateway": cmd_gateway,
}


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
    return await _HANDLERS[args.command](reactor, args, settings)


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
            code = _fail(str(e), e.exit_code, json_mode=json_mode, kind=e.code)
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            code = _fail(f"{e.strerror or e}{where}", 1, json_mode=json_mode, kind="os")
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
