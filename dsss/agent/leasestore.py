# -*- test-case-name: tests.unit.test_leases -*-
"""The agent's leases on disk: `leases.sqlite` beside the blocks, mirrored in a LeaseTable.

One SQLite database in the storage directory (WAL journal, synchronous=FULL: every change is on
disk before it is answered), two tables:

    leases(block, owner, version, expiry, serial, signature, guard)   the latest record per
                                                                      (owner, block), signed
    holds(block, until)                                               unsigned initial holds

A batch of records is one transaction. At start the whole table is read into a LeaseTable; a
stored block the database knows nothing of (a store older than leases, or a block whose record
was not written before a crash) is held for `legacy_hold` seconds, so nothing is collected
because its leases were never recorded.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable

from dsss.leases import LeaseRecord, LeaseTable, Outcome

FILE_NAME = "leases.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    block TEXT NOT NULL, owner TEXT NOT NULL, version INTEGER NOT NULL, expiry INTEGER NOT NULL,
    serial INTEGER NOT NULL, signature TEXT NOT NULL, guard INTEGER NOT NULL,
    PRIMARY KEY (block, owner));
CREATE TABLE IF NOT EXISTS holds (block TEXT PRIMARY KEY, until REAL NOT NULL);
"""


class LeaseStore:
    """A LeaseTable whose every change is written to `leases.sqlite` first."""

    def __init__(self, root: str | Path, table: LeaseTable) -> None:
        self.path = Path(root) / FILE_NAME
        self.table = table
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        for block, owner, version, expiry, serial, signature, guard in self._db.execute(
            "SELECT block, owner, version, expiry, serial, signature, guard FROM leases"
        ):
            table.restore(LeaseRecord(owner, block, expiry, serial, signature, version), guard)
        for block, until in self._db.execute("SELECT block, until FROM holds"):
            table.holds[block] = until

    def close(self) -> None:
        self._db.close()

    def start(self, blocks: Iterable[str], now: float, legacy_hold: float) -> None:
        """Track the stored blocks; hold (and record the hold of) those without any record."""
        blocks = list(blocks)
        unknown = [b for b in blocks if not self.table.known(b)]
        self.table.track(blocks, now, legacy_hold)
        if unknown:
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO holds VALUES (?, ?)",
                                     [(b, self.table.holds[b]) for b in unknown])

    def _transaction(self) -> "_Tx":
        return _Tx(self._db)

    def hold(self, block: str, until: float, now: float) -> None:
        self.table.hold(block, until, now)
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO holds VALUES (?, ?)", (block, self.table.holds[block]))

    def apply(self, records: list[LeaseRecord], now: float) -> list[Outcome]:
        """Apply verified records for blocks held here, in one transaction."""
        outcomes = []
        rows = []
        for record in records:
            outcome = self.table.apply(record, now)
            outcomes.append(outcome)
            entry = self.table.entries[record.block][record.owner]
            if entry.record == record:
                rows.append((record.block, record.owner, record.version, record.expiry, record.serial,
                             record.signature, entry.guard))
        if rows:
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return outcomes

    def forget(self, block: str) -> None:
        self.table.forget(block)
        with self._transaction():
            self._db.execute("DELETE FROM leases WHERE block = ?", (block,))
            self._db.execute("DELETE FROM holds WHERE block = ?", (block,))

    def collected(self, block: str, now: float) -> None:
        """The block was deleted: forget its hold and records, except releases that must still
        refuse a replayed older lease (should the same bytes be stored here again)."""
        keep = {o for o, e in self.table.entries.get(block, {}).items()
                if e.record.released and e.guard + self.table.skew >= now}
        self.table.holds.pop(block, None)
        self.table.changed.pop(block, None)
        for owner in list(self.table.entries.get(block, {})):
            if owner not in keep:
                self.table.prune(block, owner)
        with self._transaction():
            self._db.execute("DELETE FROM holds WHERE block = ?", (block,))
            self._db.executemany("DELETE FROM leases WHERE block = ? AND owner = ?",
                                 [(block, o) for o in self._gone(block, keep)])

    def _gone(self, block: str, keep: set[str]) -> list[str]:
        rows = self._db.execute("SELECT owner FROM leases WHERE block = ?", (block,)).fetchall()
        return [o for (o,) in rows if o not in keep]

    def prune(self, now: float, limit: int = 1000) -> int:
        """Drop released or expired records that no replay could revive (at most `limit`)."""
        gone = self.table.prunable(now)[:limit]
        if not gone:
            return 0
        with self._transaction():
            self._db.executemany("DELETE FROM leases WHERE block = ? AND owner = ?", gone)
        for block, owner in gone:
            self.table.prune(block, owner)
        return len(gone)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
