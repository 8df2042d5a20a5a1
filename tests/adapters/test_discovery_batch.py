"""DiscoveryClient's batching of introductions, against the real API (StubTreq) and a Clock."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from dsss.client.discovery import MAX_INTRODUCTIONS, DiscoveryClient, Introduction
from dsss.errors import NotFound, Unavailable
from dsss.model import PeerAddress
from dsss.server.api import DiscoveryAPI
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from dsss.server.placement import NetworkRule
from tests.adapters.test_server_api import HASH, FakeAgent

ME = PeerAddress("127.0.0.1", 9999)

# These agents share 127.0.0.1 (or one NAT): the one-machine setting, each agent its own network.
ONE_MACHINE = NetworkRule.parse("off")


def make_server() -> DiscoveryServer:
    """A server on a clock, replicas 2, past the warm-up after a start (answers are final)."""
    clock = Clock()
    clock.advance(10)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0, replicas=2, distinct_networks=ONE_MACHINE), rng=random.Random(1))
    clock.advance(60)
    return server


@pytest.fixture
def server() -> DiscoveryServer:
    return make_server()


class CountingHTTP:
    """StubTreq, recording every path asked for; `hide_batch` plays an older server."""

    def __init__(self, stub: StubTreq, *, hide_batch: bool = False) -> None:
        self.stub = stub
        self.paths: list[str] = []
        self.hide_batch = hide_batch

    def get(self, url: str, **kw: Any) -> Any:
        kw.pop("reactor", None)
        kw.pop("timeout", None)
        path = url.split("//", 1)[1].split("/", 1)[1].split("?")[0]
        self.paths.append("/" + path)
        if self.hide_batch and path == "api/introduce-many":
            url = "http://server/api/no-such-endpoint"
        return self.stub.get(url, **kw)


def settle(server: Any, stub: StubTreq, agents: list[FakeAgent], replies: dict[int, str]) -> None:
    """Run the turn's flush, let the requests reach the agents, answer, and deliver."""
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    for i, line in replies.items():
        agents[i].reply(line)
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()


def outcomes(ds: list[defer.Deferred[Any]]) -> list[Any]:
    out: list[Any] = []
    for d in ds:
        box: list[Any] = []
        d.addBoth(box.append)
        assert box, "not answered"
        out.append(box[0].value if hasattr(box[0], "value") else box[0])
    return out


@pytest.mark.parametrize("hide_batch", [False, True], ids=["batched", "older-server"])
def test_introductions_of_one_turn_share_a_request(server: Any, hide_batch: bool) -> None:
    agents = [FakeAgent(server, 5000 + i) for i in range(3)]
    stub = StubTreq(DiscoveryAPI(server).resource())
    http = CountingHTTP(stub, hide_batch=hide_batch)
    client = DiscoveryClient("http://server", reactor=server.clock, http=http)
    ds = [defer.ensureDeferred(client.introduce_me(a.address, HASH, 100 + i, ME))
          for i, a in enumerate(agents)]
    assert http.paths == []  # nothing until the end of the turn
    settle(server, stub, agents, {0: "0123456789abcdef0123456789abcdef",
                                  1: "ERROR full no room",
                                  2: "fedcba9876543210fedcba9876543210"})
    first, full, third = outcomes(ds)
    assert isinstance(first, Introduction) and first.key == "0123456789abcdef0123456789abcdef"
    assert first.agent_id == agents[0].rec.agent_id and first.address == agents[0].address
    assert isinstance(third, Introduction) and third.address == agents[2].address
    # The refused one fails alone, with the error it would have had on its own.
    assert isinstance(full, Unavailable) and "refused: full" in str(full)
    if hide_batch:
        # One try of the batch (404), then one request each, and no more batches afterwards.
        assert http.paths == ["/api/introduce-many"] + ["/api/introduce-me"] * 3
        assert client.batch is False
    else:
        assert http.paths == ["/api/introduce-many"]


def test_one_introduction_alone_uses_introduce_me(server: Any) -> None:
    agents = [FakeAgent(server, 5100)]
    stub = StubTreq(DiscoveryAPI(server).resource())
    http = CountingHTTP(stub)
    client = DiscoveryClient("http://server", reactor=server.clock, http=http)
    d = defer.ensureDeferred(client.introduce_me(agents[0].address, HASH, 0, ME))
    settle(server, stub, agents, {0: "0123456789abcdef0123456789abcdef"})
    assert isinstance(outcomes([d])[0], Introduction) and http.paths == ["/api/introduce-me"]


def test_large_turns_are_split_and_unknown_agents_fail_alone(server: Any) -> None:
    agent = FakeAgent(server, 5200)
    stub = StubTreq(DiscoveryAPI(server).resource())
    http = CountingHTTP(stub)
    client = DiscoveryClient("http://server", reactor=server.clock, http=http)
    n = MAX_INTRODUCTIONS + 2
    ds = [defer.ensureDeferred(client.introduce_me(agent.address, HASH, 1, ME)) for _ in range(n)]
    gone = defer.ensureDeferred(client.introduce_me(PeerAddress("127.0.0.1", 5299), HASH, 1, ME))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    asked = agent.sent()
    assert len(asked) == n
    for _ in asked:
        agent.reply("0123456789abcdef0123456789abcdef")
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    assert http.paths == ["/api/introduce-many", "/api/introduce-many"]
    assert all(isinstance(x, Introduction) for x in outcomes(ds))
    err = outcomes([gone])[0]
    assert isinstance(err, NotFound) and "no live agent at 127.0.0.1:5299" in str(err)


@pytest.mark.parametrize("older", [False, True], ids=["upload-to", "older-server"])
def test_upload_to_places_and_introduces_or_says_it_cannot(server: Any, older: bool) -> None:
    agents = [FakeAgent(server, 5300 + i) for i in range(3)]
    stub = StubTreq(DiscoveryAPI(server).resource())
    http = CountingHTTP(stub)
    if older:
        real_get = http.get

        def get(url: str, **kw: Any) -> Any:
            if "/api/upload-to" in url:
                url = "http://server/api/no-such-endpoint"
            return real_get(url, **kw)

        http.get = get  # type: ignore[method-assign]
    client = DiscoveryClient("http://server", reactor=server.clock, http=http)
    d = defer.ensureDeferred(client.upload_to(HASH, 10, ME, copies=2, exclude=[agents[0].address]))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    if older:
        assert outcomes([d]) == [None] and client.combined_upload is False
        assert [a.sent() for a in agents] == [[], [], []]
        return
    assert [len(a.sent()) for a in agents] == [0, 1, 1]
    agents[1].reply("0123456789abcdef0123456789abcdef")
    agents[2].reply("ERROR full no room")
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    (picked,) = outcomes([d])
    by_address = dict(picked)
    assert set(by_address) == {agents[1].address, agents[2].address}
    intro = by_address[agents[1].address]
    assert isinstance(intro, Introduction) and intro.agent_id == agents[1].rec.agent_id
    assert isinstance(by_address[agents[2].address], Unavailable)
    assert http.paths == ["/api/upload-to"]


def upload_to_with_chain(server: Any, agents: list[FakeAgent]) -> tuple[dict[Any, list[str]], Any]:
    """An upload-to with chain=1 for two copies, each agent answering its introduction: what
    each agent was asked (by address) and what the client picked."""
    stub = StubTreq(DiscoveryAPI(server).resource())
    client = DiscoveryClient("http://server", reactor=server.clock, http=CountingHTTP(stub))
    d = defer.ensureDeferred(client.upload_to(HASH, 10, ME, copies=2, chain=True))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    asked = {a.address: a.sent() for a in agents}
    for a in agents:
        a.reply("0123456789abcdef0123456789abcdef")
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    (picked,) = outcomes([d])
    return asked, picked


def test_upload_to_a_chain_introduces_each_agent_to_the_one_before_it(server: Any) -> None:
    """With chain=1 the first agent's introduction is for the client, the next one's for the
    first agent (which passes the part on), and the client marks it as a chain hop."""
    asked, picked = upload_to_with_chain(server, [FakeAgent(server, 5400 + i) for i in range(2)])
    (first, intro0), (second, intro1) = picked
    assert asked[first] == [f"INTRODUCTION_REQUEST {ME} 10 {HASH}"]
    assert asked[second] == [f"INTRODUCTION_REQUEST {first} 10 {HASH}"]
    assert isinstance(intro0, Introduction) and not intro0.chained
    assert isinstance(intro1, Introduction) and intro1.chained and intro1.address == second


def test_no_chain_between_agents_behind_one_public_address(server: Any) -> None:
    """Agents that can only follow each other at one public IP address (behind one NAT) are
    not chained: every introduction is for the client, and the answer says no chain, so the
    uploader does not wait for forwards that would fail."""
    agents = [FakeAgent(server, 5400 + i, host="198.51.100.20") for i in range(2)]
    asked, picked = upload_to_with_chain(server, agents)
    assert list(asked.values()) == [[f"INTRODUCTION_REQUEST {ME} 10 {HASH}"]] * 2
    assert all(isinstance(intro, Introduction) and not intro.chained for _, intro in picked)


def test_agents_behind_one_nat_that_gave_local_addresses_chain_across_their_lan(server: Any) -> None:
    """Both agents at one public address said where they listen on their LAN (LOCAL): the
    second is introduced to the first's local address, and the client is told to have the part
    passed to the second's local address (`via`), while the agent is still named by its public
    one."""
    agents = [FakeAgent(server, 5400 + i, host="198.51.100.20") for i in range(2)]
    local = {}
    for i, a in enumerate(agents):
        a.reply(f"LOCAL 10.20.0.{2 + i}:8472")
        assert a.sent() == ["OK"]
        local[a.address] = f"10.20.0.{2 + i}:8472"
    asked, picked = upload_to_with_chain(server, agents)
    (first, intro0), (second, intro1) = picked
    assert asked[first] == [f"INTRODUCTION_REQUEST {ME} 10 {HASH}"]
    assert asked[second] == [f"INTRODUCTION_REQUEST {local[first]} 10 {HASH}"]
    assert isinstance(intro0, Introduction) and not intro0.chained and intro0.via is None
    assert isinstance(intro1, Introduction) and intro1.chained and intro1.address == second
    assert str(intro1.via) == local[second]
    assert server.stats["lan-hops"] == 1


def test_without_lan_1_agents_behind_one_nat_are_not_chained(server: Any) -> None:
    """A client that does not pass `via` on (from before LAN hops) gets no chain between
    agents at one public address, local addresses or not."""
    from tests.adapters.test_server_api import get

    agents = [FakeAgent(server, 5400 + i, host="198.51.100.20") for i in range(2)]
    for i, a in enumerate(agents):
        a.reply(f"LOCAL 10.20.0.{2 + i}:8472")
        a.sent()
    stub = StubTreq(DiscoveryAPI(server).resource())
    results = get(stub, f"/api/upload-to?size=10&hash={HASH}&from={ME}&chain=1")
    assert [a.sent() for a in agents] == [[f"INTRODUCTION_REQUEST {ME} 10 {HASH}"]] * 2
    for a in agents:
        a.reply("0123456789abcdef0123456789abcdef")
    server.clock.advance(0)
    stub.flush()
    code, body = results[0]
    doc = json.loads(body)
    assert code == 200 and "chain" not in doc and not any("via" in i for i in doc["introductions"])
    assert server.stats["lan-hops"] == 0
    bad = get(stub, f"/api/upload-to?size=10&hash={HASH}&from={ME}&chain=1&lan=yes")
    assert bad[0][0] == 400 and b"lan must be 0 or 1" in bad[0][1]


def test_a_chain_is_worth_trying_unless_a_hop_stays_at_one_public_address() -> None:
    from dsss.server.chains import chain_worth_trying

    a1, a2 = PeerAddress("198.51.100.11", 1), PeerAddress("198.51.100.11", 2)
    b1 = PeerAddress("198.51.100.12", 1)
    assert chain_worth_trying([a1, b1, a2]) and chain_worth_trying([a1]) and chain_worth_trying([])
    assert not chain_worth_trying([a1, a2]) and not chain_worth_trying([b1, a1, a2])
    lo = [PeerAddress("127.0.0.1", p) for p in (1, 2, 3)]  # one machine: agents reach each other
    assert chain_worth_trying(lo)


def test_chain_order_avoids_passing_a_part_between_agents_at_one_ip() -> None:
    from dsss.server.chains import chain_order

    a1, a2, a3 = (PeerAddress("198.51.100.11", p) for p in (1, 2, 3))
    b1, b2 = (PeerAddress("198.51.100.12", p) for p in (1, 2))
    for targets in ([a1, a2, b1], [a1, b1, a2], [b1, a1, a2]):
        order = chain_order(targets)
        assert sorted(order, key=str) == sorted(targets, key=str)
        assert all(x.host != y.host for x, y in zip(order, order[1:])), order
    order = chain_order([a1, a2, a3, b1, b2])
    assert all(x.host != y.host for x, y in zip(order, order[1:])), order
    # nothing to avoid: the placement's order is kept
    assert chain_order([a1, a2, a3]) == [a1, a2, a3]


HOME = "198.51.100.20"  # one NAT: the client and some agents behind it
ME_HOME = PeerAddress(HOME, 9999)
ME_LOCAL = PeerAddress("10.20.0.9", 7000)
KEY = "0123456789abcdef0123456789abcdef"


def home_agents(server: Any) -> tuple[FakeAgent, FakeAgent, FakeAgent]:
    """An agent behind the client's NAT that sent LOCAL, one there that did not, one elsewhere
    that did."""
    near = FakeAgent(server, 5400, host=HOME)
    near.reply("LOCAL 10.20.0.2:8472")
    old = FakeAgent(server, 5401, host=HOME)
    far = FakeAgent(server, 5402, host="198.51.100.30")
    far.reply("LOCAL 10.30.0.2:8472")
    for a in (near, old, far):
        a.sent()
    return near, old, far


@pytest.mark.parametrize("how", ["introduce-me", "introduce-many", "upload-to", "upload-shares"])
def test_a_client_behind_an_agents_nat_meets_it_across_their_lan(server: Any, how: str) -> None:
    """With the client's `local` address: the agent behind the client's NAT that told its own
    local address gives a key good from both of the client's addresses (INTRODUCTION_REQUEST
    with the local one), and the answer's `via` is where the client reaches it. Every other
    agent is introduced as before."""
    near, old, far = home_agents(server)
    server.replicas = 3
    stub = StubTreq(DiscoveryAPI(server).resource())
    client = DiscoveryClient("http://server", reactor=server.clock, http=CountingHTTP(stub, hide_batch=how == "introduce-me"))
    client.local_address = ME_LOCAL
    if how == "upload-to":
        ds = [defer.ensureDeferred(client.upload_to(HASH, 10, ME_HOME, copies=3))]
    elif how == "upload-shares":
        shares = ["s" + c * 64 for c in "abc"]
        ds = [defer.ensureDeferred(client.upload_shares(shares, 10, ME_HOME))]
    else:
        ds = [defer.ensureDeferred(client.introduce_me(a.address, HASH, 10, ME_HOME)) for a in (near, old, far)]
    settle(server, stub, [near, old, far], {0: KEY, 1: KEY, 2: KEY})
    if how.startswith("upload"):
        (picked,) = outcomes(ds)
        intros = dict(picked)
    else:
        intros = dict(zip((near.address, old.address, far.address), outcomes(ds)))
    assert str(intros[near.address].via) == "10.20.0.2:8472"
    assert intros[old.address].via is None and intros[far.address].via is None
    assert server.stats["lan-introductions"] == 1


def test_the_agents_are_asked_with_the_clients_local_address_only_across_a_lan(server: Any) -> None:
    near, old, far = home_agents(server)
    stub = StubTreq(DiscoveryAPI(server).resource())
    client = DiscoveryClient("http://server", reactor=server.clock, http=CountingHTTP(stub))
    client.local_address = ME_LOCAL
    for a in (near, old, far):
        defer.ensureDeferred(client.introduce_me(a.address, HASH, 10, ME_HOME))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    assert near.sent() == [f"INTRODUCTION_REQUEST {ME_HOME} 10 {HASH} {ME_LOCAL}"]
    assert old.sent() == [f"INTRODUCTION_REQUEST {ME_HOME} 10 {HASH}"]  # no LOCAL: an older agent
    assert far.sent() == [f"INTRODUCTION_REQUEST {ME_HOME} 10 {HASH}"]  # another NAT


def test_a_chain_starts_across_the_clients_lan(server: Any) -> None:
    """The client and one agent behind one NAT, another agent elsewhere: the chain begins with
    the agent across the client's LAN (its introduction has the client's local address too),
    then crosses to the other NAT."""
    near = FakeAgent(server, 5400, host=HOME)
    far = FakeAgent(server, 5402, host="198.51.100.30")
    near.reply("LOCAL 10.20.0.2:8472")
    far.reply("LOCAL 10.30.0.2:8472")
    for _ in range(5):  # whatever the placement's order
        near.sent(), far.sent()
        stub = StubTreq(DiscoveryAPI(server).resource())
        client = DiscoveryClient("http://server", reactor=server.clock, http=CountingHTTP(stub))
        client.local_address = ME_LOCAL
        d = defer.ensureDeferred(client.upload_to(HASH, 10, ME_HOME, copies=2, chain=True))
        settle(server, stub, [near, far], {0: KEY, 1: KEY})
        (picked,) = outcomes([d])
        assert [a for a, _ in picked] == [near.address, far.address]
        head, hop = picked[0][1], picked[1][1]
        assert str(head.via) == "10.20.0.2:8472" and not head.chained
        assert hop.chained and hop.via is None  # from one NAT to the other: the public address


def test_a_bad_local_address_is_refused(server: Any) -> None:
    from tests.adapters.test_server_api import get

    stub = StubTreq(DiscoveryAPI(server).resource())
    for bad in ("0.0.0.0:7000", "10.0.0.1", "[ff02::1]:7000", "x"):
        code, body = get(stub, f"/api/introduce-me?to=127.0.0.1:1&hash={HASH}&size=0&from={ME}&local={bad}")[0]
        assert code == 400, (bad, body)


@pytest.mark.parametrize("older", [False, True], ids=["auditing-server", "older-server"])
def test_audit_and_locate_against_the_real_api(server: Any, older: bool) -> None:
    from tests.adapters.test_server_audit import DATA, PART, audits, proof_line

    class Older(CountingHTTP):
        def get(self, url: str, **kw: Any) -> Any:
            if "/api/audit" in url:
                url = "http://server/api/no-such-endpoint"
            return super().get(url, **kw)

    stub = StubTreq(DiscoveryAPI(server).resource())
    http = (Older if older else CountingHTTP)(stub)
    client = DiscoveryClient("http://server", reactor=server.clock, http=http)
    holder, dropper = FakeAgent(server, 5001), FakeAgent(server, 5002)
    for a in (holder, dropper):
        a.reply(f"HAVE {PART}:{len(DATA)}")
        a.sent()
    d = defer.ensureDeferred(client.audit([(PART, holder.rec.agent_id), (PART, dropper.rec.agent_id)]))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    if not older:
        ((_, nonce),) = audits(holder)
        holder.reply(proof_line(DATA, nonce))
        assert audits(dropper)
        dropper.reply("ERROR not-found gone")
        for _ in range(3):
            stub.flush()
    (result,) = outcomes([d])
    if older:
        assert result is None and client.audits is False
        return
    assert [(r.agent, r.proven, r.size) for r in result] == [
        (holder.rec.agent_id, True, len(DATA)), (dropper.rec.agent_id, False, None)]
    assert result[1].error == "does not have it"
    d = defer.ensureDeferred(client.locate(PART))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    assert holder.sent() == [f"WHO_HAS {PART}"] and dropper.sent() == []  # its claim was dropped
    holder.reply("1")
    stub.flush()
    (located,) = outcomes([d])
    assert located == ([holder.address], [holder.address])


def test_audit_asks_again_while_the_server_warms_up_and_the_agent_re_registers() -> None:
    from tests.adapters.test_server_audit import DATA, PART, audits, proof_line

    clock = Clock()
    clock.advance(10)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0, replicas=2), rng=random.Random(1))
    assert server.warming()  # just (re)started
    stub = StubTreq(DiscoveryAPI(server).resource())
    client = DiscoveryClient("http://server", reactor=clock, http=CountingHTTP(stub))
    agent = FakeAgent(server, 5001)
    agent_id = agent.rec.agent_id
    server.registry.unregister(agent.proto)  # not re-registered yet
    d = defer.ensureDeferred(client.audit([(PART, agent_id)]))
    stub.flush()
    assert not d.called  # "agent not connected" while warming: asked again shortly
    rec, _ = server.registry.register(agent_id=agent_id, seq=2, capacity=10_000, free=10_000,
                                      version="1.0", handle=agent.proto, now=clock.seconds())
    agent.proto.record = rec
    server.registry.heard_udp(rec.token, agent.address, clock.seconds())
    clock.advance(0.5)
    stub.flush()
    ((_, nonce),) = audits(agent)
    agent.reply(proof_line(DATA, nonce))
    stub.flush()
    (result,) = outcomes([d])
    assert [(r.proven, r.size) for r in result] == [(True, len(DATA))]
