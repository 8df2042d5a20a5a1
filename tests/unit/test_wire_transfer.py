# -*- test-case-name: tests.unit.test_wire_transfer -*-
"""Tests for L{dsss.wire.transfer}: UPLOAD/DOWNLOAD headers, replies and L{HeaderSplitter}."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsss.errors import RemoteProtocolError
from dsss.model import PeerAddress
from dsss.wire.transfer import (
    MAX_CHAIN,
    MAX_HEADER,
    MAX_PART,
    MAX_PROOF,
    Audit,
    Done,
    Download,
    HeaderSplitter,
    Hop,
    ProofReply,
    Refused,
    Stored,
    Upload,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
)

FUZZ = settings(max_examples=200, deadline=None, database=None)
SETTINGS = settings(max_examples=100, deadline=None, database=None)
FEWER = settings(max_examples=50, deadline=None, database=None)

KEY = "0123456789abcdef" * 2
H = "0123456789abcdef" * 4


# --- requests ---------------------------------------------------------------------------------


def test_upload_round_trip() -> None:
    req = Upload(KEY, H, 1234)
    wire = encode_request(req)
    assert wire == f"UPLOAD {KEY} {H} 1234\n".encode()
    assert parse_request(wire[:-1]) == req


def test_download_round_trip() -> None:
    req = Download(KEY, H)
    wire = encode_request(req)
    assert wire == f"DOWNLOAD {KEY} {H}\n".encode()
    assert parse_request(wire[:-1]) == req


def test_audit_round_trip() -> None:
    nonce = bytes(range(16))
    req = Audit(KEY, "s" + H, nonce)
    wire = encode_request(req)
    assert wire == f"AUDIT {KEY} s{H} {nonce.hex()}\n".encode()
    assert parse_request(wire[:-1]) == req
    assert len(wire) <= MAX_HEADER
    with pytest.raises(ValueError):
        encode_request(Audit(KEY, H, b"short"))


def test_request_cr_tolerated() -> None:
    assert parse_request(f"UPLOAD {KEY} {H} 5\r".encode()) == Upload(KEY, H, 5)
    assert parse_request(f"DOWNLOAD {KEY} {H}\r".encode()) == Download(KEY, H)


def test_upload_size_limits() -> None:
    assert parse_request(f"UPLOAD {KEY} {H} 0".encode()) == Upload(KEY, H, 0)
    assert parse_request(f"UPLOAD {KEY} {H} {MAX_PART}".encode()) == Upload(KEY, H, MAX_PART)
    with pytest.raises(RemoteProtocolError):
        parse_request(f"UPLOAD {KEY} {H} {MAX_PART + 1}".encode())


def test_longest_request_fits_the_header_limit() -> None:
    assert len(encode_request(Upload(KEY, H, MAX_PART))) <= MAX_HEADER
    assert len(encode_request(Download(KEY, H))) <= MAX_HEADER


BAD_REQUESTS = [
    b"",
    b"\r",
    b"UPLOAD",
    b"DOWNLOAD",
    f"upload {KEY} {H} 5".encode(),
    f"Upload {KEY} {H} 5".encode(),
    f"download {KEY} {H}".encode(),
    f"GET {KEY} {H}".encode(),
    # arity
    f"UPLOAD {KEY} {H}".encode(),
    f"UPLOAD {KEY} {H} 5 6".encode(),
    f"DOWNLOAD {KEY}".encode(),
    f"DOWNLOAD {KEY} {H} 5".encode(),
    f"UPLOAD  {KEY} {H} 5".encode(),
    f"DOWNLOAD {KEY} {H} ".encode(),
    f" DOWNLOAD {KEY} {H}".encode(),
    # sizes
    f"UPLOAD {KEY} {H} -1".encode(),
    f"UPLOAD {KEY} {H} +1".encode(),
    f"UPLOAD {KEY} {H} 1.0".encode(),
    f"UPLOAD {KEY} {H} 1e3".encode(),
    f"UPLOAD {KEY} {H} 0x10".encode(),
    f"UPLOAD {KEY} {H} x".encode(),
    f"UPLOAD {KEY} {H} ".encode(),
    f"UPLOAD {KEY} {H} {'9' * 13}".encode(),
    f"UPLOAD {KEY} {H} {'0' * 13}".encode(),
    f"UPLOAD {KEY} {H} {2**64}".encode(),
    # keys
    f"UPLOAD {KEY[:31]} {H} 5".encode(),
    f"UPLOAD {KEY}0 {H} 5".encode(),
    f"UPLOAD {KEY.upper()} {H} 5".encode(),
    f"UPLOAD {'g' * 32} {H} 5".encode(),
    f"DOWNLOAD - {H}".encode(),
    f"DOWNLOAD {KEY[:31]} {H}".encode(),
    # hashes
    f"UPLOAD {KEY} {H[:63]} 5".encode(),
    f"UPLOAD {KEY} {H}0 5".encode(),
    f"UPLOAD {KEY} {H.upper()} 5".encode(),
    f"DOWNLOAD {KEY} ../..".encode(),
    f"DOWNLOAD {KEY} ../../{H[:58]}".encode(),
    f"DOWNLOAD {KEY} {'z' * 64}".encode(),
    # encoding and control characters
    f"DOWNLOAD {KEY} {H}\n".encode(),
    f"DOWNLOAD {KEY} {H}\x00".encode(),
    f"DOWNLOAD\t{KEY} {H}".encode(),
    f"DOWNLOAD {KEY} {H}\x7f".encode(),
    f"DOWNLOAD {KEY} {H}\r\r".encode(),
    "DOWNLOAD é".encode("utf-8"),
    b"\xff",
    # audits
    f"AUDIT {KEY} {H}".encode(),
    f"AUDIT {KEY} {H} {KEY} x".encode(),
    f"AUDIT {KEY} {H} {KEY[:31]}".encode(),
    f"AUDIT {KEY} {H} {KEY.upper()}".encode(),
    f"AUDIT {KEY} {H[:63]} {KEY}".encode(),
    f"AUDIT - {H} {KEY}".encode(),
]


@pytest.mark.parametrize("line", BAD_REQUESTS, ids=[repr(x[:40]) for x in BAD_REQUESTS])
def test_bad_request_refused(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_request(line)


# --- replies ----------------------------------------------------------------------------------

REPLIES = [
    (b"Ok\n", Done(None)),
    (b"Ok 0\n", Done(0)),
    (b"Ok 4096\n", Done(4096)),
    (f"Ok {MAX_PART}\n".encode(), Done(MAX_PART)),
    (b"ERROR denied introduction key expired\n", Refused("denied", "introduction key expired")),
    (b"ERROR full \n", Refused("full", "")),
    (b"Proof 100 100\n", ProofReply(100, 100)),
    (f"Proof {MAX_PART} {16384 + 320}\n".encode(), ProofReply(MAX_PART, 16384 + 320)),
    (b"Proof 0 0\n", ProofReply(0, 0)),
]


@pytest.mark.parametrize("wire,reply", REPLIES, ids=[repr(w) for w, _ in REPLIES])
def test_reply_encode(wire: bytes, reply: object) -> None:
    assert encode_reply(reply) == wire  # type: ignore[arg-type]


@pytest.mark.parametrize("wire,reply", REPLIES, ids=[repr(w) for w, _ in REPLIES])
def test_reply_parse(wire: bytes, reply: object) -> None:
    assert parse_reply(wire[:-1]) == reply
    assert parse_reply(wire[:-1] + b"\r") == reply


def test_reply_error_without_text() -> None:
    assert parse_reply(b"ERROR not-found") == Refused("not-found", "")


BAD_REPLIES = [
    b"",
    b"OK",
    b"ok",
    b"Ok ",
    b"Ok 1 2",
    b"Ok -1",
    b"Ok +1",
    b"Ok x",
    b"Ok 1.5",
    f"Ok {MAX_PART + 1}".encode(),
    f"Ok {'9' * 13}".encode(),
    b"ERROR",
    b"ERROR Bad text",
    b"ERROR 1x text",
    ("ERROR " + "x" * 33 + " text").encode(),
    b"ERROR x a\x00b",
    b"ERROR x caf\xc3\xa9",
    b"Ok\n",
    b"DONE",
    b"Proof",
    b"Proof 1",
    b"Proof 1 2 3",
    b"Proof x 1",
    f"Proof {MAX_PART + 1} 10".encode(),
    f"Proof 10 {MAX_PROOF + 1}".encode(),
    b"PROOF 1 1",
]


@pytest.mark.parametrize("line", BAD_REPLIES, ids=repr)
def test_bad_reply_refused(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_reply(line)


def test_refused_text_is_cleaned_and_bounded() -> None:
    wire = encode_reply(Refused("integrity", "bad\nbytes\x00é" + "z" * 1000))
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    assert len(wire) <= MAX_HEADER
    reply = parse_reply(wire[:-1])
    assert isinstance(reply, Refused)
    assert reply.code == "integrity"
    assert reply.text.startswith("bad?bytes??z")
    assert len(reply.text) == 200


# --- HeaderSplitter ---------------------------------------------------------------------------


def test_splitter_byte_by_byte() -> None:
    stream = encode_request(Upload(KEY, H, 5)) + b"hello"
    s = HeaderSplitter()
    results = []
    for i in range(len(stream)):
        r = s.feed(stream[i : i + 1])
        if r is not None:
            results.append((i, r))
            break
    header_len = len(encode_request(Upload(KEY, H, 5)))
    assert results == [(header_len - 1, (f"UPLOAD {KEY} {H} 5".encode(), b""))]
    assert s.done


def test_splitter_in_one_chunk_returns_the_rest() -> None:
    s = HeaderSplitter()
    assert s.feed(b"Ok 3\nabc\ndef") == (b"Ok 3", b"abc\ndef")


def test_splitter_waits_for_lf() -> None:
    s = HeaderSplitter()
    assert s.feed(b"") is None
    assert s.feed(b"DOWNLOAD ") is None
    assert s.feed(b"x") is None
    assert not s.done
    assert s.feed(b"\r\nrest") == (b"DOWNLOAD x\r", b"rest")


def test_splitter_empty_header() -> None:
    assert HeaderSplitter().feed(b"\nbody") == (b"", b"body")


def test_splitter_feed_after_done_is_a_local_error() -> None:
    s = HeaderSplitter()
    assert s.feed(b"Ok\n") == (b"Ok", b"")
    with pytest.raises(RuntimeError):
        s.feed(b"more")


def test_splitter_header_of_exactly_the_limit() -> None:
    header = b"x" * MAX_HEADER
    s = HeaderSplitter()
    for b in header:
        assert s.feed(bytes([b])) is None
    assert s.feed(b"\nrest") == (header, b"rest")


def test_splitter_limit_plus_one_without_lf_raises_byte_by_byte() -> None:
    s = HeaderSplitter()
    for _ in range(MAX_HEADER):
        assert s.feed(b"x") is None
    with pytest.raises(RemoteProtocolError):
        s.feed(b"x")


def test_splitter_long_header_in_one_chunk_raises() -> None:
    with pytest.raises(RemoteProtocolError):
        HeaderSplitter().feed(b"x" * (MAX_HEADER + 1))
    # Even when a LF follows later in the same chunk, the header is too long.
    with pytest.raises(RemoteProtocolError):
        HeaderSplitter().feed(b"x" * (MAX_HEADER + 1) + b"\nrest")


def test_splitter_custom_limit() -> None:
    with pytest.raises(RemoteProtocolError):
        HeaderSplitter(limit=4).feed(b"abcde")
    assert HeaderSplitter(limit=4).feed(b"abcd\nz") == (b"abcd", b"z")


def _feed_chunks(stream: bytes, cuts: list[int], limit: int = MAX_HEADER) -> tuple[bytes, bytes]:
    """Feed `stream` cut at `cuts`; after the header completes, collect what remains."""
    s = HeaderSplitter(limit)
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(stream))), len(stream)]
    got = None
    tail = b""
    for a, b in zip(bounds, bounds[1:]):
        chunk = stream[a:b]
        if got is None:
            got = s.feed(chunk)
        else:
            tail += chunk
    assert got is not None
    return got[0], got[1] + tail


@SETTINGS
@given(
    header=st.binary(max_size=MAX_HEADER).filter(lambda b: b"\n" not in b),
    body=st.binary(max_size=400),
    data=st.data(),
)
def test_splitter_random_chunks_give_same_result(header: bytes, body: bytes, data: st.DataObject) -> None:
    stream = header + b"\n" + body
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20))
    assert _feed_chunks(stream, cuts) == (header, body)
    assert _feed_chunks(stream, list(range(len(stream)))) == (header, body)


@FEWER
@given(extra=st.binary(min_size=1, max_size=50).filter(lambda b: b"\n" not in b), data=st.data())
def test_splitter_too_long_raises_whatever_the_chunking(extra: bytes, data: st.DataObject) -> None:
    stream = b"y" * MAX_HEADER + extra + b"\nbody"
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=10))))
    bounds = [0, *[c for c in cuts if 0 < c < len(stream)], len(stream)]
    s = HeaderSplitter()
    with pytest.raises(RemoteProtocolError):
        for a, b in zip(bounds, bounds[1:]):
            assert s.feed(stream[a:b]) is None


# --- hypothesis over the grammar --------------------------------------------------------------

keys = st.binary(min_size=16, max_size=16).map(bytes.hex)
hashes = st.binary(min_size=32, max_size=32).map(bytes.hex)
requests = st.one_of(
    st.builds(Upload, keys, hashes, st.integers(min_value=0, max_value=MAX_PART)),
    st.builds(Download, keys, hashes),
)
codes = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", max_size=31),
)
replies = st.one_of(
    st.builds(Done, st.none() | st.integers(min_value=0, max_value=MAX_PART)),
    st.builds(Refused, codes, st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)),
)


@SETTINGS
@given(req=requests, body=st.binary(max_size=64), data=st.data())
def test_request_stream_round_trip(req: Upload | Download, body: bytes, data: st.DataObject) -> None:
    stream = encode_request(req) + body
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10))
    line, rest = _feed_chunks(stream, cuts)
    assert rest == body
    assert parse_request(line) == req


@FEWER
@given(reply=replies)
def test_reply_round_trip(reply: Done | Refused) -> None:
    wire = encode_reply(reply)
    assert len(wire) <= MAX_HEADER
    line, rest = HeaderSplitter().feed(wire)  # type: ignore[misc]
    assert rest == b""
    assert parse_reply(line) == reply


@SETTINGS
@given(code=codes, text=st.text(max_size=400))
def test_any_refusal_text_encodes_to_a_parseable_reply(code: str, text: str) -> None:
    wire = encode_reply(Refused(code, text))
    assert len(wire) <= MAX_HEADER
    assert wire.count(b"\n") == 1 and wire.endswith(b"\n")
    reply = parse_reply(wire[:-1])
    assert isinstance(reply, Refused) and reply.code == code


@FUZZ
@given(line=st.binary(max_size=300))
def test_random_bytes_request_or_protocol_error(line: bytes) -> None:
    try:
        req = parse_request(line)
    except RemoteProtocolError:
        return
    assert parse_request(encode_request(req)[:-1]) == req


@FUZZ
@given(line=st.binary(max_size=300))
def test_random_bytes_reply_or_protocol_error(line: bytes) -> None:
    try:
        reply = parse_reply(line)
    except RemoteProtocolError:
        return
    again = parse_reply(encode_reply(reply)[:-1])
    if isinstance(reply, Refused):
        assert again == Refused(reply.code, reply.text[:200])
    else:
        assert again == reply


vocab = st.sampled_from(
    ["UPLOAD", "DOWNLOAD", "Ok", "ERROR", KEY, H, "0", "5", str(MAX_PART + 1), "-1", "", "x", "é", "\r"]
)


@FEWER
@given(words=st.lists(vocab, min_size=1, max_size=6))
def test_grammar_shaped_garbage(words: list[str]) -> None:
    line = " ".join(words).encode("utf-8")
    for parse in (parse_request, parse_reply):
        try:
            parse(line)
        except RemoteProtocolError:
            pass


# chained uploads

AGENT_ID = "ab" * 32


def _hop(i: int, host: str = "198.51.100.11") -> Hop:
    return Hop(PeerAddress(host, 40000 + i), f"{i:02x}" * 32, f"{i:02x}" * 16)


def test_chained_upload_round_trips_with_ipv4_and_ipv6_hops() -> None:
    chain = (_hop(1), _hop(2, "2001:db8::7"))
    req = Upload(KEY, H, 4 * 1024 * 1024, True, chain)
    line = encode_request(req)
    assert line.startswith(f"UPLOAD {KEY} {H} 4194304 chain ".encode()) and line.endswith(b"\n")
    assert parse_request(line[:-1]) == req
    assert b"[2001:db8::7]:40002/" in line


def test_the_last_agent_of_a_chain_gets_a_chained_upload_without_hops() -> None:
    req = Upload(KEY, H, 10, True)
    assert encode_request(req) == f"UPLOAD {KEY} {H} 10 chain\n".encode()
    assert parse_request(encode_request(req)[:-1]) == req
    assert parse_request(f"UPLOAD {KEY} {H} 10".encode()) == Upload(KEY, H, 10, False)
    with pytest.raises(ValueError):
        Upload(KEY, H, 10, False, (_hop(1),))


def test_longest_chain_fits_the_header_limit() -> None:
    chain = tuple(_hop(i, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff") for i in range(1, MAX_CHAIN + 1))
    line = encode_request(Upload(KEY, H, MAX_PART, True, chain))
    assert len(line) <= MAX_HEADER
    assert parse_request(line[:-1]).chain == chain  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "hops",
    [
        ["198.51.100.11:4000/" + AGENT_ID],  # no key
        ["198.51.100.11:4000/" + AGENT_ID + "/" + KEY, "chain"],
        ["198.51.100.11:4000/" + AGENT_ID + "/" + KEY + "/x"],
        ["198.51.100.11:4000/" + "zz" * 32 + "/" + KEY],  # agent id not hex
        ["198.51.100.11:4000/" + AGENT_ID + "/" + KEY[:-1]],  # short key
        ["example.org:4000/" + AGENT_ID + "/" + KEY],  # a name, not an address
        ["198.51.100.11:0/" + AGENT_ID + "/" + KEY],  # port 0
        ["198.51.100.11:4000/" + AGENT_ID + "/" + KEY, "198.51.100.12:4000/" + AGENT_ID + "/" + KEY],
        [f"198.51.100.1{i}:4000/{i:02x}" + "0" * 62 + "/" + KEY for i in range(MAX_CHAIN + 1)],
    ],
    ids=["no-key", "chain-twice", "extra-field", "bad-id", "short-key", "hostname", "port-0", "same-agent-twice", "too-long"],
)
def test_malformed_chains_are_refused(hops: list[str]) -> None:
    line = f"UPLOAD {KEY} {H} 10 chain " + " ".join(hops)
    with pytest.raises(RemoteProtocolError):
        parse_request(line.encode())


def test_stored_reply_round_trips_and_is_bounded() -> None:
    receipt = "5e" * 64
    for n in range(1, MAX_CHAIN + 2):
        reply = Stored((receipt,) * n)
        line = encode_reply(reply)
        assert len(line) <= MAX_HEADER
        assert parse_reply(line[:-1]) == reply and reply.count == n
    too_many = " ".join([receipt] * (MAX_CHAIN + 2))
    for bad in (
        b"Stored 0",
        f"Stored {MAX_CHAIN + 2} {too_many}".encode(),
        b"Stored",
        b"Stored x " + receipt.encode(),
        f"Stored 2 {receipt}".encode(),  # fewer receipts than copies
        f"Stored 1 {receipt[:-2]}".encode(),  # a short receipt
        f"Stored 1 {receipt[:-1]}Z".encode(),
    ):
        with pytest.raises(RemoteProtocolError):
            parse_reply(bad)
