# -*- test-case-name: tests.unit.test_repair -*-
"""Automatic re-replication: parts that stay below the replica count get copied again.

A part whose live holders are fewer than `--replicas` (an agent went away, or reported its copy
corrupt) is noted; if it is still short `repair_after` seconds later, the server picks a live
holder as the source and a target as it would for a new copy (`dsss.server.placement`: never an
agent on the network of a live holder), asks the target for an introduction key for the source's
address, and sends the source `REPLICATE`. Two agents behind one NAT that reported their local
addresses (`LOCAL`) are given those instead: the copy crosses their LAN
(`dsss.server.chains.hop_addresses`). The target's HAVE then restores the count. Bounded: a few
copies at a time, each part retried no more often than `repair_after`.

A share of an erasure-coded part (a share ID, `dsss.model.is_share_id`) is wanted on one agent
only: its redundancy is the part's other shares, so it is never copied (`wanted_holders`).
"""

from __future__ import annotations

import random
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from dsss.errors import DSSSError, Unavailable
from dsss.model import PeerAddress, is_share_id
from dsss.server.chains import hop_addresses
from dsss.server.registry import Registry
from dsss.wire import control as wc

log = Logger()


class _QueryTimeout(Protocol):
    @property
    def query_timeout(self) -> float: ...


class RepairingServer(Protocol):
    """What re-replication uses of the server (dsss.server.service.DiscoveryServer)."""

    @property
    def config(self) -> _QueryTimeout: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def replicas(self) -> int: ...

    def now(self) -> float: ...
    def warming(self) -> bool: ...
    async def introduce(self, to: PeerAddress, client: PeerAddress, size: int, block: str,
                        client_local: PeerAddress | None = None) -> dict[str, Any]: ...


def wanted_holders(block: str, replicas: int) -> int:
    """How many live agents should hold `block`: one for a share (the other shares of its part
    are its redundancy), `replicas` for a plain part. A part with fewer (but some) is short."""
    return 1 if is_share_id(block) else replicas


class Repairer:
    def __init__(self, server: RepairingServer, repair_after: float, max_in_flight: int = 8,
                 rng: random.Random | None = None) -> None:
        self.server = server
        self.repair_after = repair_after
        self.max_in_flight = max_in_flight
        self.rng = rng or random.SystemRandom()
        self.short_since: dict[str, float] = {}
        self.last_try: dict[str, float] = {}
        self.in_flight: set[str] = set()
        self.started = 0
        self.failed = 0

    def plan(self, now: float) -> list[str]:
        """Note the parts below the replica count (`wanted_holders`: never a share); return
        those due for a copy."""
        registry = self.server.registry
        replicas = self.server.replicas
        due = []
        short = {}
        for block, holders in registry.indexed():
            wanted = wanted_holders(block, replicas)
            if wanted < 2:
                continue  # a share (or replicas 1): one live holder is all it wants
            live = sum(1 for i in holders if (r := registry.get(i)) is not None and registry.is_live(r, now))
            if 0 < live < wanted:
                since = self.short_since.get(block, now)
                short[block] = since
                if (
                    now - since >= self.repair_after
                    and block not in self.in_flight
                    and now - self.last_try.get(block, float("-inf")) >= self.repair_after
                ):
                    due.append(block)
        self.short_since = short
        self.last_try = {b: t for b, t in self.last_try.items() if b in short}
        return due[: max(0, self.max_in_flight - len(self.in_flight))]

    def tick(self) -> None:
        now = self.server.now()
        if self.server.warming():
            return  # agents may still be re-registering after a restart
        for block in self.plan(now):
            self.in_flight.add(block)
            self.last_try[block] = now
            d = defer.ensureDeferred(self._repair(block))
            d.addErrback(lambda f: log.failure("repair failed", f))
            d.addBoth(lambda _, b=block: self.in_flight.discard(b))

    async def _repair(self, block: str) -> None:
        server = self.server
        registry = server.registry
        now = server.now()
        if is_share_id(block):
            return  # never copied: a share lives on one agent
        size = registry.size_of(block)
        if size is None:
            return  # the holders did not report its size: only `dsss.client repair` can help
        holders = [registry.get(i) for i in registry.holders(block)]
        live = [r for r in holders if r is not None and registry.is_live(r, now) and r.address]
        if not live:
            return
        source = self.rng.choice(live)
        try:
            targets = server.placer.place(registry, size, 1, now,
                                          exclude=[r.address for r in live if r.address])
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
                "started": self.started, "failed": self.failed}
