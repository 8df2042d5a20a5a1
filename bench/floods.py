"""Hostile traffic against a real `twistd dsss-server`: its memory and its worst stall under each flood.

Each flood runs for a fixed time against a fresh server (started by tools.harness on 127.0.0.1)
while a prober in a process of its own asks `GET /api/info` from 127.0.0.1 every 20 ms over a
new connection and records how long each answer took (the client's view: it includes the wait
for a CPU on a loaded machine). The server's own record of its longest reactor stall (the
largest delay of a timer due every 50 ms, `dsss_reactor_lag_max_seconds` on /metrics) is read
after the flood; the server's RSS is read from /proc before and after.

Floods (all from 127.0.0.x addresses of this machine, bounded in count and time):

- `idle-http`: N connections that send the start of a request line and then nothing, from
  one IP and from several (the header deadline and per-IP budget at work);
- `claims`: one registered identity reports M parts with `HAVE` (48 per line), as fast as the
  control channel takes them;
- `status`: /api/status and / asked as fast as one client can, from one IP (the observers' rate
  limit and the paged status at work).

    python bench/floods.py [--seconds 10] [--json bench/results/floods.json]

Prints one line per flood: answers, median and worst API latency, refused probes, the worst
reactor stall, RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.signing import SigningKey  # noqa: E402

from dsss.wire import control as wc  # noqa: E402
from tools.harness import LocalNetwork  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def probe(port: int, stop: Any, out: Any) -> None:
    """In a process of its own (so that the flood's Python loop cannot delay it): ask
    /api/info every 20 ms over a new connection until `stop` is set; put (latencies, failed)."""
    latencies: list[float] = []
    failed = 0
    while not stop.is_set():
        start = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if not s.recv(16).startswith(b"HTTP/1.1 200"):
                    failed += 1
                else:
                    latencies.append(time.perf_counter() - start)
        except OSError:
            failed += 1
        stop.wait(0.02)
    out.put((latencies, failed))


def reactor_lag_max(port: int) -> float | None:
    """The server's own record of its longest reactor stall (dsss_reactor_lag_max_seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.50", 0)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("dsss_reactor_lag_max_seconds "):
            return float(line.split()[1])
    return None


def flood_idle_http(net: LocalNetwork, seconds: float, held: list[socket.socket]) -> dict[str, Any]:
    opened = refused = 0
    deadline = time.monotonic() + seconds
    sources = [f"127.0.0.{i}" for i in range(10, 20)]
    while time.monotonic() < deadline and opened + refused < 4000:
        for src in sources:
            try:
                s = socket.create_connection(("127.0.0.1", net.http_port), timeout=2, source_address=(src, 0))
                s.sendall(b"GET /api/info HTTP/1.1\r\n")
                held.append(s)
                opened += 1
            except OSError:
                refused += 1
        time.sleep(0.01)
    return {"connections-opened": opened, "connect-failed": refused}


def flood_claims(net: LocalNetwork, seconds: float, held: list[socket.socket], parts: int = 400_000) -> dict[str, Any]:
    key = SigningKey.generate()
    s = socket.create_connection(("127.0.0.1", net.control_port), timeout=10, source_address=("127.0.0.30", 0))
    held.append(s)
    f = s.makefile("rb")
    session = f.readline().split()[1].decode()
    msg = wc.Register(key.verify_key.encode().hex(), 1, 1 << 40, 1 << 40, "0.0.0", "")
    sig = key.sign(msg.signed_bytes(session)).signature.hex()
    s.sendall(wc.encode(wc.Register(**{**msg.__dict__, "signature": sig})) + b"\n")
    f.readline()  # WELCOME
    sent = 0
    deadline = time.monotonic() + seconds
    batch: list[bytes] = []
    while sent < parts and time.monotonic() < deadline:
        hashes = [os.urandom(32).hex() for _ in range(48)]
        batch.append(b"HAVE " + " ".join(f"{h}:1000" for h in hashes).encode() + b"\n")
        sent += 48
        if len(batch) == 20:
            s.sendall(b"".join(batch))
            batch.clear()
    if batch:
        s.sendall(b"".join(batch))
    return {"have-entries-sent": sent}


def flood_status(net: LocalNetwork, seconds: float, held: list[socket.socket]) -> dict[str, Any]:
    answered = limited = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path in ("/api/status", "/"):
            with socket.create_connection(("127.0.0.1", net.http_port), timeout=5,
                                          source_address=("127.0.0.40", 0)) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                head = s.recv(16)
                if head.startswith(b"HTTP/1.1 200"):
                    answered += 1
                elif head.startswith(b"HTTP/1.1 429"):
                    limited += 1
    return {"status-answered": answered, "status-429": limited}


FLOODS: dict[str, Callable[[LocalNetwork, float, list[socket.socket]], dict[str, Any]]] = {
    "idle-http": flood_idle_http,
    "claims": flood_claims,
    "status": flood_status,
}


def run_one(name: str, seconds: float, base: Path) -> dict[str, Any]:
    net = LocalNetwork(base / name, heartbeat=1.0)
    held: list[socket.socket] = []
    try:
        server = net.start_server("--http-header-timeout=5")
        time.sleep(0.5)
        before = rss_kib(server.pid)
        ctx = multiprocessing.get_context("fork")
        stop, out = ctx.Event(), ctx.Queue()
        prober = ctx.Process(target=probe, args=(net.http_port, stop, out))
        prober.start()
        result = FLOODS[name](net, seconds, held)
        time.sleep(1.0)  # let the server digest what was sent
        stop.set()
        latencies, failed = out.get(timeout=30)
        prober.join()
        after = rss_kib(server.pid)
        lag = reactor_lag_max(net.http_port)
        lat = sorted(latencies)
        return {
            "flood": name,
            **result,
            "probes": len(lat),
            "probes-failed": failed,
            "median-ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "worst-ms": round(lat[-1] * 1000, 2) if lat else None,
            "reactor-stall-max-ms": round(lag * 1000, 1) if lag is not None else None,
            "rss-before-mib": round(before / 1024, 1),
            "rss-after-mib": round(after / 1024, 1),
        }
    finally:
        for s in held:
            s.close()
        net.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--only", nargs="*", choices=sorted(FLOODS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="dsss-floods-") as tmp:
        for name in args.only or list(FLOODS):
            r = run_one(name, args.seconds, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
