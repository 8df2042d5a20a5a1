# -*- test-case-name: tests.unit.test_relay -*-
"""The relay table: which client/agent pairs the server forwards packets for. Pure, clock-free.

A pair is authorized by an introduction key the server itself handed to that client for that
agent (so only a client that was introduced can use the relay, and only towards that agent). It
stays open while packets flow and expires after `idle` seconds of silence. Each pair may move at
most `limit` bytes per second (a token bucket; the excess is dropped, and QUIC's congestion
control slows down to fit).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from dsss.model import PeerAddress
from dsss.ratelimit import RateLimiter

IDLE = 60.0
MAX_PAIRS = 10_000


@dataclass
class _Pair:
    last: float
    bytes: int = 0


class RelayTable:
    def __init__(self, limit: float, *, idle: float = IDLE, max_pairs: int = MAX_PAIRS) -> None:
        self.limit = limit
        self.idle = idle
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[PeerAddress, PeerAddress], _Pair] = OrderedDict()
        self._limiter = RateLimiter(rate=limit, burst=max(limit / 4, 256 * 1024), max_keys=max_pairs)
        self.relayed_bytes = 0
        self.dropped_bytes = 0
        self._agent_last: dict[PeerAddress, float] = {}

    def authorize(self, client: PeerAddress, agent: PeerAddress, now: float) -> None:
        key = (client, agent)
        pair = self._pairs.pop(key, None) or _Pair(now)
        pair.last = now
        self._pairs[key] = pair
        while len(self._pairs) > self.max_pairs:
            self._pairs.popitem(last=False)

    def forward(self, src: PeerAddress, dst: PeerAddress, size: int, now: float) -> bool:
        """Whether a packet of `size` bytes from src may go to dst (in either direction)."""
        return self.forward_run(src, dst, (size,), now) == 1

    def forward_run(self, src: PeerAddress, dst: PeerAddress, sizes: Sequence[int], now: float) -> int:
        """How many of a run of packets from src to dst (arriving together, in order) may go:
        the leading ones within the pair's limit; the rest are dropped (counted)."""
        key = (src, dst)
        pair = self._pairs.get(key)
        agent = dst
        if pair is None:
            key = (dst, src)
            pair = self._pairs.get(key)
            agent = src
        if pair is None:
            return 0
        if now - pair.last > self.idle:
            del self._pairs[key]
            return 0
        allowed = self._limiter.admit(key, now, sizes)
        if allowed < len(sizes):
            self.dropped_bytes += sum(sizes[allowed:])
        if not allowed:
            return 0
        moved = sum(sizes[:allowed])
        pair.last = now
        pair.bytes += moved
        self.relayed_bytes += moved
        self._agent_last[agent] = now
        if len(self._agent_last) > self.max_pairs:
            cutoff = now - self.idle
            self._agent_last = {a: t for a, t in self._agent_last.items() if t >= cutoff}
        return allowed

    def recently_relayed(self, agent: PeerAddress, now: float) -> bool:
        last = self._agent_last.get(agent)
        return last is not None and now - last <= self.idle

    def __len__(self) -> int:
        return len(self._pairs)
