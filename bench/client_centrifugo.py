"""The Centrifugo benchmark client: Centrifugo's JSON protocol over the same raw client.

After the 101 it sends one connect command with its HS256 token
(``{"id":1,"connect":{"token":...}}``); the token's ``channels`` claim subscribes the
connection on the server's side to its user's personal channel, so no subscribe command
follows. The connection counts as open when the connect reply arrives (that is when
Centrifugo has checked the token and registered it, as the gateway's figure counts
registration); an error reply fails the connect.

Centrifugo may put several replies and pushes in one text frame, one JSON object a line.
Each publication's data is the bench frame (``common.frame``) as the producer wrote it,
so each ``"body":"`` in a frame is one notification, its timestamp and sequence at fixed
offsets after it. An empty object ``{}`` is the server's ping: answered with ``{}``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from bench import common
from bench.wsclient import Client

if TYPE_CHECKING:
    from bench.loadgen import Worker

BODY_KEY = b'"body":"'
TS_AT = len(BODY_KEY)
SEQ_AT = TS_AT + common.TS_DIGITS + 1
PING = b"{}"
PATH = "/connection/websocket"


def text_frame(payload: bytes) -> bytes:
    """A client text frame (masked, with a zero key: the payload stays as it is)."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else b"\x81\xfe" + n.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


class CentrifugoClient(Client):
    """One Centrifugo client connection, subscribed by its token to its personal channel."""

    __slots__ = ("connect_command", "connected")

    def __init__(
        self,
        worker: Worker,
        request: bytes,
        loop: asyncio.AbstractEventLoop,
        watch: int,
        token: str,
    ) -> None:
        super().__init__(worker, request, loop, watch)
        self.connect_command = text_frame(b'{"id":1,"connect":{"token":"' + token.encode() + b'"}}')
        self.connected = False

    def upgraded(self, head: bytes) -> bool:
        if self.transport is not None:
            self.transport.write(self.connect_command)
        return False  # open once the connect reply comes

    def _reply(self, payload: bytes) -> None:
        """The first text frame: the connect reply (perhaps with pushes after it)."""
        first = payload.split(b"\n", 1)[0]
        if b'"connect"' in first:
            self.connected = True
            self._open()
            return
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(first[:80].decode(errors="replace")))
        self.abort()

    def _frames(self, data: bytes) -> None:
        worker = self.worker
        n = len(data)
        pos = 0
        now_us = 0
        got = 0
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
            pos = end
            if opcode == 1:
                if not self.connected:
                    self._reply(data[start:end])
                    if not self.connected:
                        return
                # A ping is a line of its own: the whole frame, or one line of a batch.
                ping = (
                    data[start:end] == PING
                    or data.startswith(b"{}\n", start)
                    or data.find(b"\n{}", start, end) >= 0
                )
                if ping and self.transport is not None:
                    self.transport.write(text_frame(PING))
                at = data.find(BODY_KEY, start, end)
                while at >= 0:
                    got += 1
                    if not now_us:
                        now_us = common.now_us()
                        rel_ms = now_us // 1000 - worker.t0_ms
                    try:
                        worker.latencies.append(now_us - int(data[at + TS_AT : at + SEQ_AT - 1]))
                        worker.arrivals.append(rel_ms)
                        if seen is not None:
                            k = int(data[at + SEQ_AT : at + SEQ_AT + 9]) - worker.seq_base
                            if 0 <= k < len(seen):
                                if seen[k]:
                                    worker.dupes += 1
                                seen[k] = 1
                            else:
                                worker.stray += 1
                    except ValueError:
                        worker.bad_frames += 1
                    at = data.find(BODY_KEY, at + SEQ_AT, end)
            elif opcode == 9:
                self._pong(data[start:end])
            elif opcode == 8:
                self._closed_by_server(data[start:end])
                return
        if pos < n:
            self.buf = data[pos:]
        if got:
            self._counted(got, now_us)
