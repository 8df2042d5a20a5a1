"""Share IDs: the addresses of erasure-coded shares ("s" and BLAKE3 of the share's bytes), told
apart from plain part IDs by everyone, checked against their bytes like plain ones."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from dsss.client.discovery import Introduction
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
from dsss.wire import control as wc
from dsss.wire import transfer as wt

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
