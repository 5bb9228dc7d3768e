"""The store's parts that need no PostgreSQL: what ``created_at`` a Kafka timestamp
becomes, and how the first pages of many connects are read together."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.connection import Stored
from service.router import StoreUnavailable
from service.store import _each_its_page, _first_takes_the_gap, _stored, _timestamp, _Together

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


# --- first pages of many connects, read together ----------------------------------------------

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class Rows:
    """A backlog whose first pages a statement reads; records every statement it ran.

    ``gate``, when set to an unset event, holds each statement until it is set.
    """

    def __init__(self, counts: dict[str, int]) -> None:
        self.rows: list[dict[str, Any]] = []
        seq = 0
        for user, count in counts.items():
            for i in range(count):
                seq += 1
                self.rows.append(
                    {
                        "message_id": str(uuid.uuid4()),  # read as text
                        "user_id": user,
                        "title": f"{user} {i}",
                        "body": "",
                        "created_at": EPOCH + timedelta(seconds=i),
                        "seq": seq,
                    }
                )
        self.statements: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.failing = False

    async def read(self, users: list[str], limit: int) -> dict[str, list[Stored]]:
        self.statements.append(users)
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise StoreUnavailable("connection refused")
        pages: dict[str, list[Stored]] = {}
        for row in self.rows:
            if row["user_id"] in users and len(pages.get(row["user_id"], ())) < limit:
                pages.setdefault(row["user_id"], []).append(_stored(tuple(row.values())))
        return pages


def first_pages(rows: Rows) -> _Together[list[Stored]]:
    return _Together("test-first-pages", rows.read, _each_its_page)


def titles(page: list[Any]) -> list[str]:
    return [stored.notification.title for stored in page]


async def test_connects_of_one_moment_are_read_in_one_statement_each_its_own_page() -> None:
    """Reads asked together are one statement; each user gets its own page; a user asked
    twice gets its page twice; a user with none, nothing."""
    rows = Rows({"alice": 5, "bob": 1, "carol": 0})
    pages = first_pages(rows)
    alice, bob, carol, again = await asyncio.gather(
        pages.read("alice", 3),
        pages.read("bob", 3),
        pages.read("carol", 3),
        pages.read("alice", 3),
    )
    assert rows.statements == [["alice", "bob", "carol"]]
    assert titles(alice) == titles(again) == ["alice 0", "alice 1", "alice 2"]
    assert titles(bob) == ["bob 0"] and carol == []


async def test_reads_asked_while_a_statement_runs_go_together_in_the_next() -> None:
    """A connect never waits for more than the statement already running, and the reads
    that queued behind it share one statement."""
    rows = Rows({"alice": 1, "bob": 1, "carol": 1})
    rows.gate = asyncio.Event()
    pages = first_pages(rows)
    first = asyncio.create_task(pages.read("alice", 10))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = asyncio.gather(pages.read("bob", 10), pages.read("carol", 10))
    await asyncio.sleep(0)
    rows.gate.set()
    assert titles(await first) == ["alice 0"]
    assert [titles(page) for page in await later] == [["bob 0"], ["carol 0"]]
    assert rows.statements == [["alice"], ["bob", "carol"]]


async def test_a_failed_statement_fails_each_of_its_reads_and_the_next_read_works() -> None:
    """The store down: every connect of that statement hears StoreUnavailable; later ones read."""
    rows = Rows({"alice": 1})
    pages = first_pages(rows)
    rows.failing = True
    results = await asyncio.gather(
        pages.read("alice", 10), pages.read("bob", 10), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)
    rows.failing = False
    assert titles(await pages.read("alice", 10)) == ["alice 0"]


async def test_a_client_that_leaves_while_waiting_does_not_disturb_the_others() -> None:
    """A cancelled read is dropped; the statement's other reads get their pages."""
    rows = Rows({"alice": 1, "bob": 1})
    rows.gate = asyncio.Event()
    pages = first_pages(rows)
    leaving = asyncio.create_task(pages.read("alice", 10))
    staying = asyncio.create_task(pages.read("bob", 10))
    await asyncio.sleep(0)
    leaving.cancel()
    rows.gate.set()
    assert titles(await staying) == ["bob 0"]
    assert leaving.cancelled()


async def test_a_page_larger_than_one_statement_takes_is_read_in_several() -> None:
    """More users than one statement takes are read in as many statements as needed."""
    users = [f"user-{i:04d}" for i in range(1200)]
    rows = Rows(dict.fromkeys(users, 1))
    pages = first_pages(rows)
    got = await asyncio.gather(*(pages.read(user, 10) for user in users))
    assert [titles(page) for page in got] == [[f"{user} 0"] for user in users]
    assert [len(users) for users in rows.statements] == [500, 500, 200]


async def test_connects_with_large_pages_share_statements_of_bounded_size() -> None:
    """With pages of 1,000 rows, a statement reads for at most 100 users (100,000 rows), so a
    connect storm never asks PostgreSQL for one answer of millions of rows."""
    users = [f"user-{i:04d}" for i in range(250)]
    rows = Rows(dict.fromkeys(users, 2))
    pages = first_pages(rows)
    got = await asyncio.gather(*(pages.read(user, 1000) for user in users))
    assert [titles(page) for page in got] == [[f"{user} 0", f"{user} 1"] for user in users]
    assert [len(users) for users in rows.statements] == [100, 100, 50]


async def test_two_v2_connects_of_one_user_in_one_statement_are_told_its_gap_once() -> None:
    """The gap goes to one of them (as if its statement ran first); the other hears of none."""
    gaps = {"alice": 3}
    statements: list[list[str]] = []

    async def take(users: list[str], _: int) -> dict[str, int]:
        statements.append(users)
        return {user: gaps.pop(user) for user in users if user in gaps}

    together: _Together[int] = _Together("test-gaps", take, _first_takes_the_gap)
    told = await asyncio.gather(
        together.read("alice"), together.read("alice"), together.read("bob")
    )
    assert sorted(told[:2]) == [0, 3] and told[2] == 0
    assert statements == [["alice", "bob"]]
