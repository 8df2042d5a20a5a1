# -*- test-case-name: tests.adapters.test_discovery_client -*-
"""A typed client for the discovery server's HTTP API, over an injectable treq HTTPClient."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import treq
from twisted.internet import defer
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from nacl.public import PrivateKey, PublicKey

from dsss.client.discoveryerrors import (
    Retryable,
    ServerUnreachable,
    answer_error,
    connect_failure_words,
    not_http_words,
    status_error,
)
from dsss.clientauth import sign_request
from dsss.errors import BadRequest, DSSSError, NotFound, RemoteProtocolError, Timeout
from dsss.model import PeerAddress, check_block_id

MAX_RESPONSE = 1024 * 1024
# Introductions asked for in the same reactor turn go out as one /api/introduce-many request
# of at most this many (the server's bound).
MAX_INTRODUCTIONS = 16
# Agents one /api/where-to-upload asks for, and shares one /api/upload-to places (the server's
# bound): more shares go in several requests.
MAX_COUNT = 64
# (part, agent) pairs in one /api/audit request (the server's bound).
MAX_AUDITS = 64
_PLACEMENTS = frozenset({"/api/where-to-upload", "/api/upload-to", "/api/introduce-me", "/api/introduce-many"})
"""The requests that place bytes: a restricted server with quotas wants them to name lease-key."""


@dataclass(frozen=True)
class Introduction:
    key: str
    agent_id: str
    address: PeerAddress
    # Issued for the agent before this one in a replication chain, not for the client: only
    # good as a hop of a chained upload.
    chained: bool = False
    # The agent's address on a LAN: for a chain hop, where the agent before passes the part
    # to; for a client behind the agent's NAT, where the client reaches it (then its key is
    # good from the client's local address too).
    via: PeerAddress | None = None


@dataclass(frozen=True)
class AuditResult:
    """The server's audit of one copy: whether `agent` proved it holds `block` (and its size)."""

    block: str
    agent: str
    proven: bool
    size: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class ServerInfo:
    replicas: int
    udp_port: int
    version: str
    agents: int | None = None  # live agents now; None from a server that does not say
    warming: bool = False  # just started: agents may still be registering


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
    def __init__(
        self,
        base_url: str,
        *,
        reactor: Any,
        http: Any = None,
        timeout: float = 15.0,
        retry_for: float = 30.0,
        key: PrivateKey | None = None,
        first_wait: float = 2.0,
        on_wait: Any = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"server URL must look like http://HOST:PORT, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.reactor = reactor
        self.http = http if http is not None else treq
        self.timeout = timeout
        self.retry_for = retry_for
        # How long a server never reached in this session is retried (it may be starting or
        # restarting); `on_wait(message)` is called once when the first try fails.
        self.first_wait = first_wait
        self.on_wait = on_wait
        self._reached = False
        # With a key, requests are signed for servers that admit only listed clients.
        self.key = key
        # This user's lease public key (hex), named in placements on a restricted server.
        self.lease_key: str | None = None
        self._server_key: PublicKey | None = None
        # Introductions waiting for the end of this reactor turn, to be asked for together;
        # False once the server has shown it has no /api/introduce-many (an older server).
        self._pending: list[tuple[PeerAddress, str, int, PeerAddress, defer.Deferred[Introduction]]] = []
        self._flush_call: Any = None
        self.batch = True
        # False once the server has shown it has no /api/upload-to (an older server).
        self.combined_upload = True
        # False once the server has shown its /api/upload-to takes one hash only (an older one).
        self.share_upload = True
        # False once the server has shown it has no /api/audit (an older one).
        self.audits = True
        # Our UDP address on our own network (`PeerNetwork.local_address`), sent as `local`
        # beside `from`: agents behind our NAT are then reached across the LAN (`via`).
        self.local_address: PeerAddress | None = None

    def _source(self, from_: PeerAddress) -> list[tuple[str, str]]:
        """The `from` parameter, and `local` when we know our local address."""
        params = [("from", str(from_))]
        if self.local_address is not None:
            params.append(("local", str(self.local_address)))
        return params

    async def _get(self, path: str, params: dict[str, Any] | list[tuple[str, str]]) -> Any:
        """GET with retries: a server that is down or restarting (connection refused, timeouts,
        or 404/503 answered with Retry-After while its agents re-register) is retried with
        backoff for up to `retry_for` seconds; any other answer is final."""
        # A server never reached in this session is reported quickly; one that answered before
        # and went away (a restart) is waited for.
        first = not self._reached
        patience = self.retry_for if self._reached else self.first_wait
        deadline = self.reactor.seconds() + patience
        delay = 0.25
        told = False
        while True:
            try:
                return await self._get_once(path, params)
            except Retryable as e:
                if self.reactor.seconds() + delay > deadline:
                    if first and patience > 0 and isinstance(e.error, ServerUnreachable):
                        raise ServerUnreachable(f"{e.error} (tried for {patience:g} s)") from None
                    raise e.error from None
                if first and not told and self.on_wait is not None and patience > 1:
                    told = True
                    self.on_wait(f"{e.error}; trying again for up to {patience:g} s")
                await deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 2.0)

    async def _get_once(self, path: str, params: dict[str, Any] | list[tuple[str, str]]) -> Any:
        if self.lease_key is not None and self._server_key is not None and path in _PLACEMENTS:
            # A restricted server counts quotas by the lease key its placements name.
            items = list(params.items()) if isinstance(params, dict) else list(params)
            params = [*items, ("lease-key", self.lease_key)]
        uri = path + ("?" + urlencode(params) if params else "")
        url = f"{self.base_url}{uri}"
        headers = {}
        if self.key is not None and self._server_key is not None:
            headers = sign_request(self.key, self._server_key, "GET", uri, self.reactor.seconds())
        try:
            response = await self.http.get(url, headers=headers, reactor=self.reactor, timeout=self.timeout)
            collector = _Collector(MAX_RESPONSE)
            await treq.collect(response, collector)
        except (ConnectError, DNSLookupError) as e:
            raise Retryable(ServerUnreachable(
                f"cannot reach the discovery server: {connect_failure_words(e, self.base_url)}"
            )) from None
        except defer.CancelledError:
            raise Retryable(
                Timeout(f"the discovery server at {self.base_url} did not answer in time")
            ) from None
        except (ResponseFailed, ResponseNeverReceived) as e:
            reasons = getattr(e, "reasons", None) or []
            detail = " ".join(repr(r.value) for r in reasons if hasattr(r, "value")) or repr(e)
            raise Retryable(ServerUnreachable(not_http_words(self.base_url, Exception(detail)))) from None
        self._reached = True
        body = b"".join(collector.chunks)
        try:
            doc = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise RemoteProtocolError(
                f"{self.base_url} answered {path} with something that is not JSON "
                f"(HTTP {response.code}): is it a DSSS discovery server?"
            ) from None
        if response.code != 200:
            error = answer_error(response.code, doc)
            if response.headers.hasHeader(b"retry-after"):
                raise Retryable(error)
            if response.code == 401 and self.key is not None and path != "/api/info":
                # The server wants signed requests, or restarted with a new key: learn its key
                # and try again.
                stale = self._server_key
                await self.info()
                if self._server_key is not None and self._server_key != stale:
                    raise Retryable(error)
            raise error
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
            agents = doc.get("agents")
            info = ServerInfo(int(doc["replicas"]), int(doc["udp-port"]), str(doc["version"]),
                              agents if isinstance(agents, int) and not isinstance(agents, bool) else None,
                              doc.get("warming") is True)
            # Sign only for a server that admits listed clients: elsewhere a signature would
            # just tell the server (and any observer) who we are.
            if doc.get("clients-restricted") and "public-key" in doc:
                self._server_key = PublicKey(bytes.fromhex(doc["public-key"]))
            else:
                self._server_key = None
        except (KeyError, TypeError, ValueError):
            raise RemoteProtocolError("bad /api/info answer") from None
        return info

    async def usage(self) -> dict[str, Any]:
        """This client's bytes leased and quota on a restricted server (`/api/usage`)."""
        doc = await self._get("/api/usage", [])
        if not isinstance(doc, dict) or not isinstance(doc.get("used"), int):
            raise RemoteProtocolError("bad /api/usage answer")
        return doc

    async def who_has(self, block: str) -> list[PeerAddress]:
        """The agents that say they hold `block` (claims: fine to download from, every
        download is checked)."""
        return (await self.locate(block))[0]

    async def locate(self, block: str) -> tuple[list[PeerAddress], list[PeerAddress] | None]:
        """Who has `block`: the agents that say so (claims), and those of them that proved it
        to the server recently (copies that count); None for the latter from a server that
        does not audit."""
        check_block_id(block)
        deadline = self.reactor.seconds() + self.retry_for
        while True:
            doc = await self._get("/api/who-has", {"q": block})
            addresses = self._addresses(doc)
            # Right after a server restart the location index is still filling up: an empty
            # answer is not final until the server says it is warm.
            if addresses or not doc.get("warming") or self.reactor.seconds() > deadline:
                break
            await deferLater(self.reactor, 0.5, lambda: None)
        raw = doc.get("proven")
        if raw is None:
            return addresses, None
        if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
            raise RemoteProtocolError("server answer has a bad list of proven holders")
        return addresses, [PeerAddress.parse(a) for a in raw]

    async def audit(self, items: list[tuple[str, str]]) -> list[AuditResult] | None:
        """Have the server audit each (part, agent id) now: one result per item, in order.
        None from a server without /api/audit (an older one, which cannot say). Right after a
        server restart (the answer says `warming`), items whose agent is not connected yet are
        asked again for up to `retry_for` seconds: the agent may still be re-registering."""
        if not self.audits:
            return None
        out: list[AuditResult] = []
        for start in range(0, len(items), MAX_AUDITS):
            group = items[start : start + MAX_AUDITS]
            for block, _ in group:
                check_block_id(block)
            results: dict[tuple[str, str], AuditResult] = {}
            todo = list(group)
            deadline = self.reactor.seconds() + self.retry_for
            while todo:
                try:
                    doc = await self._get("/api/audit", [("i", f"{b},{a}") for b, a in todo])
                except NotFound:
                    self.audits = False  # only a server without /api/audit answers it with 404
                    return None
                for item, result in zip(todo, self._audit_results(doc, todo)):
                    results[item] = result
                if not doc.get("warming") or self.reactor.seconds() > deadline:
                    break
                todo = [i for i in todo if results[i].error == "agent not connected"]
                if todo:
                    await deferLater(self.reactor, 0.5, lambda: None)
            out += [results[i] for i in group]
        return out

    @staticmethod
    def _audit_results(doc: dict[str, Any], items: list[tuple[str, str]]) -> list[AuditResult]:
        raw = doc.get("results")
        if not isinstance(raw, list) or len(raw) != len(items):
            raise RemoteProtocolError("bad /api/audit answer")
        out = []
        for (block, agent), r in zip(items, raw):
            if not isinstance(r, dict) or r.get("hash") != block or r.get("agent") != agent:
                raise RemoteProtocolError("bad /api/audit answer")
            size = r.get("size")
            error = r.get("error")
            out.append(AuditResult(block, agent, r.get("proven") is True,
                                   size if isinstance(size, int) else None,
                                   error if isinstance(error, str) else None))
        return out

    async def where_to_upload(
        self, size: int, exclude: list[PeerAddress] | None = None, count: int | None = None
    ) -> list[PeerAddress]:
        """Up to `count` distinct agents (default: the server's replica count, at most
        MAX_COUNT) with room for `size` bytes, none in `exclude`. A server older than `count`
        ignores it and proposes at most its replica count."""
        params = [("size", str(size))]
        if exclude:
            params.append(("exclude", ",".join(str(a) for a in exclude)))
        if count is not None:
            if not 1 <= count <= MAX_COUNT:
                raise BadRequest(f"count must be from 1 to {MAX_COUNT}")
            params.append(("count", str(count)))
        return self._addresses(await self._get("/api/where-to-upload", params))

    async def upload_to(
        self, block: str, size: int, from_: PeerAddress, *, copies: int,
        exclude: list[PeerAddress] | None = None, chain: bool = False,
    ) -> list[tuple[PeerAddress, Introduction | DSSSError]] | None:
        """Where to upload `block` (`copies` agents at most, none in `exclude`) with an
        introduction to each, in one request: for each agent picked, its introduction or the
        error it gave. None if the server has no /api/upload-to (then ask where_to_upload and
        introduce_me instead).

        With `chain`, the agents form a replication chain (each introduction after the first
        is for the agent before it; see `PeerNetwork.upload`) and the answer's introductions
        say so (`Introduction.chained`); a server that does not chain gives plain ones."""
        if not self.combined_upload:
            return None
        params = [("size", str(size)), ("hash", block), *self._source(from_), ("copies", str(copies))]
        if exclude:
            params.append(("exclude", ",".join(str(a) for a in exclude)))
        if chain:
            # lan=1: we pass each hop's `via` on (agents behind one NAT chain across their LAN).
            params += [("chain", "1"), ("lan", "1")]
        try:
            doc = await self._get("/api/upload-to", params)
        except NotFound:
            # Only a server without /api/upload-to answers it with 404 (an agent that is gone
            # is an error inside the answer).
            self.combined_upload = False
            return None
        return self._upload_answers(doc, chained=chain and doc.get("chain") is True)

    async def upload_shares(
        self, blocks: list[str], size: int, from_: PeerAddress,
        exclude: list[PeerAddress] | None = None,
    ) -> list[tuple[PeerAddress, Introduction | DSSSError]] | None:
        """Where to upload each of `blocks` (the shares of an erasure-coded part, all of `size`
        bytes), each on an agent of its own, none in `exclude`, with an introduction to each:
        for block i (in order), its agent and its introduction or the error it gave. Fewer
        answers than blocks (for the first ones) when fewer agents have room. None if the
        server has no /api/upload-to, or one that takes a single hash (then ask
        where_to_upload with `count` and introduce_me instead).

        More than MAX_COUNT blocks are asked for in several requests, each excluding the agents
        the earlier ones picked."""
        for b in blocks:
            check_block_id(b)
        if len(set(blocks)) != len(blocks):
            raise BadRequest("a share is given more than once")
        if not self.combined_upload or not self.share_upload:
            return None
        out: list[tuple[PeerAddress, Introduction | DSSSError]] = []
        avoid = list(exclude or [])
        for start in range(0, len(blocks), MAX_COUNT):
            group = blocks[start : start + MAX_COUNT]
            params = [("size", str(size)), *(("hash", b) for b in group), *self._source(from_)]
            if len(group) == 1:
                params.append(("copies", "1"))  # one hash alone: one agent, as for any hash
            if avoid:
                params.append(("exclude", ",".join(str(a) for a in avoid)))
            try:
                doc = await self._get("/api/upload-to", params)
            except NotFound:
                # Only a server without /api/upload-to answers it with 404.
                self.combined_upload = False
                return None
            except BadRequest as e:
                if len(group) > 1 and "'hash' given more than once" in str(e):
                    self.share_upload = False  # an older server: one hash per request
                    return None
                raise
            answers = self._upload_answers(doc, chained=False)
            if len(answers) > len(group):
                raise RemoteProtocolError("bad /api/upload-to answer")
            out += answers
            if len(answers) < len(group):
                break  # no more agents with room
            avoid += [a for a, _ in answers]
        return out

    def _upload_answers(
        self, doc: dict[str, Any], *, chained: bool
    ) -> list[tuple[PeerAddress, Introduction | DSSSError]]:
        answers = doc.get("introductions")
        if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
            raise RemoteProtocolError("bad /api/upload-to answer")
        out: list[tuple[PeerAddress, Introduction | DSSSError]] = []
        for i, answer in enumerate(answers):
            address = answer.get("address")
            if not isinstance(address, str):
                raise RemoteProtocolError("bad /api/upload-to answer")
            if "error" in answer:
                status = answer.get("status")
                out.append((PeerAddress.parse(address), status_error(status, answer["error"])))
            else:
                intro = self._introduction(answer, "/api/upload-to")
                if chained and i > 0:
                    intro = Introduction(intro.key, intro.agent_id, intro.address, chained=True,
                                         via=intro.via)
                out.append((PeerAddress.parse(address), intro))
        return out

    async def introduce_me(
        self, to: PeerAddress, block: str, size: int, from_: PeerAddress
    ) -> Introduction:
        """An introduction key for `block` at the agent `to`. Those asked for in the same
        reactor turn (the replicas of one block, blocks of files in flight) travel together."""
        if not self.batch:
            return await self._introduce_one(to, block, size, from_)
        d: defer.Deferred[Introduction] = defer.Deferred()
        self._pending.append((to, block, size, from_, d))
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)
        return await d

    def _flush(self) -> None:
        self._flush_call = None
        pending, self._pending = self._pending, []
        groups: dict[PeerAddress, list[Any]] = {}
        for item in pending:
            groups.setdefault(item[3], []).append(item)
        for items in groups.values():
            for start in range(0, len(items), MAX_INTRODUCTIONS):
                defer.ensureDeferred(self._introduce_batch(items[start : start + MAX_INTRODUCTIONS]))

    async def _introduce_batch(self, items: list[Any]) -> None:
        async def single(item: Any) -> None:
            to, block, size, from_, d = item
            try:
                d.callback(await self._introduce_one(to, block, size, from_))
            except BaseException:
                d.errback()

        if len(items) == 1 or not self.batch:
            for item in items:
                await single(item)
            return
        params = self._source(items[0][3])
        params += [("i", f"{to},{block},{size}") for to, block, size, _, _ in items]
        try:
            doc = await self._get("/api/introduce-many", params)
            answers = doc.get("introductions")
            if not isinstance(answers, list) or len(answers) != len(items):
                raise RemoteProtocolError("bad /api/introduce-many answer")
        except NotFound:
            # A server without /api/introduce-many: ask one at a time from now on.
            self.batch = False
            for item in items:
                defer.ensureDeferred(single(item))
            return
        except BaseException:
            failure = Failure()
            for *_, d in items:
                d.errback(failure)
            return
        for item, answer in zip(items, answers):
            d = item[4]
            if not isinstance(answer, dict):
                d.errback(RemoteProtocolError("bad /api/introduce-many answer"))
            elif "error" in answer:
                status = answer.get("status")
                if doc.get("warming") and status in (404, 503):
                    # Not final while the server warms up: ask again alone, with retries.
                    defer.ensureDeferred(single(item))
                    continue
                d.errback(status_error(status, answer["error"]))
            else:
                try:
                    d.callback(self._introduction(answer, "/api/introduce-many"))
                except RemoteProtocolError as e:
                    d.errback(e)

    async def _introduce_one(
        self, to: PeerAddress, block: str, size: int, from_: PeerAddress
    ) -> Introduction:
        doc = await self._get(
            "/api/introduce-me",
            [("to", str(to)), ("hash", block), ("size", str(size)), *self._source(from_)],
        )
        return self._introduction(doc, "/api/introduce-me")

    @staticmethod
    def _via(answer: dict[str, Any]) -> PeerAddress | None:
        via = answer.get("via")
        if via is None:
            return None
        try:
            return PeerAddress.parse(via)
        except DSSSError:
            raise RemoteProtocolError("bad via address in the server's answer") from None

    @staticmethod
    def _introduction(doc: dict[str, Any], path: str) -> Introduction:
        key, agent, address = doc.get("introduction-key"), doc.get("agent"), doc.get("address")
        if not isinstance(key, str) or not isinstance(agent, str) or not isinstance(address, str):
            raise RemoteProtocolError(f"bad {path} answer")
        try:
            bytes.fromhex(agent)
        except ValueError:
            raise RemoteProtocolError("bad agent id in introduction") from None
        return Introduction(key, agent, PeerAddress.parse(address), via=DiscoveryClient._via(doc))
