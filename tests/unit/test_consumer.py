"""The consumer's bookkeeping that needs no Kafka (the rest is in tests/integration)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from service.config import Settings
from service.consumer import Consumer
from service.metrics import Metrics
from service.notification import PoisonMessage


class RebalancedConsumer:
    """Holds partition 0 only; asks about any other partition fail like aiokafka's."""

    def __init__(self) -> None:
        self.mine = TopicPartition("notification.send", 0)

    def assignment(self) -> set[TopicPartition]:
        return {self.mine}

    def highwater(self, partition: TopicPartition) -> int:
        assert partition == self.mine, "Partition is not assigned"
        return 120


def test_lag_report_skips_partitions_revoked_since_the_fetch() -> None:
    # A batch fetched from partitions 0 and 1; a rebalance then took partition 1
    # away. Reporting lag must not kill the consumer (it did, under 2 workers).
    metrics = Metrics()
    consumer = Consumer(Settings.from_env({}), dispatcher=None, metrics=metrics)  # type: ignore[arg-type]
    fake: Any = RebalancedConsumer()
    revoked = TopicPartition("notification.send", 1)

    consumer._report_lag(fake, {fake.mine: 100, revoked: 7})

    assert metrics.consumer_lag.labels("0")._value.get() == 20


# --- one record, whatever it holds -------------------------------------------------------

PARTITION = TopicPartition("notification.send", 0)
NOW_MS = 1_800_000_000_000


def record(value: bytes | None, offset: int, *, timestamp: Any = NOW_MS - 1000) -> Any:
    return SimpleNamespace(
        topic=PARTITION.topic,
        partition=0,
        offset=offset,
        timestamp=timestamp,
        key=None,
        value=value,
        headers=(),
    )


def good(user: str = "alice") -> bytes:
    return json.dumps(
        {
            "message_id": str(uuid.uuid4()),
            "delivery_method": "push",
            "user_id": user,
            "subject": "s",
            "content": "c",
        }
    ).encode()


def test_an_exception_while_handling_one_record_dead_letters_only_that_record() -> None:
    """A record that makes the handling code raise is poison "internal"; the others go on."""
    metrics = Metrics()
    consumer = Consumer(Settings.from_env({}), dispatcher=None, metrics=metrics)  # type: ignore[arg-type]
    # A timestamp of the wrong type makes the timestamp rule raise TypeError.
    batch = [record(good(), 10), record(good(), 11, timestamp=None), record(good(), 12)]

    notifications, poison, offsets = consumer._sort({PARTITION: batch}, NOW_MS)

    assert [n.user_id for n in notifications] == ["alice", "alice"]
    assert [(r.offset, exc.reason) for r, exc in poison] == [(11, "internal")]
    assert poison[0][1].detail.startswith("TypeError")
    assert offsets == {PARTITION: 13}


def test_odd_timestamps_are_delivered_not_expired() -> None:
    """Records stamped -1, 0 or year 10000 are delivered (as made now), not dropped as old."""
    metrics = Metrics()
    consumer = Consumer(Settings.from_env({}), dispatcher=None, metrics=metrics)  # type: ignore[arg-type]
    stamps = [-1, 0, 253_402_300_800_000, -(2**63)]
    batch = [record(good(), n, timestamp=t) for n, t in enumerate(stamps)]

    notifications, poison, _ = consumer._sort({PARTITION: batch}, NOW_MS)

    assert poison == []
    assert [n.created_ms for n in notifications] == [NOW_MS] * len(stamps)


class BrokenDeadLetterTopic:
    """A producer whose every send fails the way a topic that cannot be written does."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.attempts = 0

    async def send(self, topic: str, **_: Any) -> Any:
        self.attempts += 1
        raise self.error


class WorkingDeadLetterTopic:
    def __init__(self) -> None:
        self.written: list[tuple[str, Any]] = []

    async def send(self, topic: str, **fields: Any) -> Any:
        self.written.append((topic, fields))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def dead_letter_consumer(producer: Any, **env: str) -> tuple[Consumer, Metrics]:
    metrics = Metrics()
    settings = Settings.from_env({"KAFKA_DLQ_TIMEOUT": "0.5s", **env})
    consumer = Consumer(settings, dispatcher=None, metrics=metrics)  # type: ignore[arg-type]
    consumer._producer = producer
    return consumer, metrics


@pytest.mark.parametrize(
    "error",
    [KafkaTimeoutError(), UnknownTopicOrPartitionError(), TopicAuthorizationFailedError()],
    ids=["timing out", "missing topic", "denied"],
)
async def test_an_unwritable_dead_letter_topic_is_given_up_on_after_its_timeout(
    error: Exception,
) -> None:
    """Retried until KAFKA_DLQ_TIMEOUT, then counted and skipped; readiness shows it."""
    producer = BrokenDeadLetterTopic(error)
    consumer, metrics = dead_letter_consumer(producer)
    poison = [(record(b"x", 7), PoisonMessage("invalid_json"))]

    started = time.monotonic()
    await asyncio.wait_for(consumer._dead_letter(poison), 5)

    assert time.monotonic() - started >= 0.4
    assert producer.attempts >= 2
    assert metrics.dead_letter_failures._value.get() == 1
    assert metrics.dead_letter_healthy._value.get() == 0
    assert not consumer.dead_letter_healthy


async def test_while_the_dead_letter_topic_fails_later_batches_wait_less() -> None:
    """Once given up, a further batch tries only briefly: poison cannot slow every batch to 30 s."""
    producer = BrokenDeadLetterTopic(KafkaTimeoutError())
    consumer, metrics = dead_letter_consumer(producer, KAFKA_DLQ_TIMEOUT="60s")
    consumer._dead_letter_failed_at = time.monotonic()

    started = time.monotonic()
    await asyncio.wait_for(consumer._dead_letter([(record(b"x", 8), PoisonMessage("x"))]), 10)

    assert time.monotonic() - started < 5
    assert metrics.dead_letter_failures._value.get() == 1


async def test_a_dead_letter_write_that_succeeds_makes_the_topic_healthy_again() -> None:
    """After an outage, the next successful copy turns the dlq check and gauge back on."""
    producer = WorkingDeadLetterTopic()
    consumer, metrics = dead_letter_consumer(producer)
    consumer._dead_letter_failed_at = time.monotonic()
    metrics.dead_letter_healthy.set(0)

    await consumer._dead_letter([(record(b"x", 9), PoisonMessage("invalid_json", "bad"))])

    assert len(producer.written) == 1
    headers = dict(producer.written[0][1]["headers"])
    assert headers["notify-error"] == b"invalid_json"
    assert headers["notify-source"] == b"notification.send/0/9"
    assert consumer.dead_letter_healthy
    assert metrics.dead_letter_healthy._value.get() == 1


async def test_a_copy_kafka_refuses_for_good_is_skipped_at_once() -> None:
    """A DLQ copy refused as too large is not retried for the whole timeout."""
    producer = BrokenDeadLetterTopic(MessageSizeTooLargeError())
    consumer, metrics = dead_letter_consumer(producer, KAFKA_DLQ_TIMEOUT="60s")

    await asyncio.wait_for(consumer._dead_letter([(record(b"x", 3), PoisonMessage("x"))]), 5)

    assert producer.attempts == 1
    assert metrics.dead_letter_failures._value.get() == 1
