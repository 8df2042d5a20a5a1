# -*- test-case-name: tests.unit.test_wire_transfer -*-
"""Client<->agent transfer messages, carried one request per QUIC bidirectional stream.

Sans-I/O. A request is one header line (LF-terminated, at most MAX_HEADER bytes) followed, for
UPLOAD, by exactly <size> bytes; the client then ends its side of the stream. The agent answers
with one reply line, followed for DOWNLOAD by the part's bytes, and ends the stream:

    UPLOAD <key> <hash> <size>\\n<size bytes>   ->  Ok\\n            | ERROR <code> <text>\\n
    DOWNLOAD <key> <hash>\\n                     ->  Ok <size>\\n<bytes> | ERROR <code> <text>\\n

A storage audit (anyone with an introduction key for the part: its owner, another agent) asks
for a proof that the agent holds the part (dsss/proofs.py) instead of the part itself:

    AUDIT <key> <hash> <nonce>\n                ->  Proof <size> <len>\n<len bytes> | ERROR ...

`nonce` is 32 lowercase hex digits (16 bytes); the reply carries the part's size and the proof
bytes for the leaf the nonce selects, `len` being `proofs.proof_length(size, index)`.

An upload may carry its uploader's signed lease on the part (`lease <record>` after the size,
dsss/leases.py), kept with the part once it is stored. Leases are taken, renewed and released
with LEASE, which needs no introduction key (each record is signed by its owner) and carries
1 to MAX_BATCH records, one per line, after its header:

    LEASE <count>\n<record>\n...              ->  Leases <count>\n<outcome>\n... | ERROR ...

A chained upload (replication down a chain of agents, as GFS and HDFS pipelines do) says
`chain` and names the agents that store the next copies (none for the last agent of a chain),
each as `<host:port>/<agent id>/<introduction key>`, the key being one the server had that agent
issue for the previous agent's address:

    UPLOAD <key> <hash> <size> chain [<hop> ...]\\n<size bytes>
        ->  Stored <n> <receipt> [<receipt> ...]\\n | ERROR ...

The agent forwards the bytes to the first hop as they arrive, with the rest of the chain, and
answers once its own copy is stored and the next hop has answered: `n` is how many agents of the
chain, from this one on, stored the part (the first n; a hop that failed ends the count), and
each of them gives a receipt: its Ed25519 signature (hex) over `receipt_message(hash, key)`,
`key` being the introduction key it was sent. The uploader knows every agent's key and every
introduction key of its chain, so no agent can claim copies that others did not make.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from dsss import proofs
from dsss.errors import DSSSError, RemoteProtocolError
from dsss.leases import MAX_BATCH, MAX_RECORD, LeaseError, LeaseRecord
from dsss.model import PeerAddress, is_block_id

MAX_CHAIN = 4
"""Most agents an upload may name to forward to (the client stores further copies itself)."""
MAX_HEADER = 256 + MAX_CHAIN * 160 + 8 + MAX_RECORD
"""Longest request or reply line: an upload's lease and a chain of MAX_CHAIN hops, or
MAX_CHAIN + 1 receipts."""
MAX_LEASE_BODY = MAX_BATCH * (MAX_RECORD + 1)
"""Longest body of a LEASE request."""
MAX_LEASE_REPLY = 16 + MAX_BATCH * 16
"""Longest reply to a LEASE request (its line and one outcome line per record)."""
MAX_HELD_LISTED = 16
"""Most leases a HELD reply lists per part (the latest-ending first)."""
MAX_HELD_BODY = MAX_BATCH * 67
"""Longest body of a HELD request (a hash per line)."""
MAX_HELD_REPLY = 16 + MAX_BATCH * (3 + MAX_HELD_LISTED * 78)
"""Longest reply to a HELD request."""
MAX_PART = 16 * 1024 * 1024
MAX_PROOF = proofs.LEAF_SIZE + proofs.HASH_SIZE * 64
"""Longest proof a Proof reply may announce (a leaf and the path of a tree of any size)."""
_KEY = re.compile(r"\A[0-9a-f]{32}\Z")
_AGENT_ID = re.compile(r"\A[0-9a-f]{64}\Z")
_RECEIPT = re.compile(r"\A[0-9a-f]{128}\Z")
_CODE = re.compile(r"\A[a-z][a-z0-9-]{0,31}\Z")


@dataclass(frozen=True)
class Hop:
    """The next agent of a chained upload: where it is, its key (pinned), its introduction key."""

    address: PeerAddress
    agent_id: str
    key: str

    def __str__(self) -> str:
        return f"{self.address}/{self.agent_id}/{self.key}"

    @classmethod
    def parse(cls, text: str) -> "Hop":
        parts = text.split("/")
        if len(parts) != 3 or not _AGENT_ID.match(parts[1]) or not _KEY.match(parts[2]):
            raise RemoteProtocolError(f"bad chain hop {text[:40]!r}")
        try:
            address = PeerAddress.parse(parts[0])
        except DSSSError:
            raise RemoteProtocolError(f"bad chain hop address {parts[0][:40]!r}") from None
        return cls(address, parts[1], parts[2])


@dataclass(frozen=True)
class Upload:
    key: str
    block: str
    size: int
    # A chained upload: answered with receipts (`Stored`), passed on to `chain[0]` if any.
    chained: bool = False
    chain: tuple[Hop, ...] = ()
    # The uploader's signed lease on the part (dsss/leases.py), kept with it once stored.
    lease: LeaseRecord | None = None

    def __post_init__(self) -> None:
        if self.chain and not self.chained:
            raise ValueError("only a chained upload has hops")
        if self.lease is not None and self.lease.block != self.block:
            raise ValueError("an upload's lease is for its part")


@dataclass(frozen=True)
class Lease:
    """`LEASE <count>`, followed by `count` lease records (one per line): take, renew or
    release leases on parts this agent stores. Answered with `Leases <count>` and one outcome
    line per record, in order."""

    count: int


@dataclass(frozen=True)
class Held:
    """`HELD <count>`, followed by `count` part hashes (one per line): which live leases does
    this agent hold on each? Answered with `Held <count>` and one line per hash."""

    count: int


@dataclass(frozen=True)
class HeldReply:
    """`Held <count>`, followed by `count` lines: `not-found`, or `ok` and `<owner>:<expiry>`
    for each live lease on that part."""

    count: int


@dataclass(frozen=True)
class LeasesReply:
    """`Leases <count>`, followed by `count` outcome lines (dsss.leases.Outcome)."""

    count: int


@dataclass(frozen=True)
class Download:
    key: str
    block: str


@dataclass(frozen=True)
class Audit:
    """Prove that you hold `block`: answer the challenge `nonce` (16 bytes)."""

    key: str
    block: str
    nonce: bytes


@dataclass(frozen=True)
class ProofReply:
    """`Proof <size> <len>` followed by the proof's bytes: the answer to AUDIT."""

    size: int
    length: int


@dataclass(frozen=True)
class Done:
    """`Ok` (UPLOAD stored) or `Ok <size>` (DOWNLOAD, followed by the bytes)."""

    size: int | None = None


@dataclass(frozen=True)
class Stored:
    """`Stored <n> <receipt>...`: the answer to a chained UPLOAD; the first `n` agents of the
    chain (this one first) stored the part, and `receipts` holds each one's signed receipt, in
    chain order."""

    receipts: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.receipts)


def receipt_message(block: str, key: str) -> bytes:
    """What an agent signs to say it stored `block`, uploaded with introduction key `key`."""
    return f"dsss-stored-v1 {block} {key}".encode("ascii")


@dataclass(frozen=True)
class Refused:
    code: str
    text: str


TransferRequest = Union[Upload, Download, Audit, Lease, Held]
TransferReply = Union[Done, Stored, Refused, ProofReply, LeasesReply, HeldReply]


def _decode(line: bytes) -> list[str]:
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("header is not ASCII") from None
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RemoteProtocolError("empty header or control character")
    return text.split(" ")


def _size(text: str) -> int:
    if not text.isdigit() or len(text) > 12:
        raise RemoteProtocolError(f"bad size {text[:20]!r}")
    return int(text)


def parse_request(line: bytes) -> TransferRequest:
    words = _decode(line)
    verb = words[0]
    if verb == "HELD":
        if len(words) != 2:
            raise RemoteProtocolError("usage: HELD <count>")
        count = _size(words[1])
        if not 1 <= count <= MAX_BATCH:
            raise RemoteProtocolError(f"HELD takes 1 to {MAX_BATCH} hashes")
        return Held(count)
    if verb == "LEASE":
        if len(words) != 2:
            raise RemoteProtocolError("usage: LEASE <count>")
        count = _size(words[1])
        if not 1 <= count <= MAX_BATCH:
            raise RemoteProtocolError(f"LEASE takes 1 to {MAX_BATCH} records")
        return Lease(count)
    if verb == "UPLOAD":
        usage = f"usage: UPLOAD <key> <hash> <size> [lease <record>] [chain <hop> ...] (at most {MAX_CHAIN} hops)"
        if len(words) < 4:
            raise RemoteProtocolError(usage)
        _, key, block, size = words[:4]
        rest = words[4:]
        lease = None
        if rest[:1] == ["lease"]:
            if len(rest) < 2:
                raise RemoteProtocolError(usage)
            try:
                lease = LeaseRecord.parse(rest[1])
            except LeaseError as e:
                raise RemoteProtocolError(f"UPLOAD: {e}") from None
            if lease.block != block:
                raise RemoteProtocolError("UPLOAD: the lease is for another part")
            rest = rest[2:]
        chained = rest[:1] == ["chain"]
        if rest and not (chained and len(rest) <= 1 + MAX_CHAIN):
            raise RemoteProtocolError(usage)
        n = _size(size)
        if n > MAX_PART:
            raise RemoteProtocolError(f"part larger than {MAX_PART} bytes")
        chain = tuple(Hop.parse(w) for w in rest[1:])
        if len({h.agent_id for h in chain}) != len(chain):
            raise RemoteProtocolError("an agent appears twice in the chain")
        req: TransferRequest = Upload(key, block, n, chained, chain, lease)
    elif verb == "DOWNLOAD":
        if len(words) != 3:
            raise RemoteProtocolError("usage: DOWNLOAD <key> <hash>")
        req = Download(words[1], words[2])
    elif verb == "AUDIT":
        if len(words) != 4:
            raise RemoteProtocolError("usage: AUDIT <key> <hash> <nonce>")
        if not _KEY.match(words[3]):
            raise RemoteProtocolError("AUDIT: the nonce is not 32 lowercase hex digits")
        req = Audit(words[1], words[2], bytes.fromhex(words[3]))
    else:
        raise RemoteProtocolError(f"unknown request {verb[:20]!r}")
    assert not isinstance(req, (Lease, Held))
    if not _KEY.match(req.key):
        raise RemoteProtocolError("bad introduction key")
    if not is_block_id(req.block):
        raise RemoteProtocolError("not a part hash")
    return req


def encode_request(req: TransferRequest) -> bytes:
    if isinstance(req, Lease):
        return f"LEASE {req.count}\n".encode("ascii")
    if isinstance(req, Held):
        return f"HELD {req.count}\n".encode("ascii")
    if isinstance(req, Upload):
        lease = f" lease {req.lease.encode()}" if req.lease is not None else ""
        hops = " chain" + "".join(f" {h}" for h in req.chain) if req.chained else ""
        return f"UPLOAD {req.key} {req.block} {req.size}{lease}{hops}\n".encode("ascii")
    if isinstance(req, Audit):
        if len(req.nonce) != proofs.NONCE_SIZE:
            raise ValueError("an audit nonce is 16 bytes")
        return f"AUDIT {req.key} {req.block} {req.nonce.hex()}\n".encode("ascii")
    return f"DOWNLOAD {req.key} {req.block}\n".encode("ascii")


def parse_reply(line: bytes) -> TransferReply:
    words = _decode(line)
    if words[0] == "Ok":
        if len(words) == 1:
            return Done(None)
        if len(words) == 2:
            n = _size(words[1])
            if n > MAX_PART:
                raise RemoteProtocolError("reply announces a part larger than allowed")
            return Done(n)
    elif words[0] == "Held" and len(words) == 2:
        count = _size(words[1])
        if not 1 <= count <= MAX_BATCH:
            raise RemoteProtocolError("bad count in a Held reply")
        return HeldReply(count)
    elif words[0] == "Leases" and len(words) == 2:
        count = _size(words[1])
        if not 1 <= count <= MAX_BATCH:
            raise RemoteProtocolError("bad count in a Leases reply")
        return LeasesReply(count)
    elif words[0] == "Proof" and len(words) == 3:
        size, length = _size(words[1]), _size(words[2])
        if size > MAX_PART or length > MAX_PROOF:
            raise RemoteProtocolError("reply announces a part or proof larger than allowed")
        return ProofReply(size, length)
    elif words[0] == "Stored" and len(words) >= 3:
        n = _size(words[1])
        receipts = tuple(words[2:])
        if not 1 <= n <= MAX_CHAIN + 1 or len(receipts) != n:
            raise RemoteProtocolError("bad count in a Stored reply")
        if not all(_RECEIPT.match(r) for r in receipts):
            raise RemoteProtocolError("bad receipt in a Stored reply")
        return Stored(receipts)
    elif words[0] == "ERROR" and len(words) >= 2 and _CODE.match(words[1]):
        return Refused(words[1], " ".join(words[2:]))
    raise RemoteProtocolError("bad reply header")


def encode_reply(reply: TransferReply) -> bytes:
    if isinstance(reply, Done):
        return b"Ok\n" if reply.size is None else f"Ok {reply.size}\n".encode("ascii")
    if isinstance(reply, Stored):
        return f"Stored {reply.count} {' '.join(reply.receipts)}\n".encode("ascii")
    if isinstance(reply, ProofReply):
        return f"Proof {reply.size} {reply.length}\n".encode("ascii")
    if isinstance(reply, LeasesReply):
        return f"Leases {reply.count}\n".encode("ascii")
    if isinstance(reply, HeldReply):
        return f"Held {reply.count}\n".encode("ascii")
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in reply.text)[:200]
    return f"ERROR {reply.code} {clean}\n".encode("ascii")


class HeaderSplitter:
    """Accumulates the start of a stream until the header line is complete.

    feed() returns None while the header is incomplete, then (header_line, rest_of_data) once.
    Raises RemoteProtocolError when MAX_HEADER bytes arrive without a LF.
    """

    def __init__(self, limit: int = MAX_HEADER) -> None:
        self._buf = b""
        self._limit = limit
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        if self.done:
            raise RuntimeError("header already complete")
        self._buf += data
        i = self._buf.find(b"\n", 0, self._limit + 1)
        if i < 0:
            if len(self._buf) > self._limit:
                raise RemoteProtocolError(f"header longer than {self._limit} bytes")
            return None
        self.done = True
        line, rest = self._buf[:i], self._buf[i + 1 :]
        self._buf = b""
        return line, rest
