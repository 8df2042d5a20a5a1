"""README.md's "Run a network yourself", run as written: the two twistd commands from one
directory, then the status page they describe."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tools.harness import child_env

pytestmark = [pytest.mark.integration]

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"Run a network yourself:\n\n```sh\n(.*?)```", text, re.S)
    assert block is not None, "README has no 'Run a network yourself' block"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_run_a_network_yourself_works_as_written(tmp_path: Path) -> None:
    server_cmd, agent_cmd = readme_commands()
    assert server_cmd[:2] == ["twistd", "-n"] and agent_cmd[:2] == ["twistd", "-n"]
    if not all(port_free(p) for p in (8470, 8471)):
        pytest.skip("the README's ports 8470 and 8471 are in use on this machine")
    # The same commands, with the agent's storage in a temporary directory instead of /var/dsss.
    agent_cmd = [str(tmp_path / "dsss") if a == "/var/dsss" else a for a in agent_cmd]
    # `twistd` is the one installed with DSSS (as in an activated virtualenv).
    twistd = str(Path(sys.executable).with_name("twistd"))
    server_cmd, agent_cmd = ([twistd, *cmd[1:]] for cmd in (server_cmd, agent_cmd))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd in (server_cmd, agent_cmd):  # one directory for both, as a user would
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        server, agent = procs
        assert server.stdout is not None and agent.stdout is not None
        for proc, ready in ((server, b"DSSS server ready"), (agent, b"DSSS agent ready")):
            seen = b""
            while ready not in seen:
                line = proc.stdout.readline()  # type: ignore[union-attr]
                assert line, f"{proc.args} exited:\n{seen.decode(errors='replace')}"
                seen += line
        with urllib.request.urlopen("http://127.0.0.1:8470/api/status", timeout=10) as r:
            doc = json.loads(r.read())
        assert doc["totals"]["agents"] == 1
        with urllib.request.urlopen("http://127.0.0.1:8470/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
