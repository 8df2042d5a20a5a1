# -*- test-case-name: tests.unit.test_wire_control -*-
"""The server<->agent control channel: message values, parsing and serialization.

Sans-I/O: no Twisted, no clock, no sockets. One message is one line of ASCII text terminated by
LF (a CR before the LF is tolerated), at most MAX_LINE bytes without the terminator; a PROOF reply,
which carries a storage proof (dsss/proofs.py) in base64, may be up to MAX_PROOF_LINE bytes.

Each side may send requests; the other answers every request with exactly one reply line, in the
order the requests arrived. The server's greeting `Hi` is the one message that is not answered by
a reply (the agent's REGISTER follows it). A line is a reply when its first word is one of REPLY_WORDS or an
introduction key (32 lowercase hex digits); every other line is a request. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Union

from dsss.errors import BadRequest, RemoteProtocolError
from dsss.model import PeerAddress, check_block_id, check_local_address, is_block_id

MAX_LINE = 4096
MAX_PROOF_LINE = 24576
"""The longest PROOF line: a proof for the largest part (16 KiB leaf and 10 sibling hashes) is
22,272 base64 characters."""
NONCE_HEX = 32
MAX_HASHES_PER_LINE = 48
MAX_SIZE = 2**62
_HEX32 = re.compile(r"\A[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEX128 = re.compile(r"\A[0-9a-f]{128}\Z")
_TOKEN = re.compile(r"\A[0-9a-f]{32}\Z")
_VERSION = re.compile(r"\A[0-9A-Za-z.+_-]{1,32}\Z")
_ERROR_CODE = re.compile(r"\A[a-z][a-z0-9-]{0,31}\Z")


class LineTooLong(RemoteProtocolError):
    """A line longer than its limit (MAX_LINE, or MAX_PROOF_LINE for a PROOF reply)."""

    code = "too-long"


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hi:
    """Server greeting; `session` is a fresh random challenge the registration must sign."""

    session: str


@dataclass(frozen=True)
class Register:
    """Agent registration, signed with the agent's Ed25519 identity key."""

    agent_id: str  # hex of the 32-byte Ed25519 public key
    seq: int
    capacity: int
    free: int
    version: str
    signature: str  # hex of the 64-byte signature over signed_bytes(session)

    def signed_bytes(self, session: str) -> bytes:
        return (
            f"dsss-register-v1 {session} {self.agent_id} {self.seq} {self.capacity} "
            f"{self.free} {self.version}"
        ).encode("ascii")


@dataclass(frozen=True)
class Have:
    """The agent stores these parts. Each hash may carry the part's size (`<hash>:<size>`),
    which the server needs to re-replicate a part on its own; `sizes` is then parallel to
    `blocks` (None where a size was not given)."""

    blocks: tuple[str, ...]
    sizes: tuple[int | None, ...] | None = None


@dataclass(frozen=True)
class Gone:
    """The agent no longer stores these parts."""

    blocks: tuple[str, ...]


@dataclass(frozen=True)
class Leased:
    """Agent -> server: the bytes of stored blocks each lease owner's live leases keep on this
    agent (0: none any more), for per-client quotas (dsss/server/quotas.py)."""

    owners: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Collected:
    """Agent -> server: bytes of stored blocks whose leases have all ended (waiting to be
    collected), and bytes collected since the agent started."""

    expired: int
    collected: int


@dataclass(frozen=True)
class Space:
    capacity: int
    free: int


@dataclass(frozen=True)
class Local:
    """Agent -> server: the UDP address the agent listens at on its own network (ICE's host
    candidate). Agents behind one NAT reach each other there, across their LAN."""

    address: PeerAddress


@dataclass(frozen=True)
class WhoHas:
    block: str


@dataclass(frozen=True)
class IntroductionRequest:
    address: PeerAddress  # the client's public UDP address
    size: int
    block: str
    # The client's address on the agent's own LAN (behind the same NAT), if it has one there:
    # the key is good from either address, and the agent punches towards both.
    local: PeerAddress | None = None


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Replicate:
    """Server -> agent: copy this stored part to another agent, which gave `key` for it. The
    agent answers OK at once and uploads in the background."""

    block: str
    address: PeerAddress
    agent_id: str
    key: str


@dataclass(frozen=True)
class Audit:
    """Server -> agent: prove that you hold `block` by answering the challenge `nonce` (16
    bytes; see dsss/proofs.py). Answered with Proof, or `ERROR not-found` by an agent that does
    not hold the part (or found its copy corrupt)."""

    block: str
    nonce: bytes


@dataclass(frozen=True)
class Digest:
    """Agent -> server: the digest of the agent's holdings under `prefix` (dsss.holdings): for
    each child digit 0-f, the number of parts and the XOR of their paths. Answered with Diff."""

    prefix: str
    entries: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Resend:
    """Agent -> server: the HAVE lines that follow list every part the agent holds under
    `prefix`; what the server kept for it there and is not in them is withdrawn at SYNCED."""

    prefix: str


@dataclass(frozen=True)
class Synced:
    """Agent -> server: the digest exchange (and any resending) is over."""


# --- replies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Welcome:
    """Reply to REGISTER: the secret token for UDP pings, the heartbeat interval and UDP port."""

    token: str
    heartbeat: float
    udp_port: int


@dataclass(frozen=True)
class Bit:
    """Reply to WHO_HAS: `1` if the part is stored, else `0`."""

    value: bool


@dataclass(frozen=True)
class IntroKey:
    key: str


@dataclass(frozen=True)
class Proof:
    """Reply to AUDIT: the part's size and the proof bytes for the challenged leaf."""

    size: int
    proof: bytes


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Ok:
    pass


@dataclass(frozen=True)
class Diff:
    """Reply to DIGEST: the child digits under which the server's view differs, each followed by
    `-` where the server holds nothing for the agent under it (no point in a deeper digest)."""

    digits: tuple[str, ...]


@dataclass(frozen=True)
class Error:
    code: str
    text: str


Request = Union[Hi, Register, Have, Gone, Leased, Collected, Space, Local, WhoHas, IntroductionRequest, Ping, Replicate,
                Audit, Digest, Resend, Synced]
Reply = Union[Welcome, Bit, IntroKey, Pong, Ok, Error, Proof, Diff]
Message = Union[Request, Reply]
REPLY_TYPES = (Welcome, Bit, IntroKey, Pong, Ok, Error, Proof, Diff)
REPLY_WORDS = frozenset({"0", "1", "OK", "PONG", "WELCOME", "ERROR", "PROOF", "DIFF"})
_PREFIX = re.compile(r"\A(-|[0-9a-f]{1,8})\Z")
_DIFF_ENTRY = re.compile(r"\A[0-9a-f]-?\Z")
_DIGEST_ENTRY = re.compile(r"\A(0|[1-9][0-9]{0,9}):([0-9a-f]{32})\Z")


def _prefix(text: str, verb: str) -> str:
    if not _PREFIX.match(text):
        raise RemoteProtocolError(f"{verb}: the prefix is `-` or 1 to 8 lowercase hex digits")
    return "" if text == "-" else text


def is_reply(msg: Message) -> bool:
    return isinstance(msg, REPLY_TYPES)


def looks_like_reply(line: bytes) -> bool:
    """Whether a line that failed to parse was meant as a reply (by its first word).

    Such a line cannot be answered: an ERROR sent back would be taken as a reply to whatever the
    peer is waiting for. The connection is closed instead."""
    first = line.split(b" ", 1)[0].rstrip(b"\r")
    try:
        word = first.decode("ascii")
    except UnicodeDecodeError:
        return False
    return word in REPLY_WORDS or bool(_HEX32.match(word))


def _int(text: str, what: str, *, lo: int = 0, hi: int = MAX_SIZE) -> int:
    if not text.isdigit() or len(text) > 19:
        raise RemoteProtocolError(f"{what} is not a decimal number: {text[:40]!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise RemoteProtocolError(f"{what} out of range: {value}")
    return value


def _hashes(words: list[str], verb: str) -> tuple[str, ...]:
    if not 1 <= len(words) <= MAX_HASHES_PER_LINE:
        raise RemoteProtocolError(f"{verb} takes 1 to {MAX_HASHES_PER_LINE} hashes")
    for w in words:
        if not is_block_id(w):
            raise RemoteProtocolError(f"{verb}: not a part hash: {w[:80]!r}")
    return tuple(words)


def _have(words: list[str]) -> Have:
    if not 1 <= len(words) <= MAX_HASHES_PER_LINE:
        raise RemoteProtocolError(f"HAVE takes 1 to {MAX_HASHES_PER_LINE} hashes")
    blocks: list[str] = []
    sizes: list[int | None] = []
    for w in words:
        block, sep, size = w.partition(":")
        if not is_block_id(block):
            raise RemoteProtocolError(f"HAVE: not a part hash: {w[:80]!r}")
        blocks.append(block)
        sizes.append(_int(size, "size") if sep else None)
    return Have(tuple(blocks), tuple(sizes) if any(x is not None for x in sizes) else None)


def _b64(text: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("PROOF: the proof is not base64") from None
    if not raw or base64.b64encode(raw).decode("ascii") != text:
        raise RemoteProtocolError("PROOF: the proof is not canonical base64")
    return raw


def _arity(words: list[str], n: int, usage: str) -> None:
    if len(words) != n:
        raise RemoteProtocolError(f"usage: {usage}")


def _local_address(text: str, verb: str) -> PeerAddress:
    """A local address (LOCAL, INTRODUCTION_REQUEST): a unicast IP a neighbour can send to."""
    try:
        return check_local_address(PeerAddress.parse(text))
    except BadRequest as e:
        raise RemoteProtocolError(f"{verb}: {e}") from None


def parse_line(line: bytes) -> Message:
    """Parse one line (without its LF) into a message, or raise RemoteProtocolError."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > MAX_LINE:
        if not line.startswith(b"PROOF "):
            raise LineTooLong(f"line longer than {MAX_LINE} bytes")
        if len(line) > MAX_PROOF_LINE:
            raise LineTooLong(f"PROOF line longer than {MAX_PROOF_LINE} bytes")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("line is not ASCII") from None
    if not text or text != text.strip() or "  " in text or "\t" in text:
        if not text:
            raise RemoteProtocolError("empty line")
        raise RemoteProtocolError("words must be separated by single spaces")
    if not text.isprintable():  # ASCII here: false exactly for 0x00-0x1F and 0x7F, in C
        raise RemoteProtocolError("control character in line")
    words = text.split(" ")
    verb, args = words[0], words[1:]

    if verb == "0" or verb == "1":
        _arity(args, 0, verb)
        return Bit(verb == "1")
    if _HEX32.match(verb):
        _arity(args, 0, "<key>")
        return IntroKey(verb)
    if verb == "OK":
        _arity(args, 0, "OK")
        return Ok()
    if verb == "PONG":
        _arity(args, 0, "PONG")
        return Pong()
    if verb == "PING":
        _arity(args, 0, "PING")
        return Ping()
    if verb == "ERROR":
        if not args or not _ERROR_CODE.match(args[0]):
            raise RemoteProtocolError("usage: ERROR <code> <text>")
        return Error(args[0], " ".join(args[1:]))
    if verb == "WELCOME":
        _arity(args, 3, "WELCOME <token> <heartbeat-ms> <udp-port>")
        if not _TOKEN.match(args[0]):
            raise RemoteProtocolError("WELCOME: bad token")
        hb = _int(args[1], "heartbeat", lo=10, hi=3_600_000)
        port = _int(args[2], "udp port", lo=1, hi=65535)
        return Welcome(args[0], hb / 1000.0, port)
    if verb == "Hi":
        _arity(args, 1, "Hi <session>")
        if not _HEX32.match(args[0]):
            raise RemoteProtocolError("Hi: bad session")
        return Hi(args[0])
    if verb == "REGISTER":
        _arity(args, 6, "REGISTER <agent-id> <seq> <capacity> <free> <version> <signature>")
        agent_id, seq, cap, free, version, sig = args
        if not _HEX64.match(agent_id):
            raise RemoteProtocolError("REGISTER: agent id is not 64 hex digits")
        if not _VERSION.match(version):
            raise RemoteProtocolError("REGISTER: bad version")
        if not _HEX128.match(sig):
            raise RemoteProtocolError("REGISTER: signature is not 128 hex digits")
        # Values are kept exactly as sent: the signature covers them. Consumers clamp.
        return Register(agent_id, _int(seq, "seq"), _int(cap, "capacity"), _int(free, "free"), version, sig)
    if verb == "HAVE":
        return _have(args)
    if verb == "DIGEST":
        _arity(args, 17, "DIGEST <prefix> <count>:<xor> (16 times)")
        prefix = _prefix(args[0], "DIGEST")
        entries = []
        for word in args[1:]:
            m = _DIGEST_ENTRY.match(word)
            if not m:
                raise RemoteProtocolError("DIGEST: an entry is <count>:<32 hex digits>")
            entries.append((int(m.group(1)), int(m.group(2), 16)))
        return Digest(prefix, tuple(entries))
    if verb == "DIFF":
        if (len({a[:1] for a in args}) != len(args)
                or any(not _DIFF_ENTRY.match(a) for a in args)):
            raise RemoteProtocolError("usage: DIFF <hex digit>[-]... (each digit once)")
        return Diff(tuple(args))
    if verb == "RESEND":
        _arity(args, 1, "RESEND <prefix>")
        return Resend(_prefix(args[0], "RESEND"))
    if verb == "SYNCED":
        _arity(args, 0, "SYNCED")
        return Synced()
    if verb == "GONE":
        return Gone(_hashes(args, "GONE"))
    if verb == "LEASED":
        if not 1 <= len(args) <= MAX_HASHES_PER_LINE:
            raise RemoteProtocolError(f"LEASED takes 1 to {MAX_HASHES_PER_LINE} <owner>:<bytes>")
        owners = []
        for word in args:
            owner, _, n = word.partition(":")
            if not _HEX64.match(owner):
                raise RemoteProtocolError("LEASED: owner is not 64 hex digits")
            owners.append((owner, _int(n, "bytes")))
        return Leased(tuple(owners))
    if verb == "COLLECTED":
        _arity(args, 2, "COLLECTED <expired-bytes> <collected-bytes>")
        return Collected(_int(args[0], "expired bytes"), _int(args[1], "collected bytes"))
    if verb == "SPACE":
        _arity(args, 2, "SPACE <capacity> <free>")
        return Space(_int(args[0], "capacity"), _int(args[1], "free"))
    if verb == "LOCAL":
        _arity(args, 1, "LOCAL <address>")
        return Local(_local_address(args[0], "LOCAL"))
    if verb == "WHO_HAS":
        _arity(args, 1, "WHO_HAS <hash>")
        if not is_block_id(args[0]):
            raise RemoteProtocolError("WHO_HAS: not a part hash")
        return WhoHas(args[0])
    if verb == "REPLICATE":
        _arity(args, 4, "REPLICATE <hash> <address> <agent-id> <key>")
        if not is_block_id(args[0]):
            raise RemoteProtocolError("REPLICATE: not a part hash")
        try:
            address = PeerAddress.parse(args[1])
        except Exception:
            raise RemoteProtocolError("REPLICATE: bad address") from None
        if not _HEX64.match(args[2]) or not _HEX32.match(args[3]):
            raise RemoteProtocolError("REPLICATE: bad agent id or key")
        return Replicate(args[0], address, args[2], args[3])
    if verb == "AUDIT":
        _arity(args, 2, "AUDIT <hash> <nonce>")
        if not is_block_id(args[0]):
            raise RemoteProtocolError("AUDIT: not a part hash")
        if not _HEX32.match(args[1]):
            raise RemoteProtocolError("AUDIT: the nonce is not 32 lowercase hex digits")
        return Audit(args[0], bytes.fromhex(args[1]))
    if verb == "PROOF":
        if len(args) not in (1, 2):
            raise RemoteProtocolError("usage: PROOF <size> <base64 proof>")
        size = _int(args[0], "size")
        return Proof(size, _b64(args[1]) if len(args) == 2 else b"")
    if verb == "INTRODUCTION_REQUEST":
        if len(args) not in (3, 4):
            raise RemoteProtocolError("usage: INTRODUCTION_REQUEST <address> <size> <hash> [<local address>]")
        try:
            address = PeerAddress.parse(args[0])
        except Exception:
            raise RemoteProtocolError("INTRODUCTION_REQUEST: bad address") from None
        if not is_block_id(args[2]):
            raise RemoteProtocolError("INTRODUCTION_REQUEST: not a part hash")
        local = _local_address(args[3], "INTRODUCTION_REQUEST") if len(args) == 4 else None
        return IntroductionRequest(address, _int(args[1], "size"), args[2], local)
    raise RemoteProtocolError(f"unknown command: {verb[:40]!r}")


def encode(msg: Message) -> bytes:
    """Serialize a message to one line, without the LF."""
    if isinstance(msg, Bit):
        text = "1" if msg.value else "0"
    elif isinstance(msg, IntroKey):
        text = msg.key
    elif isinstance(msg, Ok):
        text = "OK"
    elif isinstance(msg, Pong):
        text = "PONG"
    elif isinstance(msg, Ping):
        text = "PING"
    elif isinstance(msg, Error):
        clean = " ".join("".join(c if 32 < ord(c) < 127 else " " for c in msg.text).split())
        code = msg.code if _ERROR_CODE.match(msg.code) else "error"
        text = f"ERROR {code} {clean}"[:MAX_LINE].rstrip()
    elif isinstance(msg, Welcome):
        text = f"WELCOME {msg.token} {int(round(msg.heartbeat * 1000))} {msg.udp_port}"
    elif isinstance(msg, Hi):
        text = f"Hi {msg.session}"
    elif isinstance(msg, Register):
        text = (
            f"REGISTER {msg.agent_id} {msg.seq} {msg.capacity} {msg.free} {msg.version} "
            f"{msg.signature}"
        )
    elif isinstance(msg, Have):
        sizes = msg.sizes or (None,) * len(msg.blocks)
        text = "HAVE " + " ".join(
            check_block_id(b) + ("" if n is None else f":{n}") for b, n in zip(msg.blocks, sizes)
        )
    elif isinstance(msg, Digest):
        if len(msg.entries) != 16 or not _PREFIX.match(msg.prefix or "-"):
            raise ValueError("a digest has a prefix of up to 8 hex digits and 16 entries")
        text = f"DIGEST {msg.prefix or '-'} " + " ".join(f"{n}:{x:032x}" for n, x in msg.entries)
    elif isinstance(msg, Diff):
        text = " ".join(("DIFF",) + msg.digits)
    elif isinstance(msg, Resend):
        text = f"RESEND {msg.prefix or '-'}"
    elif isinstance(msg, Synced):
        text = "SYNCED"
    elif isinstance(msg, Gone):
        text = "GONE " + " ".join(check_block_id(b) for b in msg.blocks)
    elif isinstance(msg, Leased):
        text = "LEASED " + " ".join(f"{o}:{n}" for o, n in msg.owners)
    elif isinstance(msg, Collected):
        text = f"COLLECTED {msg.expired} {msg.collected}"
    elif isinstance(msg, Space):
        text = f"SPACE {msg.capacity} {msg.free}"
    elif isinstance(msg, Local):
        text = f"LOCAL {msg.address}"
    elif isinstance(msg, WhoHas):
        text = f"WHO_HAS {msg.block}"
    elif isinstance(msg, Replicate):
        text = f"REPLICATE {msg.block} {msg.address} {msg.agent_id} {msg.key}"
    elif isinstance(msg, Audit):
        if len(msg.nonce) != NONCE_HEX // 2:
            raise ValueError("an audit nonce is 16 bytes")
        text = f"AUDIT {check_block_id(msg.block)} {msg.nonce.hex()}"
    elif isinstance(msg, Proof):
        text = f"PROOF {msg.size}"
        if msg.proof:
            text += " " + base64.b64encode(msg.proof).decode("ascii")
    elif isinstance(msg, IntroductionRequest):
        text = f"INTRODUCTION_REQUEST {msg.address} {msg.size} {msg.block}"
        if msg.local is not None:
            text += f" {msg.local}"
    else:  # pragma: no cover - a bug on our side
        raise TypeError(f"not a control message: {msg!r}")
    return text.encode("ascii")


def chunked(blocks: list[str], n: int = MAX_HASHES_PER_LINE) -> list[tuple[str, ...]]:
    """Split a list of hashes into groups that fit one HAVE/GONE line."""
    return [tuple(blocks[i : i + n]) for i in range(0, len(blocks), n)]
