# -*- test-case-name: tests.unit.test_introductions -*-
"""Tests for L{dsss.agent.introductions}: single-use, bound, expiring introduction keys."""

from __future__ import annotations

import itertools
import re

import pytest

from dsss.errors import AccessDenied
from dsss.model import PeerAddress
from dsss.agent.introductions import DEFAULT_TTL, Introduction, IntroductionTable

CLIENT = PeerAddress("198.51.100.10", 5000)
OTHER = PeerAddress("198.51.100.11", 5000)
SAME_HOST_OTHER_PORT = PeerAddress("198.51.100.10", 5001)
H = "a" * 64
H2 = "b" * 64
TTL = 60.0


@pytest.fixture
def table() -> IntroductionTable:
    counter = itertools.count()
    return IntroductionTable(ttl=TTL, key_source=lambda: f"{next(counter):032x}")


def test_issue(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 100, H, now=10.0)
    assert intro == Introduction(f"{0:032x}", CLIENT, H, 100, 10.0 + TTL)
    assert len(table) == 1


def test_use_for_download(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 0, H, now=0.0)  # size 0: a download key
    assert table.use(intro.key, client=CLIENT, block=H, now=1.0) == intro
    assert len(table) == 0


def test_use_for_upload_with_matching_size(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 100, H, now=0.0)
    assert table.use(intro.key, client=CLIENT, block=H, now=1.0, upload_size=100) == intro


@pytest.mark.parametrize("size,upload_size", [(0, None), (100, 100)], ids=["download", "upload"])
def test_single_use(table: IntroductionTable, size: int, upload_size: int | None) -> None:
    intro = table.issue(CLIENT, size, H, now=0.0)
    table.use(intro.key, client=CLIENT, block=H, now=1.0, upload_size=upload_size)
    with pytest.raises(AccessDenied, match="unknown or already used"):
        table.use(intro.key, client=CLIENT, block=H, now=1.0, upload_size=upload_size)


def test_upload_key_refused_for_download(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 100, H, now=0.0)
    with pytest.raises(AccessDenied, match="upload"):
        table.use(intro.key, client=CLIENT, block=H, now=1.0)
    with pytest.raises(AccessDenied, match="unknown or already used"):
        table.use(intro.key, client=CLIENT, block=H, now=1.0, upload_size=100)


@pytest.mark.parametrize("upload_size", [0, 1, 100])
def test_download_key_refused_for_upload(table: IntroductionTable, upload_size: int) -> None:
    intro = table.issue(CLIENT, 0, H, now=0.0)
    with pytest.raises(AccessDenied, match="download"):
        table.use(intro.key, client=CLIENT, block=H, now=1.0, upload_size=upload_size)
    with pytest.raises(AccessDenied, match="unknown or already used"):
        table.use(intro.key, client=CLIENT, block=H, now=1.0)


def test_expired_refused(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 100, H, now=0.0)
    with pytest.raises(AccessDenied, match="expired"):
        table.use(intro.key, client=CLIENT, block=H, now=TTL + 0.001)
    assert len(table) == 0


def test_valid_until_the_expiry_instant(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 0, H, now=0.0)
    assert table.use(intro.key, client=CLIENT, block=H, now=TTL) == intro


@pytest.mark.parametrize(
    "client,block,upload_size,why",
    [
        (OTHER, H, 100, "another client"),
        (CLIENT, H2, 100, "another part"),
        (CLIENT, H, 99, "size"),
        (CLIENT, H, 101, "size"),
        (CLIENT, H, 1, "size"),
    ],
)
def test_mismatch_refused_and_consumes_the_key(
    table: IntroductionTable, client: PeerAddress, block: str, upload_size: int | None, why: str
) -> None:
    intro = table.issue(CLIENT, 100, H, now=0.0)
    keep = table.issue(CLIENT, 100, H, now=0.0)
    with pytest.raises(AccessDenied, match=why):
        table.use(intro.key, client=client, block=block, now=1.0, upload_size=upload_size)
    # The rightful presentation is now refused too: the key was consumed.
    with pytest.raises(AccessDenied, match="unknown or already used"):
        table.use(intro.key, client=CLIENT, block=H, now=1.0, upload_size=100)
    # Other keys are unaffected.
    assert table.use(keep.key, client=CLIENT, block=H, now=1.0, upload_size=100) == keep


def test_expired_presentation_consumes_the_key(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 100, H, now=0.0)
    with pytest.raises(AccessDenied):
        table.use(intro.key, client=CLIENT, block=H, now=TTL + 1)
    with pytest.raises(AccessDenied, match="unknown or already used"):
        table.use(intro.key, client=CLIENT, block=H, now=0.0)


@pytest.mark.parametrize("guess", ["", "0" * 32, "f" * 32, "00000000000000000000000000000001", "x"])
def test_guessed_key_refused(guess: str) -> None:
    table = IntroductionTable(ttl=TTL, key_source=lambda: "1" * 32)
    intro = table.issue(CLIENT, 0, H, now=0.0)
    with pytest.raises(AccessDenied):
        table.use(guess, client=CLIENT, block=H, now=1.0)
    assert len(table) == 1
    assert table.use(intro.key, client=CLIENT, block=H, now=1.0) == intro


def test_max_outstanding_evicts_oldest() -> None:
    counter = itertools.count()
    table = IntroductionTable(ttl=TTL, max_outstanding=3, key_source=lambda: f"k{next(counter)}")
    intros = [table.issue(CLIENT, i + 1, H, now=float(i)) for i in range(5)]
    assert len(table) == 3
    for old in intros[:2]:
        with pytest.raises(AccessDenied):
            table.use(old.key, client=CLIENT, block=H, now=5.0)
    for new in intros[2:]:
        assert table.use(new.key, client=CLIENT, block=H, now=5.0, upload_size=new.size) == new


def test_issue_drops_expired_keys(table: IntroductionTable) -> None:
    table.issue(CLIENT, 1, H, now=0.0)
    table.issue(OTHER, 1, H, now=10.0)
    table.issue(CLIENT, 1, H, now=TTL + 5.0)
    assert len(table) == 2


def test_expire(table: IntroductionTable) -> None:
    a = table.issue(CLIENT, 0, H, now=0.0)
    b = table.issue(OTHER, 0, H, now=30.0)
    table.expire(TTL)  # a expires exactly now: still valid
    assert len(table) == 2
    table.expire(TTL + 0.5)
    assert len(table) == 1
    with pytest.raises(AccessDenied):
        table.use(a.key, client=CLIENT, block=H, now=0.0)
    assert table.use(b.key, client=OTHER, block=H, now=TTL + 0.5) == b


def test_pending_clients(table: IntroductionTable) -> None:
    assert table.pending_clients(0.0) == set()
    a = table.issue(CLIENT, 0, H, now=0.0)
    table.issue(CLIENT, 0, H2, now=0.0)
    table.issue(OTHER, 7, H, now=40.0)
    assert table.pending_clients(1.0) == {CLIENT, OTHER}
    # Used keys no longer count...
    table.use(a.key, client=CLIENT, block=H, now=1.0)
    assert table.pending_clients(1.0) == {CLIENT, OTHER}
    # ...and expired ones neither.
    assert table.pending_clients(TTL + 1) == {OTHER}
    assert table.pending_clients(40.0 + TTL + 1) == set()


def test_default_keys_are_random_128_bit_hex() -> None:
    table = IntroductionTable()
    assert table.ttl == DEFAULT_TTL
    keys = {table.issue(CLIENT, 1, H, now=0.0).key for _ in range(200)}
    assert len(keys) == 200
    assert all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)


def test_another_port_of_the_same_ip_is_accepted(table: IntroductionTable) -> None:
    # A symmetric NAT gives the client another public port towards the agent than towards the
    # server; the key is bound to the IP.
    intro = table.issue(CLIENT, 100, H, now=0.0)
    assert table.use(intro.key, client=SAME_HOST_OTHER_PORT, block=H, now=1.0, upload_size=100) == intro


@pytest.mark.parametrize("source", [CLIENT, PeerAddress("10.1.0.3", 7000), PeerAddress("10.1.0.3", 7001)])
def test_a_key_for_a_client_on_our_lan_is_good_from_either_address(
    table: IntroductionTable, source: PeerAddress
) -> None:
    """The server saw the client behind our NAT: its key works from its public address (the
    relay, a hairpinning router) and from its address on our LAN."""
    intro = table.issue(CLIENT, 0, H, now=0.0, local=PeerAddress("10.1.0.3", 7000))
    assert table.use(intro.key, client=source, block=H, now=1.0) == intro


def test_a_key_for_a_client_on_our_lan_is_not_good_from_a_third_address(table: IntroductionTable) -> None:
    intro = table.issue(CLIENT, 0, H, now=0.0, local=PeerAddress("10.1.0.3", 7000))
    with pytest.raises(AccessDenied, match="another client address"):
        table.use(intro.key, client=PeerAddress("10.1.0.4", 7000), block=H, now=1.0)
    assert len(table) == 0  # consumed, as any key presented
