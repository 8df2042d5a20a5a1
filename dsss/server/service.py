# -*- test-case-name: tests.integration.test_network -*-
"""The discovery server: its domain operations and the service tree that runs it."""

from __future__ import annotations

import heapq
import random
import secrets
from collections import OrderedDict
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.server import Site

import dsss
from nacl.public import PrivateKey

from dsss.clientauth import RequestVerifier
from dsss.endpoints import EndpointService, UDPService, where
from dsss.ratelimit import RateLimiter
from dsss.server.chains import lan_hop
from dsss.server.relay import RelayTable
from dsss.server.repair import Repairer
from dsss.errors import DSSSError, NotFound, Timeout, Unavailable
from dsss.metrics import LAG_PERIOD, ServerMetrics
from dsss.model import PeerAddress
from dsss.budget import ConnectionBudget
from dsss.server.api import BoundedRequest, DiscoveryAPI
from dsss.server.config import ServerConfig
from dsss.server.connlimit import BudgetedFactory
from dsss.server.status_page import STATUS_AGENTS, STATUS_RATE
from dsss.server.control import MAX_UNREGISTERED_PER_IP, AgentConnection, AgentConnectionFactory
from dsss.server.placement import REFRESH, Placer
from dsss.server.audit import Verdict
from dsss.server.auditor import AUDIT_TICK, Auditor
from dsss.server.quotas import OpenBound, QuotaBook
from dsss.server.journal import StoreJournal
from dsss.server.registry import AgentRecord, Registry
from dsss.server.store import Store
from dsss.server.storespec import open_store
from dsss.server.reputation import Reputation
from dsss.server.udp import DiscoveryDatagramProtocol
from dsss.wire import control as wc

log = Logger()

DRAIN_BATCH = 5_000
"""Claims of departed agents taken out of the index per DRAIN_TICK (a few milliseconds' work)."""
DRAIN_TICK = 0.1

# How long the server honours an introduction key for relaying: the agents' key lifetime.
INTRODUCTION_TTL = 60.0
MAX_ISSUED = 200_000
# /api/audit answers with a pass at most this old instead of auditing again.
RECENT_PROOF = 5.0
DEPARTED_MEMORY = 3600.0
"""Seconds an agent that left is still shown (as down) on the status page."""
MAX_DEPARTED = 1000
"""Most departed agents remembered for the status page; the oldest are forgotten first."""


class DiscoveryServer:
    """What the server knows and does, independent of how it listens."""

    def __init__(self, clock: Any, config: ServerConfig, rng: random.Random | None = None,
                 store: Store | None = None) -> None:
        self.clock = clock
        self.config = config
        self.replicas = config.replicas
        self.heartbeat = config.heartbeat
        self.udp_port = config.udp_port
        self.store: Store = store if store is not None else open_store(config.store, clock)
        self.journal = StoreJournal(self.store) if self.store.durable else None
        self.registry = Registry(config.heartbeat, journal=self.journal)
        # This server's name in the store (the owner of the repair batches it takes).
        self.owner = secrets.token_hex(8)
        # Until `load` has read the store back: registrations wait, lookups answer 503.
        self.loaded = not self.store.durable
        self._waiting_for_load: list[defer.Deferred[None]] = []
        # Agents that held claims when the store was read back, and those that have since
        # confirmed them (SYNCED) or are doing so: warming ends when all are back.
        self.expected: set[str] = set()
        self.synced: set[str] = set()
        self.syncing: set[str] = set()
        self.reputation = Reputation()
        self.placer = Placer(config.distinct_networks, self.reputation, rng=rng)
        self.auditor = Auditor(self, rate=config.audit_rate, freshness=config.proof_freshness)
        self.connections: set[AgentConnection] = set()
        self.claims_by_network: dict[str, int] = {}  # parts indexed per source network
        # Separate budgets for the two TCP ports, so that a flood of one cannot take the other's
        # descriptors: HTTP connections; control connections in all, not yet registered per
        # source, and registered agents per source.
        self.http_budget = ConnectionBudget(config.http_connections, config.http_connections_per_ip)
        self.control_budget = ConnectionBudget(config.agent_connections, config.agent_connections)
        self.pending_budget = ConnectionBudget(config.agent_connections, MAX_UNREGISTERED_PER_IP)
        self.agent_budget = ConnectionBudget(config.agent_connections, config.agents_per_ip)
        self.started_at = clock.seconds()
        # The server's own Curve25519 key, against which listed clients sign their requests.
        self.box_key = PrivateKey.generate()
        self.verifier = (
            RequestVerifier(self.box_key, config.allowed_clients)
            if config.allowed_clients is not None
            else None
        )
        self.quotas = QuotaBook(config.quota, config.client_quotas)
        self.open_bound = (OpenBound(config.open_quota)
                           if config.open_quota is not None and self.verifier is None else None)
        self.http_limiter = RateLimiter(rate=config.http_rate, burst=2 * config.http_rate)
        # `/`, `/api/status` and `/metrics`: limited apart from the API, per IP address.
        self.observe_limiter = RateLimiter(rate=STATUS_RATE, burst=4 * STATUS_RATE)
        self.relays = RelayTable(config.relay_limit)
        self.repairer = (Repairer(self, config.repair_after, queue=self.store, owner=self.owner)
                         if config.repair_after > 0 else None)
        # Introduction keys this server handed out: (client, agent address, expiry). A key
        # authorizes relaying between exactly that client and that agent.
        self.issued: OrderedDict[str, tuple[PeerAddress, PeerAddress, float]] = OrderedDict()
        self.stats: dict[str, int] = {
            "who-has": 0,
            "where-to-upload": 0,
            "introductions": 0,
            "introduction-failures": 0,
            "lan-hops": 0,  # chain hops introduced across a LAN (see dsss.server.chains)
            "lan-introductions": 0,  # clients introduced to an agent across their LAN
            "have-entries": 0,  # parts named in agents' HAVE lines
            "claims-restored": 0,  # stored claims agents confirmed by digest (not sent again)
        }
        self.metrics = ServerMetrics(self)
        # Agents that left (timed out, disconnected; not the disqualified): on the status page as down
        # until they register again, for DEPARTED_MEMORY seconds, at most MAX_DEPARTED of them.
        self.departed: OrderedDict[str, tuple[AgentRecord, float, str]] = OrderedDict()

    def warming(self) -> bool:
        """True while answers such as "nobody has this part" are not yet final: the store is
        being read back or cannot be reached, or agents may still be re-registering after a
        (re)start. With a durable store the server knows which agents held claims: warming ends
        as soon as each has confirmed its holdings (SYNCED), and lasts while any that came back
        is still doing so; an agent that has not come back within the liveness bound is not
        waited for. With the memory store it lasts the liveness bound (agents reconnect within
        a few seconds and report what they store right after registering)."""
        if not self.loaded or not self.store.healthy:
            return True
        young = self.now() - self.started_at < max(5.0, 3 * self.heartbeat)
        if not self.store.durable:
            return young
        waiting = self.expected - self.synced
        if not waiting:
            return False
        return young or not waiting.isdisjoint(self.syncing)

    async def load(self) -> None:
        """Open the store and read back what it keeps: identities' registration numbers,
        disqualifications, and which agents held claims. Waits out an unreachable database."""
        await self.store.open()
        if self.store.durable:
            self.registry.load_identities(await self.store.load_identities())
            for agent_id, record in (await self.store.load_reputation()).items():
                if record.get("disqualified"):
                    self.reputation.disqualify(agent_id, float(record.get("at", 0.0)))
            self.expected = set(await self.store.agents_with_claims())
        self.loaded = True
        self.started_at = self.now()
        waiting, self._waiting_for_load = self._waiting_for_load, []
        for d in waiting:
            d.callback(None)
        log.info("the store ({store}) is ready: {n} agents held claims", store=self.store_kind(),
                 n=len(self.expected))

    def when_loaded(self) -> defer.Deferred[None]:
        if self.loaded:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting_for_load.append(d)
        return d

    def store_kind(self) -> str:
        spec = self.config.store
        return spec.split(":", 1)[0] if spec != "memory" else "memory"

    def lost_holders(self, blocks: list[str]) -> None:
        """These parts lost a holder (GONE, a failed audit): the repairer looks at them soon."""
        if blocks and self.repairer is not None:
            self.repairer.suspect(blocks)

    def agent_allowed(self, agent_id: str) -> bool:
        allowed = self.config.allowed_agents
        return allowed is None or agent_id in allowed

    def now(self) -> float:
        return self.clock.seconds()

    # --- queries -------------------------------------------------------------------------------

    async def who_has(self, block: str) -> list[PeerAddress]:
        """Ask only the agents the location index names, keep those that confirm in time."""
        claimed, _proven = await self.locate(block)
        return claimed

    async def locate(self, block: str) -> tuple[list[PeerAddress], list[PeerAddress]]:
        """Who has `block`: the agents the location index names that confirm in time (claims),
        and those of them that proved the part within the proof freshness (replicas)."""
        self.stats["who-has"] += 1
        candidates = self.registry.candidates(block, self.now())
        if not candidates:
            if not self.loaded or not self.store.healthy:
                # What the store knows cannot be read: "nobody" might be wrong.
                raise Unavailable("the server's store cannot be reached just now; retry shortly")
            self.metrics.asked_who_has(block=block, holders=0, now=self.now())
            return [], []
        results = await defer.DeferredList(
            [self._ask(rec, block) for rec in candidates], consumeErrors=True
        )
        addresses = []
        for ok, value in results:
            if ok and value is not None:
                addresses.append(value)
        now = self.now()
        fresh = {r.address for r in self.registry.proven_holders(block, now, self.config.proof_freshness)}
        proven = [a for a in addresses if a in fresh]
        self.metrics.asked_who_has(block=block, holders=len(addresses), now=now)
        return addresses, proven

    def _ask(self, rec: AgentRecord, block: str) -> defer.Deferred[PeerAddress | None]:
        conn: AgentConnection = rec.handle
        d = conn.request(wc.WhoHas(block), self.config.query_timeout)

        def answered(reply: wc.Reply) -> PeerAddress | None:
            if isinstance(reply, wc.Bit) and reply.value:
                if self.registry.is_live(rec, self.now()) and rec.address is not None:
                    self.auditor.claimed(rec, [block])  # a "yes" is a claim: audited soon
                    return rec.address
                return None
            if isinstance(reply, wc.Bit):
                self.lost_holders(self.registry.gone(rec, [block]))
            return None

        def failed(f: Any) -> None:
            f.trap(DSSSError)
            return None

        return d.addCallbacks(answered, failed)

    def where_to_upload(
        self, size: int, exclude: list[PeerAddress], count: int | None = None
    ) -> list[PeerAddress]:
        """Up to `count` (default: the replica count) live agents with room for `size` on
        distinct networks, none in `exclude` or on its network (dsss.server.placement);
        Unavailable (or its TooFewNetworks) if there is none."""
        self.stats["where-to-upload"] += 1
        chosen = self.placer.place(self.registry, size, self.replicas if count is None else count,
                                   self.now(), exclude)
        return [r.address for r in chosen if r.address is not None]

    def drain_index(self) -> None:
        """From a timer: take a batch of departed agents' claims out of the index; the parts
        that lost a holder go to the repairer first."""
        touched = self.registry.drain(DRAIN_BATCH)
        if touched and self.repairer is not None:
            self.repairer.suspect(touched)

    def refresh_placement(self) -> None:
        """From a timer: rebuild placement's candidate table when it is due."""
        self.placer.refresh(self.registry, self.now())

    async def introduce(
        self, to: PeerAddress, client: PeerAddress, size: int, block: str,
        client_local: PeerAddress | None = None,
    ) -> dict[str, Any]:
        """Ask the agent at `to` for an introduction key for `client`; counted in metrics.

        With `client_local` (the client's address on its own network) and an agent behind the
        client's NAT that told us its local address, the key is good from the client's local
        address too, and the answer's `via` is the agent's local address: they meet across
        their LAN (a NAT seldom lets two hosts behind it reach each other through it)."""
        started = self.now()
        error: str | None = "error"
        try:
            result = await self._introduce(to, client, size, block, client_local)
            error = None
            return result
        except DSSSError as e:
            error = e.code
            raise
        finally:
            self.metrics.introduced(
                block=block, agent=str(to), size=size, seconds=self.now() - started,
                now=self.now(), error=error,
            )

    async def _introduce(
        self, to: PeerAddress, client: PeerAddress, size: int, block: str,
        client_local: PeerAddress | None = None,
    ) -> dict[str, Any]:
        rec = self.registry.by_address(to)
        if rec is None or not self.registry.is_live(rec, self.now()):
            raise NotFound(f"no live agent at {to}")
        conn: AgentConnection = rec.handle
        local = via = None
        if (client_local is not None and client_local != client and rec.local is not None
                and lan_hop(client, to, {client: client_local, to: rec.local})):
            # Only an agent that sent LOCAL (and so knows this form) is asked with `local`.
            local, via = client_local, rec.local
        try:
            reply = await conn.request(
                wc.IntroductionRequest(client, size, block, local), self.config.query_timeout
            )
        except Timeout:
            self.stats["introduction-failures"] += 1
            raise Timeout(f"agent at {to} did not answer the introduction in time") from None
        except DSSSError as e:
            self.stats["introduction-failures"] += 1
            raise Unavailable(f"agent at {to} is unreachable: {e}") from None
        if isinstance(reply, wc.Error):
            self.stats["introduction-failures"] += 1
            err = Unavailable(f"agent at {to} refused: {reply.code} {reply.text}")
            raise err
        if not isinstance(reply, wc.IntroKey):
            self.stats["introduction-failures"] += 1
            raise Unavailable(f"agent at {to} sent an unexpected reply")
        self.stats["introductions"] += 1
        if rec.address is not None:
            self._remember_key(reply.key, client, rec.address)
        answer = {
            "introduction-key": reply.key,
            "agent": rec.agent_id,
            "address": str(rec.address),
        }
        if via is not None:
            answer["via"] = str(via)
            self.stats["lan-introductions"] += 1
        return answer

    def _remember_key(self, key: str, client: PeerAddress, agent: PeerAddress) -> None:
        now = self.now()
        self.issued[key] = (client, agent, now + INTRODUCTION_TTL)
        while self.issued:
            oldest = next(iter(self.issued.values()))
            if len(self.issued) <= MAX_ISSUED and oldest[2] >= now:
                break
            self.issued.popitem(last=False)

    def authorize_relay(self, key: str, client: PeerAddress) -> PeerAddress | None:
        """Open the relay between `client` and the agent an unexpired key of ours was issued
        for, if the key was issued to this very client address."""
        entry = self.issued.get(key)
        now = self.now()
        if entry is None or entry[0] != client or entry[2] < now:
            return None
        self.relays.authorize(client, entry[1], now)
        return entry[1]

    async def audit_claims(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Audit each (part, agent id) now, or take a pass of the last RECENT_PROOF seconds;
        one answer per item: whether the agent proved it holds the part, and its size."""

        async def one(block: str, agent_id: str) -> dict[str, Any]:
            answer: dict[str, Any] = {"hash": block, "agent": agent_id, "proven": False, "size": None}
            rec = self.registry.get(agent_id)
            now = self.now()
            if rec is None or not self.registry.is_live(rec, now):
                why = "disqualified" if self.reputation.is_disqualified(agent_id) else "not connected"
                answer["error"] = f"agent {why}"
                return answer
            at = rec.proven.get(block)
            if at is not None and now - at <= RECENT_PROOF:
                answer.update(proven=True, size=self.registry.size_of(block))
                return answer
            outcome = await self.auditor.audit_now(rec, block)
            if outcome.verdict is Verdict.PASSED:
                answer.update(proven=True, size=outcome.size)
            else:
                answer["error"] = outcome.reason
            return answer

        return list(await defer.gatherResults(
            [defer.ensureDeferred(one(b, a)) for b, a in items], consumeErrors=True))

    def disqualify(self, rec: AgentRecord, reason: str) -> None:
        """Drop an agent that failed its audits: its claims go (its parts are repaired), it gets
        no placements, and it may not register again while the server runs."""
        self.reputation.disqualify(rec.agent_id, self.now())
        if self.store.durable:
            # Its stored claims go too; the parts others hold are queued for repair.
            self.store.put_reputation(rec.agent_id, {"disqualified": True, "at": self.now()})
            self.store.drop_agent(rec.agent_id).addCallbacks(
                self.lost_holders, lambda f: log.failure("dropping a disqualified agent's claims", f))
        self.auditor.stats["disqualified"] += 1
        log.warn("agent {agent} is disqualified: {reason}", agent=rec.agent_id[:16], reason=reason)
        if self.registry.unregister(rec.handle) is not None:
            self.auditor.left(rec)
        rec.handle.close()

    def agent_left(self, rec: AgentRecord, why: str) -> None:
        """Remember an agent that left, for the status page."""
        self.departed[rec.agent_id] = (rec, self.now(), why)
        self.departed.move_to_end(rec.agent_id)
        while len(self.departed) > MAX_DEPARTED:
            self.departed.popitem(last=False)

    def _departed_now(self, now: float) -> list[tuple[AgentRecord, float, str]]:
        """The departed agents still remembered that have not registered again."""
        for agent_id, (_, at, _why) in list(self.departed.items()):
            if now - at > DEPARTED_MEMORY or self.registry.get(agent_id) is not None:
                del self.departed[agent_id]
        return list(self.departed.values())

    def info(self) -> dict[str, Any]:
        return {
            "version": dsss.__version__,
            "replicas": self.replicas,
            "udp-port": self.udp_port,
            "heartbeat": self.heartbeat,
            "warming": self.warming(),
            "agents": len(self.registry.live(self.now())),
            "store": self.store_kind(),
            "public-key": bytes(self.box_key.public_key).hex(),
            "clients-restricted": self.verifier is not None,
        }

    def status(self, after: str = "", limit: int = STATUS_AGENTS) -> dict[str, Any]:
        """The status document: totals over every agent (a pass over the agents, no more), and
        one page of at most `limit` agents in id order, those after `after` (`next` continues)."""
        now = self.now()
        records = self.registry.all()
        live = [r for r in records if self.registry.is_live(r, now)]
        departed = {rec.agent_id: (at, why) for rec, at, why in self._departed_now(now)}
        everyone = [*records, *(rec for rec, _, _ in self.departed.values())]
        page = heapq.nsmallest(limit + 1, (r for r in everyone if r.agent_id > after), key=lambda r: r.agent_id)
        more = len(page) > limit
        agents = []
        for rec in page[:limit]:
            summary = rec.summary(now, self.heartbeat)
            gone = departed.get(rec.agent_id) if self.registry.get(rec.agent_id) is not rec else None
            summary["live"] = gone is None and self.registry.is_live(rec, now)
            if gone is not None:
                summary["left"], summary["left-at"] = gone[1], round(gone[0], 3)
            relayed = rec.address is not None and self.relays.recently_relayed(rec.address, now)
            summary["reached"] = "relayed" if relayed else "direct"
            record = self.reputation.get(rec.agent_id)
            if record is not None:
                summary["audits"] = record.to_dict()
            agents.append(summary)
        return {
            "server": {
                "version": dsss.__version__,
                "time": round(now, 3),
                "replicas": self.replicas,
                "heartbeat": self.heartbeat,
            },
            "agents": agents,
            "next": agents[-1]["id"] if more else None,
            "totals": {
                "agents": len(records),
                "live": len(live),
                "departed": len(departed),
                "capacity": sum(r.capacity for r in live),
                "free": sum(r.free for r in live),
                "used": sum(max(0, r.capacity - r.free) for r in live),
                "parts": sum(len(r.blocks) for r in live),
                "parts-indexed": self.registry.counts()["indexed-parts"],
                "leased": self.quotas.leased(r.agent_id for r in live),
                "expired": sum(r.expired_bytes for r in live),
                "collected": sum(r.collected_bytes for r in records),
            },
            "activity": {**self.stats, **self.metrics.activity(),
                         "relay-dropped-bytes": self.relays.dropped_bytes},
            "repair": self.repairer.status() if self.repairer is not None else None,
            "audit": self.auditor.status(),
        }

    # --- housekeeping --------------------------------------------------------------------------

    def tick(self) -> None:
        """Every heartbeat: reach the store, ping agents over TCP, drop those not heard within
        the bound."""
        now = self.now()
        if self.loaded and self.store.durable:
            self.store.check().addErrback(lambda f: None)
        self.registry.forget_stale(now)
        for rec in self.registry.dead(now):
            log.info("agent {agent} timed out", agent=rec.agent_id[:16])
            if self.registry.unregister(rec.handle) is not None:
                self.agent_left(rec, "timed out")
            self.auditor.left(rec)
            rec.handle.close()
        for conn in list(self.connections):
            if conn.record is not None:
                conn.request(wc.Ping(), 3 * self.heartbeat).addErrback(lambda f: None)
            elif now - conn.opened_at > 3 * self.heartbeat:
                conn.close()


class ServerService(MultiService):
    """The server's service tree; logs one readiness line with the bound addresses."""

    def __init__(self, reactor: Any, config: ServerConfig, rng: random.Random | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.server = DiscoveryServer(reactor, config, rng=rng)
        self.api = DiscoveryAPI(self.server)
        site = Site(self.api.resource())
        site.requestFactory = BoundedRequest
        self.http_factory = BudgetedFactory(site, self.server.http_budget, reactor, config.http_header_timeout)
        self.http = EndpointService(reactor, config.http, self.http_factory)
        self.http.setServiceParent(self)
        self.control = EndpointService(reactor, config.control, AgentConnectionFactory(self.server))
        self.control.setServiceParent(self)
        self.udp_protocol = DiscoveryDatagramProtocol(self.server)
        self.udp = UDPService(reactor, config.udp_host, config.udp_port, self.udp_protocol)
        self.udp.setServiceParent(self)
        timer = TimerService(config.heartbeat, self.server.tick)
        timer.clock = reactor
        timer.setServiceParent(self)
        placement = TimerService(REFRESH / 4, self.server.refresh_placement)
        placement.clock = reactor
        placement.setServiceParent(self)
        lag = TimerService(LAG_PERIOD, lambda: self.server.metrics.lag_tick(reactor.seconds()))
        lag.clock = reactor
        lag.setServiceParent(self)
        drain = TimerService(DRAIN_TICK, self.server.drain_index)
        drain.clock = reactor
        drain.setServiceParent(self)
        audit = TimerService(AUDIT_TICK, self.server.auditor.tick)
        audit.clock = reactor
        audit.setServiceParent(self)
        if self.server.repairer is not None:
            repair = TimerService(max(1.0, min(config.heartbeat, config.repair_after)), self.server.repairer.tick)
            repair.clock = reactor
            repair.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        loading = defer.ensureDeferred(self.server.load())
        loading.addErrback(lambda f: log.failure("the store could not be opened", f))
        assert self.udp.port is not None
        udp = self.udp.port.getHost()
        assert isinstance(udp, (IPv4Address, IPv6Address))
        self.server.udp_port = udp.port
        d = defer.gatherResults(
            [self.http.whenListening(), self.control.whenListening()], consumeErrors=True
        )

        def ready(ports: list[Any]) -> None:
            http, control = (where(p.getHost()) for p in ports)
            log.info(
                "DSSS server ready http={http} control={control} udp={udp}",
                http=http,
                control=control,
                udp=where(self.udp.port.getHost()) if self.udp.port else "-",
            )

        def failed(f: Any) -> None:
            log.failure("DSSS server could not listen", f)
            if self.reactor.running:
                self.reactor.stop()

        d.addCallbacks(ready, failed)


    def stopService(self) -> defer.Deferred[None]:
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.server.store.close())
        d.addErrback(lambda f: None)
        return d


def make_server_service(reactor: Any, config: ServerConfig) -> ServerService:
    return ServerService(reactor, config)
