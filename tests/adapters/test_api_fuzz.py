"""Random and mutated HTTP parameters never crash the API: a 2xx/4xx/5xx-by-design answer with a
JSON body, never a 500 and never an exception."""

from __future__ import annotations

import json
import random
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dsss.server.api import DiscoveryAPI
from dsss.server.config import ServerConfig
from dsss.server.service import DiscoveryServer
from dsss.server.placement import NetworkRule

PATHS = ["/api/who-has", "/api/where-to-upload", "/api/introduce-me", "/api/introduce-many", "/api/upload-to", "/api/info", "/api/status"]
NAMES = ["q", "size", "to", "hash", "i", "from", "local", "exclude", "count", "copies", "chain", "lan", "x"]
VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["ab" * 32, "s" + "ab" * 32, "cd" * 32, "4", "65", "127.0.0.1:1", "[::1]:80", "10.0.0.2:7000", "0.0.0.0:1", "[ff02::1]:1", "127.0.0.1:1," + "ab" * 32 + ",4", "0", "-1", "1e9", "999999999999999999", "%00"]),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)

# These agents share 127.0.0.1 (or one NAT): the one-machine setting, each agent its own network.
ONE_MACHINE = NetworkRule.parse("off")


def _server():
    clock = Clock()
    clock.advance(100)
    server = DiscoveryServer(clock, ServerConfig(heartbeat=1.0, http_rate=1e6, distinct_networks=ONE_MACHINE), rng=random.Random(0))
    clock.advance(100)
    return server


SERVER = _server()
TREQ = StubTreq(DiscoveryAPI(SERVER).resource())


@settings(max_examples=300, deadline=None, database=None)
@given(
    path=st.sampled_from(PATHS),
    params=st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=5),
)
def test_any_parameters_give_a_json_answer_not_a_500(path, params):
    query = "&".join(f"{quote(n)}={quote(v, safe='')}" for n, v in params)
    results = []
    d = TREQ.get(f"http://server{path}?{query}")
    d.addCallback(lambda r: r.content().addCallback(lambda body: results.append((r.code, body))))
    d.addErrback(lambda f: results.append(("error", f)))
    TREQ.flush()
    SERVER.clock.advance(5)  # let any agent query time out
    TREQ.flush()
    assert results, "no answer"
    code, body = results[0]
    assert code != "error", body
    assert code in (200, 400, 404, 503, 504), (code, body)
    doc = json.loads(body)
    assert isinstance(doc, dict)
    if code != 200:
        assert isinstance(doc.get("error"), str) and doc["error"]
