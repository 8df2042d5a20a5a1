"""The demo (`make demo`, `python -m tools.demo`): a network on loopback, a put and a get, a clean stop.

Starts a discovery server and three storage agents as real `twistd` processes (each agent on a
loopback /24 of its own, so the server places a part's copies on distinct networks), creates a key,
stores a sample file, fetches it back, checks it byte for byte, and stops everything.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from tools.harness import LocalNetwork


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    p.add_argument("--size", default=20 * 1024 * 1024 + 12345, type=int, help="sample file size in bytes")
    p.add_argument("--agents", default=3, type=int)
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="dsss-demo-"))
    net = LocalNetwork(work, heartbeat=1.0, replicas=min(3, args.agents))
    ok = False
    try:
        server = net.start_server()
        say(f"discovery server up (pid {server.pid}): HTTP {net.url}, control port {net.control_port}, UDP {net.udp_port}")
        for _ in range(args.agents):
            agent = net.start_agent()
            say(f"agent {agent.name} up (pid {agent.pid}), id {agent.agent_id[:16]}..., reached at {agent.address}")
        live = net.wait_live(args.agents)
        code, placement = net.http("/api/where-to-upload?size=1048576")
        say(f"registered agents: {sorted(live)}; where-to-upload answers {placement['addresses']}")

        pub = net.client("keygen").stdout.decode().strip()
        say(f"created a key pair in {net.key} (public key {pub[:16]}...)")
        sample = work / "sample.bin"
        with open(sample, "wb") as f:
            f.write(os.urandom(args.size))
        t0 = time.monotonic()
        out = net.client("put", str(sample)).stdout.decode().split()
        put_s = time.monotonic() - t0
        address = out[0]
        say(f"put {args.size} bytes in {put_s:.2f}s -> address {address}")
        code, holders = net.http(f"/api/who-has?q={address}")
        say(f"the manifest is held by {holders['addresses']}")
        back = work / "sample.out"
        t0 = time.monotonic()
        net.client("get", address, "-o", str(back))
        get_s = time.monotonic() - t0
        same = sample.read_bytes() == back.read_bytes()
        digest = hashlib.blake2b(back.read_bytes(), digest_size=16).hexdigest()
        say(f"get in {get_s:.2f}s; byte-for-byte equal: {same} (blake2b {digest})")
        ok = same
    finally:
        net.stop()
        # twistd shuts down cleanly on SIGTERM, then exits by that signal (-15).
        clean = [p.name for p in net.procs if "Server Shut Down." in p.log()]
        unclean = [p.name for p in net.procs if p.name not in clean]
        say(f"stopped {len(clean)} processes cleanly with SIGTERM" + (f"; not cleanly: {unclean}" if unclean else ""))
        ok = ok and not unclean
        if args.keep or not ok:
            say(f"logs kept in {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    say("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
