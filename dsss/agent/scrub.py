# -*- test-case-name: tests.unit.test_scrub -*-
"""Background scrubbing: re-read every stored part, slowly, and catch bit rot before a client does.

Pure bookkeeping around BlockStore.get (which quarantines a part whose bytes no longer match its
hash). The caller decides how many bytes each step may read, which sets the scrub rate.
"""

from __future__ import annotations

from typing import Callable

from dsss.errors import IntegrityError, NotFound
from dsss.storage.blockstore import BlockStore


BUSY_WINDOW = 1.0
"""Seconds after a transfer started or ended during which the agent counts as busy."""
BUSY_SHARE = 8
"""While busy, the scrub reads at 1/BUSY_SHARE of its rate: clients' transfers come first."""


class ScrubPacer:
    """
    How fast the scrub may read: C{rate} bytes per second while the agent is
    idle, C{rate / BUSY_SHARE} while it is moving parts for clients.  Credit
    accrues per tick up to one second's worth; a part larger than the credit
    is read whole and the debt is paid back over the following ticks.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.credit = 0.0

    def may_read(self, elapsed: float, busy: bool) -> bool:
        """Accrue C{elapsed} seconds of credit; True if a part may be read now."""
        if self.rate <= 0:
            return False
        rate = self.rate / BUSY_SHARE if busy else self.rate
        self.credit = min(self.credit + rate * elapsed, float(self.rate))
        return self.credit > 0

    def spent(self, nbytes: int) -> None:
        self.credit -= nbytes


class Scrubber:
    def __init__(self, store: BlockStore, on_corrupt: Callable[[str], None]) -> None:
        self.store = store
        self.on_corrupt = on_corrupt
        self._queue: list[str] = []
        self.checked = 0
        self.corrupt = 0
        self.passes = 0

    def step(self, budget: int) -> int:
        """Verify parts until `budget` bytes have been read; returns the bytes read."""
        used = 0
        while used < budget:
            if not self._queue:
                self._queue = self.store.blocks()
                self._queue.reverse()
                self.passes += 1
                if not self._queue:
                    break
            block = self._queue.pop()
            if not self.store.has(block):
                continue
            used += self.store.size_of(block)
            try:
                self.store.get(block, keep_cached=False)
            except IntegrityError:
                self.corrupt += 1
                self.on_corrupt(block)
                continue
            except NotFound:
                continue
            self.checked += 1
        return used
