"""The connection's flush of the stored backlog: oldest first, a row deleted only once written.

A real ``Connection`` over a fake socket and an in-memory backlog; the writer's
live path, with the router, is in ``test_router``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import pytest

from service.acked import AckedRows
from service.auth import Identity
from service.closecode import CloseCode
from service.connection import _SEEN_LIMIT, Connection, Stored
from service.delivery import Batch
from service.metrics import Metrics
from service.notification import Notification
from service.router import StoreUnavailable

from .fakes import FakeBacklog, FakeSocket, notification, payloads

PAGE = 2  # rows per page of the flush: several pages in every test


def count(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def connect(
    user_id: str, metrics: Metrics, socket: FakeSocket | None = None
) -> tuple[Connection, FakeSocket]:
    """A connection of ``user_id`` whose writer is not running: the test flushes it."""
    socket = socket or FakeSocket()
    return Connection(socket, Identity(user_id), metrics, queue_size=100), socket


async def test_flush_sends_oldest_first_and_empties_the_backlog(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """On connect a user receives every stored notification, oldest first, each once."""
    stored = [notification("alice", f"n{i}") for i in range(5)]
    backlog.put(*stored)
    tab, socket = connect("alice", metrics)
    assert await tab.flush_backlog(backlog, PAGE) == 5
    assert socket.frames == [n.frame for n in stored]
    assert backlog.rows == {}
    assert count(metrics, "notify_notifications_flushed_total") == 5


async def test_flush_leaves_other_users_rows_alone(backlog: FakeBacklog, metrics: Metrics) -> None:
    """Connecting as one user never sends or removes another user's stored notifications."""
    bobs = notification("bob")
    backlog.put(notification("alice"), bobs, notification("alice"))
    tab, socket = connect("alice", metrics)
    assert await tab.flush_backlog(backlog, PAGE) == 2
    assert bobs.frame not in socket.frames
    assert backlog.stored_ids == [bobs.message_id]


async def test_flush_deletes_a_row_only_after_its_frame_was_written(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A stored notification is still in the store at the moment its frame is being written."""
    stored = [notification("alice", f"n{i}") for i in range(3)]
    backlog.put(*stored)
    by_frame = {n.frame: n.message_id for n in stored}
    present_while_writing: list[bool] = []

    class Checking(FakeSocket):
        async def send(self, frames: bytes) -> None:
            for text in payloads(frames):
                present_while_writing.append(("alice", by_frame[text]) in backlog.rows)
            await super().send(frames)

    tab, _ = connect("alice", metrics, Checking())
    await tab.flush_backlog(backlog, PAGE)
    assert present_while_writing == [True, True, True]
    assert backlog.rows == {}


async def test_flush_interrupted_by_a_dead_socket_keeps_the_unsent_rows(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """If the connection dies mid-flush, what it did not receive waits for the next connection."""
    stored = [notification("alice", f"n{i}") for i in range(5)]
    backlog.put(*stored)

    class Dying(FakeSocket):
        async def send(self, frames: bytes) -> None:
            if len(self.frames) >= 3:
                raise ConnectionResetError("peer went away")
            await super().send(frames)

    tab, socket = connect("alice", metrics, Dying())
    with pytest.raises(ConnectionResetError):
        await tab.flush_backlog(backlog, 3)  # the second page's write fails
    assert socket.frames == [n.frame for n in stored[:3]]
    assert backlog.stored_ids == [n.message_id for n in stored[3:]]


async def test_flush_skips_what_this_connection_already_wrote(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A notification already shown on this connection is removed from the store, not resent."""
    already, fresh = notification("alice"), notification("alice")
    backlog.put(already)
    tab, socket = connect("alice", metrics)
    assert await tab.flush_backlog(backlog, PAGE) == 1  # ``already`` is shown here
    backlog.put(already, fresh)  # stored again (a redelivery), and a new one
    assert await tab.flush_backlog(backlog, PAGE) == 1
    assert socket.frames == [already.frame, fresh.frame]
    assert backlog.rows == {}


async def test_flush_with_the_store_down_sends_nothing_and_keeps_rows(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A connection opened while PostgreSQL is down stays open; its backlog waits."""
    n = notification("alice")
    backlog.put(n)
    backlog.unavailable = True
    tab, socket = connect("alice", metrics)
    assert await tab.flush_backlog(backlog, PAGE) == 0
    assert socket.frames == []
    assert not tab.closed
    backlog.unavailable = False
    assert backlog.stored_ids == [n.message_id]


async def test_flush_survives_a_failed_delete(backlog: FakeBacklog, metrics: Metrics) -> None:
    """If removing flushed rows fails, the frames are still delivered and the rows kept."""
    n = notification("alice")
    backlog.put(n)
    tab, socket = connect("alice", metrics)

    async def refuse(user_id: str, message_ids: object) -> None:
        raise StoreUnavailable("gone")

    backlog.delete = refuse  # type: ignore[method-assign]
    assert await tab.flush_backlog(backlog, PAGE) == 1
    assert socket.frames == [n.frame]
    assert backlog.stored_ids == [n.message_id]


async def test_flushing_one_user_keeps_another_users_row_with_the_same_id(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """Delivering the shared id to one user removes only that user's row."""
    shared = str(uuid.uuid4())
    for_alice, for_bob = (
        Notification.build(shared, user, f"for {user}", "b", 0) for user in ("alice", "bob")
    )
    backlog.put(for_alice, for_bob)
    tab, _ = connect("alice", metrics)
    assert await tab.flush_backlog(backlog, PAGE) == 1
    assert list(backlog.rows) == [("bob", for_bob.message_id)]


async def test_an_idle_connection_holds_no_writer_task_and_queued_frames_go_in_one_write(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """Once its queue is empty a connection has no task; what queues up meanwhile starts
    one, which writes the queued frames in order in one write, settles them and ends."""
    writes: list[list[str]] = []

    class Counting(FakeSocket):
        async def send(self, frames: bytes) -> None:
            writes.append(payloads(frames))
            await super().send(frames)

    socket = Counting()
    writers: set[asyncio.Task[None]] = set()
    tab = Connection(socket, Identity("alice"), metrics, queue_size=100, writers=writers)
    await tab.run(backlog, flush_batch=PAGE)
    assert not writers and tab._idle

    queued = [notification("alice", f"n{i}") for i in range(3)]
    batch = Batch()
    socket.hold()  # the socket has no room: write_now refuses, the deliveries queue
    assert not tab.write_now(queued[0])
    for n in queued:
        batch.offer(n, [tab], written=False)
    assert len(writers) == 1
    socket.release()
    await asyncio.gather(*writers)
    assert writes == [[n.frame for n in queued]]
    assert batch.unwritten == [] and not writers and tab._idle


class AckedEvents:
    """A status sink that records the ``acked`` and ``written`` events it is told."""

    def __init__(self) -> None:
        self.acked_ids: list[str] = []
        self.written_ids: list[str] = []

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None:
        self.acked_ids += list(message_ids)

    def written(self, notifications: Sequence[Notification]) -> None:
        self.written_ids += [n.message_id for n in notifications]


def batched(
    user_id: str, metrics: Metrics, deletes: AckedRows, *, v2_open: bool = False
) -> tuple[Connection, FakeSocket]:
    """A v1 connection whose flushed rows go to the batched deleter ``deletes``."""
    socket = FakeSocket()
    connection = Connection(
        socket,
        Identity(user_id),
        metrics,
        queue_size=100,
        acked_rows=deletes,
        v2_open=lambda: v2_open,
    )
    return connection, socket


async def test_flushed_rows_go_to_the_batched_deleter_without_an_acked_event(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A v1 flush of several pages empties the backlog in one batched statement, told as
    written and never as acknowledged."""
    stored = [notification("alice", f"n{i}") for i in range(5)]
    backlog.put(*stored)
    status = AckedEvents()
    deletes = AckedRows(backlog, status, window=0.05)  # type: ignore[arg-type]
    await deletes.start()
    tab, socket = batched("alice", metrics, deletes)
    assert await tab.flush_backlog(backlog, PAGE) == 5
    assert socket.frames == [n.frame for n in stored]
    await deletes.flush()
    assert backlog.rows == {}
    assert backlog.pair_statements == 1
    assert status.acked_ids == []
    await deletes.close()


async def test_a_second_flush_waits_for_the_first_ones_deletes_and_resends_nothing(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A flush asked for right after a long one sends none of the rows already sent, even
    past the ids the connection remembers."""
    stored = [notification("alice", f"n{i}") for i in range(_SEEN_LIMIT + 100)]
    backlog.put(*stored)
    deletes = AckedRows(backlog, window=0.05)
    await deletes.start()
    tab, socket = batched("alice", metrics, deletes)
    assert await tab.flush_backlog(backlog, 200) == len(stored)
    fresh = notification("alice", "stored meanwhile")
    backlog.put(fresh)
    assert await tab.flush_backlog(backlog, 200) == 1
    assert socket.frames == [n.frame for n in [*stored, fresh]]
    await deletes.flush()
    assert backlog.rows == {}
    await deletes.close()


async def test_a_batched_delete_that_fails_keeps_the_rows(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """With PostgreSQL gone after the read, the frames are delivered and the rows kept."""
    stored = [notification("alice", f"n{i}") for i in range(3)]
    backlog.put(*stored)
    deletes = AckedRows(backlog, window=0.05)
    await deletes.start()
    tab, socket = batched("alice", metrics, deletes)
    fetch = backlog.fetch

    async def then_down(
        user_id: str, after: tuple[datetime, int] | None, limit: int
    ) -> list[Stored]:
        rows = await fetch(user_id, after, limit)
        backlog.unavailable = True
        return rows

    backlog.fetch = then_down  # type: ignore[method-assign]
    assert await tab.flush_backlog(backlog, 10) == 3
    await deletes.flush()
    assert socket.frames == [n.frame for n in stored]
    backlog.unavailable = False
    assert backlog.stored_ids == [n.message_id for n in stored]
    await deletes.close()


async def test_a_v1_flush_beside_a_v2_connection_deletes_nothing_with_the_batched_deleter(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """While the user has a v2 connection, a v1 flush sends the rows and leaves them for
    the v2 client's acks."""
    stored = [notification("alice", f"n{i}") for i in range(3)]
    backlog.put(*stored)
    deletes = AckedRows(backlog, window=0.01)
    await deletes.start()
    tab, socket = batched("alice", metrics, deletes, v2_open=True)
    assert await tab.flush_backlog(backlog, PAGE) == 3
    await deletes.flush()
    assert socket.frames == [n.frame for n in stored]
    assert backlog.stored_ids == [n.message_id for n in stored]
    assert backlog.pair_statements == 0
    await deletes.close()


async def test_flushed_frames_still_in_the_socket_buffer_are_stored_again_on_abort(
    backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A connection aborted while its flushed frames sit unsent in the socket's buffer hands
    those notifications back, whole, to be stored again."""
    stored = [notification("alice", f"n{i}") for i in range(4)]
    backlog.put(*stored)
    handed_back: list[Notification] = []
    socket = FakeSocket()
    socket.buffered_bytes = len(stored[2].wire) + len(stored[3].wire)
    tab = Connection(
        socket, Identity("alice"), metrics, queue_size=100, on_unsent=handed_back.extend
    )
    assert await tab.flush_backlog(backlog, PAGE) == 4
    tab.abort(CloseCode.TRY_AGAIN_LATER)
    assert handed_back == stored[2:]


def test_a_rows_frame_is_the_notifications_frame_byte_for_byte() -> None:
    """What a flush writes for a stored row is exactly the live frame of the notification,
    quotes, control characters and non-ASCII text included."""
    title = 'Новый "фильм" \\ \n\t\x01 \u2028 😀'
    live = Notification.build(str(uuid.uuid4()), "alice", title, "<b>\x7f</b>", 1_700_000_000_123)
    cursor = (datetime.fromtimestamp(1_700_000_000.123, UTC), 1)
    row = Stored.from_row(live.message_id, "alice", title, "<b>\x7f</b>", cursor)
    assert row.wire == live.wire
    assert row.notification == live
