"""The control plane on a durable store, in process: many agents x parts on SQLite or PostgreSQL.

Drives the real cores on the real reactor: `DiscoveryServer` with its store, and one real
`AgentConnection` (the server's control adapter) per simulated agent on an in-memory transport,
fed the lines a real agent sends (a signed REGISTER, HAVE lines of 48 parts, then after a restart
DIGEST/SYNCED computed with dsss.holdings as the reference agent does). Part j is held by agents
3j, 3j+1, 3j+2 (mod N): 3 copies. Agents are made live (a UDP PING's bookkeeping) on addresses of
their own /24s, so placement sees N networks.

Reports: server RSS growth, HAVE ingest rate and the time for the store to catch up with it,
where-to-upload latency (`DiscoveryServer.where_to_upload`), who-has lookup latency (the index
lookup `Registry.candidates`; the agents' WHO_HAS round trip is network time and not measured
here), the worst reactor stall (largest gap of a 10 ms timer beyond its period) during ingest
and during the restart, and restart-to-whole: a new server on the same store, every agent
registering again and confirming its holdings by digest, until warming ends.

    python bench/store_scale.py --store sqlite --agents 1000 --parts 300000
    python bench/store_scale.py --store postgresql --agents 1000 --parts 100000

With `--store postgresql` a throw-away PostgreSQL is started (tools/postgres.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.signing import SigningKey  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.testing import StringTransportWithDisconnection  # noqa: E402

from dsss.holdings import Holdings  # noqa: E402
from dsss.model import PeerAddress  # noqa: E402
from dsss.server.control import AgentConnection, AgentConnectionFactory  # noqa: E402
from dsss.server.config import ServerConfig  # noqa: E402
from dsss.server.service import DiscoveryServer  # noqa: E402
from dsss.wire import control as wc  # noqa: E402

PART = 1 << 20
READ_LINES = 18
"""HAVE lines (about 3.5 KB each) in one 64 KiB read of a control connection."""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_hash(j: int) -> str:
    return hashlib.blake2b(f"dsss-bench-part-{j}".encode(), digest_size=32).hexdigest()


class StallMeter:
    """A 10 ms timer; the worst lateness seen is the worst reactor stall."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.worst = 0.0
        self.last = time.monotonic()
        self.loop = task.LoopingCall(self._tick)
        self.loop.clock = reactor

    def _tick(self) -> None:
        now = time.monotonic()
        self.worst = max(self.worst, now - self.last - 0.01)
        self.last = now

    def start(self) -> None:
        self.worst, self.last = 0.0, time.monotonic()
        self.loop.start(0.01, now=False)

    def stop(self) -> float:
        self.loop.stop()
        return self.worst


class SimAgent:
    def __init__(self, i: int, key: SigningKey) -> None:
        self.i = i
        self.key = key
        self.agent_id = key.verify_key.encode().hex()
        self.seq = 0
        self.parts: list[str] = []
        self.conn: AgentConnection | None = None
        self.transport: StringTransportWithDisconnection | None = None

    def address(self) -> PeerAddress:
        n = self.i + 1
        return PeerAddress(f"127.{1 + n // 256}.{n % 256}.1", 40000)

    def connect(self, server: DiscoveryServer) -> None:
        factory = AgentConnectionFactory(server)
        conn = factory.buildProtocol(None)
        assert conn is not None
        t = StringTransportWithDisconnection()
        t.protocol = conn
        conn.makeConnection(t)
        self.conn, self.transport = conn, t

    def lines(self) -> list[str]:
        assert self.transport is not None
        out = self.transport.value().decode().splitlines()
        self.transport.clear()
        return out

    def send(self, msg: Any) -> None:
        assert self.conn is not None
        self.conn.dataReceived(wc.encode(msg) + b"\n")

    def register(self) -> None:
        (hi,) = self.lines()
        session = hi.split()[1]
        self.seq += 1
        msg = wc.Register(self.agent_id, self.seq, 1 << 44, 1 << 43, "bench", "")
        sig = self.key.sign(msg.signed_bytes(session)).signature.hex()
        self.send(wc.Register(**{**msg.__dict__, "signature": sig}))


async def wait_until(reactor: Any, cond: Any, timeout: float) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise TimeoutError("timed out")
        await task.deferLater(reactor, 0.02, lambda: None)
    return time.monotonic() - started


async def welcomed(reactor: Any, server: DiscoveryServer, agents: list[SimAgent]) -> None:
    """Register every agent (in chunks, a reactor turn between) and make it live."""
    for k in range(0, len(agents), 50):
        for a in agents[k:k + 50]:
            a.connect(server)
            a.register()
        await task.deferLater(reactor, 0, lambda: None)
    await wait_until(reactor, lambda: all(a.conn is not None and a.conn.record is not None for a in agents), 120)
    now = server.now()
    for a in agents:
        assert a.conn is not None and a.conn.record is not None
        server.registry.heard_udp(a.conn.record.token, a.address(), now)
        a.lines()


async def run(reactor: Any, args: argparse.Namespace, url: str) -> dict[str, Any]:
    n_agents, n_parts = args.agents, args.parts
    agents = [SimAgent(i, SigningKey.generate()) for i in range(n_agents)]
    for j in range(n_parts):
        h = part_hash(j)
        for k in range(3):
            agents[(3 * j + k) % n_agents].parts.append(h)
    claims = 3 * n_parts
    config = ServerConfig(heartbeat=3600.0, store=url, repair_after=0, audit_rate=0.01,
                          claims_per_network=10**9, agents_per_ip=10**6, agent_connections=10**6)
    meter = StallMeter(reactor)
    result: dict[str, Any] = {"store": url.split(":", 1)[0], "agents": n_agents, "parts": n_parts,
                              "claims": claims}

    rss0 = rss_mb()
    server = DiscoveryServer(reactor, config)
    await server.load()
    meter.start()
    await welcomed(reactor, server, agents)
    t0 = time.monotonic()
    for a in agents:
        groups = wc.chunked(a.parts)
        for k in range(0, len(groups), READ_LINES):
            for group in groups[k:k + READ_LINES]:
                a.send(wc.Have(group, (PART,) * len(group)))
            # A reactor turn per READ_LINES lines, as a 64 KiB socket read brings them.
            await task.deferLater(reactor, 0, lambda: None)
        a.lines()
    ingest = time.monotonic() - t0
    journal = server.journal
    assert journal is not None
    caught_up = await wait_until(reactor, lambda: journal.pending == 0, 3600)
    result["ingest"] = {"seconds": round(ingest, 2), "claims_per_s": round(claims / ingest),
                        "store_caught_up_after_s": round(caught_up, 2),
                        "store_claims_per_s": round(claims / (ingest + caught_up)),
                        "worst_stall_ms": round(meter.stop() * 1000, 1)}
    result["server_rss_mb"] = round(rss_mb() - rss0, 1)
    result["counts"] = server.registry.counts()

    server.refresh_placement()
    server.placer.refresh(server.registry, server.now() + 10)
    lat = []
    for _ in range(2000):
        s = time.perf_counter()
        server.where_to_upload(PART, [])
        lat.append(time.perf_counter() - s)
    lat.sort()
    result["where_to_upload_us"] = {"p50": round(lat[len(lat) // 2] * 1e6, 1),
                                    "p99": round(lat[int(len(lat) * 0.99)] * 1e6, 1)}
    lat = []
    now = server.now()
    for j in range(0, n_parts, max(1, n_parts // 2000)):
        h = part_hash(j)
        s = time.perf_counter()
        found = server.registry.candidates(h, now)
        lat.append(time.perf_counter() - s)
        assert len(found) == 3
    lat.sort()
    result["who_has_lookup_us"] = {"p50": round(lat[len(lat) // 2] * 1e6, 1),
                                   "p99": round(lat[int(len(lat) * 0.99)] * 1e6, 1)}

    # Restart: the old server goes (its connections drop), a new one reads the store back.
    for a in agents:
        assert a.transport is not None
        a.transport.loseConnection()
    await server.store.close()
    del server
    digests = {a.agent_id: Holdings(a.parts) for a in agents}
    meter.start()
    t0 = time.monotonic()
    server = DiscoveryServer(reactor, config)
    await server.load()
    loaded = time.monotonic() - t0
    await welcomed(reactor, server, agents)
    for a in agents:
        a.send(wc.Digest("", digests[a.agent_id].digest("")))
        a.send(wc.Synced())
        await task.deferLater(reactor, 0, lambda: None)
    whole = await wait_until(reactor, lambda: not server.warming(), 3600)
    total = time.monotonic() - t0
    replies = [line for a in agents for line in a.lines()]
    result["restart"] = {"store_loaded_s": round(loaded, 2), "whole_s": round(total, 2),
                         "digest_phase_s": round(whole, 2),
                         "have_entries_sent": server.stats["have-entries"],
                         "claims_restored": server.stats["claims-restored"],
                         "diff_replies_nonempty": sum(1 for r in replies if r.startswith("DIFF ")),
                         "worst_stall_ms": round(meter.stop() * 1000, 1)}
    assert server.registry.counts()["indexed-parts"] == n_parts, server.registry.counts()
    await server.store.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--parts", type=int, default=100_000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dsss-store-scale-"))
    pg = None
    if args.store == "postgresql":
        from tools.postgres import PostgresServer

        pg = PostgresServer(base / "pg")
        pg.start()
        url = pg.createdb("bench")
    else:
        url = f"sqlite:{base / 'server.sqlite'}"
    out: dict[str, Any] = {}
    try:
        task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args, url, out)))
    except SystemExit:
        pass
    finally:
        if pg is not None:
            pg.stop()
    return 0


async def _main(reactor: Any, args: argparse.Namespace, url: str, out: dict[str, Any]) -> None:
    result = await run(reactor, args, url)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
