"""JSON answers for the Klein apps (the server's API, the client's gateway).

The body, and the answers to routing errors and to bugs, so that every answer of both is JSON."""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IRequest

log = Logger()


def json_body(request: IRequest, body: Any, code: int = 200) -> bytes:
    """Set the status and headers of a JSON answer (never cached) and return its body."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


def http_error(request: IRequest, failure: Any) -> bytes:
    """A werkzeug HTTPException (no such route, method not allowed) as JSON."""
    err = failure.value
    return json_body(request, {"error": err.name.lower()}, err.code or 500)


def unexpected_error(request: IRequest, failure: Any) -> bytes:
    """A bug: logged with its traceback, answered 500 without one."""
    log.failure("unexpected error in {uri}", failure, uri=request.uri)
    return json_body(request, {"error": "internal error"}, 500)
