# -*- test-case-name: tests.unit.test_quic -*-
"""
Tests for L{dsss.quic}, L{dsss.quic.testing} and L{dsss.crypto.certs}.

Most tests join two L{QuicEndpoint}s with an in-memory datagram link driven by
a L{Clock}; one moves 4 MiB over real UDP sockets on 127.0.0.1.
"""

from __future__ import annotations

import errno
import hashlib
import collections
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from qh3._hazmat import Buffer
from qh3.quic.packet import pull_quic_header
from nacl.signing import SigningKey
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from dsss.crypto.certs import COMMON_NAME, make_certificate, public_key_of
from dsss.quic import (
    CONTROL_PREFIX,
    STREAM_SEND_HIGH_WATER,
    ConnectionFailed,
    ConnectionLost,
    PeerIdentityError,
    QuicConnectionHandle,
    QuicEndpoint,
    QuicStream,
    RequestTimeout,
    ResponseTooLarge,
    StreamReset,
)
from dsss.quic.testing import MemoryDatagramLink, run_until

SERVER_SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
SERVER_ADDR = ("10.0.0.1", 4001)
CLIENT_ADDR = ("10.0.0.2", 4002)
SERVER_IDENTITY = make_certificate(SERVER_SEED)
SERVER_KEY = SigningKey(SERVER_SEED).verify_key.encode()
OTHER_KEY = SigningKey(OTHER_SEED).verify_key.encode()


# helpers


@contextmanager
def no_logged_failures() -> Iterator[list[dict[str, Any]]]:
    """Collect log events carrying a failure; fail the test if any."""
    failures: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    class Observer:
        def __call__(self, event: dict[str, Any]) -> None:
            if "log_failure" in event:
                failures.append(event)

    observer = Observer()
    globalLogPublisher.addObserver(observer)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures == []


class Handler:
    """
    A server-side stream handler: hashes what arrives chunk by chunk, and
    replies with C{reply(data)} when the peer ends its side, where C{data} is
    everything received if C{keep}, else only its SHA-256 digest.
    """

    def __init__(self, reply: Callable[[bytes], bytes | None] | None = None, *, keep: bool = True) -> None:
        self.reply = reply
        self.keep = keep
        self.streams: list[QuicStream] = []
        self.chunks: list[int] = []
        self.sha = hashlib.sha256()
        self.data = bytearray()
        self.ended = 0
        self.errors: list[Exception] = []

    def __call__(self, stream: QuicStream) -> None:
        self.streams.append(stream)
        data = bytearray()

        def on_data(chunk: bytes) -> None:
            self.chunks.append(len(chunk))
            self.sha.update(chunk)
            if self.keep:
                data.extend(chunk)

        def on_end() -> None:
            self.ended += 1
            self.data = data
            if self.reply is not None:
                answer = self.reply(bytes(data) if self.keep else self.sha.digest())
                if answer is not None:
                    stream.write(answer, end=True)

        stream.on_data = on_data
        stream.on_end = on_end
        stream.on_error = self.errors.append


@dataclass
class Pair:
    clock: Clock
    link: MemoryDatagramLink
    server: QuicEndpoint
    client: QuicEndpoint
    handler: Handler
    server_control: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)
    client_control: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)

    def run(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        assert run_until(self.clock, condition, timeout=timeout), "condition not reached"

    def idle(self, seconds: float) -> None:
        """Let C{seconds} of simulated time pass, running every timer on the way."""
        run_until(self.clock, lambda: False, timeout=seconds)

    def result(self, d: Deferred[Any], timeout: float = 60.0) -> Any:
        """Run the clock until C{d} fires; return its result or Failure."""
        box: list[Any] = []
        d.addBoth(box.append)
        self.run(lambda: bool(box), timeout)
        return box[0]

    def connect(self, **kw: Any) -> QuicConnectionHandle:
        kw.setdefault("expected_public_key", SERVER_KEY)
        handle = self.result(self.client.connect(SERVER_ADDR, **kw))
        assert isinstance(handle, QuicConnectionHandle), handle
        return handle


def make_pair(
    handler: Handler | None = None,
    *,
    loss: float = 0.0,
    reorder: float = 0.0,
    seed: int = 1,
    record: bool = False,
    client_datagram_size: int | None = None,
    gro: bool = False,
    **endpoint_kw: Any,
) -> Pair:
    clock = Clock()
    link = MemoryDatagramLink(
        clock, loss=loss, reorder=reorder, rng=random.Random(seed), record=record, gro=gro
    )
    handler = handler if handler is not None else Handler(lambda data: b"echo:" + data)
    server_control: list[tuple[bytes, tuple[str, int]]] = []
    client_control: list[tuple[bytes, tuple[str, int]]] = []
    server = QuicEndpoint(
        clock,
        on_control=lambda d, a: server_control.append((d, a)),
        server_identity=SERVER_IDENTITY,
        on_stream=handler,
        **endpoint_kw,
    )
    client_kw = dict(endpoint_kw)
    if client_datagram_size is not None:
        client_kw["max_datagram_size"] = client_datagram_size
    client = QuicEndpoint(
        clock, on_control=lambda d, a: client_control.append((d, a)), **client_kw
    )
    link.attach(server, SERVER_ADDR)
    link.attach(client, CLIENT_ADDR)
    return Pair(clock, link, server, client, handler, server_control, client_control)


def failure_type(result: Any) -> type[BaseException] | None:
    assert isinstance(result, Failure), f"expected a failure, got {result!r}"
    return result.type


# certificates


def test_certificate_carries_the_nacl_key() -> None:
    cert, key = make_certificate(SERVER_SEED)
    assert public_key_of(cert) == SERVER_KEY
    assert key.public_key().public_bytes_raw() == SERVER_KEY
    assert cert.subject.rfc4514_string() == f"CN={COMMON_NAME}"
    assert cert.not_valid_before_utc.year <= 2020
    assert cert.not_valid_after_utc.year >= 2100
    # deterministic: the same seed gives the same certificate
    assert make_certificate(SERVER_SEED)[0] == cert
    assert public_key_of(make_certificate(OTHER_SEED)[0]) == OTHER_KEY
    with pytest.raises(ValueError):
        make_certificate(b"short")


# in memory


def test_handshake_and_request_round_trip() -> None:
    with no_logged_failures():
        pair = make_pair()
        handle = pair.connect()
        assert handle.peer == SERVER_ADDR
        assert handle.peer_public_key == SERVER_KEY
        assert pair.result(handle.request(b"hello", max_response=100)) == b"echo:hello"
        assert pair.result(handle.request(b"again", max_response=100)) == b"echo:again"
        assert pair.handler.ended == 2
        # a second connect with the same key reuses the live connection
        assert pair.connect() is handle
        assert len(pair.client.connections) == 1
        assert len(pair.server.connections) == 1


def test_concurrent_connects_share_one_handshake() -> None:
    pair = make_pair()
    d1 = pair.client.connect(SERVER_ADDR, expected_public_key=SERVER_KEY)
    d2 = pair.client.connect(SERVER_ADDR, expected_public_key=SERVER_KEY)
    assert pair.result(d1) is pair.result(d2)
    assert len(pair.server.connections) == 1


def test_upload_arrives_incrementally_and_intact() -> None:
    """A 1 MiB upload reaches the server's handler chunk by chunk."""
    handler = Handler(lambda digest: digest, keep=False)
    pair = make_pair(handler)
    handle = pair.connect()
    payload = random.Random(7).randbytes(1024 * 1024)
    stream = handle.open_stream()
    reply: list[bytes] = []
    stream.on_data = reply.append
    ended: list[bool] = []
    stream.on_end = lambda: ended.append(True)
    received_at_half: list[int] = []

    chunk = 64 * 1024
    for offset in range(0, len(payload), chunk):
        last = offset + chunk >= len(payload)
        pair.result(stream.write(payload[offset : offset + chunk], end=last))
        if offset == len(payload) // 2:
            pair.run(lambda: sum(handler.chunks) >= len(payload) // 2)
            received_at_half.append(handler.ended)
    pair.run(lambda: bool(ended))

    assert received_at_half == [0]  # half of it was processed before the end
    assert len(handler.chunks) > 10
    assert max(handler.chunks) < len(payload) // 4
    assert handler.sha.digest() == hashlib.sha256(payload).digest()
    assert b"".join(reply) == hashlib.sha256(payload).digest()
    assert handler.data == b""  # nothing was buffered by the handler


def test_lossy_reordering_link_delivers_exact_bytes() -> None:
    with no_logged_failures():
        pair = make_pair(loss=0.1, reorder=0.1, seed=1234)
        handle = pair.connect()
        payload = random.Random(3).randbytes(300_000)
        reply = pair.result(handle.request(payload, max_response=400_000, timeout=120))
        assert reply == b"echo:" + payload
        assert pair.handler.data == payload
        stats = pair.link.stats
        assert stats.lost > 20 and stats.reordered > 20


def test_wrong_expected_key_fails_and_closes() -> None:
    pair = make_pair()
    result = pair.result(pair.client.connect(SERVER_ADDR, expected_public_key=OTHER_KEY))
    assert failure_type(result) is PeerIdentityError
    pair.run(lambda: not pair.client.connections and not pair.server.connections)
    # the right key still works afterwards
    assert pair.connect().peer_public_key == SERVER_KEY


def test_control_datagrams_are_routed_and_quic_starting_with_P_is_not() -> None:
    with no_logged_failures():
        pair = make_pair(record=True)
        pair.client.send_control(CONTROL_PREFIX + b"PING 1", SERVER_ADDR)
        pair.server.send_control(CONTROL_PREFIX + b"PONG 1", CLIENT_ADDR)
        with pytest.raises(ValueError):
            pair.client.send_control(b"PING", SERVER_ADDR)
        handle = pair.connect()
        payload = random.Random(5).randbytes(100_000)

        def quic_datagrams_starting_with_p() -> int:
            return sum(1 for data, _, _ in pair.link.stats.log if data[:1] == b"P")

        # QUIC short headers start with 0x40..0x7f after header protection;
        # keep transferring until some started with 'P' (0x50).
        for _ in range(30):
            assert pair.result(handle.request(payload, max_response=200_000)) == b"echo:" + payload
            if quic_datagrams_starting_with_p() >= 3:
                break
        assert quic_datagrams_starting_with_p() >= 3
        assert pair.server_control == [(CONTROL_PREFIX + b"PING 1", CLIENT_ADDR)]
        assert pair.client_control == [(CONTROL_PREFIX + b"PONG 1", SERVER_ADDR)]
        assert pair.link.stats.lost == 0


def _initial_like(version: int, size: int, rng: random.Random) -> bytes:
    """A datagram with a well-formed QUIC long Initial header and junk inside."""
    dcid, scid = rng.randbytes(8), rng.randbytes(8)
    header = bytes([0xC3]) + struct.pack("!I", version) + bytes([8]) + dcid + bytes([8]) + scid
    header += b"\x00"  # token length
    payload_len = size - len(header) - 2
    header += struct.pack("!H", 0x4000 | payload_len)  # 2-byte varint length
    return header + rng.randbytes(payload_len)


def test_garbage_is_dropped_without_state_or_exception() -> None:
    with no_logged_failures():
        pair = make_pair(record=True)
        rng = random.Random(99)
        garbage = [b"", b"\xff", b"\x40", b"P" * 40, b"\xc0" * 5]
        garbage += [bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randrange(0, 1600)) for _ in range(300)]
        garbage += [bytes([rng.randrange(0x40, 0x80)]) + rng.randbytes(rng.randrange(8, 1600)) for _ in range(100)]
        garbage += [_initial_like(1, 1250, rng) for _ in range(20)]
        # most of these parse as QUIC headers, so they reach the connection lookup
        parsed = 0
        for data in garbage:
            try:
                pull_quic_header(Buffer(data=data), host_cid_length=8)
                parsed += 1
            except ValueError:
                pass
        assert parsed > 150
        for data in garbage:
            for target in (SERVER_ADDR, CLIENT_ADDR):
                pair.link.inject(data, ("10.9.9.9", 999), target)
        pair.clock.advance(0)
        assert pair.server.connections == []
        assert pair.client.connections == []
        assert pair.server_control == [] and pair.client_control == []

        # An Initial for a version we do not speak gets a Version Negotiation, and no state.
        sent_before = len(pair.link.stats.log)
        pair.link.inject(_initial_like(0x1A2A3A4A, 1250, rng), ("10.9.9.9", 999), SERVER_ADDR)
        replies = [d for d, src, dst in pair.link.stats.log[sent_before:] if dst == ("10.9.9.9", 999)]
        assert len(replies) == 1 and replies[0][1:5] == b"\x00\x00\x00\x00"
        assert pair.server.connections == []

        # the endpoints still work
        handle = pair.connect()
        assert pair.result(handle.request(b"x", max_response=10)) == b"echo:x"


def test_unsolicited_quic_without_server_identity_is_dropped() -> None:
    pair = make_pair()
    other = QuicEndpoint(pair.clock, on_control=lambda d, a: None)
    pair.link.attach(other, ("10.0.0.3", 4003))
    result = pair.result(
        pair.client.connect(("10.0.0.3", 4003), expected_public_key=None, handshake_timeout=2)
    )
    assert failure_type(result) is ConnectionFailed
    assert other.connections == []


def test_connect_to_silent_address_times_out() -> None:
    pair = make_pair()
    start = pair.clock.seconds()
    result = pair.result(pair.client.connect(("10.0.0.99", 9), expected_public_key=SERVER_KEY))
    assert failure_type(result) is ConnectionFailed
    assert "did not finish within 10" in str(result.value)
    assert 10.0 <= pair.clock.seconds() - start < 10.5
    pair.run(lambda: not pair.client.connections, timeout=10)


def test_connect_needs_an_ip_address() -> None:
    pair = make_pair()
    result = pair.result(pair.client.connect(("example.com", 443), expected_public_key=None))
    assert failure_type(result) is ConnectionFailed
    assert pair.client.connections == []


def test_response_too_large() -> None:
    pair = make_pair(Handler(lambda data: b"z" * 50_000))
    handle = pair.connect()
    result = pair.result(handle.request(b"q", max_response=1000))
    assert failure_type(result) is ResponseTooLarge
    # the connection survives a reset stream
    pair.handler.reply = lambda data: b"ok"
    assert pair.result(handle.request(b"q", max_response=1000)) == b"ok"


def test_request_timeout() -> None:
    pair = make_pair(Handler(lambda data: None))
    handle = pair.connect()
    start = pair.clock.seconds()
    result = pair.result(handle.request(b"q", max_response=1000, timeout=5))
    assert failure_type(result) is RequestTimeout
    assert 5.0 <= pair.clock.seconds() - start < 5.1
    # the client's reset reached the server: writing the reply now fails
    pair.idle(1)
    late = pair.result(pair.handler.streams[0].write(b"late", end=True))
    assert failure_type(late) is StreamReset


def test_peer_reset_fails_request() -> None:
    handler = Handler()

    def reset(data: bytes) -> None:
        handler.streams[-1].reset(7)

    handler.reply = reset
    pair = make_pair(handler)
    handle = pair.connect()
    result = pair.result(handle.request(b"q", max_response=1000))
    assert failure_type(result) is StreamReset
    assert result.value.error_code == 7


class EarlyRejecter:
    """A handler that judges the first chunk (the "header") and rejects the stream."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.streams: list[QuicStream] = []
        self.bytes_seen = 0

    def __call__(self, stream: QuicStream) -> None:
        self.streams.append(stream)

        def on_data(chunk: bytes) -> None:
            self.bytes_seen += len(chunk)
            if self.how == "reply":
                stream.write(b"ERR bad header\n", end=True)
                stream.stop_reading(5)
            else:
                stream.reset(6)

        stream.on_data = on_data
        stream.on_end = lambda: None


@pytest.mark.parametrize("how", ["reply", "reset"])
def test_server_rejects_an_upload_early(how: str) -> None:
    rejecter = EarlyRejecter(how)
    pair = make_pair(rejecter, record=True)  # type: ignore[arg-type]
    handle = pair.connect()
    payload = b"BAD HEADER\n" + bytes(3 * 1024 * 1024)
    result = pair.result(handle.request(payload, max_response=100))
    if how == "reply":
        assert result == b"ERR bad header\n"
    else:
        assert failure_type(result) is StreamReset and result.value.error_code == 6
    pair.idle(2)
    # late frames of the rejected stream never look like a new stream
    assert len(rejecter.streams) == 1
    # the upload was cut short: most of it was never even sent
    assert rejecter.bytes_seen < len(payload) // 2
    uploaded = sum(len(d) for d, src, dst in pair.link.stats.log if src == CLIENT_ADDR)
    assert uploaded < len(payload) // 2
    # and the connection still carries requests
    pair.server._on_stream = Handler(lambda data: b"fine")
    assert pair.result(handle.request(b"q", max_response=10)) == b"fine"


def test_connection_loss_fails_pending_request_and_forgets_connection() -> None:
    pair = make_pair(Handler(lambda data: None))
    handle = pair.connect()
    d = handle.request(b"q", max_response=1000)
    pair.run(lambda: pair.handler.ended == 1)
    pair.server.connections[0].close()
    assert failure_type(pair.result(d)) is ConnectionLost
    pair.run(lambda: not pair.client.connections and not pair.server.connections)
    with pytest.raises(ConnectionLost):
        handle.open_stream()
    # a new connect makes a new connection
    assert pair.connect() is not handle


def test_idle_timeout_forgets_connection() -> None:
    pair = make_pair(idle_timeout=5.0)
    handle = pair.connect()
    closed = handle.when_closed()
    pair.link.filter = lambda data, src, dst: False  # the network goes dark
    assert pair.result(closed) is None
    assert pair.client.connections == []
    assert not handle.established


def test_a_peer_that_dies_fails_the_request_within_the_short_idle_timeout() -> None:
    """With keepalive PINGs, a client can use a short idle timeout: a peer that stops
    answering mid-request is given up after about that long, not after the request timeout."""
    pair = make_pair(Handler(lambda data: None), idle_timeout=1.0, keepalive=0.25)
    handle = pair.connect()
    d = handle.request(b"q", max_response=1000, timeout=60.0)
    pair.run(lambda: pair.handler.ended == 1)
    start = pair.clock.seconds()
    pair.link.filter = lambda data, src, dst: False  # the peer is gone (killed, unplugged)
    assert failure_type(pair.result(d)) is ConnectionLost
    assert pair.clock.seconds() - start < 3.0  # the request's own timeout was 60 s


def test_keepalive_holds_a_connection_whose_peer_is_slow_to_reply() -> None:
    """A reply that takes longer than the idle timeout still arrives: the peer's stack
    acknowledges the client's PINGs meanwhile. Without them, the connection would end."""
    clock_box: list[Clock] = []

    def later(data: bytes) -> None:
        stream = handler.streams[-1]
        clock_box[0].callLater(5.0, lambda: stream.write(b"slow:" + data, end=True))

    handler = Handler(later)
    pair = make_pair(handler, idle_timeout=1.0, keepalive=0.25)
    clock_box.append(pair.clock)
    handle = pair.connect()
    assert pair.result(handle.request(b"q", max_response=1000)) == b"slow:q"

    quiet = make_pair(Handler(later), idle_timeout=1.0)  # no keepalive: the connection idles out
    clock_box[0] = quiet.clock
    handler = quiet.handler
    d = quiet.connect().request(b"q", max_response=1000)
    assert failure_type(quiet.result(d)) is ConnectionLost


def test_an_unused_connection_stops_pinging_and_idles_out() -> None:
    from dsss.quic.connection import KEEPALIVE_LINGER

    pair = make_pair(idle_timeout=1.0, keepalive=0.25)
    handle = pair.connect()
    assert pair.result(handle.request(b"q", max_response=1000)) == b"echo:q"
    closed = handle.when_closed()
    pair.idle(KEEPALIVE_LINGER - 1)
    assert handle.established  # still pinging: the session may use it again
    assert pair.result(closed, timeout=5.0) is None


def test_write_backpressure_bounds_queued_data() -> None:
    handler = Handler(lambda digest: digest, keep=False)
    pair = make_pair(handler)
    handle = pair.connect()
    pair.link.filter = lambda data, src, dst: False  # nothing gets through: no acks
    stream = handle.open_stream()
    reply: list[bytes] = []
    stream.on_data = reply.append
    payload = random.Random(11).randbytes(3 * 1024 * 1024)
    chunk = 100_000
    written = 0
    while written < len(payload):
        d = stream.write(payload[written : written + chunk])
        written += chunk
        fired: list[Any] = []
        d.addBoth(fired.append)
        pair.clock.advance(0.01)
        if not fired:
            break
    assert written <= STREAM_SEND_HIGH_WATER + chunk
    assert stream._buffered() <= STREAM_SEND_HIGH_WATER + chunk
    pair.link.filter = None  # the network comes back
    pair.result(d)
    while written < len(payload):
        last = written + chunk >= len(payload)
        pair.result(stream.write(payload[written : written + chunk], end=last))
        written += chunk
    ended: list[bool] = []
    stream.on_end = lambda: ended.append(True)
    pair.run(lambda: bool(ended))
    assert b"".join(reply) == hashlib.sha256(payload).digest()


def test_reconnect_from_same_address_replaces_old_connection() -> None:
    pair = make_pair()
    old = pair.connect()
    old_server = pair.server.connections[0]
    pair.link.detach(CLIENT_ADDR)  # the client restarts on the same address
    client2 = QuicEndpoint(pair.clock, on_control=lambda d, a: None)
    pair.link.attach(client2, CLIENT_ADDR)
    handle = pair.result(client2.connect(SERVER_ADDR, expected_public_key=SERVER_KEY))
    assert handle is not old
    assert pair.result(handle.request(b"n", max_response=10)) == b"echo:n"
    pair.run(lambda: old_server not in pair.server.connections)
    assert len(pair.server.connections) == 1


def test_endpoint_close_ends_all_connections() -> None:
    pair = make_pair(Handler(lambda data: None))
    handle = pair.connect()
    d = handle.request(b"q", max_response=1000)
    pair.run(lambda: pair.handler.ended == 1)
    assert pair.result(pair.client.close()) is None
    assert failure_type(pair.result(d)) is ConnectionLost
    assert pair.client.connections == []
    pair.run(lambda: not pair.server.connections)
    assert failure_type(pair.result(pair.client.connect(SERVER_ADDR, expected_public_key=None))) is ConnectionFailed


def test_close_without_grace_still_tells_the_peer() -> None:
    """
    close(grace=0), as a client that is about to exit does it, ends every
    connection at once, without simulated time passing, and the peer still
    learns of it from the CONNECTION_CLOSE (long before its idle timeout).
    """
    pair = make_pair()
    handle = pair.connect()
    assert pair.result(handle.request(b"q", max_response=1000)) == b"echo:q"
    assert len(pair.server.connections) == 1
    before = pair.clock.seconds()
    d = pair.client.close(grace=0)
    assert pair.client.connections == []
    assert pair.result(d) is None
    assert pair.clock.seconds() == before
    pair.run(lambda: not pair.server.connections, timeout=5.0)


def test_both_roles_on_one_socket() -> None:
    """Two agents connect to each other at the same time over the same sockets."""
    clock = Clock()
    link = MemoryDatagramLink(clock)
    a_addr, b_addr = ("10.0.1.1", 5000), ("10.0.1.2", 5000)
    a_identity, b_identity = make_certificate(SERVER_SEED), make_certificate(OTHER_SEED)
    a = QuicEndpoint(clock, on_control=lambda d, s: None, server_identity=a_identity,
                     on_stream=Handler(lambda data: b"A:" + data))
    b = QuicEndpoint(clock, on_control=lambda d, s: None, server_identity=b_identity,
                     on_stream=Handler(lambda data: b"B:" + data))
    link.attach(a, a_addr)
    link.attach(b, b_addr)
    a_to_b = a.connect(b_addr, expected_public_key=OTHER_KEY)
    b_to_a = b.connect(a_addr, expected_public_key=SERVER_KEY)
    results: list[Any] = []
    a_to_b.addCallback(lambda h: h.request(b"1", max_response=10)).addBoth(results.append)
    b_to_a.addCallback(lambda h: h.request(b"2", max_response=10)).addBoth(results.append)
    assert run_until(clock, lambda: len(results) == 2, timeout=10)
    assert sorted(results) == [b"A:2", b"B:1"]
    assert len(a.connections) == 2 and len(b.connections) == 2


def test_datagram_size_limits() -> None:
    clock = Clock()
    with pytest.raises(ValueError):
        QuicEndpoint(clock, on_control=lambda d, a: None, max_datagram_size=65001)
    with pytest.raises(ValueError):
        QuicEndpoint(clock, on_control=lambda d, a: None, max_datagram_size=1000)
    # 65000-byte datagrams (the loopback default) work both ways
    pair = make_pair(max_datagram_size=65000, record=True)
    handle = pair.connect()
    payload = random.Random(8).randbytes(600_000)
    assert pair.result(handle.request(payload, max_response=700_000)) == b"echo:" + payload
    assert max(len(d) for d, src, _ in pair.link.stats.log if src == CLIENT_ADDR) > 32768
    assert max(len(d) for d, src, _ in pair.link.stats.log if src == SERVER_ADDR) > 32768


def test_server_sends_no_larger_datagrams_than_the_client_announced() -> None:
    """
    A client announces its datagram size as max_udp_payload_size: a server set
    for larger datagrams answers a 1452-byte client in datagrams of at most
    1452 bytes, and a 8192-byte client in larger ones (downloads at loopback
    speed).
    """
    payload = random.Random(9).randbytes(300_000)
    for client_size, expect_above, bound in ((1452, 1200, 1452), (8192, 1472, 8192)):
        pair = make_pair(
            max_datagram_size=16000, client_datagram_size=client_size, record=True
        )
        handle = pair.connect()
        assert pair.result(handle.request(b"x", max_response=400_000)) == b"echo:x"
        pair.link.stats.log.clear()
        assert pair.result(handle.request(payload, max_response=400_000)) == b"echo:" + payload
        from_server = [len(d) for d, src, _ in pair.link.stats.log if src == SERVER_ADDR]
        assert expect_above < max(from_server) <= bound


def test_link_loss_and_reorder_are_seeded() -> None:
    """The in-memory link drops and reorders, repeatably for a given seed."""

    def trace(seed: int) -> list[bytes]:
        clock = Clock()
        link = MemoryDatagramLink(clock, loss=0.2, reorder=0.3, rng=random.Random(seed))
        got: list[bytes] = []

        sink = QuicEndpoint(clock, on_control=lambda d, a: got.append(d))
        src = QuicEndpoint(clock, on_control=lambda d, a: None)
        link.attach(sink, ("1.1.1.1", 1))
        link.attach(src, ("1.1.1.2", 1))
        for i in range(200):
            src.send_control(CONTROL_PREFIX + b"%d" % i, ("1.1.1.1", 1))
        clock.advance(1)
        return got

    first = trace(1)
    assert first == trace(1)
    assert 120 < len(first) < 190
    assert first != sorted(first, key=lambda d: int(d[1:]))


# real sockets


class _SocketProxy:
    """A real socket whose sendmsg (UDP segmentation offload) is counted, or refused."""

    def __init__(self, sock: Any, refuse: bool) -> None:
        self._sock = sock
        self._refuse = refuse
        self.segmented = 0

    def sendmsg(self, *args: Any) -> int:
        if self._refuse:
            raise OSError(errno.EIO, "no segmentation offload here")
        self.segmented += 1
        return int(self._sock.sendmsg(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("kernel", ["segments", "refuses segmentation"])
@pytest_twisted.ensureDeferred
async def test_real_sockets_4mib_stream(kernel: str) -> None:
    """A 4 MiB stream over real UDP sockets arrives intact, sent in segmented runs
    (UDP_SEGMENT) where the kernel does it and one datagram at a time where it refuses.
    The receiving port has UDP_GRO on: a segmented run reaches it in one read."""
    from twisted.internet import reactor

    handler = Handler(lambda digest: digest, keep=False)
    server = QuicEndpoint(
        reactor, on_control=lambda d, a: None, server_identity=SERVER_IDENTITY, on_stream=handler
    )
    runs: list[int] = []
    original_runs = server.segmentsReceived

    def count_runs(buffer: bytes, segment_size: int, addr: Any) -> None:
        runs.append(len(buffer) // segment_size)
        original_runs(buffer, segment_size, addr)

    server.segmentsReceived = count_runs  # type: ignore[method-assign]
    client = QuicEndpoint(reactor, on_control=lambda d, a: None)
    server.listen(reactor, "127.0.0.1", 0)
    port = client.listen(reactor, "127.0.0.1", 0)
    proxy = _SocketProxy(port.socket, refuse=kernel != "segments")  # type: ignore[attr-defined]
    port.socket = proxy  # type: ignore[attr-defined]
    try:
        handle = await client.connect(server.address, expected_public_key=SERVER_KEY).addTimeout(5, reactor)
        payload = random.Random(4).randbytes(4 * 1024 * 1024)
        stream = handle.open_stream()
        reply: list[bytes] = []
        done: Deferred[None] = Deferred()
        stream.on_data = reply.append
        stream.on_end = lambda: done.callback(None)
        stream.on_error = done.errback
        chunk = 256 * 1024
        for offset in range(0, len(payload), chunk):
            last = offset + chunk >= len(payload)
            await stream.write(payload[offset : offset + chunk], end=last).addTimeout(10, reactor)
        await done.addTimeout(10, reactor)
        assert b"".join(reply) == hashlib.sha256(payload).digest()
        assert handler.sha.digest() == hashlib.sha256(payload).digest()
        assert len(handler.chunks) > 1
        if kernel == "segments":
            assert client._sender.enabled and proxy.segmented > 0
            assert runs and max(runs) > 1  # GSO runs arrived whole (UDP_GRO)
        else:
            assert not client._sender.enabled and proxy.segmented == 0
    finally:
        await client.close()
        await server.close()


def test_finished_requests_leave_no_stream_state() -> None:
    """Streams done both ways are forgotten on both sides; a long session does not grow."""
    pair = make_pair()
    handle = pair.connect()
    payload = random.Random(12).randbytes(300_000)
    for _ in range(20):
        assert pair.result(handle.request(payload, max_response=400_000)) == b"echo:" + payload
    pair.idle(1.0)
    assert handle._streams == {}
    (server_handle,) = [h for h in pair.server._all if not h.is_client]
    assert server_handle._streams == {}


# receiving runs of datagrams in one read (UDP GRO)


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_runs_of_datagrams_in_one_read_carry_transfers_both_ways(loss: float, monkeypatch: Any) -> None:
    """
    With the link handing over runs of same-size datagrams in one call (as a
    socket with UDP_GRO does), uploads and downloads arrive intact, also with
    loss, and most of the bytes did travel in runs, given to qh3 a run at a time.
    """
    batched: list[int] = []
    original = QuicConnectionHandle._receive_many

    def spy(self: Any, datagrams: list[bytes], addr: Any, now: float) -> None:
        batched.append(len(datagrams))
        original(self, datagrams, addr, now)

    monkeypatch.setattr(QuicConnectionHandle, "_receive_many", spy)
    pair = make_pair(gro=True, loss=loss, seed=3)
    handle = pair.connect()
    payload = random.Random(4).randbytes(400_000)
    assert pair.result(handle.request(payload, max_response=500_000)) == b"echo:" + payload
    # both ways: runs reached the server (the upload) and the client (the echo)
    stats = pair.link.stats
    assert stats.runs_to.get(SERVER_ADDR, 0) > 0 and stats.runs_to.get(CLIENT_ADDR, 0) > 0
    assert stats.coalesced > 0.1 * stats.delivered
    assert sum(batched) > 0.5 * stats.coalesced  # the runs of data, not one datagram at a time


def _segments_from_server(pair: Pair, count: int) -> list[bytes]:
    """`count` same-size short-header datagrams the server sent the client."""
    sent = [d for d, src, _ in pair.link.stats.log if src == SERVER_ADDR and not d[0] & 0x80]
    size = collections.Counter(len(d) for d in sent).most_common(1)[0][0]
    full = [d for d in sent if len(d) == size]
    assert len(full) >= count
    return full[:count]


def test_a_run_for_an_unknown_connection_is_taken_datagram_by_datagram() -> None:
    """
    A run whose datagrams are not all for one known connection (here one
    datagram of the run has another connection ID) is not given to qh3 as a
    whole: each datagram is handled on its own, so the valid ones still count
    and the stray one is dropped as it would be alone.
    """
    pair = make_pair(record=True)
    handle = pair.connect()
    payload = random.Random(5).randbytes(200_000)
    assert pair.result(handle.request(payload, max_response=300_000)) == b"echo:" + payload
    conn = pair.client.connections[0]
    segments = _segments_from_server(pair, 3)
    stray = bytearray(segments[1])
    stray[1:9] = b"\xee" * 8
    seen: list[bytes] = []
    original = type(conn)._receive

    def spy(self: Any, data: bytes, addr: Any, now: float) -> None:
        seen.append(data)
        original(self, data, addr, now)

    size = len(segments[0])
    try:
        type(conn)._receive = spy  # type: ignore[method-assign]
        pair.client.segmentsReceived(segments[0] + bytes(stray) + segments[2], size, SERVER_ADDR)
    finally:
        type(conn)._receive = original  # type: ignore[method-assign]
    # the two datagrams of the known connection went in one by one; the stray one nowhere
    assert seen == [segments[0], segments[2]]
    assert pair.client.connections == [conn]


def test_a_run_of_control_datagrams_reaches_on_control_one_by_one() -> None:
    pair = make_pair()
    pair.connect()
    punch = CONTROL_PREFIX + b"PUNCH agent"
    other = CONTROL_PREFIX + b"PUNCH other"
    pair.client.segmentsReceived(punch + other + punch[:5], len(punch), SERVER_ADDR)
    assert pair.client_control == [(punch, SERVER_ADDR), (other, SERVER_ADDR), (punch[:5], SERVER_ADDR)]
