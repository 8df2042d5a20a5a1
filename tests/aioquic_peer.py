"""An independent QUIC stack as a peer of DSSS endpoints: aioquic, driven sans-I/O on a Twisted clock.

`AioquicPeer` is a `DatagramProtocol` (attach it to a `MemoryDatagramLink`, or listen on a real
UDP socket) that runs one aioquic `QuicConnection`, as a client (`connect`) or as a server
(`server_identity`), with aioquic's default TLS settings: only the ALPN is set, and a client does
not verify the certificate chain (DSSS has no PKI; `peer_public_key` gives the key to pin).

Streams are collected whole: `request(data)` opens a stream, sends `data` with FIN and returns a
Deferred of everything the peer sent back until its FIN; as a server, `on_request(data) -> bytes`
answers each stream the peer ended. `probe_timeouts` counts aioquic's probe timeouts (PTO):
a flight that had to be retransmitted because nothing came back.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from dsss.crypto.certs import public_key_of

ALPN = "dsss/1"
Address = tuple[str, int]


class AioquicPeer(DatagramProtocol):
    def __init__(
        self,
        clock: IReactorTime,
        *,
        server_identity: tuple[x509.Certificate, Ed25519PrivateKey] | None = None,
        on_request: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.clock = clock
        self.server_identity = server_identity
        self.on_request = on_request
        self.conn: QuicConnection | None = None
        self.peer: Address | None = None
        self.handshake: Deferred[None] = Deferred()
        self.handshake_done = False
        self.probe_timeouts = 0
        self.terminated: events.ConnectionTerminated | None = None
        self._timer: IDelayedCall | None = None
        self._streams: dict[int, list[bytes]] = {}
        self._waiting: dict[int, Deferred[bytes]] = {}

    def _configuration(self, is_client: bool) -> QuicConfiguration:
        configuration = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN])
        if is_client:
            configuration.verify_mode = ssl.CERT_NONE
        else:
            assert self.server_identity is not None
            configuration.certificate, configuration.private_key = self.server_identity
        return configuration

    def _new_connection(self, configuration: QuicConfiguration, **kw: Any) -> QuicConnection:
        conn = QuicConnection(configuration=configuration, **kw)
        loss = conn._loss  # count probe timeouts: each is a flight sent again
        fire = loss.on_loss_detection_timeout

        def counted(*args: Any, **kwargs: Any) -> Any:
            before = loss._pto_count
            result = fire(*args, **kwargs)
            if loss._pto_count > before:
                self.probe_timeouts += 1
            return result

        loss.on_loss_detection_timeout = counted  # type: ignore[method-assign]
        return conn

    # client role

    def connect(self, addr: Address) -> Deferred[None]:
        self.peer = addr
        self.conn = self._new_connection(self._configuration(True))
        self.conn.connect(addr, now=self.clock.seconds())
        self._pump()
        return self.handshake

    @property
    def peer_public_key(self) -> bytes | None:
        """The raw Ed25519 key of the certificate the server presented."""
        assert self.conn is not None
        certificate = self.conn.tls._peer_certificate
        return None if certificate is None else public_key_of(certificate)

    def request(self, data: bytes) -> Deferred[bytes]:
        assert self.conn is not None
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_stream_data(stream_id, data, end_stream=True)
        d: Deferred[bytes] = Deferred()
        self._waiting[stream_id] = d
        self._pump()
        return d

    # datagrams and time

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        addr = (addr[0], addr[1])
        if self.conn is None:
            if self.server_identity is None or len(data) < 1200:
                return
            from aioquic.buffer import Buffer
            from aioquic.quic.packet import pull_quic_header

            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            self.peer = addr
            self.conn = self._new_connection(
                self._configuration(False), original_destination_connection_id=header.destination_cid
            )
        self.conn.receive_datagram(data, addr, now=self.clock.seconds())
        self._pump()

    def segmentsReceived(self, buffer: bytes, segment_size: int, addr: Any) -> None:
        for i in range(0, len(buffer), segment_size):
            self.datagramReceived(buffer[i : i + segment_size], addr)

    def _on_timer(self) -> None:
        self._timer = None
        assert self.conn is not None
        self.conn.handle_timer(now=self.clock.seconds())
        self._pump()

    def _pump(self) -> None:
        conn = self.conn
        assert conn is not None
        while (event := conn.next_event()) is not None:
            self._event(event)
        for data, addr in conn.datagrams_to_send(now=self.clock.seconds()):
            self.transport.write(data, addr)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        at = conn.get_timer()
        if at is not None:
            self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._on_timer)

    def _event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.handshake_done = True
            if not self.handshake.called:
                self.handshake.callback(None)
        elif isinstance(event, events.StreamDataReceived):
            chunks = self._streams.setdefault(event.stream_id, [])
            chunks.append(event.data)
            if event.end_stream:
                data = b"".join(self._streams.pop(event.stream_id))
                waiting = self._waiting.pop(event.stream_id, None)
                if waiting is not None:
                    waiting.callback(data)
                elif self.on_request is not None:
                    assert self.conn is not None
                    self.conn.send_stream_data(event.stream_id, self.on_request(data), end_stream=True)
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            error = ConnectionError(f"aioquic connection terminated: {event.reason_phrase or event.error_code}")
            if not self.handshake.called:
                self.handshake.errback(error)
            for d in self._waiting.values():
                d.errback(error)
            self._waiting.clear()

    def close(self) -> None:
        if self.conn is not None and self.terminated is None:
            self.conn.close()
            self._pump()

