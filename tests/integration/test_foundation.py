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
        await store.delete([first.message_id])
        assert [r.notification.title for r in await store.fetch("u1", None, 10)] == ["second"]
        assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 2
    finally:
        await store.close()
