"""The DSSS side: a real network on loopback (tools.harness.LocalNetwork) and the real CLI.

A server and four agents run as `twistd` processes (replicas 3, heartbeat 1 s, 65000-byte QUIC
datagrams on loopback); every operation is one `python -m dsss.client ...` process, timed from
start to exit (what a user waits for), with its peak RSS and CPU time from wait4, and the CPU
the server and agents used meanwhile.

The gateway (`python -m dsss.client gateway`, started once by `start_gateway`) is the other way
in: `curl` PUT and GET against it, as Tahoe's web API is measured, each call timed from curl's
start to its exit, with the gateway's CPU and its peak RSS during the call (VmHWM, reset first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from common import proc_cpu, proc_status_kb, run_timed, start_gateway, stop_process

from tools.harness import LocalNetwork, child_env


class DsssNetwork:
    def __init__(self, base: Path, *, agents: int = 4, replicas: int = 3, datagram_size: int = 65000,
                 heartbeat: float = 1.0, server_args: Sequence[str] = (),
                 client_options: Sequence[str] = ()) -> None:
        self.net = LocalNetwork(base, heartbeat=heartbeat, replicas=replicas, datagram_size=datagram_size)
        self.agent_count = agents
        self.server_args = list(server_args)
        self.client_options = list(client_options)  # global CLI flags, e.g. --parallel 8
        self.env = child_env()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_url = ""
        self._token = ""

    def start(self) -> None:
        self.net.start_server(*self.server_args)
        for _ in range(self.agent_count):
            self.net.start_agent()
        self.net.wait_live(self.agent_count)
        r = self.client("keygen")
        if r["rc"] != 0:
            raise RuntimeError(f"keygen failed: {r['stderr']}")

    def stop(self) -> None:
        self.stop_gateway()
        self.net.stop()

    # --- the gateway -------------------------------------------------------------------------------

    def start_gateway(self, *options: str) -> None:
        """Start `dsss gateway` (once) with the network's client options and `options`."""
        if self.gateway is not None:
            return
        self.gateway, self.gateway_url, self._token = start_gateway(
            self.client_command("gateway", "--listen", "tcp:0:interface=127.0.0.1", *options), self.env,
            self.net.base / "gateway.log")

    def stop_gateway(self) -> None:
        gw, self.gateway = self.gateway, None
        if gw is not None:
            stop_process(gw)

    def _curl(self, *args: str) -> dict[str, Any]:
        """One curl call against the gateway: run_timed's figures, the gateway's CPU and peak RSS
        during it, and the daemons' CPU."""
        assert self.gateway is not None, "start_gateway() first"
        pid = self.gateway.pid
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5\n")  # VmHWM back to the current RSS
        except OSError:
            pass
        pids = self.daemon_pids
        before = {name: proc_cpu(p) for name, p in pids.items()}
        gw_before = proc_cpu(pid)
        r = run_timed(["curl", "-sS", "-f", "-H", "Expect:", "-H", f"Authorization: Bearer {self._token}", *args],
                      env=self.env)
        r["gateway_cpu_s"] = round(proc_cpu(pid) - gw_before, 3)
        r["gateway_peak_rss_kb"] = proc_status_kb(pid, "VmHWM")
        r["daemons_cpu_s"] = {name: round(proc_cpu(p) - before[name], 3) for name, p in pids.items()}
        if r["rc"] != 0:
            raise RuntimeError(f"curl {' '.join(args[:3])}... failed ({r['rc']}): {r['stderr'][-800:]}")
        return r

    def put_web(self, path: Path) -> dict[str, Any]:
        r = self._curl("-T", str(path), f"{self.gateway_url}/files?name={path.name}")
        r["address"] = json.loads(r.pop("stdout"))["address"]
        return r

    def get_web(self, address: str, out: Path) -> dict[str, Any]:
        r = self._curl("-o", str(out), f"{self.gateway_url}/files/{address}")
        r.pop("stdout", None)
        return r

    def _curl_config(self, lines: list[str]) -> str:
        path = self.net.base / f"curl-{time.monotonic_ns()}.cfg"
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    def put_many_web(self, paths: Sequence[Path]) -> dict[str, Any]:
        """One curl, one PUT /files per file (as Tahoe's web API is driven)."""
        lines = ['write-out = "\\n"']
        for p in paths:
            lines += [f'url = "{self.gateway_url}/files?name={p.name}"', f'upload-file = "{p}"']
        r = self._curl("--config", self._curl_config(lines))
        docs = [json.loads(line) for line in r.pop("stdout").splitlines() if line.strip()]
        if len(docs) != len(paths):
            raise RuntimeError(f"the gateway answered {len(docs)} of {len(paths)} PUTs")
        r["addresses"] = [doc["address"] for doc in docs]
        return r

    def get_many_web(self, addresses: Sequence[str], outdir: Path) -> dict[str, Any]:
        os.makedirs(outdir, exist_ok=True)
        lines = []
        for i, address in enumerate(addresses):
            lines += [f'url = "{self.gateway_url}/files/{address}"', f'output = "{outdir}/f{i:04d}"']
        r = self._curl("--config", self._curl_config(lines))
        r.pop("stdout", None)
        return r

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
