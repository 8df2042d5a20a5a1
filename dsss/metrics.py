# -*- test-case-name: tests.adapters.test_status_metrics -*-
"""What the server and the agent count, for `/api/status` and Prometheus `/metrics`.

Each DiscoveryServer and each StorageAgent owns one `CollectorRegistry` (never the process-wide
default), so a test can run several of them in one process. Counters are updated as things
happen; gauges (agents, space, parts) are read from the live state at scrape time by a custom
collector, so they can never drift from what `/api/status` says.

Nothing here ever records an introduction key, a UDP token or file data: an event names the
operation, the first 16 hex digits of the part's hash and the agent's public address.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sized

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

import dsss
from dsss.agent.identity import AgentIdentity
from dsss.endpoints import EndpointService
from dsss.server.registry import Registry
from dsss.storage.blockstore import BlockStore

log = Logger()


class _AuditStats(Protocol):
    @property
    def stats(self) -> dict[str, int]: ...


class _ReputationCounts(Protocol):
    def counts(self) -> dict[str, int]: ...


class _QuotaCounts(Protocol):
    @property
    def reports(self) -> dict[str, dict[str, int]]: ...
    @property
    def refused(self) -> int: ...


class _Refusals(Protocol):
    @property
    def refused(self) -> int: ...


class ServerState(Protocol):
    """What the server's gauges read (dsss.server.service.DiscoveryServer)."""

    @property
    def registry(self) -> Registry: ...
    @property
    def auditor(self) -> _AuditStats: ...
    @property
    def reputation(self) -> _ReputationCounts: ...
    @property
    def quotas(self) -> _QuotaCounts: ...
    @property
    def open_bound(self) -> _Refusals | None: ...

    def now(self) -> float: ...


class AgentState(Protocol):
    """What the agent's gauges read (dsss.agent.service.StorageAgent)."""

    @property
    def identity(self) -> AgentIdentity: ...
    @property
    def introductions(self) -> Sized: ...
    @property
    def store(self) -> BlockStore: ...
    @property
    def version(self) -> str: ...
    @property
    def welcome(self) -> object | None: ...
    @property
    def audits_proven(self) -> int: ...
    @property
    def audits_corrupt(self) -> int: ...
    @property
    def leases_applied(self) -> int: ...
    @property
    def leases_refused(self) -> int: ...
    @property
    def collected_parts(self) -> int: ...
    @property
    def collected_bytes(self) -> int: ...

    def lease_totals(self) -> tuple[int, int]: ...


class TransferCounts(Protocol):
    """The agent's transfer counters (dsss.agent.transfer.TransferHandler)."""

    @property
    def uploads(self) -> int: ...
    @property
    def downloads(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def forwards(self) -> int: ...
    @property
    def forward_failures(self) -> int: ...
    @property
    def expired(self) -> int: ...

RECENT_EVENTS = 50
PART_PREFIX = 16
# Introductions are one control-channel round trip to an agent: milliseconds on a LAN, up to
# the query timeout (2 s by default) when an agent is slow.
LAG_PERIOD = 0.05
"""Seconds between the calls of the reactor-lag timer."""
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def endpoint_namer(app: Any) -> Callable[[str], str]:
    """Maps a request path to the route it matches in a Klein app (`/api/who-has`), or
    `other`: a bounded set of label values whatever paths clients send."""
    from werkzeug.exceptions import HTTPException

    adapter = app.url_map.bind("localhost")

    def endpoint_of(path: str) -> str:
        try:
            rule, _args = adapter.match(path, return_rule=True)
        except HTTPException:
            return "other"
        return str(rule.rule)

    return endpoint_of


def render_metrics(registry: CollectorRegistry, request: IRequest) -> bytes:
    """The registry in the format the scraper asked for (Prometheus text or OpenMetrics)."""
    accept = request.getHeader(b"accept") or b""
    encoder, content_type = choose_encoder(accept.decode("latin-1"))
    request.setHeader(b"content-type", content_type.encode("ascii"))
    request.setHeader(b"cache-control", b"no-store")
    return encoder(registry)


# --- the server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivityEvent:
    """One thing the server did for a client, as the status page lists it."""

    time: float
    kind: str  # "put" (upload introduction), "get" (download introduction), "who-has"
    part: str  # hash prefix
    agent: str | None  # the agent's public address, if one was involved
    ok: bool
    error: str | None = None
    holders: int | None = None  # who-has: how many agents confirmed

    def as_json(self) -> dict[str, Any]:
        return {
            "time": round(self.time, 3),
            "kind": self.kind,
            "part": self.part,
            "agent": self.agent,
            "ok": self.ok,
            "error": self.error,
            "holders": self.holders,
        }


class ServerMetrics:
    """Counters, the recent-events list and the Prometheus registry of one DiscoveryServer."""

    def __init__(self, server: ServerState, recent: int = RECENT_EVENTS) -> None:
        self.server = server
        self.counts = {"puts": 0, "gets": 0, "who-has": 0, "failures": 0, "relayed-bytes": 0}
        self.recent: deque[ActivityEvent] = deque(maxlen=recent)
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "dsss_http_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.http_errors = Counter(
            "dsss_http_errors",
            "HTTP requests answered with a 4xx or 5xx status, by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.introductions = Counter(
            "dsss_introductions",
            "Introductions relayed to agents, by kind (put: upload, get: download) and outcome.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.introduction_latency = Histogram(
            "dsss_introduction_seconds",
            "Time from a client's introduce-me to the agent's answer.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.who_has = Counter(
            "dsss_who_has_queries", "who-has queries answered.", registry=self.registry
        )
        self.relayed = Counter(
            "dsss_relayed_bytes",
            "Bytes the server relayed between clients and agents that could not reach each other directly.",
            registry=self.registry,
        )
        self.reactor_lag = Histogram(
            "dsss_reactor_lag_seconds",
            f"How late a timer due every {LAG_PERIOD}s ran: the reactor's stalls (work done on it "
            "that kept everything else waiting).",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.reactor_lag_max = Gauge(
            "dsss_reactor_lag_max_seconds", "The longest reactor stall since the server started.",
            registry=self.registry,
        )
        self._lag_due: float | None = None
        self.lag_max = 0.0
        for kind in ("put", "get"):
            for outcome in ("ok", "error"):
                self.introductions.labels(kind, outcome)
            self.introduction_latency.labels(kind)
        self.registry.register(_ServerStateCollector(server))

    # --- events ----------------------------------------------------------------------------------

    def introduced(
        self,
        *,
        block: str,
        agent: str,
        size: int,
        seconds: float,
        now: float,
        error: str | None = None,
    ) -> None:
        """An introduction ended: successfully (error None) or with the error code given."""
        kind = "put" if size > 0 else "get"
        self.counts["puts" if kind == "put" else "gets"] += 1
        if error is not None:
            self.counts["failures"] += 1
        self.introductions.labels(kind, "ok" if error is None else "error").inc()
        self.introduction_latency.labels(kind).observe(max(0.0, seconds))
        self.recent.append(ActivityEvent(now, kind, block[:PART_PREFIX], agent, error is None, error))

    def asked_who_has(self, *, block: str, holders: int, now: float) -> None:
        self.counts["who-has"] += 1
        self.who_has.inc()
        self.recent.append(
            ActivityEvent(now, "who-has", block[:PART_PREFIX], None, holders > 0,
                          None if holders else "not-found", holders)
        )

    def relayed_bytes(self, count: int) -> None:
        self.counts["relayed-bytes"] += count
        self.relayed.inc(count)

    def http_finished(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.http_errors.labels(endpoint).inc()

    def lag_tick(self, now: float) -> None:
        """From a timer every LAG_PERIOD seconds: record how late this call came."""
        if self._lag_due is not None:
            lag = max(0.0, now - self._lag_due)
            self.reactor_lag.observe(lag)
            if lag > self.lag_max:
                self.lag_max = lag
                self.reactor_lag_max.set(lag)
        self._lag_due = now + LAG_PERIOD

    # --- views -----------------------------------------------------------------------------------

    def activity(self) -> dict[str, Any]:
        """Counters plus the recent events, newest first."""
        return {**self.counts, "recent": [e.as_json() for e in reversed(self.recent)]}

    def wrap(self, resource: IResource, endpoint_of: Callable[[str], str]) -> IResource:
        """`resource`, counting every request it answers under `endpoint_of(path)`."""
        return _CountingResource(resource, self, endpoint_of)


class _CountingResource(Resource):
    """Wraps a leaf resource (Klein's) and counts each response by endpoint and status."""

    isLeaf = True

    def __init__(self, wrapped: IResource, metrics: ServerMetrics, endpoint_of: Callable[[str], str]) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.metrics = metrics
        self.endpoint_of = endpoint_of

    def render(self, request: IRequest) -> Any:
        endpoint = self.endpoint_of(request.path.decode("latin-1"))

        def finished(_: object) -> None:
            self.metrics.http_finished(endpoint, request.code)  # type: ignore[attr-defined]

        # twisted.web hands resources http.Request, which has it; IRequest does not declare it.
        request.notifyFinish().addBoth(finished)  # type: ignore[attr-defined]
        return self.wrapped.render(request)


class _ServerStateCollector(Collector):
    """Gauges read from the registry at scrape time."""

    def __init__(self, server: ServerState) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        now = server.now()
        records = server.registry.all()
        live = [r for r in records if server.registry.is_live(r, now)]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("dsss_agents_connected", "Agents registered on the control channel.", len(records))
        yield gauge("dsss_agents_live", "Registered agents heard on TCP and UDP within 3 heartbeats.", len(live))
        yield gauge("dsss_parts_indexed", "Distinct parts the location index knows a holder for.",
                    server.registry.counts()["indexed-parts"])
        yield gauge("dsss_parts_stored", "Part copies reported by live agents (each replica counts).",
                    sum(len(r.blocks) for r in live))
        yield gauge("dsss_capacity_bytes", "Capacity of the live agents.", sum(r.capacity for r in live))
        yield gauge("dsss_free_bytes", "Free space of the live agents.", sum(r.free for r in live))
        yield gauge("dsss_used_bytes", "Space used on the live agents.",
                    sum(max(0, r.capacity - r.free) for r in live))
        yield gauge("dsss_parts_proven", "Part copies on live agents that their agent proved (passed an audit of).",
                    sum(len(r.proven) for r in live))
        audits = CounterMetricFamily("dsss_audits", "Audits of agents' claims answered, by result.",
                                     labels=["result"])
        for result in ("passed", "failed", "unanswered"):
            audits.add_metric([result], server.auditor.stats[result])
        yield audits
        yield gauge("dsss_agents_disqualified", "Agent identities disqualified for failing audits.",
                    server.reputation.counts()["disqualified"])
        reports = server.quotas.reports
        yield gauge("dsss_leased_bytes", "Bytes live agents report kept by live leases (each replica counts).",
                    sum(sum(reports.get(r.agent_id, {}).values()) for r in live))
        yield gauge("dsss_expired_bytes", "Bytes live agents report whose leases all ended (to be collected).",
                    sum(r.expired_bytes for r in live))
        yield gauge("dsss_collected_bytes", "Bytes registered agents report collected since each started.",
                    sum(r.collected_bytes for r in records))
        yield CounterMetricFamily("dsss_quota_refused", "Placements refused for passing a client's quota.",
                                  value=server.quotas.refused)
        if server.open_bound is not None:
            yield CounterMetricFamily("dsss_open_quota_refused",
                                      "Placements refused for passing an address's daily bound (open server).",
                                      value=server.open_bound.refused)
        info = GaugeMetricFamily("dsss_server_info", "The server's version.", labels=["version"])
        info.add_metric([dsss.__version__], 1)
        yield info


# --- the agent -----------------------------------------------------------------------------------


class AgentMetrics:
    """The Prometheus registry of one storage agent, read from its state at scrape time."""

    def __init__(self, agent: AgentState, transfers: TransferCounts) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_AgentStateCollector(agent, transfers))

    def resource(self) -> IResource:
        root = _Root()
        root.putChild(b"metrics", _MetricsPage(self.registry))
        return root

    def service(self, reactor: Any, endpoint: str) -> "MetricsEndpointService":
        return MetricsEndpointService(reactor, endpoint, Site(self.resource()))


class _Root(Resource):
    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return notFound("Not found", "This agent serves /metrics only.")


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        return render_metrics(self.registry, request)


class MetricsEndpointService(EndpointService):
    """Serves /metrics on an endpoint string and logs where once it listens."""

    def startService(self) -> None:
        super().startService()

        def listening(port: Any) -> None:
            host = port.getHost()
            log.info("metrics at http://{host}:{port}/metrics", host=host.host, port=host.port)

        self.whenListening().addCallbacks(
            listening, lambda f: log.failure("cannot serve metrics on {endpoint}", f,
                                             endpoint=self.description)
        )


class _AgentStateCollector(Collector):
    def __init__(self, agent: AgentState, transfers: TransferCounts) -> None:
        self.agent = agent
        self.transfers = transfers

    def collect(self) -> Iterator[Metric]:
        agent, store, transfers = self.agent, self.agent.store, self.transfers

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("dsss_agent_parts_stored", "Parts in this agent's store.", len(store))
        yield gauge("dsss_agent_bytes_stored", "Bytes of the parts in this agent's store.", store.used)
        yield gauge("dsss_agent_capacity_bytes", "Most bytes this agent stores.", store.capacity)
        yield gauge("dsss_agent_free_bytes", "Bytes this agent can still accept.", store.free)
        yield gauge("dsss_agent_connected", "1 while registered with the server, else 0.",
                    1 if agent.welcome is not None else 0)
        yield gauge("dsss_agent_introductions_pending", "Introduction keys issued and not yet used.",
                    len(agent.introductions))
        yield counter("dsss_agent_uploads", "Uploads stored.", transfers.uploads)
        yield counter("dsss_agent_downloads", "Downloads served.", transfers.downloads)
        yield counter("dsss_agent_refused", "Transfers refused (bad key, full, corrupt, ...).",
                      transfers.refused)
        yield counter("dsss_agent_forwards", "Chained uploads passed on to the next agent.",
                      transfers.forwards)
        yield counter("dsss_agent_uploads_expired",
                      "Uploads dropped for falling behind the minimum rate or their deadline (space freed).",
                      transfers.expired)
        yield counter("dsss_agent_forward_failures",
                      "Chained uploads this agent could not pass on (the uploader made that copy).",
                      transfers.forward_failures)
        yield counter("dsss_agent_audits_proven", "Audits (control channel and QUIC) answered with a proof.",
                      agent.audits_proven)
        yield counter("dsss_agent_audits_corrupt",
                      "Audits that found this agent's copy corrupt (quarantined, reported gone).",
                      agent.audits_corrupt)
        leased, expired = agent.lease_totals()
        yield gauge("dsss_agent_leased_bytes", "Bytes of stored parts kept by a live lease (or an upload's hold).",
                    leased)
        yield gauge("dsss_agent_expired_bytes",
                    "Bytes of stored parts whose leases all ended, waiting to be collected.", expired)
        yield counter("dsss_agent_collected_bytes", "Bytes freed by collecting parts without a live lease.",
                      agent.collected_bytes)
        yield counter("dsss_agent_collected_parts", "Parts collected for having no live lease.",
                      agent.collected_parts)
        yield counter("dsss_agent_leases_applied", "Lease records taken (leases taken, renewed, released).",
                      agent.leases_applied)
        yield counter("dsss_agent_leases_refused",
                      "Lease records refused (forged, replayed, too long, for parts not stored here).",
                      agent.leases_refused)
        info = GaugeMetricFamily("dsss_agent_info", "This agent's id and version.",
                                 labels=["agent", "version"])
        info.add_metric([agent.identity.agent_id, agent.version], 1)
        yield info
