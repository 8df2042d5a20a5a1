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

Costs are bounded per call, whatever the index holds. The index is split into `SHARDS` buckets
(by the part's hash), so a sweep over it (the repairer's) copies one bucket at a time, never the
whole index. The agent's own claim set (`AgentRecord.blocks`) is the truth and the index a
reverse map to it: a holder is reported only while it still claims the part. So an agent that
leaves is forgotten at once, and its entries are taken out of the index in batches afterwards
(`drain`), each batch small; the parts it held come back from `drain` so that the repairer can
look at them first. An index entry holds the one id of its only holder as a string, and a tuple
of ids for a few, not a set: about half the memory of a claim.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Set as AbstractSet

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Union

from dsss.errors import AccessDenied
from dsss.model import PeerAddress

LIVENESS_FACTOR = 3

SHARDS = 4096
"""Buckets of the location index (a power of two)."""

_Holders = Union[str, tuple[str, ...]]


class ReplayError(AccessDenied):
    code = "replay"


class Journal(Protocol):
    """Where the registry reports what must outlive the process (dsss.server.store, through
    dsss.server.service.StoreJournal). Called synchronously; the journal writes in the background."""

    def identity(self, agent_id: str, seq: int, at: float) -> None: ...
    def forgotten(self, agent_ids: list[str]) -> None: ...
    def claimed(self, agent_id: str, claims: list[tuple[str, int | None]]) -> None: ...
    def proved(self, agent_id: str, part: str, size: int, at: float) -> None: ...
    def withdrawn(self, agent_id: str, parts: list[str]) -> None: ...


class ClaimSet(AbstractSet[str]):
    """One agent's claims: a set of part ids that can be walked a bucket at a time.

    Small (up to SPLIT_AT parts) it is one set; past that it splits, once, into BUCKETS sets by
    the part's hash, so that a walk over a large agent's claims (the audit sweep) copies a few
    tens of thousands of ids at a time, never all of them at once."""

    __slots__ = ("_buckets", "_mask", "_len")

    SPLIT_AT = 65_536
    BUCKETS = 64

    def __init__(self, parts: Iterable[str] = ()) -> None:
        self._buckets: list[set[str]] = [set()]
        self._mask = 0
        self._len = 0
        for part in parts:
            self.add(part)

    def add(self, part: str) -> None:
        bucket = self._buckets[hash(part) & self._mask]
        if part not in bucket:
            bucket.add(part)
            self._len += 1
            if self._len > self.SPLIT_AT and self._mask == 0:
                self._split()

    def _split(self) -> None:
        (whole,) = self._buckets
        self._mask = self.BUCKETS - 1
        self._buckets = [set() for _ in range(self.BUCKETS)]
        for part in whole:
            self._buckets[hash(part) & self._mask].add(part)

    def discard(self, part: str) -> None:
        bucket = self._buckets[hash(part) & self._mask]
        if part in bucket:
            bucket.remove(part)
            self._len -= 1

    def __contains__(self, part: object) -> bool:
        return isinstance(part, str) and part in self._buckets[hash(part) & self._mask]

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[str]:
        for bucket in self._buckets:
            yield from bucket

    def bucket_count(self) -> int:
        return len(self._buckets)

    def bucket(self, i: int) -> list[str]:
        """The claims in bucket `i` (a copy); empty past the last bucket."""
        return list(self._buckets[i]) if i < len(self._buckets) else []


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
    blocks: ClaimSet = field(default_factory=ClaimSet)
    # What its garbage collection reported (COLLECTED): bytes whose leases all ended, waiting
    # to be collected, and bytes collected since the agent started.
    expired_bytes: int = 0
    collected_bytes: int = 0
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
FORGET_BATCH = 10_000
"""Most remembered identities `forget_stale` looks at in one call (it is called every heartbeat)."""
MAX_SEQ_MEMORY = 1_000_000
"""Most identities remembered; beyond, the oldest that are not registered are forgotten."""


class Registry:
    def __init__(
        self,
        heartbeat: float,
        token_source: Callable[[], str] = lambda: secrets.token_hex(16),
        journal: Journal | None = None,
    ) -> None:
        self.heartbeat = heartbeat
        self.journal = journal
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
        self._index: list[dict[str, _Holders]] = [{} for _ in range(SHARDS)]
        self._indexed = 0
        self._sizes: dict[str, int] = {}
        self._size_proven: set[str] = set()
        # Claims of agents that left, still to be taken out of the index: (agent id, its parts).
        self._draining: deque[tuple[str, Iterator[str]]] = deque()

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
        if self.journal is not None:
            self.journal.identity(agent_id, seq, now)
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
        gone: list[str] = []
        # Oldest first, at most FORGET_BATCH entries a call (never a copy of all).
        for _ in range(min(len(self._last_seq), FORGET_BATCH)):
            agent_id, (_, seq_at) = next(iter(self._last_seq.items()))
            if now - seq_at <= older_than and len(self._last_seq) <= keep:
                break  # oldest first: the rest are newer
            if agent_id in self._agents:
                # Registered now: kept, as if it had registered now.
                self._last_seq[agent_id] = (self._last_seq[agent_id][0], now)
                self._last_seq.move_to_end(agent_id)
                continue
            del self._last_seq[agent_id]
            gone.append(agent_id)
            forgotten += 1
        if gone and self.journal is not None:
            self.journal.forgotten(gone)
        return forgotten

    def load_identities(self, identities: dict[str, tuple[int, float]]) -> None:
        """Remember these identities' registration numbers (read back from the store at start),
        oldest first."""
        for agent_id, entry in sorted(identities.items(), key=lambda kv: kv[1][1]):
            if agent_id not in self._last_seq or self._last_seq[agent_id][0] < entry[0]:
                self._last_seq[agent_id] = entry
                self._last_seq.move_to_end(agent_id)

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
        if rec.blocks:
            # Taken out of the index by `drain`, a batch at a time: until then the entries are
            # not reported (the agent is gone, or a new registration of it claims anew).
            self._draining.append((rec.agent_id, iter(rec.blocks)))
        rec.blocks = ClaimSet()
        rec.proven = {}

    def drain(self, budget: int) -> list[str]:
        """Take up to `budget` claims of agents that left out of the index; returns the parts
        that lost a holder and still have others (they may be short of copies now)."""
        touched: list[str] = []
        while budget > 0 and self._draining:
            agent_id, blocks = self._draining[0]
            current = self._agents.get(agent_id)
            for block in blocks:
                budget -= 1
                if current is None or block not in current.blocks:
                    if self._unindex(agent_id, block):
                        touched.append(block)
                if budget <= 0:
                    break
            else:
                self._draining.popleft()
        return touched

    def draining(self) -> int:
        """Agents that left whose claims are still being taken out of the index."""
        return len(self._draining)

    def _shard(self, block: str) -> dict[str, _Holders]:
        return self._index[hash(block) & (SHARDS - 1)]

    def _index_add(self, block: str, agent_id: str) -> None:
        shard = self._shard(block)
        holders = shard.get(block)
        if holders is None:
            shard[block] = agent_id
            self._indexed += 1
        elif isinstance(holders, str):
            if holders != agent_id:
                shard[block] = (holders, agent_id)
        elif agent_id not in holders:
            shard[block] = holders + (agent_id,)

    def _unindex(self, agent_id: str, block: str) -> bool:
        """Take one holder out of a part's entry; True if the part still has others."""
        shard = self._shard(block)
        holders = shard.get(block)
        if holders is None:
            return False
        if isinstance(holders, str):
            left: tuple[str, ...] = () if holders == agent_id else (holders,)
        else:
            left = tuple(h for h in holders if h != agent_id)
        if not left:
            del shard[block]
            self._indexed -= 1
            self._sizes.pop(block, None)
            self._size_proven.discard(block)
            return False
        shard[block] = left[0] if len(left) == 1 else left
        return True

    def _claimants(self, block: str) -> Iterator[AgentRecord]:
        """The registered agents that claim `block` now."""
        holders = self._shard(block).get(block)
        if holders is None:
            return
        for agent_id in (holders,) if isinstance(holders, str) else holders:
            rec = self._agents.get(agent_id)
            if rec is not None and block in rec.blocks:
                yield rec

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
        conflicts: list[str] = []
        if self._agents.get(rec.agent_id) is not rec:
            return conflicts  # it left: nothing of it is indexed any more
        for block, size in zip(blocks, sizes if sizes is not None else [None] * len(blocks)):
            if size is not None and block in self._size_proven and self._sizes.get(block) != size:
                conflicts.append(block)
                continue
            rec.blocks.add(block)
            self._index_add(block, rec.agent_id)
            if size is not None and block not in self._sizes:
                self._sizes[block] = size  # the claimed size, until an audit proves one
        if self.journal is not None:
            taken = set(conflicts)
            self.journal.claimed(rec.agent_id, [(b, n) for b, n in zip(
                blocks, sizes if sizes is not None else [None] * len(blocks)) if b not in taken])
        return conflicts

    def restore(self, rec: AgentRecord, claims: Iterable[tuple[str, int | None, bool, float | None]]) -> int:
        """Take back claims the store kept for this agent (part, size, whether the size is
        proven, when the agent proved it), which it confirmed with a digest; nothing is written
        back. Returns how many were restored."""
        if self._agents.get(rec.agent_id) is not rec:
            return 0
        n = 0
        for block, size, size_proven, proven_at in claims:
            rec.blocks.add(block)
            self._index_add(block, rec.agent_id)
            if proven_at is not None:
                rec.proven[block] = proven_at
            if size is not None and (size_proven or block not in self._sizes):
                if block not in self._size_proven:
                    self._sizes[block] = size
                if size_proven:
                    self._size_proven.add(block)
            n += 1
        return n

    def proved(self, rec: AgentRecord, block: str, size: int, now: float) -> None:
        """The agent passed an audit of `block`, which proved its size: a claim (made now if the
        agent had not claimed it), proven now, and the part's size from now on."""
        if self._agents.get(rec.agent_id) is not rec:
            return  # it left while the audit was under way
        rec.blocks.add(block)
        self._index_add(block, rec.agent_id)
        rec.proven[block] = now
        self._sizes[block] = size
        self._size_proven.add(block)
        if self.journal is not None:
            self.journal.proved(rec.agent_id, block, size, now)

    def size_of(self, block: str) -> int | None:
        """The part's size: proven, or else as first claimed (see `size_proven`)."""
        return self._sizes.get(block)

    def size_proven(self, block: str) -> bool:
        return block in self._size_proven

    def shard_parts(self, shard: int) -> list[str]:
        """The parts in one bucket of the index (a copy), for a sweep over it a bucket at a time."""
        return list(self._index[shard])

    def holders(self, block: str) -> set[str]:
        """Ids of the registered agents that claim `block` (empty if none)."""
        return {rec.agent_id for rec in self._claimants(block)}

    def is_indexed(self, block: str) -> bool:
        """Whether some registered agent claims `block`."""
        return next(self._claimants(block), None) is not None

    def claimants(self, block: str) -> list[AgentRecord]:
        """The registered agents that claim `block`, live or not."""
        return list(self._claimants(block))

    def proven_holders(self, block: str, now: float, freshness: float) -> list[AgentRecord]:
        """Live agents that claim `block` and proved it within `freshness` seconds."""
        found = []
        for rec in self._claimants(block):
            if not self.is_live(rec, now):
                continue
            at = rec.proven.get(block)
            if at is not None and now - at <= freshness:
                found.append(rec)
        return found

    def gone(self, rec: AgentRecord, blocks: Iterable[str]) -> list[str]:
        """The agent withdrew these claims (GONE), or they were dropped (a failed audit).
        Returns the parts that lost this holder and still have others (they may be short)."""
        touched = []
        withdrawn = []
        for block in blocks:
            if block in rec.blocks:
                withdrawn.append(block)
            rec.blocks.discard(block)
            rec.proven.pop(block, None)
            if self._unindex(rec.agent_id, block):
                touched.append(block)
        if withdrawn and self.journal is not None and self._agents.get(rec.agent_id) is rec:
            self.journal.withdrawn(rec.agent_id, withdrawn)
        return touched

    # --- claims, as the audit scheduler sees them (dsss.server.audit.ClaimSource) ---------------

    def claims_of(self, agent_id: str) -> ClaimSet:
        rec = self._agents.get(agent_id)
        return rec.blocks if rec is not None else ClaimSet()

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
        return [r for r in self._claimants(block) if self.is_live(r, now)]

    def counts(self) -> dict[str, int]:
        return {"agents": len(self._agents), "indexed-parts": self._indexed}
