"""QUIC through the server's relay, on an in-memory link where the direct path is blocked."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from dsss.crypto.certs import make_certificate
from dsss.model import PeerAddress, block_hash
from dsss.quic import QuicEndpoint
from dsss.quic.testing import MemoryDatagramLink, run_until
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from dsss.server.udp import DiscoveryDatagramProtocol
from dsss.quic.batching import UDP_SEGMENT
from dsss.wire.datagram import DRelay, DRelayed, decode_relay, encode_datagram, encode_relay, parse_datagram

S = ("198.51.100.1", 8471)
A = ("198.51.100.11", 40001)
C = ("198.51.100.13", 50001)
KEY = "ab" * 16


def setup(limit=10 * 1024 * 1024, echo=False, **link_options):
    clock = Clock()
    clock.advance(100)
    link = MemoryDatagramLink(clock, **link_options)
    # Symmetric NATs: the client and the agent never reach each other directly.
    link.filter = lambda data, src, dst: {src, dst} != {A, C}
    server = DiscoveryServer(clock, ServerConfig(relay_limit=limit))
    link.attach(DiscoveryDatagramProtocol(server), S)
    seed = os.urandom(32)
    received = []

    def on_stream(stream):
        chunks = []
        stream.on_data = chunks.append
        def answer(data):  # the part's hash, or (echo) the data itself
            return data if echo else block_hash(data).encode()

        stream.on_end = lambda: (received.append(b"".join(chunks)), stream.write(answer(b"".join(chunks)), end=True))

    agent = QuicEndpoint(clock, on_control=lambda d, a: None, server_identity=make_certificate(seed), on_stream=on_stream)
    link.attach(agent, A)
    agent.trust_relay(S)
    controls = []
    client = QuicEndpoint(clock, on_control=lambda d, a: controls.append((parse_datagram(d), a)))
    link.attach(client, C)
    from nacl.signing import SigningKey

    pub = SigningKey(seed).verify_key.encode()
    return clock, link, server, agent, client, controls, received, pub


def test_relay_carries_quic_end_to_end():
    clock, link, server, agent, client, controls, received, pub = setup()
    server._remember_key(KEY, PeerAddress(*C), PeerAddress(*A))
    client.send_control(encode_datagram(DRelay(KEY)), S)
    run_until(clock, lambda: bool(controls), timeout=2)
    assert controls == [(DRelayed(PeerAddress(*A)), S)]
    client.relay_via(A, S)
    data = os.urandom(300_000)
    results = []
    d = client.connect(A, expected_public_key=pub)
    d.addCallback(lambda conn: conn.request(data, max_response=1000))
    d.addBoth(results.append)
    assert run_until(clock, lambda: bool(results), timeout=30)
    assert results[0] == block_hash(data).encode()
    assert received == [data]
    assert server.relays.relayed_bytes > len(data)


def test_relay_refuses_keys_it_did_not_issue_or_for_another_client():
    clock, link, server, agent, client, controls, received, pub = setup()
    client.send_control(encode_datagram(DRelay(KEY)), S)  # never issued
    server._remember_key("cd" * 16, PeerAddress("198.51.100.99", 1), PeerAddress(*A))
    client.send_control(encode_datagram(DRelay("cd" * 16)), S)  # issued to someone else
    run_until(clock, lambda: False, timeout=1)
    assert controls == []
    # Wrapped packets for an unauthorized pair are dropped: no connection comes up.
    client.relay_via(A, S)
    results = []
    client.connect(A, expected_public_key=pub, handshake_timeout=3).addBoth(results.append)
    run_until(clock, lambda: bool(results), timeout=10)
    assert "ConnectionFailed" in type(results[0].value).__name__
    assert server.relays.relayed_bytes == 0


def test_expired_key_does_not_open_the_relay():
    clock, link, server, agent, client, controls, received, pub = setup()
    server._remember_key(KEY, PeerAddress(*C), PeerAddress(*A))
    clock.advance(61)
    client.send_control(encode_datagram(DRelay(KEY)), S)
    run_until(clock, lambda: False, timeout=1)
    assert controls == []


def test_spoofed_relay_packets_cannot_reroute_the_agent():
    clock, link, server, agent, client, controls, received, pub = setup()
    # A packet that seems to come from the server, claiming the server itself as the peer,
    # must not make the agent wrap its own keepalives for the relay.
    link.inject(encode_relay(S, b"\x00PONG 1.2.3.4:5"), S, A)
    assert not agent.relayed(S)
    # A peer the agent already talks to directly is not re-routed by a relayed packet.
    direct = ("198.51.100.20", 6000)
    peer = QuicEndpoint(clock, on_control=lambda d, a: None)
    link.attach(peer, direct)
    results = []
    peer.connect(A, expected_public_key=pub).addBoth(results.append)
    run_until(clock, lambda: bool(results), timeout=5)
    link.inject(encode_relay(direct, b"\x00PUNCH x"), S, A)
    assert not agent.relayed(direct)


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_runs_from_the_relay_are_unwrapped_and_taken_whole(loss, monkeypatch):
    """With the link handing over runs (UDP GRO), the relay's runs of one peer's packets reach
    that peer's connection in one call: on the agent during an upload, and on the client for a
    run of the agent's packets; the transfer arrives intact, also with loss."""
    from dsss.quic import QuicConnectionHandle

    clock, link, server, agent, client, controls, received, pub = setup(
        echo=True, gro=True, loss=loss, rng=random.Random(7), record=True)
    runs = []
    original = QuicConnectionHandle._receive_many

    def spy(self, datagrams, addr, now):
        runs.append((addr, len(datagrams)))
        original(self, datagrams, addr, now)

    monkeypatch.setattr(QuicConnectionHandle, "_receive_many", spy)
    server._remember_key(KEY, PeerAddress(*C), PeerAddress(*A))
    client.send_control(encode_datagram(DRelay(KEY)), S)
    run_until(clock, lambda: bool(controls), timeout=2)
    client.relay_via(A, S)
    data = os.urandom(400_000)
    results = []
    d = client.connect(A, expected_public_key=pub)
    d.addCallback(lambda conn: conn.request(data, max_response=len(data)))
    d.addBoth(results.append)
    assert run_until(clock, lambda: bool(results), timeout=60)
    assert results[0] == data
    assert received == [data]
    assert any(addr == C and n > 1 for addr, n in runs)  # the upload reached the agent in runs
    # Three same-size packets the relay passed from the agent to the client, read as one run.
    wrapped = [d for d, src, dst in link.stats.log if src == S and dst == C and d[:1] == encode_relay(A, b"")[:1]]
    size = max(set(map(len, wrapped)), key=[len(w) for w in wrapped].count)
    three = [w for w in wrapped if len(w) == size and not decode_relay(w)[1][0] & 0x80][:3]
    assert len(three) == 3
    runs.clear()
    client.segmentsReceived(b"".join(three), size, S)
    assert runs == [(A, 3)]


def test_a_relayed_run_mixing_peers_goes_datagram_by_datagram():
    """A run from the relay whose packets are not all from one peer already reached through it
    is not unwrapped as a whole: each packet is taken on its own, as it would be alone."""
    clock, link, server, agent, client, controls, received, pub = setup()
    client.relay_via(A, S)
    seen = []
    client._receive_quic = lambda data, addr: seen.append((data, addr))  # type: ignore[method-assign]
    other = ("198.51.100.12", 40002)  # not reached through the relay (yet)
    packets = [b"\x40" + os.urandom(99) for _ in range(3)]
    wrapped = [encode_relay(A, packets[0]), encode_relay(other, packets[1]), encode_relay(A, packets[2])]
    client.segmentsReceived(b"".join(wrapped), len(wrapped[0]), S)
    assert seen == [(packets[0], A), (packets[1], other), (packets[2], A)]
    # From an address that is not a relay, a relayed run is not unwrapped at all.
    seen.clear()
    client.segmentsReceived(b"".join(wrapped), len(wrapped[0]), ("198.51.100.99", 1))
    assert seen == []


def test_a_run_from_the_relay_joining_two_peers_runs_is_taken_as_two_runs():
    """GRO may join the relay's runs from two agents into one read: each peer's stretch still
    reaches its connection in one call, in order."""
    clock, link, server, agent, client, controls, received, pub = setup()
    b = ("198.51.100.12", 40002)
    client.relay_via(A, S)
    client.relay_via(b, S)
    taken = []
    client._one_connection = lambda datagrams, peer: taken.append((peer, datagrams)) or True  # type: ignore[method-assign]
    to_a = [b"\x40" + os.urandom(99) for _ in range(3)]
    to_b = [b"\x40" + os.urandom(99) for _ in range(2)]
    wrapped = [encode_relay(A, p) for p in to_a] + [encode_relay(b, p) for p in to_b]
    client.segmentsReceived(b"".join(wrapped), len(wrapped[0]), S)
    assert taken == [(A, to_a), (b, to_b)]


# --- relayed runs: read with UDP GRO, forwarded with UDP segmentation offload ----------------------



class RecordingSocket:
    """What the relay hands the kernel: single datagrams and segmented runs (split as the
    kernel would), or a refusal of segmentation."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, tuple[str, int], list[bytes]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.calls.append(("one", addr, [data]))
        return len(data)

    def sendmsg(self, buffers: list[bytes], ancdata: list, flags: int, addr: tuple[str, int]) -> int:
        if self.refuse:
            raise OSError(errno.EIO, "segmentation refused")
        ((level, kind, value),) = ancdata
        assert (level, kind) == (socket.SOL_UDP if hasattr(socket, "SOL_UDP") else 17, UDP_SEGMENT)
        size = struct.unpack("=H", value)[0]
        data = b"".join(buffers)
        self.calls.append(("run", addr, [data[i : i + size] for i in range(0, len(data), size)]))
        return len(data)

    def datagrams_to(self, addr: tuple[str, int]) -> list[bytes]:
        return [d for _, to, ds in self.calls if to == addr for d in ds]


class SocketTransport:
    def __init__(self, sock: RecordingSocket) -> None:
        self.socket = sock
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((data, addr))


def relay_with_socket(limit: int = 10 * 1024 * 1024, refuse: bool = False):
    clock = Clock()
    clock.advance(100)
    server = DiscoveryServer(clock, ServerConfig(relay_limit=limit))
    proto = DiscoveryDatagramProtocol(server)
    sock = RecordingSocket(refuse=refuse)
    proto.transport = SocketTransport(sock)
    server._remember_key(KEY, PeerAddress(*C), PeerAddress(*A))
    proto.datagramReceived(encode_datagram(DRelay(KEY)), C)
    assert proto.transport.written == [(encode_datagram(DRelayed(PeerAddress(*A))), C)]
    return clock, server, proto, sock


def packets(n: int, size: int = 1400, last: int = 600) -> list[bytes]:
    out = [os.urandom(size) for _ in range(n - 1)]
    return out + [os.urandom(last)]


def test_a_relayed_run_leaves_in_one_segmented_send_with_the_headers_swapped():
    clock, server, proto, sock = relay_with_socket()
    pkts = packets(20)
    wrapped = [encode_relay(A, p) for p in pkts]
    proto.segmentsReceived(b"".join(wrapped), len(wrapped[0]), C)
    assert [(kind, to, len(ds)) for kind, to, ds in sock.calls] == [("run", A, 20)]
    assert [decode_relay(d) for d in sock.datagrams_to(A)] == [(C, p) for p in pkts]
    assert server.relays.relayed_bytes == sum(map(len, pkts))
    assert proto.runs_relayed == 1 and proto.dropped == 0
    # And back: the agent's run reaches the client with the agent's address in front.
    back = packets(5, 1200, 1200)
    proto.segmentsReceived(b"".join(encode_relay(C, p) for p in back), len(encode_relay(C, back[0])), A)
    assert [decode_relay(d) for d in sock.datagrams_to(C)] == [(A, p) for p in back]


def test_a_long_run_is_split_within_the_kernels_limits():
    clock, server, proto, sock = relay_with_socket()
    pkts = packets(64, 1452 - 8, 1452 - 8)  # 64 x 1452 bytes wrapped: more than 65000 in one send
    proto.segmentsReceived(b"".join(encode_relay(A, p) for p in pkts), 1452, C)
    assert all(sum(map(len, ds)) <= 65000 and len(ds) <= 64 for _, _, ds in sock.calls)
    assert len(sock.calls) == 2
    assert [decode_relay(d)[1] for d in sock.datagrams_to(A)] == pkts


def test_a_run_mixing_peers_and_unauthorized_packets_keeps_order_and_drops_only_those():
    clock, server, proto, sock = relay_with_socket()
    b = ("198.51.100.12", 40002)  # an agent this client has no key for
    pkts = packets(6, 1000, 1000)
    wrapped = [encode_relay(b if i == 3 else A, p) for i, p in enumerate(pkts)]
    proto.segmentsReceived(b"".join(wrapped), 1000 + 8, C)
    assert [decode_relay(d)[1] for d in sock.datagrams_to(A)] == pkts[:3] + pkts[4:]
    assert sock.datagrams_to(b) == []
    assert proto.dropped == 1
    assert [(kind, len(ds)) for kind, _, ds in sock.calls] == [("run", 3), ("run", 2)]


def test_a_run_holding_two_connections_packets_leaves_as_two_runs():
    """A client's GSO batch through the relay may hold one connection's packets, then
    another's (two agents, each through the relay): each stretch is forwarded as a run of its
    own, none datagram by datagram (which cost the server 3.5x the CPU per byte)."""
    clock, server, proto, sock = relay_with_socket()
    b = ("198.51.100.12", 40002)
    server._remember_key("cd" * 16, PeerAddress(*C), PeerAddress(*b))
    proto.datagramReceived(encode_datagram(DRelay("cd" * 16)), C)
    to_a, to_b = packets(5, 1000, 1000), packets(7, 1000, 600)
    wrapped = [encode_relay(A, p) for p in to_a] + [encode_relay(b, p) for p in to_b]
    proto.segmentsReceived(b"".join(wrapped), 1000 + 8, C)
    assert [(kind, to, len(ds)) for kind, to, ds in sock.calls] == [("run", A, 5), ("run", b, 7)]
    assert [decode_relay(d) for d in sock.datagrams_to(A)] == [(C, p) for p in to_a]
    assert [decode_relay(d) for d in sock.datagrams_to(b)] == [(C, p) for p in to_b]
    assert proto.runs_relayed == 2 and proto.dropped == 0
    assert server.relays.relayed_bytes == sum(map(len, to_a + to_b))


def test_the_per_pair_limit_applies_packet_by_packet_within_a_run():
    clock, server, proto, sock = relay_with_socket(limit=10_000)  # burst: 256 KiB
    pkts = packets(300, 1000, 1000)
    proto.segmentsReceived(b"".join(encode_relay(A, p) for p in pkts), 1008, C)
    forwarded = [decode_relay(d)[1] for d in sock.datagrams_to(A)]
    assert len(forwarded) == 256 * 1024 // 1000
    assert forwarded == pkts[: len(forwarded)]  # the first ones, within the burst, in order
    assert proto.dropped == 300 - len(forwarded)
    assert server.relays.relayed_bytes == sum(map(len, forwarded))


def test_when_the_kernel_refuses_segmentation_datagrams_go_one_by_one_from_then_on():
    clock, server, proto, sock = relay_with_socket(refuse=True)
    pkts = packets(8)
    proto.segmentsReceived(b"".join(encode_relay(A, p) for p in pkts), 1408, C)
    assert [kind for kind, _, _ in sock.calls] == ["one"] * 8
    assert [decode_relay(d)[1] for d in sock.datagrams_to(A)] == pkts
    proto.segmentsReceived(b"".join(encode_relay(A, p) for p in pkts), 1408, C)
    assert [kind for kind, _, _ in sock.calls] == ["one"] * 16


def test_a_run_of_control_datagrams_is_answered_one_by_one():
    from dsss.wire.datagram import DPing, DPong

    clock, server, proto, sock = relay_with_socket()
    ping = encode_datagram(DPing("-"))
    proto.segmentsReceived(ping * 3, len(ping), C)
    assert proto.transport.written[1:] == [(encode_datagram(DPong(PeerAddress(*C))), C)] * 3


@pytest_twisted.ensureDeferred
async def test_real_sockets_a_gso_run_is_relayed_whole():
    """Over real loopback sockets: a client's segmented send of relayed packets reaches the
    server's GRO port in one read and leaves it as one segmented send; the agent's socket
    gets every packet, in order, from the server, with the client's address in front."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from dsss.endpoints import listen_udp
    from dsss.quic.batching import GroPort, send_run

    if not GroPort.usable(reactor):
        pytest.skip("UDP GRO needs Linux and a posix reactor")
    server = DiscoveryServer(reactor, ServerConfig())
    proto = DiscoveryDatagramProtocol(server)
    port = listen_udp(reactor, "127.0.0.1", 0, proto)
    s_addr = ("127.0.0.1", port.getHost().port)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    agent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind(("127.0.0.1", 0))
        agent.bind(("127.0.0.1", 0))
        agent.setblocking(False)
        c_addr, a_addr = client.getsockname(), agent.getsockname()
        server._remember_key(KEY, PeerAddress(*c_addr), PeerAddress(*a_addr))
        client.sendto(encode_datagram(DRelay(KEY)), s_addr)
        await deferLater(reactor, 0.2, lambda: None)
        pkts = [os.urandom(1400) for _ in range(30)]
        try:
            send_run(client, [encode_relay(a_addr, p) for p in pkts], s_addr)
        except OSError:
            pytest.skip("this kernel does not do UDP segmentation offload")
        got: list[bytes] = []
        for _ in range(50):
            await deferLater(reactor, 0.05, lambda: None)
            while True:
                try:
                    data, frm = agent.recvfrom(65535)
                except BlockingIOError:
                    break
                assert frm == s_addr
                got.append(data)
            if len(got) >= len(pkts):
                break
        assert [decode_relay(d) for d in got] == [(c_addr, p) for p in pkts]
        assert proto.runs_relayed >= 1
    finally:
        client.close()
        agent.close()
        await port.stopListening()


def test_control_datagrams_from_one_source_are_rate_limited():
    """The server answers at most a burst of 40 PINGs from one address, then 20 a second; other
    addresses are answered meanwhile (a flood from one source cannot make it reflect more)."""
    from dsss.wire.datagram import DPing

    clock = Clock()
    clock.advance(100)
    server = DiscoveryServer(clock, ServerConfig())
    proto = DiscoveryDatagramProtocol(server)
    proto.transport = SocketTransport(RecordingSocket())
    ping = encode_datagram(DPing("-"))
    flooder, other = ("10.7.0.1", 5000), ("10.7.0.2", 5000)
    for _ in range(100):
        proto.datagramReceived(ping, flooder)
    answered = [addr for _, addr in proto.transport.written]
    assert answered.count(flooder) == 40
    proto.datagramReceived(ping, other)
    assert [addr for _, addr in proto.transport.written].count(other) == 1
    clock.advance(1)
    for _ in range(100):
        proto.datagramReceived(ping, flooder)
    assert [addr for _, addr in proto.transport.written].count(flooder) == 60
