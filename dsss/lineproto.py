# -*- test-case-name: tests.adapters.test_server_control -*-
"""The Twisted adapter shared by both ends of the control channel.

A LineReceiver that parses lines with dsss.wire.control, answers the peer's requests through
`handle_request` (implemented by the server and agent subclasses; a reply may come later, as a
Deferred, and replies still go out in the order the requests came) and matches the peer's replies
to our own requests in FIFO order. Parsing and message rules live in the sans-I/O core; this class
only moves lines and arms timers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from dsss.errors import DSSSError, RemoteProtocolError, Timeout
from dsss.ratelimit import RateLimiter
from dsss.wire import control as wc

log = Logger()


class ControlConnectionLost(DSSSError):
    code = "connection-lost"


class _Pending:
    __slots__ = ("d", "timer")

    def __init__(self, d: defer.Deferred[Any], timer: Any) -> None:
        self.d = d
        self.timer = timer


class _ReplySlot:
    """The reply to one request, in request order; `reply` is None until it is known."""

    __slots__ = ("reply", "ready")

    def __init__(self, reply: wc.Reply | None = None, ready: bool = False) -> None:
        self.reply = reply
        self.ready = ready


class ControlLineProtocol(LineReceiver):
    delimiter = b"\n"
    # The longest line plus an optional CR: a PROOF reply may be MAX_PROOF_LINE bytes; the parser
    # holds every other line to MAX_LINE.
    MAX_LENGTH = wc.MAX_PROOF_LINE + 1
    # A peer that keeps sending bad lines is cut off after this many.
    MAX_ERRORS = 10

    clock: IReactorTime

    # Lines per second a peer may send (sustained, and in a burst) before it is cut off.
    LINE_RATE = 2000.0
    LINE_BURST = 10000.0

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._pending: deque[_Pending] = deque()
        self._replies: deque[_ReplySlot] = deque()  # replies to the peer's requests, in order
        self._errors = 0
        self.closed = False
        self._limiter = RateLimiter(self.LINE_RATE, self.LINE_BURST, max_keys=1)

    def makeConnection(self, transport: Any) -> None:
        # Control lines are small requests and replies. With Nagle's algorithm a line waits
        # until the previous one is acknowledged, and the peer delays its ACK (up to 40 ms on
        # Linux): every introduction and every HAVE waited for that.
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass
        super().makeConnection(transport)

    # --- sending -------------------------------------------------------------------------------

    def send(self, msg: wc.Message) -> None:
        if not self.closed and self.transport is not None:
            self.sendLine(wc.encode(msg))

    def request(self, msg: wc.Request, timeout: float) -> defer.Deferred[wc.Reply]:
        """Send a request; fires with the peer's reply, or fails with Timeout/ControlConnectionLost.

        A request that times out keeps its place in the reply order; its late reply is dropped.
        """
        if self.closed:
            return defer.fail(ControlConnectionLost("control connection is closed"))
        d: defer.Deferred[wc.Reply] = defer.Deferred()
        pending = _Pending(d, None)

        def expire() -> None:
            pending.timer = None
            if not d.called:
                d.errback(Timeout(f"no reply to {type(msg).__name__} within {timeout}s"))

        pending.timer = self.clock.callLater(timeout, expire)
        self._pending.append(pending)
        self.send(msg)
        return d

    # --- receiving -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # LineReceiver holds lines to MAX_LENGTH, the PROOF limit; an unfinished line that is
        # not a PROOF is cut off as soon as it passes MAX_LINE, as it was before PROOF existed.
        pending: bytes = self._buffer
        if (
            len(pending) > wc.MAX_LINE + 1
            and not self.closed
            and self.delimiter not in pending
            and not pending.startswith(b"PROOF ")
        ):
            self._buffer = b""
            self.lineLengthExceeded(pending)

    def lineReceived(self, line: bytes) -> None:
        if self.closed:
            return
        if not self._limiter.allow(None, self.clock.seconds()):
            self.bad_input("too many lines; slow down", fatal=True, code="rate-limited")
            return
        try:
            msg = wc.parse_line(line)
        except wc.LineTooLong as e:
            self.bad_input(str(e), fatal=True, code="too-long")
            return
        except RemoteProtocolError as e:
            if wc.looks_like_reply(line):
                # A malformed reply: its request cannot be answered, and an ERROR back would be
                # paired with the wrong request on the other side. Hang up.
                self.close()
                return
            self.bad_input(str(e), fatal=not self.trusted())
            return
        self.heard()
        if isinstance(msg, wc.REPLY_TYPES):
            if not self._pending:
                # Not answered with ERROR: that would itself be a reply nobody asked for.
                self.close()
                return
            pending = self._pending.popleft()
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
            if not pending.d.called:
                pending.d.callback(msg)
            return
        try:
            reply = self.handle_request(msg)
        except RemoteProtocolError as e:
            self.bad_input(str(e), fatal=not self.trusted())
            return
        except DSSSError as e:
            reply = wc.Error(e.code, str(e))
        if isinstance(reply, defer.Deferred):
            slot = _ReplySlot()
            self._replies.append(slot)
            reply.addErrback(self._reply_failed).addCallback(self._reply_ready, slot)
        elif reply is not None:
            if self._replies:  # earlier replies are still coming: this one waits its turn
                self._replies.append(_ReplySlot(reply, True))
            else:
                self.send(reply)

    @staticmethod
    def _reply_failed(f: Failure) -> wc.Reply:
        if f.check(DSSSError):
            err: DSSSError = f.value  # type: ignore[assignment]
            return wc.Error(err.code, str(err))
        log.failure("answering a request failed", f)
        return wc.Error("error", "internal error")

    def _reply_ready(self, reply: wc.Reply | None, slot: _ReplySlot) -> None:
        slot.reply, slot.ready = reply, True
        while self._replies and self._replies[0].ready:
            done = self._replies.popleft()
            if done.reply is not None:
                self.send(done.reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.bad_input(f"line longer than {wc.MAX_PROOF_LINE} bytes", fatal=True, code="too-long")

    def bad_input(self, why: str, *, fatal: bool, code: str = "protocol") -> None:
        self._errors += 1
        self.send(wc.Error(code, why))
        if fatal or self._errors >= self.MAX_ERRORS:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        pending, self._pending = self._pending, deque()
        for p in pending:
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
            if not p.d.called:
                p.d.errback(ControlConnectionLost("control connection lost"))

    # --- for subclasses ------------------------------------------------------------------------

    def handle_request(self, msg: wc.Request) -> "wc.Reply | defer.Deferred[wc.Reply | None] | None":
        """The reply to `msg` (None: not answered), or a Deferred of it: replies are sent in
        the order the requests came, whenever each is known."""
        raise NotImplementedError

    def heard(self) -> None:
        """Called for every well-formed line; liveness bookkeeping."""

    def trusted(self) -> bool:
        """Whether a bad line may be answered without closing the connection."""
        return False
