# -*- test-case-name: tests.adapters.test_discovery_batch,tests.integration.test_interrupts -*-
"""What the discovery server's failures mean to the client: which error, in which words.

An HTTP answer other than 200 becomes the DSSSError its `code` or its status says
(`answer_error`; an item of a batch answer: `status_error`); a connection that failed, or a peer
that does not speak HTTP, is put in words that say what to try. `Retryable` marks the failures a
request may get past by trying again shortly (dsss.client.discovery retries them with backoff).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
)

from dsss.errors import (
    AccessDenied,
    BadRequest,
    DSSSError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    Timeout,
    TooFewAgents,
    Unavailable,
)

_BY_STATUS: dict[int, type[DSSSError]] = {
    400: BadRequest,
    401: AccessDenied,
    403: AccessDenied,
    404: NotFound,
    413: QuotaExceeded,
    429: RateLimited,
    503: Unavailable,
    504: Timeout,
}


_BY_CODE: dict[str, type[DSSSError]] = {
    "too-few-agents": TooFewAgents,
}


class ServerUnreachable(Unavailable):
    code = "server-unreachable"


class Retryable(Exception):
    """Carries an error that may go away if the request is tried again shortly."""

    def __init__(self, error: DSSSError) -> None:
        super().__init__(str(error))
        self.error = error


def answer_error(status: int, doc: Any) -> DSSSError:
    """The error an answer with HTTP `status` and JSON body `doc` stands for: by the body's
    `code` if the client knows it, else by the status."""
    message = doc.get("error") if isinstance(doc, dict) else None
    code = doc.get("code") if isinstance(doc, dict) else None
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    cls = cls or _BY_STATUS.get(status, DSSSError)
    return cls(f"server: {message or status}")


def status_error(status: Any, message: Any) -> DSSSError:
    """The error one item of a batch answer stands for, by the HTTP `status` it gives (any
    status the client does not know, or none: a plain DSSSError)."""
    cls = _BY_STATUS.get(status, DSSSError) if isinstance(status, int) else DSSSError
    return cls(f"server: {message}")


def connect_failure_words(error: BaseException, url: str) -> str:
    """Why a connection to the server at `url` failed, in words, with what to try."""
    host = urlsplit(url).hostname or url
    if isinstance(error, DNSLookupError):
        return f"cannot find the host {host!r} (a typo in --server, or no network?)"
    if isinstance(error, ConnectionRefusedError):
        return (f"nothing is listening at {url} (connection refused): is the server running, "
                f"and is this its HTTP port (8470 by default)?")
    if isinstance(error, (TCPTimedOutError, ConnectingCancelledError)):
        return f"{url} did not accept a connection in time (a firewall, or the wrong address?)"
    if isinstance(error, NoRouteError):
        return f"no route to {host} (is the network up?)"
    return f"cannot connect to {url} ({getattr(error, 'osError', None) or 'connection failed'})"


def not_http_words(url: str, error: BaseException) -> str:
    """The server at `url` accepted a connection but did not answer in HTTP."""
    text = str(error)
    if "BadStatusLine" in text or "ParseError" in text or "wrong status" in text.lower():
        return (f"{url} answered, but not in HTTP: is that the server's agent (control) port? "
                f"The discovery server's HTTP port is 8470 by default")
    return f"{url} closed the connection without an answer: is it a DSSS discovery server's HTTP port?"
