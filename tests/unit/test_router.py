"""Routing: live delivery to every connection of a user, the backlog for the rest, flush on connect.

The first half drives the router with fake outlets; the second with real
``Connection`` objects over a fake socket, so the writer, the bounded queue and
the settle-once bookkeeping are exercised as in production. The flush itself,
a connection's own work, is tested in ``test_connection``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence

import pytest

from service.auth import Identity
from service.closecode import CloseCode
from service.connection import Connection
from service.hub import Hub
from service.metrics import Metrics
from service.notification import Notification
from service.router import Outlet, Router

from .fakes import FakeBacklog, FakeOutlet, FakeSocket, local_router, notification, until


@pytest.fixture
async def router(hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics) -> Router:
    """A single-process router: the memory broker, as with ``REDIS_URL`` empty."""
    return await local_router(hub, backlog, metrics, retry_initial=0.005, retry_max=0.02)


def count(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def outlet(hub: Hub[Outlet], user_id: str, mode: str = "write") -> FakeOutlet:
    fake = FakeOutlet(user_id, mode)
    hub.register(fake)
    return fake


# --- deliver, with fake outlets -------------------------------------------------------------


async def test_offline_notification_is_stored(
    router: Router, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A notification for a user with no open connection is kept for their next visit."""
    n = notification("alice")
    await router.deliver([n])
    assert backlog.stored_ids == [n.message_id]
    assert count(metrics, "notify_notifications_stored_total") == 1


async def test_live_notification_reaches_every_connection_and_is_not_stored(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """Every open tab of the user receives the frame, and it is not sent again later."""
    tab1, tab2 = outlet(hub, "alice"), outlet(hub, "alice")
    n = notification("alice")
    await router.deliver([n])
    assert tab1.frames == [n.frame]
    assert tab2.frames == [n.frame]
    assert backlog.rows == {}


async def test_other_users_receive_nothing(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """A notification for one user never shows up on another user's connection."""
    alice, bob = outlet(hub, "alice"), outlet(hub, "bob")
    for_alice, for_carol = notification("alice"), notification("carol")
    await router.deliver([for_alice, for_carol])
    assert alice.frames == [for_alice.frame]
    assert bob.frames == []
    assert backlog.stored_ids == [for_carol.message_id]


async def test_notification_no_connection_accepted_is_stored(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """If every connection of the user is already closing, the notification is stored."""
    outlet(hub, "alice", "refuse")
    outlet(hub, "alice", "drop")
    n = notification("alice")
    await router.deliver([n])
    assert backlog.stored_ids == [n.message_id]


async def test_written_on_one_connection_is_enough(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """A notification written to one tab is not stored even if another tab dropped it."""
    outlet(hub, "alice", "drop")
    good = outlet(hub, "alice")
    n = notification("alice")
    await router.deliver([n])
    assert good.frames == [n.frame]
    assert backlog.rows == {}


async def test_written_at_once_on_one_tab_and_dropped_on_another_is_not_stored(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """A frame written at once to one tab counts as delivered though the queued tab gave up."""
    fast = outlet(hub, "alice", "now")
    outlet(hub, "alice", "drop")
    n = notification("alice")
    await router.deliver([n])
    assert fast.frames == [n.frame]
    assert backlog.rows == {}


async def test_frames_written_at_once_are_neither_queued_nor_stored(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """When every tab takes the frame at once, nothing is queued and nothing is stored."""
    tabs = [outlet(hub, "alice", "now"), outlet(hub, "alice", "now")]
    n = notification("alice")
    await router.deliver([n])
    assert [tab.frames for tab in tabs] == [[n.frame], [n.frame]]
    assert backlog.rows == {}


async def test_connection_of_the_user_is_asked_to_reread_the_store(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """After storing a user's notification, their open connections are told to flush it."""
    tab = outlet(hub, "alice", "drop")
    bob = outlet(hub, "bob")
    await router.deliver([notification("alice")])
    assert len(backlog.rows) == 1
    assert tab.flush_requests == 1
    assert bob.flush_requests == 0


async def test_deliver_waits_for_the_store_and_loses_nothing(
    router: Router, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """While PostgreSQL is down nothing is acknowledged; once it is back every message is stored."""
    backlog.unavailable = True
    batch = [notification("alice"), notification("bob")]
    task = asyncio.create_task(router.deliver(batch))
    await until(lambda: backlog.save_attempts >= 3)
    assert not task.done()
    assert router.store_healthy is False
    assert count(metrics, "notify_store_failures_total") >= 3
    backlog.unavailable = False
    await asyncio.wait_for(task, 1.0)
    assert sorted(backlog.stored_ids) == sorted(n.message_id for n in batch)
    assert router.store_healthy is True


async def test_deliver_while_store_is_down_can_be_cancelled(
    router: Router, backlog: FakeBacklog
) -> None:
    """Shutting down while the store is down stops the retry without storing anything half-way."""
    backlog.unavailable = True
    task = asyncio.create_task(router.deliver([notification("alice")]))
    await until(lambda: backlog.save_attempts >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backlog.rows == {}


async def test_redelivered_offline_notification_is_stored_once(
    router: Router, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A Kafka redelivery of a stored notification does not make it arrive twice later."""
    n = notification("alice")
    await router.deliver([n])
    await router.deliver([n])
    assert backlog.stored_ids == [n.message_id]
    assert count(metrics, "notify_notifications_stored_total") == 1


# --- with real connections over a fake socket -----------------------------------------------


FLUSH_BATCH = 2  # rows per page of a connection's flush: several pages in the tests


class Clients:
    """Opens real connections on the hub and runs their writers; closes them all at the end."""

    def __init__(
        self, hub: Hub[Outlet], router: Router, backlog: FakeBacklog, metrics: Metrics
    ) -> None:
        self._hub = hub
        self._router = router
        self._backlog = backlog
        self._metrics = metrics
        self._writers: list[asyncio.Task[None]] = []

    def open(
        self, user_id: str, *, queue_size: int = 100, start: bool = True
    ) -> tuple[Connection, FakeSocket]:
        socket = FakeSocket()
        connection = Connection(
            socket,
            Identity(user_id),
            self._metrics,
            queue_size=queue_size,
            on_unsent=self._router.store_soon,
        )
        self._hub.register(connection)
        if start:
            self.start(connection)
        return connection, socket

    def start(self, connection: Connection) -> asyncio.Task[None]:
        writer = asyncio.create_task(connection.run(self._backlog, flush_batch=FLUSH_BATCH))
        self._writers.append(writer)
        return writer

    async def close_all(self) -> None:
        for writer in self._writers:
            writer.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)


@pytest.fixture
async def clients(
    hub: Hub[Outlet], router: Router, backlog: FakeBacklog, metrics: Metrics
) -> AsyncIterator[Clients]:
    opened = Clients(hub, router, backlog, metrics)
    yield opened
    await opened.close_all()


async def test_live_frames_reach_every_socket_of_the_user(
    router: Router, clients: Clients, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """Two open sockets of a user both show the notification; another user's socket does not."""
    _, tab1 = clients.open("alice")
    _, tab2 = clients.open("alice")
    _, bob = clients.open("bob")
    n = notification("alice")
    await router.deliver([n])
    assert tab1.frames == [n.frame]
    assert tab2.frames == [n.frame]
    assert bob.frames == []
    assert backlog.rows == {}
    assert count(metrics, "notify_notifications_delivered_total") == 2


async def test_socket_failing_mid_write_gets_its_notification_stored(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A notification that could not be written because the socket broke arrives on reconnect."""
    connection, socket = clients.open("alice")
    socket.fail_sends = True
    n = notification("alice")
    await asyncio.wait_for(router.deliver([n]), 1.0)
    assert socket.frames == []
    assert connection.closed
    assert backlog.stored_ids == [n.message_id]


async def test_queue_overflow_closes_with_1013_and_stores_what_was_queued(
    router: Router, clients: Clients, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A client too slow to keep up is closed with 1013 and loses nothing: it is all stored."""
    earlier = notification("alice", "earlier")
    backlog.put(earlier)
    connection, socket = clients.open("alice", queue_size=2)
    socket.hold()
    await until(lambda: socket.sending == 1)  # the writer is stuck flushing ``earlier``
    burst = [notification("alice", f"live {i}") for i in range(4)]
    await asyncio.wait_for(router.deliver(burst), 1.0)
    assert socket.failed_with is not None
    assert socket.failed_with[0] == 1013
    assert connection.closed
    assert socket.frames == []
    assert sorted(backlog.stored_ids) == sorted(
        [earlier.message_id, *(n.message_id for n in burst)]
    )
    assert count(metrics, "notify_slow_connections_closed_total") == 1


async def test_closing_a_connection_stores_what_it_had_not_written(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """On shutdown (close 1001) notifications still queued for the socket are stored, not lost."""
    connection, socket = clients.open("alice")
    socket.hold()
    batch = [notification("alice", "a"), notification("alice", "b")]
    delivering = asyncio.create_task(router.deliver(batch))
    await until(lambda: socket.sending == 1)
    await connection.close(CloseCode.GOING_AWAY)
    await connection.close(CloseCode.GOING_AWAY)
    await asyncio.wait_for(delivering, 1.0)
    assert socket.closed_with == (1001, "server shutting down")
    assert socket.frames == []
    assert sorted(backlog.stored_ids) == sorted(n.message_id for n in batch)


async def test_stored_notifications_come_before_live_ones(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """On connect the user sees the backlog oldest first, then what arrives live."""
    old = [notification("alice", f"old {i}") for i in range(3)]
    backlog.put(*old)
    connection, socket = clients.open("alice", start=False)
    socket.hold()
    clients.start(connection)
    await until(lambda: socket.sending == 1)
    live = notification("alice", "live")
    delivering = asyncio.create_task(router.deliver([live]))
    await asyncio.sleep(0.01)
    socket.release()
    await asyncio.wait_for(delivering, 1.0)
    assert socket.frames == [n.frame for n in [*old, live]]
    assert backlog.rows == {}


async def test_redelivery_of_a_flushed_notification_is_not_shown_twice(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A notification flushed on connect and then redelivered by Kafka appears once."""
    n = notification("alice")
    backlog.put(n)
    _, socket = clients.open("alice")
    await until(lambda: socket.frames == [n.frame])
    await asyncio.wait_for(router.deliver([n]), 1.0)
    await router.deliver([notification("alice", "marker")])
    assert socket.frames.count(n.frame) == 1
    assert (n.user_id, n.message_id) not in backlog.rows


async def test_live_notification_later_found_in_the_store_is_not_resent(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A notification written live and also stored is deleted on the next flush, not shown again."""
    _, socket = clients.open("alice")
    n = notification("alice")
    await router.deliver([n])
    await router.store([n])
    await until(lambda: backlog.rows == {})
    assert socket.frames == [n.frame]


async def test_connection_opened_during_the_store_write_receives_the_notification(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A user who connects while their notification is being stored still receives it at once."""
    backlog.save_gate = asyncio.Event()
    n = notification("alice")
    delivering = asyncio.create_task(router.deliver([n]))
    await until(lambda: backlog.save_attempts == 1)
    _, socket = clients.open("alice")  # registered, flushes an empty backlog
    await asyncio.sleep(0.01)
    assert socket.frames == []
    backlog.save_gate.set()
    await asyncio.wait_for(delivering, 1.0)
    await until(lambda: socket.frames == [n.frame])
    await until(lambda: backlog.rows == {})


def _frames(notifications: list[Notification]) -> list[str]:
    return [n.frame for n in notifications]


async def test_many_notifications_arrive_in_order(router: Router, clients: Clients) -> None:
    """Notifications for one user are shown in the order they were produced."""
    _, socket = clients.open("alice")
    batch = [notification("alice", f"n{i}") for i in range(50)]
    await router.deliver(batch[:20])
    await router.deliver(batch[20:])
    assert socket.frames == _frames(batch)


async def test_a_stalled_socket_does_not_hold_up_the_batch(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A frame stuck behind a stalled socket is stored after a short wait; others go on."""
    stalled, socket = clients.open("alice")
    await until(lambda: stalled._idle)
    socket.hold()
    first = notification("alice", "queued behind a stalled write")
    stuck = notification("alice", "stuck")
    # The first frame goes out through the writer (send_now refuses while held) and hangs.
    await asyncio.wait_for(router.deliver([first]), 2.0)
    await asyncio.wait_for(router.deliver([stuck]), 2.0)
    assert {first.message_id, stuck.message_id} <= set(backlog.stored_ids)


async def test_abort_settles_the_frame_being_written_as_not_written(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A connection aborted mid-write has that frame stored, not counted as delivered."""
    connection, socket = clients.open("alice")
    await until(lambda: connection._idle)
    socket.hold()
    n = notification("alice")
    delivering = asyncio.create_task(router.deliver([n]))
    await until(lambda: socket.sending == 1)
    connection.abort(CloseCode.TRY_AGAIN_LATER)
    await asyncio.wait_for(delivering, 2.0)
    assert backlog.stored_ids == [n.message_id]


async def test_frames_left_in_the_socket_buffer_are_stored_on_abort(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """Frames the socket accepted but never sent are stored when the connection is aborted."""
    connection, socket = clients.open("alice")
    await until(lambda: connection._idle)
    sent = [notification("alice", f"n{i}") for i in range(3)]
    socket.buffered_bytes = 10_000  # a client that stopped reading
    await router.deliver(sent)
    assert socket.frames == [n.frame for n in sent]
    assert backlog.stored_ids == []
    connection.abort(CloseCode.TRY_AGAIN_LATER)
    await router.drain()
    assert sorted(backlog.stored_ids) == sorted(n.message_id for n in sent)


async def test_a_stalled_socket_closes_with_1013_and_stores_what_it_held(
    router: Router, clients: Clients, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A socket with no room for WRITE_TIMEOUT: 1013, counted, its frames all stored."""
    connection, socket = clients.open("alice")
    await until(lambda: connection._idle)
    in_buffer = notification("alice", "in the buffer")
    socket.buffered_bytes = 10_000  # the client stopped reading
    await router.deliver([in_buffer])
    socket.hold()
    stuck = notification("alice", "stuck")
    delivering = asyncio.create_task(router.deliver([stuck]))
    await until(lambda: socket.sending == 1)
    connection.stalled()
    connection.stalled()  # the socket tells once; a second call changes nothing
    await asyncio.wait_for(delivering, 2.0)
    await router.drain()
    assert socket.failed_with == (1013, "too slow to keep up")
    assert sorted(backlog.stored_ids) == sorted([in_buffer.message_id, stuck.message_id])
    assert count(metrics, "notify_slow_connections_closed_total") == 1


async def test_flushed_frames_left_in_the_socket_buffer_are_stored_again_on_abort(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """Stored frames flushed into a buffer the client never read are stored again on abort."""
    stored = [notification("alice", f"s{i}") for i in range(3)]
    backlog.put(*stored)
    connection, socket = clients.open("alice", start=False)
    socket.buffered_bytes = 10_000  # a client that stopped reading
    clients.start(connection)
    await until(lambda: connection._idle)
    assert socket.frames == [n.frame for n in stored]
    assert backlog.rows == {}
    connection.abort(CloseCode.TRY_AGAIN_LATER)
    await router.drain()
    assert sorted(backlog.stored_ids) == sorted(n.message_id for n in stored)


# --- one message_id, several users -----------------------------------------------------------


def same_id_for(message_id: str, *users: str) -> list[Notification]:
    """The same notification id fanned out to each of ``users`` (one Kafka record each)."""
    return [Notification.build(message_id, user, f"for {user}", "b", 0) for user in users]


async def test_one_message_id_for_two_offline_users_is_stored_for_each(
    router: Router, backlog: FakeBacklog, metrics: Metrics, clients: Clients
) -> None:
    """An announcement sent to two offline users under one id waits for both of them."""
    for_alice, for_bob = same_id_for(str(uuid.uuid4()), "alice", "bob")
    await router.deliver([for_alice, for_bob])
    (alice, alice_socket), (bob, bob_socket) = (
        clients.open(user, start=False) for user in ("alice", "bob")
    )
    assert await alice.flush_backlog(backlog, FLUSH_BATCH) == 1
    assert await bob.flush_backlog(backlog, FLUSH_BATCH) == 1
    assert alice_socket.frames == [for_alice.frame]
    assert bob_socket.frames == [for_bob.frame]
    assert count(metrics, "notify_notifications_stored_total") == 2
    assert count(metrics, "notify_store_duplicates_total") == 0


async def test_a_redelivered_duplicate_for_the_same_user_is_counted(
    router: Router, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """Kafka redelivering a stored notification adds no row and shows in a metric."""
    n = notification("alice")
    await router.deliver([n])
    await router.deliver([n, notification("alice")])
    assert len(backlog.rows) == 2
    assert count(metrics, "notify_notifications_stored_total") == 2
    assert count(metrics, "notify_store_duplicates_total") == 1


class SilentBroker:
    """A broker that reaches one receiver per notification, and no receiver ever acknowledges."""

    async def publish(self, notifications: Sequence[Notification]) -> list[int]:
        return [1] * len(notifications)

    async def publish_flush(self, user_ids: Iterable[str]) -> None:
        pass

    async def acknowledge(self, by_origin: dict[bytes, list[str]]) -> None:
        pass


async def test_unacknowledged_shared_id_is_stored_for_every_user(
    hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics
) -> None:
    """When receivers die before acknowledging a shared id, each of its users' copies is stored."""
    router = Router(hub, backlog, metrics, broker=SilentBroker(), ack_timeout=0.05)
    for_alice, for_bob = same_id_for(str(uuid.uuid4()), "alice", "bob")
    await asyncio.wait_for(router.deliver([for_alice, for_bob]), 2.0)
    assert sorted(backlog.rows) == sorted(
        [("alice", for_alice.message_id), ("bob", for_bob.message_id)]
    )
