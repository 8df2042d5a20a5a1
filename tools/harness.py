"""Run a whole DSSS network on loopback as real `twistd` processes (for tests, benchmarks and the demo).

Every process listens on port 0 and the harness reads the actual ports from its readiness line,
so several networks can run side by side. Only processes started here are ever signalled, by pid.

Each agent runs at an address of its own on a loopback /24 of its own (127.0.1.1, 127.0.2.1, ...;
Linux routes all of 127.0.0.0/8 to the loopback interface with no setup), its UDP socket and its
control connection both leaving from there, so the server's default placement (one copy of a
part per /24, dsss.server.placement) sees distinct networks as it would on the Internet. With
`distinct_hosts=False` every agent runs at 127.0.0.1 and the server gets `--distinct-networks
off`, the one-machine setting.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import dsss

REPO_ROOT = Path(dsss.__file__).resolve().parent.parent
SERVER_READY = re.compile(r"DSSS server ready http=(\S+):(\d+) control=(\S+):(\d+) udp=(\S+):(\d+)")
# `twistd` itself, run by this interpreter (the script may not be on PATH in a venv).
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
AGENT_READY = re.compile(r"DSSS agent ready id=([0-9a-f]{64}) udp=(\S+)")

T = TypeVar("T")


def wait_until(what: str, check: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
               detail: Callable[[], object] | None = None) -> T:
    """Poll `check` until it returns something true, and return that; an AssertionError naming
    `what` (and what `detail()` then says) after `timeout` seconds. For an event another process
    makes happen (a log line, a status counter, a file), never as a pause to see that nothing
    happens."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            more = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}{more}")
        time.sleep(interval)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("DSSS_SERVER", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies (Linux), so a crashed
    test run never leaves daemons behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 20.0, *, after: int = 0) -> re.Match[str]:
        """Wait until the log (from offset `after`) matches; fail early if the process exits."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log()[after:])
            if m:
                return m
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log {rx.pattern!r} in {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)


@dataclass
class AgentProc(Proc):
    storage: Path = Path()
    agent_id: str = ""
    address: str = ""
    extra: list[str] = field(default_factory=list)


class LocalNetwork:
    # Where the server listens, and the command prefix it runs under (subclasses place it
    # elsewhere, e.g. in a network namespace).
    server_ip = "127.0.0.1"
    # Agents on their own loopback /24s (see the module docstring); a subclass whose agents
    # share addresses (one NAT) sets it False.
    distinct_hosts = True

    def server_prefix(self) -> Sequence[str]:
        return ()

    def __init__(
        self,
        base: str | os.PathLike[str],
        *,
        heartbeat: float = 1.0,
        replicas: int = 3,
        datagram_size: int = 65000,
        distinct_hosts: bool | None = None,
        store: str = "memory",
    ) -> None:
        if distinct_hosts is not None:
            self.distinct_hosts = distinct_hosts
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.heartbeat = heartbeat
        self.store = store  # the server's --store
        self.replicas = replicas
        self.datagram_size = datagram_size
        self.server: Proc | None = None
        self.agents: list[AgentProc] = []
        self.procs: list[Proc] = []
        self.http_port = 0
        self.control_port = 0
        self.udp_port = 0
        self.key = self.base / "client.key"
        self._count = 0
        self._hosts: dict[str, str] = {}  # agent name -> the loopback address it runs at
        self._next_host = 0

    # --- processes -----------------------------------------------------------------------------

    def _spawn(self, name: str, plugin_args: list[str], cls: type[Proc] = Proc, *,
               prefix: Sequence[str] = (), program: Sequence[str] = TWISTD, **kw: Any) -> Any:
        """Start `twistd` with `plugin_args`; `prefix` goes before it (e.g. `ip netns exec NS`,
        which execs in place, so the Proc's pid is still twistd's). `program` is the command
        that runs twistd (a test may wrap the real program in a launcher of its own)."""
        self._count += 1
        log_path = self.base / f"{name}.log"
        args = [*prefix, *program, "--nodaemon", "--pidfile=", f"--logfile={log_path}", *plugin_args]
        popen = subprocess.Popen(args, env=child_env(), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=open(self.base / f"{name}.stderr", "ab"),
                                 preexec_fn=_die_with_parent)
        proc = cls(name, args, log_path, popen, **kw)
        self.procs.append(proc)
        return proc

    def start_server(self, *extra: str, reuse_ports: bool = False) -> Proc:
        if reuse_ports and self.http_port:
            http, control, udp = self.http_port, self.control_port, self.udp_port
        else:
            http = control = udp = 0
        offset = 0
        if self.server is not None and self.server.log_path.exists():
            offset = len(self.server.log())
        ip = self.server_ip
        args = [
            "dsss-server",
            f"--http=tcp:{http}:interface={ip}",
            f"--control=tcp:{control}:interface={ip}",
            f"--udp={ip}:{udp}",
            f"--heartbeat={self.heartbeat}",
            f"--replicas={self.replicas}",
            *([] if self.distinct_hosts else ["--distinct-networks=off"]),
            *([] if self.store == "memory" else [f"--store={self.store}"]),
            *extra,
        ]
        proc = self._spawn("server", args, prefix=self.server_prefix())
        m = proc.wait_for(SERVER_READY, after=offset)
        self.http_port, self.control_port, self.udp_port = int(m.group(2)), int(m.group(4)), int(m.group(6))
        self.server = proc
        return proc

    @property
    def url(self) -> str:
        return f"http://{self.server_ip}:{self.http_port}"

    def agent_host(self, name: str, host: str | None = None) -> str:
        """The loopback address agent `name` runs at: its own /24 (127.0.N.1, N counting the
        agents named so far, so a restarted agent keeps its address), or 127.0.0.1; `host` (a
        loopback address) puts it there instead, from now on."""
        if host is not None:
            self._hosts[name] = host
        if name in self._hosts:
            return self._hosts[name]
        if not self.distinct_hosts:
            return "127.0.0.1"
        if name not in self._hosts:
            n = self._next_host = self._next_host + 1
            if n >= 256 * 256:
                raise RuntimeError("no loopback /24 left for another agent")
            self._hosts[name] = f"127.{n // 256}.{n % 256}.1"
        return self._hosts[name]

    def start_agent(self, name: str | None = None, *extra: str, wait: bool = True,
                    host: str | None = None, program: Sequence[str] = TWISTD) -> AgentProc:
        """Start agent `name` (with `extra` options) at `agent_host(name, host)`; `program`
        runs twistd (see `_spawn`)."""
        name = name or f"agent{len(self.agents) + 1}"
        storage = self.base / name
        host = self.agent_host(name, host)
        args = [
            "dsss-agent",
            f"--storage={storage}",
            f"--server=127.0.0.1:{self.control_port}",
            f"--udp={host}:0",
            *([f"--control-source={host}"] if host != "127.0.0.1" else []),
            f"--datagram-size={self.datagram_size}",
            *extra,
        ]
        return self._run_agent(name, args, wait, program=program, storage=storage, extra=list(extra))

    def _run_agent(self, name: str, args: list[str], wait: bool, **spawn_kw: Any) -> AgentProc:
        """Start (or restart, replacing the old entry) agent `name`; with `wait`, until its
        readiness line, whose id and address it records."""
        existing = [a for a in self.agents if a.name == name]
        offset = len(existing[0].log()) if existing else 0
        proc: AgentProc = self._spawn(name, args, AgentProc, **spawn_kw)
        if existing:
            self.agents[self.agents.index(existing[0])] = proc
        else:
            self.agents.append(proc)
        if wait:
            m = proc.wait_for(AGENT_READY, after=offset)
            proc.agent_id, proc.address = m.group(1), m.group(2)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    # --- the API and the client -----------------------------------------------------------------

    def http(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def status(self) -> dict[str, Any]:
        code, doc = self.http("/api/status")
        assert code == 200, doc
        return doc

    def live_addresses(self) -> set[str]:
        return {a["address"] for a in self.status()["agents"] if a["live"]}

    def wait_live(self, count: int, timeout: float = 20.0) -> set[str]:
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_addresses()
            if len(live) == count:
                return live
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {count} live agents, have {len(live)}: {self.status()}")
            time.sleep(0.1)

    def client(self, *args: str, key: Path | None = None, check: bool = True, timeout: float = 120.0,
               stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-m", "dsss.client", "--server", self.url, "--key", str(key or self.key), *args]
        r = subprocess.run(cmd, env=child_env(), input=stdin, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"client {args} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        return r
