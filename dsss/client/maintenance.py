# -*- test-case-name: tests.integration.test_cli_commands -*-
"""Looking after stored files: counting replicas (info, check), sharing, and repair.

How many replicas each block has now (info, check), sharing a file with another key, and
bringing blocks back to the replica count (repair).

A replica is a copy whose agent proved it to the server recently (passed an audit of it within
the server's proof freshness): who-has's `proven`. The other holders only claim the block; they
are shown apart, and a repair neither counts them nor uploads to them. With `--verify` the owner
downloads every holder's copy and a replica is a copy that hashes right.

An erasure-coded file's parts are shares, each wanted on one agent: a missing share is rebuilt
from k others (decoded and coded again, which gives back exactly the share its ID names) and
stored on an agent that holds no other share of its part.

Orchestration only, like `putflow` and `getflow`: no parsing, no sockets, no printing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Coroutine, TypeVar

from nacl.public import PrivateKey, PublicKey
from twisted.internet import defer
from twisted.python.failure import Failure

from dsss.client.fetching import fetch_block, fetch_shares
from dsss.client.getflow import fetch_manifest
from dsss.client.putflow import lease_stored
from dsss.client.session import Session
from dsss.client.storing import ReplicationError, code_part, store_block, store_shares
from dsss.crypto.manifest import Manifest, PartRef, open_manifest, reseal_for
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
    target: int = 1  # healthy copies wanted: the replica count, or 1 for a share
    share: int | None = None  # the share's number, for a share of an erasure-coded part
    # The holders that proved the block to the server recently; None from a server that does
    # not audit (then every holder counts, as it says).
    proven: list[PeerAddress] | None = None

    @property
    def role(self) -> str:
        if self.index is None:
            return "manifest"
        return f"part {self.index}" if self.share is None else f"part {self.index} share {self.share}"

    @property
    def kind(self) -> str:
        """"manifest", "part" or "share", as the JSON reports say."""
        return "manifest" if self.index is None else "part" if self.share is None else "share"

    @property
    def healthy(self) -> list[PeerAddress]:
        """The copies that count: verified by download (`--verify`), else proven to the server."""
        if self.verdicts is not None:
            return [h for h in self.holders if self.verdicts.get(h) == OK]
        if self.proven is not None:
            return [h for h in self.holders if h in self.proven]
        return list(self.holders)

    @property
    def keep(self) -> list[PeerAddress]:
        """Holders a repair must not upload to: all but those known to have lost the block."""
        if self.verdicts is None:
            return list(self.holders)
        return [h for h in self.holders if self.verdicts.get(h) not in (CORRUPT, MISSING)]

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "block": self.kind,
            "index": self.index,
            "hash": self.hash,
            "replicas": len(self.healthy),
            "target": self.target,
            "claimed": len(self.holders),
            "holders": [str(h) for h in self.holders],
        }
        if self.proven is not None:
            doc["proven"] = [str(h) for h in self.holders if h in self.proven]
        if self.share is not None:
            doc["share"] = self.share
        if self.verdicts is not None:
            doc["verified"] = {str(h): v for h, v in self.verdicts.items()}
        return doc


@dataclass
class FileHealth:
    address: str
    manifest: Manifest
    target: int  # the replica count (of the manifest, and of whole parts)
    blocks: list[BlockHealth]  # the manifest first, then the parts (or their shares) in order
    verified: bool = False

    @property
    def short(self) -> list[BlockHealth]:
        return [b for b in self.blocks if len(b.healthy) < b.target]

    @property
    def lost(self) -> list[BlockHealth]:
        """Blocks nothing is left to restore from: no holder (that is not known to have lost
        it), or for a share, fewer such shares of its part than it takes to rebuild one."""
        coding = self.manifest.erasure
        counts = self.share_counts(present=True)
        return [
            b for b in self.blocks
            if not b.keep and (b.share is None or coding is None or counts[b.index or 0] < coding.k)
        ]

    @property
    def ok(self) -> bool:
        return not self.short

    def part_counts(self) -> list[int]:
        """Healthy replicas of each part, or for an erasure-coded file its healthy shares."""
        if self.manifest.erasure is not None:
            counts = self.share_counts()
            return [counts.get(i, 0) for i in range(len(self.manifest.parts))]
        return [len(b.healthy) for b in self.blocks[1:]]

    def share_counts(self, *, present: bool = False) -> dict[int, int]:
        """Healthy shares of each part (with `present`: shares some holder still has)."""
        counts: dict[int, int] = {}
        for b in self.blocks:
            if b.share is not None and b.index is not None:
                counts[b.index] = counts.get(b.index, 0) + (1 if (b.keep if present else b.healthy) else 0)
        return counts

    def part_target(self) -> int:
        """What `part_counts` is measured against: replicas, or shares per part."""
        return self.target if self.manifest.erasure is None else self.manifest.erasure.n


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


async def _survey_block(
    session: Session, block: str, index: int | None, target: int, share: int | None, *, verify: bool
) -> BlockHealth:
    holders, proven = await session.discovery.locate(block)
    holders = sorted(holders)
    health = BlockHealth(block, index, holders, target=target, share=share, proven=proven)
    if verify:
        verdicts = await bounded(2, [partial(_verify_holder, session, block, h) for h in holders])
        health.verdicts = {h: v for h, (v, _) in zip(holders, verdicts)}
        errors = [e for _, e in verdicts if e]
        health.error = errors[-1] if errors else None
    return health


async def survey(
    session: Session, address: str, key: PrivateKey, *, verify: bool = False, source: str | None = None
) -> FileHealth:
    """Open the file's manifest, then ask who holds the manifest and each part (at most a few
    lookups at a time). With `verify`, every holder's copy is also downloaded and hash-checked.

    `source`: for a share this key made (whose manifest is sealed to its recipient), the
    address of the file it was shared from; its manifest, which this key opens, names the same
    parts. The share's own manifest block is surveyed as the file's manifest."""
    manifest, _file_key = await fetch_manifest(session, source or address, key)
    target = session.replicas
    blocks: list[tuple[str, int | None, int, int | None]] = [(address, None, target, None)]
    for i, ref in enumerate(manifest.parts):
        if ref.shares:
            blocks += [(h, i, 1, number) for number, h in enumerate(ref.shares)]
        else:
            blocks.append((ref.hash, i, target, None))
    limit = session.parallel if verify else _lookups(session)
    healths = await bounded(limit, [partial(_survey_block, session, *b, verify=verify) for b in blocks])
    return FileHealth(address, manifest, target, healths, verified=verify)


@dataclass
class Repaired:
    """What a repair did for one block."""

    block: BlockHealth
    added: list[PeerAddress] = field(default_factory=list)
    error: str | None = None
    lost: bool = False  # no healthy copy was left to copy from

    def to_dict(self) -> dict[str, Any]:
        before = len(self.block.healthy)
        doc = {
            "block": self.block.kind,
            "index": self.block.index,
            "hash": self.block.hash,
            "before": before,
            "after": before + len(self.added),
            "target": self.block.target,
            "added": [str(a) for a in self.added],
            "error": self.error,
            "lost": self.lost,
        }
        if self.block.share is not None:
            doc["share"] = self.block.share
        return doc


async def _repair_block(session: Session, health: BlockHealth, target: int) -> Repaired:
    result = Repaired(health)
    if not health.keep:
        result.error = "no healthy replica left: it cannot be repaired"
        result.lost = True
        return result
    need = target - len(health.healthy)
    try:
        what = "file" if health.index is None else "part"
        data = await fetch_block(session, health.hash, what=what)
        result.added = await store_block(session, health.hash, data, copies=need, exclude=health.keep)
        # The new copies are leased like the put's (the session's --keep).
        await lease_stored(session, [health.hash])
    except ReplicationError as e:
        result.error = f"could not add {need} more: {e}"
    except DSSSError as e:
        result.error = f"could not copy it: {e}"
    return result


async def _rebuild_shares(
    session: Session, health: FileHealth, ref: PartRef, missing: list[BlockHealth], part: list[BlockHealth]
) -> list[Repaired]:
    """Rebuild a part's missing shares from k healthy ones and store each on an agent that
    holds none of the part's other shares."""
    coding = health.manifest.erasure
    assert coding is not None
    results = [Repaired(b) for b in missing]
    healthy = sum(1 for b in part if b.keep)
    if healthy < coding.k:
        for r in results:
            r.error = f"only {healthy} of the {coding.k} shares needed to rebuild it are left"
            r.lost = True
        return results
    index = missing[0].index
    try:
        ciphertext = await fetch_shares(session, ref, coding, what=f"part {index}")
        shares = await session.run(code_part, ciphertext, coding)
        del ciphertext
        wanted = {b.hash for b in missing}
        rebuilt = [(h, data) for h, data in shares if h in wanted]
        if len(rebuilt) != len(wanted):
            raise IntegrityError(f"part {index} decodes to shares that its manifest does not name")
        avoid = [a for b in part for a in b.holders]  # a part's shares each on an agent of its own
        placed = await store_shares(session, rebuilt, avoid=avoid)
        await lease_stored(session, list(placed))
        for r in results:
            r.added = [placed[r.block.hash]]
    except ReplicationError as e:
        for r in results:
            r.error = f"could not store it again: {e}"
    except DSSSError as e:
        for r in results:
            r.error = f"could not rebuild it: {e}"
    return results


async def repair(session: Session, health: FileHealth) -> list[Repaired]:
    """Copy every block that has fewer healthy replicas than the target from a healthy holder to
    new agents (never to one that holds it already), and rebuild every missing share of an
    erasure-coded part from the others, a few blocks (or parts) at a time."""
    jobs: list[Callable[[], Coroutine[Any, Any, list[Repaired]]]] = []
    by_part: dict[int, list[BlockHealth]] = {}
    for b in health.blocks:
        if b.share is not None and b.index is not None:
            by_part.setdefault(b.index, []).append(b)
    missing_by_part: dict[int, list[BlockHealth]] = {}
    for b in health.short:
        if b.share is not None and b.index is not None:
            missing_by_part.setdefault(b.index, []).append(b)
        else:
            jobs.append(partial(_one, _repair_block, session, b, b.target))
    for index, missing in missing_by_part.items():
        ref = health.manifest.parts[index]
        jobs.append(partial(_rebuild_shares, session, health, ref, missing, by_part[index]))
    done = await bounded(session.parallel, jobs)
    return [r for group in done for r in group]


async def _one(f: Callable[..., Coroutine[Any, Any, Repaired]], *args: Any) -> list[Repaired]:
    return [await f(*args)]


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
    # The sharer's lease keeps the new manifest until the recipient takes leases of their own.
    await lease_stored(session, [new_address])
    return new_address, manifest
