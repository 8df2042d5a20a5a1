"""The discovery tier at scale: who-has and where-to-upload latency and server RSS with N agents.

A real `twistd dsss-server` (started by tools.harness, `--http-rate 100000` so the benchmark's
own queries are not rate-limited, heartbeat 5 s) and, in one other process (`python
bench/discovery_scale.py sim ...`), N simulated agents that speak the real control protocol:
each has its own Ed25519 key, its own TCP control connection (the real `ControlLineProtocol`
adapter, lines from `dsss.wire.control`) and its own UDP socket, answers `Hi` with a signed
`REGISTER`, takes the `WELCOME` token, sends `\\0PING <token>` over UDP every heartbeat, reports
its parts with `HAVE`, and answers `WHO_HAS`, `INTRODUCTION_REQUEST` and `PING`.

The server's per-IP limits are respected rather than lifted: at most 32 unregistered control
connections per source IP, 20 UDP datagrams/s per source address (one socket per agent, one
PING per heartbeat). Agent i's control connection and UDP socket are bound to an address of its
own on a loopback /24 of its own (127.A.B.1, i + 1 = 256 A + B, which Linux loopback accepts
with no setup), so that the server's default placement (one copy per /24) sees N networks.

Parts: every agent reports `parts_per_agent` parts; part j is held by agents 3j, 3j+1, 3j+2
(mod N), so each who-has asks exactly three agents, as with 3 replicas.

All the agent counts run at once (one server and one simulator process each), and the queries
come from the bench process over one persistent HTTP connection per server, one at a time
(latency, not throughput), request k to every server in a rotating order before request k+1:
a burst of load from elsewhere on the machine then hits every count alike, so their
percentiles compare. `GET /api/who-has?q=<part>`, then `GET /api/where-to-upload?size=1048576`,
each after a warm-up of 20 requests.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIM_BATCH = 50
HEARTBEAT = 5.0


def part_hash(j: int) -> str:
    return hashlib.blake2b(f"dsss-bench-part-{j}".encode(), digest_size=32).hexdigest()


def part_count(agents: int, parts_per_agent: int) -> int:
    return max(1, agents * parts_per_agent // 3)


def holders(j: int, agents: int) -> set[int]:
    return {(3 * j + k) % agents for k in range(3)}


def source_ip(i: int) -> str:
    """Agent i's address: on a /24 of its own, never 127.0.0.0/24 (the server's)."""
    n = i + 1
    return f"127.{n // 256}.{n % 256}.1"


# --- the simulated agents (a separate process) ------------------------------------------------


def run_sim(args: argparse.Namespace) -> int:
    from nacl.signing import SigningKey
    from twisted.internet import defer, reactor, stdio, task
    from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol

    from twisted.python.failure import Failure

    import dsss
    from dsss.errors import RemoteProtocolError
    from dsss.lineproto import ControlLineProtocol
    from dsss.wire import control as wc
    from dsss.wire.datagram import DPing, encode_datagram

    n = args.agents
    blocks: list[list[str]] = [[] for _ in range(n)]
    for j in range(part_count(n, args.parts_per_agent)):
        h = part_hash(j)
        for i in holders(j, n):
            blocks[i].append(h)
    server_host = "127.0.0.1"
    started = time.monotonic()
    counters = {"registered": 0, "who_has": 0, "intro": 0}

    class Pinger(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            pass  # PONG <observed>: nothing to learn here

    class SimAgent(ControlLineProtocol):
        def __init__(self, index: int, done: defer.Deferred[None]) -> None:
            super().__init__(reactor)
            self.index = index
            self.key = SigningKey.generate()
            self.agent_id = self.key.verify_key.encode().hex()
            self.blocks = set(blocks[index])
            self.welcome: wc.Welcome | None = None
            self.done = done
            self.udp: Any = None
            self.pinger: task.LoopingCall | None = None

        def trusted(self) -> bool:
            return self.welcome is not None

        def handle_request(self, msg: wc.Request) -> wc.Reply | None:
            if isinstance(msg, wc.Hi):
                unsigned = wc.Register(self.agent_id, 1, 1 << 40, 1 << 39, dsss.__version__, "")
                signature = self.key.sign(unsigned.signed_bytes(msg.session)).signature.hex()
                reg = wc.Register(**{**unsigned.__dict__, "signature": signature})
                self.request(reg, 60).addCallbacks(self.welcomed, self.failed)
                return None
            if isinstance(msg, wc.Ping):
                return wc.Pong()
            if isinstance(msg, wc.WhoHas):
                counters["who_has"] += 1
                return wc.Bit(msg.block in self.blocks)
            if isinstance(msg, wc.IntroductionRequest):
                counters["intro"] += 1
                return wc.IntroKey(secrets.token_hex(16))
            raise RemoteProtocolError(f"unexpected {type(msg).__name__}")

        def failed(self, f: Any) -> None:
            print(f"sim agent {self.index}: registration failed: {f.getErrorMessage()}", file=sys.stderr)
            if not self.done.called:
                self.done.errback(f)

        def welcomed(self, reply: wc.Reply) -> None:
            if not isinstance(reply, wc.Welcome):
                self.failed(Failure(RuntimeError(f"registration refused: {reply!r}")))
                return
            self.welcome = reply
            self.udp = reactor.listenUDP(0, Pinger(), interface=source_ip(self.index))
            target = (server_host, reply.udp_port)
            ping = encode_datagram(DPing(reply.token))
            self.pinger = task.LoopingCall(lambda: self.udp.write(ping, target))
            self.pinger.start(reply.heartbeat, now=True)
            reports = [self.request(wc.Have(group), 60) for group in wc.chunked(sorted(self.blocks))]
            defer.gatherResults(reports).addCallbacks(self.reported, self.failed)

        def reported(self, _: Any) -> None:
            counters["registered"] += 1
            if not self.done.called:
                self.done.callback(None)

        def connectionLost(self, reason: Any = None) -> None:
            super().connectionLost(reason)
            if self.pinger is not None and self.pinger.running:
                self.pinger.stop()
            if not self.done.called:
                self.done.errback(RuntimeError(f"sim agent {self.index} lost its control connection"))

    class SimFactory(ClientFactory):
        def __init__(self, index: int, done: defer.Deferred[None]) -> None:
            self.index, self.done = index, done

        def buildProtocol(self, addr: Any) -> SimAgent:
            return SimAgent(self.index, self.done)

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            if not self.done.called:
                self.done.errback(reason)

    agents_done: list[defer.Deferred[None]] = []

    class Control(Protocol):
        def connectionLost(self, reason: Any = None) -> None:  # stdin closed: stop
            if reactor.running:
                reactor.stop()

    async def main() -> None:
        for start in range(0, n, SIM_BATCH):
            batch = []
            for i in range(start, min(n, start + SIM_BATCH)):
                d: defer.Deferred[None] = defer.Deferred()
                reactor.connectTCP(server_host, args.control_port, SimFactory(i, d), timeout=30,
                                   bindAddress=(source_ip(i), 0))
                batch.append(d)
            await defer.gatherResults(batch)
            agents_done.extend(batch)
        print(f"READY {counters['registered']} {time.monotonic() - started:.3f}", flush=True)

    def start() -> None:
        d = defer.ensureDeferred(main())

        def failed(f: Any) -> None:
            print(f"FAILED {f.getErrorMessage()}", flush=True)
            reactor.stop()

        d.addErrback(failed)

    stdio.StandardIO(Control())
    reactor.callWhenRunning(start)
    reactor.run()
    print(json.dumps(counters), file=sys.stderr)
    return 0


# --- the controller (in the bench process) ------------------------------------------------------


class Scale:
    """One real discovery server with N simulated agents (in their own process)."""

    def __init__(self, agents: int, base: Path, *, parts_per_agent: int = 100) -> None:
        import shutil

        from tools.harness import LocalNetwork

        shutil.rmtree(base, ignore_errors=True)  # the harness reads ports from old logs otherwise
        self.agents = agents
        self.base = base
        self.parts_per_agent = parts_per_agent
        self.net = LocalNetwork(base, heartbeat=HEARTBEAT, replicas=3)
        self.sim: subprocess.Popen[str] | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.rss: dict[str, int | None] = {}
        self.register_seconds = 0.0
        self.parts_indexed = 0

    def start(self) -> None:
        from common import log, proc_status_kb
        from tools.harness import child_env

        net = self.net
        net.start_server("--http-rate", "100000")
        assert net.server is not None
        self.rss["no_agents"] = proc_status_kb(net.server.pid, "VmRSS")
        t0 = time.monotonic()
        self.sim = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "sim", "--agents", str(self.agents),
             "--control-port", str(net.control_port), "--parts-per-agent", str(self.parts_per_agent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.base / "sim.stderr", "w"),
            env=child_env(), text=True,
        )
        assert self.sim.stdout is not None
        line = self.sim.stdout.readline().strip()
        if not line.startswith("READY"):
            raise RuntimeError(f"simulated agents failed: {line or 'no output'}; see {self.base / 'sim.stderr'}")
        self.register_seconds = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while True:
            status = net.status()
            live = status["totals"]["live"]
            if live == self.agents:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {live} of {self.agents} simulated agents are live")
            time.sleep(0.5)
        self.parts_indexed = status["totals"]["parts-indexed"]
        self.rss["registered"] = proc_status_kb(net.server.pid, "VmRSS")
        log(f"discovery: {self.agents} agents registered in {self.register_seconds:.1f}s; "
            f"server RSS {self.rss['registered']} kB")

    def wait_warm(self) -> None:
        while self.net.http("/api/info")[1].get("warming"):
            time.sleep(0.5)

    def query(self, path: str) -> tuple[float, int]:
        """One GET on the persistent connection: (seconds, number of addresses answered)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.net.http_port, timeout=30)
        t0 = time.perf_counter()
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"GET {path} -> {resp.status}: {body[:200]!r}")
        return dt, len(json.loads(body).get("addresses", []))

    def stop(self) -> None:
        from common import proc_status_kb

        if self.net.server is not None:
            self.rss["after_queries"] = proc_status_kb(self.net.server.pid, "VmRSS")
            self.rss["peak"] = proc_status_kb(self.net.server.pid, "VmHWM")
        if self.conn is not None:
            self.conn.close()
        if self.sim is not None and self.sim.poll() is None:
            assert self.sim.stdin is not None
            self.sim.stdin.close()
            try:
                self.sim.wait(30)
            except subprocess.TimeoutExpired:
                self.sim.kill()
                self.sim.wait(5)
        self.net.stop()


def _ms(values: list[float]) -> dict[str, float]:
    from common import percentile

    return {"p50": percentile(values, 50) * 1e3, "p99": percentile(values, 99) * 1e3,  # type: ignore[operator]
            "min": min(values) * 1e3, "max": max(values) * 1e3}


def measure(counts: list[int], base: Path, *, requests: int = 500, parts_per_agent: int = 100,
            warmup: int = 20) -> dict[str, Any]:
    """Start a server with N simulated agents for every N in `counts`, all at once, then query
    them in turn (request k goes to every server before request k+1, in a rotating order), so
    that a change in the machine's load hits every N alike and their percentiles compare."""
    scales = [Scale(n, base / f"n{n}", parts_per_agent=parts_per_agent) for n in counts]
    try:
        for sc in scales:
            sc.start()
        for sc in scales:
            sc.wait_warm()
        rng = random.Random(1)
        lat: dict[str, dict[int, list[float]]] = {"who": {n: [] for n in counts}, "where": {n: [] for n in counts}}
        answers: dict[str, dict[int, dict[str, int]]] = {"who": {n: {} for n in counts},
                                                         "where": {n: {} for n in counts}}
        for kind in ("who", "where"):
            for k in range(requests + warmup):
                order = scales[k % len(scales):] + scales[:k % len(scales)]
                for sc in order:
                    if kind == "who":
                        part = part_hash(rng.randrange(part_count(sc.agents, parts_per_agent)))
                        path = f"/api/who-has?q={part}"
                    else:
                        path = "/api/where-to-upload?size=1048576"
                    dt, n_addr = sc.query(path)
                    if k >= warmup:
                        lat[kind][sc.agents].append(dt)
                    a = answers[kind][sc.agents]
                    a[str(n_addr)] = a.get(str(n_addr), 0) + 1
    finally:
        for sc in scales:
            sc.stop()
    return {
        str(sc.agents): {
            "agents": sc.agents,
            "parts_per_agent": parts_per_agent,
            "parts_indexed": sc.parts_indexed,
            "requests": requests,
            "register_seconds": sc.register_seconds,
            "who_has_ms": _ms(lat["who"][sc.agents]),
            "who_has_answers": answers["who"][sc.agents],
            "where_to_upload_ms": _ms(lat["where"][sc.agents]),
            "where_to_upload_answers": answers["where"][sc.agents],
            "server_rss_kb": sc.rss,
            "who_has_values_ms": [round(v * 1e3, 3) for v in lat["who"][sc.agents]],
            "where_to_upload_values_ms": [round(v * 1e3, 3) for v in lat["where"][sc.agents]],
        }
        for sc in scales
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("sim", help="run N simulated agents against a server (used by measure())")
    s.add_argument("--agents", type=int, required=True)
    s.add_argument("--control-port", type=int, required=True)
    s.add_argument("--parts-per-agent", type=int, default=100)
    m = sub.add_parser("measure", help="measure at the given agent counts and print JSON")
    m.add_argument("counts", type=int, nargs="+")
    m.add_argument("--requests", type=int, default=500)
    m.add_argument("--base", default=None)
    args = ap.parse_args()
    if args.mode == "sim":
        return run_sim(args)
    import tempfile

    base = Path(args.base or tempfile.mkdtemp(prefix="dsss-disc-"))
    out = measure(args.counts, base, requests=args.requests)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
