# -*- test-case-name: tests.unit.test_client_flows -*-
"""put and get of many files (dsss.client.putflow, getflow, storing) against in-memory fakes of
the discovery server and the agents: inline small files, several files in flight, per-file errors."""

from __future__ import annotations

import io
import os
import random
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from nacl.public import PrivateKey
from twisted.internet import defer

from dsss.client.batch import files_in_flight
from dsss.client.discovery import Introduction
from dsss.client.fetching import fetch_block
from dsss.client.getflow import get_files, get_to_stream
from dsss.client.putflow import INLINE_MAX, part_count, put_files
from dsss.crypto.manifest import open_manifest
from dsss.errors import NotFound, Offline, Unavailable, WrongKey
from dsss.model import PeerAddress, block_hash
from tests.unit.test_client_catalog_config import FakeNetwork, result_of

OWNER = PrivateKey.generate()
PART = 8 * 1024


def write_files(tmp_path: Path, sizes: list[int]) -> tuple[list[str], list[bytes]]:
    paths, datas = [], []
    for i, size in enumerate(sizes):
        data = os.urandom(size)
        p = tmp_path / f"f{i}"
        p.write_bytes(data)
        paths.append(str(p))
        datas.append(data)
    return paths, datas


def put_all(net: FakeNetwork, paths: list[str], part_size: int = PART) -> dict[int, Any]:
    ended: dict[int, Any] = {}

    def done(i: int, address: str | None, error: BaseException | None) -> None:
        assert i not in ended
        ended[i] = address if error is None else error

    sizes = [os.path.getsize(p) for p in paths]
    result_of(put_files(net.session(), paths, sizes, owner=OWNER.public_key, part_size=part_size,
                        on_done=done))
    return ended


def blob_of(net: FakeNetwork, block: str) -> bytes:
    return next(blobs[block] for blobs in net.agents.values() if block in blobs)


def fetch(net: FakeNetwork, address: str) -> bytes:
    out = io.BytesIO()
    result_of(get_to_stream(net.session(), address, out, key=OWNER))
    return out.getvalue()


def test_small_files_travel_inside_their_manifest(tmp_path: Path) -> None:
    net = FakeNetwork()
    net.add_agents(4)
    sizes = [0, 1, 100, INLINE_MAX, INLINE_MAX + 1, 3 * PART - 5]
    paths, datas = write_files(tmp_path, sizes)
    ended = put_all(net, paths, part_size=64 * 1024)
    assert sorted(ended) == list(range(len(sizes)))
    for i, data in enumerate(datas):
        address = ended[i]
        assert fetch(net, address) == data
        manifest, _ = open_manifest(blob_of(net, address), OWNER)
        inline = 0 < len(data) <= INLINE_MAX
        assert (manifest.inline is not None) == inline
        assert len(manifest.parts) == part_count(len(data), 64 * 1024)
        # An inline file is one block: only its manifest went to the agents, 3 copies.
        blocks = {b for _, b in net.uploads if b in {address, *(p.hash for p in manifest.parts)}}
        assert len(blocks) == 1 + len(manifest.parts)
    # The plaintext of a small file is nowhere on the agents.
    for blobs in net.agents.values():
        for blob in blobs.values():
            assert datas[2] not in blob and datas[3][:64] not in blob
    # A file no larger than the part size, but larger than INLINE_MAX, is one part as before;
    # with a part size smaller than the file, nothing is inline.
    assert part_count(INLINE_MAX + 1, 1 << 20) == 1 and part_count(100, 64) == 2


def test_put_files_stops_starting_files_after_a_failure(tmp_path: Path) -> None:
    net = FakeNetwork()
    net.add_agents(3)
    paths, datas = write_files(tmp_path, [10, 20, 3333, 40, 50])
    where = net.where_to_upload

    async def refuse_one_size(size: int, exclude: Any = None) -> Any:
        if size > 3333:  # the manifest of file 2 only
            raise Unavailable("server: no live agent has room")
        return await where(size, exclude)

    net.where_to_upload = refuse_one_size  # type: ignore[method-assign]
    ended = put_all(net, paths)
    # The fakes answer at once, so files 0 and 1 ended before 2 started, and 3 and 4 were
    # never started: not stored, not reported.
    assert sorted(ended) == [0, 1, 2]
    assert isinstance(ended[2], Unavailable)
    assert fetch(net, ended[0]) == datas[0] and fetch(net, ended[1]) == datas[1]
    assert len({b for _, b in net.uploads}) == 2


class GatedNetwork(FakeNetwork):
    """Uploads wait until the test releases them, so what is in flight can be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[defer.Deferred[None], Introduction, str, bytes]] = []

    async def upload(self, intro: Introduction, block: str, data: bytes) -> None:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((d, intro, block, data))
        await d
        await FakeNetwork.upload(self, intro, block, data)

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, *_ in waiting:
            d.callback(None)

    def blocks_in_flight(self) -> set[str]:
        return {block for _, _, block, _ in self.waiting}


def test_several_small_files_in_flight_and_large_ones_alone(tmp_path: Path, monkeypatch: Any) -> None:
    import dsss.client.putflow as putflow

    net = GatedNetwork()
    net.add_agents(4)
    session = net.session()  # parallel 2: 4 files in flight
    assert files_in_flight(session) == 4
    sizes = [100] * 6 + [3 * PART, 3 * PART] + [100] * 2
    paths, datas = write_files(tmp_path, sizes)
    running: set[str] = set()
    most = {"files": 0, "large": 0}
    original = putflow.put_file

    async def watched(session: Any, path: str, **kw: Any) -> str:
        running.add(path)
        most["files"] = max(most["files"], len(running))
        most["large"] = max(most["large"], sum(os.path.getsize(p) > PART for p in running))
        try:
            return await original(session, path, **kw)
        finally:
            running.discard(path)

    monkeypatch.setattr(putflow, "put_file", watched)
    ended: dict[int, Any] = {}
    d = defer.ensureDeferred(put_files(
        session, paths, sizes, owner=OWNER.public_key, part_size=PART,
        on_done=lambda i, a, e: ended.__setitem__(i, a if e is None else e),
    ))
    for _ in range(100):
        if not net.waiting:
            break
        net.release()
    assert d.called and sorted(ended) == list(range(10))
    assert all(isinstance(a, str) for a in ended.values())
    for i, data in enumerate(datas):
        assert fetch(net, ended[i]) == data
    # Several files were in flight, never more than the window, and never two large ones.
    assert most == {"files": 4, "large": 1}


def test_get_files_reports_every_address_and_writes_only_complete_files(tmp_path: Path) -> None:
    net = FakeNetwork()
    net.add_agents(4)
    paths, datas = write_files(tmp_path, [5, INLINE_MAX + 7, 3 * PART + 1, 77])
    ended = put_all(net, paths)
    addresses = [ended[i] for i in range(4)]
    # Someone else's file, an unknown address, and a file whose part is corrupt everywhere.
    other = FakeNetwork()
    other.agents, other.live = net.agents, net.live
    stranger = PrivateKey.generate()
    (tmp_path / "x").write_bytes(b"not yours")
    theirs: dict[int, Any] = {}
    result_of(put_files(other.session(), [str(tmp_path / "x")], [9], owner=stranger.public_key,
                        on_done=lambda i, a, e: theirs.__setitem__(i, a)))
    unknown = "ab" * 32
    manifest, _ = open_manifest(blob_of(net, addresses[1]), OWNER)
    for blobs in net.agents.values():
        blobs[manifest.parts[0].hash] = b"rotten" * 10
    wanted = [*addresses, theirs[0], unknown]

    outputs: dict[int, io.BytesIO] = {}
    committed: list[int] = []
    aborted: list[int] = []

    @contextmanager
    def open_output(i: int, m: Any) -> Iterator[io.BytesIO]:
        outputs[i] = io.BytesIO()
        try:
            yield outputs[i]
        except BaseException:
            aborted.append(i)
            raise
        committed.append(i)

    results: dict[int, Any] = {}
    result_of(get_files(net.session(), wanted, key=OWNER, open_output=open_output,
                        on_done=lambda i, m, e: results.__setitem__(i, e if e is not None else m)))
    assert sorted(results) == list(range(6))
    assert sorted(committed) == [0, 2, 3] and aborted == [1]
    for i in (0, 2, 3):
        assert outputs[i].getvalue() == datas[i] and results[i].name == f"f{i}"
    assert "corrupt on every replica" in str(results[1])
    assert isinstance(results[4], WrongKey) and 4 not in outputs  # nothing opened
    assert isinstance(results[5], NotFound) and "unknown address" in str(results[5])


def test_inline_manifest_block_hash_is_the_address(tmp_path: Path) -> None:
    net = FakeNetwork()
    net.add_agents(3)
    paths, datas = write_files(tmp_path, [42])
    address = put_all(net, paths)[0]
    for blobs in net.agents.values():
        assert list(blobs) == [address] and block_hash(blobs[address]) == address


@pytest.mark.parametrize("size", [1, INLINE_MAX])
def test_inline_file_that_changes_while_read_is_refused(tmp_path: Path, size: int) -> None:
    from dsss.client.putflow import put_stream
    from dsss.errors import DSSSError

    net = FakeNetwork()
    net.add_agents(3)
    with pytest.raises(DSSSError, match="changed while"):
        result_of(put_stream(net.session(), io.BytesIO(b"x" * (size - 1)), name="n", size=size,
                             owner=OWNER.public_key))
    with pytest.raises(DSSSError, match="grew while"):
        result_of(put_stream(net.session(), io.BytesIO(b"x" * (size + 1)), name="n", size=size,
                             owner=OWNER.public_key))
    assert net.uploads == []


class PlacingNetwork(FakeNetwork):
    """A server with /api/upload-to: placement and introductions in one call; one agent
    refuses every introduction."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing: set[Any] = set()
        self.calls: list[tuple[int, list[Any]]] = []
        self.introductions = 0

    async def upload_to(self, block: str, size: int, from_: Any, *, copies: int,
                        exclude: list[Any] | None = None, chain: bool = False) -> list[tuple[Any, Any]]:
        # a server that does not chain: every introduction is for the client
        self.calls.append((copies, list(exclude or [])))
        picked = (await self.where_to_upload(size, exclude))[:copies]
        return [(a, Unavailable(f"server: agent at {a} refused: full no room") if a in self.refusing
                 else await self.introduce_me(a, block, size, from_)) for a in picked]

    async def introduce_me(self, to: Any, block: str, size: int, from_: Any) -> Introduction:
        self.introductions += 1
        return await super().introduce_me(to, block, size, from_)


def test_store_block_asks_where_and_introductions_in_one_call_and_replaces_refusals() -> None:
    from dsss.client.storing import store_block

    net = PlacingNetwork()
    a, b, c, d = net.add_agents(4)
    net.refusing.add(b)
    data = b"ciphertext" * 10
    block = block_hash(data)
    stored = result_of(store_block(net.session(), block, data))
    # a, c and then d in a second round: b refused its introduction and was excluded.
    assert sorted(stored) == [a, c, d]
    assert net.calls == [(3, []), (1, [a, c, b])]
    assert net.introductions == 3  # never asked again one at a time
    assert all(block in net.agents[x] for x in (a, c, d)) and block not in net.agents[b]


def test_put_window_bounds_bytes_in_flight() -> None:
    from dsss.client.putflow import PUT_WINDOW_BYTES, put_window

    MiB = 1024 * 1024
    assert put_window(4, 4 * MiB) == 3
    assert put_window(4, 1 * MiB) == 4
    assert put_window(64, 64 * 1024) == 64
    assert put_window(8, 16 * MiB) == 1
    for parallel in (1, 2, 4, 16):
        for part in (4096, MiB, 4 * MiB, 16 * MiB - 16):
            window = put_window(parallel, part)
            assert 1 <= window <= parallel
            assert window == 1 or window * part <= PUT_WINDOW_BYTES


class ChainingNetwork(PlacingNetwork):
    """A server that forms replication chains, and agents that pass parts on; `breaks_after`
    makes the chain stop after that many agents (the next one cannot be reached)."""

    def __init__(self) -> None:
        super().__init__()
        self.breaks_after: int | None = None
        self.dead: set[Any] = set()  # agents that fail every upload sent to them
        self.chained_uploads: list[list[Any]] = []
        self.chain_requests: list[bool] = []

    async def upload_to(self, block: str, size: int, from_: Any, *, copies: int,
                        exclude: list[Any] | None = None, chain: bool = False) -> list[tuple[Any, Any]]:
        self.chain_requests.append(chain)
        picked = await super().upload_to(block, size, from_, copies=copies, exclude=exclude)
        if not chain:
            return picked
        return [(a, i if n == 0 or not isinstance(i, Introduction)
                 else Introduction(i.key, i.agent_id, i.address, chained=True))
                for n, (a, i) in enumerate(picked)]

    async def upload(self, intro: Introduction, block: str, data: bytes,  # type: ignore[override]
                     chain: tuple[Introduction, ...] = ()) -> int:
        if intro.address in self.dead:
            raise Unavailable(f"cannot reach agent {intro.address}")
        agents = [intro.address] + [h.address for h in chain]
        assert all(h.chained for h in chain)
        if chain:
            self.chained_uploads.append(agents)
        reached = agents if self.breaks_after is None else agents[: self.breaks_after]
        for a in reached:
            await FakeNetwork.upload(self, Introduction("k" * 32, "00" * 32, a), block, data)
        return len(reached)


def test_store_block_sends_a_part_once_down_a_chain() -> None:
    from dsss.client.storing import store_block

    net = ChainingNetwork()
    a, b, c, _d = net.add_agents(4)
    data = b"ciphertext" * 10
    block = block_hash(data)
    stored = result_of(store_block(net.session(), block, data))
    assert sorted(stored) == [a, b, c]
    assert net.chained_uploads == [[a, b, c]]  # one upload from the client
    assert net.chain_requests == [True]


def test_a_broken_chain_is_finished_from_the_client_without_blaming_the_agent() -> None:
    """The chain stops after the first agent (it could not reach the second): the two copies
    left are made directly, on agents the server picks again (the second among them: it was
    not at fault)."""
    from dsss.client.storing import store_block

    net = ChainingNetwork()
    a, b, c, d = net.add_agents(4)
    net.breaks_after = 1
    data = b"ciphertext" * 10
    block = block_hash(data)
    stored = result_of(store_block(net.session(), block, data))
    assert len(stored) == 3 and stored[0] == a
    assert net.chained_uploads == [[a, b, c]]
    assert net.chain_requests == [True, False]  # no second chain for this part
    assert net.calls[1] == (2, [a])  # nobody but the holder excluded
    assert sorted(x for x in (a, b, c, d) if block in net.agents[x]) == sorted(stored)


def test_a_session_pauses_chaining_after_chains_keep_breaking_then_tries_again() -> None:
    """Chains that keep stopping short: the session sends every copy itself for CHAIN_PAUSE
    seconds, then chains again (a gateway runs for days; a few failed forwards must not stop
    its chains for good)."""
    from dsss.client.storing import CHAIN_BREAKS_TOLERATED, CHAIN_PAUSE, store_block

    net = ChainingNetwork()
    net.add_agents(4)
    net.breaks_after = 1
    session = net.session()
    now = [1000.0]
    session.clock = lambda: now[0]

    def store(i: int) -> None:
        data = b"part %d" % i
        assert len(result_of(store_block(session, block_hash(data), data))) == 3

    for i in range(CHAIN_BREAKS_TOLERATED + 2):
        store(i)
    assert len(net.chained_uploads) == CHAIN_BREAKS_TOLERATED and not session.chaining()
    assert session.chain is True  # the user's choice stands; only paused
    now[0] += CHAIN_PAUSE - 1
    store(10)
    assert len(net.chained_uploads) == CHAIN_BREAKS_TOLERATED
    now[0] += 1
    net.breaks_after = None
    store(11)
    assert len(net.chained_uploads) == CHAIN_BREAKS_TOLERATED + 1 and session.chaining()


def test_session_without_chain_sends_every_copy() -> None:
    from dsss.client.storing import store_block

    net = ChainingNetwork()
    net.add_agents(4)
    session = net.session()
    session.chain = False
    data = b"x" * 100
    stored = result_of(store_block(session, block_hash(data), data))
    assert len(stored) == 3 and net.chained_uploads == [] and net.chain_requests == [False]


def test_a_first_agent_that_fails_is_replaced_and_chaining_goes_on() -> None:
    """The first agent of the chain fails: it is excluded like any failed agent, the next round
    chains again among the others, and the session keeps chaining."""
    from dsss.client.storing import store_block

    net = ChainingNetwork()
    a, b, c, d = net.add_agents(4)
    net.dead.add(a)
    session = net.session()
    data = b"ciphertext" * 10
    stored = result_of(store_block(session, block_hash(data), data))
    assert sorted(stored) == [b, c, d]
    assert net.chained_uploads == [[b, c, d]]
    assert net.chain_requests == [True, True] and net.calls[1] == (3, [a])
    assert session.chain is True and session.chain_breaks == 0


class SlowAgents(FakeNetwork):
    """Downloads that finish only when the test says so; who-has lists every live agent."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[PeerAddress, defer.Deferred[None]]] = []

    async def download(self, intro: Introduction, block: str, *, verify: bool = True) -> bytes:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((intro.address, d))
        await d
        return await super().download(intro, block, verify=verify)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_parts_in_flight_are_fetched_from_the_least_busy_holders(seed: int) -> None:
    net = SlowAgents()
    holders = net.add_agents(3)
    blocks = []
    for _ in range(13):
        data = os.urandom(100)
        blocks.append(block_hash(data))
        net.store(blocks[-1], data, holders)
    session = net.session()
    session.rng = random.Random(seed)  # the order among equally busy holders
    fetches = [defer.ensureDeferred(fetch_block(session, b)) for b in blocks[:12]]
    # Twelve parts in flight at once, each held by all three agents: four from each.
    assert sorted(Counter(a for a, _ in net.waiting).values()) == [4, 4, 4]
    assert session.fetching == {h: 4 for h in holders}
    first = net.waiting[0][0]
    for a, d in net.waiting[:12]:
        if a == first:
            d.callback(None)
    # The next part goes to the agent that finished its four.
    last = defer.ensureDeferred(fetch_block(session, blocks[12]))
    assert net.waiting[12][0] == first
    for _, d in net.waiting[:13]:
        if not d.called:
            d.callback(None)
    assert [result_of(f) for f in fetches] == [blob_of(net, b) for b in blocks[:12]]
    assert result_of(last) == blob_of(net, blocks[12])
    assert session.fetching == {}  # nothing left counted once all are done


# --- erasure coding ------------------------------------------------------------------------------


def coded_session(net: FakeNetwork, coding: str = "2/4") -> Any:
    from dsss.erasure import Coding

    session = net.session()
    session.erasure = Coding.parse(coding)
    return session


def put_coded(net: FakeNetwork, data: bytes, coding: str = "2/4", part: int = PART) -> str:
    from dsss.client.putflow import put_stream

    return result_of(put_stream(coded_session(net, coding), io.BytesIO(data), name="f.bin", size=len(data),
                                owner=OWNER.public_key, part_size=part))


def test_an_erasure_coded_put_stores_each_share_once_on_an_agent_of_its_own() -> None:
    net = FakeNetwork()
    agents = net.add_agents(5)
    data = os.urandom(3 * PART + 100)
    address = put_coded(net, data)
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    assert manifest.erasure is not None and str(manifest.erasure) == "2/4" and len(manifest.parts) == 4
    for ref in manifest.parts:
        assert len(ref.shares) == 4 and all(h.startswith("s") for h in ref.shares)
        holders = [[a for a in agents if h in net.agents[a]] for h in ref.shares]
        assert all(len(h) == 1 for h in holders)  # one copy of each share
        assert len({h[0] for h in holders}) == 4  # no two shares of a part on one agent
    # The manifest itself is replicated like any whole block.
    assert sum(address in net.agents[a] for a in agents) == 3
    # Stored: twice the ciphertext, not three times.
    stored = sum(len(v) for a in agents for k, v in net.agents[a].items() if k != address)
    ciphertext = sum(ref.size for ref in manifest.parts)
    assert ciphertext * 2 <= stored <= ciphertext * 2 + 4 * len(manifest.parts)
    assert fetch(net, address) == data


def test_an_erasure_coded_file_survives_losing_n_minus_k_agents_and_no_more() -> None:
    net = FakeNetwork()
    agents = net.add_agents(4)
    data = os.urandom(2 * PART + 7)
    address = put_coded(net, data)
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    # Lose two agents that hold the first part's two data shares: the parity shares decode it.
    first = manifest.parts[0].shares
    gone = [a for a in agents if first[0] in net.agents[a] or first[1] in net.agents[a]]
    keep_manifest = [a for a in agents if a not in gone and address in net.agents[a]]
    assert len(gone) == 2 and keep_manifest
    for a in gone:
        net.live.discard(a)
    assert fetch(net, address) == data
    # A third agent lost: a part cannot be rebuilt from one share.
    third = next(a for a in agents if a not in gone and a != keep_manifest[0])
    net.live.discard(third)
    with pytest.raises(Offline, match="1 of the 2 shares it needs are online now"):
        fetch(net, address)


def test_a_corrupt_share_is_passed_over_for_another() -> None:
    from dsss.errors import IntegrityError

    net = FakeNetwork()
    agents = net.add_agents(4)
    data = os.urandom(PART + 1)
    address = put_coded(net, data)
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    shares = manifest.parts[0].shares
    holder = next(a for a in agents if shares[0] in net.agents[a])
    net.agents[holder][shares[0]] = b"rotten" + net.agents[holder][shares[0]][6:]
    assert fetch(net, address) == data
    # Rot in three of the four shares of a part leaves one: the get says they are corrupt.
    address = put_coded(net, data)
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    for h in manifest.parts[0].shares[:3]:
        for a in agents:
            if h in net.agents[a]:
                net.agents[a][h] = b"x" * len(net.agents[a][h])
    with pytest.raises(IntegrityError, match="only 1 good shares of the 2"):
        fetch(net, address)


def test_an_erasure_coded_put_needs_an_agent_per_share() -> None:
    from dsss.client.storing import ReplicationError

    net = FakeNetwork()
    net.add_agents(3)
    with pytest.raises(ReplicationError, match="3 of a part's 4 shares"):
        put_coded(net, os.urandom(PART * 2))


class SharePlacingNetwork(FakeNetwork):
    """A server with multi-hash /api/upload-to; one agent refuses every introduction."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing: set[Any] = set()
        self.calls: list[tuple[int, list[Any]]] = []

    async def upload_shares(self, blocks: list[str], size: int, from_: Any,
                            exclude: list[Any] | None = None) -> list[tuple[Any, Any]]:
        self.calls.append((len(blocks), list(exclude or [])))
        picked = (await self.where_to_upload(size, exclude, count=len(blocks)))
        return [(a, Unavailable(f"server: agent at {a} refused") if a in self.refusing
                 else Introduction("k" * 32, "00" * 32, a)) for a in picked]


def test_store_shares_places_and_introduces_in_one_call_and_replaces_refusals() -> None:
    from dsss.client.storing import code_part, store_shares
    from dsss.erasure import Coding

    net = SharePlacingNetwork()
    a, b, c, d, e = net.add_agents(5)
    net.refusing.add(b)
    shares = code_part(os.urandom(1000), Coding(2, 4))
    placed = result_of(store_shares(net.session(), shares))
    assert sorted(placed.values()) == [a, c, d, e]
    assert net.calls == [(4, []), (1, [a, c, d, b])]
    assert all(h in net.agents[placed[h]] for h, _ in shares)


def test_put_window_counts_the_shares_a_coded_part_holds() -> None:
    from dsss.client.putflow import PUT_WINDOW_SHARE_BYTES, put_window
    from dsss.erasure import Coding

    MiB = 1024 * 1024
    assert put_window(4, 4 * MiB, Coding(2, 4)) == 2 < put_window(4, 4 * MiB)
    assert put_window(4, 16 * MiB, Coding(2, 4)) == 1
    for coding in (Coding(2, 4), Coding(3, 5), Coding(2, 16)):
        for part in (4096, MiB, 4 * MiB, 16 * MiB - 16):
            window = put_window(16, part, coding)
            assert window == 1 or window * part * coding.n / coding.k <= PUT_WINDOW_SHARE_BYTES


def test_survey_counts_shares_and_repair_rebuilds_the_lost_ones_elsewhere() -> None:
    from dsss.client.maintenance import repair, survey

    net = FakeNetwork()
    agents = net.add_agents(6)
    data = os.urandom(2 * PART)
    net.live = set(agents[:4])  # the file goes to the first four
    address = put_coded(net, data)
    net.live = set(agents)
    session = coded_session(net)
    health = result_of(survey(session, address, OWNER))
    assert health.ok and health.part_counts() == [4, 4] and health.part_target() == 4
    assert len(health.blocks) == 1 + 2 * 4 and {b.target for b in health.blocks[1:]} == {1}

    lost = agents[0]
    net.live.discard(lost)
    before = {h for h in net.agents[lost] if h != address}
    health = result_of(survey(session, address, OWNER))
    assert not health.ok and health.part_counts() == [3, 3] and health.lost == []
    missing = sorted(b.hash for b in health.short if b.share is not None)
    assert missing == sorted(before)
    net.uploads.clear()
    results = result_of(repair(session, health))
    assert all(r.error is None for r in results)
    rebuilt = [(a, h) for a, h in net.uploads if h in before]
    assert sorted(h for _, h in rebuilt) == missing  # the very shares the manifest names
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    for a, h in rebuilt:
        assert a in (agents[4], agents[5])  # an agent holding no other share of that part
        part = next(ref for ref in manifest.parts if h in ref.shares)
        assert not any(other in net.agents[a] for other in part.shares if other != h)
    assert result_of(survey(session, address, OWNER)).ok
    assert fetch(net, address) == data


def test_repair_says_a_part_with_fewer_than_k_shares_is_lost() -> None:
    from dsss.client.maintenance import repair, survey

    net = FakeNetwork()
    agents = net.add_agents(4)
    address = put_coded(net, os.urandom(PART + 1))
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    for h in manifest.parts[0].shares[:3]:
        for a in agents:
            net.agents[a].pop(h, None)
    session = coded_session(net)
    health = result_of(survey(session, address, OWNER))
    assert len(health.lost) == 3 and health.part_counts() == [1, 4]
    results = result_of(repair(session, health))
    assert len(results) == 3 and all(r.lost and "only 1 of the 2 shares" in (r.error or "") for r in results)


def test_a_get_keeps_about_parallel_share_downloads_in_flight() -> None:
    net = SlowAgents()
    net.add_agents(4)
    session = coded_session(net)
    session.parallel = 4
    data = os.urandom(6 * PART)
    address = put_coded(net, data)
    out = io.BytesIO()
    d = defer.ensureDeferred(get_to_stream(session, address, out, key=OWNER))
    most = 0
    while not d.called:
        pending = [w for _, w in net.waiting if not w.called]
        most = max(most, len(pending))
        assert pending, "stalled"
        pending[0].callback(None)
    result_of(d)
    assert out.getvalue() == data
    # 2 parts of 2 shares each (4 / k), not 4 parts: 8 downloads and their decoding at once.
    assert most == 4


class UncheckedAgents(FakeNetwork):
    """Agents that serve whatever they hold, as an agent of an older version would."""

    async def download(self, intro: Introduction, block: str, *, verify: bool = True) -> bytes:
        data = self.agents[intro.address].get(block)
        if data is None:
            raise NotFound("this agent does not store that part")
        return data


def test_bytes_under_an_older_address_are_refused_as_such() -> None:
    """Every holder serves a blob under its plain BLAKE3 (the older scheme): the fetch fails
    with OldAddress, which says to store the file again, not that every replica is corrupt."""
    import blake3

    from dsss.errors import IntegrityError, OldAddress

    net = UncheckedAgents()
    holders = net.add_agents(3)
    data = os.urandom(5000)
    old = blake3.blake3(data).hexdigest()
    for h in holders:
        net.agents[h][old] = data
    with pytest.raises(OldAddress, match="older DSSS"):
        result_of(fetch_block(net.session(), old))
    # Bytes that match neither scheme are corrupt.
    for h in holders:
        net.agents[h][block_hash(b"x")] = data
    with pytest.raises(IntegrityError, match="corrupt on every replica"):
        result_of(fetch_block(net.session(), block_hash(b"x")))


# --- copies count once proven ------------------------------------------------------------------


class AuditedNetwork(FakeNetwork):
    """A server that audits: `droppers` acknowledge uploads, claim them, and keep nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.droppers: set[Any] = set()
        self.claims: dict[Any, set[str]] = {}
        self.audited: list[tuple[str, str]] = []

    @staticmethod
    def agent_id(address: Any) -> str:
        return f"{address.port:064x}"

    async def introduce_me(self, to: Any, block: str, size: int, from_: Any) -> Introduction:
        return Introduction("k" * 32, self.agent_id(to), to)

    async def upload(self, intro: Introduction, block: str, data: bytes) -> None:
        self.claims.setdefault(intro.address, set()).add(block)
        if intro.address in self.droppers:
            self.uploads.append((intro.address, block))
            return  # acknowledged (a valid receipt), nothing kept
        await FakeNetwork.upload(self, intro, block, data)

    async def locate(self, block: str) -> tuple[list[Any], list[Any]]:
        claimed = [a for a in sorted(self.live) if block in self.agents[a] or block in self.claims.get(a, ())]
        return claimed, [a for a in claimed if block in self.agents[a]]

    async def who_has(self, block: str) -> list[Any]:
        return (await self.locate(block))[0]

    async def audit(self, items: list[tuple[str, str]]) -> list[Any]:
        from dsss.client.discovery import AuditResult

        by_id = {self.agent_id(a): a for a in self.agents}
        self.audited += items
        out = []
        for block, agent in items:
            held = block in self.agents[by_id[agent]]
            out.append(AuditResult(block, agent, held, None, None if held else "does not have it"))
        return out


def test_a_put_counts_only_proven_copies_and_stores_the_others_elsewhere(tmp_path: Path) -> None:
    net = AuditedNetwork()
    agents = net.add_agents(5)
    net.droppers = {agents[0], agents[2]}
    paths, datas = write_files(tmp_path, [3 * PART + 7])
    ended = put_all(net, paths)
    address = ended[0]
    assert isinstance(address, str)
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    for block in [address, *(p.hash for p in manifest.parts)]:
        holders = [a for a in agents if block in net.agents[a]]
        assert len(holders) == 3 and not set(holders) & net.droppers
        # every copy on a dropper was audited and replaced
        assert {a for a, b in net.uploads if b == block} & net.droppers
    assert {net.agent_id(a) for a in net.droppers} <= {agent for _, agent in net.audited}
    assert fetch(net, address) == datas[0]


def test_a_put_fails_clearly_when_too_few_agents_prove_their_copies(tmp_path: Path) -> None:
    from dsss.client.storing import ReplicationError

    net = AuditedNetwork()
    agents = net.add_agents(4)
    net.droppers = set(agents[:2])  # two honest agents for three replicas
    paths, _ = write_files(tmp_path, [100])
    ended = put_all(net, paths)
    assert isinstance(ended[0], ReplicationError)
    assert "stored a part on 2 of 3 agents" in str(ended[0])
    assert "did not prove its copy" in str(ended[0])


def test_a_coded_put_counts_only_proven_shares() -> None:
    net = AuditedNetwork()
    agents = net.add_agents(6)
    net.droppers = {agents[1]}
    address = put_coded(net, os.urandom(2 * PART))
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    for ref in manifest.parts:
        for h in ref.shares:
            (holder,) = [a for a in agents if h in net.agents[a]]
            assert holder not in net.droppers


def test_check_shows_claimed_and_proven_apart() -> None:
    from dsss.client.maintenance import survey

    net = AuditedNetwork()
    agents = net.add_agents(4)
    address = result_of(put_stream_plain(net, os.urandom(2 * PART)))
    # An agent that dropped its copy after proving it still claims it.
    manifest, _ = open_manifest(blob_of(net, address), OWNER)
    part = manifest.parts[0].hash
    holder = next(a for a in agents if part in net.agents[a])
    del net.agents[holder][part]
    health = result_of(survey(net.session(), address, OWNER))
    block = health.blocks[1]
    assert block.holders != block.healthy and holder in block.holders and holder not in block.healthy
    doc = block.to_dict()
    assert doc["claimed"] == 3 and doc["replicas"] == 2 and str(holder) not in doc["proven"]
    assert not health.ok and health.short == [block] and health.lost == []


def put_stream_plain(net: FakeNetwork, data: bytes) -> Any:
    from dsss.client.putflow import put_stream

    return put_stream(net.session(), io.BytesIO(data), name="f.bin", size=len(data),
                      owner=OWNER.public_key, part_size=PART)


class AnswersStored(FakeNetwork):
    """One agent answers a DOWNLOAD with an upload's `Stored` reply; the client's real
    PeerNetwork.download reads what it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.confused: PeerAddress | None = None
        self.asked: list[PeerAddress] = []

    async def download(self, intro: Introduction, block: str, *, verify: bool = True) -> bytes:
        from twisted.internet.task import Clock

        from dsss.client.peer import PeerNetwork
        from dsss.wire import transfer as wt

        self.asked.append(intro.address)
        if intro.address != self.confused:
            return await super().download(intro, block, verify=verify)
        peers = PeerNetwork(Clock(), ("198.51.100.1", 8471))

        async def request(intro: Introduction, data: Any, max_response: int) -> bytes:
            return wt.encode_reply(wt.Stored(("ab" * 64,)))

        peers._request = request  # type: ignore[method-assign]
        return await peers.download(intro, block, verify=verify)


def test_an_agent_answering_a_download_with_stored_is_passed_over_for_another() -> None:
    from dsss.client.peer import PeerError

    net = AnswersStored()
    holders = net.add_agents(2)
    data = os.urandom(100)
    block = block_hash(data)
    net.store(block, data, holders)
    net.confused = holders[0]
    intro = Introduction("cd" * 16, "ab" * 32, holders[0])
    with pytest.raises(PeerError, match="no part"):
        result_of(net.download(intro, block))
    firsts = set()
    for seed in range(8):  # either holder asked first
        net.asked.clear()
        session = net.session()
        session.rng = random.Random(seed)
        assert result_of(fetch_block(session, block)) == data
        firsts.add(net.asked[0])
        assert net.asked in ([holders[0], holders[1]], [holders[1]])
    assert firsts == set(holders)
