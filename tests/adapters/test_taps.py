"""twistd plugins: options, usage errors, and where every listener binds (no sockets)."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
from twisted.python import usage

from dsss.agent import tap as agent_tap
from dsss.server import tap as server_tap
from dsss.server.service import ServerService


class UDPMemoryReactor(MemoryReactorClock):
    """MemoryReactorClock has no UDP; record listenUDP calls like it records TCP ones."""

    def __init__(self):
        super().__init__()
        self.udpPorts = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        from twisted.internet.address import IPv4Address

        self.udpPorts.append((port, protocol, interface, maxPacketSize))

        class Port:
            def getHost(self_inner):
                return IPv4Address("UDP", interface, port or 40000)

            def stopListening(self_inner):
                return None

        return Port()


def test_plugins_are_discoverable():
    names = {p.tapname for p in getPlugins(IServiceMaker)}
    assert {"dsss-server", "dsss-agent"} <= names


def test_server_defaults_listen_on_loopback():
    opts = server_tap.Options()
    opts.parseOptions([])
    reactor = UDPMemoryReactor()
    svc = ServerService(reactor, opts.config)
    svc.startService()
    binds = sorted((port, iface) for port, _f, _b, iface in reactor.tcpServers)
    assert binds == [(8470, "127.0.0.1"), (8471, "127.0.0.1")]
    assert [(p, i) for p, _pr, i, _m in reactor.udpPorts] == [(8471, "127.0.0.1")]
    assert reactor.udpPorts[0][3] >= 65535
    assert opts.config.replicas == 3
    svc.stopService()


def test_server_options_are_honoured():
    opts = server_tap.Options()
    opts.parseOptions(
        ["--http", r"tcp:9000:interface=\:\:1", "--control", "tcp:9001", "--udp", "0.0.0.0:9002", "--replicas", "2"]
    )
    reactor = UDPMemoryReactor()
    svc = ServerService(reactor, opts.config)
    svc.startService()
    assert sorted((p, i) for p, _f, _b, i in reactor.tcpServers) == [(9000, "::1"), (9001, "")]
    assert reactor.udpPorts[0][0] == 9002 and reactor.udpPorts[0][2] == "0.0.0.0"
    assert svc.server.replicas == 2


def test_server_on_unix_sockets_says_where_it_listens(tmp_path):
    """The 'ready' line names every listener, also one that is not an IP address."""
    from twisted.logger import formatEvent, globalLogPublisher

    http, control = tmp_path / "http.sock", tmp_path / "control.sock"
    opts = server_tap.Options()
    opts.parseOptions(["--http", f"unix:{http}", "--control", f"unix:{control}", "--udp", "127.0.0.1:9002"])
    reactor = UDPMemoryReactor()
    svc = ServerService(reactor, opts.config)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        svc.startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if "log_failure" in e] == []
    ready = [formatEvent(e) for e in events if e.get("log_format", "").startswith("DSSS server ready")]
    assert len(ready) == 1
    assert str(http) in ready[0] and str(control) in ready[0] and "udp=127.0.0.1:9002" in ready[0]
    svc.stopService()


@pytest.mark.parametrize("value, rule", [(None, "24,48"), ("32,128", "32,128"), ("off", "off"),
                                         ("16,32", "16,32")])
def test_server_distinct_networks_option(value, rule):
    opts = server_tap.Options()
    opts.parseOptions([] if value is None else ["--distinct-networks", value])
    assert str(opts.config.distinct_networks) == rule
    assert ServerService(UDPMemoryReactor(), opts.config).server.placer.rule == opts.config.distinct_networks


@pytest.mark.parametrize("value, bound", [(None, 64 * 1024**3), ("500G", 500 * 1024**3), ("off", None)])
def test_server_open_quota_option(value, bound):
    opts = server_tap.Options()
    opts.parseOptions([] if value is None else ["--open-quota", value])
    assert opts.config.open_quota == bound
    server = ServerService(UDPMemoryReactor(), opts.config).server
    assert (server.open_bound.per_day if server.open_bound is not None else None) == bound


@pytest.mark.parametrize(
    "args",
    [
        ["--replicas", "0"],
        ["--replicas", "many"],
        ["--replicas", "\u00b2"],  # a digit to str.isdigit, not to int
        ["--udp", "nohost"],
        ["--udp", "127.0.0.1:\u00b9"],
        ["--udp", "127.0.0.1:99999"],
        ["--udp", "example.com:80"],
        ["--heartbeat", "-1"],
        ["--http", "nonsense"],
        ["--http", "tcp:9000:interface=::1"],  # colons must be escaped in endpoint strings
        ["--control", "tcp:notaport"],
        ["--agents", "/nonexistent/file"],
        ["--distinct-networks", "24"],
        ["--distinct-networks", "33,48"],
        ["--distinct-networks", "no"],
        ["--open-quota", "lots"],
        ["--open-quota", "1K"],
        ["--bogus"],
    ],
)
def test_server_bad_options(args):
    with pytest.raises(usage.UsageError):
        server_tap.Options().parseOptions(args)


def test_agent_options(tmp_path):
    opts = agent_tap.Options()
    opts.parseOptions(["--storage", str(tmp_path / "s"), "--capacity", "10G", "--server", "127.0.0.1:7000"])
    c = opts.config
    assert c.capacity == 10 * 1024**3 and (c.server_host, c.server_port) == ("127.0.0.1", 7000)
    assert (c.udp_host, c.udp_port) == ("0.0.0.0", 0)
    assert c.control_source is None
    assert (tmp_path / "s").is_dir()


def test_agent_control_connection_leaves_from_the_source_address(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from dsss.agent.service import AgentService

    opts = agent_tap.Options()
    opts.parseOptions(["--storage", str(tmp_path / "s"), "--server", "127.0.0.1:7000",
                       "--udp", "127.0.5.1:0", "--control-source", "127.0.5.1"])
    assert opts.config.control_source == "127.0.5.1"
    reactor = MemoryReactorClock()
    svc = AgentService(reactor, opts.config)
    svc.client_service.startService()
    ((host, port, _factory, _timeout, bind),) = reactor.tcpClients
    assert (host, port, bind) == ("127.0.0.1", 7000, ("127.0.5.1", 0))
    svc.client_service.stopService()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--capacity", "lots"],
        ["--server", "127.0.0.1"],
        ["--server", "127.0.0.1:0"],
        ["--udp", "x:y"],
        ["--datagram-size", "100"],
        ["--datagram-size", "\u00b2"],
        ["--server", "127.0.0.1:\u0661\u0662"],  # Arabic-Indic digits: int() would read 12
        ["--control-source", "localhost"],
        ["--control-source", "::1"],  # the server is IPv4
    ],
)
def test_agent_bad_options(tmp_path, args):
    full = args if not args else ["--storage", str(tmp_path / "s"), *args]
    with pytest.raises(usage.UsageError):
        agent_tap.Options().parseOptions(full)


def test_agent_refuses_a_store_from_before_blake3(tmp_path):
    import hashlib

    name = hashlib.blake2b(b"x", digest_size=32).hexdigest()
    d = tmp_path / "s" / "blocks" / name[:2] / name[2:4]
    d.mkdir(parents=True)
    (d / name).write_bytes(b"x")
    with pytest.raises(usage.UsageError, match="--storage: .*BLAKE2b"):
        agent_tap.Options().parseOptions(["--storage", str(tmp_path / "s")])
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["blocks"]


def test_agent_storage_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(usage.UsageError):
        agent_tap.Options().parseOptions(["--storage", str(f)])


def test_agent_refuses_a_store_of_format_2(tmp_path):
    """A store of the previous format (plain BLAKE3 names) stops the agent before it starts,
    saying what to do, and is left as it was."""
    store = tmp_path / "s"
    (store / "blocks").mkdir(parents=True)
    (store / "FORMAT").write_text("dsss-store 2 blake3\n")
    with pytest.raises(usage.UsageError, match="--storage: .*older DSSS.*Nothing was changed.*new, empty --storage"):
        agent_tap.Options().parseOptions(["--storage", str(store)])
    assert (store / "FORMAT").read_text() == "dsss-store 2 blake3\n"
    assert sorted(p.name for p in store.iterdir()) == ["FORMAT", "blocks"]


def test_server_audit_options_have_documented_defaults_and_refuse_nonsense():
    opts = server_tap.Options()
    opts.parseOptions([])
    assert (opts.config.audit_rate, opts.config.proof_freshness) == (100.0, 7 * 86400.0)
    opts = server_tap.Options()
    opts.parseOptions(["--audit-rate", "2.5", "--proof-freshness", "3600"])
    assert (opts.config.audit_rate, opts.config.proof_freshness) == (2.5, 3600.0)
    for args in (["--audit-rate", "0"], ["--audit-rate", "fast"], ["--proof-freshness", "0.5"],
                 ["--proof-freshness", str(400 * 86400)]):
        with pytest.raises(usage.UsageError, match=args[0]):
            server_tap.Options().parseOptions(args)
