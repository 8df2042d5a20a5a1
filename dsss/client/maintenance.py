# -*- test-case-name: tests.integration.test_cli_commands -*-
"""Looking after stored files: how many replicas each block has now (info, check), sharing a
file with another key, and bringing blocks back to the replica count (repair).

Orchestration only, like `flows`: no parsing, no sockets, no printing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Coroutine, TypeVar

from nacl.public import PrivateKey, PublicKey
from twisted.internet import defer
from twisted.python.failure import Failure

from dsss.client.flows import ReplicationError, Session, fetch_block, fetch_manifest, store_block
from dsss.crypto.manifest import Manifest, open_manifest, reseal_for
from dsss.errors import DSSSError, IntegrityError, NotFound
from dsss.model import PeerAddress, block_hash
from dsss.wire.transfer import MAX_PART

T = TypeVar("T")

OK = "ok"
CORRUPT = "corrupt"
MISSING = "missing"
UNREACHABLE = "unreachable"


@dataclass
class BlockHealth:
    """The replicas of one stored block (the manifest or a part) as the network reports them."""

    hash: str
    index: int | None  # None for the manifest
    holders: list[PeerAddress]
    # With verification: each holder's verdict (ok, corrupt, missing, unreachable).
    verdicts: dict[PeerAddress, str] | None = None
    error: str | None = None  # the last verification failure, for the report

    @property
    def role(self) -> str:
        return "manifest" if self.index is None else f"part {self.index}"

    @property
    def healthy(self) -> list[PeerAddress]:
        if self.verdicts is None:
            return list(self.holders)
        return [h for h in self.holders if self.verdicts.get(h) == OK]

    @property
    def keep(self) -> list[PeerAddress]:
        """Holders a repair must not upload to: all but those known to have lost the block."""
        if self.verdicts is None:
            return list(self.holders)
        return [h for h in self.holders if self.verdicts.get(h) not in (CORRUPT, MISSING)]

    def to_dict(self, target: int) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "block": "manifest" if self.index is None else "part",
            "index": self.index,
            "hash": self.hash,
            "replicas": len(self.healthy),
            "target": target,
            "holders": [str(h) for h in self.holders],
        }
        if self.verdicts is not None:
            doc["verified"] = {str(h): v for h, v in self.verdicts.items()}
        return doc


@dataclass
class FileHealth:
    address: str
    manifest: Manifest
    target: int
    blocks: list[BlockHealth]  # the manifest first, then the parts in order
    verified: bool = False

    @property
    def short(self) -> list[BlockHealth]:
        return [b for b in self.blocks if len(b.healthy) < self.target]

    @property
    def lost(self) -> list[BlockHealth]:
        return [b for b in self.blocks if not b.healthy]

    @property
    def ok(self) -> bool:
        return not self.short

    def part_counts(self) -> list[int]:
        return [len(b.healthy) for b in self.blocks[1:]]


async def bounded(limit: int, jobs: list[Callable[[], Coroutine[Any, Any, T]]]) -> list[T]:
    """Run the jobs with at most `limit` at a time; results in order; the first error wins."""
    slots = defer.DeferredSemaphore(max(1, limit))

    async def one(job: Callable[[], Coroutine[Any, Any, T]]) -> T:
        await slots.acquire()
        try:
            return await job()
        finally:
            slots.release()

    ds = [defer.ensureDeferred(one(job)) for job in jobs]
    results = await defer.DeferredList(ds, consumeErrors=True)
    out: list[T] = []
    for _ok, value in results:
        if isinstance(value, Failure):
            value.raiseException()
        out.append(value)
    return out


def _lookups(session: Session) -> int:
    return max(4, session.parallel * 2)


async def _verify_holder(session: Session, block: str, holder: PeerAddress) -> tuple[str, str | None]:
    """Download `block` from one holder and check its hash."""
    me = session.peers.public_address
    assert me is not None
    try:
        intro = await session.discovery.introduce_me(holder, block, 0, me)
        await session.peers.download(intro, block)
    except IntegrityError as e:
        return CORRUPT, str(e)
    except NotFound as e:
        return MISSING, str(e)
    except DSSSError as e:
        return UNREACHABLE, str(e)
    return OK, None


async def _survey_block(session: Session, block: str, index: int | None, verify: bool) -> BlockHealth:
    holders = sorted(await session.discovery.who_has(block))
    health = BlockHealth(block, index, holders)
    if verify:
        verdicts = await bounded(2, [partial(_verify_holder, session, block, h) for h in holders])
        health.verdicts = {h: v for h, (v, _) in zip(holders, verdicts)}
        errors = [e for _, e in verdicts if e]
        health.error = errors[-1] if errors else None
    return health


async def survey(session: Session, address: str, key: PrivateKey, *, verify: bool = False) -> FileHealth:
    """Open the file's manifest, then ask who holds the manifest and each part (at most a few
    lookups at a time). With `verify`, every holder's copy is also downloaded and hash-checked."""
    manifest, _file_key = await fetch_manifest(session, address, key)
    blocks: list[tuple[str, int | None]] = [(address, None)]
    blocks += [(ref.hash, i) for i, ref in enumerate(manifest.parts)]
    limit = session.parallel if verify else _lookups(session)
    healths = await bounded(limit, [partial(_survey_block, session, b, i, verify) for b, i in blocks])
    return FileHealth(address, manifest, session.replicas, healths, verified=verify)


@dataclass
class Repaired:
    """What a repair did for one block."""

    block: BlockHealth
    added: list[PeerAddress] = field(default_factory=list)
    error: str | None = None
    lost: bool = False  # no healthy copy was left to copy from

    def to_dict(self, target: int) -> dict[str, Any]:
        before = len(self.block.healthy)
        return {
            "block": "manifest" if self.block.index is None else "part",
            "index": self.block.index,
            "hash": self.block.hash,
            "before": before,
            "after": before + len(self.added),
            "target": target,
            "added": [str(a) for a in self.added],
            "error": self.error,
            "lost": self.lost,
        }


async def _repair_block(session: Session, health: BlockHealth, target: int) -> Repaired:
    result = Repaired(health)
    if not health.healthy:
        result.error = "no healthy replica left: it cannot be repaired"
        result.lost = True
        return result
    need = target - len(health.healthy)
    try:
        what = "file" if health.index is None else "part"
        data = await fetch_block(session, health.hash, what=what)
        result.added = await store_block(session, health.hash, data, copies=need, exclude=health.keep)
    except ReplicationError as e:
        result.error = f"could not add {need} more: {e}"
    except DSSSError as e:
        result.error = f"could not copy it: {e}"
    return result


async def repair(session: Session, health: FileHealth) -> list[Repaired]:
    """Copy every block that has fewer healthy replicas than the target from a healthy holder to
    new agents (never to one that holds it already), a few blocks at a time."""
    short = health.short
    return await bounded(session.parallel, [partial(_repair_block, session, b, health.target) for b in short])


async def share(session: Session, address: str, key: PrivateKey, recipient: PublicKey) -> tuple[str, Manifest]:
    """Store a new manifest for the same parts, with the file key sealed to `recipient`.

    Returns the new address (the one to give the recipient) and the manifest. No part is
    uploaded again: only the new manifest is stored."""
    try:
        blob = await fetch_block(session, address, what="file")
    except NotFound:
        raise NotFound(f"no file is stored at {address} (unknown address)") from None
    manifest, _ = open_manifest(blob, key)
    shared = reseal_for(blob, key, recipient)
    assert len(shared) <= MAX_PART
    new_address = block_hash(shared)
    await store_block(session, new_address, shared)
    return new_address, manifest
