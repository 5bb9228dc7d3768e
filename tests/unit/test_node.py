"""The node: supervision of its background tasks, and the order of connect, commit and shutdown.

The ordering tests run the real node, router, memory broker and consumer with
fakes at the edges (``tests/unit/fakes.py``), each recording what is done to it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from service.auth import Identity
from service.config import Settings
from service.consumer import Consumer
from service.hub import Rejected
from service.metrics import Metrics
from service.node import Node, NodeConsumer, Parts
from service.notification import Notification
from service.router import BrokerUnavailable, Router
from service.status import NoStatus

from .fakes import (
    Events,
    FakeAuth,
    FakeConsumer,
    FakeStore,
    RecordingBroker,
    RecordingHub,
    RecordingSocket,
    notification,
    until,
)


async def _dies() -> None:
    raise RuntimeError("boom")


async def _waits() -> None:
    await asyncio.sleep(3600)


def _node() -> tuple[Node, list[str]]:
    node = Node.build(Settings())
    calls: list[str] = []
    node.on_fatal = lambda: calls.append(node.failure or "")
    return node, calls


async def test_a_task_that_dies_names_the_failure_and_stops_once() -> None:
    """The first dead task is named and on_fatal runs once, however many die after it."""
    node, calls = _node()
    first = asyncio.create_task(_dies(), name="kafka-consumer")
    second = asyncio.create_task(_dies(), name="backlog-retention")
    node._supervise(first)
    node._supervise(second)
    await asyncio.gather(first, second, return_exceptions=True)
    await asyncio.sleep(0)
    assert node.failure == "kafka-consumer"
    assert calls == ["kafka-consumer"]


async def test_a_cancelled_task_or_one_ending_during_stop_is_no_failure() -> None:
    """Cancellation (shutdown) and anything ending while the node stops are expected."""
    node, calls = _node()
    cancelled = asyncio.create_task(_waits(), name="write-watchdog")
    node._supervise(cancelled)
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    node.stopping = True
    late = asyncio.create_task(_dies(), name="kafka-consumer")
    node._supervise(late)
    await asyncio.gather(late, return_exceptions=True)
    await asyncio.sleep(0)
    assert node.failure is None
    assert calls == []


# --- the order of connect, commit and shutdown, with fake parts -----------------------------


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    """``Node.start`` tunes the garbage collector for a gateway; give the tests theirs back."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def fake_parts(
    events: Events, *, consumer: NodeConsumer | None = None, max_per_user: int = 10
) -> Parts:
    """A node's parts around the real router and memory broker, with fakes at the edges.

    ``delivery_wait`` is long: a frame a socket has not taken waits for it (or
    for its close), so what is stored at shutdown shows where it happens.
    """
    metrics = Metrics()
    hub = RecordingHub(events, max_per_user=max_per_user)
    store = FakeStore(events)
    broker = RecordingBroker(hub, events)
    router = Router(hub, store, metrics, broker=broker, delivery_wait=30.0, ack_timeout=30.0)
    return Parts(
        metrics=metrics,
        store=store,
        auth=FakeAuth(events),
        hub=hub,  # type: ignore[arg-type]  # a hub of fakes, not of Connections
        broker=broker,
        router=router,
        consumer=consumer or FakeConsumer(events),
    )


def fake_node(events: Events, **options: Any) -> Node:
    return Node(Settings(shutdown_timeout=5.0), fake_parts(events, **options))


def since(events: Events, first: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The events from ``first`` on."""
    return events[events.index(first) :]


async def test_connect_subscribes_then_registers_then_flushes_the_backlog() -> None:
    """A connecting user is subscribed before being registered, and reads the store only then."""
    events = Events()
    node = fake_node(events)
    stored = notification("alice")
    assert isinstance(node.store, FakeStore)
    node.store.put(stored)
    socket = RecordingSocket(events)
    await node.connect(socket, Identity("alice"))
    await until(lambda: socket.frames == [stored.frame])
    assert events == [("subscribe", "alice"), ("register", "alice"), ("store fetch", "alice")]
    await node.stop()


async def test_a_live_notification_follows_the_stored_ones() -> None:
    """What was stored before the connection is written before what arrives live after it."""
    events = Events()
    node = fake_node(events)
    await node.start()
    stored, live = notification("alice", "stored"), notification("alice", "live")
    assert isinstance(node.store, FakeStore)
    node.store.put(stored)
    socket = RecordingSocket(events)
    await node.connect(socket, Identity("alice"))
    await asyncio.wait_for(node.router.deliver([live]), 2.0)
    await until(lambda: len(socket.frames) == 2)
    assert socket.frames == [stored.frame, live.frame]
    await node.stop()


async def test_a_connection_over_the_limit_is_refused_and_leaves_no_subscription() -> None:
    """Rejected by the hub: the subscription taken for it is given back."""
    events = Events()
    node = fake_node(events, max_per_user=1)
    broker = node.broker
    assert isinstance(broker, RecordingBroker)
    first = await node.connect(RecordingSocket(events), Identity("alice"))
    with pytest.raises(Rejected):
        await node.connect(RecordingSocket(events), Identity("alice"))
    assert broker.refs == {"alice": 1}
    assert len(node.hub) == 1
    node.disconnect(first)
    assert broker.refs == {}
    await node.stop()


async def test_a_connection_the_broker_cannot_subscribe_is_not_registered() -> None:
    """Redis down at connect: nothing is registered, the client is told to retry (4503)."""
    events = Events()
    node = fake_node(events)
    assert isinstance(node.broker, RecordingBroker)
    node.broker.unavailable = True
    with pytest.raises(BrokerUnavailable):
        await node.connect(RecordingSocket(events), Identity("alice"))
    assert len(node.hub) == 0
    assert events == []
    await node.stop()


async def test_disconnect_unregisters_unsubscribes_once_and_stores_what_was_queued() -> None:
    """A client gone with a frame in its queue: it leaves the hub and the frame is stored."""
    events = Events()
    node = fake_node(events)
    await node.start()
    socket = RecordingSocket(events)
    connection = await node.connect(socket, Identity("alice"))
    await until(lambda: ("store fetch", "alice") in events)
    socket.hold()
    n = notification("alice")
    delivering = asyncio.create_task(node.router.deliver([n]))
    await until(lambda: socket.sending == 1)
    node.disconnect(connection)
    node.disconnect(connection)
    await asyncio.wait_for(delivering, 2.0)
    assert node.store.stored_ids == [n.message_id]  # type: ignore[attr-defined]
    assert since(events, ("unregister", "alice")) == [
        ("unregister", "alice"),
        ("unsubscribe", "alice"),
        ("store save", "alice"),
    ]
    await node.stop()


async def test_shutdown_runs_in_order() -> None:
    """Consumer, broker drain, sockets closed with 1001, their frames stored, loops, then close."""
    events = Events()
    node = fake_node(events)
    await node.start()
    socket = RecordingSocket(events)
    await node.connect(socket, Identity("alice"))
    await until(lambda: ("store fetch", "alice") in events)
    socket.hold()
    n = notification("alice")
    delivering = asyncio.create_task(node.router.deliver([n]))
    await until(lambda: socket.sending == 1)
    await asyncio.wait_for(node.stop(), 5.0)
    await asyncio.wait_for(delivering, 1.0)
    assert since(events, ("consumer stop",)) == [
        ("consumer stop",),
        ("broker drain",),
        ("socket close", "1001"),
        ("store save", "alice"),
        ("retention stopped",),
        ("broker close",),
        ("auth close",),
        ("store close",),
    ]
    assert socket.closed_with is not None and socket.closed_with[0] == 1001
    await node.stop()  # idempotent


class RecordingStatus(NoStatus):
    """A status sink that records its start and close."""

    __slots__ = ("events",)

    def __init__(self, events: Events) -> None:
        self.events = events

    async def start(self) -> None:
        self.events.append(("status start",))

    async def close(self, grace: float = 0.0) -> None:
        self.events.append(("status close",))


async def test_the_status_sink_starts_before_the_consumer_and_closes_after_the_loops() -> None:
    """The sink is up before anything can report to it and closes only after the last
    reporter (the consumer, the queues stored at shutdown, retention) stopped."""
    events = Events()
    node = Node(
        Settings(shutdown_timeout=5.0), replace(fake_parts(events), status=RecordingStatus(events))
    )
    await node.start()
    await asyncio.wait_for(node.stop(), 5.0)
    order = [e[0] for e in events]
    assert order.index("store start") < order.index("status start") < order.index("consumer start")
    assert order.index("retention stopped") < order.index("status close")
    assert order.index("status close") < order.index("store close")


# --- commit after delivery: the real consumer over a fake Kafka client ---------------------

PARTITION = TopicPartition("notification.send", 0)


class FakeKafka:
    """An aiokafka consumer holding ``batches``; ``commits`` records each commit with
    ``look()``'s answer at that moment."""

    def __init__(self, batches: list[dict[TopicPartition, list[Any]]], look: Any) -> None:
        self._batches = batches
        self._look = look
        self.commits: list[tuple[dict[TopicPartition, int], Any]] = []

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        if self._batches:
            return self._batches.pop(0)
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append((dict(offsets), self._look()))

    def assignment(self) -> set[TopicPartition]:
        return {PARTITION}

    def highwater(self, partition: TopicPartition) -> int:
        return 0

    async def stop(self) -> None:
        pass


class ConsumerOfFakeKafka(Consumer):
    """The real consumer, reading a ``FakeKafka`` instead of connecting to Kafka."""

    def __init__(self, kafka: FakeKafka, settings: Settings, router: Router, metrics: Metrics):
        super().__init__(settings, router, metrics)
        self._kafka = kafka

    async def _connect(self) -> None:
        self._consumer = self._kafka
        self.connected = True


def kafka_record(n: Notification, offset: int) -> Any:
    value = json.dumps(
        {
            "message_id": n.message_id,
            "delivery_method": "push",
            "user_id": n.user_id,
            "subject": n.title,
            "content": n.body,
        }
    ).encode()
    return SimpleNamespace(
        topic=PARTITION.topic,
        partition=0,
        offset=offset,
        timestamp=int(time.time() * 1000),
        key=None,
        value=value,
        headers=(),
    )


async def test_offsets_are_committed_only_after_the_batch_was_written_or_stored() -> None:
    """The consumer commits a batch once each notification reached its socket or the store."""
    events = Events()
    parts = fake_parts(events)
    store = parts.store
    assert isinstance(store, FakeStore)
    store.save_gate = asyncio.Event()
    for_alice, for_bob = notification("alice"), notification("bob")
    socket = RecordingSocket(events)
    kafka = FakeKafka(
        [{PARTITION: [kafka_record(for_alice, 7), kafka_record(for_bob, 8)]}],
        look=lambda: (list(socket.frames), store.stored_ids),
    )
    settings = Settings(shutdown_timeout=5.0)
    consumer = ConsumerOfFakeKafka(kafka, settings, parts.router, parts.metrics)
    node = Node(settings, replace(parts, consumer=consumer))
    await node.connect(socket, Identity("alice"))
    await until(lambda: ("store fetch", "alice") in events)
    await node.start()
    await until(lambda: store.save_attempts == 1)  # bob is offline: his row is being saved
    await asyncio.sleep(0.05)
    assert kafka.commits == []
    store.save_gate.set()
    await until(lambda: len(kafka.commits) == 1)
    offsets, (frames, stored) = kafka.commits[0]
    assert offsets == {PARTITION: 9}
    assert [json.loads(f)["title"] for f in frames] == [for_alice.title]
    assert stored == [for_bob.message_id]
    await node.stop()
