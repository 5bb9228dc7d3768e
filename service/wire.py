"""The WebSocket of one client after its handshake: our protocol on the transport.

Sanic routes the request and answers the upgrade; from then on the socket is a
:class:`WireSocket`, the transport's protocol, and nothing of Sanic's stays
behind (no handler task, request or keepalive task per connection). Client bytes
go to websockets' sans-I/O ``ServerProtocol``, which parses frames, answers pings,
runs the closing handshake and enforces the size limit (1009); text messages are
assembled and decoded here (bad UTF-8: 1007). The common client frame (complete,
masked, final, text, within the limit) is taken here without the parser
(``WireSocket._parse``); the two hand over at frame boundaries.

A server frame is unmasked and the gateway negotiates no extension, so a frame's
bytes do not depend on the socket: :func:`~service.notification.text_frame` builds
them once per notification and :meth:`WireSocket.send_now` hands them to every recipient's
transport as they are. A socket with an extension is refused by :meth:`Sockets.adopt`.

Hostile clients are bounded, registered or not:

* **One read at a time, in slices.** After each read the transport stops
  reading; the read is parsed ``_SLICE`` bytes per turn of the loop (pongs
  written as they come), then reading resumes. A flood of pings holds the loop
  for one slice at a time, and the gateway owes pongs for one read at most. One
  exception, the common read of a v2 client (its acks): a read of one slice at
  most, on a socket whose messages go to a listener, that needs no answer, is
  parsed at once and reading goes on (the session's frame rate limit bounds it).
* **Reads pause while writes are paused** (the transport's buffer is over its
  high-water mark): a client that sends and never reads fills its own buffers,
  not the gateway's memory. So do messages nobody reads yet (``_INBOX_LIMIT``).
* **No room for ``write_timeout``: cut off.** Writes paused that long abort the
  transport; ``on_stall`` runs first.
* **Silent: cut off.** One timer of :class:`Sockets` pings every socket each
  ``ping_interval``; a socket that has not answered its ping ``ping_timeout``
  later is failed with 1011.
* **Closes are bounded.** :meth:`WireSocket.close` writes the close frame only
  if the socket has room, then waits at most ``CLOSE_TIMEOUT`` for the client's
  answer and the end of the TCP connection, then aborts.

Everything here runs on the socket's event loop; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Final

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

log = logging.getLogger("notify.wire")
# The logger websockets' protocol would look up for each socket (the same one).
_WEBSOCKETS_LOG: Final = logging.getLogger("websockets.server")

# A read is parsed at most this much per turn of the loop: uvloop reads up to 256 kB
# at once, and parsing that many empty pings (and writing their pongs) would hold
# every other socket of the process for about half a second; 4 KiB, some 30 ms.
_SLICE: Final = 4 * 1024

# Past this many bytes waiting in the transport's buffer a frame is not written at
# once (``send_now`` says no): the transport's high-water mark, 64 KiB.
SEND_NOW_LIMIT: Final = 64 * 1024
_HIGH_WATER: Final = 64 * 1024
_LOW_WATER: Final = 16 * 1024

# How long a close waits for the client's answer and the end of the TCP connection
# before the socket is aborted: a peer that does not read never answers.
CLOSE_TIMEOUT: Final = 2.0

# Sockets pinged at a time; a round of pings is spread over half the ping interval.
_PING_SLICE: Final = 100

# Client messages parsed but not yet taken by ``recv`` (or held from the listener):
# past it, reading pauses.
_INBOX_LIMIT: Final = 16

# The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
_MAX_HEAD: Final = 14

# What a listener of the client's messages is given, one complete message at a time.
Listener = Callable[[str | bytes], object]


class SocketClosed(ConnectionError):
    """The socket is closing or closed: nothing more can be sent."""


# The ``ping`` of a socket no round of pings has seen yet.
_NEW: Final = b"new"


def _ping_frame(payload: bytes) -> bytes:
    return bytes((0x89, len(payload))) + payload


class WireSocket(asyncio.Protocol):
    """One client's upgraded socket: the transport's protocol, and the connection's socket.

    Made by :meth:`Sockets.adopt`. ``send_now`` / ``send`` write complete frames
    (built with :func:`~service.notification.text_frame`); ``recv`` gives the
    client's text and binary messages to one reader, if the owner wants them
    (``keep_messages``; otherwise they are parsed and dropped). ``on_lost`` runs
    once, when the connection ends.
    """

    __slots__ = (
        "__weakref__",
        "_drain",
        "_head",
        "_held",
        "_inbox",
        "_invalid",
        "_keep",
        "_listener",
        "_loop",
        "_lost",
        "_message",
        "_on_stall",
        "_owed",
        "_owner",
        "_parser",
        "_rest",
        "_stall",
        "_text",
        "_waiter",
        "on_lost",
        "ping",
        "transport",
        "writing_paused",
    )

    def __init__(
        self, owner: Sockets, transport: asyncio.Transport, parser: ServerProtocol
    ) -> None:
        self._owner = owner
        self._loop = owner.loop
        self.transport = transport
        self._parser = parser
        self._rest = memoryview(b"")
        self._lost = False
        self._stall: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        # Fragments of the text or binary message being received.
        self._message: list[bytes] | None = None
        self._text = False
        self._keep = False
        # Failed with 1007: messages parsed behind the bad one are not delivered.
        self._invalid = False
        self._inbox: deque[str | bytes] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._listener: Listener | None = None
        self._held = False
        # Where the bytes handed to websockets' parser stand against frame boundaries:
        # ``_owed`` more bytes end the frame it is reading; ``_head`` is the start of a
        # header whose frame's length is not known yet. Both empty: at a boundary.
        self._owed = 0
        self._head = b""
        self.writing_paused = False
        self.ping: bytes | None = _NEW
        """The payload of the ping this socket has not answered yet; ``_NEW`` until the
        first round of pings has passed it (its first ping comes one round later)."""
        self._on_stall: Callable[[], object] | None = None
        self.on_lost: Callable[[], object] | None = None
        """Called once, when the connection is lost (closed, aborted, or the client left)."""

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the handshake selected, if any."""
        return self._parser.subprotocol

    @property
    def closed(self) -> bool:
        """Whether the socket is closing or closed: no frame can be sent any more."""
        return self._lost or self._parser.state is not State.OPEN

    def on_stall(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` just before the socket is aborted for a write stalled too long."""
        self._on_stall = callback

    def keep_messages(self) -> None:
        """From now on, keep the client's messages for :meth:`recv` (else they are dropped)."""
        self._keep = True

    def listen(self, listener: Listener) -> None:
        """From now on, give every complete message to ``listener``, synchronously, in order.

        Messages kept so far (``keep_messages``) are given first, at once. ``listener`` runs
        inside the socket's ``data_received``: it must not block; it may close the socket
        (the messages behind are then dropped by the closing handshake), or :meth:`hold`.
        Replaces ``recv``: one or the other.
        """
        self._keep = True
        self._listener = listener
        self.release()

    def hold(self) -> None:
        """Keep the next messages from the listener until :meth:`release` (at most
        ``_INBOX_LIMIT`` of them: then reading pauses). For a message the listener must
        answer asynchronously before it takes the next one."""
        self._held = True

    def release(self) -> None:
        """Give the held messages to the listener, in order, then the next ones as they come.

        A message the listener holds again stops the handing over. Idempotent.
        """
        self._held = False
        inbox = self._inbox
        listener = self._listener
        if not inbox or listener is None:
            return
        full = len(inbox) >= _INBOX_LIMIT
        while inbox and not self._held and not self._lost:
            listener(inbox.popleft())
        if full and len(inbox) < _INBOX_LIMIT:
            self._proceed()

    # Sending.

    def send_now(self, frame: bytes) -> bool:
        """Write ``frame`` at once if the socket is open and its buffer has room.

        False (nothing written) means "use ``send``": closing, or over 64 KiB buffered.
        """
        transport = self.transport
        if (
            self._lost
            or self._parser.state is not State.OPEN
            or transport.get_write_buffer_size() > SEND_NOW_LIMIT
        ):
            return False
        transport.write(frame)
        return True

    def send_many(self, frames: list[bytes]) -> None:
        """Write ``frames`` in one call (the caller waited for room). Raises SocketClosed."""
        if self._lost or self._parser.state is not State.OPEN:
            raise SocketClosed("the socket is closed")
        self.transport.write(b"".join(frames))

    async def send(self, frame: bytes) -> None:
        """Write ``frame`` once the socket has room.

        Raises SocketClosed if the socket closes meanwhile (a socket with no room for
        ``write_timeout`` is aborted, which ends this wait). One sender at a time.
        """
        await self.wait_for_room()
        self.send_many([frame])

    async def wait_for_room(self) -> None:
        """Return once writes are not paused. Raises SocketClosed if the socket closes."""
        while self.writing_paused and not self._lost:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain
        if self._lost or self._parser.state is not State.OPEN:
            raise SocketClosed("the socket is closed")

    def buffered(self) -> int:
        """Bytes handed to the transport that the kernel has not taken yet."""
        return 0 if self._lost else self.transport.get_write_buffer_size()

    def send_ping(self, payload: bytes) -> bool:
        """Ping with ``payload`` if the socket is open and has room; remember it for the pong."""
        if not self.send_now(_ping_frame(payload)):
            return False
        self.ping = payload
        return True

    # Receiving.

    async def recv(self) -> str | bytes | None:
        """The client's next message (``keep_messages`` first); None once the socket closed.

        One reader at a time.
        """
        while True:
            inbox = self._inbox
            if inbox:
                message = inbox.popleft()
                if len(inbox) == _INBOX_LIMIT - 1:
                    self._proceed()
                return message
            if self._lost or self._parser.state is State.CLOSED:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # Closing.

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with the closing handshake, bounded: never waits on a peer that does not read.

        The close frame is written only if the socket has room; otherwise the socket is
        aborted at once. The client then has ``CLOSE_TIMEOUT`` to answer and end the TCP
        connection, after which the socket is aborted. Idempotent; safe to call while
        another task waits to send (that wait ends with SocketClosed).
        """
        if self._lost:
            return
        if self._parser.state is State.OPEN:
            if self.transport.get_write_buffer_size() > SEND_NOW_LIMIT:
                self.transport.abort()
                return
            self._parser.send_close(code, reason)
            self._flush_parser()
        await self._wait_lost()

    def fail_connection(self, code: int = 1006, reason: str = "") -> None:
        """Close at once: the close frame (if the socket has room), then the end of the TCP
        connection, aborted after ``CLOSE_TIMEOUT`` if it has not ended. Idempotent."""
        if self._lost:
            return
        if self.transport.get_write_buffer_size() > SEND_NOW_LIMIT:
            self.transport.abort()
            return
        if self._parser.state is State.OPEN:
            self._parser.fail(code, reason)
            self._flush_parser()
        self._loop.call_later(CLOSE_TIMEOUT, self._abort_if_open)

    async def _wait_lost(self) -> None:
        """Wait up to ``CLOSE_TIMEOUT`` for the connection to end, then abort it."""
        if self._lost:
            return
        waiter = self._loop.create_future()
        previous = self.on_lost

        def lost() -> None:
            if not waiter.done():
                waiter.set_result(None)
            if previous is not None:
                previous()

        self.on_lost = lost
        try:
            await asyncio.wait_for(waiter, CLOSE_TIMEOUT)
        except TimeoutError:
            self.transport.abort()

    def _abort_if_open(self) -> None:
        if not self._lost:
            self.transport.abort()

    # asyncio.Protocol: what the transport calls.

    def data_received(self, data: bytes) -> None:
        if self._listener is not None and len(data) <= _SLICE and not self._rest:
            # A small read of a listened socket (acks, mostly) is parsed at once; reading
            # goes on unless the read made the socket answer (pongs, a close) or filled
            # the held messages: then it waits for the next turn, as any other read.
            self._parse(data)
            if self._flush_parser() or self._parser.state is not State.OPEN:
                self.transport.pause_reading()
                self._loop.call_soon(self._proceed)
            elif self._inbox is not None and len(self._inbox) >= _INBOX_LIMIT:
                self.transport.pause_reading()
            return
        # Read no more until this read is parsed, a slice per turn of the loop.
        self.transport.pause_reading()
        self._rest = memoryview(data)
        self._feed()

    def eof_received(self) -> bool | None:
        self._parser.receive_eof()
        self._flush_parser()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._rest = memoryview(b"")
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._owner.forget(self)
        self._on_stall = None
        # websockets' protocol and its parser (a generator whose frame holds it) refer
        # to each other, as do the parser's last exception and its traceback: cut,
        # they are freed with the socket, not at the next full collection.
        self._parser.parser = None  # type: ignore[assignment]
        self._parser.parser_exc = None
        for future in (self._drain, self._waiter):
            if future is not None and not future.done():
                future.set_result(None)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def pause_writing(self) -> None:
        """The buffer is over its high-water mark: stop reading, start the clock."""
        self.writing_paused = True
        self.transport.pause_reading()
        if self._stall is None:
            self._stall = self._loop.call_later(self._owner.write_timeout, self._stalled)

    def resume_writing(self) -> None:
        """The buffer drained below its low-water mark: wake the sender, read again."""
        self.writing_paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._proceed()

    def _stalled(self) -> None:
        self._stall = None
        if not self.writing_paused or self._lost:
            return
        log.warning("connection_write_timeout", extra={"seconds": self._owner.write_timeout})
        try:
            if self._on_stall is not None:
                self._on_stall()
        finally:
            self.transport.abort()

    # Parsing.

    def _feed(self) -> None:
        """Parse the next slice of the last read; the rest waits for the next turn."""
        rest = self._rest
        self._rest = rest[_SLICE:]
        self._parse(bytes(rest[:_SLICE]))
        self._flush_parser()
        self._loop.call_soon(self._proceed)

    def _parse(self, data: bytes) -> None:
        """Take the frames in ``data``: the common one here, every other through websockets.

        A v2 client's frame is nearly always an ack: a complete, masked, final text frame
        within the size limit. Such a frame is unmasked and delivered here, if the stream
        is at a frame boundary, the socket open and no fragmented message under way.
        Everything else (control frames, fragments, frames over the limit or cut by the
        end of a read, unmasked frames, reserved bits, a closing socket) goes to websockets'
        parser, whole or in pieces, exactly as the bytes came; the two paths hand over at
        frame boundaries, so messages keep their order.
        """
        n = len(data)
        pos = 0
        if self._head:
            head = self._head + data[:_MAX_HEAD]
            start, end = _extent(head, 0)
            if start < 0:
                self._head = head
                self._to_parser(data)
                return
            self._owed = end - len(self._head)
            self._head = b""
        if self._owed:
            pos = min(self._owed, n)
            self._owed -= pos
        parser = self._parser
        limit = parser.max_message_size
        slow = 0  # data[slow:pos] is websockets' to parse
        while pos < n:
            start, end = _extent(data, pos)
            if start < 0:
                self._head = data[pos:]
                break
            if end > n:
                self._owed = end - n
                break
            if (
                data[pos] == 0x81  # final text frame, no reserved bit
                and data[pos + 1] & 0x80  # masked
                and (limit is None or end - start <= limit)
            ):
                if slow < pos:
                    self._to_parser(data[slow:pos])
                slow = end
                if parser.state is State.OPEN and parser.current_size is None:
                    self._deliver(True, apply_mask(data[start:end], data[start - 4 : start]))
                else:
                    self._to_parser(data[pos:end])
            pos = end
        if slow < n:
            self._to_parser(data[slow:])

    def _to_parser(self, data: bytes) -> None:
        """Parse ``data`` with websockets' parser and take the frames it completes."""
        parser = self._parser
        parser.receive_data(data)
        for event in parser.events_received():
            if isinstance(event, Frame):
                self._take(event)

    def _proceed(self) -> None:
        """Go on with the last read, or read again, unless something holds the socket back:
        writes paused, or messages waiting for the reader."""
        if self._lost or self.writing_paused:
            return
        if self._inbox is not None and len(self._inbox) >= _INBOX_LIMIT:
            return
        if self._rest:
            if self.transport.is_closing():
                self._rest = memoryview(b"")
                return
            self._feed()
        elif not self.transport.is_closing():
            self.transport.resume_reading()

    def _take(self, frame: Frame) -> None:
        """One frame from the client: a pong, or a message or a piece of one."""
        opcode = frame.opcode
        data = bytes(frame.data)  # bytes already, as the parser makes frames
        if opcode is Opcode.PONG:
            if data == self.ping:
                self.ping = None
        elif opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._deliver(opcode is Opcode.TEXT, data)
            else:
                self._message = [data]
                self._text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT and self._message is not None:
            # The parser checks the order of fragments and the size of the whole.
            self._message.append(data)
            if frame.fin:
                parts, self._message = self._message, None
                self._deliver(self._text, b"".join(parts))

    def _deliver(self, text: bool, data: bytes) -> None:
        """A complete message: decoded (text: bad UTF-8 fails with 1007), kept or dropped."""
        message: str | bytes = data
        if self._invalid:
            return
        if text:
            try:
                message = data.decode()
            except UnicodeDecodeError as exc:
                self._invalid = True
                self._parser.fail(1007, f"{exc.reason} at position {exc.start}")
                return
        if not self._keep:
            return
        listener = self._listener
        if listener is not None and not self._held and not self._inbox:
            listener(message)
            return
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush_parser(self) -> bool:
        """Write what the parser has to send (pongs, closes); close the TCP connection
        when it says the stream ends. Whether there was anything."""
        parser = self._parser
        transport = self.transport
        sent = parser.data_to_send()
        for data in sent:
            if data:
                transport.write(data)
            elif not transport.is_closing():
                # The server ends the TCP connection after the closing handshake (or a
                # failure); what is buffered is written first, within CLOSE_TIMEOUT.
                transport.close()
                self._loop.call_later(CLOSE_TIMEOUT, self._abort_if_open)
        if parser.state is State.CLOSED or parser.close_expected():
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return bool(sent)


def _extent(data: bytes, pos: int) -> tuple[int, int]:
    """Where the payload of the frame at ``data[pos]`` starts and where the frame ends;
    (-1, -1) while its header is incomplete."""
    n = len(data)
    if n - pos < 2:
        return -1, -1
    second = data[pos + 1]
    length = second & 0x7F
    start = pos + 2
    if length == 126:
        if n - pos < 4:
            return -1, -1
        length = int.from_bytes(data[pos + 2 : pos + 4])
        start += 2
    elif length == 127:
        if n - pos < 10:
            return -1, -1
        length = int.from_bytes(data[pos + 2 : pos + 10])
        start += 8
    if second & 0x80:
        start += 4
    return start, start + length


class Sockets:
    """The upgraded sockets of this process: their shared ping timer, and their shutdown.

    ``start`` arms the timer (in the loop that serves the sockets); ``close``
    closes every socket, e.g. with 1001 on shutdown. Both idempotent.
    """

    __slots__ = (
        "_loop",
        "_open",
        "_timer",
        "max_size",
        "ping_interval",
        "ping_timeout",
        "write_timeout",
    )

    def __init__(
        self,
        *,
        write_timeout: float,
        ping_interval: float | None,
        ping_timeout: float | None,
        max_size: int | None,
    ) -> None:
        self.write_timeout = write_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_size = max_size
        self._open: set[WireSocket] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._open)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop of the sockets (the running one, from the first ``start`` or ``adopt``)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def start(self) -> None:
        """Arm the ping timer on the running loop. Idempotent."""
        if self._timer is None and self.ping_interval:
            self._timer = self.loop.call_later(self.ping_interval, self._ping_all)

    def parser(self, subprotocols: list[str] | None) -> ServerProtocol:
        """websockets' protocol for a handshake: the size limit, the subprotocols, no extension."""
        return ServerProtocol(
            max_size=self.max_size,
            subprotocols=subprotocols,  # type: ignore[arg-type]
            state=State.OPEN,
            # Given, not looked up: logging.getLogger takes a lock on every call.
            logger=_WEBSOCKETS_LOG,
        )

    def adopt(self, transport: asyncio.Transport, parser: ServerProtocol) -> WireSocket:
        """Make ``transport`` (its handshake answered) a :class:`WireSocket`.

        Raises ValueError if the handshake negotiated an extension: frames built once
        for every socket would then be wrong on this one.
        """
        if parser.extensions:
            raise ValueError("an extension was negotiated")
        socket = WireSocket(self, transport, parser)
        transport.set_write_buffer_limits(high=_HIGH_WATER, low=_LOW_WATER)
        transport.set_protocol(socket)
        if transport.is_closing():
            socket._lost = True
            return socket
        self._open.add(socket)
        if transport.get_write_buffer_size() > _HIGH_WATER:
            socket.pause_writing()
        transport.resume_reading()
        return socket

    def forget(self, socket: WireSocket) -> None:
        self._open.discard(socket)

    async def close(self, code: int, reason: str) -> None:
        """Close every open socket with ``code`` (bounded: ``WireSocket.close``)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sockets = list(self._open)
        if sockets:
            await asyncio.gather(
                *(socket.close(code, reason) for socket in sockets), return_exceptions=True
            )

    def _ping_all(self) -> None:
        """A round of pings: every socket that answered its last ping is pinged again;
        those that did not are failed by the check of that ping.

        The round is spread over the first half of the interval, ``_PING_SLICE`` sockets
        at a time: each ping is a write and each pong a read to parse, and 10,000 of
        them at once would hold every notification of the process for a few hundred
        milliseconds.
        """
        interval = self.ping_interval
        assert interval
        self._timer = self.loop.call_later(interval, self._ping_all)
        sockets = list(self._open)
        slices = -(-len(sockets) // _PING_SLICE)
        payload = os.urandom(4)
        self._ping_slice(sockets, 0, payload)
        step = interval / 2 / max(slices, 1)
        for index in range(1, slices):
            self.loop.call_later(
                index * step, self._ping_slice, sockets, index * _PING_SLICE, payload
            )

    def _ping_slice(self, sockets: list[WireSocket], start: int, payload: bytes) -> None:
        """Ping ``sockets[start:start + _PING_SLICE]`` (those still open)."""
        pinged: list[WireSocket] = []
        for socket in sockets[start : start + _PING_SLICE]:
            if socket.ping is _NEW:
                # Opened since the last round: pinged from the next one, so a socket is
                # first pinged 1-2 intervals after its handshake, never at once.
                socket.ping = None
                continue
            if socket.ping is not None or socket.closed:
                continue  # still waiting (its own check fails it), or gone
            if socket.send_ping(payload):
                pinged.append(socket)
        if pinged and self.ping_timeout is not None:
            self.loop.call_later(self.ping_timeout, _check_pongs, pinged, payload)


def _check_pongs(pinged: list[WireSocket], payload: bytes) -> None:
    """Fail, with 1011, each socket still owing the pong for ``payload``."""
    for socket in pinged:
        if socket.ping == payload and not socket.closed:
            socket.fail_connection(1011, "keepalive ping timeout")
        elif socket.ping == payload:
            socket.ping = None
