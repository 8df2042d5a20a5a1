"""The Klein HTTP API through treq's StubTreq, against a real DiscoveryServer on a Clock."""

from __future__ import annotations

import json
import random

import pytest
from nacl.signing import SigningKey
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from dsss.model import PeerAddress
from dsss.server.api import DiscoveryAPI
from dsss.server.control import AgentConnectionFactory
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from dsss.server.placement import NetworkRule
from dsss.wire import control as wc

HASH = "ef" * 32

# These agents share 127.0.0.1 (or one NAT): the one-machine setting, each agent its own network.
ONE_MACHINE = NetworkRule.parse("off")


class FakeAgent:
    """A registered agent connection whose replies the test writes."""

    def __init__(self, server, port, free=10_000, host="127.0.0.1", source=None):
        # `source`: where the control connection comes from (None: not an IP connection).
        peer = None if source is None else IPv4Address("TCP", source, 40000 + port)
        self.proto = AgentConnectionFactory(server).buildProtocol(peer)
        self.t = StringTransportWithDisconnection()
        self.t.protocol = self.proto
        self.proto.makeConnection(self.t)
        session = self.t.value().decode().split()[1]
        self.t.clear()
        key = SigningKey.generate()
        msg = wc.Register(key.verify_key.encode().hex(), 1, free, free, "1.0", "")
        sig = key.sign(msg.signed_bytes(session)).signature.hex()
        self.proto.dataReceived(wc.encode(wc.Register(**{**msg.__dict__, "signature": sig})) + b"\n")
        self.t.clear()
        self.rec = self.proto.record
        self.address = PeerAddress(host, port)
        server.registry.heard_udp(self.rec.token, self.address, server.clock.seconds())

    def sent(self):
        out = self.t.value().decode().splitlines()
        self.t.clear()
        return out

    def reply(self, line):
        self.proto.dataReceived(line.encode() + b"\n")


@pytest.fixture
def server():
    clock = Clock()
    clock.advance(10)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0, replicas=2, distinct_networks=ONE_MACHINE), rng=random.Random(1))
    clock.advance(60)  # past the warm-up after a start, when answers are final
    return server


def get(treq, url):
    from twisted.internet import defer

    results = []
    d = treq.get("http://server" + url)
    d.addCallback(lambda r: defer.gatherResults([defer.succeed(r.code), r.content()]))
    d.addBoth(results.append)
    treq.flush()
    return results


def decoded(results):
    code, body = results[0]
    return code, json.loads(body)


def test_where_to_upload_needs_live_agents_with_room(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    code, doc = decoded(get(treq, "/api/where-to-upload?size=100"))
    assert code == 503 and "error" in doc
    for port, free in ((4001, 10_000), (4002, 10_000), (4003, 50)):
        FakeAgent(server, port, free=free)
    code, doc = decoded(get(treq, "/api/where-to-upload?size=100"))
    assert code == 200 and doc["replicas"] == 2
    assert sorted(doc["addresses"]) == ["127.0.0.1:4001", "127.0.0.1:4002"]
    code, doc = decoded(get(treq, "/api/where-to-upload?size=100&exclude=127.0.0.1:4001"))
    assert doc["addresses"] == ["127.0.0.1:4002"]


def test_where_to_upload_puts_one_copy_per_network_by_default():
    """The default server (distinct networks, /24): agents on one /24 get one copy between
    them, and a request that only excluded networks could answer gets the networks error."""
    clock = Clock()
    clock.advance(10)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0, replicas=3), rng=random.Random(2))
    clock.advance(60)
    treq = StubTreq(DiscoveryAPI(server).resource())
    same = [FakeAgent(server, 4001 + i, host=f"192.0.2.{1 + i}") for i in range(3)]
    other = FakeAgent(server, 4100, host="198.51.100.7")
    for _ in range(20):
        code, doc = decoded(get(treq, "/api/where-to-upload?size=100"))
        assert code == 200 and len(doc["addresses"]) == 2, doc
        assert str(other.address) in doc["addresses"]
        assert sum(1 for a in same if str(a.address) in doc["addresses"]) == 1
    code, doc = decoded(get(treq, f"/api/where-to-upload?size=100&exclude={same[0].address},{other.address}"))
    assert code == 503 and doc == {"error": "too few agents (have 4, need 5)", "code": "too-few-agents"}, doc
    code, doc = decoded(get(treq, f"/api/where-to-upload?size=100&count=2&exclude={same[0].address},{other.address}"))
    assert code == 503 and doc["error"].startswith("too few distinct networks (have 2, need 4)"), doc
    assert doc["code"] == "networks"
    code, doc = decoded(get(treq, f"/api/where-to-upload?size=100000&exclude={same[0].address}"))
    assert code == 503 and doc["error"] == "no live agent has room for 100000 bytes"
    # upload-to counts the copies it is asked for.
    code, doc = decoded(get(treq, f"/api/upload-to?size=100&hash={HASH}&from=127.0.0.1:9999&copies=1"
                                  f"&exclude={same[1].address},{other.address}"))
    assert code == 503 and doc["error"].startswith("too few distinct networks (have 2, need 3)"), doc


def test_who_has_asks_only_indexed_candidates(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agents = [FakeAgent(server, 4000 + i) for i in range(5)]
    server.registry.have(agents[1].rec, [HASH])
    server.registry.have(agents[3].rec, [HASH])
    results = get(treq, f"/api/who-has?q={HASH}")
    assert results == []  # waiting on the agents
    asked = [i for i, a in enumerate(agents) if a.sent() == [f"WHO_HAS {HASH}"]]
    assert asked == [1, 3]
    agents[1].reply("1")
    agents[3].reply("0")
    treq.flush()
    code, doc = decoded(results)
    assert code == 200 and doc == {"addresses": ["127.0.0.1:4001"], "proven": []}


def test_introduce_me_relays_the_agents_key(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agent = FakeAgent(server, 4500)
    results = get(treq, f"/api/introduce-me?to=127.0.0.1:4500&hash={HASH}&size=77&from=127.0.0.1:9999")
    assert agent.sent() == [f"INTRODUCTION_REQUEST 127.0.0.1:9999 77 {HASH}"]
    agent.reply("0123456789abcdef0123456789abcdef")
    treq.flush()
    code, doc = decoded(results)
    assert code == 200
    assert doc["introduction-key"] == "0123456789abcdef0123456789abcdef"
    assert doc["agent"] == agent.rec.agent_id and doc["address"] == "127.0.0.1:4500"

    results = get(treq, f"/api/introduce-me?to=127.0.0.1:4500&hash={HASH}&size=77&from=127.0.0.1:9999")
    agent.reply("ERROR full no room")
    treq.flush()
    assert decoded(results)[0] == 503

    results = get(treq, f"/api/introduce-me?to=127.0.0.1:4500&hash={HASH}&size=77&from=127.0.0.1:9999")
    server.clock.advance(server.config.query_timeout + 0.1)
    treq.flush()
    assert decoded(results)[0] == 504  # the agent did not answer in time


def test_introduce_many_asks_every_agent_at_once_and_answers_each(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agents = [FakeAgent(server, 4800 + i) for i in range(3)]
    items = "".join(f"&i=127.0.0.1:{4800 + i},{HASH},{77 + i}" for i in range(3))
    results = get(treq, f"/api/introduce-many?from=127.0.0.1:9999{items}&i=127.0.0.1:4899,{HASH},1")
    # Every agent is asked before any answers; each key is bound to its own agent, hash, size
    # and the caller's address, exactly as with introduce-me.
    for i, a in enumerate(agents):
        assert a.sent() == [f"INTRODUCTION_REQUEST 127.0.0.1:9999 {77 + i} {HASH}"]
    agents[0].reply("0123456789abcdef0123456789abcdef")
    agents[1].reply("ERROR full no room")
    assert results == []
    server.clock.advance(server.config.query_timeout + 0.1)  # agent 2 never answers
    treq.flush()
    code, doc = decoded(results)
    assert code == 200
    first, full, late, unknown = doc["introductions"]
    assert first == {"introduction-key": "0123456789abcdef0123456789abcdef",
                     "agent": agents[0].rec.agent_id, "address": "127.0.0.1:4800"}
    assert full["status"] == 503 and "refused: full" in full["error"]
    assert late["status"] == 504 and unknown == {"error": "no live agent at 127.0.0.1:4899", "status": 404}


def test_introduce_many_costs_one_request_per_introduction(server):
    server.http_limiter.rate, server.http_limiter.burst = 0.0, 10.0
    treq = StubTreq(DiscoveryAPI(server).resource())
    FakeAgent(server, 4900)
    items = f"&i=127.0.0.1:4901,{HASH},1" * 6
    code, doc = decoded(get(treq, f"/api/introduce-many?from=127.0.0.1:1{items}"))
    assert code == 200 and len(doc["introductions"]) == 6
    code, doc = decoded(get(treq, f"/api/introduce-many?from=127.0.0.1:1{items}"))
    assert code == 429  # 6 + 6 > a burst of 10


def test_upload_to_places_and_introduces_in_one_request(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    url = f"/api/upload-to?size=77&hash={HASH}&from=127.0.0.1:9999"
    code, doc = decoded(get(treq, url))
    assert code == 503 and doc == {"error": "too few agents (have 0, need 2)", "code": "too-few-agents"}
    agents = {4950 + i: FakeAgent(server, 4950 + i) for i in range(3)}
    results = get(treq, url + "&exclude=127.0.0.1:4950")
    asked = {port: a.sent() for port, a in agents.items()}
    # The two other agents (replicas 2) are asked, each for a key bound to this hash, size and
    # caller, exactly as introduce-me would ask.
    assert asked == {4950: [], 4951: [f"INTRODUCTION_REQUEST 127.0.0.1:9999 77 {HASH}"],
                     4952: [f"INTRODUCTION_REQUEST 127.0.0.1:9999 77 {HASH}"]}
    agents[4951].reply("0123456789abcdef0123456789abcdef")
    agents[4952].reply("ERROR full no room")
    treq.flush()
    code, doc = decoded(results)
    assert code == 200 and doc["replicas"] == 2
    ok, full = sorted(doc["introductions"], key=lambda a: a["address"])
    assert ok == {"introduction-key": "0123456789abcdef0123456789abcdef",
                  "agent": agents[4951].rec.agent_id, "address": "127.0.0.1:4951"}
    assert full["address"] == "127.0.0.1:4952" and full["status"] == 503 and "refused: full" in full["error"]

    results = get(treq, url + "&copies=1")
    assert sum(len(a.sent()) for a in agents.values()) == 1  # one agent asked


def test_upload_to_costs_a_where_to_upload_and_each_introduction(server):
    server.http_limiter.rate, server.http_limiter.burst = 0.0, 5.0
    treq = StubTreq(DiscoveryAPI(server).resource())
    url = f"/api/upload-to?size=77&hash={HASH}&from=127.0.0.1:9999&copies=1"
    assert decoded(get(treq, url))[0] == 503  # no agent: 2 tokens spent
    assert decoded(get(treq, url))[0] == 503
    assert decoded(get(treq, url))[0] == 429  # 2 + 2 + 2 > 5


def test_dead_agent_is_unknown_and_left_out(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agent = FakeAgent(server, 4600)
    server.clock.advance(3 * server.heartbeat + 0.1)
    code, _ = decoded(get(treq, "/api/where-to-upload?size=1"))
    assert code == 503
    code, _ = decoded(get(treq, f"/api/introduce-me?to=127.0.0.1:4600&hash={HASH}&size=1&from=127.0.0.1:1"))
    assert code == 404
    assert agent.sent() == []


@pytest.mark.parametrize(
    "url",
    [
        "/api/who-has",
        "/api/who-has?q=../../etc/passwd",
        "/api/who-has?q=" + "A" * 64,
        f"/api/who-has?q={HASH}&q={HASH}",
        "/api/where-to-upload?size=1e3",
        "/api/where-to-upload?size=" + "9" * 30,
        "/api/where-to-upload?size=1&exclude=bogus",
        f"/api/introduce-me?to=127.0.0.1&hash={HASH}&size=1&from=127.0.0.1:1",
        f"/api/introduce-me?to=127.0.0.1:1&hash={HASH}&size=x&from=127.0.0.1:1",
        f"/api/introduce-me?to=127.0.0.1:1&hash={HASH}&size=1&from=::1",
        "/api/where-to-upload?size=%ff",
        f"/api/where-to-upload?size={16 * 1024 * 1024 + 1}",
        "/api/introduce-many?from=127.0.0.1:1",
        f"/api/introduce-many?i=127.0.0.1:1,{HASH},1",
        f"/api/introduce-many?from=127.0.0.1:1&i=127.0.0.1:1,{HASH}",
        f"/api/introduce-many?from=127.0.0.1:1&i=127.0.0.1:1,{HASH},1,2",
        f"/api/introduce-many?from=127.0.0.1:1&i=127.0.0.1,{HASH},1",
        f"/api/introduce-many?from=127.0.0.1:1&i=127.0.0.1:1,{HASH.upper()},1",
        f"/api/introduce-many?from=127.0.0.1:1&i=127.0.0.1:1,{HASH},-1",
        f"/api/introduce-many?from=127.0.0.1:1&i=127.0.0.1:1,{HASH},{16 * 1024 * 1024 + 1}",
        f"/api/introduce-many?from=127.0.0.1:1&from=127.0.0.1:2&i=127.0.0.1:1,{HASH},1",
        "/api/introduce-many?from=127.0.0.1:1" + f"&i=127.0.0.1:1,{HASH},1" * 17,
        "/api/upload-to?size=1&from=127.0.0.1:1",
        f"/api/upload-to?hash={HASH}&from=127.0.0.1:1",
        f"/api/upload-to?size=1&hash={HASH}",
        f"/api/upload-to?size=1&hash={HASH}&from=127.0.0.1:1&copies=0",
        f"/api/upload-to?size=1&hash={HASH}&from=127.0.0.1:1&copies=3",  # more than the replicas
        f"/api/upload-to?size=1&hash={HASH}&from=127.0.0.1:1&copies=x",
        f"/api/upload-to?size=1&hash={HASH}&from=127.0.0.1:1&copies=1&copies=1",
        f"/api/upload-to?size=1&hash={HASH}&from=127.0.0.1:1&exclude=bogus",
        f"/api/upload-to?size={16 * 1024 * 1024 + 1}&hash={HASH}&from=127.0.0.1:1",
    ],
)
def test_bad_parameters_are_400_with_an_error(server, url):
    treq = StubTreq(DiscoveryAPI(server).resource())
    code, doc = decoded(get(treq, url))
    assert code == 400 and isinstance(doc["error"], str)


def test_info_and_status(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    FakeAgent(server, 4700)
    code, info = decoded(get(treq, "/api/info"))
    assert code == 200 and info["replicas"] == 2 and "udp-port" in info
    code, status = decoded(get(treq, "/api/status"))
    assert status["totals"]["live"] == 1 and status["agents"][0]["address"] == "127.0.0.1:4700"


def test_unknown_paths_and_methods_are_json_errors_not_500(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    code, doc = decoded(get(treq, "/nope"))
    assert code == 404 and doc["error"]
    results = []
    d = treq.post("http://server/api/info", data=b"")
    d.addCallback(lambda r: results.append(r.code))
    treq.flush()
    assert results == [405]


def test_answers_say_when_they_are_not_final_yet():
    clock = Clock()
    server = DiscoveryServer(clock, ServerConfig(heartbeat=1.0, replicas=2, distinct_networks=ONE_MACHINE))
    treq = StubTreq(DiscoveryAPI(server).resource())
    code, doc = decoded(get(treq, f"/api/who-has?q={HASH}"))
    assert (code, doc) == (200, {"addresses": [], "proven": [], "warming": True})
    results = []
    d = treq.get("http://server/api/where-to-upload?size=1")
    d.addCallback(lambda r: results.append((r.code, r.headers.getRawHeaders(b"retry-after"))))
    treq.flush()
    assert results == [(503, [b"1"])]
    clock.advance(10)
    code, doc = decoded(get(treq, f"/api/who-has?q={HASH}"))
    assert (code, doc) == (200, {"addresses": [], "proven": []})


def _agent_from(server, host: str, port: int) -> FakeAgent:
    """A FakeAgent whose control connection comes from `host`."""
    return FakeAgent(server, port, host=host, source=host)


def _have(agent, blocks) -> str:
    agent.proto.dataReceived(b"HAVE " + " ".join(blocks).encode() + b"\n")
    return agent.sent()[-1]


def test_identities_on_one_network_share_one_bound_on_what_they_index():
    clock = Clock()
    clock.advance(10)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0, claims_per_network=60), rng=random.Random(1))
    blocks = [f"{i:064x}" for i in range(200)]
    a, b = _agent_from(server, "10.1.2.3", 1), _agent_from(server, "10.1.2.77", 2)
    other = _agent_from(server, "10.9.9.9", 3)
    assert _have(a, blocks[:40]) == "OK"
    assert _have(b, blocks[40:80]).startswith("ERROR too-many at most 60 parts are indexed for agents on 10.1.2.0/24")
    assert len(server.registry.holders(blocks[50])) == 0  # nothing of the refused line was indexed
    assert _have(b, blocks[40:60]) == "OK"  # within what is left
    assert _have(other, blocks[100:148]) == "OK"  # another network has its own bound
    a.proto.dataReceived(b"GONE " + " ".join(blocks[:30]).encode() + b"\n")
    assert a.sent()[-1] == "OK"
    assert _have(b, blocks[60:90]) == "OK"  # room given back by GONE
    b.t.loseConnection()
    assert server.claims_by_network["10.1.2.0/24"] == 10  # a's remaining claims
    assert _have(_agent_from(server, "10.1.2.5", 4), blocks[150:198]) == "OK"
