# -*- test-case-name: tests.unit.test_quic_retry -*-
"""Address validation for new QUIC connections (RFC 9000 8.1): when to ask for a Retry, and its tokens.

Sans-I/O; time is passed in. A server-side handshake costs an agent a connection slot and
crypto until it completes or times out, and an Initial's source address can be spoofed. So
while few handshakes are half-open the endpoint accepts Initials at once (one round trip
saved), and once `threshold` are half-open, or one IP address has half of `per_source`
half-open, an Initial must carry a token from a Retry this endpoint sent to that address: a
spoofer never receives the Retry, so it cannot hold a slot. No address holds more than
`per_source` half-open handshakes.

A token is `issued (8 bytes, big-endian milliseconds) || len(odcid) || odcid || rscid (8) ||
HMAC-SHA256(secret, address || the rest)[:16]`: the endpoint keeps no state per Retry, and a
token is good for TOKEN_LIFETIME seconds, from the address it was sent to only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass

TOKEN_LIFETIME = 10.0
"""Seconds a Retry token is accepted after it was made."""
RETRY_CID_LENGTH = 8
_MAC_LENGTH = 16


@dataclass(frozen=True)
class AdmissionPolicy:
    """When new handshakes must prove their address, and how many one address may hold."""

    threshold: int = 64
    """Half-open handshakes (in all) from which every new one must carry a Retry token."""
    per_source: int = 16
    """Half-open handshakes one IP address may hold (its Initials are dropped beyond); from half
    of it, that address must use Retry tokens."""


def _address_bytes(addr: tuple[str, int]) -> bytes:
    host, port = addr[0], addr[1]
    return ipaddress.ip_address(host).packed + struct.pack(">H", port)


class RetryTokens:
    """Makes and checks Retry tokens with a secret of its own (new at every start)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else os.urandom(32)

    def _mac(self, addr: tuple[str, int], body: bytes) -> bytes:
        return hmac.new(self._secret, _address_bytes(addr) + body, hashlib.sha256).digest()[:_MAC_LENGTH]

    def make(self, addr: tuple[str, int], original_cid: bytes, retry_cid: bytes, now: float) -> bytes:
        if len(original_cid) > 20 or len(retry_cid) != RETRY_CID_LENGTH:
            raise ValueError("connection IDs of the wrong length")
        body = struct.pack(">QB", int(now * 1000), len(original_cid)) + original_cid + retry_cid
        return body + self._mac(addr, body)

    def check(self, addr: tuple[str, int], token: bytes, now: float) -> tuple[bytes, bytes] | None:
        """(original destination CID, retry source CID) if `token` is ours, for `addr`, and fresh."""
        if len(token) < 9 + RETRY_CID_LENGTH + _MAC_LENGTH:
            return None
        body, mac = token[:-_MAC_LENGTH], token[-_MAC_LENGTH:]
        if not hmac.compare_digest(mac, self._mac(addr, body)):
            return None
        issued_ms, odcid_len = struct.unpack(">QB", body[:9])
        if len(body) != 9 + odcid_len + RETRY_CID_LENGTH:
            return None
        age = now - issued_ms / 1000
        if not 0 <= age <= TOKEN_LIFETIME:
            return None
        return body[9 : 9 + odcid_len], body[9 + odcid_len :]


class HalfOpen:
    """Counts server-side handshakes not completed yet, per source IP and in all."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.total = 0
        self._by_host: dict[str, int] = {}

    def must_validate(self, host: str) -> bool:
        """Whether a new Initial from `host` must carry a Retry token."""
        return self.total >= self.policy.threshold or self._by_host.get(host, 0) >= self.policy.per_source // 2

    def full(self, host: str) -> bool:
        """Whether `host` already holds all the half-open handshakes it may."""
        return self._by_host.get(host, 0) >= self.policy.per_source

    def opened(self, host: str) -> None:
        self.total += 1
        self._by_host[host] = self._by_host.get(host, 0) + 1

    def closed(self, host: str) -> None:
        held = self._by_host.get(host, 0)
        if held <= 0:
            return
        self.total -= 1
        if held == 1:
            del self._by_host[host]
        else:
            self._by_host[host] = held - 1
