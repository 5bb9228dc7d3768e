"""In-memory stand-ins for what the router and a connection talk to: the store and the socket.

Each fake does just enough to exercise one contract of ``service``: the backlog
keeps rows in the order PostgreSQL would return them, the socket records frames
and can be made to hang or to fail like a real peer that went away.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from service.connection import Stored
from service.delivery import Delivery
from service.notification import Notification
from service.router import StoreUnavailable

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


class FakeOutlet:
    """A live connection as the router sees it, settling each delivery on the next loop turn.

    ``mode`` is ``"write"`` (written), ``"drop"`` (accepted, then given up),
    ``"refuse"`` (``offer`` returns False, as a closed connection does) or
    ``"now"`` (written at once by ``write_now``; the others always queue).
    """

    def __init__(self, user_id: str, mode: str = "write") -> None:
        self._user_id = user_id
        self.mode = mode
        self.frames: list[str] = []
        self.flush_requests = 0

    @property
    def user_id(self) -> str:
        return self._user_id

    def write_now(self, notification: Notification) -> bool:
        if self.mode != "now":
            return False
        self.frames.append(notification.frame)
        return True

    def offer(self, delivery: Delivery) -> bool:
        if self.mode == "refuse":
            return False
        loop = asyncio.get_running_loop()
        if self.mode == "write":
            self.frames.append(delivery.notification.frame)
            loop.call_soon(delivery.settle, True)
        else:
            loop.call_soon(delivery.settle, False)
        return True

    def request_flush(self) -> None:
        self.flush_requests += 1


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

    async def send(self, message: str) -> None:
        self.sending += 1
        try:
            await self._open.wait()
        finally:
            self.sending -= 1
        if self.fail_sends or self.failed_with is not None or self.closed_with is not None:
            raise PeerGone("connection lost")
        self.frames.append(message)

    def buffered(self) -> int:
        return self.buffered_bytes

    def on_stall(self, callback: Callable[[], object]) -> None:
        self.stall = callback

    def send_now(self, message: str) -> bool:
        """The fast path: takes the frame at once unless held, failing or closed."""
        if not self._open.is_set() or self.fail_sends:
            return False
        if self.failed_with is not None or self.closed_with is not None:
            return False
        self.frames.append(message)
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self.release()

    def fail_connection(self, code: int = 1006, reason: str = "") -> bool:
        self.failed_with = (code, reason)
        self.release()
        return True
