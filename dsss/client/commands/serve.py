# -*- test-case-name: tests.adapters.test_gateway,tests.integration.test_gateway -*-
"""The gateway command: serve put and get over HTTP on this machine, as a long-running client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer

from dsss.client import catalog
from dsss.client.commands.common import PROG, CommandLineError, add_command, session_for
from dsss.client.config import Settings
from dsss.crypto.keys import load_key_file
from dsss.errors import DSSSError


def register(sub: Any) -> None:
    gw = add_command(sub, "gateway", "serve put and get over HTTP on this machine, as a long-running client", f"""examples:
  {PROG} gateway                                   # http://127.0.0.1:8472/
  {PROG} gateway --listen tcp:9000:interface=127.0.0.1
  curl -H "Authorization: Bearer $(cat ~/.config/dsss/gateway.token)" \\
       -T photo.jpg "http://127.0.0.1:8472/files?name=photo.jpg"
  curl -H "Authorization: Bearer $(cat ~/.config/dsss/gateway.token)" \\
       -o photo.jpg http://127.0.0.1:8472/files/ADDRESS

PUT /files stores the request body (201, JSON with the address; recorded in `ls`), GET
/files/ADDRESS streams a file back. Every request needs the token kept in gateway.token
beside the key (made on first start, mode 0600). Runs until interrupted (SIGINT, SIGTERM).
""")
    gw.add_argument("--listen", default=None, metavar="ENDPOINT",
                    help="where to listen, a Twisted endpoint string (default: tcp:8472:interface=127.0.0.1)")
    gw.add_argument("--token-file", default=None, metavar="FILE",
                    help="the token requests must carry (default: gateway.token beside the key; made if missing)")
    gw.add_argument("--part-size", default=None, metavar="SIZE",
                    help="plaintext bytes per part of a stored file (default: config or 4M)")
    gw.add_argument("--erasure", default=None, metavar="K/N",
                    help="store files' parts as N shares, any K of which give a part back, or off "
                         "(default: config or off; see `put --help`)")
    gw.set_defaults(func=cmd_gateway)


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
    session = await session_for(reactor, args, settings, key)
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


