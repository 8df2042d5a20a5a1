# -*- test-case-name: tests.unit.test_quic -*-
"""
DSSS's QUIC adapter: Twisted around qh3's sans-I/O C{QuicConnection}.

qh3 is a fork of aioquic with the same API and a native (Rust) connection core:
it costs about a quarter of aioquic's CPU per byte (see docs/performance.md).
One L{QuicEndpoint} owns one UDP socket and drives every QUIC connection on
it, as a client (L{QuicEndpoint.connect}) and, when given a server identity,
as a server; the same socket carries DSSS control datagrams.

The package, one job per module:

  - L{dsss.quic.endpoint}: the socket, the demultiplexer (control, relayed,
    QUIC), the connection table, relay routing, the sends of a turn;
  - L{dsss.quic.connection}: one connection, its handshake, streams and timer,
    and the peer's pinned key;
  - L{dsss.quic.stream}: one stream's callbacks and back-pressure;
  - L{dsss.quic.batching}: UDP runs both ways (GRO reads, GSO sends), shared
    with the discovery server's relay;
  - L{dsss.quic._engine}: every use of qh3's private names, checked by
    C{check_engine} (a qh3 upgrade breaks this module only);
  - L{dsss.quic.relay}: which peers are reached through a relay (sans-I/O);
  - L{dsss.quic.errors}; L{dsss.quic.testing}, an in-memory datagram network
    for tests.

Usage::

    endpoint = QuicEndpoint(reactor, on_control=punch.datagram_received,
                            server_identity=make_certificate(seed),
                            on_stream=on_stream)
    endpoint.listen(reactor, "127.0.0.1", 4000)   # or listenUDP yourself
    handle = await endpoint.connect(peer, expected_public_key=peer_key)
    reply = await handle.request(b"...", max_response=1 << 20)
"""

from __future__ import annotations

from dsss.quic.connection import QuicConnectionHandle
from dsss.quic.endpoint import (
    ALPN,
    CONTROL_PREFIX,
    LOOPBACK_DATAGRAM_SIZE,
    MAX_DATAGRAM_SIZE_LIMIT,
    QuicEndpoint,
)
from dsss.quic.errors import (
    ConnectionFailed,
    ConnectionLost,
    PeerIdentityError,
    QuicError,
    RequestTimeout,
    ResponseTooLarge,
    StreamReset,
)
from dsss.quic.stream import STREAM_SEND_HIGH_WATER, QuicStream

__all__ = [
    "ALPN",
    "CONTROL_PREFIX",
    "LOOPBACK_DATAGRAM_SIZE",
    "MAX_DATAGRAM_SIZE_LIMIT",
    "STREAM_SEND_HIGH_WATER",
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
