"""QUIC through the server's relay, on an in-memory link where the direct path is blocked."""

from __future__ import annotations

import os

from twisted.internet.task import Clock

from dsss.crypto.certs import make_certificate
from dsss.model import PeerAddress, block_hash
from dsss.quic import QuicEndpoint
from dsss.quic_testing import MemoryDatagramLink, run_until
from dsss.server.service import DiscoveryServer, ServerConfig
from dsss.server.udp import DiscoveryDatagramProtocol
from dsss.wire.datagram import DRelay, DRelayed, encode_datagram, parse_datagram

S = ("198.51.100.1", 8471)
A = ("198.51.100.11", 40001)
C = ("198.51.100.13", 50001)
KEY = "ab" * 16


def setup(limit=10 * 1024 * 1024):
    clock = Clock()
    clock.advance(100)
    link = MemoryDatagramLink(clock)
    # Symmetric NATs: the client and the agent never reach each other directly.
    link.filter = lambda data, src, dst: {src, dst} != {A, C}
    server = DiscoveryServer(clock, ServerConfig(relay_limit=limit))
    link.attach(DiscoveryDatagramProtocol(server), S)
    seed = os.urandom(32)
    received = []

    def on_stream(stream):
        chunks = []
        stream.on_data = chunks.append
        stream.on_end = lambda: (received.append(b"".join(chunks)), stream.write(block_hash(b"".join(chunks)).encode(), end=True))

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
    from dsss.wire.datagram import encode_relay

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
