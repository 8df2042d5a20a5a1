"""Share IDs: the addresses of erasure-coded shares ("s" and BLAKE3 of the share's bytes), told
apart from plain part IDs by everyone, checked against their bytes like plain ones."""

from __future__ import annotations

import random
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from dsss.client.discovery import DiscoveryClient, Introduction
from dsss.client.peer import PeerNetwork
from dsss.errors import BadRequest, IntegrityError
from dsss.model import (
    SHARE_PREFIX,
    PeerAddress,
    block_hash,
    check_block_id,
    content_hash,
    is_block_id,
    is_share_id,
    matches,
    share_id,
)
from dsss.server.api import DiscoveryAPI
from dsss.server.service import DiscoveryServer, ServerConfig
from dsss.wire import control as wc
from dsss.wire import transfer as wt
from tests.adapters.test_server_api import FakeAgent, decoded, get

DATA = b"one share of an encrypted part"
H = block_hash(DATA)
S = share_id(DATA)


def test_a_share_id_is_s_and_blake3_of_the_bytes() -> None:
    assert SHARE_PREFIX == "s"
    assert S == "s" + H and len(S) == 65
    assert share_id(b"") == "saf1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_share_and_plain_ids_are_both_part_ids() -> None:
    for block in (H, S):
        assert is_block_id(block) and check_block_id(block) == block
        assert content_hash(block) == H
        assert matches(block, DATA)
    assert is_share_id(S) and not is_share_id(H)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "s",
        "S" + H,  # the prefix is lowercase
        "s" + H.upper(),
        H.upper(),
        "s" + H[:63],  # wrong length
        "s" + H + "0",
        H[:63],
        H + "0",
        "ss" + H,
        "t" + H,  # other prefixes
        "x" + H,
        "0" + H,
        "-" + H,
        " " + H,
        "s " + H[1:],
        "s" + H[:63] + "\n",
        H[:63] + "\n",
        "s" + H[:62] + "g",
    ],
    ids=repr,
)
def test_other_text_is_refused(bad: str) -> None:
    assert not is_block_id(bad) and not is_share_id(bad) and not matches(bad, DATA)
    with pytest.raises(BadRequest, match="share"):
        check_block_id(bad)
    with pytest.raises(BadRequest):
        content_hash(bad)


def test_not_text_is_refused() -> None:
    for bad in (None, 42, H.encode()):
        assert not is_block_id(bad)  # type: ignore[arg-type]
        with pytest.raises(BadRequest):
            check_block_id(bad)  # type: ignore[arg-type]


def test_matches_compares_blake3_of_the_bytes_with_the_hash_part() -> None:
    assert not matches(S, DATA + b"!") and not matches(H, DATA[:-1])
    assert not matches("s" + block_hash(b"s" + DATA), DATA)  # the prefix is not hashed
    assert matches(share_id(b""), b"") and matches(block_hash(b""), b"")


def test_share_ids_travel_in_control_and_transfer_lines() -> None:
    assert wc.parse_line(wc.encode(wc.Have((S, H), (10, 20)))) == wc.Have((S, H), (10, 20))
    assert wc.parse_line(wc.encode(wc.Gone((S,)))) == wc.Gone((S,))
    n = wc.MAX_HASHES_PER_LINE
    assert len(wc.encode(wc.Have((S,) * n, (wt.MAX_PART,) * n))) <= wc.MAX_LINE
    req = wt.Upload("ab" * 16, S, 5, False, ())
    assert wt.parse_request(wt.encode_request(req).rstrip(b"\n")) == req
    req2 = wt.Download("ab" * 16, S)
    assert wt.parse_request(wt.encode_request(req2).rstrip(b"\n")) == req2


# --- the client's download check ---------------------------------------------------------------

AGENT = PeerAddress("198.51.100.7", 4000)


def download(block: str, body: bytes) -> Any:
    """What PeerNetwork.download makes of an agent that answers `Ok <len>` and `body`."""
    peers = PeerNetwork(Clock(), ("198.51.100.1", 8471))

    async def request(intro: Introduction, data: Any, max_response: int) -> bytes:
        return wt.encode_reply(wt.Done(len(body))) + body

    peers._request = request  # type: ignore[method-assign]
    out: list[Any] = []
    d = defer.ensureDeferred(peers.download(Introduction("cd" * 16, "ab" * 32, AGENT), block))
    d.addBoth(out.append)
    (result,) = out
    return result.value if hasattr(result, "value") else result


def test_download_of_a_share_checks_blake3_of_its_bytes() -> None:
    assert download(S, DATA) == DATA
    assert download(H, DATA) == DATA
    for block, body in ((S, DATA + b"!"), ("s" + block_hash(b"s" + DATA), DATA)):
        err = download(block, body)
        assert isinstance(err, IntegrityError) and "do not match" in str(err)


# --- the discovery server: where-to-upload count ------------------------------------------------


@pytest.fixture
def server() -> DiscoveryServer:
    clock = Clock()
    clock.advance(10)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0, replicas=2), rng=random.Random(1))
    clock.advance(60)  # past the warm-up after a start, when answers are final
    return server


def api(server: Any) -> Any:
    return StubTreq(DiscoveryAPI(server).resource())


def agents(server: Any, n: int, first: int = 6000, free: int = 10_000) -> list[Any]:
    return [FakeAgent(server, first + i, free=free) for i in range(n)]


def answer(treq: Any, url: str) -> tuple[int, Any]:
    return decoded(get(treq, url))


SHARES = [share_id(bytes([i]) * 100) for i in range(6)]
KEY = "0123456789abcdef0123456789abcdef"


def test_where_to_upload_count_picks_that_many_distinct_agents(server: Any) -> None:
    treq = api(server)
    many = agents(server, 6)
    agents(server, 1, first=6900, free=50)  # no room
    code, doc = answer(treq, "/api/where-to-upload?size=100")
    assert code == 200 and len(doc["addresses"]) == 2 and doc["replicas"] == 2  # the default
    everyone = sorted(str(a.address) for a in many)
    for count in (1, 4, 6, 64):
        code, doc = answer(treq, f"/api/where-to-upload?size=100&count={count}")
        assert code == 200 and len(doc["addresses"]) == min(count, 6)
        assert len(set(doc["addresses"])) == len(doc["addresses"]) and set(doc["addresses"]) <= set(everyone)
    code, doc = answer(treq, "/api/where-to-upload?size=100&count=64&exclude=127.0.0.1:6000,127.0.0.1:6001")
    assert sorted(doc["addresses"]) == everyone[2:]


@pytest.mark.parametrize("count", ["0", "65", "x", "-1", "1.0", "", "0064", "1&count=1", "%ff"])
def test_where_to_upload_refuses_a_bad_count(server: Any, count: str) -> None:
    agents(server, 2)
    code, doc = answer(api(server), f"/api/where-to-upload?size=100&count={count}")
    assert code == 400
    if count not in ("1&count=1", "%ff"):
        assert doc["error"] == "count must be a whole number from 1 to 64"


# --- DiscoveryClient ---------------------------------------------------------------------------

ME = PeerAddress("127.0.0.1", 9999)


def client_of(server: Any, rewrite: Any = None) -> tuple[Any, Any, list[str]]:
    stub = StubTreq(DiscoveryAPI(server).resource())
    urls: list[str] = []

    class HTTP:
        def get(self, url: str, **kw: Any) -> Any:
            kw.pop("reactor", None)
            kw.pop("timeout", None)
            urls.append(url)
            return stub.get(rewrite(url) if rewrite else url, **kw)

    return DiscoveryClient("http://server", reactor=server.clock, http=HTTP()), stub, urls


def run(server: Any, stub: Any, d: Any, replying: list[Any] = ()) -> Any:
    """Let the requests reach the server and the agents, every agent in `replying` giving a
    key for each introduction it is asked for, until the client's call is answered."""
    out: list[Any] = []
    d.addBoth(out.append)
    for _ in range(5):
        for _ in range(3):
            server.clock.advance(0)
            stub.flush()
        if out:
            break
        for a in replying:
            for _line in a.sent():
                a.reply(KEY)
    assert out, "not answered"
    return out[0].value if hasattr(out[0], "value") else out[0]


def test_client_where_to_upload_asks_for_count_agents(server: Any) -> None:
    everyone = agents(server, 5)
    client, stub, urls = client_of(server)
    got = run(server, stub, defer.ensureDeferred(client.where_to_upload(10, exclude=[everyone[0].address], count=4)))
    assert sorted(got) == sorted(a.address for a in everyone[1:])
    assert urls[-1].endswith("&count=4")
    got = run(server, stub, defer.ensureDeferred(client.where_to_upload(10)))
    assert len(got) == 2 and "count" not in urls[-1]
    assert isinstance(run(server, stub, defer.ensureDeferred(client.where_to_upload(10, count=65))), BadRequest)
