"""A Redis connection for the broker: RESP over an asyncio protocol, parsed by hiredis.

The broker's hot path sends thousands of PUBLISHes per batch and reads bursts of
pub/sub messages. redis-py spends ~11 µs of client CPU per pipelined PUBLISH
here; one packed buffer whose replies are parsed by ``hiredis.Reader`` costs
under 1 µs (``python -m bench.redis_capacity client-cost``). This module is that,
and no more: it speaks RESP2, pipelines, and hands replies over a whole read at
a time.

A :class:`RedisConnection` is used in one of two ways:

- **commands**: :meth:`RedisConnection.call` writes any number of packed
  commands at once and returns their replies in order; calls may overlap (they
  are answered in the order they were written).
- **pub/sub**: after :meth:`RedisConnection.listen`, every reply, a read at a
  time, goes to a callback instead (``message``, ``subscribe``, ``pong``...).

Error replies are returned as ``hiredis.ReplyError`` values, not raised. A
connection that broke, timed out or read garbage is closed for good; its pending
calls raise :class:`RedisUnavailable`, and the owner opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

ReplyError = hiredis.ReplyError


class RedisUnavailable(Exception):
    """The connection to Redis failed, timed out or was closed; nothing in flight is known."""


def pack(*parts: bytes | str | int) -> bytes:
    """One command in RESP, ready to write (several may be concatenated: a pipeline)."""
    encoded = [part if isinstance(part, bytes) else str(part).encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(
        [b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded]
    )


def client_list(reply: Any) -> list[dict[bytes, bytes]]:
    """The connections in a ``CLIENT LIST`` reply, each as its ``field=value`` pairs."""
    if not isinstance(reply, bytes):
        return []
    return [
        dict(field.split(b"=", 1) for field in line.split() if b"=" in field)
        for line in reply.splitlines()
    ]


@dataclass(frozen=True)
class Address:
    """Where Redis is and how to log in, from a ``redis://``, ``rediss://`` or ``unix://`` URL.

    ``redis://[[user]:password@]host[:port][/db]``; ``rediss://`` is the same over
    TLS (certificates checked against the system's CAs);
    ``unix:///path/to/redis.sock[?db=N]``. The password never appears in ``repr``.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""
    db: int = 0
    tls: bool = False
    username: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def parse(cls, url: str) -> Address:
        """Raises ValueError (without the URL, which may hold a password) if malformed."""
        parts = urlsplit(url)
        try:
            if parts.scheme == "unix":
                db = parse_qs(parts.query).get("db", ["0"])[0]
                return cls(
                    path=unquote(parts.path),
                    db=int(db),
                    username=unquote(parts.username or ""),
                    password=unquote(parts.password or ""),
                )
            if parts.scheme not in ("redis", "rediss"):
                raise ValueError
            db_path = parts.path.lstrip("/")
            return cls(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 6379,
                db=int(db_path) if db_path else 0,
                tls=parts.scheme == "rediss",
                username=unquote(parts.username or ""),
                password=unquote(parts.password or ""),
            )
        except ValueError:
            raise ValueError(
                "expected redis://[[user]:password@]host[:port][/db], rediss://... or unix:///path"
            ) from None


class _Call:
    __slots__ = ("future", "left", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.left = count
        self.replies: list[Any] = []


class RedisConnection(asyncio.Protocol):
    """One connection to Redis. Open it with :meth:`open`; ``close()`` is idempotent.

    All methods are called from the event loop's thread; ``send`` and ``call``
    keep the order they were called in.
    """

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._pending: deque[_Call] = deque()
        self._listener: Callable[[list[Any]], None] | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.last_read = self._loop.time()
        self.client_id = 0  # Redis's id of this connection (CLIENT ID), once open

    @classmethod
    async def open(cls, address: Address, *, name: str, wait: float) -> RedisConnection:
        """Connect, log in, select the database, name the client (``CLIENT SETNAME``).

        Raises:
            RedisUnavailable: Redis could not be reached or refused the login within
                ``wait`` seconds (the message never holds the password).
        """
        loop = asyncio.get_running_loop()
        connection = cls()
        try:
            async with asyncio.timeout(wait):
                if address.path:
                    await loop.create_unix_connection(lambda: connection, address.path)
                else:
                    context = ssl.create_default_context() if address.tls else None
                    await loop.create_connection(
                        lambda: connection, address.host, address.port, ssl=context
                    )
                hello = []
                if address.password:
                    login = [address.username] if address.username else []
                    hello.append(pack("AUTH", *login, address.password))
                if address.db:
                    hello.append(pack("SELECT", address.db))
                hello.append(pack("CLIENT", "SETNAME", name))
                hello.append(pack("CLIENT", "ID"))
                replies = await connection.call(b"".join(hello), len(hello), wait)
        except (OSError, TimeoutError) as exc:
            connection.close()
            raise RedisUnavailable(f"cannot connect: {type(exc).__name__}") from None
        except RedisUnavailable:
            connection.close()
            raise
        for reply in replies:
            if isinstance(reply, ReplyError):
                connection.close()
                raise RedisUnavailable(f"refused at login: {str(reply)[:200]}")
        connection.client_id = replies[-1]
        return connection

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    def listen(self, listener: Callable[[list[Any]], None]) -> None:
        """From now on hand every reply to ``listener`` (a list per read), for pub/sub."""
        self._listener = listener

    def send(self, payload: bytes) -> None:
        """Write packed commands whose replies go to the listener. Raises RedisUnavailable."""
        if self._transport is None or self.closed.done():
            raise RedisUnavailable("connection closed")
        self._transport.write(payload)

    async def call(self, payload: bytes, count: int, wait: float) -> list[Any]:
        """Write ``count`` packed commands and return their ``count`` replies, in order.

        Raises:
            RedisUnavailable: the connection broke, or no full answer came within
                ``wait`` seconds (the connection is then closed: a later reply
                could no longer be matched to its command).
        """
        self.send(payload)
        call = _Call(self._loop.create_future(), count)
        self._pending.append(call)
        try:
            return await asyncio.wait_for(call.future, wait)
        except TimeoutError:
            self.close()
            raise RedisUnavailable(f"no reply within {wait:g}s") from None

    def close(self) -> None:
        """Drop the connection now; what is pending raises RedisUnavailable."""
        if self._transport is not None:
            self._transport.abort()
        self._lost("closed")

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(type(exc).__name__ if exc else "closed by Redis")

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        reader = self._reader
        reader.feed(data)
        replies: list[Any] = []
        try:
            reply = reader.gets()
            while reply is not False:
                replies.append(reply)
                reply = reader.gets()
        except hiredis.ProtocolError:
            self.close()
            return
        if not replies:
            return
        if self._listener is not None:
            self._listener(replies)
        else:
            self._answer(replies)

    def _answer(self, replies: list[Any]) -> None:
        pending = self._pending
        at, end = 0, len(replies)
        while at < end:
            if not pending:
                self.close()  # a reply nobody asked for: the stream is out of step
                return
            call = pending[0]
            take = min(call.left, end - at)
            call.replies.extend(replies[at : at + take])
            call.left -= take
            at += take
            if call.left == 0:
                pending.popleft()
                if not call.future.done():
                    call.future.set_result(call.replies)

    def _lost(self, why: str) -> None:
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(RedisUnavailable(f"connection lost: {why}"))
        if not self.closed.done():
            self.closed.set_result(None)
