"""The server's audits through its real control protocol and HTTP API, on a Clock: agents
whose replies the test writes, with real proofs (dsss.proofs) or wrong ones."""

from __future__ import annotations

import base64
import itertools
import random

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dsss import proofs
from dsss.proofs import HASH_SIZE, TreeHasher
from dsss.server.api import DiscoveryAPI
from dsss.server.auditor import AUDIT_TICK
from dsss.server.reputation import DISQUALIFY_MIN_STRIKES
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from tests.adapters.test_server_api import FakeAgent, decoded, get

DATA = random.Random(7).randbytes(50_000)
PART = proofs.address(DATA)
OTHER = proofs.address(b"other bytes")


def honest_proof(data: bytes, nonce: bytes) -> bytes:
    size = len(data)
    index = proofs.challenge_index(size, nonce)
    start, end = proofs.leaf_range(size, index)
    outboard = TreeHasher(data).outboard()
    sibs = [outboard[p * HASH_SIZE : (p + 1) * HASH_SIZE] for p in proofs.sibling_nodes(size, index)]
    return proofs.prove(size, index, data[start:end], sibs)


def proof_line(data: bytes, nonce: bytes, size: int | None = None) -> str:
    proof = honest_proof(data, nonce)
    return f"PROOF {len(data) if size is None else size} {base64.b64encode(proof).decode()}"


@pytest.fixture
def server():
    clock = Clock()
    clock.advance(10)
    counter = itertools.count(1)
    config = ServerConfig(heartbeat=5.0, replicas=2, audit_rate=1000, proof_freshness=100)
    server = DiscoveryServer(clock, config, rng=random.Random(1))
    server.auditor.nonces = lambda: next(counter).to_bytes(16, "big")
    server.auditor.scheduler.nonces = server.auditor.nonces
    clock.advance(60)
    return server


def audits(agent) -> list[tuple[str, bytes]]:
    """The AUDIT lines the agent was sent: (hash, nonce)."""
    out = []
    for line in agent.sent():
        verb, *args = line.split()
        assert verb == "AUDIT", line
        out.append((args[0], bytes.fromhex(args[1])))
    return out


def tick(server):
    server.clock.advance(AUDIT_TICK)
    server.auditor.tick()


def test_a_new_claim_is_audited_and_a_good_proof_makes_it_a_replica(server):
    agent = FakeAgent(server, 4001)
    agent.reply(f"HAVE {PART}:{len(DATA)}")
    assert agent.sent() == ["OK"]
    tick(server)
    ((block, nonce),) = audits(agent)
    assert block == PART
    agent.reply(proof_line(DATA, nonce))
    now = server.now()
    assert server.registry.proven_holders(PART, now, 100) == [agent.rec]
    assert server.registry.size_proven(PART)
    assert server.reputation.get(agent.rec.agent_id).audits_passed == 1
    # who-has says so
    treq = StubTreq(DiscoveryAPI(server).resource())
    results = get(treq, f"/api/who-has?q={PART}")
    assert agent.sent() == [f"WHO_HAS {PART}"]
    agent.reply("1")
    treq.flush()
    assert decoded(results) == (200, {"addresses": ["127.0.0.1:4001"], "proven": ["127.0.0.1:4001"]})


@pytest.mark.parametrize("answer", ["wrong-proof", "not-found", "other-size"])
def test_a_failed_audit_drops_the_claim_and_strikes(server, answer):
    agent = FakeAgent(server, 4001)
    agent.reply(f"HAVE {PART}:{len(DATA)}")
    agent.sent()
    tick(server)
    ((_, nonce),) = audits(agent)
    if answer == "wrong-proof":
        agent.reply(proof_line(DATA, nonce[::-1]) if nonce != nonce[::-1] else proof_line(DATA, b"\x09" * 16))
    elif answer == "not-found":
        agent.reply("ERROR not-found no such part")
    else:
        agent.reply(proof_line(DATA[:-1], nonce, size=len(DATA) - 1))
    assert server.registry.holders(PART) == set()
    rep = server.reputation.get(agent.rec.agent_id)
    assert rep.audits_failed == 1 and rep.audits_passed == 0


def test_an_agent_that_keeps_half_is_disqualified_and_dropped(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    liar = FakeAgent(server, 4001)
    blocks = [proofs.address(bytes([i]) * 1000) for i in range(2 * DISQUALIFY_MIN_STRIKES)]
    liar.reply("HAVE " + " ".join(f"{b}:1000" for b in blocks))
    liar.sent()
    agent_id = liar.rec.agent_id
    for _ in range(len(blocks)):
        tick(server)
        ((block, nonce),) = audits(liar)
        index = blocks.index(block)
        if index % 2 == 0:
            liar.reply(proof_line(bytes([index]) * 1000, nonce))
        else:
            liar.reply("ERROR not-found gone")
        if server.reputation.is_disqualified(agent_id):
            break
    assert server.reputation.is_disqualified(agent_id)
    assert liar.proto.closed
    assert server.registry.get(agent_id) is None
    assert all(server.registry.holders(b) == set() for b in blocks)
    code, doc = decoded(get(treq, "/api/status"))
    entry = [a for a in doc["agents"] if a["id"] == agent_id]
    assert entry == []  # not listed: not registered (and not an agent that may come back)
    assert doc["audit"]["disqualified"] == 1


def test_a_disqualified_identity_cannot_register_again(server):
    from nacl.signing import SigningKey
    from twisted.internet.testing import StringTransportWithDisconnection

    from dsss.server.control import AgentConnectionFactory
    from dsss.wire import control as wc

    key = SigningKey.generate()
    agent_id = key.verify_key.encode().hex()
    server.reputation.disqualify(agent_id, server.now())
    proto = AgentConnectionFactory(server).buildProtocol(None)
    t = StringTransportWithDisconnection()
    t.protocol = proto
    proto.makeConnection(t)
    session = t.value().decode().split()[1]
    t.clear()
    msg = wc.Register(agent_id, 7, 1000, 1000, "1.0", "")
    sig = key.sign(msg.signed_bytes(session)).signature.hex()
    proto.dataReceived(wc.encode(wc.Register(**{**msg.__dict__, "signature": sig})) + b"\n")
    assert t.value().decode().startswith("ERROR disqualified ")
    assert proto.record is None and server.registry.get(agent_id) is None and proto.closed


def test_a_claim_against_a_proven_size_is_a_strike_and_changes_nothing(server):
    honest, liar = FakeAgent(server, 4001), FakeAgent(server, 4002)
    honest.reply(f"HAVE {PART}:{len(DATA)}")
    honest.sent()
    tick(server)
    ((_, nonce),) = audits(honest)
    honest.reply(proof_line(DATA, nonce))
    liar.reply(f"HAVE {PART}:7 {OTHER}:11")
    assert liar.sent()[0].startswith("ERROR size-conflict ")
    assert server.registry.size_of(PART) == len(DATA)
    assert server.registry.holders(PART) == {honest.rec.agent_id}
    assert server.registry.holders(OTHER) == {liar.rec.agent_id}  # the rest of the line counts
    assert server.reputation.get(liar.rec.agent_id).audits_failed == 1


def next_audit(server, agent):
    """Run the schedule (up to one sweep round's period) until the agent is sent an AUDIT."""
    for _ in range(int(server.config.proof_freshness)):
        server.clock.advance(1.0)
        server.auditor.tick()
        sent = audits(agent)
        if sent:
            return sent
    raise AssertionError("no audit came")


def test_busy_is_not_held_against_an_agent_but_silence_is(server):
    agent = FakeAgent(server, 4001)
    agent.reply(f"HAVE {PART}:{len(DATA)}")
    agent.sent()
    for _ in range(5):
        next_audit(server, agent)
        agent.reply("ERROR busy too many audits at once")
    rep = server.reputation.get(agent.rec.agent_id)
    assert rep.audits_failed == 0 and rep.unanswered == 0
    assert server.registry.holders(PART) == {agent.rec.agent_id}
    for _ in range(3):  # three audits in a row left unanswered: a strike, the claim dropped
        next_audit(server, agent)
        server.clock.advance(server.config.query_timeout + 0.01)
    assert rep.audits_failed == 1
    assert server.registry.holders(PART) == set()


def test_api_audit_proves_named_holders_now(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    holder, dropper = FakeAgent(server, 4001), FakeAgent(server, 4002)
    for a in (holder, dropper):
        a.reply(f"HAVE {PART}:{len(DATA)}")
        a.sent()
    url = f"/api/audit?i={PART},{holder.rec.agent_id}&i={PART},{dropper.rec.agent_id}&i={PART},{'9' * 64}"
    results = get(treq, url)
    ((_, nonce),) = audits(holder)
    holder.reply(proof_line(DATA, nonce))
    assert audits(dropper)
    dropper.reply("ERROR not-found no such part")
    treq.flush()
    code, doc = decoded(results)
    assert code == 200
    r1, r2, r3 = doc["results"]
    assert r1 == {"hash": PART, "agent": holder.rec.agent_id, "proven": True, "size": len(DATA)}
    assert r2["proven"] is False and r2["size"] is None and r2["error"] == "does not have it"
    assert r3["proven"] is False and r3["error"] == "agent not connected"
    assert server.registry.holders(PART) == {holder.rec.agent_id}
    # A pass of the last few seconds is answered without asking again.
    results = get(treq, f"/api/audit?i={PART},{holder.rec.agent_id}")
    treq.flush()
    assert holder.sent() == [] and decoded(results)[1]["results"][0]["proven"] is True


def test_api_audit_of_a_part_never_claimed_is_no_strike(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agent = FakeAgent(server, 4001)
    results = get(treq, f"/api/audit?i={OTHER},{agent.rec.agent_id}")
    assert audits(agent)
    agent.reply("ERROR not-found no such part")
    treq.flush()
    assert decoded(results)[1]["results"][0]["proven"] is False
    assert server.reputation.get(agent.rec.agent_id).audits_failed == 0


@pytest.mark.parametrize("query,why", [
    ("", "missing parameter 'i'"),
    (f"i={PART}", "HASH,AGENTID"),
    (f"i={PART},xyz", "HASH,AGENTID"),
    (f"i=nothex,{'a' * 64}", "hash"),
    (f"i={PART},{'a' * 64}&i={PART},{'a' * 64}", "more than once"),
    ("&".join(f"i={PART},{i:064x}" for i in range(65)), "at most 64"),
])
def test_api_audit_refuses_bad_requests_and_asks_nobody(server, query, why):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agent = FakeAgent(server, 4001)
    code, doc = decoded(get(treq, "/api/audit?" + query))
    assert code == 400 and why in doc["error"]
    assert agent.sent() == []


def test_api_audit_costs_one_request_plus_one_per_item(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    server.http_limiter.rate = server.http_limiter.burst = 10
    items = "&".join(f"i={PART},{i:064x}" for i in range(9))  # costs 10
    assert decoded(get(treq, "/api/audit?" + items))[0] == 200
    assert decoded(get(treq, "/api/audit?" + items))[0] == 429


def test_audits_of_one_claim_at_once_share_one_challenge(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agent = FakeAgent(server, 4001)
    agent.reply(f"HAVE {PART}:{len(DATA)}")
    agent.sent()
    tick(server)  # the scheduler's audit of the new claim is under way
    ((_, nonce),) = audits(agent)
    first = get(treq, f"/api/audit?i={PART},{agent.rec.agent_id}")
    second = get(treq, f"/api/audit?i={PART},{agent.rec.agent_id}")
    assert audits(agent) == []  # no second challenge
    agent.reply(proof_line(DATA, nonce))
    treq.flush()
    for results in (first, second):
        assert decoded(results)[1]["results"][0]["proven"] is True
