"""Several gateway processes behind Redis: every connection of a user, wherever it is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from dev.auth_server import AuthStandIn

from .clients import (
    close_code,
    message,
    produce,
    readiness_once_consuming,
    receive,
    silent,
    wait_connections,
    wait_stored,
)
from .conftest import GatewayFactory
from .gateway import Gateway
from .redis_proxy import RedisProxy


def two_processes(
    gateway_factory: GatewayFactory, redis_url: str, **env: str
) -> tuple[Gateway, Gateway]:
    """Two running gateways (with ``env``) in one consumer group, on a Redis prefix of their own."""
    env = {"REDIS_URL": redis_url, "REDIS_CHANNEL_PREFIX": f"test-{uuid.uuid4().hex[:6]}:", **env}
    a = gateway_factory(**env)
    return a, gateway_factory(KAFKA_GROUP_ID=a.env["KAFKA_GROUP_ID"], **env)


async def test_two_processes_deliver_to_every_connection_of_a_user(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    redis_url: str,
    db: asyncpg.Connection,
) -> None:
    """Users on either process, and one on both, get exactly their messages, none stored."""
    a, b = two_processes(gateway_factory, redis_url)
    async with (
        connect(a.ws_url(auth_server.issue("on-a"))) as on_a,
        connect(b.ws_url(auth_server.issue("on-b"))) as on_b,
        connect(a.ws_url(auth_server.issue("both"))) as both_a,
        connect(b.ws_url(auth_server.issue("both"))) as both_b,
    ):
        await wait_connections(a.base, 2)
        await wait_connections(b.base, 2)
        sent = [
            message(user, subject=f"{user}-{n}")
            for n in range(30)
            for user in ("on-a", "on-b", "both")
        ]
        await produce(producer, topics[0], *sent)
        expected = {
            u: sorted(m["subject"] for m in sent if m["user_id"] == u)
            for u in ("on-a", "on-b", "both")
        }
        assert sorted(f["title"] for f in await receive(on_a, 30)) == expected["on-a"]
        assert sorted(f["title"] for f in await receive(on_b, 30)) == expected["on-b"]
        assert sorted(f["title"] for f in await receive(both_a, 30)) == expected["both"]
        assert sorted(f["title"] for f in await receive(both_b, 30)) == expected["both"]
        for ws in (on_a, on_b, both_a, both_b):
            assert await silent(ws, 0.3)
    assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 0


async def test_offline_backlog_arrives_on_whichever_process(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    redis_url: str,
    db: asyncpg.Connection,
) -> None:
    """Messages for a user connected nowhere are stored once and flushed by either process."""
    a, b = two_processes(gateway_factory, redis_url)
    await produce(producer, topics[0], *[message("roamer", subject=f"m{n}") for n in range(20)])
    await wait_stored(db, 20, timeout=20)
    async with connect(b.ws_url(auth_server.issue("roamer"))) as ws:
        assert sorted(f["title"] for f in await receive(ws, 20)) == sorted(
            f"m{n}" for n in range(20)
        )
    await produce(producer, topics[0], message("roamer", subject="later"))
    await wait_stored(db, 1, timeout=20)
    async with connect(a.ws_url(auth_server.issue("roamer"))) as ws:
        assert [f["title"] for f in await receive(ws, 1)] == ["later"]


async def test_workers_share_one_port(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    redis_url: str,
) -> None:
    """NOTIFY_WORKERS=2 serves one address; each of many users gets their own messages."""
    gateway = gateway_factory(
        REDIS_URL=redis_url,
        REDIS_CHANNEL_PREFIX=f"test-{uuid.uuid4().hex[:6]}:",
        NOTIFY_WORKERS="2",
    )
    users = [f"w{n}" for n in range(40)]
    clients = [await connect(gateway.ws_url(auth_server.issue(u))).__aenter__() for u in users]
    try:
        await asyncio.sleep(1.0)  # every handshake registered on its worker
        await produce(producer, topics[0], *[message(u, subject=u) for u in users])
        for user, ws in zip(users, clients, strict=True):
            assert await receive(ws, 1) == [{"title": user, "body": "c"}]
    finally:
        for ws in clients:
            await ws.close()


async def test_redis_down_turns_readiness_false_and_refuses_new_sockets(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """Without Redis, readiness names it and new connections get 4503 (retry later)."""
    from .gateway import free_port

    gateway = gateway_factory(start=False, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    gateway.start(wait_ready=False)
    answer = await readiness_once_consuming(gateway.base)
    assert answer.status_code == 503 and answer.json()["checks"]["redis"] is False
    code, _ = await close_code(gateway.ws_url(auth_server.issue("nobody")))
    assert code == 4503
    assert json.loads(httpx.get(f"{gateway.base}/health/live").text)["status"] == "ok"


async def test_sigkill_of_one_process_loses_nothing(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    redis_url: str,
) -> None:
    """Kill one of two processes mid-stream: its users reconnect to the other and miss nothing."""
    a, b = two_processes(gateway_factory, redis_url, WRITE_TIMEOUT="1s")
    users = [f"k{n}" for n in range(10)]
    tokens = {u: auth_server.issue(u) for u in users}
    received: dict[str, set[str]] = {u: set() for u in users}

    async def listen(user: str, url: str, stop: asyncio.Event) -> None:
        async with connect(url) as ws:
            while not stop.is_set():
                try:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                except TimeoutError:
                    continue
                except ConnectionClosed:
                    return  # its process was killed
                received[user].add(frame["title"])

    stop = asyncio.Event()
    listeners = [
        asyncio.create_task(listen(u, (a if i % 2 else b).ws_url(tokens[u]), stop))
        for i, u in enumerate(users)
    ]
    await wait_connections(a.base, 5)
    await wait_connections(b.base, 5)
    sent = [message(u, subject=f"{u}-{n}") for n in range(200) for u in users]
    producing = asyncio.create_task(produce(producer, topics[0], *sent))
    async with asyncio.timeout(20):
        while sum(len(titles) for titles in received.values()) < 200:
            await asyncio.sleep(0.01)
    a.kill()
    await producing
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*listeners, return_exceptions=True)

    # Everyone reconnects to the survivor: the backlog and the rest arrive there.
    expected = {u: {m["subject"] for m in sent if m["user_id"] == u} for u in users}
    for user in users:
        async with connect(b.ws_url(tokens[user])) as ws:
            try:
                async with asyncio.timeout(20):
                    while not expected[user] <= received[user]:
                        received[user].add(json.loads(await ws.recv())["title"])
            except TimeoutError:
                pass
    lost = {u: len(expected[u] - received[u]) for u in users}
    assert sum(lost.values()) == 0, lost


async def test_a_failed_subscribe_leaves_no_subscription_behind() -> None:
    """A connection refused for want of Redis does not keep its user subscribed."""
    from service.broker import RedisBroker
    from service.router import BrokerUnavailable

    from .gateway import free_port

    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0")
    try:
        for _ in range(2):
            with contextlib.suppress(BrokerUnavailable):
                await broker.subscribe("someone", wait=0.2)
        assert not broker.subscribed("someone")
    finally:
        await broker.close()


async def test_a_starting_process_serves_only_once_subscribed_to_redis(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn, redis_url: str
) -> None:
    """A client arriving the moment the port opens is served, not told to retry (4503)."""
    # Redis a second away: the gateway's pub/sub connection comes up late.
    proxy = RedisProxy(redis_url, connect_delay=1.0)
    proxy_url = await proxy.start()
    try:
        gateway = gateway_factory(start=False, REDIS_URL=proxy_url)
        gateway.start(wait_ready=False)
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            with contextlib.suppress(OSError):
                _, probe = await asyncio.open_connection("127.0.0.1", gateway.port)
                probe.close()
                break
            assert asyncio.get_running_loop().time() < deadline, "the port never opened"
            await asyncio.sleep(0.01)
        async with connect(gateway.ws_url(auth_server.issue("early-bird"))) as ws:
            assert await silent(ws, 0.3)
    finally:
        proxy.close()
