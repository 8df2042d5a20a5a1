"""What an operator sees of a running network: the status page in a real headless Chromium,
`/api/status` and `/metrics` after known activity, the agents' own metrics, and JSON logs that
never contain keys or plaintext.

One network serves the whole module: a server logging JSON, three agents with `--metrics` (the
first also logging JSON), and one put and one get of a 3-part file through the real CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dsss
from tools.harness import LocalNetwork

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("operators")]

CHROMIUM = "/usr/bin/chromium"
# The flags a headless Chromium needs to run as root in a container, quietly and offline.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]
PART_SIZE = 1024
FILE_SIZE = 3 * PART_SIZE - 100  # three parts
REPLICAS = 3
METRICS_AT = re.compile(r"metrics at http://([0-9.]+):(\d+)/metrics")
# Introduction keys, UDP tokens and control-channel sessions are 32 hex digits; hashes and ids
# are 64, prefixes 16. None of the secrets may appear in a log.
SECRET_SHAPED = re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{32}(?![0-9a-fA-F])")


@dataclass
class Busy:
    net: LocalNetwork
    address: str
    source: Path
    marker: bytes
    metrics_urls: list[str]


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Busy]:
    base = tmp_path_factory.mktemp("operators")
    net = LocalNetwork(base / "net", heartbeat=0.5, replicas=REPLICAS)
    try:
        net.start_server("--log-format=json")
        metrics_urls = []
        for i in range(3):
            extra = ["--capacity=64M", "--metrics=tcp:0:interface=127.0.0.1"]
            if i == 0:
                extra.append("--log-format=json")
            agent = net.start_agent(None, *extra)
            m = agent.wait_for(METRICS_AT)
            metrics_urls.append(f"http://{m.group(1)}:{m.group(2)}/metrics")
        net.wait_live(3)
        net.client("keygen")
        marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
        source = base / "operators-secret-plans.txt"
        source.write_bytes((marker + os.urandom(FILE_SIZE))[:FILE_SIZE])
        r = net.client("put", "--part-size", str(PART_SIZE), str(source))
        address = r.stdout.decode().split()[0]
        out = base / "fetched.txt"
        net.client("get", address, "-o", str(out))
        assert out.read_bytes() == source.read_bytes()
        yield Busy(net, address, source, marker, metrics_urls)
    finally:
        net.stop()


def blocks_on_disk(storage: Path) -> list[Path]:
    return [p for p in (storage / "blocks").rglob("*") if p.is_file() and not p.name.endswith(".tree")]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --- /api/status and /metrics --------------------------------------------------------------------

# One put of a 3-part file stores 4 blocks (3 parts and the manifest) on 3 agents each: 12 upload
# introductions after 4 where-to-upload queries. The get asks who-has and introduces once per
# block: 4 each. Nothing fails.
KNOWN = {"puts": 12, "gets": 4, "who-has": 4, "failures": 0, "relayed-bytes": 0}


def test_api_status_after_known_activity(busy):
    net = busy.net
    status = net.status()
    activity = status["activity"]
    assert {k: activity[k] for k in KNOWN} == KNOWN
    assert activity["where-to-upload"] == 4 and activity["introductions"] == 16
    kinds = [e["kind"] for e in activity["recent"]]
    assert kinds.count("put") == 12 and kinds.count("get") == 4 and kinds.count("who-has") == 4
    assert all(e["ok"] for e in activity["recent"])
    assert busy.address[:16] in {e["part"] for e in activity["recent"]}
    agents = {a["id"]: a for a in status["agents"]}
    assert set(agents) == {p.agent_id for p in net.agents}
    for proc in net.agents:
        entry = agents[proc.agent_id]
        stored = blocks_on_disk(proc.storage)
        assert entry["address"] == proc.address and entry["reached"] == "direct" and entry["live"]
        assert entry["parts"] == len(stored) == 4
        assert entry["capacity"] == 64 * 2**20
        assert entry["used"] == entry["capacity"] - entry["free"] == sum(p.stat().st_size for p in stored)
        assert 0 <= entry["last-heartbeat"] < 3 * net.heartbeat
    totals = status["totals"]
    assert (totals["agents"], totals["live"], totals["parts"], totals["parts-indexed"]) == (3, 3, 12, 4)
    assert totals["used"] == sum(a["used"] for a in agents.values())


def test_metrics_after_known_activity(busy):
    m = scrape(busy.net.url + "/metrics")
    assert m[("dsss_agents_connected", ())] == 3 and m[("dsss_agents_live", ())] == 3
    assert m[("dsss_parts_indexed", ())] == 4 and m[("dsss_parts_stored", ())] == 12
    assert m[("dsss_capacity_bytes", ())] == 3 * 64 * 2**20
    assert m[("dsss_introductions_total", (("kind", "put"), ("outcome", "ok")))] == 12
    assert m[("dsss_introductions_total", (("kind", "get"), ("outcome", "ok")))] == 4
    assert m[("dsss_introductions_total", (("kind", "put"), ("outcome", "error")))] == 0
    assert m[("dsss_introduction_seconds_count", (("kind", "put"),))] == 12
    assert 0 < m[("dsss_introduction_seconds_sum", (("kind", "put"),))] < 12 * 2.0
    assert m[("dsss_relayed_bytes_total", ())] == 0
    assert m[("dsss_who_has_queries_total", ())] == 4
    requests = {labels: v for (name, labels), v in m.items() if name == "dsss_http_requests_total"}
    # The put asks one upload-to per block (placement and its 3 introductions at once); the
    # get's 4 introductions travel in at most one request each (those asked for in the same
    # reactor turn share one introduce-many).
    assert requests[(("endpoint", "/api/upload-to"), ("status", "200"))] == 4
    assert (("endpoint", "/api/where-to-upload"), ("status", "200")) not in requests
    intro_requests = (requests.get((("endpoint", "/api/introduce-me"), ("status", "200")), 0)
                      + requests.get((("endpoint", "/api/introduce-many"), ("status", "200")), 0))
    assert 1 <= intro_requests <= 4
    assert requests[(("endpoint", "/api/who-has"), ("status", "200"))] == 4
    assert requests[(("endpoint", "/api/status"), ("status", "200"))] >= 1
    assert not [k for k in m if k[0] == "dsss_http_errors_total"]

    agents = [scrape(url) for url in busy.metrics_urls]
    assert sum(a[("dsss_agent_uploads_total", ())] for a in agents) == 12
    assert sum(a[("dsss_agent_downloads_total", ())] for a in agents) == 4
    for proc, a in zip(busy.net.agents, agents):
        stored = blocks_on_disk(proc.storage)
        assert a[("dsss_agent_parts_stored", ())] == len(stored) == 4
        assert a[("dsss_agent_bytes_stored", ())] == sum(p.stat().st_size for p in stored)
        assert a[("dsss_agent_capacity_bytes", ())] == 64 * 2**20
        assert a[("dsss_agent_connected", ())] == 1
        assert a[("dsss_agent_refused_total", ())] == 0
        assert a[("dsss_agent_info", (("agent", proc.agent_id), ("version", dsss.__version__)))] == 1


# --- logs ----------------------------------------------------------------------------------------


def json_events(path: Path) -> list[dict[str, Any]]:
    lines = [ln for ln in path.read_text().splitlines() if ln]
    return [json.loads(ln) for ln in lines]  # every line is one JSON object


def test_json_logs_have_one_event_per_line(busy):
    net = busy.net
    assert net.server is not None
    server = json_events(net.server.log_path)
    ready = [e for e in server if e.get("log_text", "").startswith("DSSS server ready http=")]
    assert len(ready) == 1
    assert ready[0]["http"] == f"127.0.0.1:{net.http_port}" and ready[0]["log_level"]["name"] == "info"
    assert any(e.get("log_text", "").startswith("agent ") and "registered from" in e["log_text"]
               for e in server)
    first = json_events(net.agents[0].log_path)
    ready = [e for e in first if e.get("log_text", "").startswith("DSSS agent ready id=")]
    assert len(ready) == 1 and ready[0]["agent"] == net.agents[0].agent_id
    # Text stays the default: the other agents' logs are twistd's plain lines.
    text = net.agents[1].log()
    assert "DSSS agent ready id=" in text and not text.lstrip().startswith("{")


def test_logs_contain_no_keys_or_plaintext(busy):
    net = busy.net
    secret_key = busy.net.key.read_text().split()[-1]
    assert len(secret_key) >= 32
    for proc in net.procs:
        log = proc.log()
        assert log
        assert SECRET_SHAPED.findall(log) == [], proc.name
        assert busy.marker.decode() not in log and secret_key not in log
        assert busy.source.name not in log


# --- the page in Chromium ------------------------------------------------------------------------


class DomIndex(HTMLParser):
    """Elements with an id (attributes and text) and agent rows (cell texts) of a DOM dump."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "source", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.stack: list[dict[str, Any]] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[str]] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.stack.append({"tag": tag, "attrs": dict(attrs), "text": [], "cells": []})

    def handle_data(self, data: str) -> None:
        for node in self.stack:
            node["text"].append(data)

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            node = self.stack.pop()
            if node["tag"] == tag:
                break
        else:
            return
        text = "".join(node["text"]).strip()
        if "id" in node["attrs"]:
            self.by_id[node["attrs"]["id"]] = {**node["attrs"], "text": text}
        if tag == "td":
            for parent in reversed(self.stack):
                if parent["tag"] == "tr":
                    parent["cells"].append(text)
                    break
        if tag == "tr" and "data-agent" in node["attrs"]:
            self.rows[node["attrs"]["data-agent"]] = node["cells"]


def chromium(url: str, *args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(profile)},
    )


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed "
                    "(Debian's chromium package; .ci/run installs it)")
def test_status_page_in_chromium(busy, tmp_path):
    net = busy.net
    started = time.monotonic()
    dom = chromium(net.url + "/", "--dump-dom", profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    screenshot = tmp_path / "status-page.png"
    shot = chromium(net.url + "/", f"--screenshot={screenshot}", "--window-size=1280,900",
                    profile=tmp_path / "profile-shot")
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    where = f"(screenshot: {screenshot})"
    status = net.status()

    page = DomIndex(dom.stdout)
    # The inline script ran (the CSP hashes match) and re-rendered from api/status.
    assert int(page.by_id["status"].get("data-refreshes", "0")) >= 1, where
    assert page.by_id["updated"]["text"].startswith("updated "), where
    for key in ("agents", "live", "capacity", "used", "free", "parts", "parts-indexed"):
        assert page.by_id[f"total-{key}"]["data-value"] == str(status["totals"][key]), (key, where)
    for key, value in KNOWN.items():
        assert page.by_id[f"activity-{key}"]["data-value"] == str(status["activity"][key]) == str(value), where
    assert set(page.rows) == {p.agent_id for p in net.agents}, where
    for proc in net.agents:
        cells = page.rows[proc.agent_id]
        entry = next(a for a in status["agents"] if a["id"] == proc.agent_id)
        assert cells[:4] == [proc.agent_id[:16], proc.address, "direct", "live"], where
        assert cells[7] == str(entry["parts"]) == "4", where
        assert cells[9] == entry["version"], where
    assert page.by_id["recent"]["text"].count("put") == 12, where
    assert time.monotonic() - started < 30, where

    results = os.environ.get("DSSS_SCREENSHOT_DIR")
    if results:  # keep a copy for a person to look at
        shutil.copy(screenshot, Path(results) / "status-page.png")
