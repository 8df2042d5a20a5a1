"""Tests for L{dsss.server.quotas}: per-client quotas in bytes leased."""

from __future__ import annotations

import pytest

from dsss.errors import AccessDenied, BadRequest, QuotaExceeded
from dsss.server.quotas import PENDING_TTL, QuotaBook

ALICE, BOB = "a" * 64, "b" * 64
KA, KB = "1" * 64, "2" * 64


def test_placements_count_until_reported_then_reports_count() -> None:
    q = QuotaBook(1000)
    q.check(ALICE, KA, [("agent1", 300), ("agent2", 300)], ["agent1", "agent2"], 0.0)
    assert q.used(ALICE, ["agent1", "agent2"], 1.0) == 600
    q.report("agent1", KA, 300)  # agent1 stored and reported it: counted once
    assert q.used(ALICE, ["agent1", "agent2"], 1.0) == 600
    with pytest.raises(QuotaExceeded):
        q.check(ALICE, KA, [("agent3", 401)], ["agent1", "agent2", "agent3"], 2.0)
    q.check(ALICE, KA, [("agent3", 400)], ["agent1", "agent2", "agent3"], 2.0)
    # An upload that never happened stops counting; a release gives the bytes back.
    assert q.used(ALICE, ["agent1", "agent2", "agent3"], 2.0 + PENDING_TTL + 1) == 300
    q.report("agent1", KA, 0)
    assert q.used(ALICE, ["agent1", "agent2", "agent3"], 2.0 + PENDING_TTL + 1) == 0


def test_only_live_agents_count_and_others_keys_are_not_charged() -> None:
    q = QuotaBook(1000)
    q.bind(ALICE, KA)
    q.report("agent1", KA, 500)
    q.report("agent2", KB, 900)  # another owner's leases
    assert q.used(ALICE, ["agent1", "agent2"], 0.0) == 500
    assert q.used(ALICE, ["agent2"], 0.0) == 0  # agent1 is gone: its copies are not counted


def test_a_lease_key_belongs_to_one_client_and_a_client_has_one() -> None:
    q = QuotaBook(1000)
    q.bind(ALICE, KA)
    with pytest.raises(AccessDenied):
        q.bind(BOB, KA)
    with pytest.raises(AccessDenied):
        q.bind(ALICE, KB)
    with pytest.raises(BadRequest):
        q.check(BOB, None, [("agent1", 1)], ["agent1"], 0.0)


def test_per_client_quotas_and_no_quota() -> None:
    q = QuotaBook(None, {ALICE: 10})
    with pytest.raises(QuotaExceeded):
        q.check(ALICE, KA, [("agent1", 11)], ["agent1"], 0.0)
    q.check(BOB, KB, [("agent1", 10**12)], ["agent1"], 0.0)  # no quota for Bob
    assert QuotaBook(None).enabled is False
