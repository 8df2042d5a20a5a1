# -*- test-case-name: tests.unit.test_registry -*-
"""Tests for L{dsss.server.registry}: agents, liveness, the location index and placement."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from dsss.errors import AccessDenied
from dsss.model import PeerAddress
from dsss.server.registry import LIVENESS_FACTOR, AgentRecord, Registry, ReplayError

HB = 10.0  # heartbeat
LIMIT = LIVENESS_FACTOR * HB
H1 = "1" * 64
H2 = "2" * 64
H3 = "3" * 64


def agent_id(n: int) -> str:
    return f"{n:064x}"


def addr(n: int) -> PeerAddress:
    return PeerAddress("192.0.2.1", 10_000 + n)


class Handle:
    """Stands in for a control connection."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Handle({self.name})"


@pytest.fixture
def registry() -> Registry:
    counter = itertools.count()
    return Registry(HB, token_source=lambda: f"token{next(counter)}")


def register(
    reg: Registry,
    n: int = 1,
    *,
    seq: int = 1,
    capacity: int = 1000,
    free: int | None = None,
    handle: Any = None,
    now: float = 0.0,
) -> tuple[AgentRecord, Any]:
    return reg.register(
        agent_id=agent_id(n),
        seq=seq,
        capacity=capacity,
        free=capacity if free is None else free,
        version="0.1.0",
        handle=handle if handle is not None else Handle(f"h{n}"),
        now=now,
    )


def live_agent(reg: Registry, n: int, *, now: float = 0.0, **kw: Any) -> AgentRecord:
    rec, _ = register(reg, n, now=now, **kw)
    assert reg.heard_udp(rec.token, addr(n), now) is rec
    return rec


# --- membership -------------------------------------------------------------------------------


def test_register(registry: Registry) -> None:
    h = Handle("a")
    rec, old = register(registry, 1, seq=5, capacity=100, free=40, handle=h, now=7.0)
    assert old is None
    assert (rec.agent_id, rec.seq, rec.capacity, rec.free, rec.version) == (agent_id(1), 5, 100, 40, "0.1.0")
    assert rec.handle is h
    assert rec.token == "token0"
    assert rec.registered_at == 7.0 and rec.last_tcp == 7.0
    assert rec.address is None and rec.last_udp is None
    assert registry.get(agent_id(1)) is rec
    assert registry.by_handle(h) is rec
    assert registry.all() == [rec]
    assert len(registry) == 1


def test_each_registration_gets_a_fresh_token(registry: Registry) -> None:
    a, _ = register(registry, 1)
    b, _ = register(registry, 2)
    assert a.token != b.token


def test_unregister(registry: Registry) -> None:
    rec = live_agent(registry, 1)
    registry.have(rec, [H1])
    assert registry.unregister(rec.handle) is rec
    assert len(registry) == 0
    assert registry.get(agent_id(1)) is None
    assert registry.by_handle(rec.handle) is None
    assert registry.by_address(addr(1)) is None
    assert registry.heard_udp(rec.token, addr(1), 1.0) is None
    assert registry.candidates(H1, 0.0) == []
    assert registry.holders(H1) == set()
    # Its claims leave the index in batches; the part had no other holder.
    assert registry.draining() == 1
    assert registry.drain(10) == []
    assert registry.draining() == 0
    assert registry.counts() == {"agents": 0, "indexed-parts": 0}
    assert registry.unregister(rec.handle) is None


def test_unregister_unknown_handle(registry: Registry) -> None:
    register(registry, 1)
    assert registry.unregister(Handle("stranger")) is None
    assert len(registry) == 1


def test_unregister_leaves_other_agents_alone(registry: Registry) -> None:
    a = live_agent(registry, 1)
    b = live_agent(registry, 2)
    registry.have(a, [H1])
    registry.have(b, [H1, H2])
    registry.unregister(a.handle)
    assert registry.all() == [b]
    assert registry.candidates(H1, 0.0) == [b]
    assert registry.candidates(H2, 0.0) == [b]
    assert registry.by_address(addr(2)) is b


# --- replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [5, 4, 0])
def test_replay_refused(registry: Registry, seq: int) -> None:
    rec, _ = register(registry, 1, seq=5)
    with pytest.raises(ReplayError):
        register(registry, 1, seq=seq, handle=Handle("replayer"))
    # Nothing changed: the first registration stands.
    assert registry.get(agent_id(1)) is rec
    assert registry.by_handle(rec.handle) is rec
    assert len(registry) == 1


def test_replay_error_is_access_denied() -> None:
    assert issubclass(ReplayError, AccessDenied)
    assert ReplayError.code == "replay"


def test_replay_refused_even_after_unregister(registry: Registry) -> None:
    rec, _ = register(registry, 1, seq=5)
    registry.unregister(rec.handle)
    with pytest.raises(ReplayError):
        register(registry, 1, seq=5)
    assert len(registry) == 0
    new, _ = register(registry, 1, seq=6)
    assert registry.get(agent_id(1)) is new


def test_refused_replay_does_not_raise_the_bar(registry: Registry) -> None:
    register(registry, 1, seq=5)
    with pytest.raises(ReplayError):
        register(registry, 1, seq=3)
    rec, _ = register(registry, 1, seq=6)
    assert rec.seq == 6


def test_sequence_numbers_are_per_agent(registry: Registry) -> None:
    register(registry, 1, seq=100)
    rec, _ = register(registry, 2, seq=1)
    assert registry.get(agent_id(2)) is rec


# --- re-registration --------------------------------------------------------------------------


def test_reregistration_replaces_and_returns_old_handle(registry: Registry) -> None:
    old = live_agent(registry, 1, seq=1)
    registry.have(old, [H1])
    new_handle = Handle("new")
    new, old_handle = register(registry, 1, seq=2, handle=new_handle, now=5.0)
    assert old_handle is old.handle
    assert new is not old
    assert registry.get(agent_id(1)) is new
    assert len(registry) == 1
    assert registry.by_handle(new_handle) is new
    assert registry.by_handle(old.handle) is None
    # The old record's token, address and index entries are gone.
    assert new.token != old.token
    assert registry.heard_udp(old.token, addr(1), 6.0) is None
    assert registry.by_address(addr(1)) is None
    assert registry.candidates(H1, 5.0) == []
    assert new.blocks == set()


def test_closing_the_replaced_connection_keeps_the_new_one(registry: Registry) -> None:
    old, _ = register(registry, 1, seq=1)
    new, _ = register(registry, 1, seq=2, handle=Handle("new"))
    assert registry.unregister(old.handle) is None
    assert registry.get(agent_id(1)) is new


# --- liveness -------------------------------------------------------------------------------


def test_not_live_without_udp(registry: Registry) -> None:
    rec, _ = register(registry, 1, now=0.0)
    assert not registry.is_live(rec, 0.0)
    assert registry.live(0.0) == []


def test_live_after_udp(registry: Registry) -> None:
    rec, _ = register(registry, 1, now=0.0)
    assert registry.heard_udp(rec.token, addr(1), 1.0) is rec
    assert rec.address == addr(1) and rec.last_udp == 1.0
    assert registry.by_address(addr(1)) is rec
    assert registry.is_live(rec, 1.0)
    assert registry.live(1.0) == [rec]


def test_expires_after_udp_silence(registry: Registry) -> None:
    rec, _ = register(registry, 1, now=0.0)
    registry.heard_udp(rec.token, addr(1), 0.0)
    registry.heard_tcp(rec, 25.0)
    assert registry.is_live(rec, LIMIT)  # exactly 3 heartbeats is still live
    assert not registry.is_live(rec, LIMIT + 0.001)
    assert registry.live(LIMIT + 0.001) == []
    # TCP is still fresh, so the server does not count it dead.
    assert registry.dead(LIMIT + 0.001) == []


def test_expires_after_tcp_silence(registry: Registry) -> None:
    rec, _ = register(registry, 1, now=0.0)
    registry.heard_udp(rec.token, addr(1), 0.0)
    registry.heard_udp(rec.token, addr(1), 25.0)
    assert registry.is_live(rec, LIMIT)
    assert not registry.is_live(rec, LIMIT + 0.001)
    assert registry.dead(LIMIT + 0.001) == [rec]
    assert registry.dead(LIMIT) == []


def test_heartbeats_keep_it_live(registry: Registry) -> None:
    rec, _ = register(registry, 1, now=0.0)
    for t in range(0, 200, 10):
        registry.heard_tcp(rec, float(t))
        registry.heard_udp(rec.token, addr(1), float(t) + 1)
        assert registry.is_live(rec, float(t) + 1 + LIMIT - 1)
    assert not registry.is_live(rec, 190 + LIMIT + 0.5)


def test_heard_udp_unknown_token_ignored(registry: Registry) -> None:
    rec = live_agent(registry, 1)
    assert registry.heard_udp("nope", addr(1), 5.0) is None
    assert registry.heard_udp("nope", addr(9), 5.0) is None
    assert registry.by_address(addr(1)) is rec
    assert registry.by_address(addr(9)) is None
    assert rec.last_udp == 0.0
    assert rec.address == addr(1)


def test_agent_address_changes(registry: Registry) -> None:
    rec = live_agent(registry, 1)
    registry.heard_udp(rec.token, addr(7), 1.0)
    assert rec.address == addr(7)
    assert registry.by_address(addr(7)) is rec
    assert registry.by_address(addr(1)) is None


def test_address_moves_to_another_agent(registry: Registry) -> None:
    a = live_agent(registry, 1)
    b, _ = register(registry, 2)
    shared = addr(1)
    assert registry.heard_udp(b.token, shared, 2.0) is b
    assert registry.by_address(shared) is b
    assert a.address is None
    assert not registry.is_live(a, 2.0)
    assert registry.live(2.0) == [b]
    # A comes back from a new address; B keeps the shared one.
    registry.heard_udp(a.token, addr(5), 3.0)
    assert registry.by_address(addr(5)) is a
    assert registry.by_address(shared) is b
    assert registry.is_live(a, 3.0)


def test_unregistering_the_old_owner_keeps_the_moved_address(registry: Registry) -> None:
    a = live_agent(registry, 1)
    b, _ = register(registry, 2)
    registry.heard_udp(b.token, addr(1), 1.0)
    registry.unregister(a.handle)
    assert registry.by_address(addr(1)) is b


def test_summary(registry: Registry) -> None:
    rec = live_agent(registry, 1, capacity=100, free=30)
    registry.have(rec, [H1, H2])
    s = rec.summary(4.0, HB)
    assert s == {
        "id": agent_id(1),
        "address": str(addr(1)),
        "capacity": 100,
        "free": 30,
        "used": 70,
        "parts": 2,
        "proven": 0,
        "version": "0.1.0",
        "last-heartbeat": 4.0,
    }


# --- location index -------------------------------------------------------------------------


def test_have_and_candidates(registry: Registry) -> None:
    a = live_agent(registry, 1)
    b = live_agent(registry, 2)
    registry.have(a, [H1, H2])
    registry.have(b, [H1])
    assert set(map(id, registry.candidates(H1, 1.0))) == {id(a), id(b)}
    assert registry.candidates(H2, 1.0) == [a]
    assert registry.candidates(H3, 1.0) == []
    assert registry.counts() == {"agents": 2, "indexed-parts": 2}


def test_holders_of_one_part_live_or_not(registry: Registry) -> None:
    """The repairer's look-up of one part's holders (without walking the whole index): every
    agent that reported it, live or not, as a copy of the index's set."""
    a = live_agent(registry, 1)
    b, _ = register(registry, 2)  # never pinged over UDP
    registry.have(a, [H1, H2])
    registry.have(b, [H1])
    assert registry.holders(H1) == {a.agent_id, b.agent_id}
    assert registry.holders(H2) == {a.agent_id}
    assert registry.holders(H3) == set()
    registry.holders(H1).clear()
    assert registry.holders(H1) == {a.agent_id, b.agent_id}


def test_candidates_are_only_live_agents(registry: Registry) -> None:
    a = live_agent(registry, 1)
    b, _ = register(registry, 2)  # never pinged over UDP
    registry.have(a, [H1])
    registry.have(b, [H1])
    assert registry.candidates(H1, 1.0) == [a]
    assert registry.candidates(H1, LIMIT + 1) == []


def test_gone(registry: Registry) -> None:
    a = live_agent(registry, 1)
    b = live_agent(registry, 2)
    registry.have(a, [H1, H2])
    registry.have(b, [H1])
    registry.gone(a, [H1])
    assert registry.candidates(H1, 0.0) == [b]
    assert a.blocks == {H2}
    registry.gone(b, [H1])
    assert registry.candidates(H1, 0.0) == []
    assert registry.counts()["indexed-parts"] == 1
    registry.gone(b, [H3])  # unknown part: no effect, no error
    assert registry.counts()["indexed-parts"] == 1


def test_space_clamps_free(registry: Registry) -> None:
    rec, _ = register(registry, 1)
    registry.space(rec, 500, 900)
    assert (rec.capacity, rec.free) == (500, 500)
    registry.space(rec, 500, 120)
    assert (rec.capacity, rec.free) == (500, 120)


# --- changes placement watches ----------------------------------------------------------------


def test_generation_changes_on_join_leave_and_move(registry: Registry) -> None:
    g0 = registry.generation
    rec, _ = register(registry, 1)
    g1 = registry.generation
    assert g1 != g0
    registry.heard_udp(rec.token, addr(1), 0.0)
    g2 = registry.generation
    assert g2 != g1
    registry.heard_udp(rec.token, addr(1), 1.0)  # the same address again: no change
    registry.have(rec, [H1])
    registry.space(rec, 500, 100)
    assert registry.generation == g2
    registry.heard_udp(rec.token, addr(2), 2.0)  # moved
    g3 = registry.generation
    assert g3 != g2
    registry.unregister(rec.handle)
    assert registry.generation != g3


# --- claims and proofs ------------------------------------------------------------------------


def test_a_claim_counts_as_a_replica_only_while_freshly_proven(registry: Registry) -> None:
    a, b = live_agent(registry, 1), live_agent(registry, 2)
    registry.have(a, [H1], [100])
    registry.have(b, [H1], [100])
    assert registry.holders(H1) == {a.agent_id, b.agent_id}
    assert registry.proven_holders(H1, 1.0, freshness=60) == []
    registry.proved(a, H1, 100, 1.0)
    assert registry.proven_holders(H1, 1.0, freshness=60) == [a]
    assert registry.proven_at(a.agent_id, H1) == 1.0 and registry.proven_at(b.agent_id, H1) is None
    assert registry.proven_holders(H1, 21.0, freshness=20) == [a]
    assert registry.proven_holders(H1, 21.5, freshness=20) == []  # live, but proven too long ago


def test_a_proven_size_is_the_truth_and_a_conflicting_claim_changes_nothing(registry: Registry) -> None:
    a, b = live_agent(registry, 1), live_agent(registry, 2)
    registry.have(a, [H1], [100])
    registry.proved(a, H1, 100, 1.0)
    assert registry.have(b, [H1, H2], [999, 5]) == [H1]
    assert registry.size_of(H1) == 100 and registry.size_proven(H1)
    assert registry.holders(H1) == {a.agent_id}  # b's claim was not recorded
    assert registry.holders(H2) == {b.agent_id}


def test_an_unproven_size_is_not_overwritten_and_a_proof_settles_it(registry: Registry) -> None:
    liar, honest = live_agent(registry, 1), live_agent(registry, 2)
    registry.have(liar, [H1], [7])  # first, with a wrong size
    registry.have(honest, [H1], [100])
    assert registry.size_of(H1) == 7 and not registry.size_proven(H1)
    registry.proved(honest, H1, 100, 2.0)
    assert registry.size_of(H1) == 100 and registry.size_proven(H1)


def test_a_proof_of_an_unclaimed_part_makes_a_proven_claim(registry: Registry) -> None:
    a = live_agent(registry, 1)
    registry.proved(a, H1, 10, 1.0)
    assert registry.is_claimed(a.agent_id, H1) and registry.claims_of(a.agent_id) == {H1}


def test_a_dropped_claim_and_a_departed_agent_forget_their_proofs(registry: Registry) -> None:
    a, b = live_agent(registry, 1), live_agent(registry, 2)
    registry.proved(a, H1, 10, 1.0)
    registry.proved(b, H1, 10, 1.0)
    registry.gone(a, [H1])
    assert registry.proven_at(a.agent_id, H1) is None and not registry.is_claimed(a.agent_id, H1)
    assert registry.size_proven(H1)
    registry.unregister(b.handle)
    assert registry.holders(H1) == set()
    registry.drain(10)
    assert registry.size_of(H1) is None
    assert not registry.size_proven(H1)


# --- registration numbers of identities that left --------------------------------------------


def test_registration_numbers_of_identities_long_gone_are_forgotten(registry: Registry) -> None:
    gone, _ = register(registry, 1, seq=5, now=0.0)
    registry.unregister(gone.handle)
    staying, _ = register(registry, 2, seq=7, now=0.0)
    assert registry.forget_stale(100.0, older_than=1000.0) == 0
    with pytest.raises(ReplayError):
        register(registry, 1, seq=5, now=100.0)  # still remembered: an old number is refused
    assert registry.forget_stale(2000.0, older_than=1000.0) == 1
    assert registry.remembered_identities() == 1  # the registered one is kept
    register(registry, 1, seq=1, now=2000.0)  # forgotten: any number is taken again
    with pytest.raises(ReplayError):
        register(registry, 2, seq=7, now=2000.0)  # the registered one's number still holds
    assert registry.get(staying.agent_id) is not None


def test_remembered_identities_are_bounded(registry: Registry) -> None:
    for n in range(1, 11):
        rec, _ = register(registry, n, now=float(n))
        registry.unregister(rec.handle)
    assert registry.forget_stale(20.0, older_than=1e9, keep=4) == 6
    assert registry.remembered_identities() == 4


def test_a_departed_agents_claims_leave_the_index_in_bounded_batches(registry: Registry) -> None:
    a, b = live_agent(registry, 1), live_agent(registry, 2)
    parts = [f"{i:064x}" for i in range(12)]
    registry.have(a, parts)
    registry.have(b, parts[:4])  # the first four have another holder
    registry.unregister(a.handle)
    # Gone at once for every reader, whatever is left to drain.
    assert all(registry.holders(p) == ({b.agent_id} if p in parts[:4] else set()) for p in parts)
    touched = []
    for _ in range(3):
        batch = registry.drain(5)
        assert len(batch) <= 5
        touched += batch
    assert registry.draining() == 0
    # The parts that lost a holder but kept another come back (for the repairer), once each.
    assert sorted(touched) == parts[:4]
    assert registry.counts()["indexed-parts"] == 4


def test_an_agent_that_registers_again_keeps_what_it_claims_anew(registry: Registry) -> None:
    a = live_agent(registry, 1)
    registry.have(a, [H1, H2])
    again, _ = registry.register(agent_id=agent_id(1), seq=2, capacity=1, free=1, version="0.1.0",
                                 handle=Handle("again"), now=1.0)
    assert registry.holders(H1) == set()  # the old registration's claims do not count
    registry.have(again, [H1])
    registry.drain(100)
    assert registry.holders(H1) == {agent_id(1)}
    assert registry.holders(H2) == set() and registry.counts()["indexed-parts"] == 1


def test_a_claim_from_a_registration_that_was_replaced_is_not_indexed(registry: Registry) -> None:
    a = live_agent(registry, 1)
    registry.register(agent_id=agent_id(1), seq=2, capacity=1, free=1, version="0.1.0",
                      handle=Handle("again"), now=1.0)
    registry.have(a, [H1])
    registry.proved(a, H2, 10, 1.0)
    assert registry.holders(H1) == set() and registry.holders(H2) == set()
    assert registry.counts()["indexed-parts"] == 0


def test_a_claim_set_splits_into_buckets_that_a_walk_covers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsss.server.registry import ClaimSet

    monkeypatch.setattr(ClaimSet, "SPLIT_AT", 100)
    claims = ClaimSet()
    parts = [f"{i:064x}" for i in range(1000)]
    for p in parts + parts[:10]:  # repeats change nothing
        claims.add(p)
    claims.discard(parts[0])
    claims.discard("f" * 64)  # not there: nothing happens
    assert len(claims) == 999 and parts[0] not in claims and parts[1] in claims
    assert claims.bucket_count() == ClaimSet.BUCKETS
    walked = [p for i in range(claims.bucket_count()) for p in claims.bucket(i)]
    assert sorted(walked) == parts[1:]
    assert max(len(claims.bucket(i)) for i in range(claims.bucket_count())) < 100
    assert claims == set(parts[1:]) and claims.bucket(claims.bucket_count()) == []
