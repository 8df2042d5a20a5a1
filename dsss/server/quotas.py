# -*- test-case-name: tests.unit.test_quotas -*-
"""Quotas: bytes leased per client (restricted server), bytes placed per address (open). Sans-I/O.

Agents report, per lease owner (a lease public key, dsss/leases.py), how many bytes of stored
blocks that owner's live leases keep there (`LEASED`). A listed client names its lease key in
its (signed) placement requests; the first client to name a key owns it, and a client has one
key. A client's usage is what live agents report for its key, each replica counted, plus the
bytes placed on each agent that this agent has not reported yet (for at most PENDING_TTL
seconds: an upload that never happens stops counting then); a placement that would take it past
its quota is refused with QuotaExceeded. Releases (`rm`) and expiries lower the agents' reports,
so the quota comes back.

An open server (no client list) cannot tell clients apart, so it bounds what one source address
may place: the bytes of every copy it asks agents to take (`OpenBound`), at most a day's
allowance at once, coming back evenly over a day.
"""

from __future__ import annotations

import re
from typing import Iterable

from dsss.errors import AccessDenied, BadRequest, QuotaExceeded
from dsss.ratelimit import RateLimiter

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")

DAY = 86400.0
DEFAULT_OPEN_QUOTA = 64 * 1024**3
"""Bytes one source address may place per day on an open server, every copy counted."""

PENDING_TTL = 30.0
"""Seconds bytes placed on an agent count against a client unless that agent reports them
sooner (an upload released within the agent's one-second report interval is never reported:
it stops counting after this long)."""


class QuotaBook:
    """Reports by agent and owner, lease keys by client, and the check at placement."""

    def __init__(self, quota: int | None, per_client: dict[str, int] | None = None) -> None:
        self.quota = quota
        self.per_client = dict(per_client or {})
        self.reports: dict[str, dict[str, int]] = {}
        self.owner_of: dict[str, str] = {}  # lease key -> client
        self.key_of: dict[str, str] = {}  # client -> lease key
        self.refused = 0
        # (agent id, client) -> [bytes placed there not yet reported, when they stop counting]
        self.pending: dict[tuple[str, str], list[float]] = {}

    @property
    def enabled(self) -> bool:
        return self.quota is not None or bool(self.per_client)

    def limit(self, client: str) -> int | None:
        return self.per_client.get(client, self.quota)

    def report(self, agent_id: str, owner: str, leased: int) -> None:
        owners = self.reports.setdefault(agent_id, {})
        before = owners.get(owner, 0)
        if leased > 0:
            owners[owner] = leased
        else:
            owners.pop(owner, None)
        client = self.owner_of.get(owner)
        pending = self.pending.get((agent_id, client)) if client is not None else None
        if pending is not None and leased > before:
            pending[0] = max(0.0, pending[0] - (leased - before))  # placed bytes now reported

    def leased(self, live_agents: Iterable[str]) -> int:
        """Bytes the `live_agents` report kept by live leases, every owner and replica counted."""
        return sum(sum(self.reports.get(a, {}).values()) for a in live_agents)

    def forget_agent(self, agent_id: str) -> None:
        self.reports.pop(agent_id, None)

    def bind(self, client: str, lease_key: str) -> None:
        """`client` names `lease_key` as its own; AccessDenied if another client owns it, or
        this client named another one."""
        if not _HEX64.match(lease_key):
            raise BadRequest("lease-key must be 64 lowercase hex characters")
        owner = self.owner_of.get(lease_key)
        if owner is not None and owner != client:
            raise AccessDenied("this lease key belongs to another client")
        key = self.key_of.get(client)
        if key is not None and key != lease_key:
            raise AccessDenied("this client already uses another lease key")
        self.owner_of[lease_key] = client
        self.key_of[client] = lease_key

    def used(self, client: str, live_agents: Iterable[str], now: float) -> int:
        """Bytes counted against `client`: reported by live agents, and placed not yet reported."""
        key = self.key_of.get(client)
        if key is None:
            return 0
        live = set(live_agents)
        reported = sum(self.reports.get(a, {}).get(key, 0) for a in live)
        placed = 0.0
        for (agent, who), (n, until) in list(self.pending.items()):
            if until <= now:
                del self.pending[(agent, who)]
            elif who == client and agent in live:
                placed += n
        return reported + int(placed)

    def check(self, client: str, lease_key: str | None, placements: list[tuple[str, int]],
              live_agents: Iterable[str], now: float) -> None:
        """Refuse (QuotaExceeded) placements (agent id, bytes) that would take `client` past
        its quota, else count them as pending; binds its lease key first."""
        limit = self.limit(client)
        if limit is None:
            return
        if lease_key is None:
            raise BadRequest("this server counts quotas: placement requests must name lease-key")
        self.bind(client, lease_key)
        adding = sum(n for _, n in placements)
        used = self.used(client, live_agents, now)
        if used + adding > limit:
            self.refused += 1
            raise QuotaExceeded(
                f"quota exceeded: {used} of {limit} bytes leased, and this needs {adding} more "
                f"(`rm` files you no longer need, or ask the operator for more)")
        for agent, n in placements:
            entry = self.pending.setdefault((agent, client), [0.0, 0.0])
            entry[0] += n
            entry[1] = now + PENDING_TTL


def _size(n: float) -> str:
    value, unit = float(n), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def _duration(seconds: float) -> str:
    seconds = max(1, int(seconds + 0.999))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{(seconds + 59) // 60} min"
    return f"{seconds // 3600} h {(seconds % 3600 + 59) // 60} min"


class OpenBound:
    """Bytes placed per source address on an open server: a bucket of `per_day` bytes per
    address that refills evenly over a day (a full day's allowance at once at most)."""

    def __init__(self, per_day: int, max_keys: int = 65536) -> None:
        if per_day <= 0:
            raise ValueError("the open-server bound must be positive")
        self.per_day = per_day
        self._bucket = RateLimiter(per_day / DAY, per_day, max_keys)
        self.refused = 0

    def check(self, source: str | None, placed: int, now: float) -> None:
        """Count `placed` bytes against `source`, or refuse them all with QuotaExceeded (saying
        the bound, what is left, and when enough comes back)."""
        if placed <= 0:
            return
        if self._bucket.allow(source, now, placed):
            return
        self.refused += 1
        left = self._bucket.tokens(source, now)
        bound = (f"this open server takes at most {_size(self.per_day)} a day of uploads from one "
                 f"address, every copy counted")
        if placed > self.per_day:
            raise QuotaExceeded(f"upload bound: {bound}, and this request alone places {_size(placed)}")
        wait = (placed - left) / self._bucket.rate
        raise QuotaExceeded(
            f"upload bound reached: {bound}; {_size(left)} is left now and this needs {_size(placed)}. "
            f"Enough comes back in {_duration(wait)} (the whole allowance within a day without "
            f"uploads); the server's operator sets the bound (--open-quota)")
