"""The backlog in the real PostgreSQL: its key per user, and retention in bounded batches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import pytest

from service.notification import Notification
from service.store import Store

from .conftest import GatewayFactory


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


async def test_expiry_deletes_in_batches_and_keeps_recent_rows(
    store: Store, db: asyncpg.Connection
) -> None:
    """5,000 expired rows go in statements of at most 100; rows younger than the TTL stay."""
    await _insert(db, "old", 5_000, timedelta(days=2))
    await _insert(db, "new", 300, timedelta(0))
    batches = [deleted async for deleted in store.expire(24 * 3600, 100)]
    assert sum(batches) == 5_000
    assert max(batches) <= 100
    assert len(batches) >= 50
    remaining = await db.fetchval("SELECT count(*) FROM undelivered_notification")
    assert remaining == 300
    assert (
        await db.fetchval(
            "SELECT count(*) FROM undelivered_notification WHERE user_id LIKE 'old-%'"
        )
        == 0
    )


async def test_retention_tells_which_rows_it_deleted_when_asked(
    store: Store, db: asyncpg.Connection
) -> None:
    """With ``on_deleted``, expiry and the cap report the ``(user_id, message_id)`` of every
    row they deleted, batch by batch, and of no other."""
    await _insert(db, "old", 250, timedelta(days=2))
    await _insert(db, "new", 7 * 4, timedelta(hours=1))
    expected_old = await _pairs(db, "user_id LIKE 'old-%'")
    told: list[list[tuple[str, str]]] = []
    counts = [n async for n in store.expire(24 * 3600, 100, told.append)]
    assert [len(pairs) for pairs in told] == counts
    assert {pair for pairs in told for pair in pairs} == expected_old

    oldest = await _pairs(
        db,
        "ctid IN (SELECT DISTINCT ON (user_id) ctid FROM undelivered_notification"
        " ORDER BY user_id, created_at, seq)",
    )
    told.clear()
    assert sum([n async for n in store.cap(3, None, 100, told.append)]) == 7
    assert {pair for pairs in told for pair in pairs} == oldest


async def test_expiry_stopped_between_batches_deletes_the_rest_next_time(
    store: Store, db: asyncpg.Connection
) -> None:
    """A pass cut short (``aclose``) leaves no lock behind; the next pass finishes the work."""
    await _insert(db, "old", 1_000, timedelta(days=2))
    batches = store.expire(24 * 3600, 100)
    assert await anext(batches) == 100
    await batches.aclose()
    assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 900
    assert sum([deleted async for deleted in store.expire(24 * 3600, 100)]) == 900


async def test_cap_keeps_each_users_newest_rows_in_batches(
    store: Store, db: asyncpg.Connection
) -> None:
    """Over the cap, a user's oldest rows go, at most ``batch`` per statement; others stay."""
    await _insert(db, "hoarder", 7 * 400, timedelta(hours=1))  # 7 users of 400 rows
    await _insert(db, "light", 7 * 3, timedelta(hours=1))  # 7 users of 3 rows
    newest = {
        r["user_id"]: r["titles"]
        for r in await db.fetch(
            """
            SELECT user_id, array_agg(title ORDER BY created_at DESC, seq DESC) AS titles
            FROM undelivered_notification GROUP BY user_id
            """
        )
    }
    batches = [deleted async for deleted in store.cap(250, None, 100)]
    assert sum(batches) == 7 * 150
    assert max(batches) <= 100
    after = {
        r["user_id"]: r["titles"]
        for r in await db.fetch(
            """
            SELECT user_id, array_agg(title ORDER BY created_at DESC, seq DESC) AS titles
            FROM undelivered_notification GROUP BY user_id
            """
        )
    }
    assert after == {user: titles[:250] for user, titles in newest.items()}


async def test_cap_walks_every_user_when_asked_for_all(
    store: Store, db: asyncpg.Connection
) -> None:
    """With no user list, more users than one check takes are all capped."""
    await db.execute(
        """
        INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)
        SELECT gen_random_uuid(), 'u' || (i % 2500), 't', 'b', now() - make_interval(secs => i)
        FROM generate_series(1, 7500) AS i
        """
    )
    assert sum([deleted async for deleted in store.cap(1, None, 1000)]) == 5000
    assert await db.fetchval("SELECT count(DISTINCT user_id) FROM undelivered_notification") == 2500
    assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 2500


async def test_cap_of_listed_users_leaves_the_others_alone(
    store: Store, db: asyncpg.Connection
) -> None:
    """Checking only the users stored to since the last pass touches no one else."""
    await _insert(db, "a", 7 * 5, timedelta(hours=1))
    assert sum([d async for d in store.cap(2, ["a-1", "a-2", "nobody"], 100)]) == 6
    counts = dict(
        await db.fetch("SELECT user_id, count(*) FROM undelivered_notification GROUP BY user_id")
    )
    assert counts == {"a-0": 5, "a-1": 2, "a-2": 2, "a-3": 5, "a-4": 5, "a-5": 5, "a-6": 5}


async def test_a_gateway_far_behind_on_retention_catches_up_without_waiting_the_interval(
    gateway_factory: GatewayFactory, db: asyncpg.Connection
) -> None:
    """5,000 expired rows, 10 per statement, a 1 h interval: all go in passes a second apart.

    A pass runs at most 100 statements, so this takes five passes; the gateway
    starts the next one after a second because the last was cut short, not an hour later.
    """
    await _insert(db, "old", 5_000, timedelta(days=2))
    await _insert(db, "new", 70, timedelta(0))
    gateway = gateway_factory(BACKLOG_TTL="1d", BACKLOG_CLEANUP_INTERVAL="1h", RETENTION_BATCH="10")
    async with asyncio.timeout(120):
        while await db.fetchval(
            "SELECT count(*) FROM undelivered_notification WHERE user_id LIKE 'old-%'"
        ):
            await asyncio.sleep(0.2)
    assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 70
    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert 'notify_notifications_expired_total{cause="ttl"} 5000.0' in metrics


async def test_retention_counts_what_it_drops_per_user_for_the_next_v2_connection(
    store: Store, db: asyncpg.Connection
) -> None:
    """Expiry and the cap add each user's dropped rows to its gap; taking it resets it."""
    users = f"gap{uuid.uuid4().hex[:6]}"
    await db.execute("DELETE FROM notification_gap WHERE user_id LIKE $1 || '%'", users)
    await _insert(db, users, 70, timedelta(days=2))  # 10 rows for each of 7 users, expired
    await _insert(db, users, 35, timedelta(0))  # then 5 fresh rows each
    assert sum([d async for d in store.expire(24 * 3600, 16)]) == 70
    assert sum([d async for d in store.cap(2, None, 4)]) == 21
    assert [await store.take_gap(f"{users}-{i}") for i in range(7)] == [13] * 7
    assert await store.take_gap(f"{users}-0") == 0, "told once"


async def test_an_ack_deletes_only_the_acking_users_rows_in_one_statement(
    store: Store, db: asyncpg.Connection
) -> None:
    """``delete_acked`` removes the user's rows among the ids and names them; others stay."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    await store.save([Notification.build(i, "alice", "t", "b", 0) for i in ids])
    await store.save([Notification.build(ids[0], "bob", "t", "b", 0)])
    deleted = await store.delete_acked("alice", [ids[0], ids[1], str(uuid.uuid4())])
    assert sorted(deleted) == sorted(ids[:2])
    assert await store.delete_acked("mallory", ids) == []
    assert sorted(await _rows(db)) == [("alice", ids[2]), ("bob", ids[0])]


async def test_acked_rows_of_several_users_are_deleted_in_one_statement(
    store: Store, db: asyncpg.Connection
) -> None:
    """``delete_pairs`` removes exactly the named (user, id) rows of any users and names
    them; a pair with no row, or another user's row with the same id, is left alone."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    await store.save([Notification.build(i, "alice", "t", "b", 0) for i in ids])
    await store.save([Notification.build(ids[0], "bob", "t", "b", 0)])
    await store.save([Notification.build(ids[1], "carol", "t", "b", 0)])
    pairs = [("alice", ids[0]), ("carol", ids[1]), ("bob", ids[2]), ("alice", ids[0])]
    deleted = await store.delete_pairs(pairs)
    assert sorted(deleted) == sorted([("alice", ids[0]), ("carol", ids[1])])
    assert sorted(await _rows(db)) == sorted(
        [("alice", ids[1]), ("alice", ids[2]), ("bob", ids[0])]
    )
    assert await store.delete_pairs([]) == []


async def _pairs(db: asyncpg.Connection, where: str) -> set[tuple[str, str]]:
    rows = await db.fetch(f"SELECT user_id, message_id FROM undelivered_notification WHERE {where}")
    return {(r["user_id"], str(r["message_id"])) for r in rows}


async def test_connects_read_together_each_get_their_own_first_page_in_order(
    store: Store, db: asyncpg.Connection
) -> None:
    """First pages read in one statement: each user its oldest rows, in order, at most the
    page, then the rest after its cursor; users with nothing get nothing."""
    users = f"page{uuid.uuid4().hex[:6]}"
    await _insert(db, users, 7 * 5, timedelta(0))  # 5 rows for each of 7 users
    asked = [f"{users}-{i}" for i in range(7)] + [f"{users}-none", f"{users}-0"]
    pages = await asyncio.gather(*(store.fetch(user, None, 3) for user in asked))
    for user, page in zip(asked, pages, strict=True):
        expected = await db.fetch(
            "SELECT title FROM undelivered_notification WHERE user_id = $1 "
            "ORDER BY created_at, seq",
            user,
        )
        titles = [row["title"] for row in expected]
        assert [s.notification.title for s in page] == titles[:3]
        assert {s.notification.user_id for s in page} <= {user}
        if page:
            rest = await store.fetch(user, page[-1].cursor, 10)
            assert [s.notification.title for s in rest] == titles[3:]
