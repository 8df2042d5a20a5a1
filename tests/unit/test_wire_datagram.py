# -*- test-case-name: tests.unit.test_wire_datagram -*-
"""Tests for L{dsss.wire.datagram}: PING/PONG/PUNCH on the UDP socket shared with QUIC."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsss.errors import RemoteProtocolError
from dsss.model import PeerAddress
from dsss.wire.datagram import (
    MAX_DATAGRAM,
    PREFIX,
    DPing,
    DPong,
    DPunch,
    encode_datagram,
    is_control,
    parse_datagram,
)

FUZZ = settings(max_examples=200, deadline=None, database=None)
SETTINGS = settings(max_examples=100, deadline=None, database=None)
FEWER = settings(max_examples=50, deadline=None, database=None)

EXAMPLES = [
    (b"\x00PING -", DPing("-")),
    (b"\x00PING " + b"aZ09_-" * 10 + b"abcd", DPing("aZ09_-" * 10 + "abcd")),
    (b"\x00PING 0123456789abcdef", DPing("0123456789abcdef")),
    (b"\x00PONG 203.0.113.5:4000", DPong(PeerAddress("203.0.113.5", 4000))),
    (b"\x00PONG [2001:db8::5]:65535", DPong(PeerAddress("2001:db8::5", 65535))),
    (b"\x00PONG [::ffff:1.2.3.4]:1", DPong(PeerAddress("::ffff:1.2.3.4", 1))),
    (b"\x00PUNCH x", DPunch("x")),
    (b"\x00PUNCH session-42_A", DPunch("session-42_A")),
]


@pytest.mark.parametrize("wire,msg", EXAMPLES, ids=[repr(w) for w, _ in EXAMPLES])
def test_encode_known(wire: bytes, msg: object) -> None:
    assert encode_datagram(msg) == wire  # type: ignore[arg-type]


@pytest.mark.parametrize("wire,msg", EXAMPLES, ids=[repr(w) for w, _ in EXAMPLES])
def test_parse_known(wire: bytes, msg: object) -> None:
    assert is_control(wire)
    assert parse_datagram(wire) == msg


def test_encoded_datagrams_start_with_the_zero_prefix() -> None:
    assert PREFIX == b"\x00"
    for _, msg in EXAMPLES:
        data = encode_datagram(msg)  # type: ignore[arg-type]
        assert data[0] == 0
        assert len(data) <= MAX_DATAGRAM


def test_only_a_zero_first_byte_is_control() -> None:
    for first in range(256):
        data = bytes([first]) + b"PING tok"
        assert is_control(data) == (first == 0), first
        if first == 0:
            assert parse_datagram(data) == DPing("tok")
        else:
            with pytest.raises(RemoteProtocolError):
                parse_datagram(data)


def test_bare_ascii_ping_is_not_control() -> None:
    # A QUIC short header may begin with 0x50 ('P'): the bare word must never count.
    assert not is_control(b"PING tok")
    assert not is_control(b"PONG 1.2.3.4:5")
    assert not is_control(b"PUNCH x")
    with pytest.raises(RemoteProtocolError):
        parse_datagram(b"PING tok")


def test_empty_datagram_is_not_control() -> None:
    assert not is_control(b"")
    with pytest.raises(RemoteProtocolError):
        parse_datagram(b"")


@FEWER
@given(first=st.integers(min_value=0, max_value=255).filter(lambda b: b & 0x40), rest=st.binary(max_size=100))
def test_quic_fixed_bit_is_never_control(first: int, rest: bytes) -> None:
    data = bytes([first]) + rest
    assert not is_control(data)
    with pytest.raises(RemoteProtocolError):
        parse_datagram(data)


MALFORMED = [
    b"\x00",
    b"\x00PING",
    b"\x00PING ",
    b"\x00PING  tok",
    b"\x00PING tok ",
    b"\x00 PING tok",
    b"\x00PING a b",
    b"\x00ping tok",
    b"\x00Ping tok",
    b"\x00\x00PING tok",
    b"\x00PING tok\n",
    b"\x00PING tok\r",
    b"\x00PING t\x00k",
    b"\x00PING t\xffk",
    b"\x00PING t/k",
    b"\x00PING t.k",
    b"\x00PING " + b"a" * 65,
    b"\x00PONG",
    b"\x00PONG 1.2.3.4",
    b"\x00PONG 1.2.3.4:0",
    b"\x00PONG 1.2.3.4:65536",
    b"\x00PONG 1.2.3.4:99999",
    b"\x00PONG 300.2.3.4:5",
    b"\x00PONG host.example:5",
    b"\x00PONG ::1:5",
    b"\x00PONG [::1]",
    b"\x00PONG [::1]:5 x",
    b"\x00PONG -",
    b"\x00PUNCH",
    b"\x00PUNCH ",
    b"\x00PUNCH a\nb",
    b"\x00PUNCH " + b"x" * 65,
    b"\x00PUNCH caf\xc3\xa9",
    b"\x00FOO tok",
    b"\x00PINGtok",
]


@pytest.mark.parametrize("data", MALFORMED, ids=repr)
def test_malformed_refused(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_datagram(data)


def test_oversize_refused_for_its_size() -> None:
    data = b"\x00PING " + b"a" * (MAX_DATAGRAM - 6 + 1)
    assert len(data) == MAX_DATAGRAM + 1
    with pytest.raises(RemoteProtocolError, match="too long"):
        parse_datagram(data)
    with pytest.raises(RemoteProtocolError, match="too long"):
        parse_datagram(b"\x00" + b"\xff" * 4000)


def test_token_length_bounds() -> None:
    assert parse_datagram(b"\x00PING " + b"a" * 64) == DPing("a" * 64)
    assert parse_datagram(b"\x00PUNCH b") == DPunch("b")


# --- hypothesis -------------------------------------------------------------------------------

tokens = st.text("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-", min_size=1, max_size=64)
addresses = st.builds(
    lambda ip, port: PeerAddress(str(ip), port),
    st.ip_addresses(),
    st.integers(min_value=1, max_value=65535),
)
datagrams = st.one_of(st.builds(DPing, tokens), st.builds(DPong, addresses), st.builds(DPunch, tokens))


@SETTINGS
@given(msg=datagrams)
def test_round_trip_generated(msg: object) -> None:
    data = encode_datagram(msg)  # type: ignore[arg-type]
    assert is_control(data)
    assert len(data) <= MAX_DATAGRAM
    parsed = parse_datagram(data)
    assert parsed == msg
    assert encode_datagram(parsed) == data


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_parse_or_protocol_error(data: bytes) -> None:
    try:
        msg = parse_datagram(data)
    except RemoteProtocolError:
        return
    assert is_control(data)
    assert parse_datagram(encode_datagram(msg)) == msg


@FEWER
@given(
    body=st.lists(
        st.sampled_from(["PING", "PONG", "PUNCH", "-", "tok", "1.2.3.4:5", "[::1]:9", "", "é", "\x00"]),
        min_size=1,
        max_size=4,
    ).map(" ".join)
)
def test_prefixed_garbage_parse_or_protocol_error(body: str) -> None:
    data = PREFIX + body.encode("utf-8")
    try:
        msg = parse_datagram(data)
    except RemoteProtocolError:
        return
    assert parse_datagram(encode_datagram(msg)) == msg


def test_relay_headers_round_trip_for_many_peers() -> None:
    """Headers are parsed and built once per peer and remembered (a bounded cache); every
    peer still gets its own, also past the bound."""
    from dsss.wire.datagram import _CACHE_MAX, decode_relay, encode_relay

    peers = [(f"198.51.{i // 250}.{i % 250 + 1}", 1000 + i) for i in range(_CACHE_MAX + 50)]
    peers.append(("2001:db8::1", 443))
    for peer in peers + peers[:10]:
        payload = f"quic for {peer}".encode()
        assert decode_relay(encode_relay(peer, payload)) == (peer, payload)
