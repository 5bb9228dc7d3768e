"""The rules for what a Kafka record carries besides its JSON: timestamps and user ids.

Both sides of a delivery name a user: the Kafka record's ``user_id`` and the id the
auth check answers. One function normalises both, so a record reaches exactly the
connections it names, and one that could reach none is poison instead of a row that
waits in the store for a week.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.auth import _user_id
from service.notification import (
    MAX_TIMESTAMP_MS,
    Notification,
    PoisonMessage,
    created_time,
    normalise_user_id,
    parse,
)

NOW_MS = 1_800_000_000_000
YEAR_10000_MS = 253_402_300_800_000
UUID = "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"


def value(**changes: Any) -> bytes:
    document = {
        "message_id": "123e4567-e89b-12d3-a456-426614174000",
        "delivery_method": "push",
        "user_id": UUID,
        "subject": "s",
        "content": "c",
        **changes,
    }
    return json.dumps(document).encode()


# --- timestamps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timestamp",
    [-1, 0, -(2**63), YEAR_10000_MS, 2**63 - 1, NOW_MS + 1, NOW_MS + 60_000],
    ids=["no timestamp", "zero", "most negative", "year 10000", "largest", "1 ms ahead", "ahead"],
)
def test_unusable_or_future_timestamp_means_the_time_of_consumption(timestamp: int) -> None:
    """A record stamped negative, zero or in the future counts as made when it was consumed."""
    result = parse(value(), timestamp, NOW_MS)

    assert isinstance(result, Notification)
    assert result.created_ms == NOW_MS


@pytest.mark.parametrize("timestamp", [1, 1_700_000_000_000, NOW_MS])
def test_a_past_timestamp_is_kept(timestamp: int) -> None:
    """The producer's own timestamp is kept whenever it lies in the past."""
    assert created_time(timestamp, NOW_MS) == timestamp


@given(timestamp=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_every_kafka_timestamp_gives_a_time_the_store_can_hold(timestamp: int) -> None:
    """Whatever int64 a record carries, created_ms is a datetime PostgreSQL and Python can hold."""
    result = parse(value(), timestamp, NOW_MS)

    assert isinstance(result, Notification)
    assert 1 <= result.created_ms <= NOW_MS
    datetime.datetime.fromtimestamp(result.created_ms / 1000, datetime.UTC)


def test_a_clock_past_year_9999_is_clamped_too() -> None:
    """Even a consuming machine whose clock is past year 9999 makes a representable time."""
    result = parse(value(), YEAR_10000_MS, YEAR_10000_MS + 5)

    assert isinstance(result, Notification)
    assert result.created_ms == MAX_TIMESTAMP_MS
    datetime.datetime.fromtimestamp(result.created_ms / 1000, datetime.UTC)


# --- user ids -----------------------------------------------------------------------------

NEVER_A_USER = [
    "",
    " alice",
    "alice ",
    "   ",
    "\talice",
    "alice\n",
    "al\x00ice",
    "al\x1bice",
    "al\u200bice",  # zero-width space
    "alice\u00a0",  # no-break space
    "al\u2028ice",  # line separator
    "u" * 256,
]


@pytest.mark.parametrize("raw", NEVER_A_USER, ids=repr)
def test_a_user_id_no_connection_can_have_is_poison(raw: str) -> None:
    """Padded, unprintable, empty or overlong user ids are dead-lettered as invalid_user_id."""
    with pytest.raises(PoisonMessage) as raised:
        parse(value(user_id=raw), 0, NOW_MS)

    assert raised.value.reason == "invalid_user_id"
    assert normalise_user_id(raw) is None


@pytest.mark.parametrize("raw", NEVER_A_USER, ids=repr)
def test_the_auth_side_refuses_the_same_user_ids(raw: str) -> None:
    """An auth answer naming such an id is no usable user id either: nothing could reach it."""
    assert _user_id(raw) is None


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (UUID.upper(), UUID),
        ("{" + UUID + "}", UUID),
        (UUID.replace("-", ""), UUID),
        ("Alice", "Alice"),
        ("alice smith", "alice smith"),
        ("пользователь-1", "пользователь-1"),
        ("u" * 255, "u" * 255),
    ],
)
def test_both_sides_normalise_a_user_id_alike(raw: str, canonical: str) -> None:
    """A record and an auth answer naming the same user give the same id, UUIDs in lower case."""
    result = parse(value(user_id=raw), 0, NOW_MS)

    assert isinstance(result, Notification)
    assert result.user_id == canonical
    assert _user_id(raw) == canonical


@given(raw=st.text(max_size=300))
def test_a_record_is_delivered_exactly_when_auth_could_name_its_user(raw: str) -> None:
    """For any text, the record side and the auth side agree on whether and how it is a user."""
    try:
        result = parse(value(user_id=raw), 0, NOW_MS)
    except PoisonMessage as exc:
        assert exc.reason == "invalid_user_id"
        assert _user_id(raw) is None
        return
    assert isinstance(result, Notification)
    assert result.user_id == _user_id(raw)


def test_an_integer_user_id_from_auth_is_its_decimal_text() -> None:
    """Auth services that answer ``"id": 42`` identify the user Kafka records name "42"."""
    result = parse(value(user_id="42"), 0, NOW_MS)

    assert isinstance(result, Notification)
    assert _user_id(42) == result.user_id == "42"
