"""One contract for every store: the same tests on memory, SQLite and PostgreSQL."""

from __future__ import annotations

from typing import AsyncIterator, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from dsss.server.sqlstore import SQLStore
from dsss.server.store import Store, StoredClaim
from dsss.server.storespec import open_store
from tests.conftest import STORE_KINDS

A, B, C = "a" * 64, "b" * 64, "c" * 64
P1, P2, P3 = "1" * 64, "2" * 64, "s" + "3" * 64


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def store(kind: str, store_url: Callable[[str], str]) -> AsyncIterator[Store]:
    s = open_store(store_url(kind), reactor)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_identities_are_kept_and_forgotten(store: Store) -> None:
    await store.put_identity(A, 3, 10.0)
    await store.put_identity(B, 1, 11.0)
    await store.put_identity(A, 4, 12.0)
    assert await store.load_identities() == {A: (4, 12.0), B: (1, 11.0)}
    await store.add_claims(A, [(P1, 5)])
    await store.forget_identities([A])
    assert await store.load_identities() == {B: (1, 11.0)}
    assert await store.claims_of(A) == []  # forgetting an identity forgets its claims
    assert await store.holders(P1) == []


@pytest_twisted.ensureDeferred
async def test_claims_index_both_ways(store: Store) -> None:
    await store.add_claims(A, [(P1, 100), (P2, None)])
    await store.add_claims(B, [(P1, 100), (P3, 7)])
    assert await store.holders(P1) == [A, B]
    assert await store.holders(P3) == [B]
    assert sorted(c.part for c in await store.claims_of(A)) == [P1, P2]
    assert await store.agents_with_claims() == [A, B]
    assert await store.part_size(P1) == (100, False)
    assert await store.part_size(P2) == (None, False)
    assert await store.part_size("f" * 64) == (None, False)


@pytest_twisted.ensureDeferred
async def test_first_claimed_size_kept_until_one_is_proven(store: Store) -> None:
    await store.add_claims(A, [(P1, 100)])
    await store.add_claims(B, [(P1, 999)])
    assert await store.part_size(P1) == (100, False)
    await store.proved(B, P1, 120, 50.0)
    assert await store.part_size(P1) == (120, True)
    await store.add_claims(C, [(P1, 5)])
    assert await store.part_size(P1) == (120, True)
    claims = {c.part: c for c in await store.claims_of(B)}
    assert claims[P1] == StoredClaim(P1, 120, True, 50.0)
    assert (await store.claims_of(A))[0].proven_at is None


@pytest_twisted.ensureDeferred
async def test_proof_without_claim_is_a_claim(store: Store) -> None:
    await store.proved(A, P2, 64, 7.5)
    assert await store.holders(P2) == [A]
    assert await store.claims_of(A) == [StoredClaim(P2, 64, True, 7.5)]


@pytest_twisted.ensureDeferred
async def test_dropping_claims_reports_parts_others_hold(store: Store) -> None:
    await store.add_claims(A, [(P1, 1), (P2, 2), (P3, 3)])
    await store.add_claims(B, [(P1, 1)])
    assert await store.drop_claims(A, [P1, P2, "e" * 64]) == [P1]
    assert await store.holders(P1) == [B]
    assert await store.holders(P2) == []
    assert await store.part_size(P2) == (None, False)  # no claim left: the part is forgotten
    assert await store.part_size(P1) == (1, False)
    await store.add_claims(C, [(P3, 3)])
    assert await store.drop_agent(A) == [P3]
    assert await store.claims_of(A) == []
    assert await store.agents_with_claims() == [B, C]


@pytest_twisted.ensureDeferred
async def test_reputation_round_trip(store: Store) -> None:
    await store.put_reputation(A, {"disqualified": True, "passed": 3})
    await store.put_reputation(A, {"disqualified": True, "passed": 4})
    assert await store.load_reputation() == {A: {"disqualified": True, "passed": 4}}


@pytest_twisted.ensureDeferred
async def test_repair_queue_batches_are_disjoint_and_leased(store: Store) -> None:
    parts = [f"{i:064x}" for i in range(10)]
    await store.enqueue_repairs(parts[:6], due=100.0)
    await store.enqueue_repairs(parts[6:], due=200.0)
    await store.enqueue_repairs(parts[:1], due=300.0)  # the earlier due time wins
    assert await store.claim_repairs("s1", 10, now=50.0, lease=30.0) == []  # not due yet
    first = await store.claim_repairs("s1", 4, now=150.0, lease=30.0)
    second = await store.claim_repairs("s2", 4, now=150.0, lease=30.0)
    assert first == parts[:4] and second == parts[4:6]
    await store.finish_repairs("s2", first)  # not its own: nothing happens
    assert await store.queued_repairs() == 10
    await store.finish_repairs("s1", first)
    assert await store.queued_repairs() == 6
    # s2's lease runs out: the parts are claimable again, with the later ones now due.
    again = await store.claim_repairs("s3", 10, now=201.0, lease=30.0)
    assert sorted(again) == sorted(parts[4:])


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_never_overlap(kind: str, store_url: Callable[[str], str]) -> None:
    """Two servers on one database claim at once: every part goes to exactly one of them."""
    if kind == "memory":
        pytest.skip("a memory store is one server's own")
    url = store_url(kind)
    one, two = open_store(url, reactor), open_store(url, reactor)
    await one.open()
    await two.open()
    try:
        parts = [f"{i:064x}" for i in range(400)]
        await one.enqueue_repairs(parts, due=0.0)
        got: list[list[str]] = [[], []]

        async def drain(i: int, s: Store) -> None:
            while True:
                batch = await s.claim_repairs(f"s{i}", 25, now=1.0, lease=600.0)
                if not batch:
                    return
                got[i].extend(batch)

        await defer.gatherResults([defer.ensureDeferred(drain(0, one)), defer.ensureDeferred(drain(1, two))])
        assert not set(got[0]) & set(got[1])
        assert sorted(got[0] + got[1]) == parts
    finally:
        await one.close()
        await two.close()


@pytest_twisted.ensureDeferred
async def test_durable_store_survives_reopening(kind: str, store_url: Callable[[str], str]) -> None:
    if kind == "memory":
        pytest.skip("the memory store keeps nothing across restarts")
    url = store_url(kind)
    first = open_store(url, reactor)
    await first.open()
    await first.put_identity(A, 9, 1.0)
    await first.add_claims(A, [(P1, 10), (P2, 20)])
    await first.proved(A, P1, 10, 3.0)
    await first.close()
    second = open_store(url, reactor)
    await second.open()
    try:
        assert await second.load_identities() == {A: (9, 1.0)}
        assert sorted(await second.claims_of(A), key=lambda c: c.part) == [
            StoredClaim(P1, 10, True, 3.0), StoredClaim(P2, 20, False, None)]
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_writes_wait_out_an_outage(kind: str, store_url: Callable[[str], str],
                                         request: pytest.FixtureRequest) -> None:
    """PostgreSQL stops: writes stay queued (the store says it is unhealthy), nothing is lost,
    and once it is back they are committed in order without anyone's help."""
    if kind != "postgresql":
        pytest.skip("an outage of a database server")
    from tools.postgres import PostgresServer

    base = request.getfixturevalue("postgres")
    pg = PostgresServer(base.root.parent / f"outage-{id(request)}", base.bindir)
    pg.start()
    try:
        url = pg.createdb("outage")
        s = SQLStore(url, reactor, retry=0.2)
        await s.open()
        await s.add_claims(A, [(P1, 1)])
        pg.stop()
        pending = s.add_claims(A, [(P2, 2)])
        then = s.drop_claims(A, [P1])
        while s.healthy:
            await deferLater(0.05)
        assert not pending.called
        pg.start()
        await pending
        assert await then == []
        assert s.healthy
        assert [c.part for c in await s.claims_of(A)] == [P2]
        await s.close()
    finally:
        pg.stop()


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


def test_store_specs() -> None:
    assert open_store("memory").durable is False
    with pytest.raises(ValueError):
        open_store("mysql://x")
    with pytest.raises(ValueError):
        open_store("sqlite:")
    assert isinstance(open_store("postgresql://u@127.0.0.1:5/db"), SQLStore)
