"""Scenario 6: every client drops and reconnects at once while messages keep flowing."""

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
    close_all,
    open_all,
    stream,
    until,
)


async def test_reconnect_storm_while_messages_flow_loses_nothing(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """All clients dropping and reconnecting at once while messages flow lose none of them."""
    row = figures("6. reconnect storm while messages flow")
    row.recovery = "storm start to every client connected again"
    topics = await bench.topics()
    gateway = await bench.gateway(topics)
    users = [bench.user("storm", i) for i in range(SIZE.storm_clients // 2)]
    ledger = Ledger()
    # Two devices per user: a user is offline only while both are between connections.
    clients = bench.clients(ledger, users, gateway.ws_url, devices=2)
    try:
        await open_all(clients, concurrency=100)
        await until(lambda: has_connections(gateway.base, len(clients)), 120, "clients connected")
        asked = bench.auth.requests
        choose = random.Random(6).choice
        producing = asyncio.create_task(
            stream(
                producer,
                topics[0],
                lambda: ledger.message(choose(users)),
                rate=SIZE.storm_rate,
                count=SIZE.storm_messages,
            )
        )
        await until(lambda: ledger.received >= SIZE.storm_messages // 4, 120, "stream under way")
        refusals = sum(c.refusals for c in clients)
        storm = time.monotonic()
        await close_all(clients)
        row.notes["all disconnected after (s)"] = round(time.monotonic() - storm, 2)
        reconnected = await open_all(clients, concurrency=len(clients))
        row.recovery_s = round(reconnected - storm, 2)
        refused = [c.close_codes[-1] for c in clients if not c.is_open]
        row.notes["reconnects refused at first (retried)"] = (
            sum(c.refusals for c in clients) - refusals
        )
        await producing
        await until(lambda: has_connections(gateway.base, len(clients)), 60, "storm settled")
        await ledger.wait_complete(timeout=300)
    finally:
        await close_all(clients)
    row.count(ledger)
    row.connections = len(clients)
    row.notes["auth requests during the storm"] = bench.auth.requests - asked

    assert not refused, f"clients refused on reconnect: {refused[:10]}"
    assert not ledger.missing(), f"{len(ledger.missing())} messages lost"
    assert not ledger.foreign, "a frame reached another user"
    assert ledger.same_connection_duplicates == 0, "a message was written twice to one connection"
