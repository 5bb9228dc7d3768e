"""A connected client: what it says, and its token's clock.

Once ``Node.connect`` registered a v2 client, a :class:`Session` takes what it says
until it goes away (``docs/protocol.md``, "Client frames (v2)"): acks, which settle
or delete its notifications, and refreshes, which move the connection onto a new
token. A :class:`TokenClock` holds the token's timers: ``expiring`` (v2) before
``exp``, and the 4401 close at it.

A client frame costs no task and no future: its socket hands each complete message
to :meth:`Session.take` synchronously, as it parses it. An ack is settled there and
then. A refresh waits for the auth service: the session holds the socket's next
messages meanwhile (reading pauses once a few wait) and takes them, in order, when
the refresh is answered.

Nothing here knows the web framework: a session reads from a :class:`Source` and
writes only through its :class:`~service.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, Protocol

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


class Source(Protocol):
    """Where a session's client messages come from (``service.wire.WireSocket``)."""

    def listen(self, listener: Callable[[str | bytes], object]) -> None:
        """Give every complete message to ``listener``, synchronously, in order."""
        ...

    def hold(self) -> None:
        """Keep the next messages from the listener until ``release``."""
        ...

    def release(self) -> None:
        """Give the held messages, in order, then the next ones as they come."""
        ...


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
    """One registered client, taken frame by frame until it goes away.

    ``start`` arms the token's clock and, for a v2 client, listens to its socket;
    ``close`` (the socket is lost) cancels the clock and any refresh under way,
    idempotent. A v1 client's frames are parsed and dropped by its socket (the size
    limit closes with 1009 there): its session is only the clock. Everything runs on
    the connection's event loop.
    """

    __slots__ = (
        "_answering",
        "_auth",
        "_clock",
        "_close_on_expiry",
        "_connection",
        "_metrics",
        "_rate",
        "_source",
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
        self._source: Source | None = None
        # The frame being answered asynchronously (a refresh), while the source holds.
        self._answering: asyncio.Task[None] | None = None

    def start(self, source: Source) -> None:
        """Arm the token's clock; take a v2 client's messages from ``source`` from now on
        (those it kept so far first)."""
        connection = self._connection
        self._clock.arm(connection.identity.expires_at, close=self._close_on_expiry)
        if connection.acks:
            self._source = source
            source.listen(self.take)

    def close(self) -> None:
        """The client went away: stop the clock and any answer under way. Idempotent."""
        self._clock.cancel()
        self._source = None
        answering, self._answering = self._answering, None
        if answering is not None:
            answering.cancel()

    def take(self, message: str | bytes) -> None:
        """One complete message of a v2 client: an ack or a refresh, within the limits.

        The worst a client can send: a binary frame, or a rate over
        ``CLIENT_FRAME_RATE``, closes with 1008; a frame that is not the protocol's
        (not JSON, unknown type, over 500 ids, an id that is no UUID) gets an ``error``
        frame and changes nothing; ids of other users settle nothing; a refresh with
        another user's token closes with 4403. Never raises; synchronous (a refresh
        is answered by a task, the source holding the next messages meanwhile).
        """
        connection = self._connection
        if connection.closed:
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
            return
        if isinstance(frame, Ack):
            rest = connection.settle_acks(frame.ids)
            if rest:  # no batched deletes: one statement of its own, in turn
                self._answer(self._delete(rest))
            return
        assert isinstance(frame, Refresh)
        self._answer(self._refresh(frame.token))

    def _answer(self, answer: Coroutine[Any, Any, bool]) -> None:
        """Answer a frame asynchronously; the client's next frames wait for the answer."""
        source = self._source
        if source is None:
            answer.close()
            return
        source.hold()
        self._answering = asyncio.get_running_loop().create_task(
            self._answered(answer, source), name="v2-answer"
        )

    async def _answered(self, answer: Coroutine[Any, Any, bool], source: Source) -> None:
        try:
            go_on = await answer
        except Exception as exc:
            log.error("client_frame_answer_failed", exc_info=exc)
            go_on = True
        if self._answering is asyncio.current_task():
            self._answering = None
        if go_on and not self._connection.closed and self._source is source:
            source.release()

    async def _delete(self, message_ids: list[str]) -> bool:
        """Delete acknowledged stored rows here (without batched deletes)."""
        try:
            await self._connection.delete_acked(message_ids, self._store)
        except StoreUnavailable as exc:
            # The rows stay, and are sent again on a later connection.
            log.warning("ack_delete_failed", extra={"error": str(exc)})
        return True

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
