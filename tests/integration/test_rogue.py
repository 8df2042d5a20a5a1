"""Rogue agents against real processes, in the open configuration (no `--agents` list): agents
that acknowledge and drop, keep half, lie about free space, claim parts they do not hold or with
wrong sizes, and say "yes" to every WHO_HAS. The rogues are the real agent run by a test-only
launcher (tests/support/rogue.py); the server, the honest agents and the client are unchanged.

Each agent runs on a loopback /24 of its own (the harness's default), so the server's
distinct-network placement sees them as separate networks unless a test puts them together."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from tools import harness
from tools.harness import AgentProc, LocalNetwork
from dsss.model import is_block_id

pytestmark = [pytest.mark.integration]

EXIT_DEGRADED = 7
# Audits at a pace a test can watch: new claims are audited within a fraction of a second.
SERVER = ("--repair-after=1", "--audit-rate=50", "--proof-freshness=600")
KiB = 1024


def rogue(modes: str) -> list[str]:
    """The command that runs twistd as a rogue agent with these modes (tests/support/rogue.py)."""
    return [sys.executable, "-m", "tests.support.rogue", modes]


def blobs(agent: AgentProc) -> dict[str, int]:
    """The blobs in an agent's store and their sizes, read from its directory."""
    root = agent.storage / "blocks"
    if not root.exists():
        return {}
    return {f.name: f.stat().st_size for f in root.rglob("*") if f.is_file() and is_block_id(f.name)}


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """The harness's wait_until, polling every 0.3 s (some checks run the CLI)."""
    return harness.wait_until(what, check, timeout, interval=0.3)


def put(net: LocalNetwork, tmp_path: Path, name: str, size: int, *, check: bool = True) -> Any:
    src = tmp_path / name
    src.write_bytes(os.urandom(size))
    return net.client("put", "--part-size", "64K", str(src), check=check)


def file_blocks(net: LocalNetwork, address: str) -> list[str]:
    """The file's manifest and parts."""
    doc = json.loads(net.client("info", "--json", address).stdout)
    return [address, *doc["part-hashes"]]


def check_doc(net: LocalNetwork, *args: str) -> tuple[int, dict[str, Any]]:
    r = net.client("check", "--json", *args, check=False)
    return r.returncode, json.loads(r.stdout)


def proven(net: LocalNetwork, block: str) -> set[str]:
    return set(net.http(f"/api/who-has?q={block}")[1]["proven"])


def audit_record(net: LocalNetwork, agent: AgentProc) -> dict[str, Any] | None:
    entry = [a for a in net.status()["agents"] if a["id"] == agent.agent_id]
    return entry[0].get("audits") if entry else None


def test_a_put_whose_copy_is_dropped_stores_it_again_and_succeeds_only_with_proven_copies(
        make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    net.start_server(*SERVER)
    honest = [net.start_agent(f"honest{i}") for i in range(3)]
    dropper = net.start_agent("dropper", program=rogue("ack-and-drop"))
    net.wait_live(4)
    net.client("keygen")
    address = put(net, tmp_path, "f.bin", 6 * 64 * KiB + 5).stdout.decode().split()[0]
    blocks = file_blocks(net, address)
    for block in blocks:
        on_disk = [a for a in honest if block in blobs(a)]
        assert len(on_disk) == 3, (block, on_disk)
        assert proven(net, block) == {a.address for a in honest}
    # The dropper was given copies (it acknowledged them, then threw them away): each was
    # audited, failed, and was stored again on an honest agent.
    assert blobs(dropper) == {}
    assert any((dropper.storage / "quarantine").iterdir())
    code, doc = check_doc(net, address)
    assert code == 0 and all(b["replicas"] == 3 for b in doc["files"][0]["blocks"])


def test_a_put_fails_clearly_when_fewer_agents_than_replicas_keep_their_copies(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    net.start_server(*SERVER)
    for i in range(2):
        net.start_agent(f"honest{i}")
    for i in range(2):
        net.start_agent(f"dropper{i}", program=rogue("ack-and-drop"))
    net.wait_live(4)
    net.client("keygen")
    r = put(net, tmp_path, "f.bin", 100, check=False)
    assert r.returncode != 0 and r.stdout == b""
    err = r.stderr.decode()
    assert "of 3 agents" in err and "did not prove its copy" in err, err


def test_a_part_whose_claimed_holder_lies_is_repaired(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    net.start_server(*SERVER)
    honest = [net.start_agent(f"honest{i}") for i in range(3)]
    net.wait_live(3)
    net.client("keygen")
    address = put(net, tmp_path, "f.bin", 2 * 64 * KiB).stdout.decode().split()[0]
    part = file_blocks(net, address)[1]
    claims = tmp_path / "claims"
    claims.write_text(f"{part} {blobs(honest[0])[part]}\n")
    # It claims the part (HAVE), says yes to every WHO_HAS, and drops whatever it is sent.
    liar = net.start_agent("liar", program=rogue(f"false-have={claims},false-who-has,ack-and-drop"))
    spare = net.start_agent("spare")
    net.wait_live(5)
    honest[0].kill()
    net.wait_live(4)
    keepers = {honest[1].address, honest[2].address, spare.address}
    wait_until("the part is proven on three honest agents again",
               lambda: proven(net, part) == keepers)
    assert part in blobs(spare)
    assert liar.address not in set(net.http(f"/api/who-has?q={part}")[1]["addresses"])
    record = audit_record(net, liar)
    assert record is None or record["failed"] >= 1  # dropped (disqualified) or struck
    wait_until("check sees every block at full strength", lambda: check_doc(net, address)[0] == 0)


def test_a_disqualified_agent_stays_out_when_it_comes_back_under_the_same_identity(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    net.start_server(*SERVER)
    for i in range(3):
        net.start_agent(f"honest{i}")
    net.wait_live(3)
    fake = [os.urandom(32).hex() for _ in range(4)]
    claims = tmp_path / "claims"
    claims.write_text("".join(f"{h} 1000\n" for h in fake))
    liar = net.start_agent("liar", program=rogue(f"false-have={claims}"))
    wait_until("the liar is disqualified", lambda: net.status()["audit"]["disqualified"] == 1)
    assert liar.agent_id not in {a["id"] for a in net.status()["agents"]}
    assert all(net.http(f"/api/who-has?q={h}")[1]["addresses"] == [] for h in fake)
    # Back under the same identity (same store), now running the honest agent: still refused.
    liar.stop()
    offset = len(liar.log())
    back = net.start_agent("liar", wait=False)
    back.wait_for("registration refused.*disqualified", after=offset)
    assert liar.agent_id not in {a["id"] for a in net.status()["agents"]}
    assert len(net.live_addresses()) == 3


def test_an_agent_that_keeps_half_is_disqualified_and_its_parts_repaired(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    net.start_server(*SERVER)
    honest = [net.start_agent(f"honest{i}") for i in range(4)]
    half = net.start_agent("half", program=rogue("keeps-half"))
    net.wait_live(5)
    net.client("keygen")
    addresses = []
    for i in range(3):
        out = put(net, tmp_path, f"f{i}.bin", 8 * 64 * KiB + i).stdout.decode()
        addresses.append(out.split()[0])  # every put succeeds: dropped copies went elsewhere
    wait_until("the half-keeper is disqualified", lambda: net.status()["audit"]["disqualified"] == 1)
    assert half.agent_id not in {a["id"] for a in net.status()["agents"]}
    blocks = [b for a in addresses for b in file_blocks(net, a)]
    honest_addresses = {a.address for a in honest}

    def repaired() -> bool:
        return all(len(proven(net, b) & honest_addresses) >= 3 for b in blocks)

    wait_until("every block is proven on three honest agents", repaired, timeout=90)
    for block in blocks:
        assert len([a for a in honest if block in blobs(a)]) >= 3, block
    code, doc = check_doc(net, *addresses)
    assert code == 0 and doc["ok"] is True


def test_a_false_have_with_a_wrong_size_changes_nothing(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    net.start_server(*SERVER)
    honest = [net.start_agent(f"honest{i}") for i in range(3)]
    net.wait_live(3)
    net.client("keygen")
    address = put(net, tmp_path, "f.bin", 2 * 64 * KiB - 100).stdout.decode().split()[0]
    parts = file_blocks(net, address)[1:]
    assert len(parts) == 2  # two strikes: not enough to be disqualified
    sizes = blobs(honest[0])
    claims = tmp_path / "claims"
    claims.write_text("".join(f"{p} {sizes[p] + 7}\n" for p in parts))  # two claims, wrong sizes
    liar = net.start_agent("liar", program=rogue(f"false-have={claims}"))
    spare = net.start_agent("spare")
    net.wait_live(5)
    wait_until("the liar's claims are struck", lambda: (audit_record(net, liar) or {}).get("failed") == 2)
    assert all(net.http(f"/api/who-has?q={p}")[1]["addresses"] != [liar.address] for p in parts)
    # An honest holder goes: the repair copies (which a wrong size would have made fail) work.
    # The target may be the liar too: its claims were refused, but it stores what it is sent.
    honest[0].kill()
    net.wait_live(4)
    by_address = {a.address: a for a in [*honest[1:], spare, liar]}
    for p in parts:
        holders = wait_until(f"part {p[:8]} is proven on three agents again",
                             lambda p=p: h if len(h := proven(net, p)) == 3 else None)
        assert all(blobs(by_address[h])[p] == sizes[p] for h in holders)


def test_check_shows_claimed_and_proven_apart(make_network, tmp_path):
    net = make_network(heartbeat=0.5)
    # No repair, and audits so rare that the liar's claims stay unproven during the test.
    net.start_server("--repair-after=0", "--audit-rate=0.01")
    honest = [net.start_agent(f"honest{i}") for i in range(3)]
    net.wait_live(3)
    net.client("keygen")
    address = put(net, tmp_path, "f.bin", 2 * 64 * KiB).stdout.decode().split()[0]
    blocks = file_blocks(net, address)
    sizes = blobs(honest[0])
    claims = tmp_path / "claims"
    claims.write_text("".join(f"{b} {sizes[b]}\n" for b in blocks))
    # The scheduler may always send one audit at once (a burst of one at this rate): spend it
    # on an audit of a part an honest agent never claimed (no strike), so that the liar's
    # claims wait for the next token, 100 s away.
    someone = net.status()["agents"][0]["id"]
    code, _ = net.http(f"/api/audit?i={'0' * 64},{someone}")
    assert code == 200
    liar = net.start_agent("liar", program=rogue(f"false-have={claims},false-who-has"))
    net.wait_live(4)
    wait_until("the liar's claims are indexed",
               lambda: all(len(net.http(f"/api/who-has?q={b}")[1]["addresses"]) == 4 for b in blocks))
    r = net.client("check", address)
    out = r.stdout.decode()
    assert r.returncode == 0
    assert "PROVEN" in out and "CLAIMED" in out and out.count("1 claimed, not proven") == len(blocks)
    code, doc = check_doc(net, address)
    assert code == 0
    assert [(b["replicas"], b["claimed"]) for b in doc["files"][0]["blocks"]] == [(3, 4)] * len(blocks)
    assert all(liar.address not in b["proven"] for b in doc["files"][0]["blocks"])
    # An honest holder goes: three claims are left, two of them proven. That is short.
    honest[0].kill()
    net.wait_live(3)
    r = net.client("check", address, check=False)
    assert r.returncode == EXIT_DEGRADED
    assert f"{len(blocks)} block(s) in 1 file(s) have fewer than 3 proven replicas" in r.stderr.decode()
    code, doc = check_doc(net, address)
    assert [(b["replicas"], b["claimed"]) for b in doc["files"][0]["blocks"]] == [(2, 3)] * len(blocks)


def test_three_liars_on_one_host_cannot_make_a_put_report_copies_it_does_not_have(make_network, tmp_path):
    """The attack of issue 17: three identities on one host report 2^61 bytes free, acknowledge
    every upload and keep nothing; three honest agents on networks of their own. The put ends
    with every block on three honest agents, or fails; it never reports copies it lacks."""
    net = make_network(heartbeat=0.5, replicas=3)
    net.start_server(*SERVER)
    honest = [net.start_agent(f"honest{i}") for i in range(3)]
    liars = [net.start_agent(f"liar{i}", host=f"127.0.77.{i + 1}", program=rogue("lying-free,ack-and-drop"))
             for i in range(3)]
    net.wait_live(6)
    status = {a["id"]: a for a in net.status()["agents"]}
    assert all(status[a.agent_id]["free"] == 2**61 for a in liars)  # the lie reached the server
    net.client("keygen")
    srcs = []
    for i in range(3):
        src = tmp_path / f"f{i}.bin"
        src.write_bytes(os.urandom(5 * 64 * KiB + i))
        srcs.append(src)
    r = net.client("put", "--part-size", "64K", *map(str, srcs), check=False)
    assert r.returncode == 0, r.stderr.decode()
    addresses = r.stdout.decode().split()[::2]
    assert len(addresses) == 3
    for address in addresses:
        for block in file_blocks(net, address):
            assert len([a for a in honest if block in blobs(a)]) == 3, block
            assert not any(block in blobs(a) for a in liars)
    code, doc = check_doc(net, *addresses)
    assert code == 0
    out = tmp_path / "back"
    net.client("get", addresses[0], "-o", str(out))
    assert out.read_bytes() == srcs[0].read_bytes()
