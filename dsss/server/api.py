# -*- test-case-name: tests.adapters.test_server_api -*-
"""The discovery server's HTTP API (Klein): who-has, where-to-upload, introduce-me, audit, info, status."""

from __future__ import annotations

import re
from typing import Any, Protocol

from klein import Klein
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from werkzeug.exceptions import HTTPException
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from twisted.web.resource import IResource

from dsss.httpjson import http_error, unexpected_error
from dsss.httpjson import json_body as _json
from dsss.errors import BadRequest, DSSSError, RateLimited
from dsss.clientauth import RequestVerifier
from dsss.metrics import ServerMetrics, endpoint_namer, render_metrics
from dsss.model import PeerAddress, check_block_id, check_local_address, is_decimal
from dsss.ratelimit import RateLimiter
from dsss.server.chains import chain_order, chain_worth_trying, hop_addresses
from dsss.server.connlimit import headers_complete
from dsss.server.quotas import OpenBound, QuotaBook
from dsss.server.registry import Registry
from dsss.server.status_page import CONTENT_SECURITY_POLICY, STATUS_AGENTS, STATUS_MAX_AGENTS, render_page
from dsss.wire.transfer import MAX_PART as MAX_PART_SIZE


class ApiServer(Protocol):
    """What the HTTP API uses of the server (dsss.server.service.DiscoveryServer)."""

    @property
    def http_limiter(self) -> RateLimiter: ...
    @property
    def observe_limiter(self) -> RateLimiter: ...
    @property
    def verifier(self) -> RequestVerifier | None: ...
    @property
    def metrics(self) -> ServerMetrics: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def replicas(self) -> int: ...
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def quotas(self) -> QuotaBook: ...
    @property
    def open_bound(self) -> OpenBound | None: ...

    def now(self) -> float: ...
    def warming(self) -> bool: ...
    def info(self) -> dict[str, Any]: ...
    def status(self, after: str = "", limit: int = ...) -> dict[str, Any]: ...
    async def who_has(self, block: str) -> list[PeerAddress]: ...
    async def locate(self, block: str) -> tuple[list[PeerAddress], list[PeerAddress]]: ...
    async def audit_claims(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]: ...
    def where_to_upload(self, size: int, exclude: list[PeerAddress],
                        count: int | None = None) -> list[PeerAddress]: ...
    async def introduce(self, to: PeerAddress, client: PeerAddress, size: int, block: str,
                        client_local: PeerAddress | None = None) -> dict[str, Any]: ...

log = Logger()

# Introductions in one /api/introduce-many request.
MAX_INTRODUCTIONS = 16
# Agents one /api/where-to-upload may ask for (`count`), and hashes in one /api/upload-to (the
# shares of an erasure-coded part, each for an agent of its own).
MAX_COUNT = 64
# (part, agent) pairs in one /api/audit request.
MAX_AUDITS = 64


_AGENT_ID = re.compile(r"\A[0-9a-f]{64}\Z")


def _arg(request: IRequest, name: str, *, required: bool = True) -> str | None:
    values = request.args.get(name.encode("ascii"), [])
    if not values:
        if required:
            raise BadRequest(f"missing parameter {name!r}")
        return None
    if len(values) > 1 and name != "exclude":
        raise BadRequest(f"parameter {name!r} given more than once")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"parameter {name!r} is not UTF-8") from None


def _size(text: str | None, name: str = "size") -> int:
    if text is None or not is_decimal(text) or len(text) > 15:
        raise BadRequest(f"{name} must be a non-negative integer")
    value = int(text)
    if value > MAX_PART_SIZE:
        raise BadRequest(f"{name} larger than the largest part ({MAX_PART_SIZE} bytes)")
    return value


def _count(text: str | None) -> int | None:
    """`count`: how many agents to pick, 1 to MAX_COUNT; None if not given."""
    if text is None:
        return None
    if not is_decimal(text) or len(text) > 3 or not 1 <= int(text) <= MAX_COUNT:
        raise BadRequest(f"count must be a whole number from 1 to {MAX_COUNT}")
    return int(text)


def _hashes(request: IRequest) -> list[str]:
    """`hash` (may repeat, at most MAX_COUNT times): distinct part IDs, in the order given."""
    raw = request.args.get(b"hash", [])
    if not raw:
        raise BadRequest("missing parameter 'hash'")
    if len(raw) > MAX_COUNT:
        raise BadRequest(f"at most {MAX_COUNT} hashes per request")
    hashes = [check_block_id(value.decode("utf-8", "replace")) for value in raw]
    if len(set(hashes)) != len(hashes):
        raise BadRequest("a hash is given more than once")
    return hashes


def _exclude(request: IRequest) -> list[PeerAddress]:
    """`exclude` (may repeat): comma-separated agent addresses."""
    exclude = []
    for raw in request.args.get(b"exclude", []):
        for part in raw.decode("utf-8", "replace").split(","):
            if part:
                exclude.append(PeerAddress.parse(part))
    return exclude


def _local(request: IRequest) -> PeerAddress | None:
    """`local` (optional): the client's UDP address on its own network, for agents behind the
    same NAT (they meet across their LAN)."""
    text = _arg(request, "local", required=False)
    return None if text is None else check_local_address(PeerAddress.parse(text))


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value if isinstance(value, str) else value.decode("ascii", "replace")


class BoundedRequest(Request):
    """The API takes no request bodies: one larger than MAX_BODY is refused with 413 and the
    connection closed before it is read (Twisted would otherwise spool it to a file)."""

    MAX_BODY = 64 * 1024
    _too_large = False
    _body_seen = 0

    def gotLength(self, length: int | None) -> None:
        # Called once the request's headers are in: the connection's header deadline stops.
        headers_complete(self.channel.transport if self.channel is not None else None, self.notifyFinish())
        if length is not None and length > self.MAX_BODY:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_seen += len(data)
        if self._body_seen > self.MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        if self._too_large:
            return
        self._too_large = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: 35\r\n\r\n"
                b'{"error": "request body too large"}'
            )
            transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._too_large:
            return
        super().requestReceived(command, path, version)


class DiscoveryAPI:
    app = Klein()

    def __init__(self, server: ApiServer) -> None:
        self.server = server

    def _admit(self, request: IRequest, cost: int = 1) -> str | None:
        """Per-IP rate limit (a batch costs one request per item), then (with --clients) a
        signed request from a listed client, whose public key is returned."""
        server = self.server
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if not server.http_limiter.allow(host, server.now(), cost):
            raise RateLimited("too many requests from your address; slow down")
        if server.verifier is not None:
            return server.verifier.verify(
                _header(request, b"x-dsss-client"),
                _header(request, b"x-dsss-auth"),
                request.method.decode("ascii", "replace"),
                request.uri.decode("ascii", "replace"),
                server.now(),
            )
        return None

    def _charge(self, request: IRequest, client: str | None, placed: list[tuple[PeerAddress, int]]) -> None:
        """Refuse (QuotaExceeded) placements (agent, bytes) past the client's quota, or on an
        open server past the source address's daily bound."""
        bound = self.server.open_bound
        if bound is not None and client is None:
            peer = request.getClientAddress()
            bound.check(getattr(peer, "host", None), sum(max(0, size) for _, size in placed), self.server.now())
            return
        quotas = self.server.quotas
        if client is None or not quotas.enabled:
            return
        placements = []
        for address, size in placed:
            rec = self.server.registry.by_address(address)
            if rec is not None and size > 0:
                placements.append((rec.agent_id, size))
        if not placements:
            return
        now = self.server.now()
        live = [r.agent_id for r in self.server.registry.live(now)]
        quotas.check(client, _arg(request, "lease-key", required=False), placements, live, now)

    def resource(self) -> IResource:
        return self.server.metrics.wrap(self.app.resource(), endpoint_namer(self.app))

    @app.handle_errors(DSSSError)
    def _dsss_error(self, request: IRequest, failure: Any) -> bytes:
        err = failure.value
        if err.http_status == 429 or (err.http_status in (404, 503) and self.server.warming()):
            # Just (re)started: agents are still registering, so this answer may change soon.
            request.setHeader(b"retry-after", b"1")
        return _json(request, {"error": str(err), "code": err.code}, err.http_status)

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Any) -> bytes:
        return http_error(request, failure)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Any) -> bytes:
        return unexpected_error(request, failure)

    @app.route("/api/who-has", methods=["GET"])
    async def who_has(self, request: IRequest) -> bytes:
        self._admit(request)
        block = check_block_id(_arg(request, "q") or "")
        # `addresses`: every agent that says it holds the part (a claim: fine to download from,
        # the client checks what it gets); `proven`: those of them that proved it recently.
        addresses, proven = await self.server.locate(block)
        body: dict[str, Any] = {"addresses": [str(a) for a in addresses],
                                "proven": [str(a) for a in proven]}
        if self.server.warming():
            body["warming"] = True  # agents may still be re-registering: retry an empty answer
        return _json(request, body)

    @app.route("/api/where-to-upload", methods=["GET"])
    def where_to_upload(self, request: IRequest) -> bytes:
        client = self._admit(request)
        size = _size(_arg(request, "size"))
        count = _count(_arg(request, "count", required=False))
        addresses = self.server.where_to_upload(size, _exclude(request), count)
        self._charge(request, client, [(a, size) for a in addresses])
        return _json(
            request,
            {"addresses": [str(a) for a in addresses], "replicas": self.server.replicas},
        )

    @app.route("/api/introduce-me", methods=["GET"])
    async def introduce_me(self, request: IRequest) -> bytes:
        client = self._admit(request)
        to = PeerAddress.parse(_arg(request, "to") or "")
        block = check_block_id(_arg(request, "hash") or "")
        size = _size(_arg(request, "size"))
        self._charge(request, client, [(to, size)])
        from_ = PeerAddress.parse(_arg(request, "from") or "")
        result = await self.server.introduce(to, from_, size, block, _local(request))
        return _json(request, result)

    @app.route("/api/introduce-many", methods=["GET"])
    async def introduce_many(self, request: IRequest) -> bytes:
        raw = request.args.get(b"i", [])
        client = self._admit(request, cost=max(1, min(len(raw), MAX_INTRODUCTIONS)))
        if not raw:
            raise BadRequest("missing parameter 'i'")
        if len(raw) > MAX_INTRODUCTIONS:
            raise BadRequest(f"at most {MAX_INTRODUCTIONS} introductions per request")
        from_ = PeerAddress.parse(_arg(request, "from") or "")
        items = []
        for value in raw:
            fields = value.decode("utf-8", "replace").split(",")
            if len(fields) != 3:
                raise BadRequest("each 'i' must be TO,HASH,SIZE")
            items.append((PeerAddress.parse(fields[0]), check_block_id(fields[1]), _size(fields[2])))
        self._charge(request, client, [(to, size) for to, _, size in items])
        answers = await self._introductions(from_, items, _local(request))
        body: dict[str, Any] = {"introductions": answers}
        if self.server.warming():
            body["warming"] = True  # a 404 or 503 among them may change within seconds
        return _json(request, body)

    async def _introductions(
        self, from_: PeerAddress | list[PeerAddress], items: list[tuple[PeerAddress, str, int]],
        client_local: PeerAddress | None = None,
    ) -> list[dict[str, Any]]:
        """Every item's introduction at once (item i for `from_[i]` if it is a list, whose
        first is the client); each answer is the introduction or its error. `client_local`
        is the client's local address (`local`), for the items introduced to the client."""
        sources = from_ if isinstance(from_, list) else [from_] * len(items)
        if isinstance(from_, list):  # a chain: only its first agent is introduced to the client
            locals_ = [client_local] + [None] * (len(items) - 1)
        else:
            locals_ = [client_local] * len(items)
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.server.introduce(to, src, size, block, local))
             for (to, block, size), src, local in zip(items, sources, locals_)],
            consumeErrors=True,
        )
        answers: list[dict[str, Any]] = []
        for ok, value in results:
            if ok:
                answers.append(value)
                continue
            failure: Any = value
            if isinstance(failure.value, DSSSError):
                answers.append({"error": str(failure.value), "status": failure.value.http_status})
            else:
                log.failure("unexpected error in an introduction", failure)
                answers.append({"error": "internal error", "status": 500})
        return answers

    @app.route("/api/upload-to", methods=["GET"])
    async def upload_to(self, request: IRequest) -> bytes:
        """where-to-upload and the introductions to the agents it picks, in one request.

        With `chain=1` the agents picked form a replication chain: the first one's introduction
        is for the client (`from`), each next one's for the agent before it, so that the client
        uploads once and each agent passes the part on (a chained UPLOAD). With `lan=1` as well,
        a hop between two agents behind one NAT may go across their LAN: that introduction is
        for the local address of the agent before, and the answer's `via` is the local address
        to pass the part to.

        With several `hash`es (the shares of an erasure-coded part) the server picks as many
        distinct agents and introduces hash i at agent i: one copy of each, never two on one
        agent."""
        replicas = self.server.replicas
        raw_copies = _arg(request, "copies", required=False)
        copies = replicas
        if raw_copies is not None:
            if not is_decimal(raw_copies) or len(raw_copies) > 3 or not 1 <= int(raw_copies) <= replicas:
                self._admit(request)
                raise BadRequest(f"copies must be a whole number from 1 to {replicas}")
            copies = int(raw_copies)
        # Several hashes (the shares of an erasure-coded part): an agent and an introduction each.
        given = len(request.args.get(b"hash", []))
        if given > MAX_COUNT:
            self._admit(request)
            raise BadRequest(f"at most {MAX_COUNT} hashes per request")
        if given > 1 and raw_copies is not None:
            self._admit(request)
            raise BadRequest("copies cannot be combined with more than one hash")
        client = self._admit(request, cost=1 + (given if given > 1 else copies))
        size = _size(_arg(request, "size"))
        hashes = _hashes(request)
        from_ = PeerAddress.parse(_arg(request, "from") or "")
        client_local = _local(request)
        chain = _arg(request, "chain", required=False)
        if chain not in (None, "0", "1"):
            raise BadRequest("chain must be 0 or 1")
        if len(hashes) > 1:
            if chain == "1":
                raise BadRequest("chain=1 cannot be combined with more than one hash")
            return await self._upload_shares(request, hashes, size, from_, client_local, client)
        lan = _arg(request, "lan", required=False)
        if lan not in (None, "0", "1"):
            raise BadRequest("lan must be 0 or 1")
        block = hashes[0]
        targets = self.server.where_to_upload(size, _exclude(request), copies)
        self._charge(request, client, [(t, size) for t in targets])
        sources: PeerAddress | list[PeerAddress] = from_
        vias: list[PeerAddress | None] = [None] * len(targets)
        if chain == "1":
            # With lan=1 the client passes each hop's `via` on, so agents behind one NAT that
            # reported their local addresses may pass the part across their LAN.
            local = self.server.registry.local_addresses(targets) if lan == "1" else {}
            if local and client_local is not None:
                local[from_] = client_local  # the chain starts across the client's LAN if it can
            ordered = chain_order(targets, local, start=from_)
            if chain_worth_trying(ordered, local):
                targets = ordered
                hops = hop_addresses(ordered, local)
                sources = [from_, *(src for src, _ in hops)]
                vias = [None, *(via for _, via in hops)]
            else:
                chain = None  # plain introductions: the client sends every copy itself
        answers = await self._introductions(sources, [(to, block, size) for to in targets], client_local)
        for to, via, answer in zip(targets, vias, answers):
            answer.setdefault("address", str(to))
            if via is not None and "error" not in answer:
                answer["via"] = str(via)
                self.server.stats["lan-hops"] += 1
        body: dict[str, Any] = {"introductions": answers, "replicas": replicas}
        if chain == "1":
            body["chain"] = True
        if self.server.warming():
            body["warming"] = True
        return _json(request, body)

    async def _upload_shares(
        self, request: IRequest, hashes: list[str], size: int, from_: PeerAddress,
        client_local: PeerAddress | None, client: str | None = None,
    ) -> bytes:
        """upload-to with several hashes: len(hashes) distinct agents from one placement, hash i
        introduced at agent i; fewer answers than hashes (the first ones) if fewer have room."""
        targets = self.server.where_to_upload(size, _exclude(request), len(hashes))
        self._charge(request, client, [(t, size) for t in targets[: len(hashes)]])
        items = [(to, block, size) for to, block in zip(targets, hashes)]
        answers = await self._introductions(from_, items, client_local)
        for (to, _, _), answer in zip(items, answers):
            answer.setdefault("address", str(to))
        body: dict[str, Any] = {"introductions": answers, "replicas": self.server.replicas}
        if self.server.warming():
            body["warming"] = True
        return _json(request, body)

    @app.route("/api/usage", methods=["GET"])
    def usage(self, request: IRequest) -> bytes:
        """The signed client's bytes leased (each replica counted, as live agents report them)
        and its quota (null: none)."""
        client = self._admit(request)
        if client is None:
            raise BadRequest("only a server started with --clients counts usage")
        quotas = self.server.quotas
        live = [r.agent_id for r in self.server.registry.live(self.server.now())]
        return _json(request, {"client": client, "lease-key": quotas.key_of.get(client),
                               "used": quotas.used(client, live, self.server.now()),
                               "quota": quotas.limit(client)})

    @app.route("/api/audit", methods=["GET"])
    async def audit(self, request: IRequest) -> bytes:
        """Audit named holders of parts now: `i=HASH,AGENTID` (may repeat, at most MAX_AUDITS).
        Each answer says whether that agent proved it holds the part (and its size)."""
        raw = request.args.get(b"i", [])
        self._admit(request, cost=1 + min(len(raw), MAX_AUDITS))
        if not raw:
            raise BadRequest("missing parameter 'i'")
        if len(raw) > MAX_AUDITS:
            raise BadRequest(f"at most {MAX_AUDITS} audits per request")
        items: list[tuple[str, str]] = []
        for value in raw:
            fields = value.decode("utf-8", "replace").split(",")
            if len(fields) != 2 or not _AGENT_ID.match(fields[1]):
                raise BadRequest("each 'i' must be HASH,AGENTID (an agent id is 64 hex digits)")
            items.append((check_block_id(fields[0]), fields[1]))
        if len(set(items)) != len(items):
            raise BadRequest("an item is given more than once")
        body: dict[str, Any] = {"results": await self.server.audit_claims(items)}
        if self.server.warming():
            body["warming"] = True  # an agent "not connected" may be re-registering: ask again
        return _json(request, body)

    @app.route("/api/info", methods=["GET"])
    def info(self, request: IRequest) -> bytes:
        return _json(request, self.server.info())

    def _admit_observer(self, request: IRequest) -> None:
        """`/`, `/api/status` and `/metrics` have a rate limit of their own per IP address."""
        peer = request.getClientAddress()
        host = peer.host if isinstance(peer, (IPv4Address, IPv6Address)) else "local"
        if not self.server.observe_limiter.allow(host, self.server.now()):
            raise RateLimited("too many status requests from your address; slow down")

    @app.route("/api/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        self._admit_observer(request)
        after = _arg(request, "after", required=False) or ""
        if after and not _AGENT_ID.match(after):
            raise BadRequest("after must be an agent id (64 lowercase hex digits)")
        limit_text = _arg(request, "limit", required=False)
        limit = STATUS_AGENTS
        if limit_text is not None:
            if not is_decimal(limit_text) or not 1 <= int(limit_text) <= STATUS_MAX_AGENTS:
                raise BadRequest(f"limit must be a number from 1 to {STATUS_MAX_AGENTS}")
            limit = int(limit_text)
        return _json(request, self.server.status(after, limit))

    @app.route("/", methods=["GET"])
    def status_page(self, request: IRequest) -> bytes:
        self._admit_observer(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        return render_page(self.server.status())

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        self._admit_observer(request)
        return render_metrics(self.server.metrics.registry, request)
