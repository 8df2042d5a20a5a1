# -*- test-case-name: tests.adapters.test_server_udp -*-
"""The server's UDP socket: answers PINGs with the address it observed (how agents and clients
behind NAT learn their public address, and how the server learns where peers reach an agent)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from dsss.errors import DSSSError
from dsss.model import PeerAddress
from dsss.ratelimit import RateLimiter
from dsss.wire.datagram import DPing, DPong, encode_datagram, is_control, parse_datagram

if TYPE_CHECKING:
    from dsss.server.service import DiscoveryServer

log = Logger()


class DiscoveryDatagramProtocol(DatagramProtocol):
    def __init__(self, server: "DiscoveryServer") -> None:
        self.server = server
        self.received = 0
        self.dropped = 0
        # PINGs come every few seconds from each peer; 20/s per source address is plenty, and
        # a flood from one address is dropped without costing the others anything.
        self.limiter = RateLimiter(rate=20, burst=40)

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        if not self.limiter.allow(addr, self.server.clock.seconds()):
            self.dropped += 1
            return
        if not is_control(data):
            self.dropped += 1
            return
        try:
            msg = parse_datagram(data)
            observed = PeerAddress.from_tuple(addr[:2])
        except DSSSError:
            self.dropped += 1
            return
        if not isinstance(msg, DPing):
            self.dropped += 1
            return
        if msg.token != "-":
            self.server.registry.heard_udp(msg.token, observed, self.server.clock.seconds())
        try:
            self.transport.write(encode_datagram(DPong(observed)), addr)
        except OSError as e:  # a full socket buffer drops the PONG; the peer pings again
            log.debug("PONG to {addr} not sent: {e}", addr=addr, e=e)
