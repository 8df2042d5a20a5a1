"""Small frozen values shared by every layer, validated on construction."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import blake3

from dsss.errors import BadRequest

HASH_HEX_LEN = 64
_HASH_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_HOSTPORT_RE = re.compile(r"\A(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>[0-9]{1,5})\Z")


HASH_NAME = "BLAKE3"


def block_hash(data: bytes) -> str:
    """The address of stored bytes: BLAKE3 of the bytes (32-byte output), lowercase hex."""
    return blake3.blake3(data).hexdigest()


def block_hasher() -> "blake3.blake3":
    """An incremental hasher whose `hexdigest()` is `block_hash` of the bytes given to `update`."""
    return blake3.blake3()


def is_block_id(text: str) -> bool:
    return bool(_HASH_RE.match(text))


def check_block_id(text: str) -> str:
    """Return text if it is 64 lowercase hex characters, else raise BadRequest."""
    if not isinstance(text, str) or not _HASH_RE.match(text):
        raise BadRequest(f"not a part hash (64 lowercase hex characters): {text[:80]!r}")
    return text


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


_SIZE_RE = re.compile(r"\A([0-9]+)([KMGT]?)(i?B?)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Parse a size such as `4096`, `512K`, `10G` or `1GiB` (binary units)."""
    m = _SIZE_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise BadRequest(f"not a size (e.g. 4096, 512K, 10G): {str(text)[:40]!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]
