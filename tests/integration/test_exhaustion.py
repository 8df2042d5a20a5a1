"""Hostile traffic against a real `twistd dsss-server`: connection floods on its HTTP port, with
the API and the agents' control port kept reachable, and the server sized to its descriptor limit.

Every flood here is a fixed number of sockets from the test process, on 127.x addresses, held
for at most a few seconds and closed by the test at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import pytest_twisted
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread

from tools.harness import LocalNetwork, wait_until

pytestmark = [pytest.mark.integration]

PER_IP = 10
TOTAL = 20
HEADER_TIMEOUT = 2.0


def open_idle(port: int, source: str, count: int) -> list[socket.socket]:
    """`count` connections from `source` that send the start of a request line and then nothing."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        s.sendall(b"GET /api/info HTTP/1.1\r\n")
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    """Whether the server closes `s` within `timeout` seconds (reading until EOF or reset)."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def api_answers(net: LocalNetwork, source: str = "127.0.0.1") -> bool:
    """One GET /api/info from `source`: True if it is answered 200."""
    try:
        s = socket.create_connection(("127.0.0.1", net.http_port), timeout=5, source_address=(source, 0))
    except OSError:
        return False
    with s:
        try:
            s.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            s.settimeout(5)
            return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False


@pytest.fixture
def flooded(make_network) -> Iterator[tuple[LocalNetwork, list[socket.socket]]]:
    net = make_network("flood")
    net.start_server(
        f"--http-connections={TOTAL}",
        f"--http-connections-per-ip={PER_IP}",
        f"--http-header-timeout={HEADER_TIMEOUT}",
    )
    socks: list[socket.socket] = []
    try:
        yield net, socks
    finally:
        for s in socks:
            s.close()


def test_one_source_cannot_hold_more_than_its_share(flooded) -> None:
    net, socks = flooded
    socks += open_idle(net.http_port, "127.0.0.5", PER_IP)
    extra = open_idle(net.http_port, "127.0.0.5", 3)
    socks += extra
    # Over its share: closed at once, before the header deadline could matter.
    assert all(closed_by_server(s, HEADER_TIMEOUT / 2) for s in extra)
    assert api_answers(net)  # another source is served meanwhile
    # The idle ones are closed at the header deadline, and the source may connect again.
    assert all(closed_by_server(s, 3 * HEADER_TIMEOUT) for s in socks[:PER_IP])
    assert api_answers(net, "127.0.0.5")


def test_agents_rejoin_while_the_http_port_is_full(flooded) -> None:
    net, socks = flooded
    for i in range(TOTAL // PER_IP):
        socks += open_idle(net.http_port, f"127.0.0.{10 + i}", PER_IP)
    assert not api_answers(net)  # the HTTP budget is spent...
    agent = net.start_agent()  # ...but the control port has its own
    agent.wait_for(r"DSSS agent ready", timeout=20)
    # The flood's connections end at the header deadline; then the API answers again and
    # shows the agent that joined during the flood.
    assert all(closed_by_server(s, 3 * HEADER_TIMEOUT) for s in socks)
    assert api_answers(net)
    net.wait_live(1)


class LimitedNetwork(LocalNetwork):
    """A network whose server runs with a descriptor limit of NOFILE (soft and hard)."""

    NOFILE = 400

    def server_prefix(self) -> Sequence[str]:
        return ("prlimit", f"--nofile={self.NOFILE}:{self.NOFILE}", "--")


def test_budgets_shrink_to_the_descriptor_limit(tmp_path: Path) -> None:
    net = LimitedNetwork(tmp_path / "limited")
    try:
        server = net.start_server()
        m = server.wait_for(r"connection budgets: (\d+) HTTP, (\d+) control connections \((\d+) descriptors")
        http, control, needed = (int(g) for g in m.groups())
        assert needed <= LimitedNetwork.NOFILE
        assert control > http >= 1
        net.start_agent().wait_for(r"DSSS agent ready", timeout=20)
    finally:
        net.stop()


def test_caps_over_the_descriptor_limit_refuse_to_start(tmp_path: Path) -> None:
    net = LimitedNetwork(tmp_path / "toolow")
    args = [*net.server_prefix(), *_twistd(), "dsss-server", "--http=tcp:0:interface=127.0.0.1",
            "--control=tcp:0:interface=127.0.0.1", "--udp=127.0.0.1:0",
            "--http-connections=1000", "--agent-connections=1000"]
    from tools.harness import child_env

    r = subprocess.run(args, env=child_env(), capture_output=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert "need 2128 file descriptors" in out and "at most 400" in out, out


def _twistd() -> list[str]:
    from tools.harness import TWISTD

    return [*TWISTD, "--nodaemon", "--pidfile="]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of its own (root only), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path) -> None:
    """Write to `mnt` until the file system refuses: no byte is left free."""
    with open(mnt / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


def test_an_agent_with_a_full_disk_rejoins_and_serves_what_it_holds(make_network, small_disk: Path,
                                                                     tmp_path: Path) -> None:
    net = make_network("fulldisk", replicas=1)
    net.start_server()
    full = net.start_agent("full", f"--storage={small_disk / 'agent'}")
    net.wait_live(1)
    net.client("keygen")
    original = tmp_path / "kept.bin"
    original.write_bytes(bytes(range(256)) * 400)
    address = net.client("put", str(original)).stdout.split()[0].decode()

    fill(small_disk)
    net.start_agent("spare")
    full.stop()
    full = net.start_agent("full", f"--storage={small_disk / 'agent'}")  # registers with 0 bytes free
    net.wait_live(2)
    out = tmp_path / "back.bin"
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == original.read_bytes()  # only the full agent holds it

    # Losing the control connection while full: the server restarts, the agent rejoins.
    net.server.stop()
    net.start_server(reuse_ports=True)
    net.wait_live(2, timeout=30)
    out.unlink()
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == original.read_bytes()

    # New parts go to the agent with room; the full one refuses nothing it was not offered.
    newer = tmp_path / "newer.bin"
    newer.write_bytes(b"n" * 5000)
    net.client("put", str(newer))
    log = full.log()
    assert "Unhandled" not in log and "Traceback" not in log, log[-3000:]
    assert "registering anyway" in log


@pytest_twisted.ensureDeferred
async def test_stalled_uploads_cannot_take_the_agents_space(make_network, tmp_path: Path) -> None:
    """An attacker at 127.0.0.9 sends UPLOAD headers for 16 MiB parts and a byte each (keys from
    the open introduce-me API): it holds at most --reserve-per-source on each agent, an honest
    put from 127.0.0.1 meanwhile succeeds, and the stalled uploads are dropped, their space freed."""
    from twisted.internet import reactor

    from dsss.client.discovery import DiscoveryClient
    from dsss.client.peer import PeerNetwork
    from dsss.model import PeerAddress, block_hash
    from dsss.wire import transfer as wt

    net = make_network("stall")
    net.start_server()
    for _ in range(3):
        net.start_agent(None, "--capacity=64M", "--reserve-per-source=32M")
    net.wait_live(3)
    net.client("keygen")
    free_before = {a["address"]: a["free"] for a in net.status()["agents"]}

    discovery = DiscoveryClient(net.url, reactor=reactor)
    peers = PeerNetwork(reactor, ("127.0.0.1", net.udp_port), bind_host="127.0.0.9")
    await peers.start()
    size = 16 * 1024 * 1024
    streams: list[tuple[object, list[bytes]]] = []

    def trickle() -> None:  # a byte every 4 s on each upload still open, as in the reported attack
        for stream, replies in streams:
            if not replies:
                stream.write(b"x").addErrback(lambda f: None)

    trickling = LoopingCall(trickle)
    trickling.clock = reactor
    try:
        for agent in net.agents:
            target = PeerAddress.parse(agent.address)
            for i in range(3):  # the third is over the source's 32M
                block = block_hash(b"stall %s %d" % (agent.name.encode(), i))
                intro = await discovery.introduce_me(target, block, size, peers.public_address)
                conn = await peers._connect(intro)
                stream = conn.open_stream()
                replies: list[bytes] = []
                stream.on_data = replies.append
                stream.write(wt.encode_request(wt.Upload(intro.key, block, size)) + b"x")
                streams.append((stream, replies))
        trickling.start(4, now=False)
        # Each agent holds 32M reserved for the attacker, no more, and says so to the third.
        assert await until(lambda: answered(streams, b"ERROR busy") == 3, timeout=10)
        # The honest 20 MiB put fits beside (the CLI runs in a thread: the reactor goes on
        # serving the attacker's connections meanwhile).
        honest = tmp_path / "honest.bin"
        honest.write_bytes(os.urandom(20 * 1024 * 1024))
        put = await deferToThread(net.client, "put", str(honest))
        back = tmp_path / "back.bin"
        await deferToThread(net.client, "get", put.stdout.split()[0].decode(), "-o", str(back))
        assert back.read_bytes() == honest.read_bytes()
        # They are dropped after the grace period and one window of too little progress...
        assert await until(lambda: answered(streams, b"ERROR timeout") == 6, timeout=45)
        # ...and the agents' free space is back to what the honest put left.
        stored = len(honest.read_bytes()) + 1024 * 1024  # the file's parts and its manifest

        def space_back() -> bool:
            free = {a["address"]: a["free"] for a in net.status()["agents"]}
            return all(free[k] >= free_before[k] - stored for k in free_before)

        assert await until(space_back, timeout=10)
    finally:
        if trickling.running:
            trickling.stop()
        await peers.close()


def answered(streams: list[tuple[object, list[bytes]]], prefix: bytes) -> int:
    return sum(1 for _, replies in streams if b"".join(replies).startswith(prefix))


async def until(condition, timeout: float) -> bool:
    """Let the reactor run until `condition()` holds (checked every 0.1 s) or `timeout` passes."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.1)
    return True


def test_a_claims_flood_costs_its_sender_not_the_server(make_network, tmp_path: Path) -> None:
    """Two throw-away identities on one /24 claim 60 000 parts each that they do not hold while an
    honest put and get go through: the network gets no more than its bound indexed, and once
    they leave, their claims leave the index. The attacker's cost: one connection and
    about 70 bytes sent per claim, for about 0.25 KB of server memory while it stays."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.claims import ClaimsFlooder

    net = make_network("claims")
    net.start_server("--claims-per-network=80000")
    for _ in range(3):
        net.start_agent()
    net.wait_live(3)
    net.client("keygen")
    original = tmp_path / "honest.bin"
    original.write_bytes(os.urandom(3_000_000))
    out = tmp_path / "back.bin"

    flooders = [ClaimsFlooder(net.control_port, f"127.0.200.{n}") for n in (30, 31)]
    try:
        with ThreadPoolExecutor(2) as pool:
            # Two identities on one /24, together claiming more than the network's bound.
            floods = [pool.submit(f.claim, 60_000) for f in flooders]
            address = net.client("put", str(original)).stdout.split()[0].decode()
            net.client("get", address, "-o", str(out))
            replies = [r for flood in floods for r in flood.result(timeout=300)]
        assert out.read_bytes() == original.read_bytes()
        assert any(r.startswith(b"ERROR too-many") for r in replies)
        assert {r for r in replies if not r.startswith(b"ERROR too-many")} == {b"OK"}
        assert net.status()["totals"]["parts-indexed"] <= 80_000 + 10
    finally:
        for f in flooders:
            f.close()

    def drained() -> tuple[int] | None:
        indexed = net.status()["totals"]["parts-indexed"]
        return (indexed,) if indexed <= 10 else None

    (indexed,) = wait_until("the flooders' claims leave the index", drained, timeout=60, interval=0.25)
    assert indexed >= 2  # the honest file's part and manifest stay
    out.unlink()
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == original.read_bytes()
