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
from sanic.exceptions import RequestCancelled, SanicException
from sanic.response import HTTPResponse, json, raw
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from .auth import AuthUnavailable, Identity, InvalidToken, Unauthenticated
from .closecode import CloseCode
from .config import Settings
from .demo import add_demo_routes
from .guard import SocketGuard
from .heads import HeadDeadlineProtocol
from .hub import Rejected
from .inbound import SUBPROTOCOL, BadFrame
from .node import Node, is_ready
from .router import BrokerUnavailable
from .session import Session, apply_acked

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

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
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


class _Gateway(Sanic):  # type: ignore[type-arg]
    """Sanic, selecting a subprotocol only when the client offers it.

    Given a route's subprotocols, the handshake (``websockets``) refuses a client
    that offers none with HTTP 400, which would turn every v1 client away; here a
    route's subprotocols are narrowed, per request, to those the client offered, so
    ``notify.v2`` is selected whenever it is offered and nothing is asked otherwise.
    """

    def prepare(self, *args: Any, protocol: type[Any] | None = None, **kwargs: Any) -> None:
        # Every way of serving (app.run, workers) goes through here: the request head's
        # deadline comes with the protocol (service/heads.py).
        super().prepare(*args, protocol=protocol or HeadDeadlineProtocol, **kwargs)

    async def create_server(
        self, *args: Any, protocol: type[Any] | None = None, **kwargs: Any
    ) -> Any:
        return await super().create_server(
            *args, protocol=protocol or HeadDeadlineProtocol, **kwargs
        )

    async def _websocket_handler(  # type: ignore[no-untyped-def]
        self, handler, request, *args, subprotocols=None, **kwargs
    ):
        # Sanic's own, less its websocket.handler.* signals: nothing here listens to
        # them, and each dispatch of a signal nobody registered costs a failed route
        # lookup (two per connection). The handler still runs as a task Sanic cancels
        # when the server stops.
        chosen = None
        asked = request.headers.getall("sec-websocket-protocol", None)
        if asked and subprotocols:  # most clients (v1) offer none: nothing to compare
            offered = {name.strip() for header in asked for name in header.split(",")}
            chosen = tuple(name for name in subprotocols if name in offered) or None
        ws = await request.transport.get_protocol().websocket_handshake(request, chosen)
        task = asyncio.ensure_future(handler(request, ws, *args, **kwargs))
        self.websocket_tasks.add(task)
        cancelled = False
        try:
            await task
        except (asyncio.CancelledError, ConnectionClosed):
            cancelled = True
        except Exception as exc:
            self.error_handler.log(request, exc)
        finally:
            self.websocket_tasks.remove(task)
            if cancelled:
                ws.end_connection(1000)
            else:
                await ws.close()


async def _authenticate(node: Node, ws: Websocket, token: str) -> Identity | None:
    """The identity behind ``token``; None once the client was refused (4401 / 4503)."""
    try:
        identity = await node.auth.identify(token)
    except InvalidToken as exc:
        await _reject(node, ws, CloseCode.UNAUTHORIZED, exc.reason[:100], "invalid_token")
        return None
    except AuthUnavailable as exc:
        log.warning("auth_unavailable", extra={"error": exc.reason})
        await _reject(
            node,
            ws,
            CloseCode.UNAVAILABLE,
            "auth service unavailable, retry later",
            "auth_unavailable",
        )
        return None
    if identity.expires_at is not None and identity.expires_at <= time.time():
        await _reject(node, ws, CloseCode.UNAUTHORIZED, "token expired", "invalid_token")
        return None
    return identity


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
    app: Sanic[Any, Any] = _Gateway(name, configure_logging=False)
    app.config.update(
        {
            "WEBSOCKET_MAX_SIZE": settings.max_client_frame,
            "WEBSOCKET_PING_INTERVAL": settings.ping_interval,
            "WEBSOCKET_PING_TIMEOUT": settings.ping_timeout,
            "GRACEFUL_SHUTDOWN_TIMEOUT": settings.shutdown_timeout,
            "ACCESS_LOG": False,
            "MOTD": False,
            "KEEP_ALIVE_TIMEOUT": 5,
            # Sanic's REQUEST_TIMEOUT restarts with every byte received; the protocol
            # (service/heads.py) also bounds a whole request head by it, however it
            # trickles in.
            "REQUEST_TIMEOUT": settings.handshake_timeout,
            "REQUEST_MAX_SIZE": 64 * 1024,
            # Behind N proxies that append to X-Forwarded-For, request.client_ip is the
            # client's address, which the per-address limit counts.
            "PROXIES_COUNT": settings.proxies_count or None,
        }
    )
    gateway = node or Node.build(settings)
    app.ctx.node = gateway
    unauthenticated = Unauthenticated(
        settings.max_unauthenticated, settings.max_unauthenticated_per_address, gateway.metrics
    )

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

    @app.exception(RequestCancelled)  # type: ignore[arg-type]  # a CancelledError
    async def head_too_slow(request: Request, exc: RequestCancelled) -> HTTPResponse:
        # The handshake deadline cut a request head that was still arriving (or the
        # client left, and nobody reads this answer).
        return json({"error": "request timeout"}, status=408)

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

    @app.websocket(WS_PATH, subprotocols=[SUBPROTOCOL])  # type: ignore[untyped-decorator]
    async def notify(request: Request, ws: Websocket) -> None:
        # From the handshake on, whether it is registered yet or not: reads pause while
        # writes are paused, and a socket with no room for WRITE_TIMEOUT is cut off.
        guard = SocketGuard.install(ws, settings.write_timeout)
        if guard is not None:
            guard.on_stall = gateway.metrics.slow_closed.inc
        await serve_client(gateway, request, ws, unauthenticated)

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


async def _reject(node: Node, ws: Websocket, code: CloseCode, reason: str, label: str) -> None:
    """Refuse the client with ``code``: the close frame if the socket has room, a bounded
    wait for the client's answer, then abort. Never waits on a client that does not read."""
    node.metrics.connections_rejected.labels(label).inc()
    access.info("ws_rejected", extra={"code": code, "reason": label})
    await SanicSocket(ws).close(code, reason)


async def serve_client(
    node: Node, request: Request, ws: Websocket, unauthenticated: Unauthenticated
) -> None:
    """Check the client, plug it into the node, read from it until it goes away.

    The checks (origin, token, identity, a v2 client's ``acked``) are this adapter's;
    what happens on connect (subscribe, register, flush) and on disconnect is
    ``Node.connect``'s and ``Node.disconnect``'s; what the client says, and its
    token's clock, are its :class:`~service.session.Session`'s.

    Before its token is checked a socket is one of ``unauthenticated``: over their
    total, or over their number from its client address, it is closed with 4503 at
    once (retry later), without asking the auth service.
    """
    settings = node.settings
    if node.stopping:
        await _reject(node, ws, CloseCode.GOING_AWAY, CloseCode.GOING_AWAY.reason, "shutting_down")
        return
    if settings.allowed_origins:
        origin = (request.headers.get("origin") or "").rstrip("/")
        # Browsers always send Origin; a client without one is not a browser page.
        if origin and origin not in settings.allowed_origins:
            await _reject(node, ws, CloseCode.FORBIDDEN, CloseCode.FORBIDDEN.reason, "origin")
            return
    token = token_of(request)
    if token is None:
        await _reject(node, ws, CloseCode.UNAUTHORIZED, "missing token", "missing_token")
        return
    address = request.client_ip
    match unauthenticated.enter(address):
        case "total":
            await _reject(
                node,
                ws,
                CloseCode.UNAVAILABLE,
                "too many clients connecting, retry later",
                "unauthenticated",
            )
            return
        case "address":
            await _reject(
                node,
                ws,
                CloseCode.UNAVAILABLE,
                "too many clients connecting from this address, retry later",
                "unauthenticated_per_address",
            )
            return
    try:
        identity = await _authenticate(node, ws, token)
    finally:
        unauthenticated.leave(address)
    if identity is None:
        return
    v2 = ws.subprotocol == SUBPROTOCOL
    acked = request.args.get("acked") if v2 else None
    if acked is not None:
        try:
            await apply_acked(str(acked), identity.user_id, node.store, node.router.status)
        except BadFrame:
            await _reject(
                node, ws, CloseCode.POLICY_VIOLATION, "malformed acked parameter", "bad_acked"
            )
            return

    # The identity is known: the node subscribes, registers and starts the writer.
    try:
        connection = await node.connect(SanicSocket(ws), identity, acks=v2)
    except BrokerUnavailable:
        await _reject(node, ws, CloseCode.UNAVAILABLE, "service unavailable, retry later", "broker")
        return
    except Rejected as exc:
        await _reject(node, ws, CloseCode.TOO_MANY, exc.reason, "too_many")
        return
    access.info("ws_open", extra={"connections": len(node.hub), "v2": v2})
    session = Session(
        connection,
        auth=node.auth,
        store=node.store,
        metrics=node.metrics,
        frame_rate=settings.client_frame_rate,
        close_on_expiry=settings.auth_close_on_expiry,
    )
    try:
        await session.read(ws.recv)
    finally:
        # Synchronous, so it completes even when Sanic cancels this task.
        node.disconnect(connection)
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
