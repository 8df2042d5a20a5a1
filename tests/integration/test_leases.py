"""Leases, rm, renew and garbage collection with real processes: space comes back after rm, an
interrupted put's parts go after their initial lease, renew keeps a file past its first expiry,
a shared file survives its sharer's rm, forged and replayed deletes change nothing, and repair
carries the owners' leases to the new holder.

Time is driven, not slept: agents started with tests/support/clocked_agent.py judge leases by
their clock plus an offset the test writes to a file (a test-only launcher of the real agent)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tools.harness import AgentProc, LocalNetwork, child_env, wait_until

from dsss.crypto.keys import load_key_file
from dsss.leases import lease_signing_key
from dsss.model import is_block_id

pytestmark = [pytest.mark.integration]

HOUR = 3600
DAY = 86400
FAST_GC = ("--gc-grace=1s", "--gc-rate=1000")


def clocked(offset_file: Path) -> list[str]:
    """The command that runs twistd as an agent whose lease clock the test moves."""
    return [sys.executable, "-m", "tests.support.clocked_agent", str(offset_file)]


def blobs(agent: AgentProc) -> dict[str, int]:
    """The blobs in an agent's store and their sizes, read from its directory."""
    root = agent.storage / "blocks"
    if not root.exists():
        return {}
    return {f.name: f.stat().st_size for f in root.rglob("*") if f.is_file() and is_block_id(f.name)}


def all_blobs(net: LocalNetwork) -> set[str]:
    return {b for a in net.agents for b in blobs(a)}


def put(net: LocalNetwork, tmp_path: Path, name: str, size: int, *extra: str, key: Path | None = None) -> str:
    src = tmp_path / name
    src.write_bytes(os.urandom(size))
    r = net.client("put", "--part-size", "64K", *extra, str(src), key=key)
    return r.stdout.decode().split()[0]


def file_blocks(net: LocalNetwork, address: str, key: Path | None = None) -> set[str]:
    """The file's manifest and parts."""
    doc = json.loads(net.client("info", "--json", address, key=key).stdout)
    return {address, *doc["part-hashes"]}


def owner_of(key: Path) -> str:
    """The lease public key (hex) of a key file."""
    return bytes(lease_signing_key(load_key_file(key)).verify_key).hex()


def records(agent: AgentProc, block: str) -> dict[str, tuple[int, int, str]]:
    """An agent's lease records on `block`: owner -> (expiry, serial, record token)."""
    db = sqlite3.connect(str(agent.storage / "leases.sqlite"))
    try:
        rows = db.execute("SELECT owner, version, expiry, serial, signature FROM leases WHERE block = ?",
                          (block,)).fetchall()
    finally:
        db.close()
    return {o: (e, s, f"{v}:{o}:{block}:{e}:{s}:{sig}") for o, v, e, s, sig in rows}


def network(make_network: Any, agents: int = 3, *extra: str, offset: Path | None = None,
            server: tuple[str, ...] = ()) -> LocalNetwork:
    net: LocalNetwork = make_network(heartbeat=0.5)
    net.start_server(*server)
    for _ in range(agents):
        if offset is None:
            net.start_agent(None, *extra)
        else:
            net.start_agent(None, *extra, program=clocked(offset))
    net.wait_live(agents)
    net.client("keygen")
    return net


def test_rm_frees_the_space_on_every_agent(make_network, tmp_path):
    net = network(make_network, 3, *FAST_GC)
    address = put(net, tmp_path, "f.bin", 5 * 65536 + 7)
    blocks = file_blocks(net, address)
    assert len(blocks) == 7
    assert all(set(blobs(a)) == blocks for a in net.agents)
    # Every holder keeps the owner's lease for the default 90 days.
    owner = owner_of(net.key)
    for a in net.agents:
        expiry = records(a, address)[owner][0]
        assert abs(expiry - (time.time() + 90 * DAY)) < 600

    # info lists each holder's leases on the manifest: this key's, for 90 days.
    held = json.loads(net.client("info", "--json", address).stdout)["leases"]
    assert set(held) == {a.address for a in net.agents}
    for leases in held.values():
        assert [(lease["owner"], lease["yours"]) for lease in leases] == [(owner, True)]
        assert abs(leases[0]["expires"] - (time.time() + 90 * DAY)) < 600

    stored = sum(sum(blobs(a).values()) for a in net.agents)
    r = net.client("rm", address)
    assert r.stdout.decode().startswith(f"removed {address} f.bin")
    wait_until("every agent's store is empty again", lambda: not all_blobs(net), timeout=30)
    # The server dropped them from its index (the agents reported them gone).
    wait_until("the server forgets the holders",
               lambda: all(not net.http(f"/api/who-has?q={b}")[1]["addresses"] for b in blocks), timeout=30)
    # The status page counts what the agents collected: every copy of the file's blocks.
    wait_until("the server shows the bytes collected",
               lambda: net.status()["totals"]["collected"] >= stored, timeout=30, interval=0.5,
               detail=lambda: net.status()["totals"])
    assert address not in net.client("ls").stdout.decode()
    # Removed is removed: a second rm finds nothing.
    again = net.client("rm", address, check=False)
    assert again.returncode == 3, again.stderr


def test_an_interrupted_put_is_collected_after_its_initial_lease(make_network, tmp_path):
    offset = tmp_path / "offset"
    net = network(make_network, 3, *FAST_GC, offset=offset)
    kept = put(net, tmp_path, "kept.bin", 3 * 65536)
    kept_blocks = file_blocks(net, kept)

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(200 * 65536))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsss.client", "--server", net.url, "--key", str(net.key),
         "--parallel", "1", "put", "--part-size", "64K", str(big)],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until("the put has stored a few parts", lambda: len(all_blobs(net) - kept_blocks) >= 3, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    orphans = all_blobs(net) - kept_blocks
    assert orphans
    owner = owner_of(net.key)
    # Each orphan carries the put's initial lease: an hour.
    for a in net.agents:
        for b in set(blobs(a)) & orphans:
            assert abs(records(a, b)[owner][0] - (time.time() + HOUR)) < 600

    # Two hours on (the initial hour and the hour of skew bound) and a bit: the orphans go.
    offset.write_text(str(2 * HOUR + 600))
    wait_until("the interrupted put's parts are collected", lambda: not (all_blobs(net) & orphans), timeout=30)
    assert kept_blocks <= all_blobs(net)
    out = tmp_path / "kept.out"
    net.client("get", kept, "-o", str(out))
    assert out.read_bytes() == (tmp_path / "kept.bin").read_bytes()


def test_renew_keeps_a_file_past_its_first_expiry(make_network, tmp_path):
    offset = tmp_path / "offset"
    net = network(make_network, 3, *FAST_GC, offset=offset)
    renewed = put(net, tmp_path, "renewed.bin", 2 * 65536 + 1, "--keep", "1d")
    lapsed = put(net, tmp_path, "lapsed.bin", 2 * 65536 + 2, "--keep", "1d")
    renewed_blocks, lapsed_blocks = file_blocks(net, renewed), file_blocks(net, lapsed)

    r = net.client("renew", "--keep", "30d", renewed)
    assert r.stdout.decode().startswith(f"renewed {renewed} renewed.bin until ")
    listed = {f["address"]: f for f in json.loads(net.client("ls", "--json").stdout)["files"]}
    assert abs(listed[renewed]["expires"] - (time.time() + 30 * DAY)) < 600
    assert abs(listed[lapsed]["expires"] - (time.time() + DAY)) < 600

    # Three days on: the file kept for a day is gone, the renewed one is whole.
    offset.write_text(str(3 * DAY))
    wait_until("the lapsed file is collected", lambda: not (all_blobs(net) & lapsed_blocks), timeout=30)
    assert all(renewed_blocks <= set(blobs(a)) for a in net.agents)
    out = tmp_path / "renewed.out"
    net.client("get", renewed, "-o", str(out))
    assert out.read_bytes() == (tmp_path / "renewed.bin").read_bytes()
    gone = net.client("renew", lapsed, check=False)
    assert gone.returncode == 3, gone.stderr


def test_a_shared_file_survives_its_sharers_rm(make_network, tmp_path):
    net = network(make_network, 3, *FAST_GC)
    bob = tmp_path / "bob.key"
    bob_pub = net.client("keygen", key=bob).stdout.decode().split()[-1]
    address = put(net, tmp_path, "shared.bin", 3 * 65536 + 5)
    blocks = file_blocks(net, address)
    shared = net.client("share", address, "--to", bob_pub).stdout.decode().split()[0]
    r = net.client("renew", shared, key=bob)
    assert r.stdout.decode().startswith(f"renewed {shared}")
    # Each holder of the shared manifest holds Bob's lease and Alice's (from share).
    held = json.loads(net.client("info", "--json", shared, key=bob).stdout)["leases"]
    assert len(held) == 3
    assert all(sorted(lease["yours"] for lease in leases) == [False, True] for leases in held.values())
    assert "1 other key(s)" in net.client("info", shared, key=bob).stdout.decode()

    r = net.client("rm", address)
    assert r.returncode == 0
    assert "blocks stay: another key holds leases on them" in r.stderr.decode()
    # Alice's manifest goes (no one else leases it); the parts stay for Bob.
    wait_until("the sharer's manifest is collected", lambda: address not in all_blobs(net), timeout=30)
    assert (blocks - {address}) <= all_blobs(net)
    out = tmp_path / "bob.out"
    net.client("get", shared, "-o", str(out), key=bob)
    assert out.read_bytes() == (tmp_path / "shared.bin").read_bytes()

    # Bob removes his too: the parts go (the shared manifest stays under Alice's lease from share).
    net.client("rm", shared, key=bob)
    wait_until("the parts are collected", lambda: not (all_blobs(net) & (blocks - {address})), timeout=30)


def attack(net: LocalNetwork, key: Path, agent: AgentProc, block: str, mode: str, *extra: str) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "tests.support.lease_attacker", net.url, str(key), agent.address, block, mode,
         *extra],
        env=child_env(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def test_forged_and_replayed_deletes_change_nothing(make_network, tmp_path):
    # No collection here: what each attack did is read from the agents' lease records.
    net = network(make_network, 3, "--gc-rate=0")
    mallory = tmp_path / "mallory.key"
    net.client("keygen", key=mallory)
    alice = owner_of(net.key)
    address = put(net, tmp_path, "f.bin", 2 * 65536, "--keep", "1d")
    agent = net.agents[0]
    first = records(agent, address)[alice]
    net.client("renew", "--keep", "30d", address)
    renewed = records(agent, address)[alice]
    assert renewed[0] > first[0] and renewed[1] > first[1]

    # Mallory releases her own (absent) lease: Alice's stays, and the agent says one other owner holds one.
    assert attack(net, mallory, agent, address, "own-release") == {"outcomes": ["ok 1"]}
    # A release in Alice's name, signed by Mallory: refused.
    assert attack(net, mallory, agent, address, f"forged-release={alice}") == {"outcomes": ["bad-signature 0"]}
    # Alice's older lease replayed: stale, changes nothing.
    assert attack(net, mallory, agent, address, "replay", first[2]) == {"outcomes": ["stale 0"]}
    assert records(agent, address)[alice] == renewed

    net.client("rm", address)
    released = records(agent, address)[alice]
    assert released[0] == 0
    # The renewed lease replayed after the rm: stale, the release stands.
    assert attack(net, mallory, agent, address, "replay", renewed[2]) == {"outcomes": ["stale 0"]}
    assert records(agent, address)[alice] == released


def test_repair_carries_the_leases_to_the_new_holder(make_network, tmp_path):
    net = network(make_network, 4, server=("--repair-after=2",))
    address = put(net, tmp_path, "f.bin", 3 * 65536 + 3)
    blocks = file_blocks(net, address)
    owner = owner_of(net.key)
    victim = next(a for a in net.agents if address in blobs(a))
    expiry = records(victim, address)[owner][0]
    victim.kill()
    newcomer = next(a for a in net.agents if a is not victim and address not in blobs(a))

    wait_until("the lost copies are made again", lambda: blocks <= set(blobs(newcomer)), timeout=60)
    for b in blocks:
        wait_until(f"the new holder has the owner's lease on {b[:16]}", lambda b=b: owner in records(newcomer, b),
                   timeout=30)
        assert records(newcomer, b)[owner][0] == expiry


def test_a_quota_is_enforced_and_given_back_by_rm(make_network, tmp_path):
    net: LocalNetwork = make_network(heartbeat=0.5)
    probe = make_network("probe")  # only to run the CLI's keygen before the server exists
    alice = net.base / "alice.key"
    net.base.mkdir(parents=True, exist_ok=True)
    alice_pub = probe.client("keygen", key=alice).stdout.decode().strip()
    clients = net.base / "clients.txt"
    clients.write_text(f"{alice_pub} 1M  # alice, 1 MiB\n")
    net.start_server(f"--clients={clients}")
    for _ in range(3):
        net.start_agent(None, *FAST_GC)
    net.wait_live(3)

    # 3 parts of 64K and a manifest, on 3 agents each: about 600 KiB of the 1 MiB.
    first = put(net, tmp_path, "first.bin", 3 * 65536, key=alice)

    def leased() -> int:
        return int(json.loads(net.client("usage", "--json", key=alice).stdout)["leased"])

    wait_until("the agents report the leases", lambda: leased() >= 9 * 65536, timeout=30)
    usage = json.loads(net.client("usage", "--json", key=alice).stdout)
    assert usage["quota"] == 1024 * 1024 and usage["files"] == 1

    src = tmp_path / "second.bin"
    src.write_bytes(os.urandom(3 * 65536))
    refused = net.client("put", "--part-size", "64K", str(src), key=alice, check=False)
    assert refused.returncode == 10, refused.stderr
    assert "quota exceeded" in refused.stderr.decode()

    net.client("rm", first, key=alice)
    wait_until("the released bytes are given back", lambda: leased() == 0, timeout=60)
    net.client("put", "--part-size", "64K", str(src), key=alice)


def test_a_tree_is_leased_renewed_and_removed_as_a_whole(make_network, tmp_path):
    net = network(make_network, 3, *FAST_GC)
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_bytes(os.urandom(100))
    (root / "a" / "big.bin").write_bytes(os.urandom(2 * 65536 + 3))  # three parts and a manifest
    (root / "a" / "b" / "deep.txt").write_bytes(os.urandom(5000))
    r = net.client("put", "-r", "--part-size", "64K", "--keep", "2d", str(root))
    address = r.stdout.decode().split()[0]
    stored = all_blobs(net)
    # Four directories, three files' manifests and big.bin's three parts, each on every agent.
    assert address in stored and len(stored) >= 4 + 3 + 3
    owner = owner_of(net.key)

    def expiries() -> dict[str, int]:
        """Every blob on every agent, and the expiry of this key's lease on it there."""
        return {f"{b}@{i}": records(a, b)[owner][0] for i, a in enumerate(net.agents) for b in blobs(a)}

    # Directories are kept as long as the files: every blob for the put's --keep.
    assert all(abs(e - (time.time() + 2 * DAY)) < 600 for e in expiries().values())

    r = net.client("renew", "--keep", "30d", address)
    assert r.stdout.decode().startswith(f"renewed {address} tree/ until ")
    assert all(abs(e - (time.time() + 30 * DAY)) < 600 for e in expiries().values())
    listed = {e["address"]: e for e in json.loads(net.client("ls", "--json").stdout)["files"]}
    assert abs(listed[address]["expires"] - (time.time() + 30 * DAY)) < 600

    r = net.client("rm", address)
    assert r.stdout.decode().startswith(f"removed {address} tree/ (3 files)")
    wait_until("every agent's store is empty again", lambda: not all_blobs(net), timeout=30)
    assert net.client("rm", address, check=False).returncode == 3


def test_an_open_server_bounds_what_one_address_places(make_network, tmp_path):
    # 3 parts of 64K and a manifest on 3 agents: about 600 KiB of the 1 MiB a day allowed.
    net = network(make_network, 3, server=("--open-quota=1M",))
    first = put(net, tmp_path, "first.bin", 3 * 65536)
    src = tmp_path / "second.bin"
    src.write_bytes(os.urandom(3 * 65536))
    refused = net.client("put", "--part-size", "64K", str(src), check=False)
    assert refused.returncode == 10, refused.stderr
    message = refused.stderr.decode()
    assert "this open server takes at most 1.0 MiB a day of uploads from one address" in message
    assert "Enough comes back in " in message
    # What was stored before stays readable; downloads are not bounded.
    out = tmp_path / "first.out"
    net.client("get", first, "-o", str(out))
    assert out.read_bytes() == (tmp_path / "first.bin").read_bytes()
