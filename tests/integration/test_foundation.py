"""The real services the gateway stands on: Kafka's own tools, PostgreSQL and the migration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from service.notification import Notification
from service.store import Store

from .clients import console_produce
from .gateway import ROOT


async def test_console_producer_line_is_read_back_by_aiokafka(
    kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    """A line typed into Kafka's console producer arrives intact at an aiokafka consumer."""
    line = '{"hello": "мир", "n": 1}'
    await console_produce(kafka_bootstrap, topics[0], line)
    consumer = AIOKafkaConsumer(
        topics[0], bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
    assert record.value == line.encode()


@pytest.fixture
async def scratch_database(database_url: str) -> AsyncIterator[str]:
    """An empty database of its own, so migrating down never disturbs other tests."""
    name = f"notify_migration_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield database_url.rsplit("/", 1)[0] + "/" + name
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


def _alembic(database_url: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
        capture_output=True,
    )


async def _tables(database_url: str) -> set[str]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await connection.close()
    return {row["tablename"] for row in rows}


async def test_migrations_go_up_down_and_up_again(scratch_database: str) -> None:
    """upgrade head creates the backlog table, downgrade base removes it, upgrade works again."""
    await asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")
    assert "undelivered_notification" in await _tables(scratch_database)
    await asyncio.to_thread(_alembic, scratch_database, "downgrade", "base")
    assert "undelivered_notification" not in await _tables(scratch_database)
    await asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")
    assert "undelivered_notification" in await _tables(scratch_database)


async def test_store_round_trips_rows_through_postgresql(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Saved notifications come back oldest first, a duplicate id adds no row, delete removes."""
    store = Store(database_url)
    await store.start()
    try:
        first = Notification.build(str(uuid.uuid4()), "u1", "first", "тело", 1_700_000_000_000)
        second = Notification.build(str(uuid.uuid4()), "u1", "second", "b", 1_700_000_001_000)
        other = Notification.build(str(uuid.uuid4()), "u2", "other", "b", 1_700_000_000_500)
        assert await store.save([second, first, other]) == 3
        assert await store.save([first]) == 0, "Kafka redelivery does not duplicate a row"
        rows = await store.fetch("u1", None, 10)
        assert [r.notification for r in rows] == [first, second]
        assert await store.fetch("u1", rows[0].cursor, 10) == rows[1:]
        await store.delete("u1", [first.message_id])
        assert [r.notification.title for r in await store.fetch("u1", None, 10)] == ["second"]
        assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 2
    finally:
        await store.close()


def _alembic_output(database_url: str, *args: str) -> str:
    """Run alembic as an operator would; its log (stderr), raising if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stderr


async def _key_and_indexes(db: asyncpg.Connection) -> tuple[list[str], set[str]]:
    key = await db.fetch(
        """
        SELECT a.attname FROM pg_index i
        JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = 'undelivered_notification'::regclass AND i.indisprimary
        ORDER BY k.n
        """
    )
    indexes = await db.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'undelivered_notification'"
    )
    return [r["attname"] for r in key], {r["indexname"] for r in indexes}


_INSERT_ROW = """
INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)
VALUES ($1, $2, $3, 'b', now() - make_interval(secs => $4))
"""


async def test_upgrade_keys_existing_rows_by_user_and_message_id(scratch_database: str) -> None:
    """`alembic upgrade head` over a filled 0001 table keeps every row and keys it per user."""
    await asyncio.to_thread(_alembic, scratch_database, "upgrade", "0001")
    db = await asyncpg.connect(scratch_database)
    try:
        rows = [(uuid.uuid4(), f"user-{i % 5}", f"t{i}", 100 - i) for i in range(100)]
        await db.executemany(_INSERT_ROW, rows)
        before = await db.fetch("SELECT * FROM undelivered_notification ORDER BY seq")
        await asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")

        key, indexes = await _key_and_indexes(db)
        assert key == ["user_id", "message_id"]
        assert {
            "ix_undelivered_notification_user_order",  # flush order
            "ix_undelivered_notification_created_at",  # expiry
        } <= indexes
        assert await db.fetch("SELECT * FROM undelivered_notification ORDER BY seq") == before
        shared = rows[0][0]
        await db.execute(_INSERT_ROW, shared, "someone-else", "shared", 0)
        assert (
            await db.fetchval(
                "SELECT count(*) FROM undelivered_notification WHERE message_id = $1", shared
            )
            == 2
        )
    finally:
        await db.close()


async def test_upgrade_runs_while_the_gateway_writes(scratch_database: str) -> None:
    """On a live table, writes go on while the key is rebuilt: none fails, none is lost."""
    await asyncio.to_thread(_alembic, scratch_database, "upgrade", "0001")
    db = await asyncpg.connect(scratch_database)
    await db.execute(
        """
        INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)
        SELECT gen_random_uuid(), 'u' || (i % 100), 't', 'b', now()
        FROM generate_series(1, 50000) AS i
        """
    )
    written = 0
    upgrading = asyncio.create_task(
        asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")
    )
    try:
        while not upgrading.done():
            # The gateway's insert: no conflict target, so it fits either key.
            await db.execute(
                "INSERT INTO undelivered_notification (message_id, user_id, title, body, "
                "created_at) VALUES ($1, 'live', 't', 'b', now()) ON CONFLICT DO NOTHING",
                uuid.uuid4(),
            )
            written += 1
        await upgrading
        assert written > 0
        assert (
            await db.fetchval(
                "SELECT count(*) FROM undelivered_notification WHERE user_id = 'live'"
            )
            == written
        )
        assert (await _key_and_indexes(db))[0] == ["user_id", "message_id"]
    finally:
        await db.close()


async def test_upgrade_after_an_interrupted_attempt_succeeds(scratch_database: str) -> None:
    """An index left behind by an attempt that failed half-way does not block the next one."""
    await asyncio.to_thread(_alembic, scratch_database, "upgrade", "0001")
    db = await asyncpg.connect(scratch_database)
    try:
        await db.execute(
            "CREATE INDEX ix_undelivered_notification_user_message "
            "ON undelivered_notification (user_id)"
        )
        await asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")
        assert (await _key_and_indexes(db))[0] == ["user_id", "message_id"]
    finally:
        await db.close()


async def test_downgrade_with_a_shared_id_keeps_the_oldest_row_and_says_so(
    scratch_database: str,
) -> None:
    """`alembic downgrade 0001` succeeds with one id stored for three users: the oldest row stays.

    The old key allows one row per message_id, so the other users' rows are deleted
    and the count is logged; rows of unshared ids are untouched.
    """
    await asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")
    db = await asyncpg.connect(scratch_database)
    try:
        shared = uuid.uuid4()
        await db.executemany(
            _INSERT_ROW,
            [
                (shared, "bob", "shared", 20),
                (shared, "alice", "shared", 30),  # the oldest
                (shared, "carol", "shared", 10),
                *((uuid.uuid4(), f"user-{i}", f"t{i}", i) for i in range(10)),
            ],
        )
        log = await asyncio.to_thread(_alembic_output, scratch_database, "downgrade", "0001")
        assert "deleted 2 rows" in log

        assert (await _key_and_indexes(db))[0] == ["message_id"]
        assert await db.fetch(
            "SELECT user_id FROM undelivered_notification WHERE message_id = $1", shared
        ) == [("alice",)]
        assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 11
        await asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")
        assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 11
    finally:
        await db.close()


async def test_gap_table_goes_up_and_down_with_rows_in_it(scratch_database: str) -> None:
    """0003 adds notification_gap over a filled backlog without touching it; down drops the
    table (and the counts not yet told) and leaves the backlog as it was."""
    await asyncio.to_thread(_alembic, scratch_database, "upgrade", "0002")
    db = await asyncpg.connect(scratch_database)
    try:
        rows = [(uuid.uuid4(), f"user-{i % 3}", f"t{i}", 10 - i) for i in range(10)]
        await db.executemany(_INSERT_ROW, rows)
        before = await db.fetch("SELECT * FROM undelivered_notification ORDER BY seq")
        await asyncio.to_thread(_alembic, scratch_database, "upgrade", "0003")
        await db.execute("INSERT INTO notification_gap (user_id, dropped) VALUES ('user-1', 4)")
        assert await db.fetchval("SELECT dropped FROM notification_gap") == 4
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute("INSERT INTO notification_gap (user_id, dropped) VALUES ('u', 0)")
        await asyncio.to_thread(_alembic, scratch_database, "downgrade", "0002")
        assert "notification_gap" not in await _tables(scratch_database)
        assert await db.fetch("SELECT * FROM undelivered_notification ORDER BY seq") == before
        await asyncio.to_thread(_alembic, scratch_database, "upgrade", "head")
        assert await db.fetchval("SELECT count(*) FROM notification_gap") == 0
    finally:
        await db.close()
