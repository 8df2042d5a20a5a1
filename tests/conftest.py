from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tools.harness import LocalNetwork
from tools.postgres import PostgresServer, find_binaries


@pytest.fixture
def make_network(tmp_path: Path) -> Iterator:
    """Factory for LocalNetworks of real twistd processes on 127.0.0.1, stopped after the test."""
    networks: list[LocalNetwork] = []

    def make(name: str = "net", **kw: object) -> LocalNetwork:
        net = LocalNetwork(tmp_path / name, **kw)  # type: ignore[arg-type]
        networks.append(net)
        return net

    yield make
    for net in networks:
        net.stop()


def start_network(net: LocalNetwork, agents: int = 3) -> LocalNetwork:
    net.start_server()
    for _ in range(agents):
        net.start_agent()
    net.wait_live(agents)
    return net


@pytest.fixture(scope="module")
def shared_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """One server and four agents for a whole test module; tests must not break it."""
    net = LocalNetwork(tmp_path_factory.mktemp("shared"), heartbeat=0.5)
    try:
        start_network(net, agents=4)
        net.client("keygen")
        yield net
    finally:
        net.stop()


def run_with_terminal_stderr(cmd: list[str], env: dict[str, str], timeout: float = 60.0) -> tuple[int, bytes, str]:
    """Run `cmd` with stderr on a pseudo-terminal (stdout on a pipe), as a user at a terminal
    would; returns (exit code, stdout, what the terminal showed)."""
    import pty
    import subprocess
    import threading

    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # read while the child runs: a closed pty may drop unread output
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    out, _ = proc.communicate(timeout=timeout)
    reader.join(10)
    os.close(leader)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL for this test process (initdb in a temporary directory, 127.0.0.1 and
    a free port, run as the `postgres` user under root), stopped by pid at the end; the tests
    that use it are skipped, with the reason, where PostgreSQL is not installed."""
    bindir, why = find_binaries()
    if bindir is None:
        pytest.skip(why)
    server = PostgresServer(tmp_path_factory.mktemp("postgres"), bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """Makes the `--store` value for a store kind: `memory`, `sqlite` (a file in the test's
    temporary directory) or `postgresql` (a fresh database in the session's PostgreSQL)."""

    def make(kind: str) -> str:
        if kind == "memory":
            return "memory"
        if kind == "sqlite":
            return f"sqlite:{tmp_path / f'store-{next(_databases)}.sqlite'}"
        if kind == "postgresql":
            server: PostgresServer = request.getfixturevalue("postgres")
            return server.createdb(f"t{os.getpid()}_{next(_databases)}")
        raise ValueError(kind)

    return make


STORE_KINDS = ["memory", "sqlite", "postgresql"]
