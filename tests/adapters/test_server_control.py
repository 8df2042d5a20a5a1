"""The server's control-channel adapter on a StringTransport, with a Clock."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from dsss.server.control import AgentConnectionFactory
from dsss.wire import control as wc

HASH = "cd" * 32


class Peer:
    def __init__(self, server):
        self.server = server
        self.proto = AgentConnectionFactory(server).buildProtocol(None)
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.proto
        self.proto.makeConnection(self.transport)

    def lines(self):
        out = self.transport.value().decode().splitlines()
        self.transport.clear()
        return out

    def feed(self, data: bytes, chunk: int | None = None):
        if chunk is None:
            self.proto.dataReceived(data)
        else:
            for i in range(0, len(data), chunk):
                self.proto.dataReceived(data[i : i + chunk])

    @property
    def closed(self):
        return not self.transport.connected


def register(peer, key=None, seq=1, chunk=None):
    key = key or SigningKey.generate()
    greeting = peer.lines()
    assert len(greeting) == 1 and greeting[0].startswith("Hi ")
    session = greeting[0].split()[1]
    msg = wc.Register(key.verify_key.encode().hex(), seq, 1000, 900, "1.0", "")
    sig = key.sign(msg.signed_bytes(session)).signature.hex()
    msg = wc.Register(**{**msg.__dict__, "signature": sig})
    peer.feed(wc.encode(msg) + b"\n", chunk)
    return key


@pytest.fixture
def server():
    clock = Clock()
    clock.advance(100)
    return DiscoveryServer(clock, ServerConfig(heartbeat=1.0, udp_port=9999))


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_registration_in_any_chunking(server, chunk):
    peer = Peer(server)
    key = register(peer, chunk=chunk)
    reply = peer.lines()
    assert len(reply) == 1
    welcome = wc.parse_line(reply[0].encode())
    assert isinstance(welcome, wc.Welcome) and welcome.udp_port == 9999 and welcome.heartbeat == 1.0
    rec = server.registry.get(key.verify_key.encode().hex())
    assert rec is not None and rec.capacity == 1000 and rec.free == 900


def test_bad_signature_is_refused_and_closed(server):
    peer = Peer(server)
    session = peer.lines()[0].split()[1]
    key, other = SigningKey.generate(), SigningKey.generate()
    msg = wc.Register(key.verify_key.encode().hex(), 1, 10, 10, "1.0", "")
    sig = other.sign(msg.signed_bytes(session)).signature.hex()
    peer.feed(wc.encode(wc.Register(**{**msg.__dict__, "signature": sig})) + b"\n")
    assert peer.lines()[0].startswith("ERROR denied")
    assert peer.closed and len(server.registry) == 0


def test_signature_for_another_session_is_refused(server):
    peer = Peer(server)
    peer.lines()
    key = SigningKey.generate()
    msg = wc.Register(key.verify_key.encode().hex(), 1, 10, 10, "1.0", "")
    sig = key.sign(msg.signed_bytes("0" * 32)).signature.hex()  # replayed from elsewhere
    peer.feed(wc.encode(wc.Register(**{**msg.__dict__, "signature": sig})) + b"\n")
    assert peer.lines()[0].startswith("ERROR denied") and peer.closed


def test_replayed_sequence_number_is_refused(server):
    key = SigningKey.generate()
    first = Peer(server)
    register(first, key, seq=5)
    assert first.lines()[0].startswith("WELCOME")
    again = Peer(server)
    register(again, key, seq=5)
    assert again.lines()[0].startswith("ERROR replay") and again.closed
    # A newer registration replaces the old connection.
    newer = Peer(server)
    register(newer, key, seq=6)
    assert newer.lines()[0].startswith("WELCOME")
    assert first.closed and not newer.closed
    assert server.registry.get(key.verify_key.encode().hex()).handle is newer.proto


def test_requests_before_registration_close_the_connection(server):
    peer = Peer(server)
    peer.lines()
    peer.feed(b"HAVE " + HASH.encode() + b"\n")
    assert peer.lines()[0].startswith("ERROR not-registered") and peer.closed


def test_oversized_line_is_cut_off(server):
    peer = Peer(server)
    peer.lines()
    peer.feed(b"A" * (wc.MAX_LINE + 100), chunk=1000)
    assert peer.lines()[0].startswith("ERROR too-long") and peer.closed


def test_registered_agent_reports_and_bad_lines(server):
    peer = Peer(server)
    key = register(peer)
    peer.lines()
    rec = server.registry.get(key.verify_key.encode().hex())
    peer.feed(b"HAVE " + HASH.encode() + b"\nSPACE 2000 1500\nPING\n")
    assert peer.lines() == ["OK", "OK", "PONG"]
    assert rec.blocks == {HASH} and (rec.capacity, rec.free) == (2000, 1500)
    peer.feed(b"HAVE nothex\n")
    assert peer.lines()[0].startswith("ERROR protocol")
    assert not peer.closed  # a registered agent gets an error, not a hang-up, for one bad line
    peer.feed(b"GONE " + HASH.encode() + b"\n")
    assert peer.lines() == ["OK"] and rec.blocks == set()


def test_local_address_is_recorded_for_lan_hops(server):
    """LOCAL: where the agent listens on its own network; a bad one is refused and changes
    nothing, and only a registered agent may say it."""
    unregistered = Peer(server)
    unregistered.lines()
    unregistered.feed(b"LOCAL 10.4.0.2:8472\n")
    assert unregistered.lines()[0].startswith("ERROR not-registered") and unregistered.closed
    peer = Peer(server)
    key = register(peer)
    peer.lines()
    rec = server.registry.get(key.verify_key.encode().hex())
    assert rec.local is None
    peer.feed(b"LOCAL 10.4.0.2:8472\n")
    assert peer.lines() == ["OK"] and str(rec.local) == "10.4.0.2:8472"
    for bad in (b"LOCAL 0.0.0.0:8472", b"LOCAL 10.4.0.3", b"LOCAL 10.4.0.3:1 10.4.0.4:1"):
        peer.feed(bad + b"\n")
        assert peer.lines()[0].startswith("ERROR protocol") and not peer.closed
    assert str(rec.local) == "10.4.0.2:8472"


def test_who_has_is_asked_and_times_out(server):
    peer = Peer(server)
    key = register(peer)
    peer.lines()
    rec = server.registry.get(key.verify_key.encode().hex())
    from dsss.model import PeerAddress

    server.registry.heard_udp(rec.token, PeerAddress("127.0.0.1", 4000), server.clock.seconds())
    server.registry.have(rec, [HASH])
    results = []
    from twisted.internet import defer

    d = defer.ensureDeferred(server.who_has(HASH))
    d.addCallback(results.append)
    assert peer.lines() == [f"WHO_HAS {HASH}"]
    peer.feed(b"1\n")
    assert results == [[PeerAddress("127.0.0.1", 4000)]]

    d = defer.ensureDeferred(server.who_has(HASH))
    d.addCallback(results.append)
    assert peer.lines() == [f"WHO_HAS {HASH}"]
    server.clock.advance(server.config.query_timeout + 0.1)
    assert results[-1] == []  # a silent agent is left out, not waited on
    peer.feed(b"1\n")  # the late reply is matched to its request and dropped
    assert not peer.closed

    d = defer.ensureDeferred(server.who_has(HASH))
    d.addCallback(results.append)
    peer.lines()
    peer.feed(b"0\n")
    assert results[-1] == []
    assert rec.blocks == set()  # the index forgets what the agent denies


def test_silent_agent_is_dropped_after_three_heartbeats(server):
    peer = Peer(server)
    register(peer)
    peer.lines()
    for _ in range(4):
        server.clock.advance(1.0)
        server.tick()
    assert peer.closed and len(server.registry) == 0


def test_an_agent_cannot_grow_the_index_without_bound(server, monkeypatch):
    import dsss.server.control as control

    monkeypatch.setattr(control, "MAX_PARTS_PER_AGENT", 3)
    peer = Peer(server)
    key = register(peer)
    peer.lines()
    hashes = [f"{i:02x}" * 32 for i in range(4)]
    peer.feed(("HAVE " + " ".join(hashes[:3]) + "\n").encode())
    peer.feed(("HAVE " + hashes[3] + "\n").encode())
    assert peer.lines() == ["OK", "ERROR too-many at most 3 parts per agent are indexed"]
    assert len(server.registry.get(key.verify_key.encode().hex()).blocks) == 3
    assert not peer.closed


def _audit(server, peer):
    """Register the peer, have the server send it an AUDIT, and return the reply's Deferred."""
    register(peer)
    peer.lines()
    d = peer.proto.request(wc.Audit(HASH, bytes(range(16))), 30)
    assert peer.lines() == [f"AUDIT {HASH} {bytes(range(16)).hex()}"]
    return d


@pytest.mark.parametrize("chunk", [None, 1, 1000])
def test_long_proof_reply_in_any_chunking(server, chunk):
    """A PROOF reply longer than every other line (the largest part's proof) arrives whole,
    even one byte at a time."""
    from dsss import proofs

    peer = Peer(server)
    d = _audit(server, peer)
    size = 16 * 1024 * 1024
    raw = bytes(range(256)) * (proofs.proof_length(size, 0) // 256 + 1)
    raw = raw[: proofs.proof_length(size, 0)]
    line = wc.encode(wc.Proof(size, raw)) + b"\r\n"
    assert len(line) > wc.MAX_LINE + 2
    peer.feed(line, chunk)
    assert d.called and d.result == wc.Proof(size, raw)
    assert not peer.closed


def test_proof_reply_over_its_limit_is_cut_off(server):
    peer = Peer(server)
    d = _audit(server, peer)
    d.addErrback(lambda f: None)
    peer.feed(b"PROOF 5 " + b"A" * wc.MAX_PROOF_LINE + b"\n", chunk=4096)
    assert peer.lines()[0].startswith("ERROR too-long") and peer.closed


def test_other_line_between_limits_is_too_long(server):
    """Only PROOF may pass MAX_LINE: a HAVE line of 5000 bytes is still too long."""
    peer = Peer(server)
    register(peer)
    peer.lines()
    peer.feed(b"HAVE " + b"a" * 5000 + b"\n")
    assert peer.lines()[0].startswith("ERROR too-long") and peer.closed


def test_malformed_proof_reply_closes_without_answer(server):
    peer = Peer(server)
    d = _audit(server, peer)
    d.addErrback(lambda f: None)
    peer.feed(b"PROOF 5 not*base64\n")
    assert peer.lines() == [] and peer.closed


def test_agent_may_not_send_audit(server):
    peer = Peer(server)
    register(peer)
    peer.lines()
    peer.feed(f"AUDIT {HASH} {'00' * 16}\n".encode())
    assert peer.lines()[0].startswith("ERROR protocol")
