# -*- test-case-name: tests.unit.test_clientauth -*-
"""Signed HTTP requests, for servers that admit only listed clients (`--clients FILE`).

A client proves it holds the private half of its Curve25519 key (the one `keygen` made) without a
second key pair: it authenticates a digest of the request with NaCl's Box between its key and the
server's key (published as "public-key" in /api/info). Only the two holders of that pair can
make such a box, so a valid box from a listed public key is a request from that client.

    X-DSSS-Client: <client public key, 64 hex>
    X-DSSS-Auth:   <unix time>.<nonce, 48 hex>.<box, hex>

The box seals BLAKE2b-256("dsss-request-v1 <time> <METHOD> <path?query>"). The server refuses a
time more than MAX_SKEW seconds away from its own and a nonce it has already seen.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from dsss.errors import AccessDenied

MAX_SKEW = 120.0
NONCE_BYTES = 24
_AUTH_RE = re.compile(r"\A([0-9]{1,12})\.([0-9a-f]{48})\.([0-9a-f]{96})\Z")
_KEY_RE = re.compile(r"\A[0-9a-f]{64}\Z")


class AuthRequired(AccessDenied):
    http_status = 401
    code = "auth-required"


def _digest(timestamp: int, method: str, uri: str) -> bytes:
    return hashlib.blake2b(
        f"dsss-request-v1 {timestamp} {method} {uri}".encode("utf-8"), digest_size=32
    ).digest()


def sign_request(key: PrivateKey, server: PublicKey, method: str, uri: str, now: float) -> dict[str, str]:
    ts = int(now)
    nonce = os.urandom(NONCE_BYTES)
    box = Box(key, server).encrypt(_digest(ts, method, uri), nonce).ciphertext
    return {
        "X-DSSS-Client": bytes(key.public_key).hex(),
        "X-DSSS-Auth": f"{ts}.{nonce.hex()}.{box.hex()}",
    }


def _client_lines(text: str) -> list[tuple[str, int | None]]:
    from dsss.errors import BadRequest
    from dsss.model import parse_size

    out = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        if not _KEY_RE.match(words[0]) or len(words) > 2:
            raise ValueError(f"line {n}: not a client public key (64 lowercase hex), optionally "
                             f"followed by its quota: {line[:90]!r}")
        quota = None
        if len(words) == 2:
            try:
                quota = parse_size(words[1])
            except BadRequest as e:
                raise ValueError(f"line {n}: quota: {e}") from None
        out.append((words[0], quota))
    return out


def parse_client_list(text: str) -> frozenset[str]:
    """One client public key (64 hex) per line, optionally followed by its quota (a size such
    as 10G, for `--quota`); `#` starts a comment."""
    return frozenset(key for key, _ in _client_lines(text))


def parse_client_quotas(text: str) -> dict[str, int]:
    """The quotas a client list gives its clients (those that name one)."""
    return {key: quota for key, quota in _client_lines(text) if quota is not None}


class RequestVerifier:
    def __init__(self, key: PrivateKey, allowed: frozenset[str], max_nonces: int = 100_000) -> None:
        self.key = key
        self.allowed = allowed
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max_nonces = max_nonces

    def verify(self, client: str | None, auth: str | None, method: str, uri: str, now: float) -> str:
        """Return the client's key if the request is signed by a listed client; else raise."""
        if not client or not auth:
            raise AuthRequired("this server admits only listed clients: the request must be signed")
        if not _KEY_RE.match(client):
            raise AuthRequired("bad X-DSSS-Client header")
        m = _AUTH_RE.match(auth)
        if m is None:
            raise AuthRequired("bad X-DSSS-Auth header")
        ts, nonce, box = int(m.group(1)), m.group(2), m.group(3)
        if abs(now - ts) > MAX_SKEW:
            raise AuthRequired("request time is too far from the server's clock")
        try:
            digest = Box(self.key, PublicKey(bytes.fromhex(client))).decrypt(
                bytes.fromhex(box), bytes.fromhex(nonce)
            )
        except CryptoError:
            raise AuthRequired("request signature does not verify") from None
        if digest != _digest(ts, method, uri):
            raise AuthRequired("request signature is for another request")
        if client not in self.allowed:
            raise AccessDenied("this client is not allowed on this server")
        self._remember(nonce, now)
        return client

    def _remember(self, nonce: str, now: float) -> None:
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= 2 * MAX_SKEW and len(self._seen) < self._max_nonces:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise AuthRequired("replayed request")
        self._seen[nonce] = now
