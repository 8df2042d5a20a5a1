# -*- test-case-name: tests.unit.test_quic -*-
"""
An in-memory datagram network on a driven clock, for testing L{dsss.quic} and other UDP protocols.

Anything built on a L{DatagramProtocol} attaches to it; time is a L{twisted.internet.task.Clock}.

    clock = Clock()
    link = MemoryDatagramLink(clock, loss=0.1, reorder=0.1, rng=random.Random(1))
    a = QuicEndpoint(clock, on_control=...)
    link.attach(a, ("10.0.0.1", 4000))
    ...
    run_until(clock, lambda: d.called, timeout=30)

Delivery happens on the clock, after C{latency} seconds (plus a random extra
delay for reordered datagrams); datagrams to an address nobody attached are
dropped, as on a network with a silent host.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock

__all__ = ["MemoryDatagramLink", "MemoryDatagramTransport", "run_until"]

Address = tuple[str, int]


@dataclass
class LinkStats:
    """Counters of what a L{MemoryDatagramLink} did."""

    sent: int = 0
    delivered: int = 0
    lost: int = 0
    reordered: int = 0
    unroutable: int = 0
    coalesced: int = 0  # datagrams delivered in runs, several in one segmentsReceived call (gro)
    runs_to: dict[Address, int] = field(default_factory=dict)  # such runs, by destination
    # Every datagram written, as (data, source, destination), if recording.
    log: list[tuple[bytes, Address, Address]] = field(default_factory=list)


class MemoryDatagramTransport:
    """The transport a L{MemoryDatagramLink} gives each attached protocol."""

    def __init__(self, link: MemoryDatagramLink, address: Address) -> None:
        self._link = link
        self._address = address
        self.connected = True

    def write(self, datagram: bytes, addr: Address) -> None:
        """Hand C{datagram} to the link, from our address to C{addr}."""
        if not self.connected:
            return
        self._link._send(bytes(datagram), self._address, (addr[0], addr[1]))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self._address[0], self._address[1])

    def stopListening(self) -> None:
        """Detach from the link."""
        self._link.detach(self._address)


class MemoryDatagramLink:
    """
    A lossy, reordering datagram network driven by a Clock.

    @param loss: probability that a datagram is dropped.
    @param reorder: probability that a datagram is held back by an extra
        random delay of up to C{reorder_delay} seconds, so later datagrams
        overtake it.
    @param latency: one-way delay of every datagram.
    @param rng: random source; pass a seeded one for repeatable tests.
    @param record: keep every datagram written in C{stats.log}.
    @param gro: deliver a run of same-size datagrams sent from one address to
        another at one instant (the last may be shorter) in one
        C{segmentsReceived(buffer, segment_size, source)} call, as Linux does
        for a socket with UDP_GRO on.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        loss: float = 0.0,
        reorder: float = 0.0,
        latency: float = 0.001,
        reorder_delay: float = 0.005,
        rng: random.Random | None = None,
        record: bool = False,
        gro: bool = False,
    ) -> None:
        self.clock = clock
        self.gro = gro
        self._open_runs: dict[tuple[Address, Address], list[bytes]] = {}
        self.loss = loss
        self.reorder = reorder
        self.latency = latency
        self.reorder_delay = reorder_delay
        self.rng = rng if rng is not None else random.Random(0)
        self.record = record
        self.stats = LinkStats()
        self.filter: Callable[[bytes, Address, Address], bool] | None = None
        """If set, a datagram is dropped when this returns False."""
        self._hosts: dict[Address, DatagramProtocol] = {}

    def attach(self, protocol: DatagramProtocol, address: Address) -> MemoryDatagramTransport:
        """Give C{protocol} the address C{address} on this link and start it."""
        transport = MemoryDatagramTransport(self, address)
        self._hosts[address] = protocol
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        return transport

    def detach(self, address: Address) -> None:
        """Remove the protocol at C{address} and stop it."""
        protocol = self._hosts.pop(address, None)
        if protocol is not None:
            transport = protocol.transport
            if isinstance(transport, MemoryDatagramTransport):
                transport.connected = False
            protocol.doStop()

    def inject(self, datagram: bytes, source: Address, destination: Address) -> None:
        """Deliver C{datagram} to C{destination} now, as if sent by C{source}."""
        protocol = self._hosts.get(destination)
        if protocol is not None:
            protocol.datagramReceived(datagram, source)

    def _send(self, datagram: bytes, source: Address, destination: Address) -> None:
        stats = self.stats
        stats.sent += 1
        if self.record:
            stats.log.append((datagram, source, destination))
        if self.filter is not None and not self.filter(datagram, source, destination):
            stats.lost += 1
            return
        if self.loss and self.rng.random() < self.loss:
            stats.lost += 1
            return
        delay = self.latency
        if self.reorder and self.rng.random() < self.reorder:
            stats.reordered += 1
            delay += self.rng.random() * self.reorder_delay
        elif self.gro:
            key = (source, destination)
            run = self._open_runs.get(key)
            if run is not None and len(datagram) <= len(run[0]) and len(run[-1]) == len(run[0]):
                run.append(datagram)
                return
            run = self._open_runs[key] = [datagram]
            self.clock.callLater(0, self._open_runs.pop, key, None)  # a run is one instant's
            self.clock.callLater(delay, self._deliver_run, run, source, destination)
            return
        self.clock.callLater(delay, self._deliver, datagram, source, destination)

    def _deliver_run(self, run: list[bytes], source: Address, destination: Address) -> None:
        if len(run) == 1:
            self._deliver(run[0], source, destination)
            return
        protocol = self._hosts.get(destination)
        if protocol is None:
            self.stats.unroutable += len(run)
            return
        self.stats.delivered += len(run)
        self.stats.coalesced += len(run)
        self.stats.runs_to[destination] = self.stats.runs_to.get(destination, 0) + 1
        protocol.segmentsReceived(b"".join(run), len(run[0]), source)  # type: ignore[attr-defined]

    def _deliver(self, datagram: bytes, source: Address, destination: Address) -> None:
        protocol = self._hosts.get(destination)
        if protocol is None:
            self.stats.unroutable += 1
            return
        self.stats.delivered += 1
        protocol.datagramReceived(datagram, source)


def run_until(
    clock: Clock, condition: Callable[[], bool], *, timeout: float = 60.0
) -> bool:
    """
    Advance C{clock} from one scheduled call to the next until C{condition()}
    holds or C{timeout} simulated seconds have passed.

    @return: whether C{condition()} became true.
    """
    deadline = clock.seconds() + timeout
    while not condition():
        calls = clock.getDelayedCalls()
        if not calls:
            return False
        next_at = min(call.getTime() for call in calls)
        if next_at > deadline:
            clock.advance(max(0.0, deadline - clock.seconds()))
            return condition()
        clock.advance(max(0.0, next_at - clock.seconds()))
    return True
