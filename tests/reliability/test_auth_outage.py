"""Scenario 4: the auth service is down, slow (over AUTH_TIMEOUT) or answering 500."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect

from tests.support.probe import has_connections

from .conftest import Bench
from .harness import (
    SIZE,
    Client,
    Figures,
    Ledger,
    close_all,
    drain,
    open_all,
    stream,
    until,
)

MODES = ("down", "slow", "500")


async def test_auth_outage_refuses_newcomers_keeps_the_connected_and_recovers(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """New clients get 4503 while auth fails; connected ones keep receiving; cached ones return."""
    row = figures("4. auth service down / slow / 500")
    row.recovery = "auth service back to the first new client accepted (worst of the 3 faults)"
    topics = await bench.topics()
    gateway = await bench.gateway(topics, AUTH_TIMEOUT="0.5s", AUTH_CACHE_TTL="10m")
    users = [bench.user("auth", i) for i in range(SIZE.auth_clients)]
    newcomers = {mode: bench.user(f"auth-new-{mode}", 0) for mode in MODES}
    ledger = Ledger()
    clients = bench.clients(ledger, users, gateway.ws_url)
    # First connections ask the auth service: a few at a time, as AUTH_TIMEOUT is short.
    await open_all(clients, concurrency=20)
    await until(lambda: has_connections(gateway.base, len(users)), 60, "clients connected")
    asked_at_start = bench.auth.requests
    choose = random.Random(4).choice
    everyone = users + list(newcomers.values())
    stop = asyncio.Event()
    producing = asyncio.create_task(
        stream(producer, topics[0], lambda: ledger.message(choose(everyone)), rate=100, stop=stop)
    )
    refused: dict[str, int | None] = {}
    recovery: dict[str, float] = {}
    newcomer_clients: list[Client] = []
    try:
        for mode in MODES:
            await _break(bench, mode)
            newcomer = Client(ledger, newcomers[mode], bench.token(newcomers[mode]), gateway.ws_url)
            newcomer_clients.append(newcomer)
            await newcomer.open()
            assert await newcomer.ended(5), f"auth {mode}: a new client was accepted"
            refused[mode] = newcomer.close_codes[-1]
            received = ledger.received
            await asyncio.sleep(1.0)
            assert ledger.received > received, f"auth {mode}: connected clients stopped receiving"
            assert all(c.is_open for c in clients), f"auth {mode}: a connected client was closed"
            await _repair(bench, mode)
            recovery[mode] = await _accepted(newcomer, timeout=30)
            await newcomer.close()

        # A reconnect storm while the auth service answers 500: cached answers let all in.
        await _break(bench, "500")
        asked = bench.auth.requests
        await close_all(clients)
        storm = time.monotonic()
        refusals = sum(c.refusals for c in clients)
        reconnected = await open_all(clients, timeout=5)
        row.notes["storm reconnected (s)"] = round(reconnected - storm, 2)
        await asyncio.sleep(0.2)
        storm_closed = [c.close_codes[-1] for c in clients if not c.is_open]
        storm_closed += [4503] * (sum(c.refusals for c in clients) - refusals)
        storm_asked = bench.auth.requests - asked
        await _repair(bench, "500")
        stop.set()
        await producing
        await drain(ledger, newcomer_clients, timeout=60)
        await ledger.wait_complete(timeout=60)
    finally:
        stop.set()
        await asyncio.gather(producing, return_exceptions=True)
        await close_all(clients)
    row.count(ledger)
    row.connections = len(clients) + len(newcomer_clients)
    row.recovery_s = round(max(recovery.values()), 2) if recovery else None
    row.notes["close code for newcomers"] = refused
    row.notes["auth requests: first connect"] = asked_at_start
    row.notes[f"auth requests: storm of {len(clients)} reconnects"] = storm_asked

    assert refused == dict.fromkeys(MODES, 4503), refused
    assert not storm_closed, f"reconnects refused during the storm: {storm_closed}"
    assert storm_asked == 0, "the reconnect storm reached the auth service"
    assert not ledger.missing(), f"{len(ledger.missing())} messages lost"
    assert not ledger.foreign, "a frame reached another user"


async def _break(bench: Bench, mode: str) -> None:
    if mode == "down":
        await bench.auth_proxy.down()
    elif mode == "slow":
        bench.auth.delay = 2.0
    else:
        bench.auth.fail_status = 500


async def _repair(bench: Bench, mode: str) -> None:
    if mode == "down":
        await bench.auth_proxy.up()
    elif mode == "slow":
        bench.auth.delay = 0.0
    else:
        bench.auth.fail_status = None


async def _accepted(client: Client, timeout: float) -> float:
    """Retry ``client`` every 0.1 s until the gateway keeps it open; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        await client.open()
        if not await client.ended(0.5):
            return time.monotonic() - started - 0.5
        await asyncio.sleep(0.1)
    raise AssertionError(f"no client accepted within {timeout} s of the repair")


async def test_a_client_leaving_during_its_token_check_does_not_fail_the_others(
    bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """A client that leaves while its token is being checked does not fail others with it."""
    row = figures("4b. a client leaves during a slow token check")
    row.recovery = "n/a"
    topics = await bench.topics()
    gateway = await bench.gateway(topics)
    user = bench.user("tabs", 0)
    token = bench.token(user)
    # The auth service is slow but within AUTH_TIMEOUT (3 s): both checks share one request.
    bench.auth.delay = 1.0
    leaving = await connect(gateway.ws_url(token), open_timeout=10)
    staying = Client(Ledger(), user, token, gateway.ws_url)
    await staying.open()
    await asyncio.sleep(0.2)
    leaving.transport.abort()  # the first tab is closed while its check is under way
    ended = await staying.ended(3.0)
    code = staying.close_codes[-1] if ended else None
    await staying.close()
    row.messages = 2
    row.lost = 0
    row.duplicates = 0
    row.notes["close code of the client that stayed"] = code
    row.notes["auth requests"] = bench.auth.requests

    assert not ended, f"the client that stayed was closed with {code} (the auth service was up)"
