"""The PostgreSQL backlog of notifications that reached no socket.

Table ``undelivered_notification`` (see ``migrations/``): the primary key is
``(user_id, message_id)``, so a Kafka redelivery never duplicates a user's row,
while one ``message_id`` sent to several users is a row for each of them. Rows
are read per user in ``(created_at, seq)`` order, oldest first.

Every method raises :class:`~service.router.StoreUnavailable` when PostgreSQL
cannot be reached or refuses, and is safe to call concurrently (asyncpg pool).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg

from .notification import Notification
from .router import Stored, StoreUnavailable

log = logging.getLogger("notify.store")

_FAILURES = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

_INSERT = """
INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)
SELECT * FROM unnest($1::uuid[], $2::varchar[], $3::text[], $4::text[], $5::timestamptz[])
ON CONFLICT (user_id, message_id) DO NOTHING
"""

_FETCH_FIRST = """
SELECT message_id, user_id, title, body, created_at, seq FROM undelivered_notification
WHERE user_id = $1 ORDER BY created_at, seq LIMIT $2
"""

_FETCH_AFTER = """
SELECT message_id, user_id, title, body, created_at, seq FROM undelivered_notification
WHERE user_id = $1 AND (created_at, seq) > ($3, $4) ORDER BY created_at, seq LIMIT $2
"""

_DELETE = """
DELETE FROM undelivered_notification WHERE user_id = $1 AND message_id = ANY($2::uuid[])
"""

_EXPIRE = (
    "DELETE FROM undelivered_notification WHERE created_at < now() - make_interval(secs => $1)"
)

# Keep the newest $1 rows of each user who has more than that; $2 limits the
# check to some users (NULL: all of them, a full scan).
_CAP = """
DELETE FROM undelivered_notification AS t USING (
    SELECT user_id, message_id FROM (
        SELECT user_id, message_id,
               row_number() OVER (PARTITION BY user_id ORDER BY created_at DESC, seq DESC) AS rank
        FROM undelivered_notification
        WHERE user_id IN (
            SELECT user_id FROM undelivered_notification
            WHERE $2::varchar[] IS NULL OR user_id = ANY($2::varchar[])
            GROUP BY user_id HAVING count(*) > $1
        )
    ) AS ranked WHERE rank > $1
) AS excess
WHERE (t.user_id, t.message_id) = (excess.user_id, excess.message_id)
"""


def _count(status: str) -> int:
    """Rows affected, from a command status such as ``INSERT 0 12`` or ``DELETE 3``."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


class Store:
    """The backlog in PostgreSQL. ``start()`` opens the pool, ``close()`` is idempotent."""

    def __init__(self, dsn: str, *, pool_size: int = 10, timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        """Create the pool; it connects lazily, so a PostgreSQL that is down now is retried."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._pool_size,
                command_timeout=self._timeout,
                timeout=self._timeout,
                reset=_keep_session,
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=self._timeout)
            except (TimeoutError, *_FAILURES):
                pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise StoreUnavailable("store is not started")
        try:
            async with self._pool.acquire(timeout=self._timeout) as connection:
                yield connection
        except _FAILURES as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    async def save(self, notifications: Sequence[Notification]) -> int:
        if not notifications:
            return 0
        columns: tuple[list[Any], ...] = ([], [], [], [], [])
        for n in notifications:
            columns[0].append(uuid.UUID(n.message_id))
            columns[1].append(n.user_id)
            columns[2].append(n.title)
            columns[3].append(n.body)
            columns[4].append(_timestamp(n.created_ms))
        async with self._connection() as connection:
            return _count(await connection.execute(_INSERT, *columns))

    async def fetch(
        self, user_id: str, after: tuple[datetime, int] | None, limit: int
    ) -> list[Stored]:
        async with self._connection() as connection:
            if after is None:
                rows = await connection.fetch(_FETCH_FIRST, user_id, limit)
            else:
                rows = await connection.fetch(_FETCH_AFTER, user_id, limit, after[0], after[1])
        return [
            Stored(
                Notification.build(
                    str(row["message_id"]),
                    row["user_id"],
                    row["title"],
                    row["body"],
                    int(row["created_at"].timestamp() * 1000),
                ),
                (row["created_at"], row["seq"]),
            )
            for row in rows
        ]

    async def delete(self, user_id: str, message_ids: Sequence[str]) -> None:
        """Remove these rows of ``user_id``; another user's row with the same id stays."""
        if not message_ids:
            return
        async with self._connection() as connection:
            await connection.execute(_DELETE, user_id, [uuid.UUID(m) for m in message_ids])

    async def expire(self, ttl_seconds: float) -> int:
        """Delete rows older than the TTL; returns how many."""
        async with self._connection() as connection:
            return _count(await connection.execute(_EXPIRE, float(ttl_seconds)))

    async def cap(self, max_per_user: int, user_ids: Collection[str] | None = None) -> int:
        """Delete the oldest rows of users over the cap; returns how many.

        ``user_ids`` limits the check to those users; None checks everyone.
        """
        users = None if user_ids is None else list(user_ids)
        async with self._connection() as connection:
            return _count(await connection.execute(_CAP, max_per_user, users))

    async def ping(self) -> None:
        """Check that PostgreSQL answers. Raises StoreUnavailable."""
        async with self._connection() as connection:
            await connection.fetchval("SELECT 1 FROM undelivered_notification LIMIT 1")


async def _keep_session(connection: Any) -> None:
    """Pool release hook: nothing to reset.

    asyncpg's default runs RESET ALL, UNLISTEN, CLOSE ALL and an advisory-unlock
    on every release, a round trip per flush on connect; this store never
    changes session state, and asyncpg still rolls back an open transaction.
    """


def _timestamp(created_ms: int) -> datetime:
    if created_ms <= 0:
        return datetime.now(UTC)
    return datetime.fromtimestamp(created_ms / 1000, UTC)


def _describe(exc: BaseException) -> str:
    # asyncpg messages name hosts and relations, never passwords.
    return f"{type(exc).__name__}: {exc}"[:300]
