"""Scenario 5: a client stops reading while everyone else keeps receiving."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

from tests.support.probe import has_connections

from .conftest import Bench
from .harness import (
    SIZE,
    Client,
    Figures,
    Ledger,
    RawClient,
    drain,
    percentile,
    produce_batch,
    scrape,
    stream,
    until,
)

# Queue and timeout small enough to reach both ways a slow client is closed, but the queue
# above what the steady stream brings one user in a Kafka batch, so a healthy client only
# overflows if the consumer stalls.
QUEUE = 100
WRITE_TIMEOUT = 1.0


async def test_slow_readers_are_closed_their_messages_stored_others_keep_pace(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """A client that stops reading gets 1013 and its backlog later; the others' latency holds."""
    row = figures("5. slow client stops reading")
    row.recovery = "longest wait of another user's message while one client stalled"
    topics = await bench.topics()
    gateway = await bench.gateway(
        topics, SEND_QUEUE_SIZE=str(QUEUE), WRITE_TIMEOUT=f"{WRITE_TIMEOUT}s"
    )
    fast = [bench.user("fast", i) for i in range(SIZE.slow_fast_clients)]
    stalled_user, burst_user = bench.user("stalled", 0), bench.user("burst", 0)
    ledger = Ledger(keep_latency=True)
    # The same devices reconnect later, with an ordinary client, to get what they missed.
    slow_clients = bench.clients(ledger, (stalled_user, burst_user), gateway.ws_url)
    clients = bench.clients(ledger, fast, gateway.ws_url)
    stop = asyncio.Event()
    keepers = [asyncio.create_task(c.keep_open(stop, timeout=600)) for c in clients]
    await until(lambda: has_connections(gateway.base, len(fast)), 30, "fast clients connected")
    choose = random.Random(5).choice
    stop_stream = asyncio.Event()
    steady = asyncio.create_task(
        stream(
            producer,
            topics[0],
            lambda: ledger.message(choose(fast)),
            rate=SIZE.slow_rate,
            stop=stop_stream,
        )
    )
    try:
        await asyncio.sleep(3.0)

        # 1. A client that stops reading: its socket fills up, the write stalls, the
        #    watchdog closes it after WRITE_TIMEOUT.
        stalled = RawClient(gateway.port, bench.token(stalled_user))
        await asyncio.to_thread(stalled.handshake)
        await until(lambda: has_connections(gateway.base, len(fast) + 1), 10, "stalled client in")
        stall_began = time.time()
        trickle_stop = asyncio.Event()
        trickle = asyncio.create_task(
            stream(
                producer,
                topics[0],
                lambda: ledger.message(stalled_user, padding=16_000),
                rate=40,
                stop=trickle_stop,
            )
        )
        await until(lambda: _slow_closed(gateway.base, 1), 60, "stalled client closed")
        trickle_stop.set()
        await trickle
        # It never reads again: wait until the gateway lets go of it, then take what is left.
        await until(lambda: has_connections(gateway.base, len(fast)), 60, "stalled client gone")
        stall_window_end = time.time()
        await asyncio.to_thread(stalled.read_all, 30)
        _account(ledger, slow_clients[0], stalled)

        # 2. A client that is not reading when a burst five queues long comes in one Kafka
        #    batch (once the stall's backlog is through): while the kernel buffers take it
        #    all it is delivered; were the writer stuck, the queue would overflow (1013).
        await until(lambda: not ledger.missing(fast, older=1.0), 120, "the others caught up")
        burst = RawClient(gateway.port, bench.token(burst_user))
        await asyncio.to_thread(burst.handshake)
        await until(lambda: has_connections(gateway.base, len(fast) + 1), 10, "burst client in")
        burst_values = [ledger.message(burst_user) for _ in range(5 * QUEUE)]
        await produce_batch(producer, topics[0], burst_values)
        await asyncio.to_thread(burst.read_all, 30, enough=len(burst_values))
        _account(ledger, slow_clients[1], burst)

        await asyncio.sleep(1.0)
        stop_stream.set()
        await steady
        await drain(ledger, slow_clients, timeout=60, idle=5)
        await ledger.wait_complete(timeout=60, idle=5)
    finally:
        stop_stream.set()
        await asyncio.gather(steady, return_exceptions=True)
        stop.set()
        await asyncio.gather(*keepers)
    row.count(ledger)
    row.connections = len(fast) + 2
    fast_users = set(fast)
    before = [
        lat for sent, user, lat in ledger.latencies if user in fast_users and sent < stall_began
    ]
    during = [
        lat
        for sent, user, lat in ledger.latencies
        if user in fast_users and stall_began <= sent <= stall_window_end
    ]
    figures_ms = {
        "others' latency before, p50/p99/max (ms)": _ms(before),
        "others' latency while one client stalls, p50/p99/max (ms)": _ms(during),
    }
    row.notes.update(figures_ms)
    row.recovery_s = round(max(during), 1) if during else None
    row.notes["close code seen: stalled / burst (None: none came)"] = [
        stalled.close_code,
        burst.close_code,
    ]
    row.notes["frames the stalled client got before the close"] = len(stalled.frames)
    kicked = sum(code == 1013 for c in clients for code in c.close_codes)
    row.notes["healthy clients closed with 1013"] = kicked

    closed_metric = (await scrape(gateway.base)).get("notify_slow_connections_closed_total")
    row.notes["notify_slow_connections_closed_total"] = closed_metric
    lost = ledger.missing()
    worst = percentile(during, 99) or 0.0
    problems = []
    if burst.close_code not in (1013, None):
        problems.append(f"the client that got a burst was closed with {burst.close_code}")
    if stalled.close_code not in (1013, None):
        problems.append(f"the stalled client was closed with {stalled.close_code}")
    if lost:
        by_user = Counter(ledger.sent[m] for m in lost)
        problems.append(f"{len(lost)} messages lost, by user: {dict(by_user)}")
    if ledger.foreign:
        problems.append("a frame reached another user")
    if worst >= 0.5:
        problems.append(
            f"while one client stalled, the others' p99 latency was {worst:.2f} s "
            f"(before: {percentile(before, 99)} s)"
        )
    if kicked:
        problems.append(f"{kicked} clients that kept reading were closed with 1013")
    closed_slow = 1 + (burst.close_code == 1013) + kicked
    if closed_metric != closed_slow:
        problems.append(
            f"notify_slow_connections_closed_total is {closed_metric} "
            f"for {closed_slow} connections closed as too slow"
        )
    row.notes["problems"] = problems
    assert not problems, "\n".join(problems)


def _account(ledger: Ledger, device: Client, raw: RawClient) -> None:
    """Record what a raw client read as received by ``device`` (the client it reconnects as)."""
    seen: set[str] = set()
    for frame in raw.frames:
        ledger.record(device.user, seen, device.received, frame)


def _ms(values: list[float]) -> list[int | None]:
    return [
        None if (v := percentile(values, q)) is None else round(v * 1000) for q in (50, 99, 100)
    ]


async def _slow_closed(base: str, count: int) -> bool:
    return (await scrape(base)).get("notify_slow_connections_closed_total", 0) >= count
