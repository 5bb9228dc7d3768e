"""Acknowledged rows: gathered across users, deleted in one statement per window."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from service.acked import AckedRows
from service.router import StoreUnavailable

from .fakes import until


class Rows:
    """The store's rows as ``(user_id, message_id)`` pairs; records each statement."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.rows = set(pairs)
        self.statements: list[list[tuple[str, str]]] = []
        self.unavailable = False

    async def delete_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        if self.unavailable:
            raise StoreUnavailable("connection refused")
        self.statements.append(list(pairs))
        deleted = [pair for pair in pairs if pair in self.rows]
        self.rows -= set(deleted)
        return deleted


class Acked:
    """A status sink that records only ``acked`` events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None:
        self.events += [(user_id, m) for m in message_ids]


async def test_acks_of_many_users_in_one_window_are_one_statement() -> None:
    """Three users' acks within the window: one DELETE, and ``acked`` for the rows it found."""
    rows = Rows(("alice", "a1"), ("bob", "b1"), ("carol", "c1"))
    status = Acked()
    acked = AckedRows(rows, status, window=0.05)  # type: ignore[arg-type]
    await acked.start()
    acked.add("alice", ["a1"])
    acked.add("bob", ["b1", "b2"])  # b2: no row (acked in time elsewhere, or gone)
    acked.add("carol", ["c1"])
    await until(lambda: not rows.rows)
    await acked.flush()

    assert len(rows.statements) == 1
    assert sorted(status.events) == [("alice", "a1"), ("bob", "b1"), ("carol", "c1")]
    await acked.close()


async def test_another_users_row_with_the_same_id_is_not_deleted() -> None:
    """An ack deletes the acking user's row only."""
    rows = Rows(("alice", "shared"), ("bob", "shared"))
    acked = AckedRows(rows, window=0.01)
    await acked.start()
    acked.add("alice", ["shared"])
    await until(lambda: len(rows.statements) == 1)
    assert rows.rows == {("bob", "shared")}
    await acked.close()


async def test_a_store_that_is_down_costs_a_resend_and_does_not_stop_the_deletes() -> None:
    """While PostgreSQL is down the rows stay (sent again later); afterwards deletes go on."""
    rows = Rows(("alice", "a1"), ("alice", "a2"))
    rows.unavailable = True
    acked = AckedRows(rows, window=0.01)
    await acked.start()
    acked.add("alice", ["a1"])
    await acked.flush()
    assert rows.rows == {("alice", "a1"), ("alice", "a2")}

    rows.unavailable = False
    acked.add("alice", ["a2"])
    await acked.flush()
    assert rows.rows == {("alice", "a1")}
    assert acked.task is not None and not acked.task.done()
    await acked.close()


async def test_close_deletes_what_is_still_queued() -> None:
    """At shutdown the queued acks are deleted, not forgotten."""
    rows = Rows(("alice", "a1"))
    acked = AckedRows(rows, window=10.0)
    await acked.start()
    acked.add("alice", ["a1"])
    await asyncio.wait_for(acked.close(grace=1.0), 2.0)
    assert rows.rows == set()


async def test_rows_a_v1_flush_wrote_go_with_the_acks_and_are_not_told_as_acked() -> None:
    """Flushed rows and acked rows share a statement; only the acked ones are reported,
    and the flush's future completes once its rows are gone."""
    rows = Rows(("alice", "a1"), ("bob", "b1"), ("bob", "b2"))
    status = Acked()
    acked = AckedRows(rows, status, window=0.05)  # type: ignore[arg-type]
    await acked.start()
    done = acked.add_written("bob", ["b1", "b2"])
    acked.add("alice", ["a1"])
    assert not done.done()
    await asyncio.wait_for(done, 2.0)
    assert rows.rows == set()
    assert len(rows.statements) == 1
    assert status.events == [("alice", "a1")]
    await acked.close()


async def test_a_flushs_future_completes_when_the_store_is_down_and_the_rows_stay() -> None:
    """A failed delete does not leave a later flush waiting; the rows are sent again later."""
    rows = Rows(("bob", "b1"))
    rows.unavailable = True
    acked = AckedRows(rows, window=0.01)
    await acked.start()
    await asyncio.wait_for(acked.add_written("bob", ["b1"]), 2.0)
    assert rows.rows == {("bob", "b1")}
    await acked.close()


async def test_close_completes_the_flushs_future_it_could_not_delete_in_time() -> None:
    """Shutting down never leaves a writer waiting on a delete."""

    class Hanging(Rows):
        async def delete_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
            await asyncio.sleep(60)
            return []

    acked = AckedRows(Hanging(("bob", "b1")), window=0.01)
    await acked.start()
    done = acked.add_written("bob", ["b1"])
    await asyncio.sleep(0.05)  # the statement is under way
    await asyncio.wait_for(acked.close(grace=0.1), 2.0)
    assert done.done()
