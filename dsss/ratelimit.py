# -*- test-case-name: tests.unit.test_ratelimit -*-
"""Token buckets keyed by peer, for rate limits at every entry point. Pure: time is passed in.

The table of buckets is bounded: when it is full the least recently used bucket is dropped (a
dropped peer simply starts again with a full bucket), so a flood of distinct sources cannot make
it grow without bound.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `key`'s bucket if it has them."""
        return self.admit(key, now, (cost,)) == 1

    def admit(self, key: Hashable, now: float, costs: Sequence[float]) -> int:
        """Requests arriving together at `now` (a run of packets), in order: take tokens for as
        many leading ones as the bucket holds, refuse the rest (all after the first that does
        not fit). Returns how many were allowed. One table update however long the run."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = 0
        for cost in costs:
            if tokens < cost:
                break
            tokens -= cost
            allowed += 1
        self.refused += len(costs) - allowed
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def tokens(self, key: Hashable, now: float) -> float:
        """The tokens `key`'s bucket holds at `now` (a full bucket for a key not seen), taking none."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - last) * self.rate)

    def __len__(self) -> int:
        return len(self._buckets)
