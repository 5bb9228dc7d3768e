"""The consumer's pipeline: fetching goes on while batches settle; commits never pass one.

A fake Kafka consumer hands out batches and records commits; a fake dispatcher returns a
settlement per batch that the test completes, in any order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from service.config import Settings
from service.consumer import Consumer
from service.metrics import Metrics
from service.notification import Notification

from .fakes import Settled, until

P0 = TopicPartition("notification.send", 0)
P1 = TopicPartition("notification.send", 1)


def records(partition: TopicPartition, first: int, count: int) -> list[Any]:
    value = {"delivery_method": "push", "user_id": "alice", "subject": "s", "content": "c"}
    return [
        SimpleNamespace(
            topic=partition.topic,
            partition=partition.partition,
            offset=offset,
            timestamp=0,
            key=None,
            value=json.dumps({**value, "message_id": str(uuid.uuid4())}).encode(),
        )
        for offset in range(first, first + count)
    ]


class FakeKafka:
    """Hands out the given batches, one per ``getmany``, then nothing; records commits.

    While ``commit_gate`` is set and not open, a commit hangs (a slow broker)."""

    def __init__(self, batches: list[dict[TopicPartition, list[Any]]]) -> None:
        self.batches = deque(batches)
        self.fetches = 0
        self.commits: list[dict[TopicPartition, int]] = []
        self.commits_started = 0
        self.commit_gate: asyncio.Event | None = None

    async def getmany(self, **_: Any) -> dict[TopicPartition, list[Any]]:
        self.fetches += 1
        if self.batches:
            return self.batches.popleft()
        await asyncio.sleep(0.005)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits_started += 1
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        self.commits.append(dict(offsets))

    def assignment(self) -> set[TopicPartition]:
        return {P0, P1}

    def highwater(self, partition: TopicPartition) -> int:
        return 0


class Dispatcher:
    """Every batch's settlement waits for the test."""

    def __init__(self) -> None:
        self.batches: list[Sequence[Notification]] = []
        self.settlements: list[Settled] = []

    async def dispatch(self, notifications: Sequence[Notification]) -> Settled:
        self.batches.append(notifications)
        settlement = Settled(pending=True)
        self.settlements.append(settlement)
        return settlement


def pipeline(
    batches: list[dict[TopicPartition, list[Any]]], **env: str
) -> tuple[Consumer, FakeKafka, Dispatcher]:
    settings = Settings.from_env({"KAFKA_DLQ_TOPIC": "", **env})
    dispatcher = Dispatcher()
    consumer = Consumer(settings, dispatcher, Metrics())
    kafka = FakeKafka(batches)
    consumer._consumer = kafka
    return consumer, kafka, dispatcher


async def finish(consumer: Consumer, task: asyncio.Task[None]) -> None:
    consumer._stopping = True
    await asyncio.wait_for(task, 5.0)


async def test_a_commit_never_passes_a_batch_that_has_not_settled() -> None:
    """The second batch settling first commits nothing; the first settling commits both."""
    consumer, kafka, dispatcher = pipeline([{P0: records(P0, 0, 10)}, {P0: records(P0, 10, 10)}])
    task = asyncio.create_task(consumer._consume())
    await until(lambda: len(dispatcher.settlements) == 2)

    dispatcher.settlements[1].settle()
    await asyncio.sleep(0.05)
    assert kafka.commits == [], "offset 20 committed while offsets 0-9 were still settling"

    dispatcher.settlements[0].settle()
    await until(lambda: kafka.commits == [{P0: 20}])
    await finish(consumer, task)


async def test_fetching_goes_on_while_a_batch_settles_and_a_commit_is_in_flight() -> None:
    """A batch waiting for acks and a commit waiting for the broker hold up no fetch."""
    consumer, kafka, dispatcher = pipeline(
        [{P0: records(P0, 0, 5)}, {P0: records(P0, 5, 5)}, {P0: records(P0, 10, 5)}]
    )
    kafka.commit_gate = asyncio.Event()
    task = asyncio.create_task(consumer._consume())
    await until(lambda: len(dispatcher.settlements) == 3)  # none settled: all fetched
    dispatcher.settlements[0].settle()
    await until(lambda: kafka.commits_started == 1)  # and it hangs

    dispatcher.settlements[1].settle()
    dispatcher.settlements[2].settle()
    await asyncio.sleep(0.05)
    assert kafka.commits_started == 1, "a second commit started before the first returned"

    kafka.commit_gate.set()
    # What settled while the first commit was in flight goes into one next commit.
    await until(lambda: kafka.commits == [{P0: 5}, {P0: 15}])
    await finish(consumer, task)


async def test_past_the_in_flight_bound_the_consumer_fetches_no_more() -> None:
    """Unsettled records up to KAFKA_MAX_IN_FLIGHT, then it waits for the oldest."""
    batches = [{P0: records(P0, n * 10, 10)} for n in range(5)]
    consumer, kafka, dispatcher = pipeline(batches, KAFKA_MAX_IN_FLIGHT="20")
    task = asyncio.create_task(consumer._consume())
    await until(lambda: len(dispatcher.settlements) == 2)
    await asyncio.sleep(0.05)
    assert len(dispatcher.settlements) == 2, "fetched past the bound"

    dispatcher.settlements[0].settle()
    await until(lambda: len(dispatcher.settlements) == 3)
    await asyncio.sleep(0.05)
    assert len(dispatcher.settlements) == 3
    dispatcher.settlements[1].settle()
    dispatcher.settlements[2].settle()
    await until(lambda: len(dispatcher.settlements) == 5)
    for settlement in dispatcher.settlements[3:]:
        settlement.settle()
    await until(lambda: bool(kafka.commits) and kafka.commits[-1] == {P0: 50})
    await finish(consumer, task)


async def test_a_revoked_partition_commits_what_settled_and_leaves_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On revocation settled batches are committed at once; one that does not settle in
    time is left to the next owner, and its offsets are never committed here later."""
    monkeypatch.setattr("service.consumer.REVOKE_WAIT", 0.1)
    consumer, kafka, dispatcher = pipeline(
        [{P0: records(P0, 0, 5)}, {P1: records(P1, 0, 5)}, {P0: records(P0, 5, 5)}]
    )
    kafka.commit_gate = asyncio.Event()  # the commit loop's commits hang: revocation commits
    task = asyncio.create_task(consumer._consume())
    await until(lambda: len(dispatcher.settlements) == 3)
    dispatcher.settlements[0].settle()
    await until(lambda: kafka.commits_started == 1)
    kafka.commit_gate.set()
    await until(lambda: kafka.commits == [{P0: 5}])
    dispatcher.settlements[2].settle()  # P0 5-9 settled, behind P1's unsettled batch

    await consumer._revoked({P1})

    assert kafka.commits == [{P0: 5}, {P0: 10}]
    dispatcher.settlements[1].settle()
    await asyncio.sleep(0.05)
    assert all(P1 not in offsets for offsets in kafka.commits), "committed a revoked partition"
    await finish(consumer, task)


async def test_revocation_waits_for_the_batches_of_its_partitions_to_settle() -> None:
    """A batch that settles within the revocation's wait is committed before it returns."""
    consumer, kafka, dispatcher = pipeline([{P1: records(P1, 0, 5)}])
    task = asyncio.create_task(consumer._consume())
    await until(lambda: len(dispatcher.settlements) == 1)
    asyncio.get_running_loop().call_later(0.05, dispatcher.settlements[0].settle)

    await consumer._revoked({P1})

    assert kafka.commits == [{P1: 5}]
    await finish(consumer, task)


async def test_stop_settles_and_commits_everything_in_flight() -> None:
    """Stopping fetches nothing more, waits for the batches in flight and commits them."""
    consumer, kafka, dispatcher = pipeline([{P0: records(P0, 0, 5)}, {P1: records(P1, 0, 7)}])
    consumer._task = asyncio.create_task(consumer._consume())
    await until(lambda: len(dispatcher.settlements) == 2)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, dispatcher.settlements[1].settle)
    loop.call_later(0.1, dispatcher.settlements[0].settle)

    await consumer.stop(grace=5.0)

    committed: dict[TopicPartition, int] = {}
    for offsets in kafka.commits:
        committed.update(offsets)
    assert committed == {P0: 5, P1: 7}
    assert len(dispatcher.settlements) == 2
