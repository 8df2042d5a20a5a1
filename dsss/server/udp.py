# -*- test-case-name: tests.adapters.test_server_udp -*-
"""The server's UDP socket.

- Answers PINGs with the address it observed (how agents and clients behind NAT learn their
  public address, and how the server learns where peers reach an agent).
- Relays, TURN-like, for a client and an agent that cannot reach each other directly (symmetric
  NAT): a client asks with `RELAY <introduction key>` (a key this server handed it for that agent),
  then sends QUIC packets wrapped as relayed datagrams; the server forwards them, re-wrapped with
  the sender's address, over the NAT mappings both ends keep open towards it. It sees only QUIC
  packets, encrypted end to end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from dsss.errors import DSSSError
from dsss.model import PeerAddress
from dsss.ratelimit import RateLimiter
from dsss.wire.datagram import (
    DPing,
    DPong,
    DRelay,
    DRelayed,
    decode_relay,
    encode_datagram,
    encode_relay,
    is_control,
    is_relayed,
    parse_datagram,
)

if TYPE_CHECKING:
    from dsss.server.service import DiscoveryServer

log = Logger()


class DiscoveryDatagramProtocol(DatagramProtocol):
    def __init__(self, server: "DiscoveryServer") -> None:
        self.server = server
        self.received = 0
        self.dropped = 0
        # Control datagrams come every few seconds from each peer; 20/s per source address is
        # plenty, and a flood from one address is dropped without costing the others anything.
        # Relayed packets are limited by the relay's own per-pair byte rate instead.
        self.limiter = RateLimiter(rate=20, burst=40)
        self._peers: dict[tuple[str, int], PeerAddress] = {}

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.transport.write(data, addr)
        except OSError as e:  # a full socket buffer drops it; QUIC or the next PING recovers
            log.debug("datagram to {addr} not sent: {e}", addr=addr, e=e)

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        now = self.server.clock.seconds()
        if is_relayed(data):
            self._relay(data, addr, now)
            return
        if not is_control(data) or not self.limiter.allow(addr, now):
            self.dropped += 1
            return
        try:
            msg = parse_datagram(data)
            observed = PeerAddress.from_tuple(addr[:2])
        except DSSSError:
            self.dropped += 1
            return
        if isinstance(msg, DPing):
            if msg.token != "-":
                self.server.registry.heard_udp(msg.token, observed, now)
            self._send(encode_datagram(DPong(observed)), addr)
        elif isinstance(msg, DRelay):
            agent = self.server.authorize_relay(msg.key, observed)
            if agent is not None:
                self._send(encode_datagram(DRelayed(agent)), addr)
            else:
                self.dropped += 1
        else:
            self.dropped += 1

    def _peer(self, addr: tuple[str, int]) -> PeerAddress:
        """The PeerAddress of `addr`, validated once per address (not once per packet)."""
        peer = self._peers.get(addr)
        if peer is None:
            peer = PeerAddress(addr[0], addr[1])
            if len(self._peers) >= 4096:
                self._peers.clear()
            self._peers[addr] = peer
        return peer

    def _relay(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        try:
            dst_addr, packet = decode_relay(data)
            src_addr = (addr[0], addr[1])
            src = self._peer(src_addr)
            dst = self._peer(dst_addr)
        except DSSSError:
            self.dropped += 1
            return
        if not packet or not self.server.relays.forward(src, dst, len(packet), now):
            self.dropped += 1
            return
        metrics = getattr(self.server, "metrics", None)
        if metrics is not None:
            metrics.relayed_bytes(len(packet))
        out = encode_relay(src_addr, packet)
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            self._send(out, dst_addr)
            return
        try:
            # The socket itself: Port.write re-validates the address of every packet.
            sock.sendto(out, dst_addr)
        except OSError as e:  # a full socket buffer drops it; QUIC recovers
            log.debug("relayed datagram to {addr} not sent: {e}", addr=dst_addr, e=e)
