"""Stored rows of acknowledged notifications, deleted in batches across every user.

A protocol v2 acknowledgement that arrives in time touches the store not at all
(``service.delivery``). The rest do have a row to delete: an ack that came after
its notification was stored, a row flushed from the store to a v2 connection and
acknowledged, a row the router stored while its ack was on the way. Each of those
connections and users used to cost a statement (a transaction) of its own; here
they are queued and deleted together, one statement per window of
:data:`WINDOW` seconds or :data:`MAX_IDS` ids, whichever comes first:

``DELETE ... WHERE ctid = ANY(ARRAY(<each pair of unnest($1::varchar[], $2::uuid[])
looked up by the key's index>)) RETURNING user_id, message_id``

The ``acked`` status events are reported for what that statement deleted (a row
already gone, deleted by another path or by retention, reports nothing).

The rows a protocol v1 flush wrote (:meth:`AckedRows.add_written`) go the same way:
the flush hands a page's frames to the socket, queues the page's rows here and reads
its next page at once, instead of waiting for a DELETE per page. Those report no
status event (``written`` was reported when the frames were written).

What is lost if it fails: nothing. A row whose delete failed (PostgreSQL down) or
was dropped (more than :data:`MAX_PENDING` waiting) is sent again on the user's next
connection, and the client drops it by id (a v1 client may show it twice: at least
once, as after a crash between the write and the delete).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from .router import StoreUnavailable
from .status import NO_STATUS, StatusSink

log = logging.getLogger("notify.acked")

# Seconds an id waits for others to join its statement; an ack is already late.
WINDOW: Final = 0.02
# Ids per statement at most (more waiting: a statement at once, without the window).
MAX_IDS: Final = 5000
# Ids waiting at most; beyond, new ones are dropped (counted in the log): their rows
# are only sent again, and memory stays bounded while PostgreSQL is down.
MAX_PENDING: Final = 200_000


class Rows(Protocol):
    """What the batcher needs of the store (``service.store.Store``)."""

    async def delete_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Delete these ``(user_id, message_id)`` rows in one statement; the pairs deleted.

        Raises StoreUnavailable."""
        ...


class AckedRows:
    """Queues the rows to delete and deletes them, one statement per window.

    :meth:`add` and :meth:`add_written` are synchronous, never raise nor block, and may
    be called from any task of the loop. ``start()`` launches the named task
    ``acked-deletes``; ``close()`` deletes what is queued (bounded) and stops it,
    idempotent.
    """

    def __init__(
        self,
        rows: Rows,
        status: StatusSink = NO_STATUS,
        *,
        window: float = WINDOW,
        max_ids: int = MAX_IDS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._rows = rows
        self._status = status
        self._window = window
        self._max_ids = max_ids
        self._max_pending = max_pending
        self._pending: list[tuple[str, str]] = []
        # Of the pending pairs, those a v1 flush wrote: deleted, not reported as acked.
        self._quiet: set[tuple[str, str]] = set()
        # Pairs ever queued, and ever taken by a statement (done or failed): a waiter
        # of add_written is told once the second reaches its mark.
        self._queued = 0
        self._taken = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.statements = 0  # statements run (for tests and the log)

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def add(self, user_id: str, message_ids: Iterable[str]) -> None:
        """Delete these rows of ``user_id`` soon (another user's rows are never touched)."""
        self._queue(user_id, message_ids, None)

    def add_written(self, user_id: str, message_ids: Iterable[str]) -> asyncio.Future[None]:
        """Delete these rows of ``user_id``, whose frames a v1 flush handed to the socket,
        soon, with no status event.

        Returns a future that completes once the statement that takes them ran or
        failed (never with an error): a later flush of the same connection waits for
        it, so it does not read these rows again. While no task runs (not started, or
        closed) the rows wait for ``flush()`` or ``close()``, and the future is done
        at once.
        """
        quiet = self._quiet
        self._queue(user_id, message_ids, quiet)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._task is None or self._queued <= self._taken:
            done.set_result(None)
        else:
            self._waiters.append((self._queued, done))
        return done

    def _queue(
        self, user_id: str, message_ids: Iterable[str], quiet: set[tuple[str, str]] | None
    ) -> None:
        pending = self._pending
        for message_id in message_ids:
            if len(pending) >= self._max_pending:
                log.warning("acked_deletes_dropped", extra={"pending": len(pending)})
                break
            pair = (user_id, message_id)
            pending.append(pair)
            if quiet is not None:
                quiet.add(pair)
            self._queued += 1
        if pending:
            self._idle.clear()
            self._wakeup.set()

    async def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="acked-deletes")

    async def flush(self) -> None:
        """Return once everything added so far was deleted (or failed, logged)."""
        if self._task is None:
            await self._delete_all()
            return
        await self._idle.wait()

    async def close(self, grace: float = 5.0) -> None:
        """Delete what is queued, for ``grace`` seconds at most, then stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await asyncio.wait_for(self._delete_all(), grace)
        except TimeoutError:
            log.warning("acked_deletes_unfinished", extra={"pending": len(self._pending)})
        finally:
            self._tell_waiters(everyone=True)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if len(self._pending) < self._max_ids:
                await asyncio.sleep(self._window)  # let the acks of other users join
            self._wakeup.clear()
            await self._delete_all()

    async def _delete_all(self) -> None:
        while self._pending:
            chunk = self._pending[: self._max_ids]
            del self._pending[: self._max_ids]
            try:
                await self._delete(chunk)
            finally:
                self._taken += len(chunk)
                self._tell_waiters()
        if not self._pending:
            self._idle.set()

    def _tell_waiters(self, *, everyone: bool = False) -> None:
        """Complete the add_written futures whose rows a statement took (all: closing)."""
        waiters = self._waiters
        while waiters and (everyone or waiters[0][0] <= self._taken):
            _, done = waiters.popleft()
            if not done.done():
                done.set_result(None)

    async def _delete(self, pairs: list[tuple[str, str]]) -> None:
        quiet = self._quiet
        silent = {pair for pair in pairs if pair in quiet} if quiet else set()
        quiet.difference_update(silent)
        try:
            deleted = await self._rows.delete_pairs(pairs)
        except StoreUnavailable as exc:
            # The rows are sent again on a later connection: a duplicate, never a loss.
            log.warning("acked_delete_failed", extra={"error": str(exc), "rows": len(pairs)})
            return
        except Exception as exc:  # a bug must not stop the task: logged, the rows stay
            log.error("acked_delete_error", exc_info=exc)
            return
        finally:
            self.statements += 1
        by_user: dict[str, list[str]] = {}
        for pair in deleted:
            if pair not in silent:
                by_user.setdefault(pair[0], []).append(pair[1])
        for user_id, message_ids in by_user.items():
            self._status.acked(user_id, message_ids)
