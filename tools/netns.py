# -*- test-case-name: tests.nat.test_nat -*-
"""A NAT laboratory in Linux network namespaces (root only), for tests and benchmarks.

```
                         wan namespace: bridge br0, 198.51.100.1/24 (the discovery server)
        +-----------------------+------------------------+-----------------------+
        | 198.51.100.11         | 198.51.100.12          | 198.51.100.50         |
   router r1 (cone)        router r2 (symmetric)     public host p1 (no NAT)
   br0 10.1.0.1/24         br0 10.2.0.1/24
     |        |               |
  h1_1      h1_2            h2_1
  10.1.0.2  10.1.0.3        10.2.0.2
```

- Every namespace, bridge and veth pair is made here; veths have MTU 1500, loopback is up
  everywhere, IPv6 is off (no router advertisements or DAD noise), nothing is routed out of the
  machine: the wan is a bridge inside the wan namespace and has no way out.
- A router masquerades what leaves by its `wan` interface and forwards inbound packets only
  when conntrack has them as ESTABLISHED or RELATED, like a home router. It also drops NEW
  packets addressed to itself (`-A INPUT -i wan -m conntrack --ctstate NEW -j DROP`): a Linux
  router that delivers an early, unsolicited punch to its own stack confirms a conntrack entry
  for it, and then gives the host's reply a new source port, which defeats hole punching.
- Kinds: `cone` is plain MASQUERADE (Linux keeps the host's source port when it can, so every
  destination sees the same public port); `symmetric` is `MASQUERADE --random-fully` (a new
  random public port for each destination: punching cannot work). `udp_timeout=S` lowers the
  router's conntrack UDP timeouts, so an idle mapping is forgotten after S seconds.
- Namespace names are `dsss<pid>x<n>-<role>`; `close()` deletes exactly those, is idempotent, and
  also runs at interpreter exit. `python -m tools.netns cleanup` removes those left by a run
  that was killed (their pid is no longer running).

Processes run in a namespace through `ip netns exec NS ...` (`NatLab.exec_prefix`); code in this
process can run in a namespace on a short-lived thread (`NatLab.call_in`), since a thread may
switch its own network namespace. `NatNetwork` runs a DSSS network (server on the wan, agents on
any hosts, the client on any host) in a `NatLab`.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from tools.harness import AgentProc, LocalNetwork, child_env

T = TypeVar("T")

WAN_PREFIX = "198.51.100"  # TEST-NET-2 (RFC 5737): documentation only, never routed
SERVER_IP = f"{WAN_PREFIX}.1"
NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "dsss"
_NAME_RX = re.compile(rf"^{NAME_PREFIX}(\d+)x(\d+)-[a-z0-9_]+$")
_CLONE_NEWNET = 0x40000000
KINDS = ("cone", "symmetric")
_counter = itertools.count(1)


class LabUnavailable(RuntimeError):
    """This machine cannot build the lab (not root, tools missing, namespaces refused)."""


def unavailable_reason() -> str | None:
    """Why a NatLab cannot be built here, or None if it can (tries a namespace for real)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "NAT tests need root (they build network namespaces and iptables rules)"
    for tool in ("ip", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"NAT tests need `{tool}` (apt-get install iproute2 iptables)"
    probe = f"{NAME_PREFIX}{os.getpid()}x0-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip() or r.returncode}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables-restore"], input=_ruleset("cone", True),
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"iptables does not work in a namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ruleset(kind: str, input_drop: bool) -> str:
    masquerade = "-A POSTROUTING -o wan -j MASQUERADE" + (" --random-fully" if kind == "symmetric" else "")
    lines = [
        "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]", masquerade, "COMMIT",
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
    ]
    if input_drop:
        lines.append("-A INPUT -i wan -m conntrack --ctstate NEW -j DROP")
    lines += [
        "-A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FORWARD -i wan -j DROP",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _setns(ns: str) -> None:
    """Move the calling thread into network namespace `ns`."""
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)
        if setns is not None:  # Python 3.12+
            setns(fd, _CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({ns}): {os.strerror(e)}")
    finally:
        os.close(fd)


def call_in(ns: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run `fn(*args, **kw)` on a new thread inside namespace `ns` and return its result.
    Sockets it creates stay in `ns` and may be used afterwards from any thread."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            _setns(ns)
            box["result"] = fn(*args, **kw)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


@dataclass
class Host:
    """A machine: its own namespace with one interface `eth0` (or the wan itself)."""

    label: str  # "h1_2", "p1", "wan"
    ns: str
    ip: str
    router: "Router | None" = None

    @property
    def public_ip(self) -> str:
        """The address the wan sees this host's packets come from."""
        return self.router.wan_ip if self.router else self.ip


@dataclass
class Router:
    index: int
    ns: str
    kind: str
    wan_ip: str
    lan_ip: str
    udp_timeout: int | None
    input_drop: bool
    hosts: list[Host] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"r{self.index}"


def _ns(where: Host | Router | str) -> str:
    return where if isinstance(where, str) else where.ns


class NatLab:
    """Namespaces joined into a wan with NAT routers and hosts; see the module docstring."""

    def __init__(self, *, mtu: int = 1500) -> None:
        reason = unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        self.mtu = mtu
        self.tag = f"{NAME_PREFIX}{os.getpid()}x{next(_counter)}"
        self.namespaces: list[str] = []
        self.routers: list[Router] = []
        self.public_hosts: list[Host] = []
        self._closed = False
        _open_labs.add(self)
        try:
            self.wan = Host("wan", self._new_ns("wan"), SERVER_IP)
            self._ip(self.wan.ns, "link add br0 type bridge")
            self._ip(self.wan.ns, f"link set br0 mtu {mtu}")
            self._ip(self.wan.ns, f"addr add {SERVER_IP}/24 dev br0")
            self._ip(self.wan.ns, "link set br0 up")
        except BaseException:
            self.close()
            raise

    # --- building ------------------------------------------------------------------------------

    def _run(self, args: Sequence[str], *, input: str | None = None) -> str:
        r = subprocess.run(list(args), input=input, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def _ip(self, ns: str, command: str) -> str:
        return self._run(["ip", "-n", ns, *command.split()])

    def _sysctl(self, ns: str, **values: object) -> None:
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")

            def write(p: str = path, v: object = value) -> None:
                with open(p, "w") as f:
                    f.write(f"{v}\n")

            call_in(ns, write)

    def _new_ns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        self._run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self._ip(name, "link set lo up")
        self._sysctl(name, **{"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        return name

    def _veth(self, ns: str, name: str, peer_ns: str, peer: str) -> None:
        """A veth pair `ns:name` <-> `peer_ns:peer`, both with the lab's MTU, made in place (the
        names are only ever seen inside their own namespaces)."""
        self._run(["ip", "-n", ns, "link", "add", name, "mtu", str(self.mtu), "type", "veth",
                   "peer", "name", peer, "mtu", str(self.mtu), "netns", peer_ns])

    def add_router(self, kind: str = "cone", *, hosts: int = 0, udp_timeout: int | None = None,
                   input_drop: bool = True) -> Router:
        """A NAT router on the wan at 198.51.100.(10+N) with a LAN 10.N.0.0/24 behind it."""
        if kind not in KINDS:
            raise ValueError(f"router kind must be one of {KINDS}, not {kind!r}")
        n = len(self.routers) + 1
        if n > 39:
            raise ValueError("at most 39 routers")
        ns = self._new_ns(f"r{n}")
        router = Router(n, ns, kind, f"{WAN_PREFIX}.{10 + n}", f"10.{n}.0.1", udp_timeout, input_drop)
        self.routers.append(router)
        self._veth(ns, "wan", self.wan.ns, f"r{n}")
        self._ip(self.wan.ns, f"link set r{n} master br0 up")
        self._ip(ns, f"addr add {router.wan_ip}/24 dev wan")
        self._ip(ns, "link set wan up")
        self._ip(ns, "link add br0 type bridge")
        self._ip(ns, f"link set br0 mtu {self.mtu}")
        self._ip(ns, f"addr add {router.lan_ip}/24 dev br0")
        self._ip(ns, "link set br0 up")
        self._ip(ns, f"route add default via {SERVER_IP}")
        self._sysctl(ns, **{"net.ipv4.ip_forward": 1})
        self._run(["ip", "netns", "exec", ns, "iptables-restore"], input=_ruleset(kind, input_drop))
        if udp_timeout is not None:  # conntrack is loaded (and its sysctls exist) once rules use it
            self._sysctl(ns, **{"net.netfilter.nf_conntrack_udp_timeout": udp_timeout,
                                "net.netfilter.nf_conntrack_udp_timeout_stream": udp_timeout})
        for _ in range(hosts):
            self.add_host(router)
        return router

    def add_host(self, router: Router) -> Host:
        """A host behind `router`: 10.N.0.(M+1), default route via the router."""
        m = len(router.hosts) + 1
        if m > 200:
            raise ValueError("at most 200 hosts per router")
        ns = self._new_ns(f"h{router.index}_{m}")
        host = Host(f"h{router.index}_{m}", ns, f"10.{router.index}.0.{m + 1}", router)
        self._veth(ns, "eth0", router.ns, f"lan{m}")
        self._ip(router.ns, f"link set lan{m} master br0 up")
        self._ip(ns, f"addr add {host.ip}/24 dev eth0")
        self._ip(ns, "link set eth0 up")
        self._ip(ns, f"route add default via {router.lan_ip}")
        router.hosts.append(host)
        return host

    def add_public_host(self) -> Host:
        """A host with a public address on the wan, 198.51.100.(49+K), no NAT."""
        k = len(self.public_hosts) + 1
        if k > 150:
            raise ValueError("at most 150 public hosts")
        ns = self._new_ns(f"p{k}")
        host = Host(f"p{k}", ns, f"{WAN_PREFIX}.{49 + k}")
        self._veth(ns, "eth0", self.wan.ns, f"p{k}")
        self._ip(self.wan.ns, f"link set p{k} master br0 up")
        self._ip(ns, f"addr add {host.ip}/24 dev eth0")
        self._ip(ns, "link set eth0 up")
        self.public_hosts.append(host)
        return host

    # --- using -------------------------------------------------------------------------------

    def host(self, label: str) -> Host:
        """A host by label: "h1_2" (behind r1), "p1" (public) or "wan"."""
        for h in [self.wan, *self.public_hosts, *(h for r in self.routers for h in r.hosts)]:
            if h.label == label:
                return h
        raise KeyError(f"no host {label!r} in the lab")

    def router(self, label: str) -> Router:
        for r in self.routers:
            if r.label == label:
                return r
        raise KeyError(f"no router {label!r} in the lab")

    @staticmethod
    def exec_prefix(where: Host | Router | str) -> list[str]:
        return ["ip", "netns", "exec", _ns(where)]

    def run(self, where: Host | Router | str, *args: str, check: bool = True,
            timeout: float | None = 60.0, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run([*self.exec_prefix(where), *args], capture_output=True, timeout=timeout,
                           input=input)
        if check and r.returncode != 0:
            raise RuntimeError(f"{args} in {where} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        return r

    def call_in(self, where: Host | Router | str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return call_in(_ns(where), fn, *args, **kw)

    def conntrack(self, where: Host | Router | str) -> list[str]:
        """The namespace's conntrack table, one line per entry (/proc/net/nf_conntrack)."""
        def read() -> str:
            try:
                with open("/proc/thread-self/net/nf_conntrack") as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        return [line for line in call_in(_ns(where), read).splitlines() if line.strip()]

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete every namespace this lab made (and nothing else). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        _open_labs.discard(self)

    def __enter__(self) -> "NatLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        lines = [f"wan {self.wan.ns}: server {SERVER_IP}"]
        for r in self.routers:
            extra = f", udp timeout {r.udp_timeout}s" if r.udp_timeout is not None else ""
            lines.append(f"  {r.label} {r.kind} {r.wan_ip} (LAN {r.lan_ip}/24{extra}): "
                         + ", ".join(f"{h.label}={h.ip}" for h in r.hosts))
        for h in self.public_hosts:
            lines.append(f"  {h.label} public {h.ip}")
        return "\n".join(lines)


# Labs not closed yet (strong references: a lab dropped without close() is still torn down at exit).
_open_labs: set[NatLab] = set()


@atexit.register
def _close_all() -> None:
    for lab in list(_open_labs):
        lab.close()


def stale_namespaces() -> list[str]:
    """Namespaces named by this module whose creating process is no longer running."""
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except FileNotFoundError:
        return []
    stale = []
    for name in names:
        m = _NAME_RX.match(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            stale.append(name)
        except PermissionError:
            pass
    return sorted(stale)


def _udp_socket(bind: str = "0.0.0.0") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, 0))
    sock.setblocking(False)
    return sock


def probe_punch(lab: NatLab, a: Host, b: Host, *, b_first: bool = False, duration: float = 1.0) -> dict[str, Any]:
    """A bare UDP hole punch between hosts `a` and `b`, without DSSS, to check the lab itself.

    Both learn their public address from a rendezvous socket on the wan (as DSSS does with PING/
    PONG), then send datagrams to each other's public address every 20 ms for `duration` s.
    With `b_first`, `b` starts 0.3 s before `a` (its first punches reach `a`'s router before `a`
    has sent anything). `ok` is true when each received the other's datagrams from the address
    the rendezvous saw."""
    rendezvous = lab.call_in(lab.wan, _udp_socket, SERVER_IP)
    sa, sb = lab.call_in(a, _udp_socket), lab.call_in(b, _udp_socket)
    seen: dict[str, tuple[str, int]] = {}
    try:
        deadline = time.monotonic() + 3
        while len(seen) < 2 and time.monotonic() < deadline:
            for name, sock in (("a", sa), ("b", sb)):
                if name not in seen:
                    sock.sendto(name.encode(), rendezvous.getsockname())
            time.sleep(0.02)
            while True:
                try:
                    data, addr = rendezvous.recvfrom(64)
                except BlockingIOError:
                    break
                seen[data.decode()] = addr
        if len(seen) < 2:
            raise RuntimeError(f"the rendezvous on the wan heard only {sorted(seen)}")
        got: dict[str, set[tuple[str, int]]] = {"a": set(), "b": set()}
        start = time.monotonic()
        while time.monotonic() - start < duration + (0.3 if b_first else 0):
            if not b_first or time.monotonic() - start >= 0.3:
                sa.sendto(b"punch-a", seen["b"])
            sb.sendto(b"punch-b", seen["a"])
            time.sleep(0.02)
            for name, sock in (("a", sa), ("b", sb)):
                while True:
                    try:
                        _, addr = sock.recvfrom(64)
                    except BlockingIOError:
                        break
                    got[name].add(addr)
        return {
            "a_public": seen["a"], "b_public": seen["b"],
            "a_got_from": sorted(got["a"]), "b_got_from": sorted(got["b"]),
            "ok": got["a"] == {seen["b"]} and got["b"] == {seen["a"]},
        }
    finally:
        for sock in (rendezvous, sa, sb):
            sock.close()


# --- a DSSS network in the lab -----------------------------------------------------------------


class NatNetwork(LocalNetwork):
    """A LocalNetwork whose server runs on the lab's wan (198.51.100.1) and whose agents and
    client run on lab hosts. HTTP queries from this process go through the wan namespace."""

    def __init__(self, lab: NatLab, base: str | os.PathLike[str], *, heartbeat: float = 1.0,
                 replicas: int = 3, datagram_size: int = 1452) -> None:
        super().__init__(base, heartbeat=heartbeat, replicas=replicas, datagram_size=datagram_size)
        self.lab = lab
        self.hosts: dict[str, Host] = {}  # agent name -> host it runs on

    server_ip = SERVER_IP
    # Agents behind one NAT share its address, and the lab's public hosts share the wan's /24:
    # the server runs with the one-machine setting (--distinct-networks off).
    distinct_hosts = False

    def server_prefix(self) -> Sequence[str]:
        return self.lab.exec_prefix(self.lab.wan)

    def start_agent(self, name: str | None = None, *extra: str, wait: bool = True,
                    host: Host | None = None) -> AgentProc:
        """Start an agent on `host` (by default the host it ran on before, else a new public
        host), bound to 0.0.0.0 on an ephemeral UDP port."""
        name = name or f"agent{len(self.agents) + 1}"
        host = host or self.hosts.get(name) or self.lab.add_public_host()
        self.hosts[name] = host
        storage = self.base / name
        args = [
            "dsss-agent",
            f"--storage={storage}",
            f"--server={SERVER_IP}:{self.control_port}",
            "--udp=0.0.0.0:0",
            f"--datagram-size={self.datagram_size}",
            *extra,
        ]
        return self._run_agent(name, args, wait, prefix=self.lab.exec_prefix(host),
                               storage=storage, extra=list(extra))

    def http(self, path: str) -> tuple[int, Any]:
        def get() -> tuple[int, Any]:
            try:
                with urllib.request.urlopen(self.url + path, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read() or b"null")

        return self.lab.call_in(self.lab.wan, get)

    def agent_status(self, agent: AgentProc) -> dict[str, Any]:
        for a in self.status()["agents"]:
            if a["id"] == agent.agent_id:
                return a  # type: ignore[no-any-return]
        raise KeyError(f"the server does not know {agent.name} ({agent.agent_id[:16]})")

    def wait_address(self, agent: AgentProc, *, not_: str | None = None, timeout: float = 20.0) -> str:
        """Wait until the server has `agent` live at an address other than `not_`; return it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                a = self.agent_status(agent)
                if a["live"] and a["address"] != not_:
                    return str(a["address"])
            except KeyError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{agent.name} not live at a new address: {self.status()}")
            time.sleep(0.1)

    def client_command(self, *args: str, key: Path | None = None, host: Host | None = None,
                       options: Sequence[str] = ()) -> list[str]:
        """The command line that runs the client on `host` (run it with `child_env()`)."""
        return [*self.lab.exec_prefix(host or self.lab.wan), sys.executable, "-m", "dsss.client",
                "--server", self.url, "--key", str(key or self.key), *options, *args]

    def client(self, *args: str, key: Path | None = None, check: bool = True, timeout: float = 120.0,
               stdin: bytes | None = None, host: Host | None = None,
               options: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
        """Run the client on `host` (default: the wan, next to the server). `options` go before
        the command with the global flags (e.g. `-v`)."""
        where = host or self.lab.wan
        cmd = self.client_command(*args, key=key, host=where, options=options)
        r = subprocess.run(cmd, env=child_env(), input=stdin, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"client {args} on {where.label} failed ({r.returncode}): "
                               f"{r.stderr.decode(errors='replace')}")
        return r


PATH_LINE = re.compile(r"^dsss: path (\S+) (direct|relay|lan)\s*$", re.M)


def paths_used(stderr: bytes | str) -> dict[str, str]:
    """The client's `-v` report: {"HOST:PORT": "direct"|"relay"|"lan"} (the last word for each)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return {m.group(1): m.group(2) for m in PATH_LINE.finditer(text)}


def main(argv: Sequence[str]) -> int:
    if list(argv[:1]) == ["cleanup"]:
        for name in stale_namespaces():
            r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            print(f"deleted {name}" if r.returncode == 0 else f"{name}: {r.stderr.strip()}")
        return 0
    if list(argv[:1]) == ["check"]:
        reason = unavailable_reason()
        print(reason or "ok")
        return 1 if reason else 0
    print("usage: python -m tools.netns check|cleanup", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
