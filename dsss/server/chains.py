# -*- test-case-name: tests.unit.test_chains -*-
"""Replication chains: in which order agents pass a part on, and by which address. Pure.

Agents are named by their public UDP address (what the server observed). Two agents at one
public IP address are behind one NAT, and few NATs let the hosts behind them reach each other
through it (hairpinning), so a chain avoids such a hop. Unless both agents told the server their
local address (`LOCAL`, ICE's host candidate): then they are on one LAN, and the hop is the
cheapest of all, straight across it, with no NAT on the way and nothing through the relay.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Mapping

from dsss.model import PeerAddress

Locals = Mapping[PeerAddress, PeerAddress]
"""An agent's public address -> the local address it reported (only agents that did)."""


def lan_hop(a: PeerAddress, b: PeerAddress, local: Locals) -> bool:
    """Whether the agent at `a` passes a part to the one at `b` across their LAN: both at one
    public IP address, both with a local address of one IP version, and those two distinct
    (two agents cannot share one on a LAN; behind a carrier's NAT two homes might)."""
    la, lb = local.get(a), local.get(b)
    return (
        a.host == b.host and la is not None and lb is not None and la != lb
        and ipaddress.ip_address(la.host).version == ipaddress.ip_address(lb.host).version
    )


def hop_works(a: PeerAddress, b: PeerAddress, local: Locals) -> bool:
    """Whether `a` can be expected to reach `b`: at another public IP (the two punch), across
    their LAN, or on one machine (loopback)."""
    return a.host != b.host or lan_hop(a, b, local) or ipaddress.ip_address(a.host).is_loopback


def chain_order(targets: list[PeerAddress], local: Locals | None = None,
                start: PeerAddress | None = None) -> list[PeerAddress]:
    """The agents of a replication chain in an order where every hop works as far as possible
    (`hop_works`), a hop across a LAN preferred to one through two NATs. Otherwise the order of
    the placement is kept. `start` is the uploader's public address (its local one in `local`,
    if known): the chain begins across its LAN if it can, and otherwise not behind its NAT."""
    local = local or {}
    rest = list(targets)
    ordered: list[PeerAddress] = []
    while rest:
        last = ordered[-1] if ordered else start
        # The next agent: across the LAN from the last if it can, else the first at another
        # address, preferring the IP address most of the remaining ones share (so that it does
        # not end the chain twice).
        counts = Counter(t.host for t in rest)
        if last is None:
            candidates = rest
        else:
            candidates = ([t for t in rest if lan_hop(last, t, local)]
                          or [t for t in rest if t.host != last.host] or rest)
        pick = max(candidates, key=lambda t: counts[t.host])
        ordered.append(pick)
        rest.remove(pick)
    return ordered


def chain_worth_trying(ordered: list[PeerAddress], local: Locals | None = None) -> bool:
    """Whether a chain in this order can be expected to work: every hop does (`hop_works`).
    A hop that does not costs the uploader a forward that fails after its handshake timeout."""
    local = local or {}
    return all(hop_works(a, b, local) for a, b in zip(ordered, ordered[1:]))


def hop_addresses(
    ordered: list[PeerAddress], local: Locals
) -> list[tuple[PeerAddress, PeerAddress | None]]:
    """For each agent after the first of a chain: the address of the agent before it as this
    one sees it (what its introduction is for), and the address it is passed the part at
    (None: its public one). Across a LAN both are the local ones."""
    hops: list[tuple[PeerAddress, PeerAddress | None]] = []
    for a, b in zip(ordered, ordered[1:]):
        if lan_hop(a, b, local):
            via = local[b]
            hops.append((local[a], via if via != b else None))
        else:
            hops.append((a, None))
    return hops
