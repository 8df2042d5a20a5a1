"""`dsss gateway` as a real process over a real network: PUT and GET over HTTP, the token, the
errors, an upload cut short, several requests at once, and how it stops."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import dsss
from dsss.client import catalog
from dsss.crypto.keys import generate_key_file, load_key_file, public_key_hex
from tools.harness import LocalNetwork, child_env, wait_until
from dsss.model import is_block_id

pytestmark = [pytest.mark.integration]

KiB = 1024
MiB = 1024 * 1024
PART = 1 * MiB  # the module's gateway runs with --part-size 1M
READY = re.compile(r"^dsss gateway: listening on (http://127\.0\.0\.1:(\d+)/) \(token in (.+)\); Ctrl-C stops it$")


class Gateway:
    """One `dsss gateway` process, listening on a port of its choosing on 127.0.0.1."""

    def __init__(self, net: LocalNetwork, base: Path, *extra: str, key: Path | None = None,
                 name: str = "gateway") -> None:
        self.stderr_path = base / f"{name}.stderr"
        cmd = [sys.executable, "-m", "dsss.client", "--server", net.url, "--key", str(key or net.key),
               "gateway", "--listen", "tcp:0:interface=127.0.0.1", *extra]
        with open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(cmd, env=child_env(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=err)
        try:
            line = self._first_line(timeout=30)
            m = READY.match(line)
            assert m, f"unexpected first line: {line!r}"
        except BaseException:
            self.stop()
            raise
        self.url = m.group(1)
        self.port = int(m.group(2))
        self.token_path = Path(m.group(3))
        self.token = self.token_path.read_text().strip()

    def _first_line(self, timeout: float) -> str:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        data = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the gateway printed no line in {timeout}s:\n{self.log()[-3000:]}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"the gateway exited with {self.popen.wait(5)}:\n{self.log()[-3000:]}")
                data += chunk
        line, _, rest = data.partition(b"\n")
        assert rest == b"", f"more than one line on stdout: {data!r}"
        return line.decode()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop it (by its pid) and return its exit code; killed if it does not stop in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode

    # --- HTTP ------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, *, token: str | None = "",
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, Any, bytes]:
        """(status, response headers, body); token "" means this gateway's own token."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            h = dict(headers or {})
            token = self.token if token == "" else token
            if token is not None:
                h["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, r.headers, r.read()
        finally:
            conn.close()

    def put(self, data: bytes, name: str | None = None, **kw: Any) -> tuple[int, Any, Any]:
        path = "/files" if name is None else f"/files?name={name}"
        status, headers, body = self.request("PUT", path, data, **kw)
        return status, headers, json.loads(body)

    def get(self, address: str, **kw: Any) -> tuple[int, Any, bytes]:
        return self.request("GET", f"/files/{address}", **kw)


def expected_parts(size: int, part: int) -> int:
    """Parts of a stored file besides its manifest: none for a file carried inside it."""
    return 0 if 0 < size <= min(16 * KiB, part) else -(-size // part)


def listed(net: LocalNetwork) -> dict[str, dict[str, Any]]:
    """What `dsss ls` lists for the network's key."""
    doc = json.loads(net.client("--json", "ls").stdout)
    return {f["address"]: f for f in doc["files"]}


def recorded(net: LocalNetwork) -> dict[str, dict[str, Any]]:
    """The same, read here from the key's catalog (as `ls` reads it) without running the CLI."""
    entries, skipped = catalog.read(catalog.catalog_path(net.key))
    assert skipped == 0
    return {e.address: e.to_dict() for e in catalog.latest(entries)}


def assert_json_error(status: int, headers: Any, body: bytes, code: int) -> dict[str, Any]:
    assert status == code, body[:300]
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert isinstance(doc["error"], str) and doc["error"]
    return doc


def raw_exchange(port: int, head: bytes, timeout: float = 15.0) -> tuple[socket.socket, bytes]:
    """Send `head` on a new connection and read until the gateway closes it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(head)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    return s, got


@pytest.fixture(scope="module")
def gateway(shared_network: LocalNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the module (tests must not break it), with 1 MiB parts."""
    gw = Gateway(shared_network, tmp_path_factory.mktemp("gateway"), "--part-size", "1M")
    try:
        yield gw
    finally:
        gw.stop()


# --- PUT and GET ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 300 * KiB, 2 * MiB + 12345, 5 * MiB])
def test_put_then_get_gives_back_the_same_bytes(gateway, size):
    data = os.urandom(size)
    name = f"file-{size}.bin"
    status, headers, doc = gateway.put(data, name)
    assert status == 201, doc
    assert headers["Content-Type"] == "application/json"
    address = doc["address"]
    assert is_block_id(address)
    assert doc == {"address": address, "name": name, "size": size, "parts": expected_parts(size, PART)}
    assert headers["Location"] == f"/files/{address}"

    status, headers, body = gateway.get(address)
    assert status == 200
    assert len(body) == size and body == data
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(size)
    assert f'filename="{name}"' in headers["Content-Disposition"]


def test_a_put_without_name_and_with_post(gateway):
    data = os.urandom(1000)
    status, headers, body = gateway.request("POST", "/files", data)
    assert status == 201
    doc = json.loads(body)
    assert doc["name"] == "" and doc["size"] == 1000 and doc["parts"] == 0
    status, headers, back = gateway.get(doc["address"])
    assert back == data
    assert doc["address"] in headers["Content-Disposition"]  # no name: the address stands in


def test_info(gateway, shared_network):
    status, headers, body = gateway.request("GET", "/info")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "version": dsss.__version__,
        "server": shared_network.url,
        "replicas": shared_network.replicas,
        "erasure": None,
        "public-key": public_key_hex(load_key_file(shared_network.key)),
    }


def test_files_stored_by_the_gateway_and_by_the_cli_are_the_same_files(gateway, shared_network, tmp_path):
    net = shared_network
    # Through the gateway, then the CLI.
    data = os.urandom(1 * MiB + 77)
    status, _, doc = gateway.put(data, "from-gateway.bin")
    assert status == 201
    out = tmp_path / "out.bin"
    net.client("get", doc["address"], "-o", str(out))
    assert out.read_bytes() == data
    entry = listed(net)[doc["address"]]
    assert (entry["name"], entry["size"], entry["parts"], entry["kind"]) == ("from-gateway.bin", len(data), 2, "put")
    assert abs(entry["created"] - time.time()) < 300

    # Through the CLI, then the gateway.
    src = tmp_path / "from cli é.bin"
    src.write_bytes(os.urandom(600 * KiB))
    r = net.client("put", str(src))
    address = r.stdout.decode().split()[0]
    status, headers, body = gateway.get(address)
    assert status == 200 and body == src.read_bytes()
    assert "filename*=UTF-8''from%20cli%20%C3%A9.bin" in headers["Content-Disposition"]



def in_threads(n: int, call: Any) -> dict[int, Any]:
    """`call(i)` for i in range(n), all at once on threads: each one's result or exception."""
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        try:
            results[i] = call(i)
        except BaseException as e:  # reported by the caller's assertions
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results

def test_several_requests_at_once(gateway):
    sizes = [0, 10 * KiB, 300 * KiB, 1 * MiB + 5, 2 * MiB + 3, 3 * MiB]  # more than MAX_TRANSFERS
    datas = [os.urandom(n) for n in sizes]
    results = in_threads(len(sizes), lambda i: gateway.put(datas[i], f"parallel-{i}"))
    addresses = []
    for i in range(len(sizes)):
        status, _, doc = results[i]
        assert status == 201, doc
        assert doc["size"] == sizes[i] and doc["name"] == f"parallel-{i}"
        addresses.append(doc["address"])
    assert len(set(addresses)) == len(sizes)

    back = in_threads(len(sizes), lambda i: gateway.get(addresses[i]))
    for i in range(len(sizes)):
        status, _, body = back[i]
        assert status == 200 and body == datas[i], i


# --- the token -----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "0" * 64, "not-the-token"])
def test_requests_without_the_right_token_are_401(gateway, token):
    for method, path, body in [
        ("GET", "/info", None),
        ("GET", "/files/" + "ab" * 32, None),
        ("PUT", "/files?name=nope", b"small body"),
    ]:
        status, headers, raw = gateway.request(method, path, body, token=token)
        assert_json_error(status, headers, raw, 401)
        assert headers["WWW-Authenticate"] == "Bearer"
    # Another scheme with the right token is refused too.
    status, headers, raw = gateway.request("GET", "/info", token=None,
                                           headers={"Authorization": f"Basic {gateway.token}"})
    assert status == 401


@pytest.mark.parametrize("token, expect", [(None, False), ("f" * 64, False), (None, True)],
                         ids=["no-token", "wrong-token", "no-token-expect-100-continue"])
def test_a_large_put_without_the_token_is_refused_before_its_body(gateway, shared_network, token, expect):
    before = recorded(shared_network)
    head = (f"PUT /files?name=refused HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {2 * MiB}\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token else "")
            + ("Expect: 100-continue\r\n" if expect else "")  # as curl sends with a large upload
            + "\r\n").encode()
    # Only the headers are sent: the answer comes, and the connection closes, without the body.
    s, got = raw_exchange(gateway.port, head)
    try:
        assert got.startswith(b"HTTP/1.1 401 "), got[:200]
        head_part, _, rest = got.partition(b"\r\n\r\n")
        assert b"WWW-Authenticate: Bearer" in head_part
        length = int(re.search(rb"Content-Length: (\d+)", head_part).group(1))
        body, after = rest[:length], rest[length:]
        assert "error" in json.loads(body)
        # Nothing after the final answer (no "100 Continue" to a request that was refused).
        assert after == b"", f"sent after the 401: {after!r}"
        try:  # the body sent now goes nowhere
            s.sendall(os.urandom(2 * MiB))
        except OSError:
            pass
    finally:
        s.close()
    assert gateway.request("GET", "/info")[0] == 200
    assert recorded(shared_network) == before


def test_the_token_file_is_private_and_reused_on_restart(shared_network, tmp_path):
    net = shared_network
    key = tmp_path / "keys" / "user.key"
    key.parent.mkdir()
    generate_key_file(key)
    token_file = key.parent / "gateway.token"
    assert not token_file.exists()

    first = Gateway(net, tmp_path, key=key, name="first")
    try:
        assert first.token_path == token_file  # beside the key by default, made on first start
        content = token_file.read_text()
        assert re.fullmatch(r"[0-9a-f]{64}\n", content)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert first.request("GET", "/info")[0] == 200
    finally:
        code = first.stop(signal.SIGTERM)
    assert code == 0, first.log()[-2000:]

    again = Gateway(net, tmp_path, key=key, name="again")
    try:
        assert token_file.read_text() == content
        status, _, body = again.request("GET", "/info", token=content.strip())
        assert status == 200
        assert json.loads(body)["public-key"] == public_key_hex(load_key_file(key))
    finally:
        code = again.stop(signal.SIGINT)  # Ctrl-C
    assert code == 0, again.log()[-2000:]
    assert "Traceback" not in first.log() + again.log()


def test_listen_errors_are_reported(gateway, shared_network):
    def run(listen: str) -> subprocess.CompletedProcess[bytes]:
        return shared_network.client("gateway", "--listen", listen, check=False, timeout=30)

    r = run("nonsense:1:2")
    assert r.returncode == 2 and r.stdout == b""
    assert b"--listen" in r.stderr and b"Traceback" not in r.stderr
    r = run(f"tcp:{gateway.port}:interface=127.0.0.1")  # taken by the module's gateway
    assert r.returncode == 1 and r.stdout == b""
    assert b"cannot listen" in r.stderr and b"Traceback" not in r.stderr
    assert gateway.request("GET", "/info")[0] == 200


def test_the_module_gateway_keeps_its_token_beside_the_key(gateway, shared_network):
    assert gateway.token_path == shared_network.key.with_name("gateway.token")
    assert re.fullmatch(r"[0-9a-f]{64}\n", gateway.token_path.read_text())
    assert stat.S_IMODE(gateway.token_path.stat().st_mode) == 0o600


# --- errors --------------------------------------------------------------------------------------


def test_errors_are_json_with_their_status_and_the_gateway_goes_on(gateway, shared_network, tmp_path):
    net = shared_network
    for bad in ["A" * 64, "a" * 63, "a" * 65, "xyz", "s" + "a" * 64]:  # a share ID is no file address
        assert_json_error(*gateway.get(bad), 400)
    doc = assert_json_error(*gateway.get(os.urandom(32).hex()), 404)
    assert doc["code"] == "not-found"

    other = tmp_path / "other.key"
    generate_key_file(other)
    src = tmp_path / "theirs.txt"
    src.write_bytes(b"not yours\n" * 1000)
    theirs = net.client("put", str(src), key=other).stdout.decode().split()[0]
    doc = assert_json_error(*gateway.get(theirs), 403)
    assert doc["code"] == "wrong-key"

    assert_json_error(*gateway.request("GET", "/no/such/thing"), 404)
    assert_json_error(*gateway.request("DELETE", "/files/" + theirs), 405)
    assert_json_error(*gateway.request("PUT", "/files?name=a&name=b", b"twice"), 400)

    # Still serving.
    assert gateway.request("GET", "/info")[0] == 200
    status, _, doc = gateway.put(b"after the errors", "after.txt")
    assert status == 201
    assert gateway.get(doc["address"])[2] == b"after the errors"
    assert gateway.alive()


def test_an_upload_cut_short_stores_no_file(gateway, shared_network):
    before = recorded(shared_network)
    introduced = shared_network.status()["activity"]["introductions"]
    head = (f"PUT /files?name=cut-short HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {4 * MiB}\r\n"
            f"Authorization: Bearer {gateway.token}\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=15)
    try:
        s.sendall(head + os.urandom(1 * MiB))
        wait_until("the first part is on its way (the gateway asked for introductions to store it)",
                   lambda: shared_network.status()["activity"]["introductions"] > introduced)
    finally:
        s.close()

    # The gateway goes on, and only the file stored next is listed.
    data = os.urandom(1 * MiB + 3)
    status, _, doc = gateway.put(data, "after-cut")
    assert status == 201
    assert gateway.get(doc["address"])[2] == data
    after = recorded(shared_network)
    assert set(after) - set(before) == {doc["address"]}
    assert all(e["name"] != "cut-short" for e in after.values())
    assert gateway.alive()


def test_a_streamed_put_leaves_no_error_in_the_log(gateway):
    """A body of STREAM_BODY_FROM bytes or more goes through BodyPipe; the request must end
    without an unhandled error (the gateway's log is what its user reads)."""
    offset = len(gateway.log())
    data = os.urandom(400 * KiB)
    status, _, doc = gateway.put(data, "streamed")
    assert status == 201
    assert gateway.get(doc["address"])[2] == data
    # The log line of the request is written after the answer.
    wait_until("the gateway logs the request", lambda: '"PUT /files?name=streamed HTTP/1.1" 201' in gateway.log()[offset:])
    log = gateway.log()[offset:]
    assert "Traceback" not in log and "Unhandled" not in log, log


def test_token_file_option_and_parts_larger_than_the_body_buffer(gateway, shared_network, tmp_path):
    """--token-file puts the token elsewhere (made there on first start). --part-size accepts
    up to 16 MiB; a streamed PUT must work with parts larger than the 8 MiB the gateway
    buffers before it stops reading the socket."""
    elsewhere = tmp_path / "private" / "tok"
    gw = Gateway(shared_network, tmp_path, "--part-size", "9M", "--token-file", str(elsewhere), name="bigparts")
    try:
        assert gw.token_path == elsewhere
        assert re.fullmatch(r"[0-9a-f]{64}\n", elsewhere.read_text())
        assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o600
        assert gw.token != gateway.token
        assert gw.request("GET", "/info", token=gateway.token)[0] == 401
        assert gw.request("GET", "/info")[0] == 200

        data = os.urandom(9 * MiB + 1000)
        try:
            status, _, doc = gw.put(data, "big-parts", timeout=10)
        except TimeoutError:
            pytest.fail("the PUT never finished: the gateway stopped reading the body while the put "
                        "waited for a whole 9 MiB part")
        assert status == 201 and doc["parts"] == 2
        assert gw.get(doc["address"])[2] == data
    finally:
        gw.stop()
