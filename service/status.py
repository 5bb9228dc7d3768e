"""Delivery status events: what became of each notification, for the platform to act on.

With ``STATUS_TOPIC`` set, the gateway produces one record per notification and user
each time its state changes, keyed by ``user_id``, at least once:

``{"message_id": ..., "user_id": ..., "status": ..., "at": <epoch ms>}``

=================  ==========================================================
status             when
=================  ==========================================================
``written``        a v1 connection's socket took the frame
``acked``          a v2 connection acknowledged it
``stored``         it reached no connection and was saved to the backlog
``expired``        retention deleted it unacknowledged (TTL or per-user cap)
``dead_lettered``  the record broke the input contract (``message_id`` and
                   ``user_id`` as far as they could be read, else null)
=================  ==========================================================

The platform's notification service uses them to fall back to e-mail or a mobile
push when a notification stays unread. This module holds the interface the other
parts call; :class:`NoStatus` is the sink when ``STATUS_TOPIC`` is empty,
:class:`KafkaStatus` the one that produces to it.

At least once: the consumer calls :meth:`StatusSink.flush` before it commits an
offset, so the events of committed records are in Kafka first, unless the status
topic failed for longer than the flush waits (then they are logged and counted, and
delivery goes on: status events never hold up notifications). A record read again
after a crash reports its events again; the platform dedupes by
``(message_id, user_id, status)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any, Final, Protocol

from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from .metrics import Metrics
from .notification import Notification

log = logging.getLogger("notify.status")

WRITTEN: Final = "written"
ACKED: Final = "acked"
STORED: Final = "stored"
EXPIRED: Final = "expired"
DEAD_LETTERED: Final = "dead_lettered"


class StatusSink(Protocol):
    """Where the parts report state changes. Every method is synchronous and never
    raises nor blocks: an implementation queues, and :meth:`flush` waits for what was
    queued to be durable (the consumer calls it before committing offsets)."""

    def written(self, notifications: Sequence[Notification]) -> None: ...

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None: ...

    def stored(self, notifications: Sequence[Notification]) -> None: ...

    def expired(self, rows: Iterable[tuple[str, str]]) -> None:
        """``rows``: ``(user_id, message_id)`` pairs retention deleted."""
        ...

    def dead_lettered(self, user_id: str | None, message_id: str | None) -> None: ...

    async def flush(self) -> None:
        """Return once everything reported so far is written (or given up, logged)."""
        ...


class NoStatus:
    """The sink when ``STATUS_TOPIC`` is empty: reports nothing, costs nothing."""

    __slots__ = ()

    def written(self, notifications: Sequence[Notification]) -> None:
        return None

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None:
        return None

    def stored(self, notifications: Sequence[Notification]) -> None:
        return None

    def expired(self, rows: Iterable[tuple[str, str]]) -> None:
        return None

    def dead_lettered(self, user_id: str | None, message_id: str | None) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self, grace: float = 0.0) -> None:
        return None


NO_STATUS: Final = NoStatus()


class Producer(Protocol):
    """What :class:`KafkaStatus` needs of ``aiokafka.AIOKafkaProducer`` (a fake in tests)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions (waits for its metadata)."""
        ...

    def create_batch(self) -> Any:
        """An empty record batch: ``append(key=, value=, timestamp=)``, None once full."""
        ...

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Awaitable[Any]:
        """Queue a batch; the awaitable it returns settles when Kafka has it."""
        ...


# Events held in memory at most, waiting for Kafka: 100,000 of them measured 30 MB
# of RSS. Beyond it the oldest are dropped (counted, logged): memory stays bounded
# when the status topic is down, and delivery never waits for it.
MAX_PENDING: Final = 100_000
# Events handed to the producer in one round; the next round starts once Kafka has
# answered for all of them (or SEND_TIMEOUT passed), so rounds settle in order.
ROUND: Final = 5_000
SEND_TIMEOUT: Final = 15.0
# How long flush() waits; while rounds keep failing, FLUSH_WHILE_FAILING only, so a
# status topic that is down costs each consumer batch at most that.
FLUSH_TIMEOUT: Final = 10.0
FLUSH_WHILE_FAILING: Final = 1.0
# Warnings about dropped events: at most one per this many seconds.
_WARN_EVERY = 10.0


class KafkaStatus:
    """Produces status events to ``topic``, keyed by ``user_id``, from a bounded queue.

    The report methods (:class:`StatusSink`) only encode and append: they never
    block nor raise, and are safe to call from any coroutine of the event loop (not
    from other threads). A background task ``status-producer`` (started by
    :meth:`start`) connects, retrying while Kafka is down, and sends the queue in
    order, round after round: events for one user reach the topic in the order they
    were reported. A round Kafka refuses or does not confirm within
    :data:`SEND_TIMEOUT` is given up (logged, counted as ``failed``); over
    :data:`MAX_PENDING` waiting events the oldest are dropped (counted as
    ``dropped``, logged at most every 10 s). ``close()`` is idempotent.
    """

    def __init__(
        self,
        topic: str,
        metrics: Metrics,
        producer: Callable[[], Producer],
        *,
        max_pending: int = MAX_PENDING,
        flush_timeout: float = FLUSH_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self._topic = topic
        self._metrics = metrics
        self._make_producer = producer
        self._max_pending = max_pending
        self._flush_timeout = flush_timeout
        self._send_timeout = send_timeout
        # (sequence number, key, value); sequence numbers count every event reported.
        self._queue: deque[tuple[int, bytes | None, bytes]] = deque()
        self._reported = 0
        self._settled = 0  # every event up to this sequence number is sent or given up
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Condition()
        self._failing = False
        self._warned_at = -_WARN_EVERY
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def start(self) -> None:
        """Start the producing task; returns at once (Kafka may still be down)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="status-producer")

    async def close(self, grace: float = FLUSH_TIMEOUT) -> None:
        """Flush (for ``grace`` seconds at most), then stop the task and the producer.

        Events still unsent then are logged and counted as ``failed``.
        """
        if self._closed:
            return
        await self._flush(min(grace, self._flush_timeout))
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        left = len(self._queue)
        if left:
            log.warning("status_events_unsent", extra={"events": left})
            self._metrics.status_events.labels("failed").inc(left)
            self._queue.clear()

    def written(self, notifications: Sequence[Notification]) -> None:
        self._report_all(notifications, WRITTEN)

    def acked(self, user_id: str, message_ids: Iterable[str]) -> None:
        at = _now_ms()
        for message_id in message_ids:
            self._report(user_id, message_id, ACKED, at)

    def stored(self, notifications: Sequence[Notification]) -> None:
        self._report_all(notifications, STORED)

    def expired(self, rows: Iterable[tuple[str, str]]) -> None:
        at = _now_ms()
        for user_id, message_id in rows:
            self._report(user_id, message_id, EXPIRED, at)

    def dead_lettered(self, user_id: str | None, message_id: str | None) -> None:
        self._report(user_id, message_id, DEAD_LETTERED, _now_ms())

    async def flush(self) -> None:
        """Return once every event reported before the call is sent or given up on.

        Waits at most the flush timeout (:data:`FLUSH_WHILE_FAILING` while Kafka keeps
        refusing); events still unsent then stay queued, and the wait is logged and
        counted (``notify_status_flush_timeouts_total``). Never raises.
        """
        await self._flush(self._flush_timeout)

    async def _flush(self, budget: float) -> None:
        target = self._reported
        if self._settled >= target or self._task is None:
            return
        timeout = min(budget, FLUSH_WHILE_FAILING) if self._failing else budget
        try:
            async with self._progress:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: self._settled >= target), timeout
                )
        except TimeoutError:
            self._metrics.status_flush_timeouts.inc()
            log.warning(
                "status_flush_timeout",
                extra={"waiting": target - self._settled, "timeout": timeout},
            )

    def _report_all(self, notifications: Sequence[Notification], status: str) -> None:
        at = _now_ms()
        for n in notifications:
            self._report(n.user_id, n.message_id, status, at)

    def _report(self, user_id: str | None, message_id: str | None, status: str, at: int) -> None:
        if self._closed:
            return
        value = _RECORD.format(_json(message_id), _json(user_id), status, at).encode()
        self._reported += 1
        self._queue.append(
            (self._reported, user_id.encode() if user_id is not None else None, value)
        )
        if len(self._queue) > self._max_pending:
            self._queue.popleft()
            self._metrics.status_events.labels("dropped").inc()
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY:
                self._warned_at = now
                log.warning("status_events_dropped", extra={"pending": len(self._queue)})
        self._wakeup.set()

    async def _run(self) -> None:
        """Connect (retrying), then send the queue round after round until cancelled."""
        producer = await self._connect()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue:
                    try:
                        await self._send_round(producer)
                    except Exception as exc:
                        # A bug of ours in one round: its events are counted as failed
                        # (in _send_round); the task goes on with the next round.
                        log.error("status_round_failed", extra={"error": _describe(exc)})
                        await asyncio.sleep(0.1)
        finally:
            try:
                await producer.stop()
            except Exception as exc:
                log.warning("kafka_close_failed", extra={"error": type(exc).__name__})

    async def _connect(self) -> Producer:
        delay = 0.5
        while True:
            producer = self._make_producer()
            try:
                await producer.start()
                return producer
            except Exception as exc:
                self._failing = True
                log.error("status_connect_failed", extra={"error": _describe(exc)})
                with contextlib.suppress(Exception):  # a half-started client
                    await producer.stop()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _send_round(self, producer: Producer) -> None:
        """Send up to :data:`ROUND` events, wait for Kafka's answers, mark them settled.

        Events go in record batches, one or more per partition (the partition of the
        key, as Kafka's own default partitioner picks it), appended in reporting
        order: a producer request per batch rather than a future per event.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._send_timeout
        count = min(len(self._queue), ROUND)
        events = [self._queue.popleft() for _ in range(count)]
        last = events[-1][0]
        sent: list[tuple[asyncio.Future[Any], int]] = []
        failed, error, complete = 0, "", False
        try:
            try:
                # Waits for the topic's metadata: bounded like the rest of the round.
                partitions = sorted(
                    await asyncio.wait_for(
                        producer.partitions_for(self._topic), max(deadline - loop.time(), 0.01)
                    )
                )
                groups = _by_partition(events, partitions)
                for partition, records in groups.items():
                    batch, size = producer.create_batch(), 0
                    for key, value in records:
                        if batch.append(key=key, value=value, timestamp=None) is None:
                            sent.append((await self._send(producer, batch, partition), size))
                            batch, size = producer.create_batch(), 0
                            batch.append(key=key, value=value, timestamp=None)
                        size += 1
                    sent.append((await self._send(producer, batch, partition), size))
            except (TimeoutError, KafkaError) as exc:
                error = _describe(exc)
                failed += count - sum(size for _, size in sent)
            if sent:
                futures = [future for future, _ in sent]
                await asyncio.wait(futures, timeout=max(deadline - loop.time(), 0.01))
                for future, size in sent:
                    if not future.done():
                        future.cancel()  # aiokafka settles only futures not yet done
                        failed += size
                        error = error or "TimeoutError"
                    elif future.exception() is not None:
                        failed += size
                        error = error or _describe(future.exception())
            complete = True
        finally:
            if not complete:  # cancelled (close) or a bug: only what Kafka confirmed counts
                confirmed = sum(
                    size
                    for future, size in sent
                    if future.done() and not future.cancelled() and future.exception() is None
                )
                failed, error = count - confirmed, error or "interrupted"
            produced = count - failed
            if produced:
                self._metrics.status_events.labels("produced").inc(produced)
            if failed:
                self._metrics.status_events.labels("failed").inc(failed)
                log.warning("status_events_failed", extra={"events": failed, "error": error})
            self._failing = failed > 0
            self._settled = max(self._settled, last)
            async with self._progress:
                self._progress.notify_all()

    async def _send(self, producer: Producer, batch: Any, partition: int) -> asyncio.Future[Any]:
        """Queue one record batch for ``partition``; the future settles with Kafka's answer."""
        future = await producer.send_batch(batch, self._topic, partition=partition)
        return asyncio.ensure_future(future)


def _by_partition(
    events: list[tuple[int, bytes | None, bytes]], partitions: list[int]
) -> dict[int, list[tuple[bytes | None, bytes]]]:
    """The events of a round by partition, each list in reporting order."""
    groups: dict[int, list[tuple[bytes | None, bytes]]] = {}
    chosen: dict[bytes | None, int] = {}
    for _, key, value in events:
        partition = chosen.get(key) if key is not None else None
        if partition is None:
            # Kafka's default partitioner (murmur2 of the key); no key: any partition.
            partition = _partition(key, partitions)
            if key is not None:
                chosen[key] = partition
        groups.setdefault(partition, []).append((key, value))
    return groups


def kafka_producer(bootstrap_servers: str) -> Callable[[], Producer]:
    """A factory of the producer for status events: acks from all replicas, no compression."""
    from aiokafka import AIOKafkaProducer

    def make() -> Producer:
        producer: Producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id="notify-ws-status",
            acks="all",
            linger_ms=5,
            request_timeout_ms=10_000,
            # Record batches of up to 256 KiB: some 2,000 events per produce request.
            max_batch_size=256 * 1024,
        )
        return producer

    return make


# The record, formatted by hand: orjson's bytes keep a 4 KiB buffer each (100,000
# queued events were 400 MB, against 15 MB so); the strings are JSON-escaped, the
# status is one of ours and ``at`` an int.
_RECORD = '{{"message_id":{},"user_id":{},"status":"{}","at":{}}}'
_PARTITIONER = DefaultPartitioner()


def _json(text: str | None) -> str:
    """``text`` as a JSON string (ASCII, escaped), or ``null``."""
    return "null" if text is None else encode_basestring_ascii(text)


def _partition(key: bytes | None, partitions: list[int]) -> int:
    partition: int = _PARTITIONER(key, partitions, partitions)
    return partition


def _now_ms() -> int:
    return int(time.time() * 1000)


def _describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
