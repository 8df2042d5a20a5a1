# -*- test-case-name: tests.unit.test_scrub -*-
"""Background scrubbing: re-read every stored part, slowly, and catch bit rot before a client does.

Pure bookkeeping around BlockStore.get (which quarantines a part whose bytes no longer match its
hash). The caller decides how many bytes each step may read, which sets the scrub rate.
"""

from __future__ import annotations

from typing import Callable

from dsss.errors import IntegrityError, NotFound
from dsss.storage.blockstore import BlockStore


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
                self.store.get(block)
            except IntegrityError:
                self.corrupt += 1
                self.on_corrupt(block)
                continue
            except NotFound:
                continue
            self.checked += 1
        return used
