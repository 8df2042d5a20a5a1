# -*- test-case-name: tests.unit.test_reputation -*-
"""Each agent identity's audit record: passed, failed, strikes, vetting and disqualification.

Pure: no Twisted, no clock (every method that depends on time takes `now`), no I/O. Records are
kept by agent id, so an agent that reconnects (or registers again after a restart of its own)
finds its record as it left it. They live in the server's memory: a restart of the server
forgets them.

The rules, in one place (docs/operations.md quotes them):

- **Vetted**: an agent that has passed at least `VETTING_AUDITS` audits. Placement gives
  unvetted agents only a bounded share of new placements (dsss.server.placement).
- **Strike**: a failed audit of a part the agent claimed (a wrong proof, `not-found`, a size that
  contradicts the part's proven size), a claim whose size contradicts the proven size, or
  `UNANSWERED_STRIKE` audits in a row left unanswered (timeouts, `busy`, errors).
- **Score**: an exponentially weighted pass ratio, `alpha / (alpha + beta)`: each audit first
  multiplies both by `SCORE_MEMORY` (so the last ~50 audits weigh most), then adds 1 to `alpha`
  for a pass or to `beta` for a strike. A new agent starts at alpha 1, beta 0.
- **Disqualified**: an agent with at least `DISQUALIFY_MIN_STRIKES` strikes whose score fell
  below `DISQUALIFY_SCORE`. It stays disqualified for as long as the server runs: its claims
  are ignored, it gets no placements, and its registrations are refused.

An honest agent that loses one part to bit rot among many it proves keeps a score near 1; an
agent that keeps half of what it acknowledged is disqualified after its third failed audit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

VETTING_AUDITS = 10
DISQUALIFY_MIN_STRIKES = 3
DISQUALIFY_SCORE = 0.9
SCORE_MEMORY = 0.98
UNANSWERED_STRIKE = 3
# Records kept in memory: agents that are not disqualified beyond MAX_RECORDS are forgotten least
# recently heard first (they start again as new, unvetted agents); disqualified ones are kept up to
# MAX_DISQUALIFIED, so that flooding the server with new identities cannot wash one clean.
MAX_RECORDS = 200_000
MAX_DISQUALIFIED = 1_000_000


@dataclass
class AgentReputation:
    agent_id: str
    audits_passed: int = 0
    audits_failed: int = 0  # strikes
    unanswered: int = 0  # audits in a row without an answer
    alpha: float = 1.0
    beta: float = 0.0
    last_pass: float | None = None
    last_failure: float | None = None
    last_failure_reason: str | None = None
    disqualified: bool = False
    disqualified_at: float | None = None

    @property
    def score(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.audits_passed,
            "failed": self.audits_failed,
            "score": round(self.score, 4),
            "vetted": self.audits_passed >= VETTING_AUDITS,
            "disqualified": self.disqualified,
            "last-failure": self.last_failure_reason,
        }


class Reputation:
    """Every agent's record (implements dsss.server.placement.ReputationView)."""

    def __init__(self, max_records: int = MAX_RECORDS, max_disqualified: int = MAX_DISQUALIFIED) -> None:
        self.max_records = max_records
        self.max_disqualified = max_disqualified
        self._records: OrderedDict[str, AgentReputation] = OrderedDict()
        self._disqualified: OrderedDict[str, AgentReputation] = OrderedDict()

    # --- ReputationView --------------------------------------------------------------------------

    def is_vetted(self, agent_id: str) -> bool:
        rec = self._records.get(agent_id)
        return rec is not None and rec.audits_passed >= VETTING_AUDITS

    def is_disqualified(self, agent_id: str) -> bool:
        return agent_id in self._disqualified

    # --- records -------------------------------------------------------------------------------

    def get(self, agent_id: str) -> AgentReputation | None:
        return self._disqualified.get(agent_id) or self._records.get(agent_id)

    def _record(self, agent_id: str) -> AgentReputation:
        rec = self._disqualified.get(agent_id)
        if rec is not None:
            return rec
        rec = self._records.get(agent_id)
        if rec is None:
            rec = AgentReputation(agent_id)
            self._records[agent_id] = rec
            while len(self._records) > self.max_records:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(agent_id)
        return rec

    def seen(self, agent_id: str) -> AgentReputation:
        """The agent registered (or was heard from): its record, kept from forgetting."""
        return self._record(agent_id)

    def passed(self, agent_id: str, now: float) -> AgentReputation:
        rec = self._record(agent_id)
        rec.alpha = rec.alpha * SCORE_MEMORY + 1.0
        rec.beta *= SCORE_MEMORY
        rec.audits_passed += 1
        rec.unanswered = 0
        rec.last_pass = now
        return rec

    def strike(self, agent_id: str, reason: str, now: float) -> bool:
        """A failed audit (or a conflicting claim). Returns True if this strike disqualified the
        agent (the caller then drops it)."""
        rec = self._record(agent_id)
        rec.alpha *= SCORE_MEMORY
        rec.beta = rec.beta * SCORE_MEMORY + 1.0
        rec.audits_failed += 1
        rec.unanswered = 0
        rec.last_failure = now
        rec.last_failure_reason = reason
        if rec.disqualified:
            return False
        if rec.audits_failed >= DISQUALIFY_MIN_STRIKES and rec.score < DISQUALIFY_SCORE:
            self.disqualify(agent_id, now)
            return True
        return False

    def unanswered(self, agent_id: str, reason: str, now: float) -> tuple[bool, bool]:
        """An audit the agent did not answer (timeout, busy, an error). Returns (struck,
        disqualified): every UNANSWERED_STRIKE-th one in a row is a strike."""
        rec = self._record(agent_id)
        rec.unanswered += 1
        if rec.unanswered < UNANSWERED_STRIKE:
            return False, False
        return True, self.strike(agent_id, f"{UNANSWERED_STRIKE} audits in a row unanswered ({reason})", now)

    def disqualify(self, agent_id: str, now: float) -> None:
        rec = self._record(agent_id)
        if rec.disqualified:
            return
        rec.disqualified = True
        rec.disqualified_at = now
        self._records.pop(agent_id, None)
        self._disqualified[agent_id] = rec
        while len(self._disqualified) > self.max_disqualified:
            self._disqualified.popitem(last=False)

    def counts(self) -> dict[str, int]:
        return {
            "agents-known": len(self._records) + len(self._disqualified),
            "vetted": sum(1 for r in self._records.values() if r.audits_passed >= VETTING_AUDITS),
            "disqualified": len(self._disqualified),
        }
