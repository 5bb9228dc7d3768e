"""The open-file limit the gateway runs with, against what MAX_CONNECTIONS needs."""

from __future__ import annotations

import resource

from service.limits import FD_MARGIN, plan_open_files

INFINITY = resource.RLIM_INFINITY


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    """1024 soft under a 1,048,576 hard limit: run with the hard limit, which is enough."""
    plan = plan_open_files(1024, 1_048_576, 100_000)
    assert plan.soft == 1_048_576
    assert plan.enough


def test_a_hard_limit_below_the_need_is_not_enough() -> None:
    """Raised as far as allowed, and still too low for MAX_CONNECTIONS: a warning case."""
    plan = plan_open_files(1024, 20_000, 100_000)
    assert plan.soft == 20_000
    assert not plan.enough


def test_the_margin_counts_beyond_max_connections() -> None:
    """Exactly MAX_CONNECTIONS descriptors leave none for Kafka, PostgreSQL and handshakes."""
    assert not plan_open_files(100_000, 100_000, 100_000).enough
    assert plan_open_files(100_000, 100_000 + FD_MARGIN, 100_000).enough


def test_a_limit_is_never_lowered() -> None:
    """A soft limit already above the hard one asked for stays (nothing to raise)."""
    assert plan_open_files(50_000, 50_000, 10).soft == 50_000


def test_an_unlimited_hard_limit_asks_for_what_is_needed() -> None:
    """RLIM_INFINITY is not a valid soft limit for open files: ask for the need instead."""
    plan = plan_open_files(1024, INFINITY, 100_000)
    assert plan.soft == 100_000 + FD_MARGIN
    assert plan.enough


def test_an_unlimited_soft_limit_is_enough() -> None:
    assert plan_open_files(INFINITY, INFINITY, 10_000_000).enough
