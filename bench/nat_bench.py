"""DSSS across the NAT lab (dsss/netns.py): put/get throughput over punched paths and the relay.

Two networks in one `NatLab` (veths with MTU 1500; QUIC datagrams of 1452 bytes, the client's
and agents' default off loopback), the discovery server on the wan (198.51.100.1):

- direct: four agents behind two cone NATs (two hosts behind each), the client behind a third
  cone NAT; every transfer goes over a punched path.
- relay: four agents behind a symmetric NAT (`--random-fully`), the client behind a cone NAT;
  punching cannot work, so after the bounded direct attempt (3 s per agent, in parallel) every
  transfer goes through the server's relay, at its default per-pair limit (`--relay-limit`,
  10 MiB/s per client/agent pair).

The client runs with `-v`, and the path it reports for every agent is recorded, so a figure
is never attributed to the wrong path. Needs root (namespaces, iptables).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from common import MiB, file_digest, log, proc_cpu, run_timed, summary

from dsss.crypto.keys import generate_key_file
from dsss.harness import AGENT_READY, child_env
from dsss.netns import NatLab, NatNetwork, paths_used, unavailable_reason


def unavailable() -> str | None:
    return unavailable_reason()


def _run_case(lab: NatLab, base: Path, kind: str, src: Path, repeat: int) -> dict[str, Any]:
    if kind == "direct":
        routers = [lab.add_router("cone", hosts=2), lab.add_router("cone", hosts=2)]
    else:
        routers = [lab.add_router("symmetric", hosts=4)]
    agent_hosts = [h for r in routers for h in r.hosts]
    client_host = lab.add_router("cone", hosts=1).hosts[0]
    shutil.rmtree(base, ignore_errors=True)
    net = NatNetwork(lab, base, heartbeat=1.0, replicas=3)
    try:
        net.start_server()
        agents = [net.start_agent(f"agent-{h.label}", wait=False, host=h) for h in agent_hosts]
        for a in agents:
            m = a.wait_for(AGENT_READY)
            a.agent_id, a.address = m.group(1), m.group(2)
        net.wait_live(len(agents))
        generate_key_file(net.key)
        env = child_env()
        digest = file_digest(src)
        size = src.stat().st_size
        puts: list[dict[str, Any]] = []
        gets: list[dict[str, Any]] = []
        for i in range(repeat):
            pids = {"server": net.server.pid, **{a.name: a.pid for a in agents}}  # type: ignore[union-attr]
            before = {k: proc_cpu(p) for k, p in pids.items()}
            r = run_timed(net.client_command("put", str(src), host=client_host, options=("-v",)), env=env)
            if r["rc"] != 0:
                raise RuntimeError(f"put across the NAT lab ({kind}) failed: {r['stderr'][-1500:]}")
            address = r["stdout"].split()[0]
            put_paths = paths_used(r["stderr"])
            puts.append({"seconds": r["seconds"], "mbps": size / 1e6 / r["seconds"], "maxrss_kb": r["maxrss_kb"],
                         "cpu_s": r["cpu_s"], "paths": put_paths,
                         "daemons_cpu_s": {k: round(proc_cpu(p) - before[k], 3) for k, p in pids.items()}})
            out = base / f"out-{i}.bin"
            before = {k: proc_cpu(p) for k, p in pids.items()}
            r = run_timed(net.client_command("get", address, "-o", str(out), host=client_host, options=("-v",)), env=env)
            if r["rc"] != 0:
                raise RuntimeError(f"get across the NAT lab ({kind}) failed: {r['stderr'][-1500:]}")
            ok = file_digest(out) == digest
            out.unlink()
            if not ok:
                raise RuntimeError(f"get across the NAT lab ({kind}) returned different bytes")
            gets.append({"seconds": r["seconds"], "mbps": size / 1e6 / r["seconds"], "maxrss_kb": r["maxrss_kb"],
                         "cpu_s": r["cpu_s"], "paths": paths_used(r["stderr"]),
                         "daemons_cpu_s": {k: round(proc_cpu(p) - before[k], 3) for k, p in pids.items()}})
            log(f"nat {kind}: put {puts[-1]['mbps']:.1f} MB/s {sorted(set(put_paths.values()))}, "
                f"get {gets[-1]['mbps']:.1f} MB/s {sorted(set(gets[-1]['paths'].values()))}")
        status = net.status()
        return {
            "kind": kind,
            "agents_behind": [r.kind for r in routers],
            "client_behind": "cone",
            "put_mbps": summary(p["mbps"] for p in puts),
            "get_mbps": summary(g["mbps"] for g in gets),
            "paths_seen": sorted({v for op in puts + gets for v in op["paths"].values()}),
            "relayed_bytes": status["activity"].get("relayed-bytes"),
            "runs": {"put": puts, "get": gets},
        }
    finally:
        net.stop()


def measure(work: Path, size: int, repeat: int) -> dict[str, Any]:
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    from common import make_random_file

    src = make_random_file(work / "files" / f"nat-{size}.bin", size)
    result: dict[str, Any] = {"size": size, "mtu": 1500, "datagram_size": 1452, "repeat": repeat}
    with NatLab(mtu=1500) as lab:
        for kind in ("direct", "relay"):
            log(f"nat: {kind} paths, {size // MiB} MiB x {repeat}")
            try:
                result[kind] = _run_case(lab, work / f"nat-{kind}", kind, src, repeat)
            except Exception as e:  # one failing case still leaves the other's figures
                log(f"nat {kind} failed: {e}")
                result[kind] = {"error": str(e)}
    return result
