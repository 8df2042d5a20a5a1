"""Placement at scale, in process: where-to-upload latency with N live agents, the candidate
table's rebuild cost, and how much of the placements agents that lie about their free space get.

`python bench/placement_scale.py [N ...]` (default 1000 10000). For each N it builds the real
`DiscoveryServer` (no sockets, a `task.Clock`) and registers N agents straight into its
registry: each on an IPv4 /24 of its own except that one in ten shares its /24 with the agent
before it, free space drawn from 100 GB to 4 TB, 80% of them vetted (a `ReputationView` written
here), and 1% of them liars reporting 2^61 bytes free. Then:

- `where_to_upload(1 MiB)` for replicas 3, timed call by call (`time.perf_counter`), with the
  clock advancing 1 ms per call and the server's placement timer run between calls as it would
  run (every `REFRESH / 4`; its rebuilds timed apart, as reactor stalls); and again with an
  agent joining every 10 calls (churn: rebuilds as often as the size allows);
- `CandidateTable.build` alone (what a rebuild costs);
- the share of copies the liars got, against the bound docs/operations.md states, and against
  their share of agents;
- the share of copies on unvetted agents (at most `UNVETTED_SHARE` plus noise).

Prints one table; `--json PATH` writes the figures. Nothing is asserted: it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import Clock  # noqa: E402

from dsss.model import PeerAddress  # noqa: E402
from dsss.server.placement import REFRESH, CandidateTable, Placer  # noqa: E402
from dsss.server.config import ServerConfig  # noqa: E402
from dsss.server.service import DiscoveryServer  # noqa: E402

LIE = 2**61
MiB = 1024 * 1024


class View:
    def __init__(self, vetted: set[str]) -> None:
        self.vetted = vetted

    def is_vetted(self, agent_id: str) -> bool:
        return agent_id in self.vetted

    def is_disqualified(self, agent_id: str) -> bool:
        return False


class Handle:
    def close(self) -> None:
        pass


def host_for(i: int) -> str:
    """Agent i's address: a /24 of its own, except that every tenth agent shares the /24 of
    the one before it."""
    shares = i % 10 == 0 and i > 0
    m = i - 1 if shares else i
    return f"{10 + m // 65536}.{m // 256 % 256}.{m % 256}.{2 if shares else 1}"


def build(n: int, seed: int) -> tuple[DiscoveryServer, set[str], set[str]]:
    rng = random.Random(seed)
    clock = Clock()
    clock.advance(1000)
    server = DiscoveryServer(clock, ServerConfig(replicas=3), rng=random.Random(seed))
    vetted: set[str] = set()
    liars: set[str] = set()
    for i in range(n):
        agent_id = f"{i:064x}"
        liar = rng.random() < 0.01
        free = LIE if liar else rng.randrange(100 * 10**9, 4 * 10**12)
        rec, _ = server.registry.register(agent_id=agent_id, seq=1, capacity=free, free=free, version="b",
                                          handle=Handle(), now=clock.seconds())
        server.registry.heard_udp(rec.token, PeerAddress(host_for(i), 40000), clock.seconds())
        if rng.random() < 0.8:
            vetted.add(agent_id)
        if liar:
            liars.add(agent_id)
    server.placer = Placer(server.config.distinct_networks, View(vetted), rng=random.Random(seed + 1))
    return server, vetted, liars


def keep_alive(server: DiscoveryServer) -> None:
    """Mark every agent heard now (the bench's clock moves; real agents ping)."""
    now = server.clock.seconds()
    for rec in server.registry.all():
        rec.last_tcp = rec.last_udp = now


def timer(server: DiscoveryServer, i: int, stalls: list[float]) -> None:
    """What the server's placement timer does every REFRESH / 4 seconds (250 calls here, at
    1 ms of clock a call), timed apart: a rebuild it makes is a reactor stall, not a request's."""
    if i % int(REFRESH / 4 / 0.001) == 0:
        t = time.perf_counter()
        if server.placer.refresh(server.registry, server.clock.seconds()):
            stalls.append(time.perf_counter() - t)


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": values[-1] * 1e3,
            "mean_ms": statistics.fmean(values) * 1e3}


def measure(n: int, calls: int, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    server, vetted, liars = build(n, seed)
    setup = time.perf_counter() - t0
    by_address = {str(r.address): r.agent_id for r in server.registry.all()}
    networks = len({str(r.address).rsplit(".", 1)[0] for r in server.registry.all()})
    # Rebuild cost alone.
    builds = []
    for _ in range(5):
        t = time.perf_counter()
        CandidateTable.build(server.registry.live(server.clock.seconds()), server.placer.rule,
                             server.placer.reputation, server.clock.seconds(), 0)
        builds.append(time.perf_counter() - t)
    server.placer.refresh(server.registry, server.clock.seconds())  # the timer's first run
    # Steady state.
    lat: list[float] = []
    stalls: list[float] = []
    copies = liar_copies = unvetted_copies = 0
    for i in range(calls):
        server.clock.advance(0.001)
        if i % 1000 == 0:
            keep_alive(server)
        timer(server, i, stalls)
        t = time.perf_counter()
        chosen = server.where_to_upload(MiB, [])
        lat.append(time.perf_counter() - t)
        ids = [by_address[str(a)] for a in chosen]
        copies += len(ids)
        liar_copies += sum(1 for a in ids if a in liars)
        unvetted_copies += sum(1 for a in ids if a not in vetted)
    rebuilds_steady = server.placer.rebuilds
    # Churn: an agent joins every 10 calls.
    churn: list[float] = []
    for i in range(calls):
        server.clock.advance(0.001)
        if i % 1000 == 0:
            keep_alive(server)
        if i % 10 == 0:
            j = n + i
            rec, _ = server.registry.register(agent_id=f"{j:064x}", seq=1, capacity=10**12, free=10**12,
                                              version="b", handle=Handle(), now=server.clock.seconds())
            server.registry.heard_udp(rec.token, PeerAddress(f"172.{16 + j // 65536 % 16}.{j // 256 % 256}.{j % 256}",
                                                             40000), server.clock.seconds())
        timer(server, i, stalls)
        t = time.perf_counter()
        server.where_to_upload(MiB, [])
        churn.append(time.perf_counter() - t)
    k = 3
    bound = 2 * k / (math.ceil(networks / 2) + 2 - k) / k  # per copy
    return {
        "agents": n, "networks": networks, "setup_s": round(setup, 2), "calls": calls,
        "where_to_upload": {key: round(v, 4) for key, v in percentiles(lat).items()},
        "where_to_upload_churn": {key: round(v, 4) for key, v in percentiles(churn).items()},
        "rebuild_ms": round(statistics.median(builds) * 1e3, 2),
        "timer_rebuild_ms_max": round(max(stalls, default=0.0) * 1e3, 2),
        "rebuilds_steady": rebuilds_steady, "rebuilds_churn": server.placer.rebuilds - rebuilds_steady,
        "liars": len(liars), "liar_agent_share": round(len(liars) / n, 4),
        "liar_copy_share": round(liar_copies / copies, 4), "liar_bound_per_liar_network": round(bound, 4),
        "unvetted_copy_share": round(unvetted_copies / copies, 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/placement_scale.py", description=__doc__.split("\n")[0])
    p.add_argument("agents", nargs="*", type=int, default=[1000, 10000])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = [measure(n, args.calls, args.seed) for n in args.agents]
    print(f"{'agents':>7} {'nets':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'churn p50':>9} {'churn p99':>9} {'rebuild ms':>10} {'worst':>6} {'rebuilds':>8} "
          f"{'liars':>6} {'liar copies':>11} {'unvetted':>8}")
    for r in results:
        w, c = r["where_to_upload"], r["where_to_upload_churn"]
        print(f"{r['agents']:>7} {r['networks']:>6} {w['p50_ms']:>7.3f} {w['p99_ms']:>7.3f} {w['max_ms']:>7.2f} "
              f"{c['p50_ms']:>9.3f} {c['p99_ms']:>9.3f} {r['rebuild_ms']:>10.1f} {r['timer_rebuild_ms_max']:>6.1f} "
              f"{r['rebuilds_steady']:>3}/{r['rebuilds_churn']:<4} {r['liar_agent_share']:>6.1%} "
              f"{r['liar_copy_share']:>11.2%} {r['unvetted_copy_share']:>8.2%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
