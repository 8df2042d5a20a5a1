# -*- test-case-name: tests.integration.test_client -*-
"""`python -m dsss.client [--server URL] [--key FILE] COMMAND`.

Addresses go to stdout; everything else (progress, messages, errors) to stderr. Every known failure
is one line on stderr and a non-zero exit code; a traceback is printed only for a bug.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from twisted.internet import defer

from dsss.client.discovery import DiscoveryClient, ServerUnreachable
from dsss.client.flows import DEFAULT_PARALLEL, DEFAULT_PART_SIZE, Progress, Session, get_to_stream, put_file
from dsss.client.peer import PeerNetwork
from dsss.crypto.keys import default_key_path, generate_key_file, load_key_file, public_key_hex
from dsss.errors import DSSSError, LocalUsageError
from dsss.model import is_block_id, parse_size

EPILOG = """examples:
  python -m dsss.client keygen
  python -m dsss.client put photo.jpg notes.txt
  python -m dsss.client get 3f2a...c9 -o photo.jpg
  python -m dsss.client get 3f2a...c9 -o - | less
environment: DSSS_SERVER (default http://127.0.0.1:8470), DSSS_KEY (default ~/.config/dsss/key)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsss.client",
        description="Store files on a DSSS network, encrypted on this machine, and get them back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", default=os.environ.get("DSSS_SERVER", "http://127.0.0.1:8470"),
                   help="discovery server URL (default: $DSSS_SERVER or http://127.0.0.1:8470)")
    p.add_argument("--key", default=None, help="key file (default: $DSSS_KEY or ~/.config/dsss/key)")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="parts in flight at once")
    p.add_argument("--datagram-size", type=int, default=None,
                   help="largest QUIC datagram (default: 8192 on loopback, else 1452)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("keygen", help="create a new key pair in the key file")
    put = sub.add_parser("put", help="store files; prints each file's address")
    put.add_argument("files", nargs="+", metavar="FILE")
    put.add_argument("--part-size", default="1M", help="size of each part (default 1M)")
    get = sub.add_parser("get", help="fetch a file by its address")
    get.add_argument("address")
    get.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    return p


def _fail(message: str, code: int = 1) -> int:
    print(f"dsss: error: {message}", file=sys.stderr)
    return code


def _progress_bar(total: int, desc: str) -> tuple[Progress, Any]:
    if not sys.stderr.isatty():
        return Progress(), None
    import shutil

    from tqdm import tqdm

    # A terminal that reports no size (0x0, as some ptys do) still gets a bar: tqdm would
    # otherwise hide it for lack of rows.
    size = shutil.get_terminal_size((100, 24))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               file=sys.stderr, leave=True, ncols=min(size.columns or 100, 120),
               nrows=size.lines or 24, mininterval=0.2)
    return Progress(advance=bar.update), bar


def _datagram_size(args: argparse.Namespace, host: str) -> int:
    if args.datagram_size is not None:
        if not 1200 <= args.datagram_size <= 16000:
            raise LocalUsageError("--datagram-size must be between 1200 and 16000")
        return int(args.datagram_size)
    return 8192 if ipaddress.ip_address(host).is_loopback else 1452


async def _resolve(reactor: Any, host: str) -> str:
    """The server's IP address: UDP datagrams go to an address, not a name."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return str(await reactor.resolve(host))
    except Exception:
        raise ServerUnreachable(f"cannot resolve the server's host name {host!r}") from None


async def _session(reactor: Any, args: argparse.Namespace) -> Session:
    discovery = DiscoveryClient(args.server, reactor=reactor)
    info = await discovery.info()
    host = await _resolve(reactor, urlsplit(args.server).hostname or "127.0.0.1")
    bind = "::" if ":" in host else "0.0.0.0"
    peers = PeerNetwork(reactor, (host, info.udp_port), bind_host=bind,
                        max_datagram_size=_datagram_size(args, host))
    await peers.start()
    return Session(discovery=discovery, peers=peers, replicas=info.replicas, parallel=max(1, args.parallel))


async def run(reactor: Any, argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    key_path = Path(args.key) if args.key else default_key_path()

    if args.command == "keygen":
        key = generate_key_file(key_path)
        print(public_key_hex(key))
        print(f"wrote {key_path}", file=sys.stderr)
        return 0

    key = load_key_file(key_path)

    if args.command == "put":
        part_size = parse_size(args.part_size)
        for name in args.files:
            if not os.path.isfile(name):
                return _fail(f"{name}: not a readable file", 2)
        session = await _session(reactor, args)
        try:
            for name in args.files:
                size = os.path.getsize(name)
                progress, bar = _progress_bar(size, os.path.basename(name))
                try:
                    address = await put_file(session, name, owner=key.public_key,
                                             part_size=part_size, progress=progress)
                finally:
                    if bar is not None:
                        bar.close()
                print(f"{address} {name}", flush=True)
        finally:
            await session.peers.close()
        return 0

    if args.command == "get":
        if not is_block_id(args.address):
            return _fail(f"not a file address (64 lowercase hex characters): {args.address!r}", 2)
        session = await _session(reactor, args)
        try:
            if args.output == "-":
                out = sys.stdout.buffer
                await get_to_stream(session, args.address, out, key=key)
                out.flush()
                return 0
            return await _get_to_file(session, args.address, Path(args.output), key)
        finally:
            await session.peers.close()
    return _fail(f"unknown command {args.command}")  # pragma: no cover


async def _get_to_file(session: Session, address: str, out: Path, key: Any) -> int:
    tmp = out.with_name(f".{out.name}.dsss-{secrets.token_hex(4)}.part")
    bar = None
    try:
        with open(tmp, "xb") as f:
            holder: dict[str, Any] = {}

            def started(manifest: Any) -> None:
                progress, holder["bar"] = _progress_bar(manifest.size, manifest.name)
                holder["progress"] = progress

            class _Forward(Progress):
                def __init__(self) -> None:
                    super().__init__(advance=lambda n: holder.get("progress", Progress()).advance(n))

            await get_to_stream(session, address, f, key=key, progress=_Forward(), on_manifest=started)
            bar = holder.get("bar")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        return 0
    finally:
        if bar is not None:
            bar.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def main(reactor: Any, *argv: str) -> defer.Deferred[None]:
    async def go() -> None:
        try:
            code = await run(reactor, argv)
        except DSSSError as e:
            code = _fail(str(e), e.exit_code)
        except OSError as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            code = _fail(f"{e.strerror or e}{where}", 1)
        except SystemExit as e:
            raise e
        except Exception:
            traceback.print_exc()
            code = 70
        if code:
            raise SystemExit(code)

    return defer.ensureDeferred(go())
