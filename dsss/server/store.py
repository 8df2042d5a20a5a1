# -*- test-case-name: tests.unit.test_store -*-
"""What the discovery server keeps durably: the Store interface, the memory store, the choice.

The server's hot paths (who-has, where-to-upload, introductions, placement) read its in-memory
registry (dsss.server.registry), never the store. The store keeps what must outlive the process:
each identity's last registration number, every agent's claims (the location index, with the
reverse index agent -> parts, proven times and part sizes), reputation, and the repair queue.
After a restart the server reads it back, and an agent that returns proves with a digest that
its claims are the stored ones instead of sending them all again (dsss.holdings, the DIGEST exchange in docs/protocol.md).

Every method returns a Deferred. `MemoryStore` keeps nothing across restarts (the default for
`make demo` and tests); `dsss.server.sqlstore.SQLStore` keeps it in SQLite or PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from twisted.internet import defer


@dataclass(frozen=True)
class StoredClaim:
    """One claim as stored: the part, its size (proven or as first claimed), whether that size
    is proven, and when this agent last proved the part (None: never)."""

    part: str
    size: int | None
    size_proven: bool
    proven_at: float | None


class Store(Protocol):
    """The durable part of the discovery server's knowledge."""

    @property
    def durable(self) -> bool:
        """Whether what is stored outlives the server process."""

    @property
    def healthy(self) -> bool:
        """False while the last attempt to reach the store failed (and until one succeeds)."""

    def open(self) -> defer.Deferred[None]: ...
    def close(self) -> defer.Deferred[None]: ...
    def check(self) -> defer.Deferred[None]:
        """Reach the store (`healthy` says how that went)."""

    # identities
    def load_identities(self) -> defer.Deferred[dict[str, tuple[int, float]]]:
        """Every remembered identity's last registration number and when it registered."""
    def put_identity(self, agent_id: str, seq: int, at: float) -> defer.Deferred[None]: ...
    def forget_identities(self, agent_ids: list[str]) -> defer.Deferred[None]:
        """Forget these identities: their registration numbers and their claims."""

    # the location index
    def add_claims(self, agent_id: str, claims: list[tuple[str, int | None]]) -> defer.Deferred[None]:
        """The agent claims these parts (with the size it gave, or None); a part's first
        claimed size is kept until one is proven."""
    def proved(self, agent_id: str, part: str, size: int, at: float) -> defer.Deferred[None]:
        """The agent proved `part` at `at` (a claim if it was none); `size` is the part's size."""
    def drop_claims(self, agent_id: str, parts: list[str]) -> defer.Deferred[list[str]]:
        """Withdraw these claims; returns those of the parts some other agent still claims."""
    def drop_agent(self, agent_id: str) -> defer.Deferred[list[str]]:
        """Withdraw all of the agent's claims (it was disqualified); returns, as drop_claims,
        the parts others still claim (through the reverse index)."""
    def claims_of(self, agent_id: str) -> defer.Deferred[list[StoredClaim]]: ...
    def holders(self, part: str) -> defer.Deferred[list[str]]: ...
    def part_size(self, part: str) -> defer.Deferred[tuple[int | None, bool]]: ...
    def agents_with_claims(self) -> defer.Deferred[list[str]]: ...

    # reputation
    def put_reputation(self, agent_id: str, record: dict[str, Any]) -> defer.Deferred[None]: ...
    def load_reputation(self) -> defer.Deferred[dict[str, dict[str, Any]]]: ...

    # the repair queue
    def enqueue_repairs(self, parts: list[str], due: float) -> defer.Deferred[None]:
        """Queue parts to be looked at from `due` on (an earlier due time wins)."""
    def claim_repairs(self, owner: str, limit: int, now: float, lease: float) -> defer.Deferred[list[str]]:
        """Up to `limit` due parts no other owner holds, now held by `owner` until now+lease:
        servers claiming at once get disjoint batches."""
    def finish_repairs(self, owner: str, parts: list[str]) -> defer.Deferred[None]:
        """Done with these parts (looked at, copied or found whole): out of the queue."""
    def queued_repairs(self) -> defer.Deferred[int]: ...


# --- in memory --------------------------------------------------------------------------------


class MemoryStore:
    """Everything in dictionaries: fast, and gone with the process."""

    durable = False
    healthy = True

    def __init__(self) -> None:
        self._identities: dict[str, tuple[int, float]] = {}
        self._claims: dict[str, dict[str, float | None]] = {}
        self._holders: dict[str, set[str]] = {}
        self._sizes: dict[str, tuple[int | None, bool]] = {}
        self._reputation: dict[str, dict[str, Any]] = {}
        self._queue: dict[str, tuple[float, str | None, float]] = {}  # part -> (due, owner, lease end)

    def open(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def check(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def load_identities(self) -> defer.Deferred[dict[str, tuple[int, float]]]:
        return defer.succeed(dict(self._identities))

    def put_identity(self, agent_id: str, seq: int, at: float) -> defer.Deferred[None]:
        self._identities[agent_id] = (seq, at)
        return defer.succeed(None)

    def forget_identities(self, agent_ids: list[str]) -> defer.Deferred[None]:
        for agent_id in agent_ids:
            self._identities.pop(agent_id, None)
            self._drop_all(agent_id)
        return defer.succeed(None)

    def add_claims(self, agent_id: str, claims: list[tuple[str, int | None]]) -> defer.Deferred[None]:
        mine = self._claims.setdefault(agent_id, {})
        for part, size in claims:
            mine.setdefault(part, None)
            self._holders.setdefault(part, set()).add(agent_id)
            known = self._sizes.get(part)
            if known is None or known[0] is None:
                self._sizes[part] = (size, False)
        return defer.succeed(None)

    def proved(self, agent_id: str, part: str, size: int, at: float) -> defer.Deferred[None]:
        self._claims.setdefault(agent_id, {})[part] = at
        self._holders.setdefault(part, set()).add(agent_id)
        self._sizes[part] = (size, True)
        return defer.succeed(None)

    def _drop(self, agent_id: str, parts: Iterable[str]) -> list[str]:
        mine = self._claims.get(agent_id, {})
        others = []
        for part in parts:
            if mine.pop(part, "absent") == "absent":
                continue
            holders = self._holders.get(part, set())
            holders.discard(agent_id)
            if holders:
                others.append(part)
            else:
                self._holders.pop(part, None)
                self._sizes.pop(part, None)
        if not mine:
            self._claims.pop(agent_id, None)
        return others

    def _drop_all(self, agent_id: str) -> list[str]:
        return self._drop(agent_id, list(self._claims.get(agent_id, {})))

    def drop_claims(self, agent_id: str, parts: list[str]) -> defer.Deferred[list[str]]:
        return defer.succeed(self._drop(agent_id, parts))

    def drop_agent(self, agent_id: str) -> defer.Deferred[list[str]]:
        return defer.succeed(self._drop_all(agent_id))

    def claims_of(self, agent_id: str) -> defer.Deferred[list[StoredClaim]]:
        found = []
        for part, at in self._claims.get(agent_id, {}).items():
            size, proven = self._sizes.get(part, (None, False))
            found.append(StoredClaim(part, size, proven, at))
        return defer.succeed(found)

    def holders(self, part: str) -> defer.Deferred[list[str]]:
        return defer.succeed(sorted(self._holders.get(part, ())))

    def part_size(self, part: str) -> defer.Deferred[tuple[int | None, bool]]:
        return defer.succeed(self._sizes.get(part, (None, False)))

    def agents_with_claims(self) -> defer.Deferred[list[str]]:
        return defer.succeed(sorted(a for a, c in self._claims.items() if c))

    def put_reputation(self, agent_id: str, record: dict[str, Any]) -> defer.Deferred[None]:
        self._reputation[agent_id] = dict(record)
        return defer.succeed(None)

    def load_reputation(self) -> defer.Deferred[dict[str, dict[str, Any]]]:
        return defer.succeed({a: dict(r) for a, r in self._reputation.items()})

    def enqueue_repairs(self, parts: list[str], due: float) -> defer.Deferred[None]:
        for part in parts:
            entry = self._queue.get(part)
            if entry is None:
                self._queue[part] = (due, None, 0.0)
            elif due < entry[0]:
                self._queue[part] = (due, entry[1], entry[2])
        return defer.succeed(None)

    def claim_repairs(self, owner: str, limit: int, now: float, lease: float) -> defer.Deferred[list[str]]:
        free = sorted((due, part) for part, (due, holder, until) in self._queue.items()
                      if due <= now and (holder is None or until < now))
        taken = [part for _due, part in free[:limit]]
        for part in taken:
            self._queue[part] = (self._queue[part][0], owner, now + lease)
        return defer.succeed(taken)

    def finish_repairs(self, owner: str, parts: list[str]) -> defer.Deferred[None]:
        for part in parts:
            entry = self._queue.get(part)
            if entry is not None and entry[1] == owner:
                del self._queue[part]
        return defer.succeed(None)

    def queued_repairs(self) -> defer.Deferred[int]:
        return defer.succeed(len(self._queue))
