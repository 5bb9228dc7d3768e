"""The v2 benchmark client: offers the subprotocol ``notify.v2`` (docs/protocol.md) and,
where the server selects it, acknowledges every notification.

It reads the id and the timestamp of each ``{"type":"notification",...}`` frame and
acknowledges every id, batched as a client would (``{"type":"ack","ids":[...]}`` at most
every ``ack_ms`` per connection, at once when ``ack_ids`` are waiting and that interval
has passed; at most 500 ids a frame; the worker's ack loop sends what waits). Where the
server selects nothing, it is a v1 client and counted so.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from bench import common
from bench.wsclient import Client

if TYPE_CHECKING:
    from bench.loadgen import Worker

SUBPROTOCOL_V2 = "notify.v2"
ACK_MAX_IDS = 500  # docs/protocol.md: 1 to 500 ids per ack frame
ACK_HEAD = b'{"type":"ack","ids":['
ID_KEY = b'"id":"'
BODY_KEY = b'"body":"'
ID_CHARS = 36  # a canonical UUID


class ClientV2(Client):
    """A client that offered ``notify.v2``: if the server selected it, it reads v2 frames
    and acknowledges every notification; if not, it is a v1 client."""

    __slots__ = ("ids", "last_ack", "oldest", "v2")

    def __init__(
        self, worker: Worker, request: bytes, loop: asyncio.AbstractEventLoop, watch: int
    ) -> None:
        super().__init__(worker, request, loop, watch)
        self.v2 = False
        self.ids: list[bytes] = []  # received, not yet acknowledged
        self.oldest = 0.0  # when the first of them arrived (time.monotonic())
        self.last_ack = 0.0

    def upgraded(self, head: bytes) -> bool:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-protocol":
                self.v2 = value.strip().decode(errors="replace") == SUBPROTOCOL_V2
        return True

    def _closed_by_server(self, payload: bytes) -> None:
        self.worker.unacked.discard(self)
        super()._closed_by_server(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.worker.unacked.discard(self)

    def send_acks(self, now: float) -> None:
        """One ack frame of up to 500 waiting ids, unless one went out less than an ack
        interval ago (the server limits client frames per second)."""
        worker = self.worker
        if self.state != 1 or self.transport is None:
            worker.unacked.discard(self)
            return
        if now - self.last_ack < worker.ack_interval:
            return
        batch, self.ids = self.ids[:ACK_MAX_IDS], self.ids[ACK_MAX_IDS:]
        if not self.ids:
            worker.unacked.discard(self)
        if not batch:
            return
        payload = ACK_HEAD + b'"' + b'","'.join(batch) + b'"]}'
        n = len(payload)
        # Client frames are masked; a zero mask key leaves the payload as it is.
        head = bytes((0x81, 0x80 | n)) if n < 126 else b"\x81\xfe" + n.to_bytes(2, "big")
        self.transport.write(head + b"\x00\x00\x00\x00" + payload)
        self.last_ack = now
        worker.acked += len(batch)
        worker.ack_frames += 1
        worker.ack_delays.append(int((now - self.oldest) * 1e6))
        self.oldest = now  # the ids left over, if any, wait from now at most

    def _frames(self, data: bytes) -> None:
        if not self.v2:
            super()._frames(data)
            return
        worker = self.worker
        n = len(data)
        pos = 0
        now_us = 0
        got = 0
        lat = worker.latencies
        arrivals = worker.arrivals
        seen = worker.seen
        rel_ms = 0
        ids = self.ids
        if not ids:
            self.oldest = time.monotonic()
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
                # The compact form (docs/protocol.md) is read in place; anything else is
                # parsed as JSON.
                i = data.find(ID_KEY, start, end)
                b = data.find(BODY_KEY, start, end) if i >= 0 else -1
                if b < 0:
                    body = self._other(data[start:end])
                    if body is None:
                        pos = end
                        continue
                    ident, ts, sq = body
                else:
                    ident = data[i + 6 : i + 6 + ID_CHARS]
                    ts = data[b + 8 : b + 8 + common.TS_DIGITS]
                    sq = data[b + 9 + common.TS_DIGITS : b + 18 + common.TS_DIGITS]
                ids.append(ident)
                got += 1
                if not now_us:
                    now_us = time.time_ns() // 1000
                    rel_ms = now_us // 1000 - worker.t0_ms
                try:
                    lat.append(now_us - int(ts))
                    arrivals.append(rel_ms)
                    if seen is not None:
                        k = int(sq) - worker.seq_base
                        if 0 <= k < len(seen):
                            if seen[k]:
                                worker.dupes += 1
                            seen[k] = 1
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
            if len(ids) >= worker.ack_ids:
                self.send_acks(time.monotonic())
            if self.ids:
                worker.unacked.add(self)

    def _other(self, text: bytes) -> tuple[bytes, bytes, bytes] | None:
        """A v2 text frame not in the compact notification form: a notification's id,
        timestamp and sequence digits, or None for any other frame (counted by type)."""
        try:
            frame = json.loads(text)
            kind = str(frame.get("type"))
        except (ValueError, AttributeError):
            self.worker.bad_frames += 1
            return None
        if kind == "notification":
            body = str(frame.get("body", ""))
            ts, _, rest = body.partition(" ")
            return str(frame.get("id", "")).encode(), ts.encode(), rest[:9].encode()
        if kind == "error":
            kind = f"error:{frame.get('code')}"
        self.worker.control[kind] = self.worker.control.get(kind, 0) + 1
        return None
