# -*- test-case-name: tests.unit.test_audit -*-
"""Which (agent, part) claims the server audits next, and what an audit's answer means.

Pure: no Twisted, no sockets; time is passed in (`now`, seconds) and nonces come from an
injectable source. The glue (dsss.server.auditor) sends the AUDITs this core picks over the
agents' control connections and reports each answer back.

Every claim (HAVE, or a WHO_HAS "1") is audited:

1. **New claims first**: each agent has a queue of the claims it made since its last audit
   (at most `MAX_NEW_PER_AGENT`; claims beyond it are left to the sweep).
2. **Then a sweep**: each agent's claims are walked in rounds. A round walks a snapshot of the
   agent's claims, taken a bucket at a time (`Claims`: a large agent's claims are never copied
   all at once), and audits every one not proven since the round started; a new round starts
   no sooner than `freshness / 2` after the previous one started. While the rate suffices to
   finish a round within `freshness / 2`, every claim is therefore proven again within
   `freshness` (the gap between two audits of a claim is at most the round period plus the
   round's own length).
3. **Bounded**: at most `rate` audits per second over the whole server (a token bucket of one
   second's worth), at most `per_agent` outstanding audits per agent, and at most
   `SCAN_PER_AUDIT` claims looked at per audit sent: no call walks the whole index.

Audits the server makes at once outside this schedule (`/api/audit`, the repairer's check of
a part's unproven holders) are charged to the same bucket (`charge`), so they slow the sweep
rather than add to the rate.
"""

from __future__ import annotations

import enum
import heapq
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

MAX_NEW_PER_AGENT = 1024
SCAN_PER_AUDIT = 64


class Claims(Protocol):
    """One agent's claims, walked a bucket at a time (dsss.server.registry.ClaimSet)."""

    def __len__(self) -> int: ...
    def bucket_count(self) -> int: ...
    def bucket(self, i: int) -> list[str]:
        """The claims in bucket `i` (a copy); empty past the last bucket."""
        ...


class ClaimSource(Protocol):
    """The location index as the scheduler sees it (dsss.server.registry.Registry)."""

    def claims_of(self, agent_id: str) -> Claims:
        """The parts the agent claims now (empty if it is not registered)."""
        ...

    def is_claimed(self, agent_id: str, block: str) -> bool: ...

    def proven_at(self, agent_id: str, block: str) -> float | None:
        """When the agent last passed an audit of this part, or None."""
        ...


@dataclass(frozen=True)
class AuditJob:
    agent_id: str
    block: str
    nonce: bytes
    reason: str  # "new" or "sweep"


@dataclass
class _Agent:
    new: deque[str] = field(default_factory=deque)
    snapshot: list[str] = field(default_factory=list)  # the bucket of claims being walked
    bucket: int = 0x7FFFFFFF  # which bucket that is (past the last: the next walk starts a round)
    pos: int = 0
    round_start: float = float("-inf")
    next_round: float = float("-inf")
    outstanding: int = 0
    in_new: bool = False
    in_sweep: bool = False
    parked: bool = False  # in the heap of agents waiting for their next round
    joined: float = float("-inf")


def random_nonce() -> bytes:
    return os.urandom(16)


class AuditScheduler:
    def __init__(
        self,
        claims: ClaimSource,
        *,
        rate: float,
        freshness: float,
        per_agent: int = 1,
        nonces: Callable[[], bytes] = random_nonce,
    ) -> None:
        if rate <= 0 or freshness <= 0 or per_agent < 1:
            raise ValueError("rate and freshness must be positive, per_agent at least 1")
        self.claims = claims
        self.rate = rate
        self.freshness = freshness
        self.per_agent = per_agent
        self.nonces = nonces
        self.burst = max(1.0, rate)
        self._tokens = 1.0
        self._last: float | None = None
        self._agents: dict[str, _Agent] = {}
        self._new_ready: deque[str] = deque()
        self._sweep_ready: deque[str] = deque()
        self._waiting: list[tuple[float, str]] = []  # (next round, agent), a heap
        self.sent = {"new": 0, "sweep": 0}
        self.rounds = 0

    # --- events --------------------------------------------------------------------------------

    def agent_joined(self, agent_id: str, now: float) -> None:
        """The agent registered. Its first sweep round counts from now: claims its new-claims
        queue proves meanwhile are not audited again in that round."""
        st = self._agents.get(agent_id)
        if st is None:
            st = self._agents[agent_id] = _Agent(joined=now)
        self._offer_sweep(agent_id, st)

    def agent_left(self, agent_id: str) -> None:
        """Forget the agent (its entries in the ready queues are skipped when reached)."""
        self._agents.pop(agent_id, None)

    def claimed(self, agent_id: str, block: str) -> None:
        """The agent claimed the part (HAVE, or WHO_HAS "1"): audit it soon."""
        st = self._agents.get(agent_id)
        if st is None:
            return
        if len(st.new) >= MAX_NEW_PER_AGENT:
            # Left to the sweep, whose next round for this agent may start at once.
            st.next_round = float("-inf")
            if st.parked:
                st.parked = False
                self._offer_sweep(agent_id, st)
            return
        st.new.append(block)
        if not st.in_new and st.outstanding < self.per_agent:
            st.in_new = True
            self._new_ready.append(agent_id)

    def finished(self, agent_id: str) -> None:
        """An audit this scheduler sent got its answer (or gave up)."""
        st = self._agents.get(agent_id)
        if st is None:
            return
        st.outstanding = max(0, st.outstanding - 1)
        if st.new and not st.in_new:
            st.in_new = True
            self._new_ready.append(agent_id)
        self._offer_sweep(agent_id, st)

    def charge(self, now: float, count: int) -> None:
        """Audits made outside the schedule: they spend the same budget (down to one second's
        worth in debt)."""
        self._refill(now)
        self._tokens = max(-self.burst, self._tokens - count)

    # --- the schedule ---------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
        elif now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def _offer_sweep(self, agent_id: str, st: _Agent) -> None:
        if st.in_sweep or st.parked or st.outstanding >= self.per_agent:
            return
        st.in_sweep = True
        self._sweep_ready.append(agent_id)

    def due(self, now: float) -> list[AuditJob]:
        """The audits to send now."""
        self._refill(now)
        while self._waiting and self._waiting[0][0] <= now:
            _, agent_id = heapq.heappop(self._waiting)
            st = self._agents.get(agent_id)
            if st is not None and st.parked:
                st.parked = False
                self._offer_sweep(agent_id, st)
        jobs: list[AuditJob] = []
        scan_budget = SCAN_PER_AUDIT * max(1, int(self._tokens))
        scan_budget = self._serve(self._new_ready, now, jobs, scan_budget, new=True)
        self._serve(self._sweep_ready, now, jobs, scan_budget, new=False)
        return jobs

    def _serve(self, ready: deque[str], now: float, jobs: list[AuditJob], budget: int, *, new: bool) -> int:
        for _ in range(len(ready)):
            if self._tokens < 1 or budget <= 0 or not ready:
                break
            agent_id = ready.popleft()
            st = self._agents.get(agent_id)
            if st is None:
                continue
            if new:
                st.in_new = False
            else:
                st.in_sweep = False
            if st.outstanding >= self.per_agent:
                continue  # offered again when an answer comes in
            block, scanned, more = (self._next_new if new else self._next_sweep)(agent_id, st, now, budget)
            budget -= scanned
            if block is not None:
                self._tokens -= 1
                st.outstanding += 1
                self.sent["new" if new else "sweep"] += 1
                jobs.append(AuditJob(agent_id, block, self.nonces(), "new" if new else "sweep"))
            if st.outstanding >= self.per_agent:
                continue
            if new and st.new:
                st.in_new = True
                ready.append(agent_id)
            elif not new:
                if more:
                    st.in_sweep = True
                    ready.append(agent_id)
                elif not st.parked:
                    st.parked = True
                    heapq.heappush(self._waiting, (st.next_round, agent_id))
        return budget

    def _next_new(self, agent_id: str, st: _Agent, now: float, budget: int) -> tuple[str | None, int, bool]:
        scanned = 0
        while st.new and scanned < budget:
            block = st.new.popleft()
            scanned += 1
            if not self.claims.is_claimed(agent_id, block):
                continue  # withdrawn (GONE) or dropped meanwhile
            proven = self.claims.proven_at(agent_id, block)
            if proven is not None and now - proven < self.freshness / 2:
                continue  # proven recently (a repeated claim)
            return block, scanned, bool(st.new)
        return None, scanned, bool(st.new)

    def _next_sweep(self, agent_id: str, st: _Agent, now: float, budget: int) -> tuple[str | None, int, bool]:
        scanned = 0
        while scanned < budget:
            if st.pos >= len(st.snapshot):
                claims = self.claims.claims_of(agent_id)
                st.bucket += 1
                if st.bucket >= claims.bucket_count():
                    # A new round, from the first bucket.
                    if now < st.next_round:
                        return None, scanned, False
                    st.bucket = 0
                    first = st.round_start == float("-inf")
                    st.round_start = st.joined if first else now
                    st.next_round = now + self.freshness / 2
                    self.rounds += 1
                    if not claims:
                        st.bucket = claims.bucket_count()
                        st.snapshot, st.pos = [], 0
                        return None, scanned, False
                st.snapshot = claims.bucket(st.bucket)
                st.pos = 0
                scanned += 1  # copying a bucket costs like looking at a claim
                continue
            block = st.snapshot[st.pos]
            st.pos += 1
            scanned += 1
            if not self.claims.is_claimed(agent_id, block):
                continue
            proven = self.claims.proven_at(agent_id, block)
            if proven is not None and proven >= st.round_start:
                continue  # proven during this round already
            return block, scanned, True
        return None, scanned, True

    def status(self) -> dict[str, int]:
        return {
            "agents": len(self._agents),
            "new-queued": sum(len(st.new) for st in self._agents.values()),
            "sent-new": self.sent["new"],
            "sent-sweep": self.sent["sweep"],
            "rounds": self.rounds,
        }


# --- what an answer means ---------------------------------------------------------------------


class Verdict(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"  # a wrong or missing proof: a strike
    UNANSWERED = "unanswered"  # no answer in time, busy, an error: inconclusive


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    size: int | None = None  # the proven size (PASSED)
    reason: str = ""


class ProofChecker(Protocol):
    def __call__(self, address: str, size: int, nonce: bytes, proof: bytes) -> None:
        """Raise if the proof does not prove `size` bytes at `address` for this nonce."""
        ...


def judge(
    address: str,
    nonce: bytes,
    *,
    proof: tuple[int, bytes] | None = None,
    error: tuple[str, str] | None = None,
    known_size: int | None = None,
    max_size: int,
    verify: ProofChecker,
) -> Outcome:
    """What an answer to `AUDIT` means: a `PROOF size bytes` (`proof`), an `ERROR code text`
    (`error`), or neither (no answer in time, the connection lost).

    `address` is the part's address (a share ID without its `s`); `known_size` the part's proven
    size, if any: a proof of another size is refused whatever its bytes (one part, one size)."""
    if proof is not None:
        size, data = proof
        if size > max_size:
            return Outcome(Verdict.FAILED, reason=f"claims a size of {size} bytes, more than a part can be")
        if known_size is not None and size != known_size:
            return Outcome(Verdict.FAILED, reason=f"says {size} bytes, but the part is {known_size} bytes")
        try:
            verify(address, size, nonce, data)
        except Exception as e:  # the checker's error says why
            return Outcome(Verdict.FAILED, reason=f"wrong proof: {e}")
        return Outcome(Verdict.PASSED, size=size)
    if error is not None:
        code, text = error
        if code == "not-found":
            return Outcome(Verdict.FAILED, reason="does not have it")
        return Outcome(Verdict.UNANSWERED, reason=f"{code} {text}".strip())
    return Outcome(Verdict.UNANSWERED, reason="no answer")
