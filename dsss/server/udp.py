# -*- test-case-name: tests.adapters.test_relay_quic -*-
"""The server's UDP socket: PING answers with the observed address, and the relay.

- Answers PINGs with the address it observed (how agents and clients behind NAT learn their
  public address, and how the server learns where peers reach an agent).
- Relays, TURN-like, for a client and an agent that cannot reach each other directly (symmetric
  NAT): a client asks with `RELAY <introduction key>` (a key this server handed it for that agent),
  then sends QUIC packets wrapped as relayed datagrams; the server forwards them, re-wrapped with
  the sender's address, over the NAT mappings both ends keep open towards it. It sees only QUIC
  packets, encrypted end to end. On Linux the socket reads with UDP GRO (`dsss.quic.batching.GroPort`):
  a run of relayed packets from one sender to one peer (QUIC sends them in GSO runs) arrives in
  one read and leaves in one `sendmsg` with UDP segmentation offload, headers swapped, instead
  of one read, one Python call and one `sendto` per packet.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from dsss.errors import DSSSError
from dsss.metrics import ServerMetrics
from dsss.model import PeerAddress
from dsss.quic.batching import SegmentedSender
from dsss.ratelimit import RateLimiter
from dsss.server.registry import Registry
from dsss.server.relay import RelayTable
from dsss.wire.datagram import (
    RELAY_PREFIX,
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

log = Logger()


class RelayingServer(Protocol):
    """What the UDP socket uses of the server (dsss.server.service.DiscoveryServer)."""

    @property
    def clock(self) -> Any: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def relays(self) -> RelayTable: ...
    @property
    def metrics(self) -> ServerMetrics: ...

    def authorize_relay(self, key: str, client: PeerAddress) -> PeerAddress | None: ...


class DiscoveryDatagramProtocol(DatagramProtocol):
    def __init__(self, server: RelayingServer) -> None:
        self.server = server
        self.received = 0
        self.dropped = 0
        # Control datagrams come every few seconds from each peer; 20/s per source address is
        # plenty, and a flood from one address is dropped without costing the others anything.
        # Relayed packets are limited by the relay's own per-pair byte rate instead.
        self.limiter = RateLimiter(rate=20, burst=40)
        self._peers: dict[tuple[str, int], PeerAddress] = {}
        # Relayed runs leave in one sendmsg until the kernel refuses.
        self._sender = SegmentedSender(enabled=True)

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self.transport
        if transport is None:
            return  # no longer listening: nothing to send from
        try:
            transport.write(data, addr)
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

    def segmentsReceived(self, data: bytes, size: int, addr: tuple[str, int]) -> None:
        """A run of datagrams of `size` bytes (the last may be shorter) from one sender, read at
        once with UDP GRO. Each stretch of relayed packets to one peer is forwarded as a run (a
        sender's GSO batch may hold the packets of several of its connections through the
        relay, one after the other); anything else (PINGs, a malformed header) datagram by
        datagram."""
        segments = [data[i : i + size] for i in range(0, len(data), size)]
        sock = getattr(self.transport, "socket", None)
        src_addr = (addr[0], addr[1])
        src = None
        if data[:1] == RELAY_PREFIX and sock is not None and self._sender.enabled:
            try:
                src = self._peer(src_addr)
            except DSSSError:
                pass
        if src is None:
            for segment in segments:
                self.datagramReceived(segment, addr)
            return
        header_out = encode_relay(src_addr, b"")
        now = self.server.clock.seconds()
        forwarded = 0
        i, n = 0, len(segments)
        while i < n:
            first = segments[i]
            target = self._run_target(first, len(header_out))
            if target is None:  # not relayed, malformed, or the header changes size: on its own
                self.datagramReceived(first, addr)  # counts it
                i += 1
                continue
            dst_addr, dst = target
            hlen = len(header_out)
            header_in = first[:hlen]
            run: list[bytes] = []  # payloads of consecutive segments for dst
            while i < n and segments[i][:hlen] == header_in:
                self.received += 1
                if len(segments[i]) <= hlen:
                    self.dropped += 1
                else:
                    run.append(segments[i][hlen:])
                i += 1
            if run:
                allowed = self.server.relays.forward_run(src, dst, [len(p) for p in run], now)
                self.dropped += len(run) - allowed
                if allowed:
                    self._send_relayed_run(sock, [header_out + p for p in run[:allowed]], dst_addr)
                    forwarded += sum(len(p) for p in run[:allowed])
        if forwarded:
            self.server.metrics.relayed_bytes(forwarded)

    def _run_target(self, segment: bytes, hlen: int) -> tuple[tuple[str, int], PeerAddress] | None:
        """Where a relayed segment goes (its address, and as a PeerAddress), if its relay header
        is `hlen` bytes long (that of the sender's address, which replaces it); else None."""
        try:
            dst_addr, payload = decode_relay(segment)
            if len(segment) - len(payload) != hlen:
                return None
            return dst_addr, self._peer(dst_addr)
        except DSSSError:
            return None

    @property
    def runs_relayed(self) -> int:
        """Runs forwarded whole, in one sendmsg (for tests and curiosity)."""
        return self._sender.runs

    def _send_relayed_run(self, sock: Any, run: list[bytes], dst_addr: tuple[str, int]) -> None:
        """Send datagrams of one size (the last may be shorter) to one address, in GSO runs;
        what finds the socket buffer full is dropped (QUIC recovers)."""
        sent = self._sender.send(sock, [(datagram, dst_addr) for datagram in run])
        if sent < len(run):
            log.debug("{n} relayed datagrams to {addr} not sent: socket buffer full", n=len(run) - sent, addr=dst_addr)

    def _sendto(self, sock: Any, datagram: bytes, addr: tuple[str, int]) -> None:
        try:
            sock.sendto(datagram, addr)
        except OSError as e:  # a full socket buffer drops it; QUIC recovers
            log.debug("relayed datagram to {addr} not sent: {e}", addr=addr, e=e)

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
        self.server.metrics.relayed_bytes(len(packet))
        out = encode_relay(src_addr, packet)
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            self._send(out, dst_addr)
            return
        # The socket itself: Port.write re-validates the address of every packet.
        self._sendto(sock, out, dst_addr)
