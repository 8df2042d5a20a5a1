# -*- test-case-name: tests.adapters.test_gateway -*-
"""The gateway (dsss.client.gateway) in memory: BodyPipe, the early 401 of GatewayRequest, the
token file, Content-Disposition, and whole HTTP exchanges through a twisted.web HTTPChannel on a
StringTransport, over a Session whose discovery server and agents are in-memory fakes that
answer at once (no sockets, no reactor)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
from nacl.public import PrivateKey
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

import dsss
from dsss.client import catalog
from dsss.client.gateway import (
    BODY_BUFFER,
    BODY_READ_SIZE,
    STREAM_BODY_FROM,
    BodyPipe,
    Gateway,
    _disposition,
    gateway_site,
    load_or_make_token,
    token_path_for,
)
from dsss.crypto.manifest import open_manifest
from dsss.errors import DSSSError, Unavailable
from tests.unit.test_client_catalog_config import FakeNetwork, stored_file

TOKEN = "0123456789abcdef" * 4
KEY = PrivateKey.generate()
PART = 64 * 1024


# --- helpers -------------------------------------------------------------------------------------


class CountingTransport:
    """What BodyPipe sees of the channel's transport: pauses and resumes, counted."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1


def start(coro: Any) -> tuple[defer.Deferred[Any], list[Any]]:
    """Run a coroutine; its outcome (a result or a Failure) lands in the list when it ends."""
    d = defer.ensureDeferred(coro)
    out: list[Any] = []
    d.addBoth(out.append)
    return d, out


def outcome(out: list[Any]) -> Any:
    assert out, "still waiting"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def logged_failures() -> Iterator[list[dict[str, Any]]]:
    """Every log event that carries a failure (an unhandled error) while the test runs."""
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def describe(events: list[dict[str, Any]]) -> str:
    out = []
    for e in events:
        f = e.get("log_failure")
        out.append(f"{e.get('log_format') or e.get('why')}: {f.getTraceback() if f else e}")
    return "\n".join(out)


class FlakyNetwork(FakeNetwork):
    """Agents whose downloads of the blocks in `failing` fail (an agent that went away)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    async def download(self, intro: Any, block: str, *, verify: bool = True) -> bytes:
        if block in self.failing:
            raise Unavailable("agent went away")
        return await super().download(intro, block, verify=verify)


class PausingTransport(StringTransport):
    """A transport whose send buffer fills up once `pause_after` bytes are written: it pauses
    its producer (the HTTP channel) as a socket's transport does."""

    pause_after: int | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.pause_after is not None and len(self.value()) > self.pause_after:
            self.pause_after = None
            self.producer.pauseProducing()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """One HTTP/1.1 response: (status, headers with lowercased names, body, what follows).
    The body is cut at its Content-Length (or its last chunk) or at the end of `raw`."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            assert sep, "chunked body cut short"
            size = int(size_line, 16)
            chunk, rest = rest[:size], rest[size + 2:]
            if size == 0:
                break
            body += chunk
        return status, headers, body, rest
    if "content-length" in headers:
        n = int(headers["content-length"])
        return status, headers, rest[:n], rest[n:]
    return status, headers, rest, b""


class Conn:
    """One HTTP connection to a gateway site, driven by hand."""

    def __init__(self, site: Any, transport: StringTransport | None = None) -> None:
        self.transport = transport or StringTransport()
        self.channel = site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes, step: int = 64 * 1024) -> int:
        """Feed `data` as the network would: in pieces, and not while the channel's transport is
        paused (a paused socket reads nothing). Returns how much was taken."""
        sent = 0
        while sent < len(data):
            if self.transport.producerState != "producing":
                break
            self.channel.dataReceived(data[sent:sent + step])
            sent += step
        return min(sent, len(data))

    def lose(self) -> None:
        """The connection is gone: as the reactor does, an exception from connectionLost is
        logged, not raised."""
        try:
            self.channel.connectionLost(Failure(ConnectionResetError("the client went away")))
        except Exception:
            Logger().failure("connectionLost raised")

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers, body, _ = parse_response(self.take())
        return status, headers, body


def request_head(method: str, path: str, *, length: int | None = None, token: str | None = TOKEN,
                 extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode("latin-1")


class Rig:
    """A Gateway over an in-memory network, with its Site."""

    def __init__(self, tmp_path: Path, *, part_size: int = PART, net: FakeNetwork | None = None,
                 key: PrivateKey = KEY) -> None:
        self.net = net or FakeNetwork()
        if not self.net.agents:
            self.net.add_agents(4)
        self.catalog = tmp_path / "client.key.catalog"
        self.gateway = Gateway(self.net.session(), key, server="http://server.test", part_size=part_size,
                               catalog_path=self.catalog, clock=lambda: 1_700_000_000.0)
        self.site = gateway_site(self.gateway, TOKEN)
        self.site.reactor = Clock()  # the channel's idle timeout runs on a clock nobody advances

    def conn(self, transport: StringTransport | None = None) -> Conn:
        return Conn(self.site, transport)

    def put(self, body: bytes, path: str = "/files") -> tuple[int, dict[str, str], Any]:
        c = self.conn()
        c.send(request_head("PUT", path, length=len(body)))
        sent = c.send(body)
        assert sent == len(body), f"the gateway stopped reading the body after {sent} of {len(body)} bytes"
        status, headers, raw = c.response()
        return status, headers, json.loads(raw)

    def get(self, path: str, transport: StringTransport | None = None) -> tuple[int, dict[str, str], bytes]:
        c = self.conn(transport)
        c.send(request_head("GET", path))
        return c.response()

    def entries(self) -> list[catalog.Entry]:
        return catalog.read(self.catalog)[0]


# --- BodyPipe ------------------------------------------------------------------------------------


def test_aread_gives_exact_sizes_across_chunk_boundaries() -> None:
    pipe = BodyPipe(12, CountingTransport())
    for chunk in (b"abc", b"defgh", b"ij"):
        pipe.write(chunk)
    assert pipe.received == 10
    assert outcome(start(pipe.aread(4))[1]) == b"abcd"  # out of two chunks
    assert outcome(start(pipe.aread(3))[1]) == b"efg"  # the middle of one
    _, out = start(pipe.aread(4))  # 3 bytes are in: waits for the 4th
    assert out == []
    pipe.write(b"kl")
    assert outcome(out) == b"hijk"
    _, out = start(pipe.aread(5))  # only one byte is left when the body ends
    assert out == []
    pipe.complete()
    assert outcome(out) == b"l"
    assert outcome(start(pipe.aread(5))[1]) == b""
    assert outcome(start(pipe.aread(1))[1]) == b""


def test_aread_returns_at_once_what_is_buffered_and_empty_writes_change_nothing() -> None:
    pipe = BodyPipe(6, None)  # no transport: nothing to pause
    pipe.write(b"")
    _, out = start(pipe.aread(1))
    assert out == []
    pipe.write(b"xyz")
    assert outcome(out) == b"x"
    pipe.write(b"uvw")
    pipe.complete()
    assert outcome(start(pipe.aread(100))[1]) == b"yzuvw"
    assert outcome(start(pipe.aread(100))[1]) == b""


def test_reading_pauses_past_the_limit_and_resumes_below_half() -> None:
    transport = CountingTransport()
    pipe = BodyPipe(1000, transport, limit=100)
    pipe.write(b"a" * 60)
    pipe.write(b"b" * 40)  # exactly at the limit: still reading
    assert transport.pauses == 0
    pipe.write(b"c" * 10)  # past it
    assert transport.paused and transport.pauses == 1
    pipe.write(b"d" * 30)  # no second pause
    assert transport.pauses == 1
    assert outcome(start(pipe.aread(60))[1]) == b"a" * 60  # 80 left: more than half
    assert transport.paused and transport.resumes == 0
    assert outcome(start(pipe.aread(30))[1]) == b"b" * 30  # 50 left: half
    assert not transport.paused and transport.resumes == 1
    assert outcome(start(pipe.aread(50))[1]) == b"b" * 10 + b"c" * 10 + b"d" * 30
    assert transport.resumes == 1 and transport.pauses == 1


def test_a_reader_waiting_for_more_than_the_limit_does_not_leave_the_socket_paused() -> None:
    """A part larger than what the pipe holds before pausing (a part size above BODY_BUFFER,
    which `--part-size` allows up to 16 MiB) must still arrive: while a reader waits for more
    than is buffered, reading from the socket must go on, or nothing ever wakes the reader."""
    transport = CountingTransport()
    pipe = BodyPipe(200, transport, limit=100)
    _, out = start(pipe.aread(150))
    for _ in range(15):
        if transport.paused:
            break  # a paused socket delivers nothing more
        pipe.write(b"x" * 10)
    assert outcome(out) == b"x" * 150, (
        f"deadlock: the transport is paused with {pipe.received} bytes in and the reader "
        "still waits for 150")


def test_fail_makes_a_pending_aread_raise_and_later_writes_are_dropped() -> None:
    pipe = BodyPipe(100, CountingTransport())
    pipe.write(b"abc")
    _, out = start(pipe.aread(10))
    assert out == []
    error = DSSSError("the upload was cut short")
    pipe.fail(error)
    with pytest.raises(DSSSError, match="cut short"):
        outcome(out)
    pipe.write(b"more")
    assert pipe.received == 3
    _, out = start(pipe.aread(1))  # what was buffered before the failure still reads
    assert outcome(out) == b"a"
    with pytest.raises(DSSSError):
        outcome(start(pipe.aread(10))[1])


def test_fail_after_the_body_is_complete_changes_nothing() -> None:
    pipe = BodyPipe(3, CountingTransport())
    pipe.write(b"abc")
    pipe.complete()
    pipe.fail(DSSSError("connection closed after the request"))
    assert outcome(start(pipe.aread(10))[1]) == b"abc"
    assert outcome(start(pipe.aread(10))[1]) == b""


def test_discard_drops_the_rest_of_the_body_and_resumes_reading() -> None:
    transport = CountingTransport()
    pipe = BodyPipe(BODY_BUFFER + 3 * 1024 * 1024, transport)
    pipe.write(b"a" * (BODY_BUFFER + 1))
    assert transport.paused
    _, out = start(pipe.discard())
    assert not transport.paused  # what was buffered is dropped: the uploader can go on
    assert out == []  # and discard waits for the end of the body
    pipe.write(b"b" * 1024 * 1024)
    pipe.write(b"c" * (2 * 1024 * 1024 - 1))
    assert out == []
    pipe.complete()
    assert outcome(out) is None
    assert not transport.paused and transport.pauses == transport.resumes
    assert outcome(start(pipe.aread(10))[1]) == b""


def test_discard_returns_at_once_after_a_failure() -> None:
    transport = CountingTransport()
    pipe = BodyPipe(10, transport, limit=4)
    pipe.write(b"abcdef")
    assert transport.paused
    pipe.fail(DSSSError("gone"))
    assert outcome(start(pipe.discard())[1]) is None
    assert not transport.paused


def test_the_pipe_stands_in_for_request_content() -> None:
    pipe = BodyPipe(10, None)
    pipe.seek(0, 0)  # Request.requestReceived rewinds its content
    assert pipe.tell() == 0


# --- token, Content-Disposition ------------------------------------------------------------------


def test_token_is_made_with_mode_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "gateway.token"
    token = load_or_make_token(path)
    assert len(token) == 64 and all(c in "0123456789abcdef" for c in token)
    assert path.read_bytes() == token.encode("ascii") + b"\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_make_token(path) == token  # the same on the next start
    assert load_or_make_token(tmp_path / "other.token") != token  # made at random
    assert sorted(p.name for p in path.parent.iterdir()) == ["gateway.token"]  # no temporary file left


def test_token_written_by_hand_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("  " + "Z9" * 20 + "\n\n")
    assert load_or_make_token(path) == "Z9" * 20


@pytest.mark.parametrize("content", [
    b"",
    b"\n",
    b"hello\n",
    b"a" * 31 + b"\n",  # too short
    b"a" * 40 + b"!" + b"\n",  # not letters and digits
    b"a" * 20 + b" " + b"b" * 20 + b"\n",
    b"\xff\xfe" * 40,  # not text
])
def test_garbage_in_the_token_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "gateway.token"
    path.write_bytes(content)
    with pytest.raises(DSSSError):
        load_or_make_token(path)
    assert path.read_bytes() == content  # never replaced


def test_an_unreadable_token_path_is_a_dsss_error(tmp_path: Path) -> None:
    (tmp_path / "gateway.token").mkdir()
    with pytest.raises(DSSSError, match="gateway token"):
        load_or_make_token(tmp_path / "gateway.token")


def test_token_file_is_beside_the_key() -> None:
    assert token_path_for(Path("/home/a/.config/dsss/key")) == Path("/home/a/.config/dsss/gateway.token")


def test_disposition_ascii_name() -> None:
    assert _disposition("report.pdf") == b"attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"


def test_disposition_quotes_and_backslashes_cannot_break_out() -> None:
    value = _disposition('a"b\\c;d.txt')
    assert value.startswith(b'attachment; filename="a_b_c;d.txt"; ')
    assert value.endswith(b"filename*=UTF-8''a%22b%5Cc%3Bd.txt")
    assert value.count(b'"') == 2


def test_disposition_non_ascii_name_has_an_ascii_fallback_and_utf8() -> None:
    value = _disposition("résumé €.pdf")
    assert isinstance(value, bytes)
    value.decode("ascii")  # a header value: ASCII only
    assert b'filename="r_sum_ _.pdf"' in value
    assert value.endswith(b"filename*=UTF-8''r%C3%A9sum%C3%A9%20%E2%82%AC.pdf")
    assert _disposition("日本.txt").endswith(b"filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt")


def test_disposition_never_carries_a_line_break_and_has_a_fallback_for_empty_names() -> None:
    value = _disposition("a\r\nSet-Cookie: x=1")
    assert b"\r" not in value and b"\n" not in value
    assert _disposition("") == b"attachment; filename=\"file\"; filename*=UTF-8''"
    assert _disposition("ééé").startswith(b'attachment; filename="___"')


# --- GatewayRequest: the token, checked as soon as the headers are in ----------------------------


def assert_early_401(c: Conn) -> None:
    raw = c.take()
    status, headers, body, _ = parse_response(raw)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert headers["content-type"] == "application/json"
    assert "error" in json.loads(body)
    assert c.transport.disconnecting  # told to close the connection


@pytest.mark.parametrize("token", [None, "wrong" * 13, TOKEN[:-1], TOKEN + "0"])
def test_a_put_without_the_token_is_refused_before_its_body(tmp_path: Path, token: str | None) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    c.send(request_head("PUT", "/files", length=1_000_000, token=token))
    assert_early_401(c)  # before any byte of the body
    c.send(os.urandom(1_000_000))  # what the client sends anyway is dropped
    assert c.transport.value() == b""
    assert rig.net.uploads == [] and rig.gateway.stored == 0
    assert not rig.catalog.exists()


def test_a_put_expecting_100_continue_without_the_token_gets_only_the_401(tmp_path: Path) -> None:
    """A client that sends `Expect: 100-continue` (curl, for a large upload) and no token gets
    the 401 as the one and final answer: no "100 Continue" may follow a final response."""
    rig = Rig(tmp_path)
    c = rig.conn()
    c.send(request_head("PUT", "/files", length=2_000_000, token=None, extra="Expect: 100-continue\r\n"))
    raw = c.take()
    status, _, _, after = parse_response(raw)
    assert status == 401
    assert after == b"", f"sent after the final answer: {after!r}"


def test_a_put_expecting_100_continue_with_the_token_is_told_to_go_on(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    data = os.urandom(STREAM_BODY_FROM + 1)
    c.send(request_head("PUT", "/files?name=e", length=len(data), extra="Expect: 100-continue\r\n"))
    assert c.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.send(data)
    status, _, raw = c.response()
    assert status == 201
    assert rig.get(f"/files/{json.loads(raw)['address']}")[2] == data


def test_a_small_put_and_a_get_without_the_token_are_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    c.send(request_head("PUT", "/files", length=10, token=None) + b"0123456789")
    assert_early_401(c)
    for path in ("/info", "/files/" + "a" * 64, "/nothing-here"):
        c = rig.conn()
        c.send(request_head("GET", path, token="x" * 64))
        assert_early_401(c)
    c = rig.conn()
    c.send(b"GET /info HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + TOKEN.encode() + b"\r\n\r\n")
    assert_early_401(c)
    assert rig.net.uploads == []


def test_a_chunked_put_without_the_token_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    c.send(request_head("PUT", "/files", token=None, extra="Transfer-Encoding: chunked\r\n"))
    assert_early_401(c)
    c.send(b"5\r\nhello\r\n0\r\n\r\n")
    assert c.transport.value() == b""
    assert rig.net.uploads == []


def test_info_with_the_token(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    status, headers, body = rig.get("/info")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "version": dsss.__version__,
        "server": "http://server.test",
        "replicas": 3,
        "erasure": None,
        "public-key": bytes(KEY.public_key).hex(),
    }
    c = rig.conn()  # the scheme's case does not matter
    c.send(b"GET /info HTTP/1.1\r\nHost: x\r\nAuthorization: bearer " + TOKEN.encode() + b"\r\n\r\n")
    assert c.response()[0] == 200


# --- PUT and GET over HTTP -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, STREAM_BODY_FROM - 1, STREAM_BODY_FROM, 5 * PART + 17])
def test_put_then_get_round_trip(tmp_path: Path, size: int) -> None:
    rig = Rig(tmp_path)
    data = os.urandom(size)
    status, headers, doc = rig.put(data, "/files?name=r%C3%A9sum%C3%A9.bin")
    assert status == 201, doc
    address = doc["address"]
    expected_parts = 0 if 0 < size <= 16 * 1024 else -(-size // PART)
    assert doc == {"address": address, "name": "résumé.bin", "size": size, "parts": expected_parts}
    assert headers["location"] == f"/files/{address}"
    [entry] = rig.entries()
    assert (entry.address, entry.name, entry.size, entry.parts, entry.created) == (
        address, "résumé.bin", size, expected_parts, 1_700_000_000)

    status, headers, body = rig.get(f"/files/{address}")
    assert status == 200
    assert body == data
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-length"] == str(size)
    assert headers["content-disposition"] == _disposition("résumé.bin").decode()


def test_a_streamed_put_finishes_its_request_cleanly(tmp_path: Path, logged_failures: list[Any]) -> None:
    """After a PUT whose body was streamed (a BodyPipe as request.content), twisted.web's
    Request.finish closes the content: that must not raise, and the request's notifyFinish
    Deferreds must fire (Klein and access logs hang on them)."""
    rig = Rig(tmp_path)
    c = rig.conn()
    body = os.urandom(STREAM_BODY_FROM + 5)
    c.send(request_head("PUT", "/files?name=s", length=len(body)))
    request = c.channel.requests[-1]
    finished: list[Any] = []
    request.notifyFinish().addBoth(finished.append)
    assert c.send(body) == len(body)
    status, _, raw = c.response()
    assert status == 201, raw
    assert not logged_failures, describe(logged_failures)
    assert finished == [None]


def test_the_body_streams_into_the_put_as_it_arrives(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    data = os.urandom(8 * PART)
    c.send(request_head("PUT", "/files?name=live", length=len(data)))
    c.send(data[: 3 * PART + 10])
    # Three parts are stored (each on three agents) before the rest of the body is even sent.
    assert len(rig.net.uploads) == 3 * 3
    assert c.transport.value() == b""  # no answer before the end of the body
    c.send(data[3 * PART + 10:])
    status, _, raw = c.response()
    assert status == 201
    doc = json.loads(raw)
    assert doc["parts"] == 8 and doc["size"] == len(data)
    assert rig.get(f"/files/{doc['address']}")[2] == data


def test_a_streamed_body_is_read_from_its_socket_in_large_pieces(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    small, large = rig.conn(), rig.conn()
    small.send(request_head("PUT", "/files?name=small", length=STREAM_BODY_FROM - 1))
    large.send(request_head("PUT", "/files?name=large", length=STREAM_BODY_FROM))
    assert getattr(small.transport, "bufferSize", None) is None  # Twisted's own read size
    assert large.transport.bufferSize == BODY_READ_SIZE  # type: ignore[attr-defined]
    for c, size in ((small, STREAM_BODY_FROM - 1), (large, STREAM_BODY_FROM)):
        c.send(os.urandom(size))
        assert c.response()[0] == 201


def test_a_streamed_put_with_parts_larger_than_the_body_buffer(tmp_path: Path) -> None:
    """`--part-size` may be up to 16 MiB, above BODY_BUFFER: a PUT of such a part must not
    stall with the socket paused."""
    part = BODY_BUFFER + 1024 * 1024
    rig = Rig(tmp_path, part_size=part)
    data = os.urandom(part + 100)
    c = rig.conn()
    c.send(request_head("PUT", "/files?name=big", length=len(data)))
    sent = c.send(data)
    assert sent == len(data), (
        f"the gateway paused reading after {sent} of {len(data)} bytes while the put waits "
        f"for a whole {part}-byte part: the upload never ends")
    status, _, raw = c.response()
    assert status == 201
    assert json.loads(raw)["parts"] == 2


def test_chunked_and_post_bodies_are_stored_too(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    c.send(request_head("PUT", "/files?name=chunky", extra="Transfer-Encoding: chunked\r\n"))
    c.send(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
    status, _, raw = c.response()
    assert status == 201
    doc = json.loads(raw)
    assert doc["size"] == 11 and doc["name"] == "chunky"
    assert rig.get(f"/files/{doc['address']}")[2] == b"hello world"

    data = os.urandom(STREAM_BODY_FROM + 1)  # POST is never streamed: spooled, then stored
    c = rig.conn()
    c.send(request_head("POST", "/files", length=len(data), extra="Content-Type: application/octet-stream\r\n"))
    c.send(data)
    status, _, raw = c.response()
    assert status == 201
    doc = json.loads(raw)
    assert doc["name"] == "" and rig.get(f"/files/{doc['address']}")[2] == data
    assert [e.name for e in rig.entries()] == ["chunky", ""]


@pytest.mark.parametrize("query", ["?name=a&name=b", "?name=%FF%FE"])
@pytest.mark.parametrize("size", [100, STREAM_BODY_FROM + 100])
def test_a_bad_name_parameter_is_400_and_the_connection_stays_usable(
        tmp_path: Path, query: str, size: int, logged_failures: list[Any]) -> None:
    """Answered once the body is in (like any failed put), so that the rest of the body is
    not read as the next request; the connection then serves the next request."""
    rig = Rig(tmp_path)
    c = rig.conn()
    c.send(request_head("PUT", "/files" + query, length=size))
    body = b"GET /info HTTP/1.1\r\nHost: smuggled\r\n\r\n"
    body += b"x" * (size - len(body))
    c.send(body)  # must not raise
    status, headers, raw, rest = parse_response(c.take())
    assert status == 400
    assert json.loads(raw)["code"] == "bad-request"
    assert rest == b"", f"the body was read as another request: {rest[:200]!r}"
    c.send(request_head("GET", "/info"))
    assert c.response()[0] == 200
    assert rig.net.uploads == [] and not rig.catalog.exists()
    assert not logged_failures, describe(logged_failures)


def test_a_bad_name_on_a_body_larger_than_the_buffer_does_not_stall(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    size = BODY_BUFFER + 2 * 1024 * 1024
    c.send(request_head("PUT", "/files?name=a&name=b", length=size))
    sent = c.send(b"x" * size, step=1024 * 1024)
    assert sent == size, f"the gateway stopped reading after {sent} of {size} bytes"


def test_a_put_cut_short_stores_nothing_and_records_nothing(tmp_path: Path, logged_failures: list[Any]) -> None:
    rig = Rig(tmp_path)
    c = rig.conn()
    data = os.urandom(10 * PART)
    c.send(request_head("PUT", "/files?name=cut", length=len(data)))
    c.send(data[: 4 * PART + 7])
    c.lose()
    assert rig.gateway.stored == 0
    assert not rig.catalog.exists()
    for blobs in rig.net.agents.values():  # parts may stay behind, but no manifest: no file exists
        for blob in blobs.values():
            with pytest.raises(DSSSError):
                open_manifest(blob, KEY)
    # The gateway goes on serving.
    status, _, doc = rig.put(b"after")
    assert status == 201 and rig.gateway.stored == 1
    assert not logged_failures, describe(logged_failures)


def test_put_with_no_agents_is_503_after_the_body(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.net.live.clear()
    for size in (10, STREAM_BODY_FROM + 10):
        c = rig.conn()
        c.send(request_head("PUT", "/files", length=size))
        c.send(b"a" * (size - 1))
        assert c.transport.value() == b""  # no answer before the whole request is in
        c.send(b"a")
        status, _, raw = c.response()
        assert status == 503
        assert "error" in json.loads(raw)
        c.send(request_head("GET", "/info"))  # the connection is still in step
        assert c.response()[0] == 200
    assert not rig.catalog.exists()


def test_get_errors_are_json_with_their_status(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    other, _ = stored_file(rig.net, 2, list(rig.net.agents)[:3])  # sealed to another key
    cases = [
        ("/files/" + "A" * 64, 400, "bad-request"),
        ("/files/" + "a" * 63, 400, "bad-request"),
        ("/files/" + "a" * 64, 404, "not-found"),
        (f"/files/{other}", 403, "wrong-key"),
    ]
    for path, code, kind in cases:
        status, headers, raw = rig.get(path)
        assert status == code, (path, raw)
        assert headers["content-type"] == "application/json"
        doc = json.loads(raw)
        assert doc["code"] == kind and doc["error"]
    status, _, raw = rig.get("/nothing")
    assert status == 404 and "error" in json.loads(raw)
    c = rig.conn()
    c.send(request_head("DELETE", "/files/" + "a" * 64))
    status, _, raw = c.response()
    assert status == 405 and "error" in json.loads(raw)


def test_get_with_too_few_agents_is_503(tmp_path: Path) -> None:
    net = FlakyNetwork()
    net.add_agents(4)
    rig = Rig(tmp_path, net=net)
    _, _, doc = rig.put(os.urandom(3 * PART))
    net.failing.add(doc["address"])  # the manifest cannot be fetched
    status, _, raw = rig.get(f"/files/{doc['address']}")
    assert status == 503 and json.loads(raw)["error"]


def test_get_of_a_part_that_fails_before_any_byte_is_sent_is_a_json_error(tmp_path: Path) -> None:
    """The manifest is read, but the first part cannot be fetched: nothing of the file has
    gone out yet, so the client must get the JSON error with its status (503), not a
    connection closed without an answer."""
    net = FlakyNetwork()
    net.add_agents(4)
    rig = Rig(tmp_path, net=net)
    _, _, doc = rig.put(os.urandom(3 * PART))
    manifest, _ = open_manifest(net.agents[list(net.agents)[0]][doc["address"]], KEY)
    net.failing.add(manifest.parts[0].hash)
    c = rig.conn()
    c.send(request_head("GET", f"/files/{doc['address']}"))
    raw = c.take()
    assert raw.startswith(b"HTTP/1.1 503"), f"got {raw[:200]!r} (connection closed: {c.transport.disconnecting})"
    status, headers, body, _ = parse_response(raw)
    assert headers["content-type"] == "application/json" and json.loads(body)["error"]


def test_get_failing_after_the_first_byte_closes_short_of_content_length(tmp_path: Path) -> None:
    net = FlakyNetwork()
    net.add_agents(4)
    rig = Rig(tmp_path, net=net)
    data = os.urandom(6 * PART)
    _, _, doc = rig.put(data)
    manifest, _ = open_manifest(net.agents[list(net.agents)[0]][doc["address"]], KEY)
    net.failing.add(manifest.parts[4].hash)
    c = rig.conn()
    c.send(request_head("GET", f"/files/{doc['address']}"))
    status, headers, body, _ = parse_response(c.take())
    assert status == 200 and headers["content-length"] == str(len(data))
    assert 0 < len(body) < len(data) and data.startswith(body)
    assert c.transport.disconnecting  # closed: the client sees the body cut short
    assert rig.gateway.served == 0
    # Other connections are served as before.
    net.failing.clear()
    assert rig.get(f"/files/{doc['address']}")[2] == data
    assert rig.gateway.served == 1


def test_get_waits_while_the_client_reads_slowly(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    data = os.urandom(6 * PART)
    _, _, doc = rig.put(data)
    transport = PausingTransport()
    transport.pause_after = 1000  # the send buffer is full after the first part
    c = rig.conn(transport)
    c.send(request_head("GET", f"/files/{doc['address']}"))
    status, headers, body, _ = parse_response(transport.value())
    assert status == 200
    assert body == data[:PART]  # no more parts written while the transport is paused
    transport.producer.resumeProducing()  # the client read; the buffer drained
    status, headers, body, _ = parse_response(transport.value())
    assert body == data
    assert rig.gateway.served == 1
    assert transport.producer is c.channel  # the response's producer is unregistered again
    assert c.channel._requestProducer is None


def test_a_client_gone_during_a_get_stops_it(tmp_path: Path, logged_failures: list[Any]) -> None:
    rig = Rig(tmp_path)
    data = os.urandom(3 * PART)
    _, _, doc = rig.put(data)
    transport = PausingTransport()
    transport.pause_after = 1000
    c = rig.conn(transport)
    c.send(request_head("GET", f"/files/{doc['address']}"))
    assert 0 < len(transport.value()) < len(data)  # paused after the first part
    c.lose()
    assert rig.gateway.served == 0
    assert rig.get(f"/files/{doc['address']}")[2] == data  # the slot was given back
    assert not logged_failures, describe(logged_failures)


def test_transfers_beyond_the_limit_wait_their_turn(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.gateway.transfers = defer.DeferredSemaphore(1)
    data = os.urandom(4 * PART)
    _, _, doc = rig.put(data)
    slow = PausingTransport()
    slow.pause_after = 1000
    first = rig.conn(slow)
    first.send(request_head("GET", f"/files/{doc['address']}"))  # holds the one slot, paused
    second = rig.conn()
    second.send(request_head("GET", f"/files/{doc['address']}"))
    assert second.transport.value() == b""  # waiting for the slot
    slow.producer.resumeProducing()
    assert parse_response(slow.value())[2] == data
    assert second.response()[2] == data
