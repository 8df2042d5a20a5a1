# -*- test-case-name: tests.integration.test_cli_commands,tests.adapters.test_gateway -*-
"""The client Session the put and get flows run on, and opening one from settings.

A `Session` holds what a flow needs (discovery client, peer network, replication choices, the
lease signer). The CLI and the gateway both open theirs here from a `SessionOptions`, a plain
value: nothing in this module reads a command line or the environment.
"""

from __future__ import annotations

import gc
import ipaddress
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypedDict, TypeVar
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.task import deferLater

from dsss.erasure import Coding
from dsss.errors import LocalUsageError, TooFewAgents
from dsss.leases import DEFAULT_KEEP, INITIAL_LEASE

if TYPE_CHECKING:
    from nacl.public import PrivateKey

    from dsss.client.config import Settings
    from dsss.client.discovery import DiscoveryClient, Introduction
    from dsss.client.peer import PeerNetwork
    from dsss.leases import LeaseRecord, LeaseSigner
    from dsss.model import PeerAddress

_T = TypeVar("_T")

DEFAULT_WAIT = 10.0
"""Seconds a command keeps trying to reach a server that does not answer at its start."""
MAX_WAIT = 3600.0

NON_LOOPBACK_DATAGRAM_SIZE = 1452
"""The largest QUIC datagram towards a server that is not on loopback: fits a 1500-byte
Ethernet MTU behind PPPoE and an IPv6 header."""

DEFAULT_PARALLEL = 4

WARMING_PATIENCE = 15.0
"""Seconds a put short of agents waits for a server that has just started (and says so) to
hear from more of them before it refuses (exit 9)."""
WARMING_POLL = 0.5


class UploadLease(TypedDict, total=False):
    """The keyword arguments an upload carries its lease in (`PeerNetwork.upload`)."""

    lease: LeaseRecord


@dataclass
class Session:
    """Everything a flow needs: the discovery client, the peer network, the user's key."""

    discovery: DiscoveryClient
    peers: PeerNetwork
    replicas: int
    parallel: int = DEFAULT_PARALLEL
    rng: random.Random = field(default_factory=random.SystemRandom)
    # Replicate down a chain of agents (the client sends each part once, each agent passes it
    # on as it arrives) where the server offers it; else the client sends every copy itself.
    chain: bool = True
    # Chains that stopped short; after storing.CHAIN_BREAKS_TOLERATED, none until `chain_paused_until`
    # (on `clock`, seconds).
    chain_breaks: int = 0
    chain_paused_until: float = float("-inf")
    clock: Callable[[], float] = time.monotonic
    # Runs a part's encryption and hashing (put) or decryption (get) elsewhere: the CLI and the
    # gateway give the reactor's thread pool (PyNaCl and blake3 release the GIL), so that the
    # reactor thread keeps the QUIC connections busy meanwhile. None: on the calling thread.
    offload: Callable[..., defer.Deferred[Any]] | None = None
    # Downloads in flight per agent: a part is fetched from the holder with the fewest, so that
    # the parts in flight spread over the agents (and over the relay's per-pair limits).
    fetching: dict[PeerAddress, int] = field(default_factory=dict)
    # Store new files' parts erasure-coded (k-of-n shares, one agent each) instead of as
    # `replicas` whole copies.
    erasure: Coding | None = None
    # Live agents when the session opened, as the server said (None: it did not say), and
    # whether the server had just started then (more agents may still be registering).
    agents: int | None = None
    warming: bool = False

    def agents_needed(self) -> int:
        """Distinct agents a new file needs: the replica count (its manifest), or more for the
        shares of an erasure coding."""
        return max(self.replicas, self.erasure.n if self.erasure is not None else 0)

    async def check_enough_agents(self, clock: Any, patience: float = WARMING_PATIENCE) -> None:
        """TooFewAgents if the server says it has fewer live agents than a new file needs. A
        server that has just started may still be hearing from its agents: while it says so
        (for at most `patience` seconds), its count is asked again before the put is refused."""
        need = self.agents_needed()
        waited = 0.0
        while self.agents is not None and self.agents < need and self.warming and waited < patience:
            await deferLater(clock, WARMING_POLL, lambda: None)
            waited += WARMING_POLL
            info = await self.discovery.info()
            self.agents, self.warming = info.agents, info.warming
        if self.agents is not None and self.agents < need:
            what = (f"{self.replicas} copies of each block" if self.erasure is None
                    else f"{self.erasure.n} shares of each part, each on its own agent")
            raise TooFewAgents(f"too few agents (have {self.agents}, need {need}): a new file needs {what}")
    # Signs the leases of what this session stores (dsss/leases.py); None: uploads carry no
    # lease (agents then keep them for their initial hold only).
    leases: LeaseSigner | None = None
    # Seconds an upload's own lease runs: until the put's leases for --keep are taken.
    initial_lease: int = INITIAL_LEASE
    # Seconds a put's leases run once its manifest is stored (None: only the initial lease).
    keep: int | None = DEFAULT_KEEP
    # Where this session stored each block, and the introduction each agent was reached with
    # (the put takes its leases there: dsss.client.leasing).
    holders: dict[str, set[PeerAddress]] = field(default_factory=dict)
    introduced: dict[PeerAddress, Introduction] = field(default_factory=dict)

    def upload_lease(self, block: str) -> "UploadLease":
        """What an upload of `block` carries, as `PeerNetwork.upload`'s keyword arguments: the
        initial lease, signed now (nothing without a lease signer)."""
        if self.leases is None:
            return {}
        return {"lease": self.leases.sign(block, int(time.time()) + self.initial_lease)}

    def stored_at(self, block: str, intro: Introduction) -> None:
        self.holders.setdefault(block, set()).add(intro.address)
        self.introduced[intro.address] = intro

    def chaining(self) -> bool:
        """Whether to ask for a replication chain now: chosen, and not paused."""
        return self.chain and self.clock() >= self.chain_paused_until

    async def run(self, f: Callable[..., _T], *args: Any) -> _T:
        if self.offload is None:
            return f(*args)
        result: _T = await self.offload(f, *args)
        return result


@dataclass(frozen=True)
class SessionOptions:
    """What a session is opened with."""

    server: str
    parallel: int
    erasure: Coding | None = None
    # The largest QUIC datagram; None: 65000 towards a loopback server, else 1452.
    datagram_size: int | None = None
    # Replicate down a chain of agents; None: chain unless the server is on loopback.
    chain: bool | None = None
    # On closing, say on stderr which path reached each agent and how many bytes went out.
    verbose: bool = False
    # The key file whose path cache (agents reached directly or by relay) the session keeps;
    # None: no cache.
    key_path: Path | None = None
    # Seconds to keep trying a server that cannot be reached at the start (it may be starting
    # or restarting), with backoff, before giving up.
    wait: float = DEFAULT_WAIT

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SessionOptions:
        """The options for `settings` (server, parallel, erasure, key file), with `overrides`
        (any field, by name) taking precedence."""
        base = cls(server=settings.server, parallel=settings.parallel, erasure=settings.erasure,
                   key_path=settings.key)
        return replace(base, **overrides)


def datagram_size(requested: int | None, host: str) -> int:
    """The largest QUIC datagram the session's socket sends to `host` (an IP address)."""
    from dsss.quic import LOOPBACK_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE_LIMIT

    if requested is not None:
        if not 1200 <= requested <= MAX_DATAGRAM_SIZE_LIMIT:
            raise LocalUsageError(f"--datagram-size must be between 1200 and {MAX_DATAGRAM_SIZE_LIMIT}")
        return int(requested)
    return LOOPBACK_DATAGRAM_SIZE if ipaddress.ip_address(host).is_loopback else NON_LOOPBACK_DATAGRAM_SIZE


async def resolve_host(reactor: Any, host: str) -> str:
    """The server's IP address: UDP datagrams go to an address, not a name."""
    from dsss.client.discoveryerrors import ServerUnreachable

    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return str(await reactor.resolve(host))
    except Exception:
        raise ServerUnreachable(f"cannot resolve the server's host name {host!r}") from None


def collect_garbage_again() -> None:
    """`python -m dsss.client` loads its modules with the garbage collector off (see
    `dsss.client.__main__`); once the network stack is loaded, the objects the imports made are
    frozen (never scanned again) and collection is back on, so a long transfer's memory stays
    bounded."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def print_paths(paths: dict[str, str]) -> None:
    """One stderr line per agent reached: `dsss: path ADDRESS direct|relay`."""
    for address, path in sorted(paths.items()):
        print(f"dsss: path {address} {path}", file=sys.stderr)


async def open_session(
    reactor: Any, options: SessionOptions, key: PrivateKey, *, on_wait: Callable[[str], None] | None = None
) -> Session:
    """Ask the server for its info, start the peer network (UDP socket, punch) and return the
    Session the flows run on. Close it with `await session.peers.close()`.

    A server that cannot be reached is tried again with backoff for `options.wait` seconds;
    `on_wait(message)` is called once when the first try has failed."""
    from twisted.internet.threads import deferToThreadPool

    from dsss.client.discovery import DiscoveryClient
    from dsss.client.pathcache import paths_file
    from dsss.client.peer import PeerNetwork

    collect_garbage_again()
    # With the key, requests are signed when the server admits only listed clients.
    if not 0 <= options.wait <= MAX_WAIT:
        raise LocalUsageError(f"--wait must be from 0 to {MAX_WAIT:g} seconds")
    discovery = DiscoveryClient(options.server, reactor=reactor, key=key, first_wait=options.wait,
                                on_wait=on_wait)
    info = await discovery.info()
    host = await resolve_host(reactor, urlsplit(options.server).hostname or "127.0.0.1")
    bind = "::" if ":" in host else "0.0.0.0"
    peers = PeerNetwork(
        reactor, (host, info.udp_port), bind_host=bind,
        max_datagram_size=datagram_size(options.datagram_size, host),
        paths_file=paths_file(options.key_path) if options.key_path is not None else None,
    )
    if options.verbose:
        def report(paths: dict[str, str]) -> None:
            print_paths(paths)
            if peers.uploaded:
                print(f"dsss: uploaded {peers.uploaded} bytes, {peers.copies_made} copies stored",
                      file=sys.stderr)

        peers.on_close = report
    await peers.start()
    discovery.local_address = peers.local_address  # agents behind our NAT: across our LAN
    chain = options.chain
    if chain is None:
        chain = not ipaddress.ip_address(host).is_loopback

    def offload(f: Any, *a: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)

    from dsss.client.leasing import signer_for

    # Everything the session stores is leased with the user's lease key (dsss/leases.py).
    signer = signer_for(key)
    discovery.lease_key = signer.owner
    return Session(discovery=discovery, peers=peers, replicas=info.replicas, parallel=options.parallel,
                   chain=chain, offload=offload, erasure=options.erasure,
                   agents=info.agents, warming=info.warming, leases=signer)
