"""Tests for L{dsss.server.quotas}: per-client quotas in bytes leased."""

from __future__ import annotations

import pytest

from dsss.errors import AccessDenied, BadRequest, QuotaExceeded
from dsss.server.quotas import DAY, PENDING_TTL, OpenBound, QuotaBook

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


def test_the_open_bound_refuses_past_a_days_allowance_per_address_and_refills() -> None:
    bound = OpenBound(1000 * 1024)
    bound.check("10.0.0.1", 600 * 1024, 0.0)
    with pytest.raises(QuotaExceeded) as refused:
        bound.check("10.0.0.1", 600 * 1024, 1.0)
    text = str(refused.value)
    assert "at most 1000.0 KiB a day of uploads from one address" in text
    assert "400.0 KiB is left now and this needs 600.0 KiB" in text
    # 200 KiB more are needed, at 1000 KiB a day: a fifth of a day.
    assert f"Enough comes back in {int(DAY / 5) // 3600} h" in text
    assert bound.refused == 1
    bound.check("10.0.0.2", 600 * 1024, 1.0)  # another address has its own allowance
    bound.check("10.0.0.1", 0, 1.0)  # downloads (no bytes placed) are never refused
    # A refused request took nothing: a fifth of a day later it fits.
    with pytest.raises(QuotaExceeded):
        bound.check("10.0.0.1", 600 * 1024, DAY / 5 - 60)
    bound.check("10.0.0.1", 600 * 1024, DAY / 5 + 1)
    with pytest.raises(QuotaExceeded, match="this request alone places"):
        bound.check("10.0.0.3", 2000 * 1024, 0.0)
