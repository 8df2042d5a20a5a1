# -*- test-case-name: tests.unit.test_quic -*-
"""
One UDP socket carrying QUIC connections and DSSS control datagrams, and their connection table.

It demultiplexes what arrives, routes relayed packets and sends what each reactor turn produced.
A datagram whose first byte is C{0x00} is DSSS control (PING, PONG, PUNCH,
...), C{0x01} a packet relayed by the discovery server (unwrapped here, then
routed like any other), anything else QUIC.  QUIC v1/v2 packets always have the
fixed bit C{0x40} set in their first byte, so they can never be confused (a
short-header packet may well start with C{0x50}, C{'P'}).  QUIC datagrams are
routed by destination connection ID; an Initial from an unknown peer creates a
server-side connection when the endpoint has a server identity.

Outgoing datagrams are collected once per reactor turn (one C{callLater(0)}
for the whole endpoint) from every connection that did something since the
last turn, and leave through L{dsss.quic.batching}.  Everything runs on the
injected clock, so tests drive it with L{twisted.internet.task.Clock} (see
L{dsss.quic.testing}).

New server-side handshakes pass address validation (L{dsss.quic.retry}) first.
The module is a little over 600 lines because the demultiplexer, the table and
the turn's sends share the connection table and are read together; the
connection, stream, relay, batching and retry logic live in their own modules.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509 import Certificate
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.packet import (
    SMALLEST_MAX_DATAGRAM_SIZE,
    QuicPacketType,
    encode_quic_version_negotiation,
)
from qh3.tls import SignatureAlgorithm
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from dsss.endpoints import enlarge_socket_buffers
from dsss.errors import RemoteProtocolError
from dsss.quic._engine import Connection, encode_retry, native_identity, parse_header
from dsss.quic.batching import GroPort, SegmentedSender, send_one_by_one
from dsss.quic.connection import DEFAULT_HANDSHAKE_TIMEOUT, QuicConnectionHandle
from dsss.quic.errors import ConnectionFailed, QuicError
from dsss.quic.relay import RelayRoutes
from dsss.quic.retry import RETRY_CID_LENGTH, AdmissionPolicy, HalfOpen, RetryTokens
from dsss.quic.stream import QuicStream
from dsss.wire.datagram import RELAY_PREFIX, decode_relay

__all__ = [
    "ALPN",
    "CONTROL_PREFIX",
    "LOOPBACK_DATAGRAM_SIZE",
    "MAX_DATAGRAM_SIZE_LIMIT",
    "QuicEndpoint",
]

log = Logger()

Address = tuple[str, int]

CONTROL_PREFIX = b"\x00"
"""First byte of every DSSS control datagram; never the first byte of QUIC."""

ALPN = "dsss/1"

CONNECTION_ID_LENGTH = 8
MAX_DATAGRAM_SIZE_LIMIT = 65000
"""Largest datagram size accepted: a UDP payload fits in 65507 bytes over IPv4, and a relayed
datagram carries a header of its own. Only loopback (MTU 65536) and jumbo-frame paths can use
more than 1452; `bench/quic_pipe.py` moved 330 MB/s at 16000 bytes and 500 MB/s at 60000."""
LOOPBACK_DATAGRAM_SIZE = 65000
"""The datagram size used when every peer is on loopback (the client's and agents' default
there)."""

MAX_DATA = 4 * 1024 * 1024
"""Initial connection-wide receive window: at most this much is in flight per connection."""
MAX_STREAM_DATA = 2 * 1024 * 1024
"""Initial per-stream receive window."""

UDP_MAX_PACKET_SIZE = 65535

CLOSE_GRACE = 3.0
"""Longest L{QuicEndpoint.close} waits for connections to finish closing."""
BLOCKED_RETRY = 0.001
"""Delay before retrying a send that found the socket buffer full."""

DEFAULT_MAX_CONNECTIONS = 1024


class QuicEndpoint(DatagramProtocol):
    """
    A UDP socket carrying QUIC connections and DSSS control datagrams.

    @param clock: the time source for every timer.
    @param on_control: called with C{(datagram, address)} for each datagram
        whose first byte is L{CONTROL_PREFIX} (the prefix is included).
    @param server_identity: C{(certificate, private_key)}; if given, QUIC
        Initials from unknown peers create server-side connections.
    @param on_stream: called with each stream the peer opens, on any
        connection; if L{None}, such streams are reset.
    @param max_datagram_size: largest QUIC datagram sent (1200..65000); keep
        the default on real networks, raise it only on loopback.
    @param idle_timeout: seconds of silence after which a connection ends.
    @param keepalive: if set, seconds between the PINGs a connection sends
        while it is in use, so that its peer's stack answers and the idle
        timeout (which can then be short) detects a peer that died, not one
        that is slow to reply.
    @param max_connections: most server-side connections kept at once.
    @param admission: when new handshakes must first answer a Retry (address
        validation), and how many one address may hold half-open.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        on_control: Callable[[bytes, Address], None],
        server_identity: tuple[Certificate, Ed25519PrivateKey] | None = None,
        on_stream: Callable[[QuicStream], None] | None = None,
        max_datagram_size: int = 1452,
        idle_timeout: float = 30.0,
        keepalive: float | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        if not SMALLEST_MAX_DATAGRAM_SIZE <= max_datagram_size <= MAX_DATAGRAM_SIZE_LIMIT:
            raise ValueError(
                f"max_datagram_size must be within {SMALLEST_MAX_DATAGRAM_SIZE}.."
                f"{MAX_DATAGRAM_SIZE_LIMIT}"
            )
        self._clock = clock
        self._on_control = on_control
        self._server_identity = server_identity
        self._native_identity = (
            native_identity(server_identity) if server_identity is not None else None
        )
        self._on_stream = on_stream
        self._max_datagram_size = max_datagram_size
        self._idle_timeout = idle_timeout
        self._keepalive = keepalive
        self._max_connections = max_connections
        # Server-side handshakes not completed yet, and the Retry tokens that validate addresses.
        self._half_open = HalfOpen(admission or AdmissionPolicy())
        self._half_open_handles: set[QuicConnectionHandle] = set()
        self._retry_tokens = RetryTokens()
        self.retries_sent = 0
        self._by_cid: dict[bytes, QuicConnectionHandle] = {}
        self._clients: dict[tuple[Address, bytes | None], QuicConnectionHandle] = {}
        self._servers: dict[Address, QuicConnectionHandle] = {}
        self._all: set[QuicConnectionHandle] = set()
        self._dirty: dict[QuicConnectionHandle, None] = {}
        self._unsent: list[tuple[bytes, Address]] = []
        self._flush_call: IDelayedCall | None = None
        self._port: IListeningPort | None = None
        self._closing = False
        self._supported_versions = QuicConfiguration().supported_versions
        # Relaying (TURN-like, through the discovery server).
        self._relays = RelayRoutes()
        # UDP segmentation offload (Linux): on until the kernel refuses it.
        self._sender = SegmentedSender()

    # setup

    def listen(
        self, reactor: Any, host: str = "127.0.0.1", port: int = 0
    ) -> IListeningPort:
        """
        Listen on UDP C{host}:C{port} with large datagrams and socket buffers.
        The endpoint then owns the port and L{close} stops it.
        """
        if GroPort.usable(reactor):
            listening: IListeningPort = GroPort(
                port, self, interface=host, maxPacketSize=UDP_MAX_PACKET_SIZE, reactor=reactor
            )
            listening.startListening()
        else:
            listening = reactor.listenUDP(
                port, self, interface=host, maxPacketSize=UDP_MAX_PACKET_SIZE
            )
        sock = getattr(listening, "socket", None)
        if sock is not None:
            enlarge_socket_buffers(sock)
        self._port = listening
        return listening

    @property
    def address(self) -> Address:
        """The local C{(host, port)} the socket is bound to."""
        host = self._transport().getHost()
        return (host.host, host.port)

    def _transport(self) -> Any:
        transport = self.transport
        if transport is None:
            raise QuicError("the endpoint has no socket")
        return transport

    @property
    def connections(self) -> list[QuicConnectionHandle]:
        """Every connection the endpoint currently holds."""
        return list(self._all)

    # control datagrams

    def send_control(self, data: bytes, addr: Address) -> None:
        """Send a control datagram; it must start with L{CONTROL_PREFIX}."""
        if not data.startswith(CONTROL_PREFIX):
            raise ValueError("control datagrams must start with CONTROL_PREFIX")
        self._write(data, addr)

    # client role

    def connect(
        self,
        addr: Address,
        *,
        expected_public_key: bytes | None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> Deferred[QuicConnectionHandle]:
        """
        Connect to C{addr} as a QUIC client, or reuse a live connection made
        with the same C{expected_public_key}.

        @param expected_public_key: the raw Ed25519 key the peer's certificate
            must carry, or L{None} to accept any.
        @return: fires with the connection after the handshake; fails with
            L{PeerIdentityError} if the key differs (the connection is then
            closed), or L{ConnectionFailed} if the handshake fails or does not
            finish within C{handshake_timeout} seconds.
        """
        if self._closing or self.transport is None:
            return fail(ConnectionFailed("endpoint is closed"))
        if not (isIPAddress(addr[0]) or isIPv6Address(addr[0])):
            return fail(ConnectionFailed(f"{addr[0]!r} is not an IP address"))
        addr = (addr[0], addr[1])
        key = (addr, expected_public_key)
        existing = self._clients.get(key)
        if existing is not None and existing._lost is None:
            if existing._established:
                return succeed(existing)
            return existing._wait_for_handshake()
        configuration = self._configuration(is_client=True)
        quic = Connection(configuration=configuration)
        handle = QuicConnectionHandle(
            self, quic, addr, is_client=True, expected_public_key=expected_public_key
        )
        self._clients[key] = handle
        self._all.add(handle)
        self._add_cid(handle, quic.host_cid)
        d = handle._wait_for_handshake()
        handle._handshake_timeout = self._clock.callLater(
            handshake_timeout, handle._handshake_timed_out, handshake_timeout
        )
        quic.connect(addr, now=self._clock.seconds())
        handle._changed()
        return d

    # shutdown

    def close(self, grace: float = CLOSE_GRACE) -> Deferred[None]:
        """
        Close every connection gracefully, wait (at most C{grace} seconds) for
        them to end, then stop listening if L{listen} was used.

        With C{grace=0} (a client that is about to exit) each peer is still
        sent its CONNECTION_CLOSE at once, but the closing period that would
        repeat it if it were lost (three probe timeouts) is not waited for:
        a peer that misses it ends the connection at its idle timeout.
        """
        self._closing = True
        handles = list(self._all)
        for handle in handles:
            handle.close()
        waits = [handle.when_closed() for handle in handles]

        def force() -> None:
            for handle in list(self._all):
                handle._terminate()

        if grace <= 0:
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._flush()  # the CONNECTION_CLOSE frames leave now
            force()
        grace_call = self._clock.callLater(max(0.0, grace), force)

        def stop(_: object) -> Deferred[None] | None:
            if grace_call.active():
                grace_call.cancel()
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
            port, self._port = self._port, None
            if port is not None:
                return port.stopListening()
            return None

        done: Deferred[Any] = DeferredList(waits)
        done.addCallback(stop)
        done.addCallback(lambda _: None)
        return done

    def stopProtocol(self) -> None:
        """The port stopped: forget every connection."""
        for handle in list(self._all):
            handle._terminate()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    # relaying

    def trust_relay(self, relay: Address) -> None:
        """Accept packets that `relay` forwards (wrapped with RELAY_PREFIX) from other peers;
        our answers to those peers then go back through it."""
        self._relays.trust(relay)

    def relay_via(self, peer: Address, relay: Address) -> None:
        """Reach `peer` through `relay` from now on (the relay must have authorized it)."""
        self._relays.via(peer, relay)

    def relayed(self, peer: Address) -> bool:
        return self._relays.relayed(peer)

    def _direct_connection(self, peer: Address) -> bool:
        return any(h.peer == peer for h in self._all) and not self._relays.relayed(peer)

    # incoming datagrams

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Route a datagram to on_control or to its QUIC connection; never raise."""
        try:
            if not datagram:
                return
            peer = (addr[0], addr[1])
            if datagram[0] == RELAY_PREFIX[0]:
                unwrapped = self._relays.unwrap(datagram, peer, self._direct_connection)
                if unwrapped is None:
                    return
                datagram, peer = unwrapped
            if datagram[0] == CONTROL_PREFIX[0]:
                self._on_control(datagram, peer)
                return
            if datagram[0] == RELAY_PREFIX[0]:
                return  # no relays within relays
            self._receive_quic(datagram, peer)
        except Exception:
            log.failure("error handling a datagram from {addr!r}", addr=addr)

    def segmentsReceived(self, buffer: bytes, segment_size: int, addr: Any) -> None:
        """
        Several datagrams from C{addr} in one read (UDP GRO): each is
        C{segment_size} bytes but the last, which may be shorter.  When they
        all are short-header QUIC packets for one known connection, qh3 takes
        them in one call, and so it does for a relay's run of such packets
        from one peer already reached through it (unwrapped); anything else
        (control or handshake datagrams, packets for several connections or
        peers, a first relayed packet) is handled one datagram at a time.
        """
        try:
            size = len(buffer)
            if size <= segment_size:
                self.datagramReceived(buffer, addr)
                return
            peer = (addr[0], addr[1])
            first = buffer[0]
            if first == RELAY_PREFIX[0]:
                if peer in self._relays.relays and self._relayed_run(buffer, segment_size, peer):
                    return
            elif not first & 0x80 and first != CONTROL_PREFIX[0]:
                datagrams = [buffer[i : i + segment_size] for i in range(0, size, segment_size)]
                if self._one_connection(datagrams, peer):
                    return
        except Exception:
            log.failure("error handling datagrams from {addr!r}", addr=addr)
            return
        view = memoryview(buffer)
        for i in range(0, size, segment_size):
            self.datagramReceived(bytes(view[i : i + segment_size]), addr)

    def _one_connection(self, datagrams: list[bytes], peer: Address) -> bool:
        """Give a run of datagrams to their connection in one call, if all of them are
        short-header QUIC packets for one known connection; C{False} if not."""
        cid = datagrams[0][1 : 1 + CONNECTION_ID_LENGTH]
        handle = self._by_cid.get(cid)
        # A short header has the form bit clear and the fixed bit set (0x40-0x7f: never DSSS's
        # control or relay prefix), then the destination connection ID.
        if handle is None or not all(d and 0x40 <= d[0] < 0x80 and d.startswith(cid, 1) for d in datagrams):
            return False
        handle._receive_many(datagrams, peer, self._clock.seconds())
        return True

    def _relayed_run(self, buffer: bytes, segment_size: int, relay: Address) -> bool:
        """A run from C{relay}: each stretch of datagrams with one relay header (the relay's
        run for one peer; GRO may join the runs of several) that wraps QUIC packets of one
        connection of a peer already reached through that relay is unwrapped and taken in one
        call; any other stretch (a first relayed packet, control inside) datagram by
        datagram, in order. C{False} (nothing done) if the first header does not decode."""
        size = len(buffer)
        try:
            decode_relay(buffer[:segment_size])
        except RemoteProtocolError:
            return False
        i = 0
        while i < size:
            first = buffer[i : i + segment_size]
            try:
                inner_peer, packet = decode_relay(first)
            except RemoteProtocolError:
                self.datagramReceived(first, relay)
                i += segment_size
                continue
            hlen = len(first) - len(packet)
            header = first[:hlen]
            j = i + segment_size
            while j < size and buffer.startswith(header, j):
                j += segment_size
            known = self._relays.known(inner_peer, relay)
            datagrams = [buffer[k + hlen : k + segment_size] for k in range(i, j, segment_size)]
            if not (known and self._one_connection(datagrams, inner_peer)):
                for k in range(i, j, segment_size):
                    self.datagramReceived(buffer[k : k + segment_size], relay)
            i = j
        return True

    def _receive_quic(self, data: bytes, addr: Address) -> None:
        now = self._clock.seconds()
        if not data[0] & 0x80:
            # Short header (the bulk of the traffic): the destination CID is
            # the next CONNECTION_ID_LENGTH bytes, and only a known one matters.
            handle = self._by_cid.get(data[1 : 1 + CONNECTION_ID_LENGTH])
            if handle is not None:
                handle._receive(data, addr, now)
            return
        try:
            header = parse_header(data, CONNECTION_ID_LENGTH)
        except ValueError:
            return
        handle = self._by_cid.get(header.destination_cid)
        if handle is not None:
            handle._receive(data, addr, now)
            return
        if self._server_identity is None or self._closing:
            return
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            return
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return  # RFC 9000 14.1; also keeps replies smaller than requests
        if header.version is not None and header.version not in self._supported_versions:
            self._write(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self._supported_versions,
                ),
                addr,
            )
            return
        if header.packet_type != QuicPacketType.INITIAL:
            return
        if sum(1 for h in self._all if not h.is_client) >= self._max_connections:
            log.warn("QUIC connection limit reached, dropping {addr!r}", addr=addr)
            return
        host = addr[0]
        if self._half_open.full(host):
            return  # this address already holds all the handshakes it may
        original_cid, retry_cid = header.destination_cid, None
        checked = self._retry_tokens.check(addr, header.token, now) if header.token else None
        if checked is not None:
            original_cid, retry_cid = checked
        elif self._half_open.must_validate(host):
            self._send_retry(header, addr, now)
            return
        self._accept(data, addr, header.destination_cid, original_cid, retry_cid, now)

    def _send_retry(self, header: Any, addr: Address, now: float) -> None:
        """Ask the peer to prove its address: it must echo the token from this address."""
        retry_cid = os.urandom(RETRY_CID_LENGTH)
        token = self._retry_tokens.make(addr, header.destination_cid, retry_cid, now)
        self._write(encode_retry(header.version, retry_cid, header.source_cid, header.destination_cid, token), addr)
        self.retries_sent += 1

    def _accept(self, data: bytes, addr: Address, routing_cid: bytes, original_cid: bytes,
                retry_cid: bytes | None, now: float) -> None:
        quic = Connection(
            configuration=self._configuration(is_client=False),
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_cid,
        )
        quic.receive_datagram(data, addr, now)
        if not quic.authenticated():
            return  # the Initial did not decrypt: garbage, keep no state
        handle = QuicConnectionHandle(self, quic, addr, is_client=False)
        previous = self._servers.get(addr)
        if previous is not None:
            if previous._established:
                # Keep the old connection until the new one proves the peer is
                # really there, so a spoofed Initial cannot cut it off.
                handle._replaces = previous
            else:
                previous.close()
        self._servers[addr] = handle
        self._all.add(handle)
        self._half_open_handles.add(handle)
        self._half_open.opened(addr[0])
        self._add_cid(handle, routing_cid)
        self._add_cid(handle, quic.host_cid)
        handle._handshake_timeout = self._clock.callLater(
            DEFAULT_HANDSHAKE_TIMEOUT,
            handle._handshake_timed_out,
            DEFAULT_HANDSHAKE_TIMEOUT,
        )
        handle._changed()

    # tables

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            connection_id_length=CONNECTION_ID_LENGTH,
            idle_timeout=self._idle_timeout,
            max_datagram_size=self._max_datagram_size,
            max_data=MAX_DATA,
            max_stream_data=MAX_STREAM_DATA,
        )
        if is_client:
            # No PKI: the peer's key is pinned after the handshake instead.
            configuration.verify_mode = ssl.CERT_NONE
            # TLS still checks the CertificateVerify signature with the
            # certificate's key; DSSS identities are Ed25519 keys.
            configuration.signature_algorithms = [SignatureAlgorithm.ED25519]
        else:
            assert self._native_identity is not None  # set with the server identity
            configuration.certificate, configuration.private_key = self._native_identity
        return configuration

    def _add_cid(self, handle: QuicConnectionHandle, cid: bytes) -> None:
        self._by_cid[cid] = handle
        handle._cids.add(cid)

    def _remove_cid(self, handle: QuicConnectionHandle, cid: bytes) -> None:
        if self._by_cid.get(cid) is handle:
            del self._by_cid[cid]
        handle._cids.discard(cid)

    def _forget_peer(self, handle: QuicConnectionHandle) -> None:
        """Stop offering C{handle} for reuse (it is closing)."""
        for key, h in list(self._clients.items()):
            if h is handle:
                del self._clients[key]
        if self._servers.get(handle.peer) is handle:
            del self._servers[handle.peer]

    def _handshake_done(self, handle: QuicConnectionHandle) -> None:
        """A server-side handshake completed or ended: it no longer counts as half-open."""
        if handle in self._half_open_handles:
            self._half_open_handles.discard(handle)
            self._half_open.closed(handle.peer[0])

    def _forget(self, handle: QuicConnectionHandle) -> None:
        self._handshake_done(handle)
        self._forget_peer(handle)
        for cid in list(handle._cids):
            self._remove_cid(handle, cid)
        self._all.discard(handle)
        self._dirty.pop(handle, None)

    # outgoing datagrams

    def _mark_dirty(self, handle: QuicConnectionHandle) -> None:
        if handle._terminated:
            return
        self._dirty[handle] = None
        self._schedule_flush(0)

    def _schedule_flush(self, delay: float) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        """Send what every changed connection has to send, once per turn."""
        self._flush_call = None
        if self.transport is None:
            return
        if not self._send_unsent():
            self._schedule_flush(BLOCKED_RETRY)
            return
        now = self._clock.seconds()
        dirty, self._dirty = self._dirty, {}
        for handle in dirty:
            if handle._terminated:
                continue
            try:
                datagrams = handle._quic.datagrams_to_send(now)
            except Exception:
                log.failure("QUIC failed to build datagrams")
                datagrams = []
            self._unsent.extend(datagrams)
            # datagrams_to_send may change state (closing) and thus the timer.
            handle._process_events()
            handle._arm_timer()
            handle._check_writers()
            if not self._send_unsent():
                # Socket full: keep the remaining connections for the retry.
                for rest in dirty:
                    if not rest._terminated:
                        self._dirty.setdefault(rest, None)
                self._schedule_flush(BLOCKED_RETRY)
                return

    def _send_unsent(self) -> bool:
        """Write queued datagrams; False if the socket buffer filled up."""
        unsent = self._unsent
        if self._relays.peers:
            # Wrap what goes through a relay first (a no-op for what is already wrapped, which
            # is addressed to the relay): a connection's datagrams to the relay are then runs of
            # one size too.
            route = self._relays.route
            unsent[:] = [route(data, addr) for data, addr in unsent]
        transport = self._transport()
        # The socket itself when there is one: Port.write re-validates the address of every
        # datagram, which costs more than the send.
        sock = getattr(transport, "socket", None)
        if sock is not None:
            sent = self._sender.send(sock, unsent)
        else:
            sent = send_one_by_one(transport.write, unsent)
        del unsent[:sent]
        return not unsent

    def _write(self, data: bytes, addr: Address) -> None:
        """Send one datagram now, or queue it if the socket is full."""
        if self._unsent:
            self._unsent.append((data, addr))
            self._schedule_flush(BLOCKED_RETRY)
            return
        try:
            routed, to = self._relays.route(data, addr) if self._relays.peers else (data, addr)
            self._transport().write(routed, to)
        except BlockingIOError:
            self._unsent.append((data, addr))
            self._schedule_flush(BLOCKED_RETRY)
        except OSError as e:
            log.debug("UDP send to {addr!r} failed: {e}", addr=addr, e=e)
