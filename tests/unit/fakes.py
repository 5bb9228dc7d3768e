"""In-memory stand-ins for what the router, a connection and a node talk to.

Each fake does just enough to exercise one contract of ``service``: the backlog
keeps rows in the order PostgreSQL would return them, the socket records frames
and can be made to hang or to fail like a real peer that went away; a node's
parts (store, hub, broker, consumer, authenticator, socket) record what is done
to them, in order, in one ``Events`` list.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from service.auth import Identity
from service.broker import MemoryBroker
from service.connection import Stored
from service.delivery import Delivery
from service.hub import Hub
from service.metrics import Metrics
from service.notification import Notification
from service.router import (
    Backlog,
    BrokerUnavailable,
    Outlet,
    Router,
    Settlement,
    StoreUnavailable,
)
from service.store import OnDeleted

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def notification(user_id: str = "alice", text: str = "", *, created_ms: int = 0) -> Notification:
    """A push notification for ``user_id`` with a fresh message id."""
    message_id = str(uuid.uuid4())
    title = text or f"title {message_id[:8]}"
    return Notification.build(message_id, user_id, title, f"body of {title}", created_ms)


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until ``condition()`` holds; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


class Settled(Settlement):
    """A dispatched batch's settlement that the test completes (at once unless ``pending``)."""

    __slots__ = ("future",)

    def __init__(self, *, pending: bool = False) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        super().__init__(self.future)
        if not pending:
            self.future.set_result(None)

    def settle(self) -> None:
        self.future.set_result(None)


async def local_router(
    hub: Hub[Outlet],
    backlog: Backlog,
    metrics: Metrics,
    broker: MemoryBroker | None = None,
    **options: Any,
) -> Router:
    """A router on the memory broker over ``hub`` (a fresh one unless given), as
    ``service.node.build_parts`` wires it when ``REDIS_URL`` is empty."""
    broker = broker or MemoryBroker(hub)
    router = Router(hub, backlog, metrics, broker=broker, **options)
    await broker.start(router)
    return router


class FakeBacklog:
    """The backlog store in memory: rows ordered like ``(created_at, seq)``, one per
    ``(user_id, message_id)`` as PostgreSQL's key.

    ``unavailable = True`` makes every call raise StoreUnavailable; ``save_gate``,
    when set to an unset event, makes ``save`` wait for it before storing.
    """

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Stored] = {}
        self._seq = 0
        self.unavailable = False
        self.save_gate: asyncio.Event | None = None
        self.save_attempts = 0
        self.deleted: list[tuple[str, str]] = []
        self.pair_statements = 0
        # Rows retention dropped, per user (protocol v2 gaps).
        self.gaps: dict[str, int] = {}

    def _check(self) -> None:
        if self.unavailable:
            raise StoreUnavailable("connection refused")

    def put(self, *notifications: Notification) -> None:
        """Store rows directly, as if saved earlier (test setup)."""
        for n in notifications:
            self._seq += 1
            key = (n.user_id, n.message_id)
            self.rows[key] = Stored(n, (EPOCH + timedelta(seconds=self._seq), self._seq))

    @property
    def stored_ids(self) -> list[str]:
        return [s.notification.message_id for s in self._ordered()]

    def _ordered(self) -> list[Stored]:
        return sorted(self.rows.values(), key=lambda s: s.cursor)

    async def save(self, notifications: Sequence[Notification]) -> int:
        self.save_attempts += 1
        self._check()
        if self.save_gate is not None:
            await self.save_gate.wait()
            self._check()
        fresh: dict[tuple[str, str], Notification] = {}
        for n in notifications:
            key = (n.user_id, n.message_id)
            if key not in self.rows:
                fresh.setdefault(key, n)
        self.put(*fresh.values())
        return len(fresh)

    async def fetch(
        self, user_id: str, after: tuple[datetime, int] | None, limit: int
    ) -> list[Stored]:
        self._check()
        rows = [s for s in self._ordered() if s.notification.user_id == user_id]
        if after is not None:
            rows = [s for s in rows if s.cursor > after]
        return rows[:limit]

    async def delete(self, user_id: str, message_ids: Sequence[str]) -> None:
        self._check()
        for message_id in message_ids:
            self.rows.pop((user_id, message_id), None)
            self.deleted.append((user_id, message_id))

    async def delete_acked(self, user_id: str, message_ids: Sequence[str]) -> list[str]:
        self._check()
        gone = [m for m in message_ids if self.rows.pop((user_id, m), None) is not None]
        self.deleted.extend((user_id, m) for m in message_ids)
        return gone

    async def delete_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Rows of any users in one statement (counted in ``pair_statements``)."""
        self._check()
        self.pair_statements += 1
        return [pair for pair in pairs if self.rows.pop(pair, None) is not None]

    async def take_gap(self, user_id: str) -> int:
        self._check()
        return self.gaps.pop(user_id, 0)


class FakeOutlet:
    """A live connection as the router sees it, settling each delivery on the next loop turn.

    ``mode`` is ``"write"`` (written), ``"drop"`` (accepted, then given up),
    ``"refuse"`` (``offer`` returns False, as a closed connection does),
    ``"hold"`` (kept until ``release()`` writes them) or
    ``"now"`` (written at once by ``write_now``; the others always queue).
    """

    acks = False  # a v1 client

    def __init__(self, user_id: str, mode: str = "write") -> None:
        self._user_id = user_id
        self.mode = mode
        self.frames: list[str] = []
        self.flush_requests = 0
        self.held: list[Delivery] = []

    @property
    def user_id(self) -> str:
        return self._user_id

    def release(self) -> None:
        """Write and settle the deliveries held so far."""
        held, self.held = self.held, []
        for delivery in held:
            self.frames.append(delivery.notification.frame)
            delivery.settle(True)

    def write_now(self, notification: Notification) -> bool:
        if self.mode != "now":
            return False
        self.frames.append(notification.frame)
        return True

    def offer(self, delivery: Delivery) -> bool:
        if self.mode == "refuse":
            return False
        if self.mode == "hold":
            self.held.append(delivery)
            return True
        loop = asyncio.get_running_loop()
        if self.mode == "write":
            self.frames.append(delivery.notification.frame)
            loop.call_soon(delivery.settle, True)
        else:
            loop.call_soon(delivery.settle, False)
        return True

    def request_flush(self) -> None:
        self.flush_requests += 1


def payloads(frames: bytes) -> list[str]:
    """The texts of the complete server frames (unmasked, FIN, text) in ``frames``."""
    texts: list[str] = []
    at = 0
    while at < len(frames):
        assert frames[at] == 0x81, "a server text frame"
        length, at = frames[at + 1], at + 2
        if length == 126:
            length, at = int.from_bytes(frames[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(frames[at : at + 8], "big"), at + 8
        texts.append(frames[at : at + length].decode())
        at += length
    return texts


class PeerGone(Exception):
    """What a send on a failed socket raises (websockets' ConnectionClosed in production)."""


class FakeSocket:
    """A WebSocket that records what is sent and how it was closed.

    ``hold()`` makes sends hang until ``release()``; ``fail_sends`` makes every
    send raise; ``close`` and ``fail_connection`` end hanging sends with an error,
    as a real WebSocket does once it is closing.
    """

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.closed_with: tuple[int, str] | None = None
        self.failed_with: tuple[int, str] | None = None
        self.fail_sends = False
        self.buffered_bytes = 0
        self.sending = 0
        self.stall: Callable[[], object] | None = None
        self._open = asyncio.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def send(self, frames: bytes) -> None:
        self.sending += 1
        try:
            await self._open.wait()
        finally:
            self.sending -= 1
        if self.fail_sends or self.failed_with is not None or self.closed_with is not None:
            raise PeerGone("connection lost")
        self.frames += payloads(frames)

    def buffered(self) -> int:
        return self.buffered_bytes

    def on_stall(self, callback: Callable[[], object]) -> None:
        self.stall = callback

    def send_now(self, frames: bytes) -> bool:
        """The fast path: takes the frame at once unless held, failing or closed."""
        if not self._open.is_set() or self.fail_sends:
            return False
        if self.failed_with is not None or self.closed_with is not None:
            return False
        self.frames += payloads(frames)
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.release()

    def fail_connection(self, code: int = 1006, reason: str = "") -> None:
        self.failed_with = (code, reason)
        self.release()


# --- the parts of a node, recording what is done to them, in order -------------------------


class Events(list[tuple[str, ...]]):
    """What happened to a node's fake parts, in order: ``("subscribe", "alice")``, ..."""


class FakeStore(FakeBacklog):
    """The store as the node uses it: the backlog, plus a lifecycle and the retention calls.

    Retention finds nothing to expire, and its cap check waits until it is
    cancelled (a retention statement under way when the node stops).
    """

    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events

    async def start(self) -> None:
        self.events.append(("store start",))

    async def close(self) -> None:
        self.events.append(("store close",))

    async def ping(self) -> None:
        self._check()

    async def save(self, notifications: Sequence[Notification]) -> int:
        added = await super().save(notifications)
        self.events.append(("store save", *sorted(n.user_id for n in notifications)))
        return added

    async def fetch(
        self, user_id: str, after: tuple[datetime, int] | None, limit: int
    ) -> list[Stored]:
        self.events.append(("store fetch", user_id))
        return await super().fetch(user_id, after, limit)

    async def expire(
        self, ttl_seconds: float, batch: int, on_deleted: OnDeleted | None = None
    ) -> AsyncGenerator[int, None]:
        return
        yield 0

    async def cap(
        self,
        max_per_user: int,
        user_ids: Collection[str] | None,
        batch: int,
        on_deleted: OnDeleted | None = None,
    ) -> AsyncGenerator[int, None]:
        try:
            await asyncio.Event().wait()
        finally:
            self.events.append(("retention stopped",))
        yield 0


class RecordingHub(Hub[Outlet]):
    """The real hub, recording registrations."""

    def __init__(self, events: Events, *, max_per_user: int = 10, max_total: int = 100) -> None:
        super().__init__(max_per_user=max_per_user, max_total=max_total)
        self.events = events

    def register(self, peer: Outlet) -> None:
        super().register(peer)
        self.events.append(("register", peer.user_id))

    def unregister(self, peer: Outlet) -> None:
        super().unregister(peer)
        self.events.append(("unregister", peer.user_id))


class RecordingBroker(MemoryBroker):
    """The memory broker, recording subscriptions and its lifecycle; ``refs`` per user.

    ``unavailable = True`` makes ``subscribe`` fail as with Redis down.
    """

    def __init__(self, hub: Hub[Outlet], events: Events) -> None:
        super().__init__(hub)
        self.events = events
        self.refs: dict[str, int] = {}
        self.unavailable = False

    async def subscribe(self, user_id: str, wait: float = 5.0) -> None:
        if self.unavailable:
            raise BrokerUnavailable("subscribe failed: TimeoutError")
        self.refs[user_id] = self.refs.get(user_id, 0) + 1
        self.events.append(("subscribe", user_id))

    def unsubscribe(self, user_id: str) -> None:
        self.refs[user_id] -= 1
        if not self.refs[user_id]:
            del self.refs[user_id]
        self.events.append(("unsubscribe", user_id))

    async def drain(self, grace: float) -> None:
        self.events.append(("broker drain",))
        await super().drain(grace)

    async def close(self) -> None:
        self.events.append(("broker close",))
        await super().close()


class FakeConsumer:
    """A consumer that consumes nothing: only its start and stop are recorded."""

    task: asyncio.Task[None] | None = None
    healthy = True
    dead_letter_healthy = True

    def __init__(self, events: Events) -> None:
        self.events = events

    def start(self) -> None:
        self.events.append(("consumer start",))

    async def stop(self, grace: float) -> None:
        self.events.append(("consumer stop",))


class FakeAuth:
    """Every token is the user id it names."""

    def __init__(self, events: Events) -> None:
        self.events = events

    async def identify(self, token: str) -> Identity:
        return Identity(token)

    async def close(self) -> None:
        self.events.append(("auth close",))


class RecordingSocket(FakeSocket):
    """A fake socket whose close is recorded among the node's events."""

    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.events.append(("socket close", str(code)))
        await super().close(code, reason)
