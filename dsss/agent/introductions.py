# -*- test-case-name: tests.unit.test_agent_core -*-
"""Introduction keys: the agent's permission slips for uploads and downloads. Pure, clock-free.

A key is random (128 bits), single-use, bound to the client's public IP address (not its port,
which a symmetric NAT changes per destination; and to the client's local one as well when the
server saw the client behind our own NAT, on our LAN), one part hash and a size, and expires after `ttl` seconds. A key issued for size 0 is a download key; any other size
makes an upload key for exactly that many bytes. Neither works for the other operation. Presenting a key consumes it, whatever the outcome, so a key
that leaks after one attempt is worthless.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from dsss.errors import AccessDenied
from dsss.model import PeerAddress

DEFAULT_TTL = 60.0
MAX_OUTSTANDING = 100_000


@dataclass(frozen=True)
class Introduction:
    key: str
    client: PeerAddress
    block: str
    size: int
    expires: float
    # The client's address on our LAN, if the server saw it behind our NAT: good as well.
    local: PeerAddress | None = None

    def issued_for(self, client: PeerAddress) -> bool:
        """Whether packets from `client` may use this key: its IP address (not the port, which a
        symmetric NAT changes per destination) is the client's public or local one."""
        return client.host == self.client.host or (
            self.local is not None and client.host == self.local.host
        )


class IntroductionTable:
    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        max_outstanding: int = MAX_OUTSTANDING,
        key_source: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self.ttl = ttl
        self.max_outstanding = max_outstanding
        self._key_source = key_source
        self._keys: OrderedDict[str, Introduction] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def issue(self, client: PeerAddress, size: int, block: str, now: float,
              local: PeerAddress | None = None) -> Introduction:
        self.expire(now)
        while len(self._keys) >= self.max_outstanding:
            self._keys.popitem(last=False)
        intro = Introduction(self._key_source(), client, block, size, now + self.ttl, local)
        self._keys[intro.key] = intro
        return intro

    def use(
        self,
        key: str,
        *,
        client: PeerAddress,
        block: str,
        now: float,
        upload_size: int | None = None,
    ) -> Introduction:
        """Consume a key; returns its introduction or raises AccessDenied saying why."""
        intro = self._keys.pop(key, None)
        if intro is None:
            raise AccessDenied("unknown or already used introduction key")
        if now > intro.expires:
            raise AccessDenied("introduction key expired")
        if not intro.issued_for(client):
            # The IP, not the port: behind a symmetric NAT the client's packets reach the agent
            # from another public port than the one the server observed.
            raise AccessDenied("introduction key was issued for another client address")
        if intro.block != block:
            raise AccessDenied("introduction key was issued for another part")
        if upload_size is None:
            if intro.size != 0:
                raise AccessDenied("this introduction key is for an upload, not a download")
        elif intro.size == 0:
            raise AccessDenied("this introduction key is for a download, not an upload")
        elif upload_size != intro.size:
            raise AccessDenied("upload size differs from the introduced size")
        return intro

    def expire(self, now: float) -> None:
        while self._keys:
            key, intro = next(iter(self._keys.items()))
            if intro.expires >= now:
                # Keys are issued in time order with one ttl, so the rest are newer.
                break
            del self._keys[key]

    def pending_clients(self, now: float) -> set[PeerAddress]:
        self.expire(now)
        return {i.client for i in self._keys.values()}
