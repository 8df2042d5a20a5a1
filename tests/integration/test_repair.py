"""Automatic re-replication with real processes: an agent goes away for good, the network copies
its parts again by itself, without any client."""

from __future__ import annotations

import os

import pytest

from tests.conftest import STORE_KINDS
from tools.harness import wait_until

pytestmark = [pytest.mark.integration]


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_lost_replicas_come_back_without_a_client(make_network, store_url, tmp_path, kind):
    net = make_network(heartbeat=0.5, store=store_url(kind))
    net.start_server("--repair-after=2")
    for _ in range(4):
        net.start_agent()
    net.wait_live(4)
    net.client("keygen")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(5 * 65536 + 11))
    address = net.client("put", "--part-size", "64K", str(src)).stdout.decode().split()[0]
    blocks = {f.name for a in net.agents for f in (a.storage / "blocks").rglob("*")
              if f.is_file() and not f.name.endswith(".tree")}
    assert len(blocks) == 7 and address in blocks  # 6 parts and the manifest

    victim = next(a for a in net.agents if any((a.storage / "blocks").rglob(address)))
    victim.kill()
    survivors = {a.address for a in net.agents if a is not victim}

    def holders() -> dict[str, list[str]] | None:
        found = {b: net.http(f"/api/who-has?q={b}")[1]["addresses"] for b in blocks}
        return found if all(len(h) == 3 for h in found.values()) else None

    restored = wait_until("every part has three holders again", holders, timeout=45, interval=0.5,
                          detail=lambda: net.status().get("repair"))
    assert all(set(h) <= survivors for h in restored.values())
    # Two more agents gone: every part still has a copy on the last one.
    for agent in [a for a in net.agents if a is not victim][:2]:
        agent.kill()
    out = tmp_path / "out"
    net.client("get", address, "-o", str(out))
    assert out.read_bytes() == src.read_bytes()
