"""The peer: a Tahoe-LAFS 1.20 grid in its own network namespace, driven over a pipe.

`TahoeGrid.start()` makes `bench/.tahoe-venv` on first use (`pip install tahoe-lafs==1.20.*`),
then runs `unshare --net -- python bench/tahoe_driver.py` (root; the namespace has only `lo`),
which creates and starts one introducer, four storage nodes and one client node there and then
times whatever it is asked to, one JSON request and reply per line (see tahoe_driver.py).

If Tahoe cannot be installed or started, `TahoeGrid.unavailable` says why and every measurement
goes on with the DSSS side alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import BENCH_DIR, log

VENV = BENCH_DIR / ".tahoe-venv"
TAHOE = VENV / "bin" / "tahoe"
REQUIREMENT = "tahoe-lafs==1.20.*"


def ensure_tahoe() -> str | None:
    """Install Tahoe-LAFS in its own venv if needed; None when ready, else why not."""
    if TAHOE.exists():
        return None
    log(f"installing {REQUIREMENT} into {VENV} (once)")
    try:
        subprocess.run(["python3", "-m", "venv", str(VENV)],
                       check=True, capture_output=True, timeout=300)
        r = subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", REQUIREMENT],
                           capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not make the Tahoe venv: {e}"
    if r.returncode != 0 or not TAHOE.exists():
        return f"pip install {REQUIREMENT} failed: {(r.stderr or r.stdout).strip()[-500:]}"
    return None


def namespace_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "running Tahoe in its own network namespace needs root (unshare --net)"
    for tool in ("unshare", "ip", "curl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install util-linux iproute2 curl)"
    return None


class TahoeGrid:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.proc: subprocess.Popen[str] | None = None
        self.unavailable: str | None = None
        self.setup: dict[str, Any] = {}

    def start(self) -> bool:
        self.unavailable = namespace_unavailable() or ensure_tahoe()
        if self.unavailable:
            log(f"Tahoe-LAFS unavailable: {self.unavailable}")
            return False
        self.base.mkdir(parents=True, exist_ok=True)
        self._stderr = open(self.base / "driver.log", "a")
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, str(BENCH_DIR / "tahoe_driver.py"),
             "--tahoe", str(TAHOE), "--base", str(self.base / "grid")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        log("starting the Tahoe grid (introducer, 4 storage nodes, client) in its own network namespace")
        reply = self.call("start")
        if not reply.get("ok"):
            self.unavailable = f"the Tahoe grid did not start: {reply.get('error')}"
            log(self.unavailable)
            self.stop()
            return False
        self.setup = reply
        log(f"Tahoe grid up: {reply.get('servers')} storage servers in {reply.get('seconds', 0):.1f}s")
        return True

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self.unavailable

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            return {"ok": False, "error": "the Tahoe driver is not running"}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "error": "the Tahoe driver exited"}
        return json.loads(line)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                self.proc.wait(10)
        self.proc = None
