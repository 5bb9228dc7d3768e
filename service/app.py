"""The Sanic application: the WebSocket endpoint, health, metrics, and the node's lifecycle.

The endpoint only checks the client and plugs its connection into the node;
everything else (routing, storing, flushing) lives in the node's parts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Request, Sanic, Websocket
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, json, raw
from websockets.protocol import State

from .auth import AuthUnavailable, InvalidToken
from .config import Settings
from .connection import (
    FORBIDDEN,
    GOING_AWAY,
    TOO_MANY,
    UNAUTHORIZED,
    UNAVAILABLE,
    Connection,
)
from .demo import add_demo_routes
from .guard import SocketGuard
from .hub import Rejected
from .node import Node, is_ready
from .router import BrokerUnavailable

log = logging.getLogger("notify.app")
access = logging.getLogger("notify.access")

WS_PATH = "/api/v1/notify/ws"


# Past this many bytes waiting in the kernel-bound buffer, frames go through the
# writer task, which waits for the socket to drain. The transport's high-water mark
# (Sanic sets 64 KiB): above it, writes are paused and the socket has no room.
_SEND_NOW_LIMIT = 64 * 1024

# How long a close waits for the client's answer and the end of the TCP connection
# before the socket is aborted: a peer that does not read never answers.
CLOSE_TIMEOUT = 2.0


class SanicSocket:
    """The connection's view of a Sanic WebSocket: Sanic's own ``send``, plus ``send_now``,
    a synchronous write for the common case, and closes that never wait unbounded.

    Sanic's ``send`` takes a lock and awaits the transport for every frame; a push
    gateway writes far more frames than anything else, so when nothing else is being
    sent and the socket's buffer has room, ``send_now`` frames the text with the same
    protocol object and hands it to the transport directly (the real transport, not
    the guard's view of it that Sanic holds).
    """

    __slots__ = ("_guard", "_transport", "_ws")

    def __init__(self, ws: Websocket) -> None:
        self._ws = ws
        self._guard = SocketGuard.of(ws)
        io = ws.io_proto
        self._transport: asyncio.Transport | None = (
            self._guard.transport
            if self._guard is not None
            else io.transport
            if io is not None
            else None
        )

    async def send(self, message: str) -> None:
        await self._ws.send(message)

    def send_now(self, message: str) -> bool:
        ws = self._ws
        transport = self._transport
        if (
            transport is None
            or transport.is_closing()
            or ws.ws_proto.state is not State.OPEN
            or ws.conn_mutex.locked()  # Sanic is sending (a ping, a close): keep its order
            or transport.get_write_buffer_size() > _SEND_NOW_LIMIT
        ):
            return False
        ws.ws_proto.send_text(message.encode())
        for chunk in ws.ws_proto.data_to_send():
            transport.write(chunk)
        return True

    def buffered(self) -> int:
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def on_stall(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` just before the socket is aborted for a write stalled too long."""
        if self._guard is not None:
            self._guard.on_stall = callback

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with the closing handshake, bounded: never waits on a peer that does not read.

        The close frame is written only if the socket has room for it; otherwise the
        socket is aborted at once. Then the client has ``CLOSE_TIMEOUT`` to answer
        and Sanic to end the TCP connection, after which the socket is aborted.
        Idempotent; safe to call while another task sends (Sanic's ``close`` would
        wait for the send, and a paused send waits forever).
        """
        ws, transport = self._ws, self._transport
        if transport is None or transport.is_closing():
            return
        if ws.ws_proto.state is State.OPEN:
            if transport.get_write_buffer_size() > _SEND_NOW_LIMIT:
                transport.abort()
                return
            ws.ws_proto.send_close(code, reason)
            for chunk in ws.ws_proto.data_to_send():
                if chunk:  # b"" means "end of stream": Sanic's closer handles it
                    transport.write(chunk)
        if not await ws.wait_for_connection_lost(timeout=CLOSE_TIMEOUT):
            transport.abort()

    def fail_connection(self, code: int = 1006, reason: str = "") -> bool:
        return bool(self._ws.fail_connection(code, reason))


def token_of(request: Request) -> str | None:
    """The client's token: ``?token=`` first, else ``Authorization: Bearer``."""
    token = request.args.get("token")
    if token:
        return str(token)
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def create_app(
    settings: Settings, *, node: Node | None = None, name: str = "notify_ws"
) -> Sanic[Any, Any]:
    """Build the application around a node (a new one from ``settings`` by default)."""
    app: Sanic[Any, Any] = Sanic(name, configure_logging=False)
    app.config.update(
        {
            "WEBSOCKET_MAX_SIZE": settings.max_client_frame,
            "WEBSOCKET_PING_INTERVAL": settings.ping_interval,
            "WEBSOCKET_PING_TIMEOUT": settings.ping_timeout,
            "GRACEFUL_SHUTDOWN_TIMEOUT": settings.shutdown_timeout,
            "ACCESS_LOG": False,
            "MOTD": False,
            "KEEP_ALIVE_TIMEOUT": 5,
            "REQUEST_MAX_SIZE": 64 * 1024,
        }
    )
    gateway = node or Node(settings)
    app.ctx.node = gateway

    @app.before_server_start
    async def start_node(app: Sanic[Any, Any]) -> None:
        gateway.on_fatal = lambda: stop_failed(app)
        await gateway.start()

    @app.on_response  # type: ignore[untyped-decorator]
    async def log_request(request: Request, response: HTTPResponse) -> None:
        # request.path carries no query string, so no token can reach this line.
        access.info(
            "http_request",
            extra={"method": request.method, "path": request.path, "status": response.status},
        )

    @app.exception(SanicException)
    async def http_error(request: Request, exc: SanicException) -> HTTPResponse:
        # A fixed, short body: never echo the URL (it may hold a token).
        status = getattr(exc, "status_code", 500)
        return json({"error": _STATUS_TEXT.get(status, "error")}, status=status)

    @app.get("/health/live")
    async def live(request: Request) -> HTTPResponse:
        return json({"status": "ok"})

    @app.get("/health/ready")
    async def ready(request: Request) -> HTTPResponse:
        checks = await gateway.readiness()
        ok = is_ready(checks)
        return json(
            {"status": "ok" if ok else "unavailable", "checks": checks}, status=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        gateway.metrics.connections.set(len(gateway.hub))
        return raw(gateway.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    if settings.demo_page:
        add_demo_routes(app)

    @app.websocket(WS_PATH)  # type: ignore[untyped-decorator]
    async def notify(request: Request, ws: Websocket) -> None:
        # From the handshake on, whether it is registered yet or not: reads pause while
        # writes are paused, and a socket with no room for WRITE_TIMEOUT is cut off.
        guard = SocketGuard.install(ws, settings.write_timeout)
        if guard is not None:
            guard.on_stall = gateway.metrics.slow_closed.inc
        await serve_client(gateway, request, ws)

    # Registered after the WebSocket route on purpose: Sanic runs stop listeners in
    # reverse order, so the node drains and closes sockets with 1001 before Sanic
    # cancels the handlers of whatever is left.
    @app.before_server_stop
    async def stop_node(app: Sanic[Any, Any]) -> None:
        await gateway.stop()

    return app


def stop_failed(app: Sanic[Any, Any]) -> None:
    """A background task of the node died: stop, and make the exit status say so.

    In a worker process ``app.stop()`` also tells Sanic's manager to stop every
    worker; the shared flag (made by ``python -m service``) tells the main process
    to exit non-zero. See ``service/__main__.py``.
    """
    failed = getattr(app.shared_ctx, "failed", None)
    if failed is not None:
        failed.value = 1
    app.stop()


async def _reject(node: Node, ws: Websocket, code: int, reason: str, label: str) -> None:
    """Refuse the client with ``code``: the close frame if the socket has room, a bounded
    wait for the client's answer, then abort. Never waits on a client that does not read."""
    node.metrics.connections_rejected.labels(label).inc()
    access.info("ws_rejected", extra={"code": code, "reason": label})
    await SanicSocket(ws).close(code, reason)


async def serve_client(node: Node, request: Request, ws: Websocket) -> None:
    """Check the client, register its connection, write to it until it goes away.

    Order (DESIGN.md §3): check the token, subscribe (with Redis), register, then
    the writer flushes the stored backlog before any live frame.
    """
    settings = node.settings
    if node.stopping:
        await _reject(node, ws, GOING_AWAY, "server shutting down", "shutting_down")
        return
    if settings.allowed_origins:
        origin = (request.headers.get("origin") or "").rstrip("/")
        # Browsers always send Origin; a client without one is not a browser page.
        if origin and origin not in settings.allowed_origins:
            await _reject(node, ws, FORBIDDEN, "origin not allowed", "origin")
            return
    token = token_of(request)
    if token is None:
        await _reject(node, ws, UNAUTHORIZED, "missing token", "missing_token")
        return
    try:
        identity = await node.auth.identify(token)
    except InvalidToken as exc:
        await _reject(node, ws, UNAUTHORIZED, exc.reason[:100], "invalid_token")
        return
    except AuthUnavailable as exc:
        log.warning("auth_unavailable", extra={"error": exc.reason})
        await _reject(
            node, ws, UNAVAILABLE, "auth service unavailable, retry later", "auth_unavailable"
        )
        return
    if identity.expires_at is not None and identity.expires_at <= time.time():
        await _reject(node, ws, UNAUTHORIZED, "token expired", "invalid_token")
        return

    socket = SanicSocket(ws)
    connection = Connection(
        socket,
        identity,
        node.metrics,
        queue_size=settings.send_queue_size,
        on_unsent=node.router.store_soon,
    )
    broker = node.broker
    if broker is not None:
        # Subscribe before registering and flushing: a message published from now
        # on reaches this process, and one published before is in the store.
        try:
            await broker.subscribe(identity.user_id)
        except BrokerUnavailable:
            await _reject(node, ws, UNAVAILABLE, "service unavailable, retry later", "broker")
            return
    try:
        node.hub.register(connection)
    except Rejected as exc:
        if broker is not None:
            broker.unsubscribe(identity.user_id)
        await _reject(node, ws, TOO_MANY, exc.reason, "too_many")
        return
    socket.on_stall(connection.stalled)
    node.metrics.connections_opened.inc()
    node.metrics.connections.set(len(node.hub))
    access.info("ws_open", extra={"connections": len(node.hub)})

    node.start_writer(connection)
    expiry: asyncio.TimerHandle | None = None
    if settings.auth_close_on_expiry and identity.expires_at is not None:
        expiry = asyncio.get_running_loop().call_later(
            identity.expires_at - time.time(), connection.abort, UNAUTHORIZED, "token expired"
        )
    try:
        # The server only sends; client frames are read and dropped (the size
        # limit closes with 1009 inside Sanic).
        while not connection.closed:
            if await ws.recv() is None:
                break
    except Exception as exc:
        log.debug("ws_read_stopped", extra={"error": type(exc).__name__})
    finally:
        # Synchronous on purpose: Sanic may cancel this task when the client
        # leaves, and the connection must still leave the hub and settle its queue.
        node.hub.unregister(connection)
        if broker is not None:
            broker.unsubscribe(identity.user_id)
        node.metrics.connections.set(len(node.hub))
        if expiry is not None:
            expiry.cancel()
        # The writer sees the detach and ends by itself: cancelling it could cut a
        # flush between writing frames and deleting their rows.
        connection.detach()
        access.info("ws_close", extra={"connections": len(node.hub)})


_STATUS_TEXT = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    413: "request too large",
    426: "upgrade required",
    500: "internal error",
    503: "unavailable",
}


def app_from_environment() -> Sanic[Any, Any]:
    """The application of one worker process, configured from its environment.

    Used by ``python -m service`` when it runs several workers: each process
    builds its own node (consumer, hub, broker) from the same variables.
    """
    import os

    from . import logs

    settings = Settings.from_env(os.environ)
    logs.configure(settings.log_level)
    return create_app(settings)
