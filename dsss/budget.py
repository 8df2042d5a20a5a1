# -*- test-case-name: tests.unit.test_budget -*-
"""Connection budgets: how many connections one source and everyone together may hold open.

Pure bookkeeping (no Twisted, no clock). The server keeps one budget for its HTTP port and one
for its control port, so a flood of idle HTTP connections cannot use the descriptors that
agents need to rejoin, and sizes both from the process's descriptor limit (`plan_budgets`).
"""

from __future__ import annotations

from dataclasses import dataclass

DESCRIPTOR_RESERVE = 128
"""Descriptors kept outside every budget: listening sockets, the UDP socket, log files, the
thread pool's pipes, and a margin."""


class ConnectionBudget:
    """Counts open connections per source and in all; `admit` says whether one more may open."""

    def __init__(self, total: int, per_source: int) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("a connection budget needs at least one connection in all and per source")
        self.total = total
        self.per_source = per_source
        self.open = 0
        self.refused = 0
        self._by_source: dict[str, int] = {}

    def admit(self, source: str) -> bool:
        """Count a new connection from `source` if it fits; False (and counted as refused) if not."""
        held = self._by_source.get(source, 0)
        if self.open >= self.total or held >= self.per_source:
            self.refused += 1
            return False
        self._by_source[source] = held + 1
        self.open += 1
        return True

    def release(self, source: str) -> None:
        """A connection that `admit` counted has closed."""
        held = self._by_source.get(source, 0)
        if held <= 0:
            return
        if held == 1:
            del self._by_source[source]
        else:
            self._by_source[source] = held - 1
        self.open -= 1

    def held_by(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def sources(self) -> int:
        return len(self._by_source)


class DescriptorLimitError(ValueError):
    """The caps asked for need more descriptors than the process may open."""


@dataclass(frozen=True)
class BudgetPlan:
    """How many connections each port may hold, and the descriptor limit they were sized for."""

    http_total: int
    control_total: int
    limit: int
    """The soft RLIMIT_NOFILE the plan fits in (after raising it towards the hard limit)."""

    @property
    def needed(self) -> int:
        return self.http_total + self.control_total + DESCRIPTOR_RESERVE


DEFAULT_HTTP_CONNECTIONS = 4096
DEFAULT_CONTROL_CONNECTIONS = 16384
HTTP_SHARE = 0.25
"""The share of the descriptors left after the reserve that HTTP gets when the defaults do not
fit: agents' control connections get the rest, so they are never crowded out by HTTP."""


def plan_budgets(
    soft: int, hard: int, http_total: int | None = None, control_total: int | None = None
) -> BudgetPlan:
    """Size both budgets for a process whose descriptor limits are (soft, hard).

    Caps given explicitly must fit under the hard limit (else DescriptorLimitError, with the
    numbers); caps left to their defaults shrink to fit (HTTP_SHARE of what the reserve leaves
    to HTTP, the rest to agents). The returned `limit` is the soft limit the process should set
    (at least `needed`, at most `hard`).
    """
    unlimited = hard < 0  # RLIM_INFINITY
    ceiling = (1 << 20) if unlimited else hard
    if http_total is not None and control_total is not None:
        plan = BudgetPlan(http_total, control_total, 0)
        if plan.needed > ceiling:
            raise DescriptorLimitError(
                f"{http_total} HTTP and {control_total} control connections need {plan.needed} file "
                f"descriptors, but this process may open at most {ceiling}: raise the limit "
                f"(LimitNOFILE= in the systemd unit, ulimit -n) or lower --http-connections/--agent-connections"
            )
        return BudgetPlan(http_total, control_total, max(min(soft, ceiling), plan.needed))
    want_http = http_total if http_total is not None else DEFAULT_HTTP_CONNECTIONS
    want_control = control_total if control_total is not None else DEFAULT_CONTROL_CONNECTIONS
    room = ceiling - DESCRIPTOR_RESERVE
    if want_http + want_control <= room:
        http, control = want_http, want_control
    elif http_total is not None:
        control = room - http_total
        if control < 1:
            raise DescriptorLimitError(
                f"--http-connections {http_total} leaves no file descriptors for agents "
                f"(at most {ceiling} may be open): raise the limit or lower it"
            )
        http = http_total
    elif control_total is not None:
        http = room - control_total
        if http < 1:
            raise DescriptorLimitError(
                f"--agent-connections {control_total} leaves no file descriptors for HTTP "
                f"(at most {ceiling} may be open): raise the limit or lower it"
            )
        control = control_total
    else:
        if room < 2:
            raise DescriptorLimitError(f"a descriptor limit of {ceiling} is too small to run a server")
        http = min(want_http, max(1, int(room * HTTP_SHARE)))
        control = min(want_control, room - http)
    plan = BudgetPlan(http, control, 0)
    return BudgetPlan(http, control, max(min(soft, ceiling), plan.needed))
