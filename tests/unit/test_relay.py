from __future__ import annotations

from dsss.model import PeerAddress
from dsss.server.relay import RelayTable

C = PeerAddress("198.51.100.13", 40000)
A = PeerAddress("198.51.100.11", 50000)
X = PeerAddress("198.51.100.99", 1234)


def test_only_authorized_pairs_both_ways():
    t = RelayTable(limit=10**9)
    assert not t.forward(C, A, 100, 0.0)
    t.authorize(C, A, 0.0)
    assert t.forward(C, A, 100, 1.0) and t.forward(A, C, 50, 1.0)
    assert not t.forward(X, A, 100, 1.0) and not t.forward(A, X, 100, 1.0)
    assert t.relayed_bytes == 150
    assert t.recently_relayed(A, 1.0) and not t.recently_relayed(X, 1.0)


def test_pairs_expire_when_idle_and_traffic_keeps_them():
    t = RelayTable(limit=10**9, idle=10)
    t.authorize(C, A, 0.0)
    assert t.forward(C, A, 1, 9.0)
    assert t.forward(A, C, 1, 18.0)  # refreshed at 9
    assert not t.forward(C, A, 1, 29.0)
    assert len(t) == 0


def test_bandwidth_cap():
    t = RelayTable(limit=1_000_000)
    t.authorize(C, A, 0.0)
    sent = sum(1200 for _ in range(10_000) if t.forward(C, A, 1200, 0.0))
    assert sent <= 256 * 1024 + 1200  # one burst at most
    assert t.dropped_bytes > 0
    # A steady flow over the next second gets about a second's worth through.
    more = 0
    for step in range(1, 101):
        now = step / 100
        more += sum(1200 for _ in range(100) if t.forward(C, A, 1200, now))
    assert 900_000 <= more <= 1_000_000 + 1200


def test_table_is_bounded():
    t = RelayTable(limit=10**6, max_pairs=10)
    for i in range(100):
        t.authorize(PeerAddress("10.0.0.1", 1000 + i), A, 0.0)
    assert len(t) == 10


def test_a_run_goes_in_one_piece_up_to_the_limit_and_the_rest_is_counted_dropped():
    t = RelayTable(limit=1_000_000)  # burst 256 KiB
    assert t.forward_run(C, A, [1000] * 10, 0.0) == 0  # not authorized: nothing goes
    t.authorize(C, A, 0.0)
    assert t.forward_run(C, A, [1000] * 10, 0.0) == 10
    assert t.forward_run(A, C, [], 0.0) == 0
    allowed = t.forward_run(C, A, [1000] * 1000, 0.0)
    assert allowed == 256 * 1024 // 1000 - 10
    assert t.relayed_bytes == (allowed + 10) * 1000
    assert t.dropped_bytes == (1000 - allowed) * 1000
    assert t.recently_relayed(A, 0.0)
