"""Protocol v2 without a network: client frames and their rate, frames out, ack settlement.

Real ``Connection`` objects over a fake socket and an in-memory backlog, driven by
the router on the memory broker, as in ``test_router``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence

import orjson
import pytest

from service.acked import AckedRows
from service.auth import Identity
from service.connection import Connection
from service.hub import Hub
from service.inbound import (
    Ack,
    BadFrame,
    FrameRate,
    Refresh,
    parse_acked_parameter,
    parse_client_frame,
)
from service.metrics import Metrics
from service.notification import Notification, as_uuid
from service.router import Outlet, Router

from .fakes import FakeBacklog, FakeSocket, local_router, notification, until

# --- client frames ---------------------------------------------------------------------------


def test_an_ack_frame_gives_canonical_unique_ids() -> None:
    """Ids in any usual UUID spelling are compared in canonical form, each once."""
    one = str(uuid.uuid4())
    frame = parse_client_frame(orjson.dumps({"type": "ack", "ids": [one.upper(), one]}).decode())
    assert frame == Ack((one,))


def near_uuids() -> list[str]:
    """Canonical UUIDs, and texts one step from canonical: case, dashes, digits, length."""
    one = str(uuid.uuid4())
    shifted = one.replace("-", "")
    return [
        one,
        one.upper(),
        "{" + one + "}",
        shifted,
        shifted[:7]
        + "-"
        + shifted[7:11]
        + "-"
        + shifted[11:15]
        + "-"
        + shifted[15:19]
        + "-"
        + shifted[19:],
        one[:-1] + "g",
        one[:-1] + "\u0661",  # an Arabic-Indic digit one
        one[:-1] + "_",
        one + "0",
        one[:-1],
        one[:8] + "+" + one[9:],
        " " + one[1:],
    ]


@pytest.mark.parametrize("text", near_uuids())
def test_an_acked_id_is_taken_exactly_when_it_is_a_uuid(text: str) -> None:
    """The quick check of canonical ids agrees with the full one on near misses."""
    frame = orjson.dumps({"type": "ack", "ids": [text]}).decode()
    canonical = as_uuid(text)
    if canonical is None:
        with pytest.raises(BadFrame):
            parse_client_frame(frame)
    else:
        assert parse_client_frame(frame) == Ack((canonical,))


def test_a_refresh_frame_keeps_its_token_out_of_its_repr() -> None:
    """A refresh is read, and its token never shows in a log line of the frame."""
    frame = parse_client_frame('{"type":"refresh","token":"s3cret"}')
    assert isinstance(frame, Refresh) and frame.token == "s3cret"
    assert "s3cret" not in repr(frame)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"type":"subscribe"}',
        '{"ids":["x"]}',
        '{"type":"ack"}',
        '{"type":"ack","ids":[]}',
        '{"type":"ack","ids":["not-a-uuid"]}',
        '{"type":"ack","ids":[7]}',
        '{"type":"ack","ids":"' + str(uuid.uuid4()) + '"}',
        '{"type":"refresh"}',
        '{"type":"refresh","token":""}',
        '{"type":"refresh","token":12}',
    ],
)
def test_frames_that_are_not_the_protocols_are_refused(text: str) -> None:
    """Malformed, unknown or wrongly shaped client frames are refused as bad frames."""
    with pytest.raises(BadFrame):
        parse_client_frame(text)


def test_an_ack_of_more_than_500_ids_is_refused() -> None:
    """500 ids per ack frame at most."""
    ids = [str(uuid.uuid4()) for _ in range(501)]
    parse_client_frame(orjson.dumps({"type": "ack", "ids": ids[:500]}).decode())
    with pytest.raises(BadFrame):
        parse_client_frame(orjson.dumps({"type": "ack", "ids": ids}).decode())


def test_the_acked_parameter_takes_up_to_100_uuids() -> None:
    """The ``acked`` query parameter: comma-separated UUIDs, 1 to 100 of them."""
    ids = [str(uuid.uuid4()) for _ in range(101)]
    assert parse_acked_parameter(",".join(ids[:100])) == tuple(ids[:100])
    for bad in (",".join(ids), "", "abc", f"{ids[0]},,{ids[1]}"):
        with pytest.raises(BadFrame):
            parse_acked_parameter(bad)


def test_the_frame_rate_allows_a_burst_then_the_rate() -> None:
    """A burst of twice the rate passes at once; after it, frames pass at the rate."""
    rate = FrameRate(20, 40, now=0.0)
    assert all(rate.allow(0.0) for _ in range(40))
    assert not rate.allow(0.0)
    assert rate.allow(0.05)  # one token back after 1/20 s
    assert not rate.allow(0.05)
    assert sum(rate.allow(10.0) for _ in range(100)) == 40  # refilled up to the burst only


# --- frames out ------------------------------------------------------------------------------


def test_the_v2_frame_carries_id_and_time_and_is_made_once() -> None:
    """The notification frame has its id, title, body and created_at in UTC milliseconds."""
    n = Notification.build(
        "8f7e7b7a-1111-4222-8333-444455556666", "alice", "Новый", "текст", 1_796_206_530_123
    )
    assert orjson.loads(n.frame_v2) == {
        "type": "notification",
        "id": "8f7e7b7a-1111-4222-8333-444455556666",
        "title": "Новый",
        "body": "текст",
        "created_at": "2026-12-02T10:15:30.123Z",
    }
    assert n.frame_v2 is n.frame_v2
    assert orjson.loads(n.frame) == {"title": "Новый", "body": "текст"}


# --- ack settlement --------------------------------------------------------------------------


@pytest.fixture
async def router(hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics) -> Router:
    return await local_router(hub, backlog, metrics, delivery_wait=0.3, ack_wait=0.3)


class Clients:
    """Real connections, v1 or v2, registered in the hub with their writers running."""

    def __init__(self, hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics) -> None:
        self._hub = hub
        self._backlog = backlog
        self._metrics = metrics
        self._writers: list[asyncio.Task[None]] = []

    def open(self, user_id: str, *, v2: bool) -> tuple[Connection, FakeSocket]:
        socket = FakeSocket()
        hub = self._hub
        connection = Connection(
            socket,
            Identity(user_id),
            self._metrics,
            queue_size=100,
            acks=v2,
            v2_open=lambda: any(c.acks for c in hub.connections(user_id)),
        )
        hub.register(connection)
        self._writers.append(asyncio.create_task(connection.run(self._backlog, flush_batch=50)))
        return connection, socket

    async def close_all(self) -> None:
        for writer in self._writers:
            writer.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)


@pytest.fixture
async def clients(
    hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics
) -> AsyncIterator[Clients]:
    opened = Clients(hub, backlog, metrics)
    yield opened
    await opened.close_all()


def ids_of(socket: FakeSocket) -> list[str]:
    return [orjson.loads(f)["id"] for f in socket.frames if orjson.loads(f)["type"] != "gap"]


async def test_an_ack_in_time_settles_without_storing(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A v2 client that acknowledges within the batch's wait: delivered, nothing stored."""
    connection, socket = clients.open("alice", v2=True)
    await until(lambda: connection.unacked == 0 and not socket.sending)
    batch = [notification("alice") for _ in range(3)]
    delivering = asyncio.create_task(router.deliver(batch))
    await until(lambda: len(socket.frames) == 3)
    assert ids_of(socket) == [n.message_id for n in batch]
    await connection.acknowledge([n.message_id for n in batch], backlog)
    await delivering
    assert backlog.rows == {}
    assert backlog.deleted == []  # settled in time: no statement at all
    assert connection.unacked == 0


async def test_written_but_unacked_is_stored_and_a_late_ack_deletes_it(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """Not acknowledged within the wait: stored; the ack that comes later deletes the row."""
    connection, socket = clients.open("alice", v2=True)
    n = notification("alice")
    await router.deliver([n])
    assert ids_of(socket) == [n.message_id]
    assert backlog.stored_ids == [n.message_id]
    await connection.acknowledge([n.message_id], backlog)
    assert backlog.rows == {}


async def test_a_v1_write_does_not_count_while_a_v2_connection_is_open(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """With v1 and v2 connections, both get the frame, and it is stored until a v2 ack."""
    _, v1 = clients.open("alice", v2=False)
    _, v2 = clients.open("alice", v2=True)
    n = notification("alice")
    await router.deliver([n])
    assert v1.frames == [n.frame]
    assert ids_of(v2) == [n.message_id]
    assert backlog.stored_ids == [n.message_id]


async def test_a_v1_connection_alone_keeps_written_as_delivered(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """Without a v2 connection of the user, nothing changes for v1: written, not stored."""
    _, v1 = clients.open("alice", v2=False)
    n = notification("alice")
    await router.deliver([n])
    assert v1.frames == [n.frame]
    assert backlog.rows == {}


async def test_the_v2_flush_keeps_rows_until_acked_and_does_not_resend_them(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """Stored rows are sent on connect and stay stored; a later flush does not resend them;
    the ack deletes them."""
    stored = [notification("alice") for _ in range(3)]
    backlog.put(*stored)
    connection, socket = clients.open("alice", v2=True)
    await until(lambda: len(socket.frames) == 3)
    assert backlog.stored_ids == [n.message_id for n in stored]
    connection.request_flush()
    await asyncio.sleep(0.05)
    assert len(socket.frames) == 3
    await connection.acknowledge([stored[0].message_id, stored[1].message_id], backlog)
    assert backlog.stored_ids == [stored[2].message_id]


async def test_the_gap_comes_before_everything_else(clients: Clients, backlog: FakeBacklog) -> None:
    """A v2 connection is told first how many notifications retention dropped, once."""
    backlog.gaps["alice"] = 7
    backlog.put(notification("alice"))
    _, socket = clients.open("alice", v2=True)
    await until(lambda: len(socket.frames) == 2)
    assert orjson.loads(socket.frames[0]) == {"type": "gap", "dropped": 7}
    assert orjson.loads(socket.frames[1])["type"] == "notification"
    assert backlog.gaps == {}


async def test_acking_another_users_ids_changes_nothing(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """Bob acknowledging Alice's stored ids deletes none of her rows."""
    alices = [notification("alice") for _ in range(2)]
    backlog.put(*alices)
    bob, _ = clients.open("bob", v2=True)
    await bob.acknowledge([n.message_id for n in alices], backlog)
    assert backlog.stored_ids == [n.message_id for n in alices]


async def test_a_v2_connection_going_away_stores_what_it_had_not_acked(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """A connection that ends with written, unacked notifications gets them stored at once."""
    connection, socket = clients.open("alice", v2=True)
    await until(lambda: connection.unacked == 0 and not socket.sending)
    n = notification("alice")
    delivering = asyncio.create_task(router.deliver([n]))
    await until(lambda: connection.unacked == 1)
    connection.detach()
    await delivering
    assert backlog.stored_ids == [n.message_id]


class RecordingStatus:
    """A status sink that keeps what it was told, as ``(status, user_id, message_id)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def written(self, notifications: Sequence[Notification]) -> None:
        self.events += [("written", n.user_id, n.message_id) for n in notifications]

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None:
        self.events += [("acked", user_id, m) for m in message_ids]

    def stored(self, notifications: Sequence[Notification]) -> None:
        self.events += [("stored", n.user_id, n.message_id) for n in notifications]

    def expired(self, rows: Iterable[tuple[str, str]]) -> None:
        self.events += [("expired", u, m) for u, m in rows]

    def dead_lettered(self, user_id: str | None, message_id: str | None) -> None:
        self.events.append(("dead_lettered", user_id or "", message_id or ""))

    async def flush(self) -> None:
        return None


async def test_status_events_say_written_for_v1_acked_for_v2_and_stored(
    hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A v1 write reports ``written``; a v2 ack ``acked`` (also for a row deleted late);
    an offline user's notification ``stored``."""
    status = RecordingStatus()
    router = await local_router(
        hub, backlog, metrics, delivery_wait=0.3, ack_wait=0.3, status=status
    )
    sockets: dict[str, FakeSocket] = {}
    connections: dict[str, Connection] = {}
    writers = []
    for user, v2 in (("vera", False), ("alex", True)):
        sockets[user] = FakeSocket()
        connections[user] = Connection(
            sockets[user], Identity(user), metrics, queue_size=10, acks=v2, status=status
        )
        hub.register(connections[user])
        writers.append(asyncio.create_task(connections[user].run(backlog, flush_batch=10)))
    try:
        await until(lambda: all(c._idle for c in connections.values()))
        to_vera, to_alex, to_nobody = notification("vera"), notification("alex"), notification("x")
        delivering = asyncio.create_task(router.deliver([to_vera, to_alex, to_nobody]))
        await until(lambda: connections["alex"].unacked == 1)
        await connections["alex"].acknowledge([to_alex.message_id], backlog)
        await delivering
        assert sorted(status.events) == sorted(
            [
                ("written", "vera", to_vera.message_id),
                ("acked", "alex", to_alex.message_id),
                ("stored", "x", to_nobody.message_id),
            ]
        )
    finally:
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)


async def test_a_client_that_never_acks_is_closed_with_1013_and_loses_nothing(
    router: Router, clients: Clients, backlog: FakeBacklog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the limit of unacknowledged notifications the connection closes with 1013, and
    what it had not acknowledged is stored."""
    monkeypatch.setattr("service.connection.UNACKED_LIMIT", 3)
    connection, socket = clients.open("alice", v2=True)
    sent = [notification("alice") for _ in range(5)]
    await router.deliver(sent)
    assert connection.closed and socket.failed_with is not None
    assert socket.failed_with[0] == 1013
    assert sorted(backlog.stored_ids) == sorted(n.message_id for n in sent)


async def test_an_ack_arriving_while_its_row_is_being_stored_still_deletes_it(
    router: Router, clients: Clients, backlog: FakeBacklog
) -> None:
    """The ack's own delete runs before the insert; the router deletes the row once stored."""
    connection, socket = clients.open("alice", v2=True)
    await until(lambda: connection.unacked == 0 and not socket.sending)
    backlog.save_gate = asyncio.Event()
    n = notification("alice")
    delivering = asyncio.create_task(router.deliver([n]))
    await until(lambda: backlog.save_attempts == 1)  # the budget ran out: being stored
    await connection.acknowledge([n.message_id], backlog)
    assert backlog.rows == {}, "nothing stored yet: the ack's delete found nothing"
    backlog.save_gate.set()
    await delivering
    assert backlog.rows == {}, "stored, then deleted again: the client has it"


async def test_late_acks_of_several_users_cost_one_statement(
    hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics
) -> None:
    """Rows stored because their acks came late, for two users on two connections, are
    deleted together in one statement, and the in-time ack costs none."""
    acked_rows = AckedRows(backlog, window=0.05)
    await acked_rows.start()
    router = await local_router(
        hub, backlog, metrics, delivery_wait=0.05, ack_wait=0.05, acked_rows=acked_rows
    )
    sockets: dict[str, FakeSocket] = {}
    connections: dict[str, Connection] = {}
    writers = []
    for user in ("alice", "bob"):
        sockets[user] = FakeSocket()
        connections[user] = Connection(
            sockets[user], Identity(user), metrics, queue_size=10, acks=True, acked_rows=acked_rows
        )
        hub.register(connections[user])
        writers.append(asyncio.create_task(connections[user].run(backlog, flush_batch=50)))
    try:
        await until(lambda: all(c.unacked == 0 for c in connections.values()))
        late = [notification("alice"), notification("bob")]
        await router.deliver(late)  # nobody acked within the wait: both stored
        assert sorted(backlog.stored_ids) == sorted(n.message_id for n in late)
        for n in late:
            await connections[n.user_id].acknowledge([n.message_id], backlog)
        await acked_rows.flush()
        assert backlog.rows == {}
        assert backlog.pair_statements == 1 and backlog.deleted == []

        in_time = notification("alice")
        delivering = asyncio.create_task(router.deliver([in_time]))
        await until(lambda: connections["alice"].unacked == 1)
        await connections["alice"].acknowledge([in_time.message_id], backlog)
        await delivering
        await acked_rows.flush()
        assert backlog.pair_statements == 1, "an ack in time touched the store"
    finally:
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        await acked_rows.close()
