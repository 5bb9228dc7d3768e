"""Scenario 9: two gateway processes routed through Redis, under faults.

Users are spread as a load balancer would spread them: some on process A, some
on process B, some with a device on each, the rest offline. Both processes share
one consumer group, so about half of each user's messages are consumed by the
process that does not hold them and travel through Redis.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer

from tests.integration.gateway import Gateway

from .conftest import Bench
from .harness import (
    SIZE,
    Client,
    Figures,
    Ledger,
    committed,
    drain,
    readiness,
    scrape,
    stream,
    until,
)
from .services import RedisServer


class Pair:
    """Two gateway processes in one consumer group behind one Redis, and their users' clients."""

    def __init__(
        self, bench: Bench, redis: RedisServer, label: str, *, keep_latency: bool = False
    ) -> None:
        self.bench = bench
        self.redis = redis
        self.label = label
        self.ledger = Ledger(keep_latency=keep_latency)
        users = [bench.user(label, i) for i in range(SIZE.scale_users)]
        quarter = len(users) // 4
        self.on_a, self.on_b = users[:quarter], users[quarter : 2 * quarter]
        self.on_both, self.offline = users[2 * quarter : 3 * quarter], users[3 * quarter :]
        self.users = users
        self.clients: list[Client] = []
        self.a: Gateway
        self.b: Gateway

    async def start(self) -> tuple[str, str]:
        bench = self.bench
        topics = await bench.topics(partitions=4)
        shared = {
            "KAFKA_GROUP_ID": f"notify-ws-rel-{uuid.uuid4().hex[:8]}",
            "REDIS_URL": self.redis.url,
            "REDIS_CHANNEL_PREFIX": f"rel-{bench.run}:",
        }
        self.a = await bench.gateway(topics, **shared)
        self.b = await bench.gateway(topics, **shared)
        ledger = self.ledger

        def a_then_b(token: str) -> str:
            # A load balancer sends the clients of a dead process to the other one.
            return (self.a if self.a.alive else self.b).ws_url(token)

        self.clients += bench.clients(ledger, self.on_a + self.on_both, a_then_b)
        self.clients += bench.clients(ledger, self.on_b + self.on_both, self.b.ws_url)
        return topics

    async def connected(self) -> None:
        on_a = len(self.on_a) + len(self.on_both)
        on_b = len(self.on_b) + len(self.on_both)

        async def both() -> bool:
            a, b = await scrape(self.a.base), await scrape(self.b.base)
            return a.get("notify_connections") == on_a and b.get("notify_connections") == on_b

        await until(both, 60, "clients connected to both processes")

    async def drain_offline(self, timeout: float) -> None:
        """The offline users connect (to B, the survivor) and read their backlog."""
        late = self.bench.clients(self.ledger, self.offline, self.b.ws_url)
        await drain(self.ledger, late, timeout=timeout)

    async def run(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        seed: int,
        fault: Callable[[], Awaitable[float]],
        row: Figures,
    ) -> None:
        """Stream to every user, run ``fault`` once an eighth arrived, drain, fill ``row``.

        ``fault`` returns the ``time.monotonic()`` recovery is counted from. The clients
        stay connected throughout (reconnecting when dropped); the offline users connect
        at the end.
        """
        ledger = self.ledger
        stop = asyncio.Event()
        keepers = [asyncio.create_task(c.keep_open(stop, timeout=900)) for c in self.clients]
        producing: asyncio.Task[object] | None = None
        try:
            await self.connected()
            choose = random.Random(seed).choice
            producing = asyncio.create_task(
                stream(
                    producer,
                    topic,
                    lambda: ledger.message(choose(self.users)),
                    rate=SIZE.scale_rate,
                    count=SIZE.scale_messages,
                )
            )
            # Most of the stream still to come, and some of it in flight.
            await until(lambda: ledger.received >= SIZE.scale_messages // 8, 120, "stream flowing")
            row.notes["delivered before the fault"] = ledger.received
            since = await fault()
            await producing
            await self.drain_offline(timeout=300)
            await ledger.wait_complete(timeout=300, idle=30)
        finally:
            stop.set()
            if producing is not None:
                producing.cancel()
                keepers.append(producing)
            await asyncio.gather(*keepers, return_exceptions=True)
        row.count(ledger)
        row.connections = len(self.clients) + len(self.offline)
        done = ledger.completed_at()
        row.recovery_s = round(done - since, 1) if done else None

    def assert_nothing_lost(self) -> None:
        ledger = self.ledger
        assert not ledger.missing(), f"{len(ledger.missing())} messages lost"
        assert not ledger.foreign, "a frame reached another user"
        assert ledger.same_connection_duplicates == 0, "a message was written twice to one socket"


async def test_two_processes_one_sigkilled_mid_stream_lose_nothing(
    bench: Bench,
    redis: RedisServer,
    producer: AIOKafkaProducer,
    figures: Callable[[str], Figures],
) -> None:
    """One of two processes SIGKILLed mid-stream: its partitions and its users move, none lost."""
    row = figures("9a. one of 2 processes (through Redis) SIGKILLed mid-stream")
    row.recovery = "kill to the last message delivered (offline users drained)"
    pair = Pair(bench, redis, "pair-kill")
    topics = await pair.start()

    async def kill_a() -> float:
        await asyncio.to_thread(pair.a.kill)
        return time.monotonic()

    await pair.run(producer, topics[0], 9, kill_a, row)
    survivor = await scrape(pair.b.base)
    row.notes["stored by the survivor for want of an ack"] = int(
        survivor.get("notify_ack_timeouts_total", 0)
    )
    offsets = await committed(bench.kafka.bootstrap, pair.b.env["KAFKA_GROUP_ID"])
    row.notes["committed at the end"] = sum(offsets.values())

    assert pair.b.alive, "the survivor died"
    pair.assert_nothing_lost()


async def test_redis_restarted_under_two_processes_loses_nothing(
    bench: Bench,
    redis: RedisServer,
    producer: AIOKafkaProducer,
    figures: Callable[[str], Figures],
) -> None:
    """Redis down mid-stream: both processes turn unready, pause, resubscribe; none lost."""
    row = figures("9b. Redis restarted under 2 processes mid-stream")
    row.recovery = "Redis back to the last message delivered"
    pair = Pair(bench, redis, "pair-redis")
    topics = await pair.start()

    async def both(ready: bool) -> bool:
        answers = [await readiness(g.base) for g in (pair.a, pair.b)]
        if ready:
            return all(status == 200 for status, _ in answers)
        return all(
            status == 503 and body.get("checks", {}).get("redis") is False
            for status, body in answers
        )

    async def restart_redis() -> float:
        went_down = time.monotonic()
        await asyncio.to_thread(redis.stop)
        row.notes["both unready after (s)"] = round(
            await until(lambda: both(ready=False), 30, "both processes report Redis down"), 1
        )
        await asyncio.sleep(2)
        await asyncio.to_thread(redis.start)
        back = time.monotonic()
        row.notes["Redis down (s)"] = round(back - went_down, 1)
        row.notes["both ready again after (s)"] = round(
            await until(lambda: both(ready=True), 60, "both processes ready again"), 1
        )
        return back

    await pair.run(producer, topics[0], 10, restart_redis, row)
    row.notes["client reconnects"] = sum(c.connections - 1 for c in pair.clients)

    for gateway in (pair.a, pair.b):
        assert gateway.alive, "a process died"
    pair.assert_nothing_lost()


FREEZE_S = 15.0  # past the presence TTL and Kafka's session timeout (10 s each)


async def test_a_frozen_process_loses_nothing_and_the_other_carries_on(
    bench: Bench,
    redis: RedisServer,
    producer: AIOKafkaProducer,
    figures: Callable[[str], Figures],
) -> None:
    """One of two processes frozen (SIGSTOP: a hung machine, its sockets open) then resumed."""
    row = figures("9c. one of 2 processes frozen (SIGSTOP) 15 s mid-stream, then resumed")
    row.recovery = "resume to the last message delivered"
    pair = Pair(bench, redis, "pair-freeze", keep_latency=True)
    topics = await pair.start()
    window: list[float] = []

    async def freeze_a() -> float:
        assert pair.a.process is not None
        pid = pair.a.process.pid
        os.kill(pid, signal.SIGSTOP)
        window.append(time.time())
        try:
            await asyncio.sleep(FREEZE_S)
        finally:
            os.kill(pid, signal.SIGCONT)
            window.append(time.time())
        return time.monotonic()

    await pair.run(producer, topics[0], 11, freeze_a, row)
    on_b = set(pair.on_b)
    waits = [
        wait
        for sent, user, wait in pair.ledger.latencies
        if user in on_b and window[0] <= sent <= window[1]
    ]
    row.notes["messages sent during the freeze to users of the running process"] = len(waits)
    if waits:
        row.notes["their longest wait (s)"] = round(max(waits), 1)
    survivor = await scrape(pair.b.base)
    row.notes["stored by the running process for want of an ack"] = int(
        survivor.get("notify_ack_timeouts_total", 0)
    )

    for gateway in (pair.a, pair.b):
        assert gateway.alive, "a process died"
    pair.assert_nothing_lost()
