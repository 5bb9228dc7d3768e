"""Stored rows of acknowledged notifications, deleted in batches across every user.

A protocol v2 acknowledgement that arrives in time touches the store not at all
(``service.delivery``). The rest do have a row to delete: an ack that came after
its notification was stored, a row flushed from the store to a v2 connection and
acknowledged, a row the router stored while its ack was on the way. Each of those
connections and users used to cost a statement (a transaction) of its own; here
they are queued and deleted together, one statement per window of
:data:`WINDOW` seconds or :data:`MAX_IDS` ids, whichever comes first:

``DELETE ... USING unnest($1::varchar[], $2::uuid[]) ... RETURNING user_id, message_id``

The ``acked`` status events are reported for what that statement deleted (a row
already gone, deleted by another path or by retention, reports nothing).

What is lost if it fails: nothing. A row whose delete failed (PostgreSQL down) or
was dropped (more than :data:`MAX_PENDING` waiting) is sent again on the user's next
connection, and the client drops it by id.
"""

from __future__ import annotations

import asyncio
import logging
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

    :meth:`add` is synchronous, never raises nor blocks, and may be called from any
    task of the loop. ``start()`` launches the named task ``acked-deletes``;
    ``close()`` deletes what is queued (bounded) and stops it, idempotent.
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
        pending = self._pending
        for message_id in message_ids:
            if len(pending) >= self._max_pending:
                log.warning("acked_deletes_dropped", extra={"pending": len(pending)})
                break
            pending.append((user_id, message_id))
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
            await self._delete(chunk)
        if not self._pending:
            self._idle.set()

    async def _delete(self, pairs: list[tuple[str, str]]) -> None:
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
        for user_id, message_id in deleted:
            by_user.setdefault(user_id, []).append(message_id)
        for user_id, message_ids in by_user.items():
            self._status.acked(user_id, message_ids)
