"""Connection budgets and how they are sized from the descriptor limit (dsss.budget)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsss.budget import (
    DEFAULT_CONTROL_CONNECTIONS,
    DEFAULT_HTTP_CONNECTIONS,
    DESCRIPTOR_RESERVE,
    ConnectionBudget,
    DescriptorLimitError,
    plan_budgets,
)


def test_per_source_cap_leaves_room_for_others() -> None:
    b = ConnectionBudget(total=10, per_source=3)
    assert [b.admit("10.0.0.1") for _ in range(5)] == [True, True, True, False, False]
    assert b.admit("10.0.0.2")
    assert b.open == 4 and b.refused == 2 and b.held_by("10.0.0.1") == 3


def test_total_cap_and_release() -> None:
    b = ConnectionBudget(total=2, per_source=2)
    assert b.admit("a") and b.admit("b")
    assert not b.admit("c")
    b.release("a")
    assert b.admit("c")
    assert b.sources() == 2


def test_release_of_an_unknown_source_changes_nothing() -> None:
    b = ConnectionBudget(total=2, per_source=1)
    assert b.admit("a")
    b.release("zzz")
    b.release("a")
    b.release("a")
    assert b.open == 0 and b.sources() == 0


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcd")), max_size=200))
def test_counts_stay_within_bounds(ops: list[tuple[bool, str]]) -> None:
    b = ConnectionBudget(total=5, per_source=2)
    held: dict[str, int] = {}
    for is_open, source in ops:
        if is_open:
            if b.admit(source):
                held[source] = held.get(source, 0) + 1
        elif held.get(source):
            b.release(source)
            held[source] -= 1
        assert b.open == sum(held.values()) <= 5
        assert all(b.held_by(s) == n <= 2 for s, n in held.items())


def test_defaults_fit_a_large_limit_unchanged() -> None:
    plan = plan_budgets(1024, 1 << 20)
    assert (plan.http_total, plan.control_total) == (DEFAULT_HTTP_CONNECTIONS, DEFAULT_CONTROL_CONNECTIONS)
    assert plan.limit == plan.needed  # the soft limit is raised just enough


def test_defaults_shrink_to_a_small_hard_limit_and_favour_agents() -> None:
    plan = plan_budgets(1024, 1024)
    assert plan.needed <= 1024 == plan.limit
    assert plan.control_total > plan.http_total >= 1
    assert plan.http_total + plan.control_total == 1024 - DESCRIPTOR_RESERVE


def test_explicit_caps_over_the_hard_limit_are_refused_with_the_numbers() -> None:
    with pytest.raises(DescriptorLimitError, match="need 2128 file descriptors.*at most 1024"):
        plan_budgets(1024, 1024, http_total=1000, control_total=1000)


def test_one_explicit_cap_leaves_the_rest_to_the_other() -> None:
    plan = plan_budgets(1024, 1024, http_total=100)
    assert plan.http_total == 100 and plan.control_total == 1024 - DESCRIPTOR_RESERVE - 100
    with pytest.raises(DescriptorLimitError, match="leaves no file descriptors for agents"):
        plan_budgets(1024, 1024, http_total=2000)


def test_unlimited_hard_limit() -> None:
    plan = plan_budgets(1024, -1)
    assert plan.http_total == DEFAULT_HTTP_CONNECTIONS and plan.limit >= plan.needed
