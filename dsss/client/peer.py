# -*- test-case-name: tests.integration.test_client -*-
"""The client's side of the punched path: one UDP socket for PING/PUNCH and QUIC to agents."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from twisted.internet import defer
from twisted.logger import Logger

from dsss import proofs
from dsss.client.discovery import Introduction
from dsss.client.pathcache import RELAY_MEMORY, load_relay_only, save_relay_only
from dsss.errors import (
    AccessDenied,
    DSSSError,
    IntegrityError,
    NotFound,
    RemoteProtocolError,
    StorageFull,
    Timeout,
    Unavailable,
)
from dsss.model import UNSPECIFIED_HOSTS, PeerAddress, check_matches, lan_address
from dsss.quic import PeerIdentityError, QuicEndpoint, QuicError
from dsss.wire import transfer as wt
from dsss.wire.datagram import (
    DPing,
    DPong,
    DPunch,
    DRelay,
    DRelayed,
    encode_datagram,
    parse_datagram,
)

log = Logger()

LAN_TIMEOUT = 1.0
"""Seconds for the handshake with an agent across our LAN (its `via`): one there answers in
milliseconds; one that does not (two homes behind one carrier NAT share a public address, not a
LAN) costs this long before its public address is tried as usual."""

_REFUSALS: dict[str, type[DSSSError]] = {
    "denied": AccessDenied,
    "not-found": NotFound,
    "full": StorageFull,
    "integrity": IntegrityError,
}


class PeerError(Unavailable):
    """A transfer with one agent failed (the caller tries another)."""

    code = "peer"


def _receipted(block: str, agents: tuple[Introduction, ...], receipts: tuple[str, ...]) -> int:
    """How many agents of a chain, from the first, proved they stored `block`: each receipt must
    be that agent's signature over the block and the introduction key it was sent. The first
    bad or missing receipt ends the count (the copies after it are made again)."""
    count = 0
    for intro, receipt in zip(agents, receipts):
        try:
            VerifyKey(bytes.fromhex(intro.agent_id)).verify(
                wt.receipt_message(block, intro.key), bytes.fromhex(receipt)
            )
        except (ValueError, BadSignatureError):
            log.warn("agent {agent} gave no valid receipt for {block}", agent=str(intro.address),
                     block=block[:16])
            break
        count += 1
    return count


class PeerNetwork:
    """Owns the client's UDP socket; learns the public address; uploads and downloads parts."""

    def __init__(
        self,
        reactor: Any,
        server_udp: tuple[str, int],
        *,
        bind_host: str = "0.0.0.0",
        max_datagram_size: int = 1452,
        transfer_timeout: float = 60.0,
        idle_timeout: float = 2.0,
        keepalive: float = 0.5,
        direct_timeout: float = 3.0,
        use_relay: bool = True,
        paths_file: Path | None = None,
    ) -> None:
        self.reactor = reactor
        self.server_udp = server_udp
        self.bind_host = bind_host
        self.transfer_timeout = transfer_timeout
        # A short idle timeout: an agent that dies mid-transfer stops answering, and its
        # connection (with every request on it) fails after this many seconds of silence, so
        # the transfer moves on to another agent instead of waiting for the request timeout.
        # The keepalive PINGs, which a live agent's QUIC stack acknowledges however busy it
        # is, keep a connection in use from ending while an agent is only slow to reply.
        self.endpoint = QuicEndpoint(
            reactor, on_control=self._on_control, max_datagram_size=max_datagram_size,
            idle_timeout=idle_timeout, keepalive=keepalive,
        )
        self.public_address: PeerAddress | None = None
        # Our socket's address on our own network (`start`), for agents behind our NAT.
        self.local_address: PeerAddress | None = None
        # LAN addresses (`via`) that did not answer: not tried again in this session.
        self.lan_failed: set[PeerAddress] = set()
        self._address_waiters: list[defer.Deferred[PeerAddress]] = []
        # Which path reached each agent: "direct" (punched) or "relay" (through the server).
        self.paths: dict[str, str] = {}
        self.direct_timeout = direct_timeout
        self.use_relay = use_relay
        self._relay_waiters: dict[PeerAddress, list[defer.Deferred[None]]] = {}
        # Public IP addresses behind which an agent could only be reached through the relay
        # (its direct attempt failed, the relay worked), with when that stops being believed
        # (wall-clock time): the other agents there are behind the same NAT, and are reached
        # through the relay at once instead of after a direct attempt of `direct_timeout` each
        # (a get's parts come from other agents than its manifest). With `paths_file`, they are
        # remembered between calls from the same public address (`dsss.client.pathcache`).
        self.relay_only_hosts: dict[str, float] = {}
        self.paths_file: Path | None = paths_file
        self.wall_clock: Callable[[], float] = time.time
        # Called with `paths` when the network is closed (the CLI's --verbose prints them).
        self.on_close: Callable[[dict[str, str]], None] | None = None
        # Bytes of parts and manifests this client sent in uploads that succeeded, and the copies
        # they made (more than one each when agents passed them on down a chain).
        self.uploaded = 0
        self.copies_made = 0
        self.audits_passed = 0  # audits whose proofs held (`audit`)

    async def start(self, timeout: float = 5.0) -> PeerAddress:
        """Bind the socket and learn our public address from the server's PONG."""
        self.endpoint.listen(self.reactor, self.bind_host, 0)
        self.local_address = self._find_local_address()
        d: defer.Deferred[PeerAddress] = defer.Deferred()
        self._address_waiters.append(d)
        host, port = self.server_udp
        address: PeerAddress = await self._ask_server(
            encode_datagram(DPing("-")),
            d,
            timeout,
            Unavailable(f"the discovery server's UDP port {host}:{port} does not answer"),
        )
        self.load_remembered_paths(address.host)
        return address

    def _find_local_address(self) -> PeerAddress | None:
        """Our socket's port at our address on our own network: the bound address, or if bound
        to every interface, the one the route to the server leaves from (asked of the kernel
        by connecting a UDP socket, which sends nothing). None if there is none to give."""
        host, port = self.endpoint.address[:2]
        if host in UNSPECIFIED_HOSTS:
            family = socket.AF_INET6 if ":" in self.server_udp[0] else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.connect(self.server_udp)
                    host = probe.getsockname()[0]
            except OSError:
                return None
        return lan_address(host, port)

    def load_remembered_paths(self, public_ip: str) -> None:
        """Take in what earlier calls from `public_ip` learned about agents needing the relay."""
        if self.paths_file is None:
            return
        for agent_host, until in load_relay_only(self.paths_file, public_ip, self.wall_clock()).items():
            self.relay_only_hosts[agent_host] = max(until, self.relay_only_hosts.get(agent_host, 0.0))

    async def _ask_server(self, datagram: bytes, answer: defer.Deferred[Any], timeout: float,
                          error: Exception) -> Any:
        """Send `datagram` to the server every 0.25 s until `answer` fires (UDP may lose
        either way), or fail with `error` after `timeout` seconds."""
        step = 0.25
        calls = [
            self.reactor.callLater(i * step, self._send, datagram, self.server_udp)
            for i in range(max(1, int(timeout / step)))
        ]

        def expire() -> None:
            if not answer.called:
                answer.errback(error)

        timer = self.reactor.callLater(timeout, expire)
        try:
            return await answer
        finally:
            for c in calls:
                if c.active():
                    c.cancel()
            if timer.active():
                timer.cancel()

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.endpoint.send_control(data, addr)
        except Exception as e:  # the socket is closed or its buffer full; the next try resends
            log.debug("datagram not sent: {e}", e=e)

    def _on_control(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse_datagram(data)
        except DSSSError:
            return
        if isinstance(msg, DPong) and addr[:2] == self.server_udp:
            self.public_address = msg.observed
            waiters, self._address_waiters = self._address_waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(msg.observed)
        elif isinstance(msg, DRelayed) and addr[:2] == self.server_udp:
            for relay_waiter in self._relay_waiters.pop(msg.agent, []):
                if not relay_waiter.called:
                    relay_waiter.callback(None)

    async def _connect(self, intro: Introduction) -> Any:
        """A QUIC connection to the introduced agent: direct (punched) first; through the
        server's relay if the direct path does not come up within `direct_timeout`."""
        addr = intro.address.as_tuple()
        key = bytes.fromhex(intro.agent_id)
        via = intro.via
        if via is not None and not intro.chained and via not in self.lan_failed:
            # The agent is behind our NAT: across the LAN first (the key is good from our local
            # address as well as from our public one).
            self._send(encode_datagram(DPunch("client")), via.as_tuple())
            try:
                conn = await self.endpoint.connect(
                    via.as_tuple(), expected_public_key=key, handshake_timeout=LAN_TIMEOUT
                )
            except QuicError as e:
                # Nobody there, or another agent (two homes behind one carrier NAT may each have
                # a host at that address): the pin keeps every byte from it.
                log.info("agent {agent} is not on our LAN at {via} ({e}); trying its public address",
                         agent=str(intro.address), via=str(via), e=str(e))
                self.lan_failed.add(via)
            else:
                self.paths.setdefault(str(intro.address), "lan")
                return conn
        tried_direct = False
        if (not self.endpoint.relayed(addr) and self.use_relay
                and self.relay_only_hosts.get(intro.address.host, 0.0) > self.wall_clock()):
            log.info("reaching {agent} through the relay at once: another agent at its address needed it",
                     agent=str(intro.address))
            await self._open_relay(intro)
        elif not self.endpoint.relayed(addr):
            tried_direct = True
            # Open our NAT towards the agent; the agent punches towards us at the same time.
            self._send(encode_datagram(DPunch("client")), addr)
            try:
                conn = await self.endpoint.connect(
                    addr, expected_public_key=key, handshake_timeout=self.direct_timeout
                )
            except PeerIdentityError as e:
                raise PeerError(f"agent {intro.address} is not the agent introduced: {e}") from None
            except QuicError as e:
                if not self.use_relay:
                    raise PeerError(f"cannot reach agent {intro.address}: {e}") from None
                log.info("no direct path to {agent}; asking the server to relay", agent=str(intro.address))
                await self._open_relay(intro)
            else:
                self.paths.setdefault(str(intro.address), "direct")
                return conn
        else:
            # Keep the relay's authorization fresh for this key's pair.
            self._send(encode_datagram(DRelay(intro.key)), self.server_udp)
        try:
            conn = await self.endpoint.connect(addr, expected_public_key=key)
        except PeerIdentityError as e:
            raise PeerError(f"agent {intro.address} is not the agent introduced: {e}") from None
        except QuicError as e:
            raise PeerError(f"cannot reach agent {intro.address}, even through the relay: {e}") from None
        self.paths[str(intro.address)] = "relay"
        if tried_direct:
            self.relay_only_hosts[intro.address.host] = self.wall_clock() + RELAY_MEMORY
        return conn

    async def _open_relay(self, intro: Introduction, timeout: float = 5.0) -> None:
        """Ask the server to relay between us and the agent (authorized by the introduction
        key it gave us), and route our packets for that agent through it."""
        agent = intro.address
        d: defer.Deferred[None] = defer.Deferred()
        self._relay_waiters.setdefault(agent, []).append(d)
        await self._ask_server(
            encode_datagram(DRelay(intro.key)),
            d,
            timeout,
            PeerError(f"no direct path to agent {agent}, and the server refused to relay"),
        )
        self.endpoint.relay_via(agent.as_tuple(), self.server_udp)

    async def _request(self, intro: Introduction, data: bytes | list[bytes], max_response: int) -> bytes:
        conn = await self._connect(intro)
        try:
            return await conn.request(data, max_response=max_response, timeout=self.transfer_timeout)
        except QuicError as e:
            raise PeerError(f"transfer with agent {intro.address} failed: {e}") from None

    @staticmethod
    def _refused(reply: wt.Refused, intro: Introduction) -> DSSSError:
        cls = _REFUSALS.get(reply.code, PeerError)
        return cls(f"agent {intro.address} refused: {reply.text}")

    async def upload(self, intro: Introduction, block: str, data: bytes,
                     chain: tuple[Introduction, ...] = ()) -> int:
        """Upload `data` to the introduced agent; with a `chain` (introductions each issued for
        the agent before it), that agent passes it on down the chain as it arrives. Returns how
        many agents stored it: the first agent and the first n-1 of the chain."""
        hops = tuple(wt.Hop(i.via or i.address, i.agent_id, i.key) for i in chain[: wt.MAX_CHAIN])
        header = wt.encode_request(wt.Upload(intro.key, block, len(data), bool(hops), hops))
        raw = await self._request(intro, [header, data], wt.MAX_HEADER)
        line, _, _ = raw.partition(b"\n")
        try:
            reply = wt.parse_reply(line)
        except RemoteProtocolError as e:
            raise PeerError(f"agent {intro.address} answered badly: {e}") from None
        if isinstance(reply, wt.Refused):
            raise self._refused(reply, intro)
        if isinstance(reply, wt.ProofReply):
            raise PeerError(f"agent {intro.address} answered an upload with a proof")
        self.uploaded += len(data)
        count = 1
        if isinstance(reply, wt.Stored):
            count = _receipted(block, (intro, *chain[: len(hops)]), reply.receipts)
        self.copies_made += count
        return count

    async def _reply(self, intro: Introduction, header: bytes,
                     max_response: int) -> tuple[wt.TransferReply, bytes]:
        """Send a request that carries no body; its parsed reply line and what followed it.
        A refusal is raised as its error."""
        raw = await self._request(intro, header, max_response)
        line, nl, body = raw.partition(b"\n")
        if not nl:
            raise PeerError(f"agent {intro.address} sent no reply header")
        try:
            reply = wt.parse_reply(line)
        except RemoteProtocolError as e:
            raise PeerError(f"agent {intro.address} answered badly: {e}") from None
        if isinstance(reply, wt.Refused):
            raise self._refused(reply, intro)
        return reply, body

    async def download(self, intro: Introduction, block: str, max_size: int = wt.MAX_PART,
                       *, verify: bool = True) -> bytes:
        """The part's bytes from the introduced agent, checked against `block` (with
        `verify=False` the caller checks them, e.g. off the reactor thread: `check_matches`)."""
        header = wt.encode_request(wt.Download(intro.key, block))
        reply, body = await self._reply(intro, header, wt.MAX_HEADER + 1 + max_size)
        if not isinstance(reply, wt.Done) or reply.size is None or reply.size != len(body):
            raise PeerError(f"agent {intro.address} sent a truncated part, or no part")
        if verify:
            check_matches(block, body, f"agent {intro.address}")
        return body

    async def audit(self, intro: Introduction, block: str, nonce: bytes | None = None) -> int:
        """Challenge the introduced agent (an introduction for a download of `block`) to prove
        that it holds `block`, without downloading it: it answers with one leaf of the part and
        the leaf's sibling hashes, checked here against the address (dsss/proofs.py). Returns
        the part's size, proven by the address. Raises ProofError if the proof does not hold,
        NotFound (and the other refusals) if the agent refuses, PeerError if it cannot be
        reached or answers out of the protocol."""
        nonce = os.urandom(proofs.NONCE_SIZE) if nonce is None else nonce
        header = wt.encode_request(wt.Audit(intro.key, block, nonce))
        reply, body = await self._reply(intro, header, wt.MAX_HEADER + 1 + wt.MAX_PROOF)
        if not isinstance(reply, wt.ProofReply) or reply.length != len(body):
            raise PeerError(f"agent {intro.address} answered an audit without a whole proof")
        try:
            proofs.verify(block, reply.size, nonce, body)
        except proofs.ProofError as e:
            raise proofs.ProofError(f"agent {intro.address} failed the audit of {block[:16]}: {e}") from None
        self.audits_passed += 1
        return reply.size

    async def close(self) -> None:
        if self.on_close is not None:
            self.on_close(dict(self.paths))
        if self.paths_file is not None and self.public_address is not None and self.relay_only_hosts:
            save_relay_only(self.paths_file, self.public_address.host, self.relay_only_hosts, self.wall_clock())
        try:
            # The client exits next: its CONNECTION_CLOSEs are sent, the closing period (which
            # would resend them if lost) is not waited for; see QuicEndpoint.close.
            await self.endpoint.close(grace=0)
        except Exception:  # closing is best effort
            pass


__all__ = ["PeerNetwork", "PeerError", "Timeout"]
