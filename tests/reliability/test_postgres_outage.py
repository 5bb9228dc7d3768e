"""Scenario 3: PostgreSQL (the suite's own) is stopped while offline users receive messages."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer, TopicPartition

from tests.support.probe import is_ready

from .conftest import Bench
from .harness import (
    SIZE,
    Figures,
    Ledger,
    ReadinessProbe,
    committed,
    drain,
    produce,
    readiness,
    stream,
    until,
)


async def test_postgres_outage_pauses_consumption_and_loses_nothing(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """While PostgreSQL is down readiness is false and no offset passes an unstored message."""
    row = figures("3. PostgreSQL stopped while offline users receive")
    row.recovery = "PostgreSQL back to the last message delivered"
    topics = await bench.topics()
    gateway = await bench.gateway(topics)
    offline = [bench.user("pg-offline", i) for i in range(30)]
    online = [bench.user("pg-online", i) for i in range(10)]
    ledger = Ledger()
    choose = random.Random(3).choice
    clients = bench.clients(ledger, online, gateway.ws_url)
    stop = asyncio.Event()
    keepers = [asyncio.create_task(c.keep_open(stop, timeout=900)) for c in clients]
    probe = ReadinessProbe(gateway.base)
    db = await asyncpg.connect(bench.postgres.dsn)
    try:
        before = [ledger.message(choose(offline)) for _ in range(100)]
        await produce(producer, topics[0], before)
        ids = [m["message_id"] for m in before]
        await until(lambda: _stored(db, ids, len(ids)), 60, "messages before the outage stored")
        await db.close()

        probe.start()
        went_down = time.monotonic()
        await asyncio.to_thread(bench.postgres.stop)
        # Down from here (stopping takes a while on a busy machine, and PostgreSQL
        # answers until it has stopped) until its start is asked for.
        down_from = time.monotonic()
        sent: list[dict[str, Any]] = []

        def make() -> dict[str, Any]:
            # Two in three for users who are offline: those can only be stored.
            user = choose(offline) if len(sent) % 3 else choose(online)
            sent.append(ledger.message(user))
            return sent[-1]

        metas = await stream(
            producer,
            topics[0],
            make,
            rate=SIZE.postgres_messages / SIZE.postgres_outage,
            count=SIZE.postgres_messages,
        )
        await asyncio.sleep(max(0.0, went_down + SIZE.postgres_outage - time.monotonic()))
        offsets = await committed(bench.kafka.bootstrap, gateway.env["KAFKA_GROUP_ID"])
        first_unstored: dict[TopicPartition, int] = {}
        for value, meta in zip(sent, metas, strict=True):
            if ledger.sent[value["message_id"]] in offline:
                tp = TopicPartition(meta.topic, meta.partition)
                first_unstored[tp] = min(first_unstored.get(tp, meta.offset), meta.offset)
        during = await readiness(gateway.base)

        down_until = time.monotonic()
        await asyncio.to_thread(bench.postgres.start, migrate=False)
        back = time.monotonic()
        row.notes["PostgreSQL down (s)"] = round(back - went_down, 1)
        row.notes["gateway ready again after (s)"] = round(
            await until(lambda: is_ready(gateway.base), 60, "gateway ready again"), 1
        )
        offline_clients = bench.clients(ledger, offline, gateway.ws_url)
        await drain(ledger, offline_clients, timeout=120)
        await ledger.wait_complete(timeout=120)
    finally:
        await probe.stop()
        stop.set()
        await asyncio.gather(*keepers)
        if not db.is_closed():
            await db.close()
        # Leave the suite's PostgreSQL running for the next scenarios, whatever happened.
        await asyncio.to_thread(bench.postgres.start, migrate=False)
    row.count(ledger)
    row.connections = len(offline) + len(online)
    done = ledger.completed_at()
    row.recovery_s = round(done - back, 1) if done else None
    not_ready = probe.statuses(down_from + 1.0, down_until)
    row.notes["readiness during the outage"] = sorted(not_ready)
    passed = {
        tp.partition: offsets.get(tp, 0) - first
        for tp, first in first_unstored.items()
        if offsets.get(tp, 0) > first
    }

    assert during[0] == 503 and during[1]["checks"]["postgres"] is False, during
    assert not_ready == {503}, f"readiness answered {not_ready} while PostgreSQL was down"
    assert not passed, f"committed past an unstored message, by partition: {passed}"
    assert not ledger.missing(), f"{len(ledger.missing())} messages lost"
    assert not ledger.foreign, "a frame reached another user"
    assert ledger.same_connection_duplicates == 0, "a message was written twice to one connection"


async def _stored(db: asyncpg.Connection, ids: list[str], count: int) -> bool:
    found = await db.fetchval(
        "SELECT count(*) FROM undelivered_notification WHERE message_id = ANY($1::uuid[])", ids
    )
    return bool(found == count)
