# -*- test-case-name: tests.adapters.test_server_control -*-
"""The server's end of the persistent control connection with each agent."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any, Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from dsss.budget import ConnectionBudget
from dsss.errors import AccessDenied, RemoteProtocolError
from dsss.lineproto import ControlLineProtocol
from dsss.server.connlimit import REFUSAL_LOG_INTERVAL, source_of
from dsss.server.auditor import Auditor
from dsss.server.quotas import QuotaBook
from dsss.server.registry import AgentRecord, Registry, ReplayError
from dsss.server.reputation import Reputation
from dsss.server.settings import ControlSettings
from dsss.wire import control as wc

log = Logger()


class ControlServer(Protocol):
    """What agents' control connections use of the server (dsss.server.service.DiscoveryServer)."""

    @property
    def clock(self) -> Any: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def connections(self) -> set[AgentConnection]: ...
    @property
    def heartbeat(self) -> float: ...
    @property
    def udp_port(self) -> int: ...
    @property
    def control_budget(self) -> ConnectionBudget: ...
    @property
    def pending_budget(self) -> ConnectionBudget: ...
    @property
    def agent_budget(self) -> ConnectionBudget: ...

    @property
    def config(self) -> ControlSettings: ...
    @property
    def claims_by_network(self) -> dict[str, int]: ...
    @property
    def auditor(self) -> Auditor: ...
    @property
    def reputation(self) -> Reputation: ...

    @property
    def quotas(self) -> QuotaBook: ...

    def agent_allowed(self, agent_id: str) -> bool: ...

    def agent_left(self, rec: AgentRecord, why: str) -> None: ...


MAX_PARTS_PER_AGENT = 4_000_000


class AgentConnection(ControlLineProtocol):
    """One agent's control connection, seen from the server."""

    def __init__(self, server: ControlServer) -> None:
        super().__init__(server.clock)
        self.server = server
        self.session = secrets.token_hex(16)
        self.record: AgentRecord | None = None
        self.peer = "?"
        # The source IP this connection is counted against in the server's control budgets
        # (set by the factory), and whether it now counts as a registered agent there.
        self.peer_host: str | None = None
        self.opened_at = server.clock.seconds()  # again once connected
        self.counted_as_agent = False
        # What this connection's agent counts for in the server's claims per network.
        self._network: str | None = None
        self._claims_counted = 0

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.opened_at = self.clock.seconds()
        self.server.connections.add(self)
        self.send(wc.Hi(self.session))

    def connectionLost(self, reason: object = None) -> None:
        super().connectionLost(reason)  # type: ignore[arg-type]
        self.server.connections.discard(self)
        self._uncount_claims()
        if self.peer_host is not None:
            self.server.control_budget.release(self.peer_host)
            if self.counted_as_agent:
                self.server.agent_budget.release(self.peer_host)
            else:
                self.server.pending_budget.release(self.peer_host)
            self.peer_host = None
        rec = self.server.registry.unregister(self)
        if rec is not None:
            self.server.auditor.left(rec)
            self.server.agent_left(rec, "disconnected")
            log.info("agent {agent} disconnected", agent=rec.agent_id[:16])

    @property
    def network(self) -> str | None:
        """The network this connection comes from (IPv4 /24, IPv6 /48), for the claims bound."""
        if self._network is None and self.peer_host not in (None, "local"):
            try:
                prefix = 24 if ipaddress.ip_address(self.peer_host).version == 4 else 48
                self._network = str(ipaddress.ip_network(f"{self.peer_host}/{prefix}", strict=False))
            except ValueError:
                return None
        return self._network

    def _count_claims(self) -> None:
        """Bring the server's count of claims from this connection's network up to date."""
        if self.record is None or self.network is None:
            return
        now_held = len(self.record.blocks)
        counts = self.server.claims_by_network
        counts[self.network] = counts.get(self.network, 0) + now_held - self._claims_counted
        self._claims_counted = now_held

    def _uncount_claims(self) -> None:
        if self.network is None or not self._claims_counted:
            return
        counts = self.server.claims_by_network
        left = counts.get(self.network, 0) - self._claims_counted
        if left > 0:
            counts[self.network] = left
        else:
            counts.pop(self.network, None)
        self._claims_counted = 0

    def trusted(self) -> bool:
        return self.record is not None

    def heard(self) -> None:
        if self.record is not None:
            self.server.registry.heard_tcp(self.record, self.clock.seconds())

    def handle_request(self, msg: wc.Request) -> wc.Reply | None:
        if isinstance(msg, wc.Ping):
            return wc.Pong()
        if self.record is None:
            if not isinstance(msg, wc.Register):
                self.bad_input("REGISTER first", fatal=True, code="not-registered")
                return None
            return self._register(msg)
        if isinstance(msg, wc.Register):
            raise RemoteProtocolError("already registered on this connection")
        registry = self.server.registry
        if isinstance(msg, wc.Have):
            if len(self.record.blocks) + len(msg.blocks) > MAX_PARTS_PER_AGENT:
                # Bounds the location index: one agent cannot make the server grow forever.
                return wc.Error("too-many", f"at most {MAX_PARTS_PER_AGENT} parts per agent are indexed")
            self._count_claims()
            limit = self.server.config.claims_per_network
            if (self.server.config.allowed_agents is None and self.network is not None
                    and self.server.claims_by_network.get(self.network, 0) + len(msg.blocks) > limit):
                # Across identities: agents on one network cannot make the server index more.
                return wc.Error("too-many", f"at most {limit} parts are indexed for agents on {self.network}")
            rec = self.record
            conflicts = registry.have(rec, msg.blocks, msg.sizes)
            self._count_claims()
            if conflicts:
                # One part, one size: a claim against a proven size is a strike, nothing more.
                sizes = dict(zip(msg.blocks, msg.sizes or ()))
                self.server.auditor.size_conflicts(rec, conflicts, sizes)
                if self.record is None or self.closed:
                    return None  # disqualified: the connection is closing
            self.server.auditor.claimed(rec, [b for b in msg.blocks if b not in conflicts])
            if conflicts:
                return wc.Error("size-conflict", f"{len(conflicts)} of these parts have another, proven size")
            return wc.Ok()
        if isinstance(msg, wc.Gone):
            registry.gone(self.record, msg.blocks)
            self._count_claims()
            return wc.Ok()
        if isinstance(msg, wc.Space):
            registry.space(self.record, msg.capacity, msg.free)
            return wc.Ok()
        if isinstance(msg, wc.Leased):
            for owner, leased in msg.owners:
                self.server.quotas.report(self.record.agent_id, owner, leased)
            return wc.Ok()
        if isinstance(msg, wc.Local):
            # Used only for chain hops between agents at one public address (dsss.server.chains).
            self.record.local = msg.address
            return wc.Ok()
        raise RemoteProtocolError(f"{type(msg).__name__} is not sent by agents")

    def _register(self, msg: wc.Register) -> wc.Reply | None:
        try:
            VerifyKey(bytes.fromhex(msg.agent_id)).verify(
                msg.signed_bytes(self.session), bytes.fromhex(msg.signature)
            )
        except (BadSignatureError, ValueError):
            self.bad_input("registration signature does not verify", fatal=True, code="denied")
            return None
        if not self.server.agent_allowed(msg.agent_id):
            self.bad_input("this agent is not allowed to join", fatal=True, code="denied")
            return None
        if self.server.reputation.is_disqualified(msg.agent_id):
            # Disqualified agents stay out for as long as the server runs, whatever they say.
            self.bad_input("this agent is disqualified: it failed its audits", fatal=True, code="disqualified")
            return None
        if self.peer_host is not None and not self.counted_as_agent:
            if not self.server.agent_budget.admit(self.peer_host):
                self.bad_input(
                    f"too many agents registered from {self.peer_host} "
                    f"(at most {self.server.agent_budget.per_source})",
                    fatal=True,
                    code="denied",
                )
                return None
            self.server.pending_budget.release(self.peer_host)
            self.counted_as_agent = True
        try:
            rec, old = self.server.registry.register(
                agent_id=msg.agent_id,
                seq=msg.seq,
                capacity=msg.capacity,
                free=min(msg.free, msg.capacity),
                version=msg.version,
                handle=self,
                now=self.clock.seconds(),
            )
        except ReplayError as e:
            self.bad_input(str(e), fatal=True, code="replay")
            return None
        except AccessDenied as e:  # pragma: no cover - future policies
            self.bad_input(str(e), fatal=True, code="denied")
            return None
        self.record = rec
        if old is not None and old is not self:
            old.close()
        self.server.auditor.joined(rec)
        log.info(
            "agent {agent} registered from {peer} (capacity {capacity}, free {free})",
            agent=msg.agent_id[:16],
            peer=self.peer,
            capacity=msg.capacity,
            free=msg.free,
        )
        return wc.Welcome(rec.token, self.server.heartbeat, self.server.udp_port)


MAX_UNREGISTERED_PER_IP = 32
"""Control connections from one IP address that have not registered yet."""


class AgentConnectionFactory(Factory):
    """Builds AgentConnections within the server's control budgets: all control connections,
    those not registered yet per source IP (a flood cannot crowd out real agents), and
    registered agents per source IP (checked at registration). Beyond them a new connection is
    closed at once."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self._last_refusal_log = float("-inf")

    def buildProtocol(self, addr: object) -> AgentConnection | None:
        host = source_of(addr)
        server = self.server
        if not server.control_budget.admit(host):
            self._refused(host)
            return None
        if not server.pending_budget.admit(host):
            server.control_budget.release(host)
            self._refused(host)
            return None
        p = AgentConnection(self.server)
        p.peer_host = host
        p.factory = self
        return p

    def _refused(self, host: str) -> None:
        now = self.server.clock.seconds()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            log.warn("refusing control connections from {host}: too many", host=host)
            self._last_refusal_log = now
