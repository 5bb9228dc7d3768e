"""Settlement: how the router learns which queued notifications reached a socket.

The router offers a notification that could not be written at once to the
connections of its user as one :class:`Delivery`, gathered in the
:class:`Batch` of the consumer's batch. Each connection settles it exactly once
(``service.connection``): written, or given up (closed, overflowed, too slow).
The router waits for the batch and stores what no socket took. Plain
bookkeeping: nothing here does I/O or writes to a socket.

Protocol v2: a delivery to a user with a v2 connection open ``needs_ack``. Then
a write settles nothing on a v2 connection: it keeps the delivery until the
client acknowledges it (settled as delivered) or goes away (not delivered), and
a v1 connection's write does not count as delivered. A batch with such a
delivery waits longer (``ACK_WAIT`` rather than the short budget of a socket
write): an acknowledgement takes a round trip to the client and its batching.
What is still unsettled when the batch's budget runs out is stored, as for a slow
socket; an acknowledgement arriving later deletes the stored row. A connection
that is lost, or over its unacknowledged limit, settles its share at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from .notification import Notification


class Queue(Protocol):
    """A connection as the batch uses it: somewhere a delivery can be queued."""

    def offer(self, delivery: Delivery) -> bool:
        """Queue ``delivery``, to be settled exactly once; False, settling nothing, if it
        was not queued (the connection is closed, or just overflowed)."""
        ...


class Batch:
    """Tracks the queued deliveries of one consumer batch until each is settled.

    Settled means written to a socket, or given up by every connection it was
    queued on (closed, overflowed, too slow); the latter are collected in
    ``unwritten`` to be stored. Used from one event loop; not thread-safe.
    """

    __slots__ = ("_deliveries", "_done", "_needs_ack", "_pending", "closed", "unwritten")

    def __init__(self) -> None:
        self._pending = 0
        self._needs_ack = False
        # True once ``wait`` returned: what settles later was stored meanwhile.
        self.closed = False
        self._done: asyncio.Future[None] | None = None
        self._deliveries: list[Delivery] = []
        self.unwritten: list[Notification] = []

    def offer(
        self,
        notification: Notification,
        queues: Sequence[Queue],
        *,
        written: bool,
        needs_ack: bool = False,
    ) -> None:
        """Queue ``notification`` on each of ``queues`` as one delivery of this batch.

        ``written``: another connection already wrote it, so it needs no storing
        whatever these do. ``needs_ack``: only a v2 client's acknowledgement counts
        as delivered (see the module docstring). A queue that refuses it settles
        its share at once.
        """
        delivery = Delivery(notification, self, len(queues), written=written, needs_ack=needs_ack)
        self._needs_ack = self._needs_ack or needs_ack
        self._pending += 1
        self._deliveries.append(delivery)
        for queue in queues:
            if not queue.offer(delivery):
                delivery.settle(False)

    def _settle(self, notification: Notification, written: bool) -> None:
        if not written:
            self.unwritten.append(notification)
        self._pending -= 1
        if self._pending == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def wait(self, budget: float, ack_budget: float | None = None) -> list[Notification]:
        """Wait up to ``budget`` seconds for every delivery to settle (``ack_budget``, if
        given, when one of them waits for a v2 acknowledgement).

        Returns what must be stored: the deliveries given up, and those still
        queued when the budget ran out (a slow socket must not hold up everyone
        else's notifications; if it writes them later, they arrive twice at worst).
        """
        if self._needs_ack and ack_budget is not None:
            budget = ack_budget
        try:
            if self._pending:
                self._done = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.wait_for(self._done, budget)
                except TimeoutError:
                    late = [d.notification for d in self._deliveries if not d.settled]
                    return self.unwritten + late
            return self.unwritten
        finally:
            self.closed = True

    def acked_late(self) -> list[Notification]:
        """Deliveries a v2 client acknowledged after ``wait`` returned: stored, or being
        stored, though the client has them (the router deletes their rows again)."""
        return [d.notification for d in self._deliveries if d.acked_late]


class Delivery:
    """One notification on its way to the live connections of its user.

    Each connection it is queued on settles it exactly once; when the last one
    has, the batch learns whether any of them wrote it.
    """

    __slots__ = ("_batch", "_remaining", "_written", "acked_late", "needs_ack", "notification")

    def __init__(
        self,
        notification: Notification,
        batch: Batch,
        fanout: int,
        *,
        written: bool = False,
        needs_ack: bool = False,
    ) -> None:
        self.notification = notification
        self._batch = batch
        self._remaining = fanout
        self._written = written
        self.needs_ack = needs_ack
        # Set by a v2 connection whose client acknowledged it after the batch's budget.
        self.acked_late = False

    @property
    def settled(self) -> bool:
        return self._remaining <= 0

    @property
    def in_time(self) -> bool:
        """Whether its batch still waits: settled now, it will not be stored."""
        return not self._batch.closed

    def settle(self, written: bool) -> None:
        """Record the outcome on one connection. Safe to call once per connection."""
        self._written = self._written or written
        self._remaining -= 1
        if self._remaining == 0:
            self._batch._settle(self.notification, self._written)
