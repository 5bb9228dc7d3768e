"""One benchmark WebSocket client connection: a minimal RFC 6455 client on a raw asyncio
(uvloop) transport, the v1 client and the base of the others.

So that 10k connections and ~50k frames/s cost little CPU in the client processes: the
upgrade request is written once, server frames (unmasked) are cut out of the byte stream,
text frames are counted and their latency read from the timestamp at a fixed offset of the
body (see ``common.py``); pings are answered, close frames recorded and echoed. The
counters are the :class:`bench.loadgen.Worker`'s, shared by the clients of a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from bench import common

if TYPE_CHECKING:
    from bench.loadgen import Worker

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: the accept value is not checked
TS_START = common.BODY_OFFSET
TS_END = common.BODY_OFFSET + common.TS_DIGITS
SEQ_START = TS_END + 1  # the body is "<16-digit timestamp> <9-digit seq> xxx..."
SEQ_END = SEQ_START + 9
MAX_HEAD = 16 * 1024


class Client(asyncio.Protocol):
    """One WebSocket client connection (state 0: upgrading, 1: open, 2: closed)."""

    __slots__ = (
        "began",
        "buf",
        "done_at",
        "frames",
        "loop",
        "opened",
        "opened_at",
        "request",
        "state",
        "transport",
        "watch",
        "worker",
    )

    def __init__(
        self, worker: Worker, request: bytes, loop: asyncio.AbstractEventLoop, watch: int
    ) -> None:
        self.worker = worker
        self.request = request
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.state = 0
        self.opened: asyncio.Future[float] = loop.create_future()
        self.opened_at = 0.0
        self.frames = 0
        self.watch = watch
        self.done_at = 0.0
        self.began = time.time()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = 2
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before the upgrade"))

    def abort(self, rst: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.state = 2
            return
        if rst:
            with contextlib.suppress(Exception):
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def close_frame(self, code: int) -> None:
        if self.transport is not None and self.state == 1:
            self.transport.write(b"\x88\x82\x00\x00\x00\x00" + code.to_bytes(2, "big"))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == 0:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self.abort()
                self.buf = data
                return
            head = data[:end]
            data = data[end + 4 :]
            if not head.startswith(b"HTTP/1.1 101"):
                if not self.opened.done():
                    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
                    self.opened.set_exception(ConnectionError(status[:60]))
                self.abort()
                return
            self.state = 1
            if self.upgraded(head):
                self._open()
            if not data:
                return
        self._frames(data)

    def upgraded(self, head: bytes) -> bool:
        """The server's 101 response head, once; whether the connection counts as open
        now (a v1 client has no use for the head: it is open at its 101)."""
        return True

    def _open(self) -> None:
        """The connection is open for the bench: its handshake is complete."""
        self.opened_at = time.time()
        if not self.opened.done():
            self.opened.set_result(self.opened_at)

    def _counted(self, got: int, now_us: int) -> None:
        """Book ``got`` notification frames of one read, the last arriving at ``now_us``."""
        now = now_us / 1e6
        worker = self.worker
        worker.frames += got
        if not worker.first:
            worker.first = now
        worker.last = now
        self.frames += got
        if self.watch and self.frames >= self.watch and not self.done_at:
            self.done_at = now

    def _pong(self, payload: bytes) -> None:
        """Answer a ping with a (zero-)masked pong."""
        if self.transport is not None:
            self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload)

    def _closed_by_server(self, payload: bytes) -> None:
        """The server's close frame: count its code, answer it, close the socket."""
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        closes = self.worker.closes
        closes[str(code)] = closes.get(str(code), 0) + 1
        self.close_frame(code if code < 5000 and code not in (1005, 1006) else 1000)
        self.state = 2
        if self.transport is not None:
            self.transport.close()

    def _frames(self, data: bytes) -> None:
        worker = self.worker
        n = len(data)
        pos = 0
        now_us = 0
        got = 0
        lat = worker.latencies
        arrivals = worker.arrivals
        seen = worker.seen
        rel_ms = 0
        while n - pos >= 2:
            b1 = data[pos + 1] & 0x7F
            if b1 < 126:
                start = pos + 2
            elif b1 == 126:
                if n - pos < 4:
                    break
                b1 = int.from_bytes(data[pos + 2 : pos + 4], "big")
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                b1 = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + b1
            if end > n:
                break
            opcode = data[pos] & 0x0F
            if opcode == 1:
                got += 1
                if not now_us:
                    now_us = time.time_ns() // 1000
                    rel_ms = now_us // 1000 - worker.t0_ms
                try:
                    lat.append(now_us - int(data[start + TS_START : start + TS_END]))
                    arrivals.append(rel_ms)
                    if seen is not None:
                        i = int(data[start + SEQ_START : start + SEQ_END]) - worker.seq_base
                        if 0 <= i < len(seen):
                            if seen[i]:
                                worker.dupes += 1
                            seen[i] = 1
                        else:
                            worker.stray += 1
                except ValueError:
                    worker.bad_frames += 1
            elif opcode == 9:
                self._pong(data[start:end])
            elif opcode == 8:
                self._closed_by_server(data[start:end])
                return
            pos = end
        if pos < n:
            self.buf = data[pos:]
        if got:
            self._counted(got, now_us)
