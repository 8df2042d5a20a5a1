# -*- test-case-name: tests.unit.test_quic -*-
"""
One QUIC connection on an endpoint: its streams, handshake and end, and the peer's pinned key.

Client or server side alike, it turns qh3's events into L{QuicStream} callbacks, arms one C{callLater} from
C{get_timer()}, and asks its endpoint to send (once per reactor turn) whenever
something changed.  Identity: servers present a self-signed certificate for
their Ed25519 key (see L{dsss.crypto.certs}); clients do not check it against a
CA but pin the raw public key, after TLS has verified the CertificateVerify
signature made with that key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from cryptography import x509
from qh3.quic import events
from qh3.quic.packet import QuicErrorCode
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dsss.crypto.certs import public_key_of
from dsss.quic._engine import Connection
from dsss.quic.errors import (
    ConnectionFailed,
    ConnectionLost,
    PeerIdentityError,
    QuicError,
    RequestTimeout,
    ResponseTooLarge,
    StreamReset,
)
from dsss.quic.stream import APP_ERROR_STREAM, QuicStream, _call_safely


class QuicEndpoint(Protocol):
    """What a connection uses of the endpoint that owns it (dsss.quic.endpoint.QuicEndpoint):
    its clock, and the bookkeeping of its connection table and send queue."""

    _clock: Any
    _on_stream: Any
    _keepalive: float | None

    def _mark_dirty(self, conn: "QuicConnectionHandle") -> None: ...
    def _add_cid(self, conn: "QuicConnectionHandle", cid: bytes) -> None: ...
    def _remove_cid(self, conn: "QuicConnectionHandle", cid: bytes) -> None: ...
    def _forget_peer(self, conn: "QuicConnectionHandle") -> None: ...
    def _forget(self, conn: "QuicConnectionHandle") -> None: ...
    def _handshake_done(self, conn: "QuicConnectionHandle") -> None: ...

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "REQUEST_CHUNK", "QuicConnectionHandle"]

log = Logger()

Address = tuple[str, int]

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
APP_ERROR_IDENTITY = 0x1
"""The application error code of a connection closed for an unexpected peer key."""

KEEPALIVE_LINGER = 10.0
"""Seconds a connection keeps pinging its peer after it last opened a stream (see
L{QuicConnectionHandle.open_stream}): a session's next request finds it still up."""

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


def _peer_key(quic: Connection) -> bytes | None:
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
        quic: Connection,
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
        self._keepalive_call: IDelayedCall | None = None
        self._opened_at = 0.0
        self._pings = 0

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
        self._opened_at = self._endpoint._clock.seconds()
        self._keep_alive()
        return stream

    def _keep_alive(self) -> None:
        """With the endpoint's C{keepalive}: while streams are open (and for
        L{KEEPALIVE_LINGER} seconds after the last was opened), PING the peer
        every C{keepalive} seconds.  Its QUIC stack acknowledges every PING as
        long as it runs, so the idle timeout ends the connection only when the
        peer is gone, not when it is slow to answer a request."""
        interval = self._endpoint._keepalive
        if interval is None or self._lost is not None:
            return
        if self._keepalive_call is not None and self._keepalive_call.active():
            return
        self._keepalive_call = self._endpoint._clock.callLater(interval, self._ping)

    def _ping(self) -> None:
        self._keepalive_call = None
        if self._lost is not None:
            return
        now = self._endpoint._clock.seconds()
        if not self._streams and now - self._opened_at >= KEEPALIVE_LINGER:
            return  # not in use: the idle timeout may end it
        if self._established:
            self._pings += 1
            self._quic.send_ping(self._pings)
            self._changed()
        self._keep_alive()

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
        buffer as it is, but it measured no faster, and a connection once stalled under it.)"""
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
        close_event = quic.close_event()
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
        self._endpoint._handshake_done(self)
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
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None
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

