"""Delivery status events on the real Kafka, from a real gateway with STATUS_TOPIC set."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from websockets.asyncio.client import connect

from dev.auth_server import AuthStandIn

from .clients import message, receive, wait_connections, wait_stored
from .conftest import GatewayFactory

Event = dict[str, Any]


@pytest.fixture
async def status_topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A fresh status topic of three partitions for this test."""
    name = f"notification.status.test-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


async def status_events(
    bootstrap: str, topic: str, wanted: list[tuple[str | None, str | None, str]]
) -> list[tuple[bytes | None, Event]]:
    """Every ``(key, record)`` on the topic, read until each wanted ``(user_id,
    message_id, status)`` was seen (30 s at most) and a moment more for stragglers."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    found: list[tuple[bytes | None, Event]] = []
    try:

        def seen() -> set[tuple[str | None, str | None, str]]:
            return {(e["user_id"], e["message_id"], e["status"]) for _, e in found}

        async with asyncio.timeout(30):
            while not set(wanted) <= seen():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    found.extend((r.key, json.loads(r.value)) for r in records)
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            found.extend((r.key, json.loads(r.value)) for r in records)
    finally:
        await consumer.stop()
    return found


async def test_poison_late_and_retained_notifications_are_reported_on_the_status_topic(
    gateway_factory: GatewayFactory,
    topics: tuple[str, str],
    status_topic: str,
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
    kafka_bootstrap: str,
) -> None:
    """A poison record gives ``dead_lettered``; a record past the TTL, a stored row past
    it and a row over the per-user cap give ``expired``; each keyed by its user."""
    # A row stored two hours ago, past the TTL of one hour: retention deletes it.
    old_row = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)"
        " VALUES ($1, 'sleeper', 't', 'b', $2)",
        uuid.UUID(old_row),
        datetime.now(UTC) - timedelta(hours=2),
    )
    gateway = gateway_factory(
        STATUS_TOPIC=status_topic,
        BACKLOG_TTL="1h",
        BACKLOG_MAX_PER_USER="2",
        BACKLOG_CLEANUP_INTERVAL="200ms",
    )
    late = message("latecomer")
    await producer.send_and_wait(
        topics[0],
        json.dumps(late).encode(),
        key=b"k",
        timestamp_ms=int((time.time() - 2 * 3600) * 1000),
    )
    unreadable_id = {**message("bob"), "message_id": "nope"}
    await producer.send_and_wait(topics[0], json.dumps(unreadable_id).encode(), key=b"k")
    await producer.send_and_wait(topics[0], b"{not json", key=b"k")
    hoard = [message("hoarder", f"n{n}") for n in range(3)]
    for value in hoard:
        await producer.send_and_wait(topics[0], json.dumps(value).encode(), key=b"k")

    wanted: list[tuple[str | None, str | None, str]] = [
        ("latecomer", late["message_id"], "expired"),
        ("bob", None, "dead_lettered"),
        (None, None, "dead_lettered"),
        ("sleeper", old_row, "expired"),
        ("hoarder", hoard[0]["message_id"], "expired"),
    ]
    found = await status_events(kafka_bootstrap, status_topic, wanted)

    assert {(e["user_id"], e["message_id"], e["status"]) for _, e in found} >= set(wanted)
    for key, event in found:
        assert key == (event["user_id"].encode() if event["user_id"] is not None else None)
        assert set(event) == {"message_id", "user_id", "status", "at"}
        assert abs(event["at"] - time.time() * 1000) < 600_000
    kept = {(e["user_id"], e["message_id"]) for _, e in found if e["status"] == "expired"}
    assert ("hoarder", hoard[1]["message_id"]) not in kept
    assert ("hoarder", hoard[2]["message_id"]) not in kept
    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert 'notify_status_events_total{outcome="produced"}' in metrics
    assert 'notify_status_events_total{outcome="failed"}' not in metrics
    # With the sink, SIGTERM still drains and exits cleanly, nothing left unsent.
    assert gateway.stop() == 0
    assert "status_events_unsent" not in gateway.logs()


async def test_an_offline_users_notification_is_reported_stored(
    gateway_factory: GatewayFactory,
    topics: tuple[str, str],
    status_topic: str,
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
    kafka_bootstrap: str,
) -> None:
    """A notification for a user with no connection is saved and reported ``stored``."""
    gateway_factory(STATUS_TOPIC=status_topic)
    value = message("offline")
    await producer.send_and_wait(topics[0], json.dumps(value).encode(), key=b"k")
    await wait_stored(db, 1)
    found = await status_events(
        kafka_bootstrap, status_topic, [("offline", value["message_id"], "stored")]
    )
    assert [(k, e["status"]) for k, e in found] == [(b"offline", "stored")]


async def test_a_v1_clients_notification_is_reported_written(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    status_topic: str,
    producer: AIOKafkaProducer,
    kafka_bootstrap: str,
) -> None:
    """A notification a v1 connection's socket took is reported ``written``, not stored."""
    gateway = gateway_factory(STATUS_TOPIC=status_topic)
    value = message("online")
    async with connect(gateway.ws_url(auth_server.issue("online"))) as ws:
        # Registered first: a notification that comes before is stored, then flushed.
        await wait_connections(gateway.base, 1)
        await producer.send_and_wait(topics[0], json.dumps(value).encode(), key=b"k")
        assert await receive(ws, 1) == [{"title": "s", "body": "c"}]
    found = await status_events(
        kafka_bootstrap, status_topic, [("online", value["message_id"], "written")]
    )
    assert [(k, e["status"]) for k, e in found] == [(b"online", "written")]
