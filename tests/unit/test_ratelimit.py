from __future__ import annotations

import pytest

from dsss.ratelimit import RateLimiter


def test_burst_then_rate():
    rl = RateLimiter(rate=10, burst=5)
    assert [rl.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert rl.allow("a", 0.05) is False  # half a token
    assert rl.allow("a", 0.1) is True
    assert rl.refused == 2


def test_keys_are_independent():
    rl = RateLimiter(rate=1, burst=1)
    assert rl.allow("flood", 0.0)
    assert not rl.allow("flood", 0.0)
    assert rl.allow("quiet", 0.0)  # one peer's flood does not starve another


def test_tokens_never_exceed_burst():
    rl = RateLimiter(rate=100, burst=2)
    assert rl.allow("a", 0.0)
    assert [rl.allow("a", 1000.0) for _ in range(3)] == [True, True, False]


def test_table_is_bounded():
    rl = RateLimiter(rate=1, burst=1, max_keys=100)
    for i in range(10_000):
        rl.allow(i, 0.0)
    assert len(rl) == 100


def test_cost_and_validation():
    rl = RateLimiter(rate=1000, burst=1000)
    assert rl.allow("a", 0.0, cost=999)
    assert not rl.allow("a", 0.0, cost=2)
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)


def test_admit_takes_a_run_in_one_update_as_allow_would_one_by_one():
    one, run = RateLimiter(rate=1000, burst=5000), RateLimiter(rate=1000, burst=5000)
    costs = [1200] * 6
    assert run.admit("a", 0.0, costs) == sum(one.allow("a", 0.0, c) for c in costs) == 4
    assert run.refused == one.refused == 2
    # Later, the refill is the same too; an empty run takes nothing.
    assert run.admit("a", 1.0, []) == 0
    assert run.admit("a", 1.0, costs) == sum(one.allow("a", 1.0, c) for c in costs)


def test_admit_stops_at_the_first_request_that_does_not_fit():
    rl = RateLimiter(rate=1, burst=1000)
    assert rl.admit("a", 0.0, [600, 600, 100]) == 1  # the small one behind is refused too
    assert rl.refused == 2
    assert rl.allow("a", 0.0, cost=400)  # and its tokens were not taken
