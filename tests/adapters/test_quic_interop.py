"""
DSSS's QUIC endpoint against an independent QUIC stack (aioquic, default TLS settings), both ways.

An aioquic client uploads a part to a real agent (StorageAgent + TransferHandler on a
QuicEndpoint) and downloads it again, speaking the UPLOAD/DOWNLOAD stream protocol of
docs/protocol.md section 5 written out by hand; a DSSS client endpoint uploads to and downloads
from an aioquic server that answers that protocol. Everything runs on an in-memory link and a
driven clock. Each handshake must complete without a probe timeout on either side (nothing had to
be sent again), and nothing may be logged as a warning or an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer

from dsss.agent.service import AgentConfig, StorageAgent
from dsss.agent.transfer import TransferHandler
from dsss.crypto.certs import make_certificate, public_key_of
from dsss.model import PeerAddress, block_hash
from dsss.quic import QuicEndpoint
from dsss.quic.retry import AdmissionPolicy
from dsss.quic.testing import MemoryDatagramLink, run_until
from dsss.wire import transfer as wt
from tests.aioquic_peer import AioquicPeer

AGENT = ("127.0.0.2", 4000)
CLIENT = ("127.0.0.3", 5000)
SERVER_SEED = bytes(range(32))
PART = 1_000_000


@implementer(ILogObserver)
class _Complaints:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            self.events.append(event)


@pytest.fixture
def complaints(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """What Twisted's logger and the stdlib's (qh3, aioquic) said at warning level or above."""
    observer = _Complaints()
    globalLogPublisher.addObserver(observer)
    caplog.set_level(logging.WARNING)
    found: list[str] = []
    try:
        yield found
    finally:
        globalLogPublisher.removeObserver(observer)
    from twisted.logger import formatEvent

    found += [formatEvent(e) for e in observer.events]
    found += [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


def _server_connections(endpoint: QuicEndpoint) -> list:
    return [h for h in endpoint.connections if not h.is_client]


def test_aioquic_client_uploads_and_downloads_a_part_from_an_agent(tmp_path, complaints) -> None:
    clock = Clock()
    clock.advance(1000)
    link = MemoryDatagramLink(clock)
    agent = StorageAgent(clock, AgentConfig(storage=str(tmp_path / "agent")))
    agent.quic = QuicEndpoint(
        clock,
        on_control=agent.on_control,
        server_identity=make_certificate(agent.identity.seed),
        on_stream=TransferHandler(agent).on_stream,
    )
    link.attach(agent.quic, AGENT)
    client = AioquicPeer(clock)
    link.attach(client, CLIENT)

    handshake = client.connect(AGENT)
    assert run_until(clock, lambda: handshake.called, timeout=10)
    assert client.handshake_done
    # No flight had to be sent again: neither side's probe timer fired.
    assert client.probe_timeouts == 0
    (server,) = _server_connections(agent.quic)
    assert server._quic.probe_timeouts() == 0
    # The agent proved the key it is known by (its agent id).
    assert client.peer_public_key == bytes.fromhex(agent.identity.agent_id)

    data = os.urandom(PART)
    block = block_hash(data)
    now = clock.seconds()
    upload_key = agent.introductions.issue(PeerAddress(*CLIENT), len(data), block, now).key
    replies: list[bytes] = []
    client.request(f"UPLOAD {upload_key} {block} {len(data)}\n".encode() + data).addCallback(replies.append)
    assert run_until(clock, lambda: bool(replies), timeout=30)
    assert replies.pop() == b"Ok\n"
    assert agent.store.has(block)

    download_key = agent.introductions.issue(PeerAddress(*CLIENT), 0, block, clock.seconds()).key
    client.request(f"DOWNLOAD {download_key} {block}\n".encode()).addCallback(replies.append)
    assert run_until(clock, lambda: bool(replies), timeout=30)
    line, _, body = replies.pop().partition(b"\n")
    assert line == f"Ok {len(data)}".encode() and body == data

    assert client.probe_timeouts == 0
    client.close()
    assert run_until(clock, lambda: not agent.quic.connections, timeout=10)
    assert client.terminated is not None and client.terminated.error_code == 0
    assert complaints == []


class _AioquicAgent:
    """What an agent written on aioquic would answer: UPLOAD stores a part whose BLAKE3 hash
    matches, DOWNLOAD returns it (docs/protocol.md section 5; keys are not checked here)."""

    def __init__(self) -> None:
        self.parts: dict[str, bytes] = {}

    def __call__(self, request: bytes) -> bytes:
        header, _, body = request.partition(b"\n")
        words = header.decode().split(" ")
        if words[0] == "UPLOAD" and len(words) == 4:
            _, _key, block, size = words
            if len(body) != int(size) or block_hash(body) != block:
                return b"ERROR integrity\n"
            self.parts[block] = body
            return b"Ok\n"
        if words[0] == "DOWNLOAD" and len(words) == 3 and not body:
            part = self.parts.get(words[2])
            if part is None:
                return b"ERROR not-found\n"
            return f"Ok {len(part)}\n".encode() + part
        return b"ERROR protocol\n"


def test_dsss_client_uploads_and_downloads_a_part_from_an_aioquic_server(complaints) -> None:
    clock = Clock()
    clock.advance(1000)
    link = MemoryDatagramLink(clock)
    identity = make_certificate(SERVER_SEED)
    server = AioquicPeer(clock, server_identity=identity, on_request=_AioquicAgent())
    link.attach(server, AGENT)
    endpoint = QuicEndpoint(clock, on_control=lambda d, a: None)
    link.attach(endpoint, CLIENT)

    connecting = endpoint.connect(AGENT, expected_public_key=public_key_of(identity[0]))
    handles: list = []
    connecting.addBoth(handles.append)
    assert run_until(clock, lambda: bool(handles), timeout=10)
    (handle,) = handles
    assert handle.established and handle.peer_public_key == public_key_of(identity[0])
    assert handle._quic.probe_timeouts() == 0 and server.probe_timeouts == 0

    data = os.urandom(PART)
    block = block_hash(data)
    results: list = []
    upload = wt.encode_request(wt.Upload("0" * 32, block, len(data)))
    handle.request([upload, data], max_response=wt.MAX_HEADER).addBoth(results.append)
    assert run_until(clock, lambda: bool(results), timeout=30)
    assert wt.parse_reply(results.pop().partition(b"\n")[0]) == wt.Done()

    download = wt.encode_request(wt.Download("1" * 32, block))
    handle.request(download, max_response=wt.MAX_PART + 300).addBoth(results.append)
    assert run_until(clock, lambda: bool(results), timeout=30)
    line, _, body = results.pop().partition(b"\n")
    assert wt.parse_reply(line) == wt.Done(len(data)) and body == data

    assert handle._quic.probe_timeouts() == 0 and server.probe_timeouts == 0
    closed: list = []
    endpoint.close().addBoth(closed.append)
    assert run_until(clock, lambda: bool(closed) and server.terminated is not None, timeout=10)
    assert server.terminated is not None and server.terminated.error_code == 0
    assert complaints == []


def test_aioquic_client_passes_address_validation(tmp_path, complaints) -> None:
    """An agent under a handshake flood answers Initials with Retry: a standard client follows
    it, completes the handshake without a probe timeout, and is served."""
    clock = Clock()
    clock.advance(1000)
    link = MemoryDatagramLink(clock)
    agent = StorageAgent(clock, AgentConfig(storage=str(tmp_path / "agent")))
    agent.quic = QuicEndpoint(
        clock,
        on_control=agent.on_control,
        server_identity=make_certificate(agent.identity.seed),
        on_stream=TransferHandler(agent).on_stream,
        admission=AdmissionPolicy(threshold=0),  # as if the threshold were passed
    )
    link.attach(agent.quic, AGENT)
    client = AioquicPeer(clock)
    link.attach(client, CLIENT)
    handshake = client.connect(AGENT)
    assert run_until(clock, lambda: handshake.called, timeout=10)
    assert client.handshake_done and client.probe_timeouts == 0
    assert agent.quic.retries_sent >= 1
    data = os.urandom(20_000)
    block = block_hash(data)
    key = agent.introductions.issue(PeerAddress(*CLIENT), len(data), block, clock.seconds()).key
    replies: list[bytes] = []
    client.request(f"UPLOAD {key} {block} {len(data)}\n".encode() + data).addCallback(replies.append)
    assert run_until(clock, lambda: bool(replies), timeout=30)
    assert replies.pop() == b"Ok\n" and agent.store.has(block)
    assert complaints == []
