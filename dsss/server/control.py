# -*- test-case-name: tests.adapters.test_server_control -*-
"""The server's end of the persistent control connection with each agent."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any, Iterator, Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from dsss.budget import ConnectionBudget
from dsss.errors import AccessDenied, RemoteProtocolError, Unavailable
from dsss.lineproto import ControlLineProtocol
from dsss.server.connlimit import REFUSAL_LOG_INTERVAL, source_of
from twisted.internet import defer, task
from twisted.python.failure import Failure

from dsss.holdings import Holdings, path_of
from dsss.server.auditor import Auditor
from dsss.server.quotas import QuotaBook
from dsss.server.registry import AgentRecord, Registry, ReplayError
from dsss.server.reputation import Reputation
from dsss.server.settings import ControlSettings
from dsss.server.store import Store, StoredClaim
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
    @property
    def store(self) -> Store: ...
    @property
    def stats(self) -> dict[str, int]: ...
    @property
    def synced(self) -> set[str]: ...
    @property
    def syncing(self) -> set[str]: ...

    def agent_allowed(self, agent_id: str) -> bool: ...
    def lost_holders(self, blocks: list[str]) -> None: ...
    def when_loaded(self) -> defer.Deferred[None]: ...

    def agent_left(self, rec: AgentRecord, why: str) -> None: ...


MAX_PARTS_PER_AGENT = 4_000_000

SLICE = 500
"""Stored claims an agent's digest exchange handles per slice of reactor time."""


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
        # The digest exchange (DIGEST, RESEND, SYNCED): the claims the store kept for this
        # agent that it has not confirmed yet, by path, and those under a prefix it is resending.
        self._held: dict[str, StoredClaim] | None = None
        self._held_paths = Holdings()
        self._load_waiters: list[defer.Deferred[None]] = []
        self._exchange = defer.DeferredLock()
        self._unconfirmed: dict[str, StoredClaim] = {}

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
            self.server.syncing.discard(rec.agent_id)
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

    def handle_request(self, msg: wc.Request) -> "wc.Reply | defer.Deferred[wc.Reply | None] | None":
        if isinstance(msg, wc.Ping):
            return wc.Pong()
        if self.record is None:
            if not isinstance(msg, wc.Register):
                self.bad_input("REGISTER first", fatal=True, code="not-registered")
                return None
            # Registrations wait until the store has been read back (registration numbers).
            return self.server.when_loaded().addCallback(lambda _: self._register(msg))
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
            self.server.stats["have-entries"] += len(msg.blocks)
            conflicts = registry.have(rec, msg.blocks, msg.sizes)
            if self._held is not None:
                self._confirmed(rec, msg.blocks)
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
            self.server.lost_holders(registry.gone(self.record, msg.blocks))
            if self._held is not None:
                for block in msg.blocks:
                    self._forget_held(block)
            self._count_claims()
            return wc.Ok()
        # The exchange's steps run one after the other, each once the kept claims are read.
        if isinstance(msg, wc.Digest):
            return self._exchange.run(lambda: self._load_held().addCallback(lambda _: self._digest(msg)))
        if isinstance(msg, wc.Resend):
            return self._exchange.run(lambda: self._load_held().addCallback(lambda _: self._resend(msg.prefix)))
        if isinstance(msg, wc.Synced):
            return self._exchange.run(lambda: self._load_held().addCallback(lambda _: self._synced()))
        if isinstance(msg, wc.Space):
            registry.space(self.record, msg.capacity, msg.free)
            return wc.Ok()
        if isinstance(msg, wc.Collected):
            self.record.expired_bytes, self.record.collected_bytes = msg.expired, msg.collected
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

    # --- the digest exchange ---------------------------------------------------------------------

    def _load_held(self) -> defer.Deferred[None]:
        """Read the claims the store kept for this agent, once per connection (none from the
        memory store); those it has claimed again on this connection already are not held."""
        if self._held is not None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._load_waiters.append(waiter)
        if len(self._load_waiters) > 1:
            return waiter  # a read is under way
        assert self.record is not None
        rec = self.record
        self.server.syncing.add(rec.agent_id)
        reading: defer.Deferred[list[StoredClaim]] = (
            self.server.store.claims_of(rec.agent_id) if self.server.store.durable else defer.succeed([]))

        def loaded(claims: list[StoredClaim]) -> defer.Deferred[None]:
            def build() -> Iterator[None]:
                held = {}
                for n, claim in enumerate(claims, 1):
                    if claim.part not in rec.blocks:
                        path = path_of(claim.part)
                        held[path] = claim
                        self._held_paths.add_path(path, claim.part)
                    if n % SLICE == 0:
                        yield None
                self._held = held
                waiters, self._load_waiters = self._load_waiters, []
                for w in waiters:
                    w.callback(None)

            return self._in_slices(build())

        def failed(f: Failure) -> None:
            waiters, self._load_waiters = self._load_waiters, []
            for w in waiters:
                w.errback(Unavailable(f"the store cannot be read: {f.getErrorMessage()}"))

        reading.addCallbacks(loaded, failed)
        return waiter

    def _forget_held(self, block: str) -> None:
        assert self._held is not None
        path = path_of(block)
        self._held.pop(path, None)
        self._held_paths.discard_path(path)
        self._unconfirmed.pop(path, None)

    def _confirmed(self, rec: AgentRecord, blocks: tuple[str, ...]) -> None:
        """The agent claimed these again (HAVE): no longer held; a proof kept in the store for
        a part it is resending still counts."""
        assert self._held is not None
        restore = []
        for block in blocks:
            if block not in rec.blocks:
                continue  # refused (a size conflict)
            path = path_of(block)
            claim = self._unconfirmed.pop(path, None) or self._held.get(path)
            self._held.pop(path, None)
            self._held_paths.discard_path(path)
            if claim is not None and claim.proven_at is not None and block not in rec.proven:
                restore.append((block, claim.size, claim.size_proven, claim.proven_at))
        if restore:
            self.server.registry.restore(rec, restore)

    def _in_slices(self, work: Iterator[None]) -> defer.Deferred[None]:
        """Run `work`, a generator that yields between slices of SLICE claims: the first slice
        now, the rest a few per reactor turn (about 10 ms of them), so that a large agent's
        claims never hold the reactor for long."""
        try:
            next(work)
        except StopIteration:
            return defer.succeed(None)
        clock = self.server.clock
        cooperator = task.Cooperator(scheduler=lambda f: clock.callLater(0, f))
        return cooperator.coiterate(work).addCallback(lambda _: None)

    def _digest(self, msg: wc.Digest) -> defer.Deferred[wc.Reply | None]:
        """Compare the agent's digest with the held claims under its prefix: where a child
        matches, the held claims there are the agent's again; the others are named in DIFF."""
        assert self._held is not None
        prefix, depth = msg.prefix, len(msg.prefix)
        children: list[list[str]] = [[] for _ in range(16)]
        xors = [0] * 16
        answer: list[wc.Reply] = []

        def work() -> Iterator[None]:
            assert self._held is not None
            if prefix == "":
                ours = self._held_paths.digest("")  # kept up to date: no walk
            else:
                for n, (path, _part) in enumerate(self._held_paths.iter_under(prefix), 1):
                    child = int(path[depth], 16)
                    children[child].append(path)
                    xors[child] ^= int(path, 16)
                    if n % SLICE == 0:
                        yield None
                ours = tuple((len(children[i]), xors[i]) for i in range(16))
            differ = []
            done = 0
            for i in range(16):
                if ours[i] != msg.entries[i]:
                    differ.append(f"{i:x}" if ours[i][0] else f"{i:x}-")
                    continue
                if not ours[i][0]:
                    continue
                paths = list(self._held_paths.take_child(f"{i:x}")) if prefix == "" else children[i]
                for start in range(0, len(paths), SLICE):
                    rec = self.record
                    if rec is None:
                        answer.append(wc.Error("not-registered", "the registration is gone"))
                        return
                    claims = []
                    for path in paths[start:start + SLICE]:
                        claim = self._held.pop(path, None)
                        if prefix:
                            self._held_paths.discard_path(path)
                        if claim is not None:  # not withdrawn (GONE) meanwhile
                            claims.append(claim)
                    self.server.stats["claims-restored"] += len(claims)
                    self.server.registry.restore(
                        rec, [(c.part, c.size, c.size_proven, c.proven_at) for c in claims])
                    self.server.auditor.claimed(rec, [c.part for c in claims if c.proven_at is None])
                    self._count_claims()
                    done += len(claims)
                    if done >= SLICE:
                        done = 0
                        yield None
            answer.append(wc.Diff(tuple(differ)))

        if self.record is None:
            return defer.succeed(wc.Error("not-registered", "the registration is gone"))
        return self._in_slices(work()).addCallback(lambda _: answer[0])

    def _resend(self, prefix: str) -> wc.Reply:
        """The agent resends everything under `prefix`: what is held there waits for its HAVE
        and is withdrawn at SYNCED if it does not come."""
        assert self._held is not None
        for path in self._held_paths.under(prefix):
            self._unconfirmed[path] = self._held.pop(path)
            self._held_paths.discard_path(path)
        return wc.Ok()

    def _synced(self) -> wc.Reply:
        """The exchange is over: held claims it resent and did not claim again are withdrawn
        from the store. Claims under prefixes it never settled stay held (and stored)."""
        if self.record is None:
            return wc.Error("not-registered", "the registration is gone")
        agent_id = self.record.agent_id
        stale = [c.part for c in self._unconfirmed.values()]
        self._unconfirmed = {}
        if stale and self.server.store.durable:
            self.server.store.drop_claims(agent_id, stale).addCallbacks(
                self.server.lost_holders, lambda f: log.failure("withdrawing stale claims", f))
        self.server.syncing.discard(agent_id)
        self.server.synced.add(agent_id)
        log.info("agent {agent} confirmed its holdings by digest ({n} parts indexed, {stale} withdrawn)",
                 agent=agent_id[:16], n=len(self.record.blocks), stale=len(stale))
        return wc.Ok()

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
