"""Faults provoked for real: processes killed, a disk filled, bytes flipped, floods."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsss.crypto.manifest import MAGIC
from tools.harness import child_env, wait_until
from dsss.model import block_hash
from dsss.storage.blockstore import BlockStore
from tests.conftest import start_network

pytestmark = [pytest.mark.integration]

MiB = 1024 * 1024


def _all_blobs(agent):
    """The parts on an agent's disk (not their outboards)."""
    return [f for f in (agent.storage / "blocks").rglob("*") if f.is_file() and not f.name.endswith(".tree")]


def _start_put(net, path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsss.client", "--server", net.url, "--key", str(net.key),
           "--parallel", "2", "put", *extra, str(path)]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_blobs(net, count: int, timeout: float = 30.0) -> None:
    wait_until(f"the agents store {count} parts (the upload started)",
               lambda: sum(len(_all_blobs(a)) for a in net.agents) >= count, timeout, interval=0.05)


def _store_is_sound(agent) -> None:
    """Every visible part matches its hash; nothing is left in incoming/."""
    store = BlockStore(agent.storage)  # also what a restarted agent does: clean incoming/
    assert store.verify_all() == []
    assert list((agent.storage / "incoming").iterdir()) == []


def test_agent_killed_mid_upload(make_network, tmp_path):
    net = start_network(make_network(heartbeat=0.5), agents=4)
    net.client("keygen")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(24 * MiB))
    proc = _start_put(net, src, "--part-size", "256K")
    _wait_for_blobs(net, 6)
    victim = net.agents[0]
    victim.kill()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    address = out.decode().split()[0]
    # Every part reached three live agents: the get works even without the victim.
    back = tmp_path / "back.bin"
    net.client("get", address, "-o", str(back))
    assert block_hash(back.read_bytes()) == block_hash(src.read_bytes())
    # The killed agent has no partial part visible, and cleans its leftovers when it returns.
    net.start_agent(victim.name)
    assert list((victim.storage / "incoming").iterdir()) == []
    _store_is_sound(victim)


def test_client_killed_mid_put_leaves_no_addressable_file(make_network, tmp_path):
    net = start_network(make_network(heartbeat=0.5), agents=3)
    net.client("keygen")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(24 * MiB))
    proc = _start_put(net, src, "--part-size", "256K")
    _wait_for_blobs(net, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # A put after the kill reaches every agent on the UDP socket the killed client sent to: once
    # it is stored, each agent has read all that the killed client had sent.
    after = tmp_path / "after.txt"
    after.write_bytes(b"stored after the kill")
    barrier = net.client("put", str(after)).stdout.decode().split()[0]
    manifests = [f.name for a in net.agents for f in _all_blobs(a) if f.read_bytes()[: len(MAGIC)] == MAGIC]
    assert manifests == [barrier] * 3  # the manifest is stored last: no half file has an address
    for agent in net.agents:
        _store_is_sound(agent)


def test_server_restarted_during_a_put(make_network, tmp_path):
    net = start_network(make_network(heartbeat=0.5), agents=3)
    net.client("keygen")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(16 * MiB))
    proc = _start_put(net, src, "--part-size", "256K")
    _wait_for_blobs(net, 3)
    logs = [len(a.log()) for a in net.agents]
    net.server.kill()
    for agent, offset in zip(net.agents, logs):
        agent.wait_for("control connection to the server lost", after=offset)
    net.start_server(reuse_ports=True)
    t0 = time.monotonic()
    net.wait_live(3, timeout=15)
    rejoined = time.monotonic() - t0
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    address = out.decode().split()[0]
    back = tmp_path / "back.bin"
    net.client("get", address, "-o", str(back))
    assert back.read_bytes() == src.read_bytes()
    assert rejoined < 15


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_refuses_cleanly_and_placement_moves_on(make_network, tmp_path):
    net = make_network(heartbeat=0.5, replicas=3)
    net.start_server()
    net.start_agent("agent1")
    net.start_agent("agent2")
    small = net.base / "small"
    _mount_tmpfs(small, "4m")
    try:
        # An agent that believes it has 1 GiB, on a disk of 4 MiB.
        full = net.start_agent("small", "--capacity", "1G")
        net.wait_live(3)
        net.client("keygen")
        stored: list[tuple[str, Path]] = []
        failure = None
        for i in range(8):
            f = tmp_path / f"f{i}"
            f.write_bytes(os.urandom(MiB))
            r = net.client("put", str(f), check=False)
            if r.returncode != 0:
                failure = r.stderr.decode()
                break
            stored.append((r.stdout.decode().split()[0], f))
        # With three agents and three replicas, the network is full once the small disk is.
        assert failure is not None and stored, "the small disk never filled up"
        assert "stored a part on 2 of 3 agents" in failure and len(failure.strip().splitlines()) == 1
        _store_is_sound(full)
        assert sum(p.stat().st_size for p in _all_blobs(full)) <= 4 * MiB
        # The server learnt that it is full, and a new agent takes its place.
        status = {a["id"]: a for a in net.status()["agents"]}
        assert status[full.agent_id]["free"] < MiB
        net.start_agent("agent3")
        net.wait_live(4)
        for _ in range(10):
            code, doc = net.http(f"/api/where-to-upload?size={MiB}")
            assert code == 200 and full.address not in doc["addresses"]
        f = tmp_path / "after"
        f.write_bytes(os.urandom(MiB))
        after = net.client("put", str(f)).stdout.decode().split()[0]
        stored.append((after, f))
        for i, (address, original) in enumerate(stored):
            out = tmp_path / f"o{i}"
            net.client("get", address, "-o", str(out))
            assert out.read_bytes() == original.read_bytes()
    finally:
        net.stop()
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_bit_rot_is_found_by_the_scrub_and_reported(make_network, tmp_path):
    net = start_network(make_network(heartbeat=0.5), agents=3)
    net.client("keygen")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(200_000))
    address = net.client("put", "--part-size", "64K", str(src)).stdout.decode().split()[0]
    agent = net.agents[0]
    victim = next(f for f in _all_blobs(agent) if f.name != address)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    # The scrub (8 MiB/s by default) re-reads everything within a second or two, moves the
    # part aside and reports it gone: who-has no longer names this agent for it.
    def holders_without_it() -> list[str] | None:
        addresses = net.http(f"/api/who-has?q={victim.name}")[1]["addresses"]
        return None if agent.address in addresses else addresses

    assert len(wait_until("who-has no longer names the agent", holders_without_it, timeout=20)) == 2
    assert [p.name.split(".")[0] for p in (agent.storage / "quarantine").iterdir()] == [victim.name]
    out = tmp_path / "out"
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == src.read_bytes()


def test_floods_do_not_starve_other_peers(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    net.start_server("--http-rate", "30")
    for _ in range(3):
        net.start_agent()
    net.wait_live(3)
    net.client("keygen")
    # UDP: 20 000 PINGs from one socket, bounded and on loopback only.
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("127.0.0.2", 0))
    for _ in range(20_000):
        flood.sendto(b"\x00PING -", ("127.0.0.1", net.udp_port))
    flood.close()
    # HTTP: a burst from 127.0.0.2 is limited (429) ...
    codes = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", net.http_port), source_address=("127.0.0.2", 0))
        s.sendall(b"GET /api/where-to-upload?size=1 HTTP/1.0\r\n\r\n")
        codes.append(s.recv(64).split(b" ")[1])
        s.close()
    assert b"429" in codes and b"200" in codes
    # ... while a client on 127.0.0.1 keeps working, and so do the agents.
    f = tmp_path / "f"
    f.write_bytes(b"still here")
    address = net.client("put", str(f)).stdout.decode().split()[0]
    net.client("get", address, "-o", str(tmp_path / "g"))
    assert (tmp_path / "g").read_bytes() == b"still here"
    assert len(net.live_addresses()) == 3
    # Control channel: many idle unregistered connections from one address are refused beyond
    # a bound, and a line flood is cut off; registered agents stay.
    idle = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", net.control_port), source_address=("127.0.0.3", 0))
        idle.append(s)
    # Each is greeted ("Hi ...") or, beyond the bound, closed at once without a word. All are
    # read before any is closed: closing one frees room for another not yet accepted.
    closed = 0
    for s in idle:
        s.settimeout(10)
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"" or data.startswith(b"Hi "), data
        if not data:
            closed += 1
    for s in idle:
        s.close()
    assert closed >= 40 - 32
    s = socket.create_connection(("127.0.0.1", net.control_port), source_address=("127.0.0.4", 0))
    s.recv(100)
    try:
        s.sendall(b"PING\n" * 50_000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.settimeout(5)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    assert b"ERROR rate-limited" in got
    s.close()
    assert net.server.alive() and len(net.live_addresses()) == 3
