"""The Kafka side: read ``notification.send``, hand push notifications to the dispatcher.

Delivery guarantee (docs/design.md): offsets are committed manually, per
partition, up to the first record whose batch has not settled: every
notification up to the committed offset was written to a socket (acknowledged by
a v2 client) or stored in PostgreSQL, every poison message up to it was copied to
the dead-letter topic, or given up on after ``KAFKA_DLQ_TIMEOUT`` (logged with
partition and offset, counted), and the status events of those records were
flushed (``service.status``: a poison record reports ``dead_lettered``, a record
past ``BACKLOG_TTL`` ``expired``, the router ``written``, ``acked`` or ``stored``). A
crash anywhere before the commit means Kafka delivers those records again, and
their status events are reported again: at least once.

The fetch loop waits neither for a commit nor for a batch to settle: it
dispatches a batch (publishing it, which writes most live frames at once) and
fetches the next, while earlier batches settle (acknowledgements, slow sockets,
the store). :class:`Pipeline` keeps the batches in fetch order; the task
``kafka-commit`` commits what settled, one commit at a time, later offsets
coalesced into the next. At most ``KAFKA_MAX_IN_FLIGHT`` records are unsettled:
past it the fetch loop waits for the oldest batches (back-pressure). On a
rebalance the batches of revoked partitions get :data:`REVOKE_WAIT` to settle and
are committed; ``stop()`` settles and commits everything in flight.

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
from collections import deque
from collections.abc import Callable, Collection, Generator, Sequence
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
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


# How long the batches of revoked partitions may take to settle before the rebalance
# goes on without their commit (the next owner then reads them again: at least once).
# Far below the group's rebalance timeout (max.poll.interval.ms, 5 min).
REVOKE_WAIT = 10.0


class Settlement(Protocol):
    """The outcome of one dispatched batch (``router.Settlement``)."""

    def done(self) -> bool: ...

    def add_done_callback(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (once) when it completes; soon, if it already has."""
        ...

    def result(self) -> None:
        """Once done: None, or raises what the settling raised."""
        ...

    def cancel(self) -> None:
        """Stop settling (shutdown past its grace): nothing of it will be committed."""
        ...

    def __await__(self) -> Generator[Any, None, None]: ...


class Dispatcher(Protocol):
    """What the consumer needs downstream: the router."""

    async def dispatch(self, notifications: Sequence[Notification]) -> Settlement:
        """Send the notifications on their way, in order; return once that is done.

        The settlement completes once every one was written to a socket (acknowledged,
        for v2) or stored. Calls are made one at a time, in the topic's order.
        """
        ...


class _Fetched:
    """One fetched batch: the offsets to commit once it settled, and its size."""

    __slots__ = ("offsets", "records", "settled", "settlement")

    def __init__(
        self, offsets: dict[TopicPartition, int], records: int, settlement: Settlement
    ) -> None:
        self.offsets = offsets
        self.records = records
        self.settlement = settlement
        self.settled = False


class Pipeline:
    """The batches fetched and not committed yet, in fetch order.

    It knows what may be committed: per partition, the offset after the last of its
    batches in an unbroken run of settled ones from its oldest. A batch still
    settling holds back the later batches of the partitions it holds (a batch
    settles as a whole), not those of other partitions. Used from one event loop;
    plain bookkeeping, no I/O.
    """

    def __init__(self) -> None:
        self._batches: deque[_Fetched] = deque()
        self._partitions: set[TopicPartition] = set()
        self.unsettled = 0  # records of batches not settled yet
        self._fresh = False  # a batch settled since the last take_settled
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, offsets: dict[TopicPartition, int], records: int, settlement: Settlement) -> None:
        """Track a batch just dispatched; ``records``: how many it fetched."""
        fetched = _Fetched(offsets, records, settlement)
        self._batches.append(fetched)
        self._partitions.update(offsets)
        self.unsettled += records
        if settlement.done():
            self._settled(fetched)
        else:
            settlement.add_done_callback(lambda: self._settled(fetched))

    def _settled(self, fetched: _Fetched) -> None:
        if fetched.settled:
            return
        fetched.settled = True
        self.unsettled -= fetched.records
        self._fresh = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def take_settled(self) -> dict[TopicPartition, int]:
        """Remove what may be committed now; the offsets to commit, by partition.

        Raises what a settlement raised (a bug downstream): nothing past it is committed.
        """
        self._fresh = False
        offsets: dict[TopicPartition, int] = {}
        blocked: set[TopicPartition] = set()
        kept: deque[_Fetched] = deque()
        batches = self._batches
        while batches and len(blocked) < len(self._partitions):
            fetched = batches.popleft()
            if not fetched.settled:
                blocked.update(fetched.offsets)
                kept.append(fetched)
                continue
            fetched.settlement.result()
            for partition in [p for p in fetched.offsets if p not in blocked]:
                offsets[partition] = fetched.offsets.pop(partition)
            if fetched.offsets:
                kept.append(fetched)
        kept.extend(batches)
        self._batches = kept
        return offsets

    def cancel(self) -> None:
        """Cancel every batch still settling (none of them will be committed)."""
        for fetched in self._batches:
            if not fetched.settled:
                fetched.settlement.cancel()

    def settled_for(self, partitions: Collection[TopicPartition]) -> bool:
        """Whether every batch holding one of ``partitions`` settled."""
        return all(
            fetched.settled
            for fetched in self._batches
            if any(partition in fetched.offsets for partition in partitions)
        )

    def revoke(self, partitions: Collection[TopicPartition]) -> None:
        """Forget ``partitions``: their batches still settle, but are not committed here."""
        self._partitions.difference_update(partitions)
        for fetched in self._batches:
            for partition in partitions:
                fetched.offsets.pop(partition, None)
        self._batches = deque(f for f in self._batches if f.offsets or not f.settled)

    async def changed(self) -> None:
        """Return at the next batch that settles."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def wait(self, ready: Callable[[], bool]) -> None:
        """Return once ``ready()`` is true, checking it whenever a batch settles."""
        while not ready():
            await self.changed()

    async def fresh(self) -> None:
        """Return once a batch settled since the last :meth:`take_settled`."""
        await self.wait(lambda: self._fresh)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits what settled of the partitions taken away, before they are."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._consumer._revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        return None


class Consumer:
    """Consumes the topic in a consumer group and commits what was delivered.

    ``start()`` launches the named background task ``kafka-consumer``, which
    connects (retrying while Kafka is down) and runs the fetch loop, with the task
    ``kafka-commit`` beside it while connected; ``stop()`` lets the batches in
    flight settle, commits them and closes the clients. ``stop()`` is idempotent.
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
        self._commit_lock = asyncio.Lock()
        self._pipeline: Pipeline | None = None
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
        """Stop fetching; let the batches in flight settle and commit them; close.

        Cancels after ``grace`` seconds: what is not committed by then is read again
        by the next owner of the partitions.
        """
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), grace)
            except TimeoutError:
                log.warning("consumer_stop_timeout", extra={"grace": grace})
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if self._pipeline is not None:
                    # Read again by the next owner; their stores and waits end here.
                    self._pipeline.cancel()
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
        self._consumer.subscribe([s.kafka_topic], listener=_Rebalance(self))
        await self._consumer.start()
        if s.kafka_dlq_topic:
            self._producer = AIOKafkaProducer(acks="all", linger_ms=5, **common)
            await self._producer.start()
        self.connected = True
        log.info("kafka_connected", extra={"topic": s.kafka_topic, "group": s.kafka_group_id})

    async def _close_clients(self) -> None:
        self.connected = False
        # Whatever is still in flight is read again by the next owner of its partitions
        # (a rebalance listener called while the client stops has nothing to commit).
        self._pipeline = None
        commit, self._commit_task = self._commit_task, None
        if commit is not None:
            # A commit that did not finish is simply redone by the next owner
            # reading those records again.
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
        pipeline = self._pipeline = Pipeline()
        self._commit_task = asyncio.create_task(
            self._commit_loop(consumer, pipeline), name="kafka-commit"
        )
        committer = self._commit_task
        limit = self._settings.kafka_max_in_flight
        while not self._stopping:
            if committer.done():
                committer.result()  # a Kafka error of a commit: reconnect
            if pipeline.unsettled >= limit:
                # Back-pressure: the oldest batches settle first (or a commit fails).
                await _first(pipeline.changed(), committer)
                continue
            batches = await consumer.getmany(
                timeout_ms=200, max_records=self._settings.kafka_max_batch
            )
            if not batches:
                continue
            notifications, poison, offsets = self._sort(batches, int(time.time() * 1000))
            if poison:
                await self._dead_letter(poison)
            # Returns once published, in order; the batch settles in the background.
            settlement = await self._dispatcher.dispatch(notifications)
            pipeline.add(offsets, sum(len(records) for records in batches.values()), settlement)
            self._report_lag(consumer, offsets)
        # Stopping: everything fetched settles and is committed (``stop`` bounds the wait).
        await _first(pipeline.wait(lambda: pipeline.unsettled == 0), committer)
        await self._commit_settled(consumer, pipeline)

    async def _commit_loop(self, consumer: AIOKafkaConsumer, pipeline: Pipeline) -> None:
        """Commit what settled, one commit at a time; what settles meanwhile goes in the next."""
        while True:
            await pipeline.fresh()
            await self._commit_settled(consumer, pipeline)

    async def _commit_settled(self, consumer: AIOKafkaConsumer, pipeline: Pipeline) -> None:
        """Commit the offsets of the settled batches at the head of ``pipeline``.

        Raises a KafkaError of the commit (other than a rebalance's CommitFailedError).
        """
        async with self._commit_lock:
            offsets = pipeline.take_settled()
            if not offsets:
                return
            # The status events of these records are in Kafka before their offsets
            # are committed (bounded: a failing status topic never stops delivery).
            await self._status.flush()
            await self._commit(consumer, offsets)

    async def _revoked(self, revoked: Collection[TopicPartition]) -> None:
        """A rebalance takes ``revoked`` away: let their batches settle (for
        :data:`REVOKE_WAIT` at most), commit what settled, forget the rest."""
        consumer, pipeline = self._consumer, self._pipeline
        if consumer is None or pipeline is None or not revoked:
            return
        try:
            settled = pipeline.wait(lambda: pipeline.settled_for(revoked))
            await asyncio.wait_for(settled, REVOKE_WAIT)
        except TimeoutError:
            log.warning("revoke_unsettled", extra={"partitions": len(revoked)})
        try:
            await self._commit_settled(consumer, pipeline)
        except KafkaError as exc:
            log.warning("revoke_commit_failed", extra={"error": str(exc)[:300]})
        # Not committed here: the next owner reads them again (at least once).
        pipeline.revoke(revoked)

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


async def _first(waiting: Any, committer: asyncio.Task[None]) -> None:
    """Await the coroutine ``waiting`` unless ``committer`` ends first (raising its error)."""
    task = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait([task, committer], return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
    if committer.done():
        committer.result()


def _recent(at: float | None) -> bool:
    return at is not None and time.monotonic() - at < UNHEALTHY_FOR
