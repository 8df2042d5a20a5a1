# -*- test-case-name: tests.integration.test_client -*-
"""Storing a part on agents: its copies (or its erasure-coded shares, one per agent), each proven.

A part is sealed (encrypted, addressed by its hash) and, with erasure coding, coded into shares
here too, so that a put, a resumed put checking what it stored, and a repair make the same
blocks. No parsing, no sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dsss.client.discovery import Introduction
from dsss.client.session import Session
from dsss.crypto.parts import encrypt_part
from dsss.erasure import Coding
from dsss.erasure import encode as encode_shares
from dsss.errors import DSSSError, TooFewAgents, Unavailable
from dsss.model import PeerAddress, block_hash, share_id
from dsss.wire.transfer import MAX_CHAIN

log = Logger()


CHAIN_BREAKS_TOLERATED = 2
"""Chained uploads that may stop short (an agent could not reach the next) before a session
stops chaining for CHAIN_PAUSE seconds and sends every copy itself."""
CHAIN_PAUSE = 300.0
"""Seconds a session sends every copy itself after its chains kept stopping short; then it
chains again. A CLI call seldom lasts that long; a gateway runs for days, and a few forwards
that failed (a handshake slowed by load, an agent restarting) must not stop its chains for good."""


STORE_ROUNDS = 4
"""Rounds of uploads a block's copies get: the agents that failed (or did not prove their copy)
in one round are replaced by others in the next."""

class ReplicationError(Unavailable):
    code = "replication"


# Agents to upload to, each with its introduction (Introduction), the error it gave
# (DSSSError), or None (not asked yet).
Picked = list[tuple[PeerAddress, Any]]

def seal_part(file_key: bytes, file_id: bytes, index: int, plaintext: bytes) -> tuple[bytes, str]:
    """A part's ciphertext and its address."""
    ciphertext = encrypt_part(file_key, file_id, index, plaintext)
    return ciphertext, block_hash(ciphertext)


def code_part(ciphertext: bytes, coding: Coding) -> list[tuple[str, bytes]]:
    """A part's shares, with their share IDs, in share order."""
    return [(share_id(share), share) for share in encode_shares(ciphertext, coding)]


def seal_and_code_part(
    file_key: bytes, file_id: bytes, index: int, plaintext: bytes, coding: Coding
) -> tuple[int, list[tuple[str, bytes]]]:
    """An erasure-coded part's ciphertext size and its shares (one call off the reactor thread;
    the ciphertext itself is not kept)."""
    ciphertext = encrypt_part(file_key, file_id, index, plaintext)
    return len(ciphertext), code_part(ciphertext, coding)


async def store_block(
    session: Session,
    block: str,
    data: bytes,
    *,
    copies: int | None = None,
    exclude: list[PeerAddress] | None = None,
) -> list[PeerAddress]:
    """Store `data` on `copies` (default `session.replicas`) distinct agents, none of them in
    `exclude` (say, those that already hold it, for a repair); returns where it went.

    Agents that fail are excluded and replaced by asking the server again; fails with
    ReplicationError if that many copies cannot be made.

    A copy counts only once its agent proved it: after each round of uploads the server audits
    every new copy (`/api/audit`, one challenge each); a copy whose agent does not prove it
    (it acknowledged the upload and kept nothing, say) is made again elsewhere, in the rounds
    left.

    With `session.chain` (and a server that offers it), the copies are made by a chained
    upload: the part goes once to the first agent picked, which passes it on down the chain;
    signed receipts say which agents stored it, and the copies still missing are made on the
    next round like any other.
    """
    assert session.peers.public_address is not None
    wanted = session.replicas if copies is None else copies
    held = list(exclude or [])
    stored: list[PeerAddress] = []
    failed: list[PeerAddress] = []
    errors: list[str] = []
    me = session.peers.public_address
    chain_broke = False
    agents: dict[PeerAddress, str] = {}  # agent ids, from the introductions
    for _attempt in range(STORE_ROUNDS):
        need = wanted - len(stored)
        if need <= 0:
            break
        avoid = held + stored + failed
        # Where to upload, with the introductions, in one request if the server can; else
        # where-to-upload, then one introduction per agent.
        chain = session.chaining() and need > 1 and not chain_broke
        try:
            picked: Picked | None = await session.discovery.upload_to(
                block, len(data), me, copies=min(need, session.replicas), exclude=avoid, chain=chain)
            if picked is None:
                targets = await session.discovery.where_to_upload(len(data), exclude=avoid)
                picked = [(t, None) for t in targets]
        except TooFewAgents as e:
            if failed:  # agents failed: they are why too few are left, say what they did
                errors.append(str(e))
                break
            raise TooFewAgents(f"{_unprefixed(e)} (stored {len(stored)} of the {wanted} copies a block needs)") from None
        except Unavailable as e:
            errors.append(str(e))
            break
        picked = [(t, i) for t, i in picked if t not in stored and t not in failed and t not in held][:need]
        if not picked:
            break
        agents.update((t, i.agent_id) for t, i in picked if isinstance(i, Introduction))
        if len(picked) > 1 and isinstance(picked[1][1], Introduction) and picked[1][1].chained:
            done, lost, why = await _upload_chain(session, block, data, picked)
            stored += [a for _, a in await _proven(session, [(block, a) for a in done], agents, failed, errors)]
            failed += lost
            errors += why
            # An agent that cannot pass a part on to the next one (two agents behind one NAT
            # rarely reach each other) is not at fault: the copies left go from here. (A first
            # agent that failed is excluded like any failed agent, and chaining goes on.)
            if done and why:
                chain_broke = True
                session.chain_breaks += 1
                if session.chain_breaks >= CHAIN_BREAKS_TOLERATED:
                    # These agents cannot reach each other (symmetric NATs, say): every further
                    # chain would cost a handshake timeout before the copies go from here anyway.
                    log.info("agents could not pass parts on to each other; sending every copy "
                             "from here for {pause:.0f} s", pause=CHAIN_PAUSE)
                    session.chain_breaks = 0
                    session.chain_paused_until = session.clock() + CHAIN_PAUSE
            continue
        results = await defer.DeferredList(
            [defer.ensureDeferred(_upload_one(session, t, block, data, intro)) for t, intro in picked],
            consumeErrors=True,
        )
        agents.update((t, v) for (t, _), (ok, v) in zip(picked, results) if ok and isinstance(v, str))
        done = _uploaded([t for t, _ in picked], results, failed, errors)
        stored += [a for _, a in await _proven(session, [(block, a) for a in done], agents, failed, errors)]
    if len(stored) < wanted:
        detail = "; ".join(errors[-3:]) or "not enough live agents"
        raise ReplicationError(
            f"stored a part on {len(stored)} of {wanted} agents ({detail})"
        )
    return stored


def _unprefixed(error: DSSSError) -> str:
    """An error from the server without its `server: ` prefix."""
    return str(error).removeprefix("server: ")


async def _proven(
    session: Session, copies: list[tuple[str, PeerAddress]], agents: dict[PeerAddress, str],
    failed: list[PeerAddress], errors: list[str],
) -> list[tuple[str, PeerAddress]]:
    """The copies (block, agent address) whose agents proved them to the server just now (one
    audit each, `/api/audit`); the others' agents are added to `failed`, with why to `errors`.
    A server without /api/audit cannot audit: every copy is taken on its receipt then."""
    if not copies:
        return list(copies)
    results = await session.discovery.audit([(block, agents[a]) for block, a in copies])
    if results is None:
        return list(copies)
    proven = []
    for (block, address), result in zip(copies, results):
        if result.proven:
            proven.append((block, address))
        else:
            failed.append(address)
            errors.append(f"{address}: acknowledged the upload but did not prove its copy "
                          f"({result.error or 'no proof'})")
            log.warn("agent {agent} did not prove its copy of {block}: {why}", agent=str(address),
                     block=block[:16], why=result.error or "no proof")
    return proven


def _uploaded(
    targets: list[PeerAddress], results: list[tuple[bool, Any]], failed: list[PeerAddress], errors: list[str]
) -> list[PeerAddress]:
    """The targets whose upload (DeferredList `results`, in the same order) succeeded; the
    others are added to `failed`, with what went wrong to `errors`."""
    done = []
    for target, (ok, value) in zip(targets, results):
        if ok:
            done.append(target)
            continue
        assert isinstance(value, Failure)
        failed.append(target)
        errors.append(f"{target}: {value.getErrorMessage()}")
        if not value.check(DSSSError):
            log.failure("unexpected upload failure", value)
    return done


async def _upload_chain(
    session: Session, block: str, data: bytes,
    picked: list[tuple[PeerAddress, Introduction | DSSSError]],
) -> tuple[list[PeerAddress], list[PeerAddress], list[str]]:
    """One chained upload to the agents picked, in order: returns where it was stored (a
    prefix of them), the agent that failed (the first one, if it did not store it), and what
    went wrong."""
    head, intro = picked[0]
    if not isinstance(intro, Introduction):
        return [], [head], [f"{head}: {intro}"]
    hops: list[Introduction] = []
    for _target, hop in picked[1 : 1 + MAX_CHAIN]:
        if not isinstance(hop, Introduction):
            break  # each hop's key is for the agent before it: the chain ends here
        hops.append(hop)
    chain = [head] + [h.address for h in hops]
    try:
        count = await session.peers.upload(intro, block, data, tuple(hops), **session.upload_lease(block))
    except DSSSError as e:
        return [], [head], [f"{head}: {e}"]
    for i in (intro, *hops)[:count]:
        session.stored_at(block, i)
    stored = chain[:count]
    if count == 0:
        return [], [head], [f"{head}: gave no valid receipt"]
    if count < len(chain):
        return stored, [], [f"{chain[count]}: did not store it (chained from {chain[count - 1]})"]
    return stored, [], []


async def _upload_one(
    session: Session, target: PeerAddress, block: str, data: bytes,
    intro: Introduction | DSSSError | None = None,
) -> str:
    """Upload to `target`, with the introduction (or the error) the server already gave, or
    after asking for one; returns the agent's id."""
    if isinstance(intro, DSSSError):
        raise intro
    if intro is None:
        me = session.peers.public_address
        assert me is not None
        intro = await session.discovery.introduce_me(target, block, len(data), me)
    await session.peers.upload(intro, block, data, **session.upload_lease(block))
    session.stored_at(block, intro)
    return intro.agent_id


async def store_shares(
    session: Session,
    shares: list[tuple[str, bytes]],
    *,
    avoid: list[PeerAddress] | None = None,
) -> dict[str, PeerAddress]:
    """Store each share (share ID, bytes) once, each on an agent of its own, none of them in
    `avoid` (say, the holders of a part's other shares, for a repair); returns where each went.

    The agents are placed and introduced in one request where the server can; agents that fail
    are left out and their shares placed again. ReplicationError if not every share is stored.
    """
    me = session.peers.public_address
    assert me is not None
    if not shares:
        return {}
    size = len(shares[0][1])
    placed: dict[str, PeerAddress] = {}
    failed: list[PeerAddress] = []
    errors: list[str] = []
    for _attempt in range(STORE_ROUNDS):
        todo = [(h, data) for h, data in shares if h not in placed]
        if not todo:
            break
        exclude = list(avoid or []) + list(placed.values()) + failed
        try:
            picked: Picked | None = await session.discovery.upload_shares(
                [h for h, _ in todo], size, me, exclude=exclude)
            if picked is None:
                targets = await session.discovery.where_to_upload(size, exclude=exclude, count=len(todo))
                picked = [(t, None) for t in targets]
        except TooFewAgents as e:
            if failed:  # agents failed: they are why too few are left, say what they did
                errors.append(str(e))
                break
            raise TooFewAgents(f"{_unprefixed(e)} (stored {len(placed)} of a part's {len(shares)} "
                               f"shares, each needs an agent of its own)") from None
        except Unavailable as e:
            errors.append(str(e))
            break
        # A share per agent: never two on one, never one on an agent already used.
        seen = set(exclude)
        pairs = []
        for (h, data), (target, intro) in zip(todo, picked):
            if target in seen:
                continue
            seen.add(target)
            pairs.append((h, data, target, intro))
        if not pairs:
            break
        results = await defer.DeferredList(
            [defer.ensureDeferred(_upload_one(session, t, h, data, intro)) for h, data, t, intro in pairs],
            consumeErrors=True,
        )
        done = _uploaded([t for _, _, t, _ in pairs], results, failed, errors)
        # Each share counts once its agent proved it (see store_block).
        agents = {t: agent for (_, _, t, _), (ok, agent) in zip(pairs, results) if ok}
        copies = [(h, t) for h, _, t, _ in pairs if t in done]
        placed.update(await _proven(session, copies, agents, failed, errors))
    if len(placed) < len(shares):
        detail = "; ".join(errors[-3:]) or "not enough live agents"
        raise ReplicationError(
            f"stored {len(placed)} of a part's {len(shares)} shares, each needs an agent of its own ({detail})"
        )
    return placed
