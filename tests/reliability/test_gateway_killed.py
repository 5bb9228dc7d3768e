"""Scenario 1: the gateway is SIGKILLed while thousands of messages are in flight."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

from tests.support.probe import has_connections

from .conftest import Bench
from .harness import (
    SIZE,
    Figures,
    Ledger,
    committed,
    drain,
    kept_open,
    produce,
    until,
)


async def test_sigkill_mid_stream_then_restart_loses_nothing(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """A gateway SIGKILLed with thousands of messages in flight delivers every one after restart."""
    row = figures("1. gateway SIGKILLed mid-stream, restarted")
    row.recovery = "restart command to the last message delivered (offline users drained)"
    topics = await bench.topics()
    gateway = await bench.gateway(topics)
    users = [bench.user("kill", i) for i in range(SIZE.kill_users)]
    online, offline = users[: len(users) // 2], users[len(users) // 2 :]
    ledger = Ledger()
    clients = bench.clients(ledger, online, gateway.ws_url)
    async with kept_open(clients, timeout=900):
        await until(
            lambda: has_connections(gateway.base, len(online)), 60, "online users connected"
        )
        choose = random.Random(1).choice
        values = [ledger.message(choose(users)) for _ in range(SIZE.kill_messages)]
        producing = asyncio.create_task(produce(producer, topics[0], values))
        # Kill as soon as the stream is flowing, with nearly all of it still in flight.
        await until(lambda: ledger.received >= SIZE.kill_messages // 50, 120, "stream flowing")
        await asyncio.to_thread(gateway.kill)
        await producing
        offsets = await committed(bench.kafka.bootstrap, gateway.env["KAFKA_GROUP_ID"])
        row.notes["uncommitted when killed"] = SIZE.kill_messages - sum(offsets.values())
        row.notes["delivered live before the kill"] = ledger.received

        restarted = time.monotonic()
        await bench.restart(gateway)
        row.notes["ready after restart (s)"] = round(time.monotonic() - restarted, 1)
        offline_clients = bench.clients(ledger, offline, gateway.ws_url)
        await drain(ledger, offline_clients, timeout=300)
        await ledger.wait_complete(timeout=300)
    row.count(ledger)
    row.connections = len(online) + len(offline)
    done = ledger.completed_at()
    row.recovery_s = round(done - restarted, 1) if done else None

    assert not ledger.missing(), f"{len(ledger.missing())} messages lost"
    assert not ledger.foreign, "a frame reached another user"
    assert ledger.same_connection_duplicates == 0, "a message was written twice to one connection"
