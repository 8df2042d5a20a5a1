# -*- test-case-name: tests.unit.test_registry -*-
"""The discovery server's knowledge of agents: pure, clock-free, no I/O.

Every method that depends on time takes `now` (seconds). An agent is *live* when it is registered,
its UDP address is known, and both its control connection and its UDP pings were heard from within
`3 * heartbeat` seconds.

The location index holds *claims*: an agent's HAVE (or a WHO_HAS "1") says it stores a part.
Beside each claim it keeps when the agent last proved it (passed an audit of that part,
dsss.server.audit); only a claim proven within the freshness counts as a replica
(`proven_holders`). A part has one size: the first size claimed is kept until an audit proves
one, and a proven size is the truth: a later claim of another size is refused (`have` returns
it, so that the claimant gets a strike) and changes nothing.
"""

from __future__ import annotations

from collections import OrderedDict

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
    # When this agent last passed an audit of each part it claims (parts never proven are absent).
    proven: dict[str, float] = field(default_factory=dict)

    def summary(self, now: float, heartbeat: float) -> dict[str, Any]:
        return {
            "id": self.agent_id,
            "address": str(self.address) if self.address else None,
            "capacity": self.capacity,
            "free": self.free,
            "used": max(0, self.capacity - self.free),
            "parts": len(self.blocks),
            "proven": len(self.proven),
            "version": self.version,
            "last-heartbeat": round(now - max(self.last_tcp, self.last_udp or 0.0), 3),
        }


SEQ_MEMORY = 7 * 86400.0
"""Seconds the registration number of an identity that left is remembered."""
MAX_SEQ_MEMORY = 1_000_000
"""Most identities remembered; beyond, the oldest that are not registered are forgotten."""


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
        # The last registration number of each identity, and when it registered, oldest first.
        self._last_seq: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # Changes whenever an agent joins, leaves or moves (dsss.server.placement rebuilds its
        # candidate table on it).
        self.generation = 0
        self._index: dict[str, set[str]] = {}
        self._sizes: dict[str, int] = {}
        self._size_proven: set[str] = set()

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
        entry = self._last_seq.get(agent_id)
        last = entry[0] if entry is not None else None
        if last is not None and seq <= last:
            raise ReplayError(f"registration seq {seq} is not newer than {last} (replay?)")
        self._last_seq[agent_id] = (seq, now)
        self._last_seq.move_to_end(agent_id)
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

    def forget_stale(self, now: float, older_than: float = SEQ_MEMORY, keep: int = MAX_SEQ_MEMORY) -> int:
        """Forget the registration numbers of identities that are not registered and last
        registered more than `older_than` seconds ago, and of the oldest such beyond `keep`;
        returns how many were forgotten. Safe against replay: a REGISTER is signed over the
        connection's fresh session challenge, so an old one cannot be sent again; the number
        only orders the registrations of one identity while the server remembers it."""
        forgotten = 0
        for agent_id in list(self._last_seq):
            seq_at = self._last_seq[agent_id][1]
            if now - seq_at <= older_than and len(self._last_seq) <= keep:
                break  # oldest first: the rest are newer
            if agent_id in self._agents:
                # Registered now: kept, as if it had registered now.
                self._last_seq[agent_id] = (self._last_seq[agent_id][0], now)
                self._last_seq.move_to_end(agent_id)
                continue
            del self._last_seq[agent_id]
            forgotten += 1
        return forgotten

    def remembered_identities(self) -> int:
        return len(self._last_seq)

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
            self._unindex(rec, block)
        rec.blocks = set()
        rec.proven = {}

    def _unindex(self, rec: AgentRecord, block: str) -> None:
        holders = self._index.get(block)
        if holders is not None:
            holders.discard(rec.agent_id)
            if not holders:
                del self._index[block]
                self._sizes.pop(block, None)
                self._size_proven.discard(block)

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
    ) -> list[str]:
        """Record the agent's claims. A claim whose size contradicts the part's proven size is
        not recorded; those parts are returned (a strike against the claimant)."""
        blocks = list(blocks)
        conflicts = []
        for block, size in zip(blocks, sizes if sizes is not None else [None] * len(blocks)):
            if size is not None and block in self._size_proven and self._sizes.get(block) != size:
                conflicts.append(block)
                continue
            rec.blocks.add(block)
            self._index.setdefault(block, set()).add(rec.agent_id)
            if size is not None and block not in self._sizes:
                self._sizes[block] = size  # the claimed size, until an audit proves one
        return conflicts

    def proved(self, rec: AgentRecord, block: str, size: int, now: float) -> None:
        """The agent passed an audit of `block`, which proved its size: a claim (made now if the
        agent had not claimed it), proven now, and the part's size from now on."""
        rec.blocks.add(block)
        self._index.setdefault(block, set()).add(rec.agent_id)
        rec.proven[block] = now
        self._sizes[block] = size
        self._size_proven.add(block)

    def size_of(self, block: str) -> int | None:
        """The part's size: proven, or else as first claimed (see `size_proven`)."""
        return self._sizes.get(block)

    def size_proven(self, block: str) -> bool:
        return block in self._size_proven

    def indexed_parts(self) -> list[str]:
        """Every indexed part, as a list (a copy: the index may change while it is used)."""
        return list(self._index)

    def indexed(self) -> Iterable[tuple[str, set[str]]]:
        """(part, ids of the agents that claim it), for every indexed part."""
        return self._index.items()

    def holders(self, block: str) -> set[str]:
        """Ids of the agents that claim `block` (empty if none)."""
        return set(self._index.get(block, ()))

    def proven_holders(self, block: str, now: float, freshness: float) -> list[AgentRecord]:
        """Live agents that claim `block` and proved it within `freshness` seconds."""
        found = []
        for agent_id in self._index.get(block, ()):
            rec = self._agents.get(agent_id)
            if rec is None or not self.is_live(rec, now):
                continue
            at = rec.proven.get(block)
            if at is not None and now - at <= freshness:
                found.append(rec)
        return found

    def gone(self, rec: AgentRecord, blocks: Iterable[str]) -> None:
        """The agent withdrew these claims (GONE), or they were dropped (a failed audit)."""
        for block in blocks:
            rec.blocks.discard(block)
            rec.proven.pop(block, None)
            self._unindex(rec, block)

    # --- claims, as the audit scheduler sees them (dsss.server.audit.ClaimSource) ---------------

    def claims_of(self, agent_id: str) -> set[str]:
        rec = self._agents.get(agent_id)
        return rec.blocks if rec is not None else set()

    def is_claimed(self, agent_id: str, block: str) -> bool:
        rec = self._agents.get(agent_id)
        return rec is not None and block in rec.blocks

    def proven_at(self, agent_id: str, block: str) -> float | None:
        rec = self._agents.get(agent_id)
        return rec.proven.get(block) if rec is not None else None

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
