# -*- test-case-name: tests.adapters.test_taps -*-
"""Listening helpers: endpoint-string services that report where they actually bound."""

from __future__ import annotations

import socket
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol

from dsss.errors import BadRequest
from dsss.model import PeerAddress, is_decimal


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` for UDP binds and targets; port 0 is allowed (any free port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not is_decimal(port) or int(port) > 65535:
        raise BadRequest(f"{what} must be HOST:PORT, got {text!r}")
    if int(port) != 0:
        PeerAddress(host, int(port))  # validates the host
    else:
        PeerAddress(host, 1)
    return host, int(port)


def where(addr: IAddress) -> str:
    """Where a port listens, for log lines: HOST:PORT, or another address (a UNIX socket) as is."""
    if isinstance(addr, (IPv4Address, IPv6Address)):
        return f"{addr.host}:{addr.port}"
    return str(addr)


def _stop_listening(self: Any) -> defer.Deferred[None] | None:
    """stopService for the services below: stop the port they listen on, once."""
    Service.stopService(self)
    if self.port is not None:
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)
    return None


class EndpointService(Service):
    """Listen on an endpoint string; `whenListening` fires with the IListeningPort."""

    def __init__(self, reactor: Any, description: str, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: IListeningPort | None = None
        self._waiting: list[defer.Deferred[IListeningPort]] = []

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self.reactor, self.description).listen(self.factory)

        def listening(port: IListeningPort) -> None:
            self.port = port
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.callback(port)

        def failed(f: Any) -> Any:
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.errback(f)
            return f

        d.addCallbacks(listening, failed)
        self._started = d

    def whenListening(self) -> defer.Deferred[IListeningPort]:
        if self.port is not None:
            return defer.succeed(self.port)
        d: defer.Deferred[IListeningPort] = defer.Deferred()
        self._waiting.append(d)
        return d

    stopService = _stop_listening


class UDPService(Service):
    """Listen on a UDP HOST:PORT with a bigger packet size and socket buffers."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        protocol: DatagramProtocol,
        *,
        max_packet: int = 65535,
        on_listen: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.portnum = port
        self.protocol = protocol
        self.max_packet = max_packet
        self.port: IListeningPort | None = None
        self.on_listen = on_listen

    def startService(self) -> None:
        super().startService()
        self.port = listen_udp(self.reactor, self.host, self.portnum, self.protocol, self.max_packet)
        if self.on_listen is not None:
            self.on_listen(self.port)

    stopService = _stop_listening


def listen_udp(
    reactor: Any, host: str, port: int, protocol: DatagramProtocol, max_packet: int = 65535
) -> IListeningPort:
    """Listen on UDP with large socket buffers; with UDP GRO where the reactor and kernel allow
    it if `protocol` takes runs of datagrams (`segmentsReceived`)."""
    from dsss.quic.batching import GroPort

    if hasattr(protocol, "segmentsReceived") and GroPort.usable(reactor):
        p = GroPort(port, protocol, interface=host, maxPacketSize=max_packet, reactor=reactor)
        p.startListening()
    else:
        p = reactor.listenUDP(port, protocol, interface=host, maxPacketSize=max_packet)
    sock = getattr(p, "socket", None)
    if sock is not None:
        enlarge_socket_buffers(sock)
    return p


UDP_SOCKET_BUFFER = 16 * 1024 * 1024
"""Send and receive buffer asked for on every UDP socket (QUIC at loopback speed)."""


def enlarge_socket_buffers(sock: socket.socket) -> None:
    """
    Ask for L{UDP_SOCKET_BUFFER} bytes of send and receive buffer.  The
    kernel caps the request at net.core.rmem_max / wmem_max (212992 bytes by
    default), and a receive buffer that small overflows at loopback speeds:
    QUIC sees the drops as congestion.  Where the process may (CAP_NET_ADMIN),
    the cap is lifted with SO_RCVBUFFORCE / SO_SNDBUFFORCE.
    """
    linux = sys.platform.startswith("linux")
    # Python's socket module does not name them; these are Linux's values.
    pairs = (
        (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", 32) if linux else None),
        (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", 33) if linux else None),
    )
    for option, force in pairs:
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)
            # Linux reports twice the usable size it granted.
            if sock.getsockopt(socket.SOL_SOCKET, option) >= 2 * UDP_SOCKET_BUFFER:
                continue
            if force is not None:
                sock.setsockopt(socket.SOL_SOCKET, force, UDP_SOCKET_BUFFER)
        except OSError:
            pass
