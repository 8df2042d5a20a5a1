# -*- test-case-name: tests.unit.test_quic_engine -*-
"""
Every use of qh3's private names: the one module a qh3 upgrade can break.

The rest of L{dsss.quic} uses qh3's public API (C{QuicConfiguration}, C{events},
C{qh3.quic.packet}) and this module's names.  What is private here, and why:

  - L{Connection.datagrams_to_send} polls the native core (C{_core}) directly when
    there is no QUIC logger (C{_quic_logger}): qh3's own loop parses the header of
    every packet it sends to log it, even with no logger, which cost a third of a
    busy sender's time at 1452-byte datagrams.
  - L{Connection._create_tls} (qh3's own, with L{_TlsBridge}) makes a client
    announce its C{max_datagram_size} as C{max_udp_payload_size}; qh3 always says
    1472, so a loopback peer would answer in 1.4 KB datagrams.
  - L{Connection.receive_datagram} keeps the zero bytes that pad a datagram after
    its last packet with that packet.  aioquic (and other stacks) pad a client's
    Initial datagram to 1200 bytes that way, after a ~500-byte Initial packet; qh3
    hands each packet of a datagram to its native core on its own, so the zero
    tail went in as a separate, dropped "packet", and the core counted only the
    Initial packet's bytes towards the server's anti-amplification allowance
    (three times what it received, RFC 9000 8.1).  That allowance, about 1500
    bytes, was less than the server's first flight, and qh3's packet builder then
    failed with "packet builder capacity exhausted" instead of waiting: the
    client saw nothing until its own probe timeout, 0.2 s and more per handshake.
  - L{native_identity}, L{parse_header}: qh3's native certificate, key and
    buffer types live in C{qh3._hazmat}.
  - L{Connection.authenticated}, L{Connection.close_event},
    L{Connection.probe_timeouts}: state qh3 keeps on private attributes.

L{check_engine} verifies that the installed qh3 still has all of this;
C{tests/unit/test_quic_engine.py} calls it, so an incompatible qh3 fails one
test with a message saying what is missing, not a transfer somewhere else.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509 import Certificate
from qh3 import __version__ as QH3_VERSION
from qh3._hazmat import Buffer
from qh3._hazmat import Certificate as NativeCertificate
from qh3._hazmat import Ed25519PrivateKey as NativeEd25519PrivateKey
from qh3._hazmat import pull_quic_header as _pull_header
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import (
    QuicErrorCode,
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from qh3.quic.tls_bridge import QuicTlsBridge

__all__ = [
    "QH3_VERSION",
    "SUPPORTED_QH3",
    "Connection",
    "EngineMismatch",
    "check_engine",
    "native_identity",
    "encode_retry",
    "parse_header",
]

SUPPORTED_QH3 = ((2, 1), (2, 2))
"""The qh3 releases this module was written against: at least 2.1, below 2.2
(setup.cfg pins the same range)."""

SMALLEST_INITIAL_DATAGRAM = 1200
"""RFC 9000 14.1: a server ignores a first datagram smaller than this (qh3 does too)."""

_CONNECTION_PRIVATE = (
    "_configuration",
    "_core",
    "_quic_logger",
    "_is_client",
    "_version",
    "_remote_addr",
    "_tls",
    "_close_event",
    "_original_destination_connection_id",
    "_retry_source_connection_id",
    "_session_ticket_fetcher",
    "_session_ticket_handler",
    "_set_version",
    "_create_core",
    "_require_core",
    "_create_tls",
    "_call_core",
    "_drain_core",
    "_normalize_address",
    "_receive_version_negotiation",
    "_learn_remote_source_cid",
    "_log_datagram",
    "_log_packet",
    "_log_packet_dropped",
)
"""The private attributes of qh3's C{QuicConnection} this module reads or calls."""

_CORE_NAMES = (
    "poll_transmit",
    "receive_datagram",
    "received_authenticated_packet",
    "pto_total",
)
"""The native core's attributes this module uses."""

_BRIDGE_KEYWORDS = (
    "version",
    "local_initial_source_connection_id",
    "remote_initial_source_connection_id",
    "original_destination_connection_id",
    "retry_source_connection_id",
    "session_ticket_fetcher",
    "session_ticket_handler",
    "quic_logger",
    "version_change_handler",
)


class EngineMismatch(RuntimeError):
    """The installed qh3 lacks something this module relies on."""


class _TlsBridge(QuicTlsBridge):
    """
    qh3's TLS bridge, except that a client announces its own
    C{max_datagram_size} as C{max_udp_payload_size} (qh3 always says 1472).
    The peer never sends a datagram larger than that, so without this an
    agent would answer a loopback client in 1.4 KB datagrams, with five times
    the per-datagram work of 8 KiB ones.
    """

    def serialize_transport_parameters(self) -> bytes:
        data: bytes = super().serialize_transport_parameters()
        if not self.configuration.is_client:
            return data
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        parameters.max_udp_payload_size = self.configuration.max_datagram_size
        buf = Buffer(capacity=len(data) + 16)
        push_quic_transport_parameters(buf, parameters)
        return bytes(buf.data)


def _zero_padding_at(data: bytes, cid_length: int) -> int | None:
    """
    Where the zero bytes that pad a datagram of long-header packets begin, or
    L{None} if C{data} is not such a datagram (a short-header packet, no
    padding after the packets, or something that does not parse).
    """
    size = len(data)
    if size < 2 or not data[0] & 0x80 or data[-1]:
        return None
    offset = 0
    while offset < size:
        if not data[offset] & 0x80:
            if offset and data.count(0, offset) == size - offset:
                return offset
            return None
        try:
            end = _pull_header(data, offset, cid_length)[9]
        except ValueError:
            return None
        if end <= offset:
            return None
        offset = end
    return None


class Connection(QuicConnection):
    """
    qh3's C{QuicConnection} with L{_TlsBridge}, a leaner L{datagrams_to_send},
    padded datagrams counted whole (L{receive_datagram}), and read access to the
    state the adapter needs.
    """

    def authenticated(self) -> bool:
        """Whether any packet received so far decrypted (a server's first Initial did)."""
        core = self._core
        return core is not None and bool(core.received_authenticated_packet)

    def close_event(self) -> events.ConnectionTerminated | None:
        """How the connection is closing or closed, once it is."""
        event: events.ConnectionTerminated | None = self._close_event
        return event

    def probe_timeouts(self) -> int:
        """Probe timeouts (PTO) fired so far: each one means a flight waited for a
        retransmission."""
        core = self._core
        return 0 if core is None else int(core.pto_total)

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """
        qh3's own, except for a server that receives long-header packets followed
        by zero padding: there the padding stays with the last packet, so the
        native core counts the whole datagram towards the anti-amplification
        allowance (see the module docstring).
        """
        cid_length = self._configuration.connection_id_length
        padding = None if self._is_client else _zero_padding_at(data, cid_length)
        if padding is None:
            super().receive_datagram(data, addr, now)
            return
        address = self._normalize_address(addr)
        self._log_datagram("datagrams_received", data)
        if self._core is None:
            if len(data) < SMALLEST_INITIAL_DATAGRAM:
                return
            header = _pull_header(data, 0, cid_length)
            if header[1] != int(QuicPacketType.INITIAL):
                return
            version, destination_cid = header[0], header[3]
            if version not in self._configuration.supported_versions:
                return
            self._remote_addr = address
            self._version = version
            self._create_core(address, destination_cid, now)
            self._create_tls(remote_source_cid=None)
        elif self._receive_version_negotiation(data, address, now):
            return
        core = self._require_core()
        # Packets one by one, as qh3 does (TLS installs the keys a coalesced packet
        # after an Initial needs), the last with the padding.
        offset = 0
        while offset < padding:
            end = _pull_header(data, offset, cid_length)[9]
            if end >= padding:
                end = len(data)
            packet = data[offset:end]
            report = self._call_core(core.receive_datagram, packet, address, now, len(data))
            if report[2]:
                self._log_packet("packet_received", packet, end - offset)
                self._learn_remote_source_cid(packet)
            elif report[4]:
                self._log_packet_dropped(packet)
            self._drain_core()
            offset = end

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """
        qh3's own loop parses the header of every packet it sends to log it,
        even with no QUIC logger; without a logger, only the native core is
        polled.  Datagrams built before an error are returned, not dropped
        (the core counts them as sent); the error is raised if there are none.
        """
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        poll = core.poll_transmit
        datagrams: list[tuple[bytes, Any]] = []
        append = datagrams.append
        try:
            while (transmit := poll(now)) is not None:
                append((transmit[0], transmit[1]))
        except RuntimeError as exc:
            if not datagrams:
                raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return datagrams

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = _TlsBridge(
            self._configuration,
            # qh3 sets the version before it creates TLS (its own _create_tls passes the same).
            version=self._version,  # type: ignore[arg-type]
            local_initial_source_connection_id=self.host_cid,
            remote_initial_source_connection_id=remote_source_cid,
            original_destination_connection_id=self._original_destination_connection_id,
            retry_source_connection_id=self._retry_source_connection_id,
            session_ticket_fetcher=self._session_ticket_fetcher,
            session_ticket_handler=self._session_ticket_handler,
            quic_logger=self._quic_logger,
            version_change_handler=self._set_version,
        )
        self._tls = bridge
        return bridge


def native_identity(
    identity: tuple[Certificate, Ed25519PrivateKey],
) -> tuple[NativeCertificate, NativeEd25519PrivateKey]:
    """The certificate and key as qh3's TLS stack wants them (DER, PKCS#8)."""
    certificate, key = identity
    der = certificate.public_bytes(serialization.Encoding.DER)
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NativeCertificate(der), NativeEd25519PrivateKey(pkcs8)


def parse_header(data: bytes, cid_length: int) -> QuicHeader:
    """The header of the first packet in C{data}; raises ValueError if it does not parse."""
    return pull_quic_header(Buffer(data=data), host_cid_length=cid_length)


def encode_retry(version: int | None, source_cid: bytes, destination_cid: bytes,
                 original_destination_cid: bytes, token: bytes) -> bytes:
    """A Retry packet (RFC 9000 17.2.5) carrying C{token}, with its integrity tag."""
    assert version is not None
    return encode_quic_retry(
        version=version,
        source_cid=source_cid,
        destination_cid=destination_cid,
        original_destination_cid=original_destination_cid,
        retry_token=token,
    )


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_engine() -> None:
    """
    Raise L{EngineMismatch}, saying what is missing, unless the installed qh3
    is in L{SUPPORTED_QH3} and has every private name this module uses.
    """
    low, high = SUPPORTED_QH3
    problems: list[str] = []
    if not low <= _version_tuple(QH3_VERSION) < high:
        problems.append(
            f"qh3 {QH3_VERSION} is installed; dsss.quic._engine is written for "
            f">= {low[0]}.{low[1]}, < {high[0]}.{high[1]}"
        )
    connection = QuicConnection(configuration=QuicConfiguration(is_client=True))
    connection.connect(("127.0.0.1", 9), now=0.0)
    problems += [
        f"QuicConnection.{name} is gone"
        for name in _CONNECTION_PRIVATE
        if not hasattr(connection, name)
    ]
    core = getattr(connection, "_core", None)
    if core is not None:
        problems += [
            f"the native core's {name} is gone" for name in _CORE_NAMES if not hasattr(core, name)
        ]
    import inspect

    bridge_parameters = inspect.signature(QuicTlsBridge.__init__).parameters
    problems += [
        f"QuicTlsBridge() no longer takes {name}="
        for name in _BRIDGE_KEYWORDS
        if name not in bridge_parameters
    ]
    if not hasattr(QuicTlsBridge, "serialize_transport_parameters"):
        problems.append("QuicTlsBridge.serialize_transport_parameters is gone")
    if problems:
        raise EngineMismatch(
            "the installed qh3 is not one dsss.quic works with: "
            + "; ".join(problems)
            + " (see dsss/quic/_engine.py)"
        )
