"""The discovery server and storage agents as real twistd processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

import pytest

from tests.conftest import STORE_KINDS, start_network
from tools.harness import wait_until

pytestmark = [pytest.mark.integration]

HASH = "ab" * 32


@pytest.fixture
def net(make_network):
    return start_network(make_network(heartbeat=0.5), agents=3)


def test_agents_register_and_placement_returns_distinct_agents(net):
    status = net.status()
    assert status["totals"]["live"] == 3
    ids = {a["id"] for a in status["agents"]}
    assert ids == {a.agent_id for a in net.agents}
    code, doc = net.http("/api/where-to-upload?size=1000")
    assert code == 200
    assert len(doc["addresses"]) == 3 == len(set(doc["addresses"]))
    assert set(doc["addresses"]) == {a.address for a in net.agents}
    # Addresses are the UDP addresses the server observed: each agent's own, on a loopback
    # /24 of its own (the harness binds it there), so the three are on distinct networks.
    hosts = {a.rsplit(":", 1)[0] for a in doc["addresses"]}
    assert hosts == {net.agent_host(a.name) for a in net.agents}
    assert len({h.rsplit(".", 1)[0] for h in hosts}) == 3 and all(h.startswith("127.") for h in hosts)
    # ... and so do their control connections.
    for a in net.agents:
        assert f"agent {a.agent_id[:16]} registered from {net.agent_host(a.name)}:" in net.server.log()


def test_bad_requests_get_clear_json_errors(net):
    cases = {
        "/api/who-has": 400,
        "/api/who-has?q=xyz": 400,
        f"/api/who-has?q={HASH.upper()}": 400,
        "/api/where-to-upload": 400,
        "/api/where-to-upload?size=-1": 400,
        "/api/where-to-upload?size=abc": 400,
        f"/api/introduce-me?to=127.0.0.1:9&hash={HASH}&size=1": 400,  # no from
        f"/api/introduce-me?to=nonsense&hash={HASH}&size=1&from=127.0.0.1:5": 400,
        f"/api/introduce-me?to=127.0.0.1:9&hash={HASH}&size=1&from=127.0.0.1:5": 404,
        f"/api/where-to-upload?size={2**39}": 400,  # larger than any part
        "/api/nope": 404,
    }
    for path, expected in cases.items():
        code, doc = net.http(path)
        assert code == expected, (path, code, doc)
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], path
    code, doc = net.http(f"/api/who-has?q={HASH}")
    assert code == 200 and doc["addresses"] == []


def test_introduce_me_returns_a_key_from_the_agent(net):
    agent = net.agents[0]
    code, doc = net.http(
        f"/api/introduce-me?to={agent.address}&hash={HASH}&size=10&from=127.0.0.1:4444"
    )
    assert code == 200, doc
    assert len(doc["introduction-key"]) == 32
    assert doc["agent"] == agent.agent_id
    assert doc["address"] == agent.address


def test_killed_agent_leaves_answers_within_three_heartbeats(net):
    victim = net.agents[1]
    victim.kill()
    wait_until("the killed agent is no longer listed", lambda: victim.address not in net.live_addresses(),
               timeout=3 * net.heartbeat + 1.5, interval=0.05)
    for _ in range(20):
        code, doc = net.http("/api/where-to-upload?size=10")
        assert code == 200 and victim.address not in doc["addresses"]
        assert len(doc["addresses"]) == 2


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_restarted_server_gets_its_agents_back(make_network, store_url, tmp_path, kind):
    """After a restart, the agents come back; on a durable store they confirm their parts by
    digest and send none of them again, and warming ends once they have."""
    net = start_network(make_network(heartbeat=0.5, store=store_url(kind)), agents=3)
    net.client("keygen")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(4 * 65536 + 5))
    address = net.client("put", "--part-size", "64K", str(src)).stdout.decode().split()[0]
    claims = sum(1 for a in net.agents for f in (a.storage / "blocks").rglob("*")
                 if f.is_file() and not f.name.endswith(".tree"))
    assert claims == 3 * 6  # 5 parts and the manifest, 3 copies each
    before = {a.agent_id for a in net.agents}
    net.server.kill()
    net.start_server(reuse_ports=True)
    wait_until("every agent is back with the new server and warming is over",
               lambda: {a["id"] for a in net.status()["agents"] if a["live"]} == before
               and not net.http("/api/info")[1]["warming"], timeout=20, interval=0.5,
               detail=net.status)
    status = net.status()
    activity = status["activity"]
    if kind == "memory":
        assert activity["have-entries"] == claims and activity["claims-restored"] == 0
    else:
        assert activity["have-entries"] == 0, activity  # no part sent again
        assert activity["claims-restored"] == claims
        assert status["totals"]["parts-indexed"] == 6
    assert len(net.http(f"/api/who-has?q={address}")[1]["addresses"]) == 3
    code, doc = net.http("/api/where-to-upload?size=10")
    assert code == 200 and len(doc["addresses"]) == 3
    out = tmp_path / "out"
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == src.read_bytes()


def _raw_control(net):
    s = socket.create_connection(("127.0.0.1", net.control_port), timeout=5)
    greeting = s.recv(100)
    assert greeting.startswith(b"Hi ") and greeting.endswith(b"\n")
    return s


def _read_until_closed(s) -> bytes:
    data = b""
    s.settimeout(5)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_garbage_and_huge_lines_are_cut_off_others_keep_working(net):
    s = _raw_control(net)
    s.sendall(b"\xff\xfe garbage \x00\n")
    reply = _read_until_closed(s)
    assert reply.startswith(b"ERROR ")
    s.close()

    s = _raw_control(net)
    try:
        s.sendall(b"A" * (1024 * 1024) + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = _read_until_closed(s)
    assert reply.startswith(b"ERROR too-long")
    s.close()

    s = _raw_control(net)
    s.sendall(b"WHO_HAS " + HASH.encode() + b"\n")  # not registered yet
    assert _read_until_closed(s).startswith(b"ERROR not-registered")
    s.close()

    # A forged registration (bad signature) is refused.
    s = _raw_control(net)
    forged = f"REGISTER {net.agents[0].agent_id} {2**40} 100 100 0.1.0 {'00' * 64}\n"
    s.sendall(forged.encode())
    assert _read_until_closed(s).startswith(b"ERROR denied")
    s.close()

    assert net.server.alive()
    assert net.wait_live(3)
    code, doc = net.http("/api/where-to-upload?size=10")
    assert code == 200 and len(doc["addresses"]) == 3


def test_request_bodies_are_refused_before_being_read(net):
    s = socket.create_connection(("127.0.0.1", net.http_port), timeout=5)
    s.sendall(b"POST /api/info HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    sent = 0
    try:
        for _ in range(64):  # 4 MiB at most, then we stop: the server must have hung up
            s.sendall(b"x" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = _read_until_closed(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    code, doc = net.http("/api/info")
    assert code == 200


def test_postgresql_outage_answers_503_then_recovers(make_network, postgres, tmp_path):
    """PostgreSQL stops under a running server: a lookup it cannot settle answers 503 with
    Retry-After (never an empty "nobody has it"); once the database is back the server
    recovers by itself, and what happened meanwhile was not lost."""
    from tools.postgres import PostgresServer

    pg = PostgresServer(tmp_path / "pg", postgres.bindir)
    pg.start()
    try:
        net = start_network(make_network(heartbeat=0.5, store=pg.createdb("outage")), agents=3)
        net.client("keygen")
        src = tmp_path / "f.bin"
        src.write_bytes(os.urandom(70_000))
        pg.stop()
        missing = "cd" * 32

        def refused() -> bool:
            try:
                with urllib.request.urlopen(f"{net.url}/api/who-has?q={missing}", timeout=10) as r:
                    assert r.status == 200 and json.loads(r.read())["addresses"] == []
                    return False
            except urllib.error.HTTPError as e:
                assert e.code == 503 and e.headers["Retry-After"], e
                return True

        wait_until("the server notices the database is gone (503)", refused, timeout=10)
        # Agents' claims still arrive meanwhile (kept in memory, written once it is back).
        address = net.client("put", str(src)).stdout.decode().split()[0]
        pg.start()

        def answered() -> bool:
            code, doc = net.http(f"/api/who-has?q={missing}")
            assert code in (200, 503), (code, doc)
            return code == 200 and doc["addresses"] == [] and not doc.get("warming")

        wait_until("the server recovers by itself", answered, timeout=15)
        # Restarted on the database: the parts put during the outage were written after all.
        net.server.kill()
        net.start_server(reuse_ports=True)
        wait_until("the agents are back and warming is over",
                   lambda: not net.http("/api/info")[1]["warming"] and len(net.live_addresses()) == 3,
                   timeout=20, interval=0.5)
        assert net.status()["activity"]["have-entries"] == 0
        assert len(net.http(f"/api/who-has?q={address}")[1]["addresses"]) == 3
    finally:
        pg.stop()
