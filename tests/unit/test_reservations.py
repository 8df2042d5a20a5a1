"""Reservations of uploads in progress (dsss.agent.reservations): progress or be dropped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dsss.agent.reservations import SourceReservations, UploadPolicy, UploadWatch

POLICY = UploadPolicy(grace=10, window=10, min_rate=1000, base_deadline=60, deadline_rate=1000, per_source=100)


def test_a_header_and_a_byte_now_and_then_is_dropped_after_grace_and_one_window() -> None:
    w = UploadWatch(POLICY, size=1_000_000, started=0)
    received = 0
    dropped_at = None
    for t in range(0, 100, 5):  # one byte every 5 s
        received += 1
        if w.check(received, float(t)) is not None:
            dropped_at = t
            break
    assert dropped_at == 20  # grace (10) + one window (10)


def test_an_upload_that_keeps_the_rate_is_kept_until_its_deadline() -> None:
    policy = UploadPolicy(grace=10, window=10, min_rate=100, base_deadline=60, deadline_rate=1000)
    size = 100_000
    w = UploadWatch(policy, size=size, started=0)
    assert policy.deadline(size) == 160
    for t in range(1, 161):  # 500 bytes/s: above the minimum rate, too slow for the deadline
        assert w.check(500 * t, float(t)) is None
    why = w.check(500 * 161, 161.0)
    assert why is not None and "not complete within 160 s" in why


def test_a_stall_after_good_progress_is_dropped_within_two_windows() -> None:
    w = UploadWatch(POLICY, size=10**9, started=0)
    for t in range(1, 31):
        assert w.check(50_000 * t, float(t)) is None
    stalled = 50_000 * 30
    results = [w.check(stalled, float(t)) for t in range(31, 52)]
    assert any(r is not None and "too slow" in r for r in results)


def test_a_complete_upload_is_never_dropped() -> None:
    w = UploadWatch(POLICY, size=10, started=0)
    assert w.check(10, 10_000.0) is None


@given(st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=200))
def test_an_upload_slower_than_the_rate_never_outlives_grace_plus_two_windows(gains: list[int]) -> None:
    """Whatever it sends, an upload that averages under the minimum is gone by then."""
    w = UploadWatch(POLICY, size=10**12, started=0)
    received = 0
    for t, gain in enumerate(gains, start=1):
        received += min(gain, 999)  # always under 1000 bytes/s
        if w.check(received, float(t)) is not None:
            assert t <= POLICY.grace + 2 * POLICY.window
            return
    assert len(gains) < POLICY.grace + 2 * POLICY.window


def test_one_source_holds_at_most_its_share() -> None:
    r = SourceReservations(per_source=100)
    assert r.admit("a", 60) and not r.admit("a", 60) and r.admit("b", 60)
    r.release("a", 60)
    assert r.admit("a", 100) and r.held("a") == 100
    r.release("a", 100)
    assert r.held("a") == 0
