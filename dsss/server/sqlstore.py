# -*- test-case-name: tests.unit.test_store -*-
"""The store on SQLite or PostgreSQL: one schema, one set of statements, off the reactor thread.

`SQLStore` implements dsss.server.store.Store on SQLite (embedded, one machine) and PostgreSQL
(psycopg 3; shared by several servers). Its blocking driver runs on a thread of its own, never on
the reactor thread; the operations queued while one transaction runs are committed together in the
next (group commit), in the order they were made; an unreachable database is retried without
dropping a write.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import deque
from typing import Any, Callable, Iterable, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dsss.errors import Unavailable
from dsss.server.store import StoredClaim

log = Logger()

T = TypeVar("T")

DELIVER_SLICE = 0.01
"""Seconds of waiters' callbacks run per reactor turn when a batch's results come back."""

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS identities (
        agent TEXT PRIMARY KEY, seq BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL)""",
    # The location index: one row per claim. Its key (agent, part) is the reverse index.
    """CREATE TABLE IF NOT EXISTS claims (
        agent TEXT NOT NULL, part TEXT NOT NULL, proven_at DOUBLE PRECISION,
        PRIMARY KEY (agent, part))""",
    "CREATE INDEX IF NOT EXISTS claims_by_part ON claims (part)",
    """CREATE TABLE IF NOT EXISTS parts (
        part TEXT PRIMARY KEY, size BIGINT, size_proven BOOLEAN NOT NULL DEFAULT FALSE)""",
    """CREATE TABLE IF NOT EXISTS reputation (agent TEXT PRIMARY KEY, record TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS repair_queue (
        part TEXT PRIMARY KEY, due DOUBLE PRECISION NOT NULL, owner TEXT,
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS repair_queue_due ON repair_queue (due)",
]

_CLAIM_PART = """INSERT INTO parts (part, size, size_proven) VALUES (?, ?, FALSE)
    ON CONFLICT (part) DO UPDATE SET size = COALESCE(parts.size, excluded.size)"""
_CLAIM = "INSERT INTO claims (agent, part) VALUES (?, ?) ON CONFLICT (agent, part) DO NOTHING"
_PG_CLAIM_PARTS = """INSERT INTO parts (part, size, size_proven)
    SELECT p, n, FALSE FROM unnest(%s::text[], %s::bigint[]) AS t(p, n)
    ON CONFLICT (part) DO UPDATE SET size = COALESCE(parts.size, excluded.size)"""
_PG_CLAIMS = """INSERT INTO claims (agent, part) SELECT %s, p FROM unnest(%s::text[]) AS t(p)
    ON CONFLICT (agent, part) DO NOTHING"""
_PROVE_PART = """INSERT INTO parts (part, size, size_proven) VALUES (?, ?, TRUE)
    ON CONFLICT (part) DO UPDATE SET size = excluded.size, size_proven = TRUE"""
_PROVE = """INSERT INTO claims (agent, part, proven_at) VALUES (?, ?, ?)
    ON CONFLICT (agent, part) DO UPDATE SET proven_at = excluded.proven_at"""
_UNCLAIM = "DELETE FROM claims WHERE agent = ? AND part = ?"
_ORPHAN = "DELETE FROM parts WHERE part = ? AND NOT EXISTS (SELECT 1 FROM claims WHERE claims.part = ?)"
_HELD = "SELECT 1 FROM claims WHERE part = ? LIMIT 1"
_ENQUEUE = """INSERT INTO repair_queue (part, due) VALUES (?, ?)
    ON CONFLICT (part) DO UPDATE SET due = CASE WHEN excluded.due < repair_queue.due
    THEN excluded.due ELSE repair_queue.due END"""
# {lock} is FOR UPDATE SKIP LOCKED on PostgreSQL: servers claiming at once skip each other's
# rows. SQLite has one writer at a time (BEGIN IMMEDIATE), which gives the same disjointness.
_CLAIM_REPAIRS = """UPDATE repair_queue SET owner = ?, lease_until = ? WHERE part IN (
    SELECT part FROM repair_queue WHERE due <= ? AND (owner IS NULL OR lease_until < ?)
    ORDER BY due LIMIT ? {lock}) RETURNING part"""


class _Cursor(Protocol):
    def execute(self, sql: str, params: Any = ..., /) -> Any: ...
    def executemany(self, sql: str, params: Any, /) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


_Op = Callable[[_Cursor], Any]


class SQLStore:
    """The store on SQLite (`sqlite:PATH`) or PostgreSQL (`postgresql://...`, psycopg 3).

    One connection, on one thread of its own. Operations are queued in order; each transaction
    commits everything queued when it began. If the database cannot be reached the batch stays
    queued and is retried (`healthy` is False meanwhile): a write is never dropped, and its
    Deferred fires once it is committed. Reads queued behind writes see them."""

    durable = True
    RETRY = 1.0
    """Seconds between attempts while the database cannot be reached."""

    def __init__(self, url: str, reactor: Any = None, retry: float | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.url = url
        self.reactor = reactor
        self.retry = self.RETRY if retry is None else retry
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        if not self.postgres and not url.startswith("sqlite:"):
            raise ValueError(f"not a store URL: {url!r} (memory, sqlite:PATH or postgresql://...)")
        self.healthy = True
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="dsss-store")
        self._conn: Any = None
        self._queue: deque[tuple[_Op, defer.Deferred[Any]]] = deque()
        self._busy = False
        self._closed = False
        self._retry_call: Any = None
        self.transactions = 0

    # --- the worker ---------------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.postgres else text

    def _connect(self) -> Any:
        if self.postgres:
            import psycopg

            # Keepalives: a database that vanishes from the network is noticed in seconds.
            return psycopg.connect(self.url, autocommit=False, connect_timeout=5, keepalives=1,
                                   keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
        path = self.url[len("sqlite:"):]
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _unreachable(self, e: BaseException) -> bool:
        """Whether `e` says the database could not be reached or was busy (then the batch is
        retried), rather than that an operation was wrong."""
        if self.postgres:
            import psycopg

            return isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError))
        return isinstance(e, sqlite3.OperationalError)

    def _transaction(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            if not self.postgres:
                conn.execute("BEGIN IMMEDIATE")
            cur = conn.cursor()
            results: list[tuple[bool, Any]] = [(True, op(cur)) for op in ops]
            if self.postgres:
                conn.commit()
            else:
                conn.execute("COMMIT")
            return results
        except BaseException as e:
            try:
                if self.postgres:
                    conn.rollback()
                else:
                    conn.execute("ROLLBACK")
            except Exception:
                pass
            if self.postgres and self._unreachable(e):
                self._conn = None
                try:
                    conn.close()
                except Exception:
                    pass
            raise

    def _run_batch(self, ops: list[_Op]) -> list[tuple[bool, Any]]:
        """On the store's thread: run `ops` in one transaction. If the database cannot be
        reached this raises (the batch is retried); if an operation itself fails, each runs in
        a transaction of its own and that one's Deferred fails."""
        try:
            return self._transaction(ops)
        except Exception as e:
            if self._unreachable(e) or len(ops) == 1:
                if self._unreachable(e):
                    raise
                return [(False, Failure(e))]
        results: list[tuple[bool, Any]] = []
        for op in ops:
            try:
                results.extend(self._transaction([op]))
            except Exception as e:
                if self._unreachable(e):
                    raise
                results.append((False, Failure(e)))
        return results

    def _submit(self, op: _Op) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(Unavailable("the store is closed"))
        d: defer.Deferred[Any] = defer.Deferred()
        self._queue.append((op, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._busy or not self._queue or self._retry_call is not None:
            return
        self._busy = True
        batch = list(self._queue)
        self._queue.clear()
        d = deferToThreadPool(self.reactor, self._pool, self._run_batch, [op for op, _ in batch])

        def done(results: list[tuple[bool, Any]]) -> None:
            self._busy = False
            self.healthy = True
            self.transactions += 1
            self._kick()
            self._deliver(list(zip([w for _op, w in batch], results)))

        def failed(f: Failure) -> None:
            self._busy = False
            if self._closed:
                for _op, waiter in batch:
                    waiter.errback(Unavailable(f"the store is closed: {f.getErrorMessage()}"))
                return
            if self.healthy:
                log.warn("the store ({kind}) cannot be reached: {why}; retrying every {retry} s",
                         kind=self.kind, why=f.getErrorMessage(), retry=self.retry)
            self.healthy = False
            self._queue.extendleft(reversed(batch))

            def again() -> None:
                self._retry_call = None
                self._kick()

            self._retry_call = self.reactor.callLater(self.retry, again)

        d.addCallbacks(done, failed)

    def _deliver(self, outcomes: list[tuple[defer.Deferred[Any], tuple[bool, Any]]]) -> None:
        """Fire the waiters of a batch in order, at most DELIVER_SLICE seconds of their
        callbacks per reactor turn (a batch of large reads must not stall the reactor)."""
        started = time.monotonic()
        for n, (waiter, (ok, value)) in enumerate(outcomes):
            if n and time.monotonic() - started > DELIVER_SLICE:
                self.reactor.callLater(0, self._deliver, outcomes[n:])
                return
            if ok:
                waiter.callback(value)
            else:
                waiter.errback(value)

    @property
    def kind(self) -> str:
        return "PostgreSQL" if self.postgres else "SQLite"

    def read(self, op: Callable[[_Cursor], T]) -> defer.Deferred[T]:
        """Run `op(cursor)` on the store's thread, in order with the writes queued before it."""
        return self._submit(op)

    def check(self) -> defer.Deferred[None]:
        if self._queue or self._busy or self._retry_call is not None:
            return defer.succeed(None)  # already under way (or waiting to retry)
        return self._submit(lambda cur: cur.execute("SELECT 1") and None)

    def open(self) -> defer.Deferred[None]:
        self._pool.start()
        self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)

        def create(cur: _Cursor) -> None:
            for statement in SCHEMA:
                cur.execute(statement)

        return self._submit(create)

    def _stop_pool(self) -> None:
        if self._pool.started:
            self._pool.stop()

    def close(self) -> defer.Deferred[None]:
        """Commit what is queued (unless the database is unreachable), then close."""
        if self._closed:
            return defer.succeed(None)
        if self.healthy and (self._queue or self._busy) and self._pool.started:
            flushed = self._submit(lambda cur: None)
            flushed.addErrback(lambda f: None)
            return flushed.addCallback(lambda _: self._close_now())
        return self._close_now()

    def _close_now(self) -> defer.Deferred[None]:
        self._closed = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
            self._retry_call = None

        def shut() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass

        for _op, d in list(self._queue):
            d.errback(Unavailable("the store is closed"))
        self._queue.clear()
        if not self._pool.started:
            return defer.succeed(None)
        d = deferToThreadPool(self.reactor, self._pool, shut)
        d.addBoth(lambda _: self._stop_pool())
        return d

    # --- identities ---------------------------------------------------------------------------

    def load_identities(self) -> defer.Deferred[dict[str, tuple[int, float]]]:
        def op(cur: _Cursor) -> dict[str, tuple[int, float]]:
            cur.execute("SELECT agent, seq, at FROM identities")
            return {a: (int(s), float(t)) for a, s, t in cur.fetchall()}

        return self.read(op)

    def put_identity(self, agent_id: str, seq: int, at: float) -> defer.Deferred[None]:
        sql = self._sql("""INSERT INTO identities (agent, seq, at) VALUES (?, ?, ?)
            ON CONFLICT (agent) DO UPDATE SET seq = excluded.seq, at = excluded.at""")
        return self._submit(lambda cur: cur.execute(sql, (agent_id, seq, at)) and None)

    def forget_identities(self, agent_ids: list[str]) -> defer.Deferred[None]:
        def op(cur: _Cursor) -> None:
            for agent_id in agent_ids:
                cur.execute(self._sql("DELETE FROM identities WHERE agent = ?"), (agent_id,))
                self._drop_all(cur, agent_id)

        return self._submit(op)

    # --- the location index -------------------------------------------------------------------

    def add_claims(self, agent_id: str, claims: list[tuple[str, int | None]]) -> defer.Deferred[None]:
        sizes: dict[str, int | None] = {}
        for part, size in claims:  # one row per part (a statement may not update a row twice)
            if sizes.get(part) is None:
                sizes[part] = size

        def op(cur: _Cursor) -> None:
            if self.postgres:
                # One statement per table for the whole list (much faster than a row at a
                # time), in part order: servers writing at once lock rows in the same order.
                parts = sorted(sizes)
                cur.execute(_PG_CLAIM_PARTS, (parts, [sizes[p] for p in parts]))
                cur.execute(_PG_CLAIMS, (agent_id, parts))
            else:
                cur.executemany(_CLAIM_PART, list(sizes.items()))
                cur.executemany(_CLAIM, [(agent_id, part) for part in sizes])

        return self._submit(op)

    def proved(self, agent_id: str, part: str, size: int, at: float) -> defer.Deferred[None]:
        def op(cur: _Cursor) -> None:
            cur.execute(self._sql(_PROVE_PART), (part, size))
            cur.execute(self._sql(_PROVE), (agent_id, part, at))

        return self._submit(op)

    def _drop(self, cur: _Cursor, agent_id: str, parts: Iterable[str]) -> list[str]:
        others = []
        for part in parts:
            cur.execute(self._sql(_UNCLAIM + " RETURNING part"), (agent_id, part))
            if cur.fetchone() is None:
                continue
            cur.execute(self._sql(_HELD), (part,))
            if cur.fetchone() is not None:
                others.append(part)
            else:
                cur.execute(self._sql(_ORPHAN), (part, part))
        return others

    def _drop_all(self, cur: _Cursor, agent_id: str) -> list[str]:
        cur.execute(self._sql("SELECT part FROM claims WHERE agent = ?"), (agent_id,))
        return self._drop(cur, agent_id, [row[0] for row in cur.fetchall()])

    def drop_claims(self, agent_id: str, parts: list[str]) -> defer.Deferred[list[str]]:
        return self._submit(lambda cur: self._drop(cur, agent_id, parts))

    def drop_agent(self, agent_id: str) -> defer.Deferred[list[str]]:
        return self._submit(lambda cur: self._drop_all(cur, agent_id))

    def claims_of(self, agent_id: str) -> defer.Deferred[list[StoredClaim]]:
        def op(cur: _Cursor) -> list[StoredClaim]:
            cur.execute(self._sql("""SELECT c.part, p.size, p.size_proven, c.proven_at
                FROM claims c LEFT JOIN parts p ON p.part = c.part WHERE c.agent = ?"""), (agent_id,))
            return [StoredClaim(part, None if size is None else int(size), bool(proven), at)
                    for part, size, proven, at in cur.fetchall()]

        return self.read(op)

    def holders(self, part: str) -> defer.Deferred[list[str]]:
        def op(cur: _Cursor) -> list[str]:
            cur.execute(self._sql("SELECT agent FROM claims WHERE part = ? ORDER BY agent"), (part,))
            return [row[0] for row in cur.fetchall()]

        return self.read(op)

    def part_size(self, part: str) -> defer.Deferred[tuple[int | None, bool]]:
        def op(cur: _Cursor) -> tuple[int | None, bool]:
            cur.execute(self._sql("SELECT size, size_proven FROM parts WHERE part = ?"), (part,))
            row = cur.fetchone()
            if row is None:
                return None, False
            return (None if row[0] is None else int(row[0])), bool(row[1])

        return self.read(op)

    def agents_with_claims(self) -> defer.Deferred[list[str]]:
        def op(cur: _Cursor) -> list[str]:
            cur.execute("SELECT DISTINCT agent FROM claims ORDER BY agent")
            return [row[0] for row in cur.fetchall()]

        return self.read(op)

    # --- reputation ---------------------------------------------------------------------------

    def put_reputation(self, agent_id: str, record: dict[str, Any]) -> defer.Deferred[None]:
        sql = self._sql("""INSERT INTO reputation (agent, record) VALUES (?, ?)
            ON CONFLICT (agent) DO UPDATE SET record = excluded.record""")
        text = json.dumps(record, sort_keys=True)
        return self._submit(lambda cur: cur.execute(sql, (agent_id, text)) and None)

    def load_reputation(self) -> defer.Deferred[dict[str, dict[str, Any]]]:
        def op(cur: _Cursor) -> dict[str, dict[str, Any]]:
            cur.execute("SELECT agent, record FROM reputation")
            return {a: json.loads(r) for a, r in cur.fetchall()}

        return self.read(op)

    # --- the repair queue ---------------------------------------------------------------------

    def enqueue_repairs(self, parts: list[str], due: float) -> defer.Deferred[None]:
        sql = self._sql(_ENQUEUE)
        return self._submit(lambda cur: cur.executemany(sql, [(p, due) for p in parts]) and None)

    def claim_repairs(self, owner: str, limit: int, now: float, lease: float) -> defer.Deferred[list[str]]:
        sql = self._sql(_CLAIM_REPAIRS.format(lock="FOR UPDATE SKIP LOCKED" if self.postgres else ""))

        def op(cur: _Cursor) -> list[str]:
            cur.execute(sql, (owner, now + lease, now, now, limit))
            return sorted(row[0] for row in cur.fetchall())

        return self._submit(op)

    def finish_repairs(self, owner: str, parts: list[str]) -> defer.Deferred[None]:
        sql = self._sql("DELETE FROM repair_queue WHERE part = ? AND owner = ?")
        return self._submit(lambda cur: cur.executemany(sql, [(p, owner) for p in parts]) and None)

    def queued_repairs(self) -> defer.Deferred[int]:
        def op(cur: _Cursor) -> int:
            cur.execute("SELECT COUNT(*) FROM repair_queue")
            return int(cur.fetchone()[0])

        return self.read(op)


