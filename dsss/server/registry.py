# -*- test-case-name: tests.unit.test_registry -*-
"""The discovery server's knowledge of agents: pure, clock-free, no I/O.

Every method that depends on time takes `now` (seconds). An agent is *live* when it is registered,
its UDP address is known, and both its control connection and its UDP pings were heard from within
`3 * heartbeat` seconds.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from dsss.errors import AccessDenied
from dsss.model import PeerAddress

LIVENESS_FACTOR = 3


class ReplayError(AccessDenied):
    code = "replay"


@dataclass(eq=False)
class AgentRecord:
    agent_id: str
    seq: int
    capacity: int
    free: int
    version: str
    handle: Any  # the control connection, opaque to the registry
    token: str  # secret token the agent puts in its UDP pings
    registered_at: float
    last_tcp: float
    last_udp: float | None = None
    address: PeerAddress | None = None
    # The address it listens at on its own network (LOCAL), for agents behind the same NAT.
    local: PeerAddress | None = None
    blocks: set[str] = field(default_factory=set)

    def summary(self, now: float, heartbeat: float) -> dict[str, Any]:
        return {
            "id": self.agent_id,
            "address": str(self.address) if self.address else None,
            "capacity": self.capacity,
            "free": self.free,
            "used": max(0, self.capacity - self.free),
            "parts": len(self.blocks),
            "version": self.version,
            "last-heartbeat": round(now - max(self.last_tcp, self.last_udp or 0.0), 3),
        }


class Registry:
    def __init__(
        self,
        heartbeat: float,
        token_source: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self.heartbeat = heartbeat
        self._token_source = token_source
        self._agents: dict[str, AgentRecord] = {}
        self._by_token: dict[str, AgentRecord] = {}
        self._by_address: dict[PeerAddress, AgentRecord] = {}
        self._by_handle: dict[int, AgentRecord] = {}
        self._last_seq: dict[str, int] = {}
        # Changes whenever an agent joins, leaves or moves (dsss.server.placement rebuilds its
        # candidate table on it).
        self.generation = 0
        self._index: dict[str, set[str]] = {}
        self._sizes: dict[str, int] = {}

    # --- membership ---------------------------------------------------------------------------

    def register(
        self,
        *,
        agent_id: str,
        seq: int,
        capacity: int,
        free: int,
        version: str,
        handle: Any,
        now: float,
    ) -> tuple[AgentRecord, Any | None]:
        """Record a (signature-checked) registration.

        Returns the new record and the handle of an older registration of the same agent that it
        replaces (the caller closes that connection). Raises ReplayError for a sequence number not
        above the last one seen from this agent.
        """
        last = self._last_seq.get(agent_id)
        if last is not None and seq <= last:
            raise ReplayError(f"registration seq {seq} is not newer than {last} (replay?)")
        self._last_seq[agent_id] = seq
        old = self._agents.get(agent_id)
        old_handle = None
        if old is not None:
            old_handle = old.handle
            self._drop(old)
        rec = AgentRecord(
            agent_id=agent_id,
            seq=seq,
            capacity=capacity,
            free=free,
            version=version,
            handle=handle,
            token=self._token_source(),
            registered_at=now,
            last_tcp=now,
        )
        self._agents[agent_id] = rec
        self.generation += 1
        self._by_token[rec.token] = rec
        self._by_handle[id(handle)] = rec
        return rec, old_handle

    def unregister(self, handle: Any) -> AgentRecord | None:
        """Forget the agent whose control connection this was (if it still is)."""
        rec = self._by_handle.get(id(handle))
        if rec is None or rec.handle is not handle:
            return None
        self._drop(rec)
        return rec

    def _drop(self, rec: AgentRecord) -> None:
        if self._agents.get(rec.agent_id) is rec:
            del self._agents[rec.agent_id]
            self.generation += 1
        self._by_token.pop(rec.token, None)
        if rec.address is not None and self._by_address.get(rec.address) is rec:
            del self._by_address[rec.address]
        if self._by_handle.get(id(rec.handle)) is rec:
            del self._by_handle[id(rec.handle)]
        for block in rec.blocks:
            holders = self._index.get(block)
            if holders is not None:
                holders.discard(rec.agent_id)
                if not holders:
                    del self._index[block]
                    self._sizes.pop(block, None)
        rec.blocks = set()

    def by_handle(self, handle: Any) -> AgentRecord | None:
        rec = self._by_handle.get(id(handle))
        return rec if rec is not None and rec.handle is handle else None

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._agents.get(agent_id)

    def __len__(self) -> int:
        return len(self._agents)

    def all(self) -> list[AgentRecord]:
        return list(self._agents.values())

    # --- liveness ------------------------------------------------------------------------------

    def heard_tcp(self, rec: AgentRecord, now: float) -> None:
        rec.last_tcp = now

    def heard_udp(self, token: str, address: PeerAddress, now: float) -> AgentRecord | None:
        """A PING with this token came from this address; returns the agent, or None."""
        rec = self._by_token.get(token)
        if rec is None:
            return None
        rec.last_udp = now
        if rec.address != address:
            if rec.address is not None and self._by_address.get(rec.address) is rec:
                del self._by_address[rec.address]
            other = self._by_address.get(address)
            if other is not None and other is not rec:
                # The address moved to this agent (the other one's NAT mapping is gone).
                other.address = None
            self._by_address[address] = rec
            rec.address = address
            self.generation += 1
        return rec

    def is_live(self, rec: AgentRecord, now: float) -> bool:
        limit = LIVENESS_FACTOR * self.heartbeat
        return (
            rec.address is not None
            and rec.last_udp is not None
            and now - rec.last_tcp <= limit
            and now - rec.last_udp <= limit
        )

    def live(self, now: float) -> list[AgentRecord]:
        return [r for r in self._agents.values() if self.is_live(r, now)]

    def dead(self, now: float) -> list[AgentRecord]:
        """Registered agents not heard from over TCP within the liveness bound."""
        limit = LIVENESS_FACTOR * self.heartbeat
        return [r for r in self._agents.values() if now - r.last_tcp > limit]

    def by_address(self, address: PeerAddress) -> AgentRecord | None:
        return self._by_address.get(address)

    def local_addresses(self, addresses: Iterable[PeerAddress]) -> dict[PeerAddress, PeerAddress]:
        """The local address each of these agents (by public address) reported, for those that
        did (see dsss.server.chains)."""
        found: dict[PeerAddress, PeerAddress] = {}
        for address in addresses:
            rec = self._by_address.get(address)
            if rec is not None and rec.local is not None:
                found[address] = rec.local
        return found

    # --- location index -----------------------------------------------------------------------

    def have(
        self, rec: AgentRecord, blocks: Iterable[str], sizes: Iterable[int | None] | None = None
    ) -> None:
        blocks = list(blocks)
        for block, size in zip(blocks, sizes if sizes is not None else [None] * len(blocks)):
            rec.blocks.add(block)
            self._index.setdefault(block, set()).add(rec.agent_id)
            if size is not None:
                self._sizes[block] = size

    def size_of(self, block: str) -> int | None:
        return self._sizes.get(block)

    def indexed(self) -> Iterable[tuple[str, set[str]]]:
        """(part, ids of the agents that reported it), for every indexed part."""
        return self._index.items()

    def holders(self, block: str) -> set[str]:
        """Ids of the agents that reported `block` (empty if none)."""
        return set(self._index.get(block, ()))

    def gone(self, rec: AgentRecord, blocks: Iterable[str]) -> None:
        for block in blocks:
            rec.blocks.discard(block)
            holders = self._index.get(block)
            if holders is not None:
                holders.discard(rec.agent_id)
                if not holders:
                    del self._index[block]
                    self._sizes.pop(block, None)

    def space(self, rec: AgentRecord, capacity: int, free: int) -> None:
        rec.capacity = capacity
        rec.free = min(free, capacity)

    def candidates(self, block: str, now: float) -> list[AgentRecord]:
        """Live agents that reported storing this part (to be confirmed with WHO_HAS)."""
        ids = self._index.get(block, ())
        recs = [self._agents[i] for i in ids if i in self._agents]
        return [r for r in recs if self.is_live(r, now)]

    def counts(self) -> dict[str, int]:
        return {"agents": len(self._agents), "indexed-parts": len(self._index)}
