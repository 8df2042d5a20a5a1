# -*- test-case-name: tests.adapters.test_gateway -*-
"""The local gateway: the client as a long-running process with an HTTP API.

    python -m dsss.client gateway [--listen tcp:8472:interface=127.0.0.1] [--token-file FILE]

What Tahoe-LAFS's web API is to `tahoe put`: programs (and `curl`) store and fetch files over
HTTP on this machine, and every request skips what each `dsss` command pays again (interpreter
start-up, imports, the server's info, the UDP socket and its punch, QUIC handshakes with agents
already met). The gateway holds the user's key, so it listens on loopback by default and answers
only requests that carry its token (`Authorization: Bearer TOKEN`; the token is kept in
`gateway.token` beside the key, mode 0600, and made on first start): a web page the user visits
cannot make the browser store or fetch files through it.

    PUT /files[?name=NAME]   the request body is the file: encrypted and stored as `put` does
                             (recorded in the key's catalog); 201 and JSON
                             {"address", "name", "size", "parts"}. NAME is one path component:
                             a path (`photos/2024/a.jpg`, `../x`), `.`, `..`, NUL or more than
                             255 bytes is refused with 400 and nothing is stored
    GET /files/ADDRESS       the file's bytes, streamed as its parts arrive and are verified
                             (Content-Length from the manifest); an error before the first byte
                             is a JSON error with the status below, one after it closes the
                             connection short of Content-Length
    GET /info                {"version", "server", "replicas", "erasure", "public-key"}

Errors: 400 bad address or parameter (`is-a-directory` for a directory's address), 401 no or wrong token, 403 not your file (wrong key),
404 unknown address, 422 corrupt data, 503 not enough agents, 504 timeout, 507 full agents.
"""

from __future__ import annotations

import collections
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote

from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

import dsss
from dsss.client import catalog
from dsss.crypto.directory import BadName, check_name
from dsss.crypto.manifest import Manifest, clean_name
from dsss.httpjson import http_error, unexpected_error
from dsss.httpjson import json_body as _json
from dsss.errors import AccessDenied, BadRequest, DSSSError
from dsss.fileutil import atomic_write
from dsss.model import check_block_id, is_share_id

if TYPE_CHECKING:
    from nacl.public import PrivateKey

    from dsss.client.session import Session

log = Logger()

HTTPRequest = Any
"""What Klein hands a route and an error handler: a twisted.web Request providing IRequest
(a zope interface, which mypy does not take as a type without a plugin)."""

DEFAULT_LISTEN = "tcp:8472:interface=127.0.0.1"
TOKEN_FILE_NAME = "gateway.token"
MAX_TRANSFERS = 4
"""Puts and gets carried out at once; more wait their turn (each holds a window of parts)."""


class TokenRequired(AccessDenied):
    http_status = 401
    code = "auth-required"


def token_path_for(key_path: Path) -> Path:
    return key_path.with_name(TOKEN_FILE_NAME)


def load_or_make_token(path: Path) -> str:
    """The gateway's token: read from `path`, or made (32 random bytes, hex) and written there
    with mode 0600 if the file does not exist."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = secrets.token_hex(32)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            atomic_write(path, (token + "\n").encode("ascii"), mode=0o600, exclusive=True)
        except FileExistsError:  # made at the same moment by another gateway
            return load_or_make_token(path)
        return token
    except (OSError, UnicodeDecodeError) as e:
        raise DSSSError(f"cannot read the gateway token {path}: {e}") from None
    if len(token) < 32 or not token.isascii() or not token.isalnum():
        raise DSSSError(f"{path}: not a gateway token (32 or more letters and digits)")
    return token


def _bearer(request: HTTPRequest) -> str | None:
    raw = request.getHeader(b"authorization")
    if raw is None:
        return None
    value = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


STREAM_BODY_FROM = 256 * 1024
"""A PUT body at least this large (with a Content-Length) streams into the put as it arrives."""
BODY_BUFFER = 8 * 1024 * 1024
"""Bytes of a streamed body held before the gateway stops reading the socket (plus at most one
read of BODY_READ_SIZE)."""
BODY_READ_SIZE = 1024 * 1024
"""A streamed body is read from its socket in pieces of this size, not Twisted's 64 KiB: a
sixteenth of the reads and of the calls through twisted.web (measured: the gateway's CPU per MB
of a 256 MiB put 10.7 -> 9.7 ms)."""


class BodyPipe:
    """The body of a PUT /files while it arrives: `aread(n)` waits for n bytes (fewer only at the
    end); reading from the socket pauses while more than BODY_BUFFER bytes wait to be read, so a
    fast uploader and slow agents cost bounded memory. Stands in for `request.content`."""

    def __init__(self, length: int, transport: Any, limit: int = BODY_BUFFER) -> None:
        self.length = length
        self._transport = transport
        self._limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self.received = 0
        self._complete = False  # the channel has passed the whole body on (requestReceived)
        self._error: BaseException | None = None
        self._waiting: defer.Deferred[None] | None = None
        self._paused = False

    # the channel's side (Request.handleContentChunk, requestReceived, connectionLost)

    def write(self, data: bytes) -> None:
        if self._error is not None or not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > self._limit and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pauseProducing()
        self._wake()

    def complete(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
            self._wake()

    def seek(self, offset: int, whence: int = 0) -> None:  # Request.requestReceived rewinds content
        pass

    def tell(self) -> int:
        return 0

    def close(self) -> None:  # Request._cleanup and connectionLost close their content
        self._chunks.clear()
        self._buffered = 0

    # the reader's side (put_stream)

    async def aread(self, n: int) -> bytes:
        """Up to n bytes: exactly n unless the body ends first; b"" at its end."""
        while self._buffered < n and not self._complete:
            if self._error is not None:
                raise self._error
            if self._paused:  # a read larger than the buffer: let the rest of it in
                self._paused = False
                self._transport.resumeProducing()
            self._waiting = defer.Deferred()
            await self._waiting
        if self._error is not None and self._buffered < n:
            raise self._error
        out = []
        want = n
        while want and self._chunks:
            chunk = self._chunks.popleft()
            if len(chunk) > want:
                self._chunks.appendleft(chunk[want:])
                chunk = chunk[:want]
            out.append(chunk)
            want -= len(chunk)
        data = b"".join(out)
        self._buffered -= len(data)
        if self._paused and self._buffered <= self._limit // 2:
            self._paused = False
            self._transport.resumeProducing()
        return data

    async def discard(self) -> None:
        """Read and drop what is left of the body (before answering with an error)."""
        while not self._complete and self._error is None:
            await self.aread(self._limit)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._transport.resumeProducing()

    def _wake(self) -> None:
        d, self._waiting = self._waiting, None
        if d is not None:
            d.callback(None)


class GatewayRequest(Request):
    """A request whose token is checked as soon as its headers are in: a body sent without the
    right token is refused (401, connection closed) before Twisted spools it to a file. A
    PUT /files body with a Content-Length of STREAM_BODY_FROM or more is not spooled at all: the
    request is dispatched at once with a BodyPipe as its content, so the file is encrypted and
    stored while it is still arriving."""

    token: str = ""  # set on a subclass by `gateway_site`
    body_pipe: BodyPipe | None = None
    # (command, path, version), given by GatewayChannel as soon as the request line is parsed;
    # None under another channel (then no body is streamed).
    request_line: tuple[bytes, bytes, bytes] | None = None

    def gotLength(self, length: int | None) -> None:
        line = self.request_line
        if self.authorized() and length is not None and length >= STREAM_BODY_FROM and line is not None:
            command, path, version = line
            if command == b"PUT" and path.split(b"?", 1)[0] == b"/files":
                transport: Any = self.channel.transport  # a TCP transport: FileDescriptor
                self.body_pipe = BodyPipe(length, transport)
                self.content: Any = self.body_pipe  # Request.content is typed as None in Twisted
                transport.bufferSize = BODY_READ_SIZE  # FileDescriptor.bufferSize: read size
                super().requestReceived(command, path, version)  # dispatched now
                return
        if not self.authorized():
            self._refused = True
            # Twisted would answer `Expect: 100-continue` after this; the refusal is final.
            self.requestHeaders.removeHeader(b"expect")
            peer = self.getClientAddress()
            command, path, _ = self.request_line or (b"?", b"?", b"")
            log.info("refused {command} {path} from {peer}: no or wrong token",
                     command=command.decode("ascii", "replace"),
                     path=path[:200].decode("ascii", "replace"),
                     peer=getattr(peer, "host", "?"))
            refused: Any = self.channel.transport if self.channel is not None else None
            if refused is not None:
                body = b'{"error": "this gateway needs its token: Authorization: Bearer TOKEN"}\n'
                refused.write(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                    b"WWW-Authenticate: Bearer\r\nConnection: close\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                refused.loseConnection()
            return
        super().gotLength(length)

    _refused = False

    def handleContentChunk(self, data: bytes) -> None:
        if not self._refused:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        if self.body_pipe is not None:  # dispatched when its headers came; the body is now in
            self.body_pipe.complete()
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        if self.body_pipe is not None:
            self.body_pipe.fail(DSSSError("the upload was cut short: the HTTP client went away"))
        super().connectionLost(reason)

    def authorized(self) -> bool:
        given = _bearer(self)
        return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                         self.token.encode("ascii"))


@implementer(IPushProducer)
class ResponseStream:
    """Where `get_to_stream` writes a file served over HTTP: `write` goes to the response, and
    `drain()` is a Deferred to wait on while the HTTP client reads slower than parts arrive
    (Twisted pauses us as a producer), so memory stays bounded by the window of parts."""

    def __init__(self, request: HTTPRequest) -> None:
        self._request = request
        self._paused: defer.Deferred[None] | None = None
        self.gone = False
        self.written = 0
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(lambda _f: self.stopProducing())

    def write(self, data: bytes) -> None:
        if self.gone:
            raise DSSSError("the HTTP client went away")
        self._request.write(data)
        self.written += len(data)

    def drain(self) -> defer.Deferred[None] | None:
        return self._paused

    def pauseProducing(self) -> None:
        if self._paused is None and not self.gone:
            self._paused = defer.Deferred()

    def resumeProducing(self) -> None:
        d, self._paused = self._paused, None
        if d is not None:
            d.callback(None)

    def stopProducing(self) -> None:
        self.gone = True
        self.resumeProducing()

    def close(self) -> None:
        if not self.gone:
            self._request.unregisterProducer()


def _disposition(name: str) -> bytes:
    """Content-Disposition for a manifest's name (RFC 6266 / 5987: ASCII fallback and UTF-8)."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return (f"attachment; filename=\"{fallback or 'file'}\"; "
            f"filename*=UTF-8''{quote(name, safe='')}").encode("ascii")


def _one_component(name: str) -> str:
    """A PUT's `name`: empty, or one path component (see dsss.crypto.directory.check_name). A
    path such as `photos/2024/a.jpg` is refused, never stored under a name no `get` could write."""
    if name:
        try:
            check_name(name)
        except BadName as e:
            raise BadRequest(f"parameter 'name' must be one path component, not a path ({e}); "
                             f"store a directory tree with `put -r`") from None
    return name


class Gateway:
    """The HTTP API over one long-lived client Session."""

    app = Klein()

    def __init__(self, session: "Session", key: "PrivateKey", *, server: str, part_size: int,
                 catalog_path: Path | None, clock: Callable[[], float] = time.time,
                 max_transfers: int = MAX_TRANSFERS) -> None:
        self.session = session
        self.key = key
        self.server = server
        self.part_size = part_size
        self.catalog_path = catalog_path
        self.clock = clock
        self.transfers = defer.DeferredSemaphore(max_transfers)
        self.stored = 0
        self.served = 0

    def _check(self, request: HTTPRequest) -> None:
        # GatewayRequest has refused requests without the token already; this covers a site
        # built with another request factory.
        if not (isinstance(request, GatewayRequest) and request.authorized()):
            raise TokenRequired("this gateway needs its token: Authorization: Bearer TOKEN")

    @app.handle_errors(DSSSError)
    def _dsss_error(self, request: HTTPRequest, failure: Any) -> bytes:
        err = failure.value
        if err.http_status == 401:
            request.setHeader(b"www-authenticate", b"Bearer")
        return _json(request, {"error": str(err), "code": err.code}, err.http_status)

    @app.handle_errors(HTTPException)
    def _http_error(self, request: HTTPRequest, failure: Any) -> bytes:
        return http_error(request, failure)

    @app.handle_errors(Exception)
    def _unexpected(self, request: HTTPRequest, failure: Any) -> bytes:
        return unexpected_error(request, failure)

    @app.route("/info", methods=["GET"])
    def info(self, request: HTTPRequest) -> bytes:
        self._check(request)
        return _json(request, {
            "version": dsss.__version__,
            "server": self.server,
            "replicas": self.session.replicas,
            "erasure": str(self.session.erasure) if self.session.erasure is not None else None,
            "public-key": bytes(self.key.public_key).hex(),
        })

    @app.route("/files", methods=["PUT", "POST"])
    async def put(self, request: HTTPRequest) -> bytes:
        from dsss.client.putflow import part_count, put_stream

        body = request.content
        try:
            self._check(request)
            raw = request.args.get(b"name", [b""])
            if len(raw) > 1:
                raise BadRequest("parameter 'name' given more than once")
            try:
                name = clean_name(_one_component(raw[0].decode("utf-8")))
            except UnicodeDecodeError:
                raise BadRequest("parameter 'name' is not UTF-8") from None
            if isinstance(body, BodyPipe):
                size = body.length
            else:
                body.seek(0, os.SEEK_END)
                size = body.tell()
                body.seek(0)
            async with self.transfers:
                address = await put_stream(self.session, body, name=name, size=size,
                                           owner=self.key.public_key, part_size=self.part_size)
        except BaseException:
            if isinstance(body, BodyPipe):
                await body.discard()  # the answer goes out once the whole request is in
            raise
        parts = part_count(size, self.part_size)
        self.stored += 1
        if self.catalog_path is not None:
            entry = catalog.Entry(address=address, name=name, size=size, parts=parts, created=int(self.clock()))
            try:
                catalog.append(self.catalog_path, entry)
            except OSError as e:
                log.warn("could not record {address} in the catalog {path}: {error}",
                         address=address, path=str(self.catalog_path), error=e.strerror or str(e))
        request.setHeader(b"location", f"/files/{address}".encode("ascii"))
        return _json(request, {"address": address, "name": name, "size": size, "parts": parts}, 201)

    @app.route("/files/<address>", methods=["GET"])
    async def get(self, request: HTTPRequest, address: str) -> bytes:
        from dsss.client.getflow import get_to_stream

        self._check(request)
        if is_share_id(check_block_id(address)):
            raise BadRequest("a file address is 64 lowercase hex characters, not a share ID")
        out = ResponseStream(request)
        started = False

        def on_manifest(m: Manifest) -> None:
            nonlocal started
            started = True
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", str(m.size).encode("ascii"))
            request.setHeader(b"content-disposition", _disposition(m.name or address))
            request.setHeader(b"cache-control", b"no-store")

        try:
            async with self.transfers:
                await get_to_stream(self.session, address, out, key=self.key, on_manifest=on_manifest,
                                    drain=out.drain)
        except BaseException as e:
            out.close()
            if not started or (out.written == 0 and not getattr(request, "startedWriting", True)):
                # Nothing is out yet: an ordinary error answer, without the file's headers.
                for header in (b"content-type", b"content-length", b"content-disposition"):
                    request.responseHeaders.removeHeader(header)
                raise
            # The status line and part of the body are out: the only honest signal left is to
            # close the connection short of Content-Length.
            if not out.gone:
                log.warn("get {address} failed after {n} bytes: {error}", address=address[:16],
                         n=out.written, error=str(e))
                transport = getattr(request, "transport", None)
                if transport is not None:
                    transport.abortConnection()
            return b""
        out.close()
        self.served += 1
        return b""



_QUIET_NAMESPACES = ("twisted.web.client._HTTP11ClientFactory",)


def gateway_log_observer(out: Any) -> Any:
    """The gateway's log on `out`: info and above (one line per HTTP request, failed transfers,
    start and stop), without the discovery client's connection-pool chatter."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        PredicateResult,
        textFileLogObserver,
    )

    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

    def not_chatter(event: dict[str, Any]) -> PredicateResult:
        if event.get("log_namespace") in _QUIET_NAMESPACES and event.get("log_level") != LogLevel.critical:
            return PredicateResult.no
        return PredicateResult.maybe

    # zope interfaces are not types to mypy: the observer and the predicates provide them.
    observer: Any = textFileLogObserver(out)
    predicates: list[Any] = [levels, not_chatter]
    return FilteringLogObserver(observer, predicates)


class GatewayChannel(HTTPChannel):
    """An HTTPChannel that gives each GatewayRequest its request line as soon as it is parsed
    (Twisted passes it to the request only once the whole body is in), so that the request can
    decide at its headers whether to stream the body."""

    def lineReceived(self, line: bytes) -> None:
        latest = self.requests[-1] if self.requests else None
        super().lineReceived(line)
        if self.requests and self.requests[-1] is not latest:  # `line` began a new request
            request = self.requests[-1]
            parts = line.split(b" ")
            if isinstance(request, GatewayRequest) and len(parts) == 3:
                request.request_line = (parts[0], parts[1], parts[2])


def gateway_site(gateway: Gateway, token: str) -> Any:
    """The twisted.web Site serving `gateway`, refusing requests without `token` early."""
    from twisted.web.server import Site

    site: Any = Site(gateway.app.resource())  # its factories are typed narrower than they are
    site.protocol = GatewayChannel
    site.requestFactory = type("TokenRequest", (GatewayRequest,), {"token": token})
    site.displayTracebacks = False
    return site
