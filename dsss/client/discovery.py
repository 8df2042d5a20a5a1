# -*- test-case-name: tests.adapters.test_discovery_client -*-
"""A typed client for the discovery server's HTTP API, over an injectable treq HTTPClient."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import treq
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.web.client import ResponseFailed

from dsss.errors import (
    BadRequest,
    DSSSError,
    NotFound,
    RemoteProtocolError,
    Timeout,
    Unavailable,
)
from dsss.model import PeerAddress, check_block_id

MAX_RESPONSE = 1024 * 1024
_BY_STATUS = {400: BadRequest, 404: NotFound, 503: Unavailable, 504: Timeout}


class ServerUnreachable(Unavailable):
    code = "server-unreachable"


@dataclass(frozen=True)
class Introduction:
    key: str
    agent_id: str
    address: PeerAddress


@dataclass(frozen=True)
class ServerInfo:
    replicas: int
    udp_port: int
    version: str


class _Collector:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise RemoteProtocolError("server response too large")
        self.chunks.append(data)


class DiscoveryClient:
    def __init__(self, base_url: str, *, reactor: Any, http: Any = None, timeout: float = 15.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"server URL must look like http://HOST:PORT, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.reactor = reactor
        self.http = http if http is not None else treq
        self.timeout = timeout

    async def _get(self, path: str, params: dict[str, Any] | list[tuple[str, str]]) -> Any:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urlencode(params)
        try:
            response = await self.http.get(url, reactor=self.reactor, timeout=self.timeout)
            collector = _Collector(MAX_RESPONSE)
            await treq.collect(response, collector)
        except (ConnectionRefusedError, ConnectError, DNSLookupError) as e:
            raise ServerUnreachable(f"cannot reach the discovery server at {self.base_url}: {e.__class__.__name__}") from None
        except defer.CancelledError:
            raise Timeout(f"the discovery server at {self.base_url} did not answer in time") from None
        except ResponseFailed:
            raise ServerUnreachable(f"the connection to {self.base_url} failed") from None
        body = b"".join(collector.chunks)
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise RemoteProtocolError(f"the server answered {path} with something that is not JSON") from None
        if response.code != 200:
            message = doc.get("error") if isinstance(doc, dict) else None
            cls = _BY_STATUS.get(response.code, DSSSError)
            raise cls(f"server: {message or response.code}")
        if not isinstance(doc, dict):
            raise RemoteProtocolError(f"the server answered {path} with a non-object")
        return doc

    @staticmethod
    def _addresses(doc: dict[str, Any]) -> list[PeerAddress]:
        raw = doc.get("addresses")
        if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
            raise RemoteProtocolError("server answer lacks a list of addresses")
        return [PeerAddress.parse(a) for a in raw]

    async def info(self) -> ServerInfo:
        doc = await self._get("/api/info", {})
        try:
            return ServerInfo(int(doc["replicas"]), int(doc["udp-port"]), str(doc["version"]))
        except (KeyError, TypeError, ValueError):
            raise RemoteProtocolError("bad /api/info answer") from None

    async def who_has(self, block: str) -> list[PeerAddress]:
        check_block_id(block)
        return self._addresses(await self._get("/api/who-has", {"q": block}))

    async def where_to_upload(
        self, size: int, exclude: list[PeerAddress] | None = None
    ) -> list[PeerAddress]:
        params = [("size", str(size))]
        if exclude:
            params.append(("exclude", ",".join(str(a) for a in exclude)))
        return self._addresses(await self._get("/api/where-to-upload", params))

    async def introduce_me(
        self, to: PeerAddress, block: str, size: int, from_: PeerAddress
    ) -> Introduction:
        doc = await self._get(
            "/api/introduce-me",
            {"to": str(to), "hash": block, "size": str(size), "from": str(from_)},
        )
        key, agent, address = doc.get("introduction-key"), doc.get("agent"), doc.get("address")
        if not isinstance(key, str) or not isinstance(agent, str) or not isinstance(address, str):
            raise RemoteProtocolError("bad /api/introduce-me answer")
        try:
            bytes.fromhex(agent)
        except ValueError:
            raise RemoteProtocolError("bad agent id in introduction") from None
        return Introduction(key, agent, PeerAddress.parse(address))
