"""The Kafka side: read ``notification.send``, hand push notifications to the dispatcher.

Delivery guarantee (DESIGN.md §3): offsets are committed manually, after the
dispatcher has returned for the whole batch, that is after every notification
up to the committed offset was written to a socket or stored in PostgreSQL, and
after every poison message up to it was copied to the dead-letter topic. A crash
anywhere before the commit means Kafka delivers the batch again: at least once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError

from .config import Settings
from .metrics import Metrics
from .notification import MAX_VALUE_BYTES, Notification, PoisonMessage, Skip, parse

log = logging.getLogger("notify.consumer")


class Dispatcher(Protocol):
    """What the consumer needs downstream: the router."""

    async def deliver(self, notifications: Sequence[Notification]) -> None:
        """Return once every notification was written to a socket or stored."""
        ...


class Consumer:
    """Consumes the topic in a consumer group and commits what was delivered.

    ``start()`` launches the named background task ``kafka-consumer``, which
    connects (retrying while Kafka is down) and loops; ``stop()`` lets the batch
    in hand finish, commits it and closes the clients. ``stop()`` is idempotent.
    """

    def __init__(self, settings: Settings, dispatcher: Dispatcher, metrics: Metrics) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connected = False

    @property
    def assigned(self) -> bool:
        """Whether this process holds partitions of the topic (readiness)."""
        return self._consumer is not None and self.connected and bool(self._consumer.assignment())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kafka-consumer")

    async def stop(self, grace: float) -> None:
        """Finish the batch in hand, commit it, close. Cancels after ``grace`` seconds."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), grace)
            except TimeoutError:
                log.warning("consumer_stop_timeout", extra={"grace": grace})
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._close_clients()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                await self._connect()
                delay = 0.5
                await self._consume()
            except KafkaError as exc:
                self.connected = False
                log.error("kafka_error", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                await self._close_clients()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _connect(self) -> None:
        s = self._settings
        common: dict[str, Any] = {
            "bootstrap_servers": s.kafka_bootstrap_servers,
            "client_id": "notify-ws",
        }
        self._consumer = AIOKafkaConsumer(
            s.kafka_topic,
            group_id=s.kafka_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.kafka_max_batch,
            fetch_max_wait_ms=100,
            **common,
        )
        await self._consumer.start()
        if s.kafka_dlq_topic:
            self._producer = AIOKafkaProducer(acks="all", linger_ms=5, **common)
            await self._producer.start()
        self.connected = True
        log.info("kafka_connected", extra={"topic": s.kafka_topic, "group": s.kafka_group_id})

    async def _close_clients(self) -> None:
        self.connected = False
        commit, self._commit_task = self._commit_task, None
        if commit is not None:
            # Only after an error: a commit that did not finish is simply redone
            # by the next owner reading those records again.
            commit.cancel()
            await asyncio.gather(commit, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        for client in (consumer, producer):
            if client is not None:
                try:
                    await client.stop()
                except Exception as exc:
                    log.warning("kafka_close_failed", extra={"error": type(exc).__name__})

    async def _consume(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while not self._stopping:
            batches = await consumer.getmany(
                timeout_ms=200, max_records=self._settings.kafka_max_batch
            )
            if not batches:
                continue
            notifications: list[Notification] = []
            poison: list[tuple[Any, PoisonMessage]] = []
            offsets: dict[TopicPartition, int] = {}
            oldest_ms = (time.time() - self._settings.backlog_ttl) * 1000
            for partition, records in batches.items():
                self._metrics.consumed.inc(len(records))
                for record in records:
                    try:
                        result = parse(record.value, record.timestamp)
                    except PoisonMessage as exc:
                        poison.append((record, exc))
                        continue
                    if isinstance(result, Skip):
                        self._metrics.skipped.inc()
                    elif 0 < record.timestamp < oldest_ms:
                        self._metrics.expired.labels("ttl_on_consume").inc()
                    else:
                        notifications.append(result)
                offsets[partition] = records[-1].offset + 1
            if poison:
                await self._dead_letter(poison)
            await self._dispatcher.deliver(notifications)
            # Everything up to these offsets is written, stored or dead-lettered:
            # commit, in the background so the next fetch need not wait for the
            # broker's answer. One commit at a time, in order.
            await self._await_commit()
            self._commit_task = asyncio.create_task(self._commit(consumer, offsets))
            self._report_lag(consumer, offsets)
        await self._await_commit()

    async def _await_commit(self) -> None:
        """Wait for the commit in flight; a Kafka error in it is raised here."""
        task, self._commit_task = self._commit_task, None
        if task is not None:
            await task

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
        except CommitFailedError as exc:
            # The group rebalanced meanwhile; the new owner reads these records
            # again (at least once), and the next batch commits normally.
            log.warning("commit_failed", extra={"error": str(exc)[:300]})

    def _report_lag(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        assigned = consumer.assignment()
        for partition, next_offset in offsets.items():
            if partition not in assigned:
                continue  # revoked by a rebalance since the fetch: no longer ours to report
            highwater = consumer.highwater(partition)
            if highwater is not None:
                self._metrics.consumer_lag.labels(str(partition.partition)).set(
                    max(0, highwater - next_offset)
                )

    async def _dead_letter(self, poison: list[tuple[Any, PoisonMessage]]) -> None:
        """Copy poison messages to the DLQ (reason in headers), retrying until Kafka takes them."""
        for record, exc in poison:
            log.warning(
                "poison_message",
                extra={
                    "reason": exc.reason,
                    "detail": exc.detail,
                    "partition": record.partition,
                    "offset": record.offset,
                },
            )
            self._metrics.dead_lettered.labels(exc.reason).inc()
        topic = self._settings.kafka_dlq_topic
        if not topic or self._producer is None:
            return
        producer = self._producer
        futures = []
        for record, exc in poison:
            value = record.value
            headers = [
                ("notify-error", exc.reason.encode()),
                ("notify-error-detail", exc.detail.encode("utf-8", "replace")[:500]),
                ("notify-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
            ]
            if value is not None and len(value) > MAX_VALUE_BYTES:
                # Kafka may refuse the whole of an oversized value (max.request.size):
                # keep its head, and say how large it was.
                headers.append(("notify-original-size", str(len(value)).encode()))
                value = value[:MAX_VALUE_BYTES]
            try:
                futures.append(
                    (
                        record,
                        await producer.send(topic, value=value, key=record.key, headers=headers),
                    )
                )
            except MessageSizeTooLargeError:
                self._dead_letter_refused(record)
        # A KafkaError here fails the batch: it is not committed, the run loop
        # reconnects and the batch is read again. Only a refusal that no retry can
        # cure is logged and counted instead, so one record never blocks a partition.
        outcomes = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
        for (record, _), outcome in zip(futures, outcomes, strict=True):
            if isinstance(outcome, MessageSizeTooLargeError):
                self._dead_letter_refused(record)
            elif isinstance(outcome, BaseException):
                raise outcome

    def _dead_letter_refused(self, record: Any) -> None:
        log.error(
            "dead_letter_refused", extra={"partition": record.partition, "offset": record.offset}
        )
        self._metrics.dead_letter_failures.inc()
