"""The HTTP port's connection budget and header deadline (dsss.server.connlimit), on a Clock and
in-memory transports, around the real API Site and its BoundedRequest."""

from __future__ import annotations

import random

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.web.server import Site

from dsss.budget import ConnectionBudget
from dsss.server.api import BoundedRequest, DiscoveryAPI
from dsss.server.connlimit import BudgetedFactory
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer

DEADLINE = 10.0


def make_factory(total: int = 8, per_source: int = 2) -> tuple[BudgetedFactory, Clock]:
    clock = Clock()
    clock.advance(100)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0), rng=random.Random(1))
    site = Site(DiscoveryAPI(server).resource(), reactor=clock)
    site.requestFactory = BoundedRequest
    return BudgetedFactory(site, ConnectionBudget(total, per_source), clock, DEADLINE), clock


def connect(factory: BudgetedFactory, host: str) -> StringTransportWithDisconnection | None:
    proto = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    if proto is None:
        return None
    t = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", host, 40000))
    t.protocol = proto
    proto.makeConnection(t)
    return t


def test_a_source_over_its_share_is_refused_before_anything_is_read() -> None:
    factory, _ = make_factory(total=8, per_source=2)
    held = [connect(factory, "127.0.0.5") for _ in range(2)]
    assert all(t is not None for t in held)
    assert connect(factory, "127.0.0.5") is None
    other = connect(factory, "127.0.0.1")
    assert other is not None
    other.protocol.dataReceived(b"GET /api/info HTTP/1.1\r\nHost: x\r\n\r\n")
    assert other.value().startswith(b"HTTP/1.1 200")
    assert factory.budget.refused == 1


def test_a_trickling_request_is_closed_at_the_header_deadline_and_frees_its_slot() -> None:
    factory, clock = make_factory(total=8, per_source=1)
    t = connect(factory, "127.0.0.5")
    assert t is not None
    t.protocol.dataReceived(b"GET /api/info HTTP/1.1\r\n")
    for _ in range(4):  # a byte every 2 s: an idle timeout would never fire
        clock.advance(2)
        t.protocol.dataReceived(b"X")
    assert t.connected
    clock.advance(DEADLINE - 8)
    assert not t.connected and factory.slow_closed == 1
    assert factory.budget.held_by("127.0.0.5") == 0
    assert connect(factory, "127.0.0.5") is not None  # the slot came back


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline() -> None:
    factory, clock = make_factory()
    t = connect(factory, "127.0.0.6")
    assert t is not None
    clock.advance(DEADLINE - 0.1)
    assert t.connected
    clock.advance(0.2)
    assert not t.connected and factory.budget.open == 0


def test_keep_alive_gets_a_new_deadline_after_each_request() -> None:
    factory, clock = make_factory()
    t = connect(factory, "127.0.0.7")
    assert t is not None
    for _ in range(3):
        clock.advance(DEADLINE - 1)  # each request starts just before its deadline
        t.protocol.dataReceived(b"GET /api/info HTTP/1.1\r\nHost: x\r\n\r\n")
        assert t.value().startswith(b"HTTP/1.1 200") and t.connected
        t.clear()
    clock.advance(DEADLINE + 0.1)  # then idle: closed
    assert not t.connected
