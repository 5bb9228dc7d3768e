"""The Kafka side: read ``notification.send``, hand push notifications to the dispatcher.

Delivery guarantee (docs/design.md): offsets are committed manually, after the
dispatcher has returned for the whole batch, that is after every notification
up to the committed offset was written to a socket or stored in PostgreSQL, and
after every poison message up to it was copied to the dead-letter topic, or given
up on after ``KAFKA_DLQ_TIMEOUT`` (logged with partition and offset, counted), and
after the status events of the batch were flushed (``service.status``: a poison
record reports ``dead_lettered``, a record past ``BACKLOG_TTL`` ``expired``, the
router ``written`` or ``stored``). A crash anywhere before the commit means Kafka
delivers the batch again, and its status events are reported again: at least once.

What the consumer takes: any record Kafka can hold. Batches compressed with gzip,
snappy, lz4 or zstd (the codecs come with the ``aiokafka`` extras); only committed
records of transactions (``read_committed``: an aborted transaction is never
delivered); keys and headers of any shape (ignored, the key is kept on a
dead-letter copy); null values and any timestamp (see ``notification.parse``).
Whatever goes wrong while handling one record, an exception of any kind included,
dead-letters that record (reason ``internal``) and never stops the partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import codec as kafka_codec
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    GroupAuthorizationFailedError,
    KafkaError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedCodecError,
)

from .config import Settings
from .metrics import Metrics
from .notification import (
    MAX_VALUE_BYTES,
    Notification,
    PoisonMessage,
    Skip,
    normalise_user_id,
    parse,
)
from .status import NO_STATUS, StatusSink

log = logging.getLogger("notify.consumer")

# Errors no reconnect cures: a batch this process cannot decompress or check, a topic
# or group it may not read. The consumer keeps retrying (with backoff) but logs them
# as critical, counts them, and stays unready while they recur.
_PERSISTENT_ERRORS = (
    UnsupportedCodecError,
    CorruptRecordException,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
)
# How long readiness stays false after a persistent Kafka error or a failed
# dead-letter write: long enough to be seen by a probe every few seconds.
UNHEALTHY_FOR = 60.0
# While the dead-letter topic is failing, a further batch tries it once, this long at
# most, instead of the full KAFKA_DLQ_TIMEOUT: poison in every batch must not slow
# every partition to one batch per timeout.
DLQ_RETRY_WHILE_FAILING = 2.0


def missing_codecs() -> list[str]:
    """The compression codecs Kafka producers use that this installation cannot read."""
    available = {
        "snappy": kafka_codec.has_snappy(),
        "lz4": kafka_codec.has_lz4(),
        "zstd": kafka_codec.has_zstd(),
    }
    return [name for name, present in available.items() if not present]


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

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        metrics: Metrics,
        status: StatusSink = NO_STATUS,
    ) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._status = status
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connected = False
        self._persistent_error_at: float | None = None
        self._dead_letter_failed_at: float | None = None

    @property
    def assigned(self) -> bool:
        """Whether this process holds partitions of the topic (readiness)."""
        return self._consumer is not None and self.connected and bool(self._consumer.assignment())

    @property
    def healthy(self) -> bool:
        """Readiness of the Kafka side: partitions held, no persistent error in the last minute.

        A persistent error (a codec missing, a corrupt batch, access denied) makes the
        consumer fail on every fetch; it retries, but is not ready while that recurs.
        """
        return self.assigned and not _recent(self._persistent_error_at)

    @property
    def dead_letter_healthy(self) -> bool:
        """False from a failed dead-letter write until one succeeds or a minute passes."""
        return not _recent(self._dead_letter_failed_at)

    def start(self) -> None:
        if self._task is None:
            missing = missing_codecs()
            for name in ("snappy", "lz4", "zstd"):
                self._metrics.kafka_codec_missing.labels(name).set(name in missing)
            if missing:
                # Records compressed so would fail every fetch of their partition.
                log.critical("kafka_codecs_missing", extra={"codecs": missing})
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
                if not _recent(self._persistent_error_at):
                    delay = 0.5
                # An error that recurs on every fetch keeps the backoff growing (to 10 s):
                # each reconnect is a rebalance of the whole group.
                await self._consume()
            except KafkaError as exc:
                self.connected = False
                self._metrics.consumer_errors.labels(type(exc).__name__).inc()
                error = f"{type(exc).__name__}: {exc}"[:300]
                if isinstance(exc, _PERSISTENT_ERRORS):
                    self._persistent_error_at = time.monotonic()
                    log.critical("kafka_error_persistent", extra={"error": error})
                else:
                    log.error("kafka_error", extra={"error": error})
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
            # Records of aborted transactions are never delivered, nor those of open
            # ones until they commit (a partition waits for its open transaction, at
            # most the producer's transaction.timeout.ms).
            isolation_level="read_committed",
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
            notifications, poison, offsets = self._sort(batches, int(time.time() * 1000))
            if poison:
                await self._dead_letter(poison)
            await self._dispatcher.deliver(notifications)
            # The status events of these records are in Kafka before their offsets
            # are committed (bounded: a failing status topic never stops delivery).
            await self._status.flush()
            # Everything up to these offsets is written, stored or dead-lettered:
            # commit, in the background so the next fetch need not wait for the
            # broker's answer. One commit at a time, in order.
            await self._await_commit()
            self._commit_task = asyncio.create_task(self._commit(consumer, offsets))
            self._report_lag(consumer, offsets)
        await self._await_commit()

    def _sort(
        self, batches: dict[TopicPartition, list[Any]], now_ms: int
    ) -> tuple[list[Notification], list[tuple[Any, PoisonMessage]], dict[TopicPartition, int]]:
        """Split fetched records into notifications and poison; the offsets to commit after.

        Skipped and expired records are only counted. Never raises: an exception of
        any kind while handling one record makes that record poison (``internal``).
        """
        notifications: list[Notification] = []
        poison: list[tuple[Any, PoisonMessage]] = []
        offsets: dict[TopicPartition, int] = {}
        oldest_ms = now_ms - self._settings.backlog_ttl * 1000
        for partition, records in batches.items():
            self._metrics.consumed.inc(len(records))
            for record in records:
                try:
                    result = parse(record.value, record.timestamp, now_ms)
                    if isinstance(result, Skip):
                        self._metrics.skipped.inc()
                    elif result.created_ms < oldest_ms:
                        self._metrics.expired.labels("ttl_on_consume").inc()
                        self._status.expired([(result.user_id, result.message_id)])
                    else:
                        notifications.append(result)
                except PoisonMessage as exc:
                    poison.append((record, exc))
                except Exception as exc:
                    # A bug of ours that one record triggers: that record goes to the
                    # DLQ with the exception's type, the partition goes on.
                    log.error(
                        "record_handling_failed",
                        extra={"partition": partition.partition, "offset": record.offset},
                        exc_info=exc,
                    )
                    poison.append((record, PoisonMessage("internal", _describe(exc))))
            offsets[partition] = records[-1].offset + 1
        return notifications, poison, offsets

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
        """Copy poison messages to the DLQ (reason in headers), retrying for a bounded time.

        Returns once every copy was written or given up on. A copy Kafka refuses for
        good (too large) is given up at once; others are retried with backoff for
        ``KAFKA_DLQ_TIMEOUT`` (for :data:`DLQ_RETRY_WHILE_FAILING` while the DLQ keeps
        failing). A copy given up on is logged with partition and offset, counted in
        ``notify_dead_letter_failures_total`` and skipped: an unwritable DLQ (missing
        topic, access denied, timing out) never stops the partitions.
        """
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
            self._status.dead_lettered(*_poison_ids(record.value))
        topic = self._settings.kafka_dlq_topic
        if not topic or self._producer is None:
            return
        loop = asyncio.get_running_loop()
        budget = self._settings.kafka_dlq_timeout
        if not self.dead_letter_healthy:
            budget = min(budget, DLQ_RETRY_WHILE_FAILING)
        deadline = loop.time() + budget
        pending, delay, cause = poison, 0.1, "TimeoutError"
        while True:
            pending, error = await self._write_dead_letters(
                self._producer, topic, pending, deadline
            )
            if not pending:
                if error is None:
                    self._dead_letter_failed_at = None
                    self._metrics.dead_letter_healthy.set(1)
                return
            if error is not None and error != "TimeoutError":
                cause = error  # what the broker said, rather than that time ran out
            self._dead_letter_failed_at = time.monotonic()
            self._metrics.dead_letter_healthy.set(0)
            left = deadline - loop.time()
            if left <= 0:
                break
            log.warning("dead_letter_retry", extra={"records": len(pending), "error": error})
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)
        for record, exc in pending:
            self._dead_letter_given_up(record, exc.reason, cause)

    async def _write_dead_letters(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        poison: list[tuple[Any, PoisonMessage]],
        deadline: float,
    ) -> tuple[list[tuple[Any, PoisonMessage]], str | None]:
        """One attempt to write ``poison`` by ``deadline`` (loop time): what is left, and why.

        A refusal that no retry can cure (too large) is given up on here, not returned.
        """
        loop = asyncio.get_running_loop()
        sent: list[tuple[Any, PoisonMessage, asyncio.Future[Any]]] = []
        failed: list[tuple[Any, PoisonMessage]] = []
        error: str | None = None
        for index, (record, exc) in enumerate(poison):
            value, headers = _dead_letter_copy(record, exc)
            try:
                # send() waits for the topic's metadata (up to its request timeout, for a
                # topic that does not exist): bounded by what is left of the budget.
                future = await asyncio.wait_for(
                    producer.send(topic, value=value, key=record.key, headers=headers),
                    max(deadline - loop.time(), 0.01),
                )
            except MessageSizeTooLargeError:
                self._dead_letter_given_up(record, exc.reason, "MessageSizeTooLargeError")
                continue
            except (KafkaError, TimeoutError) as failure:
                error = type(failure).__name__
                failed += poison[index:] if isinstance(failure, TimeoutError) else [(record, exc)]
                if isinstance(failure, TimeoutError):
                    break
                continue
            sent.append((record, exc, future))
        if sent:
            futures = [future for _, _, future in sent]
            await asyncio.wait(futures, timeout=max(deadline - loop.time(), 0.01))
            for record, exc, future in sent:
                if not future.done():
                    future.cancel()  # aiokafka settles only futures not yet done
                    failed.append((record, exc))
                    error = error or "TimeoutError"
                elif isinstance(future.exception(), MessageSizeTooLargeError):
                    self._dead_letter_given_up(record, exc.reason, "MessageSizeTooLargeError")
                elif future.exception() is not None:
                    failed.append((record, exc))
                    error = type(future.exception()).__name__
        return failed, error

    def _dead_letter_given_up(self, record: Any, reason: str, error: str) -> None:
        log.error(
            "dead_letter_failed",
            extra={
                "partition": record.partition,
                "offset": record.offset,
                "reason": reason,
                "error": error,
            },
        )
        self._metrics.dead_letter_failures.inc()


def _dead_letter_copy(
    record: Any, exc: PoisonMessage
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The value and headers of the DLQ copy of ``record``."""
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
    return value, headers


def _poison_ids(value: bytes | None) -> tuple[str | None, str | None]:
    """``(user_id, message_id)`` of a poison record, each as far as it can be read.

    Never raises. A field is read only from a value that is a JSON object within
    64 KiB; the user id only if ``normalise_user_id`` takes it (its normal form), the
    message id only if it is a UUID (lower case); anything else is None.
    """
    if value is None or len(value) > MAX_VALUE_BYTES:
        return None, None
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(document, dict):
        return None, None
    raw_user_id, raw_message_id = document.get("user_id"), document.get("message_id")
    user_id = normalise_user_id(raw_user_id) if isinstance(raw_user_id, str) else None
    message_id: str | None = None
    if isinstance(raw_message_id, str) and len(raw_message_id) <= 38:
        try:
            message_id = str(uuid.UUID(raw_message_id))
        except ValueError:
            message_id = None
    return user_id, message_id


def _describe(exc: BaseException) -> str:
    """An exception as a DLQ detail: its type first, then the start of its message."""
    return f"{type(exc).__name__}: {exc}"[:300]


def _recent(at: float | None) -> bool:
    return at is not None and time.monotonic() - at < UNHEALTHY_FOR
