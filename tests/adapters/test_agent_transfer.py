"""The agent's UPLOAD/DOWNLOAD handling over real QUIC on an in-memory datagram link."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from dsss.agent.service import AgentConfig, StorageAgent
from dsss.agent.transfer import TransferHandler
from dsss.crypto.certs import make_certificate
from dsss.model import PeerAddress, block_hash
from dsss.quic import QuicEndpoint
from dsss.quic.testing import MemoryDatagramLink, run_until
from dsss.wire import transfer as wt

AGENT = ("127.0.0.2", 4000)
CLIENT = ("127.0.0.3", 5000)
OTHER = ("127.0.0.4", 6000)


class Rig:
    def __init__(self, tmp_path, *, capacity=None):
        self.clock = Clock()
        self.clock.advance(1000)
        self.link = MemoryDatagramLink(self.clock)
        self.agent = StorageAgent(self.clock, AgentConfig(storage=str(tmp_path / "agent"), capacity=capacity))
        self.handler = TransferHandler(self.agent)
        self.agent.quic = QuicEndpoint(
            self.clock,
            on_control=self.agent.on_control,
            server_identity=make_certificate(self.agent.identity.seed),
            on_stream=self.handler.on_stream,
        )
        self.link.attach(self.agent.quic, AGENT)
        self.clients = {}

    def client(self, addr=CLIENT):
        if addr not in self.clients:
            ep = QuicEndpoint(self.clock, on_control=lambda d, a: None)
            self.link.attach(ep, addr)
            self.clients[addr] = ep
        return self.clients[addr]

    def request(self, data: bytes, addr=CLIENT, max_response=wt.MAX_PART + 300):
        ep = self.client(addr)
        d = ep.connect(AGENT, expected_public_key=bytes.fromhex(self.agent.identity.agent_id))
        results = []
        d.addCallback(lambda conn: conn.request(data, max_response=max_response))
        d.addBoth(results.append)
        assert run_until(self.clock, lambda: bool(results), timeout=30)
        result = results[0]
        if not isinstance(result, bytes):
            result.raiseException()
        return result

    def key(self, block, size, client=CLIENT):
        return self.agent.introductions.issue(PeerAddress(*client), size, block, self.clock.seconds()).key


def upload(rig, key, block, data, addr=CLIENT):
    header = wt.encode_request(wt.Upload(key, block, len(data)))
    return wt.parse_reply(rig.request(header + data, addr).partition(b"\n")[0])


def download(rig, key, block, addr=CLIENT):
    raw = rig.request(wt.encode_request(wt.Download(key, block)), addr)
    line, _, body = raw.partition(b"\n")
    return wt.parse_reply(line), body


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


def test_upload_with_a_valid_key_stores_and_download_returns_it(rig):
    data = os.urandom(300_000)
    block = block_hash(data)
    assert upload(rig, rig.key(block, len(data)), block, data) == wt.Done()
    assert rig.agent.store.has(block)
    reply, body = download(rig, rig.key(block, 0), block)
    assert reply == wt.Done(len(data)) and body == data


def test_made_up_key_is_refused_and_stores_nothing(rig):
    data = b"x" * 1000
    block = block_hash(data)
    reply = upload(rig, "0" * 32, block, data)
    assert isinstance(reply, wt.Refused) and reply.code == "denied"
    assert not rig.agent.store.has(block)
    assert list((rig.agent.store.root / "incoming").iterdir()) == []


def test_reused_key_is_refused(rig):
    data = b"y" * 1000
    block = block_hash(data)
    key = rig.key(block, len(data))
    assert upload(rig, key, block, data) == wt.Done()
    other = b"z" * 1000
    reply = upload(rig, key, block_hash(other), other)
    assert isinstance(reply, wt.Refused) and reply.code == "denied"
    assert not rig.agent.store.has(block_hash(other))
    # A download key is single-use too.
    dkey = rig.key(block, 0)
    assert download(rig, dkey, block)[0] == wt.Done(1000)
    assert download(rig, dkey, block)[0].code == "denied"


def test_key_bound_to_client_hash_and_size(rig):
    data = b"q" * 5000
    block = block_hash(data)
    # Presented from another address.
    reply = upload(rig, rig.key(block, len(data), client=CLIENT), block, data, addr=OTHER)
    assert reply.code == "denied"
    # For another hash.
    other = block_hash(b"other")
    reply = upload(rig, rig.key(other, len(data)), block, data)
    assert reply.code == "denied"
    # With another size.
    reply = upload(rig, rig.key(block, len(data) + 1), block, data)
    assert reply.code == "denied"
    # Expired.
    key = rig.key(block, len(data))
    rig.clock.advance(rig.agent.introductions.ttl + 1)
    reply = upload(rig, key, block, data)
    assert reply.code == "denied"
    assert not rig.agent.store.has(block)


def test_bytes_that_do_not_match_the_hash_are_refused(rig):
    data = b"a" * 4000
    wrong = block_hash(b"b" * 4000)
    reply = upload(rig, rig.key(wrong, len(data)), wrong, data)
    assert isinstance(reply, wt.Refused) and reply.code == "integrity"
    assert len(rig.agent.store) == 0
    assert list((rig.agent.store.root / "incoming").iterdir()) == []


def test_truncated_upload_leaves_nothing(rig):
    data = os.urandom(10_000)
    block = block_hash(data)
    key = rig.key(block, len(data))
    header = wt.encode_request(wt.Upload(key, block, len(data)))
    reply = wt.parse_reply(rig.request(header + data[:5000]).partition(b"\n")[0])
    assert isinstance(reply, wt.Refused) and reply.code == "integrity"
    assert not rig.agent.store.has(block)
    assert list((rig.agent.store.root / "incoming").iterdir()) == []


def test_garbage_header_gets_a_clear_error(rig):
    raw = rig.request(b"HELLO there\n")
    reply = wt.parse_reply(raw.partition(b"\n")[0])
    assert isinstance(reply, wt.Refused) and reply.code == "protocol"
    raw = rig.request(b"U" * 1000)
    assert wt.parse_reply(raw.partition(b"\n")[0]).code == "protocol"


def test_full_agent_refuses_upload(tmp_path):
    rig = Rig(tmp_path, capacity=1000)
    data = b"f" * 2000
    block = block_hash(data)
    reply = upload(rig, rig.key(block, len(data)), block, data)
    assert isinstance(reply, wt.Refused) and reply.code == "full"
    assert len(rig.agent.store) == 0


def test_download_of_a_missing_or_corrupt_part(rig):
    missing = block_hash(b"missing")
    reply, body = download(rig, rig.key(missing, 0), missing)
    assert reply.code == "not-found" and body == b""
    data = b"c" * 3000
    block = block_hash(data)
    assert upload(rig, rig.key(block, len(data)), block, data) == wt.Done()
    path = rig.agent.store.path_of(block)
    path.write_bytes(b"C" + data[1:])
    reported_gone: list[str] = []
    rig.agent.lost = reported_gone.append  # what the agent tells the server (GONE)
    reply, body = download(rig, rig.key(block, 0), block)
    assert reply.code == "integrity" and body == b""
    assert reported_gone == [block]  # the server learns the copy is gone
    assert not rig.agent.store.has(block)
    assert len(list((rig.agent.store.root / "quarantine").iterdir())) == 1


def test_downloads_beyond_the_memory_bound_are_refused_as_busy(rig):
    data = b"d" * 5000
    block = block_hash(data)
    assert upload(rig, rig.key(block, len(data)), block, data) == wt.Done()
    rig.handler.max_serving = 4000  # less than one reply
    reply, body = download(rig, rig.key(block, 0), block)
    assert isinstance(reply, wt.Refused) and reply.code == "busy" and body == b""
    rig.handler.max_serving = 10_000
    reply, body = download(rig, rig.key(block, 0), block)
    assert reply == wt.Done(5000) and body == data
    assert rig.handler.serving == 0  # released once the reply went out


class _SlowServer:
    """A control connection whose server acknowledges HAVE only when the test says so."""

    def __init__(self) -> None:
        self.haves: list[tuple[list[str], defer.Deferred[None]]] = []

    def report_have(self, blocks: list[str]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.haves.append((blocks, d))
        return d


def _start_upload(rig, data):
    block = block_hash(data)
    header = wt.encode_request(wt.Upload(rig.key(block, len(data)), block, len(data)))
    ep = rig.client()
    results = []
    d = ep.connect(AGENT, expected_public_key=bytes.fromhex(rig.agent.identity.agent_id))
    d.addCallback(lambda conn: conn.request(header + data, max_response=wt.MAX_HEADER))
    d.addBoth(results.append)
    return block, results


def test_an_upload_is_answered_once_the_server_has_indexed_it(rig):
    """Read your writes: the uploader's Ok comes after the server acknowledged the agent's
    HAVE, so a who-has right after a put finds every copy."""
    server = _SlowServer()
    rig.agent.connection = server
    block, results = _start_upload(rig, os.urandom(50_000))
    assert run_until(rig.clock, lambda: bool(server.haves), timeout=30)
    assert server.haves[0][0] == [block] and rig.agent.store.has(block)
    run_until(rig.clock, lambda: bool(results), timeout=1.0)
    assert results == []  # stored, but not answered while the server has not taken it in
    server.haves[0][1].callback(None)
    assert run_until(rig.clock, lambda: bool(results), timeout=5)
    assert wt.parse_reply(results[0].partition(b"\n")[0]) == wt.Done()


def test_a_server_that_does_not_acknowledge_holds_an_upload_back_two_seconds_at_most(rig):
    from dsss.agent.transfer import HAVE_WAIT

    server = _SlowServer()
    rig.agent.connection = server
    block, results = _start_upload(rig, os.urandom(20_000))
    assert run_until(rig.clock, lambda: bool(server.haves), timeout=30)
    started = rig.clock.seconds()
    assert run_until(rig.clock, lambda: bool(results), timeout=HAVE_WAIT + 5)
    assert rig.clock.seconds() - started >= HAVE_WAIT - 0.01
    assert wt.parse_reply(results[0].partition(b"\n")[0]) == wt.Done()


class StalledUpload:
    """An UPLOAD header and a few bytes on a stream that is never ended (an attacker's upload)."""

    def __init__(self, rig, key, block, size, addr=CLIENT, first=b"x"):
        self.reply = b""
        self.ended = False
        ep = rig.client(addr)
        d = ep.connect(AGENT, expected_public_key=bytes.fromhex(rig.agent.identity.agent_id))
        conns = []
        d.addCallback(conns.append)
        assert run_until(rig.clock, lambda: bool(conns), timeout=10)
        self.stream = conns[0].open_stream()
        self.stream.on_data = self._data
        self.stream.on_end = self._end
        self.stream.on_error = lambda e: self._end()
        self.stream.write(wt.encode_request(wt.Upload(key, block, size)) + first)

    def _data(self, chunk):
        self.reply += chunk

    def _end(self):
        self.ended = True


def advance_with_expiry(rig, seconds, step=1.0):
    """Let `seconds` pass as the agent's tick would: transfers' expiry checked every step."""
    end = rig.clock.seconds() + seconds
    while rig.clock.seconds() < end:
        run_until(rig.clock, lambda: False, timeout=step)
        rig.handler.expire(rig.clock.seconds())


def test_a_stalled_upload_is_dropped_and_frees_its_space(tmp_path):
    rig = Rig(tmp_path, capacity=64 * 1024 * 1024)  # free space set by capacity, not the disk's
    size = 16 * 1024 * 1024
    block = block_hash(b"never sent")
    free_before = rig.agent.store.free
    up = StalledUpload(rig, rig.key(block, size), block, size)
    run_until(rig.clock, lambda: rig.agent.store.reserved == size, timeout=5)
    assert rig.agent.store.free == free_before - size  # reserved while it may still progress
    policy = rig.handler.policy
    advance_with_expiry(rig, policy.grace + policy.window + 2)
    assert run_until(rig.clock, lambda: up.ended, timeout=5)
    assert up.reply.startswith(b"ERROR timeout upload dropped: too slow")
    assert rig.agent.store.reserved == 0 and rig.agent.store.free == free_before
    assert not any((rig.agent.store.root / "incoming").iterdir())  # partial file deleted
    assert rig.handler.expired == 1 and rig.handler.reservations.held(CLIENT[0]) == 0


def test_one_source_cannot_reserve_more_than_its_share(tmp_path):
    rig = Rig(tmp_path)
    share = rig.handler.policy.per_source
    size = 16 * 1024 * 1024
    held = []
    for i in range(share // size):
        block = block_hash(b"%d" % i)
        held.append(StalledUpload(rig, rig.key(block, size), block, size))
    run_until(rig.clock, lambda: rig.handler.reservations.held(CLIENT[0]) == share, timeout=10)
    block = block_hash(b"one too many")
    over = StalledUpload(rig, rig.key(block, size), block, size)
    assert run_until(rig.clock, lambda: over.ended, timeout=10)
    assert over.reply.startswith(b"ERROR busy uploads from 127.0.0.3 already hold")
    # Another source is not affected, and its honest upload is stored.
    data = os.urandom(100_000)
    honest = block_hash(data)
    assert upload(rig, rig.key(honest, len(data), client=OTHER), honest, data, addr=OTHER) == wt.Done()
    assert all(not h.ended for h in held)
