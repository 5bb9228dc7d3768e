"""The gateway end to end: real Kafka, PostgreSQL, auth server and WebSocket clients."""

from __future__ import annotations

import asyncio
import json

import asyncpg
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect

from dev.auth_server import AuthStandIn

from .clients import close_code, console_produce, message, produce, receive, silent, wait_stored
from .conftest import GatewayFactory
from .gateway import Gateway

SEED_LINE = (
    '{"message_id": "123e4567-e89b-12d3-a456-426614174000","delivery_method": "push",'
    '"user_id": "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce","subject":"Новый фильм", '
    '"content": "Фильм \'Как закалялась сталь\' теперь доступен для просмотра"}'
)
SEED_USER = "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"


async def test_platform_scenario_with_console_producer(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], kafka_bootstrap: str
) -> None:
    """The seed's line, produced with Kafka's own console producer, reaches the client as-is."""
    token = auth_server.issue(SEED_USER)
    async with connect(gateway.ws_url(token)) as ws:
        await console_produce(kafka_bootstrap, topics[0], SEED_LINE)
        raw = await asyncio.wait_for(ws.recv(), 30)
    assert json.loads(raw) == {
        "title": "Новый фильм",
        "body": "Фильм 'Как закалялась сталь' теперь доступен для просмотра",
    }
    assert "Новый фильм" in raw, "frames are UTF-8, not ASCII-escaped"
    assert token not in gateway.logs()


async def test_offline_user_gets_backlog_in_order_once(
    gateway: Gateway,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """Messages for a disconnected user arrive in order on connect, and only once."""
    user = "offline-user"
    sent = [message(user, subject=f"n{i}") for i in range(5)]
    # One partition key keeps Kafka's order, which the backlog must preserve.
    for value in sent:
        await producer.send_and_wait(topics[0], json.dumps(value).encode(), key=b"k")
    await wait_stored(db, 5, timeout=20)

    token = auth_server.issue(user)
    async with connect(gateway.ws_url(token)) as ws:
        frames = await receive(ws, 5)
        assert [f["title"] for f in frames] == [f"n{i}" for i in range(5)]
        assert await silent(ws, 0.5)
    assert await db.fetchval("SELECT count(*) FROM undelivered_notification") == 0
    async with connect(gateway.ws_url(token)) as ws:
        assert await silent(ws, 1.0), "a second connection does not get them again"


async def test_all_connections_of_a_user_receive_and_no_one_else(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """Both connections of a user get a live message; another user's connection gets nothing."""
    async with (
        connect(gateway.ws_url(auth_server.issue("alice"))) as phone,
        connect(gateway.ws_url(auth_server.issue("alice"))) as laptop,
        connect(gateway.ws_url(auth_server.issue("bob"))) as bob,
    ):
        await produce(producer, topics[0], message("alice", "hi", "there"))
        assert await receive(phone, 1) == [{"title": "hi", "body": "there"}]
        assert await receive(laptop, 1) == [{"title": "hi", "body": "there"}]
        assert await silent(bob, 1.0)


async def test_bearer_header_is_accepted(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """A client may send its token as ``Authorization: Bearer`` instead of the query."""
    token = auth_server.issue("carol")
    async with connect(
        gateway.ws_url(), additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        await produce(producer, topics[0], message("CAROL".lower(), "x", "y"))
        assert await receive(ws, 1) == [{"title": "x", "body": "y"}]


async def test_token_failures_close_with_readable_codes(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """No token or a bad one closes with 4401; a failing auth service with 4503."""
    gateway = gateway_factory(AUTH_TIMEOUT="1s")
    assert (await close_code(gateway.ws_url()))[0] == 4401
    assert (await close_code(gateway.ws_url("not-a-token")))[0] == 4401
    assert (await close_code(gateway.ws_url(auth_server.issue("dave", ttl=-10))))[0] == 4401
    auth_server.fail_status = 500
    code, reason = await close_code(gateway.ws_url(auth_server.issue("dave")))
    assert code == 4503 and "retry" in reason
    auth_server.fail_status = None
    auth_server.delay = 3.0
    code, _ = await close_code(gateway.ws_url(auth_server.issue("erin")))
    assert code == 4503, "an auth service slower than AUTH_TIMEOUT is unavailable, not invalid"


async def test_auth_service_down_is_unavailable(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """An auth service that refuses connections gives 4503, never 4401."""
    from .gateway import free_port

    gateway = gateway_factory(AUTH_VERIFY_URL=f"http://127.0.0.1:{free_port()}/api/v1/users/me")
    assert (await close_code(gateway.ws_url(auth_server.issue("frank"))))[0] == 4503


async def _upgrade(gateway: Gateway, token: str, *headers: str) -> tuple[int, dict[str, str]]:
    """Send an upgrade request by hand; the answer's status and header fields."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        lines = [f"GET /api/v1/notify/ws?token={token} HTTP/1.1", "Host: 127.0.0.1", *headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    status, *fields = head.decode("latin-1").split("\r\n")[:-2]
    return int(status.split()[1]), {
        name.lower(): value for name, _, value in (f.partition(": ") for f in fields)
    }


async def test_upgrade_answers_follow_rfc_6455(gateway: Gateway, auth_server: AuthStandIn) -> None:
    """A valid upgrade gets 101 with the RFC's accept value and notify.v2 only when offered;
    a broken one an HTTP error (400, 426), never a socket."""
    token = auth_server.issue("raw-upgrade")
    plain = (
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    )
    status, fields = await _upgrade(gateway, token, *plain)
    assert status == 101
    assert fields["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert fields["upgrade"] == "websocket" and "date" in fields
    assert "sec-websocket-protocol" not in fields
    status, fields = await _upgrade(gateway, token, *plain, "Sec-WebSocket-Protocol: x, notify.v2")
    assert status == 101 and fields["sec-websocket-protocol"] == "notify.v2"
    status, fields = await _upgrade(gateway, token, *plain, "Sec-WebSocket-Protocol: x")
    assert status == 101 and "sec-websocket-protocol" not in fields

    bad_key = (*plain[:2], "Sec-WebSocket-Key: AAAA", plain[3])
    assert (await _upgrade(gateway, token, *bad_key))[0] == 400
    assert (await _upgrade(gateway, token, *plain[1:]))[0] == 426  # no Upgrade header
    assert (await _upgrade(gateway, token, *plain[:3], "Sec-WebSocket-Version: 8"))[0] == 400


async def test_a_backlog_of_several_pages_arrives_whole_in_order_once(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn, db: asyncpg.Connection
) -> None:
    """2,500 stored notifications (under a cap of 5,000), pages of 1,000: every one arrives,
    oldest first, once;
    the store is empty afterwards and a second connection gets nothing."""
    user = "long-offline-user"
    await db.execute(
        """
        INSERT INTO undelivered_notification (message_id, user_id, title, body, created_at)
        SELECT gen_random_uuid(), $1, 'n' || i, 'b', now() - make_interval(secs => 3000 - i)
        FROM generate_series(1, 2500) AS i
        """,
        user,
    )
    gateway = gateway_factory(FLUSH_BATCH="1000", BACKLOG_MAX_PER_USER="5000")
    token = auth_server.issue(user)
    async with connect(gateway.ws_url(token), max_queue=None) as ws:
        frames = await receive(ws, 2500, timeout=60)
        assert [f["title"] for f in frames] == [f"n{i}" for i in range(1, 2501)]
        assert await silent(ws, 0.5)
    async with asyncio.timeout(20):
        while await db.fetchval(
            "SELECT count(*) FROM undelivered_notification WHERE user_id = $1", user
        ):
            await asyncio.sleep(0.1)
    async with connect(gateway.ws_url(token)) as ws:
        assert await silent(ws, 1.0), "a second connection does not get them again"
