"""Retry tokens and the half-open handshake count (dsss.quic.retry), and address validation by a
real endpoint under a flood of spoofed Initials (on the in-memory link, driven clock)."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from dsss.quic._engine import Connection
from dsss.quic.retry import TOKEN_LIFETIME, AdmissionPolicy, HalfOpen, RetryTokens
from tests.unit.test_quic import SERVER_ADDR, make_pair, no_logged_failures

ADDR = ("192.0.2.7", 4433)
ODCID = bytes(range(8))
RSCID = bytes(range(8, 16))


def test_a_token_is_good_from_its_address_while_fresh() -> None:
    tokens = RetryTokens()
    token = tokens.make(ADDR, ODCID, RSCID, now=100.0)
    assert tokens.check(ADDR, token, now=100.0 + TOKEN_LIFETIME) == (ODCID, RSCID)
    assert tokens.check(ADDR, token, now=100.0 + TOKEN_LIFETIME + 0.01) is None
    assert tokens.check(("192.0.2.7", 4434), token, now=101.0) is None  # another port
    assert tokens.check(("192.0.2.8", 4433), token, now=101.0) is None
    assert tokens.check(ADDR, token, now=99.0) is None  # from the future
    assert RetryTokens().check(ADDR, token, now=101.0) is None  # another endpoint's secret


@given(st.binary(max_size=80), st.integers(min_value=0, max_value=60))
def test_a_tampered_or_made_up_token_is_refused(noise: bytes, index: int) -> None:
    tokens = RetryTokens(secret=b"k" * 32)
    token = tokens.make(ADDR, ODCID, RSCID, now=5.0)
    assert tokens.check(ADDR, noise, now=5.0) is None or noise == token
    if index < len(token):
        flipped = bytearray(token)
        flipped[index] ^= 1
        assert tokens.check(ADDR, bytes(flipped), now=5.0) is None
        assert tokens.check(ADDR, token[:index], now=5.0) is None


def test_half_open_counts_per_host_and_in_all() -> None:
    half = HalfOpen(AdmissionPolicy(threshold=3, per_source=4))
    assert not half.must_validate("a")
    half.opened("a")
    half.opened("a")
    assert half.must_validate("a") and not half.must_validate("b")  # half of per_source
    half.opened("b")
    assert half.must_validate("c")  # the threshold in all
    half.closed("a")
    half.closed("zzz")
    assert half.total == 2 and not half.must_validate("c")
    half.opened("a"), half.opened("a"), half.opened("a")
    assert half.full("a")


def spoofed_initial(now: float) -> bytes:
    """A real client Initial (1200 bytes or more), as a spoofer can make without any answer."""
    from qh3.quic.configuration import QuicConfiguration

    conn = Connection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["dsss/1"]))
    conn.connect(SERVER_ADDR, now)
    datagrams = conn.datagrams_to_send(now)
    assert datagrams and len(datagrams[0][0]) >= 1200
    return datagrams[0][0]


def test_spoofed_initials_cannot_hold_the_handshake_slots() -> None:
    with no_logged_failures():
        pair = make_pair(admission=AdmissionPolicy(threshold=8, per_source=4))
        now = pair.clock.seconds()
        for i in range(100):  # from 100 addresses that never answer
            pair.link.inject(spoofed_initial(now), (f"10.66.{i // 200}.{i % 200 + 1}", 5000 + i), SERVER_ADDR)
        pair.clock.advance(0)
        assert len(pair.server.connections) == 8  # the threshold; the rest were asked to Retry
        assert pair.server.retries_sent == 92
        # A real client proves its address through the Retry and is served meanwhile.
        handle = pair.connect()
        reply = pair.result(handle.request(b"hello", max_response=1000))
        assert reply == b"echo:hello"
        # The spoofed handshakes time out and their slots come back.
        pair.idle(11)
        assert [c for c in pair.server.connections if not c.established] == []


def test_one_address_holds_at_most_its_share_of_half_open_handshakes() -> None:
    pair = make_pair(admission=AdmissionPolicy(threshold=64, per_source=4))
    now = pair.clock.seconds()
    for port in range(30):
        pair.link.inject(spoofed_initial(now), ("10.77.0.1", 6000 + port), SERVER_ADDR)
    pair.clock.advance(0)
    assert len(pair.server.connections) == 2  # from half of per_source it must validate
    assert pair.server.retries_sent == 28


def test_every_handshake_validated_still_transfers() -> None:
    pair = make_pair(admission=AdmissionPolicy(threshold=0))
    handle = pair.connect()
    data = os.urandom(300_000)
    assert pair.result(handle.request(data, max_response=400_000)) == b"echo:" + data
    assert pair.server.retries_sent >= 1  # one per Initial datagram of its first flight
