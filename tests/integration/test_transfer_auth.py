"""Introduction keys against a real twistd agent, driven from an in-process Twisted client."""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from dsss.client.discovery import DiscoveryClient, Introduction
from dsss.client.peer import PeerNetwork
from dsss.errors import AccessDenied
from dsss.model import PeerAddress, block_hash

pytestmark = [pytest.mark.integration]


async def _client(net):
    from twisted.internet import reactor

    discovery = DiscoveryClient(net.url, reactor=reactor)
    peers = PeerNetwork(reactor, ("127.0.0.1", net.udp_port), bind_host="127.0.0.1")
    await peers.start()
    return discovery, peers


def _stored_anywhere(net, block: str) -> bool:
    return any(
        (a.storage / "blocks" / block[:2] / block[2:4] / block).exists() for a in net.agents
    )


@pytest_twisted.ensureDeferred
async def test_made_up_reused_and_mismatched_keys_store_nothing(shared_network):
    net = shared_network
    discovery, peers = await _client(net)
    try:
        agent = net.agents[0]
        target = PeerAddress.parse(agent.address)
        data = os.urandom(4096)
        block = block_hash(data)

        made_up = Introduction("0123456789abcdef" * 2, agent.agent_id, target)
        with pytest.raises(AccessDenied):
            await peers.upload(made_up, block, data)
        assert not _stored_anywhere(net, block)

        intro = await discovery.introduce_me(target, block, len(data), peers.public_address)
        # A key for another size, or presented for another hash, is refused (and used up).
        other = os.urandom(4096)
        with pytest.raises(AccessDenied):
            await peers.upload(intro, block_hash(other), other)
        with pytest.raises(AccessDenied):
            await peers.upload(intro, block, data)  # reused
        assert not _stored_anywhere(net, block)
        assert not _stored_anywhere(net, block_hash(other))

        # A download key cannot upload.
        dkey = await discovery.introduce_me(target, block, 0, peers.public_address)
        with pytest.raises(AccessDenied):
            await peers.upload(dkey, block, data)

        # A fresh key works once.
        intro = await discovery.introduce_me(target, block, len(data), peers.public_address)
        await peers.upload(intro, block, data)
        assert (agent.storage / "blocks" / block[:2] / block[2:4] / block).read_bytes() == data
        dkey = await discovery.introduce_me(target, block, 0, peers.public_address)
        assert await peers.download(dkey, block) == data
        with pytest.raises(AccessDenied):
            await peers.download(dkey, block)
        # The server now knows where the part is.
        assert await discovery.who_has(block) == [target]
    finally:
        await peers.close()


@pytest_twisted.ensureDeferred
async def test_client_refuses_an_agent_that_is_not_the_introduced_one(shared_network):
    net = shared_network
    discovery, peers = await _client(net)
    try:
        a, b = net.agents[0], net.agents[1]
        data = b"hello"
        block = block_hash(data)
        intro = await discovery.introduce_me(PeerAddress.parse(a.address), block, len(data), peers.public_address)
        # Pretend the server said agent b lives at a's address: the QUIC peer's key won't match.
        forged = Introduction(intro.key, b.agent_id, intro.address)
        with pytest.raises(Exception) as info:
            await peers.upload(forged, block, data)
        assert "identity" in str(info.value).lower() or "key" in str(info.value).lower()
        assert not _stored_anywhere(net, block)
    finally:
        await peers.close()


@pytest_twisted.ensureDeferred
async def test_owner_audits_a_holder_over_quic_without_downloading(shared_network):
    """The owner of a part challenges a real agent for it: the agent proves it holds the part
    with one leaf and its sibling hashes, checked against the address alone. After rot in the
    challenged leaf, the agent quarantines its copy and answers not-found."""
    from dsss import proofs
    from dsss.errors import NotFound

    net = shared_network
    discovery, peers = await _client(net)
    try:
        agent = net.agents[1]
        target = PeerAddress.parse(agent.address)
        data = os.urandom(5 * proofs.LEAF_SIZE + 77)
        block = block_hash(data)
        intro = await discovery.introduce_me(target, block, len(data), peers.public_address)
        await peers.upload(intro, block, data)

        for index in (0, 3, 5):
            dkey = await discovery.introduce_me(target, block, 0, peers.public_address)
            assert await peers.audit(dkey, block, index.to_bytes(16, "big")) == len(data)
        assert peers.audits_passed == 3

        # Rot in leaf 3 of the agent's copy: a challenge for leaf 3 finds it.
        path = agent.storage / "blocks" / block[:2] / block[2:4] / block
        raw = bytearray(path.read_bytes())
        raw[3 * proofs.LEAF_SIZE + 9] ^= 0x40
        path.write_bytes(bytes(raw))
        dkey = await discovery.introduce_me(target, block, 0, peers.public_address)
        with pytest.raises(NotFound, match="corrupt"):
            await peers.audit(dkey, block, (3).to_bytes(16, "big"))
        assert not path.exists()
        assert any(q.name.startswith(block + ".") for q in (agent.storage / "quarantine").iterdir())
        assert peers.audits_passed == 3
    finally:
        await peers.close()
