from __future__ import annotations

from dsss.server.reputation import (
    DISQUALIFY_MIN_STRIKES,
    UNANSWERED_STRIKE,
    VETTING_AUDITS,
    Reputation,
)

A, B = "a" * 64, "b" * 64


def test_vetted_after_enough_passed_audits():
    rep = Reputation()
    for i in range(VETTING_AUDITS - 1):
        rep.passed(A, float(i))
    assert not rep.is_vetted(A)
    rep.passed(A, 100.0)
    assert rep.is_vetted(A) and not rep.is_vetted(B)


def test_an_agent_that_keeps_half_is_disqualified_at_its_third_strike():
    rep = Reputation()
    disqualified = []
    for i in range(DISQUALIFY_MIN_STRIKES):
        rep.passed(A, 2.0 * i)
        disqualified.append(rep.strike(A, "does not have it", 2.0 * i + 1))
    assert disqualified == [False] * (DISQUALIFY_MIN_STRIKES - 1) + [True]
    assert rep.is_disqualified(A) and not rep.is_vetted(A)
    assert rep.get(A).last_failure_reason == "does not have it"


def test_an_honest_agent_with_rare_losses_stays():
    rep = Reputation()
    for i in range(1000):
        rep.passed(A, float(i))
        if i % 200 == 199:  # one lost part in 200 audits
            assert not rep.strike(A, "does not have it", float(i))
    assert not rep.is_disqualified(A) and rep.is_vetted(A)
    assert rep.get(A).audits_failed == 5


def test_disqualification_survives_and_is_not_washed_out_by_new_identities():
    rep = Reputation(max_records=10, max_disqualified=100)
    for i in range(DISQUALIFY_MIN_STRIKES):
        rep.strike(A, "wrong proof", float(i))
    assert rep.is_disqualified(A)
    for i in range(1000):  # a flood of fresh identities
        rep.seen(f"{i:064x}")
    assert rep.is_disqualified(A)
    rep.passed(A, 5000.0)  # passing later changes nothing
    assert rep.is_disqualified(A)
    assert rep.counts()["agents-known"] == 11


def test_unanswered_audits_strike_every_third_in_a_row():
    rep = Reputation()
    results = [rep.unanswered(A, "timeout", float(i)) for i in range(2 * UNANSWERED_STRIKE)]
    struck = [s for s, _ in results]
    assert struck == ([False] * (UNANSWERED_STRIKE - 1) + [True]) * 2
    rep.unanswered(A, "timeout", 10.0)
    rep.passed(A, 11.0)  # an answer resets the count
    assert rep.unanswered(A, "timeout", 12.0) == (False, False)
