"""Erasure-coded files (`put --erasure 2/4`) through the real CLI and twistd processes: each
share on one agent and never copied by the server, a get with two agents gone, check and repair
rebuilding the shares of an agent lost for good."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tools.harness import LocalNetwork, wait_until
from dsss.model import block_hash
from tests.integration.test_cli_commands import EXIT_DEGRADED, User

pytestmark = [pytest.mark.integration]


def copies_on_disk(net: LocalNetwork, block: str) -> list[int]:
    """The agents with `block` in their store (a share is fanned out by its hash part)."""
    return [i for i, a in enumerate(net.agents) if any((a.storage / "blocks").rglob(block))]


def test_erasure_coded_file_survives_two_lost_agents_and_repair_rebuilds_their_shares(make_network, tmp_path: Path):
    # The server's repairer looks every second: it must leave shares alone.
    net = make_network(heartbeat=0.5)
    net.start_server("--repair-after", "1")
    for _ in range(4):
        net.start_agent()
    net.wait_live(4)
    alice = User(net, tmp_path, "alice")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(5 * 64 * 1024 + 3))
    address = alice.put(src, "--part-size", "64K", "--erasure", "2/4")

    info = alice.json("info", address)
    assert info["replicas"]["per"] == "share" and info["replicas"]["parts"] == [4] * 6
    shares = info["part-hashes"]
    assert len(shares) == 6 and all(len(s) == 4 and all(h.startswith("s") for h in s) for s in shares)
    text = alice.cli("info", address).stdout
    assert "shares per part 4 of 4, any 2 of which give a part back" in text

    # The repairer looks at every part once per sweep over the index, a tick a second: a share it
    # took for short in one sweep would be due for a copy (--repair-after 1) one tick later.
    swept = net.status()["repair"]["sweeps"]

    def repairer_after_three_sweeps() -> dict | None:
        repair = net.status()["repair"]
        return repair if repair["sweeps"] >= swept + 3 else None

    repair = wait_until("the repairer has swept the index three more times", repairer_after_three_sweeps)
    assert (repair["short"], repair["started"]) == (0, 0), repair  # no share is short, none copied
    for part in shares:
        holders = [copies_on_disk(net, h) for h in part]
        assert all(len(h) == 1 for h in holders), holders  # one copy of each share, still
        assert len({h[0] for h in holders}) == 4  # each on an agent of its own
    assert len(copies_on_disk(net, address)) == 3  # the manifest is replicated
    # Twice the ciphertext on disk, not three times.
    on_disk = sum(f.stat().st_size for a in net.agents for f in (a.storage / "blocks").rglob("s*")
                  if f.is_file() and not f.name.endswith(".tree"))
    assert on_disk < 2.1 * src.stat().st_size

    # Two agents gone, one of them holding a copy of the manifest: the file still comes back.
    manifest_holders = copies_on_disk(net, address)
    gone = [manifest_holders[0], next(i for i in range(4) if i not in manifest_holders)]
    for i in gone:
        net.agents[i].kill()
    net.wait_live(2)
    out = tmp_path / "out.bin"
    alice.cli("get", address, "-o", str(out))
    assert block_hash(out.read_bytes()) == block_hash(src.read_bytes())

    # check: every share of the lost agents is missing; repair rebuilds them on new agents.
    lost_shares = sorted(h for part in shares for h in part
                         if not any(i not in gone for i in copies_on_disk(net, h)))
    assert len(lost_shares) == 12
    net.start_agent()
    net.start_agent()
    net.wait_live(4)
    r = alice.cli("check", address, check=False)
    assert r.returncode == EXIT_DEGRADED, r.stderr
    assert r.stdout.count("0/1") == 12 and r.stdout.count("1/1") == 12
    assert "have fewer than 3 proven replicas (a share: fewer than 1)" in r.stderr
    doc = alice.json("repair", address)
    rebuilt = [b for b in doc["files"][0]["repaired"] if b["block"] == "share"]
    assert doc["ok"] is True and sorted(b["hash"] for b in rebuilt) == lost_shares
    assert all((b["before"], b["after"], len(b["added"])) == (0, 1, 1) for b in rebuilt)
    # (The manifest's lost copy is the server's to restore, or this repair's if it came first.)
    check = alice.json("check", "--verify", address)
    assert check["ok"] is True
    assert [b["replicas"] for b in check["files"][0]["blocks"]] == [3] + [1] * 24
    for part in shares:  # rebuilt under the very IDs the manifest names, one per agent
        holders = [copies_on_disk(net, h) for h in part]
        live = [[i for i in h if i not in gone] for h in holders]
        assert all(len(h) == 1 for h in live) and len({h[0] for h in live}) == 4
    out.unlink()
    alice.cli("get", address, "-o", str(out))
    assert block_hash(out.read_bytes()) == block_hash(src.read_bytes())


def test_erasure_coded_put_needs_an_agent_per_share(shared_network, tmp_path: Path):
    alice = User(shared_network, tmp_path, "alice")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(3 * 64 * 1024))
    r = alice.cli("put", "--part-size", "64K", "--erasure", "2/6", str(src), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "of a part's 6 shares, each needs an agent of its own" in r.stderr
    r = alice.cli("put", "--erasure", "4/2", str(src), check=False)
    assert r.returncode == 2 and "2 <= K < N" in r.stderr
    # Small files travel inside their manifest, coded or not; the config file may ask for coding.
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello")
    config = tmp_path / "c.toml"
    config.write_text('erasure = "3/4"\n')
    address = alice.cli("--config", str(config), "put", str(small)).stdout.split()[0]
    out = tmp_path / "small.out"
    alice.cli("get", address, "-o", str(out))
    assert out.read_bytes() == b"hello"
    big = alice.cli("--config", str(config), "put", "--part-size", "64K", str(src)).stdout.split()[0]
    assert alice.json("info", big)["replicas"]["needed"] == 3
    assert "erasure   = 3/4" in alice.cli("--config", str(config), "config").stdout


def test_a_gateway_started_with_erasure_codes_what_it_stores(shared_network, tmp_path: Path):
    from tests.integration.test_gateway import Gateway

    gw = Gateway(shared_network, tmp_path, "--part-size", "256K", "--erasure", "2/4")
    try:
        status, _, body = gw.request("GET", "/info")
        assert status == 200 and json.loads(body)["erasure"] == "2/4"
        data = os.urandom(600 * 1024)
        status, _, body = gw.request("PUT", "/files?name=g.bin", data)
        assert status == 201, body
        address = json.loads(body)["address"]
        status, _, back = gw.request("GET", f"/files/{address}")
        assert status == 200 and back == data
    finally:
        gw.stop()
    # The CLI reads it as any erasure-coded file.
    info = json.loads(shared_network.client("--json", "info", address).stdout)
    assert info["replicas"]["needed"] == 2 and info["replicas"]["parts"] == [4, 4, 4]
