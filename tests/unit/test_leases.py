"""Tests for L{dsss.leases} (the lease record and the collection decision) and
L{dsss.agent.leasestore} (the leases on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from nacl.public import PrivateKey

from dsss.agent.leasestore import LeaseStore
from dsss.errors import RemoteProtocolError
from dsss.leases import (
    BAD_SIGNATURE,
    MAX_TERM,
    OK,
    STALE,
    TOO_LONG,
    LeaseError,
    LeaseRecord,
    LeaseSigner,
    LeaseTable,
    Outcome,
    encode_batch,
    lease_signing_key,
    parse_batch,
)
from dsss.model import block_hash

B1 = block_hash(b"one")
B2 = block_hash(b"two")
NOW = 1_700_000_000.0


def signer(seed: int, clock: list[float] | None = None) -> LeaseSigner:
    key = lease_signing_key(PrivateKey(bytes([seed]) * 32))
    t = clock if clock is not None else [NOW]
    return LeaseSigner(key, clock=lambda: t[0])


# --- the record ------------------------------------------------------------------------------------


def test_lease_key_is_derived_from_the_user_key_and_differs_per_user() -> None:
    a, a2, b = (lease_signing_key(PrivateKey(bytes([n]) * 32)) for n in (1, 1, 2))
    assert bytes(a) == bytes(a2)
    assert bytes(a) != bytes(b)
    # Not the user's key itself.
    assert bytes(a) != bytes([1]) * 32


def test_record_round_trips_and_verifies() -> None:
    s = signer(1)
    r = s.sign(B1, int(NOW) + 100)
    assert LeaseRecord.parse(r.encode()) == r
    r.verify()
    assert r.encode().startswith("1:" + s.owner + ":" + B1 + ":")
    rel = s.release(B1)
    assert rel.released and rel.serial > r.serial
    rel.verify()


@pytest.mark.parametrize("change", ["owner", "block", "expiry", "serial"])
def test_a_changed_field_breaks_the_signature(change: str) -> None:
    r = signer(1).sign(B1, int(NOW) + 100)
    other = signer(2).sign(B2, int(NOW) + 100)
    fields = {"owner": other.owner, "block": B2, "expiry": r.expiry + 1, "serial": r.serial + 1}
    forged = LeaseRecord(**{**r.__dict__, change: fields[change]})
    with pytest.raises(LeaseError):
        forged.verify()


@pytest.mark.parametrize("text", [
    "", "1:ab", "2:" + "a" * 64 + ":" + B1 + ":1:1:" + "b" * 128,
    "1:" + "A" * 64 + ":" + B1 + ":1:1:" + "b" * 128,
    "1:" + "a" * 64 + ":nothash:1:1:" + "b" * 128,
    "1:" + "a" * 64 + ":" + B1 + ":-1:1:" + "b" * 128,
    "1:" + "a" * 64 + ":" + B1 + ":01:1:" + "b" * 128,
    "1:" + "a" * 64 + ":" + B1 + ":1:1:" + "b" * 127,
    "1:" + "a" * 64 + ":" + B1 + ":1:" + "9" * 20 + ":" + "b" * 128,
    "1:" + "a" * 64 + ":" + B1 + ":1:1:" + "b" * 128 + ":x",
])
def test_malformed_records_are_refused(text: str) -> None:
    with pytest.raises(LeaseError):
        LeaseRecord.parse(text)


def test_serials_grow_even_when_the_clock_steps_back() -> None:
    t = [NOW]
    s = signer(1, t)
    first = s.serial()
    t[0] -= 100
    assert s.serial() == first + 1


def test_batch_round_trip_and_bad_lines() -> None:
    s = signer(1)
    records = [s.sign(B1, int(NOW) + 5), s.sign(B2, int(NOW) + 6)]
    body = encode_batch(records)
    assert parse_batch(body, 2) == records
    assert parse_batch(body.replace(b"1:", b"7:", 1), 2)[0] is None
    with pytest.raises(RemoteProtocolError):
        parse_batch(body, 3)
    with pytest.raises(RemoteProtocolError):
        parse_batch(body[:-1], 2)
    assert Outcome.parse("ok 2") == Outcome(OK, 2)
    with pytest.raises(RemoteProtocolError):
        Outcome.parse("fine 2")


# --- the table ---------------------------------------------------------------------------------


def test_replayed_older_record_changes_nothing() -> None:
    t = LeaseTable(skew=10, grace=5)
    s = signer(1)
    lease = s.sign(B1, int(NOW) + 100)
    release = s.release(B1)
    assert t.apply(lease, NOW).status == OK
    assert t.apply(release, NOW).status == OK
    assert t.apply(lease, NOW).status == STALE  # the replay
    assert t.records(B1) == [release]
    assert t.apply(release, NOW).status == OK  # the same record again: idempotent


def test_check_refuses_forged_and_overlong_records() -> None:
    t = LeaseTable()
    s = signer(1)
    good = s.sign(B1, int(NOW) + 100)
    forged = LeaseRecord(signer(2).owner, B1, good.expiry, good.serial, good.signature)
    assert t.check(good, NOW) is None
    assert t.check(forged, NOW) == BAD_SIGNATURE
    assert t.check(s.sign(B1, int(NOW) + MAX_TERM + 10), NOW) == TOO_LONG


def test_two_owners_hold_separate_leases() -> None:
    t = LeaseTable(skew=10, grace=5)
    a, b = signer(1), signer(2)
    t.apply(a.sign(B1, int(NOW) + 100), NOW)
    assert t.apply(b.sign(B1, int(NOW) + 50), NOW) == Outcome(OK, 1)
    assert t.apply(a.release(B1), NOW + 1) == Outcome(OK, 1)  # b's lease remains
    assert t.collectable_at(B1) == NOW + 50 + 10
    assert t.due(NOW + 59, 10, lambda b: True) == []
    assert t.due(NOW + 60, 10, lambda b: True) == [B1]


def test_release_frees_after_the_grace_and_hold_keeps() -> None:
    t = LeaseTable(skew=1000, grace=5)
    s = signer(1)
    t.apply(s.sign(B1, int(NOW) + 100), NOW)
    t.apply(s.release(B1), NOW + 10)
    assert t.collectable_at(B1) == NOW + 15
    t.hold(B2, NOW + 30, NOW)
    assert t.due(NOW + 29, 10, lambda b: True) == [B1]
    assert t.due(NOW + 30, 10, lambda b: True) == [B2]


def test_track_holds_blocks_without_records() -> None:
    t = LeaseTable(skew=0, grace=0)
    t.apply(signer(1).sign(B1, int(NOW) + 10), NOW)
    t.track([B1, B2], NOW, hold=1000)
    assert t.holds == {B2: NOW + 1000}
    assert t.due(NOW + 10, 10, lambda b: True) == [B1]


def test_store_survives_a_restart(tmp_path: Path) -> None:
    s = signer(1)
    store = LeaseStore(tmp_path, LeaseTable(skew=10, grace=5))
    store.start([B1, B2], NOW, legacy_hold=500)
    lease, release = s.sign(B1, int(NOW) + 100), s.release(B1)
    store.apply([lease], NOW)
    store.apply([release], NOW + 1)
    store.close()
    again = LeaseStore(tmp_path, LeaseTable(skew=10, grace=5))
    assert again.table.records(B1) == [release]
    assert again.table.holds[B2] == NOW + 500
    assert again.table.entries[B1][s.owner].guard == lease.expiry
    # The replay is refused after the restart too.
    assert again.apply([lease], NOW + 2)[0].status == STALE
    again.forget(B1)
    again.close()
    third = LeaseStore(tmp_path, LeaseTable())
    assert third.table.records(B1) == []


def test_a_collected_blocks_release_still_refuses_a_replay(tmp_path: Path) -> None:
    s, other = signer(1), signer(2)
    store = LeaseStore(tmp_path, LeaseTable(skew=10, grace=5))
    lease = s.sign(B1, int(NOW) + 100)
    store.apply([lease, other.sign(B1, int(NOW) + 1)], NOW)
    store.apply([s.release(B1)], NOW)
    store.collected(B1, NOW + 20)
    store.close()
    again = LeaseStore(tmp_path, LeaseTable(skew=10, grace=5))
    # The expired lease of the other owner is gone; the release stays, and a replay is stale.
    assert [r.owner for r in again.table.records(B1)] == [s.owner]
    assert again.apply([lease], NOW + 21)[0].status == STALE


def test_prune_keeps_a_release_until_no_replay_could_revive(tmp_path: Path) -> None:
    s = signer(1)
    store = LeaseStore(tmp_path, LeaseTable(skew=10, grace=5))
    store.apply([s.sign(B1, int(NOW) + 100)], NOW)
    store.apply([s.release(B1)], NOW)
    assert store.prune(NOW + 105) == 0
    assert store.prune(NOW + 111) == 1
    assert store.table.records(B1) == []


# --- the property: GC never collects a block with a live lease -----------------------------------

SKEW = 50.0
GRACE = 20.0
HOLD = 30.0


OFFSETS = st.sampled_from([-SKEW / 2, SKEW / 2, 0.0]) | st.floats(-SKEW / 2, SKEW / 2)
STEPS = st.sampled_from([1.0, GRACE, SKEW, 100.0]) | st.floats(min_value=0, max_value=150)


class Collection(RuleBasedStateMachine):
    """Owners (with clocks up to SKEW/2 off) put, renew, release (rm) and replay leases on one
    block held by several agents (clocks up to SKEW/2 off); agents repair (copy the block and its
    live leases to an agent that lacks it) and collect. No agent ever collects the block while
    an owner's latest record that this agent accepted is live by the owner's own clock, nor
    while an unleased upload's hold lasts."""

    def __init__(self) -> None:
        super().__init__()
        self.t = NOW
        self.agent_off = [0.0, 0.0, 0.0]
        self.owner_off = [0.0, 0.0]
        self.owner_clock = [[NOW], [NOW]]
        self.signers = [signer(1, self.owner_clock[0]), signer(2, self.owner_clock[1])]
        self.tables = [LeaseTable(skew=SKEW, grace=GRACE) for _ in range(3)]
        self.stored = [False, False, False]
        # Per agent, per owner: the latest record the agent accepted (the model's own log).
        self.accepted: list[dict[int, LeaseRecord]] = [{}, {}, {}]
        self.held_until = [float("-inf")] * 3
        self.sent: list[list[LeaseRecord]] = [[], []]

    def agent_now(self, j: int) -> float:
        return self.t + self.agent_off[j]

    def owner_now(self, i: int) -> float:
        return self.t + self.owner_off[i]

    def sync_clocks(self) -> None:
        for i in range(2):
            self.owner_clock[i][0] = self.owner_now(i)

    def deliver(self, j: int, record: LeaseRecord) -> None:
        table, now = self.tables[j], self.agent_now(j)
        if not self.stored[j] or table.check(record, now) is not None:
            return
        i = self.signers.index(next(s for s in self.signers if s.owner == record.owner))
        before = self.accepted[j].get(i)
        outcome = table.apply(record, now)
        if outcome.status == OK:
            assert before is None or record.serial >= before.serial
            self.accepted[j][i] = record
        else:
            assert before is not None and record.serial <= before.serial

    @rule(dt=STEPS)
    def advance(self, dt: float) -> None:
        self.t += dt
        self.sync_clocks()

    @rule(j=st.integers(0, 2), off=OFFSETS)
    def set_agent_clock(self, j: int, off: float) -> None:
        self.agent_off[j] = off

    @rule(i=st.integers(0, 1), off=OFFSETS)
    def set_owner_clock(self, i: int, off: float) -> None:
        self.owner_off[i] = off
        self.sync_clocks()

    @rule(i=st.integers(0, 1), j=st.integers(0, 2), keep=st.integers(1, 60), leased=st.booleans())
    def put(self, i: int, j: int, keep: int, leased: bool) -> None:
        """An upload to agent j: with the owner's lease in it, or without one (held)."""
        if not self.stored[j]:
            self.stored[j] = True
            self.tables[j].changed.pop(B1, None)
        if leased:
            record = self.signers[i].sign(B1, int(self.owner_now(i)) + keep)
            self.sent[i].append(record)
            self.deliver(j, record)
        else:
            now = self.agent_now(j)
            self.tables[j].hold(B1, now + HOLD, now)
            self.held_until[j] = max(self.held_until[j], now + HOLD)

    @rule(i=st.integers(0, 1), keep=st.integers(1, 60), to=st.sets(st.integers(0, 2)))
    def renew(self, i: int, keep: int, to: set[int]) -> None:
        record = self.signers[i].sign(B1, int(self.owner_now(i)) + keep)
        self.sent[i].append(record)
        for j in to:
            self.deliver(j, record)

    @rule(i=st.integers(0, 1), to=st.sets(st.integers(0, 2)))
    def rm(self, i: int, to: set[int]) -> None:
        record = self.signers[i].release(B1)
        self.sent[i].append(record)
        for j in to:
            self.deliver(j, record)

    @precondition(lambda self: any(self.sent))
    @rule(data=st.data(), j=st.integers(0, 2))
    def replay(self, data: st.DataObject, j: int) -> None:
        i = data.draw(st.sampled_from([k for k in range(2) if self.sent[k]]))
        self.deliver(j, data.draw(st.sampled_from(self.sent[i])))

    @rule(src=st.integers(0, 2), dst=st.integers(0, 2))
    def repair(self, src: int, dst: int) -> None:
        if src == dst or not self.stored[src] or self.stored[dst]:
            return
        records = self.tables[src].live_records(B1, self.agent_now(src))
        self.stored[dst] = True
        now = self.agent_now(dst)
        self.tables[dst].hold(B1, now + HOLD, now)  # the copy is an upload without a lease
        self.held_until[dst] = max(self.held_until[dst], now + HOLD)
        for r in records:
            self.deliver(dst, r)

    @rule(j=st.integers(0, 2))
    def gc_at_the_earliest(self, j: int) -> None:
        """Move time to the first moment agent j would collect the block, and collect."""
        if self.stored[j]:
            self.t = max(self.t, self.tables[j].collectable_at(B1) - self.agent_off[j])
            self.sync_clocks()
            self.gc(j)

    @rule(j=st.integers(0, 2))
    def gc(self, j: int) -> None:
        now = self.agent_now(j)
        due = self.tables[j].due(now, 10, lambda b: self.stored[j])
        if not due:
            return
        assert due == [B1]
        assert now >= self.held_until[j]
        for i, record in self.accepted[j].items():
            assert record.released or record.expiry <= self.owner_now(i), (
                f"collected at agent time {now} while owner {i} holds a lease to {record.expiry} "
                f"(owner time {self.owner_now(i)})")
        self.stored[j] = False
        self.tables[j].forget(B1)
        self.accepted[j] = {}
        self.held_until[j] = float("-inf")

    @invariant()
    def newest_record_kept(self) -> None:
        for j in range(3):
            for record in self.accepted[j].values():
                assert self.tables[j].entries[B1][record.owner].record == record


Collection.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
TestCollection = Collection.TestCase


def test_leased_bytes_count_only_stored_blocks() -> None:
    t = LeaseTable(skew=10, grace=5)
    a = signer(1)
    t.apply(a.sign(B1, int(NOW) + 100), NOW)
    t.apply(a.sign(B2, int(NOW) + 100), NOW)
    # B2 was lost (quarantined) after its lease was taken: it counts for nothing.
    assert t.leased_by_owner(lambda b: 7 if b == B1 else 0, NOW) == {a.owner: 7}
    assert t.leased_by_owner(lambda b: 7, NOW + 200) == {}
