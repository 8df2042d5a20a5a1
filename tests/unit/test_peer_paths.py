"""Which path the client takes to an agent: direct first, the relay after a failed direct
attempt, and the relay at once for other agents behind an address that already needed it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from dsss.client import pathcache
from dsss.client.discovery import Introduction
from dsss.client.peer import PeerError, PeerNetwork
from dsss.model import PeerAddress
from dsss.quic import QuicError

X1, X2 = PeerAddress("198.51.100.40", 4001), PeerAddress("198.51.100.40", 4002)  # one symmetric NAT
Y1 = PeerAddress("198.51.100.41", 4001)  # another NAT


class FakeEndpoint:
    """Connections succeed through the relay (for agents that are up), and directly only to
    the agents in `direct_ok`."""

    def __init__(self, direct_ok: set[PeerAddress], down: set[PeerAddress] = frozenset()) -> None:  # type: ignore[assignment]
        self.direct_ok = {a.as_tuple() for a in direct_ok}
        self.down = {a.as_tuple() for a in down}
        self.relays: dict[tuple[str, int], Any] = {}
        self.attempts: list[tuple[tuple[str, int], str]] = []

    def close(self, grace: float = 0) -> Any:
        return defer.succeed(None)

    def relayed(self, addr: tuple[str, int]) -> bool:
        return addr in self.relays

    def relay_via(self, addr: tuple[str, int], server: Any) -> None:
        self.relays[addr] = server

    def connect(self, addr: tuple[str, int], expected_public_key: bytes, handshake_timeout: float = 10.0) -> Any:
        via = "relay" if addr in self.relays else "direct"
        self.attempts.append((addr, via))
        if addr in self.down or (via == "direct" and addr not in self.direct_ok):
            return defer.fail(QuicError("the handshake timed out"))
        return defer.succeed(("connection", addr, via))


def network(endpoint: FakeEndpoint, use_relay: bool = True, paths: Path | None = None,
            now: float = 1_000_000.0) -> PeerNetwork:
    peers = PeerNetwork(Clock(), ("198.51.100.1", 8471), use_relay=use_relay, paths_file=paths)
    peers.wall_clock = lambda: now
    peers.endpoint = endpoint  # type: ignore[assignment]
    peers._send = lambda data, addr: None  # type: ignore[method-assign]

    async def open_relay(intro: Introduction, timeout: float = 5.0) -> None:
        endpoint.relay_via(intro.address.as_tuple(), peers.server_udp)

    peers._open_relay = open_relay  # type: ignore[method-assign]
    return peers


def connect(peers: PeerNetwork, agent: PeerAddress) -> Any:
    d = defer.ensureDeferred(peers._connect(Introduction("cd" * 16, "ab" * 32, agent)))
    out: list[Any] = []
    d.addBoth(out.append)
    (result,) = out
    if isinstance(result, Exception):
        raise result
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def test_another_agent_behind_an_address_that_needed_the_relay_is_relayed_at_once() -> None:
    endpoint = FakeEndpoint(direct_ok={Y1})
    peers = network(endpoint)
    assert connect(peers, X1)[2] == "relay"
    assert connect(peers, X2)[2] == "relay"
    assert connect(peers, Y1)[2] == "direct"
    assert endpoint.attempts == [
        (X1.as_tuple(), "direct"), (X1.as_tuple(), "relay"),  # one direct attempt behind X ...
        (X2.as_tuple(), "relay"),  # ... and none for the next agent there
        (Y1.as_tuple(), "direct"),  # another address: direct first, as always
    ]
    assert set(peers.relay_only_hosts) == {X1.host}
    assert peers.paths == {str(X1): "relay", str(X2): "relay", str(Y1): "direct"}


def test_an_agent_that_is_down_does_not_mark_its_address() -> None:
    endpoint = FakeEndpoint(direct_ok=set(), down={X1})
    peers = network(endpoint)
    with pytest.raises(PeerError, match="even through the relay"):
        connect(peers, X1)
    assert peers.relay_only_hosts == {}
    assert connect(peers, X2)[2] == "relay"
    assert (X2.as_tuple(), "direct") in endpoint.attempts  # X2 still got its direct attempt


def test_without_the_relay_every_agent_gets_its_direct_attempt() -> None:
    endpoint = FakeEndpoint(direct_ok={X2})
    peers = network(endpoint, use_relay=False)
    with pytest.raises(PeerError, match="cannot reach agent"):
        connect(peers, X1)
    assert connect(peers, X2)[2] == "direct"
    assert peers.relay_only_hosts == {}


ME = "203.0.113.7"  # the client's public address, as the server's PONG says


def finish(peers: PeerNetwork, public_ip: str = ME) -> None:
    peers.public_address = PeerAddress(public_ip, 5000)
    d = defer.ensureDeferred(peers.close())
    assert d.called


def test_the_next_call_from_the_same_address_goes_through_the_relay_at_once(tmp_path: Path) -> None:
    paths = tmp_path / "key.paths"
    first = network(FakeEndpoint(direct_ok=set()), paths=paths)
    connect(first, X1)
    finish(first)
    assert stat.S_IMODE(os.stat(paths).st_mode) == 0o600
    doc = json.loads(paths.read_text())
    assert doc == {"version": 1, "relay-only": {ME: {X1.host: 1_000_000.0 + pathcache.RELAY_MEMORY}}}

    later = FakeEndpoint(direct_ok=set())
    second = network(later, paths=paths, now=1_000_000.0 + 60)
    second.load_remembered_paths(ME)
    connect(second, X1)
    assert later.attempts == [(X1.as_tuple(), "relay")]  # no direct attempt this time


def test_remembered_paths_are_per_client_address_and_expire(tmp_path: Path) -> None:
    paths = tmp_path / "key.paths"
    first = network(FakeEndpoint(direct_ok=set()), paths=paths)
    connect(first, X1)
    finish(first)
    moved = FakeEndpoint(direct_ok={X1})
    elsewhere = network(moved, paths=paths)
    elsewhere.load_remembered_paths("192.0.2.99")  # the client moved to another network
    assert connect(elsewhere, X1)[2] == "direct"
    stale = FakeEndpoint(direct_ok={X1})
    an_hour_later = network(stale, paths=paths, now=1_000_000.0 + pathcache.RELAY_MEMORY + 1)
    an_hour_later.load_remembered_paths(ME)
    assert connect(an_hour_later, X1)[2] == "direct"
    # Saving drops what expired (this client's entry from an hour ago).
    an_hour_later.relay_only_hosts[X2.host] = 1_000_000.0 + 2 * pathcache.RELAY_MEMORY
    finish(an_hour_later, "192.0.2.50")
    assert json.loads(paths.read_text())["relay-only"] == {
        "192.0.2.50": {X2.host: 1_000_000.0 + 2 * pathcache.RELAY_MEMORY}}


@pytest.mark.parametrize("content", ["", "{", "[]", '{"version": 2, "relay-only": {}}',
                                     '{"version": 1, "relay-only": {"203.0.113.7": {"x": "soon"}}}'])
def test_a_damaged_paths_file_is_ignored_and_replaced(tmp_path: Path, content: str) -> None:
    paths = tmp_path / "key.paths"
    paths.write_text(content)
    endpoint = FakeEndpoint(direct_ok={X1})
    peers = network(endpoint, paths=paths)
    peers.load_remembered_paths(ME)
    assert connect(peers, X1)[2] == "direct"
    peers.relay_only_hosts[X2.host] = 2_000_000.0
    finish(peers)
    assert json.loads(paths.read_text())["relay-only"] == {ME: {X2.host: 2_000_000.0}}


def test_the_paths_file_stays_bounded(tmp_path: Path) -> None:
    paths = tmp_path / "key.paths"
    hosts = {f"198.51.{i // 250}.{i % 250}": 1_000_000.0 + 10 + i for i in range(pathcache.MAX_ENTRIES + 40)}
    pathcache.save_relay_only(paths, ME, hosts, 1_000_000.0)
    kept = json.loads(paths.read_text())["relay-only"][ME]
    assert len(kept) == pathcache.MAX_ENTRIES
    assert min(kept.values()) == 1_000_000.0 + 10 + 40  # the soonest to expire went first


def connect_intro(peers: PeerNetwork, intro: Introduction) -> Any:
    out: list[Any] = []
    defer.ensureDeferred(peers._connect(intro)).addBoth(out.append)
    (result,) = out
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


LAN_X1 = PeerAddress("10.40.0.2", 8472)  # X1 on the client's own LAN (the client is behind X's NAT)


def test_an_agent_behind_our_nat_is_reached_across_the_lan() -> None:
    endpoint = FakeEndpoint(direct_ok={LAN_X1})
    peers = network(endpoint)
    conn = connect_intro(peers, Introduction("cd" * 16, "ab" * 32, X1, via=LAN_X1))
    assert conn == ("connection", LAN_X1.as_tuple(), "direct")
    assert endpoint.attempts == [(LAN_X1.as_tuple(), "direct")]
    assert peers.paths == {str(X1): "lan"} and peers.relay_only_hosts == {}


def test_a_lan_address_that_does_not_answer_falls_back_to_the_public_one_once() -> None:
    """Behind a carrier's NAT two homes share a public address, not a LAN: the LAN attempt
    fails, the public address is tried as always (here: directly, then through the relay),
    and that LAN address is not tried again in the session."""
    endpoint = FakeEndpoint(direct_ok=set())
    peers = network(endpoint)
    intro = Introduction("cd" * 16, "ab" * 32, X1, via=LAN_X1)
    assert connect_intro(peers, intro) == ("connection", X1.as_tuple(), "relay")
    assert endpoint.attempts == [(LAN_X1.as_tuple(), "direct"), (X1.as_tuple(), "direct"),
                                 (X1.as_tuple(), "relay")]
    assert peers.lan_failed == {LAN_X1} and peers.paths == {str(X1): "relay"}
    endpoint.attempts.clear()
    assert connect_intro(peers, intro) == ("connection", X1.as_tuple(), "relay")
    assert endpoint.attempts == [(X1.as_tuple(), "relay")]


def test_a_chain_hops_via_is_for_the_agent_before_it_not_for_us() -> None:
    endpoint = FakeEndpoint(direct_ok={X1, LAN_X1})
    peers = network(endpoint)
    connect_intro(peers, Introduction("cd" * 16, "ab" * 32, X1, chained=True, via=LAN_X1))
    assert endpoint.attempts == [(X1.as_tuple(), "direct")]


@pytest.mark.parametrize("bound,expected", [("0.0.0.0", "127.0.0.1:5555"), ("127.0.0.7", "127.0.0.7:5555")])
def test_our_local_address_is_the_bound_one_or_the_one_towards_the_server(bound: str, expected: str) -> None:
    peers = PeerNetwork(Clock(), ("127.0.0.1", 8471))
    peers.endpoint = type("Bound", (), {"address": (bound, 5555)})()  # type: ignore[assignment]
    assert str(peers._find_local_address()) == expected


def test_another_agent_at_the_lan_address_is_not_used_and_the_public_one_is() -> None:
    """Two homes behind one carrier NAT may both have a host at that LAN address: one that is
    not the agent introduced fails the pin, and the public address is tried as usual."""
    from dsss.quic import PeerIdentityError

    class Impostor(FakeEndpoint):
        def connect(self, addr: tuple[str, int], expected_public_key: bytes, handshake_timeout: float = 10.0) -> Any:
            if addr == LAN_X1.as_tuple():
                self.attempts.append((addr, "direct"))
                return defer.fail(PeerIdentityError("the certificate's key is not the one expected"))
            return super().connect(addr, expected_public_key, handshake_timeout)

    endpoint = Impostor(direct_ok={X1})
    peers = network(endpoint)
    conn = connect_intro(peers, Introduction("cd" * 16, "ab" * 32, X1, via=LAN_X1))
    assert conn == ("connection", X1.as_tuple(), "direct")
    assert peers.lan_failed == {LAN_X1} and peers.paths == {str(X1): "direct"}
