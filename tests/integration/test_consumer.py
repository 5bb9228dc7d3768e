"""Kafka input: poison messages, other delivery methods, restarts between produce and consume."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from websockets.asyncio.client import connect

from dev.auth_server import AuthStandIn

from .clients import message, produce, receive, silent, wait_stored
from .conftest import GatewayFactory
from .gateway import Gateway

POISON: dict[str, bytes] = {
    "invalid_json": b"{not json",
    "invalid_json_utf8": b'{"subject": "\xff\xfe"}',
    "not_an_object": b"[1, 2, 3]",
    "missing_delivery_method": json.dumps({"message_id": str(uuid.uuid4())}).encode(),
    "missing_user_id": json.dumps(
        {"message_id": str(uuid.uuid4()), "delivery_method": "push", "subject": "s", "content": "c"}
    ).encode(),
    "invalid_message_id": json.dumps(
        {
            "message_id": "nope",
            "delivery_method": "push",
            "user_id": "u",
            "subject": "s",
            "content": "c",
        }
    ).encode(),
    "invalid_subject": json.dumps(
        {
            "message_id": str(uuid.uuid4()),
            "delivery_method": "push",
            "user_id": "u",
            "subject": 5,
            "content": "c",
        }
    ).encode(),
    "too_large": json.dumps(
        {
            "message_id": str(uuid.uuid4()),
            "delivery_method": "push",
            "user_id": "u",
            "subject": "s",
            "content": "x" * 70_000,
        }
    ).encode(),
    "deep": b"[" * 5000 + b"]" * 5000,
}


async def _dead_letters(
    bootstrap: str, topic: str, count: int
) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    found: list[tuple[bytes, dict[str, bytes]]] = []
    try:
        async with asyncio.timeout(30):
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    found.extend((r.value, dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return found


async def test_poison_messages_go_to_the_dlq_and_the_partition_moves_on(
    gateway: Gateway,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    kafka_bootstrap: str,
) -> None:
    """Every kind of bad value lands in the DLQ with its reason; the next good one is delivered."""
    async with connect(gateway.ws_url(auth_server.issue("u"))) as ws:
        for value in POISON.values():
            await producer.send_and_wait(topics[0], value, key=b"same-partition")
        await producer.send_and_wait(
            topics[0], json.dumps(message("u", "after", "poison")).encode(), key=b"same-partition"
        )
        assert await receive(ws, 1) == [{"title": "after", "body": "poison"}]
        assert await silent(ws, 0.5), "poison is never delivered"
    dead = await _dead_letters(kafka_bootstrap, topics[1], len(POISON))
    # An oversized value is kept as its first 64 KiB, with its size in a header.
    expected = [v if len(v) <= 64 * 1024 else v[: 64 * 1024] for v in POISON.values()]
    assert sorted(value for value, _ in dead) == sorted(expected)
    large = [h for _, h in dead if h["notify-error"] == b"too_large"]
    assert large[0]["notify-original-size"] == str(len(POISON["too_large"])).encode()
    reasons = {headers["notify-error"].decode() for _, headers in dead}
    assert {
        "invalid_json",
        "not_an_object",
        "missing_delivery_method",
        "missing_user_id",
        "invalid_message_id",
        "invalid_subject",
        "too_large",
    } <= reasons
    assert all(b"/" in headers["notify-source"] for _, headers in dead)
    assert "poison_message" in gateway.logs()


async def test_other_delivery_methods_are_skipped(
    gateway: Gateway,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """An e-mail notification is neither delivered nor stored; the next push one is."""
    async with connect(gateway.ws_url(auth_server.issue("u"))) as ws:
        await produce(producer, topics[0], message("u", delivery_method="email"))
        await produce(producer, topics[0], message("offline", delivery_method="sms"))
        assert await silent(ws, 1.0)
        await produce(producer, topics[0], message("u", "push", "yes"))
        assert await receive(ws, 1) == [{"title": "push", "body": "yes"}]
    assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 0


async def test_restart_between_produce_and_consume_loses_nothing(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """Messages produced while the gateway is down are all delivered after it starts, once each."""
    first = gateway_factory()
    first.stop()
    users = [f"user-{i}" for i in range(20)]
    sent = [message(user, subject=f"{user}-{n}") for user in users for n in range(10)]
    await produce(producer, topics[0], *sent)

    second = gateway_factory(KAFKA_GROUP_ID=first.env["KAFKA_GROUP_ID"])
    await wait_stored(db, len(sent), timeout=30)
    # The same group and offsets again: Kafka redelivery must not duplicate rows.
    second.kill()
    await db.execute("SELECT 1")
    third = gateway_factory(KAFKA_GROUP_ID=first.env["KAFKA_GROUP_ID"])
    assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == len(sent)

    received: list[str] = []
    for user in users:
        async with connect(third.ws_url(auth_server.issue(user))) as ws:
            received += [f["title"] for f in await receive(ws, 10)]
    assert sorted(received) == sorted(m["subject"] for m in sent)


async def test_backlog_retention_caps_per_user_and_drops_old_records(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """Only the newest BACKLOG_MAX_PER_USER rows stay; records older than the TTL are dropped."""
    gateway = gateway_factory(
        BACKLOG_MAX_PER_USER="3", BACKLOG_CLEANUP_INTERVAL="200ms", BACKLOG_TTL="1h"
    )
    stale_ms = int((time.time() - 2 * 3600) * 1000)
    await producer.send_and_wait(
        topics[0], json.dumps(message("hoarder", "stale")).encode(), key=b"k", timestamp_ms=stale_ms
    )
    for n in range(6):
        await producer.send_and_wait(
            topics[0], json.dumps(message("hoarder", f"n{n}")).encode(), key=b"k"
        )
    async with asyncio.timeout(20):
        while True:
            titles = [
                r["title"]
                for r in await db.fetch(
                    "SELECT title FROM undelivered_notification ORDER BY created_at, seq"
                )
            ]
            if titles == ["n3", "n4", "n5"]:
                break
            await asyncio.sleep(0.1)
    async with connect(gateway.ws_url(auth_server.issue("hoarder"))) as ws:
        assert [f["title"] for f in await receive(ws, 3)] == ["n3", "n4", "n5"]
        assert await silent(ws, 0.5)
    metrics = httpx.get(f"{gateway.base}/metrics").text
    assert 'notify_notifications_expired_total{cause="ttl_on_consume"} 1.0' in metrics
    assert 'notify_notifications_expired_total{cause="per_user_cap"} 3.0' in metrics
