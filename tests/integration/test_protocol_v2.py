"""Protocol v2 end to end: real gateway process, Kafka, PostgreSQL, auth server, clients."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from dev.auth_server import AuthStandIn
from tests.support.proxy import TcpProxy
from tests.support.wait import until

from .clients import message, produce, receive, silent, wait_connections
from .conftest import GatewayFactory
from .gateway import Gateway

V2 = ["notify.v2"]


async def stored_ids(db: asyncpg.Connection, user: str) -> set[str]:
    rows = await db.fetch(
        "SELECT message_id FROM undelivered_notification WHERE user_id = $1", user
    )
    return {str(row["message_id"]) for row in rows}


async def produce_in_order(producer: AIOKafkaProducer, topic: str, *values: dict[str, Any]) -> None:
    """One partition key: Kafka keeps the order, and so does the gateway."""
    for value in values:
        await producer.send_and_wait(topic, json.dumps(value).encode(), key=b"one-user")


async def ack(ws: ClientConnection, ids: list[str]) -> None:
    await ws.send(json.dumps({"type": "ack", "ids": ids}))


async def closed_with(ws: ClientConnection, timeout: float = 15.0) -> int | None:
    """Read until the server closes; the close code."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed:
        pass
    return ws.close_code


async def test_the_subprotocol_is_selected_when_offered_and_v1_is_unchanged(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """A client offering notify.v2 gets it and typed frames; one offering nothing gets v1."""
    token = auth_server.issue("both")
    async with (
        connect(gateway.ws_url(token), subprotocols=V2) as v2,  # type: ignore[list-item]
        connect(gateway.ws_url(token)) as v1,
    ):
        assert v2.subprotocol == "notify.v2"
        assert v1.subprotocol is None
        await wait_connections(gateway.base, 2)
        sent = message("both", "Новый фильм", "теперь доступен")
        await produce(producer, topics[0], sent)
        assert await receive(v1, 1) == [{"title": "Новый фильм", "body": "теперь доступен"}]
        [frame] = await receive(v2, 1)
        assert frame["type"] == "notification" and frame["id"] == sent["message_id"]
        assert (frame["title"], frame["body"]) == ("Новый фильм", "теперь доступен")
        assert frame["created_at"].endswith("Z") and len(frame["created_at"]) == 24
        await ack(v2, [frame["id"]])


async def test_a_blackholed_v2_client_gets_every_unacked_notification_and_nothing_acked(
    gateway: Gateway,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """Cut without a close mid-stream, a v2 client loses nothing it had not acknowledged,
    and gets nothing again that it had."""
    user = f"tunnel-{uuid.uuid4().hex[:6]}"
    token = auth_server.issue(user)
    port = int(gateway.base.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    await proxy.up()
    try:
        url = gateway.ws_url(token).replace(f":{port}/", f":{proxy.port}/")
        ws = await connect(url, subprotocols=V2, ping_interval=None)  # type: ignore[list-item]
        await wait_connections(gateway.base, 1)
        first = [message(user, f"a{i}") for i in range(5)]
        await produce_in_order(producer, topics[0], *first)
        frames = await receive(ws, 5)
        acked = [f["id"] for f in frames[:3]]
        await ack(ws, acked)
        unacked = {f["id"] for f in frames[3:]}

        async def only_unacked_stored() -> bool:
            return await stored_ids(db, user) == unacked

        # Not acknowledged within the delivery wait: stored; acknowledged: not (or deleted).
        await until(only_unacked_stored, 20, "the two unacked stored, the acked not")
        proxy.freeze()  # the tunnel: bytes vanish, nobody closes anything
        later = [message(user, f"b{i}") for i in range(3)]
        await produce_in_order(producer, topics[0], *later)
        expected = unacked | {m["message_id"] for m in later}

        async def all_unacked_stored() -> bool:
            return await stored_ids(db, user) == expected

        await until(all_unacked_stored, 20, "everything unacked stored")
        async with connect(gateway.ws_url(token), subprotocols=V2) as again:  # type: ignore[list-item]
            frames = await receive(again, 5)
            assert {f["id"] for f in frames} == expected
            assert [f["title"] for f in frames] == ["a3", "a4", "b0", "b1", "b2"]
            assert await silent(again, 1.0)
            await ack(again, [f["id"] for f in frames])

            async def none_stored() -> bool:
                return not await stored_ids(db, user)

            await until(none_stored, 10, "acked rows deleted")
        ws.transport.abort()
    finally:
        await proxy.close()


async def test_acking_another_users_ids_changes_nothing(
    gateway: Gateway,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """Mallory acknowledging Alice's ids, on a frame or in ``acked``, deletes none of them."""
    alice, mallory = f"alice-{uuid.uuid4().hex[:6]}", f"mallory-{uuid.uuid4().hex[:6]}"
    sent = [message(alice, f"n{i}") for i in range(3)]
    await produce_in_order(producer, topics[0], *sent)
    ids = [m["message_id"] for m in sent]

    async def stored() -> bool:
        return await stored_ids(db, alice) == set(ids)

    await until(stored, 20, "alice's notifications stored")
    url = gateway.ws_url(auth_server.issue(mallory)) + "&acked=" + ",".join(ids)
    async with connect(url, subprotocols=V2) as ws:  # type: ignore[list-item]
        await ack(ws, ids)
        assert await silent(ws, 1.0)
    assert await stored_ids(db, alice) == set(ids)
    async with connect(gateway.ws_url(auth_server.issue(alice)), subprotocols=V2) as ws:  # type: ignore[list-item]
        assert [f["id"] for f in await receive(ws, 3)] == ids


async def test_the_acked_parameter_spares_the_flush(
    gateway: Gateway,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """Ids named in ``acked`` are not sent again; a malformed ``acked`` closes with 1008."""
    user = f"resume-{uuid.uuid4().hex[:6]}"
    sent = [message(user, f"n{i}") for i in range(3)]
    await produce_in_order(producer, topics[0], *sent)

    async def stored() -> bool:
        return len(await stored_ids(db, user)) == 3

    await until(stored, 20, "stored")
    token = auth_server.issue(user)
    url = gateway.ws_url(token) + "&acked=" + sent[0]["message_id"]
    async with connect(url, subprotocols=V2) as ws:  # type: ignore[list-item]
        assert [f["title"] for f in await receive(ws, 2)] == ["n1", "n2"]
        assert await silent(ws, 1.0)
    async with connect(gateway.ws_url(token) + "&acked=nope", subprotocols=V2) as ws:  # type: ignore[list-item]
        assert await closed_with(ws) == 1008


async def test_bad_client_frames_are_refused_without_effect_on_others(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """Malformed frames get an error frame; binary, oversized and flooding ones close the
    sender; another client keeps receiving throughout."""
    bystander_user = f"bystander-{uuid.uuid4().hex[:6]}"
    async with connect(
        gateway.ws_url(auth_server.issue(bystander_user)),
        subprotocols=V2,  # type: ignore[list-item]
    ) as bystander:
        token = auth_server.issue("noisy")
        async with connect(gateway.ws_url(token), subprotocols=V2) as ws:  # type: ignore[list-item]
            for bad in ("hello", "[]", '{"type":"subscribe"}', '{"type":"ack","ids":["x"]}'):
                await ws.send(bad)
                [error] = await receive(ws, 1)
                assert error["type"] == "error" and error["code"] == "bad_frame"
            await ws.send(b"\x00\x01")
            assert await closed_with(ws) == 1008
        async with connect(gateway.ws_url(token), subprotocols=V2) as ws:  # type: ignore[list-item]
            await ws.send("x" * 5000)
            assert await closed_with(ws) == 1009
        async with connect(gateway.ws_url(token), subprotocols=V2) as ws:  # type: ignore[list-item]
            # The flood in one burst, all of it on the wire before the server reacts: a
            # client still writing when the server closes would be reset (1006), not told.
            # One write, not one per frame: the server takes each read as it comes, and
            # may close between two of them.
            for _ in range(200):
                frame = json.dumps({"type": "ack", "ids": [str(uuid.uuid4())]})
                ws.protocol.send_text(frame.encode())
            ws.transport.write(b"".join(ws.protocol.data_to_send()))
            assert await closed_with(ws) == 1008
        sent = message(bystander_user, "still here")
        await produce(producer, topics[0], sent)
        [frame] = await receive(bystander, 1)
        assert frame["id"] == sent["message_id"]


async def test_the_gap_frame_comes_first_after_the_cap_dropped_unacked_rows(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """Over BACKLOG_MAX_PER_USER, the next v2 connection hears how many were dropped, first,
    then gets the newest stored; the one after hears of no gap."""
    gateway = gateway_factory(BACKLOG_MAX_PER_USER="2", BACKLOG_CLEANUP_INTERVAL="0.5s")
    user = f"gap-{uuid.uuid4().hex[:6]}"
    sent = [message(user, f"n{i}") for i in range(5)]
    await produce_in_order(producer, topics[0], *sent)

    async def capped() -> bool:
        return await stored_ids(db, user) == {m["message_id"] for m in sent[3:]}

    await until(capped, 30, "the cap kept the newest two")
    token = auth_server.issue(user)
    async with connect(gateway.ws_url(token), subprotocols=V2) as ws:  # type: ignore[list-item]
        frames = await receive(ws, 3)
        assert frames[0] == {"type": "gap", "dropped": 3}
        assert [f["title"] for f in frames[1:]] == ["n3", "n4"]
        await ack(ws, [f["id"] for f in frames[1:]])

        async def acked() -> bool:
            return not await stored_ids(db, user)

        await until(acked, 10, "acked rows deleted")
    async with connect(gateway.ws_url(token), subprotocols=V2) as ws:  # type: ignore[list-item]
        assert await silent(ws, 1.0)


async def test_refresh_with_a_good_an_expired_and_another_users_token(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """``expiring`` comes before exp; a good refresh keeps the connection past it; an
    expired token is an error frame; another user's token closes with 4403."""
    user = f"refresh-{uuid.uuid4().hex[:6]}"
    started = time.time()
    async with connect(
        gateway.ws_url(auth_server.issue(user, ttl=6)),
        subprotocols=V2,  # type: ignore[list-item]
    ) as ws:
        [expiring] = await receive(ws, 1, timeout=10)
        assert expiring["type"] == "expiring" and 1 <= expiring["in_s"] <= 3
        await ws.send(json.dumps({"type": "refresh", "token": auth_server.issue(user, ttl=-30)}))
        [error] = await receive(ws, 1)
        assert error == {"type": "error", "code": "invalid_token", "message": error["message"]}
        await ws.send(json.dumps({"type": "refresh", "token": auth_server.issue(user, ttl=600)}))
        [refreshed] = await receive(ws, 1)
        assert refreshed["type"] == "refreshed" and 500 < refreshed["expires_in_s"] <= 600
        await until(lambda: time.time() > started + 8, 15, "past the first token's exp")
        sent = message(user, "after exp")
        await produce(producer, topics[0], sent)
        [frame] = await receive(ws, 1)
        assert frame["id"] == sent["message_id"], "still connected after the old exp"
        await ws.send(json.dumps({"type": "refresh", "token": auth_server.issue("someone")}))
        assert await closed_with(ws) == 4403
    async with connect(
        gateway.ws_url(auth_server.issue(user, ttl=3)),
        subprotocols=V2,  # type: ignore[list-item]
    ) as ws:
        await ws.send(json.dumps({"type": "refresh", "token": "not-a-token"}))
        frames: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(15):
                while True:
                    frames.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
        assert any(f.get("code") == "invalid_token" for f in frames)
        assert ws.close_code == 4401, "without a good refresh, closed at exp as in v1"


def metric(gateway: Gateway, name: str) -> float:
    text = httpx.get(f"{gateway.base}/metrics").text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split(" ")[1])
    return 0.0


async def test_an_ack_within_ack_wait_stores_nothing_and_holds_up_no_other_user(
    gateway_factory: GatewayFactory,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """A v2 client that takes a second to acknowledge (within ACK_WAIT) costs the store no
    row, and the user behind it on the same partition gets its notification meanwhile."""
    gateway = gateway_factory(ACK_WAIT="20s")
    slow_user, quick_user = f"slow-{uuid.uuid4().hex[:6]}", f"quick-{uuid.uuid4().hex[:6]}"
    async with (
        connect(gateway.ws_url(auth_server.issue(slow_user)), subprotocols=V2) as slow,  # type: ignore[list-item]
        connect(gateway.ws_url(auth_server.issue(quick_user))) as quick,
    ):
        await wait_connections(gateway.base, 2)
        for_slow, for_quick = message(slow_user, "first"), message(quick_user, "second")
        await produce_in_order(producer, topics[0], for_slow, for_quick)
        [frame] = await receive(slow, 1)
        assert await receive(quick, 1) == [{"title": "second", "body": for_quick["content"]}]
        await asyncio.sleep(1.5)  # the client is slow to acknowledge
        assert await stored_ids(db, slow_user) == set(), "stored while its ack was due"
        await ack(slow, [frame["id"]])
        await asyncio.sleep(0.5)
        assert await stored_ids(db, slow_user) == set()
        assert metric(gateway, "notify_notifications_stored_total") == 0


async def test_frames_behind_a_refresh_are_taken_after_it_in_order(
    gateway: Gateway,
    auth_server: AuthStandIn,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """A refresh, an ack in fragments with a ping between them, and a bad frame, written
    at once, are answered in that order, and the ack deletes its stored row."""
    user = f"order-{uuid.uuid4().hex[:6]}"
    sent = [message(user, f"n{i}") for i in range(2)]
    await produce_in_order(producer, topics[0], *sent)

    async def stored() -> bool:
        return await stored_ids(db, user) == {m["message_id"] for m in sent}

    await until(stored, 30, "both stored while the user is offline")
    async with connect(
        gateway.ws_url(auth_server.issue(user)),
        subprotocols=V2,  # type: ignore[list-item]
    ) as ws:
        frames = await receive(ws, 2)
        assert [f["id"] for f in frames] == [m["message_id"] for m in sent]
        acked = json.dumps({"type": "ack", "ids": [sent[0]["message_id"]]}).encode()
        ws.protocol.send_text(
            json.dumps({"type": "refresh", "token": auth_server.issue(user, ttl=600)}).encode()
        )
        ws.protocol.send_text(acked[:10], fin=False)
        ws.protocol.send_ping(b"between")
        ws.protocol.send_continuation(acked[10:], fin=True)
        ws.protocol.send_text(b"hello")
        ws.send_data()
        refreshed, error = await receive(ws, 2)
        assert refreshed["type"] == "refreshed"
        assert (error["type"], error["code"]) == ("error", "bad_frame")

        async def first_acked() -> bool:
            return await stored_ids(db, user) == {sent[1]["message_id"]}

        await until(first_acked, 10, "the fragmented ack deleted its row, and only its row")
        await ack(ws, [sent[1]["message_id"]])

        async def all_acked() -> bool:
            return not await stored_ids(db, user)

        await until(all_acked, 10, "the plain ack deleted the other row")
