# -*- test-case-name: tests.adapters.test_relay_quic -*-
"""
Which peers an endpoint reaches through a relay, and which relays it accepts relayed packets from.

A relay (the discovery server, TURN-like, for peers behind symmetric NATs) forwards datagrams
wrapped with C{RELAY_PREFIX} and the address of the peer at the other end
(L{dsss.wire.datagram}).  Sans-I/O: the endpoint asks L{RelayRoutes.route} where each datagram
goes and L{RelayRoutes.unwrap} what a relayed one holds.
"""

from __future__ import annotations

from collections.abc import Callable

from dsss.errors import RemoteProtocolError
from dsss.wire.datagram import decode_relay, encode_relay

__all__ = ["MAX_RELAY_PEERS", "RelayRoutes"]

Address = tuple[str, int]

MAX_RELAY_PEERS = 4096
"""Most peers remembered as reached through a relay (the oldest are forgotten first)."""


class RelayRoutes:
    """
    @ivar peers: each peer reached through a relay, and that relay.
    @ivar relays: the relays whose wrapped packets are accepted.
    """

    def __init__(self, max_peers: int = MAX_RELAY_PEERS) -> None:
        self.peers: dict[Address, Address] = {}
        self.relays: set[Address] = set()
        self._max_peers = max_peers

    def trust(self, relay: Address) -> None:
        """Accept packets that C{relay} forwards from other peers."""
        self.relays.add((relay[0], relay[1]))

    def via(self, peer: Address, relay: Address) -> None:
        """Reach C{peer} through C{relay} from now on."""
        relay = (relay[0], relay[1])
        self.relays.add(relay)
        self.peers[(peer[0], peer[1])] = relay
        while len(self.peers) > self._max_peers:
            del self.peers[next(iter(self.peers))]

    def relayed(self, peer: Address) -> bool:
        return (peer[0], peer[1]) in self.peers

    def known(self, peer: Address, relay: Address) -> bool:
        """Whether C{peer} is already reached through C{relay} (and is no relay itself)."""
        return self.peers.get(peer) == relay and peer not in self.relays

    def route(self, data: bytes, addr: Address) -> tuple[bytes, Address]:
        """The datagram to send and where, for C{data} meant for C{addr}: wrapped and sent to
        the relay if C{addr} is reached through one, else as it is."""
        relay = self.peers.get(addr)
        if relay is None or addr in self.relays:
            return data, addr
        return encode_relay(addr, data), relay

    def unwrap(
        self, datagram: bytes, relay: Address, direct: Callable[[Address], bool]
    ) -> tuple[bytes, Address] | None:
        """
        The packet a relayed C{datagram} from C{relay} holds and the peer it comes from, or
        L{None} to drop it: C{relay} is not trusted, the wrapping does not decode, it is empty,
        or a relay poses as a relayed peer.  A peer first heard through C{relay} is reached
        through it from then on, unless C{direct(peer)}: a peer we talk to directly is never
        re-routed by a relayed packet (which anyone able to spoof the relay's address could
        forge), and such a packet is dropped.
        """
        if relay not in self.relays:
            return None
        try:
            peer, packet = decode_relay(datagram)
        except RemoteProtocolError:
            return None
        if not packet or peer in self.relays:
            return None
        if self.peers.get(peer) != relay:
            if direct(peer):
                return None
            self.via(peer, relay)
        return packet, peer
