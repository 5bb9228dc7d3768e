"""Who may connect: JWT mode, connection limits, origins, tokens that expire while connected."""

from __future__ import annotations

import asyncio
import time

import httpx
import jwt
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect

from dev.auth_server import AuthStandIn

from .clients import close_code, message, produce, receive, silent, wait_connections
from .conftest import GatewayFactory

SECRET = "integration-secret-of-32-bytes-at-least"


def _token(sub: str, ttl: float, secret: str = SECRET, **claims: object) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "iat": int(now), "exp": now + ttl, **claims}, secret, "HS256")


async def test_jwt_mode_checks_signature_and_expiry_locally(
    gateway_factory: GatewayFactory, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """In jwt mode a valid token connects and receives; expired or forged ones get 4401."""
    gateway = gateway_factory(
        AUTH_MODE="jwt",
        AUTH_JWT_SECRET=SECRET,
        AUTH_VERIFY_URL="http://127.0.0.1:9/unused",
    )
    async with connect(gateway.ws_url(_token("jwt-user", 60))) as ws:
        await produce(producer, topics[0], message("jwt-user", "local", "check"))
        assert await receive(ws, 1) == [{"title": "local", "body": "check"}]
    assert (await close_code(gateway.ws_url(_token("jwt-user", -60))))[0] == 4401
    forged = _token("jwt-user", 60, secret="another-secret-of-32-bytes-at-least")
    assert (await close_code(gateway.ws_url(forged)))[0] == 4401


async def test_per_user_connection_limit(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """Past MAX_CONNECTIONS_PER_USER a new connection of that user is closed with 4429."""
    gateway = gateway_factory(MAX_CONNECTIONS_PER_USER="2")
    token = auth_server.issue("greedy")
    async with connect(gateway.ws_url(token)), connect(gateway.ws_url(token)):
        # The handshake completes before the token check: wait until both count.
        await wait_connections(gateway.base, 2)
        code, reason = await close_code(gateway.ws_url(token))
        assert code == 4429 and "user" in reason
        async with connect(gateway.ws_url(auth_server.issue("other"))) as other:
            assert other.state.name == "OPEN", "other users are not limited by this one"


async def test_disallowed_origin_is_refused(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """With ALLOWED_ORIGINS set, a page from another origin gets 4403; a listed one connects."""
    gateway = gateway_factory(ALLOWED_ORIGINS="https://cinema.example")
    token = auth_server.issue("viewer")
    code, _ = await close_code(gateway.ws_url(token), origin="https://evil.example")
    assert code == 4403
    async with connect(gateway.ws_url(token), origin="https://cinema.example") as ws:
        assert ws.state.name == "OPEN"


async def test_connection_closes_when_its_token_expires(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """A token with an exp closes its connection with 4401 at that moment."""
    gateway = gateway_factory()
    started = time.monotonic()
    code, reason = await close_code(gateway.ws_url(auth_server.issue("short", ttl=2)))
    assert code == 4401 and "expired" in reason
    assert 0.5 < time.monotonic() - started < 10


async def test_cached_token_checks_spare_the_auth_service(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """Reconnecting with the same token does not ask the auth service again."""
    gateway = gateway_factory()
    token = auth_server.issue("repeat")
    for _ in range(5):
        async with connect(gateway.ws_url(token)) as ws:
            assert await silent(ws, 0.3), "accepted, not closed"
    assert auth_server.requests == 1


async def _trickle(port: int, head: bytes, *, first: bytes = b"") -> tuple[float, bytes]:
    """Send ``first`` at once, then ``head`` a byte every 0.2 s; when and what the gateway
    answered (b"" for a close without an answer) after ``head`` began."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if first:
            writer.write(first)
            await reader.readuntil(b'"ok"}')  # the whole first response
        started = time.monotonic()
        answer = asyncio.create_task(reader.read(1024))
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.wait({answer}, timeout=0.2)
            if answer.done() or time.monotonic() - started > 20:
                break
        data = await asyncio.wait_for(answer, 20)
        return time.monotonic() - started, data
    finally:
        writer.close()


async def test_a_request_head_must_arrive_whole_within_the_handshake_timeout(
    gateway_factory: GatewayFactory,
) -> None:
    """A head that trickles in is cut with 408 at HANDSHAKE_TIMEOUT, also the second head of
    a kept-alive connection; a connection that sends nothing is closed; prompt clients pass."""
    gateway = gateway_factory(HANDSHAKE_TIMEOUT="1s")
    port = gateway.port
    head = (
        b"GET /api/v1/notify/ws?token=slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    )
    live = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    (first, cut), (second, kept_alive_cut), (third, silent_close) = await asyncio.gather(
        _trickle(port, head),
        _trickle(port, head, first=live),
        _trickle(port, b""),
    )
    assert cut.startswith(b"HTTP/1.1 408") and kept_alive_cut.startswith(b"HTTP/1.1 408")
    assert silent_close == b""
    # Each head would take 50 s at this pace; the cut comes at the timeout, give or
    # take a slow machine.
    assert max(first, second, third) < 8
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{gateway.base}/health/live")).status_code == 200
