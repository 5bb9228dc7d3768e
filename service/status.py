"""Delivery status events: what became of each notification, for the platform to act on.

With ``STATUS_TOPIC`` set, the gateway produces one record per notification and user
each time its state changes, keyed by ``user_id``, at least once:

``{"message_id": ..., "user_id": ..., "status": ..., "at": <epoch ms>}``

=================  ==========================================================
status             when
=================  ==========================================================
``written``        a v1 connection's socket took the frame
``acked``          a v2 connection acknowledged it
``stored``         it reached no connection and was saved to the backlog
``expired``        retention deleted it unacknowledged (TTL or per-user cap)
``dead_lettered``  the record broke the input contract (``message_id`` and
                   ``user_id`` as far as they could be read, else null)
=================  ==========================================================

The platform's notification service uses them to fall back to e-mail or a mobile
push when a notification stays unread. This module holds the interface the other
parts call; :class:`NoStatus` is the sink when ``STATUS_TOPIC`` is empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from .notification import Notification

WRITTEN: Final = "written"
ACKED: Final = "acked"
STORED: Final = "stored"
EXPIRED: Final = "expired"
DEAD_LETTERED: Final = "dead_lettered"


class StatusSink(Protocol):
    """Where the parts report state changes. Every method is synchronous and never
    raises nor blocks: an implementation queues, and :meth:`flush` waits for what was
    queued to be durable (the consumer calls it before committing offsets)."""

    def written(self, notifications: Sequence[Notification]) -> None: ...

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None: ...

    def stored(self, notifications: Sequence[Notification]) -> None: ...

    def expired(self, rows: Iterable[tuple[str, str]]) -> None:
        """``rows``: ``(user_id, message_id)`` pairs retention deleted."""
        ...

    def dead_lettered(self, user_id: str | None, message_id: str | None) -> None: ...

    async def flush(self) -> None:
        """Return once everything reported so far is written (or given up, logged)."""
        ...


class NoStatus:
    """The sink when ``STATUS_TOPIC`` is empty: reports nothing, costs nothing."""

    __slots__ = ()

    def written(self, notifications: Sequence[Notification]) -> None:
        return None

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None:
        return None

    def stored(self, notifications: Sequence[Notification]) -> None:
        return None

    def expired(self, rows: Iterable[tuple[str, str]]) -> None:
        return None

    def dead_lettered(self, user_id: str | None, message_id: str | None) -> None:
        return None

    async def flush(self) -> None:
        return None


NO_STATUS: Final = NoStatus()
