from __future__ import annotations

import random

import pytest

from dsss.model import PeerAddress
from dsss.server.placement import NetworkRule, Placer
from dsss.server.registry import Registry
from dsss.server.repair import Repairer, wanted_holders

B1, B2 = "aa" * 32, "bb" * 32


class Unvetted:
    def is_vetted(self, agent_id):
        return False

    def is_disqualified(self, agent_id):
        return False


class FakeConfig:
    query_timeout = 5.0
    proof_freshness = 1000.0


class FakeAuditor:
    """Answers the repairer's audits as told: per agent id, True (proves it) or False (fails:
    the claim is dropped, as the real auditor does)."""

    def __init__(self, server):
        self.server = server
        self.verdicts: dict[str, bool] = {}
        self.asked: list[tuple[str, str]] = []

    async def audit_now(self, rec, block, *, charge=False):
        self.asked.append((rec.agent_id, block))
        if self.verdicts.get(rec.agent_id, False):
            self.server.registry.proved(rec, block, 100, self.server.t)
        else:
            self.server.registry.gone(rec, [block])


class FakeServer:
    replicas = 3

    def __init__(self, networks="off"):
        self.registry = Registry(heartbeat=1.0)
        # "off": the agents here share public addresses (one NAT), each its own network.
        self.placer = Placer(NetworkRule.parse(networks), Unvetted(), rng=random.Random(5))
        self.t = 100.0
        self.config = FakeConfig()
        self.auditor = FakeAuditor(self)

    def now(self):
        return self.t


def prove(server, agents, blocks, size=100):
    for a in agents:
        for b in blocks:
            server.registry.proved(a, b, size, server.t)


def live_agent(server, n):
    rec, _ = server.registry.register(agent_id=f"{n:064x}", seq=1, capacity=10**6, free=10**6,
                                      version="1", handle=object(), now=server.t)
    server.registry.heard_udp(rec.token, PeerAddress("127.0.0.1", 4000 + n), server.t)
    return rec


def advance(server, seconds, agents):
    server.t += seconds
    for a in agents:
        if server.registry.get(a.agent_id) is a:
            server.registry.heard_tcp(a, server.t)
            server.registry.heard_udp(a.token, a.address, server.t)


def test_parts_short_for_long_enough_are_due_once():
    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    prove(server, agents, [B1])
    prove(server, agents[:1], [B2])  # B2 was only ever stored once... still short
    r = Repairer(server, repair_after=10)
    assert r.plan(server.t) == []  # B2 noticed short at t=100
    server.registry.unregister(agents[2].handle)  # B1 drops to two holders
    advance(server, 5, agents)
    assert r.plan(server.t) == []  # B1 noticed at t=105
    advance(server, 6, agents)
    assert r.plan(server.t) == [B2]  # t=111: B2 has been short for 11 s, B1 for 6 s
    r.last_try[B2] = server.t
    advance(server, 5, agents)
    assert r.plan(server.t) == [B1]  # t=116: B1 due; B2 tried 5 s ago, not yet again
    advance(server, 6, agents)
    assert sorted(r.plan(server.t)) == sorted([B1, B2])


def test_a_part_that_recovers_is_forgotten():
    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    prove(server, agents[:2], [B1])
    r = Repairer(server, repair_after=10)
    r.plan(server.t)
    assert B1 in r.short_since
    prove(server, agents[2:], [B1])
    advance(server, 20, agents)
    assert r.plan(server.t) == [] and r.short_since == {}


def test_lost_parts_are_not_repairable_and_in_flight_is_bounded():
    server = FakeServer()
    a = live_agent(server, 0)
    blocks = [f"{i:064x}" for i in range(20)]
    server.registry.have(a, blocks, [1] * 20)
    r = Repairer(server, repair_after=0, max_in_flight=4)
    assert len(r.plan(server.t)) == 4
    r.in_flight.update(blocks[:4])
    assert len(r.plan(server.t)) == 0
    server.registry.unregister(a.handle)  # no holder left: nothing to copy from
    r.in_flight.clear()
    assert r.plan(server.t) == []


S1, S2 = "s" + "cc" * 32, "s" + "aa" * 32  # shares of erasure-coded parts (S2 of B1's bytes)


def test_wanted_holders_is_one_for_a_share_and_the_replicas_for_a_plain_part():
    assert wanted_holders(B1, 3) == 3 and wanted_holders(B1, 1) == 1
    assert wanted_holders(S1, 3) == 1 and wanted_holders(S2, 5) == 1


def test_a_share_with_one_live_holder_is_never_copied_but_a_plain_part_is():
    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    prove(server, agents[:1], [S1, S2, B1])
    prove(server, agents[1:2], [S2])  # stored twice by mistake: still not short
    r = Repairer(server, repair_after=10)
    assert r.plan(server.t) == []
    for _ in range(3):
        advance(server, 11, agents)
        assert r.plan(server.t) == [B1]
        assert set(r.short_since) == {B1} and r.status()["short"] == 1
    server.registry.unregister(agents[1].handle)  # S2 down to one holder, B1 unchanged
    advance(server, 11, agents)
    assert r.plan(server.t) == [B1] and set(r.short_since) == {B1}


def test_repairing_a_share_does_nothing():
    from twisted.internet import defer

    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    server.registry.have(agents[0], [S1], [100])
    asked = []

    async def introduce(*args):
        asked.append(args)
        raise AssertionError("a share is never copied")

    server.introduce = introduce
    r = Repairer(server, repair_after=0)
    d = defer.ensureDeferred(r._repair(S1))
    assert d.called and asked == [] and r.started == 0 and r.failed == 0


class RecordingHandle:
    """An agent's control connection that answers every request OK, keeping what it was sent."""

    def __init__(self):
        self.sent = []

    def request(self, msg, timeout):
        from twisted.internet import defer

        from dsss.wire import control as wc

        self.sent.append(msg)
        return defer.succeed(wc.Ok())


@pytest.mark.parametrize("lan", [True, False], ids=["locals-reported", "no-locals"])
def test_a_copy_between_agents_behind_one_nat_goes_across_their_lan(lan):
    """Source and target at one public address: with their local addresses known, the target is
    introduced to the source's local address and the source sends to the target's; otherwise
    the public ones are used, as between any two agents."""
    from twisted.internet import defer

    server = FakeServer()
    agents = []
    for n in range(2):
        rec, _ = server.registry.register(agent_id=f"{n:064x}", seq=1, capacity=10**6, free=10**6,
                                          version="1", handle=RecordingHandle(), now=server.t)
        server.registry.heard_udp(rec.token, PeerAddress("198.51.100.20", 4000 + n), server.t)
        if lan:
            rec.local = PeerAddress(f"10.20.0.{2 + n}", 8472)
        agents.append(rec)
    source, target = agents
    prove(server, [source], [B1])
    asked = []

    async def introduce(to, client, size, block):
        asked.append((to, client, size, block))
        return {"introduction-key": "ab" * 16}

    server.introduce = introduce
    r = Repairer(server, repair_after=0)
    d = defer.ensureDeferred(r._repair(B1))
    assert d.called and r.started == 1 and r.failed == 0
    (replicate,) = source.handle.sent
    if lan:
        assert asked == [(target.address, source.local, 100, B1)]
        assert replicate.address == target.local
    else:
        assert asked == [(target.address, source.address, 100, B1)]
        assert replicate.address == target.address
    assert (replicate.block, replicate.agent_id, replicate.key) == (B1, target.agent_id, "ab" * 16)


def test_a_repair_copy_never_goes_to_a_holders_network():
    """With distinct networks (the default), the target is on a network no live holder is on,
    and with none such the part waits rather than doubling up on one network."""
    from twisted.internet import defer

    server = FakeServer(networks="24,48")
    hosts = ["192.0.2.1", "192.0.2.2", "198.51.100.1", "198.51.100.2"]
    recs = []
    for n, host in enumerate(hosts):
        rec, _ = server.registry.register(agent_id=f"{n:064x}", seq=1, capacity=10**6, free=10**6,
                                          version="1", handle=RecordingHandle(), now=server.t)
        server.registry.heard_udp(rec.token, PeerAddress(host, 4000 + n), server.t)
        recs.append(rec)
    prove(server, recs[:1], [B1])
    asked = []

    async def introduce(to, client, size, block):
        asked.append(to)
        return {"introduction-key": "ab" * 16}

    server.introduce = introduce
    r = Repairer(server, repair_after=0)
    for _ in range(20):
        d = defer.ensureDeferred(r._repair(B1))
        assert d.called
    assert asked and set(asked) <= {recs[2].address, recs[3].address}
    # Holders on both networks: no target, nothing asked.
    prove(server, recs[2:3], [B1])
    del asked[:]
    started = r.started
    d = defer.ensureDeferred(r._repair(B1))
    assert d.called and asked == [] and r.started == started


def test_claims_alone_are_short_and_true_claims_are_audited_not_copied():
    """Holders that claim a part without a fresh proof are audited first; when they prove it,
    nothing is copied."""
    from twisted.internet import defer

    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    prove(server, agents[:1], [B1])
    for a in agents[1:]:
        server.registry.have(a, [B1], [100])
    r = Repairer(server, repair_after=0)
    assert r.plan(server.t) == [B1]  # one proven replica, two claims
    server.auditor.verdicts = {a.agent_id: True for a in agents}

    async def introduce(*args):
        raise AssertionError("nothing is copied when the claims are true")

    server.introduce = introduce
    d = defer.ensureDeferred(r._repair(B1))
    assert d.called and r.started == 0
    assert sorted(server.auditor.asked) == sorted((a.agent_id, B1) for a in agents[1:])
    assert r.plan(server.t) == []


def test_a_lying_holder_is_audited_dropped_and_the_part_copied_from_a_proven_one():
    from twisted.internet import defer

    server = FakeServer()
    agents = []
    for n in range(4):
        rec, _ = server.registry.register(agent_id=f"{n:064x}", seq=1, capacity=10**6, free=10**6,
                                          version="1", handle=RecordingHandle(), now=server.t)
        server.registry.heard_udp(rec.token, PeerAddress("127.0.0.1", 4000 + n), server.t)
        agents.append(rec)
    honest, liar, other_honest, spare = agents
    prove(server, [honest, other_honest], [B1])
    server.registry.have(liar, [B1], [100])  # claims it, holds nothing
    asked = []

    async def introduce(to, client, size, block):
        asked.append((to, client, size, block))
        return {"introduction-key": "ab" * 16}

    server.introduce = introduce
    r = Repairer(server, repair_after=0)
    assert r.plan(server.t) == [B1]
    d = defer.ensureDeferred(r._repair(B1))
    assert d.called and r.started == 1
    assert server.auditor.asked == [(liar.agent_id, B1)]
    assert liar.agent_id not in server.registry.holders(B1)
    # Copied from a proven holder to the one agent that claims nothing.
    assert asked == [(spare.address, asked[0][1], 100, B1)]
    assert asked[0][1] in (honest.address, other_honest.address)


def test_a_part_whose_size_was_only_claimed_is_not_copied():
    from twisted.internet import defer

    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    server.registry.have(agents[0], [B1], [100])
    server.auditor.verdicts = {}  # its audit fails: nothing proven is left

    async def introduce(*args):
        raise AssertionError("never copied without a proven holder")

    server.introduce = introduce
    r = Repairer(server, repair_after=0)
    d = defer.ensureDeferred(r._repair(B1))
    assert d.called and r.started == 0 and server.registry.holders(B1) == set()


def test_each_plan_looks_at_a_bounded_slice_of_the_index(monkeypatch):
    """No tick walks the whole index: plan() takes PLAN_BATCH parts of a sweep at a time, and a
    short part is still noticed (and due) within one sweep."""
    import dsss.server.repair as repair

    monkeypatch.setattr(repair, "PLAN_BATCH", 10)
    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    blocks = [f"{i:064x}" for i in range(1, 46)]
    prove(server, agents, blocks)
    short = blocks[37]
    server.registry.gone(agents[2], [short])  # now two proven holders of three
    looked: list[int] = []
    real_holders = server.registry.holders

    def counting_holders(block):
        looked[-1] += 1
        return real_holders(block)

    server.registry.holders = counting_holders
    r = Repairer(server, repair_after=0)
    due = []
    for _ in range(5):  # 45 parts, 10 a call: one sweep
        looked.append(0)
        due += r.plan(server.t)
    assert max(looked) <= 10
    assert set(due) == {short}  # found within the sweep (and due until a tick tries it)


def test_parts_that_lost_a_holder_are_looked_at_before_the_sweep_and_every_tick_is_bounded():
    from dsss.server.repair import PLAN_BATCH

    server = FakeServer()
    agents = [live_agent(server, i) for i in range(3)]
    many = [f"{i:064x}" for i in range(3 * PLAN_BATCH)]
    for a in agents[:2]:
        server.registry.have(a, many, [1] * len(many))  # claimed twice: short, found by the sweep
    lost = [f"{i:063x}f" for i in range(10)]
    prove(server, agents, lost)
    r = Repairer(server, repair_after=10)
    server.registry.unregister(agents[2].handle)
    r.suspect(server.registry.drain(100))
    r.plan(server.t)
    # The ten parts that lost a holder are noticed on the first tick; the sweep has looked at
    # no more than one batch of the rest.
    assert set(lost) <= set(r.short_since)
    assert len(r.short_since) <= len(lost) + PLAN_BATCH
    for _ in range(3):
        r.plan(server.t)
    assert set(many) <= set(r.short_since)  # one sweep covers the whole index
