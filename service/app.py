"""The Sanic application: the WebSocket endpoint, health, metrics, and the node's lifecycle.

The endpoint only checks the client and plugs its connection into the node;
everything else (routing, storing, flushing) lives in the node's parts.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import unquote_plus

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Request, Sanic
from sanic.exceptions import RequestCancelled, SanicException
from sanic.response import HTTPResponse, json, raw
from websockets.datastructures import Headers
from websockets.http11 import Request as HandshakeRequest

from .auth import AuthUnavailable, Identity, InvalidToken, Unauthenticated
from .closecode import CloseCode
from .config import Settings
from .demo import add_demo_routes
from .heads import HeadDeadlineProtocol
from .hub import Rejected
from .inbound import SUBPROTOCOL, BadFrame
from .node import Node, is_ready
from .router import BrokerUnavailable
from .session import Session, TokenClock, apply_acked
from .upgrade import accept_head, offered_subprotocols, select_subprotocol
from .wire import Sockets, WireSocket

log = logging.getLogger("notify.app")
access = logging.getLogger("notify.access")

WS_PATH = "/api/v1/notify/ws"


class _Gateway(Sanic):  # type: ignore[type-arg]
    """Sanic for routing and the upgrade; the socket itself is ours from the handshake on.

    A plainly valid upgrade request is answered from a template
    (:func:`~service.upgrade.accept_head`); any other gets websockets'
    ``ServerProtocol.accept``, as in Sanic, with its checks and error answers. The
    socket then becomes a :class:`~service.wire.WireSocket` on the transport instead
    of Sanic's WebSocket: Sanic's protocol lets go of the transport, its handler
    task ends once the client is checked and registered, and an idle connection
    costs only the transport, the ``WireSocket`` with its parser, and its
    ``Connection``. The route's handler is called with the ``WireSocket``.

    Given a route's subprotocols, the handshake refuses a client that offers none
    with HTTP 400, which would turn every v1 client away; here they are narrowed,
    per request, to those the client offered, so ``notify.v2`` is selected whenever
    it is offered and nothing is asked otherwise.
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

    @staticmethod
    def _narrowed(request: Request, subprotocols: list[str] | None) -> list[str] | None:
        """The route's subprotocols that the client offered (None: none of them)."""
        asked = request.headers.getall("sec-websocket-protocol", None)
        if not asked or not subprotocols:  # most clients (v1) offer none
            return None
        offered = {name.strip() for header in asked for name in header.split(",")}
        return [name for name in subprotocols if name in offered] or None

    async def _websocket_handler(  # type: ignore[no-untyped-def]
        self, handler, request, *args, subprotocols=None, **kwargs
    ):
        sockets: Sockets = self.ctx.sockets
        offered = offered_subprotocols(request.headers)
        head = None
        if offered is not None:
            chosen = select_subprotocol(subprotocols or (), offered)
            head = accept_head(request.method, request.version, request.headers, chosen)
        if head is not None:
            # A plainly valid request (service/upgrade.py): answered from a template.
            parser = sockets.parser([chosen] if chosen else None)
            parser.subprotocol = chosen  # type: ignore[assignment]
        else:
            # Anything else gets websockets' checks and its error answers.
            parser = sockets.parser(self._narrowed(request, subprotocols))
            answer = parser.accept(
                HandshakeRequest(path=request.path, headers=Headers(request.headers))
            )
            if answer.status_code != 101:
                raise SanicException(bytes(answer.body), status_code=answer.status_code)
            head = (
                f"HTTP/1.1 101 {answer.reason_phrase}\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in answer.headers.raw_items())
                + "\r\n"
            ).encode()
        transport = request.transport
        sanic_side = transport.get_protocol()
        transport.write(head)
        socket = sockets.adopt(transport, parser)
        # Sanic's protocol no longer owns the socket: its connection task ends with
        # the handler without closing the transport, and its graceful shutdown does
        # not wait for it (``Sockets.close`` closes what is left, with 1001).
        sanic_side.connections.discard(sanic_side)
        sanic_side.transport = None
        # Whatever the client sent right behind its request head is the socket's.
        early = getattr(sanic_side, "recv_buffer", None)
        if early:
            data = bytes(early)
            early.clear()
            socket.data_received(data)
        try:
            await handler(request, socket, *args, **kwargs)
        except Exception:
            log.exception("websocket_handler_failed")
            socket.fail_connection(CloseCode.INTERNAL_ERROR, CloseCode.INTERNAL_ERROR.reason)
        finally:
            # Sanic's HTTP stream refers to itself (its response method, set for the
            # upgrade): cut, it is freed with the request as the handler ends.
            if request.stream is not None:
                request.stream.response_func = None


async def _authenticate(node: Node, ws: WireSocket, token: str) -> Identity | None:
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
    token = _query_token(request.query_string)
    if token:
        return token
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _query_token(query: str) -> str | None:
    """The first non-empty ``token`` of a query string, decoded as ``request.args`` would.

    ``request.args`` (``urllib.parse.parse_qs``) decodes and keeps every parameter of
    every request; the endpoint needs one. Same rules: ``&``-separated, ``+`` a space,
    percent-escapes decoded as UTF-8 (bad bytes replaced), empty values skipped.
    """
    for part in query.split("&"):
        name, equals, value = part.partition("=")
        if not equals or not value:
            continue
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if name == "token":
            return unquote_plus(value, errors="replace")
    return None


def behind_proxies(app: Sanic[Any, Any]) -> bool:
    """Whether Sanic is told to take client addresses from forwarding headers
    (``PROXIES_COUNT``, ``FORWARDED_SECRET`` or ``REAL_IP_HEADER``)."""
    config = app.config
    return bool(config.PROXIES_COUNT or config.FORWARDED_SECRET or config.REAL_IP_HEADER)


def client_address(request: Request, proxied: bool) -> str:
    """The address the per-address bound counts: the TCP peer's, or, when ``proxied``
    (:func:`behind_proxies`), the one the proxies name (``request.client_ip``).

    Not proxied, ``request.client_ip`` is the peer's address too, found only after
    parsing the forwarding headers for nothing.
    """
    return str(request.client_ip) if proxied else str(request.ip)


def create_app(
    settings: Settings, *, node: Node | None = None, name: str = "notify_ws"
) -> Sanic[Any, Any]:
    """Build the application around a node (a new one from ``settings`` by default)."""
    app: Sanic[Any, Any] = _Gateway(name, configure_logging=False)
    app.config.update(
        {
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
    sockets = Sockets(
        write_timeout=settings.write_timeout,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        max_size=settings.max_client_frame,
    )
    app.ctx.sockets = sockets
    unauthenticated = Unauthenticated(
        settings.max_unauthenticated, settings.max_unauthenticated_per_address, gateway.metrics
    )
    proxied = behind_proxies(app)

    @app.before_server_start
    async def start_node(app: Sanic[Any, Any]) -> None:
        gateway.on_fatal = lambda: stop_failed(app)
        await gateway.start()
        sockets.start()

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
        return raw(gateway.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    if settings.demo_page:
        add_demo_routes(app)

    @app.websocket(WS_PATH, subprotocols=[SUBPROTOCOL])  # type: ignore[untyped-decorator]
    async def notify(request: Request, ws: WireSocket) -> None:
        # From the handshake on, registered or not, a socket with no room for
        # WRITE_TIMEOUT is cut off (``service.wire``); counted as a slow client.
        ws.on_stall(gateway.metrics.slow_closed.inc)
        if ws.subprotocol == SUBPROTOCOL:
            ws.keep_messages()  # an early ack waits for the session to listen
        await serve_client(gateway, request, ws, unauthenticated, proxied=proxied)

    # Registered after the WebSocket route on purpose: Sanic runs stop listeners in
    # reverse order, so the node drains and closes its connections with 1001, then
    # the sockets not registered yet are closed with 1001 too.
    @app.before_server_stop
    async def stop_node(app: Sanic[Any, Any]) -> None:
        await gateway.stop()
        await sockets.close(CloseCode.GOING_AWAY, CloseCode.GOING_AWAY.reason)

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


async def _reject(node: Node, ws: WireSocket, code: CloseCode, reason: str, label: str) -> None:
    """Refuse the client with ``code``: the close frame if the socket has room, a bounded
    wait for the client's answer, then abort. Never waits on a client that does not read."""
    node.metrics.connections_rejected.labels(label).inc()
    access.info("ws_rejected", extra={"code": code, "reason": label})
    await ws.close(code, reason)


async def serve_client(
    node: Node,
    request: Request,
    ws: WireSocket,
    unauthenticated: Unauthenticated,
    *,
    proxied: bool = False,
) -> None:
    """Check the client and plug it into the node; return once it is registered.

    From then on a v1 connection needs no task: the socket parses and drops what
    the client sends and calls ``Node.disconnect`` when it is lost; only its token's
    clock (:class:`~service.session.TokenClock`) is armed. Nor does a v2 client: its
    socket hands each message to its :class:`~service.session.Session` as it parses
    it; the socket's end disconnects it.

    The checks (origin, token, identity, a v2 client's ``acked``) are this adapter's;
    what happens on connect (subscribe, register, flush) and on disconnect is
    ``Node.connect``'s and ``Node.disconnect``'s.

    Before its token is checked a socket is one of ``unauthenticated``: over their
    total, or over their number from its client address, it is closed with 4503 at
    once (retry later), without asking the auth service. Its address is the TCP
    peer's, or with ``proxied`` the one Sanic finds in the forwarding headers.
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
    address = client_address(request, proxied)
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
    if identity is None or ws.closed:
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
    if ws.closed:
        return

    # The identity is known: the node subscribes, registers and starts the writer.
    try:
        connection = await node.connect(ws, identity, acks=v2)
    except BrokerUnavailable:
        await _reject(node, ws, CloseCode.UNAVAILABLE, "service unavailable, retry later", "broker")
        return
    except Rejected as exc:
        await _reject(node, ws, CloseCode.TOO_MANY, exc.reason, "too_many")
        return
    access.info("ws_open", extra={"connections": len(node.hub), "v2": v2})

    def gone() -> None:
        # Synchronous: the node forgets the connection the moment its socket is lost.
        node.disconnect(connection)
        access.info("ws_close", extra={"connections": len(node.hub)})

    if v2:
        # v2: no task either; the socket hands each client message to the session
        # as it parses it (``Session.take``).
        session = Session(
            connection,
            auth=node.auth,
            store=node.store,
            metrics=node.metrics,
            frame_rate=settings.client_frame_rate,
            close_on_expiry=settings.auth_close_on_expiry,
        )

        def gone_v2() -> None:
            session.close()
            gone()

        if ws.closed:
            gone_v2()
            return
        ws.on_lost = gone_v2
        session.start(ws)
        return
    # v1: the server only sends, and the socket parses and drops what the client sends
    # (over MAX_CLIENT_FRAME: 1009): no task, only the token's clock and the socket's
    # call when it is lost.
    clock = TokenClock(connection, v2=False)
    clock.arm(identity.expires_at, close=settings.auth_close_on_expiry)

    def gone_v1() -> None:
        clock.cancel()
        gone()

    if ws.closed:
        gone_v1()
    else:
        ws.on_lost = gone_v1


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
