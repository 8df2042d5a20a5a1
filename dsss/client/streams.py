# -*- test-case-name: tests.unit.test_client_flows -*-
"""Where the put and get flows read a file's bytes from, write them to, and report progress."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Protocol


class Sink(Protocol):
    """Where `get_to_stream` writes a file's bytes, in order: an open file, stdout, an HTTP
    response."""

    def write(self, data: bytes, /) -> Any: ...


@dataclass
class Progress:
    """Callbacks the CLI uses to draw progress; all optional."""

    advance: Callable[[int], None] = lambda n: None


class ArrivingBody(Protocol):
    """A body that is still arriving (the gateway's PUT body, dsss.client.gateway.BodyPipe)."""

    async def aread(self, n: int) -> bytes: ...


async def read_some(stream: BinaryIO | ArrivingBody, n: int) -> bytes:
    """`stream.read(n)` from a file, or `await stream.aread(n)` from a body still arriving."""
    if isinstance(stream, io.IOBase):
        data: bytes = stream.read(n)
        return data
    return await stream.aread(n)  # type: ignore[union-attr]  # the files given are io.IOBase
