# -*- test-case-name: tests.adapters.test_connlimit -*-
"""Connection budgets and the request-header deadline on the server's HTTP port (a Twisted adapter).

`BudgetedFactory` wraps the HTTP `Site`: a connection beyond its source's share or beyond the
port's total is closed as soon as it is accepted, before anything is read, and every connection
must complete a request's headers within `header_timeout` seconds of opening, or of the end of
its previous request (`BoundedRequest` tells it when headers are in and when a request is done).
A connection that trickles a byte now and then is closed at the deadline however much it sent:
an idle timeout alone (reset by every byte) would keep it.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from dsss.budget import ConnectionBudget

log = Logger()

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between two log lines about refused connections (a flood must not flood the log)."""


def source_of(addr: object) -> str:
    """The source a connection is counted against: its IP address."""
    if isinstance(addr, (IPv4Address, IPv6Address)):
        return addr.host
    return "local"  # a UNIX socket: one source


class BudgetedConnection(ProtocolWrapper):
    """One admitted connection: releases its budget slot when it closes, and enforces the
    header deadline."""

    factory: "BudgetedFactory"

    def __init__(self, factory: "BudgetedFactory", wrapped: Any, source: str) -> None:
        super().__init__(factory, wrapped)
        self.source = source
        self._deadline: IDelayedCall | None = None
        self._open = False

    def makeConnection(self, transport: Any) -> None:
        self._open = True
        super().makeConnection(transport)
        self.awaiting_headers()

    def awaiting_headers(self) -> None:
        """A new request may start: its headers must be complete within the deadline."""
        if not self._open or self._deadline is not None:
            return
        self._deadline = self.factory.clock.callLater(self.factory.header_timeout, self._too_slow)

    def headers_complete(self) -> None:
        """A request's headers are in: its handling is not bound by the header deadline."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.factory.slow_closed += 1
        # The deadline is armed only once connected; TCP and UNIX stream transports can abort.
        cast(ITCPTransport, self.transport).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._open = False
        self.headers_complete()
        self.factory.budget.release(self.source)
        super().connectionLost(reason)


class BudgetedFactory(WrappingFactory[BudgetedConnection]):
    """Wraps a server factory (the HTTP Site) with a ConnectionBudget and the header deadline."""

    protocol = BudgetedConnection

    def __init__(
        self, wrapped: Any, budget: ConnectionBudget, clock: IReactorTime, header_timeout: float, what: str = "HTTP"
    ) -> None:
        super().__init__(wrapped)
        self.budget = budget
        self.clock = clock
        self.header_timeout = header_timeout
        self.what = what
        self.slow_closed = 0
        self._last_refusal_log = float("-inf")
        self._refused_since_log = 0

    def buildProtocol(self, addr: Any) -> BudgetedConnection | None:  # type: ignore[override]
        source = source_of(addr)
        if not self.budget.admit(source):
            self._note_refusal(source)
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            self.budget.release(source)
            return None
        return BudgetedConnection(self, wrapped, source)

    def _note_refusal(self, source: str) -> None:
        self._refused_since_log += 1
        now = self.clock.seconds()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            log.warn(
                "refused {n} {what} connection(s) over budget (latest from {source}: it holds {held}, "
                "at most {per_source} per source, {open} of {total} open in all)",
                n=self._refused_since_log,
                what=self.what,
                source=source,
                held=self.budget.held_by(source),
                per_source=self.budget.per_source,
                open=self.budget.open,
                total=self.budget.total,
            )
            self._last_refusal_log = now
            self._refused_since_log = 0


def headers_complete(transport: object, finished: Any) -> None:
    """Called by a request when its headers are in: stop the header deadline of its connection,
    and start it again when the request is done (`finished` fires then, or on connection loss)."""
    if isinstance(transport, BudgetedConnection):
        transport.headers_complete()
        finished.addBoth(lambda _: transport.awaiting_headers())
