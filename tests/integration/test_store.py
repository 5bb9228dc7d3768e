"""The backlog in the real PostgreSQL: its key per user, and retention in bounded batches."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from service.notification import Notification
from service.store import Store


@pytest.fixture
async def store(database_url: str, db: asyncpg.Connection) -> AsyncIterator[Store]:
    """A started store on the test database; its table is emptied by ``db``."""
    backlog = Store(database_url)
    await backlog.start()
    yield backlog
    await backlog.close()


async def _rows(db: asyncpg.Connection) -> list[tuple[str, str]]:
    records = await db.fetch(
        "SELECT user_id, message_id::text FROM undelivered_notification ORDER BY user_id"
    )
    return [(r["user_id"], r["message_id"]) for r in records]


async def _insert(db: asyncpg.Connection, users: str, count: int, age: timedelta) -> None:
    """``count`` rows for users ``<users>-<n % 7>``, created ``age`` ago, a second apart."""
    await db.execute(
        """
        INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)
        SELECT gen_random_uuid(), $1 || '-' || (i % 7), 't' || i, 'b',
               now() - $2::interval - make_interval(secs => $3 - i)
        FROM generate_series(1, $3) AS i
        """,
        users,
        age,
        count,
    )


async def test_one_message_id_is_a_row_for_each_user(store: Store, db: asyncpg.Connection) -> None:
    """The same id for two users is stored twice; a redelivery to one of them adds nothing."""
    message_id = str(uuid.uuid4())
    alice = Notification.build(message_id, "alice", "hi", "b", 1_700_000_000_000)
    bob = Notification.build(message_id, "bob", "hi", "b", 1_700_000_000_000)
    assert await store.save([alice, bob]) == 2
    assert await store.save([bob, alice, bob]) == 0, "a redelivery is no new row"
    assert [s.notification for s in await store.fetch("bob", None, 10)] == [bob]
    assert await _rows(db) == [("alice", message_id), ("bob", message_id)]


async def test_deleting_one_users_row_keeps_another_users_row_with_the_same_id(
    store: Store, db: asyncpg.Connection
) -> None:
    """Delivered to alice, the shared id leaves alice's backlog only."""
    message_id = str(uuid.uuid4())
    await store.save(
        [Notification.build(message_id, user, "hi", "b", 0) for user in ("alice", "bob")]
    )
    await store.delete("alice", [message_id])
    assert await _rows(db) == [("bob", message_id)]
