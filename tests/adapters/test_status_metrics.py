"""The status page, /api/status and /metrics through StubTreq; the agent's metrics; JSON logs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, eventsFromJSONLogFile
from twisted.python import usage

from dsss import logging as dlogging
from dsss.agent import tap as agent_tap
from dsss.agent.service import AgentConfig, AgentService, StorageAgent
from dsss.agent.transfer import TransferHandler
from dsss.metrics import AgentMetrics
from dsss.model import block_hash
from dsss.server.api import DiscoveryAPI
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from dsss.server.placement import NetworkRule
from dsss.server.status_page import format_bytes
from dsss.server import tap as server_tap
from tests.adapters.test_server_api import HASH, FakeAgent
from tests.adapters.test_taps import UDPMemoryReactor

KEY = "0123456789abcdef0123456789abcdef"
OTHER = "ab" * 32

# These agents share 127.0.0.1 (or one NAT): the one-machine setting, each agent its own network.
ONE_MACHINE = NetworkRule.parse("off")


@pytest.fixture
def server():
    clock = Clock()
    clock.advance(1_700_000_000)
    return DiscoveryServer(clock, ServerConfig(heartbeat=5.0, replicas=2, distinct_networks=ONE_MACHINE), rng=random.Random(1))


def fetch(treq, url, headers=None):
    """(code, headers, body) of one GET, or None while it is still waiting."""
    results = []
    d = treq.get("http://server" + url, headers=headers)
    d.addCallback(lambda r: defer.gatherResults([defer.succeed(r), r.content()]))
    d.addCallback(lambda rb: results.append((rb[0].code, rb[0].headers, rb[1])))
    treq.flush()
    return results


def header(headers, name):
    return headers.getRawHeaders(name)[0]


def busy_network(server):
    """Two agents, one part indexed on both, and known activity: one put introduction that
    succeeds, one get introduction the agent refuses, one who-has that finds the part and one
    that does not."""
    treq = StubTreq(DiscoveryAPI(server).resource())
    a, b = FakeAgent(server, 4001, free=10_000), FakeAgent(server, 4002, free=4_000)
    server.registry.space(a.rec, 20_000, 10_000)
    server.registry.have(a.rec, [HASH])
    server.registry.have(b.rec, [HASH])
    pending = fetch(treq, f"/api/introduce-me?to=127.0.0.1:4001&hash={HASH}&size=77&from=127.0.0.1:9")
    server.clock.advance(0.004)
    a.reply(KEY)
    treq.flush()
    assert pending[0][0] == 200
    pending = fetch(treq, f"/api/introduce-me?to=127.0.0.1:4002&hash={HASH}&size=0&from=127.0.0.1:9")
    b.reply("ERROR not-found no such part")
    treq.flush()
    assert pending[0][0] == 503
    pending = fetch(treq, f"/api/who-has?q={HASH}")
    a.sent(), b.sent()
    a.reply("1")
    b.reply("0")
    treq.flush()
    assert pending[0][0] == 200
    assert fetch(treq, f"/api/who-has?q={OTHER}")[0][0] == 200
    return treq, a, b


def test_status_reports_agents_totals_and_activity(server):
    treq, a, b = busy_network(server)
    server.clock.advance(1.5)
    code, _h, body = fetch(treq, "/api/status")[0]
    assert code == 200
    assert KEY not in body.decode() and a.rec.token not in body.decode()
    doc = json.loads(body)
    agents = {g["address"]: g for g in doc["agents"]}
    first = agents["127.0.0.1:4001"]
    assert first["reached"] == "direct" and first["live"] is True
    assert (first["capacity"], first["free"], first["used"]) == (20_000, 10_000, 10_000)
    assert first["last-heartbeat"] == 1.5
    assert doc["totals"] == {
        "agents": 2, "live": 2, "departed": 0, "capacity": 24_000, "free": 14_000, "used": 10_000,
        "parts": 1, "parts-indexed": 1, "leased": 0, "expired": 0, "collected": 0,
    }  # b answered "0" to WHO_HAS, so the server forgot that it holds the part
    activity = doc["activity"]
    assert {k: activity[k] for k in ("puts", "gets", "who-has", "failures", "relayed-bytes")} == {
        "puts": 1, "gets": 1, "who-has": 2, "failures": 1, "relayed-bytes": 0,
    }
    assert [(e["kind"], e["ok"], e["error"], e["agent"]) for e in activity["recent"]] == [
        ("who-has", False, "not-found", None),
        ("who-has", True, None, None),
        ("get", False, "unavailable", "127.0.0.1:4002"),
        ("put", True, None, "127.0.0.1:4001"),
    ]
    assert activity["recent"][-1]["part"] == HASH[:16]
    assert activity["recent"][-1]["time"] == 1_700_000_000.004  # when the agent answered
    assert doc["server"]["time"] == server.now() and doc["server"]["replicas"] == 2


def test_an_agent_that_timed_out_or_left_is_shown_as_down_until_it_comes_back(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    a, b, c = (FakeAgent(server, 4001 + i) for i in range(3))
    # a stops answering: after the liveness bound the server drops it, and says so.
    for _ in range(8):
        server.clock.advance(server.heartbeat)
        for agent in (b, c):
            agent.rec.last_tcp = server.now()
            server.registry.heard_udp(agent.rec.token, agent.address, server.now())
        server.tick()
    assert server.registry.get(a.rec.agent_id) is None
    c.proto.transport.loseConnection()  # c disconnects
    doc = json.loads(fetch(treq, "/api/status")[0][2])
    shown = {g["id"]: g for g in doc["agents"]}
    assert shown[a.rec.agent_id]["live"] is False and shown[a.rec.agent_id]["left"] == "timed out"
    assert shown[a.rec.agent_id]["address"] == "127.0.0.1:4001"
    assert shown[c.rec.agent_id]["live"] is False and shown[c.rec.agent_id]["left"] == "disconnected"
    assert shown[b.rec.agent_id]["live"] is True and "left" not in shown[b.rec.agent_id]
    assert (doc["totals"]["agents"], doc["totals"]["live"], doc["totals"]["departed"]) == (1, 1, 2)
    page = fetch(treq, "/")[0][2].decode()
    assert f'data-agent="{a.rec.agent_id}"' in page and page.count(">down<") == 2
    # Remembered for DEPARTED_MEMORY seconds.
    server.clock.advance(3601)
    b.rec.last_tcp = server.now()
    server.registry.heard_udp(b.rec.token, b.address, server.now())
    doc = json.loads(fetch(treq, "/api/status")[0][2])
    assert [g["id"] for g in doc["agents"]] == [b.rec.agent_id] and doc["totals"]["departed"] == 0


def test_recent_activity_is_bounded(server):
    for _ in range(200):
        server.metrics.asked_who_has(block=HASH, holders=0, now=server.now())
    activity = server.status()["activity"]
    assert activity["who-has"] == 200 and len(activity["recent"]) == 50


def test_status_page_shows_the_status_escaped(server):
    treq, a, b = busy_network(server)
    a.rec.version = '<script>alert("x")</script>'
    code, headers, body = fetch(treq, "/")[0]
    page = body.decode("utf-8")
    assert code == 200 and header(headers, b"content-type") == b"text/html; charset=utf-8"
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    for agent in (a, b):
        assert f'data-agent="{agent.rec.agent_id}"' in page
        assert f">{agent.rec.agent_id[:16]}</code>" in page
        assert f">{agent.address}</td>" in page
    assert 'id="total-capacity" data-value="24000">23.4 KiB<' in page
    assert 'id="activity-puts" data-value="1">1<' in page
    assert 'id="activity-failures" data-value="1">1<' in page
    assert KEY not in page
    # No external assets: every src/href is local or data:, and the CSP allows exactly the
    # inline script and style that the page carries.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    csp = header(headers, b"content-security-policy").decode()
    assert "default-src 'none'" in csp
    for tag in ("script", "style"):
        inline = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp


def test_status_totals_the_bytes_live_agents_report_leased(server):
    treq, a, b = busy_network(server)
    a.reply(f"LEASED {'1' * 64}:3000 {'2' * 64}:500")
    b.reply(f"LEASED {'1' * 64}:1000")
    assert a.sent()[-1].endswith("OK") and b.sent()[-1].endswith("OK")
    a.reply(f"LEASED {'2' * 64}:0")  # released (rm) or expired: no longer counted
    doc = json.loads(fetch(treq, "/api/status")[0][2])
    assert doc["totals"]["leased"] == 4000
    page = fetch(treq, "/")[0][2].decode()
    assert 'id="total-leased" data-value="4000">3.9 KiB<' in page
    metrics = samples(fetch(treq, "/metrics")[0][2].decode())
    assert metrics[("dsss_leased_bytes", ())] == 4000


def test_status_totals_what_agents_report_expired_and_collected(server):
    treq, a, b = busy_network(server)
    a.reply("COLLECTED 7000 1000")
    b.reply("COLLECTED 500 2048")
    a.reply("COLLECTED 2000 6000")  # a later report replaces the earlier one
    assert a.sent()[-1].endswith("OK") and b.sent()[-1].endswith("OK")
    b.reply("COLLECTED 500")
    assert "ERROR" in b.sent()[-1]  # malformed: refused, nothing changes
    doc = json.loads(fetch(treq, "/api/status")[0][2])
    assert doc["totals"]["expired"] == 2500 and doc["totals"]["collected"] == 8048
    page = fetch(treq, "/")[0][2].decode()
    assert 'id="total-expired" data-value="2500">2.4 KiB<' in page
    assert 'id="total-collected" data-value="8048">7.9 KiB<' in page
    metrics = samples(fetch(treq, "/metrics")[0][2].decode())
    assert metrics[("dsss_expired_bytes", ())] == 2500
    assert metrics[("dsss_collected_bytes", ())] == 8048


def test_status_page_without_agents(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    page = fetch(treq, "/")[0][2].decode()
    assert "No agent has registered yet." in page and "Nothing yet." in page


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1_310_720, "1.3 MiB"), (5 * 2**40, "5.0 TiB")],
)
def test_byte_sizes_round_like_javascript(n, text):
    assert format_bytes(n) == text  # 1.25 MiB rounds up, as (1.25).toFixed(1) does


def samples(text, parser=text_string_to_metric_families):
    out = {}
    for family in parser(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_after_known_activity(server):
    treq, a, b = busy_network(server)
    fetch(treq, "/nope")
    code, headers, body = fetch(treq, "/metrics")[0]
    assert code == 200 and header(headers, b"content-type").startswith(b"text/plain")
    text = body.decode()
    assert KEY not in text and a.rec.token not in text
    m = samples(text)
    assert m[("dsss_agents_connected", ())] == 2
    assert m[("dsss_agents_live", ())] == 2
    assert m[("dsss_parts_indexed", ())] == 1
    assert m[("dsss_parts_stored", ())] == 1
    assert m[("dsss_capacity_bytes", ())] == 24_000 and m[("dsss_free_bytes", ())] == 14_000
    assert m[("dsss_introductions_total", (("kind", "put"), ("outcome", "ok")))] == 1
    assert m[("dsss_introductions_total", (("kind", "get"), ("outcome", "error")))] == 1
    assert m[("dsss_introductions_total", (("kind", "get"), ("outcome", "ok")))] == 0
    assert m[("dsss_introduction_seconds_count", (("kind", "put"),))] == 1
    assert m[("dsss_introduction_seconds_bucket", (("kind", "put"), ("le", "0.0025")))] == 0
    assert m[("dsss_introduction_seconds_bucket", (("kind", "put"), ("le", "0.005")))] == 1
    assert m[("dsss_who_has_queries_total", ())] == 2
    assert m[("dsss_relayed_bytes_total", ())] == 0
    requests = (("endpoint", "/api/introduce-me"), ("status", "200"))
    assert m[("dsss_http_requests_total", requests)] == 1
    assert m[("dsss_http_requests_total", (("endpoint", "/api/introduce-me"), ("status", "503")))] == 1
    assert m[("dsss_http_errors_total", (("endpoint", "/api/introduce-me"),))] == 1
    assert m[("dsss_http_requests_total", (("endpoint", "other"), ("status", "404")))] == 1
    assert m[("dsss_http_requests_total", (("endpoint", "/api/who-has"), ("status", "200")))] == 2


def test_reactor_stalls_are_measured_and_the_longest_is_kept(server):
    from dsss.metrics import LAG_PERIOD

    metrics = server.metrics
    metrics.lag_tick(10.0)  # the first call only sets when the next is due
    metrics.lag_tick(10.0 + LAG_PERIOD)  # on time
    metrics.lag_tick(10.0 + 2 * LAG_PERIOD + 0.3)  # 0.3 s late: a stall
    metrics.lag_tick(10.0 + 3 * LAG_PERIOD + 0.3 + 0.02)
    treq = StubTreq(DiscoveryAPI(server).resource())
    m = samples(fetch(treq, "/metrics")[0][2].decode())
    assert m[("dsss_reactor_lag_seconds_count", ())] == 3
    assert m[("dsss_reactor_lag_seconds_bucket", (("le", "0.25"),))] == 2
    assert m[("dsss_reactor_lag_max_seconds", ())] == pytest.approx(0.3)


def test_metrics_in_openmetrics_when_asked(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    code, headers, body = fetch(
        treq, "/metrics", headers={b"accept": [b"application/openmetrics-text; version=1.0.0"]}
    )[0]
    assert header(headers, b"content-type").startswith(b"application/openmetrics-text")
    m = samples(body.decode(), parse_openmetrics)
    assert m[("dsss_agents_connected", ())] == 0


def test_servers_have_separate_registries():
    one = DiscoveryServer(Clock(), ServerConfig())
    two = DiscoveryServer(Clock(), ServerConfig())
    one.metrics.asked_who_has(block=HASH, holders=0, now=0)
    assert one.metrics.registry.get_sample_value("dsss_who_has_queries_total") == 1
    assert two.metrics.registry.get_sample_value("dsss_who_has_queries_total") == 0


# --- the agent -----------------------------------------------------------------------------------


def test_agent_metrics(tmp_path):
    agent = StorageAgent(Clock(), AgentConfig(storage=str(tmp_path), capacity=1_000_000))
    transfers = TransferHandler(agent)
    data = b"x" * 1234
    agent.store.put(block_hash(data), data)
    transfers.uploads, transfers.downloads, transfers.refused = 2, 3, 1
    transfers.forwards, transfers.forward_failures = 5, 4
    agent.audits_proven, agent.audits_corrupt = 7, 1
    treq = StubTreq(AgentMetrics(agent, transfers).resource())
    code, headers, body = fetch(treq, "/metrics")[0]
    assert code == 200
    m = samples(body.decode())
    assert m[("dsss_agent_parts_stored", ())] == 1
    assert m[("dsss_agent_bytes_stored", ())] == 1234
    assert m[("dsss_agent_capacity_bytes", ())] == 1_000_000
    assert m[("dsss_agent_free_bytes", ())] == agent.store.free
    assert m[("dsss_agent_connected", ())] == 0
    assert m[("dsss_agent_uploads_total", ())] == 2
    assert m[("dsss_agent_downloads_total", ())] == 3
    assert m[("dsss_agent_refused_total", ())] == 1
    assert m[("dsss_agent_forwards_total", ())] == 5
    assert m[("dsss_agent_forward_failures_total", ())] == 4
    assert m[("dsss_agent_audits_proven_total", ())] == 7
    assert m[("dsss_agent_audits_corrupt_total", ())] == 1
    info = (("agent", agent.identity.agent_id), ("version", agent.version))
    assert m[("dsss_agent_info", info)] == 1
    assert fetch(treq, "/")[0][0] == 404


def test_agent_metrics_endpoint_is_optional_and_binds_where_told(tmp_path):
    opts = agent_tap.Options()
    opts.parseOptions(["--storage", str(tmp_path / "a")])
    assert opts.config.metrics is None
    opts = agent_tap.Options()
    opts.parseOptions(["--storage", str(tmp_path / "b"), "--metrics", "tcp:9100:interface=127.0.0.1"])
    reactor = UDPMemoryReactor()
    svc = AgentService(reactor, opts.config)
    svc.startService()
    assert [(p, i) for p, _f, _b, i in reactor.tcpServers] == [(9100, "127.0.0.1")]
    svc.stopService()


@pytest.mark.parametrize(
    "tap, args",
    [
        (agent_tap, ["--storage", "{tmp}", "--metrics", "nonsense"]),
        (agent_tap, ["--storage", "{tmp}", "--log-format", "xml"]),
        (server_tap, ["--log-format", "yaml"]),
    ],
)
def test_bad_operator_options_are_usage_errors(tmp_path, tap, args):
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions([a.replace("{tmp}", str(tmp_path)) for a in args])


# --- JSON logs -----------------------------------------------------------------------------------


def test_json_observer_writes_one_parsable_event_per_line():
    out = io.StringIO()
    observer = dlogging.json_observer(out)
    log = Logger(observer=observer, namespace="dsss.test")
    log.info("DSSS server ready http={http}", http="127.0.0.1:1")
    try:
        raise ZeroDivisionError("for the test")
    except ZeroDivisionError:
        log.failure("it broke")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["log_text"] == "DSSS server ready http=127.0.0.1:1" and first["http"] == "127.0.0.1:1"
    assert first["log_level"]["name"] == "info" and first["log_namespace"] == "dsss.test"
    assert second["log_level"]["name"] == "critical" and "ZeroDivisionError" in second["log_traceback"]
    events = list(eventsFromJSONLogFile(io.StringIO(out.getvalue()), recordSeparator=""))
    assert [e["log_text"] for e in events][0] == first["log_text"]


class FakeTwistdOptions(dict):
    """The parts of twistd's ServerOptions a tap sees as `options.parent`."""


def parse_under_twistd(tap, args, **twistd):
    parent = FakeTwistdOptions({"logfile": None, "nodaemon": True, "syslog": False, "logger": None})
    parent.update(twistd)
    opts = tap.Options()
    opts.parent = parent
    opts.parseOptions(args)
    return parent


def test_log_format_json_tells_twistd_to_use_the_json_logger(tmp_path, monkeypatch):
    monkeypatch.setattr(dlogging, "_destination", {"logfile": None, "nodaemon": True})
    rotated = []
    monkeypatch.setattr(dlogging, "_rotate_on_sigusr1", rotated.append)  # no signal handlers here
    parent = parse_under_twistd(server_tap, ["--log-format", "json"], logfile=str(tmp_path / "s.log"))
    assert parent["logger"] == "dsss.logging.json_logger"
    observer = dlogging.json_logger()
    Logger(observer=observer).info("hello {who}", who="operator")
    observer_file = tmp_path / "s.log"
    assert json.loads(observer_file.read_text().splitlines()[0])["log_text"] == "hello operator"
    assert [f.path for f in rotated] == [str(observer_file)]

    parent = parse_under_twistd(server_tap, [], logfile="x.log")
    assert parent["logger"] is None  # text stays twistd's own observer
    with pytest.raises(usage.UsageError):
        parse_under_twistd(server_tap, ["--log-format", "json"], syslog=True)


def test_status_lists_one_page_of_agents_and_totals_them_all(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    agents = [FakeAgent(server, 5000 + i, free=1000) for i in range(250)]
    ids = sorted(a.rec.agent_id for a in agents)
    code, _h, body = fetch(treq, "/api/status")[0]
    doc = json.loads(body)
    assert code == 200 and doc["totals"]["agents"] == 250 and doc["totals"]["free"] == 250 * 1000
    assert [g["id"] for g in doc["agents"]] == ids[:200] and doc["next"] == ids[199]
    doc = json.loads(fetch(treq, f"/api/status?after={doc['next']}")[0][2])
    assert [g["id"] for g in doc["agents"]] == ids[200:] and doc["next"] is None
    doc = json.loads(fetch(treq, "/api/status?limit=1000")[0][2])
    assert len(doc["agents"]) == 250 and doc["next"] is None
    for bad in ("limit=0", "limit=1001", "limit=x", "after=zz"):
        assert fetch(treq, f"/api/status?{bad}")[0][0] == 400
    page = fetch(treq, "/")[0][2].decode()
    assert f"The first 200 of 250 agents; the rest through api/status?after={ids[199]}" in page


def test_status_and_metrics_have_their_own_rate_limit(server):
    treq = StubTreq(DiscoveryAPI(server).resource())
    codes = [fetch(treq, path)[0][0] for path in ["/api/status", "/", "/metrics"] * 7]
    assert codes[:20] == [200] * 20 and codes[20] == 429
    assert fetch(treq, f"/api/who-has?q={HASH}")[0][0] == 200  # the API's bucket is apart
    server.clock.advance(1)
    assert fetch(treq, "/metrics")[0][0] == 200


def test_audit_metrics_count_results_and_proven_copies():
    from tests.adapters.test_server_audit import DATA, PART, audits, proof_line, tick
    from tests.adapters.test_server_api import FakeAgent
    from dsss.server.config import ServerConfig
    from dsss.server.service import DiscoveryServer
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(10)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=5.0, replicas=2, audit_rate=1000))
    clock.advance(60)
    honest, liar = FakeAgent(server, 4001), FakeAgent(server, 4002)
    for a in (honest, liar):
        a.reply(f"HAVE {PART}:{len(DATA)}")
        a.sent()
    tick(server)
    ((_, nonce),) = audits(honest)
    honest.reply(proof_line(DATA, nonce))
    tick(server)
    assert audits(liar)
    liar.reply("ERROR not-found gone")
    value = server.metrics.registry.get_sample_value
    assert value("dsss_audits_total", {"result": "passed"}) == 1
    assert value("dsss_audits_total", {"result": "failed"}) == 1
    assert value("dsss_parts_proven") == 1 and value("dsss_agents_disqualified") == 0
