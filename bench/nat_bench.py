"""DSSS across the NAT lab (tools/netns.py): put/get throughput over punched paths and the relay.

Three networks in one `NatLab` (veths with MTU 1500; QUIC datagrams of 1452 bytes, the client's
and agents' default off loopback), the discovery server on the wan (198.51.100.1):

- direct: four agents behind two cone NATs (two hosts behind each), the client behind a third
  cone NAT; every transfer goes over a punched path.
- relay: four agents behind a symmetric NAT (`--random-fully`), the client behind a cone NAT;
  punching cannot work, so after the bounded direct attempt (3 s per agent, in parallel) every
  transfer goes through the server's relay, at its default per-pair limit (`--relay-limit`,
  10 MiB/s per client/agent pair, or the bench's `--relay-limit`); the agents pass each part to
  each other across their LAN.
- lan: four agents and the client behind one cone NAT (a home with its own agents; the router
  does not hairpin): the client reaches every agent across the LAN (`via`). Not one of the
  targets, which compare paths through NATs; it shows what a user's own agents give.

Each repeat stores and reads back the file twice, with the CLI (a new process per call) and
through `dsss gateway` running on the client's host and driven by curl there (as Tahoe's web API
is on loopback; the targets compare that pair), the order alternating between repeats. The
client and the gateway run with `-v`, and the path they report for every agent is recorded, so
a figure is never attributed to the wrong path. Needs root (namespaces, iptables).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from common import MiB, file_digest, log, proc_cpu, run_timed, start_gateway, stop_process, summary

from dsss.crypto.keys import generate_key_file
from tools.harness import AGENT_READY, child_env
from tools.netns import Host, NatLab, NatNetwork, paths_used, unavailable_reason


def unavailable() -> str | None:
    return unavailable_reason()


class _Gateway:
    """`dsss gateway` on the client's lab host (loopback of its namespace), driven by curl there,
    as Tahoe's web API is on loopback: the like-for-like figure for the targets. With `-v` it
    reports the path to every agent it used when it stops."""

    def __init__(self, lab: NatLab, net: NatNetwork, host: Host, base: Path) -> None:
        self.lab, self.host = lab, host
        self.log_path = base / "gateway.log"
        cmd = net.client_command("gateway", "--listen", "tcp:0:interface=127.0.0.1", host=host, options=("-v",))
        self.proc, self.url, self.token = start_gateway(cmd, child_env(), self.log_path)

    def curl(self, *args: str) -> dict[str, Any]:
        """One curl call: run_timed's figures and the gateway's CPU."""
        cpu = proc_cpu(self.proc.pid)
        r = run_timed([*self.lab.exec_prefix(self.host), "curl", "-sS", "-f", "-H", "Expect:",
                       "-H", f"Authorization: Bearer {self.token}", *args], env=child_env())
        r["gateway_cpu_s"] = round(proc_cpu(self.proc.pid) - cpu, 3)
        return r

    def stop(self) -> dict[str, str]:
        """Stop it; the paths it reported (agent address -> direct or relay)."""
        stop_process(self.proc)
        return paths_used(self.log_path.read_bytes())


def _op(how: str, net: NatNetwork, gw: _Gateway, host: Host, pids: dict[str, int], op: str,
        arg: str, out: Path) -> dict[str, Any]:
    """One put (arg: the file) or get (arg: the address, into `out`), through the CLI or the gateway."""
    before = {k: proc_cpu(p) for k, p in pids.items()}
    if how == "cli":
        args = ("put", arg) if op == "put" else ("get", arg, "-o", str(out))
        r = run_timed(net.client_command(*args, host=host, options=("-v",)), env=child_env())
    else:
        r = gw.curl("-T", arg, f"{gw.url}/files?name=nat.bin") if op == "put" else gw.curl("-o", str(out), f"{gw.url}/files/{arg}")
    if r["rc"] != 0:
        raise RuntimeError(f"{op} ({how}) across the NAT lab failed: {r['stderr'][-1500:]}")
    done = {"seconds": r["seconds"], "maxrss_kb": r["maxrss_kb"], "cpu_s": r["cpu_s"],
            "daemons_cpu_s": {k: round(proc_cpu(p) - before[k], 3) for k, p in pids.items()}}
    if how == "cli":
        done["paths"] = paths_used(r["stderr"])
    else:
        done["gateway_cpu_s"] = r["gateway_cpu_s"]
    if op == "put":
        done["address"] = r["stdout"].split()[0] if how == "cli" else json.loads(r["stdout"])["address"]
    return done


def _run_case(lab: NatLab, base: Path, kind: str, src: Path, repeat: int,
              relay_limit: str | None = None) -> dict[str, Any]:
    if kind == "lan":
        # The client behind the agents' router (a home with its own agents): across the LAN.
        routers = [lab.add_router("cone", hosts=5)]
        agent_hosts, client_host = routers[0].hosts[:4], routers[0].hosts[4]
    else:
        if kind == "direct":
            routers = [lab.add_router("cone", hosts=2), lab.add_router("cone", hosts=2)]
        else:
            routers = [lab.add_router("symmetric", hosts=4)]
        agent_hosts = [h for r in routers for h in r.hosts]
        client_host = lab.add_router("cone", hosts=1).hosts[0]
    shutil.rmtree(base, ignore_errors=True)
    net = NatNetwork(lab, base, heartbeat=1.0, replicas=3)
    gw: _Gateway | None = None
    try:
        net.start_server(*([f"--relay-limit={relay_limit}"] if relay_limit else []))
        agents = [net.start_agent(f"agent-{h.label}", wait=False, host=h) for h in agent_hosts]
        for a in agents:
            m = a.wait_for(AGENT_READY)
            a.agent_id, a.address = m.group(1), m.group(2)
        net.wait_live(len(agents))
        generate_key_file(net.key)
        gw = _Gateway(lab, net, client_host, base)
        digest = file_digest(src)
        size = src.stat().st_size
        pids = {"server": net.server.pid, **{a.name: a.pid for a in agents}}  # type: ignore[union-attr]
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {h: {"put": [], "get": []} for h in ("cli", "gateway")}
        for i in range(repeat):
            # Alternate which goes first, so a drift in the machine's load favours neither.
            for how in ("cli", "gateway") if i % 2 == 0 else ("gateway", "cli"):
                out = base / f"out-{how}-{i}.bin"
                put = _op(how, net, gw, client_host, pids, "put", str(src), out)
                get = _op(how, net, gw, client_host, pids, "get", put["address"], out)
                ok = file_digest(out) == digest
                out.unlink()
                if not ok:
                    raise RuntimeError(f"get across the NAT lab ({kind}, {how}) returned different bytes")
                for op, r in (("put", put), ("get", get)):
                    r["mbps"] = size / 1e6 / r["seconds"]
                    runs[how][op].append(r)
                seen = " ".join(str(sorted(set(r["paths"].values()))) for r in (put, get) if "paths" in r)
                log(f"nat {kind} {how}: put {put['mbps']:.1f} MB/s, get {get['mbps']:.1f} MB/s {seen}")
        gw_paths, gw = gw.stop(), None
        status = net.status()
        return {
            "kind": kind,
            "agents_behind": [r.kind for r in routers],
            "client_behind": "the agents' cone NAT" if kind == "lan" else "cone",
            "put_mbps": summary(p["mbps"] for p in runs["cli"]["put"]),
            "get_mbps": summary(g["mbps"] for g in runs["cli"]["get"]),
            "gw_put_mbps": summary(p["mbps"] for p in runs["gateway"]["put"]),
            "gw_get_mbps": summary(g["mbps"] for g in runs["gateway"]["get"]),
            "paths_seen": sorted({v for ops in runs["cli"].values() for r in ops for v in r["paths"].values()}),
            "gw_paths_seen": sorted(set(gw_paths.values())),
            "relayed_bytes": status["activity"].get("relayed-bytes"),
            "relay_dropped_bytes": status["activity"].get("relay-dropped-bytes"),
            "runs": runs["cli"],
            "gw_runs": runs["gateway"],
        }
    finally:
        if gw is not None:
            gw.stop()
        net.stop()


CASES = ("direct", "relay", "lan")
"""Agents behind two cone NATs (punched paths), behind one symmetric NAT (the relay), and
behind the client's own cone NAT (across their LAN; not a target, a user's home)."""


def measure(work: Path, size: int, repeat: int, relay_limit: str | None = None) -> dict[str, Any]:
    """Every case of CASES; `relay_limit`: the server's `--relay-limit` (default: its own, 10M)."""
    reason = unavailable()
    if reason:
        return {"skipped": reason}
    from common import make_random_file

    src = make_random_file(work / "files" / f"nat-{size}.bin", size)
    result: dict[str, Any] = {"size": size, "mtu": 1500, "datagram_size": 1452, "repeat": repeat,
                              "relay_limit": relay_limit or "10M (the server's default)"}
    with NatLab(mtu=1500) as lab:
        for kind in CASES:
            log(f"nat: {kind} paths, {size // MiB} MiB x {repeat}")
            try:
                result[kind] = _run_case(lab, work / f"nat-{kind}", kind, src, repeat, relay_limit)
            except Exception as e:  # one failing case still leaves the other's figures
                log(f"nat {kind} failed: {e}")
                result[kind] = {"error": str(e)}
    return result
