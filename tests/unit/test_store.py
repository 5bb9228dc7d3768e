"""The store's pure parts: what ``created_at`` a Kafka timestamp becomes."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from service.store import _timestamp

YEAR_10000_MS = 253_402_300_800_000


@pytest.mark.parametrize(
    "created_ms",
    [-(2**63), -1, 0, YEAR_10000_MS, YEAR_10000_MS * 1000, 2**63 - 1, 10**40],
)
def test_a_timestamp_missing_or_out_of_range_is_stored_as_now(created_ms: int) -> None:
    """A zero, negative, future or unrepresentable timestamp never raises: the row is dated now."""
    before = datetime.now(UTC)
    stored = _timestamp(created_ms)
    assert before <= stored <= datetime.now(UTC)


def test_a_past_timestamp_is_kept_to_the_millisecond() -> None:
    """The record's own time is kept when it is in the past (ordering and expiry use it)."""
    created_ms = int(time.time() * 1000) - 3_600_000
    assert _timestamp(created_ms) == datetime.fromtimestamp(created_ms / 1000, UTC)
