"""The PostgreSQL backlog of notifications that reached no socket.

Table ``undelivered_notification`` (see ``migrations/``): the primary key is
``(user_id, message_id)``, so a Kafka redelivery never duplicates a user's row,
while one ``message_id`` sent to several users is a row for each of them. Rows
are read per user in ``(created_at, seq)`` order, oldest first.

Retention (:meth:`Store.expire`, :meth:`Store.cap`) deletes in batches of a
bounded number of rows, one short statement each, so a table with millions of
rows to drop drains without a statement that runs for minutes, holds millions of
row locks or hits a statement timeout. Given an ``on_deleted`` callback, each batch
also answers the ``(user_id, message_id)`` pairs it deleted (``RETURNING``, still one
statement per batch) for the ``expired`` status events; without one it does not, as
returning the rows makes a batch 1.5 to 3 times as slow.

Rows retention deletes are counted per user in ``notification_gap``, in the
same statement, for the next protocol v2 connection of the user
(:meth:`Store.take_gap`): every stored row is one no v2 client acknowledged.

Every method raises :class:`~service.router.StoreUnavailable` when PostgreSQL
cannot be reached or refuses, and is safe to call concurrently (asyncpg pool).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Sequence,
)
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import asyncpg

from .connection import Stored
from .notification import Notification
from .router import StoreUnavailable

log = logging.getLogger("notify.store")

_FAILURES = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

_INSERT = """
INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)
SELECT * FROM unnest($1::uuid[], $2::varchar[], $3::text[], $4::text[], $5::timestamptz[])
ON CONFLICT (user_id, message_id) DO NOTHING
"""

_FETCH_FIRST = """
SELECT message_id::text, user_id, title, body, created_at, seq FROM undelivered_notification
WHERE user_id = $1 ORDER BY created_at, seq LIMIT $2
"""

# The first page of each of many users: what the connects of one moment read, in one
# statement (``_Together``). Each user's rows through the (user_id, created_at, seq)
# index, at most $2; the caller orders each user's rows by cursor.
_FETCH_FIRST_MANY = """
SELECT t.message_id::text, t.user_id, t.title, t.body, t.created_at, t.seq
FROM unnest($1::varchar[]) AS u(user_id)
CROSS JOIN LATERAL (
    SELECT message_id, user_id, title, body, created_at, seq FROM undelivered_notification AS n
    WHERE n.user_id = u.user_id ORDER BY created_at, seq LIMIT $2
) AS t
"""

# Users one statement reads for, at most, and rows (users times the page) it may return.
_USERS_PER_FETCH = 500
_ROWS_PER_FETCH = 100_000

_Answer = TypeVar("_Answer")

_FETCH_AFTER = """
SELECT message_id::text, user_id, title, body, created_at, seq FROM undelivered_notification
WHERE user_id = $1 AND (created_at, seq) > ($3, $4) ORDER BY created_at, seq LIMIT $2
"""

_DELETE = """
DELETE FROM undelivered_notification WHERE user_id = $1 AND message_id = ANY($2::uuid[])
"""

_DELETE_ACKED = """
DELETE FROM undelivered_notification WHERE user_id = $1 AND message_id = ANY($2::uuid[])
RETURNING message_id
"""

# Rows of many users at once (``service.acked``): one statement per window of acks and
# flushed pages. Each pair is looked up through the key's index (the LATERAL with OFFSET 0
# is not flattened into a join), then deleted by its physical address: a join of the
# pairs with the table is planned as a hash join over a sequential scan of the whole
# table once a batch has a thousand pairs, 4x slower at 50,000 rows and growing with it.
_DELETE_PAIRS = """
DELETE FROM undelivered_notification
WHERE ctid = ANY(ARRAY(
    SELECT n.ctid FROM unnest($1::varchar[], $2::uuid[]) AS a(user_id, message_id)
    CROSS JOIN LATERAL (
        SELECT ctid FROM undelivered_notification AS t
        WHERE t.user_id = a.user_id AND t.message_id = a.message_id OFFSET 0
    ) AS n
))
RETURNING user_id, message_id
"""

_TAKE_GAPS = """
DELETE FROM notification_gap WHERE user_id = ANY($1::varchar[]) RETURNING user_id, dropped
"""

# Wraps a retention DELETE (which ends in ``RETURNING user_id``): adds what it deleted
# to each user's gap in the same statement, then answers with the number of rows
# deleted, or (``_PAIRS``) the pairs themselves. A data-modifying WITH runs to completion
# whatever the final SELECT reads.
_COUNTING_GAPS = """
WITH gone AS ({delete}),
per_user AS (SELECT user_id, count(*) AS dropped FROM gone GROUP BY user_id),
told AS (
    INSERT INTO notification_gap (user_id, dropped) SELECT user_id, dropped FROM per_user
    ON CONFLICT (user_id) DO UPDATE SET dropped = notification_gap.dropped + EXCLUDED.dropped
)
{answer}
"""
_COUNT = "SELECT coalesce(sum(dropped), 0)::bigint FROM per_user"
_PAIRS = "SELECT user_id, message_id FROM gone"

_EXPIRY_CUTOFF = "SELECT now() - make_interval(secs => $1)"

# One batch of expiry: the oldest $2 rows before the cutoff, found through the
# created_at index and deleted by their physical address (a TID scan).
_EXPIRE_BATCH = """
DELETE FROM undelivered_notification
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM undelivered_notification WHERE created_at < $1
    ORDER BY created_at LIMIT $2
)) AND created_at < $1
RETURNING user_id
"""

# What a retention batch returns when the pairs it deleted are wanted (``on_deleted``).
_RETURNING = "RETURNING user_id, message_id"

# Users with rows, in user_id order, $2 at a time after $1: a walk of the
# (user_id, ...) index that touches one entry per user, however many rows each has.
_USERS_FIRST = """
WITH RECURSIVE walk(user_id) AS (
    SELECT min(user_id) FROM undelivered_notification
  UNION ALL
    SELECT (SELECT min(user_id) FROM undelivered_notification WHERE user_id > walk.user_id)
    FROM walk WHERE walk.user_id IS NOT NULL
)
SELECT user_id FROM walk WHERE user_id IS NOT NULL LIMIT $1
"""

_USERS_AFTER = """
WITH RECURSIVE walk(user_id) AS (
    SELECT min(user_id) FROM undelivered_notification WHERE user_id > $1
  UNION ALL
    SELECT (SELECT min(user_id) FROM undelivered_notification WHERE user_id > walk.user_id)
    FROM walk WHERE walk.user_id IS NOT NULL
)
SELECT user_id FROM walk WHERE user_id IS NOT NULL LIMIT $2
"""

# Of these users, those with more than $2 rows, and for each the newest row that
# is over the cap: it and everything older go. Reads at most $2 + 1 index
# entries per user.
_OVER_CAP = """
SELECT u.user_id, b.created_at, b.seq
FROM unnest($1::varchar[]) AS u(user_id)
CROSS JOIN LATERAL (
    SELECT created_at, seq FROM undelivered_notification AS t
    WHERE t.user_id = u.user_id
    ORDER BY created_at DESC, seq DESC OFFSET $2 LIMIT 1
) AS b
"""

# One batch of the cap: up to $4 rows at or before each user's boundary, oldest first.
_CAP_BATCH = """
DELETE FROM undelivered_notification
WHERE ctid = ANY(ARRAY(
    SELECT excess.ctid
    FROM unnest($1::varchar[], $2::timestamptz[], $3::bigint[]) AS b(user_id, created_at, seq)
    CROSS JOIN LATERAL (
        SELECT ctid FROM undelivered_notification AS t
        WHERE t.user_id = b.user_id AND (t.created_at, t.seq) <= (b.created_at, b.seq)
        ORDER BY t.created_at, t.seq LIMIT $4
    ) AS excess
    LIMIT $4
))
RETURNING user_id
"""

# Users checked against the cap per statement: each costs up to cap + 1 index entries.
_USERS_PER_CHECK = 1000


# Told the (user_id, message_id) pairs a retention batch deleted.
OnDeleted = Callable[[list[tuple[str, str]]], None]


def _count(status: str) -> int:
    """Rows affected, from a command status such as ``INSERT 0 12`` or ``DELETE 3``."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def _stored(row: Any) -> Stored:
    """A row of the fetch statements, in their column order; ``message_id`` read as text
    (``message_id::text``: no UUID object to make and format)."""
    message_id, user_id, title, body, created_at, seq = row
    return Stored.from_row(message_id, user_id, title, body, (created_at, seq))


class _Together(Generic[_Answer]):
    """Per-user reads of many connects, done together: one statement for the connects
    of a moment instead of one each (the first page of the backlog; a v2 gap).

    A read asked for while no statement runs starts one at once (on the next turn of
    the loop, with whatever else was asked in that turn); reads asked for while one
    runs wait for it and then go together in the next, up to ``_USERS_PER_FETCH``
    users per statement and, for a ``limit`` of rows per user, no more users than keep
    it under ``_ROWS_PER_FETCH`` rows, grouped by ``limit``. Each statement runs after every read in
    it was asked for, so it sees every row written before its read was asked for: the
    same guarantee as a statement of its own. ``run(users, limit)`` answers per user
    (a user it leaves out is given ``share(None, n)``); ``share(answer, n)`` is what each
    of a user's n reads in the statement gets. A failed statement fails each of its
    reads with its error. Only for one event loop.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[str], int], Awaitable[dict[str, _Answer]]],
        share: Callable[[_Answer | None, int], list[_Answer]],
    ) -> None:
        self._name = name
        self._run = run
        self._share = share
        # By limit, then user: the reads waiting for the next statement.
        self._asked: dict[int, dict[str, list[asyncio.Future[_Answer]]]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def read(self, user_id: str, limit: int = 0) -> _Answer:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[_Answer] = loop.create_future()
        self._asked.setdefault(limit, {}).setdefault(user_id, []).append(answer)
        if self._runner is None:
            self._runner = loop.create_task(self._run_all(), name=self._name)
        return await answer

    async def _run_all(self) -> None:
        try:
            while self._asked:
                limit = next(iter(self._asked))
                asked = self._asked[limit]
                per_statement = min(_USERS_PER_FETCH, max(1, _ROWS_PER_FETCH // max(1, limit)))
                users = list(itertools.islice(asked, per_statement))
                waiting = {user: asked.pop(user) for user in users}
                if not asked:
                    del self._asked[limit]
                try:
                    answers = await self._run(users, limit)
                except Exception as exc:
                    for futures in waiting.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for user, futures in waiting.items():
                    shares = self._share(answers.get(user), len(futures))
                    for future, share in zip(futures, shares, strict=True):
                        if not future.done():
                            future.set_result(share)
        finally:
            self._runner = None
            for asked in self._asked.values():  # only when cancelled (loop shutting down)
                for futures in asked.values():
                    for future in futures:
                        future.cancel()
            self._asked.clear()


def _each_its_page(page: list[Stored] | None, readers: int) -> list[list[Stored]]:
    """Every read of the user gets the whole page (two connects of one user both flush)."""
    return [list(page or ()) for _ in range(readers)]


def _first_takes_the_gap(dropped: int | None, readers: int) -> list[int]:
    """The gap is told once: the first read takes it, as if it ran first; the others, 0."""
    return [dropped or 0] + [0] * (readers - 1)


def _cursor(stored: Stored) -> tuple[datetime, int]:
    return stored.cursor


class Store:
    """The backlog in PostgreSQL. ``start()`` opens the pool, ``close()`` is idempotent."""

    def __init__(self, dsn: str, *, pool_size: int = 10, timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._first_pages = _Together("store-first-pages", self._first_pages_of, _each_its_page)
        self._gaps = _Together("store-gaps", self._gaps_of, _first_takes_the_gap)

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
        """The user's rows after ``after``, oldest first, at most ``limit``.

        The first page (``after`` None, what every connect reads) is read together with
        the first pages other connects ask for meanwhile, in one statement.
        """
        if after is None:
            return await self._first_pages.read(user_id, limit)
        async with self._connection() as connection:
            rows = await connection.fetch(_FETCH_AFTER, user_id, limit, after[0], after[1])
        return [_stored(row) for row in rows]

    async def _first_pages_of(self, user_ids: list[str], limit: int) -> dict[str, list[Stored]]:
        async with self._connection() as connection:
            if len(user_ids) == 1:
                rows = await connection.fetch(_FETCH_FIRST, user_ids[0], limit)
            else:
                rows = await connection.fetch(_FETCH_FIRST_MANY, user_ids, limit)
        pages: dict[str, list[Stored]] = {}
        for row in rows:
            pages.setdefault(row["user_id"], []).append(_stored(row))
        for page in pages.values():
            page.sort(key=_cursor)
        return pages

    async def delete(self, user_id: str, message_ids: Sequence[str]) -> None:
        """Remove these rows of ``user_id``; another user's row with the same id stays."""
        if not message_ids:
            return
        async with self._connection() as connection:
            await connection.execute(_DELETE, user_id, [uuid.UUID(m) for m in message_ids])

    async def delete_acked(self, user_id: str, message_ids: Sequence[str]) -> list[str]:
        """Remove these rows of ``user_id`` (acknowledged by a v2 client), in one statement.

        Returns the ids whose rows existed. Another user's rows are never touched.
        """
        if not message_ids:
            return []
        async with self._connection() as connection:
            rows = await connection.fetch(
                _DELETE_ACKED, user_id, [uuid.UUID(m) for m in message_ids]
            )
        return [str(row["message_id"]) for row in rows]

    async def delete_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Remove these ``(user_id, message_id)`` rows, of any users, in one statement.

        Returns the pairs whose rows existed. Each id is a canonical UUID (the client
        frames' parser refuses others).
        """
        if not pairs:
            return []
        users = [user_id for user_id, _ in pairs]
        ids = [uuid.UUID(message_id) for _, message_id in pairs]
        async with self._connection() as connection:
            rows = await connection.fetch(_DELETE_PAIRS, users, ids)
        return [(row["user_id"], str(row["message_id"])) for row in rows]

    async def take_gap(self, user_id: str) -> int:
        """How many of the user's rows retention dropped since the last call; resets it.

        Taken in one statement with the gaps other v2 connects ask for meanwhile.
        """
        return await self._gaps.read(user_id)

    async def _gaps_of(self, user_ids: list[str], _: int) -> dict[str, int]:
        async with self._connection() as connection:
            rows = await connection.fetch(_TAKE_GAPS, user_ids)
        return {row["user_id"]: int(row["dropped"]) for row in rows}

    async def expire(
        self, ttl_seconds: float, batch: int, on_deleted: OnDeleted | None = None
    ) -> AsyncGenerator[int, None]:
        """Delete rows older than the TTL, oldest first, at most ``batch`` per statement.

        Yields the number deleted by each statement, and ends after the first one
        that found fewer than ``batch``. ``on_deleted``, if given, is called with the
        ``(user_id, message_id)`` pairs of each statement before it is yielded. The
        cutoff is fixed when it starts, so it ends even while rows keep arriving. Each
        statement takes a pool connection of its own: stopping between two yields
        (``aclose``) leaves nothing open.
        """
        async with self._connection() as connection:
            cutoff = await connection.fetchval(_EXPIRY_CUTOFF, float(ttl_seconds))
        while True:
            deleted = await self._delete(_EXPIRE_BATCH, (cutoff, batch), on_deleted)
            yield deleted
            if deleted < batch:
                return

    async def cap(
        self,
        max_per_user: int,
        user_ids: Collection[str] | None,
        batch: int,
        on_deleted: OnDeleted | None = None,
    ) -> AsyncGenerator[int, None]:
        """Delete the oldest rows of users over the cap, at most ``batch`` per statement.

        ``user_ids`` limits the check to those users; None checks everyone, walking
        the users in order. Yields the number deleted by each statement; a statement
        reads at most ``max_per_user + 1`` index entries per user it checks.
        ``on_deleted`` as for :meth:`expire`.
        """
        async for users in self._users(user_ids):
            async with self._connection() as connection:
                over = await connection.fetch(_OVER_CAP, users, max_per_user)
            if not over:
                continue
            bounds = (
                [row["user_id"] for row in over],
                [row["created_at"] for row in over],
                [row["seq"] for row in over],
            )
            while True:
                deleted = await self._delete(_CAP_BATCH, (*bounds, batch), on_deleted)
                yield deleted
                if deleted < batch:
                    break

    async def _delete(
        self, statement: str, arguments: tuple[Any, ...], on_deleted: OnDeleted | None
    ) -> int:
        """Run one retention batch; the number of rows it deleted, told to ``on_deleted``."""
        async with self._connection() as connection:
            if on_deleted is None:
                counting = _COUNTING_GAPS.format(delete=statement, answer=_COUNT)
                return int(await connection.fetchval(counting, *arguments))
            returning = statement.replace("RETURNING user_id", _RETURNING)
            pairs = _COUNTING_GAPS.format(delete=returning, answer=_PAIRS)
            rows = await connection.fetch(pairs, *arguments)
        on_deleted([(row["user_id"], str(row["message_id"])) for row in rows])
        return len(rows)

    async def _users(self, user_ids: Collection[str] | None) -> AsyncIterator[list[str]]:
        """The users to check against the cap, ``_USERS_PER_CHECK`` at a time."""
        if user_ids is not None:
            ordered = sorted(user_ids)
            for start in range(0, len(ordered), _USERS_PER_CHECK):
                yield ordered[start : start + _USERS_PER_CHECK]
            return
        last: str | None = None
        while True:
            async with self._connection() as connection:
                if last is None:
                    rows = await connection.fetch(_USERS_FIRST, _USERS_PER_CHECK)
                else:
                    rows = await connection.fetch(_USERS_AFTER, last, _USERS_PER_CHECK)
            users = [row["user_id"] for row in rows]
            if users:
                yield users
            if len(users) < _USERS_PER_CHECK:
                return
            last = users[-1]

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
    """The row's ``created_at`` for a Kafka timestamp: never raises, for any int.

    A timestamp that is missing (zero or negative) or in the future is taken as
    now: a time past year 9999 cannot be represented, and a row dated ahead of
    the clock would be read out of order and outlive ``BACKLOG_TTL``.
    """
    now_ms = time.time() * 1000
    if created_ms <= 0 or created_ms > now_ms:
        return datetime.fromtimestamp(now_ms / 1000, UTC)
    return datetime.fromtimestamp(created_ms / 1000, UTC)


def _describe(exc: BaseException) -> str:
    # asyncpg messages name hosts and relations, never passwords.
    return f"{type(exc).__name__}: {exc}"[:300]
