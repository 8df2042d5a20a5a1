# -*- test-case-name: tests.integration.test_client -*-
"""Fetching a block from any of its holders, or a coded part from any k of its shares, verified.

No parsing, no sockets.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from dsss.client.session import Session
from dsss.crypto.manifest import PartRef
from dsss.erasure import Coding
from dsss.erasure import decode as decode_shares
from dsss.errors import DSSSError, IntegrityError, NotFound, Offline, OldAddress, Unavailable
from dsss.model import check_matches


async def fetch_shares(session: Session, ref: PartRef, coding: Coding, *, what: str = "part") -> bytes:
    """An erasure-coded part's ciphertext from any k of its shares: the first k (no decoding
    needed) unless some fail, then the others in turn."""
    got: dict[int, bytes] = {}
    candidates = list(range(coding.n))
    errors: list[str] = []
    corrupt = offline = 0

    async def one(number: int) -> bytes:
        return await fetch_block(session, ref.shares[number], what=f"share {number} of {what}")

    while len(got) < coding.k:
        batch, candidates = candidates[: coding.k - len(got)], candidates[coding.k - len(got) :]
        if not batch:
            detail = errors[-1] if errors else "no share left to try"
            if corrupt and corrupt + len(got) >= coding.n:
                raise IntegrityError(f"{what} has only {len(got)} good shares of the {coding.k} it needs ({detail})")
            if offline and offline + len(got) + corrupt >= coding.n:
                raise Offline(f"{what}: {len(got)} of the {coding.k} shares it needs are online now")
            raise Unavailable(f"{what}: fetched {len(got)} of the {coding.k} shares it needs ({detail})")
        results = await defer.DeferredList(
            [defer.ensureDeferred(one(i)) for i in batch], consumeErrors=True
        )
        for number, (ok, value) in zip(batch, results):
            if ok:
                got[number] = value
            else:
                assert isinstance(value, Failure)
                if value.check(defer.CancelledError):
                    value.raiseException()
                if value.check(IntegrityError):
                    corrupt += 1
                elif value.check(Offline):
                    offline += 1
                elif not value.check(DSSSError):
                    value.raiseException()
                errors.append(value.getErrorMessage())
    try:
        return await session.run(decode_shares, got, coding, ref.size)
    except ValueError as e:
        raise IntegrityError(f"{what} cannot be decoded from its shares: {e}") from None


async def fetch_block(session: Session, block: str, *, what: str = "part") -> bytes:
    """Fetch a block from any holder, verifying its hash; tries every holder before failing."""
    holders = await session.discovery.who_has(block)
    if not holders:
        if what == "file":
            raise NotFound(f"no agent has {what} {block}")
        # The manifest names it, so it was stored: its holders are offline (or lost it).
        raise Offline(f"no agent holding {what} {block[:16]}... is online now")
    session.rng.shuffle(holders)
    holders.sort(key=lambda h: session.fetching.get(h, 0))  # the least busy first; ties shuffled
    me = session.peers.public_address
    assert me is not None
    errors = []
    corrupt = 0
    old: OldAddress | None = None
    for holder in holders:
        session.fetching[holder] = session.fetching.get(holder, 0) + 1
        try:
            intro = await session.discovery.introduce_me(holder, block, 0, me)
            data = await session.peers.download(intro, block, verify=False)
            # Hashing the tree of a whole part runs where the encryption does (off the reactor).
            await session.run(check_matches, block, data, f"agent {intro.address}")
            return data
        except IntegrityError as e:
            corrupt += 1
            errors.append(str(e))
            if isinstance(e, OldAddress):
                old = e
        except DSSSError as e:
            errors.append(str(e))
        finally:
            left = session.fetching.pop(holder) - 1
            if left:
                session.fetching[holder] = left
    if corrupt == len(holders):
        if old is not None:
            raise old
        raise IntegrityError(f"{what} {block} is corrupt on every replica")
    raise Unavailable(f"could not fetch {what} {block} from any of {len(holders)} agents: {errors[-1]}")
