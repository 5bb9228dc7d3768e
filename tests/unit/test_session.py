"""A connected client without a network: its token's clock, and what a v1 or v2 client says.

The clock runs against a fake connection that records what it was told; a session takes
client frames from a fake source (which holds them as a socket does) into a real
``Connection`` over a fake socket and an in-memory backlog.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

import orjson
import pytest

from service.auth import AuthUnavailable, Identity, InvalidToken
from service.closecode import CloseCode
from service.connection import Connection
from service.inbound import BadFrame
from service.metrics import Metrics
from service.session import Session, TokenClock, apply_acked
from service.status import NoStatus

from .fakes import FakeBacklog, FakeSocket, notification, until

# --- the token's clock -----------------------------------------------------------------------


class ClockedConnection:
    """Records the clock's closes and control frames, with the time they came."""

    def __init__(self) -> None:
        self.aborted: list[tuple[CloseCode, str | None, float]] = []
        self.frames: list[tuple[dict[str, object], float]] = []

    def abort(self, code: CloseCode, reason: str | None = None) -> None:
        self.aborted.append((code, reason, time.time()))

    def send_control(self, frame: str) -> None:
        self.frames.append((orjson.loads(frame), time.time()))


async def test_expiring_never_tells_a_token_with_time_left_zero_seconds() -> None:
    """A token with under two seconds left is told ``in_s`` 1 (rounded up), not 0, before exp."""
    connection = ClockedConnection()
    clock = TokenClock(connection, v2=True)
    expires_at = time.time() + 0.6
    clock.arm(expires_at, close=True)
    await until(lambda: bool(connection.aborted), timeout=5)
    [(frame, told_at)] = connection.frames
    assert frame == {"type": "expiring", "in_s": 1}
    assert told_at < expires_at
    [(code, reason, _)] = connection.aborted
    assert (code, reason) == (CloseCode.UNAUTHORIZED, "token expired")


async def test_expiring_tells_at_most_a_minute_in_whole_seconds() -> None:
    """A long token is warned 60 s ahead: the frame says 60, and nothing comes early."""
    connection = ClockedConnection()
    clock = TokenClock(connection, v2=True)
    clock.arm(time.time() + 3600, close=True)
    await asyncio.sleep(0.05)
    assert connection.frames == [] and connection.aborted == []
    clock.cancel()


async def test_a_v1_connection_is_never_warned_only_closed_at_exp() -> None:
    """v1 has no ``expiring`` frame: the connection is closed with 4401 at exp, nothing before."""
    connection = ClockedConnection()
    TokenClock(connection, v2=False).arm(time.time() + 0.2, close=True)
    await until(lambda: bool(connection.aborted), timeout=5)
    assert connection.frames == []


async def test_rearming_replaces_the_old_tokens_timers() -> None:
    """After a refresh to a token without exp, the old exp neither warns nor closes."""
    connection = ClockedConnection()
    clock = TokenClock(connection, v2=True)
    clock.arm(time.time() + 0.3, close=True)
    clock.arm(None, close=True)
    await asyncio.sleep(0.5)
    assert connection.frames == [] and connection.aborted == []


async def test_without_close_on_expiry_the_connection_outlives_its_token() -> None:
    """``AUTH_CLOSE_ON_EXPIRY=false``: a v2 client is still warned, and never closed."""
    connection = ClockedConnection()
    TokenClock(connection, v2=True).arm(time.time() + 0.2, close=False)
    await until(lambda: bool(connection.frames), timeout=5)
    await asyncio.sleep(0.3)
    assert connection.aborted == []


# --- a session -------------------------------------------------------------------------------


class Auth:
    """Tokens are user ids; ``expired-…`` are expired, ``bad`` invalid, ``down`` unanswered."""

    async def identify(self, token: str) -> Identity:
        if token == "bad":
            raise InvalidToken("bad signature")
        if token == "down":
            raise AuthUnavailable("timeout")
        if token.startswith("expired-"):
            return Identity(token.removeprefix("expired-"), time.time() - 1)
        return Identity(token, time.time() + 30.4)

    async def close(self) -> None:
        return None


class Source:
    """A socket's side of a session: hands messages to its listener unless held."""

    def __init__(self) -> None:
        self.listener: Callable[[str | bytes], object] | None = None
        self.held = False
        self.waiting: deque[str | bytes] = deque()

    def listen(self, listener: Callable[[str | bytes], object]) -> None:
        self.listener = listener
        self.release()

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        while self.waiting and not self.held and self.listener is not None:
            self.listener(self.waiting.popleft())


class Client:
    """One client: its frames go to the session through a source; what it gets is recorded."""

    def __init__(self, connection: Connection, socket: FakeSocket, session: Session) -> None:
        self.connection = connection
        self.socket = socket
        self.session = session
        self.source = Source()
        self.left = False
        self.reading: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None

    def says(self, *messages: str | bytes | None) -> None:
        """Send ``messages``; None: leave (the socket is lost, the session closed)."""
        for message in messages:
            if message is None:
                self.left = True
                self.session.close()
                return
            self.source.waiting.append(message)
            if not self.source.held:
                self.source.release()

    def frames(self) -> list[dict[str, object]]:
        return [orjson.loads(f) for f in self.socket.frames]

    async def gone(self) -> None:
        """Until the client left or the connection closed (as a socket's loss ends it)."""
        await until(lambda: self.left or self.connection.closed, timeout=5)
        self.session.close()


@pytest.fixture
async def opened() -> AsyncIterator[list[Client]]:
    """The clients a test opens; each is taken apart at the end (its writer ends by itself)."""
    clients: list[Client] = []
    yield clients
    for client in clients:
        client.connection.detach()
        for task in (client.reading, client.writer):
            if task is not None:
                task.cancel()


def open_client(
    clients: list[Client],
    metrics: Metrics,
    backlog: FakeBacklog,
    *,
    v2: bool,
    user_id: str = "alice",
    expires_at: float | None = None,
    frame_rate: int = 20,
) -> tuple[Client, asyncio.Task[None]]:
    socket = FakeSocket()
    connection = Connection(socket, Identity(user_id, expires_at), metrics, queue_size=100, acks=v2)
    writer = asyncio.create_task(connection.run(backlog, flush_batch=50))
    session = Session(
        connection,
        auth=Auth(),
        store=backlog,
        metrics=metrics,
        frame_rate=frame_rate,
        close_on_expiry=True,
    )
    client = Client(connection, socket, session)
    client.writer = writer
    clients.append(client)
    session.start(client.source)
    client.reading = asyncio.create_task(client.gone())
    return client, client.reading


async def test_a_v1_client_is_read_and_ignored_until_it_leaves(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """Whatever a v1 client sends changes nothing and gets no answer; leaving ends the read."""
    client, reading = open_client(opened, metrics, backlog, v2=False)
    client.says('{"type":"ack","ids":[]}', b"\x00binary", None)
    await asyncio.wait_for(reading, 5)
    assert client.socket.frames == [] and client.socket.failed_with is None


async def test_a_v2_ack_deletes_the_stored_rows_it_names(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """An ack of stored rows deletes them; another user's rows with those ids stay."""
    mine, theirs = notification("alice"), notification("bob")
    backlog.put(mine, theirs)
    client, reading = open_client(opened, metrics, backlog, v2=True)
    await until(lambda: len(client.socket.frames) == 1)
    ids = [mine.message_id, theirs.message_id]
    client.says(orjson.dumps({"type": "ack", "ids": ids}).decode())
    await until(lambda: backlog.stored_ids == [theirs.message_id])
    client.says(None)
    await asyncio.wait_for(reading, 5)


async def test_a_bad_v2_frame_is_answered_and_the_connection_stays(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """A frame that is not the protocol's gets ``error`` ``bad_frame`` and changes nothing."""
    client, reading = open_client(opened, metrics, backlog, v2=True)
    client.says('{"type":"subscribe"}')
    await until(lambda: len(client.socket.frames) == 1)
    [frame] = client.frames()
    assert frame["type"] == "error" and frame["code"] == "bad_frame"
    assert not client.connection.closed
    client.says(None)
    await asyncio.wait_for(reading, 5)


async def test_a_binary_v2_frame_closes_with_1008(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """v2 is text only: a binary frame closes the connection with 1008."""
    client, reading = open_client(opened, metrics, backlog, v2=True)
    client.says(b"\x01")
    await asyncio.wait_for(reading, 5)
    assert client.socket.failed_with == (1008, "binary frames are not accepted")


async def test_a_flood_of_v2_frames_closes_with_1008_and_is_counted(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """Past the burst (twice ``CLIENT_FRAME_RATE``) the client is closed and counted."""
    client, reading = open_client(opened, metrics, backlog, v2=True, frame_rate=2)
    client.says(*['{"type":"x"}'] * 10)
    await asyncio.wait_for(reading, 5)
    assert client.socket.failed_with == (1008, "too many client frames")
    assert metrics.connections_rejected.labels("client_frame_rate")._value.get() == 1


@pytest.mark.parametrize(
    ("token", "code"),
    [("bad", "invalid_token"), ("expired-alice", "invalid_token"), ("down", "unavailable")],
)
async def test_a_refresh_that_cannot_be_taken_is_answered_and_changes_nothing(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog, token: str, code: str
) -> None:
    """An invalid or expired token, or one that cannot be checked now, is an ``error``
    frame; the connection stays open on its current token."""
    client, reading = open_client(opened, metrics, backlog, v2=True)
    client.says(orjson.dumps({"type": "refresh", "token": token}).decode())
    await until(lambda: len(client.socket.frames) == 1)
    [frame] = client.frames()
    assert (frame["type"], frame["code"]) == ("error", code)
    assert token not in str(frame["message"])
    assert not client.connection.closed
    client.says(None)
    await asyncio.wait_for(reading, 5)


async def test_a_refresh_moves_the_connection_past_its_old_exp(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """A good refresh is answered ``refreshed`` with its lifetime in whole seconds rounded
    up, and the old token's exp closes nothing."""
    client, reading = open_client(opened, metrics, backlog, v2=True, expires_at=time.time() + 1.0)
    client.says('{"type":"refresh","token":"alice"}')
    await until(lambda: any(f["type"] == "refreshed" for f in client.frames()))
    assert {"type": "refreshed", "expires_in_s": 31} in client.frames()
    await asyncio.sleep(1.3)
    assert client.socket.failed_with is None
    client.says(None)
    await asyncio.wait_for(reading, 5)


async def test_a_refresh_with_another_users_token_closes_with_4403(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """A connection never changes user: another user's token closes it with 4403."""
    client, reading = open_client(opened, metrics, backlog, v2=True)
    client.says('{"type":"refresh","token":"mallory"}')
    await asyncio.wait_for(reading, 5)
    assert client.socket.failed_with == (4403, "token of another user")


async def test_frames_behind_a_refresh_wait_for_its_answer_and_keep_their_order(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """A frame sent right behind a refresh is answered after the refresh, not before."""
    client, reading = open_client(opened, metrics, backlog, v2=True)
    client.says('{"type":"refresh","token":"alice"}', '{"type":"subscribe"}')
    await until(lambda: len(client.socket.frames) == 2)
    assert [f["type"] for f in client.frames()] == ["refreshed", "error"]
    client.says(None)
    await asyncio.wait_for(reading, 5)


async def test_leaving_stops_the_tokens_clock(
    opened: list[Client], metrics: Metrics, backlog: FakeBacklog
) -> None:
    """A client that left is not closed again at its token's exp."""
    client, reading = open_client(opened, metrics, backlog, v2=False, expires_at=time.time() + 0.3)
    client.says(None)
    await asyncio.wait_for(reading, 5)
    await asyncio.sleep(0.5)
    assert client.socket.failed_with is None


# --- the acked parameter ---------------------------------------------------------------------


class Acked(NoStatus):
    """A status sink that keeps the acknowledgements it is told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, list[str]]] = []

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None:
        self.told.append((user_id, list(message_ids)))


async def test_the_acked_parameter_deletes_the_users_rows_and_reports_them(
    backlog: FakeBacklog,
) -> None:
    """Ids given on connect are deleted from the user's rows (only theirs) and reported acked."""
    mine, theirs = notification("alice"), notification("bob")
    backlog.put(mine, theirs)
    status = Acked()
    raw = f"{mine.message_id},{theirs.message_id}"
    await apply_acked(raw, "alice", backlog, status)
    assert backlog.stored_ids == [theirs.message_id]
    assert status.told == [("alice", [mine.message_id])]


async def test_a_malformed_acked_parameter_deletes_nothing(backlog: FakeBacklog) -> None:
    """A parameter that is not a list of UUIDs raises BadFrame before any row is touched."""
    kept = notification("alice")
    backlog.put(kept)
    with pytest.raises(BadFrame):
        await apply_acked(f"{kept.message_id},not-an-id", "alice", backlog, Acked())
    assert backlog.stored_ids == [kept.message_id]


async def test_a_store_that_is_down_only_leaves_the_acked_rows(backlog: FakeBacklog) -> None:
    """With the store down the parameter is not applied, and the connection goes on."""
    backlog.unavailable = True
    await apply_acked(str(uuid.uuid4()), "alice", backlog, Acked())
