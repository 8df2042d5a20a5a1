# -*- test-case-name: tests.unit.test_wire_datagram -*-
"""DSSS control datagrams on the shared UDP socket: PING, PONG and PUNCH.

Sans-I/O. Every DSSS datagram starts with one 0x00 byte followed by ASCII text. QUIC v1 packets
always have the fixed bit (0x40) set in their first byte, so a datagram whose first byte is 0x00
is never QUIC, and the two share one socket without ambiguity (a QUIC short header can start with
0x50, ASCII 'P', which is why the bare word PING cannot be used).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Union

from dsss.errors import RemoteProtocolError
from dsss.model import PeerAddress

PREFIX = b"\x00"
MAX_DATAGRAM = 256
_TOKEN = re.compile(r"\A[0-9a-zA-Z_-]{1,64}\Z")
_KEY = re.compile(r"\A[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class DPing:
    """Keepalive / address discovery. `token` is an agent's secret UDP token, or `-` for clients."""

    token: str


@dataclass(frozen=True)
class DPong:
    """The server's answer: the address the PING came from, as the server saw it."""

    observed: PeerAddress


@dataclass(frozen=True)
class DPunch:
    """Sent to open a NAT mapping towards a peer; the receiver ignores it."""

    tag: str


@dataclass(frozen=True)
class DRelay:
    """Client -> server: relay my packets to the agent this introduction key was issued for."""

    key: str


@dataclass(frozen=True)
class DRelayed:
    """Server -> client: relaying to and from this agent is authorized."""

    agent: PeerAddress


Datagram = Union[DPing, DPong, DPunch, DRelay, DRelayed]

# Relayed packets: 0x01, then the other end's address (family byte 4 or 6, the IP, the port in
# two bytes, big-endian), then the packet. 0x01 has the QUIC fixed bit clear, so a relayed packet
# is never taken for QUIC or for a control datagram.
RELAY_PREFIX = b"\x01"
MAX_RELAYED = 65535


def is_relayed(data: bytes) -> bool:
    return data[:1] == RELAY_PREFIX


# Every relayed packet carries one of a few headers (one per peer): they are parsed and built
# once, then looked up (the ipaddress module costs more per packet than the relaying itself).
_HEADERS: dict[tuple[str, int], bytes] = {}
_ADDRESSES: dict[bytes, tuple[str, int]] = {}
_CACHE_MAX = 4096


def _remember(cache: dict, key: object, value: object) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value


def encode_relay(addr: tuple[str, int], payload: bytes) -> bytes:
    key = (addr[0], addr[1])
    header = _HEADERS.get(key)
    if header is None:
        packed = ipaddress.ip_address(addr[0]).packed
        family = b"\x04" if len(packed) == 4 else b"\x06"
        header = RELAY_PREFIX + family + packed + addr[1].to_bytes(2, "big")
        _remember(_HEADERS, key, header)
    return header + payload


def decode_relay(data: bytes) -> tuple[tuple[str, int], bytes]:
    """Split a relayed datagram into (address, packet); RemoteProtocolError if malformed."""
    if not is_relayed(data) or len(data) < 2:
        raise RemoteProtocolError("not a relayed datagram")
    n = {4: 4, 6: 16}.get(data[1])
    if n is None or len(data) < 2 + n + 2 + 1:
        raise RemoteProtocolError("relayed datagram with a bad header")
    header = bytes(data[: 4 + n])
    addr = _ADDRESSES.get(header)
    if addr is None:
        host = str(ipaddress.ip_address(data[2 : 2 + n]))
        port = int.from_bytes(data[2 + n : 4 + n], "big")
        if port == 0:
            raise RemoteProtocolError("relayed datagram for port 0")
        addr = (host, port)
        _remember(_ADDRESSES, header, addr)
    return addr, data[4 + n :]


def is_control(data: bytes) -> bool:
    return data[:1] == PREFIX


def parse_datagram(data: bytes) -> Datagram:
    if not is_control(data):
        raise RemoteProtocolError("not a DSSS control datagram")
    if len(data) > MAX_DATAGRAM:
        raise RemoteProtocolError("control datagram too long")
    try:
        text = data[1:].decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("control datagram is not ASCII") from None
    words = text.split(" ")
    if len(words) != 2:
        raise RemoteProtocolError("control datagram must be '<VERB> <arg>'")
    verb, arg = words
    if verb == "PING":
        if not _TOKEN.match(arg):
            raise RemoteProtocolError("PING: bad token")
        return DPing(arg)
    if verb == "PONG":
        try:
            return DPong(PeerAddress.parse(arg))
        except Exception:
            raise RemoteProtocolError("PONG: bad address") from None
    if verb == "RELAY":
        if not _KEY.match(arg):
            raise RemoteProtocolError("RELAY: bad key")
        return DRelay(arg)
    if verb == "RELAYED":
        try:
            return DRelayed(PeerAddress.parse(arg))
        except Exception:
            raise RemoteProtocolError("RELAYED: bad address") from None
    if verb == "PUNCH":
        if not _TOKEN.match(arg):
            raise RemoteProtocolError("PUNCH: bad tag")
        return DPunch(arg)
    raise RemoteProtocolError(f"unknown datagram verb {verb[:20]!r}")


def encode_datagram(msg: Datagram) -> bytes:
    if isinstance(msg, DPing):
        body = f"PING {msg.token}"
    elif isinstance(msg, DPong):
        body = f"PONG {msg.observed}"
    elif isinstance(msg, DPunch):
        body = f"PUNCH {msg.tag}"
    elif isinstance(msg, DRelay):
        body = f"RELAY {msg.key}"
    elif isinstance(msg, DRelayed):
        body = f"RELAYED {msg.agent}"
    else:  # pragma: no cover
        raise TypeError(msg)
    return PREFIX + body.encode("ascii")
