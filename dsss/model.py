"""Small frozen values shared by every layer, validated on construction."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import blake3

from dsss import proofs
from dsss.errors import BadRequest, IntegrityError, OldAddress

HASH_HEX_LEN = 64
_BLOCK_ID_RE = re.compile(r"\As?[0-9a-f]{64}\Z")
_HOSTPORT_RE = re.compile(r"\A(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})\Z")


HASH_NAME = "BLAKE3 tree"


def block_hash(data: bytes | memoryview) -> str:
    """The address of stored bytes: the BLAKE3 tree of the bytes, bound to their size
    (`dsss.proofs.address`: 16 KiB leaves), lowercase hex. Any holder can be challenged to
    prove it keeps the bytes against this address alone."""
    return proofs.address(data)


def block_hasher() -> proofs.TreeHasher:
    """An incremental hasher whose `hexdigest()` is `block_hash` of the bytes given to `update`
    (and whose `outboard()` is what a store keeps to prove them)."""
    return proofs.TreeHasher()


def is_decimal(text: str) -> bool:
    """Whether text is ASCII digits only: `str.isdigit` alone also takes "²" or "٣", which
    `int` then refuses (or reads), so input checked with it could still raise."""
    return text.isascii() and text.isdigit()


SHARE_PREFIX = "s"
"""What starts a share ID: the address of one erasure-coded share of a part, `s` and the address
(`block_hash`) of the share's bytes. A share is stored on one agent only (the other shares are its redundancy), so
nothing copies it to reach the replica count; a plain part ID is the 64 hex characters alone."""


def share_id(data: bytes) -> str:
    """The address of a share: SHARE_PREFIX followed by `block_hash` of its bytes."""
    return SHARE_PREFIX + block_hash(data)


def is_block_id(text: str) -> bool:
    """Whether text is a part ID: a plain one (64 lowercase hex characters) or a share ID."""
    return isinstance(text, str) and bool(_BLOCK_ID_RE.match(text))


def is_share_id(block: str) -> bool:
    """Whether block is a share ID (SHARE_PREFIX and 64 lowercase hex characters)."""
    return is_block_id(block) and block.startswith(SHARE_PREFIX)


def check_block_id(text: str) -> str:
    """Return text if it is a part ID (64 lowercase hex characters, or a share ID: `s` and 64
    lowercase hex characters), else raise BadRequest."""
    if not isinstance(text, str) or not _BLOCK_ID_RE.match(text):
        raise BadRequest(
            f"not a part hash (64 lowercase hex characters, or 's' and 64 for a share): {str(text)[:80]!r}"
        )
    return text


def content_hash(block: str) -> str:
    """The address (`block_hash`) of the bytes a part ID names (its 64 hex characters, without
    a share's prefix); BadRequest if block is not a part ID."""
    check_block_id(block)
    return block[len(SHARE_PREFIX):] if block.startswith(SHARE_PREFIX) else block


def matches(block: str, data: bytes) -> bool:
    """Whether data are the bytes the part ID names: `block_hash` of data equals the ID's hash
    part, for plain and share IDs alike. False for anything that is not a part ID."""
    return is_block_id(block) and block_hash(data) == content_hash(block)


def matches_old_scheme(block: str, data: bytes) -> bool:
    """Whether data are the bytes the part ID names under the address scheme of DSSS before
    tree addresses (plain BLAKE3 of the bytes): to tell such parts apart from corrupt ones."""
    return is_block_id(block) and blake3.blake3(data).hexdigest() == content_hash(block)


def check_matches(block: str, data: bytes, source: str) -> None:
    """Raise IntegrityError unless data are the bytes the part ID names; OldAddress (naming
    what to do) if they are under the older scheme's address."""
    if matches(block, data):
        return
    if matches_old_scheme(block, data):
        raise OldAddress(
            f"{source} holds {block} under an address of an older DSSS (plain BLAKE3 of its "
            f"bytes); this version addresses by BLAKE3 trees and cannot check, prove or repair it. "
            f"Get the file with the DSSS that stored it, and store it again with this version"
        )
    raise IntegrityError(f"{source} sent bytes that do not match the part's hash")


@dataclass(frozen=True, order=True)
class PeerAddress:
    """A UDP address at which a peer is reached: an IP literal and a port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise BadRequest(f"not an IP address: {self.host[:80]!r}") from None
        if not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise BadRequest(f"not a port: {self.port!r}")

    @classmethod
    def parse(cls, text: str) -> "PeerAddress":
        """Parse `HOST:PORT` (IPv4) or `[HOST]:PORT` (IPv6)."""
        m = _HOSTPORT_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise BadRequest(f"not an address of the form HOST:PORT: {str(text)[:80]!r}")
        host = m.group("v6") or m.group("v4")
        return cls(host, int(m.group("port")))

    @classmethod
    def from_tuple(cls, addr: tuple[str, int]) -> "PeerAddress":
        return cls(addr[0], addr[1])

    def as_tuple(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def check_local_address(address: PeerAddress) -> PeerAddress:
    """Return `address` if a neighbour on the same LAN can send to it (a unicast IP: not
    0.0.0.0 or ::, multicast, broadcast, or IPv6 link-local, which needs an interface), else
    raise BadRequest. For the local addresses agents and clients report (`LOCAL`, `local=`)."""
    ip = ipaddress.ip_address(address.host)
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255") or (
        ip.version == 6 and ip.is_link_local
    ):
        raise BadRequest(f"not an address a neighbour can reach: {address}")
    return address


UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::")
"""What a socket bound to every interface reports as its host."""


def lan_address(host: str, port: int) -> PeerAddress | None:
    """`host`:`port` (an interface's address, its scope dropped) if a neighbour can reach it
    (`check_local_address`), else None: what an agent (`LOCAL`) or a client (`local=`) reports."""
    try:
        return check_local_address(PeerAddress(host.split("%", 1)[0], port))
    except BadRequest:
        return None


_SIZE_RE = re.compile(r"\A([0-9]+)([KMGT]?)(i?B?)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Parse a size such as `4096`, `512K`, `10G` or `1GiB` (binary units)."""
    m = _SIZE_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise BadRequest(f"not a size (e.g. 4096, 512K, 10G): {str(text)[:40]!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]
