"""Scenario 2: the Kafka broker (the suite's own) restarts while messages flow."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

from tests.support.probe import has_connections, is_ready

from .conftest import Bench
from .harness import SIZE, Figures, Ledger, drain, kept_open, stream, until


async def test_broker_restart_mid_stream_consumer_recovers_by_itself(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """After a broker restart mid-stream the same gateway process resumes on its own; none lost."""
    row = figures("2. Kafka broker restarted mid-stream")
    row.recovery = "broker back to the last message delivered"
    topics = await bench.topics()
    gateway = await bench.gateway(topics)
    users = [bench.user("kafka", i) for i in range(40)]
    online, offline = users[:20], users[20:]
    ledger = Ledger()
    clients = bench.clients(ledger, online, gateway.ws_url)
    async with kept_open(clients, timeout=900):
        await until(
            lambda: has_connections(gateway.base, len(online)), 60, "online users connected"
        )
        choose = random.Random(2).choice
        producing = asyncio.create_task(
            stream(
                producer,
                topics[0],
                lambda: ledger.message(choose(users)),
                rate=SIZE.kafka_rate,
                count=SIZE.kafka_messages,
            )
        )
        await until(lambda: ledger.received >= SIZE.kafka_messages // 8, 120, "stream under way")
        went_down = time.monotonic()
        await asyncio.to_thread(bench.kafka.restart)
        back = time.monotonic()
        row.notes["broker down (s)"] = round(back - went_down, 1)
        await producing
        row.notes["gateway ready again after (s)"] = round(
            await until(lambda: is_ready(gateway.base), 120, "gateway ready again"), 1
        )
        offline_clients = bench.clients(ledger, offline, gateway.ws_url)
        await drain(ledger, offline_clients, timeout=240)
        await ledger.wait_complete(timeout=240)
    row.count(ledger)
    row.connections = len(users)
    done = ledger.completed_at()
    row.recovery_s = round(done - back, 1) if done else None
    row.notes["client reconnects"] = sum(c.connections - 1 for c in clients)

    assert gateway.alive, "the gateway died"
    assert not ledger.missing(), f"{len(ledger.missing())} messages lost"
    assert not ledger.foreign, "a frame reached another user"
    assert ledger.same_connection_duplicates == 0, "a message was written twice to one connection"
