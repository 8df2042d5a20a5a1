"""
dsss.quic._engine: the installed qh3 is one it works with, and what it changes in qh3 holds.

If test_installed_qh3_is_supported fails, the installed qh3 lacks a private name
dsss/quic/_engine.py relies on (or is outside the pinned range): fix that module for the new
release, then widen the pin in setup.cfg and SUPPORTED_QH3 together.
"""

from __future__ import annotations

import ssl

import pytest
from aioquic.quic.configuration import QuicConfiguration as AioquicConfiguration
from aioquic.quic.connection import QuicConnection as AioquicConnection
from qh3.quic.configuration import QuicConfiguration

from dsss.crypto.certs import make_certificate
from dsss.quic import _engine
from dsss.quic._engine import Connection, EngineMismatch, check_engine, native_identity, parse_header

CLIENT = ("127.0.0.3", 5000)
SERVER = ("127.0.0.2", 4000)


def test_installed_qh3_is_supported() -> None:
    check_engine()


def test_an_unsupported_release_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "QH3_VERSION", "2.2.0")
    with pytest.raises(EngineMismatch, match=r"qh3 2\.2\.0 is installed.*>= 2\.1, < 2\.2"):
        check_engine()


def test_a_missing_private_name_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_engine, "_CONNECTION_PRIVATE", (*_engine._CONNECTION_PRIVATE, "_gone_in_qh3"))
    with pytest.raises(EngineMismatch, match=r"QuicConnection\._gone_in_qh3 is gone"):
        check_engine()


def test_zero_padding_after_packets_is_found() -> None:
    client = AioquicConnection(configuration=AioquicConfiguration(is_client=True, alpn_protocols=["dsss/1"]))
    client.connect(SERVER, now=0.0)
    ((datagram, _),) = client.datagrams_to_send(now=0.0)
    end = parse_header(datagram, 8).packet_length  # the Initial packet alone
    assert len(datagram) == 1200 and end < 1200  # aioquic pads after the packet, with zeros
    assert _engine._zero_padding_at(datagram, 8) == end
    assert _engine._zero_padding_at(datagram[:end], 8) is None  # no padding
    assert _engine._zero_padding_at(datagram[:end] + b"\x01" * (1200 - end), 8) is None  # not zeros
    assert _engine._zero_padding_at(b"\x40" + bytes(1199), 8) is None  # a short header


def _server() -> Connection:
    configuration = QuicConfiguration(is_client=False, alpn_protocols=["dsss/1"], max_datagram_size=1452)
    configuration.certificate, configuration.private_key = native_identity(make_certificate(bytes(32)))
    return Connection(configuration=configuration, original_destination_connection_id=b"\x00" * 8)


def test_a_zero_padded_initial_allows_the_whole_first_flight() -> None:
    """RFC 9000 8.1: a server may send three times what it received before the client's address
    is validated. A 1200-byte datagram holding a ~500-byte Initial and zero padding allows 3600
    bytes, enough for the agent's whole first flight; counting the packet alone did not."""
    configuration = AioquicConfiguration(is_client=True, alpn_protocols=["dsss/1"])
    configuration.verify_mode = ssl.CERT_NONE
    client = AioquicConnection(configuration=configuration)
    client.connect(SERVER, now=0.0)
    ((initial, _),) = client.datagrams_to_send(now=0.0)
    header = parse_header(initial, 8)
    server = Connection(
        configuration=_server()._configuration, original_destination_connection_id=header.destination_cid
    )
    server.receive_datagram(initial, CLIENT, 0.0)
    assert server.authenticated()
    flight = server.datagrams_to_send(0.0)
    sent = sum(len(data) for data, _ in flight)
    assert 3 * header.packet_length < sent <= 3 * len(initial)
    for data, _ in flight:
        client.receive_datagram(data, SERVER, now=0.001)
    events = []
    while (event := client.next_event()) is not None:
        events.append(type(event).__name__)
    assert "HandshakeCompleted" in events
    assert server.probe_timeouts() == 0


def test_the_pin_in_setup_cfg_is_the_range_checked() -> None:
    import configparser
    import re
    from pathlib import Path

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    (pin,) = [line for line in setup["options"]["install_requires"].splitlines() if line.strip().startswith("qh3")]
    low, high = _engine.SUPPORTED_QH3
    assert re.fullmatch(rf"\s*qh3 >= {low[0]}\.{low[1]}, < {high[0]}\.{high[1]}\s*", pin), pin
