"""Routing: each notification goes to every live connection of its user, or to the store.

The router is where the delivery guarantee is kept. :meth:`Router.dispatch`
publishes a batch and returns its :class:`Settlement`, which completes only when
every notification of the batch has been written to at least one socket or saved
in the backlog store; the consumer commits Kafka offsets after that and never
before. Several batches may be settling at once (the consumer keeps fetching);
each is published in order, so a user's notifications reach its connections in
the order of the topic. For a user with a protocol v2 connection open, "written"
reads "acknowledged by a v2 client" (``service.delivery``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from .delivery import Batch, Queue
from .hub import Hub
from .metrics import Metrics
from .notification import Notification
from .status import NO_STATUS, StatusSink

log = logging.getLogger("notify.router")

T = TypeVar("T")


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
    """What the router needs of the persistent store of undelivered notifications.

    (A connection reads and deletes the rows it flushes: ``connection.StoredRows``.)
    """

    async def save(self, notifications: Sequence[Notification]) -> int:
        """Store notifications; one already stored for its user (same message_id) is ignored.

        The same message_id for two users is two rows. Returns how many rows were
        new. Raises StoreUnavailable.
        """
        ...

    async def delete(self, user_id: str, message_ids: Sequence[str]) -> None:
        """Remove these rows of ``user_id`` (acknowledged by a v2 client). Raises
        StoreUnavailable."""
        ...


class AckedSink(Protocol):
    """Where acknowledged rows go to be deleted in batches (``service.acked``)."""

    def add(self, user_id: str, message_ids: Iterable[str]) -> None:
        """Delete these stored rows of ``user_id`` soon. Never raises nor blocks."""
        ...


class Settlement:
    """The outcome of one dispatched batch: awaiting it returns once every notification
    of the batch was written (acknowledged, for v2), or stored.

    Awaiting it may raise only CancelledError (the router retries a store or a broker
    that is down until it succeeds). ``done()`` says whether it completed.
    """

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Future[None]) -> None:
        self._task = task

    def done(self) -> bool:
        return self._task.done()

    def add_done_callback(self, callback: Callable[[], object]) -> None:
        self._task.add_done_callback(lambda _: callback())

    def cancel(self) -> None:
        self._task.cancel()

    def result(self) -> None:
        """None once completed; raises what the settling raised (a bug, or cancelled)."""
        self._task.result()

    def __await__(self) -> Generator[Any, None, None]:
        return self._task.__await__()


class _Published:
    """A batch published through the broker, waiting for its receivers' acknowledgements.

    ``left``: by message id, acknowledgements still due (below zero while the PUBLISH
    reply that counts the receivers is due: acknowledgements can overtake it).
    """

    __slots__ = ("counted", "done", "left", "notifications")

    def __init__(self, notifications: Sequence[Notification], done: asyncio.Future[None]) -> None:
        self.notifications = notifications
        self.left: dict[str, int] = dict.fromkeys((n.message_id for n in notifications), 0)
        self.counted = False
        self.done = done


class Outlet(Queue, Protocol):
    """What the router needs of one live connection (``service.connection``).

    ``offer`` (from :class:`~service.delivery.Queue`) is called by the batch the
    router hands the connections it could not write to at once.
    """

    @property
    def user_id(self) -> str: ...

    @property
    def acks(self) -> bool:
        """Whether the client speaks protocol v2 (delivered means acknowledged)."""
        ...

    def write_now(self, notification: Notification) -> bool:
        """Write the frame at once if that needs no waiting; False: offer it in a batch."""
        ...

    def request_flush(self) -> None:
        """Ask the connection to re-read the store at its next turn."""
        ...


class Router:
    """Sends notifications to live connections and keeps the rest in the backlog.

    Every notification is published through the broker to its user's channel,
    and each process that holds a connection of the user delivers it through
    :meth:`receive` and acknowledges it; with one process (the memory broker)
    that is this router, called back at once.

    The router only chooses: the connections of a user, or the store. It writes
    to no socket; each connection writes its own frames, flushes its own backlog
    and settles what it was offered (``service.connection``, ``service.delivery``).

    ``dispatch`` (and ``deliver``) is called by one consumer, one call at a time;
    ``receive``, ``acknowledged``, ``flush_hint`` and ``resync`` by the broker;
    ``store_soon`` by a connection that was aborted.
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
        ack_wait: float = 2.0,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        status: StatusSink = NO_STATUS,
        acked_rows: AckedSink | None = None,
    ) -> None:
        self._hub = hub
        self._backlog = backlog
        self._metrics = metrics
        self._broker = broker
        self.status = status
        self._acked_rows = acked_rows
        self._ack_timeout = ack_timeout
        self._delivery_wait = delivery_wait
        self._ack_wait = ack_wait
        # By message id, the published batches still waiting for its acknowledgements,
        # oldest first (one id may be in several: a redelivery, or several users).
        self._awaiting: dict[str, list[_Published]] = {}
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.store_healthy = True
        self.broker_healthy = True
        self._stored_users: set[str] = set()
        self._receiving: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()
        # Saves run one at a time, in the order they were asked for: rows of one
        # user from batches settling at once keep the topic's order (rows with the
        # same created_at are read in insertion order).
        self._saving = asyncio.Lock()

    def take_stored_users(self) -> set[str]:
        """Users with rows stored since the last call (for the per-user cap)."""
        users, self._stored_users = self._stored_users, set()
        return users

    async def deliver(self, notifications: Sequence[Notification]) -> None:
        """Deliver each notification live, or store it: :meth:`dispatch`, then its settlement."""
        await (await self.dispatch(notifications))

    async def dispatch(self, notifications: Sequence[Notification]) -> Settlement:
        """Publish the notifications to their users' channels; return their settlement.

        Returns once the broker took them (live frames are usually written by then),
        without waiting for receivers: the :class:`Settlement` completes when each one
        was written to at least one socket, here or in another process, or is in the
        store. While the broker is down this retries with backoff and does not return;
        while the store is down the settlement does not complete. Cancelling either is
        safe: nothing is acknowledged, the caller must not commit past them.
        """
        loop = asyncio.get_running_loop()
        published = _Published(notifications, loop.create_future())
        # Acknowledgements can overtake the PUBLISH replies (a receiver in this very
        # process, say): the batch is registered before publishing, counted down from 0.
        awaiting = self._awaiting
        for key in published.left:
            awaiting.setdefault(key, []).append(published)
        broker = self._broker
        try:
            counts = await self._retry("broker", lambda: broker.publish(notifications))
        except BaseException:
            self._unregister(published)
            raise
        unreached: list[Notification] = []
        left = published.left
        for notification, count in zip(notifications, counts, strict=True):
            if count:
                left[notification.message_id] += count
            else:
                unreached.append(notification)
        published.counted = True
        for key in [key for key, due in left.items() if due <= 0]:
            self._forget(published, key)
        if not left and not unreached:  # every receiver acknowledged already, or none
            if not published.done.done():
                published.done.set_result(None)
            return Settlement(published.done)
        task = loop.create_task(self._settle(published, counts, unreached))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return Settlement(task)

    async def _settle(
        self, published: _Published, counts: list[int], unreached: list[Notification]
    ) -> None:
        """Wait for the receivers' acknowledgements; store what no process received, and
        what a receiver did not acknowledge within the ack timeout (it may have died)."""
        try:
            if published.left:
                try:
                    await asyncio.wait_for(asyncio.shield(published.done), self._ack_timeout)
                except TimeoutError:
                    left = published.left
                    missing = [
                        n
                        for n, count in zip(published.notifications, counts, strict=True)
                        if count and n.message_id in left
                    ]
                    log.warning("ack_timeout", extra={"unacknowledged": len(missing)})
                    self._metrics.ack_timeouts.inc(len(missing))
                    unreached += missing
        finally:
            self._unregister(published)
        if unreached:
            await self.store(unreached)

    def _forget(self, published: _Published, key: str) -> None:
        """``published`` waits for no more acknowledgements of ``key``."""
        del published.left[key]
        self._unlist(published, key)
        if not published.left and published.counted and not published.done.done():
            published.done.set_result(None)

    def _unregister(self, published: _Published) -> None:
        """``published`` waits for nothing more (settled, timed out or cancelled)."""
        for key in published.left:
            self._unlist(published, key)
        published.left.clear()

    def _unlist(self, published: _Published, key: str) -> None:
        waiting = self._awaiting.get(key)
        if waiting is None:
            return
        if published in waiting:
            waiting.remove(published)
        if not waiting:
            del self._awaiting[key]

    def acknowledged(self, message_ids: list[str]) -> None:
        """A receiver wrote or stored these notifications that this process published.

        Credited to the oldest batch still waiting for the id; one acknowledging
        before its PUBLISH reply was counted goes to the batch being published.
        """
        awaiting = self._awaiting
        for key in message_ids:
            waiting = awaiting.get(key)
            if not waiting:
                continue  # late: already timed out and stored
            if len(waiting) == 1:
                published = waiting[0]
                left = published.left
                if published.counted and left[key] == 1:
                    # The common case, once per notification: the last acknowledgement
                    # the one batch waiting for the id needs (``_forget``, inline).
                    del left[key]
                    del awaiting[key]
                    if not left and not published.done.done():
                        published.done.set_result(None)
                    continue
            for published in waiting:
                if published.left[key] > 0 or not published.counted:
                    break
            else:
                continue
            published.left[key] -= 1
            if published.counted and published.left[key] == 0:
                self._forget(published, key)

    async def settled(self) -> None:
        """Wait until every dispatched batch settled (written, acknowledged or stored)."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    async def _deliver_here(
        self, notifications: Sequence[Notification]
    ) -> tuple[list[Notification], Batch]:
        """Offer each notification to this process's connections of its user.

        Returns, once every offer is settled, the notifications no socket took, and the
        batch (which knows, after they are stored, which of them were acknowledged late).
        """
        batch = Batch()
        offline: list[Notification] = []
        connections = self._hub.connections
        for notification in notifications:
            outlets = connections(notification.user_id)
            if not outlets:
                offline.append(notification)
                continue
            if len(outlets) == 1:
                # The common case, one connection: no generator, no list per notification.
                outlet = outlets[0]
                if outlet.acks:
                    batch.offer(notification, outlets, written=False, needs_ack=True)
                elif not outlet.write_now(notification):
                    batch.offer(notification, outlets, written=False)
                continue
            if any(outlet.acks for outlet in outlets):
                # A v2 client is there: delivered once one acknowledges it, or stored.
                batch.offer(notification, outlets, written=False, needs_ack=True)
                continue
            # Most frames go out at once; only the rest is queued and tracked.
            waiting = [outlet for outlet in outlets if not outlet.write_now(notification)]
            if not waiting:
                continue
            batch.offer(notification, waiting, written=len(waiting) < len(outlets))
        return offline + await batch.wait(self._delivery_wait, self._ack_wait), batch

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
        unwritten, batch = await self._deliver_here([n for n, _ in received])
        if unwritten:
            await self.store(unwritten)
            await self._forget_acked(batch.acked_late())
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

    async def _forget_acked(self, notifications: list[Notification]) -> None:
        """Delete the rows just stored of notifications a v2 client acknowledged while they
        were being stored (its own delete may have run before the insert)."""
        if not notifications:
            return
        by_user: dict[str, list[str]] = {}
        for n in notifications:
            by_user.setdefault(n.user_id, []).append(n.message_id)
        for user_id, message_ids in by_user.items():
            if self._acked_rows is not None:
                self._acked_rows.add(user_id, message_ids)  # with everyone's, in one statement
                continue
            try:
                await self._backlog.delete(user_id, message_ids)
            except StoreUnavailable as exc:
                # Sent again on a later connection: a duplicate, never a loss.
                log.warning("acked_delete_failed", extra={"error": str(exc)})

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
            async with self._saving:
                with self._metrics.store_batch_seconds.time():
                    return await self._backlog.save(notifications)

        added = await self._retry("store", save)
        self.status.stored(notifications)
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
