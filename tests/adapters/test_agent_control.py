"""The agent's control-channel adapter on a StringTransport, with a Clock."""

from __future__ import annotations

import pytest
from nacl.signing import VerifyKey
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from dsss.agent.control import ServerConnectionFactory
from dsss.agent.service import AgentConfig, StorageAgent
from dsss.holdings import Holdings
from dsss.model import block_hash
from dsss.wire import control as wc

SESSION = "ab" * 16
TOKEN = "cd" * 16


@pytest.fixture
def agent(tmp_path):
    clock = Clock()
    clock.advance(50)
    a = StorageAgent(clock, AgentConfig(storage=str(tmp_path / "s"), capacity=10_000))
    a.store.put(block_hash(b"one"), b"one")
    return a


def connect(agent):
    proto = ServerConnectionFactory(agent).buildProtocol(None)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    return proto, t


def lines(t):
    out = t.value().decode().splitlines()
    t.clear()
    return out


def test_registers_signed_then_reports_what_it_stores(agent):
    proto, t = connect(agent)
    proto.dataReceived(f"Hi {SESSION}\n".encode())
    (line,) = lines(t)
    msg = wc.parse_line(line.encode())
    assert isinstance(msg, wc.Register)
    VerifyKey(bytes.fromhex(msg.agent_id)).verify(msg.signed_bytes(SESSION), bytes.fromhex(msg.signature))
    assert msg.agent_id == agent.identity.agent_id and msg.capacity == 10_000
    proto.dataReceived(f"WELCOME {TOKEN} 1000 7000\n".encode())
    (digest,) = lines(t)
    assert wc.parse_line(digest.encode()) == wc.Digest("", Holdings([block_hash(b"one")]).digest(""))
    # A server that does not know DIGEST gets every part, as before.
    proto.dataReceived(b"ERROR protocol unknown command: 'DIGEST'\n")
    assert lines(t) == [f"HAVE {block_hash(b'one')}:3", f"SPACE 10000 {agent.store.free}"]
    assert agent.welcome.udp_port == 7000


def _welcomed(agent, parts):
    for i in range(parts):
        agent.store.put(block_hash(b"p%d" % i), b"p%d" % i)
    proto, t = connect(agent)
    proto.dataReceived(f"Hi {SESSION}\nWELCOME {TOKEN} 1000 7000\n".encode())
    sent = lines(t)
    assert sent[0].startswith("REGISTER ") and sent[1].startswith("DIGEST - ")
    return proto, t


def test_a_matching_digest_sends_no_part(agent):
    proto, t = _welcomed(agent, 40)
    proto.dataReceived(b"DIFF\n")
    assert lines(t) == ["SYNCED"]


def test_only_the_parts_under_differing_prefixes_are_sent(agent):
    proto, t = _welcomed(agent, 40)
    holdings = Holdings(agent.store.blocks())
    one, two = [d for d in "0123456789abcdef" if holdings.count(d)][:2]
    proto.dataReceived(f"DIFF {one} {two}-\n".encode())
    assert lines(t) == [f"RESEND {one}"]
    proto.dataReceived(b"OK\n")
    sent = lines(t)
    under = set(holdings.under(one).values())
    assert under
    assert {b.split(":")[0] for line in sent if line.startswith("HAVE ") for b in line.split()[1:]} == under
    proto.dataReceived(b"OK\n" * len(sent))
    assert lines(t) == [f"RESEND {two}"]
    proto.dataReceived(b"OK\n")
    sent = lines(t)
    assert {b.split(":")[0] for line in sent if line.startswith("HAVE ") for b in line.split()[1:]} == set(
        holdings.under(two).values())
    proto.dataReceived(b"OK\n" * len(sent))
    assert lines(t) == ["SYNCED"]


def test_a_large_differing_prefix_is_narrowed_by_a_deeper_digest(agent, monkeypatch):
    monkeypatch.setattr("dsss.agent.control.RESEND_AT", 4)
    proto, t = _welcomed(agent, 60)
    holdings = Holdings(agent.store.blocks())
    top = max("0123456789abcdef", key=holdings.count)
    assert holdings.count(top) > 4
    proto.dataReceived(f"DIFF {top}\n".encode())
    (deeper,) = lines(t)
    assert wc.parse_line(deeper.encode()) == wc.Digest(top, holdings.digest(top))
    proto.dataReceived(b"DIFF\n")  # everything under it matches after all
    assert lines(t) == ["SYNCED"]


def test_sequence_numbers_increase_across_registrations(agent):
    seqs = []
    for _ in range(3):
        proto, t = connect(agent)
        proto.dataReceived(f"Hi {SESSION}\n".encode())
        seqs.append(wc.parse_line(lines(t)[0].encode()).seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


def test_answers_who_has_introductions_and_ping(agent):
    proto, t = connect(agent)
    proto.dataReceived(f"Hi {SESSION}\nWELCOME {TOKEN} 1000 7000\n".encode())
    lines(t)
    stored, missing = block_hash(b"one"), block_hash(b"two")
    proto.dataReceived(f"WHO_HAS {stored}\nWHO_HAS {missing}\nPING\n".encode())
    assert lines(t) == ["1", "0", "PONG"]
    proto.dataReceived(f"INTRODUCTION_REQUEST 127.0.0.1:5555 100 {missing}\n".encode())
    (key,) = lines(t)
    assert len(key) == 32 and len(agent.introductions) == 1
    # No room: an error reply, and no key.
    proto.dataReceived(f"INTRODUCTION_REQUEST 127.0.0.1:5555 {10**9} {missing}\n".encode())
    out = lines(t)
    # The refusal, and at once a SPACE report so that placement stops choosing this agent.
    assert [ln.split()[0] for ln in out] == ["SPACE", "ERROR"], out
    assert out[1].startswith("ERROR full")
    assert len(agent.introductions) == 1


def test_server_that_stops_answering_pings_is_dropped(agent):
    proto, t = connect(agent)
    proto.dataReceived(f"Hi {SESSION}\nWELCOME {TOKEN} 1000 7000\n".encode())
    lines(t)
    for _ in range(5):
        agent.clock.advance(1.0)
    assert "PING" in lines(t)
    assert not t.connected and agent.connection is None


def test_refused_registration_closes(agent):
    proto, t = connect(agent)
    proto.dataReceived(f"Hi {SESSION}\n".encode())
    lines(t)
    proto.dataReceived(b"ERROR denied not allowed\n")
    assert not t.connected


class BoundQuic:
    """What the agent asks of its QUIC endpoint for LOCAL: a socket and the address it is bound to."""

    transport = object()

    def __init__(self, host, port):
        self.address = (host, port)

    def trust_relay(self, address):
        pass

    sent = None

    def send_control(self, data, address):
        if self.sent is not None:
            self.sent.append(address)


@pytest.mark.parametrize("bound,expected", [
    ("0.0.0.0", "10.4.0.2:8472"),  # every interface: the one towards the server
    ("10.4.0.9", "10.4.0.9:8472"),  # one address: that one
])
def test_tells_the_server_where_it_listens_on_its_lan(agent, bound, expected):
    agent.quic = BoundQuic(bound, 8472)
    proto = ServerConnectionFactory(agent).buildProtocol(None)
    t = StringTransportWithDisconnection(hostAddress=IPv4Address("TCP", "10.4.0.2", 51000))
    t.protocol = proto
    proto.makeConnection(t)
    proto.dataReceived(f"Hi {SESSION}\n".encode())
    lines(t)
    proto.dataReceived(f"WELCOME {TOKEN} 1000 7000\n".encode())
    sent = lines(t)
    assert sent[0].startswith("DIGEST - ") and sent[1:] == [f"LOCAL {expected}"]
    # A server from before LOCAL refuses it: the agent carries on (no LAN hops, nothing else).
    proto.dataReceived(b"DIFF\nERROR protocol unknown command: 'LOCAL'\n")
    assert lines(t) == ["SYNCED"]
    proto.dataReceived(b"OK\n")
    assert t.connected and agent.connection is proto
    proto.dataReceived(b"PING\n")
    assert lines(t) == ["PONG"]


def test_no_local_address_without_a_socket(agent):
    proto, t = connect(agent)
    proto.dataReceived(f"Hi {SESSION}\nWELCOME {TOKEN} 1000 7000\n".encode())
    assert not any(line.startswith("LOCAL") for line in lines(t))


def test_an_introduction_for_a_client_on_our_lan_punches_towards_both_its_addresses(agent):
    agent.quic = BoundQuic("0.0.0.0", 8472)
    agent.quic.sent = []
    proto, t = connect(agent)
    proto.dataReceived(f"Hi {SESSION}\nWELCOME {TOKEN} 1000 7000\n".encode())
    lines(t)
    agent.quic.sent.clear()
    missing = block_hash(b"two")
    proto.dataReceived(f"INTRODUCTION_REQUEST 198.51.100.20:9999 100 {missing} 10.20.0.9:7000\n".encode())
    (key,) = lines(t)
    (intro,) = agent.introductions._keys.values()
    assert intro.key == key and str(intro.client) == "198.51.100.20:9999" and str(intro.local) == "10.20.0.9:7000"
    agent.clock.advance(2.0)
    assert {("198.51.100.20", 9999), ("10.20.0.9", 7000)} <= set(agent.quic.sent)
