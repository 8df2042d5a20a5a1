"""The errors the QUIC adapter raises: handshake, identity, stream and connection failures."""

from __future__ import annotations

__all__ = [
    "ConnectionFailed",
    "ConnectionLost",
    "PeerIdentityError",
    "QuicError",
    "RequestTimeout",
    "ResponseTooLarge",
    "StreamReset",
]


class QuicError(Exception):
    """Base class of the errors raised by this module."""


class ConnectionFailed(QuicError):
    """The QUIC handshake did not complete (timeout, refusal, protocol error)."""


class PeerIdentityError(QuicError):
    """The peer's certificate key is not the expected one."""


class ResponseTooLarge(QuicError):
    """The peer sent more than the allowed number of bytes on a stream."""


class StreamReset(QuicError):
    """A stream was reset (by the peer, or locally)."""

    def __init__(self, error_code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset with error code {error_code}")
        self.error_code = error_code


class ConnectionLost(QuicError):
    """The connection closed, timed out or was lost while it was in use."""


class RequestTimeout(QuicError):
    """A request did not complete within its timeout."""

