# -*- test-case-name: tests.unit.test_store_sync -*-
"""Writes what the registry learns to the store, in the background (dsss.server.registry.Journal).

The registry is synchronous and on the reactor thread; the store's writes return Deferreds and
run elsewhere. This adapter hands each change to the store in the order it happened (the SQL
stores commit in that order and retry through an outage, so nothing is lost) and counts what
is still unwritten, so that the server can tell when the store has caught up."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from dsss.server.store import Store

log = Logger()


class StoreJournal:
    """Implements dsss.server.registry.Journal on a Store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending = 0
        self.failed = 0

    def _track(self, d: Any) -> None:
        self.pending += 1

        def done(result: Any) -> Any:
            self.pending -= 1
            return result

        def failed(f: Any) -> None:
            self.failed += 1
            log.failure("writing to the store failed", f)

        d.addBoth(done).addErrback(failed)

    def identity(self, agent_id: str, seq: int, at: float) -> None:
        self._track(self.store.put_identity(agent_id, seq, at))

    def forgotten(self, agent_ids: list[str]) -> None:
        self._track(self.store.forget_identities(agent_ids))

    def claimed(self, agent_id: str, claims: list[tuple[str, int | None]]) -> None:
        if claims:
            self._track(self.store.add_claims(agent_id, claims))

    def proved(self, agent_id: str, part: str, size: int, at: float) -> None:
        self._track(self.store.proved(agent_id, part, size, at))

    def withdrawn(self, agent_id: str, parts: list[str]) -> None:
        if parts:
            self._track(self.store.drop_claims(agent_id, parts))
