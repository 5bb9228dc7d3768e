"""The node: one gateway process, owning its parts and running connect, startup and shutdown.

This is the one place where the parts are built (:func:`build_parts`) and put
in order. The parts: the store, the authenticator, the hub and the router, the
broker (``MemoryBroker`` when ``REDIS_URL`` is empty, ``RedisBroker`` otherwise:
one code path either way), the Kafka consumer and the status sink (``KafkaStatus``
when ``STATUS_TOPIC`` is set, ``NO_STATUS`` otherwise). ``Node`` takes them
ready-made, so its ordering rules are unit-tested with fakes.

Startup order:  store pool -> status sink -> acked-row deletes -> broker (receiving
for the router) -> consumer -> loops.

Connect order (:meth:`Node.connect`): subscribe the process to the user's channel,
register the connection in the hub, then its writer flushes the stored backlog
before any live frame. Take any notification N for the user: published after the
subscription, it reaches this process (and the registered connection, or the
store, whose insert is followed by a flush hint); published before, it is in the
store by the time the flush reads it, or stored after, and hinted. Never lost.

Shutdown order (``stop``), under ``SHUTDOWN_TIMEOUT``:

1. readiness turns false and new WebSockets are refused with 1001;
2. the consumer stops fetching, lets the batches in flight settle (written,
   acknowledged or stored), commits them, and closes;
3. the broker drains: with Redis, the process leaves every channel and delivers
   what was already published to it; after this nothing more is received here;
4. every open connection is closed with 1001 (going away: reconnect elsewhere),
   and what their queues still held is stored;
5. background loops stop (retention, which reports ``expired``, among them); the
   acknowledged rows still queued are deleted (bounded); the status sink flushes
   what the parts reported (bounded) and closes; the broker, the auth client and
   the store pool close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncGenerator, Callable, Collection, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from .acked import AckedRows
from .auth import Authenticator, Identity, build_authenticator
from .broker import MemoryBroker, Receiver, RedisBroker
from .closecode import CloseCode
from .config import Settings
from .connection import Connection, Socket, StoredRows
from .consumer import Consumer
from .hub import Hub, Rejected
from .limits import raise_open_files
from .metrics import Metrics
from .router import Backlog, Router, StoreUnavailable
from .status import NO_STATUS, KafkaStatus, NoStatus, StatusSink, kafka_producer
from .store import OnDeleted, Store

log = logging.getLogger("notify.node")


# Young-generation threshold of the cyclic GC. Each consumer batch keeps thousands
# of small objects alive for a few milliseconds; with CPython's default (700) they
# are promoted to the old generation, which then fills and is scanned in full,
# every connection's objects included: pauses of seconds at 10k connections
# (docs/performance.md). A larger young generation lets them die young.
_GC_THRESHOLDS = (50_000, 20, 100)


def _tune_gc() -> None:
    """Freeze what startup created (never garbage) and enlarge the young generation."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


# Readiness checks that are reported but do not make the node unready: a dead-letter
# topic that cannot be written costs only the copies of poison messages, and failing
# readiness for it would take every gateway out of its load balancer at once.
ADVISORY = frozenset({"dlq"})


def is_ready(checks: dict[str, bool]) -> bool:
    """Whether readiness checks add up to "ready": every one but the advisory ones."""
    return all(ok for name, ok in checks.items() if name not in ADVISORY)


class NodeStore(Backlog, StoredRows, Protocol):
    """What the node needs of the store (``service.store.Store``), besides the router's
    and the connections'."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises StoreUnavailable."""
        ...

    def expire(
        self, ttl_seconds: float, batch: int, on_deleted: OnDeleted | None = None
    ) -> AsyncGenerator[int, None]:
        """Yields the rows each statement deleted; tells ``on_deleted`` which ones."""
        ...

    def cap(
        self,
        max_per_user: int,
        user_ids: Collection[str] | None,
        batch: int,
        on_deleted: OnDeleted | None = None,
    ) -> AsyncGenerator[int, None]:
        """Yields the rows each statement deleted; tells ``on_deleted`` which ones."""
        ...


class NodeBroker(Protocol):
    """What the node needs of the broker (``service.broker``), besides the router's."""

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The broker's background task, if it runs one."""
        ...

    async def start(self, receiver: Receiver, wait: float = 0.0) -> None: ...

    async def subscribe(self, user_id: str, wait: float = 5.0) -> None:
        """Returns once messages for the user reach this process. Raises BrokerUnavailable."""
        ...

    def unsubscribe(self, user_id: str) -> None: ...

    async def readiness(self) -> dict[str, bool]:
        """The broker's own readiness checks, by name (none for the memory broker)."""
        ...

    async def drain(self, grace: float) -> None: ...

    async def close(self) -> None: ...


class NodeConsumer(Protocol):
    """What the node needs of the Kafka consumer (``service.consumer.Consumer``)."""

    @property
    def task(self) -> asyncio.Task[None] | None: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def dead_letter_healthy(self) -> bool: ...

    def start(self) -> None: ...

    async def stop(self, grace: float) -> None:
        """Stop fetching, settle and commit the batches in flight, close."""
        ...


class NodeStatus(StatusSink, Protocol):
    """What the node needs of the status sink (``service.status``), besides reporting."""

    async def start(self) -> None: ...

    async def close(self, grace: float) -> None:
        """Flush what was reported (for ``grace`` seconds at most), then stop. Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class Parts:
    """Everything a node runs, built by :func:`build_parts` (or by a test, with fakes).

    The router already holds the hub, the store and the broker; the consumer
    holds the router as its dispatcher.
    """

    metrics: Metrics
    store: NodeStore
    auth: Authenticator
    hub: Hub[Connection]
    broker: NodeBroker
    router: Router
    consumer: NodeConsumer
    status: NodeStatus = NO_STATUS
    # Deletes acknowledged rows in batches; None: each ack deletes its own.
    acked_rows: AckedRows | None = None


def build_parts(
    settings: Settings, metrics: Metrics, *, authenticator: Authenticator | None = None
) -> Parts:
    """The production parts of one process, wired: the one place that chooses them.

    The broker is a ``MemoryBroker`` over the hub when ``REDIS_URL`` is empty, a
    ``RedisBroker`` otherwise; the status sink a ``KafkaStatus`` when
    ``STATUS_TOPIC`` is set, ``NO_STATUS`` otherwise. Nothing is started or
    connected here.
    """
    status: KafkaStatus | NoStatus = (
        KafkaStatus(
            settings.status_topic, metrics, kafka_producer(settings.kafka_bootstrap_servers)
        )
        if settings.status_topic
        else NO_STATUS
    )
    store = Store(settings.database_url, pool_size=settings.database_pool_size)
    hub: Hub[Connection] = Hub(
        max_per_user=settings.max_connections_per_user, max_total=settings.max_connections
    )
    broker: RedisBroker | MemoryBroker = (
        RedisBroker(settings.redis_url, settings.redis_channel_prefix)
        if settings.redis_url
        else MemoryBroker(hub)
    )
    acked_rows = AckedRows(store, status)
    router = Router(
        hub,  # type: ignore[arg-type]  # Hub is invariant; Connection is an Outlet
        store,
        metrics,
        broker=broker,
        # A receiver may legitimately take up to WRITE_TIMEOUT on one socket, or
        # ACK_WAIT for a v2 client's acknowledgement, before it stores.
        ack_timeout=settings.write_timeout + settings.ack_wait + 5.0,
        ack_wait=settings.ack_wait,
        status=status,
        acked_rows=acked_rows,
    )
    return Parts(
        metrics=metrics,
        store=store,
        auth=authenticator or build_authenticator(settings, metrics),
        hub=hub,
        broker=broker,
        router=router,
        consumer=Consumer(settings, router, metrics, status),
        status=status,
        acked_rows=acked_rows,
    )


class Node:
    """Everything one gateway process runs. ``start()`` once; ``stop()`` is idempotent."""

    def __init__(self, settings: Settings, parts: Parts) -> None:
        self.settings = settings
        self.metrics = parts.metrics
        self.store = parts.store
        self.auth = parts.auth
        self.hub = parts.hub
        self.broker = parts.broker
        self.router = parts.router
        self.consumer = parts.consumer
        self.status = parts.status
        self.acked_rows = parts.acked_rows
        # Read when scraped, not set on every connect and disconnect.
        self.metrics.connections.set_function(self.hub.__len__)
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        # Called once when a background task dies; the application stops the
        # process with it (``python -m service`` then exits with status 70).
        self.on_fatal: Callable[[], None] | None = None
        # The name of the background task that died, if one did.
        self.failure: str | None = None

    async def start(self) -> None:
        """Start the parts in the order of the module docstring.

        Also raises this process's open-file limit (``limits.raise_open_files``) and
        warns when it stays below what ``MAX_CONNECTIONS`` needs.
        """
        raise_open_files(self.settings.max_connections)
        await self.store.start()
        await self.status.start()
        if self.acked_rows is not None:
            await self.acked_rows.start()
            self._supervise(self.acked_rows.task)
        # A worker serves as soon as this returns: wait (bounded) for Redis's pub/sub
        # connection, or its first clients would be turned away with 4503.
        await self.broker.start(self.router, wait=5.0)
        self._supervise(self.broker.task)
        self.consumer.start()
        self._supervise(self.consumer.task)
        _tune_gc()
        self._spawn("backlog-retention", self._retention_loop)
        log.info("node_started", extra={"port": self.settings.port})

    @classmethod
    def build(cls, settings: Settings, *, authenticator: Authenticator | None = None) -> Node:
        """A node with the production parts (:func:`build_parts`)."""
        return cls(settings, build_parts(settings, Metrics(), authenticator=authenticator))

    def _spawn(self, name: str, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.create_task(loop(), name=name)
        self._tasks.append(task)
        self._supervise(task)

    def _supervise(self, task: asyncio.Task[None] | None) -> None:
        """A background task that ends while the node is not stopping stops the process.

        Never a silent half-node: a node without its consumer takes connections and
        delivers nothing. The first such task is named in ``failure`` and ``on_fatal``
        is called once; the process then exits non-zero, so that an orchestrator
        restarts it (README, "Exit status").
        """

        def done(finished: asyncio.Task[None]) -> None:
            if finished.cancelled() or self.stopping:
                return
            exc = finished.exception()
            log.critical(
                "background_task_died",
                extra={"task": finished.get_name(), "error": repr(exc)},
                exc_info=exc,
            )
            if self.failure is not None:
                return
            self.failure = finished.get_name()
            if self.on_fatal is not None:
                self.on_fatal()

        if task is not None:
            task.add_done_callback(done)

    async def connect(
        self, socket: Socket, identity: Identity, *, acks: bool = False
    ) -> Connection:
        """Plug an authenticated client in: subscribe, register, then write.

        In the order of the module docstring: the process is subscribed to the
        user's channel, the connection registered in the hub (from then on live
        notifications queue for it), and its writer started, which sends the
        stored backlog before any live frame. Pair every connection it returns
        with :meth:`disconnect`. ``acks``: the client speaks protocol v2.

        Raises:
            BrokerUnavailable: the subscription was not confirmed (Redis down);
                nothing is registered.
            Rejected: a connection limit; nothing is left subscribed.
        If cancelled (the client left while subscribing), nothing is left behind.
        """
        user_id = identity.user_id
        hub = self.hub
        connection = Connection(
            socket,
            identity,
            self.metrics,
            queue_size=self.settings.send_queue_size,
            on_unsent=self.router.store_soon,
            acks=acks,
            v2_open=lambda: any(c.acks for c in hub.connections(user_id)),
            status=self.router.status,
            acked_rows=self.acked_rows,
            writers=self._writers,
        )
        # Subscribe before registering and flushing: a message published from now
        # on reaches this process, and one published before is in the store.
        await self.broker.subscribe(user_id)
        try:
            self.hub.register(connection)
        except Rejected:
            self.broker.unsubscribe(user_id)
            raise
        socket.on_stall(connection.stalled)
        self.metrics.connections_opened.inc()
        writer = connection.run(self.store, flush_batch=self.settings.flush_batch)
        task = asyncio.create_task(writer, name="ws-writer")
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)
        return connection

    def disconnect(self, connection: Connection) -> None:
        """The client is gone: unregister, unsubscribe, settle what its queue held.

        Synchronous on purpose: Sanic may cancel the handler when the client
        leaves, and the connection must still leave the hub and settle its queue.
        The writer sees the detach and ends by itself (cancelling it could cut a
        flush between writing frames and deleting their rows). Idempotent.
        """
        connection.detach()
        if connection not in self.hub.connections(connection.user_id):
            return  # already disconnected: its subscription was given back then
        self.hub.unregister(connection)
        self.broker.unsubscribe(connection.user_id)

    async def readiness(self) -> dict[str, bool]:
        """Each readiness check by name; the node is ready when all but ``ADVISORY`` are true."""
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2.0)
            store_ok = True
        except (StoreUnavailable, TimeoutError):
            store_ok = False
        checks = {
            "kafka": self.consumer.healthy,
            "postgres": store_ok and self.router.store_healthy,
            "accepting": not self.stopping,
        }
        if self.settings.kafka_dlq_topic:
            checks["dlq"] = self.consumer.dead_letter_healthy
        for name, ok in (await self.broker.readiness()).items():
            checks[name] = ok and self.router.broker_healthy
        return checks

    async def stop(self) -> None:
        """Drain and stop, in the order of the module docstring, within SHUTDOWN_TIMEOUT."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        deadline = time.monotonic() + self.settings.shutdown_timeout
        log.info("node_stopping", extra={"connections": len(self.hub)})
        await self.consumer.stop(grace=max(0.1, deadline - time.monotonic() - 1.0))
        # Leave every channel first, so no other process counts this one as a
        # receiver any more; what arrived before that is delivered or stored.
        await self.broker.drain(grace=max(0.1, deadline - time.monotonic() - 0.5))
        closing = [c.close(CloseCode.GOING_AWAY) for c in self.hub]
        if closing:
            done = asyncio.gather(*closing, return_exceptions=True)
            try:
                await asyncio.wait_for(done, timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("close_timeout", extra={"left": len(self.hub)})
        try:
            # Frames the closed sockets did not take are stored now.
            await asyncio.wait_for(self.router.drain(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("receive_drain_timeout")
        writers = list(self._writers)
        if writers:
            _, pending = await asyncio.wait(writers, timeout=max(0.1, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.acked_rows is not None:
            await self.acked_rows.close(grace=max(0.1, deadline - time.monotonic()))
        await self.status.close(grace=max(0.1, deadline - time.monotonic()))
        await self.broker.close()
        await self.auth.close()
        await self.store.close()
        self._stopped.set()
        log.info("node_stopped")

    async def _retention_loop(self) -> None:
        """Expire stored rows past the TTL and cap each user's backlog, periodically.

        Both delete in statements of at most ``RETENTION_BATCH`` rows, and a pass
        runs at most ``per_pass`` statements of each: a table far behind (millions
        of expired rows) is worked off in passes one second apart, never by one
        statement that would run into a timeout or hold millions of row locks. The
        first pass caps every user; later passes only the users stored to since,
        so the check does not scan the whole table every interval.
        """
        s = self.settings
        per_pass = 100  # statements of each kind per pass: 1M rows at the default batch

        async def run(cause: str, batches: AsyncGenerator[int, None]) -> tuple[int, bool]:
            """Rows deleted, and whether the work ran out within ``per_pass`` statements."""
            deleted = statements = 0
            async with aclosing(batches):
                async for rows in batches:
                    deleted += rows
                    self.metrics.expired.labels(cause).inc(rows)
                    statements += 1
                    if statements >= per_pass:
                        return deleted, False
            return deleted, True

        # The deleted rows are asked for only when someone listens: returning them
        # makes each batch 1.5 to 3 times as slow (docs/architecture.md).
        on_deleted = None if self.status is NO_STATUS else self.status.expired
        users: set[str] | None = None
        while True:
            if users is not None:
                users |= self.router.take_stored_users()
            try:
                expired, expiry_done = await run(
                    "ttl", self.store.expire(s.backlog_ttl, s.retention_batch, on_deleted)
                )
                capped, cap_done = await run(
                    "per_user_cap",
                    self.store.cap(s.backlog_max_per_user, users, s.retention_batch, on_deleted),
                )
            except StoreUnavailable as exc:
                log.warning("retention_skipped", extra={"error": str(exc)})
                await asyncio.sleep(s.backlog_cleanup_interval)
                continue
            # A row retention deleted cannot be read again: its ``expired`` events are
            # sent now (bounded wait), the window in which a crash loses them is short.
            await self.status.flush()
            if cap_done:
                users = set()  # else the same users again next pass, with those stored since
            behind = not (expiry_done and cap_done)
            if expired or capped:
                log.info(
                    "retention", extra={"expired": expired, "capped": capped, "behind": behind}
                )
            await asyncio.sleep(
                min(1.0, s.backlog_cleanup_interval) if behind else s.backlog_cleanup_interval
            )
