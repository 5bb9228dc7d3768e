"""Routing: each notification goes to every live connection of its user, or to the store.

The router is where the delivery guarantee is kept. :meth:`Router.deliver`
returns only when every notification it was given has been written to at least
one socket or saved in the backlog store; the consumer commits Kafka offsets
after that and never before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from .hub import Hub
from .metrics import Metrics
from .notification import Notification

log = logging.getLogger("notify.router")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Stored:
    """A notification read back from the store, with its place in the user's backlog."""

    notification: Notification
    cursor: tuple[datetime, int]


class StoreUnavailable(Exception):
    """The backlog store could not be reached; the operation may be retried."""


class BrokerUnavailable(Exception):
    """The cross-process broker (Redis) could not be reached; the operation may be retried."""


class Broker(Protocol):
    """What the router needs of the fan-out between processes (``service.broker``).

    Two implementations, one code path: ``RedisBroker`` (several processes) and
    ``MemoryBroker`` (one process, where publishing is local delivery). Either
    hands what it received to :meth:`Router.receive` and acknowledgements to
    :meth:`Router.acknowledged`.
    """

    async def publish(self, notifications: Sequence[Notification]) -> list[int]:
        """Publish each to its user's channel; how many processes received each.

        Raises BrokerUnavailable.
        """
        ...

    async def publish_flush(self, user_ids: Iterable[str]) -> None:
        """Ask the processes holding these users to re-read the store. Raises BrokerUnavailable."""
        ...

    async def acknowledge(self, by_origin: dict[bytes, list[str]]) -> None:
        """Tell publishers these notifications were written or stored. Raises BrokerUnavailable."""
        ...


class Backlog(Protocol):
    """What the router needs of the persistent store of undelivered notifications."""

    async def save(self, notifications: Sequence[Notification]) -> int:
        """Store notifications; one already stored for its user (same message_id) is ignored.

        The same message_id for two users is two rows. Returns how many rows were
        new. Raises StoreUnavailable.
        """
        ...

    async def fetch(
        self, user_id: str, after: tuple[datetime, int] | None, limit: int
    ) -> list[Stored]:
        """The user's stored rows after ``after``, oldest first. Raises StoreUnavailable."""
        ...

    async def delete(self, user_id: str, message_ids: Sequence[str]) -> None:
        """Remove notifications delivered to ``user_id``; other users' rows with the same
        ids stay. Raises StoreUnavailable.
        """
        ...


class Outlet(Protocol):
    """What the router needs of one live connection."""

    @property
    def user_id(self) -> str: ...

    def write_now(self, notification: Notification) -> bool:
        """Write the frame at once if that needs no waiting; False: use ``offer``."""
        ...

    def offer(self, delivery: Delivery) -> bool:
        """Queue a delivery; False if the connection is closed or just overflowed."""
        ...

    def request_flush(self) -> None:
        """Ask the connection to re-read the store at its next turn."""
        ...

    def seen(self, message_id: str) -> bool:
        """Whether this connection already wrote ``message_id``."""
        ...

    async def write(self, frame: str) -> None:
        """Write one frame now (only from the connection's own writer)."""
        ...

    def mark_written(self, notification: Notification) -> None:
        """Book a frame ``write`` handed to the socket."""
        ...


class Batch:
    """Tracks the queued deliveries of one consumer batch until each is settled.

    Settled means written to a socket, or given up by every connection it was
    queued on (closed, overflowed, too slow); the latter are collected in
    ``unwritten`` to be stored.
    """

    __slots__ = ("_deliveries", "_done", "_pending", "unwritten")

    def __init__(self) -> None:
        self._pending = 0
        self._done: asyncio.Future[None] | None = None
        self._deliveries: list[Delivery] = []
        self.unwritten: list[Notification] = []

    def _add(self, delivery: Delivery) -> None:
        self._pending += 1
        self._deliveries.append(delivery)

    def _settle(self, notification: Notification, written: bool) -> None:
        if not written:
            self.unwritten.append(notification)
        self._pending -= 1
        if self._pending == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def wait(self, budget: float) -> list[Notification]:
        """Wait up to ``budget`` seconds for every delivery to settle.

        Returns what must be stored: the deliveries given up, and those still
        queued when the budget ran out (a slow socket must not hold up everyone
        else's notifications; if it writes them later, they arrive twice at worst).
        """
        if self._pending:
            self._done = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._done, budget)
            except TimeoutError:
                late = [d.notification for d in self._deliveries if not d.settled]
                return self.unwritten + late
        return self.unwritten


class Delivery:
    """One notification on its way to the live connections of its user.

    Each connection it is queued on settles it exactly once; when the last one
    has, the batch learns whether any of them wrote it.
    """

    __slots__ = ("_batch", "_remaining", "_written", "notification")

    def __init__(
        self, notification: Notification, batch: Batch, fanout: int, *, written: bool = False
    ) -> None:
        self.notification = notification
        self._batch = batch
        self._remaining = fanout
        self._written = written

    @property
    def settled(self) -> bool:
        return self._remaining <= 0

    def settle(self, written: bool) -> None:
        """Record the outcome on one connection. Safe to call once per connection."""
        self._written = self._written or written
        self._remaining -= 1
        if self._remaining == 0:
            self._batch._settle(self.notification, self._written)


class Router:
    """Sends notifications to live connections and keeps the rest in the backlog.

    Every notification is published through the broker to its user's channel,
    and each process that holds a connection of the user delivers it through
    :meth:`receive` and acknowledges it; with one process (the memory broker)
    that is this router, called back at once.

    ``deliver`` is called by one consumer at a time; ``flush_backlog`` by each
    connection's writer; ``receive``, ``flush_hint`` and ``resync`` by the broker.
    """

    def __init__(
        self,
        hub: Hub[Outlet],
        backlog: Backlog,
        metrics: Metrics,
        *,
        broker: Broker,
        ack_timeout: float = 15.0,
        delivery_wait: float = 0.2,
        flush_batch: int = 200,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
    ) -> None:
        self._hub = hub
        self._backlog = backlog
        self._metrics = metrics
        self._broker = broker
        self._ack_timeout = ack_timeout
        self._delivery_wait = delivery_wait
        self._awaiting: dict[str, int] = {}
        self._all_acked: asyncio.Future[None] | None = None
        self._flush_batch = flush_batch
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.store_healthy = True
        self.broker_healthy = True
        self._stored_users: set[str] = set()
        self._receiving: set[asyncio.Task[None]] = set()

    def take_stored_users(self) -> set[str]:
        """Users with rows stored since the last call (for the per-user cap)."""
        users, self._stored_users = self._stored_users, set()
        return users

    async def deliver(self, notifications: Sequence[Notification]) -> None:
        """Deliver each notification live, or store it.

        Returns when each one was written to at least one socket here, or handed
        to at least one process through the broker, or is in the store. While the
        store or the broker is down it retries with backoff and does not return:
        the caller must not commit past these notifications, and cancelling it is
        safe (nothing is acknowledged).
        """
        unwritten = await self._publish(self._broker, notifications)
        if unwritten:
            await self.store(unwritten)

    async def _publish(
        self, broker: Broker, notifications: Sequence[Notification]
    ) -> list[Notification]:
        """Publish to the users' channels and wait for every receiver to acknowledge.

        Returns what no process received, and what a receiver did not acknowledge
        within the ack timeout (it may have died): both are stored by the caller.
        """
        # Acknowledgements can overtake the PUBLISH replies (a receiver in this very
        # process, say): count them from before publishing, down from zero.
        awaiting = self._awaiting
        for notification in notifications:
            awaiting[notification.message_id] = 0
        counts = await self._retry("broker", lambda: broker.publish(notifications))
        # By message_id, as receivers acknowledge; one id may be several users' notifications.
        unreached: list[Notification] = []
        for notification, count in zip(notifications, counts, strict=True):
            if count:
                awaiting[notification.message_id] += count
            else:
                unreached.append(notification)
        for key in [key for key, left in awaiting.items() if left <= 0]:
            del awaiting[key]
        if not awaiting:  # nothing to wait for: no receiver, or every one acknowledged
            return unreached  # before its PUBLISH reply came back
        self._all_acked = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._all_acked), self._ack_timeout)
        except TimeoutError:
            left = self._awaiting
            missing = [
                n
                for n, count in zip(notifications, counts, strict=True)
                if count and n.message_id in left
            ]
            log.warning("ack_timeout", extra={"unacknowledged": len(missing)})
            self._metrics.ack_timeouts.inc(len(missing))
            unreached += missing
        finally:
            self._awaiting.clear()
            self._all_acked = None
        return unreached

    def acknowledged(self, message_ids: list[str]) -> None:
        """A receiver wrote or stored these notifications that this process published."""
        awaiting = self._awaiting
        for key in message_ids:
            left = awaiting.get(key)
            if left is None:
                continue  # late: already timed out and stored
            if left == 1:
                del awaiting[key]
            else:
                awaiting[key] = left - 1  # below zero while its PUBLISH reply is due
        if not awaiting and self._all_acked is not None and not self._all_acked.done():
            self._all_acked.set_result(None)

    async def _deliver_here(self, notifications: Sequence[Notification]) -> list[Notification]:
        """Offer each notification to this process's connections of its user.

        Returns, once every offer is settled, the notifications no socket took.
        """
        batch = Batch()
        offline: list[Notification] = []
        for notification in notifications:
            outlets = self._hub.connections(notification.user_id)
            if not outlets:
                offline.append(notification)
                continue
            # Most frames go out at once; only the rest is queued and tracked.
            waiting = [outlet for outlet in outlets if not outlet.write_now(notification)]
            if not waiting:
                continue
            delivery = Delivery(
                notification, batch, len(waiting), written=len(waiting) < len(outlets)
            )
            batch._add(delivery)
            for outlet in waiting:
                if not outlet.offer(delivery):
                    delivery.settle(False)
        return offline + await batch.wait(self._delivery_wait)

    def receive(self, received: list[tuple[Notification, bytes]]) -> None:
        """Deliver what the broker handed to this process; store what no socket took.

        Then acknowledge each notification to the process that published it.
        Runs in the background (the broker's reader must not wait on sockets);
        :meth:`drain` waits for these deliveries at shutdown.
        """
        task = asyncio.get_running_loop().create_task(self._receive(received))
        self._receiving.add(task)
        task.add_done_callback(self._receiving.discard)

    async def _receive(self, received: list[tuple[Notification, bytes]]) -> None:
        unwritten = await self._deliver_here([notification for notification, _ in received])
        if unwritten:
            await self.store(unwritten)
        origins = {origin for _, origin in received}
        if len(origins) == 1:  # the common case: one publisher
            by_origin = {origins.pop(): [n.message_id for n, _ in received]}
        else:
            by_origin = {}
            for notification, origin in received:
                by_origin.setdefault(origin, []).append(notification.message_id)
        try:
            await self._broker.acknowledge(by_origin)
        except BrokerUnavailable as exc:
            # The publisher times out and stores them: twice, never lost.
            log.warning("ack_failed", extra={"error": str(exc)})

    def store_soon(self, notifications: list[Notification]) -> None:
        """Store, in the background, frames a connection took but never sent (aborted)."""
        if not notifications:
            return
        task = asyncio.get_running_loop().create_task(self.store(notifications))
        self._receiving.add(task)
        task.add_done_callback(self._receiving.discard)

    async def drain(self) -> None:
        """Wait until every received delivery was written or stored."""
        while self._receiving:
            await asyncio.gather(*list(self._receiving), return_exceptions=True)

    def flush_hint(self, user_ids: Iterable[str]) -> None:
        """Local connections of these users re-read the store (a row was stored for them)."""
        for user_id in user_ids:
            for outlet in self._hub.connections(user_id):
                outlet.request_flush()

    def resync(self) -> None:
        """Every local connection re-reads the store (the broker may have missed messages)."""
        for outlet in self._hub:
            outlet.request_flush()

    async def store(self, notifications: Sequence[Notification]) -> None:
        """Save notifications that reached no socket, retrying until the store takes them.

        Afterwards, users who connected meanwhile are told to re-read the store
        (here, or through the broker on whichever process holds them), so a
        notification stored just after its user connected is not left behind.
        """

        async def save() -> int:
            with self._metrics.store_batch_seconds.time():
                return await self._backlog.save(notifications)

        added = await self._retry("store", save)
        self._metrics.stored.inc(added)
        # Already stored for the same user: Kafka redelivered it, or it was stored
        # twice on the way (an ack timeout, an abort). Counted, never a second row.
        self._metrics.store_duplicates.inc(len(notifications) - added)
        users = {n.user_id for n in notifications}
        self._stored_users |= users
        broker = self._broker
        await self._retry("broker", lambda: broker.publish_flush(users))

    async def _retry(self, part: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` until it succeeds, backing off while ``part`` is unavailable."""
        delay = self._retry_initial
        while True:
            try:
                result = await operation()
            except (StoreUnavailable, BrokerUnavailable) as exc:
                if getattr(self, f"{part}_healthy"):
                    log.error(f"{part}_unavailable", extra={"error": str(exc)})
                setattr(self, f"{part}_healthy", False)
                if part == "store":
                    self._metrics.store_failures.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            if not getattr(self, f"{part}_healthy"):
                log.info(f"{part}_recovered")
                setattr(self, f"{part}_healthy", True)
            return result

    async def flush_backlog(self, outlet: Outlet) -> int:
        """Write the user's stored notifications to ``outlet``, oldest first.

        A row is deleted only after its frame was written; a notification this
        connection already wrote is deleted without being sent again. Called from
        the connection's writer, so frames of one connection never interleave.
        Returns how many frames were written. If the store is unavailable it logs,
        stops and leaves the rows for a later connection.

        Raises whatever ``outlet.write`` raises when the connection fails.
        """
        written = 0
        cursor: tuple[datetime, int] | None = None
        while True:
            try:
                page = await self._backlog.fetch(outlet.user_id, cursor, self._flush_batch)
            except StoreUnavailable as exc:
                log.warning("flush_store_unavailable", extra={"error": str(exc)})
                return written
            if not page:
                return written
            done: list[str] = []
            try:
                for stored in page:
                    notification = stored.notification
                    if not outlet.seen(notification.message_id):
                        await outlet.write(notification.frame)
                        outlet.mark_written(notification)
                        written += 1
                        self._metrics.flushed.inc()
                    done.append(notification.message_id)
            finally:
                if done:
                    await self._delete_quietly(outlet.user_id, done)
            if len(page) < self._flush_batch:
                return written
            cursor = page[-1].cursor

    async def _delete_quietly(self, user_id: str, message_ids: list[str]) -> None:
        try:
            await self._backlog.delete(user_id, message_ids)
        except StoreUnavailable as exc:
            # The frames were written; the rows will be sent again on a later
            # connection. At least once, never silently lost.
            log.warning("flush_delete_failed", extra={"error": str(exc), "rows": len(message_ids)})
