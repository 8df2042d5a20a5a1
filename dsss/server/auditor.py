# -*- test-case-name: tests.adapters.test_server_audit -*-
"""The server's audits over the agents' control connections: send, check, record.

A thin adapter around the pure cores: dsss.server.audit picks the claims to audit (and says
what an answer means), dsss.proofs checks each PROOF, dsss.server.registry records when each
claim was proven, dsss.server.reputation keeps each agent's record. Here the AUDITs are sent
(`AUDIT <hash> <nonce>`), their answers awaited, and the outcome recorded:

- passed: the claim is proven now, and the part's size is the proven size;
- failed (a wrong proof, `not-found`, another size than the proven one): the claim is dropped
  and, if the agent had claimed the part, it gets a strike;
- unanswered (a timeout, an error other than `busy`): the claim stays unproven; every third
  in a row is a strike and drops the claim. `busy` is not counted: an agent answers at most a
  few audits at once, and anyone can ask for audits through `/api/audit`.

An agent whose strikes disqualify it is dropped at once (its claims with it: their parts are
repaired elsewhere) and may not register again while the server runs.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from dsss import proofs
from dsss.errors import DSSSError, Timeout
from dsss.server.audit import (
    AuditScheduler,
    Outcome,
    ProofChecker,
    Verdict,
    judge,
    random_nonce,
)
from dsss.server.registry import AgentRecord, Registry
from dsss.server.reputation import Reputation
from dsss.server.settings import QuerySettings
from dsss.wire import control as wc
from dsss.wire.transfer import MAX_PART



class AuditingServer(Protocol):
    """What the auditor uses of the server (dsss.server.service.DiscoveryServer)."""

    @property
    def config(self) -> QuerySettings: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def reputation(self) -> Reputation: ...

    def now(self) -> float: ...
    def disqualify(self, rec: AgentRecord, reason: str) -> None: ...

log = Logger()

# Seconds between the scheduler's turns.
AUDIT_TICK = 0.1
# Audits at once towards one agent on behalf of /api/audit and the repairer (the agent itself
# answers a few at a time and says `busy` beyond); more wait their turn, up to URGENT_QUEUE.
URGENT_PER_AGENT = 3
URGENT_QUEUE = 256


class _Slots:
    """A per-agent bound on urgent audits: at most `limit` at once, `queue` more waiting."""

    def __init__(self, limit: int, queue: int) -> None:
        self.limit = limit
        self.queue = queue
        self.running = 0
        self.waiting: list[defer.Deferred[None]] = []

    def acquire(self) -> defer.Deferred[None]:
        if self.running < self.limit:
            self.running += 1
            return defer.succeed(None)
        if len(self.waiting) >= self.queue:
            return defer.fail(Busy("too many audits of this agent are waiting"))
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append(d)
        return d

    def release(self) -> None:
        if self.waiting:
            self.waiting.pop(0).callback(None)
        else:
            self.running -= 1


class Busy(DSSSError):
    code = "busy"


class Auditor:
    def __init__(
        self,
        server: AuditingServer,
        *,
        rate: float,
        freshness: float,
        verify: ProofChecker = proofs.verify,
        nonces: Callable[[], bytes] = random_nonce,
    ) -> None:
        self.server = server
        self.freshness = freshness
        self.verify = verify
        self.nonces = nonces
        self.scheduler = AuditScheduler(server.registry, rate=rate, freshness=freshness, nonces=nonces)
        self._urgent: dict[str, _Slots] = {}
        # Audits under way, by claim: who else waits for each one's outcome.
        self._inflight: dict[tuple[str, str], list[defer.Deferred[Outcome]]] = {}
        self.stats = {"passed": 0, "failed": 0, "unanswered": 0, "disqualified": 0, "size-conflicts": 0}

    # --- membership and claims -----------------------------------------------------------------

    def joined(self, rec: AgentRecord) -> None:
        self.server.reputation.seen(rec.agent_id)
        self.scheduler.agent_joined(rec.agent_id, self.server.now())

    def left(self, rec: AgentRecord) -> None:
        self.scheduler.agent_left(rec.agent_id)
        self._urgent.pop(rec.agent_id, None)

    def claimed(self, rec: AgentRecord, blocks: list[str]) -> None:
        """New claims (HAVE, WHO_HAS "1"): those not proven recently are audited first."""
        now = self.server.now()
        for block in blocks:
            at = rec.proven.get(block)
            if at is None or now - at >= self.freshness / 2:
                self.scheduler.claimed(rec.agent_id, block)

    def size_conflicts(self, rec: AgentRecord, blocks: list[str], sizes: dict[str, int | None]) -> None:
        """Claims of a size other than the part's proven size: a strike each; nothing changes."""
        registry = self.server.registry
        for block in blocks:
            self.stats["size-conflicts"] += 1
            reason = f"claimed {sizes.get(block)} bytes for a part proven to be {registry.size_of(block)}"
            log.info("agent {agent}: {reason}", agent=rec.agent_id[:16], reason=reason)
            if self.server.reputation.strike(rec.agent_id, reason, self.server.now()):
                self.server.disqualify(rec, reason)
                return

    # --- the schedule --------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.server.now()
        registry = self.server.registry
        for job in self.scheduler.due(now):
            rec = registry.get(job.agent_id)
            if rec is None:
                self.scheduler.finished(job.agent_id)
                continue
            d = self._audit(rec, job.block, job.nonce)
            d.addBoth(lambda _, a: self.scheduler.finished(a), job.agent_id)

    async def audit_now(self, rec: AgentRecord, block: str, *, charge: bool = False) -> Outcome:
        """Audit one claim at once (for /api/audit and the repairer); an audit of the same
        claim already under way is shared. With `charge`, it is paid from the scheduler's
        budget."""
        key = (rec.agent_id, block)
        waiters = self._inflight.get(key)
        if waiters is not None:
            shared: defer.Deferred[Outcome] = defer.Deferred()
            waiters.append(shared)
            return await shared
        if charge:
            self.scheduler.charge(self.server.now(), 1)
        slots = self._urgent.setdefault(rec.agent_id, _Slots(URGENT_PER_AGENT, URGENT_QUEUE))
        try:
            await slots.acquire()
        except Busy as e:
            return Outcome(Verdict.UNANSWERED, reason=str(e))
        try:
            return await self._audit(rec, block, self.nonces())
        finally:
            slots.release()

    def _audit(self, rec: AgentRecord, block: str, nonce: bytes) -> defer.Deferred[Outcome]:
        """Send one AUDIT and record its outcome; fires with the outcome (never fails)."""
        conn = rec.handle
        timeout = self.server.config.query_timeout
        key = (rec.agent_id, block)
        waiters: list[defer.Deferred[Outcome]] = []
        if key not in self._inflight:
            self._inflight[key] = waiters
        d: defer.Deferred[Outcome] = defer.ensureDeferred(self._ask(conn, block, nonce, timeout, rec))

        def done(outcome: Outcome) -> Outcome:
            if self._inflight.get(key) is waiters:
                del self._inflight[key]
            for w in waiters:
                w.callback(outcome)
            return outcome

        def broken(f: Any) -> Outcome:
            log.failure("an audit failed unexpectedly", f)
            return Outcome(Verdict.UNANSWERED, reason="internal error")

        d.addErrback(broken)
        d.addCallback(done)
        return d

    async def _ask(self, conn: Any, block: str, nonce: bytes, timeout: float, rec: AgentRecord) -> Outcome:
        registry = self.server.registry
        known = registry.size_of(block) if registry.size_proven(block) else None
        try:
            reply = await conn.request(wc.Audit(block, nonce), timeout)
        except Timeout:
            outcome = Outcome(Verdict.UNANSWERED, reason="no answer in time")
        except DSSSError as e:
            # The connection went away: the claims went with it, nothing to record.
            return Outcome(Verdict.UNANSWERED, reason=f"not connected ({e.code})")
        else:
            if isinstance(reply, wc.Proof):
                outcome = judge(block, nonce, proof=(reply.size, reply.proof), known_size=known,
                                max_size=MAX_PART, verify=self.verify)
            elif isinstance(reply, wc.Error):
                outcome = judge(block, nonce, error=(reply.code, reply.text), known_size=known,
                                max_size=MAX_PART, verify=self.verify)
            else:
                outcome = Outcome(Verdict.UNANSWERED, reason=f"answered {type(reply).__name__}")
        self._record(rec, block, outcome)
        return outcome

    def _record(self, rec: AgentRecord, block: str, outcome: Outcome) -> None:
        server = self.server
        registry = server.registry
        if registry.get(rec.agent_id) is not rec:
            return  # gone (or registered again) meanwhile
        now = server.now()
        claimed = block in rec.blocks
        if outcome.verdict is Verdict.PASSED:
            assert outcome.size is not None
            self.stats["passed"] += 1
            registry.proved(rec, block, outcome.size, now)
            server.reputation.passed(rec.agent_id, now)
            return
        if outcome.verdict is Verdict.FAILED:
            self.stats["failed"] += 1
            if not claimed:
                return  # asked about a part it never claimed (/api/audit): no strike
            log.info("agent {agent} failed the audit of {block}: {reason}",
                     agent=rec.agent_id[:16], block=block[:16], reason=outcome.reason)
            registry.gone(rec, [block])
            if server.reputation.strike(rec.agent_id, outcome.reason, now):
                server.disqualify(rec, outcome.reason)
            return
        self.stats["unanswered"] += 1
        if not claimed or outcome.reason.startswith("busy"):
            return
        struck, disqualified = server.reputation.unanswered(rec.agent_id, outcome.reason, now)
        if struck:
            registry.gone(rec, [block])
        if disqualified:
            server.disqualify(rec, "audits unanswered")

    def status(self) -> dict[str, Any]:
        return {**self.stats, **self.scheduler.status(), "rate": self.scheduler.rate,
                "freshness": self.freshness, **self.server.reputation.counts()}
