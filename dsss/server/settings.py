"""The server settings its parts read, as typing.Protocols (dsss.server.service.ServerConfig is one).

The auditor and the repairer depend on these small views rather than on ServerConfig itself, so
they import nothing from dsss.server.service (which imports them) and tests can pass plain objects.
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
