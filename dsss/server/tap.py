# -*- test-case-name: tests.adapters.test_taps -*-
"""`twistd dsss-server`: options and makeService (a thin shim over dsss.server.service)."""

from __future__ import annotations

import resource
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from dsss.budget import BudgetPlan, DescriptorLimitError, plan_budgets
from dsss.clientauth import parse_client_list, parse_client_quotas
from dsss.endpoints import parse_hostport
from dsss.errors import BadRequest
from dsss.model import is_decimal, parse_size
from dsss.logging import LOG_FORMAT_OPTION, apply_log_format
from dsss.server.placement import NetworkRule
from dsss.server.config import ServerConfig
from dsss.server.service import make_server_service

log = Logger()


def _positive_float(text: str, what: str, minimum: float = 0.01) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"{what} must be a number of seconds, got {text!r}") from None
    if not minimum <= value <= 3600:
        raise usage.UsageError(f"{what} must be between {minimum} and 3600 seconds")
    return value


def _check_endpoint(description: str, what: str) -> None:
    """Parse an endpoint string now, so a typo is a usage error rather than a failed start."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), description)
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(
            f"{what}: not a server endpoint string ({e}); e.g. tcp:8470:interface=127.0.0.1"
        ) from None


def _number(text: str, lo: float, hi: float, error: str) -> float:
    """`text` as a number within [lo, hi], else a usage error saying `error`."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:
        raise usage.UsageError(error)
    return value


def _repair_after(text: str) -> float:
    return _number(text, 0, 30 * 86400, "--repair-after must be a number of seconds (0 to disable)")


def _audit_rate(text: str) -> float:
    return _number(text, 0.01, 100_000, "--audit-rate must be a number of audits per second, from 0.01 to 100000")


def _proof_freshness(text: str) -> float:
    return _number(text, 1, 365 * 86400,
                   "--proof-freshness must be a number of seconds, from 1 to 31536000 (a year)")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run a DSSS discovery server: HTTP API, agent control channel and UDP punch socket."
    optParameters = [
        ["http", None, "tcp:8470:interface=127.0.0.1", "Endpoint for the HTTP API."],
        ["control", None, "tcp:8471:interface=127.0.0.1", "Endpoint for agents' control connections."],
        ["udp", None, "127.0.0.1:8471", "UDP HOST:PORT for PING/PONG (address discovery)."],
        ["replicas", None, "3", "How many agents store each part."],
        ["heartbeat", None, "10", "Heartbeat interval in seconds (agents are dropped after 3)."],
        ["query-timeout", None, "2", "Seconds to wait for an agent's WHO_HAS/introduction reply."],
        ["agents", None, None, "File of allowed agent ids (hex public keys), one per line."],
        ["clients", None, None, "File of allowed client public keys (each optionally followed by its quota, e.g. 10G); requests must then be signed."],
        ["quota", None, None, "With --clients: bytes each client may keep leased, every replica counted, e.g. 100G (default: no quota)."],
        ["open-quota", None, "64G", "Without --clients: bytes one IP address may place per day, every copy counted, e.g. 500G, or 'off' (no bound)."],
        ["http-rate", None, "200", "HTTP requests per second allowed from one IP address."],
        ["relay-limit", None, "10M", "Bytes per second relayed for one client/agent pair."],
        ["repair-after", None, "600", "Seconds a part may lack replicas before the server copies it again (0: never)."],
        ["http-connections", None, None,
         "HTTP connections open at once, in all (default: 4096, less if the descriptor limit is lower)."],
        ["http-connections-per-ip", None, "128", "HTTP connections open at once from one IP address."],
        ["http-header-timeout", None, "10", "Seconds a connection has to send a request's headers."],
        ["agent-connections", None, None,
         "Agents' control connections open at once, in all (default: 16384, less if the descriptor limit is lower)."],
        ["agents-per-ip", None, "256", "Agents registered at once from one IP address."],
        ["distinct-networks", None, "24,48",
         "A part's copies go to agents on distinct networks: IPv4,IPv6 prefix lengths that make one "
         "network (24,48; 32,128: each IP address its own), or 'off' (each agent its own: all "
         "agents on one machine or behind one NAT)."],
        ["claims-per-network", None, "4000000",
         "Parts indexed for all agents of one network (IPv4 /24, IPv6 /48) together; not applied with --agents."],
        ["audit-rate", None, "100", "Audits per second the server sends on its own (new claims first, then a sweep of all claims)."],
        ["proof-freshness", None, "604800", "Seconds a holder's last passed audit of a part counts: only such copies are replicas (default 7 days)."],
        ["store", None, "memory",
         "Where the server keeps what outlives it: memory (nothing; agents report everything again "
         "after a restart), sqlite:PATH (one machine; the operators' default) or "
         "postgresql://USER@HOST:PORT/DB (shared by several servers)."],
        LOG_FORMAT_OPTION,
    ]

    def postOptions(self) -> None:
        apply_log_format(self)
        try:
            host, port = parse_hostport(self["udp"], "--udp")
        except BadRequest as e:
            raise usage.UsageError(str(e)) from None
        replicas = self["replicas"]
        if not is_decimal(str(replicas)) or not 1 <= int(replicas) <= 32:
            raise usage.UsageError("--replicas must be an integer from 1 to 32")
        for name in ("http", "control"):
            _check_endpoint(self[name], f"--{name}")
        allowed = None
        if self["agents"]:
            try:
                with open(self["agents"], encoding="utf-8") as f:
                    lines = [ln.split("#")[0].strip() for ln in f]
            except OSError as e:
                raise usage.UsageError(f"--agents: cannot read {self['agents']}: {e}") from None
            allowed = frozenset(ln for ln in lines if ln)
            for a in allowed:
                if len(a) != 64 or any(c not in "0123456789abcdef" for c in a):
                    raise usage.UsageError(f"--agents: not an agent id: {a!r}")
        clients = None
        client_quotas: dict[str, int] = {}
        if self["clients"]:
            try:
                with open(self["clients"], encoding="utf-8") as f:
                    text = f.read()
                clients = parse_client_list(text)
                client_quotas = parse_client_quotas(text)
            except OSError as e:
                raise usage.UsageError(f"--clients: cannot read {self['clients']}: {e}") from None
            except ValueError as e:
                raise usage.UsageError(f"--clients: {e}") from None
        quota = None
        if self["quota"] is not None:
            if clients is None:
                raise usage.UsageError("--quota needs --clients (quotas are per listed client)")
            try:
                quota = parse_size(self["quota"])
            except BadRequest as e:
                raise usage.UsageError(f"--quota: {e}") from None
        open_quota: int | None = None
        if self["open-quota"].strip().lower() != "off":
            try:
                open_quota = parse_size(self["open-quota"])
            except BadRequest as e:
                raise usage.UsageError(f"--open-quota: {e} (or 'off')") from None
            if open_quota < 1024 * 1024:
                raise usage.UsageError("--open-quota must be at least 1M (or 'off')")
        try:
            http_rate = float(self["http-rate"])
        except ValueError:
            http_rate = 0.0
        if not 1 <= http_rate <= 1e6:
            raise usage.UsageError("--http-rate must be a number of requests per second (1 or more)")
        try:
            relay_limit = parse_size(self["relay-limit"])
        except BadRequest as e:
            raise usage.UsageError(f"--relay-limit: {e}") from None
        if relay_limit < 1024:
            raise usage.UsageError("--relay-limit must be at least 1K (bytes per second)")
        http_total = _count(self["http-connections"], "--http-connections")
        control_total = _count(self["agent-connections"], "--agent-connections")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            self.plan = plan_budgets(soft, hard, http_total, control_total)
        except DescriptorLimitError as e:
            raise usage.UsageError(str(e)) from None
        try:
            networks = NetworkRule.parse(self["distinct-networks"])
        except ValueError as e:
            raise usage.UsageError(f"--distinct-networks: {e}") from None
        store = _store(self["store"])
        self.config = ServerConfig(
            store=store,
            http=self["http"],
            control=self["control"],
            udp_host=host,
            udp_port=port,
            replicas=int(replicas),
            heartbeat=_positive_float(self["heartbeat"], "--heartbeat", minimum=0.3),
            query_timeout=_positive_float(self["query-timeout"], "--query-timeout"),
            allowed_agents=allowed,
            allowed_clients=clients,
            quota=quota,
            client_quotas=client_quotas,
            open_quota=open_quota,
            http_rate=http_rate,
            relay_limit=relay_limit,
            repair_after=_repair_after(self["repair-after"]),
            http_connections=self.plan.http_total,
            http_connections_per_ip=_count(self["http-connections-per-ip"], "--http-connections-per-ip") or 128,
            http_header_timeout=_positive_float(self["http-header-timeout"], "--http-header-timeout", minimum=0.1),
            agent_connections=self.plan.control_total,
            agents_per_ip=_count(self["agents-per-ip"], "--agents-per-ip") or 256,
            distinct_networks=networks,
            claims_per_network=_count(self["claims-per-network"], "--claims-per-network") or 4_000_000,
            audit_rate=_audit_rate(self["audit-rate"]),
            proof_freshness=_proof_freshness(self["proof-freshness"]),
        )


def _store(spec: str) -> str:
    """Check a --store value: memory, sqlite:PATH (its directory must exist) or postgresql://."""
    import os

    from dsss.server.storespec import open_store

    try:
        open_store(spec, reactor=object())
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    if spec.startswith("sqlite:"):
        path = os.path.abspath(spec[len("sqlite:"):])
        if not os.path.isdir(os.path.dirname(path)):
            raise usage.UsageError(f"--store: no directory {os.path.dirname(path)} for {path}")
        return "sqlite:" + path
    if spec.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise usage.UsageError("--store postgresql:// needs psycopg 3 (pip install 'psycopg[binary]')") from None
    return spec


def _count(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if not is_decimal(str(text)) or not 1 <= int(text) <= 10_000_000:
        raise usage.UsageError(f"{what} must be a whole number from 1 to 10000000, got {text!r}")
    return int(text)


def apply_descriptor_limit(plan: BudgetPlan) -> None:
    """Raise this process's soft descriptor limit to what the connection budgets need (never
    above the hard limit, which `plan_budgets` already checked), and say what was planned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < plan.limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.limit, hard))
        soft = plan.limit
    log.info(
        "connection budgets: {http} HTTP, {control} control connections ({needed} descriptors of {soft})",
        http=plan.http_total,
        control=plan.control_total,
        needed=plan.needed,
        soft=soft,
    )


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    apply_descriptor_limit(options.plan)
    return make_server_service(reactor, options.config)
