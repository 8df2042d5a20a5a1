"""The DSSS error tree: every failure, with its control reply, HTTP status and exit code.

Each class maps once to a control-channel reply, an HTTP status and a CLI exit code, so that every
layer reports the same failure the same way.
"""

from __future__ import annotations


class DSSSError(Exception):
    """Base of every error DSSS raises on purpose."""

    http_status = 500
    exit_code = 1
    code = "error"


class RemoteProtocolError(DSSSError):
    """The peer sent input that breaks the protocol (malformed, oversized, out of order)."""

    http_status = 400
    code = "protocol"


class BadRequest(DSSSError):
    """A request's parameters are missing or invalid."""

    http_status = 400
    code = "bad-request"


class LocalUsageError(DSSSError):
    """We misused our own API (a bug on our side, never the peer's fault)."""

    code = "usage"


class NotFound(DSSSError):
    """The thing asked for (agent, part, file) is not known."""

    http_status = 404
    exit_code = 3
    code = "not-found"


class Unavailable(DSSSError):
    """Nobody can serve the request right now (no live agent, no room)."""

    http_status = 503
    exit_code = 4
    code = "unavailable"


class IntegrityError(DSSSError):
    """Bytes do not match their hash, or an authentication tag does not verify."""

    http_status = 422
    exit_code = 5
    code = "integrity"


class StorageFull(DSSSError):
    """An agent has no room for the part."""

    http_status = 507
    exit_code = 4
    code = "full"


class AccessDenied(DSSSError):
    """A key (introduction key, user key) does not grant what was asked."""

    http_status = 403
    exit_code = 6
    code = "denied"


class WrongKey(AccessDenied):
    """The user's key cannot open this file."""

    code = "wrong-key"


class Timeout(DSSSError):
    """A peer did not answer in time."""

    http_status = 504
    exit_code = 4
    code = "timeout"


class RateLimited(DSSSError):
    """A peer sent more requests than its share."""

    http_status = 429
    exit_code = 4
    code = "rate-limited"


class OldAddress(IntegrityError):
    """Bytes that match their address under an older DSSS's scheme (plain BLAKE3), not this one's."""

    code = "old-address"


class Busy(DSSSError):
    """A peer has as many requests of this kind in progress as it takes; try again later."""

    http_status = 503
    exit_code = 4
    code = "busy"


class Offline(Unavailable):
    """The file is known to be stored (the server has holder records, or the catalog says we
    stored it) but no agent holding it is online now."""

    exit_code = 8
    code = "offline"


class TooFewAgents(Unavailable):
    """Fewer live agents than the copies (or shares) a part needs."""

    exit_code = 9
    code = "too-few-agents"


class QuotaExceeded(DSSSError):
    """A client's lease quota (bytes leased on a restricted server) is used up."""

    http_status = 413
    exit_code = 10
    code = "quota"
