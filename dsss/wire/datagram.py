# -*- test-case-name: tests.unit.test_wire_datagram -*-
"""DSSS control datagrams on the shared UDP socket: PING, PONG and PUNCH.

Sans-I/O. Every DSSS datagram starts with one 0x00 byte followed by ASCII text. QUIC v1 packets
always have the fixed bit (0x40) set in their first byte, so a datagram whose first byte is 0x00
is never QUIC, and the two share one socket without ambiguity (a QUIC short header can start with
0x50, ASCII 'P', which is why the bare word PING cannot be used).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from dsss.errors import RemoteProtocolError
from dsss.model import PeerAddress

PREFIX = b"\x00"
MAX_DATAGRAM = 256
_TOKEN = re.compile(r"\A[0-9a-zA-Z_-]{1,64}\Z")


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


Datagram = Union[DPing, DPong, DPunch]


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
    else:  # pragma: no cover
        raise TypeError(msg)
    return PREFIX + body.encode("ascii")
