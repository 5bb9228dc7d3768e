"""Scenario 14: protocol v2 clients whose connections are blackholed mid-stream.

Every user has one ``notify.v2`` client that acknowledges what it receives, each
through a TCP proxy of its own. Halfway through the stream the proxies of half the
users freeze: bytes vanish both ways and nobody closes anything (a phone in a
tunnel). What the gateway wrote to them after that sits in kernel buffers and is
never read, and their acks never arrive. Those users then connect again, directly:
every notification they never acknowledged must come, and a message counts as lost
if no connection of its user ever received it. With v1 those frames count as
delivered on write and are gone.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.probe import has_connections
from tests.support.proxy import TcpProxy
from tests.support.wait import until

from .conftest import Bench
from .harness import SCALE, Figures, committed, encode

USERS, PER_USER = (10, 30) if SCALE == "short" else (100, 100)


class AckingClient:
    """A v2 device: reads notifications, acknowledges them in batches every 50 ms."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.received: dict[str, int] = {}  # id -> connection number that first got it
        self.per_connection: list[list[str]] = []
        self.acked_before: set[str] = set()  # ids acknowledged on an earlier connection
        self.resent_after_ack = 0

    async def run(self, url: str, stop: asyncio.Event) -> None:
        number = len(self.per_connection)
        self.per_connection.append([])
        if number:
            self.acked_before = set(self.received)
        async with connect(url, subprotocols=["notify.v2"], ping_interval=None) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "notify.v2"
            pending: list[str] = []
            acker = asyncio.create_task(self._ack(ws, pending, stop))
            try:
                while not stop.is_set():
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except TimeoutError:
                        continue
                    frame = json.loads(raw)
                    if frame.get("type") != "notification":
                        continue
                    message_id = frame["id"]
                    self.per_connection[number].append(message_id)
                    if message_id in self.acked_before:
                        self.resent_after_ack += 1
                    self.received.setdefault(message_id, number)
                    pending.append(message_id)
            except ConnectionClosed:
                pass
            finally:
                acker.cancel()

    @staticmethod
    async def _ack(ws: ClientConnection, pending: list[str], stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.05)
            if pending:
                ids, pending[:] = pending[:500], pending[500:]
                await ws.send(json.dumps({"type": "ack", "ids": ids}))


async def test_blackholed_v2_clients_lose_nothing_they_did_not_acknowledge(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """Every notification reaches a client of its user, though half the connections were
    blackholed mid-stream; none is lost."""
    row = figures("14. Acknowledged delivery (v2) through blackholed connections")
    row.recovery = "reconnect of the blackholed clients to the last notification received"
    topics = await bench.topics()
    # Every client connects from 127.0.0.1 at once, through its proxy.
    gateway = await bench.gateway(topics, MAX_UNAUTHENTICATED_PER_ADDRESS="1000")
    port = int(gateway.base.rsplit(":", 1)[1])
    users = [bench.user("tunnel", i) for i in range(USERS)]
    clients = {user: AckingClient(user) for user in users}
    proxies = {user: TcpProxy(port) for user in users}
    for proxy in proxies.values():
        await proxy.up()
    stop_first = asyncio.Event()
    first = [
        asyncio.create_task(
            clients[u].run(
                gateway.ws_url(bench.token(u)).replace(f":{port}/", f":{proxies[u].port}/"),
                stop_first,
            )
        )
        for u in users
    ]
    sent: dict[str, str] = {}

    async def send(count: int) -> dict[TopicPartition, int]:
        records: list[dict[str, Any]] = []
        for user in users:
            for _ in range(count):
                message_id = str(uuid.uuid4())
                sent[message_id] = user
                records.append(
                    {
                        "message_id": message_id,
                        "delivery_method": "push",
                        "user_id": user,
                        "subject": message_id,
                        "content": f"{user}\t{time.time():.6f}\t",
                    }
                )
        futures = [
            await producer.send(topics[0], encode(r), key=r["user_id"].encode()) for r in records
        ]
        ends: dict[TopicPartition, int] = {}
        for meta in await asyncio.gather(*futures):
            tp = TopicPartition(meta.topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
        return ends

    async def consumed(ends: dict[TopicPartition, int]) -> None:
        group = gateway.env["KAFKA_GROUP_ID"]
        deadline = time.monotonic() + 120
        while True:
            offsets = await committed(bench.kafka.bootstrap, group)
            if all(offsets.get(tp, 0) >= end for tp, end in ends.items()):
                return
            assert time.monotonic() < deadline, "not every record was committed in 120 s"
            await asyncio.sleep(0.2)

    await until(lambda: has_connections(gateway.base, USERS), 60, "every client connected")
    await consumed(await send(PER_USER // 2))
    blackholed = users[: USERS // 2]
    for user in blackholed:
        proxies[user].freeze()
    await consumed(await send(PER_USER - PER_USER // 2))
    written_to_frozen = {u: len(clients[u].received) for u in blackholed}

    reconnected = time.monotonic()
    stop_again = asyncio.Event()
    again = [
        asyncio.create_task(clients[u].run(gateway.ws_url(bench.token(u)), stop_again))
        for u in blackholed
    ]

    def missing() -> list[str]:
        return [m for m, u in sent.items() if m not in clients[u].received]

    deadline = time.monotonic() + 60
    while missing() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    recovery = time.monotonic() - reconnected
    await asyncio.sleep(1.0)  # late duplicates, if any, arrive now
    stop_first.set()
    stop_again.set()
    for proxy in proxies.values():
        await proxy.close()
    await asyncio.gather(*first, *again, return_exceptions=True)

    lost = missing()
    row.messages = len(sent)
    row.users = len(users)
    row.connections = len(users) + len(blackholed)
    row.lost = len(lost)
    row.duplicates = sum(
        len(ids) - len(set(ids)) for c in clients.values() for ids in c.per_connection
    ) + sum(c.resent_after_ack for c in clients.values())
    row.same_connection_duplicates = sum(
        len(ids) - len(set(ids)) for c in clients.values() for ids in c.per_connection
    )
    row.recovery_s = round(recovery, 1) if not lost else None
    row.notes["blackholed clients"] = len(blackholed)
    row.notes["received before the freeze (blackholed clients)"] = sum(written_to_frozen.values())
    row.notes["received again after being acked (ack lost in the blackhole)"] = sum(
        c.resent_after_ack for c in clients.values()
    )
    if lost:
        row.notes["problems"] = [f"{len(lost)} notifications never arrived, e.g. {lost[0]}"]
    assert not lost, f"{len(lost)} notifications lost"
    assert row.same_connection_duplicates == 0, "one connection received an id twice"
