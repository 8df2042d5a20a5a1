"""The DSSS side: a real network on loopback (dsss.harness.LocalNetwork) and the real CLI.

A server and four agents run as `twistd` processes (replicas 3, heartbeat 1 s, 65000-byte QUIC
datagrams on loopback); every operation is one `python -m dsss.client ...` process, timed from
start to exit (what a user waits for), with its peak RSS and CPU time from wait4, and the CPU
the server and agents used meanwhile.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from common import proc_cpu, run_timed

from dsss.harness import LocalNetwork, child_env


class DsssNetwork:
    def __init__(self, base: Path, *, agents: int = 4, replicas: int = 3, datagram_size: int = 65000,
                 heartbeat: float = 1.0, server_args: Sequence[str] = (),
                 client_options: Sequence[str] = ()) -> None:
        self.net = LocalNetwork(base, heartbeat=heartbeat, replicas=replicas, datagram_size=datagram_size)
        self.agent_count = agents
        self.server_args = list(server_args)
        self.client_options = list(client_options)  # global CLI flags, e.g. --parallel 8
        self.env = child_env()

    def start(self) -> None:
        self.net.start_server(*self.server_args)
        for _ in range(self.agent_count):
            self.net.start_agent()
        self.net.wait_live(self.agent_count)
        r = self.client("keygen")
        if r["rc"] != 0:
            raise RuntimeError(f"keygen failed: {r['stderr']}")

    def stop(self) -> None:
        self.net.stop()

    @property
    def daemon_pids(self) -> dict[str, int]:
        pids = {a.name: a.pid for a in self.net.agents}
        if self.net.server is not None:
            pids["server"] = self.net.server.pid
        return pids

    def client_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dsss.client", "--server", self.net.url, "--key", str(self.net.key),
                *self.client_options, *args]

    def client(self, *args: str, timeout: float = 7200, rss_every: float | None = None) -> dict[str, Any]:
        """Run the CLI once; the result of run_timed plus the daemons' CPU seconds meanwhile."""
        pids = self.daemon_pids
        before = {name: proc_cpu(pid) for name, pid in pids.items()}
        r = run_timed(self.client_command(*args), env=self.env, timeout=timeout, rss_every=rss_every)
        r["daemons_cpu_s"] = {name: round(proc_cpu(pid) - before[name], 3) for name, pid in pids.items()}
        return r

    def _checked(self, r: dict[str, Any], what: str) -> dict[str, Any]:
        if r["rc"] != 0:
            raise RuntimeError(f"dsss {what} failed ({r['rc']}): {r['stderr'][-1500:]}")
        return r

    def put(self, path: Path, *, rss_every: float | None = None) -> dict[str, Any]:
        r = self._checked(self.client("put", str(path), rss_every=rss_every), "put")
        r["address"] = r.pop("stdout").split()[0]
        return r

    def get(self, address: str, out: Path, *, rss_every: float | None = None) -> dict[str, Any]:
        r = self._checked(self.client("get", address, "-o", str(out), rss_every=rss_every), "get")
        r.pop("stdout", None)
        return r

    def put_many(self, paths: Sequence[Path]) -> dict[str, Any]:
        r = self._checked(self.client("put", *map(str, paths)), "put")
        addresses = [line.split()[0] for line in r.pop("stdout").splitlines() if line.strip()]
        if len(addresses) != len(paths):
            raise RuntimeError(f"put printed {len(addresses)} addresses for {len(paths)} files")
        r["addresses"] = addresses
        return r

    def get_many(self, addresses: Sequence[str], outdir: Path) -> dict[str, Any]:
        """One `get ADDRESS... -o DIR` call for all of them."""
        r = self._checked(self.client("get", *addresses, "-o", str(outdir)), "get")
        lines = [line for line in r.pop("stdout").splitlines() if line.strip()]
        if len(lines) != len(addresses):
            raise RuntimeError(f"get printed {len(lines)} lines for {len(addresses)} addresses")
        return r

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.net.url + "/metrics", timeout=10) as resp:
            return resp.read().decode()

    def api_requests(self) -> int:
        """Discovery requests (who-has, where-to-upload, introduce-me, introduce-many,
        upload-to) the server answered so far, whatever their status (from its /metrics)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith("dsss_http_requests_total{") and any(
                f'endpoint="/api/{name}"' in line
                for name in ("who-has", "where-to-upload", "introduce-me", "introduce-many", "upload-to")
            ):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def rate_limited_responses(self) -> int:
        """HTTP 429 answers the server gave so far (from its /metrics)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith("dsss_http_requests_total{") and 'status="429"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)
