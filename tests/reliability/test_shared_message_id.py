"""Scenario 12: one message_id fanned out to several users, most of them offline.

A platform that announces one thing to many users may send one Kafka record per
user under a single ``message_id``. Each user it names must get it: the ones
connected live, the offline ones from the backlog when they connect. Every record
is also produced twice (a producer retrying without idempotence): the second copy
must reach no device twice, and the store counts it as a duplicate instead.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from .conftest import Bench
from .harness import SCALE, Client, Figures, Ledger, committed, drain, encode, open_all, scrape

# Users, shared ids, and the widest fan-out of one id.
USERS, IDS, WIDEST = (20, 40, 6) if SCALE == "short" else (200, 500, 20)


async def test_one_message_id_reaches_every_user_it_was_sent_to(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """Each user a shared id was sent to receives it once per device, live or on connect."""
    row = figures("12. One message_id sent to several users")
    row.recovery = "first offline user connecting to the last stored frame received"
    topics = await bench.topics()
    gateway = await bench.gateway(topics)
    users = [bench.user("fanout", i) for i in range(USERS)]
    online, offline = users[: USERS // 4], users[USERS // 4 :]
    ledgers = {user: Ledger() for user in users}
    clients = {
        user: Client(ledgers[user], user, bench.token(user), gateway.ws_url) for user in users
    }
    await open_all([clients[user] for user in online])

    choose = random.Random(12)
    records: list[dict[str, Any]] = []
    widths: list[int] = []
    for n in range(IDS):
        message_id = str(uuid.uuid4())
        width = 2 + n % (WIDEST - 1)  # 2, 3, ... WIDEST, 2, 3, ...
        widths.append(width)
        for user in choose.sample(users, width):
            ledgers[user].sent[message_id] = user
            ledgers[user].sent_at[message_id] = now = time.time()
            records.append(
                {
                    "message_id": message_id,
                    "delivery_method": "push",
                    "user_id": user,
                    "subject": message_id,
                    "content": f"{user}\t{now:.6f}\t",
                }
            )
    offline_pairs = sum(1 for r in records if r["user_id"] in offline)
    # Every record twice, keyed by its user as the README asks of producers.
    sends = [
        await producer.send(topics[0], encode(r), key=r["user_id"].encode())
        for r in records + records
    ]
    ends: dict[TopicPartition, int] = {}
    for meta in await asyncio.gather(*sends):
        tp = TopicPartition(meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    group = gateway.env["KAFKA_GROUP_ID"]

    async def consumed() -> bool:
        offsets = await committed(bench.kafka.bootstrap, group)
        return all(offsets.get(tp, 0) >= end for tp, end in ends.items())

    deadline = time.monotonic() + 120
    while not await consumed():
        assert time.monotonic() < deadline, "the gateway did not consume every record in 120 s"
        await asyncio.sleep(0.2)
    metrics = await scrape(gateway.base)

    connected = time.monotonic()
    offline_done = await asyncio.gather(
        *(drain(ledgers[user], [clients[user]], timeout=60, settle=1.0) for user in offline)
    )
    finished = max(max(ledgers[u].first_seen.values(), default=connected) for u in offline)
    online_done = await asyncio.gather(
        *(ledgers[user].wait_complete(timeout=30, settle=0.5) for user in online)
    )
    await asyncio.gather(*(clients[user].close() for user in online))

    lost = {user: ledgers[user].missing() for user in users if ledgers[user].missing()}
    row.messages = len(records)
    row.users = len(users)
    row.connections = len(users)
    row.lost = sum(len(ids) for ids in lost.values())
    row.duplicates = sum(ledgers[user].duplicates for user in users)
    row.same_connection_duplicates = sum(ledgers[u].same_connection_duplicates for u in users)
    row.recovery_s = round(finished - connected, 1) if not lost else None
    row.notes["shared ids"] = IDS
    row.notes["users per id"] = f"{min(widths)}–{max(widths)}"
    row.notes["records (each produced twice)"] = len(records)
    row.notes["online users / offline users"] = f"{len(online)} / {len(offline)}"
    row.notes["stored rows (offline user, id)"] = offline_pairs
    stored = metrics.get("notify_notifications_stored_total", 0.0)
    duplicates = metrics.get("notify_store_duplicates_total", 0.0)
    row.notes["notify_notifications_stored_total"] = stored
    row.notes["notify_store_duplicates_total"] = duplicates
    if lost:
        row.notes["problems"] = [
            f"{row.lost} (user, id) pairs never arrived, e.g. {next(iter(lost.items()))}"
        ]

    assert not lost, f"{row.lost} (user, message_id) pairs lost across {len(lost)} users"
    assert all(offline_done) and all(online_done)
    assert row.duplicates == 0, "a device received one id twice"
    assert not any(ledgers[user].foreign for user in users), "a frame reached another user"
    assert stored >= offline_pairs, "each offline user's copy is a row of its own"
    assert duplicates >= offline_pairs, "the second copy of each stored record is counted"
