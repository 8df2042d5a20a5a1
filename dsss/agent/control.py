# -*- test-case-name: tests.adapters.test_agent_control -*-
"""The agent's end of the control connection: register, report, answer the server."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet import defer
from twisted.logger import Logger

from dsss.agent.identity import AgentIdentity
from dsss.errors import DSSSError, RemoteProtocolError
from dsss.holdings import MAX_PREFIX, Holdings
from dsss.lineproto import ControlLineProtocol
from dsss.model import PeerAddress
from dsss.storage.blockstore import BlockStore
from dsss.wire import control as wc

log = Logger()

RESEND_AT = 2048
"""Under a prefix that differs, an agent holding more parts than this asks for the digest one
level down instead of resending them all (down to MAX_PREFIX digits)."""
DIGEST_TIMEOUT = 120.0
"""Seconds the server may take to answer a DIGEST (it reads the agent's stored claims first)."""


class _Timeouts(Protocol):
    @property
    def request_timeout(self) -> float: ...


class ControlledAgent(Protocol):
    """What the control connection uses of the agent it serves (dsss.agent.service.StorageAgent)."""

    @property
    def clock(self) -> Any: ...
    @property
    def config(self) -> _Timeouts: ...
    @property
    def identity(self) -> AgentIdentity: ...
    @property
    def store(self) -> BlockStore: ...
    @property
    def version(self) -> str: ...

    def registered(self, conn: ServerConnection, welcome: wc.Welcome) -> None: ...
    def disconnected(self, conn: ServerConnection) -> None: ...
    def local_address(self, control_host: str | None) -> PeerAddress | None: ...
    def introduce(self, client: PeerAddress, size: int, block: str,
                  local: PeerAddress | None = None) -> str: ...
    def replicate(self, msg: wc.Replicate) -> None: ...
    def audit(self, block: str, nonce: bytes) -> Any: ...


class ServerConnection(ControlLineProtocol):
    """The control connection to the discovery server, seen from the agent."""

    def __init__(self, agent: ControlledAgent) -> None:
        super().__init__(agent.clock)
        self.agent = agent
        self.session: str | None = None
        self.welcome: wc.Welcome | None = None
        self._pinger: LoopingCall | None = None

    def trusted(self) -> bool:
        return self.welcome is not None

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self.agent.disconnected(self)

    def handle_request(self, msg: wc.Request) -> "wc.Reply | defer.Deferred[wc.Reply | None] | None":
        if isinstance(msg, wc.Hi):
            if self.session is not None:
                raise RemoteProtocolError("second greeting")
            self.session = msg.session
            self._register()
            return None
        if isinstance(msg, wc.Ping):
            return wc.Pong()
        if self.welcome is None:
            raise RemoteProtocolError("request before registration")
        if isinstance(msg, wc.WhoHas):
            return wc.Bit(self.agent.store.has(msg.block))
        if isinstance(msg, wc.IntroductionRequest):
            key = self.agent.introduce(msg.address, msg.size, msg.block, msg.local)
            return wc.IntroKey(key)
        if isinstance(msg, wc.Audit):
            # Answered when the proof is read (off the reactor thread); replies keep their order.
            return self.agent.audit(msg.block, msg.nonce).addCallback(lambda r: wc.Proof(*r))
        if isinstance(msg, wc.Replicate):
            # Accepted at once (replies keep their order); the copy runs in the background and
            # the receiving agent's HAVE tells the server it arrived.
            self.agent.replicate(msg)
            return wc.Ok()
        raise RemoteProtocolError(f"{type(msg).__name__} is not sent by servers")

    def _register(self) -> None:
        assert self.session is not None
        agent = self.agent
        store = agent.store
        unsigned = wc.Register(
            agent_id=agent.identity.agent_id,
            seq=agent.identity.next_seq(),
            capacity=store.capacity,
            free=min(store.free, store.capacity),
            version=agent.version,
            signature="",
        )
        signature = agent.identity.sign(unsigned.signed_bytes(self.session))
        msg = wc.Register(**{**unsigned.__dict__, "signature": signature})
        d = self.request(msg, agent.config.request_timeout)
        d.addCallbacks(self._registered, self._failed)

    def _registered(self, reply: wc.Reply) -> None:
        if not isinstance(reply, wc.Welcome):
            log.error("registration refused: {reply}", reply=reply)
            self.close()
            return
        self.welcome = reply
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.clock
        self._pinger.start(reply.heartbeat, now=False)
        self.agent.registered(self, reply)
        self.sync_holdings()
        self.report_local()

    def _failed(self, f: Any) -> None:
        if f.check(DSSSError) is None:
            log.failure("registration failed", f)
        self.close()

    def _ping(self) -> None:
        assert self.welcome is not None
        d = self.request(wc.Ping(), 3 * self.welcome.heartbeat)

        def lost(f: Any) -> None:
            if not self.closed:
                log.warn("server did not answer PING; reconnecting")
                self.close()

        d.addErrback(lost)

    # --- reports -------------------------------------------------------------------------------

    def _notify(self, msg: wc.Request) -> defer.Deferred[None]:
        """Send `msg`; the Deferred fires (never fails) once the server answered or gave up."""
        d = self.request(msg, self.agent.config.request_timeout)

        def check(reply: wc.Reply) -> None:
            if isinstance(reply, wc.Error):
                log.warn("server refused {msg}: {reply}", msg=type(msg).__name__, reply=reply)

        return d.addCallbacks(check, lambda f: None)

    def report_have(self, blocks: list[str]) -> defer.Deferred[None]:
        """Tell the server we store `blocks`; fires once it has taken them in (or failed)."""
        if self.welcome is None:
            return defer.succeed(None)
        store = self.agent.store
        sent = [self._notify(wc.Have(group, tuple(store.size_of(b) for b in group)))
                for group in wc.chunked([b for b in blocks if store.has(b)])]
        self.report_space()
        return defer.gatherResults(sent).addCallback(lambda _: None)

    def sync_holdings(self) -> defer.Deferred[None]:
        """Tell the server what we store: a digest first (docs/protocol.md, DIGEST), and only the
        parts under the prefixes where its view differs. A server that does not know DIGEST
        (or cannot answer it now) gets every part in HAVE lines, as before. Fires when done."""
        d = defer.ensureDeferred(self._sync(Holdings(self.agent.store.blocks())))
        d.addErrback(lambda f: None if f.check(DSSSError) else log.failure("reporting our parts failed", f))
        return d

    async def _sync(self, holdings: Holdings) -> None:
        try:
            reply = await self.request(wc.Digest("", holdings.digest("")), DIGEST_TIMEOUT)
        except DSSSError:
            reply = None
        if not isinstance(reply, wc.Diff):
            if self.closed:
                return
            log.info("the server did not take a digest ({reply}): reporting every part", reply=reply)
            await self.report_have(list(holdings.under("").values()))
            return
        pending: list[tuple[str, tuple[str, ...]]] = [("", reply.digits)]
        resent = 0
        while pending:
            prefix, digits = pending.pop()
            for entry in digits:
                child = prefix + entry[0]
                server_has_some = not entry.endswith("-")
                if server_has_some and holdings.count(child) > RESEND_AT and len(child) < MAX_PREFIX:
                    deeper = await self.request(wc.Digest(child, holdings.digest(child)), DIGEST_TIMEOUT)
                    if isinstance(deeper, wc.Diff):
                        pending.append((child, deeper.digits))
                        continue
                answer = await self.request(wc.Resend(child), self.agent.config.request_timeout)
                if not isinstance(answer, wc.Ok):
                    raise RemoteProtocolError(f"the server refused RESEND: {answer}")
                parts = list(holdings.under(child).values())
                resent += len(parts)
                await self.report_have(parts)
        await self.request(wc.Synced(), self.agent.config.request_timeout)
        log.info("holdings confirmed with the server by digest ({resent} of {n} parts resent)",
                 resent=resent, n=holdings.count(""))

    def report_gone(self, blocks: list[str]) -> None:
        if self.welcome is None:
            return
        for group in wc.chunked(blocks):
            self._notify(wc.Gone(group))
        self.report_space()

    def report_local(self) -> None:
        """Tell the server where we listen on our own network: agents behind the same NAT
        then pass parts to us across the LAN. A server older than LOCAL refuses it; nothing
        else changes then."""
        host = getattr(self.transport.getHost(), "host", None) if self.transport else None
        address = self.agent.local_address(host)
        if address is None:
            return
        d = self.request(wc.Local(address), self.agent.config.request_timeout)

        def answered(reply: wc.Reply) -> None:
            if isinstance(reply, wc.Error):
                log.info("the server does not take our local address ({reply}): no LAN chain hops",
                         reply=reply)

        d.addCallbacks(answered, lambda f: None)

    def report_leased(self, owners: list[tuple[str, int]]) -> None:
        """Tell the server the bytes each owner's leases keep here (for its quotas)."""
        if self.welcome is None:
            return
        for start in range(0, len(owners), wc.MAX_HASHES_PER_LINE):
            self._notify(wc.Leased(tuple(owners[start : start + wc.MAX_HASHES_PER_LINE])))

    def report_collected(self, expired: int, collected: int) -> None:
        """Tell the server what garbage collection has waiting and has done (its status page)."""
        if self.welcome is None:
            return
        self._notify(wc.Collected(expired, collected))

    def report_space(self) -> None:
        if self.welcome is None:
            return
        store = self.agent.store
        self._notify(wc.Space(store.capacity, min(store.free, store.capacity)))


class ServerConnectionFactory(Factory):
    def __init__(self, agent: ControlledAgent) -> None:
        self.agent = agent

    def buildProtocol(self, addr: Any) -> ServerConnection:
        p = ServerConnection(self.agent)
        p.factory = self
        return p
