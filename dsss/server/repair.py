# -*- test-case-name: tests.unit.test_repair -*-
"""Automatic re-replication: parts that stay below the replica count get copied again.

Claims are not replicas: a part's replicas are its live holders that proved it (passed an audit
of it) within `--proof-freshness`. A part with fewer proven holders than `--replicas` (an agent
went away, reported its copy corrupt, failed an audit, or was disqualified) is noted; if it is
still short `repair_after` seconds later, the server first audits its live holders that claim it
without a fresh proof (their claims may be true: then nothing needs copying; a failed audit drops
the claim). If it is still short, it picks a proven holder as the source and a target as it would for a new copy
(`dsss.server.placement`: never an agent that claims a copy, nor one on the network of a live
holder), asks the target for an introduction key for the source's address,
and sends the source `REPLICATE`. Two agents behind
one NAT that reported their local addresses (`LOCAL`) are given those instead: the copy crosses
their LAN (`dsss.server.chains.hop_addresses`). The target's HAVE then restores the count. Bounded: a few copies at a time, each part retried no more often than
`repair_after`.

A share of an erasure-coded part (a share ID, `dsss.model.is_share_id`) is wanted on one agent
only: its redundancy is the part's other shares, so it is never copied (`wanted_holders`).
"""

from __future__ import annotations

import itertools
import random
import secrets
from collections import deque
from typing import Any, Iterable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from dsss.errors import DSSSError, Unavailable
from dsss.model import PeerAddress, is_share_id
from dsss.server.auditor import Auditor
from dsss.server.chains import hop_addresses
from dsss.server.placement import Placer
from dsss.server.registry import SHARDS, AgentRecord, Registry
from dsss.server.settings import ProofSettings
from dsss.server.store import MemoryStore, Store
from dsss.wire import control as wc

log = Logger()


class RepairingServer(Protocol):
    """What re-replication uses of the server (dsss.server.service.DiscoveryServer)."""

    @property
    def config(self) -> ProofSettings: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def replicas(self) -> int: ...

    @property
    def placer(self) -> Placer: ...
    @property
    def auditor(self) -> Auditor: ...

    def now(self) -> float: ...
    def warming(self) -> bool: ...
    async def introduce(self, to: PeerAddress, client: PeerAddress, size: int, block: str,
                        client_local: PeerAddress | None = None) -> dict[str, Any]: ...


def wanted_holders(block: str, replicas: int) -> int:
    """How many live agents should hold `block`: one for a share (the other shares of its part
    are its redundancy), `replicas` for a plain part. A part with fewer (but some) is short."""
    return 1 if is_share_id(block) else replicas


REPAIR_LEASE = 120.0
"""Seconds a server holds the parts it took from the repair queue before others may take them."""

PLAN_BATCH = 2_000
"""Parts one tick of the repairer looks at: from the parts that just lost a holder, from the
sweep over the index, and from those already short (each at most this many)."""


class Repairer:
    def __init__(self, server: RepairingServer, repair_after: float, max_in_flight: int = 8,
                 rng: random.Random | None = None, queue: Store | None = None,
                 owner: str | None = None) -> None:
        self.server = server
        # Parts that lost a holder are queued in the store (shared by every server on it) and
        # taken from it in disjoint batches: each is looked at by one server.
        self.queue: Store = queue if queue is not None else MemoryStore()
        self.owner = owner or secrets.token_hex(8)
        self._taking = False
        self.repair_after = repair_after
        self.max_in_flight = max_in_flight
        self.rng = rng or random.SystemRandom()
        self.short_since: dict[str, float] = {}
        self.last_try: dict[str, float] = {}
        self.in_flight: set[str] = set()
        # Parts that lost a holder (an agent left): looked at before the sweep.
        self._suspects: deque[str] = deque()
        # The sweep over the index, a bucket at a time: the bucket being walked and the rest of it.
        self._shard = -1
        self._sweep: list[str] = []
        self._sweep_at = 0
        self.sweeps = 0
        self.started = 0
        self.failed = 0
        self.audits = 0

    def _proven(self, rec: AgentRecord | None, block: str, now: float) -> bool:
        registry = self.server.registry
        if rec is None or not registry.is_live(rec, now):
            return False
        at = rec.proven.get(block)
        return at is not None and now - at <= self.server.config.proof_freshness

    def suspect(self, blocks: Iterable[str]) -> None:
        """These parts lost a holder: queued, and looked at before the sweep by whichever
        server takes them from the queue."""
        blocks = list(blocks)
        if blocks:
            self.queue.enqueue_repairs(blocks, self.server.now()).addErrback(
                lambda f: log.failure("queueing parts for repair failed", f))

    def _take(self, now: float) -> None:
        """Take a batch of queued parts (at once from a memory store; from a database, in time
        for a later tick)."""
        if self._taking or len(self._suspects) >= PLAN_BATCH:
            return
        self._taking = True

        def taken(parts: list[str]) -> None:
            self._taking = False
            self._suspects.extend(parts)

        def failed(f: Any) -> None:
            self._taking = False
            log.info("could not take parts from the repair queue: {why}", why=f.getErrorMessage())

        self.queue.claim_repairs(self.owner, PLAN_BATCH, now, REPAIR_LEASE).addCallbacks(taken, failed)

    def _next_of_sweep(self, budget: int) -> list[str]:
        """Up to `budget` parts from the sweep over the index, a bucket copied at a time."""
        registry = self.server.registry
        taken: list[str] = []
        buckets = 0
        while len(taken) < budget and buckets <= SHARDS:
            if self._sweep_at >= len(self._sweep):
                self._shard = (self._shard + 1) % SHARDS
                if self._shard == 0:
                    self.sweeps += 1
                self._sweep = registry.shard_parts(self._shard)
                self._sweep_at = 0
                buckets += 1
            chunk = self._sweep[self._sweep_at : self._sweep_at + budget - len(taken)]
            self._sweep_at += len(chunk)
            taken.extend(chunk)
        return taken

    def _look_at(self, block: str, now: float) -> None:
        registry = self.server.registry
        wanted = wanted_holders(block, self.server.replicas)
        freshness = self.server.config.proof_freshness
        live = proven = 0
        for rec in registry.claimants(block):
            if registry.is_live(rec, now):
                live += 1
                at = rec.proven.get(block)
                if at is not None and now - at <= freshness:
                    proven += 1
        if wanted >= 2 and live > 0 and proven < wanted:
            self.short_since.setdefault(block, now)
        else:
            self._forget(block)

    def plan(self, now: float) -> list[str]:
        """Note the parts below the replica count in proven holders (`wanted_holders`: never a
        share) that some live agent still claims; return those due for an audit or a copy.

        Bounded: each call looks at up to PLAN_BATCH parts that just lost a holder, the next
        PLAN_BATCH parts of a sweep over the index (one bucket copied at a time) and the
        PLAN_BATCH parts longest short, so no tick walks the whole index; a part that loses a
        holder is looked at within a few ticks, any other within one sweep."""
        self._take(now)
        looked = [self._suspects.popleft() for _ in range(min(PLAN_BATCH, len(self._suspects)))]
        for block in looked:
            self._look_at(block, now)
        if looked:
            # Noted in short_since when short: done with them in the queue.
            self.queue.finish_repairs(self.owner, looked).addErrback(lambda f: None)
        for block in self._next_of_sweep(PLAN_BATCH):
            self._look_at(block, now)
        due: list[str] = []
        gone = []
        room = max(0, self.max_in_flight - len(self.in_flight))
        for block, since in itertools.islice(self.short_since.items(), PLAN_BATCH):
            if len(due) >= room:
                break
            if not self.server.registry.is_indexed(block):
                gone.append(block)
            elif (
                now - since >= self.repair_after
                and block not in self.in_flight
                and now - self.last_try.get(block, float("-inf")) >= self.repair_after
            ):
                due.append(block)
        for block in gone:
            self._forget(block)
        return due

    def _forget(self, block: str) -> None:
        self.short_since.pop(block, None)
        self.last_try.pop(block, None)

    def tick(self) -> None:
        now = self.server.now()
        if self.server.warming():
            return  # agents may still be re-registering after a restart
        for block in self.plan(now):
            self.in_flight.add(block)
            self.last_try[block] = now
            d = defer.ensureDeferred(self._repair(block))
            d.addErrback(lambda f: log.failure("repair failed", f))
            d.addBoth(lambda _, b: self.in_flight.discard(b), block)

    async def _repair(self, block: str) -> None:
        server = self.server
        registry = server.registry
        now = server.now()
        if is_share_id(block):
            return  # never copied: a share lives on one agent
        live = [r for r in registry.claimants(block) if registry.is_live(r, now) and r.address]
        unproven = [r for r in live if not self._proven(r, block, now)]
        # Never copied to an agent that claims it (proven or not), nor to one that just failed
        # its audit of it.
        avoid = [r.address for r in live if r.address]
        if unproven:
            # Claims first: audit the holders that have not proven it lately (at most as many
            # as are missing); a failed audit drops the claim.
            missing = wanted_holders(block, server.replicas) - (len(live) - len(unproven))
            self.audits += min(len(unproven), missing)
            await defer.gatherResults([
                defer.ensureDeferred(server.auditor.audit_now(r, block, charge=True))
                for r in unproven[:missing]
            ])
            now = server.now()
            live = [r for r in registry.claimants(block) if registry.is_live(r, now) and r.address]
        proven = [r for r in live if self._proven(r, block, now)]
        if len(proven) >= wanted_holders(block, server.replicas):
            return  # its claims were true
        size = registry.size_of(block)
        if not proven or size is None or not registry.size_proven(block):
            return  # nothing proven to copy from: only `dsss.client repair` can help
        source = self.rng.choice(proven)
        try:
            targets = server.placer.place(registry, size, 1, now,
                                          exclude=avoid + [r.address for r in live if r.address])
        except Unavailable as e:
            log.info("part {block} is short of replicas, but no agent can take a copy: {why}",
                     block=block[:16], why=str(e))
            return
        target = targets[0]
        assert source.address is not None and target.address is not None
        self.started += 1
        # Two agents behind one NAT that reported their local addresses copy across their LAN.
        local = registry.local_addresses([source.address, target.address])
        ((from_, via),) = hop_addresses([source.address, target.address], local)
        try:
            intro = await server.introduce(target.address, from_, size, block)
            reply = await source.handle.request(
                wc.Replicate(block, via or target.address, target.agent_id, intro["introduction-key"]),
                server.config.query_timeout,
            )
        except DSSSError as e:
            self.failed += 1
            log.info("re-replicating {block} failed: {e}", block=block[:16], e=str(e))
            return
        if not isinstance(reply, wc.Ok):
            self.failed += 1
            return
        log.info(
            "re-replicating {block} from {source} to {target}",
            block=block[:16], source=str(source.address), target=str(target.address),
        )

    def status(self) -> dict[str, Any]:
        return {"short": len(self.short_since), "in-flight": len(self.in_flight),
                "sweeps": self.sweeps, "suspects": len(self._suspects), "started": self.started,
                "failed": self.failed, "audits": self.audits}
