"""Run a Tahoe-LAFS grid and time operations on it; meant to run inside `unshare --net`.

Standard library only (it is started with the bench's interpreter, Tahoe runs from its own venv).
`bench/tahoe.py` starts it as `unshare --net -- python bench/tahoe_driver.py --tahoe ... --base ...`
and speaks JSON lines with it: one request object per line on stdin, one reply object per line on
stdout. Progress and the nodes' output go to stderr and to log files in the base directory.

The grid: one introducer, four storage nodes, one client node (no storage), every listener on
127.0.0.1 ports of this namespace (which has nothing but `lo`, so Tahoe's extra listener on all
interfaces is reachable from nowhere else), `shares.needed=2, shares.happy=4, shares.total=4`:
like DSSS with 3 replicas on 4 agents, a file survives the loss of any 2 storage nodes.

Requests (`op` and its arguments) -> reply fields (always `ok`, and `error` when not ok):
  start                          -> servers, seconds
  cli_startup                    -> seconds                (`tahoe --version`)
  idle_cpu  seconds              -> nodes_cpu_s            (the nodes' CPU while idle)
  put_web   file                 -> seconds, cap, ...       (curl -T FILE .../uri)
  get_web   cap out              -> seconds, ...            (curl -o OUT .../uri/CAP)
  put_cli   file                 -> seconds, cap, ...       (tahoe put FILE)
  get_cli   cap out              -> seconds, ...            (tahoe get CAP OUT)
  put_many_web files             -> seconds, caps, ...      (one curl call, one PUT per file)
  get_many_web caps outdir       -> seconds, ...            (one curl call, one GET per cap)
  put_many_cli dir name          -> seconds, ...            (tahoe cp -r DIR bench:NAME)
  get_many_cli name outdir       -> seconds, ...            (tahoe cp -r bench:NAME OUTDIR)
  stop                           -> (stops the nodes; the driver exits)
Timed replies also carry `tool_maxrss_kb` (peak RSS of the curl/tahoe process), `tool_cpu_s`,
`nodes_cpu_s` (CPU the five nodes used meanwhile), `client_node_peak_rss_kb` and `stored_bytes`
(what the four storage nodes' share files grew by).

Tahoe encrypts convergently: a file it already holds is not sent again. Uploading the same bytes
twice measures only the client node reading and hashing them (about 3x faster than a real upload
here), so the bench gives every put new bytes and checks `stored_bytes`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from common import proc_cpu  # stdlib only: this runs in the Tahoe venv

INTRODUCER_PORT = 41000
STORAGE_PORTS = (41001, 41002, 41003, 41004)
WEB_PORT = 41010
SHARES = ("--shares-needed=2", "--shares-happy=4", "--shares-total=4")


def log(*words: object) -> None:
    print("tahoe-driver:", *words, file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass



def proc_status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")  # resets VmHWM to the current RSS
    except OSError:
        pass


def run_timed(cmd: list[str], *, stdout_path: str | None = None) -> dict[str, Any]:
    """Run a command; wall time, exit code, stdout (unless sent to a file) and its rusage
    (reaped with wait4, so the peak RSS and CPU time are this child's alone)."""
    out = open(stdout_path, "wb") if stdout_path else subprocess.PIPE
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        data = p.stdout.read() if p.stdout else b""
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.monotonic() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if p.stdout:
        p.stdout.close()
    if stdout_path:
        out.close()  # type: ignore[union-attr]
    return {
        "seconds": seconds,
        "rc": p.returncode,
        "stdout": data.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace")[-2000:],
        "tool_maxrss_kb": usage.ru_maxrss,
        "tool_cpu_s": usage.ru_utime + usage.ru_stime,
    }


class Grid:
    def __init__(self, tahoe: str, base: Path) -> None:
        self.tahoe = tahoe
        self.base = base
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.url = f"http://127.0.0.1:{WEB_PORT}"
        self.client_dir = base / "client"

    def _t(self, *args: str) -> list[str]:
        return [self.tahoe, *args]

    def _check(self, cmd: list[str]) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
        return r.stdout

    def _run_node(self, name: str) -> None:
        logf = open(self.base / f"{name}.out", "ab")
        p = subprocess.Popen(self._t("run", "--allow-stdin-close", str(self.base / name)),
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             preexec_fn=_die_with_parent)
        self.procs[name] = p

    def _wait(self, what: str, check: Any, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            for name, p in self.procs.items():
                if p.poll() is not None:
                    out = (self.base / f"{name}.out").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"tahoe node {name} exited ({p.returncode}) while waiting for {what}:\n{out}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def start(self) -> dict[str, Any]:
        t0 = time.monotonic()
        if self.base.exists():
            shutil.rmtree(self.base)
        self.base.mkdir(parents=True)
        intro = self.base / "intro"
        self._check(self._t("create-introducer", f"--port=tcp:{INTRODUCER_PORT}:interface=127.0.0.1",
                            f"--location=tcp:127.0.0.1:{INTRODUCER_PORT}", str(intro)))
        self._run_node("intro")
        furl_file = intro / "private" / "introducer.furl"
        furl = self._wait("the introducer's FURL",
                          lambda: furl_file.exists() and furl_file.read_text().strip())
        for i, port in enumerate(STORAGE_PORTS, 1):
            self._check(self._t("create-node", f"--nickname=storage{i}", f"--introducer={furl}",
                                f"--port=tcp:{port}:interface=127.0.0.1",
                                f"--location=tcp:127.0.0.1:{port}", "--webport=none", *SHARES,
                                str(self.base / f"storage{i}")))
            self._run_node(f"storage{i}")
        self._check(self._t("create-client", "--nickname=client", f"--introducer={furl}",
                            f"--webport=tcp:{WEB_PORT}:interface=127.0.0.1", *SHARES,
                            str(self.client_dir)))
        self._run_node("client")

        def connected() -> int:
            try:
                with urllib.request.urlopen(self.url + "/?t=json", timeout=5) as r:
                    doc = json.loads(r.read())
            except Exception:
                return 0
            self.last_status = [s.get("connection_status") for s in doc.get("servers", [])]
            n = sum(1 for s in doc.get("servers", [])
                    if str(s.get("connection_status", "")).lower().startswith("connected"))
            return n if n >= len(STORAGE_PORTS) else 0

        self.last_status: list[Any] = []
        try:
            servers = self._wait("the client to connect to 4 storage servers", connected)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; servers seen: {self.last_status}") from None
        self._check(self._t("-d", str(self.client_dir), "create-alias", "bench"))
        return {"servers": servers, "seconds": time.monotonic() - t0}

    # --- measurements ---------------------------------------------------------------------------

    def stored_bytes(self) -> int:
        """Bytes in the storage nodes' share files."""
        total = 0
        for i in range(1, len(STORAGE_PORTS) + 1):
            for root, _, files in os.walk(self.base / f"storage{i}" / "storage" / "shares"):
                total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
        return total

    def _timed(self, cmd: list[str], **kw: Any) -> dict[str, Any]:
        pids = [p.pid for p in self.procs.values()]
        client_pid = self.procs["client"].pid
        reset_peak_rss(client_pid)
        stored = self.stored_bytes()
        before = sum(proc_cpu(pid) for pid in pids)
        r = run_timed(cmd, **kw)
        r["nodes_cpu_s"] = sum(proc_cpu(pid) for pid in pids) - before
        r["stored_bytes"] = self.stored_bytes() - stored
        r["client_node_peak_rss_kb"] = proc_status_kb(client_pid, "VmHWM")
        if r["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({r['rc']}): {r['stderr']}")
        return r

    def idle_cpu(self, seconds: float) -> dict[str, Any]:
        """CPU seconds the five nodes use while nobody asks anything of them."""
        pids = [p.pid for p in self.procs.values()]
        before = sum(proc_cpu(pid) for pid in pids)
        time.sleep(seconds)
        return {"seconds": seconds, "nodes_cpu_s": sum(proc_cpu(pid) for pid in pids) - before}

    def cli_startup(self) -> dict[str, Any]:
        return run_timed(self._t("--version"))

    def put_web(self, file: str) -> dict[str, Any]:
        # No `Expect: 100-continue` round trip before the body (Twisted answers it, but why wait).
        r = self._timed(["curl", "-sS", "-f", "-H", "Expect:", "-T", file, self.url + "/uri"])
        r["cap"] = r.pop("stdout").strip()
        return r

    def get_web(self, cap: str, out: str) -> dict[str, Any]:
        return self._timed(["curl", "-sS", "-f", "-o", out, self.url + "/uri/" + urllib.parse.quote(cap, safe="")])

    def put_cli(self, file: str) -> dict[str, Any]:
        r = self._timed(self._t("-d", str(self.client_dir), "put", file))
        r["cap"] = r.pop("stdout").strip()
        return r

    def get_cli(self, cap: str, out: str) -> dict[str, Any]:
        return self._timed(self._t("-d", str(self.client_dir), "get", cap, out))

    def _curl_config(self, lines: list[str]) -> str:
        path = self.base / f"curl-{time.monotonic_ns()}.cfg"
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    def put_many_web(self, files: list[str]) -> dict[str, Any]:
        lines = ['write-out = "\\n"', 'header = "Expect:"']
        for f in files:
            lines += [f'url = "{self.url}/uri"', f'upload-file = "{f}"']
        r = self._timed(["curl", "-sS", "-f", "--config", self._curl_config(lines)])
        caps = [c.strip() for c in r.pop("stdout").splitlines() if c.strip()]
        if len(caps) != len(files):
            raise RuntimeError(f"curl returned {len(caps)} caps for {len(files)} files")
        r["caps"] = caps
        return r

    def get_many_web(self, caps: list[str], outdir: str) -> dict[str, Any]:
        os.makedirs(outdir, exist_ok=True)
        lines = []
        for i, cap in enumerate(caps):
            lines += [f'url = "{self.url}/uri/{urllib.parse.quote(cap, safe="")}"',
                      f'output = "{outdir}/f{i:04d}"']
        r = self._timed(["curl", "-sS", "-f", "--config", self._curl_config(lines)])
        r.pop("stdout", None)
        return r

    def put_many_cli(self, dir: str, name: str) -> dict[str, Any]:
        r = self._timed(self._t("-d", str(self.client_dir), "cp", "-r", dir, f"bench:{name}"))
        r.pop("stdout", None)
        return r

    def get_many_cli(self, name: str, outdir: str) -> dict[str, Any]:
        r = self._timed(self._t("-d", str(self.client_dir), "cp", "-r", f"bench:{name}", outdir))
        r.pop("stdout", None)
        return r

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tahoe", required=True, help="path to the tahoe executable (in its venv)")
    ap.add_argument("--base", required=True, help="directory for the grid's nodes")
    args = ap.parse_args()
    # A fresh namespace from `unshare --net` has only `lo`, and it is down.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    grid = Grid(args.tahoe, Path(args.base))
    ops = {
        "start": lambda r: grid.start(),
        "cli_startup": lambda r: grid.cli_startup(),
        "idle_cpu": lambda r: grid.idle_cpu(float(r["seconds"])),
        "put_web": lambda r: grid.put_web(r["file"]),
        "get_web": lambda r: grid.get_web(r["cap"], r["out"]),
        "put_cli": lambda r: grid.put_cli(r["file"]),
        "get_cli": lambda r: grid.get_cli(r["cap"], r["out"]),
        "put_many_web": lambda r: grid.put_many_web(r["files"]),
        "get_many_web": lambda r: grid.get_many_web(r["caps"], r["outdir"]),
        "put_many_cli": lambda r: grid.put_many_cli(r["dir"], r["name"]),
        "get_many_cli": lambda r: grid.get_many_cli(r["name"], r["outdir"]),
    }
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            op = req.get("op")
            if op == "stop":
                break
            try:
                reply = {"ok": True, **ops[op](req)}
            except Exception as e:
                log(f"{op} failed: {e}")
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
    finally:
        grid.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
