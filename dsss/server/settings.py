"""The server settings its parts read, as typing.Protocols (dsss.server.config.ServerConfig is one).

The control connections, the auditor and the repairer depend on these small views rather than on
ServerConfig itself, so they import nothing from dsss.server.service (which imports them) and tests
can pass plain objects.
"""

from __future__ import annotations

from typing import Protocol


class QuerySettings(Protocol):
    """How long the server waits for an agent's answer on its control connection."""

    @property
    def query_timeout(self) -> float: ...


class ProofSettings(QuerySettings, Protocol):
    """Also how recently a holder must have proven a part for its copy to count."""

    @property
    def proof_freshness(self) -> float: ...


class ControlSettings(Protocol):
    """Which agents may join, and how many parts the agents of one network may have indexed."""

    @property
    def allowed_agents(self) -> frozenset[str] | None: ...

    @property
    def claims_per_network(self) -> int: ...
