# -*- test-case-name: tests.integration.test_client -*-
"""put and get: the orchestration of discovery, crypto and transfers. No parsing, no sockets."""

from __future__ import annotations

import io
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol, TypedDict, TypeVar

from nacl.public import PrivateKey, PublicKey
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dsss.client import leasing
from dsss.client.discovery import DiscoveryClient, Introduction
from dsss.client.journal import JournalChanged, PutJournal, new_journal, open_journal, part_ident
from dsss.client.peer import PeerNetwork
from dsss.crypto.manifest import Manifest, PartRef, clean_name, open_manifest, seal_manifest
from dsss.crypto.parts import FILE_ID_BYTES, KEY_BYTES, TAG_BYTES, decrypt_part, encrypt_part
from dsss.erasure import Coding
from dsss.erasure import decode as decode_shares
from dsss.erasure import encode as encode_shares
from dsss.errors import DSSSError, IntegrityError, NotFound, Offline, OldAddress, TooFewAgents, Unavailable
from dsss.leases import DEFAULT_KEEP, INITIAL_LEASE, LeaseRecord, LeaseSigner
from dsss.model import PeerAddress, block_hash, check_matches, share_id
from dsss.wire.transfer import MAX_CHAIN, MAX_PART

_T = TypeVar("_T")

log = Logger()

DEFAULT_PART_SIZE = 4 * 1024 * 1024
MAX_PART_SIZE = MAX_PART - TAG_BYTES
DEFAULT_PARALLEL = 4
PUT_WINDOW_BYTES = 12 * 1024 * 1024
"""Most plaintext bytes of one file's parts being stored at once: each part in flight costs
its ciphertext plus QUIC's buffers towards every replica, and the client's memory must not
grow with the part size (3 parts of the default 4 MiB; `--parallel` parts when they are
small)."""


PUT_WINDOW_SHARE_BYTES = 16 * 1024 * 1024
"""With erasure coding, most bytes of shares of one file's parts being stored at once: a part in
flight holds n/k times its size in shares, and more uploads' QUIC buffers (2 parts of 4 MiB at
2/4; a 1 GiB put peaked at 127 MB RSS with 2 such parts in flight, 153 MB with 3)."""


def put_window(parallel: int, part_size: int, coding: Coding | None = None) -> int:
    """How many parts of one file a put stores at once."""
    if coding is None:
        return max(1, min(parallel, PUT_WINDOW_BYTES // max(1, part_size)))
    held = -(-part_size * coding.n // coding.k)
    return max(1, min(parallel, PUT_WINDOW_SHARE_BYTES // max(1, held)))


# A file of at most this many bytes (and at most one part) travels inside its manifest: one
# block on the network instead of two. 16 KiB of plaintext is a manifest blob of about 22 KiB
# (base64), which costs the same round trips as a 4 KiB one, while `info`, `check` and `share`
# (which read the manifest) stay cheap. See bench/history/performance-log.md.
INLINE_MAX = 16 * 1024


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


class UploadLease(TypedDict, total=False):
    """The keyword arguments an upload carries its lease in (`PeerNetwork.upload`)."""

    lease: LeaseRecord


class ReplicationError(Unavailable):
    code = "replication"


class Sink(Protocol):
    """Where `get_to_stream` writes a file's bytes, in order: an open file, stdout, an HTTP
    response."""

    def write(self, data: bytes, /) -> Any: ...


@dataclass
class Progress:
    """Callbacks the CLI uses to draw progress; all optional."""

    advance: Callable[[int], None] = lambda n: None


@dataclass
class Session:
    """Everything a flow needs: the discovery client, the peer network, the user's key."""

    discovery: DiscoveryClient
    peers: PeerNetwork
    replicas: int
    parallel: int = DEFAULT_PARALLEL
    rng: random.Random = field(default_factory=random.SystemRandom)
    # Replicate down a chain of agents (the client sends each part once, each agent passes it
    # on as it arrives) where the server offers it; else the client sends every copy itself.
    chain: bool = True
    # Chains that stopped short; after CHAIN_BREAKS_TOLERATED, none until `chain_paused_until`
    # (on `clock`, seconds).
    chain_breaks: int = 0
    chain_paused_until: float = float("-inf")
    clock: Callable[[], float] = time.monotonic
    # Runs a part's encryption and hashing (put) or decryption (get) elsewhere: the CLI and the
    # gateway give the reactor's thread pool (PyNaCl and blake3 release the GIL), so that the
    # reactor thread keeps the QUIC connections busy meanwhile. None: on the calling thread.
    offload: Callable[..., defer.Deferred[Any]] | None = None
    # Downloads in flight per agent: a part is fetched from the holder with the fewest, so that
    # the parts in flight spread over the agents (and over the relay's per-pair limits).
    fetching: dict[PeerAddress, int] = field(default_factory=dict)
    # Store new files' parts erasure-coded (k-of-n shares, one agent each) instead of as
    # `replicas` whole copies.
    erasure: Coding | None = None
    # Live agents when the session opened, as the server said (None: it did not say).
    agents: int | None = None

    def agents_needed(self) -> int:
        """Distinct agents a new file needs: the replica count (its manifest), or more for the
        shares of an erasure coding."""
        return max(self.replicas, self.erasure.n if self.erasure is not None else 0)

    def check_enough_agents(self) -> None:
        """TooFewAgents if the server said it has fewer live agents than a new file needs."""
        need = self.agents_needed()
        if self.agents is not None and self.agents < need:
            what = (f"{self.replicas} copies of each block" if self.erasure is None
                    else f"{self.erasure.n} shares of each part, each on its own agent")
            raise TooFewAgents(f"too few agents (have {self.agents}, need {need}): a new file needs {what}")
    # Signs the leases of what this session stores (dsss/leases.py); None: uploads carry no
    # lease (agents then keep them for their initial hold only).
    leases: LeaseSigner | None = None
    # Seconds an upload's own lease runs: until the put's leases for --keep are taken.
    initial_lease: int = INITIAL_LEASE
    # Seconds a put's leases run once its manifest is stored (None: only the initial lease).
    keep: int | None = DEFAULT_KEEP
    # Where this session stored each block, and the introduction each agent was reached with
    # (the put takes its leases there: dsss.client.leasing).
    holders: dict[str, set[PeerAddress]] = field(default_factory=dict)
    introduced: dict[PeerAddress, Introduction] = field(default_factory=dict)

    def upload_lease(self, block: str) -> "UploadLease":
        """What an upload of `block` carries, as `PeerNetwork.upload`'s keyword arguments: the
        initial lease, signed now (nothing without a lease signer)."""
        if self.leases is None:
            return {}
        return {"lease": self.leases.sign(block, int(time.time()) + self.initial_lease)}

    def stored_at(self, block: str, intro: Introduction) -> None:
        self.holders.setdefault(block, set()).add(intro.address)
        self.introduced[intro.address] = intro

    def chaining(self) -> bool:
        """Whether to ask for a replication chain now: chosen, and not paused."""
        return self.chain and self.clock() >= self.chain_paused_until

    async def run(self, f: Callable[..., _T], *args: Any) -> _T:
        if self.offload is None:
            return f(*args)
        result: _T = await self.offload(f, *args)
        return result


# Agents to upload to, each with its introduction (Introduction), the error it gave
# (DSSSError), or None (not asked yet).
Picked = list[tuple[PeerAddress, Any]]


class ArrivingBody(Protocol):
    """A body that is still arriving (the gateway's PUT body, dsss.client.gateway.BodyPipe)."""

    async def aread(self, n: int) -> bytes: ...


async def read_some(stream: BinaryIO | ArrivingBody, n: int) -> bytes:
    """`stream.read(n)` from a file, or `await stream.aread(n)` from a body still arriving."""
    if isinstance(stream, io.IOBase):
        data: bytes = stream.read(n)
        return data
    return await stream.aread(n)  # type: ignore[union-attr]  # the files given are io.IOBase


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


# --- storing one block on several agents ---------------------------------------------------------


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


# --- put -----------------------------------------------------------------------------------------


def _count_parts(size: int, part_size: int) -> int:
    return (size + part_size - 1) // part_size


async def put_stream(
    session: Session,
    stream: BinaryIO,
    *,
    name: str,
    size: int,
    owner: PublicKey,
    part_size: int = DEFAULT_PART_SIZE,
    progress: Progress | None = None,
    journal: PutJournal | None = None,
) -> str:
    """Encrypt and store a file read from `stream` (`size` bytes); returns its address.

    With a `journal` (dsss.client.journal), the file's key and id are the journal's, every part
    is recorded as it is sent and stored, and a part the journal lists as stored that the
    network still holds is not sent again (JournalChanged if a part differs from what the
    journal recorded: the file changed)."""
    if not 1 <= part_size <= MAX_PART_SIZE:
        raise DSSSError(f"part size must be between 1 and {MAX_PART_SIZE} bytes")
    progress = progress or Progress()
    if journal is not None:
        file_key, file_id = journal.file_key, journal.file_id
    else:
        file_key = secrets.token_bytes(KEY_BYTES)
        file_id = secrets.token_bytes(FILE_ID_BYTES)
    if is_inline(size, part_size):
        return await _put_inline(session, stream, name=name, size=size, owner=owner,
                                 part_size=part_size, file_key=file_key, file_id=file_id,
                                 progress=progress)
    count = _count_parts(size, part_size)
    coding = session.erasure if count else None
    refs: list[PartRef | None] = [None] * count
    slots = defer.DeferredSemaphore(put_window(session.parallel, part_size, coding))
    running: list[defer.Deferred[None]] = []
    failure: list[BaseException] = []

    async def send(index: int, plaintext: bytes) -> None:
        try:
            plain_size = len(plaintext)
            if coding is None:
                ciphertext, h = await session.run(seal_part, file_key, file_id, index, plaintext)
                del plaintext  # only the ciphertext stays in memory while it is stored
                ref = PartRef(h, len(ciphertext), plain_size)
                if not await _already_stored(session, journal, index, ref):
                    await store_block(session, h, ciphertext)
            else:
                size, shares = await session.run(seal_and_code_part, file_key, file_id, index, plaintext, coding)
                del plaintext  # only the shares stay in memory while they are stored
                ref = PartRef("", size, plain_size, tuple(h for h, _ in shares))
                if not await _already_stored(session, journal, index, ref):
                    await store_shares(session, shares)
            if journal is not None and journal.stored.get(index) != ref:
                journal.record_stored(index, ref)
            refs[index] = ref
            progress.advance(plain_size)
        except BaseException as e:
            failure.append(e)
        finally:
            slots.release()

    for index in range(count):
        await slots.acquire()
        if failure:
            slots.release()
            break
        plaintext = await read_some(stream, part_size)
        expected = min(part_size, size - index * part_size)
        if len(plaintext) != expected:
            slots.release()
            failure.append(DSSSError(f"{name} changed while it was being read"))
            break
        running.append(defer.ensureDeferred(send(index, plaintext)))
        del plaintext
    if running:
        await defer.DeferredList(running)
    if failure:
        await _release_unfinished(session, [b for r in refs if r is not None for b in r.blocks])
        raise failure[0]
    if await read_some(stream, 1):
        raise DSSSError(f"{name} grew while it was being read")
    manifest = Manifest(
        name=name,
        size=size,
        part_size=part_size,
        file_id=file_id,
        parts=tuple(r for r in refs if r is not None),
        created=int(time.time()),
        erasure=coding,
    )
    # Stored last: until this succeeds no address exists, so no half file is ever reachable.
    return await _store_manifest(session, manifest, file_key, owner)


async def _already_stored(session: Session, journal: PutJournal | None, index: int, ref: PartRef) -> bool:
    """With a journal: whether part `index` (encrypted to `ref`) was stored by an earlier,
    unfinished put of this file and the network still holds it (every replica proven, or for
    an erasure-coded part every share held), so that it need not be sent again. Records the
    part as sent otherwise, before it is. JournalChanged if the part differs from the record."""
    if journal is None:
        return False
    journal.check(index, part_ident(ref))
    if journal.stored.get(index) == ref:
        if ref.shares:
            found = await defer.gatherResults(
                [defer.ensureDeferred(session.discovery.who_has(h)) for h in ref.shares])
            present = all(found)
        else:
            claimed, proven = await session.discovery.locate(ref.hash)
            present = len(proven if proven is not None else claimed) >= session.replicas
        if present:
            journal.skipped(ref.plain)
            return True
    journal.record_sent(index, part_ident(ref))
    return False


async def _store_manifest(
    session: Session, manifest: Manifest, file_key: bytes, owner: PublicKey
) -> str:
    """Seal `manifest` to `owner`, store it, and return its address (the file's)."""
    blob = seal_manifest(manifest, file_key, owner)
    if len(blob) > MAX_PART:
        raise DSSSError("file has too many parts for one manifest; use a larger --part-size")
    address = block_hash(blob)
    await store_block(session, address, blob)
    await lease_stored(session, leasing.manifest_blocks(address, manifest))
    return address


async def lease_stored(session: Session, blocks: list[str]) -> None:
    """Take the session's `keep` leases on blocks it just stored, on every holder; raises
    LeaseIncomplete (naming them) if some block could not be leased anywhere."""
    if session.leases is None or session.keep is None:
        return
    try:
        report = await leasing.take_leases(session, blocks, session.keep)
    finally:
        for b in blocks:
            session.holders.pop(b, None)
    leasing.check_report(report, "lease")


async def _release_unfinished(session: Session, blocks: list[str]) -> None:
    """A put failed: release the leases its uploads carried on the blocks it stored, so that
    they stop counting (quotas) and go at once rather than after the initial lease. Best effort:
    what is not released goes when its initial lease ends."""
    try:
        if session.leases is not None and blocks:
            await leasing.release_leases(session, blocks)
    except DSSSError as e:
        log.info("could not release the leases of an unfinished put: {e}", e=str(e))
    finally:
        for b in blocks:
            session.holders.pop(b, None)


async def file_blocks(session: Session, address: str, key: PrivateKey) -> list[str]:
    """The blocks of the file at `address`: its manifest (fetched, opened with `key`) and
    every part's block or shares."""
    manifest, _ = await fetch_manifest(session, address, key)
    return leasing.manifest_blocks(address, manifest)


async def _put_inline(
    session: Session,
    stream: BinaryIO,
    *,
    name: str,
    size: int,
    owner: PublicKey,
    part_size: int,
    file_key: bytes,
    file_id: bytes,
    progress: Progress,
) -> str:
    """A small file: its one part, encrypted as part 0, goes inside the manifest."""
    plaintext = await read_some(stream, size)
    if len(plaintext) != size:
        raise DSSSError(f"{name} changed while it was being read")
    if await read_some(stream, 1):
        raise DSSSError(f"{name} grew while it was being read")
    manifest = Manifest(
        name=name,
        size=size,
        part_size=part_size,
        file_id=file_id,
        parts=(),
        created=int(time.time()),
        inline=encrypt_part(file_key, file_id, 0, plaintext),
    )
    address = await _store_manifest(session, manifest, file_key, owner)
    progress.advance(size)
    return address


def is_inline(size: int, part_size: int) -> bool:
    """Whether `put_stream` carries a file of `size` bytes inside its manifest."""
    return 0 < size <= min(INLINE_MAX, part_size)


def part_count(size: int, part_size: int) -> int:
    """The number of blocks a file of `size` bytes is stored as, besides its manifest."""
    return 0 if is_inline(size, part_size) else _count_parts(size, part_size)


async def put_file(
    session: Session,
    path: str | os.PathLike[str],
    *,
    owner: PublicKey,
    part_size: int = DEFAULT_PART_SIZE,
    progress: Progress | None = None,
    journals: Path | None = None,
    on_journal: Callable[[PutJournal], None] | None = None,
) -> str:
    """Store the file at `path`. With `journals` (a directory), a file of several parts is
    journaled there (dsss.client.journal): an unfinished put of the same file is continued."""
    path = Path(path)
    # The manifest keeps the name for `get` to show; control characters are not kept.
    name = clean_name(path.name)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if journals is None or is_inline(size, part_size):
            return await put_stream(
                session, f, name=name, size=size, owner=owner, part_size=part_size, progress=progress
            )
        erasure = str(session.erasure) if session.erasure is not None else None
        journal = open_journal(journals, path, size=size, mtime_ns=st.st_mtime_ns,
                               part_size=part_size, erasure=erasure)
        if on_journal is not None:
            on_journal(journal)
        try:
            address = await put_stream(session, f, name=name, size=size, owner=owner,
                                       part_size=part_size, progress=progress, journal=journal)
        except JournalChanged:
            # Changed since the unfinished put: start over with a new key (never the old key
            # and nonces for different bytes).
            log.info("{path} changed since its unfinished put; storing it anew", path=str(path))
            journal = new_journal(journals, path, size=size, mtime_ns=st.st_mtime_ns,
                                  part_size=part_size, erasure=erasure)
            if on_journal is not None:
                on_journal(journal)
            f.seek(0)
            address = await put_stream(session, f, name=name, size=size, owner=owner,
                                       part_size=part_size, progress=progress, journal=journal)
        journal.remove()
        return address


# --- get -----------------------------------------------------------------------------------------


async def fetch_manifest(session: Session, address: str, key: PrivateKey) -> tuple[Manifest, bytes]:
    try:
        blob = await fetch_block(session, address, what="file")
    except NotFound:
        raise NotFound(f"no file is stored at {address} (unknown address)") from None
    return open_manifest(blob, key)


async def get_to_stream(
    session: Session,
    address: str,
    out: Sink,
    *,
    key: PrivateKey,
    progress: Progress | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
    drain: Callable[[], defer.Deferred[None] | None] | None = None,
) -> Manifest:
    """Fetch, verify and decrypt a file into `out`, in order, with at most `parallel` parts in
    memory. `drain`, if given, is called after each write; a Deferred it returns is waited for
    before the next part is written (an HTTP response whose reader is slower than the agents)."""
    progress = progress or Progress()
    manifest, file_key = await fetch_manifest(session, address, key)
    if on_manifest is not None:
        on_manifest(manifest)
    await write_file(session, manifest, file_key, out, progress, drain)
    return manifest


async def verified_parts(
    session: Session, manifest: Manifest, file_key: bytes, partial: BinaryIO
) -> int:
    """How many of the file's first parts `partial` (a file opened for reading at its start)
    holds intact: each whole part read back is encrypted again (the same key, file id and index
    give the same ciphertext) and checked against the manifest; the count stops at the first
    that differs."""
    if manifest.inline is not None:
        return 0
    good = 0
    for index, ref in enumerate(manifest.parts):
        plaintext = partial.read(ref.plain)
        if len(plaintext) != ref.plain:
            break
        if manifest.erasure is None:
            _, h = await session.run(seal_part, file_key, manifest.file_id, index, plaintext)
            same = h == ref.hash
        else:
            _, shares = await session.run(seal_and_code_part, file_key, manifest.file_id, index,
                                          plaintext, manifest.erasure)
            same = tuple(h for h, _ in shares) == ref.shares
        if not same:
            break
        good += 1
    return good


async def write_file(
    session: Session, manifest: Manifest, file_key: bytes, out: Sink, progress: Progress,
    drain: Callable[[], defer.Deferred[None] | None] | None = None, *, start: int = 0,
) -> None:
    """Fetch, verify and decrypt the parts of an opened manifest into `out`, in order, from
    part `start` on (the parts before it are already there)."""
    if manifest.inline is not None:
        data = decrypt_part(file_key, manifest.file_id, 0, manifest.inline)
        out.write(data)
        progress.advance(len(data))
        return
    parts = manifest.parts
    results: dict[int, bytes] = {}
    # An erasure-coded part is k downloads: keep about `parallel` downloads in flight, as for
    # whole parts (a 1 GiB get at 2/4 peaked at 127 MB RSS with 2 parts in flight, 141 with 4).
    coding = manifest.erasure
    window = max(1, session.parallel if coding is None else session.parallel // coding.k)
    next_write = start
    in_flight: dict[int, defer.Deferred[None]] = {}
    errors: list[BaseException] = []

    async def fetch(index: int) -> None:
        ref = parts[index]
        if manifest.erasure is not None:
            ciphertext = await fetch_shares(session, ref, manifest.erasure, what=f"part {index}")
        else:
            ciphertext = await fetch_block(session, ref.hash)
        if len(ciphertext) != ref.size:
            raise IntegrityError(f"part {index} has the wrong size")
        results[index] = await session.run(decrypt_part, file_key, manifest.file_id, index, ciphertext)

    next_start = start
    while next_write < len(parts):
        while next_start < len(parts) and next_start < next_write + window:
            d = defer.ensureDeferred(fetch(next_start))
            d.addErrback(_keep_error, errors)
            in_flight[next_start] = d
            next_start += 1
        await in_flight.pop(next_write)
        if errors:
            for d in in_flight.values():
                d.cancel()
            await defer.DeferredList(list(in_flight.values()), consumeErrors=True)
            raise errors[0]
        data = results.pop(next_write)
        out.write(data)
        progress.advance(len(data))
        next_write += 1
        waiting = drain() if drain is not None else None
        if waiting is not None:
            await waiting


# --- many files in one session -------------------------------------------------------------------


def _keep_error(failure: Failure, errors: list[BaseException]) -> None:
    if failure.value is not None:
        errors.append(failure.value)


def files_in_flight(session: Session) -> int:
    """How many files `put_files` and `get_files` keep in flight at once."""
    return max(4, 2 * session.parallel)


async def _each_bounded(
    count: int,
    start: Callable[[int], Any],
    *,
    limit: int,
    heavy: Callable[[int], bool],
    stop: Callable[[], bool],
) -> None:
    """Run `start(i)` (a coroutine function) for i in order, at most `limit` at a time, and only
    one at a time of those that `heavy(i)` says are large (they use the whole `parallel` window
    of parts each, so memory stays that of one large file plus a few small ones). No new one is
    started once `stop()` says so; those already running finish."""
    slots = defer.DeferredSemaphore(max(1, limit))
    big = defer.DeferredLock()
    running: list[defer.Deferred[None]] = []

    async def run(i: int, is_heavy: bool) -> None:
        try:
            await start(i)
        finally:
            slots.release()
            if is_heavy:
                big.release()

    for i in range(count):
        if stop():
            break
        is_heavy = heavy(i)
        if is_heavy:
            await big.acquire()
        await slots.acquire()
        if stop():
            slots.release()
            if is_heavy:
                big.release()
            break
        running.append(defer.ensureDeferred(run(i, is_heavy)))
    results = await defer.DeferredList(running, consumeErrors=True)
    for ok, value in results:
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()


async def put_files(
    session: Session,
    paths: list[str],
    sizes: list[int],
    *,
    owner: PublicKey,
    part_size: int = DEFAULT_PART_SIZE,
    progress_for: Callable[[int], Progress] | None = None,
    on_done: Callable[[int, str | None, BaseException | None], None],
    journals: Path | None = None,
    on_journal: Callable[[int, PutJournal], None] | None = None,
) -> None:
    """Store several files, up to `files_in_flight(session)` at once (a file of several parts
    is stored alone, with the usual window of parts). `on_done(i, address, error)` is called
    once for every file started, as it ends. After a failure no new file is started: the files
    in flight finish, the rest are not stored (and not reported)."""
    failed: list[BaseException] = []

    async def one(i: int) -> None:
        progress = progress_for(i) if progress_for is not None else None
        try:
            address = await put_file(
                session, paths[i], owner=owner, part_size=part_size, progress=progress, journals=journals,
                on_journal=(lambda j: on_journal(i, j)) if on_journal is not None else None)
        except BaseException as e:  # reported to the caller, which decides what is a bug
            failed.append(e)
            on_done(i, None, e)
            return
        try:
            on_done(i, address, None)
        except BaseException as e:  # say, stdout is gone: start nothing more
            failed.append(e)
            raise

    await _each_bounded(
        len(paths), one, limit=files_in_flight(session),
        heavy=lambda i: part_count(sizes[i], part_size) > 1, stop=lambda: bool(failed),
    )


async def get_files(
    session: Session,
    addresses: list[str],
    *,
    key: PrivateKey,
    open_output: Callable[[int, Manifest], Any],
    on_done: Callable[[int, Manifest | None, BaseException | None], None],
) -> None:
    """Fetch several files, up to `files_in_flight(session)` at once; a file larger than one
    part is fetched alone (its parts with the usual window). Unlike a put, one failure does not
    stop the others.

    `open_output(i, manifest)` is called once the manifest is open and returns a context
    manager giving the stream to write to (it commits the file on a clean exit, and removes it
    otherwise); `on_done(i, manifest, error)` is called once per address."""
    big = defer.DeferredLock()

    async def one(i: int) -> None:
        address = addresses[i]
        manifest: Manifest | None = None
        try:
            manifest, file_key = await fetch_manifest(session, address, key)
            # Only the manifest is known to be small before it is opened: a file of several
            # parts waits for the other large ones, so at most one streams at a time.
            heavy = len(manifest.parts) > 1
            if heavy:
                await big.acquire()
            try:
                with open_output(i, manifest) as out:
                    await write_file(session, manifest, file_key, out, Progress())
            finally:
                if heavy:
                    big.release()
        except BaseException as e:
            on_done(i, manifest, e)
        else:
            on_done(i, manifest, None)

    await _each_bounded(len(addresses), one, limit=files_in_flight(session),
                        heavy=lambda i: False, stop=lambda: False)
