# -*- test-case-name: tests.unit.test_quic -*-
"""
A small Twisted adapter around qh3's sans-I/O L{QuicConnection}.

qh3 is a fork of aioquic with the same API and a native (Rust) connection core:
it costs about a quarter of aioquic's CPU per byte (see docs/performance.md).

One L{QuicEndpoint} owns one UDP socket and drives every QUIC connection on
it, as a client (L{QuicEndpoint.connect}) and, when given a server identity,
as a server.  The same socket carries DSSS control datagrams (PING, PONG,
PUNCH, ...): a datagram whose first byte is C{0x00} is control, anything else
is QUIC.  QUIC v1/v2 packets always have the fixed bit C{0x40} set in their
first byte, so the two can never be confused (a QUIC short-header packet may
well start with C{0x50}, C{'P'}).

The adapter only moves datagrams and time:

  - incoming datagrams are routed by destination connection ID;
  - outgoing datagrams are collected once per reactor turn (one
    C{callLater(0)} for the whole endpoint) from every connection that did
    something since the last turn;
  - each connection arms one C{callLater} from C{get_timer()};
  - on Linux, a run of same-size datagrams to one address leaves in one
    C{sendmsg} with UDP segmentation offload (UDP_SEGMENT), one by one if the
    kernel refuses it.

Everything runs on the injected clock, so tests drive it with
L{twisted.internet.task.Clock} (see L{dsss.quic_testing}).

Identity: servers present a self-signed certificate for their Ed25519 key (see
L{dsss.crypto.certs}).  Clients do not check it against a CA: they pin the raw
public key instead, after TLS has verified the CertificateVerify signature made
with that key.

Usage::

    endpoint = QuicEndpoint(reactor, on_control=punch.datagram_received,
                            server_identity=make_certificate(seed),
                            on_stream=on_stream)
    endpoint.listen(reactor, "127.0.0.1", 4000)   # or listenUDP yourself
    handle = await endpoint.connect(peer, expected_public_key=peer_key)
    reply = await handle.request(b"...", max_response=1 << 20)

A stream (L{QuicStream}) delivers what it receives through callbacks, set
synchronously in C{on_stream} (data arriving before they are set is kept)::

    def on_stream(stream: QuicStream) -> None:
        stream.on_data = parser.feed        # called per chunk, in order
        stream.on_end = parser.finished     # the peer ended its side
        stream.on_error = parser.failed     # StreamReset or ConnectionLost

The adapter keeps nothing once C{on_data} is set: a handler processes an
upload chunk by chunk.  To refuse one early, either reply and stop reading
(C{stream.write(b"ERR ...", end=True); stream.stop_reading(code)}: the peer
gets the reply and stops sending) or abort both ways (C{stream.reset(code)}).
L{QuicStream.write} returns a Deferred that fires once what is queued on the
stream is under L{STREAM_SEND_HIGH_WATER}: wait for it before writing more.
"""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509 import Certificate
from qh3._hazmat import Buffer
from qh3._hazmat import Certificate as NativeCertificate
from qh3._hazmat import Ed25519PrivateKey as NativeEd25519PrivateKey
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import (
    SMALLEST_MAX_DATAGRAM_SIZE,
    QuicErrorCode,
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from qh3.quic.tls_bridge import QuicTlsBridge
from qh3.tls import SignatureAlgorithm
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dsss.crypto.certs import public_key_of
from dsss.endpoints import enlarge_socket_buffers
from dsss.errors import RemoteProtocolError
from dsss.udpgro import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    GSO_REFUSED,
    GroPort,
    send_run,
)
from dsss.wire.datagram import RELAY_PREFIX, decode_relay, encode_relay

__all__ = [
    "ALPN",
    "CONTROL_PREFIX",
    "ConnectionFailed",
    "ConnectionLost",
    "PeerIdentityError",
    "QuicConnectionHandle",
    "QuicEndpoint",
    "QuicError",
    "QuicStream",
    "RequestTimeout",
    "ResponseTooLarge",
    "StreamReset",
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

STREAM_SEND_HIGH_WATER = 1024 * 1024
"""A L{QuicStream.write} Deferred fires once the stream holds at most this many
unacknowledged bytes."""

UDP_MAX_PACKET_SIZE = 65535

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
CLOSE_GRACE = 3.0
"""Longest L{QuicEndpoint.close} waits for connections to finish closing."""
BLOCKED_RETRY = 0.001
"""Delay before retrying a send that found the socket buffer full."""

MAX_RELAY_PEERS = 4096
"""Most peers remembered as reached through a relay."""

APP_ERROR_IDENTITY = 0x1
APP_ERROR_STREAM = 0x1
DEFAULT_MAX_CONNECTIONS = 1024


class QuicError(Exception):
    """Base class of the errors raised by this module."""


class ConnectionFailed(QuicError):
    """The QUIC handshake did not complete (timeout, refusal, protocol error)."""


class PeerIdentityError(QuicError):
    """The peer's certificate key is not the expected one."""


class ResponseTooLarge(QuicError):
    """The peer sent more than the allowed number of bytes on a stream."""


class StreamReset(QuicError):
    """A stream was reset (by the peer, or locally)."""

    def __init__(self, error_code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset with error code {error_code}")
        self.error_code = error_code


class ConnectionLost(QuicError):
    """The connection closed, timed out or was lost while it was in use."""


class RequestTimeout(QuicError):
    """A request did not complete within its timeout."""


class _TlsBridge(QuicTlsBridge):
    """
    qh3's TLS bridge, except that a client announces its own
    C{max_datagram_size} as C{max_udp_payload_size} (qh3 always says 1472).
    The peer never sends a datagram larger than that, so without this an
    agent would answer a loopback client in 1.4 KB datagrams, with five times
    the per-datagram work of 8 KiB ones.
    """

    def serialize_transport_parameters(self) -> bytes:
        data: bytes = super().serialize_transport_parameters()
        if not self.configuration.is_client:
            return data
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        parameters.max_udp_payload_size = self.configuration.max_datagram_size
        buf = Buffer(capacity=len(data) + 16)
        push_quic_transport_parameters(buf, parameters)
        return bytes(buf.data)


class _Connection(QuicConnection):
    """
    qh3's L{QuicConnection} with L{_TlsBridge}, and a leaner
    L{datagrams_to_send}.
    """

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """
        qh3's own loop parses the header of every packet it sends to log it,
        even with no QUIC logger (a third of a busy sender's time at 1452-byte
        datagrams); without a logger, only the native core is polled.
        """
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        poll = core.poll_transmit
        datagrams: list[tuple[bytes, Any]] = []
        append = datagrams.append
        try:
            while (transmit := poll(now)) is not None:
                append((transmit[0], transmit[1]))
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return datagrams

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = _TlsBridge(
            self._configuration,
            version=self._version,
            local_initial_source_connection_id=self.host_cid,
            remote_initial_source_connection_id=remote_source_cid,
            original_destination_connection_id=self._original_destination_connection_id,
            retry_source_connection_id=self._retry_source_connection_id,
            session_ticket_fetcher=self._session_ticket_fetcher,
            session_ticket_handler=self._session_ticket_handler,
            quic_logger=self._quic_logger,
            version_change_handler=self._set_version,
        )
        self._tls = bridge
        return bridge


REQUEST_CHUNK = 256 * 1024
"""Bytes handed to QUIC per write by L{QuicConnectionHandle.request}."""


def _send_in_slices(stream: QuicStream, pieces: list[bytes]) -> None:
    """Write C{pieces} on C{stream} and end it, a slice at a time, waiting for
    the stream to drain below its high-water mark between slices.  A failed
    write stops it quietly: the request's reply, or its on_error, decides."""
    slices = [
        memoryview(piece)[offset : offset + REQUEST_CHUNK]
        for piece in pieces
        for offset in range(0, len(piece), REQUEST_CHUNK)
    ]
    if not slices:
        stream.write(b"", end=True).addErrback(lambda f: None)
        return
    slices.reverse()

    def pump(_: object = None) -> None:
        while slices:
            chunk = slices.pop()
            d = stream.write(chunk, end=not slices)
            if not d.called:
                d.addCallbacks(pump, lambda f: None)
                return
            outcome: list[object] = []
            d.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                return

    pump()


def _native_identity(
    identity: tuple[Certificate, Ed25519PrivateKey],
) -> tuple[NativeCertificate, NativeEd25519PrivateKey]:
    """The certificate and key as qh3's TLS stack wants them (DER, PKCS#8)."""
    certificate, key = identity
    der = certificate.public_bytes(serialization.Encoding.DER)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NativeCertificate(der), NativeEd25519PrivateKey(pkcs8)


def _peer_key(quic: QuicConnection) -> bytes | None:
    """The raw Ed25519 key of the certificate the peer presented, if any."""
    native = quic.get_peercert()
    if native is None:
        return None
    try:
        return public_key_of(x509.load_der_x509_certificate(native.public_bytes()))
    except ValueError:
        return None


class _StreamIds:
    """
    The peer-initiated stream IDs of one type (bidi or uni) that were already
    used and forgotten, so that late frames never recreate them.  Kept compact:
    every ID below C{floor} is done, and C{above} holds the done ones past it.
    """

    def __init__(self, first: int) -> None:
        self.floor = first
        self.above: set[int] = set()

    def add(self, stream_id: int) -> None:
        if stream_id < self.floor:
            return
        self.above.add(stream_id)
        while self.floor in self.above:
            self.above.discard(self.floor)
            self.floor += 4

    def __contains__(self, stream_id: int) -> bool:
        return stream_id < self.floor or stream_id in self.above


def _call_safely(stream: QuicStream | None, f: Callable[..., Any], *args: Any) -> None:
    """
    Call an application callback; if it raises, log it and reset C{stream}.
    """
    try:
        f(*args)
    except Exception:
        log.failure("stream callback {callback!r} raised", callback=f)
        if stream is not None:
            stream.reset(APP_ERROR_STREAM)


class QuicStream:
    """
    One QUIC stream, bidirectional unless the peer opened a unidirectional one.

    Receiving: set L{on_data}, L{on_end} and L{on_error}.  Data that arrives
    before a callback is set is kept and delivered when it is set.  Chunks are
    delivered as they arrive, in order; nothing is buffered by the adapter
    once C{on_data} is set, so the receiver must consume them (write them out,
    hash them) as they come.

    Sending: L{write}; L{reset} aborts both directions; L{stop_reading} asks
    the peer to stop sending (for instance after replying early to a bad
    header).
    """

    def __init__(self, connection: QuicConnectionHandle, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self._on_data: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._on_error: Callable[[QuicError], None] | None = None
        self._pending_data: list[bytes] = []
        self._pending_end = False
        self._pending_error: QuicError | None = None
        self._recv_done = False
        self._send_done = False
        self._send_error: QuicError | None = None
        self._write_waiters: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} to {self.connection.peer!r}>"

    # receiving

    @property
    def on_data(self) -> Callable[[bytes], None] | None:
        """Called with each chunk of data received, in order."""
        return self._on_data

    @on_data.setter
    def on_data(self, callback: Callable[[bytes], None] | None) -> None:
        self._on_data = callback
        if callback is not None and self._pending_data:
            pending, self._pending_data = self._pending_data, []
            for chunk in pending:
                if self._on_data is not callback:
                    break  # the callback reset the stream or replaced itself
                _call_safely(self, callback, chunk)
        self._deliver_pending_end()

    @property
    def on_end(self) -> Callable[[], None] | None:
        """Called once when the peer has ended its side of the stream."""
        return self._on_end

    @on_end.setter
    def on_end(self, callback: Callable[[], None] | None) -> None:
        self._on_end = callback
        self._deliver_pending_end()

    @property
    def on_error(self) -> Callable[[QuicError], None] | None:
        """
        Called once with L{StreamReset} if the peer reset its side, or
        L{ConnectionLost} if the connection went away before the peer ended
        its side.
        """
        return self._on_error

    @on_error.setter
    def on_error(self, callback: Callable[[QuicError], None] | None) -> None:
        self._on_error = callback
        if callback is not None and self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            _call_safely(None, callback, error)

    def _deliver_pending_end(self) -> None:
        if (
            self._pending_end
            and not self._pending_data
            and self._on_data is not None
            and self._on_end is not None
        ):
            self._pending_end = False
            _call_safely(self, self._on_end)

    def _received(self, data: bytes, end: bool) -> None:
        if self._recv_done:
            return
        if end:
            self._recv_done = True
        if data:
            if self._on_data is not None and not self._pending_data:
                _call_safely(self, self._on_data, data)
            else:
                self._pending_data.append(data)
        if end:
            self._pending_end = True
            self._deliver_pending_end()
        self._maybe_forget()

    def _receive_failed(self, error: QuicError) -> None:
        if self._recv_done:
            return
        self._recv_done = True
        self._pending_data = []
        if self._on_error is not None:
            _call_safely(None, self._on_error, error)
        else:
            self._pending_error = error
        self._maybe_forget()

    def stop_reading(self, error_code: int = 0) -> None:
        """
        Ask the peer to stop sending (QUIC STOP_SENDING) and ignore what it
        still sends.  The sending side stays open, so a reply can follow.
        """
        if self._recv_done:
            return
        self._recv_done = True
        self._pending_data = []
        self._pending_end = False
        try:
            self.connection._quic.stop_stream(self.stream_id, error_code)
        except ValueError:
            pass
        self.connection._changed()
        self._maybe_forget()

    # sending

    def write(self, data: bytes, end: bool = False) -> Deferred[None]:
        """
        Queue C{data} on the stream, and end our side if C{end}.

        @return: a Deferred that fires once the stream holds at most
            L{STREAM_SEND_HIGH_WATER} unacknowledged bytes, or fails with
            L{StreamReset} (the stream was reset, or the peer asked us to stop
            sending) or L{ConnectionLost}.  Waiting for it before writing
            more keeps memory bounded.
        """
        if self._send_error is not None:
            return fail(self._send_error)
        if self._send_done:
            return fail(QuicError("cannot write after the end of the stream"))
        try:
            self.connection._quic.send_stream_data(self.stream_id, data, end_stream=end)
        except (ValueError, RuntimeError) as e:
            return fail(QuicError(f"cannot write on stream {self.stream_id}: {e}"))
        if end:
            self._send_done = True
        self.connection._changed()
        if self._buffered() <= STREAM_SEND_HIGH_WATER:
            self._maybe_forget()
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._write_waiters.append(d)
        self.connection._blocked.add(self)
        return d

    def _buffered(self) -> int:
        """Bytes queued on the stream in QUIC and not yet sent once."""
        try:
            return int(self.connection._quic.get_send_buffer_size(self.stream_id))
        except Exception:
            return 0

    def _check_writers(self) -> bool:
        """Fire the write Deferreds if below the bound; True when none are left."""
        if not self._write_waiters:
            return True
        if self._buffered() > STREAM_SEND_HIGH_WATER:
            return False
        waiters, self._write_waiters = self._write_waiters, []
        for d in waiters:
            d.callback(None)
        self._maybe_forget()
        return not self._write_waiters

    def _send_failed(self, error: QuicError) -> None:
        self._send_done = True
        if self._send_error is None:
            self._send_error = error
        waiters, self._write_waiters = self._write_waiters, []
        self.connection._blocked.discard(self)
        for d in waiters:
            d.errback(error)
        self._maybe_forget()

    def reset(self, error_code: int = 1) -> None:
        """
        Abort the stream in both directions: QUIC RESET_STREAM for our side,
        STOP_SENDING for the peer's.  No further callbacks are made; pending
        write Deferreds fail with L{StreamReset}.
        """
        quic = self.connection._quic
        # QUIC ignores this if everything we sent was already acknowledged.
        try:
            quic.reset_stream(self.stream_id, error_code)
        except ValueError:
            pass
        if not self._recv_done:
            try:
                quic.stop_stream(self.stream_id, error_code)
            except ValueError:
                pass
        self._recv_done = True
        self._pending_data = []
        self._pending_end = False
        self._pending_error = None
        self._on_data = self._on_end = self._on_error = None
        self._send_failed(StreamReset(error_code, "stream reset locally"))
        self.connection._changed()

    def _maybe_forget(self) -> None:
        if self._recv_done and self._send_done and not self._write_waiters:
            self.connection._forget_stream(self.stream_id)


class QuicConnectionHandle:
    """
    One QUIC connection on a L{QuicEndpoint}, client or server side.

    @ivar peer: the peer's address when the connection was made.
    @ivar peer_public_key: the raw Ed25519 key of the peer's certificate (for
        connections we made as client), else L{None}.
    @ivar is_client: whether we opened the connection.
    """

    def __init__(
        self,
        endpoint: QuicEndpoint,
        quic: QuicConnection,
        peer: Address,
        *,
        is_client: bool,
        expected_public_key: bytes | None = None,
    ) -> None:
        self.peer = peer
        self.peer_public_key: bytes | None = None
        self.is_client = is_client
        self._endpoint = endpoint
        self._quic = quic
        self._expected_public_key = expected_public_key
        self._streams: dict[int, QuicStream] = {}
        self._blocked: set[QuicStream] = set()
        # Peer-initiated stream IDs already done with (bidi, uni): late frames
        # for them must not look like a new stream from the peer.
        first = 1 if is_client else 0
        self._peer_done = (_StreamIds(first), _StreamIds(first + 2))
        self._cids: set[bytes] = set()
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._established = False
        self._lost: QuicError | None = None
        self._terminated = False
        self._handshake_waiters: list[Deferred[QuicConnectionHandle]] = []
        self._handshake_timeout: IDelayedCall | None = None
        self._close_waiters: list[Deferred[None]] = []
        self._replaces: QuicConnectionHandle | None = None
        self._processing = False

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        return f"<QuicConnectionHandle {role} peer={self.peer!r}>"

    @property
    def established(self) -> bool:
        """True once the handshake completed and until the connection is lost."""
        return self._established and self._lost is None

    # public API

    def open_stream(self) -> QuicStream:
        """
        Open a new bidirectional stream.

        @raise ConnectionLost: if the connection is closed or closing.
        """
        if self._lost is not None:
            raise ConnectionLost(f"connection to {self.peer!r} is closed: {self._lost}")
        stream_id = self._quic.get_next_available_stream_id()
        # An empty write makes QUIC create the stream and move on to the next id.
        self._quic.send_stream_data(stream_id, b"")
        stream = QuicStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    def request(
        self,
        data: bytes | Sequence[bytes],
        *,
        max_response: int,
        timeout: float = 30.0,
    ) -> Deferred[bytes]:
        """
        Send C{data} (bytes, or pieces sent one after the other) on a new
        stream, end it, and collect the reply until the peer ends its side.
        Large data is handed to QUIC in L{REQUEST_CHUNK} slices as the stream
        drains, so at most about L{STREAM_SEND_HIGH_WATER} of it is copied
        into QUIC's buffers at a time.

        @param max_response: most bytes accepted in the reply; beyond it the
            stream is reset and the result fails with L{ResponseTooLarge}.
        @param timeout: seconds for the whole exchange; then the stream is
            reset and the result fails with L{RequestTimeout}.
        @return: the reply; or fails with L{StreamReset} (the peer reset its
            side), L{ConnectionLost}, L{ResponseTooLarge}, L{RequestTimeout}.
            Cancelling it resets the stream.
        """
        try:
            stream = self.open_stream()
        except QuicError as e:
            return fail(e)
        chunks: list[bytes] = []
        received = 0
        timer: IDelayedCall | None = None

        def finish(result: bytes | QuicError) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if result_d.called:
                return
            if isinstance(result, QuicError):
                result_d.errback(result)
            else:
                result_d.callback(result)

        def on_data(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)
            if received > max_response:
                chunks.clear()
                stream.reset(APP_ERROR_STREAM)
                finish(ResponseTooLarge(f"reply exceeds {max_response} bytes"))
            else:
                chunks.append(chunk)

        def on_end() -> None:
            reply = b"".join(chunks)
            chunks.clear()  # the stream (and this closure) may outlive the request
            finish(reply)

        def on_timeout() -> None:
            stream.reset(APP_ERROR_STREAM)
            finish(RequestTimeout(f"request to {self.peer!r} timed out after {timeout}s"))

        def cancel(d: Deferred[bytes]) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            stream.reset(APP_ERROR_STREAM)

        result_d: Deferred[bytes] = Deferred(cancel)
        stream.on_data = on_data
        stream.on_end = on_end
        stream.on_error = finish
        timer = self._endpoint._clock.callLater(timeout, on_timeout)
        # A failed write (peer sent STOP_SENDING, connection lost) does not end
        # the request: the reply, or on_error, decides.
        _send_in_slices(stream, [data] if isinstance(data, bytes) else list(data))
        return result_d

    def close(self) -> None:
        """Close the connection gracefully; open streams fail with ConnectionLost."""
        if self._terminated:
            return
        self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="closed")
        self._changed()

    def when_closed(self) -> Deferred[None]:
        """A Deferred that fires once the connection has ended and is forgotten."""
        if self._terminated:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    # driven by the endpoint

    def _wait_for_handshake(self) -> Deferred[QuicConnectionHandle]:
        """A Deferred for the handshake; cancelling it only stops waiting."""

        def cancel(d: Deferred[QuicConnectionHandle]) -> None:
            if d in self._handshake_waiters:
                self._handshake_waiters.remove(d)

        d: Deferred[QuicConnectionHandle] = Deferred(cancel)
        self._handshake_waiters.append(d)
        return d

    def _changed(self) -> None:
        """Something happened: process events now, send at the end of the turn."""
        self._process_events()
        self._endpoint._mark_dirty(self)

    def _receive(self, data: bytes, addr: Address, now: float) -> None:
        self._quic.receive_datagram(data, addr, now)
        self._changed()

    def _receive_many(self, datagrams: list[bytes], addr: Address, now: float) -> None:
        """Several datagrams of this connection, read at once (a UDP GRO run, or a relayed
        one unwrapped): they go to qh3's native core in one C{receive_many_datagrams} call,
        and their events are processed once.  (qh3's C{receive_gro_buffer} takes a run's
        buffer as it is, but it measured no faster, and a connection stalled once under it
        in CI; see docs/performance.md, step 13.)"""
        self._quic.receive_many_datagrams(datagrams, addr, now)
        self._changed()

    def _on_timer(self) -> None:
        self._timer = None
        at, self._timer_at = self._timer_at, None
        now = self._endpoint._clock.seconds()
        if at is not None and now < at:
            # The timer is due: never let float rounding make QUIC ignore it.
            now = at
        self._quic.handle_timer(now)
        self._changed()

    def _arm_timer(self) -> None:
        if self._terminated:
            return
        at = self._quic.get_timer()
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = at
        if at is not None:
            clock = self._endpoint._clock
            self._timer = clock.callLater(max(0.0, at - clock.seconds()), self._on_timer)

    def _check_writers(self) -> None:
        for stream in list(self._blocked):
            if stream._check_writers():
                self._blocked.discard(stream)

    def _forget_stream(self, stream_id: int) -> None:
        """Drop a stream that is done both ways; its ID is never reused."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._blocked.discard(stream)
        if bool(stream_id & 1) == self.is_client:
            self._peer_done[(stream_id >> 1) & 1].add(stream_id)

    def _process_events(self) -> None:
        # A callback may write, which calls back in here: the outer loop
        # drains the events, in order.
        if self._processing:
            return
        self._processing = True
        try:
            self._drain_events()
        finally:
            self._processing = False

    def _drain_events(self) -> None:
        quic = self._quic
        while True:
            event = quic.next_event()
            if event is None:
                break
            if isinstance(event, events.StreamDataReceived):
                self._stream_data(event)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._receive_failed(
                        StreamReset(event.error_code, "stream reset by peer")
                    )
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._send_failed(
                        StreamReset(event.error_code, "peer asked us to stop sending")
                    )
            elif isinstance(event, events.ConnectionIdIssued):
                self._endpoint._add_cid(self, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                self._endpoint._remove_cid(self, event.connection_id)
            elif isinstance(event, events.HandshakeCompleted):
                self._handshake_completed()
            elif isinstance(event, events.ConnectionTerminated):
                self._connection_terminated(event)
                return
        close_event = quic._close_event
        if close_event is not None and self._lost is None:
            self._lose(self._error_for_close(close_event))

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            peer_initiated = bool(event.stream_id & 1) == self.is_client
            if (
                not peer_initiated
                or self._lost is not None
                or event.stream_id in self._peer_done[(event.stream_id >> 1) & 1]
            ):
                return  # late data for a stream we already forgot
            stream = QuicStream(self, event.stream_id)
            self._streams[event.stream_id] = stream
            if event.stream_id & 2:
                stream._send_done = True  # peer's unidirectional stream
            on_stream = self._endpoint._on_stream
            if on_stream is None:
                stream.reset(APP_ERROR_STREAM)
                return
            _call_safely(stream, on_stream, stream)
        stream._received(event.data, event.end_stream)

    def _handshake_completed(self) -> None:
        if self.is_client:
            key = _peer_key(self._quic)
            self.peer_public_key = key
            expected = self._expected_public_key
            if expected is not None and key != expected:
                log.warn(
                    "QUIC peer {peer!r} presented an unexpected key", peer=self.peer
                )
                self._quic.close(
                    error_code=APP_ERROR_IDENTITY,
                    frame_type=None,
                    reason_phrase="unexpected identity",
                )
                self._lose(
                    PeerIdentityError(
                        f"peer {self.peer!r} does not hold the expected key"
                    )
                )
                return
        self._established = True
        if self._handshake_timeout is not None and self._handshake_timeout.active():
            self._handshake_timeout.cancel()
        self._handshake_timeout = None
        log.debug(
            "QUIC connection {role} {peer!r} established",
            role="to" if self.is_client else "from",
            peer=self.peer,
        )
        old, self._replaces = self._replaces, None
        if old is not None:
            old.close()
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for d in waiters:
            d.callback(self)

    def _handshake_timed_out(self, timeout: float) -> None:
        self._handshake_timeout = None
        if self._established or self._lost is not None:
            return
        self._quic.close(
            error_code=QuicErrorCode.NO_ERROR, reason_phrase="handshake timeout"
        )
        self._lose(
            ConnectionFailed(
                f"QUIC handshake with {self.peer!r} did not finish within {timeout}s"
            )
        )
        self._endpoint._mark_dirty(self)

    def _error_for_close(self, event: events.ConnectionTerminated) -> QuicError:
        reason = event.reason_phrase or f"error code {event.error_code:#x}"
        if self._established:
            return ConnectionLost(f"connection with {self.peer!r} ended: {reason}")
        return ConnectionFailed(f"QUIC handshake with {self.peer!r} failed: {reason}")

    def _lose(self, error: QuicError) -> None:
        """The connection became unusable: fail everything that waits on it."""
        if self._lost is not None:
            return
        self._lost = error
        if self._handshake_timeout is not None and self._handshake_timeout.active():
            self._handshake_timeout.cancel()
        self._handshake_timeout = None
        self._endpoint._forget_peer(self)
        waiters, self._handshake_waiters = self._handshake_waiters, []
        handshake_error = error
        if not isinstance(error, (ConnectionFailed, PeerIdentityError)):
            handshake_error = ConnectionFailed(str(error))
        for d in waiters:
            d.errback(handshake_error)
        lost = error if isinstance(error, ConnectionLost) else ConnectionLost(str(error))
        for stream in list(self._streams.values()):
            stream._receive_failed(lost)
            stream._send_failed(lost)
        self._streams.clear()
        self._blocked.clear()

    def _connection_terminated(self, event: events.ConnectionTerminated) -> None:
        self._lose(self._error_for_close(event))
        self._terminate()

    def _terminate(self) -> None:
        """Forget the connection entirely."""
        if self._terminated:
            return
        self._terminated = True
        if self._lost is None:
            self._lose(ConnectionLost(f"connection with {self.peer!r} ended"))
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._endpoint._forget(self)
        log.debug("QUIC connection with {peer!r} ended", peer=self.peer)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)


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
    @param max_connections: most server-side connections kept at once.
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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
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
            _native_identity(server_identity) if server_identity is not None else None
        )
        self._on_stream = on_stream
        self._max_datagram_size = max_datagram_size
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
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
        # Relaying (TURN-like, through the discovery server): peers reached through a relay,
        # and the relays whose wrapped packets we accept.
        self._relay_peers: dict[Address, Address] = {}
        self._relay_servers: set[Address] = set()
        # UDP segmentation offload (Linux): on until the kernel refuses it.
        self._gso = sys.platform.startswith("linux")

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
        quic = _Connection(configuration=configuration)
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
        self._relay_servers.add((relay[0], relay[1]))

    def relay_via(self, peer: Address, relay: Address) -> None:
        """Reach `peer` through `relay` from now on (the relay must have authorized it)."""
        relay = (relay[0], relay[1])
        self._relay_servers.add(relay)
        self._relay_peers[(peer[0], peer[1])] = relay
        while len(self._relay_peers) > MAX_RELAY_PEERS:
            del self._relay_peers[next(iter(self._relay_peers))]

    def _direct_connection(self, peer: Address) -> bool:
        return any(h.peer == peer for h in self._all) and peer not in self._relay_peers

    def relayed(self, peer: Address) -> bool:
        return (peer[0], peer[1]) in self._relay_peers

    def _route(self, data: bytes, addr: Address) -> tuple[bytes, Address]:
        relay = self._relay_peers.get(addr)
        if relay is None or addr in self._relay_servers:
            return data, addr
        return encode_relay(addr, data), relay

    # incoming datagrams

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Route a datagram to on_control or to its QUIC connection; never raise."""
        try:
            if not datagram:
                return
            peer = (addr[0], addr[1])
            if datagram[0] == RELAY_PREFIX[0]:
                if peer not in self._relay_servers:
                    return
                try:
                    inner_peer, datagram = decode_relay(datagram)
                except RemoteProtocolError:
                    return
                if not datagram or inner_peer in self._relay_servers:
                    return  # nothing, or a relay posing as a relayed peer
                if self._relay_peers.get(inner_peer) != peer:
                    if self._direct_connection(inner_peer):
                        # A peer we talk to directly is never re-routed by a relayed packet
                        # (which anyone able to spoof the relay's address could forge).
                        return
                    self.relay_via(inner_peer, peer)
                peer = inner_peer
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
                if peer in self._relay_servers and self._relayed_run(buffer, segment_size, peer):
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
            known = self._relay_peers.get(inner_peer) == relay and inner_peer not in self._relay_servers
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
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=CONNECTION_ID_LENGTH
            )
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
        self._accept(data, addr, header.destination_cid, now)

    def _accept(self, data: bytes, addr: Address, original_cid: bytes, now: float) -> None:
        quic = _Connection(
            configuration=self._configuration(is_client=False),
            original_destination_connection_id=original_cid,
        )
        quic.receive_datagram(data, addr, now)
        core = quic._core
        if core is None or not core.received_authenticated_packet:
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
        self._add_cid(handle, original_cid)
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
            assert self._server_identity is not None
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

    def _forget(self, handle: QuicConnectionHandle) -> None:
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
        transport = self._transport()
        # The socket itself when there is one: Port.write re-validates the
        # address of every datagram, which costs more than the send.
        sock = getattr(transport, "socket", None)
        if sock is not None and self._gso:
            if self._relay_peers:
                # Wrap what goes through a relay first (a no-op for what is already wrapped,
                # which is addressed to the relay): a connection's datagrams to the relay are
                # then runs of one size too.
                route = self._route
                unsent[:] = [route(data, addr) for data, addr in unsent]
            return self._send_segmented(sock)
        send = sock.sendto if sock is not None else transport.write
        sent = 0
        try:
            for data, addr in unsent:
                try:
                    if self._relay_peers:
                        data, addr = self._route(data, addr)
                    send(data, addr)
                except BlockingIOError:
                    return False
                except Exception as e:
                    # Unreachable network, bad address...: the datagram is
                    # lost, and QUIC's loss recovery deals with it.
                    log.debug("UDP send to {addr!r} failed: {e}", addr=addr, e=e)
                sent += 1
        finally:
            del unsent[:sent]
        return True

    def _send_segmented(self, sock: socket.socket) -> bool:
        """
        L{_send_unsent} with UDP segmentation offload: a run of datagrams of
        one size to one address (the last may be shorter) goes to the kernel
        in one C{sendmsg}, which splits it (Linux UDP_SEGMENT).  One system
        call, and one trip through the stack and any NAT on the way, instead
        of one per datagram.  If the kernel refuses, it is switched off and
        datagrams go one by one.
        """
        unsent = self._unsent
        n = len(unsent)
        i = 0
        try:
            while i < n:
                data, addr = unsent[i]
                size = len(data)
                j = i + 1
                total = size
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    nxt, to = unsent[j]
                    if to != addr or len(nxt) > size or total + len(nxt) > GSO_MAX_BYTES:
                        break
                    total += len(nxt)
                    j += 1
                    if len(nxt) < size:
                        break  # a shorter datagram ends the run
                try:
                    send_run(sock, [d for d, _ in unsent[i:j]], addr)
                except BlockingIOError:
                    return False
                except Exception as e:
                    if j - i > 1 and (not isinstance(e, OSError) or e.errno in GSO_REFUSED):
                        log.info("UDP segmentation offload refused ({e}); sending datagrams one by one", e=e)
                        self._gso = False
                        del unsent[:i]
                        i = 0
                        return self._send_unsent()
                    log.debug("UDP send to {addr!r} failed: {e}", addr=addr, e=e)
                i = j
        finally:
            del unsent[:i]
        return True

    def _write(self, data: bytes, addr: Address) -> None:
        """Send one datagram now, or queue it if the socket is full."""
        if self._unsent:
            self._unsent.append((data, addr))
            self._schedule_flush(BLOCKED_RETRY)
            return
        try:
            routed, to = self._route(data, addr) if self._relay_peers else (data, addr)
            self._transport().write(routed, to)
        except BlockingIOError:
            self._unsent.append((data, addr))
            self._schedule_flush(BLOCKED_RETRY)
        except OSError as e:
            log.debug("UDP send to {addr!r} failed: {e}", addr=addr, e=e)
