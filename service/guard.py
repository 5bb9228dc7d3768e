"""Back-pressure for one client socket, between its transport and Sanic's protocol.

A WebSocket server must answer every ping with a pong, so a client that sends
pings and never reads makes the server write whatever it reads. Left alone,
Sanic parses each read at once and leaves the pongs to a task; the transport
reads on while those tasks wait their turn (or wait for room in a full write
buffer): memory grows without bound, and Sanic's keepalive ping and ``close()``
wait forever for room that never comes. The guard stands in the middle from the
handshake on:

* to the transport it is the protocol. It reads one chunk at a time and hands
  it to Sanic in slices, one per turn of the loop: reading resumes once the
  task Sanic made for the last slice has had its turn. It
  sees the write buffer fill (``pause_writing``) and drain (``resume_writing``):
  while writes are paused, reading is paused too, so the client can send no
  more than the kernel buffers hold;
* to Sanic it is the transport (``_SanicSide``): Sanic pausing and resuming
  reading (its frame assembler does, when no one waits for a message) is
  combined with the guard's, so Sanic cannot resume reading while writes are
  paused;
* writes paused for longer than ``WRITE_TIMEOUT`` cut the socket off
  (``transport.abort()``), registered or not, whether a notification is being
  written or only a pong or a ping: ``on_stall`` runs first (a registered
  connection closes with 1013 and stores again what its buffer held).

The transport aborted, every task that waited on the socket ends: the
connection is lost, Sanic's protocol resumes its blocked writers, which fail,
and cancels the handler. Frames go around the guard: ``SanicSocket.send_now``
writes to the real transport, so the guard costs nothing per frame sent.

Once the connection is lost, the guard also takes apart what the socket leaves
behind (:func:`_unlink`). Sanic's objects of a WebSocket refer to each other in
cycles (protocol and WebSocket, WebSocket and its frame assembler, the HTTP
stream and its own response method, websockets' parser and its protocol): freed
only by the cyclic garbage collector, which the node runs rarely (``_tune_gc`` in
``service/node.py``), each closed socket would stay in memory with its request
and headers, 10-16 KB, long after it left. Unlinked, they are freed the moment
the last task that used them ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sanic import Websocket

log = logging.getLogger("notify.guard")

# Sanic is handed at most this much of a read per turn of the loop. uvloop reads up
# to 256 kB at once; parsing that many tiny frames (40,000 empty pings) and writing
# their pongs takes about half a second, which every other socket of the process
# would wait for; a slice of 4 KiB, some 30 ms at worst.
_SLICE = 4 * 1024

# How often, once a socket's connection is lost, the guard looks whether Sanic has
# finished with it (its connection task ended) before taking its objects apart.
_UNLINK_AFTER = 1.0

# The protocol of a guard whose connection is lost: every call is a no-op.
_GONE = asyncio.Protocol()


class SocketGuard(asyncio.Protocol):
    """The transport's protocol for one upgraded socket, forwarding to Sanic's.

    Install with :meth:`install`. Not thread-safe; runs on the socket's loop.
    """

    __slots__ = (
        "_digesting",
        "_inner",
        "_limit",
        "_loop",
        "_reading_held",
        "_rest",
        "_stream",
        "_timer",
        "_websocket",
        "on_stall",
        "transport",
        "writing_paused",
    )

    def __init__(
        self,
        inner: asyncio.Protocol,
        transport: asyncio.Transport,
        write_timeout: float,
        websocket: Websocket | None = None,
    ) -> None:
        self._inner = inner
        # Sanic's WebSocket on ``inner`` and its HTTP stream, taken apart once the
        # connection is lost.
        self._websocket = websocket
        self._stream = getattr(inner, "_http", None)
        self.transport = transport
        self._limit = write_timeout
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        # Reading paused at Sanic's request (its frame assembler, or a closing socket).
        self._reading_held = False
        # What Sanic has not been handed yet of the last read.
        self._rest = memoryview(b"")
        # A slice handed to Sanic whose task has not run yet.
        self._digesting = False
        self.writing_paused = False
        self.on_stall: Callable[[], object] | None = None
        """Called once, just before the socket is aborted for a write stalled too long."""

    @classmethod
    def install(cls, ws: Websocket, write_timeout: float) -> SocketGuard | None:
        """Put a guard between ``ws``'s transport and Sanic's protocol.

        Returns None when the socket is already guarded, or closing (then only its
        reference cycles are broken, a little later). Call right after the handshake.
        """
        io = ws.io_proto
        transport = io.transport if io is not None else None
        if io is None or transport is None or isinstance(transport, _SanicSide):
            return None
        if transport.is_closing():
            # The client left already: nothing to guard, but the cycles to break.
            asyncio.get_running_loop().call_later(
                _UNLINK_AFTER, _unlink, io, ws, getattr(io, "_http", None)
            )
            return None
        guard = cls(io, transport, write_timeout, ws)
        transport.set_protocol(guard)
        io.transport = _SanicSide(guard, transport)
        _, high = transport.get_write_buffer_limits()
        if transport.get_write_buffer_size() > high:  # paused already: the guard came late
            guard.pause_writing()
        return guard

    @staticmethod
    def of(ws: Websocket) -> SocketGuard | None:
        """The guard installed on ``ws``, if any."""
        io = ws.io_proto
        side = io.transport if io is not None else None
        return side.guard if isinstance(side, _SanicSide) else None

    # asyncio.Protocol: what the transport calls.

    def data_received(self, data: bytes) -> None:
        # Sanic parses what it is handed at once and leaves the answers (a pong per
        # ping) and the frames to a new task. The transport would go on reading, chunk
        # after chunk in one turn of the loop, while none of those tasks runs: a flood
        # of pings piles them up. So read no more until Sanic had all of this read,
        # a slice per turn of the loop, and each slice's task has had its turn.
        self.transport.pause_reading()
        self._rest = memoryview(data)
        self._feed()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        inner, self._inner = self._inner, _GONE
        self._rest = memoryview(b"")
        self.on_stall = None
        inner.connection_lost(exc)
        websocket, self._websocket = self._websocket, None
        stream, self._stream = self._stream, None
        if websocket is None:
            return
        # Sanic's protocol needs its WebSocket no more: without it, its close at the
        # end of the connection task does not arm a 10 s abort of a closed socket.
        if getattr(inner, "websocket", None) is websocket:
            inner.websocket = None  # type: ignore[attr-defined]
        self._loop.call_later(_UNLINK_AFTER, _unlink, inner, websocket, stream)

    def _feed(self) -> None:
        """Hand Sanic the next slice of the last read; the rest waits for the next turn."""
        rest = self._rest
        self._rest = rest[_SLICE:]
        self._digesting = True
        self._inner.data_received(bytes(rest[:_SLICE]))
        self._loop.call_soon(self._digested)

    def _digested(self) -> None:
        self._digesting = False
        self._proceed()

    def _proceed(self) -> None:
        """Go on with the last read, or read again, unless something holds the socket back.

        Held back by: writes paused, a slice Sanic has not handled yet, or Sanic's own
        pause of reading (no one waits for the message it holds, or it is closing).
        """
        if self.writing_paused or self._digesting or self._reading_held:
            return
        if self._rest:
            if self.transport.is_closing():
                self._rest = memoryview(b"")
                return
            self._feed()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The write buffer is over its high-water mark: stop reading, start the clock."""
        self.writing_paused = True
        self._inner.pause_writing()
        self.transport.pause_reading()
        if self._timer is None:
            self._timer = self._loop.call_later(self._limit, self._stalled)

    def resume_writing(self) -> None:
        """The write buffer drained below its low-water mark: read again, unless Sanic holds it."""
        self.writing_paused = False
        self._cancel_timer()
        self._inner.resume_writing()
        self._proceed()

    # What Sanic's side calls.

    def hold_reading(self) -> None:
        self._reading_held = True
        self.transport.pause_reading()

    def release_reading(self) -> None:
        self._reading_held = False
        self._proceed()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        if not self.writing_paused:
            return
        log.warning("connection_write_timeout", extra={"seconds": self._limit})
        try:
            if self.on_stall is not None:
                self.on_stall()
        finally:
            self.transport.abort()


def _unlink(protocol: Any, websocket: Any, stream: Any) -> None:
    """Break what is left of a lost socket's reference cycles, once Sanic is done with it.

    Done means Sanic's connection task has ended (it runs the handler and closes
    the WebSocket); until then, look again later. Each link cut is one that Sanic
    and websockets no longer follow once the connection is gone:

    * the WebSocket and its frame assembler (``assembler.protocol``);
    * websockets' protocol and its parser, a generator whose frame holds it, and
      the parser's last exception, whose traceback holds that frame;
    * the HTTP stream and its ``response_func``, a method of itself, left set by an
      upgrade (the stream holds the request and its headers).

    * Sanic's protocol and its WebSocket, if not done when the connection was lost.
    """
    if getattr(protocol, "_task", None) is not None:
        asyncio.get_running_loop().call_later(_UNLINK_AFTER, _unlink, protocol, websocket, stream)
        return
    if getattr(protocol, "websocket", None) is websocket:
        protocol.websocket = None
    assembler = getattr(websocket, "assembler", None)
    if assembler is not None:
        assembler.protocol = None
    sans_io = getattr(websocket, "ws_proto", None)
    if sans_io is not None:
        sans_io.parser = None
        sans_io.parser_exc = None
    if stream is not None:
        stream.response_func = None


class _SanicSide(asyncio.Transport):
    """The transport as Sanic's protocol sees it: the real one, but reading is the guard's.

    Sanic's ``pause_reading`` / ``resume_reading`` go through the guard; every
    other call goes straight to the real transport.
    """

    __slots__ = ("_transport", "guard")

    def __init__(self, guard: SocketGuard, transport: asyncio.Transport) -> None:
        super().__init__()
        self.guard = guard
        self._transport = transport

    def pause_reading(self) -> None:
        self.guard.hold_reading()

    def resume_reading(self) -> None:
        self.guard.release_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)
