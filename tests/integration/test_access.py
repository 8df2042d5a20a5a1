"""Who may join and who may use a network: --agents and --clients against real processes."""

from __future__ import annotations

import pytest

from dsss.agent.identity import AgentIdentity

pytestmark = [pytest.mark.integration]


def test_only_listed_agents_may_join(make_network):
    net = make_network(heartbeat=0.5)
    ids = [AgentIdentity.load_or_create(net.base / f"agent{i}").agent_id for i in (1, 2, 3)]
    allowed = net.base / "agents.txt"
    allowed.write_text(f"# operators' list\n{ids[0]}\n{ids[1]}  # second\n")
    net.start_server(f"--agents={allowed}")
    net.start_agent("agent1")
    net.start_agent("agent2")
    rogue = net.start_agent("agent3", wait=False)
    first = rogue.wait_for("this agent is not allowed", timeout=20)
    # It tries again (its reconnection backoff) and is refused again: never let in meanwhile.
    rogue.wait_for("this agent is not allowed", timeout=20, after=first.end())
    live = {a["id"] for a in net.status()["agents"]}
    assert live == {ids[0], ids[1]}
    assert "this agent is not allowed" in rogue.log()


def test_only_listed_clients_may_use_a_restricted_server(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    alice, bob = net.base / "alice.key", net.base / "bob.key"
    net.base.mkdir(parents=True, exist_ok=True)
    probe = make_network("probe")  # only to run the CLI's keygen before the server exists
    probe.base.mkdir(parents=True, exist_ok=True)
    alice_pub = probe.client("keygen", key=alice).stdout.decode().strip()
    probe.client("keygen", key=bob)
    clients = net.base / "clients.txt"
    clients.write_text(f"{alice_pub}  # alice\n")
    net.start_server(f"--clients={clients}")
    for _ in range(3):
        net.start_agent()
    net.wait_live(3)
    f = tmp_path / "f"
    f.write_bytes(b"members only")
    address = net.client("put", str(f), key=alice).stdout.decode().split()[0]
    net.client("get", address, "-o", str(tmp_path / "g"), key=alice)
    assert (tmp_path / "g").read_bytes() == b"members only"
    r = net.client("put", str(f), key=bob, check=False)
    assert r.returncode != 0 and "not allowed" in r.stderr.decode()
    assert len(r.stderr.decode().strip().splitlines()) == 1
    # Unsigned requests are refused outright.
    code, doc = net.http(f"/api/who-has?q={address}")
    assert code == 401 and "signed" in doc["error"]
    code, _ = net.http("/api/info")
    assert code == 200
