"""One client WebSocket: a bounded send queue drained by a single writer task.

The connection is the only place that writes to its socket, and the only one
that closes it once it is registered:

* a live frame is written at once by :meth:`Connection.write_now` when the
  writer is idle and the socket has room (the common case); otherwise it
  arrives as a :class:`~service.delivery.Delivery` in the queue, and the writer
  settles it exactly once, as written or not, so the router knows what still has
  to be stored;
* the stored backlog is read, written and deleted by the writer itself
  (:meth:`Connection.flush_backlog`), first on connect and again whenever the
  router asks (``request_flush``), so stored and live frames never interleave;
* closes use a :class:`~service.closecode.CloseCode`; frames the socket took but
  never sent are handed back (``on_unsent``) to be stored again.

A protocol v2 connection (``acks``) writes v2 frames and settles nothing on
write: it keeps what it wrote, by message id, until the client acknowledges it
(:meth:`Connection.acknowledge`) or the connection ends. Its flush sends the
stored rows without deleting them; the acknowledgement deletes them, with the
acknowledged rows of every other connection, in one statement per short window
(``service.acked``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final, Protocol

from .auth import Identity
from .closecode import CloseCode
from .delivery import Delivery
from .metrics import Metrics
from .notification import Notification, text_frame, v1_payload
from .router import AckedSink, StoreUnavailable
from .status import NO_STATUS, StatusSink

log = logging.getLogger("notify.connection")

_SEEN_LIMIT: Final = 512
# v2: notifications written and not acknowledged on one connection. A client past it
# does not acknowledge (or cannot keep up): 1013, as for a full queue; what it had
# not acknowledged is stored.
UNACKED_LIMIT: Final = 10_000
# Frames remembered while the socket's buffer is not empty, to store again what
# never left it if the connection is aborted.
_UNSENT_LIMIT: Final = 2048
# Queued frames joined in one write, up to about this many bytes.
_JOIN_LIMIT: Final = 64 * 1024


class Socket(Protocol):
    """The WebSocket as the connection uses it (``wire.WireSocket`` in production).

    Frames are complete WebSocket frames (``Notification.wire``, or several of them
    joined), written as they are.
    """

    async def send(self, frames: bytes) -> None:
        """Write ``frames`` once the socket has room. Raises ConnectionError if it closes."""
        ...

    def send_now(self, frames: bytes) -> bool:
        """Write ``frames`` at once if the socket can take them without waiting.

        False (nothing written) means "use ``send``": closing, or its buffer is full.
        """
        ...

    def buffered(self) -> int:
        """Bytes handed to the socket that the kernel has not taken yet."""
        ...

    def on_stall(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` just before the socket is aborted for a write stalled too long."""
        ...

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close with the closing handshake, within a bounded time: a peer that does not
        answer (or has no room for the close frame) is aborted."""
        ...

    def fail_connection(self, code: int = 1006, reason: str = "") -> None:
        """Close at once (the close frame if there is room, then the end of the connection)."""
        ...


class Stored:
    """A notification read back from the store, with its place in the user's backlog.

    Made from a row (:meth:`from_row`), it builds its :class:`Notification` only when
    one is asked for: a v1 flush needs the id and the frame (``wire``), and a thousand
    rows are a thousand objects fewer to make on the way to the socket.
    """

    __slots__ = ("_fields", "_notification", "cursor", "message_id")

    def __init__(self, notification: Notification, cursor: tuple[datetime, int]) -> None:
        self.cursor = cursor
        self.message_id = notification.message_id
        self._notification: Notification | None = notification
        self._fields: tuple[str, str, str] | None = None

    @classmethod
    def from_row(
        cls,
        message_id: str,
        user_id: str,
        title: str,
        body: str,
        cursor: tuple[datetime, int],
    ) -> Stored:
        """A stored notification whose Notification is built on first use; its
        ``created_ms`` is the cursor's ``created_at`` in milliseconds."""
        stored = cls.__new__(cls)
        stored.cursor = cursor
        stored.message_id = message_id
        stored._notification = None
        stored._fields = (user_id, title, body)
        return stored

    @property
    def notification(self) -> Notification:
        notification = self._notification
        if notification is None:
            assert self._fields is not None
            user_id, title, body = self._fields
            created_ms = int(self.cursor[0].timestamp() * 1000)
            notification = Notification.build(self.message_id, user_id, title, body, created_ms)
            self._notification = notification
        return notification

    @property
    def wire(self) -> bytes:
        """The v1 frame, the bytes of ``notification.wire``, without building the Notification."""
        notification = self._notification
        if notification is not None:
            return notification.wire
        assert self._fields is not None
        _, title, body = self._fields
        return text_frame(v1_payload(title, body))

    def __repr__(self) -> str:
        return f"Stored({self.message_id!r}, {self.cursor!r})"

    def __eq__(self, other: object) -> bool:
        """The same row read twice is equal: the same place and the same notification."""
        if not isinstance(other, Stored):
            return NotImplemented
        return self.cursor == other.cursor and self.notification == other.notification

    def __hash__(self) -> int:
        return hash((self.message_id, self.cursor))


class StoredRows(Protocol):
    """What a connection needs of the backlog store (``service.store``) to flush it."""

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

    async def delete_acked(self, user_id: str, message_ids: Sequence[str]) -> list[str]:
        """As ``delete``, in one statement; returns the ids whose rows were deleted.
        Raises StoreUnavailable."""
        ...

    async def take_gap(self, user_id: str) -> int:
        """How many of the user's rows retention dropped since the last call; resets it.
        Raises StoreUnavailable."""
        ...


class RowDeletes(AckedSink, Protocol):
    """Where stored rows are deleted in batches (``service.acked.AckedRows``)."""

    def add_written(self, user_id: str, message_ids: Sequence[str]) -> asyncio.Future[None]:
        """Delete these rows of ``user_id``, which a v1 flush wrote, soon; the future
        completes (never with an error) once the statement that takes them ran or failed.
        Never raises nor blocks."""
        ...


class _Flush:
    """Queue marker: re-read the store before the next live frame."""


_FLUSH: Final = _Flush()


class _Control:
    """A protocol v2 control frame (gap, expiring, refreshed, error) waiting its turn."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytes) -> None:
        self.frame = frame


class Connection:
    """A registered client connection of one user.

    ``write_now``, ``offer`` and ``close`` may be called from any task on the
    loop; frames are written by :meth:`run` (the writer), or by ``write_now``
    only while the writer is idle, so their order is kept.
    """

    __slots__ = (
        "__weakref__",
        "_acked_rows",
        "_acks",
        "_backlog",
        "_closed",
        "_deleting",
        "_flush_batch",
        "_flush_pending",
        "_idle",
        "_inflight",
        "_loop",
        "_metrics",
        "_on_unsent",
        "_queue",
        "_queue_size",
        "_seen",
        "_seen_order",
        "_socket",
        "_status",
        "_unacked",
        "_unsent",
        "_v2_open",
        "_writers",
        "identity",
    )

    def __init__(
        self,
        socket: Socket,
        identity: Identity,
        metrics: Metrics,
        *,
        queue_size: int,
        on_unsent: Callable[[list[Notification]], None] | None = None,
        acks: bool = False,
        v2_open: Callable[[], bool] | None = None,
        status: StatusSink = NO_STATUS,
        acked_rows: RowDeletes | None = None,
        writers: set[asyncio.Task[None]] | None = None,
    ) -> None:
        """``acks``: the client speaks protocol v2. ``v2_open``: whether a v2 connection
        of the user is open (a v1 connection's flush then deletes no row).
        ``acked_rows``: where acknowledged stored rows, and the rows a v1 flush wrote,
        are deleted in batches (without it, each ack frame and each page of a flush
        deletes its rows in a statement of its own). ``writers``:
        where the writer tasks started on demand are kept (and awaited on shutdown)."""
        self._socket = socket
        self._acked_rows = acked_rows
        self._acks = acks
        self._v2_open = v2_open
        self._status = status
        # v2: written and not yet acknowledged, by id; None for a row of the store.
        self._unacked: dict[str, Delivery | None] = {}
        self._on_unsent = on_unsent
        # The deliveries of the write under way.
        self._inflight: list[Delivery] | None = None
        self._unsent: deque[Notification | Stored] | None = None
        # Kept: in Python 3.11 get_running_loop() costs a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self.identity = identity
        self._metrics = metrics
        self._queue: deque[Delivery | _Flush | _Control] = deque()
        self._queue_size = queue_size
        # Set by ``run``: what later writer tasks flush from, and the set that holds
        # every writer task (the node waits for them on shutdown).
        self._backlog: StoredRows | None = None
        self._flush_batch = 0
        # The batched delete of the rows the last flush wrote: a later flush waits for it.
        self._deleting: asyncio.Future[None] | None = None
        self._writers = writers if writers is not None else set()
        self._closed = False
        self._flush_pending = False
        # True while no writer runs and nothing is queued: only then may ``write_now``
        # write directly, without breaking the order of frames.
        self._idle = False
        self._seen: set[str] | None = None
        self._seen_order: deque[str] | None = None

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def acks(self) -> bool:
        """Whether the client speaks protocol v2: delivered means acknowledged."""
        return self._acks

    @property
    def unacked(self) -> int:
        """How many notifications this connection wrote that are not acknowledged yet."""
        return len(self._unacked)

    def _frame(self, notification: Notification) -> bytes:
        """The notification's complete WebSocket frame for this connection's protocol."""
        return notification.wire_v2 if self._acks else notification.wire

    def write_now(self, notification: Notification) -> bool:
        """Write the frame at once, without a task switch, if nothing has to wait.

        That is: the writer is idle (nothing queued, no flush under way) and the
        socket's buffer has room. Returns False, having written nothing, otherwise;
        the caller then ``offer``s it. A notification this connection already
        wrote counts as written.
        """
        if not self._idle or self._closed or self._acks:
            return False
        # The path of every live frame: ``_wrote`` and ``_written`` inlined, v1 only.
        seen = self._seen
        if seen is not None and notification.message_id in seen:
            return True
        if not self._socket.send_now(notification.wire):
            return False
        self._mark_written(notification)
        self._metrics.observe_delivery(notification.created_ms)
        if self._status is not NO_STATUS:
            self._status.written((notification,))
        return True

    def _written(self, notification: Notification) -> None:
        """Book a live frame handed to the socket."""
        self._mark_written(notification)
        self._metrics.observe_delivery(notification.created_ms)
        if not self._acks and self._status is not NO_STATUS:
            self._status.written((notification,))

    def _settle_written(self, delivery: Delivery) -> None:
        """This connection just wrote ``delivery``: settle it, or (v2) keep it for the ack."""
        if self._acks:
            self._pend(delivery.notification.message_id, delivery)
        else:
            delivery.settle(not delivery.needs_ack)

    def _pend(self, message_id: str, delivery: Delivery | None) -> None:
        """v2: wait for the client's ack of ``message_id``, within ``UNACKED_LIMIT``."""
        self._unacked[message_id] = delivery
        if len(self._unacked) > UNACKED_LIMIT:
            log.warning("connection_unacked_overflow", extra={"unacked": len(self._unacked)})
            self._metrics.slow_closed.inc()
            self.abort(CloseCode.TRY_AGAIN_LATER, "too many unacknowledged notifications")

    def _settle_duplicate(self, delivery: Delivery) -> None:
        """``delivery`` is one this connection wrote before: written, unless still unacked."""
        if self._acks:
            delivery.settle(delivery.notification.message_id not in self._unacked)
        else:
            delivery.settle(not delivery.needs_ack)

    def _reclaim_unsent(self) -> None:
        """Hand back the frames still in the socket's buffer: they will never be sent."""
        pending = self._socket.buffered()
        if not pending or not self._unsent or self._on_unsent is None:
            return
        reclaimed: list[Notification] = []
        for unsent in reversed(self._unsent):
            if pending <= 0:
                break
            notification = unsent.notification if isinstance(unsent, Stored) else unsent
            reclaimed.append(notification)
            pending -= len(self._frame(notification))
        self._unsent.clear()
        reclaimed.reverse()
        self._on_unsent(reclaimed)

    def offer(self, delivery: Delivery) -> bool:
        """Queue a delivery for the writer.

        Returns False, without queueing, if the connection is closed. If the queue
        is full the connection is closed with 1013 (too slow to keep up), its queued
        deliveries are settled as not written, and False is returned.
        """
        if self._closed:
            return False
        if self._idle and delivery.needs_ack:
            # The fast path of ``write_now``, for a delivery that settles on an ack.
            notification = delivery.notification
            if self._wrote(notification.message_id) or notification.message_id in self._unacked:
                self._settle_duplicate(delivery)
                return True
            if self._socket.send_now(self._frame(notification)):
                self._written(notification)
                self._settle_written(delivery)
                return True
        if len(self._queue) >= self._queue_size:
            log.warning("connection_overflow", extra={"queued": len(self._queue)})
            self._metrics.slow_closed.inc()
            self.abort(CloseCode.TRY_AGAIN_LATER)
            return False
        self._queue.append(delivery)
        self._wake()
        return True

    def send_control(self, text: str) -> None:
        """Send a v2 control frame (its JSON text) in turn with the notifications (at once
        if idle)."""
        if self._closed:
            return
        frame = text_frame(text.encode())
        if self._idle and self._socket.send_now(frame):
            return
        self._queue.append(_Control(frame))
        self._wake()

    async def acknowledge(self, message_ids: Sequence[str], backlog: StoredRows) -> None:
        """The client has these notifications (a v2 ``ack``): :meth:`settle_acks`, and
        without ``acked_rows`` the delete of the rest from ``backlog``, here.

        Raises StoreUnavailable only without ``acked_rows`` (nothing is lost: the rows
        are sent again on a later connection).
        """
        rest = self.settle_acks(message_ids)
        if rest:
            await self.delete_acked(rest, backlog)

    async def delete_acked(self, message_ids: Sequence[str], backlog: StoredRows) -> None:
        """Delete acknowledged rows of this user from ``backlog`` in one statement, and
        report ``acked`` for those deleted. Raises StoreUnavailable."""
        deleted = await backlog.delete_acked(self.user_id, message_ids)
        if deleted:
            self._status.acked(self.user_id, deleted)

    def settle_acks(self, message_ids: Sequence[str]) -> list[str]:
        """The client has these notifications (a v2 ``ack``); synchronous, never raises.

        A delivery still waited for settles as delivered: it will not be stored, and
        the store is not touched. Every other id (stored by then, or sent from the
        store, or acknowledged again after a reconnect) is to be deleted from this
        user's stored rows: queued to ``acked_rows``, which deletes the rows of every
        connection in one statement per short window and reports ``acked`` for those
        it deleted. Without ``acked_rows``, those ids are returned, for the caller to
        delete (else the list is empty). Ids of other users, or unknown, change
        nothing. Called by the connection's session, one frame at a time.
        """
        unacked = self._unacked
        settled: list[str] = []
        rest: list[str] = []
        for message_id in message_ids:
            delivery = unacked.pop(message_id, None)
            if delivery is not None and delivery.in_time:
                delivery.settle(True)
                settled.append(message_id)
                continue
            if delivery is not None:
                # Too late: stored meanwhile (deleted below), or still being stored (the
                # router deletes it again once stored: ``Batch.acked_late``).
                delivery.acked_late = True
                delivery.settle(True)
            rest.append(message_id)
        if settled:
            self._status.acked(self.user_id, settled)
        if rest and self._acked_rows is not None:
            self._acked_rows.add(self.user_id, rest)
            return []
        return rest

    def request_flush(self) -> None:
        """Ask the writer to re-read the user's stored notifications."""
        if self._closed or self._flush_pending:
            return
        self._flush_pending = True
        self._queue.append(_FLUSH)
        self._wake()

    def _wrote(self, message_id: str) -> bool:
        """Whether this connection already wrote ``message_id`` (one of its recent ones)."""
        return self._seen is not None and message_id in self._seen

    def _mark_written(self, notification: Notification) -> None:
        """Book a frame handed to the socket, live or flushed from the store.

        Its id is remembered, so a redelivery is not sent twice here; while the
        socket's buffer is not empty the frame is remembered too, to be stored
        again if the connection is aborted before it leaves.
        """
        self._remember(notification.message_id)
        self._keep_while_buffered((notification,))

    def _remember(self, message_id: str) -> None:
        """Add ``message_id`` to the recent ids this connection wrote."""
        seen, order = self._seen, self._seen_order
        if seen is None or order is None:
            seen, order = self._seen, self._seen_order = set(), deque()
        seen.add(message_id)
        order.append(message_id)
        if len(order) > _SEEN_LIMIT:
            seen.discard(order.popleft())

    def _keep_while_buffered(self, written: Sequence[Notification | Stored]) -> None:
        """Remember frames just handed to the socket while its buffer is not empty."""
        unsent = self._unsent
        if self._socket.buffered():
            if unsent is None:
                unsent = self._unsent = deque(maxlen=_UNSENT_LIMIT)
            unsent.extend(written)
        elif unsent:
            unsent.clear()

    async def flush_backlog(self, backlog: StoredRows, page: int) -> int:
        """Write the user's stored notifications, oldest first, in pages of ``page`` rows.

        A row is deleted (by user and message id) only after its frame was handed to
        the socket; one this connection already wrote is deleted without being sent
        again. With ``acked_rows`` the deletes are queued there (a statement for many
        pages and users, off the flush's path: the next page is read at once), and a
        later flush of this connection first waits until they ran, so it never reads
        them again; without it, each page's rows are deleted before the next is read.
        Only the writer calls this (or a test, before the writer runs), so stored and
        live frames never interleave. Returns how many frames were written. If the
        store is unavailable it logs, stops and leaves the rows for a later flush.

        Each page's frames are written in one write. Raises whatever the socket's
        ``send`` raises when the connection fails; the rows of the pages written until
        then are deleted (or queued to be) first.
        """
        written = 0
        cursor: tuple[datetime, int] | None = None
        # v2, or v1 beside a v2 connection of the user: only an ack deletes a row.
        keep = self._acks or (self._v2_open is not None and self._v2_open())
        deleting, self._deleting = self._deleting, None
        if deleting is not None and not deleting.done():
            # Shielded: cancelling this writer must not cancel the batcher's future.
            await asyncio.shield(deleting)
        while True:
            try:
                rows = await backlog.fetch(self.user_id, cursor, page)
            except StoreUnavailable as exc:
                log.warning("flush_store_unavailable", extra={"error": str(exc)})
                return written
            if not rows:
                return written
            done: list[str] = []
            # The page's frames go out in one write: a flush of a thousand rows is a
            # few writes, not a thousand.
            page_frames: list[bytes] = []
            page_sent: list[Stored] = []
            acks = self._acks
            for stored in rows:
                message_id = stored.message_id
                if not self._wrote(message_id) and message_id not in self._unacked:
                    page_frames.append(stored.notification.wire_v2 if acks else stored.wire)
                    page_sent.append(stored)
                done.append(message_id)
            if page_frames:
                # A socket with no room for WRITE_TIMEOUT is cut off (``service.wire``),
                # which ends this wait with an error: the page's rows stay stored.
                await self._socket.send(b"".join(page_frames))
                for stored in page_sent:
                    self._remember(stored.message_id)
                    if acks:
                        self._pend(stored.message_id, None)
                self._keep_while_buffered(page_sent)
                written += len(page_sent)
                self._metrics.flushed.inc(len(page_sent))
                if not acks and self._status is not NO_STATUS:
                    self._status.written([stored.notification for stored in page_sent])
            if done and not keep:
                if self._acked_rows is not None:
                    self._deleting = self._acked_rows.add_written(self.user_id, done)
                else:
                    await self._delete_quietly(backlog, done)
            if len(rows) < page:
                return written
            cursor = rows[-1].cursor

    async def _delete_quietly(self, backlog: StoredRows, message_ids: list[str]) -> None:
        try:
            await backlog.delete(self.user_id, message_ids)
        except StoreUnavailable as exc:
            # The frames were written; the rows will be sent again on a later
            # connection. At least once, never silently lost.
            log.warning("flush_delete_failed", extra={"error": str(exc), "rows": len(message_ids)})

    async def run(self, backlog: StoredRows, *, flush_batch: int) -> None:
        """The writer's first turn: the stored backlog, then live deliveries in order.

        Returns once the queue is empty (the connection is then *idle*: ``write_now``
        writes directly); whatever is queued later starts a writer task again, which
        ends in turn when the queue is empty, so an idle connection holds no task. The
        backlog is flushed again, in turn with live frames, whenever ``request_flush``
        asks. On a failed socket every delivery still queued is settled as not
        written. Never raises for a failed socket.
        """
        self._backlog = backlog
        self._flush_batch = flush_batch
        await self._write(first=True)

    async def _write(self, *, first: bool = False) -> None:
        """Write what is queued, in order, until the queue is empty or the connection closed.

        Consecutive deliveries are joined in one write (up to ``_JOIN_LIMIT`` bytes).
        """
        backlog = self._backlog
        assert backlog is not None
        try:
            if first:
                if self._acks:
                    await self._send_gap(backlog)
                await self.flush_backlog(backlog, self._flush_batch)
            queue = self._queue
            while not self._closed and queue:
                item = queue[0]
                if isinstance(item, _Flush):
                    queue.popleft()
                    self._flush_pending = False
                    await self.flush_backlog(backlog, self._flush_batch)
                    continue
                if isinstance(item, _Control):
                    queue.popleft()
                    await self._socket.send(item.frame)
                    continue
                await self._write_deliveries()
        except asyncio.CancelledError:
            self._closed = True
            self._abandon()
            raise
        except Exception as exc:  # the socket failed: the client went away
            log.debug("writer_stopped", extra={"error": type(exc).__name__})
            self._closed = True
            self._abandon()
        else:
            if self._closed:
                self._abandon()
            else:
                self._idle = True  # nothing queued: write_now may write directly

    async def _write_deliveries(self) -> None:
        """Write the deliveries at the head of the queue in one write, then settle them."""
        queue = self._queue
        frames: list[bytes] = []
        batch: list[Delivery] = []
        size = 0
        while queue and size < _JOIN_LIMIT:
            item = queue[0]
            if not isinstance(item, Delivery):
                break
            queue.popleft()
            message_id = item.notification.message_id
            if self._wrote(message_id) or message_id in self._unacked:
                self._settle_duplicate(item)
                continue
            frame = self._frame(item.notification)
            frames.append(frame)
            batch.append(item)
            size += len(frame)
        if not batch:
            return
        self._inflight = batch
        try:
            # As in the flush: a socket with no room for WRITE_TIMEOUT is cut off.
            await self._socket.send(frames[0] if len(frames) == 1 else b"".join(frames))
        except BaseException:
            if self._inflight is batch:
                self._inflight = None
                for delivery in batch:
                    delivery.settle(False)
            raise
        if self._inflight is not batch:
            return  # aborted meanwhile: settled as not written already
        self._inflight = None
        for delivery in batch:
            self._written(delivery.notification)
            self._settle_written(delivery)

    async def _send_gap(self, backlog: StoredRows) -> None:
        """v2: first of all, how many unacknowledged notifications retention dropped."""
        try:
            dropped = await backlog.take_gap(self.user_id)
        except StoreUnavailable as exc:
            log.warning("gap_store_unavailable", extra={"error": str(exc)})
            return
        if dropped:
            await self._socket.send(text_frame(f'{{"type":"gap","dropped":{dropped}}}'.encode()))

    def _wake(self) -> None:
        """Something was queued: start a writer unless one is running (it takes it in turn)."""
        if not self._idle or self._closed or self._backlog is None:
            return
        self._idle = False
        task = self._loop.create_task(self._write(), name="ws-writer")
        writers = self._writers
        writers.add(task)
        task.add_done_callback(writers.discard)

    def _abandon(self) -> None:
        inflight, self._inflight = self._inflight, None
        for written in inflight or ():
            # Its write may still complete; stored as well, it arrives twice at worst.
            written.settle(False)
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, Delivery):
                item.settle(False)
        unacked, self._unacked = self._unacked, {}
        for waiting in unacked.values():
            if waiting is not None:
                waiting.settle(False)

    def detach(self) -> None:
        """Stop using the socket (the client is gone): settle what is queued as not written.

        Synchronous, so it completes even in a task being cancelled. Idempotent.
        """
        self._closed = True
        self._abandon()

    def abort(self, code: CloseCode, reason: str | None = None) -> None:
        """Close at once, without waiting for the socket: for a peer that is too slow,
        or a token that expired. ``reason`` defaults to the code's own phrase.

        Idempotent. Queued deliveries are settled as not written, and frames the
        socket took but never sent are handed to ``on_unsent``.
        """
        if self._closed:
            return
        self._closed = True
        self._abandon()
        self._reclaim_unsent()
        self._socket.fail_connection(code, code.reason if reason is None else reason)

    def stalled(self) -> None:
        """The socket had no room for ``WRITE_TIMEOUT``: 1013, and store what it held.

        Called by the socket just before it is aborted. Idempotent.
        """
        if self._closed:
            return
        self._metrics.slow_closed.inc()
        self.abort(CloseCode.TRY_AGAIN_LATER)

    async def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Close with the closing handshake (e.g. 1001 on shutdown). Idempotent.

        ``reason`` defaults to the code's own phrase. Bounded in time: a peer that
        does not answer, or has no room for the close frame, is aborted (see
        ``Socket.close``).
        """
        if self._closed:
            return
        self._closed = True
        self._abandon()
        self._reclaim_unsent()
        try:
            await self._socket.close(code, code.reason if reason is None else reason)
        except Exception as exc:
            log.debug("close_failed", extra={"error": type(exc).__name__})
