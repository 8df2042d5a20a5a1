"""Chained uploads: an agent stores a part and passes it on, as it arrives, down the chain the
uploader named (over real QUIC, agents and client on an in-memory datagram link)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from dsss.agent.service import AgentConfig, StorageAgent
from dsss.agent.transfer import TransferHandler
from dsss.client.discovery import Introduction
from dsss.client.peer import _receipted
from dsss.crypto.certs import make_certificate
from dsss.leases import LeaseRecord, LeaseSigner, encode_batch, lease_signing_key
from dsss.model import PeerAddress, block_hash
from dsss.quic import QuicEndpoint
from dsss.quic.testing import MemoryDatagramLink, run_until
from nacl.public import PrivateKey
from dsss.wire import transfer as wt

CLIENT = ("127.0.0.3", 5000)
ADDRESSES = [("127.0.0.11", 4001), ("127.0.0.12", 4002), ("127.0.0.13", 4003)]


class Node:
    def __init__(self, clock: Clock, link: MemoryDatagramLink, root: Path, addr: tuple[str, int],
                 capacity: int | None = None) -> None:
        self.addr = addr
        self.agent = StorageAgent(clock, AgentConfig(storage=str(root), capacity=capacity))
        self.handler = TransferHandler(self.agent)
        self.agent.quic = QuicEndpoint(
            clock,
            on_control=self.agent.on_control,
            server_identity=make_certificate(self.agent.identity.seed),
            on_stream=self.handler.on_stream,
        )
        link.attach(self.agent.quic, addr)

    @property
    def agent_id(self) -> str:
        return self.agent.identity.agent_id

    def key_for(self, client: tuple[str, int], block: str, size: int, clock: Clock) -> str:
        return self.agent.introductions.issue(PeerAddress(*client), size, block, clock.seconds()).key

    def hop(self, key: str) -> wt.Hop:
        return wt.Hop(PeerAddress(*self.addr), self.agent_id, key)

    def has(self, block: str) -> bool:
        return self.agent.store.has(block)

    def incoming(self) -> list[Path]:
        return list((self.agent.store.root / "incoming").iterdir())


class Chain:
    def __init__(self, tmp_path: Path, capacities: tuple[int | None, ...] = (None, None, None)) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.link = MemoryDatagramLink(self.clock)
        self.nodes = [Node(self.clock, self.link, tmp_path / f"agent{i}", addr, cap)
                      for i, (addr, cap) in enumerate(zip(ADDRESSES, capacities))]
        self.client = QuicEndpoint(self.clock, on_control=lambda d, a: None)
        self.link.attach(self.client, CLIENT)

    def keys(self, block: str, size: int) -> list[str]:
        """As the server gets them for a chain: the first agent's for the client, each next
        agent's for the agent before it."""
        sources = [CLIENT] + [n.addr for n in self.nodes[:-1]]
        return [n.key_for(src, block, size, self.clock) for n, src in zip(self.nodes, sources)]

    def upload(self, data: bytes, keys: list[str], *, block: str | None = None, body: bytes | None = None,
               timeout: float = 120.0, lease: LeaseRecord | None = None) -> wt.TransferReply:
        block = block or block_hash(data)
        chain = tuple(n.hop(k) for n, k in zip(self.nodes[1:], keys[1:]))
        header = wt.encode_request(wt.Upload(keys[0], block, len(data), True, chain, lease))
        first = self.nodes[0]
        results: list[object] = []
        d = self.client.connect(first.addr, expected_public_key=bytes.fromhex(first.agent_id))
        d.addCallback(lambda conn: conn.request(header + (data if body is None else body),
                                                max_response=wt.MAX_HEADER, timeout=timeout))
        d.addBoth(results.append)
        assert run_until(self.clock, lambda: bool(results), timeout=timeout + 10)
        result = results[0]
        assert isinstance(result, bytes), result
        return wt.parse_reply(result.partition(b"\n")[0])


    def stored(self, data: bytes, keys: list[str]) -> int:
        """Upload down the chain; how many agents proved (with a valid receipt) they stored it,
        as the client counts them."""
        reply = self.upload(data, keys)
        assert isinstance(reply, wt.Stored), reply
        return _receipted(block_hash(data), self.introductions(keys), reply.receipts)

    def introductions(self, keys: list[str]) -> tuple[Introduction, ...]:
        return tuple(Introduction(k, n.agent_id, PeerAddress(*n.addr)) for n, k in zip(self.nodes, keys))


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return Chain(tmp_path)


def test_a_chained_upload_is_stored_by_every_agent_of_the_chain(chain: Chain) -> None:
    data = os.urandom(700_001)
    block = block_hash(data)
    assert chain.stored(data, chain.keys(block, len(data))) == 3
    for node in chain.nodes:
        assert node.has(block) and node.agent.store.get(block) == data
        assert node.incoming() == []
    # the client sent the part once; the first two agents passed it on
    assert [n.handler.forwards for n in chain.nodes] == [1, 1, 0]
    assert [n.handler.uploads for n in chain.nodes] == [1, 1, 1]


def test_a_hop_whose_key_was_not_issued_for_the_previous_agent_ends_the_count(chain: Chain) -> None:
    data = os.urandom(200_000)
    block = block_hash(data)
    keys = chain.keys(block, len(data))
    # the third agent's key was issued for the client, not for the second agent
    keys[2] = chain.nodes[2].key_for(CLIENT, block, len(data), chain.clock)
    assert chain.stored(data, keys) == 2
    assert [n.has(block) for n in chain.nodes] == [True, True, False]
    assert chain.nodes[1].handler.forward_failures == 1
    assert chain.nodes[2].incoming() == []


def test_an_unreachable_next_agent_ends_the_count_without_failing_the_upload(chain: Chain) -> None:
    data = os.urandom(200_000)
    block = block_hash(data)
    keys = chain.keys(block, len(data))
    chain.link.detach(chain.nodes[1].addr)  # the second agent is gone
    assert chain.stored(data, keys) == 1
    assert chain.nodes[0].has(block)
    assert not chain.nodes[2].has(block)
    assert chain.nodes[0].handler.forward_failures == 1


def test_a_full_agent_in_the_chain_ends_the_count(tmp_path: Path) -> None:
    chain = Chain(tmp_path, capacities=(None, 1000, None))
    data = os.urandom(50_000)
    block = block_hash(data)
    assert chain.stored(data, chain.keys(block, len(data))) == 1
    assert [n.has(block) for n in chain.nodes] == [True, False, False]


def test_bytes_that_do_not_match_the_hash_are_stored_nowhere(chain: Chain) -> None:
    data = os.urandom(100_000)
    wrong = block_hash(b"something else")
    reply = chain.upload(data, chain.keys(wrong, len(data)), block=wrong)
    assert isinstance(reply, wt.Refused) and reply.code == "integrity"
    chain.clock.advance(1)
    run_until(chain.clock, lambda: all(n.incoming() == [] for n in chain.nodes), timeout=60)
    for node in chain.nodes:
        assert len(node.agent.store) == 0 and node.incoming() == []


def test_a_truncated_upload_is_stored_nowhere(chain: Chain) -> None:
    data = os.urandom(100_000)
    block = block_hash(data)
    reply = chain.upload(data, chain.keys(block, len(data)), body=data[:60_000])
    assert isinstance(reply, wt.Refused) and reply.code == "integrity"
    run_until(chain.clock, lambda: all(n.incoming() == [] for n in chain.nodes), timeout=60)
    for node in chain.nodes:
        assert not node.has(block) and node.incoming() == []


def test_an_agent_that_already_has_the_part_passes_its_copy_on(chain: Chain) -> None:
    data = os.urandom(300_000)
    block = block_hash(data)
    assert chain.nodes[0].agent.store.put(block, data)
    assert chain.stored(data, chain.keys(block, len(data))) == 3
    assert all(n.has(block) for n in chain.nodes)
    assert chain.nodes[0].handler.forwards == 1


def test_receipts_prove_each_copy_and_a_forged_one_ends_the_count(chain: Chain) -> None:
    """The client believes a copy only with that agent's signature over the block and the
    introduction key it was sent: a receipt for another key, another block, or from another
    agent does not count, nor does any after it."""
    data = os.urandom(100_000)
    block = block_hash(data)
    keys = chain.keys(block, len(data))
    reply = chain.upload(data, keys)
    assert isinstance(reply, wt.Stored) and reply.count == 3
    intros = chain.introductions(keys)
    assert _receipted(block, intros, reply.receipts) == 3
    r = list(reply.receipts)
    assert _receipted(block, intros, (r[0], r[2], r[1])) == 1  # swapped: not the signers'
    assert _receipted(block_hash(b"other"), intros, tuple(r)) == 0  # another block
    other_keys = (intros[0], intros[1], Introduction("0" * 32, intros[2].agent_id, intros[2].address))
    assert _receipted(block, other_keys, tuple(r)) == 2  # another introduction key
    assert _receipted(block, intros, tuple(r[:2])) == 2  # a receipt missing


def owner(seed: int, clock: Clock) -> LeaseSigner:
    return LeaseSigner(lease_signing_key(PrivateKey(bytes([seed]) * 32)), clock=clock.seconds)


def test_a_chained_uploads_lease_is_kept_by_every_agent_of_the_chain(chain: Chain) -> None:
    data = os.urandom(70_001)
    block = block_hash(data)
    record = owner(1, chain.clock).sign(block, int(chain.clock.seconds()) + 3600)
    reply = chain.upload(data, chain.keys(block, len(data)), lease=record)
    assert isinstance(reply, wt.Stored) and reply.count == 3
    for node in chain.nodes:
        assert node.agent.leases.table.records(block) == [record]
        assert block not in node.agent.leases.table.holds


def test_an_upload_with_a_forged_lease_is_stored_nowhere(chain: Chain) -> None:
    data = os.urandom(70_002)
    block = block_hash(data)
    good = owner(1, chain.clock).sign(block, int(chain.clock.seconds()) + 3600)
    forged = LeaseRecord(owner(2, chain.clock).owner, block, good.expiry, good.serial, good.signature)
    reply = chain.upload(data, chain.keys(block, len(data)), lease=forged)
    assert isinstance(reply, wt.Refused) and reply.code == "bad-lease"
    assert not any(n.has(block) for n in chain.nodes)


def test_lease_messages_take_renew_and_release_and_refuse_replays(chain: Chain) -> None:
    data = os.urandom(5000)
    block = block_hash(data)
    chain.upload(data, chain.keys(block, len(data)))  # no lease: held for the initial hold
    node = chain.nodes[0]
    alice, bob = owner(1, chain.clock), owner(2, chain.clock)
    first = alice.sign(block, int(chain.clock.seconds()) + 100)
    chain.clock.advance(1)
    renewed = alice.sign(block, int(chain.clock.seconds()) + 1000)
    absent = alice.sign(block_hash(b"not stored"), int(chain.clock.seconds()) + 100)

    def send(records: list[LeaseRecord]) -> list[str]:
        results: list[object] = []
        d = chain.client.connect(node.addr, expected_public_key=bytes.fromhex(node.agent_id))
        d.addCallback(lambda conn: conn.request(
            [wt.encode_request(wt.Lease(len(records))), encode_batch(records)],
            max_response=wt.MAX_LEASE_REPLY, timeout=30))
        d.addBoth(results.append)
        assert run_until(chain.clock, lambda: bool(results), timeout=40)
        raw = results[0]
        assert isinstance(raw, bytes), raw
        line, _, body = raw.partition(b"\n")
        assert wt.parse_reply(line) == wt.LeasesReply(len(records))
        return body.decode().splitlines()

    assert send([first, renewed, absent, bob.sign(block, int(chain.clock.seconds()) + 50)]) == [
        "ok 0", "ok 0", "not-found 0", "ok 1"]
    assert send([first]) == ["stale 1"]  # the older record, replayed
    assert node.agent.leases.table.entries[block][alice.owner].record == renewed
    assert send([alice.release(block)]) == ["ok 1"]  # Bob's lease remains
