"""Share IDs: the addresses of erasure-coded shares ("s" and BLAKE3 of the share's bytes), told
apart from plain part IDs by everyone, checked against their bytes like plain ones."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

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
from dsss.server.service import DiscoveryServer
from dsss.wire import control as wc
from dsss.wire import transfer as wt
from tests.adapters.test_discovery_batch import make_server
from tests.adapters.test_server_api import FakeAgent, decoded, get

DATA = b"one share of an encrypted part"
H = block_hash(DATA)
S = share_id(DATA)


def test_a_share_id_is_s_and_the_address_of_the_bytes() -> None:
    assert SHARE_PREFIX == "s"
    assert S == "s" + H and len(S) == 65
    assert share_id(b"") == "s1a62ffe197fd187722792d73cb58abda961013bf7d633fe8167b45b4599dd1f4"


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


# --- the discovery server: where-to-upload count, upload-to with several hashes ---------------


@pytest.fixture
def server() -> DiscoveryServer:
    return make_server()


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


def test_upload_to_with_several_hashes_introduces_each_at_an_agent_of_its_own(server: Any) -> None:
    treq = api(server)
    everyone = agents(server, 6)
    hashes = SHARES[:4]
    url = "/api/upload-to?size=77&from=127.0.0.1:9999" + "".join(f"&hash={h}" for h in hashes)
    results = get(treq, url + "&exclude=127.0.0.1:6000,127.0.0.1:6003")
    asked = {a.address: a.sent() for a in everyone}
    # Four distinct agents, none excluded, each asked once, for one hash, bound to the caller.
    assert asked[everyone[0].address] == [] and asked[everyone[3].address] == []
    by_hash = {}
    for address, lines in asked.items():
        if lines:
            (line,) = lines
            head, h = line.rsplit(" ", 1)
            assert head == "INTRODUCTION_REQUEST 127.0.0.1:9999 77"
            by_hash[h] = address
    assert sorted(by_hash) == sorted(hashes)
    refusing = by_hash[hashes[2]]
    for a in everyone:
        if a.address in by_hash.values():
            a.reply("ERROR full no room" if a.address == refusing else KEY)
    server.clock.advance(0)
    treq.flush()
    code, doc = decoded(results)
    assert code == 200 and doc["replicas"] == 2 and "chain" not in doc
    # In hash order: answer i is for hash i, at the agent asked for it.
    assert [a["address"] for a in doc["introductions"]] == [str(by_hash[h]) for h in hashes]
    first, second, full, fourth = doc["introductions"]
    assert first["introduction-key"] == KEY and first["agent"] == server.registry.by_address(by_hash[hashes[0]]).agent_id
    assert full["status"] == 503 and "refused: full" in full["error"]
    assert "introduction-key" in fourth


def test_upload_to_answers_the_first_hashes_when_fewer_agents_have_room(server: Any) -> None:
    treq = api(server)
    everyone = agents(server, 3)
    agents(server, 2, first=6900, free=10)
    url = "/api/upload-to?size=77&from=127.0.0.1:9999" + "".join(f"&hash={h}" for h in SHARES[:5])
    results = get(treq, url)
    asked = sorted(line.rsplit(" ", 1)[1] for a in everyone for line in a.sent())
    assert asked == sorted(SHARES[:3])
    for a in everyone:
        a.reply(KEY)
    treq.flush()
    code, doc = decoded(results)
    assert code == 200 and len(doc["introductions"]) == 3
    assert len({i["address"] for i in doc["introductions"]}) == 3
    code, doc = answer(treq, url + "&exclude=" + ",".join(str(a.address) for a in everyone))
    # Every agent with room is excluded: five shares more than the five live agents can take.
    assert code == 503 and doc["error"] == "too few agents (have 5, need 8)"


def test_upload_to_with_one_share_and_copies_1_picks_one_agent(server: Any) -> None:
    treq = api(server)
    everyone = agents(server, 4)
    get(treq, f"/api/upload-to?size=77&from=127.0.0.1:9999&hash={SHARES[0]}&copies=1&chain=0")
    assert sum(len(a.sent()) for a in everyone) == 1
    get(treq, f"/api/upload-to?size=77&from=127.0.0.1:9999&hash={SHARES[0]}&hash={SHARES[1]}&chain=0")
    assert sum(len(a.sent()) for a in everyone) == 2


H0 = SHARES[0]
BASE = "/api/upload-to?size=77&from=127.0.0.1:9999"


@pytest.mark.parametrize(
    ("query", "error"),
    [
        (f"&hash={H0}&hash={SHARES[1]}&copies=1", "copies cannot be combined with more than one hash"),
        (f"&hash={H0}&hash={SHARES[1]}&copies=x", "copies must be a whole number from 1 to 2"),
        (f"&hash={H0}&hash={SHARES[1]}&chain=1", "chain=1 cannot be combined with more than one hash"),
        (f"&hash={H0}&hash={SHARES[1]}&hash={H0}", "a hash is given more than once"),
        (f"&hash={H0}&hash={SHARES[1].upper()}", "not a part hash"),
        (f"&hash={H0}&hash=t{SHARES[1][1:]}", "not a part hash"),
        (f"&hash={H0}&hash=", "not a part hash"),
        ("".join(f"&hash=s{i:064x}" for i in range(65)), "at most 64 hashes per request"),
        (f"&hash={H0}&hash={SHARES[1]}&chain=2", "chain must be 0 or 1"),
    ],
)
def test_upload_to_refuses_bad_hashes_without_asking_any_agent(server: Any, query: str, error: str) -> None:
    everyone = agents(server, 4)
    code, doc = answer(api(server), BASE + query)
    assert code == 400 and error in doc["error"]
    assert [a.sent() for a in everyone] == [[]] * 4


def test_upload_to_with_64_hashes(server: Any) -> None:
    everyone = agents(server, 70)
    get(api(server), BASE + "".join(f"&hash=s{i:064x}" for i in range(64)))
    asked = [line.rsplit(" ", 1)[1] for a in everyone for line in a.sent()]
    assert sorted(asked) == [f"s{i:064x}" for i in range(64)]


def test_upload_to_with_several_hashes_costs_one_and_one_per_hash(server: Any) -> None:
    server.http_limiter.rate, server.http_limiter.burst = 0.0, 7.0
    treq = api(server)
    url = BASE + "".join(f"&hash={h}" for h in SHARES[:3])
    assert answer(treq, url)[0] == 503  # no agent: 4 tokens spent (1 + 3 hashes)
    assert answer(treq, url)[0] == 429  # 4 + 4 > 7, where 1 + copies (3) would have passed


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


def test_client_upload_shares_places_each_share_on_an_agent_of_its_own(server: Any) -> None:
    everyone = agents(server, 6)
    client, stub, urls = client_of(server)
    blocks = SHARES[:4]
    d = defer.ensureDeferred(client.upload_shares(blocks, 10, ME, exclude=[everyone[5].address]))
    got = run(server, stub, d, replying=everyone)
    assert len(urls) == 1 and "/api/upload-to?" in urls[0]
    assert len(got) == 4 and len({a for a, _ in got}) == 4 and everyone[5].address not in {a for a, _ in got}
    for address, intro in got:
        assert isinstance(intro, Introduction) and intro.address == address and not intro.chained
        assert intro.agent_id == server.registry.by_address(address).agent_id
    # One share alone: one agent (copies=1), not the replica count.
    d = defer.ensureDeferred(client.upload_shares([SHARES[5]], 10, ME))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    assert sum(len(a.sent()) for a in everyone) == 1 and "copies=1" in urls[-1]


def test_client_upload_shares_gives_each_introduction_for_its_share(server: Any) -> None:
    everyone = agents(server, 4)
    client, stub, urls = client_of(server)
    d = defer.ensureDeferred(client.upload_shares(SHARES[:3], 10, ME))
    for _ in range(3):
        server.clock.advance(0)
        stub.flush()
    asked = {}
    for a in everyone:
        for line in a.sent():
            asked[a.address] = line.rsplit(" ", 1)[1]
            a.reply("ERROR full no room" if asked[a.address] == SHARES[1] else KEY)
    got = run(server, stub, d)
    assert [asked[address] for address, _ in got] == SHARES[:3]
    assert isinstance(got[1][1], Exception) and "refused: full" in str(got[1][1])


def test_client_upload_shares_splits_more_than_64_and_keeps_them_apart(server: Any) -> None:
    everyone = agents(server, 80)
    client, stub, urls = client_of(server)
    blocks = [f"s{i:064x}" for i in range(70)]
    got = run(server, stub, defer.ensureDeferred(client.upload_shares(blocks, 10, ME)), replying=everyone)
    assert len(urls) == 2 and urls[0].count("hash=") == 64 and urls[1].count("hash=") == 6
    assert len(got) == 70 and len({a for a, _ in got}) == 70
    assert all(isinstance(i, Introduction) for _, i in got)
    (excluded,) = parse_qs(urlsplit(urls[1]).query)["exclude"]  # the first request's agents
    assert sorted(excluded.split(",")) == sorted(str(a) for a, _ in got[:64])


def test_client_upload_shares_stops_when_agents_run_out(server: Any) -> None:
    everyone = agents(server, 66)
    client, stub, urls = client_of(server)
    blocks = [f"s{i:064x}" for i in range(70)]
    got = run(server, stub, defer.ensureDeferred(client.upload_shares(blocks, 10, ME)), replying=everyone)
    assert len(urls) == 2 and len(got) == 66 and len({a for a, _ in got}) == 66


def test_client_upload_shares_refuses_bad_or_repeated_ids(server: Any) -> None:
    client, stub, urls = client_of(server)
    for blocks in ([SHARES[0], SHARES[0]], [SHARES[0], SHARES[1].upper()]):
        assert isinstance(run(server, stub, defer.ensureDeferred(client.upload_shares(blocks, 10, ME))), BadRequest)
    assert urls == []


@pytest.mark.parametrize("older", ["no-upload-to", "one-hash"])
def test_client_upload_shares_is_none_from_an_older_server(server: Any, older: str) -> None:
    everyone = agents(server, 4)

    def rewrite(url: str) -> str:
        if "/api/upload-to" not in url:
            return url
        if older == "no-upload-to":
            return "http://server/api/no-such-endpoint"
        # An upload-to that takes one hash answers as any endpoint given a parameter twice.
        return f"http://server/api/introduce-me?to=127.0.0.1:1&hash={H0}&hash={H0}"

    client, stub, urls = client_of(server, rewrite)
    assert run(server, stub, defer.ensureDeferred(client.upload_shares(SHARES[:3], 10, ME))) is None
    assert (client.combined_upload, client.share_upload) == (
        (False, True) if older == "no-upload-to" else (True, False))
    assert run(server, stub, defer.ensureDeferred(client.upload_shares(SHARES[:3], 10, ME))) is None
    assert len(urls) == 1 and [a.sent() for a in everyone] == [[]] * 4


def test_bytes_under_the_older_plain_blake3_address_are_told_apart() -> None:
    import blake3

    from dsss.errors import IntegrityError, OldAddress
    from dsss.model import check_matches

    old = blake3.blake3(DATA).hexdigest()
    check_matches(H, DATA, "agent x")
    check_matches(S, DATA, "agent x")
    for block in (old, "s" + old):
        with pytest.raises(OldAddress, match="older DSSS.*store it again"):
            check_matches(block, DATA, "agent x")
    with pytest.raises(IntegrityError, match="do not match") as e:
        check_matches(H, DATA + b"!", "agent x")
    assert not isinstance(e.value, OldAddress)
