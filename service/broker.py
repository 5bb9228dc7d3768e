"""The fan-out between gateway processes: Redis pub/sub, or memory for a single process.

Both brokers implement the router's ``Broker`` protocol and are driven the same
way; which one a process uses is decided in ``service/node.py`` (``build_parts``):
``MemoryBroker`` when ``REDIS_URL`` is empty, ``RedisBroker`` otherwise.

With Redis, each process SUBSCRIBEs to ``<prefix><user id>`` for the users connected to it.
The process that consumed a notification PUBLISHes it there; Redis answers with
the number of processes that received it, and zero means "offline everywhere".
A flush hint (``F``) on the same channel tells a process to re-read the store
for that user. Each process also listens on a control channel of its own
(``<prefix>node:<random id>``), where receivers acknowledge (``A`` + a JSON
list of message ids) the notifications it published once they were written or
stored: the publisher commits its Kafka offsets only then.

Wire format of a notification on a channel: the JSON array
``[message_id, user_id, created_ms, title, body, origin control channel]``.

The broker owns two Redis connections (``service/resp.py``): one for PUBLISH
(pipelined per batch) and one pub/sub connection read by the named task
``redis-subscriber``. If the pub/sub connection breaks or goes silent, the
broker reconnects with backoff, subscribes to every channel again, and asks the
receiver to re-read the store for all its users, since messages published
meanwhile were stored as "offline".

Presence: each process keeps ``<prefix>alive:<node id>`` set (``presence_ttl``,
refreshed three times per TTL) and drops, with CLIENT KILL, the pub/sub
connections of peers whose key expired: a process whose machine died leaves
them open at Redis, still counted as receivers that will never acknowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import orjson

from .notification import Notification
from .resp import Address, RedisConnection, RedisUnavailable, ReplyError, client_list, pack
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


class Presence(Protocol):
    """What the memory broker needs of the hub: whether a user is connected here."""

    def online(self, user_id: str) -> bool: ...


# The only origin of the memory broker: every notification is published and received
# by this process, so acknowledgements go straight back to its own router.
LOCAL = b"local"


class MemoryBroker:
    """The broker of a single process (``REDIS_URL`` empty): publishing is local delivery.

    It keeps the router on the one code path of the Redis broker: ``publish``
    counts one receiver for each notification whose user has a connection in the
    hub (zero otherwise, and the router stores it), and hands the received ones
    to the router synchronously, with no copy, no encoding and no task of its own;
    acknowledgements and flush hints go straight back to the router. It holds no
    connection: ``subscribe`` only has to be called in the connect order
    (subscribe, register, flush), the hub being the subscription.

    After ``drain`` nothing counts as received, as a Redis broker that left its
    channels. ``start()`` once; ``close()`` is idempotent. Every method is safe
    to call from any task on the loop.
    """

    task: asyncio.Task[None] | None = None  # none: nothing runs in the background

    def __init__(self, hub: Presence) -> None:
        self._hub = hub
        self._receiver: Receiver | None = None
        self._closing = False

    async def start(self, receiver: Receiver, wait: float = 0.0) -> None:
        self._receiver = receiver

    async def subscribe(self, user_id: str, wait: float = 5.0) -> None:
        """Nothing to wait for: a user is received here once registered in the hub."""

    def unsubscribe(self, user_id: str) -> None:
        """Nothing to leave: a user unregistered from the hub is received no more."""

    async def publish(self, notifications: Sequence[Notification]) -> list[int]:
        """Hand the notifications of connected users to the receiver; 1 for those, 0 else."""
        if self._closing or self._receiver is None:
            return [0] * len(notifications)
        online = self._hub.online
        counts = [1 if online(n.user_id) else 0 for n in notifications]
        received = [(n, LOCAL) for n, count in zip(notifications, counts, strict=True) if count]
        if received:
            self._receiver.receive(received)
        return counts

    async def publish_flush(self, user_ids: Iterable[str]) -> None:
        if self._receiver is not None:
            self._receiver.flush_hint(user_ids)

    async def acknowledge(self, by_origin: dict[bytes, list[str]]) -> None:
        if self._receiver is not None:
            for message_ids in by_origin.values():
                self._receiver.acknowledged(message_ids)

    async def readiness(self) -> dict[str, bool]:
        """No check of its own: there is nothing to reach."""
        return {}

    async def drain(self, grace: float) -> None:
        """From now on nothing is received here: the router stores what is published."""
        self._closing = True

    async def close(self) -> None:
        self._closing = True


def encode(notification: Notification, origin: str) -> bytes:
    n = notification
    return orjson.dumps([n.message_id, n.user_id, n.created_ms, n.title, n.body, origin])


def decode(data: bytes) -> tuple[Notification, bytes]:
    message_id, user_id, created_ms, title, body, origin = orjson.loads(data)
    return Notification.build(message_id, user_id, title, body, created_ms), origin.encode()


class RedisBroker:
    """Pub/sub fan-out over one Redis. ``start()`` once, ``close()`` is idempotent.

    ``subscribe``/``unsubscribe`` are reference-counted per user and safe to call
    from many connection handlers at once. Commands on each connection go out in
    call order, so an UNSUBSCRIBE never overtakes a later SUBSCRIBE of the user.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "user:",
        *,
        timeout: float = 5.0,
        ping_interval: float = 10.0,
        presence_ttl: float = 10.0,
    ) -> None:
        self._address = Address.parse(url)
        self._prefix = prefix
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._presence_ttl = presence_ttl
        self._node = uuid.uuid4().hex
        # Client names carry a tag of the prefix: processes of another deployment on
        # the same Redis (another prefix) are none of this one's business.
        tag = hashlib.sha256(prefix.encode()).hexdigest()[:8]
        self._name_prefix = f"notify-ws:{tag}:"
        self.name = f"{self._name_prefix}{self._node}"
        self._control = f"{prefix}node:{self._node}".encode()
        self._origin = self._control.decode()
        self._commands: RedisConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._pubsub: RedisConnection | None = None
        self._refs: dict[str, int] = {}
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._receiver: Receiver | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # draining or closed: no new subscriptions
        self._closed = False  # no new connections either
        self._draining: asyncio.Event | None = None
        self._subscribed = asyncio.Event()  # set while ``healthy``
        self.healthy = False

    def channel(self, user_id: str) -> bytes:
        return f"{self._prefix}{user_id}".encode()

    def subscribed(self, user_id: str) -> bool:
        """Whether this process holds a subscription for the user."""
        return user_id in self._refs

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def start(self, receiver: Receiver, wait: float = 0.0) -> None:
        """Start the subscriber task; it connects (retrying while Redis is down).

        Returns once subscribed, or after ``wait`` seconds with Redis still out of
        reach (the task keeps trying; meanwhile ``healthy`` is False).
        """
        self._receiver = receiver
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-subscriber")
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), wait)

    async def subscribe(self, user_id: str, wait: float = 5.0) -> None:
        """Subscribe this process to the user's channel; returns once Redis confirmed.

        A call that does not return normally (it times out, Redis is down, or it is
        cancelled because the client left meanwhile) takes nothing: its reference
        is given back, and the channel is left if no one else holds it.

        Raises:
            BrokerUnavailable: Redis did not confirm within ``wait`` seconds.
        """
        count = self._refs.get(user_id, 0)
        self._refs[user_id] = count + 1
        channel = self.channel(user_id)
        if count > 0 and channel not in self._confirmations:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, []).append(waiter)
        try:
            if count == 0:
                self._send_subscribed(pack("SUBSCRIBE", channel))
            await asyncio.wait_for(asyncio.shield(waiter), wait)
        except (TimeoutError, BrokerUnavailable) as exc:
            self._give_back(user_id, channel, waiter)
            raise BrokerUnavailable(f"subscribe failed: {type(exc).__name__}") from None
        except asyncio.CancelledError:
            # The caller never gets to unsubscribe: its client went away while
            # Redis had not confirmed yet (Sanic cancels the handler).
            self._give_back(user_id, channel, waiter)
            raise

    def _give_back(self, user_id: str, channel: bytes, waiter: asyncio.Future[None]) -> None:
        """Undo a subscribe that did not complete, or this process would stay subscribed
        to the user for good and take (then store) all their notifications."""
        waiters = self._confirmations.get(channel)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._confirmations[channel]
        self.unsubscribe(user_id)

    def unsubscribe(self, user_id: str) -> None:
        """Drop one reference; the channel is left when the last one goes.

        A message published before Redis processed the UNSUBSCRIBE is still
        received and, with no connection of the user left here, stored.
        """
        count = self._refs.get(user_id, 0) - 1
        if count > 0:
            self._refs[user_id] = count
            return
        self._refs.pop(user_id, None)
        if not self._closing:
            # On failure nothing is lost: a reconnect subscribes only to the
            # channels still referenced.
            with contextlib.suppress(BrokerUnavailable):
                self._send_subscribed(pack("UNSUBSCRIBE", self.channel(user_id)))

    async def publish(self, notifications: Sequence[Notification]) -> list[int]:
        """PUBLISH each notification on its user's channel; how many processes got each.

        Raises:
            BrokerUnavailable: Redis could not be reached; nothing may be assumed sent.
        """
        if not notifications:
            return []
        channel, origin = self.channel, self._origin
        payload = b"".join([_publish(channel(n.user_id), encode(n, origin)) for n in notifications])
        return await self._call(payload, len(notifications), "publish")

    async def publish_flush(self, user_ids: Iterable[str]) -> None:
        """Tell the processes holding these users to re-read the store. Raises BrokerUnavailable."""
        channels = [self.channel(user_id) for user_id in user_ids]
        if channels:
            payload = b"".join([_publish(channel, FLUSH_HINT) for channel in channels])
            await self._call(payload, len(channels), "publish")

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
        if remote:
            payload = b"".join(
                [_publish(origin, ACK + orjson.dumps(ids)) for origin, ids in remote.items()]
            )
            await self._call(payload, len(remote), "acknowledge")

    async def readiness(self) -> dict[str, bool]:
        """``redis``: the pub/sub connection is subscribed and Redis answers a PING."""
        return {"redis": self.healthy and await self.ping()}

    async def ping(self) -> bool:
        try:
            replies = await self._call(pack("PING"), 1, "ping", wait=2.0)
        except BrokerUnavailable:
            return False
        return replies == [b"PONG"]

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
            self._send_subscribed(pack("UNSUBSCRIBE"))
            await asyncio.wait_for(self._draining.wait(), grace)
        except (TimeoutError, BrokerUnavailable) as exc:
            log.warning("broker_drain_incomplete", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        self._closing = self._closed = True
        # Connections first: the subscriber task then ends by itself even if the
        # cancellation below is lost (asyncio.wait_for can swallow one on 3.11).
        for connection in (self._pubsub, self._commands):
            if connection is not None:
                connection.close()
        self._pubsub = self._commands = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _call(
        self, payload: bytes, count: int, what: str, wait: float | None = None
    ) -> list[Any]:
        """Run packed commands on the command connection (opened on demand)."""
        try:
            connection = self._commands
            if connection is None or not connection.is_open:
                if self._closed:
                    raise RedisUnavailable("broker closed")
                connection = await self._open_commands()
            replies = await connection.call(payload, count, wait or self._timeout)
        except RedisUnavailable as exc:
            raise BrokerUnavailable(f"{what} failed: {exc}") from None
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise BrokerUnavailable(f"{what} refused: {str(reply)[:200]}")
        return replies

    async def _open_commands(self) -> RedisConnection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one attempt at a time; the others share it
            connection = self._commands
            if connection is None or not connection.is_open:
                connection = await RedisConnection.open(
                    self._address, name=self.name, wait=self._timeout
                )
                self._commands = connection
            return connection

    def _send_subscribed(self, payload: bytes) -> None:
        pubsub = self._pubsub
        if pubsub is None or not self.healthy:
            raise BrokerUnavailable("not connected to Redis")
        try:
            pubsub.send(payload)
        except RedisUnavailable as exc:
            raise BrokerUnavailable(str(exc)) from None

    async def _run(self) -> None:
        delay = 0.2
        first = True
        previous: RedisConnection | None = None
        while not self._closing:
            try:
                pubsub = await self._connect(previous)
            except RedisUnavailable as exc:
                log.error("redis_subscriber_error", extra={"error": str(exc)[:300]})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not first:
                log.info("redis_resubscribed", extra={"channels": len(self._refs)})
                assert self._receiver is not None
                self._receiver.resync()
            first, delay, previous = False, 0.2, None
            await self._watch(pubsub)
            pubsub.close()  # a no-op unless closing
            previous = pubsub
            self.healthy = False
            self._subscribed.clear()
            self._pubsub = None
            for waiters in self._confirmations.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(BrokerUnavailable("redis connection lost"))
            self._confirmations.clear()
            if not self._closing:
                log.error("redis_subscriber_error", extra={"error": "pub/sub connection lost"})
                await asyncio.sleep(delay)

    async def _connect(self, previous: RedisConnection | None = None) -> RedisConnection:
        """Open the pub/sub connection and subscribe to every channel in use.

        Returns once Redis confirmed all of them: only then may the receiver
        re-read the store (a flush hint sent before would have been missed).
        """
        try:
            # Alive before the pub/sub connection shows this process's name.
            await self._announce()
        except BrokerUnavailable as exc:
            raise RedisUnavailable(str(exc)) from None
        name = f"{self.name}:pubsub"
        pubsub = await RedisConnection.open(self._address, name=name, wait=self._timeout)
        if previous is not None:
            try:
                await self._kill_stale(pubsub, previous, name)
            except RedisUnavailable:
                pubsub.close()
                raise
        pubsub.listen(self._on_replies)
        channels = [self._control] + [self.channel(user) for user in self._refs]
        last: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channels[-1], []).append(last)
        try:
            pubsub.send(pack("SUBSCRIBE", *channels))
            await asyncio.wait_for(asyncio.shield(last), self._timeout)
        except (RedisUnavailable, TimeoutError, BrokerUnavailable) as exc:
            pubsub.close()
            self._confirmations.pop(channels[-1], None)
            raise RedisUnavailable(f"subscribe failed: {type(exc).__name__}") from None
        # A user whose last connection left while this was under way is still in
        # the SUBSCRIBE above (its UNSUBSCRIBE could not be sent): leave it now, or
        # this process would take, and store, that user's notifications for good.
        gone = [c for c in channels[1:] if c[len(self._prefix) :].decode() not in self._refs]
        if gone:
            pubsub.send(pack("UNSUBSCRIBE", *gone))
        self._pubsub = pubsub
        self.healthy = True
        self._subscribed.set()
        return pubsub

    async def _kill_stale(
        self, pubsub: RedisConnection, previous: RedisConnection, name: str
    ) -> None:
        """Make Redis drop the previous pub/sub connection if it still holds it.

        One dropped here for silence (half-open: a NAT or a network fault) may still
        be subscribed at Redis's end, counted as a receiver of this process's users
        without ever acknowledging: every such notification would wait out the ack
        timeout and be stored. Its id is checked against this process's name first
        (ids start again when Redis restarts).
        """
        old = previous.client_id
        if not old:
            return
        listing = await pubsub.call(pack("CLIENT", "LIST", "ID", old), 1, self._timeout)
        if any(client.get(b"name") == name.encode() for client in client_list(listing[0])):
            await pubsub.call(pack("CLIENT", "KILL", "ID", old), 1, self._timeout)
            log.warning("redis_stale_subscriber_dropped", extra={"client_id": old})

    async def _watch(self, pubsub: RedisConnection) -> None:
        """Return when the connection is gone. Meanwhile keep this process's presence,
        drop dead peers, PING the connection when quiet and drop it if Redis is silent."""
        loop = asyncio.get_running_loop()
        tick = min(self._presence_ttl / 3, self._ping_interval, self._timeout)
        pinged: float | None = None
        while pubsub.is_open and not self._closing:
            await asyncio.wait([pubsub.closed], timeout=tick)
            if not pubsub.is_open or self._closing:
                return
            with contextlib.suppress(BrokerUnavailable):
                # On failure the next tick tries again; Redis being down shows elsewhere.
                await self._announce()
                await self._reap()
            now = loop.time()
            if pinged is not None and pubsub.last_read >= pinged:
                pinged = None
            if pinged is not None and now - pinged >= self._timeout:
                log.error("redis_subscriber_silent", extra={"seconds": self._timeout})
                pubsub.close()
            elif pinged is None and now - pubsub.last_read >= self._ping_interval:
                with contextlib.suppress(RedisUnavailable):
                    pubsub.send(pack("PING"))
                pinged = now

    async def _announce(self) -> None:
        """Mark this process alive for ``presence_ttl`` seconds. Raises BrokerUnavailable."""
        ttl_ms = int(self._presence_ttl * 1000)
        await self._call(pack("SET", self._alive_key(self._node), "1", "PX", ttl_ms), 1, "presence")

    def _alive_key(self, node: str) -> str:
        return f"{self._prefix}alive:{node}"

    async def _reap(self) -> None:
        """Drop the pub/sub connections of peers that stopped announcing themselves.

        A process whose machine died leaves its connections open at Redis's end until
        TCP gives up, which can take many minutes; Redis keeps counting it as a
        receiver of its users, and each of their notifications would wait out the ack
        timeout before being stored. Raises BrokerUnavailable.
        """
        listing = await self._call(pack("CLIENT", "LIST", "TYPE", "pubsub"), 1, "reap")
        peers: dict[str, list[bytes]] = {}
        head, tail = self._name_prefix.encode(), b":pubsub"
        for client in client_list(listing[0]):
            name = client.get(b"name", b"")
            if name.startswith(head) and name.endswith(tail) and b"id" in client:
                node = name[len(head) : -len(tail)].decode()
                if node != self._node:
                    peers.setdefault(node, []).append(client[b"id"])
        if not peers:
            return
        nodes = list(peers)
        keys = b"".join([pack("EXISTS", self._alive_key(node)) for node in nodes])
        alive = await self._call(keys, len(nodes), "reap")
        for node, present in zip(nodes, alive, strict=True):
            if present:
                continue
            for client_id in peers[node]:
                # An error reply (already gone) is fine: it is what was wanted.
                with contextlib.suppress(BrokerUnavailable):
                    await self._call(pack("CLIENT", "KILL", "ID", client_id), 1, "reap")
            log.warning("redis_dead_peer_dropped", extra={"node": node})

    def _on_replies(self, replies: list[Any]) -> None:
        """Sort one read of the pub/sub connection and hand it over as one burst."""
        burst = _Burst()
        prefix_length = len(self._prefix)
        for reply in replies:
            if type(reply) is not list:
                log.error("redis_subscriber_reply", extra={"reply": str(reply)[:200]})
                continue
            kind = reply[0]
            if kind == b"message":
                channel, data = reply[1], reply[2]
                if data == FLUSH_HINT:
                    burst.hints.append(channel[prefix_length:].decode())
                elif channel == self._control:
                    if data.startswith(ACK):
                        burst.acks.extend(orjson.loads(data[1:]))
                else:
                    try:
                        burst.received.append(decode(data))
                    except (ValueError, TypeError):
                        log.error("broker_message_unreadable", extra={"bytes": len(data)})
            elif kind == b"subscribe":
                for waiter in self._confirmations.pop(reply[1], []):
                    if not waiter.done():
                        waiter.set_result(None)
            elif kind == b"unsubscribe" and self._draining is not None and reply[2] == 0:
                self._draining.set()
        assert self._receiver is not None
        burst.hand_to(self._receiver)


def _publish(channel: bytes, message: bytes) -> bytes:
    """``pack("PUBLISH", channel, message)`` for the hot path: 0.24 µs against 1.2 µs."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(message),
        message,
    )


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
