"""The router's acknowledgement counting, driven through the memory broker (no Redis).

The publisher counts, per message id, the receivers its broker reported, and
returns (so the consumer may commit) only once each of them acknowledged, or
after the ack timeout, storing what was not acknowledged. These tests script
when acknowledgements arrive: after the PUBLISH reply (the memory broker's own
way), before it (a receiver in the same process, on Redis), late, or never.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest

from service.broker import LOCAL, MemoryBroker
from service.hub import Hub
from service.metrics import Metrics
from service.notification import Notification
from service.router import Outlet, Router

from .fakes import FakeBacklog, FakeOutlet, local_router, notification, until


class ScriptedBroker(MemoryBroker):
    """The memory broker, with acknowledgements that can be held, dropped or sent early.

    ``hold``: acknowledgements wait for this event. ``drop``: message ids whose
    (first) acknowledgement is lost, as from a receiver that died. ``early``:
    ``publish`` returns only after the receiver acknowledged, as when Redis's
    answer to the PUBLISH comes after the acknowledgement on the control channel.
    """

    def __init__(self, hub: Hub[Outlet]) -> None:
        super().__init__(hub)
        self.hold: asyncio.Event | None = None
        self.drop: list[str] = []
        self.early = False
        self.acknowledged: list[str] = []

    async def publish(self, notifications: Sequence[Notification]) -> list[int]:
        counts = await super().publish(notifications)
        if self.early:
            expected = len(self.acknowledged) + sum(counts)
            await until(lambda: len(self.acknowledged) >= expected)
        return counts

    async def acknowledge(self, by_origin: dict[bytes, list[str]]) -> None:
        if self.hold is not None:
            await self.hold.wait()
        ids = list(by_origin[LOCAL])
        for lost in self.drop:
            if lost in ids:
                ids.remove(lost)
        self.acknowledged += ids
        await super().acknowledge({LOCAL: ids})


@pytest.fixture
def broker(hub: Hub[Outlet]) -> ScriptedBroker:
    return ScriptedBroker(hub)


@pytest.fixture
async def router(
    hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics, broker: ScriptedBroker
) -> Router:
    return await local_router(hub, backlog, metrics, broker, ack_timeout=0.2, retry_initial=0.005)


def connect(hub: Hub[Outlet], user_id: str, mode: str = "now") -> FakeOutlet:
    fake = FakeOutlet(user_id, mode)
    hub.register(fake)
    return fake


def ack_timeouts(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("notify_ack_timeouts_total") or 0.0


async def test_publish_counts_one_receiver_per_connected_user(hub: Hub[Outlet]) -> None:
    """The memory broker reports 1 for a user connected here and 0 for one who is not."""
    received: list[list[tuple[Notification, bytes]]] = []

    class Receiver:
        def receive(self, batch: list[tuple[Notification, bytes]]) -> None:
            received.append(batch)

        def acknowledged(self, message_ids: list[str]) -> None: ...

        def flush_hint(self, user_ids: object) -> None: ...

        def resync(self) -> None: ...

    broker = MemoryBroker(hub)
    await broker.start(Receiver())
    connect(hub, "alice")
    for_alice, for_bob = notification("alice"), notification("bob")
    assert await broker.publish([for_alice, for_bob]) == [1, 0]
    assert received == [[(for_alice, LOCAL)]]
    await broker.drain(grace=1.0)
    assert await broker.publish([for_alice]) == [0]


async def test_offline_user_is_stored_and_connected_user_is_written_not_stored(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics
) -> None:
    """Zero receivers: stored by the publisher; one receiver that wrote it: not stored."""
    tab = connect(hub, "alice")
    for_alice, for_bob = notification("alice"), notification("bob")
    await asyncio.wait_for(router.deliver([for_alice, for_bob]), 1.0)
    assert tab.frames == [for_alice.frame]
    assert backlog.stored_ids == [for_bob.message_id]
    assert ack_timeouts(metrics) == 0


async def test_deliver_returns_only_once_every_receiver_acknowledged(
    router: Router, hub: Hub[Outlet], broker: ScriptedBroker, backlog: FakeBacklog
) -> None:
    """Acknowledgements after the PUBLISH reply: the batch is not done until they come."""
    connect(hub, "alice")
    broker.hold = asyncio.Event()
    delivering = asyncio.create_task(router.deliver([notification("alice")]))
    await asyncio.sleep(0.05)
    assert not delivering.done()
    broker.hold.set()
    await asyncio.wait_for(delivering, 1.0)
    assert backlog.rows == {}


async def test_acknowledgements_before_the_publish_reply_are_counted(
    hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics, broker: ScriptedBroker
) -> None:
    """Acknowledgements that overtake the PUBLISH reply end the wait; nothing is stored."""
    router = await local_router(hub, backlog, metrics, broker, ack_timeout=30.0)
    connect(hub, "alice")
    connect(hub, "bob")
    broker.early = True
    batch = [notification("alice"), notification("bob"), notification("alice")]
    await asyncio.wait_for(router.deliver(batch), 2.0)
    assert sorted(broker.acknowledged) == sorted(n.message_id for n in batch)
    assert backlog.rows == {}
    assert ack_timeouts(metrics) == 0


async def test_a_notification_not_acknowledged_in_time_is_stored_and_the_rest_is_not(
    router: Router, hub: Hub[Outlet], broker: ScriptedBroker, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """A receiver that dies before acknowledging: after the ack timeout, only that one is stored."""
    connect(hub, "alice")
    connect(hub, "bob")
    for_alice, for_bob = notification("alice"), notification("bob")
    broker.drop = [for_bob.message_id]
    await asyncio.wait_for(router.deliver([for_alice, for_bob]), 2.0)
    assert backlog.stored_ids == [for_bob.message_id]
    assert ack_timeouts(metrics) == 1


async def test_a_late_acknowledgement_is_ignored_and_the_next_batch_counts_afresh(
    router: Router, hub: Hub[Outlet], broker: ScriptedBroker, backlog: FakeBacklog
) -> None:
    """An acknowledgement arriving after its timeout changes nothing for the next batch."""
    connect(hub, "alice")
    late = notification("alice")
    broker.drop = [late.message_id]
    await asyncio.wait_for(router.deliver([late]), 2.0)
    assert backlog.stored_ids == [late.message_id]
    broker.drop = []
    router.acknowledged([late.message_id])
    broker.hold = asyncio.Event()
    following = asyncio.create_task(router.deliver([notification("alice")]))
    await asyncio.sleep(0.05)
    assert not following.done()  # still waiting for its own acknowledgement
    broker.hold.set()
    await asyncio.wait_for(following, 1.0)
    assert backlog.stored_ids == [late.message_id]


def same_id_for(*users: str) -> list[Notification]:
    """One notification id sent to each of ``users`` (one Kafka record each)."""
    message_id = str(uuid.uuid4())
    return [Notification.build(message_id, user, f"for {user}", "b", 0) for user in users]


async def test_a_shared_message_id_waits_for_the_acknowledgement_of_every_user(
    router: Router, hub: Hub[Outlet], broker: ScriptedBroker, backlog: FakeBacklog, metrics: Metrics
) -> None:
    """One id for two connected users counts two receivers; both acknowledged, nothing stored."""
    alice, bob = connect(hub, "alice"), connect(hub, "bob")
    for_alice, for_bob = same_id_for("alice", "bob")
    await asyncio.wait_for(router.deliver([for_alice, for_bob]), 1.0)
    assert alice.frames == [for_alice.frame]
    assert bob.frames == [for_bob.frame]
    assert broker.acknowledged == [for_alice.message_id] * 2
    assert backlog.rows == {}
    assert ack_timeouts(metrics) == 0


async def test_a_shared_message_id_missing_one_acknowledgement_is_stored_for_each_user(
    router: Router, hub: Hub[Outlet], broker: ScriptedBroker, backlog: FakeBacklog
) -> None:
    """One of a shared id's two acknowledgements lost: both copies are stored (never lost)."""
    connect(hub, "alice")
    connect(hub, "bob")
    for_alice, for_bob = same_id_for("alice", "bob")
    broker.drop = [for_alice.message_id]
    await asyncio.wait_for(router.deliver([for_alice, for_bob]), 2.0)
    assert sorted(backlog.rows) == sorted(
        [("alice", for_alice.message_id), ("bob", for_bob.message_id)]
    )


async def test_a_shared_message_id_for_a_connected_and_an_offline_user(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog, metrics: Metrics
) -> None:
    """The offline copy is stored at once; the connected one is written, not waited out."""
    alice = connect(hub, "alice")
    for_alice, for_bob = same_id_for("alice", "bob")
    await asyncio.wait_for(router.deliver([for_alice, for_bob]), 1.0)
    assert alice.frames == [for_alice.frame]
    assert list(backlog.rows) == [("bob", for_bob.message_id)]
    assert ack_timeouts(metrics) == 0


async def test_batches_in_flight_settle_on_their_own_acknowledgements(
    router: Router, hub: Hub[Outlet], backlog: FakeBacklog
) -> None:
    """A batch whose receiver is slow to acknowledge holds up no later batch's settlement."""
    connect(hub, "alice")
    slow = connect(hub, "bob", "hold")  # queued: settled when the test says
    for_bob, for_alice = notification("bob"), notification("alice")
    first = await router.dispatch([for_bob])
    second = await router.dispatch([for_alice])
    await asyncio.wait_for(second, 1.0)
    assert not first.done(), "bob's batch settled before bob's socket took it"
    slow.release()
    await asyncio.wait_for(first, 1.0)
    assert slow.frames == [for_bob.frame]


async def test_a_redelivered_id_in_two_batches_in_flight_needs_both_acknowledgements(
    router: Router, hub: Hub[Outlet], broker: ScriptedBroker, backlog: FakeBacklog
) -> None:
    """One id in two batches (Kafka delivered it twice): each batch waits for its own ack."""
    connect(hub, "alice")
    again = notification("alice")
    broker.hold = asyncio.Event()
    first = await router.dispatch([again])
    second = await router.dispatch([again])
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    broker.hold.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1.0)
    assert backlog.rows == {}
