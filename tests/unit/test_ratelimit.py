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
