"""The CLI in a real terminal (tmux): the progress display while a put runs, Ctrl-C typed at the
keyboard, and what the screen says afterwards. Skipped where tmux is not installed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsss.crypto.keys import generate_key_file
from tools.harness import LocalNetwork, child_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


class Terminal:
    """One tmux session on a server of its own (its own socket), 120 columns by 30 lines."""

    def __init__(self, base: Path, command: str) -> None:
        self.socket = str(base / "tmux.sock")
        self.tmux(["new-session", "-d", "-s", "t", "-x", "120", "-y", "30",
                   f"{command}; echo EXIT=$?; sleep 600"])

    def tmux(self, args: list[str]) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], env=child_env({"TERM": "xterm-256color"}),
                              capture_output=True, text=True, timeout=30, check=True).stdout

    def screen(self) -> str:
        return self.tmux(["capture-pane", "-p", "-t", "t"])

    def wait_for(self, text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if text in shown:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"the terminal never showed {text!r}:\n{shown}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


def test_progress_and_ctrl_c_in_a_real_terminal(shared_network: LocalNetwork, tmp_path: Path) -> None:
    net = shared_network
    key = tmp_path / "t.key"
    generate_key_file(key)
    src = tmp_path / "film.bin"
    data = os.urandom(12 * 1024 * 1024)
    src.write_bytes(data)
    client = f"{shlex.quote(sys.executable)} -m dsss.client --server {net.url} --key {shlex.quote(str(key))}"
    term = Terminal(tmp_path, f"cd {shlex.quote(str(tmp_path))} && {client} --parallel 1 put --part-size 64K film.bin")
    try:
        shown = term.wait_for("B/s")  # the progress bar: the file's name, bytes, speed
        assert "film.bin" in shown
        term.tmux(["send-keys", "-t", "t", "C-c"])
        shown = term.wait_for("EXIT=")
        assert "EXIT=130" in shown, shown
        assert "dsss: interrupted (SIGINT): film.bin was not stored" in shown
        assert "Traceback" not in shown
    finally:
        term.close()

    # The same put again, to the end: it says what it skipped, and the address is on the screen.
    term = Terminal(tmp_path, f"cd {shlex.quote(str(tmp_path))} && {client} put --part-size 64K film.bin")
    try:
        shown = term.wait_for("EXIT=", timeout=180)
        assert "EXIT=0" in shown, shown
        lines = [line for line in shown.splitlines() if line.endswith(" film.bin") and len(line.split()[0]) == 64]
        assert len(lines) == 1, shown
        address = lines[0].split()[0]
    finally:
        term.close()
    out = tmp_path / "back" / "film.bin"
    out.parent.mkdir()
    r = subprocess.run([*shlex.split(client), "get", address, "-o", str(out)], env=child_env(),
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and out.read_bytes() == data
