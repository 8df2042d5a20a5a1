# -*- test-case-name: tests.unit.test_leases -*-
"""Leases: the signed records that keep a stored block alive, and the collection decision. Sans-I/O.

A block (a part, a share or a manifest) stays on an agent while some owner holds a live lease on
it. A lease is a record its owner signs with an Ed25519 key derived from the user's key
(`lease_signing_key`), so agents verify it without the server and no one else can make, extend
or drop it:

    version  owner  block  expiry  serial  signature

`expiry` is a unix time in seconds (0: a release, the owner's delete); `serial` grows with every
record an owner signs for a block (the signer's clock in microseconds), and an agent keeps only
the record with the highest serial per (owner, block): a replayed older record changes nothing.
Two owners of the same ciphertext (a shared file) each hold their own lease.

`LeaseTable` is what an agent knows: the latest record per (owner, block) and, for blocks
uploaded without a lease (clients that do not take leases), an unsigned initial hold. A block is
collected only once every record on it has expired by more than the clock-skew bound (or been
released) and nothing changed on it for the grace period (`collectable_at`).
"""

from __future__ import annotations

import hashlib
import heapq
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

from dsss.errors import RemoteProtocolError
from dsss.model import is_block_id

VERSION = 1
"""The version of the lease record this code signs and reads."""
CONTEXT = "dsss-lease-v1"
"""What every signed lease message starts with (and the derivation's personalization)."""
MAX_TERM = 10 * 365 * 86400
"""Longest a lease may run past the agent's clock (seconds): a record further out is refused."""
DEFAULT_KEEP = 90 * 86400
"""How long `put` and `renew` keep a file unless told otherwise (`--keep`)."""
INITIAL_LEASE = 3600
"""How long a put's uploads are leased until the put has stored its manifest (seconds): the
parts of a put that never finishes are collected after it."""
DEFAULT_SKEW = 3600.0
"""The clock-skew bound between owners and agents (seconds): an agent treats a lease as live
until this long after its expiry."""
DEFAULT_GRACE = 300.0
"""Seconds after the last change on a block (an upload, a lease, a release) before it may be
collected: protects a put or renew in flight."""
DEFAULT_HOLD = 3600.0
"""How long an agent keeps a block uploaded without a lease (seconds)."""
MAX_BATCH = 256
"""Most records in one LEASE message."""
MAX_RECORD = 320
"""Longest encoded record (bytes); a real one is at most 1 + 64 + 65 + 12 + 20 + 128 + 5."""

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEX128 = re.compile(r"\A[0-9a-f]{128}\Z")


class LeaseError(RemoteProtocolError):
    """A lease record that does not parse or does not verify."""

    code = "bad-lease"


_DURATION = re.compile(r"\A([0-9]{1,9})([smhdwy]?)\Z")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> int:
    """Seconds in a duration such as `90d`, `12h`, `30m`, `45s`, `2w`, `1y` or `3600`."""
    m = _DURATION.match(text.strip().lower())
    if m is None:
        raise ValueError(f"not a duration (e.g. 90d, 12h, 30m, 3600): {text[:40]!r}")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def lease_signing_key(key: PrivateKey) -> SigningKey:
    """The user's lease key: an Ed25519 key whose seed is BLAKE2b-256 of the user's Curve25519
    private key, personalized "dsss-lease-v1" (docs/crypto.md). One-way: the lease key tells
    nothing of the user's key."""
    seed = hashlib.blake2b(bytes(key), digest_size=32, person=CONTEXT.encode("ascii")).digest()
    return SigningKey(seed)


def _decimal(text: str, what: str, digits: int) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > digits or (len(text) > 1 and text[0] == "0"):
        raise LeaseError(f"bad {what} {text[:24]!r}")
    return int(text)


@dataclass(frozen=True)
class LeaseRecord:
    """One signed lease (or release, `expiry` 0) by `owner` (lease public key, hex) on `block`."""

    owner: str
    block: str
    expiry: int
    serial: int
    signature: str
    version: int = VERSION

    @property
    def released(self) -> bool:
        return self.expiry == 0

    def message(self) -> bytes:
        return signed_message(self.owner, self.block, self.expiry, self.serial)

    def verify(self) -> None:
        """Raise LeaseError unless the signature is the owner's over this record."""
        try:
            VerifyKey(bytes.fromhex(self.owner)).verify(self.message(), bytes.fromhex(self.signature))
        except (BadSignatureError, ValueError):
            raise LeaseError("the lease's signature does not verify with its owner's key") from None

    def encode(self) -> str:
        return f"{self.version}:{self.owner}:{self.block}:{self.expiry}:{self.serial}:{self.signature}"

    @classmethod
    def parse(cls, text: str) -> "LeaseRecord":
        """A record from its one-token form; LeaseError if malformed (not yet verified)."""
        if len(text) > MAX_RECORD:
            raise LeaseError("lease record too long")
        fields = text.split(":")
        if len(fields) != 6:
            raise LeaseError("a lease record has 6 fields separated by ':'")
        version, owner, block, expiry, serial, signature = fields
        if version != str(VERSION):
            raise LeaseError(f"unknown lease version {version[:8]!r}")
        if not _HEX64.match(owner):
            raise LeaseError("bad lease owner key")
        if not is_block_id(block):
            raise LeaseError("bad block address in lease")
        if not _HEX128.match(signature):
            raise LeaseError("bad lease signature")
        return cls(owner, block, _decimal(expiry, "expiry", 12), _decimal(serial, "serial", 19),
                   signature, VERSION)


def signed_message(owner: str, block: str, expiry: int, serial: int) -> bytes:
    """What the owner signs: ASCII "dsss-lease-v1 <owner> <block> <expiry> <serial>"."""
    return f"{CONTEXT} {owner} {block} {expiry} {serial}".encode("ascii")


Clock = Callable[[], float]


class LeaseSigner:
    """Signs an owner's records with serials that always grow (the wall clock in microseconds,
    or one more than the last when the clock stands still or steps back)."""

    def __init__(self, key: SigningKey, clock: Clock = time.time) -> None:
        self.key = key
        self.owner = bytes(key.verify_key).hex()
        self.clock = clock
        self._last = 0

    def serial(self) -> int:
        self._last = max(self._last + 1, int(self.clock() * 1_000_000))
        return self._last

    def sign(self, block: str, expiry: int) -> LeaseRecord:
        if not is_block_id(block):
            raise ValueError("not a block address")
        if expiry < 0:
            raise ValueError("negative expiry")
        serial = self.serial()
        sig = self.key.sign(signed_message(self.owner, block, expiry, serial)).signature.hex()
        return LeaseRecord(self.owner, block, expiry, serial, sig)

    def release(self, block: str) -> LeaseRecord:
        return self.sign(block, 0)


# -- the agent's decision -------------------------------------------------------------------------

OK = "ok"
STALE = "stale"
NOT_FOUND = "not-found"
BAD_SIGNATURE = "bad-signature"
TOO_LONG = "too-long"
BAD_RECORD = "bad-record"
STATUSES = (OK, STALE, NOT_FOUND, BAD_SIGNATURE, TOO_LONG, BAD_RECORD)


@dataclass(frozen=True)
class Outcome:
    """What applying one record did: its status, and how many other owners hold a live lease
    on the block at this agent."""

    status: str
    others: int = 0

    def encode(self) -> str:
        return f"{self.status} {self.others}"

    @classmethod
    def parse(cls, line: str) -> "Outcome":
        words = line.split(" ")
        if len(words) != 2 or words[0] not in STATUSES:
            raise RemoteProtocolError("bad lease outcome line")
        return cls(words[0], _decimal(words[1], "count", 9))


@dataclass
class _Entry:
    record: LeaseRecord
    # The latest expiry any record of this owner on this block has had: a release is kept (so
    # that a replayed older lease is refused) until then.
    guard: int


@dataclass
class LeaseTable:
    """The leases an agent holds, per block, and when each block may be collected."""

    skew: float = DEFAULT_SKEW
    grace: float = DEFAULT_GRACE
    entries: dict[str, dict[str, _Entry]] = field(default_factory=dict)
    holds: dict[str, float] = field(default_factory=dict)
    changed: dict[str, float] = field(default_factory=dict)
    _queue: list[tuple[float, str]] = field(default_factory=list)

    # --- changes ---------------------------------------------------------------------------------

    def hold(self, block: str, until: float, now: float) -> None:
        """Keep `block` until `until` without a signed lease (an upload that carried none)."""
        self.holds[block] = max(self.holds.get(block, 0.0), until)
        self._touch(block, now)

    def check(self, record: LeaseRecord, now: float) -> str | None:
        """Why `record` is refused before it is looked at (None: it may be applied)."""
        if record.expiry > now + MAX_TERM:
            return TOO_LONG
        try:
            record.verify()
        except LeaseError:
            return BAD_SIGNATURE
        return None

    def apply(self, record: LeaseRecord, now: float) -> Outcome:
        """Apply a verified record (`check` said None) for a block this agent holds."""
        owners = self.entries.setdefault(record.block, {})
        entry = owners.get(record.owner)
        status = OK
        if entry is None:
            owners[record.owner] = _Entry(record, record.expiry)
            self._touch(record.block, now)
        elif record.serial > entry.record.serial:
            owners[record.owner] = _Entry(record, max(entry.guard, record.expiry))
            self._touch(record.block, now)
        elif record != entry.record:
            status = STALE  # an older (replayed) record, or another one with the same serial
        return Outcome(status, self.others(record.block, record.owner, now))

    def restore(self, record: LeaseRecord, guard: int) -> None:
        """Put back a record read from disk (no checks, no change time)."""
        self.entries.setdefault(record.block, {})[record.owner] = _Entry(record, guard)

    def forget(self, block: str) -> None:
        """The block is gone (collected, or lost): drop what we knew of it."""
        self.entries.pop(block, None)
        self.holds.pop(block, None)
        self.changed.pop(block, None)

    def _touch(self, block: str, now: float) -> None:
        self.changed[block] = now
        heapq.heappush(self._queue, (self.collectable_at(block), block))

    # --- questions -------------------------------------------------------------------------------

    def live(self, record: LeaseRecord, now: float) -> bool:
        """Whether a record still keeps its block: not released, not expired by more than the
        skew bound."""
        return not record.released and record.expiry + self.skew > now

    def others(self, block: str, owner: str, now: float) -> int:
        return sum(1 for o, e in self.entries.get(block, {}).items() if o != owner and self.live(e.record, now))

    def records(self, block: str) -> list[LeaseRecord]:
        return [e.record for e in self.entries.get(block, {}).values()]

    def live_records(self, block: str, now: float) -> list[LeaseRecord]:
        return [r for r in self.records(block) if self.live(r, now)]

    def collectable_at(self, block: str) -> float:
        """The agent time from which `block` may be collected."""
        until = self.holds.get(block, float("-inf"))
        for e in self.entries.get(block, {}).values():
            if not e.record.released:
                until = max(until, e.record.expiry + self.skew)
        return max(until, self.changed.get(block, float("-inf")) + self.grace)

    def known(self, block: str) -> bool:
        return block in self.entries or block in self.holds

    def track(self, blocks: Iterable[str], now: float, hold: float) -> None:
        """Start tracking stored `blocks`: those we know nothing of (stored before leases, or
        whose lease was not written) are held for `hold` seconds; all are queued."""
        for block in blocks:
            if not self.known(block):
                self.holds[block] = now + hold
            heapq.heappush(self._queue, (self.collectable_at(block), block))

    def due(self, now: float, limit: int, stored: Callable[[str], bool]) -> list[str]:
        """Up to `limit` stored blocks that may be collected now (each at most once)."""
        out: list[str] = []
        while self._queue and len(out) < limit and self._queue[0][0] <= now:
            _, block = heapq.heappop(self._queue)
            if not stored(block) or block in out:
                continue
            at = self.collectable_at(block)
            if at <= now:
                out.append(block)
            else:
                heapq.heappush(self._queue, (at, block))
        return out

    def leased_by_owner(self, sizes: Callable[[str], int], now: float) -> dict[str, int]:
        """Bytes each owner holds live leases on here (`sizes` gives 0 for a block not stored)."""
        out: dict[str, int] = {}
        for block, owners in self.entries.items():
            size = sizes(block)
            if not size:
                continue
            for owner, e in owners.items():
                if self.live(e.record, now):
                    out[owner] = out.get(owner, 0) + size
        return out

    def prunable(self, now: float) -> list[tuple[str, str]]:
        """(block, owner) of released or expired entries no replay could revive: their guard
        (the latest expiry they had) is past by more than the skew bound."""
        return [
            (block, owner)
            for block, owners in self.entries.items()
            for owner, e in owners.items()
            if not self.live(e.record, now) and e.guard + self.skew < now
        ]

    def prune(self, block: str, owner: str) -> None:
        owners = self.entries.get(block)
        if owners is not None:
            owners.pop(owner, None)
            if not owners:
                del self.entries[block]


def encode_batch(records: list[LeaseRecord]) -> bytes:
    """The body of a LEASE message: one record per line."""
    return b"".join(r.encode().encode("ascii") + b"\n" for r in records)


def parse_batch(body: bytes, count: int) -> list[LeaseRecord | None]:
    """Records of a LEASE body (None for a line that does not parse); RemoteProtocolError if
    the body does not hold exactly `count` LF-terminated lines."""
    lines = body.split(b"\n")
    if lines[-1] != b"" or len(lines) - 1 != count:
        raise RemoteProtocolError(f"a LEASE body holds exactly {count} LF-terminated lines")
    out: list[LeaseRecord | None] = []
    for line in lines[:-1]:
        try:
            out.append(LeaseRecord.parse(line.decode("ascii")))
        except (LeaseError, UnicodeDecodeError):
            out.append(None)
    return out
