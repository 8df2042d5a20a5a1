"""Placement with real processes: agents that lie about their free space, all on one network,
get at most one copy of any part, and every part's copies are on distinct networks."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

from tools.harness import AgentProc, LocalNetwork
from dsss.model import is_block_id

LIE = 2**61
LYING_AGENT = [sys.executable, str(Path(__file__).resolve().parent.parent / "support" / "lying_agent.py"),
               str(LIE)]
MiB = 1024 * 1024


def blobs(agent: AgentProc) -> set[str]:
    """The blobs (parts, manifests) in an agent's store, read from its directory."""
    root = agent.storage / "blocks"
    return {f.name for f in root.rglob("*") if f.is_file() and is_block_id(f.name)} if root.exists() else set()


def network_of(net: LocalNetwork, agent: AgentProc) -> str:
    return net.agent_host(agent.name).rsplit(".", 1)[0]


def test_liars_on_one_network_hold_at_most_one_copy_of_a_part(make_network, tmp_path):
    net: LocalNetwork = make_network(heartbeat=0.5, replicas=3)
    net.start_server()
    honest = [net.start_agent(f"honest{i}") for i in range(4)]  # 127.0.1.1 ... 127.0.4.1
    liars = [net.start_agent(f"liar{i}", f"--capacity={LIE // 2**40}T", host=f"127.0.200.{i + 1}",
                             program=LYING_AGENT) for i in range(3)]
    net.wait_live(7)
    status = {a["id"]: a for a in net.status()["agents"]}
    assert all(status[a.agent_id]["free"] == LIE for a in liars)  # the lie reached the server
    assert all(status[a.agent_id]["free"] < LIE // 1024 for a in honest)
    net.client("keygen")
    files = []
    for i in range(4):
        src = tmp_path / f"file{i}"
        src.write_bytes(os.urandom(10 * MiB + 123))
        files.append(src)
    addresses = net.client("put", "--part-size", "1M", *map(str, files)).stdout.decode().split()
    holders: dict[str, set[str]] = defaultdict(set)
    for agent in honest + liars:
        for blob in blobs(agent):
            holders[blob].add(agent.name)
    assert len(holders) >= 4 * 11  # 4 files of 11 parts each, and their manifests
    by_name = {a.name: a for a in honest + liars}
    liar_names = {a.name for a in liars}
    for blob, names in holders.items():
        # Every copy made, each on a network of its own; the liars' network holds one at most.
        assert len(names) == 3, (blob, names)
        assert len({network_of(net, by_name[n]) for n in names}) == 3, (blob, names)
        assert len(names & liar_names) <= 1, (blob, names)
    out = tmp_path / "back"
    net.client("get", addresses[0], "-o", str(out))
    assert out.read_bytes() == files[0].read_bytes()
