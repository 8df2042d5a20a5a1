"""The agent answering storage audits: AUDIT on the control channel (StringTransport, Clock) and
on QUIC streams (real QUIC on an in-memory datagram link), and the client's `PeerNetwork.audit`."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from dsss import proofs
from dsss.agent import service as agent_service
from dsss.agent.control import ServerConnectionFactory
from dsss.agent.service import AgentConfig, StorageAgent
from dsss.client.discovery import Introduction
from dsss.client.peer import PeerError, PeerNetwork
from dsss.errors import AccessDenied, NotFound
from dsss.model import PeerAddress, block_hash, share_id
from dsss.quic.testing import run_until
from dsss.wire import control as wc
from dsss.wire import transfer as wt
from tests.adapters.test_agent_transfer import AGENT, CLIENT, Rig

SESSION = "ab" * 16
TOKEN = "cd" * 16
LEAF = proofs.LEAF_SIZE
DATA = os.urandom(6 * LEAF + 100)
BLOCK = block_hash(DATA)


def nonce_for(index: int) -> bytes:
    return index.to_bytes(16, "big")


# --- the control channel ------------------------------------------------------------------------


class Deferring:
    """A run_blocking that holds each call until the test releases it: the reactor thread's
    view of reads running on the thread pool."""

    def __init__(self) -> None:
        self.calls: list[tuple[defer.Deferred[object], object, tuple[object, ...]]] = []

    def __call__(self, f: object, *args: object) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.calls.append((d, f, args))
        return d

    def release(self, i: int = 0) -> None:
        d, f, args = self.calls.pop(i)
        try:
            result = f(*args)  # type: ignore[operator]
        except Exception as e:  # noqa: BLE001 - handed to the Deferred as the pool would
            d.errback(e)
        else:
            d.callback(result)


@pytest.fixture
def agent(tmp_path):
    clock = Clock()
    clock.advance(50)
    a = StorageAgent(clock, AgentConfig(storage=str(tmp_path / "s"), capacity=10 * len(DATA)))
    a.store.put(BLOCK, DATA)
    return a


def registered(agent):
    proto = ServerConnectionFactory(agent).buildProtocol(None)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(f"Hi {SESSION}\nWELCOME {TOKEN} 1000 7000\n".encode())
    t.clear()
    return proto, t


def lines(t):
    out = t.value().decode().splitlines()
    t.clear()
    return out


def audit_line(block: str, nonce: bytes) -> bytes:
    return wc.encode(wc.Audit(block, nonce)) + b"\n"


@pytest.mark.parametrize("index", [0, 3, 6])
def test_answers_audit_with_a_proof_that_verifies(agent, index):
    proto, t = registered(agent)
    proto.dataReceived(audit_line(BLOCK, nonce_for(index)))
    (line,) = lines(t)
    reply = wc.parse_line(line.encode())
    assert isinstance(reply, wc.Proof) and reply.size == len(DATA)
    proofs.verify(BLOCK, reply.size, nonce_for(index), reply.proof)
    assert agent.audits_proven == 1 and agent.audits_in_progress == 0


def test_largest_part_proof_fits_the_line(tmp_path):
    clock = Clock()
    big = os.urandom(wt.MAX_PART)
    a = StorageAgent(clock, AgentConfig(storage=str(tmp_path / "big"), capacity=2 * wt.MAX_PART))
    a.store.put(block_hash(big), big)
    proto, t = registered(a)
    proto.dataReceived(audit_line(block_hash(big), nonce_for(1000)))
    raw = t.value()
    assert raw.endswith(b"\n") and wc.MAX_LINE < len(raw) - 1 <= wc.MAX_PROOF_LINE
    reply = wc.parse_line(raw[:-1])
    proofs.verify(block_hash(big), wt.MAX_PART, nonce_for(1000), reply.proof)


def test_audit_of_a_part_not_stored_is_not_found(agent):
    proto, t = registered(agent)
    proto.dataReceived(audit_line(block_hash(b"never stored"), nonce_for(0)))
    (line,) = lines(t)
    assert line.startswith("ERROR not-found")
    assert not proto.closed


def test_corrupt_copy_is_quarantined_reported_gone_and_not_found(agent):
    proto, t = registered(agent)
    path = agent.store.path_of(BLOCK)
    raw = bytearray(path.read_bytes())
    raw[2 * LEAF + 1] ^= 0xFF
    path.write_bytes(bytes(raw))
    proto.dataReceived(audit_line(BLOCK, nonce_for(2)))
    out = lines(t)
    assert out[0] == f"GONE {BLOCK}"
    assert [ln.split()[0] for ln in out[1:]] == ["SPACE", "ERROR"]
    assert out[2].startswith("ERROR not-found") and "corrupt" in out[2]
    assert not agent.store.has(BLOCK) and agent.audits_corrupt == 1
    assert [p.name.split(".")[0] for p in (agent.store.root / "quarantine").iterdir()] == [BLOCK]


def test_audits_run_off_the_reactor_thread_and_replies_keep_request_order(agent, monkeypatch):
    pool = Deferring()
    agent.run_blocking = pool
    other = b"another part"
    agent.store.put(share_id(other), other)
    proto, t = registered(agent)
    proto.dataReceived(audit_line(BLOCK, nonce_for(1)) + audit_line(share_id(other), nonce_for(0)) + b"PING\n")
    assert lines(t) == [] and len(pool.calls) == 2  # the reads are elsewhere; nothing sent yet
    pool.release(1)  # the second audit's read finishes first
    assert lines(t) == []
    pool.release(0)
    out = [wc.parse_line(ln.encode()) for ln in lines(t)]
    assert [type(m) for m in out] == [wc.Proof, wc.Proof, wc.Pong]
    assert out[0].size == len(DATA) and out[1].size == len(other)
    proofs.verify(share_id(other), out[1].size, nonce_for(0), out[1].proof)


def test_at_most_max_audits_at_once(agent):
    pool = Deferring()
    agent.run_blocking = pool
    proto, t = registered(agent)
    n = agent_service.MAX_AUDITS
    proto.dataReceived(b"".join(audit_line(BLOCK, nonce_for(i)) for i in range(n + 2)))
    assert len(pool.calls) == n
    assert lines(t) == []  # the busy replies wait behind the first n
    while pool.calls:
        pool.release()
    words = [ln.split()[0:2] for ln in lines(t)]
    assert words == [["PROOF", str(len(DATA))]] * n + [["ERROR", "busy"]] * 2
    # Room again.
    proto.dataReceived(audit_line(BLOCK, nonce_for(0)))
    pool.release()
    assert lines(t)[0].startswith("PROOF ")


def test_audit_before_registration_is_refused(agent):
    proto = ServerConnectionFactory(agent).buildProtocol(None)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(audit_line(BLOCK, nonce_for(0)))
    assert lines(t)[0].startswith("ERROR protocol")


# --- QUIC ---------------------------------------------------------------------------------------


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    r.agent.store.put(BLOCK, DATA)
    return r


def quic_audit(rig, key, block, nonce, addr=CLIENT):
    raw = rig.request(wt.encode_request(wt.Audit(key, block, nonce)), addr)
    line, _, body = raw.partition(b"\n")
    return wt.parse_reply(line), body


def test_quic_audit_answers_a_proof(rig):
    for index in (0, 5, 6):
        reply, body = quic_audit(rig, rig.key(BLOCK, 0), BLOCK, nonce_for(index))
        assert reply == wt.ProofReply(len(DATA), proofs.proof_length(len(DATA), index))
        proofs.verify(BLOCK, reply.size, nonce_for(index), body)
    assert rig.handler.audits == 3


def test_quic_audit_needs_a_download_key_for_that_part(rig):
    other = block_hash(b"x")
    for key in ("0" * 32, rig.key(BLOCK, len(DATA)), rig.key(other, 0)):
        reply, body = quic_audit(rig, key, BLOCK, nonce_for(0))
        assert isinstance(reply, wt.Refused) and reply.code == "denied" and body == b""
    key = rig.key(BLOCK, 0)
    assert isinstance(quic_audit(rig, key, BLOCK, nonce_for(0))[0], wt.ProofReply)
    assert quic_audit(rig, key, BLOCK, nonce_for(0))[0].code == "denied"  # single use


def test_quic_audit_of_a_part_not_stored(rig):
    missing = block_hash(b"missing")
    reply, _ = quic_audit(rig, rig.key(missing, 0), missing, nonce_for(0))
    assert isinstance(reply, wt.Refused) and reply.code == "not-found"


def test_quic_audit_with_a_body_is_refused(rig):
    header = wt.encode_request(wt.Audit(rig.key(BLOCK, 0), BLOCK, nonce_for(0)))
    reply = wt.parse_reply(rig.request(header + b"junk").partition(b"\n")[0])
    assert isinstance(reply, wt.Refused) and reply.code == "protocol"


# --- the client's audit ---------------------------------------------------------------------------


def client_audit(rig, peers, block, key, nonce=None):
    intro = Introduction(key, rig.agent.identity.agent_id, PeerAddress(*AGENT))
    results: list[object] = []
    d = defer.ensureDeferred(peers.audit(intro, block, nonce))
    d.addBoth(results.append)
    assert run_until(rig.clock, lambda: bool(results), timeout=30)
    return results[0]


@pytest.fixture
def peers(rig):
    p = PeerNetwork(rig.clock, ("127.0.0.9", 8471), use_relay=False)
    rig.link.attach(p.endpoint, CLIENT)
    return p


def test_client_audit_verifies_the_proof(rig, peers):
    assert client_audit(rig, peers, BLOCK, rig.key(BLOCK, 0)) == len(DATA)
    assert peers.audits_passed == 1


def test_client_audit_refused_when_not_stored(rig, peers):
    missing = block_hash(b"gone")
    result = client_audit(rig, peers, missing, rig.key(missing, 0))
    assert result.check(NotFound)
    result = client_audit(rig, peers, BLOCK, "0" * 32)
    assert result.check(AccessDenied)
    assert peers.audits_passed == 0


class LyingStream:
    """A test helper that answers every AUDIT stream with `reply` (a rogue holder)."""

    def __init__(self, reply):
        self.reply = reply

    def __call__(self, stream):
        stream.on_data = lambda chunk: None
        stream.on_end = lambda: stream.write(self.reply(), end=True)
        stream.on_error = lambda e: None


@pytest.mark.parametrize(
    "make",
    [
        # Bytes it does not have: a leaf of zeros with zero siblings, the right length.
        lambda n: b"Proof %d %d\n" % (len(DATA), n) + bytes(n),
        # The proof for another leaf.
        lambda n: b"Proof %d %d\n" % (len(DATA), n) + _proof_for(1),
        # A wrong size.
        lambda n: b"Proof %d %d\n" % (len(DATA) - 1, n) + _proof_for(0),
    ],
    ids=["zeros", "other-leaf", "wrong-size"],
)
def test_client_audit_refuses_a_bad_proof(rig, peers, make):
    n = proofs.proof_length(len(DATA), 0)
    rig.agent.quic._on_stream = LyingStream(lambda: make(n))
    result = client_audit(rig, peers, BLOCK, rig.key(BLOCK, 0), nonce_for(0))
    assert result.check(proofs.ProofError), result
    assert peers.audits_passed == 0


def test_client_audit_refuses_a_truncated_answer(rig, peers):
    rig.agent.quic._on_stream = LyingStream(lambda: b"Proof %d 100\n" % len(DATA) + bytes(99))
    result = client_audit(rig, peers, BLOCK, rig.key(BLOCK, 0), nonce_for(0))
    assert result.check(PeerError)


def _proof_for(index: int) -> bytes:
    ob = proofs.TreeHasher(DATA).outboard()
    start, end = proofs.leaf_range(len(DATA), index)
    sibs = [ob[p * 32 : p * 32 + 32] for p in proofs.sibling_nodes(len(DATA), index)]
    return proofs.prove(len(DATA), index, DATA[start:end], sibs)
