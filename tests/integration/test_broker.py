"""The Redis broker against the real Redis: fan-out, acknowledgements and its failures."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

import pytest

from service.broker import RedisBroker
from service.notification import Notification
from service.resp import Address, RedisConnection, client_list, pack
from service.router import BrokerUnavailable
from tests.support.wait import until

from .redis_proxy import RedisProxy


class Receiver:
    """Records what a broker hands over, as the router would get it."""

    def __init__(self) -> None:
        self.received: list[tuple[Notification, bytes]] = []
        self.acks: list[str] = []
        self.hints: list[str] = []
        self.resyncs = 0

    def receive(self, received: list[tuple[Notification, bytes]]) -> None:
        self.received += received

    def acknowledged(self, message_ids: list[str]) -> None:
        self.acks += message_ids

    def flush_hint(self, user_ids: Iterable[str]) -> None:
        self.hints += list(user_ids)

    def resync(self) -> None:
        self.resyncs += 1


def note(user_id: str, title: str = "t") -> Notification:
    return Notification.build(str(uuid.uuid4()), user_id, title, "b", int(time.time() * 1000))


async def redis_command(url: str, *command: str) -> object:
    connection = await RedisConnection.open(Address.parse(url), name="notify-ws-test", wait=2.0)
    try:
        return (await connection.call(pack(*command), 1, 2.0))[0]
    finally:
        connection.close()


async def kill_connection(url: str, broker: RedisBroker, kind: str) -> None:
    """Make Redis drop one of this broker's connections (``pubsub`` or ``normal``)."""
    listing = await redis_command(url, "CLIENT", "LIST", "TYPE", kind)
    name = (broker.name + (":pubsub" if kind == "pubsub" else "")).encode()
    ids = [client[b"id"] for client in client_list(listing) if client.get(b"name") == name]
    assert len(ids) == 1, listing
    assert await redis_command(url, "CLIENT", "KILL", "ID", ids[0]) == 1


@pytest.fixture
async def brokers(redis_url: str) -> AsyncIterator[Callable[..., RedisBroker]]:
    """Started brokers sharing a channel prefix of their own; all closed afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:6]}:"
    made: list[RedisBroker] = []

    def make(receiver: Receiver, url: str = redis_url, **options: float) -> RedisBroker:
        broker = RedisBroker(url, prefix, **options)
        made.append(broker)
        asyncio.get_running_loop().create_task(broker.start(receiver))
        return broker

    yield make
    for broker in made:
        await broker.close()


async def test_a_notification_reaches_the_process_holding_its_user_and_is_acknowledged(
    brokers: Callable[..., RedisBroker],
) -> None:
    """The publisher learns how many processes got it, and the receiver's ack comes back."""
    sender, holder = Receiver(), Receiver()
    publishing, holding = brokers(sender), brokers(holder)
    await until(lambda: publishing.healthy and holding.healthy)
    await holding.subscribe("alice")
    online, offline = note("alice"), note("bob")

    assert await publishing.publish([online, offline]) == [1, 0]
    await until(lambda: len(holder.received) == 1)
    received, origin = holder.received[0]
    assert received == online

    await holding.acknowledge({origin: [received.message_id]})
    await until(lambda: sender.acks == [online.message_id])


async def test_a_left_channel_counts_as_offline(brokers: Callable[..., RedisBroker]) -> None:
    """After the last unsubscribe of a user, a publish for them reaches nobody."""
    broker = brokers(Receiver())
    await until(lambda: broker.healthy)
    await broker.subscribe("carol")
    await broker.subscribe("carol")
    broker.unsubscribe("carol")
    assert await broker.publish([note("carol")]) == [1]
    broker.unsubscribe("carol")
    await until(lambda: not broker.subscribed("carol"))
    for _ in range(50):  # the UNSUBSCRIBE is processed before a later PUBLISH
        if await broker.publish([note("carol")]) == [0]:
            break
    assert await broker.publish([note("carol")]) == [0]


async def test_flush_hints_reach_the_holders_of_the_user(
    brokers: Callable[..., RedisBroker],
) -> None:
    """A flush hint for a user arrives at the process that holds them."""
    holder = Receiver()
    holding, other = brokers(holder), brokers(Receiver())
    await until(lambda: holding.healthy and other.healthy)
    await holding.subscribe("dave")
    await other.publish_flush(["dave", "erin"])
    await until(lambda: holder.hints == ["dave"])


async def test_a_killed_pubsub_connection_resubscribes_and_resyncs(
    brokers: Callable[..., RedisBroker], redis_url: str
) -> None:
    """When Redis drops the subscriber, it comes back on every channel and re-reads the store."""
    holder = Receiver()
    holding = brokers(holder)
    await until(lambda: holding.healthy)
    await holding.subscribe("frank")

    await kill_connection(redis_url, holding, "pubsub")
    await until(lambda: holder.resyncs == 1 and holding.healthy)

    assert await brokers(Receiver()).publish([note("frank")]) == [1]
    await until(lambda: len(holder.received) == 1)


async def test_a_killed_command_connection_is_opened_again(
    brokers: Callable[..., RedisBroker], redis_url: str
) -> None:
    """A publish after Redis dropped the command connection fails at most once, then works."""
    broker = brokers(Receiver())
    await until(lambda: broker.healthy)
    assert await broker.publish([note("gina")]) == [0]
    await kill_connection(redis_url, broker, "normal")
    with contextlib.suppress(BrokerUnavailable):
        await broker.publish([note("gina")])
    assert await broker.publish([note("gina")]) == [0]
    assert await broker.ping()


async def test_a_refused_login_never_shows_the_password(
    brokers: Callable[..., RedisBroker], redis_url: str
) -> None:
    """A Redis that refuses the password leaves the broker unhealthy; errors omit the secret."""
    address = Address.parse(redis_url)
    wrong = f"redis://:Hunter2-secret@{address.host}:{address.port}/0"
    broker = brokers(Receiver(), wrong)
    with pytest.raises(BrokerUnavailable) as refused:
        await broker.publish([note("hank")])
    assert "Hunter2-secret" not in str(refused.value)
    assert not broker.healthy and not await broker.ping()


async def test_a_silent_redis_times_out_instead_of_hanging(
    brokers: Callable[..., RedisBroker],
) -> None:
    """A Redis that accepts but never answers fails publishes and subscribes within the timeout."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        broker = brokers(Receiver(), f"redis://127.0.0.1:{port}/0", timeout=0.5)
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish([note("ivan")])
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe("ivan", wait=0.5)
        assert time.monotonic() - began < 3.0
        assert not broker.subscribed("ivan") and not broker.healthy


async def test_a_subscribe_cancelled_while_pending_leaves_no_subscription(
    brokers: Callable[..., RedisBroker], redis_url: str
) -> None:
    """A client that leaves before Redis confirmed its SUBSCRIBE leaves no channel behind."""
    proxy = RedisProxy(redis_url)
    url = await proxy.start()
    try:
        broker = brokers(Receiver(), url)
        await until(lambda: broker.healthy)
        channel = broker.channel("liam").decode()

        async def receivers() -> int:
            reply = await redis_command(redis_url, "PUBSUB", "NUMSUB", channel)
            assert isinstance(reply, list)
            return int(reply[1])

        proxy.hold()  # Redis gets the SUBSCRIBE; its confirmation waits in the proxy
        pending = asyncio.create_task(broker.subscribe("liam"))
        deadline = time.monotonic() + 5
        while await receivers() != 1:
            assert time.monotonic() < deadline, "the SUBSCRIBE never reached Redis"
            await asyncio.sleep(0.02)
        pending.cancel()  # what Sanic does to the handler when its client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        proxy.release()

        assert not broker.subscribed("liam")
        deadline = time.monotonic() + 5
        while await receivers() != 0:
            assert time.monotonic() < deadline, "the channel is still subscribed at Redis"
            await asyncio.sleep(0.05)
        assert await broker.publish([note("liam")]) == [0]  # offline: stored, not lost here
    finally:
        proxy.close()


async def test_a_silent_pubsub_connection_is_noticed_and_replaced(
    brokers: Callable[..., RedisBroker], redis_url: str
) -> None:
    """A pub/sub connection that stops answering (half-open) is pinged, dropped and replaced."""
    proxy = RedisProxy(redis_url)
    url = await proxy.start()
    try:
        holder = Receiver()
        holding = brokers(holder, url, timeout=0.5, ping_interval=0.5)
        await until(lambda: holding.healthy)
        await holding.subscribe("judy")
        proxy.freeze()  # both of the broker's connections go silent, neither is closed
        await until(lambda: holder.resyncs == 1 and holding.healthy, timeout=10)

        assert await brokers(Receiver()).publish([note("judy")]) == [1]
        await until(lambda: len(holder.received) == 1)
    finally:
        proxy.close()


async def test_a_dead_peer_stops_counting_as_a_receiver(
    brokers: Callable[..., RedisBroker], redis_url: str
) -> None:
    """A peer whose machine died (connections left open at Redis) is dropped by the others."""
    proxy = RedisProxy(redis_url)
    url = await proxy.start()
    try:
        peer = brokers(Receiver(), url, presence_ttl=1.0)
        await until(lambda: peer.healthy)
        await peer.subscribe("kate")
        # The machine dies: the process stops, its sockets stay open at Redis's end.
        assert peer.task is not None
        peer.task.cancel()
        proxy.freeze()

        watcher = brokers(Receiver(), presence_ttl=1.0)
        await until(lambda: watcher.healthy)
        assert await watcher.publish([note("kate")]) == [1]  # still counted
        deadline = time.monotonic() + 10
        while await watcher.publish([note("kate")]) != [0]:
            assert time.monotonic() < deadline, "the dead peer still counts as a receiver"
            await asyncio.sleep(0.2)
    finally:
        proxy.close()
