# -*- test-case-name: tests.integration.test_leases -*-
"""Taking, renewing and releasing leases on every holder of a file's blocks. No parsing, no sockets.

A file is kept by its owner's leases on its manifest and on each of its parts (or shares), on
every agent that holds them (dsss/leases.py). `take_leases` signs one record per block and sends
them, batched per agent (at most MAX_BATCH records per LEASE message), to every holder: those the
session stored the block on, else those the server knows (who-has). `put` calls it for
`--keep` once the manifest is stored; `renew` for the blocks of files already stored; `rm` with
expiry 0 (releases).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from nacl.public import PrivateKey
from twisted.internet import defer
from twisted.logger import Logger

from dsss.client.discovery import DiscoveryClient, Introduction
from dsss.client.peer import PeerNetwork
from dsss.crypto.manifest import Manifest
from dsss.errors import DSSSError, NotFound, Unavailable
from dsss.leases import MAX_BATCH, OK, LeaseRecord, LeaseSigner, Outcome, lease_signing_key
from dsss.model import PeerAddress

log = Logger()


class Session(Protocol):
    """What lease operations use of a session (dsss.client.session.Session)."""

    @property
    def discovery(self) -> DiscoveryClient: ...
    @property
    def peers(self) -> PeerNetwork: ...
    @property
    def leases(self) -> LeaseSigner | None: ...
    @property
    def holders(self) -> dict[str, set[PeerAddress]]: ...
    @property
    def introduced(self) -> dict[PeerAddress, Introduction]: ...

LOOKUPS_AT_ONCE = 16
"""who-has requests a lease operation has in flight at once."""
AGENTS_AT_ONCE = 8
"""Agents a lease operation talks to at once."""


class LeaseIncomplete(Unavailable):
    """Some block could not be leased (or released) on any of its holders."""

    code = "lease-incomplete"


@dataclass
class LeaseReport:
    """What a lease operation did: per block, each holder's outcome or the error reaching it."""

    outcomes: dict[str, dict[PeerAddress, Outcome]] = field(default_factory=dict)
    errors: dict[str, dict[PeerAddress, str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # blocks no holder is known for

    def ok(self, block: str) -> list[PeerAddress]:
        return [a for a, o in self.outcomes.get(block, {}).items() if o.status == OK]

    def failed_blocks(self) -> list[str]:
        """Blocks that no holder took the record for."""
        blocks = set(self.outcomes) | set(self.errors) | set(self.missing)
        return sorted(b for b in blocks if not self.ok(b))

    def shared_blocks(self) -> list[str]:
        """Blocks on which some holder still has another owner's live lease."""
        return sorted(b for b, per in self.outcomes.items() if any(o.others for o in per.values()))

    def holders(self) -> int:
        return len({a for per in self.outcomes.values() for a in per})


def signer_for(key: PrivateKey) -> LeaseSigner:
    """The user's lease signer (its key derived from the user's key: docs/crypto.md)."""
    return LeaseSigner(lease_signing_key(key))


async def _holders(session: Session, blocks: list[str], report: LeaseReport) -> dict[str, list[PeerAddress]]:
    found: dict[str, list[PeerAddress]] = {}
    todo = [b for b in blocks if b not in session.holders]
    for b in blocks:
        if b in session.holders:
            found[b] = sorted(session.holders[b], key=str)
    slots = defer.DeferredSemaphore(LOOKUPS_AT_ONCE)

    async def look(block: str) -> None:
        await slots.acquire()
        try:
            found[block] = await session.discovery.who_has(block)
        except NotFound:
            found[block] = []
        except DSSSError as e:
            report.errors.setdefault(block, {})[PeerAddress("0.0.0.0", 0)] = f"who-has: {e}"
            found[block] = []
        finally:
            slots.release()

    await defer.gatherResults([defer.ensureDeferred(look(b)) for b in todo])
    for b in blocks:
        if not found.get(b):
            report.missing.append(b)
    return found


async def _introduction(session: Session, agent: PeerAddress, block: str) -> Introduction:
    intro = session.introduced.get(agent)
    if intro is not None:
        return intro
    me = session.peers.public_address
    assert me is not None
    # A download introduction for one of its blocks: the agent punches towards us (the LEASE
    # itself needs no key: its records are signed).
    intro = await session.discovery.introduce_me(agent, block, 0, me)
    session.introduced[agent] = intro
    return intro


async def send_records(session: Session, records: Iterable[LeaseRecord]) -> LeaseReport:
    """Send each record to every holder of its block; what each holder answered."""
    report = LeaseReport()
    by_block = {r.block: r for r in records}
    holders = await _holders(session, list(by_block), report)
    per_agent: dict[PeerAddress, list[LeaseRecord]] = {}
    for block, agents in holders.items():
        for agent in agents:
            per_agent.setdefault(agent, []).append(by_block[block])
    slots = defer.DeferredSemaphore(AGENTS_AT_ONCE)

    async def one(agent: PeerAddress, batch: list[LeaseRecord]) -> None:
        await slots.acquire()
        try:
            for attempt in (0, 1):
                try:
                    intro = await _introduction(session, agent, batch[0].block)
                    for start in range(0, len(batch), MAX_BATCH):
                        group = batch[start : start + MAX_BATCH]
                        outcomes = await session.peers.lease(intro, group)
                        for r, o in zip(group, outcomes):
                            report.outcomes.setdefault(r.block, {})[agent] = o
                    return
                except DSSSError as e:
                    # The put's connection may have closed: once more with a new introduction.
                    session.introduced.pop(agent, None)
                    if attempt:
                        for r in batch:
                            if agent not in report.outcomes.get(r.block, {}):
                                report.errors.setdefault(r.block, {})[agent] = str(e)
        finally:
            slots.release()

    await defer.gatherResults([defer.ensureDeferred(one(a, b)) for a, b in per_agent.items()])
    return report


async def take_leases(session: Session, blocks: Iterable[str], duration: int,
                      now: float | None = None) -> LeaseReport:
    """Lease `blocks` for `duration` seconds from now on every holder (renew: the same)."""
    assert session.leases is not None
    expiry = int(time.time() if now is None else now) + duration
    return await send_records(session, [session.leases.sign(b, expiry) for b in dict.fromkeys(blocks)])


async def release_leases(session: Session, blocks: Iterable[str]) -> LeaseReport:
    """Drop this owner's leases on `blocks` on every holder (rm)."""
    assert session.leases is not None
    return await send_records(session, [session.leases.release(b) for b in dict.fromkeys(blocks)])


def manifest_blocks(address: str, manifest: Manifest) -> list[str]:
    """A file's stored blocks: its manifest first, then every part's block or shares."""
    return [address] + [b for p in manifest.parts for b in p.blocks]


def check_report(report: LeaseReport, what: str) -> None:
    """Raise LeaseIncomplete naming the blocks no holder took the record for."""
    failed = report.failed_blocks()
    if failed:
        reasons = [e for b in failed for e in report.errors.get(b, {}).values()][:3]
        detail = "; ".join(reasons) or "no agent holds them now"
        raise LeaseIncomplete(f"could not {what} {len(failed)} block(s), e.g. {failed[0][:16]}… ({detail})")


async def leases_at(session: Session, block: str) -> dict[PeerAddress, list[tuple[str, int]] | str]:
    """Each holder of `block` (who-has) and the live leases (owner, expiry) it holds on it, or
    why it could not say."""
    out: dict[PeerAddress, list[tuple[str, int]] | str] = {}
    for agent in await session.discovery.who_has(block):
        try:
            intro = await _introduction(session, agent, block)
            answer = (await session.peers.held(intro, [block]))[0]
            out[agent] = answer if answer is not None else "does not hold it"
        except DSSSError as e:
            session.introduced.pop(agent, None)
            out[agent] = str(e)
    return out
