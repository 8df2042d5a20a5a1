"""The audit scheduler and the meaning of an audit's answer, driven by a clock in memory."""

from __future__ import annotations

import itertools

import pytest

from dsss.server.registry import ClaimSet
from dsss.server.audit import (
    MAX_NEW_PER_AGENT,
    SCAN_PER_AUDIT,
    AuditScheduler,
    Verdict,
    judge,
)

A, B = "a" * 64, "b" * 64


class Claims:
    """An in-memory location index: claims and the time each was last proven."""

    def __init__(self):
        self.claims: dict[str, dict[str, float | None]] = {}
        self.looked = 0

    def claim(self, agent, blocks):
        d = self.claims.setdefault(agent, {})
        for b in blocks:
            d.setdefault(b, None)

    def claims_of(self, agent):
        return ClaimSet(self.claims.get(agent, {}))

    def is_claimed(self, agent, block):
        self.looked += 1
        return block in self.claims.get(agent, {})

    def proven_at(self, agent, block):
        return self.claims.get(agent, {}).get(block)


def nonces():
    counter = itertools.count()
    return lambda: next(counter).to_bytes(16, "big")


def run(sched, claims, start, seconds, step=0.1, answer=True):
    """Drive the scheduler; every audit is answered (passed) at once. Returns the jobs."""
    jobs = []
    t = start
    for _ in range(int(seconds / step)):
        t = round(t + step, 6)
        for job in sched.due(t):
            jobs.append((t, job))
            if answer:
                claims.claims[job.agent_id][job.block] = t
            sched.finished(job.agent_id)
    return jobs


def blocks(prefix, n):
    return [f"{prefix}{i:063x}" for i in range(n)]


def test_rate_is_never_exceeded():
    claims = Claims()
    sched = AuditScheduler(claims, rate=10, freshness=1000, nonces=nonces())
    for i in range(20):
        agent = f"{i:064x}"
        claims.claim(agent, blocks("c", 50))
        sched.agent_joined(agent, 0.0)
    jobs = run(sched, claims, 0.0, 10.0)
    # 10 audits/s for 10 s, and never more than one second's worth in any second
    assert 95 <= len(jobs) <= 100
    for start in range(10):
        in_second = [j for t, j in jobs if start < t <= start + 1]
        assert len(in_second) <= 11


def test_new_claims_go_before_the_sweep():
    claims = Claims()
    sched = AuditScheduler(claims, rate=5, freshness=1000, nonces=nonces())
    old = blocks("d", 100)
    claims.claim(A, old)
    sched.agent_joined(A, 0.0)
    run(sched, claims, 0.0, 2.0)
    fresh = blocks("e", 3)
    claims.claim(B, fresh)
    sched.agent_joined(B, 0.0)
    for b in fresh:
        sched.claimed(B, b)
    jobs = run(sched, claims, 2.0, 1.0)
    assert [j.block for _, j in jobs[:3]] == fresh
    assert {j.reason for _, j in jobs[:3]} == {"new"}


def test_one_outstanding_audit_per_agent():
    claims = Claims()
    sched = AuditScheduler(claims, rate=1000, freshness=100, nonces=nonces())
    claims.claim(A, blocks("f", 10))
    sched.agent_joined(A, 0.0)
    first = sched.due(1.0)
    assert len(first) == 1
    assert sched.due(2.0) == []  # not answered yet
    sched.finished(A)
    assert len(sched.due(3.0)) == 1


def test_every_claim_is_reproven_within_the_freshness():
    claims = Claims()
    freshness = 100.0
    sched = AuditScheduler(claims, rate=20, freshness=freshness, nonces=nonces())
    for i in range(5):
        agent = f"{i:064x}"
        claims.claim(agent, blocks(f"{i}", 150))  # 750 claims; one audit per agent per tick
        sched.agent_joined(agent, 0.0)
    # 20 audits/s over 5 agents: a round of 150 claims takes 37.5 s, less than freshness / 2
    jobs = run(sched, claims, 0.0, 500.0, step=0.25)
    audits: dict[tuple[str, str], list[float]] = {}
    for t, j in jobs:
        audits.setdefault((j.agent_id, j.block), []).append(t)
    assert len(audits) == 750
    for (_agent, block), times in audits.items():
        assert times[0] <= freshness / 2
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) >= 9 and max(gaps) <= freshness, (block, times)


def test_the_sweep_waits_for_its_next_round_when_everything_is_fresh():
    claims = Claims()
    sched = AuditScheduler(claims, rate=100, freshness=100, nonces=nonces())
    claims.claim(A, blocks("a", 5))
    sched.agent_joined(A, 0.0)
    jobs = run(sched, claims, 0.0, 49.0)
    assert len(jobs) == 5  # one round, then nothing until 50 s after it started
    looked = claims.looked
    run(sched, claims, 49.0, 0.9)
    assert claims.looked == looked  # a parked agent costs nothing
    assert len(run(sched, claims, 49.9, 2.0)) == 5


def test_no_call_walks_the_whole_index():
    claims = Claims()
    sched = AuditScheduler(claims, rate=1, freshness=10**6, nonces=nonces())
    many = blocks("b", 100_000)
    claims.claim(A, many)
    now = 1.0
    for b in many:  # every claim proven just now: the sweep skips them all
        claims.claims[A][b] = now
    sched.agent_joined(A, 0.0)
    claims.looked = 0
    sched.due(now)
    sched.due(now + 1)
    assert claims.looked <= 2 * SCAN_PER_AUDIT


def test_claims_beyond_the_new_queue_are_left_to_the_sweep_which_starts_at_once():
    claims = Claims()
    sched = AuditScheduler(claims, rate=1000, freshness=10**6, nonces=nonces())
    sched.agent_joined(A, 0.0)
    assert sched.due(0.0) == []  # no claims yet: the sweep parks until its next round
    many = blocks("c", MAX_NEW_PER_AGENT + 50)
    claims.claim(A, many)
    for b in many:
        sched.claimed(A, b)
    jobs = run(sched, claims, 0.0, 5.0, step=0.001)
    assert {j.block for _, j in jobs} == set(many)


def test_withdrawn_and_departed_claims_are_not_audited():
    claims = Claims()
    sched = AuditScheduler(claims, rate=100, freshness=1000, nonces=nonces())
    bs = blocks("d", 3)
    claims.claim(A, bs)
    claims.claim(B, bs)
    sched.agent_joined(A, 0.0)
    sched.agent_joined(B, 0.0)
    for b in bs:
        sched.claimed(A, b)
        sched.claimed(B, b)
    del claims.claims[A][bs[0]]  # GONE
    sched.agent_left(B)
    jobs = run(sched, claims, 0.0, 1.0)
    assert sorted(j.block for _, j in jobs) == sorted(bs[1:])
    assert {j.agent_id for _, j in jobs} == {A}


def test_audits_made_outside_the_schedule_slow_the_sweep():
    claims = Claims()
    sched = AuditScheduler(claims, rate=10, freshness=1000, nonces=nonces())
    claims.claim(A, blocks("e", 100))
    sched.agent_joined(A, 0.0)
    for job in sched.due(0.0):
        sched.finished(job.agent_id)
    sched.charge(0.0, 25)  # more than a second's worth: debt is capped at one second
    assert run(sched, claims, 0.0, 1.0) == []
    assert 8 <= len(run(sched, claims, 1.0, 1.0)) <= 11


def test_nonces_come_from_the_source():
    claims = Claims()
    sched = AuditScheduler(claims, rate=10, freshness=1000, nonces=lambda: b"\x07" * 16)
    claims.claim(A, ["a" * 64])
    sched.agent_joined(A, 0.0)
    (job,) = sched.due(1.0)
    assert job.nonce == b"\x07" * 16 and job.block == "a" * 64


# --- judge -----------------------------------------------------------------------------------


def checker(good: bytes):
    def verify(address, size, nonce, proof):
        if proof != good:
            raise ValueError("the leaf does not hash to the root")

    return verify


def test_judge_a_good_proof_passes_with_its_size():
    out = judge("ab" * 32, b"n" * 16, proof=(1000, b"ok"), max_size=10**6, verify=checker(b"ok"))
    assert out.verdict is Verdict.PASSED and out.size == 1000


def test_judge_refuses_wrong_proofs_sizes_and_missing_parts():
    v = checker(b"ok")
    assert judge("x", b"n", proof=(10, b"bad"), max_size=100, verify=v).verdict is Verdict.FAILED
    out = judge("x", b"n", proof=(10, b"ok"), known_size=11, max_size=100, verify=v)
    assert out.verdict is Verdict.FAILED and "11 bytes" in out.reason
    assert judge("x", b"n", proof=(101, b"ok"), max_size=100, verify=v).verdict is Verdict.FAILED
    assert judge("x", b"n", error=("not-found", "no"), max_size=100, verify=v).verdict is Verdict.FAILED


@pytest.mark.parametrize("error", [("busy", "try later"), ("timeout", "")])
def test_judge_busy_or_silent_is_inconclusive(error):
    v = checker(b"ok")
    assert judge("x", b"n", error=error, max_size=100, verify=v).verdict is Verdict.UNANSWERED
    assert judge("x", b"n", max_size=100, verify=v).verdict is Verdict.UNANSWERED
