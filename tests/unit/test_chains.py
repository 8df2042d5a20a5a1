"""Replication chains across NATs and LANs (dsss.server.chains): order, hops, addresses."""

from __future__ import annotations

import itertools

import pytest

from dsss.model import PeerAddress
from dsss.server.chains import chain_order, chain_worth_trying, hop_addresses, hop_works, lan_hop

# Two homes behind cone NATs; agents a1..a3 and b1, b2 behind them, and their LAN addresses.
A = "198.51.100.11"
B = "198.51.100.12"
a1, a2, a3 = (PeerAddress(A, p) for p in (40001, 40002, 40003))
b1, b2 = (PeerAddress(B, p) for p in (50001, 50002))
LAN = {a1: PeerAddress("10.1.0.2", 8472), a2: PeerAddress("10.1.0.3", 8472),
       a3: PeerAddress("10.1.0.4", 8472), b1: PeerAddress("10.2.0.2", 8472),
       b2: PeerAddress("10.2.0.3", 8472)}


def test_a_lan_hop_needs_one_public_address_and_both_local_addresses() -> None:
    assert lan_hop(a1, a2, LAN) and lan_hop(a2, a1, LAN)
    assert not lan_hop(a1, b1, LAN)  # behind different NATs: they punch instead
    assert not lan_hop(a1, a2, {a1: LAN[a1]})  # a2 never said where it listens
    assert not lan_hop(a1, a2, {})
    # One local address for two agents is no LAN (two homes behind a carrier's NAT, say).
    assert not lan_hop(a1, a2, {a1: LAN[a1], a2: LAN[a1]})
    # IPv4 cannot send to IPv6.
    assert not lan_hop(a1, a2, {a1: LAN[a1], a2: PeerAddress("fd00::3", 8472)})


def test_which_hops_work() -> None:
    assert hop_works(a1, b1, {}) and hop_works(a1, a2, LAN)
    assert not hop_works(a1, a2, {})  # hairpinning through one NAT seldom works
    lo = [PeerAddress("127.0.0.1", p) for p in (1, 2)]  # one machine: agents reach each other
    assert hop_works(lo[0], lo[1], {})


def test_chain_order_prefers_lan_hops_and_keeps_every_hop_working() -> None:
    for targets in itertools.permutations([a1, a2, b1]):
        order = chain_order(list(targets), LAN)
        assert sorted(order, key=str) == sorted(targets, key=str)
        assert chain_worth_trying(order, LAN), order
        # a1 and a2 follow each other: one LAN hop, one hop from NAT to NAT (not two).
        assert sum(lan_hop(x, y, LAN) for x, y in zip(order, order[1:])) == 1, order
    order = chain_order([a1, b1, a2, b2, a3], LAN)
    assert chain_worth_trying(order, LAN), order
    assert sum(lan_hop(x, y, LAN) for x, y in zip(order, order[1:])) == 3, order
    # All behind one NAT (a symmetric one, say, which no other agent can punch): all across the LAN.
    assert chain_order([a1, a2, a3], LAN) == [a1, a2, a3]
    assert chain_worth_trying([a1, a2, a3], LAN) and not chain_worth_trying([a1, a2, a3])


def test_without_local_addresses_the_chain_is_ordered_as_before() -> None:
    assert chain_order([a1, a2, b1]) == chain_order([a1, a2, b1], {})
    order = chain_order([a1, a2, b1])
    assert order[1] == b1 and chain_worth_trying(order)
    # One agent at A without a local address: it cannot follow another agent at A.
    local = {a1: LAN[a1], a2: LAN[a2]}
    for targets in itertools.permutations([a1, a2, a3]):
        assert not chain_worth_trying(chain_order(list(targets), local), local)
    order = chain_order([a3, a1, a2, b1], local)
    assert chain_worth_trying(order, local), order


@pytest.mark.parametrize("order", [[a1, a2, b1], [b1, a1, a2]])
def test_hop_addresses_use_local_ones_across_the_lan_only(order: list[PeerAddress]) -> None:
    hops = hop_addresses(order, LAN)
    assert len(hops) == 2
    for (before, this), (source, via) in zip(zip(order, order[1:]), hops):
        if lan_hop(before, this, LAN):
            # Introduced to the agent before at its LAN address, passed the part at its own.
            assert (source, via) == (LAN[before], LAN[this])
        else:
            assert (source, via) == (before, None)


def test_hop_addresses_on_one_machine_name_no_via() -> None:
    lo = [PeerAddress("127.0.0.1", p) for p in (1, 2)]
    # Agents on loopback report the address they are seen at: nothing to pass on.
    assert hop_addresses(lo, {a: a for a in lo}) == [(lo[0], None)]
    assert hop_addresses(lo, {}) == [(lo[0], None)]
