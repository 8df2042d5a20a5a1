"""DSSS across real NATs: network namespaces, MASQUERADE routers, hole punching and the relay.

The lab (tests/nat/conftest.py) has cone NATs r1, r2 (5 s UDP timeout) and r3, symmetric NATs
r4 (5 s UDP timeout) and r5, and public hosts p1..p3; the discovery server is on the wan at
198.51.100.1. Every test runs real `twistd` processes inside the namespaces and the client with
`-v`, which reports the path of each transfer (`dsss: path HOST:PORT direct|relay`).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from dsss.crypto.keys import generate_key_file
from tools.harness import AGENT_READY, AgentProc, child_env, wait_until
from tools.netns import SERVER_IP, Host, NatLab, NatNetwork, Router, paths_used, probe_punch
from tests.nat.conftest import lab_namespaces

pytestmark = [pytest.mark.nat, pytest.mark.integration, pytest.mark.xdist_group("nat")]

MiB = 1 << 20
VERBOSE = ("-v",)


# --- helpers --------------------------------------------------------------------------------------


def start(net: NatNetwork, hosts: list[Host], *server_args: str) -> list[AgentProc]:
    """Server on the wan, one agent on each host (started together), a client key."""
    net.start_server(*server_args)
    agents = [net.start_agent(f"agent-{h.label}", wait=False, host=h) for h in hosts]
    for a in agents:
        m = a.wait_for(AGENT_READY)
        a.agent_id, a.address = m.group(1), m.group(2)
    net.wait_live(len(agents))
    generate_key_file(net.key)  # what `keygen` does, without starting a client
    return agents


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def put(net: NatNetwork, path: Path, host: Host, timeout: float = 120.0,
        chain: bool = False) -> tuple[str, dict[str, str], float]:
    """A put from `host`; by default with every copy sent by the client (`--no-chain`), so
    the paths it reports are those to every agent storing the file."""
    t = time.monotonic()
    options = (*VERBOSE, "--chain" if chain else "--no-chain")
    r = net.client("put", str(path), host=host, options=options, timeout=timeout)
    elapsed = time.monotonic() - t
    address = r.stdout.decode().split()[0]
    return address, paths_used(r.stderr), elapsed


def get(net: NatNetwork, address: str, out: Path, host: Host, timeout: float = 120.0) -> tuple[dict[str, str], float]:
    t = time.monotonic()
    r = net.client("get", address, "-o", str(out), host=host, options=VERBOSE, timeout=timeout)
    return paths_used(r.stderr), time.monotonic() - t


def assert_paths(paths: dict[str, str], kind: str, *, exactly: set[str] | None = None,
                 among: set[str] | None = None) -> None:
    """The client's `-v` report: every transfer used path `kind` ("direct" or "relay"), with
    agents at exactly the addresses `exactly`, or at some of `among`."""
    assert paths, "the client reported no path (`-v` prints `dsss: path HOST:PORT direct|relay`)"
    assert set(paths.values()) == {kind}, paths
    if exactly is not None:
        assert set(paths) == exactly, paths
    if among is not None:
        assert set(paths) <= among, paths


def report(what: str, size: int, seconds: float) -> None:
    print(f"nat timing: {what}: {size / MiB:.1f} MiB in {seconds:.2f} s ({size / MiB / seconds:.1f} MiB/s)")


def conntrack_udp(lab: NatLab, router: Router) -> list[dict[str, Any]]:
    """The router's UDP conntrack entries: original direction src/dst/ports, seconds left."""
    entries = []
    for line in lab.conntrack(router):
        fields = line.split()
        if len(fields) < 5 or fields[2] != "udp":
            continue
        kv: dict[str, str] = {}
        for f in fields[5:]:
            k, _, v = f.partition("=")
            kv.setdefault(k, v)  # the first of each pair is the original direction
        entries.append({"src": kv.get("src"), "dst": kv.get("dst"), "sport": int(kv.get("sport", 0)),
                        "dport": int(kv.get("dport", 0)), "timeout": int(fields[4])})
    return entries


def public_ip(address: str) -> str:
    return address.rpartition(":")[0]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- the lab itself ---------------------------------------------------------------------------------


def test_lab_reproduces_home_nat_behaviour(nat_lab: NatLab) -> None:
    """Before blaming DSSS: bare UDP hole punching in the lab behaves like real home routers."""
    h1, h3, h4 = nat_lab.host("h1_2"), nat_lab.host("h3_1"), nat_lab.host("h4_1")
    # Veths have MTU 1500 (QUIC uses 1452-byte datagrams off loopback).
    links = json.loads(nat_lab.run(h1, "ip", "-j", "link", "show", "eth0").stdout)
    assert links[0]["mtu"] == 1500
    # Behind a cone NAT the wan sees the router's address and the host's own port.
    r = probe_punch(nat_lab, h1, h3)
    assert r["a_public"][0] == "198.51.100.11" and r["b_public"][0] == "198.51.100.13"
    assert r["ok"], r
    # One side's punches arrive at the other's router before it sends anything: still fine,
    # because routers drop NEW inbound packets addressed to themselves.
    assert probe_punch(nat_lab, h1, h3, b_first=True)["ok"]
    # A symmetric NAT uses another port for the peer than the one the rendezvous saw.
    r = probe_punch(nat_lab, h4, h3)
    assert not r["ok"] and not r["b_got_from"], r

    # Without the INPUT rule, an early punch confirms a conntrack entry on the router, the
    # host's reply leaves from a new port and punching fails.
    before = lab_namespaces()
    with NatLab() as plain:
        a = plain.add_router("cone", hosts=1, input_drop=False).hosts[0]
        b = plain.add_router("cone", hosts=1, input_drop=False).hosts[0]
        assert not probe_punch(plain, a, b, b_first=True)["ok"]
        made = set(plain.namespaces)
        assert len(made) == 5 and made <= lab_namespaces()
    after = lab_namespaces()
    # Torn down: nothing of it is left, and nothing else was touched (other test workers may be
    # building labs of their own meanwhile, so only this module's lab is compared).
    assert not (made & after)
    assert set(nat_lab.namespaces) <= after and set(nat_lab.namespaces) <= before
    plain.close()  # idempotent


# --- direct paths through cone NATs ----------------------------------------------------------------


def test_put_get_20mib_through_cone_nats_over_direct_paths(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    net = nat_net(heartbeat=1.0)
    hosts = [nat_lab.host("h1_1"), nat_lab.host("h1_2"), nat_lab.host("h2_1")]
    agents = start(net, hosts)
    client = nat_lab.host("h3_1")
    # The server sees each agent at its router's public address.
    for a, h in zip(agents, hosts):
        assert public_ip(net.agent_status(a)["address"]) == h.router.wan_ip  # type: ignore[union-attr]

    src = random_file(20 * MiB)
    address, put_paths, put_s = put(net, src, client)
    report("put through cone NATs", 20 * MiB, put_s)
    out = tmp_path / "out.bin"
    get_paths, get_s = get(net, address, out, client)
    report("get through cone NATs", 20 * MiB, get_s)
    assert sha256(out) == sha256(src)

    expected = {net.agent_status(a)["address"] for a in agents}
    assert_paths(put_paths, "direct", exactly=expected)
    assert_paths(get_paths, "direct", among=expected)
    status = net.status()
    assert status["activity"]["relayed-bytes"] == 0
    assert {a["reached"] for a in status["agents"]} == {"direct"}


def test_chained_put_through_cone_nats_sends_each_part_once(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    """With `--chain` the client's uplink carries each part once: the first agent passes it to
    the next through their NATs (punched), and signed receipts prove the three copies. Two of
    the agents share a NAT: they cannot reach each other through it, but they told the server
    their LAN addresses, so each chain passes the part across their LAN once and from one NAT
    to the other once."""
    net = nat_net(heartbeat=1.0)
    hosts = [nat_lab.host("h1_1"), nat_lab.host("h1_2"), nat_lab.host("h2_1")]
    agents = start(net, hosts)
    client = nat_lab.host("h3_1")
    size = 8 * MiB + 5
    src = random_file(size)
    t = time.monotonic()
    r = net.client("-v", "--chain", "put", "--part-size", "2M", str(src), host=client)
    report("chained put through cone NATs", size, time.monotonic() - t)
    address = r.stdout.decode().split()[0]
    err = r.stderr.decode()
    m = re.search(r"^dsss: uploaded (\d+) bytes, (\d+) copies stored$", err, re.M)
    assert m, err
    sent, copies = int(m.group(1)), int(m.group(2))
    # 5 parts and the manifest, three copies each; each sent once (ciphertext: 16 bytes a part more)
    assert copies == 3 * 6
    assert size < sent < size + 64 * 1024, err
    assert set(paths_used(err).values()) == {"direct"}
    out = tmp_path / "out.bin"
    get(net, address, out, client)
    assert sha256(out) == sha256(src)
    doc = json.loads(net.client("--json", "check", address, host=client).stdout)
    expected = {net.agent_status(a)["address"] for a in agents}
    blocks = doc["files"][0]["blocks"]
    assert len(blocks) == 6 and doc["ok"] is True
    assert all(set(b["holders"]) == expected for b in blocks), doc
    activity = net.status()["activity"]
    assert activity["relayed-bytes"] == 0
    assert activity["lan-hops"] == 6, activity  # one per part and the manifest


def test_chained_put_to_agents_behind_one_symmetric_nat_crosses_the_relay_once(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    """Three agents behind one symmetric NAT: the client reaches the first of each chain only
    through the server's relay, and that agent passes the part across the LAN to the other two
    (their LAN addresses, from LOCAL). The relay carries one copy instead of three."""
    hosts, client = [nat_lab.host(f"h4_{i}") for i in (1, 2, 3)], nat_lab.host("h3_1")
    net = nat_net(heartbeat=1.0)
    agents = start(net, hosts, "--relay-limit", "16M")
    size = 6 * MiB + 3
    src = random_file(size)
    address, put_paths, put_s = put(net, src, client, chain=True)
    report("chained put via the relay and a LAN", size, put_s)
    assert set(put_paths.values()) == {"relay"}, put_paths
    activity = net.status()["activity"]
    # One copy of each part went through the relay (plus QUIC's overhead), not three.
    assert size <= activity["relayed-bytes"] < 1.5 * size, activity
    assert activity["lan-hops"] == 2 * 3, activity  # two hops for each of 2 parts and the manifest
    doc = json.loads(net.client("--json", "check", address, host=client).stdout)
    expected = {net.agent_status(a)["address"] for a in agents}
    assert doc["ok"] is True and len(doc["files"][0]["blocks"]) == 3
    assert all(set(b["holders"]) == expected for b in doc["files"][0]["blocks"]), doc
    out = tmp_path / "out.bin"
    get(net, address, out, client)
    assert sha256(out) == sha256(src)


@pytest.mark.parametrize("kind", ["cone", "symmetric"])
def test_idle_agents_stay_reachable_thanks_to_keepalives(
    kind: str, nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path]
) -> None:
    """Routers r1, r2 (cone) and r4 (symmetric) forget idle UDP mappings after 5 s; agents ping
    the server every second (heartbeat 1 s), so their mappings, and their public addresses,
    survive a longer idle period. On the symmetric NAT a lost mapping would come back with a new
    random port (and the relay could not reach the agent); on the port-preserving cone NAT the
    proof is the router's conntrack table."""
    if kind == "cone":
        hosts = [nat_lab.host("h1_1"), nat_lab.host("h1_2"), nat_lab.host("h2_1")]
    else:
        hosts = [nat_lab.host(f"h4_{i}") for i in (1, 2, 3)]
    router = hosts[1].router
    assert router is not None and router.udp_timeout == 5
    net = nat_net(heartbeat=1.0)
    agents = start(net, hosts)
    before = {a.name: net.agent_status(a)["address"] for a in agents}

    # A control flow from the same router that nobody refreshes: one exchange with the wan.
    wan_sock = nat_lab.call_in(nat_lab.wan, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    probe = nat_lab.call_in(hosts[1], socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wan_sock.bind((SERVER_IP, 0))
        wan_sock.settimeout(2)
        probe.settimeout(2)
        probe.sendto(b"once", wan_sock.getsockname())
        _, seen = wan_sock.recvfrom(16)
        wan_sock.sendto(b"back", seen)
        probe.recvfrom(16)
        probe_port = probe.getsockname()[1]
        assert any(e["sport"] == probe_port for e in conntrack_udp(nat_lab, router))

        # The router really forgets an idle mapping (after its UDP timeout)...
        wait_until("the router forgets the probe's idle mapping",
                   lambda: not any(e["sport"] == probe_port for e in conntrack_udp(nat_lab, router)),
                   timeout=router.udp_timeout + 3, interval=0.5)
        entries = conntrack_udp(nat_lab, router)
        # ...but not the agents': each still has its mapping towards the server's UDP port.
        for a, h in zip(agents, hosts):
            if h.router is router:
                mine = [e for e in entries
                        if e["src"] == h.ip and e["dst"] == SERVER_IP and e["dport"] == net.udp_port]
                assert len(mine) == 1 and mine[0]["timeout"] <= router.udp_timeout, (a.name, entries)
    finally:
        wan_sock.close()
        probe.close()

    after = {a.name: net.agent_status(a) for a in agents}
    assert {n: st["address"] for n, st in after.items()} == before
    assert all(st["live"] for st in after.values())
    # A put reaches every one of the idle agents.
    _, put_paths, _ = put(net, random_file(MiB + 123), nat_lab.host("h3_1"))
    assert_paths(put_paths, "direct" if kind == "cone" else "relay", exactly=set(before.values()))


def test_restarted_agent_gets_a_new_public_port_and_still_serves(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    net = nat_net(heartbeat=1.0)
    hosts = [nat_lab.host("h1_1"), nat_lab.host("h1_2"), nat_lab.host("h2_1")]
    agents = start(net, hosts)
    client = nat_lab.host("h3_1")
    src = random_file(3 * MiB + 5)
    address, _, _ = put(net, src, client)

    first = agents[0]
    old = net.agent_status(first)["address"]
    first.stop()
    restarted = net.start_agent(first.name)  # same host, same storage, a new ephemeral port
    assert restarted.agent_id == first.agent_id
    new = net.wait_address(restarted, not_=old)
    assert public_ip(new) == public_ip(old) == hosts[0].router.wan_ip  # type: ignore[union-attr]
    assert port_of(new) != port_of(old)
    # Only the restarted agent is left, so the get must reach it at its new address.
    for a in agents[1:]:
        a.stop()
    wait_until("only the restarted agent is live", lambda: net.live_addresses() == {new}, timeout=15,
               interval=0.2, detail=net.status)
    out = tmp_path / "out.bin"
    get_paths, _ = get(net, address, out, client)
    assert sha256(out) == sha256(src)
    assert_paths(get_paths, "direct", exactly={new})


# --- symmetric NAT: the relay -----------------------------------------------------------------------


def initials_dropped(lab: NatLab, router: Router) -> int:
    """Unsolicited UDP packets of QUIC Initial size (>= 1200 bytes of payload) that `router`
    has dropped as NEW on its wan side (a counting rule, added on first use)."""
    rule = ["INPUT", "-i", "wan", "-p", "udp", "-m", "conntrack", "--ctstate", "NEW",
            "-m", "length", "--length", "1228:65535", "-m", "comment", "--comment", "quic-initials"]
    if lab.run(router, "iptables", "-C", *rule, check=False).returncode != 0:
        lab.run(router, "iptables", "-I", *rule)
    listing = lab.run(router, "iptables", "-L", "INPUT", "-v", "-n", "-x").stdout.decode()
    return sum(int(line.split()[0]) for line in listing.splitlines() if "quic-initials" in line)


def test_symmetric_nat_falls_back_to_the_relay(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    """Agents behind a symmetric NAT, the client behind a cone NAT: the direct attempt fails
    (the router drops the client's QUIC Initials), and the transfers go through the relay."""
    hosts, client = [nat_lab.host(f"h4_{i}") for i in (1, 2, 3)], nat_lab.host("h3_1")
    r4 = nat_lab.router("r4")
    net = nat_net(heartbeat=1.0)
    agents = start(net, hosts, "--relay-limit", "16M")
    size = 3 * MiB + 7
    src = random_file(size)
    dropped = initials_dropped(nat_lab, r4)
    address, put_paths, put_s = put(net, src, client)
    report("put via the relay", size, put_s)
    # Direct was tried first: the client's QUIC Initials to the agents' observed addresses were
    # dropped by their router...
    assert initials_dropped(nat_lab, r4) > dropped
    # ...for a bounded time only (3 s per agent, all three in parallel).
    assert put_s < 45
    out = tmp_path / "out.bin"
    get_paths, get_s = get(net, address, out, client)
    report("get via the relay", size, get_s)
    assert sha256(out) == sha256(src)

    expected = {net.agent_status(a)["address"] for a in agents}
    assert_paths(put_paths, "relay", exactly=expected)
    assert_paths(get_paths, "relay", among=expected)
    status = net.status()
    # Three copies up and one down went through the server, each at least as big as the file.
    assert status["activity"]["relayed-bytes"] >= 4 * size, status["activity"]
    assert {a["reached"] for a in status["agents"]} == {"relayed"}, status["agents"]


def test_relay_limit_caps_each_pair(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path]
) -> None:
    """The client behind a symmetric NAT, one agent behind a cone NAT, `--relay-limit 1M`: the
    server's relayed-bytes counter never grows faster than 1 MiB/s (plus its 256 KiB burst)."""
    limit = MiB
    net = nat_net(heartbeat=1.0, replicas=1)
    start(net, [nat_lab.host("h1_1")], "--relay-limit", "1M")
    client = nat_lab.host("h5_1")
    size = 3 * MiB
    src = random_file(size)
    samples: list[tuple[float, int]] = []
    proc = subprocess.Popen(net.client_command("put", str(src), host=client, options=VERBOSE),
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            st = net.status()
            samples.append((st["server"]["time"], st["activity"]["relayed-bytes"]))
            try:
                proc.wait(0.2)  # a sample every 0.2 s until the put ends
            except subprocess.TimeoutExpired:
                pass
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert_paths(paths_used(err), "relay")
    st = net.status()
    samples.append((st["server"]["time"], st["activity"]["relayed-bytes"]))
    assert samples[-1][1] >= size
    worst = 0.0
    for i, (t0, b0) in enumerate(samples):
        for t1, b1 in samples[i + 1:]:
            if t1 - t0 >= 1.0:
                worst = max(worst, (b1 - b0 - 256 * 1024) / (t1 - t0))
    print(f"nat timing: relay capped at 1 MiB/s moved at most {worst / MiB:.2f} MiB/s over any >= 1 s window")
    assert 0 < worst <= 1.1 * limit, samples


# --- no NAT at all ------------------------------------------------------------------------------------

_PUNCH = ["-p", "udp", "-m", "string", "--algo", "bm", "--from", "28", "--to", "34",
          "--hex-string", "|00|PUNCH", "-j", "DROP"]


def test_public_agents_work_without_punching(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    """Agents with public addresses: the server sees their own address and port, and transfers
    work directly even with every PUNCH datagram to and from them dropped."""
    hosts = [nat_lab.host(f"p{i}") for i in (1, 2, 3)]
    rules = [(h, chain) for h in hosts for chain in ("INPUT", "OUTPUT")]
    if nat_lab.run(hosts[0], "iptables", "-C", "INPUT", *_PUNCH, check=False).returncode == 2:
        pytest.skip("iptables has no string match (xt_string) here")
    for h, chain in rules:
        nat_lab.run(h, "iptables", "-A", chain, *_PUNCH)
    try:
        net = nat_net(heartbeat=1.0)
        agents = start(net, hosts)
        for a, h in zip(agents, hosts):
            sockets = nat_lab.run(h, "ss", "-Hunl").stdout.decode().split("\n")
            ports = {int(line.split()[3].rpartition(":")[2]) for line in sockets if line.strip()}
            address = net.agent_status(a)["address"]
            assert public_ip(address) == h.ip and port_of(address) in ports, (address, sockets)
        client = nat_lab.host("h3_1")
        src = random_file(2 * MiB + 1)
        address, put_paths, _ = put(net, src, client)
        out = tmp_path / "out.bin"
        get_paths, _ = get(net, address, out, client)
        assert sha256(out) == sha256(src)
        expected = {net.agent_status(a)["address"] for a in agents}
        assert_paths(put_paths, "direct", exactly=expected)
        assert_paths(get_paths, "direct", among=expected)
        assert net.status()["activity"]["relayed-bytes"] == 0
        # The agents did try to punch; the lab dropped every one of those datagrams.
        dropped = 0
        for h in hosts:
            listing = nat_lab.run(h, "iptables", "-L", "OUTPUT", "-v", "-n", "-x").stdout.decode()
            dropped += sum(int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+\d+\s+DROP", listing, re.M))
        assert dropped > 0
    finally:
        for h, chain in rules:
            nat_lab.run(h, "iptables", "-D", chain, *_PUNCH, check=False)



def test_client_behind_symmetric_nat_stores_on_public_agents(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    net = nat_net(heartbeat=1.0)
    start(net, [nat_lab.host(f"p{i}") for i in (1, 2, 3)])
    client = nat_lab.host("h5_1")
    src = random_file(MiB + 3)
    r = net.client("put", str(src), host=client, check=False, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    address = r.stdout.decode().split()[0]
    out = tmp_path / "out.bin"
    net.client("get", address, "-o", str(out), host=client, timeout=60)
    assert sha256(out) == sha256(src)


def test_a_client_behind_an_agents_nat_reaches_it_across_their_lan(
    nat_lab: NatLab, nat_net: Callable[..., NatNetwork], random_file: Callable[..., Path], tmp_path: Path
) -> None:
    """The client and one agent behind one cone NAT (r1 does not hairpin), two agents behind
    other routers: the client reaches its neighbour at the local address it reported, not
    through the relay, in a put with every copy sent by the client, a get, and a chained put
    (which starts across the LAN)."""
    hosts = [nat_lab.host("h1_1"), nat_lab.host("h2_1"), nat_lab.host("p1")]
    net = nat_net(heartbeat=1.0)
    agents = start(net, hosts)
    neighbour = net.agent_status(agents[0])["address"]
    others = {net.agent_status(a)["address"] for a in agents[1:]}
    client = nat_lab.host("h1_2")
    src = random_file(3 * MiB + 11)
    address, put_paths, _ = put(net, src, client)
    assert put_paths == {neighbour: "lan", **{a: "direct" for a in others}}, put_paths
    out = tmp_path / "out.bin"
    get_paths, _ = get(net, address, out, client)
    assert sha256(out) == sha256(src)
    assert set(get_paths) <= {neighbour, *others} and all(
        p == ("lan" if a == neighbour else "direct") for a, p in get_paths.items()), get_paths
    second = random_file(2 * MiB + 5)
    r = net.client("put", str(second), host=client, options=(*VERBOSE, "--chain"), timeout=120)
    chained, chain_paths = r.stdout.decode().split()[0], paths_used(r.stderr)
    # Each part once, to the neighbour across the LAN (the chain takes it on from there); the
    # other holders are reached directly only to take the put's leases, never through the relay.
    assert chain_paths == {neighbour: "lan", **{a: "direct" for a in others}}, chain_paths
    uploaded = [ln.split() for ln in r.stderr.decode().splitlines() if ln.startswith("dsss: uploaded ")]
    assert len(uploaded) == 1 and int(uploaded[0][2]) < second.stat().st_size * 1.1, uploaded
    activity = net.status()["activity"]
    assert activity["relayed-bytes"] == 0 and activity["lan-introductions"] > 0, activity
    doc = json.loads(net.client("--json", "check", chained, host=client).stdout)
    assert doc["ok"] is True, doc
