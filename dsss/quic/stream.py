# -*- test-case-name: tests.unit.test_quic -*-
"""
One QUIC stream as the application sees it: callbacks for what arrives, writes with back-pressure.

A stream (L{QuicStream}) delivers what it receives through callbacks, set
synchronously in the endpoint's C{on_stream} (data arriving before they are set
is kept)::

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

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from dsss.quic.errors import QuicError, StreamReset


class QuicConnectionHandle(Protocol):
    """What a stream uses of its connection (dsss.quic.connection.QuicConnectionHandle): the
    peer's address, qh3's connection, and the connection's send bookkeeping."""

    peer: Any
    _quic: Any
    _blocked: set[Any]

    def _changed(self) -> None: ...
    def _forget_stream(self, stream_id: int) -> None: ...

__all__ = ["APP_ERROR_STREAM", "STREAM_SEND_HIGH_WATER", "QuicStream"]

log = Logger()

STREAM_SEND_HIGH_WATER = 1024 * 1024
"""A L{QuicStream.write} Deferred fires once the stream holds at most this many
unacknowledged bytes."""

APP_ERROR_STREAM = 0x1
"""The application error code of a stream this side resets."""


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

    def write(self, data: bytes | bytearray | memoryview, end: bool = False) -> Deferred[None]:
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

