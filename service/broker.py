"""Redis pub/sub fan-out between gateway processes (DESIGN.md §6).

Each process SUBSCRIBEs to ``<prefix><user id>`` for the users connected to it.
The process that consumed a notification PUBLISHes it there; Redis answers with
the number of processes that received it, and zero means "offline everywhere".
A flush hint (``F``) on the same channel tells a process to re-read the store
for that user. Each process also listens on a control channel of its own
(``<prefix>node:<random id>``), where receivers acknowledge (``A`` + a JSON
list of message ids) the notifications it published once they were written or
stored: the publisher commits its Kafka offsets only then.

Wire format of a notification on a channel: the JSON array
``[message_id, user_id, created_ms, title, body, origin control channel]``.

The broker owns two Redis connections: a client for PUBLISH (pipelined per
batch) and one pub/sub connection read by the named task ``redis-subscriber``.
If the pub/sub connection breaks, the broker reconnects with backoff, subscribes
to every channel again, and asks the receiver to re-read the store for all its
users, since messages published meanwhile were stored as "offline".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from .notification import Notification
from .router import BrokerUnavailable

log = logging.getLogger("notify.broker")

FLUSH_HINT = b"F"
ACK = b"A"


class Receiver(Protocol):
    """What the broker hands received messages to: the router."""

    def receive(self, received: list[tuple[Notification, bytes]]) -> None:
        """Deliver notifications (with the channel to acknowledge them on) locally."""
        ...

    def acknowledged(self, message_ids: list[str]) -> None:
        """Receivers wrote or stored these notifications published by this process."""
        ...

    def flush_hint(self, user_ids: Iterable[str]) -> None:
        """Ask local connections of these users to re-read the store."""
        ...

    def resync(self) -> None:
        """The subscription was interrupted: every local connection re-reads the store."""
        ...


def encode(notification: Notification, origin: bytes) -> bytes:
    n = notification
    return orjson.dumps([n.message_id, n.user_id, n.created_ms, n.title, n.body, origin.decode()])


def decode(data: bytes) -> tuple[Notification, bytes]:
    message_id, user_id, created_ms, title, body, origin = orjson.loads(data)
    return Notification.build(message_id, user_id, title, body, created_ms), origin.encode()


class RedisBroker:
    """Pub/sub fan-out over one Redis. ``start()`` once, ``close()`` is idempotent.

    ``subscribe``/``unsubscribe`` are reference-counted per user and safe to call
    from many connection handlers at once.
    """

    def __init__(self, url: str, prefix: str = "user:") -> None:
        self._url = url
        self._prefix = prefix
        # No hidden retries inside redis-py: a broken connection must surface
        # here, so that the subscriber knows it may have missed messages.
        self._client: Redis = Redis.from_url(url, retry=Retry(NoBackoff(), 0))
        self._pubsub: PubSub | None = None
        self._refs: dict[str, int] = {}
        # Commands go out in call order: an UNSUBSCRIBE must never overtake a
        # later SUBSCRIBE of the same user.
        self._send_lock = asyncio.Lock()
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._control = f"{prefix}node:{uuid.uuid4().hex}".encode()
        self._receiver: Receiver | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._draining: asyncio.Event | None = None
        self._leaving: set[asyncio.Task[None]] = set()
        self.healthy = False

    def channel(self, user_id: str) -> bytes:
        return f"{self._prefix}{user_id}".encode()

    def subscribed(self, user_id: str) -> bool:
        """Whether this process holds a subscription for the user."""
        return user_id in self._refs

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def start(self, receiver: Receiver) -> None:
        """Start the subscriber task; it connects (retrying while Redis is down)."""
        self._receiver = receiver
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-subscriber")

    async def subscribe(self, user_id: str, wait: float = 5.0) -> None:
        """Subscribe this process to the user's channel; returns once Redis confirmed.

        Raises:
            BrokerUnavailable: Redis did not confirm within ``wait`` seconds.
        """
        count = self._refs.get(user_id, 0)
        self._refs[user_id] = count + 1
        if count > 0 and self.channel(user_id) not in self._confirmations:
            return
        channel = self.channel(user_id)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, []).append(waiter)
        try:
            if count == 0:
                async with self._send_lock:
                    await self._send("SUBSCRIBE", channel)
            await asyncio.wait_for(asyncio.shield(waiter), wait)
        except (TimeoutError, BrokerUnavailable, RedisError, OSError) as exc:
            # Give the reference back, or this process would stay subscribed to
            # the user for good and take (then store) all their notifications.
            waiters = self._confirmations.get(channel)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._confirmations[channel]
            self.unsubscribe(user_id)
            raise BrokerUnavailable(f"subscribe failed: {type(exc).__name__}") from None

    def unsubscribe(self, user_id: str) -> None:
        """Drop one reference; the channel is left when the last one goes."""
        count = self._refs.get(user_id, 0) - 1
        if count > 0:
            self._refs[user_id] = count
            return
        self._refs.pop(user_id, None)
        if not self._closing:
            # In the background: a message published meanwhile is still received
            # and, with no connection left here, stored by the router.
            task = asyncio.get_running_loop().create_task(self._leave(user_id))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)

    async def publish(self, notifications: Sequence[Notification]) -> list[int]:
        """PUBLISH each notification on its user's channel; how many processes got each.

        Raises:
            BrokerUnavailable: Redis could not be reached; nothing may be assumed sent.
        """
        if not notifications:
            return []
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for n in notifications:
                    pipe.publish(self.channel(n.user_id), encode(n, self._control))
                counts: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from None
        return [int(c) for c in counts]

    async def publish_flush(self, user_ids: Iterable[str]) -> None:
        """Tell the processes holding these users to re-read the store. Raises BrokerUnavailable."""
        users = list(user_ids)
        if not users:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for user_id in users:
                    pipe.publish(self.channel(user_id), FLUSH_HINT)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}") from None

    async def acknowledge(self, by_origin: dict[bytes, list[str]]) -> None:
        """Tell each publishing process which of its notifications were written or stored.

        Raises:
            BrokerUnavailable: Redis could not be reached (the publishers time out
                and store the notifications themselves: delivered twice, never lost).
        """
        remote = {origin: ids for origin, ids in by_origin.items() if origin != self._control}
        own = by_origin.get(self._control)
        if own and self._receiver is not None:
            self._receiver.acknowledged(own)
        if not remote:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for origin, ids in remote.items():
                    pipe.publish(origin, ACK + orjson.dumps(ids))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"acknowledge failed: {type(exc).__name__}") from None

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._client.ping(), 2.0))
        except (RedisError, OSError, TimeoutError):
            return False

    async def drain(self, grace: float) -> None:
        """Leave every channel and read what was published before Redis confirmed.

        After this, no process counts this one as a receiver, so nothing more is
        handed to it; call before closing the local connections at shutdown.
        """
        self._closing = True
        if self._pubsub is None or self._task is None or self._task.done():
            return
        self._draining = asyncio.Event()
        try:
            async with self._send_lock:
                await self._send("UNSUBSCRIBE")
            await asyncio.wait_for(self._draining.wait(), grace)
        except (TimeoutError, BrokerUnavailable, RedisError, OSError) as exc:
            log.warning("broker_drain_incomplete", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._drop_pubsub()
        await self._client.aclose()

    async def _send(self, *args: Any) -> None:
        if self._pubsub is None:
            raise BrokerUnavailable("not connected to Redis")
        await self._pubsub.execute_command(*args)

    async def _leave(self, user_id: str) -> None:
        async with self._send_lock:
            if user_id in self._refs or self._closing:
                return  # the user came back meanwhile: stay subscribed
            # On failure nothing is lost: a reconnect subscribes only to the
            # channels still referenced.
            with contextlib.suppress(BrokerUnavailable, RedisError, OSError):
                await self._send("UNSUBSCRIBE", self.channel(user_id))

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _run(self) -> None:
        delay = 0.2
        first = True
        while True:
            try:
                await self._connect()
                if not first:
                    log.info("redis_resubscribed", extra={"channels": len(self._refs)})
                    assert self._receiver is not None
                    self._receiver.resync()
                first = False
                delay = 0.2
                await self._read()
                return
            except (RedisError, OSError) as exc:
                self.healthy = False
                log.error(
                    "redis_subscriber_error", extra={"error": f"{type(exc).__name__}: {exc}"[:300]}
                )
                await self._drop_pubsub()
                for waiters in self._confirmations.values():
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(BrokerUnavailable("redis connection lost"))
                self._confirmations.clear()
                if self._closing:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        pubsub = Redis.from_url(self._url, retry=Retry(NoBackoff(), 0)).pubsub()
        channels = [self._control] + [self.channel(user) for user in self._refs]
        await pubsub.execute_command("SUBSCRIBE", *channels)
        self._pubsub = pubsub
        self.healthy = True

    async def _read(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None and self._receiver is not None
        receiver = self._receiver
        while True:
            response = await pubsub.parse_response(block=True)
            burst = _Burst()
            # Take everything already buffered in one go: one delivery batch per burst.
            while response is not None:
                if self._handle(response, burst):
                    burst.hand_to(receiver)
                    if self._draining is not None:
                        self._draining.set()
                    return
                response = await pubsub.parse_response(block=False, timeout=0)
            burst.hand_to(receiver)

    def _handle(self, response: Any, burst: _Burst) -> bool:
        """Sort one pub/sub reply; True once every channel is left while draining."""
        kind = response[0]
        if kind == b"message":
            channel, data = response[1], response[2]
            if data == FLUSH_HINT:
                burst.hints.append(channel[len(self._prefix) :].decode())
            elif channel == self._control:
                if data.startswith(ACK):
                    burst.acks.extend(orjson.loads(data[1:]))
            else:
                try:
                    burst.received.append(decode(data))
                except (ValueError, TypeError):
                    log.error("broker_message_unreadable", extra={"bytes": len(data)})
        elif kind == b"subscribe":
            for waiter in self._confirmations.pop(response[1], []):
                if not waiter.done():
                    waiter.set_result(None)
        elif kind == b"unsubscribe":
            return self._draining is not None and int(response[2]) == 0
        return False


class _Burst:
    """What one read of the pub/sub connection brought, sorted by kind."""

    __slots__ = ("acks", "hints", "received")

    def __init__(self) -> None:
        self.received: list[tuple[Notification, bytes]] = []
        self.hints: list[str] = []
        self.acks: list[str] = []

    def hand_to(self, receiver: Receiver) -> None:
        if self.acks:
            receiver.acknowledged(self.acks)
        if self.received:
            receiver.receive(self.received)
        if self.hints:
            receiver.flush_hint(self.hints)
