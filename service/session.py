"""A connected client: what it says, and its token's clock.

Once ``Node.connect`` registered a client, a :class:`Session` reads it until it
goes away: a v1 client's frames are read and dropped; a v2 client's (``docs/protocol.md``,
"Client frames (v2)") are acks, which settle or delete its notifications, and
refreshes, which move the connection onto a new token. A :class:`TokenClock` holds the
token's timers: ``expiring`` (v2) before ``exp``, and the 4401 close at it.

Nothing here knows the web framework: a session reads through a ``receive``
callable and writes only through its :class:`~service.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import orjson

from .auth import Authenticator, AuthUnavailable, Identity, InvalidToken
from .closecode import CloseCode
from .connection import Connection, StoredRows
from .inbound import (
    Ack,
    BadFrame,
    FrameRate,
    Refresh,
    parse_acked_parameter,
    parse_client_frame,
)
from .metrics import Metrics
from .router import StoreUnavailable
from .status import StatusSink

log = logging.getLogger("notify.session")

# The longest warning ``expiring`` gives before a token's exp, in seconds.
EXPIRING_NOTICE: Final = 60.0

# What a client sent: text, bytes, or None once the connection is gone.
Receive = Callable[[], Awaitable[str | bytes | None]]


def control(kind: str, **fields: object) -> str:
    """A v2 control frame: ``{"type": kind, ...fields}``."""
    return orjson.dumps({"type": kind, **fields}).decode()


def whole_seconds(seconds: float) -> int:
    """``seconds`` as the protocol tells it: whole seconds, rounded up.

    So a time that is not over yet is never told as 0: 0.4 s left is 1, not 0.
    """
    return math.ceil(seconds)


class Clocked(Protocol):
    """What a token's clock does to its connection (``Connection`` in production)."""

    def abort(self, code: CloseCode, reason: str | None = None) -> None: ...

    def send_control(self, frame: str) -> None: ...


class TokenClock:
    """The timers of a connection's token: ``expiring`` (v2) before ``exp``, 4401 at it.

    ``arm`` (again, after a refresh) replaces both; ``cancel`` is idempotent. Both
    are synchronous and must be called on the connection's event loop.
    """

    __slots__ = ("_close", "_connection", "_v2", "_warn")

    def __init__(self, connection: Clocked, *, v2: bool) -> None:
        self._connection = connection
        self._v2 = v2
        self._close: asyncio.TimerHandle | None = None
        self._warn: asyncio.TimerHandle | None = None

    def arm(self, expires_at: float | None, *, close: bool) -> None:
        """Time the token that expires at ``expires_at`` (epoch seconds; None: never).

        ``close``: abort the connection with 4401 at ``exp``. A v2 connection is
        warned ``{"type":"expiring","in_s":N}`` half the remaining lifetime ahead, a
        minute at most; N is that notice in whole seconds rounded up, so at least 1.
        A token with no time left gets no warning, only the close.
        """
        self.cancel()
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        remaining = expires_at - time.time()
        if close:
            self._close = loop.call_later(
                remaining, self._connection.abort, CloseCode.UNAUTHORIZED, "token expired"
            )
        if self._v2 and remaining > 0:
            notice = min(EXPIRING_NOTICE, remaining / 2)
            self._warn = loop.call_later(
                remaining - notice,
                self._connection.send_control,
                control("expiring", in_s=whole_seconds(notice)),
            )

    def cancel(self) -> None:
        for handle in (self._close, self._warn):
            if handle is not None:
                handle.cancel()
        self._close = self._warn = None


async def apply_acked(raw: str, user_id: str, store: StoredRows, status: StatusSink) -> None:
    """Apply a v2 client's ``acked`` query parameter before anything is sent to it.

    The ids are deleted from the user's stored rows in one statement, so the flush
    does not send them again; another user's ids match none of this user's rows. A
    store that is down only means they may be sent again.

    Raises:
        BadFrame: the parameter is malformed (more than 100 ids, or not UUIDs);
            nothing was deleted.
    """
    ids: Sequence[str] = parse_acked_parameter(raw)
    try:
        deleted = await store.delete_acked(user_id, ids)
    except StoreUnavailable as exc:
        log.warning("acked_parameter_not_applied", extra={"error": str(exc)})
        return
    if deleted:
        status.acked(user_id, deleted)


class Session:
    """One registered client, read until it goes away.

    ``read`` arms the token's clock, reads (v1: drops every frame; v2: acks and
    refreshes within the limits) and cancels the clock when it returns, however it
    ends. It never waits on anything but the client, the authenticator (a refresh)
    and the store (an ack).
    """

    __slots__ = (
        "_auth",
        "_clock",
        "_close_on_expiry",
        "_connection",
        "_metrics",
        "_rate",
        "_store",
    )

    def __init__(
        self,
        connection: Connection,
        *,
        auth: Authenticator,
        store: StoredRows,
        metrics: Metrics,
        frame_rate: int,
        close_on_expiry: bool,
    ) -> None:
        self._connection = connection
        self._auth = auth
        self._store = store
        self._metrics = metrics
        self._rate = FrameRate(frame_rate, 2 * frame_rate)
        self._close_on_expiry = close_on_expiry
        self._clock = TokenClock(connection, v2=connection.acks)

    async def read(self, receive: Receive) -> None:
        """Read the client until it goes away or the connection closes.

        An error of the socket ends the read (logged at debug level: a client that
        leaves mid-frame is no fault of the gateway). Cancelling the task cancels the
        token's timers too.
        """
        connection = self._connection
        self._clock.arm(connection.identity.expires_at, close=self._close_on_expiry)
        try:
            if connection.acks:
                await self._read_v2(receive)
            else:
                # v1: the server only sends; client frames are read and dropped (the
                # size limit closes with 1009 in the socket's layer).
                while not connection.closed:
                    if await receive() is None:
                        return
        except Exception as exc:
            log.debug("ws_read_stopped", extra={"error": type(exc).__name__})
        finally:
            self._clock.cancel()

    async def _read_v2(self, receive: Receive) -> None:
        """Read a v2 client's frames: acks and refreshes, within the limits.

        A binary frame or a rate over ``CLIENT_FRAME_RATE`` closes with 1008; a frame
        that is not the protocol's gets an ``error`` frame and changes nothing; a
        refresh with another user's token closes with 4403.
        """
        connection = self._connection
        while not connection.closed:
            message = await receive()
            if message is None:
                return
            if not self._rate.allow():
                self._metrics.connections_rejected.labels("client_frame_rate").inc()
                connection.abort(CloseCode.POLICY_VIOLATION, "too many client frames")
                return
            if not isinstance(message, str):
                connection.abort(CloseCode.POLICY_VIOLATION, "binary frames are not accepted")
                return
            try:
                frame = parse_client_frame(message)
            except BadFrame as exc:
                connection.send_control(control("error", code="bad_frame", message=str(exc)))
                continue
            if isinstance(frame, Ack):
                try:
                    await connection.acknowledge(frame.ids, self._store)
                except StoreUnavailable as exc:
                    # The rows stay, and are sent again on a later connection.
                    log.warning("ack_delete_failed", extra={"error": str(exc)})
                continue
            assert isinstance(frame, Refresh)
            if not await self._refresh(frame.token):
                return

    async def _refresh(self, token: str) -> bool:
        """Move the connection onto ``token``; False once it was closed (another user's).

        A token that is invalid, expired or cannot be checked now is answered with an
        ``error`` frame and changes nothing.
        """
        connection = self._connection
        try:
            refreshed: Identity | None = await self._auth.identify(token)
        except InvalidToken:
            refreshed = None
        except AuthUnavailable as exc:
            log.warning("auth_unavailable", extra={"error": exc.reason})
            connection.send_control(
                control("error", code="unavailable", message="cannot check the token now")
            )
            return True
        now = time.time()
        if refreshed is None or (refreshed.expires_at is not None and refreshed.expires_at <= now):
            connection.send_control(
                control("error", code="invalid_token", message="invalid or expired token")
            )
            return True
        if refreshed.user_id != connection.user_id:
            connection.abort(CloseCode.FORBIDDEN, "token of another user")
            return False
        self._clock.arm(refreshed.expires_at, close=self._close_on_expiry)
        expires_in = (
            None if refreshed.expires_at is None else whole_seconds(refreshed.expires_at - now)
        )
        connection.send_control(control("refreshed", expires_in_s=expires_in))
        return True
