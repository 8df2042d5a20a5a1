"""Who may join and who may use a network: --agents and --clients against real processes."""

from __future__ import annotations

import time

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
    rogue.wait_for("registration refused|Stopping factory|this agent is not allowed", timeout=20)
    time.sleep(1.0)
    live = {a["id"] for a in net.status()["agents"]}
    assert live == {ids[0], ids[1]}
    assert "this agent is not allowed" in rogue.log()
