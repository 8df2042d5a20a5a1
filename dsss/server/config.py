# -*- test-case-name: tests.adapters.test_server_api,tests.integration.test_network -*-
"""What a discovery server is started with: its listening endpoints, limits, budgets and policies.

`ServerConfig` is a plain frozen value: `dsss.server.tap` builds it from the command line, tests
build it directly, and `dsss.server.service` runs a server from it. The server's parts read the
settings they need through the small protocols of dsss.server.settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsss.server.placement import NetworkRule
from dsss.server.quotas import DEFAULT_OPEN_QUOTA


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of one discovery server (by default it listens on loopback only)."""

    http: str = "tcp:8470:interface=127.0.0.1"
    control: str = "tcp:8471:interface=127.0.0.1"
    udp_host: str = "127.0.0.1"
    udp_port: int = 8471
    replicas: int = 3
    heartbeat: float = 10.0
    query_timeout: float = 2.0
    allowed_agents: frozenset[str] | None = None
    allowed_clients: frozenset[str] | None = None
    # Bytes a listed client may keep leased (each replica counted; dsss/server/quotas.py):
    # the default, and per client public key. None and {}: no quotas.
    quota: int | None = None
    client_quotas: dict[str, int] = field(default_factory=dict)
    # Without a client list: bytes one source address may place per day, every copy counted
    # (dsss/server/quotas.py OpenBound); None: no bound.
    open_quota: int | None = DEFAULT_OPEN_QUOTA
    http_rate: float = 200.0
    relay_limit: float = 10 * 1024 * 1024
    # Seconds a part may stay below the replica count before the server copies it again
    # (0: never; `dsss.client repair` still works).
    repair_after: float = 600.0
    # Connection budgets (dsss.budget): HTTP connections in all and per source IP, the seconds
    # a connection has to complete a request's headers, control connections in all, and
    # registered agents per source IP. `tap` sizes the totals from the descriptor limit.
    http_connections: int = 4096
    http_connections_per_ip: int = 128
    http_header_timeout: float = 10.0
    agent_connections: int = 16384
    agents_per_ip: int = 256
    # Which agents count as one network: a part's copies go to distinct ones
    # (`--distinct-networks`; NetworkRule.parse("off") for agents that share one address).
    distinct_networks: NetworkRule = NetworkRule()

    # Audits per second the server sends on its own (new claims, then the sweep), and how
    # recently a holder must have proven a part for its copy to count (see docs/operations.md).
    # Parts indexed for all the agents of one network (IPv4 /24, IPv6 /48) together, without
    # --agents: more identities on one network do not buy a larger index.
    claims_per_network: int = 4_000_000
    audit_rate: float = 100.0
    proof_freshness: float = 7 * 86400.0
    # Where the server keeps what outlives it (dsss.server.store): memory, sqlite:PATH or
    # postgresql://...
    store: str = "memory"
