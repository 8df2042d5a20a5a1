"""The CLI interrupted, resumed and kept waiting, against real twistd processes: SIGINT and
SIGTERM during put and get (exit codes, what is said, what is left), put and get continued after
an interruption (measured by bytes uploaded and parts skipped), a server that starts late, and the
errors that tell "offline" from "never stored" and "too few agents" from "no room"."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from dsss.client.catalog import catalog_path
from dsss.client.journal import journal_dir
from dsss.crypto.keys import generate_key_file
from dsss.model import is_block_id
from tests.conftest import start_network
from tools.harness import LocalNetwork, child_env

pytestmark = [pytest.mark.integration]

PART = 128 * 1024
TAG = 16
PARTS = 48
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]+(Error|Exception)\b")


def client_cmd(url: str, key: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dsss.client", "--server", url, "--key", str(key), *args]


def spawn(url: str, key: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(client_cmd(url, key, *args), env=child_env(), cwd=cwd, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(url: str, key: Path, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(client_cmd(url, key, *args), env=child_env(), cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


def wait_until(what: str, check: Callable[[], Any], proc: subprocess.Popen[str] | None = None,
               timeout: float = 60.0) -> Any:
    """Poll `check` until it is true; fail if `proc` ends first or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the client ended ({proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stored_lines(key: Path) -> int:
    """Parts the put journals of this key list as stored."""
    directory = journal_dir(key)
    if not directory.is_dir():
        return 0
    return sum(f.read_text().count('"stored"') for f in directory.glob("*.put"))


def catalog_lines(key: Path) -> int:
    path = catalog_path(key)
    return len(path.read_text().splitlines()) if path.exists() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def user(tmp_path: Path) -> Path:
    key = tmp_path / "user.key"
    generate_key_file(key)
    return key


# --- put ------------------------------------------------------------------------------------------


def test_put_interrupted_mid_transfer_exits_130_and_a_second_put_sends_only_the_rest(
    shared_network: LocalNetwork, tmp_path: Path, user: Path
) -> None:
    net = shared_network
    src = tmp_path / "big.bin"
    data = os.urandom(PARTS * PART)
    src.write_bytes(data)
    p = spawn(net.url, user, "--parallel", "1", "put", "--part-size", "128K", str(src))
    wait_until("three parts stored", lambda: stored_lines(user) >= 3, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert out == ""  # no address: nothing that can be fetched was stored
    assert "dsss: interrupted (SIGINT)" in err and "big.bin was not stored" in err
    assert re.search(rf"\d+ of {PARTS} parts are stored: put it again to send only the rest", err), err
    assert "error" not in err.lower() and "Traceback" not in err
    assert catalog_lines(user) == 0
    journaled = stored_lines(user)
    assert 3 <= journaled < PARTS

    r = run(net.url, user, "-v", "put", "--part-size", "128K", str(src))
    assert r.returncode == 0, r.stderr
    address, name = r.stdout.split()
    assert is_block_id(address) and name == str(src)
    skipped = int(re.search(rf"(\d+) of {PARTS} parts \([^)]*\) were already stored by an unfinished put; "
                            rf"sent the other (\d+)", r.stderr).group(1))  # type: ignore[union-attr]
    assert skipped >= journaled  # every part the journal lists is still on the network
    uploaded = int(re.search(r"uploaded (\d+) bytes", r.stderr).group(1))  # type: ignore[union-attr]
    # Three copies of each part not skipped (sent from here on loopback: no chain), and of the
    # manifest (a few KiB): nothing of the parts already stored.
    parts_bytes = (PARTS - skipped) * (PART + TAG) * net.replicas
    assert parts_bytes <= uploaded < parts_bytes + net.replicas * 16 * 1024
    assert not list(journal_dir(user).glob("*.put"))  # done: the journal is gone
    out_file = tmp_path / "back.bin"
    assert run(net.url, user, "get", address, "-o", str(out_file)).returncode == 0
    assert out_file.read_bytes() == data


def test_put_of_a_changed_file_after_an_interruption_starts_over_with_a_new_key(
    shared_network: LocalNetwork, tmp_path: Path, user: Path
) -> None:
    net = shared_network
    src = tmp_path / "doc.bin"
    src.write_bytes(os.urandom(24 * PART))
    p = spawn(net.url, user, "--parallel", "1", "put", "--part-size", "128K", str(src))
    wait_until("a part stored", lambda: stored_lines(user) >= 1, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143 and "interrupted (SIGTERM)" in err
    data = os.urandom(24 * PART)  # the same size; then the same modification time
    stat = src.stat()
    src.write_bytes(data)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    r = run(net.url, user, "-v", "put", "--part-size", "128K", str(src))
    assert r.returncode == 0, r.stderr
    assert "already stored" not in r.stderr  # nothing reused: every part sent under a new key
    out_file = tmp_path / "back.bin"
    assert run(net.url, user, "get", r.stdout.split()[0], "-o", str(out_file)).returncode == 0
    assert out_file.read_bytes() == data


# --- get ------------------------------------------------------------------------------------------


def test_get_interrupted_keeps_a_named_partial_that_the_same_get_verifies_and_continues(
    shared_network: LocalNetwork, tmp_path: Path, user: Path
) -> None:
    net = shared_network
    src = tmp_path / "movie.bin"
    data = os.urandom(PARTS * PART)
    src.write_bytes(data)
    address = run(net.url, user, "put", "--part-size", "128K", str(src)).stdout.split()[0]
    out = tmp_path / "out" / "movie.bin"
    out.parent.mkdir()
    partial = out.with_name("movie.bin.dsss-partial")
    p = spawn(net.url, user, "--parallel", "1", "get", address, "-o", str(out))
    wait_until("a partial of 4 parts", lambda: partial.exists() and partial.stat().st_size >= 4 * PART, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert not out.exists()  # nothing where the user expects the result
    assert partial.exists() and 4 * PART <= partial.stat().st_size <= len(data)
    assert f"{out} was not written; the first" in err and f"kept in {partial}" in err, err
    assert sorted(os.listdir(out.parent)) == ["movie.bin.dsss-partial"]

    # A byte changed in the second part: the first part is kept, the rest fetched again.
    with open(partial, "r+b") as f:
        f.seek(PART + 5)
        byte = f.read(1)
        f.seek(PART + 5)
        f.write(bytes([byte[0] ^ 1]))
    r = run(net.url, user, "get", address, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"the first 1 of {PARTS} parts" in r.stderr and "verified" in r.stderr
    assert out.read_bytes() == data
    assert sorted(os.listdir(out.parent)) == ["movie.bin"]


def test_get_to_stdout_interrupted_says_the_output_is_incomplete(
    shared_network: LocalNetwork, tmp_path: Path, user: Path
) -> None:
    net = shared_network
    src = tmp_path / "s.bin"
    src.write_bytes(os.urandom(PARTS * PART))
    address = run(net.url, user, "put", "--part-size", "128K", str(src)).stdout.split()[0]
    p = subprocess.Popen(client_cmd(net.url, user, "--parallel", "1", "get", address, "-o", "-"),
                         env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    got = p.stdout.read(2 * PART)  # the first parts have arrived
    assert len(got) == 2 * PART
    p.send_signal(signal.SIGINT)
    p.stdout.read()
    err = p.stderr.read().decode()
    assert p.wait(30) == 130
    assert "interrupted (SIGINT): the file written to stdout is incomplete" in err


# --- waiting for the server -----------------------------------------------------------------------


def test_interrupted_while_waiting_for_the_server_nothing_is_stored(tmp_path: Path, user: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(1000))
    p = spawn(url, user, "--wait", "60", "put", str(src))
    assert p.stderr is not None
    line = p.stderr.readline()  # blocks until the first try has failed
    assert "nothing is listening" in line and "trying again for up to 60 s" in line, line
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert out == "" and "interrupted (SIGINT)" in err
    assert catalog_lines(user) == 0


def test_a_client_waits_for_a_server_that_starts_late_and_gives_up_in_words(
    make_network: Callable[..., LocalNetwork], tmp_path: Path, user: Path
) -> None:
    # The server is down (say, restarting) when the client starts, and back a few seconds later;
    # its agents reconnect to it.
    net = start_network(make_network("late", heartbeat=0.5), agents=3)
    assert net.server is not None
    net.server.stop()
    src = tmp_path / "late.bin"
    data = os.urandom(300_000)
    src.write_bytes(data)
    p = spawn(net.url, user, "--wait", "60", "put", "--part-size", "128K", str(src))
    assert p.stderr is not None
    line = p.stderr.readline()  # blocks until the first try has failed
    assert "nothing is listening" in line and "trying again for up to 60 s" in line, line
    net.start_server(reuse_ports=True)
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err
    address = out.split()[0]
    back = tmp_path / "back.bin"
    assert run(net.url, user, "get", address, "-o", str(back)).returncode == 0
    assert back.read_bytes() == data

    # Nothing listening: exit 4 after the wait, in words.
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    r = run(closed, user, "--wait", "1", "info", address)
    assert r.returncode == 4
    assert time.monotonic() - started >= 1.0
    assert "nothing is listening at" in r.stderr and "(tried for 1 s)" in r.stderr
    assert not CLASS_NAME.search(r.stderr), r.stderr
    # The agents' (control) port is not the HTTP API: said so.
    r = run(f"http://127.0.0.1:{net.control_port}", user, "--wait", "0", "info", address)
    assert r.returncode == 4
    assert "not in HTTP" in r.stderr or "without an answer" in r.stderr, r.stderr
    assert not CLASS_NAME.search(r.stderr), r.stderr
    # A host name that does not resolve.
    r = run("http://no-such-host.invalid:8470", user, "--wait", "0", "info", address)
    assert r.returncode == 4 and "cannot find the host 'no-such-host.invalid'" in r.stderr
    assert not CLASS_NAME.search(r.stderr), r.stderr


# --- offline, too few agents --------------------------------------------------------------------


def test_too_few_agents_and_offline_holders_have_their_own_exit_codes(
    make_network: Callable[..., LocalNetwork], tmp_path: Path, user: Path
) -> None:
    net = start_network(make_network("few", heartbeat=0.5), agents=3)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 * PART))
    small = tmp_path / "small.txt"
    small.write_bytes(b"kept")
    started = time.monotonic()
    r = run(net.url, user, "put", "--erasure", "2/4", str(big))
    assert r.returncode == 9, r.stderr
    assert "too few agents (have 3, need 4)" in r.stderr
    assert time.monotonic() - started < 15  # at once, not after retries
    r = run(net.url, user, "put", "--part-size", "128K", str(big), str(small))
    assert r.returncode == 0, r.stderr
    big_address, small_address = (line.split()[0] for line in r.stdout.splitlines())

    net.agents[0].stop()
    net.wait_live(2)
    r = run(net.url, user, "put", str(small))
    assert r.returncode == 9 and "too few agents (have 2, need 3)" in r.stderr, r.stderr

    for agent in net.agents[1:]:
        agent.stop()
    net.wait_live(0)
    stranger = tmp_path / "stranger.key"
    generate_key_file(stranger)
    for address in (big_address, small_address):
        for args in (("get", address, "-o", str(tmp_path / "x")), ("info", address), ("check", address)):
            r = run(net.url, user, "--wait", "0", *args)
            assert r.returncode == 8, (args, r.stderr)
            assert "was stored" in r.stderr and "no agent holding it is online now" in r.stderr
        # Without a record of it, the same answer as for an address never stored.
        assert run(net.url, stranger, "info", address).returncode == 3
    r = run(net.url, user, "info", "ab" * 32)
    assert r.returncode == 3 and "no file is stored at" in r.stderr
    assert not (tmp_path / "x").exists()
