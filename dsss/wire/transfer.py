# -*- test-case-name: tests.unit.test_wire_transfer -*-
"""Client<->agent transfer messages, carried one request per QUIC bidirectional stream.

Sans-I/O. A request is one header line (LF-terminated, at most MAX_HEADER bytes) followed, for
UPLOAD, by exactly <size> bytes; the client then ends its side of the stream. The agent answers
with one reply line, followed for DOWNLOAD by the part's bytes, and ends the stream:

    UPLOAD <key> <hash> <size>\\n<size bytes>   ->  Ok\\n            | ERROR <code> <text>\\n
    DOWNLOAD <key> <hash>\\n                     ->  Ok <size>\\n<bytes> | ERROR <code> <text>\\n
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from dsss.errors import RemoteProtocolError
from dsss.model import is_block_id

MAX_HEADER = 256
MAX_PART = 16 * 1024 * 1024
_KEY = re.compile(r"\A[0-9a-f]{32}\Z")
_CODE = re.compile(r"\A[a-z][a-z0-9-]{0,31}\Z")


@dataclass(frozen=True)
class Upload:
    key: str
    block: str
    size: int


@dataclass(frozen=True)
class Download:
    key: str
    block: str


@dataclass(frozen=True)
class Done:
    """`Ok` (UPLOAD stored) or `Ok <size>` (DOWNLOAD, followed by the bytes)."""

    size: int | None = None


@dataclass(frozen=True)
class Refused:
    code: str
    text: str


TransferRequest = Union[Upload, Download]
TransferReply = Union[Done, Refused]


def _decode(line: bytes) -> list[str]:
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("header is not ASCII") from None
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RemoteProtocolError("empty header or control character")
    return text.split(" ")


def _size(text: str) -> int:
    if not text.isdigit() or len(text) > 12:
        raise RemoteProtocolError(f"bad size {text[:20]!r}")
    return int(text)


def parse_request(line: bytes) -> TransferRequest:
    words = _decode(line)
    verb = words[0]
    if verb == "UPLOAD":
        if len(words) != 4:
            raise RemoteProtocolError("usage: UPLOAD <key> <hash> <size>")
        _, key, block, size = words
        n = _size(size)
        if n > MAX_PART:
            raise RemoteProtocolError(f"part larger than {MAX_PART} bytes")
        req: TransferRequest = Upload(key, block, n)
    elif verb == "DOWNLOAD":
        if len(words) != 3:
            raise RemoteProtocolError("usage: DOWNLOAD <key> <hash>")
        req = Download(words[1], words[2])
    else:
        raise RemoteProtocolError(f"unknown request {verb[:20]!r}")
    if not _KEY.match(req.key):
        raise RemoteProtocolError("bad introduction key")
    if not is_block_id(req.block):
        raise RemoteProtocolError("not a part hash")
    return req


def encode_request(req: TransferRequest) -> bytes:
    if isinstance(req, Upload):
        return f"UPLOAD {req.key} {req.block} {req.size}\n".encode("ascii")
    return f"DOWNLOAD {req.key} {req.block}\n".encode("ascii")


def parse_reply(line: bytes) -> TransferReply:
    words = _decode(line)
    if words[0] == "Ok":
        if len(words) == 1:
            return Done(None)
        if len(words) == 2:
            n = _size(words[1])
            if n > MAX_PART:
                raise RemoteProtocolError("reply announces a part larger than allowed")
            return Done(n)
    elif words[0] == "ERROR" and len(words) >= 2 and _CODE.match(words[1]):
        return Refused(words[1], " ".join(words[2:]))
    raise RemoteProtocolError("bad reply header")


def encode_reply(reply: TransferReply) -> bytes:
    if isinstance(reply, Done):
        return b"Ok\n" if reply.size is None else f"Ok {reply.size}\n".encode("ascii")
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in reply.text)[:200]
    return f"ERROR {reply.code} {clean}\n".encode("ascii")


class HeaderSplitter:
    """Accumulates the start of a stream until the header line is complete.

    feed() returns None while the header is incomplete, then (header_line, rest_of_data) once.
    Raises RemoteProtocolError when MAX_HEADER bytes arrive without a LF.
    """

    def __init__(self, limit: int = MAX_HEADER) -> None:
        self._buf = b""
        self._limit = limit
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        if self.done:
            raise RuntimeError("header already complete")
        self._buf += data
        i = self._buf.find(b"\n", 0, self._limit + 1)
        if i < 0:
            if len(self._buf) > self._limit:
                raise RemoteProtocolError(f"header longer than {self._limit} bytes")
            return None
        self.done = True
        line, rest = self._buf[:i], self._buf[i + 1 :]
        self._buf = b""
        return line, rest
