"""A throw-away PostgreSQL server for tests and benchmarks: initdb into a directory, run on
127.0.0.1 and a free port, stopped by its pid.

PostgreSQL refuses to run as root: as root, the cluster is made and run as the `postgres`
system user (which `.ci/run` creates with Debian's postgresql package). `find_binaries` says
where the binaries are, or why there are none (the tests that need them are then skipped with
that reason)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_SEARCH = ["/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin",
           "/usr/local/bin", "/usr/bin"]


def find_binaries() -> tuple[Path | None, str]:
    """The directory holding initdb and pg_ctl, or None and the reason none is usable."""
    for d in _SEARCH:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists() and (Path(d) / "postgres").exists():
            if os.geteuid() == 0 and shutil.which("runuser") is None:
                return None, "running as root without runuser: cannot start PostgreSQL as its own user"
            if os.geteuid() == 0:
                try:
                    import pwd

                    pwd.getpwnam("postgres")
                except KeyError:
                    return None, "running as root and there is no `postgres` system user"
            return Path(d), ""
    return None, "PostgreSQL is not installed (no initdb/pg_ctl; apt-get install postgresql)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in `root`, started by `start` and stopped by `stop` (by pid)."""

    def __init__(self, root: Path, bindir: Path | None = None, port: int | None = None) -> None:
        found, why = (bindir, "") if bindir is not None else find_binaries()
        if found is None:
            raise RuntimeError(why)
        self.bindir = found
        self.root = root
        self.data = root / "data"
        self.port = port or free_port()
        self.pid: int | None = None

    def _as_owner(self, argv: list[str]) -> list[str]:
        return (["runuser", "-u", "postgres", "--"] + argv) if os.geteuid() == 0 else argv

    def _run(self, argv: list[str], timeout: float = 60.0) -> None:
        done = subprocess.run(self._as_owner(argv), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            for parent in self.root.parents:  # the owner must be able to reach its directory
                if parent == Path("/"):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o005)
        if not (self.data / "PG_VERSION").exists():
            self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                       "--no-sync", "-E", "UTF8"])
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                   "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                         "-c max_connections=200", "start"])
        self.pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def createdb(self, name: str) -> str:
        """Create a database; returns its connection URL."""
        self._run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name])
        return self.url(name)

    def url(self, name: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def running(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the cluster by its pid (immediate shutdown) and wait until it is gone."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if (self.data / "postmaster.pid").exists() is False:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
