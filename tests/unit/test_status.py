"""Delivery status events: what KafkaStatus produces, and when the consumer flushes it."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner

from service.config import Settings
from service.consumer import Consumer, _poison_ids
from service.metrics import Metrics
from service.notification import Notification
from service.status import KafkaStatus, NoStatus

from .fakes import Settled

TOPIC = "notification.status"


class FakeBatch:
    """A record batch that takes ``capacity`` records, like aiokafka's BatchBuilder."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes | None, bytes]] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> object | None:
        if len(self.records) >= self.capacity:
            return None
        self.records.append((key, value))
        return object()


class FakeProducer:
    """Records what is sent, in order; Kafka's answers come when the test says so.

    ``held`` is None to confirm every batch at once, or a list collecting the futures
    for the test to settle. ``sent`` is ``(topic, partition, key, record)`` per event;
    ``batches`` the sizes of the batches sent.
    """

    def __init__(
        self,
        *,
        held: list[asyncio.Future[Any]] | None = None,
        partitions: int = 1,
        capacity: int = 1000,
    ) -> None:
        self.sent: list[tuple[str, int, bytes | None, dict[str, Any]]] = []
        self.batches: list[int] = []
        self.held = held
        self.partitions = partitions
        self.capacity = capacity
        self.refuse: Exception | None = None
        self.started = self.stopped = 0

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.extend((topic, partition, k, json.loads(v)) for k, v in batch.records)
        self.batches.append(len(batch.records))
        if self.refuse is not None:
            future.set_exception(self.refuse)
        elif self.held is None:
            future.set_result(None)
        else:
            self.held.append(future)
        return future

    def keys(self) -> list[bytes | None]:
        return [key for _, _, key, _ in self.sent]


def notification(user_id: str) -> Notification:
    return Notification.build(str(uuid.uuid4()), user_id, "t", "b", 1)


def events(metrics: Metrics, outcome: str) -> float:
    value: float = metrics.status_events.labels(outcome)._value.get()
    return value


async def sink(producer: FakeProducer, **options: Any) -> tuple[KafkaStatus, Metrics]:
    metrics = Metrics()
    status = KafkaStatus(TOPIC, metrics, lambda: producer, **options)
    await status.start()
    return status, metrics


async def test_events_are_produced_in_order_keyed_by_user_with_the_record_schema() -> None:
    """Each report is one JSON record on the topic, keyed by its user, in reporting order."""
    producer = FakeProducer()
    status, metrics = await sink(producer)
    a, b = notification("alice"), notification("bob")
    status.stored([a, b])
    status.written([a])
    status.acked("bob", [b.message_id])
    status.expired([("carol", "00000000-0000-0000-0000-000000000001")])
    status.dead_lettered(None, None)
    await status.flush()

    got = [
        (topic, key, r["user_id"], r["message_id"], r["status"])
        for topic, _, key, r in producer.sent
    ]
    assert got == [
        (TOPIC, b"alice", "alice", a.message_id, "stored"),
        (TOPIC, b"bob", "bob", b.message_id, "stored"),
        (TOPIC, b"alice", "alice", a.message_id, "written"),
        (TOPIC, b"bob", "bob", b.message_id, "acked"),
        (TOPIC, b"carol", "carol", "00000000-0000-0000-0000-000000000001", "expired"),
        (TOPIC, None, None, None, "dead_lettered"),
    ]
    assert all(set(r) == {"message_id", "user_id", "status", "at"} for *_, r in producer.sent)
    assert all(isinstance(r["at"], int) and r["at"] > 1_700_000_000_000 for *_, r in producer.sent)
    assert events(metrics, "produced") == 6
    await status.close()


async def test_each_users_events_go_to_the_partition_of_their_key_in_order() -> None:
    """Over several partitions and batches, a user's events keep their order, on the
    partition Kafka's default partitioner gives the user id, so consumers keyed by user
    see them in order; a user-less event goes to any partition."""
    producer = FakeProducer(partitions=3, capacity=4)
    status, metrics = await sink(producer)
    users = [f"user-{n}" for n in range(6)]
    sent = [notification(users[n % 6]) for n in range(60)]
    status.stored(sent)
    status.dead_lettered(None, None)
    await status.flush()

    assert max(producer.batches) == 4 and len(producer.batches) >= 15
    assert events(metrics, "produced") == 61
    for user in users:
        mine = [(p, r["message_id"]) for _, p, k, r in producer.sent if k == user.encode()]
        assert [m for _, m in mine] == [n.message_id for n in sent if n.user_id == user]
        assert {p for p, _ in mine} == {DefaultPartitioner()(user.encode(), [0, 1, 2], [0, 1, 2])}
    await status.close()


async def test_user_ids_of_any_text_are_encoded_as_json() -> None:
    """Quotes, backslashes, control and non-ASCII characters come out as valid JSON."""
    producer = FakeProducer()
    status, _ = await sink(producer)
    odd = 'a"b\\c\n\u00e9\u2028'
    status.expired([(odd, "00000000-0000-0000-0000-000000000001")])
    await status.flush()
    assert [(k, r["user_id"]) for _, _, k, r in producer.sent] == [(odd.encode(), odd)]
    await status.close()


async def test_flush_returns_only_once_kafka_confirmed_what_was_reported_before() -> None:
    """flush() waits for Kafka's acknowledgement of every event reported before it."""
    held: list[asyncio.Future[Any]] = []
    producer = FakeProducer(held=held, capacity=1)
    status, _ = await sink(producer)
    status.stored([notification("alice"), notification("bob")])
    flush = asyncio.create_task(status.flush())
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(held) == 2:
            break
    assert len(held) == 2
    assert not flush.done()
    held[0].set_result(None)
    await asyncio.sleep(0.05)
    assert not flush.done()
    held[1].set_result(None)
    await asyncio.wait_for(flush, 5.0)
    await status.close()


async def test_flush_gives_up_after_its_timeout_and_counts_it() -> None:
    """A Kafka that never answers delays flush() by its timeout only; the events then fail."""
    producer = FakeProducer(held=[])
    status, metrics = await sink(producer, flush_timeout=0.2, send_timeout=0.5)
    status.stored([notification("alice")])
    await asyncio.wait_for(status.flush(), 5.0)
    assert metrics.status_flush_timeouts._value.get() == 1
    for _ in range(100):
        if events(metrics, "failed") == 1:
            break
        await asyncio.sleep(0.02)
    assert events(metrics, "failed") == 1
    await status.close()


async def test_refused_events_are_counted_as_failed_and_later_ones_go_on() -> None:
    """An event Kafka refuses is counted and dropped; the sink keeps producing after it."""
    producer = FakeProducer()
    status, metrics = await sink(producer)
    producer.refuse = KafkaTimeoutError()
    status.stored([notification("alice")])
    await status.flush()
    producer.refuse = None
    status.stored([notification("bob")])
    await status.flush()
    assert events(metrics, "failed") == 1
    assert events(metrics, "produced") == 1
    assert producer.keys() == [b"alice", b"bob"]
    await status.close()


async def test_over_the_bound_the_oldest_events_are_dropped_and_counted() -> None:
    """While Kafka is away, at most ``max_pending`` events wait: the oldest go first."""
    producer = FakeProducer()
    metrics = Metrics()
    status = KafkaStatus(TOPIC, metrics, lambda: producer, max_pending=3)
    status.stored([notification(f"user-{n}") for n in range(5)])  # not started: all wait
    assert events(metrics, "dropped") == 2
    await status.start()
    await status.flush()
    assert producer.keys() == [b"user-2", b"user-3", b"user-4"]
    await status.close()


async def test_the_sink_connects_when_kafka_comes_up_and_sends_what_waited() -> None:
    """A Kafka that is down at start is retried; events reported meanwhile are sent after."""
    made: list[FakeProducer] = []

    class DownOnce(FakeProducer):
        async def start(self) -> None:
            if len(made) == 1:
                raise KafkaConnectionError()

    def make() -> FakeProducer:
        made.append(DownOnce())
        return made[-1]

    metrics = Metrics()
    status = KafkaStatus(TOPIC, metrics, make)
    await status.start()
    status.stored([notification("alice")])
    await asyncio.wait_for(status.flush(), 5.0)
    assert len(made) == 2
    assert made[1].keys() == [b"alice"]
    await status.close()


async def test_close_flushes_stops_the_producer_and_is_idempotent() -> None:
    """close() sends what was reported, stops the producer once, and may be called twice."""
    producer = FakeProducer()
    status, _ = await sink(producer)
    status.stored([notification("alice")])
    await status.close()
    await status.close()
    status.stored([notification("bob")])  # after close: ignored, never raises
    assert producer.keys() == [b"alice"]
    assert producer.stopped == 1


# --- the consumer's side ------------------------------------------------------------------

PARTITION = TopicPartition("notification.send", 0)
MESSAGE_ID = "5a3f2b8e-3c1d-4e5f-9a0b-1c2d3e4f5a6b"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (None, None)),
        (b"\xff not json", (None, None)),
        (b"[1, 2]", (None, None)),
        (b'{"user_id": "alice"}', ("alice", None)),
        (f'{{"message_id": "{MESSAGE_ID.upper()}"}}'.encode(), (None, MESSAGE_ID)),
        (b'{"user_id": 7, "message_id": "not-a-uuid"}', (None, None)),
        (b'{"user_id": "bad\\u0000id", "message_id": null}', (None, None)),
        (
            f'{{"user_id": "bob", "message_id": "{MESSAGE_ID}", "delivery_method": 5}}'.encode(),
            ("bob", MESSAGE_ID),
        ),
    ],
)
def test_a_poison_records_ids_are_read_as_far_as_they_can_be(
    value: bytes | None, expected: tuple[str | None, str | None]
) -> None:
    """A dead_lettered event names the user and message when the value names them validly."""
    assert _poison_ids(value) == expected


class Journal(list[str]):
    """What happened, in order."""


class RecordingStatus(NoStatus):
    __slots__ = ("journal",)

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def dead_lettered(self, user_id: str | None, message_id: str | None) -> None:
        self.journal.append(f"dead_lettered {user_id} {message_id}")

    def expired(self, rows: Any) -> None:
        self.journal.extend(f"expired {user}" for user, _ in rows)

    async def flush(self) -> None:
        self.journal.append("flush")


class OneBatch:
    """An AIOKafkaConsumer that returns one batch, then stops its consumer."""

    def __init__(self, journal: Journal, records: list[Any], stop: Any) -> None:
        self.journal = journal
        self.records = records
        self.stop = stop

    async def getmany(self, **_: Any) -> dict[TopicPartition, list[Any]]:
        self.stop()
        return {PARTITION: self.records}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.journal.append(f"commit {offsets[PARTITION]}")

    def assignment(self) -> set[TopicPartition]:
        return {PARTITION}

    def highwater(self, partition: TopicPartition) -> int:
        return 3


class Dispatcher:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def dispatch(self, notifications: Sequence[Notification]) -> Settled:
        self.journal.append(f"deliver {len(notifications)}")
        return Settled()


async def test_the_consumer_reports_poison_and_late_records_and_flushes_before_committing() -> None:
    """Poison is dead_lettered, a record past the TTL expired, and both are flushed before
    the offsets that cover them are committed."""
    journal = Journal()
    settings = Settings.from_env({"KAFKA_DLQ_TOPIC": "", "BACKLOG_TTL": "1h"})
    consumer = Consumer(settings, Dispatcher(journal), Metrics(), RecordingStatus(journal))
    fresh = json.dumps(
        {
            "message_id": MESSAGE_ID,
            "delivery_method": "push",
            "user_id": "alice",
            "subject": "s",
            "content": "c",
        }
    ).encode()
    poison = json.dumps({"message_id": MESSAGE_ID, "user_id": "bob"}).encode()

    def record(value: bytes, offset: int, timestamp: int) -> Any:
        return SimpleNamespace(
            topic=PARTITION.topic,
            partition=0,
            offset=offset,
            timestamp=timestamp,
            key=None,
            value=value,
        )

    now = int(time.time() * 1000)
    records = [record(fresh, 0, now), record(poison, 1, now), record(fresh, 2, now - 7_200_000)]

    def stop() -> None:
        consumer._stopping = True

    consumer._consumer = OneBatch(journal, records, stop)
    await consumer._consume()

    assert journal == [
        "expired alice",
        f"dead_lettered bob {MESSAGE_ID}",
        "deliver 1",
        "flush",
        "commit 3",
    ]


async def test_close_gives_up_after_its_grace_and_counts_what_kafka_did_not_confirm() -> None:
    """At shutdown a Kafka that does not answer costs ``grace`` only; its events are failed."""
    producer = FakeProducer(held=[])
    status, metrics = await sink(producer)
    status.stored([notification("alice"), notification("bob")])
    await asyncio.wait_for(status.close(grace=0.2), 5.0)
    assert events(metrics, "failed") == 2
    assert events(metrics, "produced") == 0
    assert producer.stopped == 1
