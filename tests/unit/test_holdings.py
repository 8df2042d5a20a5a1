"""Digests of holdings: equal for equal sets, different where one part differs, by prefix."""

from __future__ import annotations

from hypothesis import given, strategies as st

from dsss.holdings import Holdings, differing, digest, path_of
from dsss.model import block_hash

PARTS = st.lists(st.binary(min_size=1, max_size=8).map(block_hash), unique=True, max_size=60)


@given(PARTS, st.randoms())
def test_digest_ignores_order(parts: list[str], rnd) -> None:
    shuffled = list(parts)
    rnd.shuffle(shuffled)
    assert Holdings(parts).digest("") == Holdings(shuffled).digest("")


@given(PARTS, st.binary(min_size=9, max_size=12).map(block_hash))
def test_one_part_more_shows_under_its_prefixes_only(parts: list[str], extra: str) -> None:
    ours, theirs = Holdings(parts), Holdings(parts + [extra])
    path = path_of(extra)
    for depth in range(4):
        prefix = path[:depth]
        assert differing(ours.digest(prefix), theirs.digest(prefix)) == [path[depth]]
    other = "0" if path[0] != "0" else "1"
    assert differing(ours.digest(other), theirs.digest(other)) == []


@given(PARTS)
def test_under_and_count_agree(parts: list[str]) -> None:
    h = Holdings(parts)
    assert h.count("") == len(parts) == len(h.under(""))
    for prefix in ("", "a", "3f", "3f0"):
        under = h.under(prefix)
        assert set(under.values()) == {p for p in parts if path_of(p).startswith(prefix)}
        assert h.count(prefix) == len(under)
        assert h.digest(prefix) == digest(under, prefix)


def test_digest_counts_and_xor() -> None:
    a, b = block_hash(b"a"), block_hash(b"b")
    d = Holdings([a, b]).digest("")
    assert sum(n for n, _ in d) == 2
    pa, pb = path_of(a), path_of(b)
    if pa[0] == pb[0]:
        assert d[int(pa[0], 16)] == (2, int(pa, 16) ^ int(pb, 16))
    else:
        assert d[int(pa[0], 16)] == (1, int(pa, 16))


@given(PARTS, st.data())
def test_kept_digest_follows_removals(parts: list[str], data) -> None:
    h = Holdings(parts)
    gone = data.draw(st.lists(st.sampled_from(parts), unique=True) if parts else st.just([]))
    for part in gone:
        h.discard_path(path_of(part))
    left = [p for p in parts if p not in gone]
    assert h.digest("") == digest([path_of(p) for p in left], "") == Holdings(left).digest("")
    taken = h.take_child("7")
    assert set(taken.values()) == {p for p in left if path_of(p).startswith("7")}
    assert h.digest("") == Holdings([p for p in left if not path_of(p).startswith("7")]).digest("")
    assert h.count("7") == 0
