"""The server's end of the digest exchange (DIGEST, DIFF, RESEND, SYNCED) on a StringTransport,
with a Clock and a store that keeps claims across "restarts" (an in-memory durable stand-in)."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.internet.task import Clock

from dsss.holdings import Holdings, path_of
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from dsss.server.store import MemoryStore
from dsss.wire import control as wc
from tests.adapters.test_server_control import Peer, register


class KeptStore(MemoryStore):
    """The memory store, standing in for a durable one: what is in it survives the server."""

    durable = True


def now(d: defer.Deferred) -> object:
    """The result of a Deferred that has fired (everything here is synchronous)."""
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def parts(n: int, tag: str = "") -> list[str]:
    from dsss.model import block_hash

    return [block_hash(f"{tag}{i}".encode()) for i in range(n)]


@pytest.fixture
def store() -> KeptStore:
    return KeptStore()


def make_server(store: KeptStore) -> DiscoveryServer:
    clock = Clock()
    clock.advance(100)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=1.0, udp_port=9999), store=store)
    now(defer.ensureDeferred(server.load()))
    return server


def send(peer: Peer, msg: wc.Message) -> list[str]:
    peer.feed(wc.encode(msg) + b"\n")
    for _ in range(100):  # work done a slice per reactor turn
        peer.server.clock.advance(0)
    return peer.lines()


@pytest.fixture(params=[2000, 7], ids=["one-slice", "many-slices"])
def slices(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr("dsss.server.control.SLICE", request.param)
    return int(request.param)


KEY = SigningKey.generate()
_seq = iter(range(1, 1000))


def joined(server: DiscoveryServer) -> tuple[Peer, str]:
    """The agent (always the same identity) registers with `server`."""
    peer = Peer(server)
    register(peer, key=KEY, seq=next(_seq))
    assert peer.lines()[0].startswith("WELCOME ")
    return peer, KEY.verify_key.encode().hex()


def test_a_matching_digest_restores_every_claim_without_a_have(store: KeptStore, slices: int) -> None:
    mine = parts(300)
    first = make_server(store)
    peer, agent = joined(first)
    send(peer, wc.Digest("", Holdings().digest("")))
    for i in range(0, 300, 48):
        assert send(peer, wc.Have(tuple(mine[i:i + 48]), (5,) * len(mine[i:i + 48]))) == ["OK"]
    assert send(peer, wc.Synced()) == ["OK"]
    rec = first.registry.get(agent)
    assert rec is not None
    first.registry.proved(rec, mine[0], 5, 150.0)

    # The server restarts on the same store: the agent registers again and sends its digest.
    second = make_server(store)
    assert second.expected == {agent} and second.warming()
    peer, _ = joined(second)
    have_before = second.stats["have-entries"]
    assert send(peer, wc.Digest("", Holdings(mine).digest(""))) == ["DIFF"]
    assert send(peer, wc.Synced()) == ["OK"]
    assert second.stats["have-entries"] == have_before
    assert second.stats["claims-restored"] == 300
    rec = second.registry.get(agent)
    assert rec is not None and set(rec.blocks) == set(mine)
    assert rec.proven == {mine[0]: 150.0}
    assert second.registry.size_of(mine[0]) == 5 and second.registry.size_proven(mine[0])
    assert not second.warming()  # every agent that held claims has confirmed them


def test_only_differing_prefixes_are_resent_and_stale_claims_withdrawn(store: KeptStore, slices: int) -> None:
    common = parts(200)
    stale, new = parts(1, "stale")[0], parts(1, "new")[0]
    server = make_server(store)
    peer, agent = joined(server)
    now(store.add_claims(agent, [(p, 9) for p in common + [stale]]))

    server = make_server(store)
    peer, _ = joined(server)
    holdings = Holdings(common + [new])
    (reply,) = send(peer, wc.Digest("", holdings.digest("")))
    diff = wc.parse_line(reply.encode())
    assert isinstance(diff, wc.Diff)
    differing = {d[0] for d in diff.digits}
    assert differing == {path_of(stale)[0], path_of(new)[0]}
    resent = 0
    for digit in sorted(differing):
        assert send(peer, wc.Resend(digit)) == ["OK"]
        under = sorted(holdings.under(digit).values())
        resent += len(under)
        assert send(peer, wc.Have(tuple(under), (9,) * len(under))) == ["OK"]
    assert send(peer, wc.Synced()) == ["OK"]
    assert server.stats["have-entries"] == resent < len(common)
    rec = server.registry.get(agent)
    assert rec is not None and set(rec.blocks) == set(common) | {new}
    stored = now(store.claims_of(agent))
    assert {c.part for c in stored} == set(common) | {new}
    assert stale not in {c.part for c in stored}


def test_an_unreadable_store_keeps_lookups_from_saying_nobody(store: KeptStore) -> None:
    server = make_server(store)
    store.healthy = False
    assert server.warming()
    with pytest.raises(Exception) as e:
        now(defer.ensureDeferred(server.locate("ab" * 32)))
    assert getattr(e.value, "http_status", None) == 503
    store.healthy = True
    assert now(defer.ensureDeferred(server.locate("ab" * 32))) == ([], [])
