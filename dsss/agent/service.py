# -*- test-case-name: tests.integration.test_network -*-
"""The storage agent: its domain operations and the service tree that runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

import dsss
from dsss.agent.control import ServerConnection, ServerConnectionFactory
from dsss.agent.identity import AgentIdentity
from dsss.agent.introductions import IntroductionTable
from dsss.agent.leasestore import LeaseStore
from dsss.agent.reservations import UploadPolicy
from dsss.agent.scrub import BUSY_WINDOW, ScrubPacer, Scrubber
from dsss.crypto.certs import make_certificate
from dsss import proofs
from dsss.errors import Busy, DSSSError, IntegrityError, NotFound, StorageFull
from dsss.leases import (
    BAD_RECORD,
    DEFAULT_GRACE,
    DEFAULT_HOLD,
    DEFAULT_KEEP,
    DEFAULT_SKEW,
    NOT_FOUND,
    LeaseError,
    LeaseRecord,
    LeaseTable,
    Outcome,
)
from dsss.model import UNSPECIFIED_HOSTS, PeerAddress, lan_address
from dsss.storage.blockstore import BlockStore
from dsss.wire import control as wc
from dsss.wire.datagram import DPing, DPong, DPunch, encode_datagram, parse_datagram

log = Logger()

# When introduced to a client, the agent sends PUNCH datagrams towards it at these delays (s),
# so that its NAT opens a mapping for the client's packets.
PUNCH_SCHEDULE = (0.0, 0.1, 0.3, 0.7, 1.5)
TICK = 0.1
"""Seconds between the agent's housekeeping ticks (pings, expiry, scrub)."""
MAX_AUDITS = 4
"""Audits (control channel and QUIC together) an agent answers at once; more are refused busy."""


def run_here(f: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
    """Run `f` now on this thread (tests with a driven clock); the service runs blocking reads
    on the reactor's thread pool instead."""
    return defer.maybeDeferred(f, *args)


@dataclass(frozen=True)
class AgentConfig:
    storage: str
    server_host: str = "127.0.0.1"
    server_port: int = 8471
    udp_host: str = "0.0.0.0"
    udp_port: int = 0
    # Local address the control connection leaves from (None: the system's choice).
    control_source: str | None = None
    capacity: int | None = None
    request_timeout: float = 10.0
    introduction_ttl: float = 60.0
    max_datagram_size: int = 1452
    metrics: str | None = None  # endpoint string for Prometheus /metrics
    # Bytes per second re-read by the background scrub (0: no scrubbing).
    scrub_rate: int = 8 * 1024 * 1024
    # What an upload in progress must keep to (dsss.agent.reservations).
    upload_policy: UploadPolicy = UploadPolicy()
    # Garbage collection (dsss/leases.py): blocks collected per second at most (0: never), the
    # clock-skew bound, the grace after a block's last change, how long an upload without a
    # lease is kept, and how long blocks stored before leases existed are kept.
    gc_rate: float = 10.0
    lease_skew: float = DEFAULT_SKEW
    gc_grace: float = DEFAULT_GRACE
    initial_hold: float = DEFAULT_HOLD
    legacy_hold: float = float(DEFAULT_KEEP)


class StorageAgent:
    """What an agent knows and does, independent of sockets."""

    def __init__(self, clock: Any, config: AgentConfig) -> None:
        self.clock = clock
        self.config = config
        self.version = dsss.__version__
        self.identity = AgentIdentity.load_or_create(config.storage)
        self.store = BlockStore(config.storage, capacity=config.capacity)
        self.introductions = IntroductionTable(ttl=config.introduction_ttl)
        self.connection: ServerConnection | None = None
        self.welcome: wc.Welcome | None = None
        self.public_address: PeerAddress | None = None
        self.quic: Any = None  # the QuicEndpoint, set by the service
        self._announced_ready = False
        self._last_ping = float("-inf")
        self._reported_space: tuple[int, int] | None = None
        self._last_space_report = float("-inf")
        self.scrubber = Scrubber(self.store, self.lost)
        self.replications = 0
        # Runs blocking store reads (an audit's leaf) off the reactor thread.
        self.run_blocking: Callable[..., defer.Deferred[Any]] = run_here
        self.audits_in_progress = 0
        self.audits_proven = 0
        self.audits_corrupt = 0
        self.leases = LeaseStore(config.storage, LeaseTable(skew=config.lease_skew, grace=config.gc_grace))
        self.leases.start(self.store.blocks(), self.lease_now(), config.legacy_hold)
        self.leases_applied = 0  # records that changed a lease (taken, renewed, released)
        self.leases_refused = 0  # records refused (forged, stale, too long, for absent parts)
        self.collected_parts = 0
        self.collected_bytes = 0
        self._reported_gc: tuple[int, int] | None = None  # (expired, collected) last told the server
        self._gc_budget = 0.0
        self._next_prune = float("-inf")
        # Bytes each owner's leases keep here, as last reported to the server (for its quotas),
        # whether leases changed since, and when they were last reported.
        self._reported_leases: dict[str, int] = {}
        self.leases_changed = True
        self._last_lease_report = float("-inf")

    # --- leases and collection -----------------------------------------------------------------

    def lease_now(self) -> float:
        """The time leases are judged by (unix seconds): the agent's clock."""
        return float(self.clock.seconds())

    def check_lease(self, record: LeaseRecord) -> None:
        """Raise LeaseError unless `record` may be applied (signed by its owner, not too long)."""
        why = self.leases.table.check(record, self.lease_now())
        if why is not None:
            self.leases_refused += 1
            raise LeaseError(f"the upload's lease is refused: {why}")

    def leased_upload(self, block: str, record: LeaseRecord | None) -> None:
        """A block was uploaded (or uploaded again): keep its lease, or hold it for a while."""
        now = self.lease_now()
        if record is None:
            self.leases.hold(block, now + self.config.initial_hold, now)
        else:
            outcome = self.leases.apply([record], now)[0]
            if outcome.status == "ok":
                self.leases_applied += 1
                self.leases_changed = True

    def take_leases(self, records: list[LeaseRecord | None]) -> list[Outcome]:
        """Apply a LEASE message's records (verified here); one outcome per record, in order."""
        now = self.lease_now()
        outcomes: list[Outcome | None] = []
        valid: list[LeaseRecord] = []
        for record in records:
            why = BAD_RECORD if record is None else None
            if record is not None and not self.store.has(record.block):
                why = NOT_FOUND
            if record is not None and why is None:
                why = self.leases.table.check(record, now)
            if why is None and record is not None:
                valid.append(record)
                outcomes.append(None)
            else:
                self.leases_refused += 1
                outcomes.append(Outcome(why or BAD_RECORD))
        applied = iter(self.leases.apply(valid, now))
        out = []
        for o in outcomes:
            if o is None:
                o = next(applied)
                if o.status == "ok":
                    self.leases_applied += 1
                    self.leases_changed = True
                else:
                    self.leases_refused += 1
            out.append(o)
        return out

    def held(self, block: str) -> list[LeaseRecord] | None:
        """The live leases on a stored block (None if it is not stored here)."""
        if not self.store.has(block):
            return None
        return self.leases.table.live_records(block, self.lease_now())

    def collect(self, elapsed: float) -> int:
        """Collect due blocks at no more than `gc_rate` per second (`elapsed` seconds since the
        last call); each collected block is deleted, forgotten and reported gone."""
        rate = self.config.gc_rate
        if rate <= 0:
            return 0
        self._gc_budget = min(self._gc_budget + rate * elapsed, max(1.0, rate))
        limit = int(self._gc_budget)
        if limit < 1:
            return 0
        now = self.lease_now()
        due = self.leases.table.due(now, limit, self.store.has)
        for block in due:
            freed = self.store.remove(block)
            self.leases.collected(block, now)
            self.collected_parts += 1
            self.collected_bytes += freed
            log.info("collected {block} ({size} bytes): no live lease", block=block[:16], size=freed)
        self._gc_budget -= len(due)
        if due:
            self.leases_changed = True
            if self.connection is not None:
                self.connection.report_gone(due)
            self.maybe_report_space(force=True)
        if now >= self._next_prune:
            self._next_prune = now + 60.0
            self.leases.prune(now)
        return len(due)

    def maybe_report_leases(self) -> None:
        """Report each owner's leased bytes to the server when they changed: within a second
        of a change, and every 30 s (leases also end by themselves)."""
        if self.connection is None or self.welcome is None:
            return
        now = self.clock.seconds()
        wait = 1.0 if self.leases_changed else 30.0
        if now - self._last_lease_report < wait:
            return
        self._last_lease_report = now
        self.leases_changed = False
        # Blocks lost since their leases were taken (quarantined) count for nothing.
        totals = self.leases.table.leased_by_owner(
            lambda b: self.store.size_of(b) if self.store.has(b) else 0, self.lease_now())
        changed = [(o, n) for o, n in totals.items() if self._reported_leases.get(o) != n]
        changed += [(o, 0) for o in self._reported_leases if o not in totals]
        self._reported_leases = totals
        if changed:
            self.connection.report_leased(sorted(changed))
        gc = (self.lease_totals()[1], self.collected_bytes)
        if gc != self._reported_gc:
            self._reported_gc = gc
            self.connection.report_collected(*gc)

    def lease_totals(self) -> tuple[int, int]:
        """Bytes stored here under a live lease (or hold), and bytes whose leases all ended
        (waiting to be collected)."""
        now = self.lease_now()
        table = self.leases.table
        leased = expired = 0
        for block in self.store.blocks():
            size = self.store.size_of(block)
            live = table.holds.get(block, float("-inf")) > now or bool(table.live_records(block, now))
            if live:
                leased += size
            else:
                expired += size
        return leased, expired

    # --- control channel -----------------------------------------------------------------------

    def registered(self, conn: ServerConnection, welcome: wc.Welcome) -> None:
        self.connection = conn
        self.welcome = welcome
        self._reported_leases = {}  # a new connection: report every owner again
        self._reported_gc = None
        self.leases_changed = True
        log.info("registered with the server as {agent}", agent=self.identity.agent_id)
        target = self.server_udp_address()
        if self.quic is not None and target is not None:
            # Clients that cannot reach us directly come through the server's relay.
            self.quic.trust_relay(target)
        self.ping_server()

    def local_address(self, control_host: str | None) -> PeerAddress | None:
        """Where we listen on our own network: the UDP socket's address, or if it is bound to
        every interface, its port at the address our control connection leaves from (the
        interface towards the server). None if neither is known."""
        if self.quic is None or self.quic.transport is None:
            return None  # no socket (yet)
        bound_host, port = self.quic.address[:2]
        host = bound_host if bound_host not in UNSPECIFIED_HOSTS else control_host
        return lan_address(host, port) if host else None

    def keepalive_interval(self) -> float:
        # The server's heartbeat, but never longer than 20 s: home NATs forget idle UDP
        # mappings after 30 s or more.
        hb = self.welcome.heartbeat if self.welcome else 1.0
        return min(hb, 20.0)

    def maybe_ping(self) -> None:
        if self.clock.seconds() - self._last_ping >= self.keepalive_interval():
            self.ping_server()

    def disconnected(self, conn: ServerConnection) -> None:
        if self.connection is conn:
            self.connection = None
            self.welcome = None
            log.info("control connection to the server lost")

    def introduce(self, client: PeerAddress, size: int, block: str,
                  local: PeerAddress | None = None) -> str:
        """A key for `client` (and, behind our NAT, for its `local` address on our LAN too),
        punching towards each."""
        if not self.store.has(block) and size > self.store.free:
            self.maybe_report_space(force=True)
            raise StorageFull(f"no room for {size} bytes")
        intro = self.introductions.issue(client, size, block, self.clock.seconds(), local)
        self.punch(client)
        if local is not None:
            self.punch(local)
        return intro.key

    def maybe_report_space(self, *, force: bool = False) -> None:
        """Tell the server our capacity and free space when they changed (at most once a
        heartbeat, or at once when forced: after running out of room, placement must stop
        choosing us)."""
        if self.connection is None or self.welcome is None:
            return
        now = self.clock.seconds()
        space = (self.store.capacity, min(self.store.free, self.store.capacity))
        if space == self._reported_space:
            return
        if not force and now - self._last_space_report < self.welcome.heartbeat:
            return
        self._reported_space = space
        self._last_space_report = now
        self.connection.report_space()

    def refused(self, err: Exception) -> None:
        if isinstance(err, StorageFull):
            self.maybe_report_space(force=True)

    def stored(self, block: str) -> Any:
        """Report a newly stored part; a Deferred that fires once the server has it indexed
        (or could not be told: it never fails)."""
        if self.connection is not None:
            return self.connection.report_have([block])
        return None

    def lost(self, block: str) -> None:
        if self.connection is not None:
            self.connection.report_gone([block])

    def audit(self, block: str, nonce: bytes) -> "defer.Deferred[tuple[int, bytes]]":
        """Prove that we hold `block` (dsss/proofs.py): fires with its size and the proof for
        the challenge `nonce`, read off the reactor thread (one leaf and its sibling hashes).

        Fails with NotFound if the part is not here, or if our copy turns out corrupt (then it
        is quarantined and reported GONE first); with Busy when MAX_AUDITS are in progress.
        """
        if not self.store.has(block):
            return defer.fail(NotFound("this agent does not store that part"))
        if self.audits_in_progress >= MAX_AUDITS:
            return defer.fail(Busy(f"{MAX_AUDITS} audits in progress; try again"))
        self.audits_in_progress += 1
        d = self.run_blocking(self.store.read_proof, block, nonce)

        def repair(f: Any) -> tuple[int, bytes]:
            # Damaged or missing on disk (rare): sorted out here, on the reactor thread, which
            # alone changes the store. Reads the whole part at most once.
            f.trap(proofs.ProofError)
            return self.store.proof(block, nonce)

        def corrupt(f: Any) -> None:
            f.trap(IntegrityError)
            self.audits_corrupt += 1
            self.lost(block)
            raise NotFound("this agent's copy of the part was corrupt; it was quarantined and is gone")

        def done(result: Any) -> Any:
            self.audits_in_progress -= 1
            if isinstance(result, tuple):
                self.audits_proven += 1
            return result

        d.addErrback(repair)
        d.addErrback(corrupt)
        d.addBoth(done)
        return d

    def replicate(self, msg: wc.Replicate) -> None:
        from twisted.internet import defer

        from dsss.agent.replicate import replicate

        self.replications += 1
        defer.ensureDeferred(replicate(self, msg)).addErrback(
            lambda f: log.failure("replication failed", f)
        )

    # --- UDP -----------------------------------------------------------------------------------

    def server_udp_address(self) -> tuple[str, int] | None:
        if self.welcome is None:
            return None
        return (self.config.server_host, self.welcome.udp_port)

    def ping_server(self) -> None:
        target = self.server_udp_address()
        if target is None or self.quic is None or self.welcome is None:
            return
        self._last_ping = self.clock.seconds()
        self.quic.send_control(encode_datagram(DPing(self.welcome.token)), target)

    def punch(self, client: PeerAddress) -> None:
        if self.quic is None:
            return
        data = encode_datagram(DPunch("agent"))
        for delay in PUNCH_SCHEDULE:
            self.clock.callLater(delay, self._send_punch, data, client.as_tuple())

    def _send_punch(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.quic is not None:
            self.quic.send_control(data, addr)

    def on_control(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse_datagram(data)
        except DSSSError:
            return
        if isinstance(msg, DPong) and addr == self.server_udp_address():
            if self.public_address != msg.observed:
                log.info("public UDP address is {addr}", addr=str(msg.observed))
            self.public_address = msg.observed
            if not self._announced_ready:
                self._announced_ready = True
                log.info(
                    "DSSS agent ready id={agent} udp={addr} parts={parts}",
                    agent=self.identity.agent_id,
                    addr=str(msg.observed),
                    parts=len(self.store),
                )


class AgentService(MultiService):
    def __init__(self, reactor: Any, config: AgentConfig) -> None:
        super().__init__()
        from dsss.agent.transfer import TransferHandler
        from dsss.quic import QuicEndpoint

        self.reactor = reactor
        self.agent = StorageAgent(reactor, config)
        self.agent.run_blocking = lambda f, *args: threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), f, *args
        )
        self.transfers = TransferHandler(self.agent, config.upload_policy)
        identity = make_certificate(self.agent.identity.seed)
        self.quic = QuicEndpoint(
            reactor,
            on_control=self.agent.on_control,
            server_identity=identity,
            on_stream=self.transfers.on_stream,
            max_datagram_size=config.max_datagram_size,
        )
        self.agent.quic = self.quic
        self.udp_port: Any = None
        bind = (config.control_source, 0) if config.control_source else None
        if ":" in config.server_host:
            endpoint: Any = TCP6ClientEndpoint(reactor, config.server_host, config.server_port,
                                               bindAddress=bind)
        else:
            endpoint = TCP4ClientEndpoint(reactor, config.server_host, config.server_port,
                                          bindAddress=bind)
        self.client_service = ClientService(
            endpoint,
            ServerConnectionFactory(self.agent),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=10.0),
            clock=reactor,
        )
        self.client_service.setServiceParent(self)
        if config.metrics:
            from dsss.metrics import AgentMetrics

            self.metrics = AgentMetrics(self.agent, self.transfers)
            self.metrics.service(reactor, config.metrics).setServiceParent(self)
        self._keepalive = LoopingCall(self._tick)
        self._keepalive.clock = reactor
        self._scrub_pacer = ScrubPacer(config.scrub_rate)

    def _tick(self) -> None:
        agent = self.agent
        agent.maybe_ping()
        agent.introductions.expire(self.reactor.seconds())
        agent.maybe_report_space()
        self.transfers.expire(self.reactor.seconds())
        try:
            agent.collect(TICK)
            agent.maybe_report_leases()
        except Exception:
            # Never let lease housekeeping stop the tick (pings, expiry, scrub).
            log.failure("lease housekeeping failed")
        busy = self.reactor.seconds() - self.transfers.last_active < BUSY_WINDOW
        if self._scrub_pacer.may_read(TICK, busy):
            self._scrub_pacer.spent(agent.scrubber.step(1))

    def startService(self) -> None:
        config = self.agent.config
        self.udp_port = self.quic.listen(self.reactor, config.udp_host, config.udp_port)
        super().startService()
        self._keepalive.start(TICK, now=False)

    def stopService(self) -> Any:
        if self._keepalive.running:
            self._keepalive.stop()
        d = defer.maybeDeferred(super().stopService)

        def close_udp(_: Any) -> Any:
            self.udp_port = None
            return defer.maybeDeferred(self.quic.close)

        d.addBoth(close_udp)
        return d


def make_agent_service(reactor: Any, config: AgentConfig) -> Service:
    return AgentService(reactor, config)
