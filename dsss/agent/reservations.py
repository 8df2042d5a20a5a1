# -*- test-case-name: tests.unit.test_reservations -*-
"""Space reserved by uploads in progress: held only while an upload makes progress.

Pure bookkeeping; every decision takes `now`. An upload reserves its announced size when its
header arrives. It keeps the reservation only while it keeps up:

- after a grace period, at least `min_rate` bytes per second over every `window` seconds;
- all of it within an overall deadline derived from its size (`base_deadline + size /
  deadline_rate`);
- one source (the uploader's IP address) holds at most `per_source` bytes reserved at once.

An upload that falls behind is dropped by its caller: its partial file deleted and its
reservation freed. A header followed by a byte now and then therefore holds its space for
`grace + window` seconds, not for ever.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UploadPolicy:
    """The limits an upload in progress must keep to hold its reservation."""

    grace: float = 10.0
    """Seconds after the header before the rate is checked (a handshake, a slow start)."""
    window: float = 10.0
    """Seconds over which the rate is measured once the grace period is over."""
    min_rate: float = 32 * 1024
    """Bytes per second an upload must average over each window."""
    base_deadline: float = 60.0
    deadline_rate: float = 128 * 1024
    """The whole upload must arrive within base_deadline + size / deadline_rate seconds."""
    per_source: int = 256 * 1024 * 1024
    """Bytes that uploads from one IP address may hold reserved at once."""

    def deadline(self, size: int) -> float:
        return self.base_deadline + size / self.deadline_rate


class UploadWatch:
    """One upload's progress against the policy."""

    def __init__(self, policy: UploadPolicy, size: int, started: float) -> None:
        self.policy = policy
        self.size = size
        self.started = started
        self._mark_time = started + policy.grace
        self._mark_bytes = 0

    def check(self, received: int, now: float) -> str | None:
        """Why the upload must be dropped now, or None while it keeps up."""
        if received >= self.size:
            return None
        p = self.policy
        if now - self.started > p.deadline(self.size):
            return f"not complete within {p.deadline(self.size):.0f} s ({received} of {self.size} bytes)"
        if now < self._mark_time:
            return None
        if now - self._mark_time < p.window:
            return None
        got = received - self._mark_bytes
        if got < p.min_rate * p.window:
            return (
                f"too slow: {got} bytes in the last {p.window:.0f} s "
                f"(at least {p.min_rate * p.window:.0f} needed)"
            )
        self._mark_time = now
        self._mark_bytes = received
        return None


class SourceReservations:
    """Bytes reserved by uploads in progress, per source, against `per_source`."""

    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self._held: dict[str, int] = {}

    def admit(self, source: str, size: int) -> bool:
        held = self._held.get(source, 0)
        if held + size > self.per_source:
            return False
        self._held[source] = held + size
        return True

    def release(self, source: str, size: int) -> None:
        held = self._held.get(source, 0) - size
        if held > 0:
            self._held[source] = held
        else:
            self._held.pop(source, None)

    def held(self, source: str) -> int:
        return self._held.get(source, 0)
