"""Load generator: one process holding a slice of the benchmark's WebSocket clients.

Run by ``bench/run.py`` (several at once, each with its own loopback source address),
driven by JSON lines on stdin, one JSON line answered per command on stdout.

The client is a minimal hand-written RFC 6455 client on raw asyncio (uvloop) transports,
so that 10k connections and ~50k frames/s cost little CPU here: the upgrade request is
written once, server frames (unmasked) are cut out of the byte stream, text frames are
counted and their latency read from the timestamp at a fixed offset of the body (see
``common.py``); pings are answered, close frames recorded and echoed.

With ``protocol: "v2"`` a connect offers the subprotocol ``notify.v2`` (docs/protocol.md);
where the server selects it, the client is a :class:`ClientV2`: it reads the id and the
timestamp of each ``{"type":"notification",...}`` frame and acknowledges every id, batched
as a client would (``{"type":"ack","ids":[...]}`` at most every ``ack_ms`` per
connection, at once when ``ack_ids`` are waiting and that interval has passed; at most
500 ids a frame). Where the server selects nothing, the connection is v1 and counted so.
The v1 client's path is untouched by all this.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import struct
import sys
import time
from array import array
from typing import Any

import uvloop

from bench import common

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: the accept value is not checked
TS_START = common.BODY_OFFSET
TS_END = common.BODY_OFFSET + common.TS_DIGITS
SEQ_START = TS_END + 1  # the body is "<16-digit timestamp> <9-digit seq> xxx..."
SEQ_END = SEQ_START + 9
MAX_HEAD = 16 * 1024
SUBPROTOCOL_V2 = "notify.v2"
ACK_MAX_IDS = 500  # docs/protocol.md: 1 to 500 ids per ack frame
ACK_HEAD = b'{"type":"ack","ids":['
ID_KEY = b'"id":"'
BODY_KEY = b'"body":"'
ID_CHARS = 36  # a canonical UUID


def delays(values: array[int]) -> dict[str, int]:
    """p50, p99 and max of ``values`` (0 for none)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0, "p99": 0, "max": 0}
    n = len(ordered)
    return {"p50": ordered[n // 2], "p99": ordered[min(n - 1, n * 99 // 100)], "max": ordered[-1]}


class Worker:
    """Counters shared by this process's clients, and the commands of run.py."""

    def __init__(self, source_ip: str) -> None:
        self.source_ip = source_ip
        self.clients: list[Client] = []
        self.tokens: dict[tuple[str, str], str] = {}
        # v2 clients with ids waiting to be acknowledged, and the ack settings of run.py.
        self.unacked: set[ClientV2] = set()
        self.ack_interval = 0.05
        self.ack_ids = 100
        self.ack_task: asyncio.Task[None] | None = None
        self.reset()

    def reset(self, seq_base: int = 0, seq_count: int = 0) -> None:
        """Zero the counters; with ``seq_count``, also note which of the bench messages
        ``seq_base .. seq_base + seq_count - 1`` arrived (to find losses and duplicates)."""
        self.seq_base = seq_base
        self.seen: bytearray | None = bytearray(seq_count) if seq_count else None
        self.dupes = 0
        self.stray = 0
        self.frames = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies = array("q")
        # When each latency sample arrived, in ms after t0_ms (for a timeline of stalls).
        self.t0_ms = time.time_ns() // 1_000_000
        self.arrivals = array("l")
        self.closes: dict[str, int] = {}
        self.bad_frames = 0
        # v2: ids acknowledged, ack frames sent, server frames other than notifications.
        self.acked = 0
        self.ack_frames = 0
        self.control: dict[str, int] = {}
        # Per ack frame: how long its oldest id had waited in the client, in µs.
        self.ack_delays = array("q")

    # -- commands ---------------------------------------------------------------

    async def connect(self, args: dict[str, Any]) -> dict[str, Any]:
        """Open ``count`` connections of users ``population/start..``, ``concurrency`` at once."""
        host, port, path = args["host"], int(args["port"]), args["path"]
        population, start, count = args["population"], int(args["start"]), int(args["count"])
        mode = args["auth"]  # "token" (gateway) or "user" (bare baseline)
        salt, exp = args.get("salt", ""), int(args.get("exp", 0))
        query_extra = args.get("query", "")
        timeout = float(args.get("timeout", 60))
        deadline = time.monotonic() + float(args.get("budget", 300))
        watch = int(args.get("watch", 0))
        v2 = args.get("protocol", "v1") == "v2"
        if v2:
            self.ack_interval = float(args.get("ack_ms", 50)) / 1000
            self.ack_ids = max(1, min(ACK_MAX_IDS, int(args.get("ack_ids", 100))))
            if self.ack_task is None:
                self.ack_task = asyncio.create_task(self.ack_loop(), name="ack-loop")
        offer = f"Sec-WebSocket-Protocol: {SUBPROTOCOL_V2}\r\n" if v2 else ""
        pending = iter(range(start, start + count))
        opened: list[float] = []
        errors: dict[str, int] = {}
        loop = asyncio.get_running_loop()
        began = time.time()
        new: list[Client] = []

        async def one(index: int) -> None:
            user = common.user_id(population, index)
            if mode == "token":
                key = (salt, user)
                tok = self.tokens.get(key)
                if tok is None:
                    tok = self.tokens[key] = common.token(user, salt, exp)
                target = f"{path}?token={tok}{query_extra}"
            else:
                target = f"{path}?user={user}{query_extra}"
            request = (
                f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{offer}\r\n"
            ).encode()
            client = (
                ClientV2(self, request, loop, watch) if v2 else Client(self, request, loop, watch)
            )
            try:
                await asyncio.wait_for(
                    loop.create_connection(
                        lambda: client, host, port, local_addr=(self.source_ip, 0)
                    ),
                    timeout,
                )
                opened.append(await asyncio.wait_for(client.opened, timeout))
                new.append(client)
            except Exception as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                client.abort()

        async def runner() -> None:
            for index in pending:
                if time.monotonic() > deadline:
                    errors["budget"] = errors.get("budget", 0) + 1
                    continue
                await one(index)

        concurrency = max(1, min(int(args.get("concurrency", 50)), count))
        await asyncio.gather(*(runner() for _ in range(concurrency)))
        self.clients.extend(new)
        opened.sort()
        return {
            "ok": len(opened),
            "errors": errors,
            "began": began,
            "first_open": opened[0] if opened else 0.0,
            "last_open": opened[-1] if opened else 0.0,
            "open_now": self.open_count(),
            # Of those opened: on how many the server selected notify.v2.
            "v2": sum(1 for c in new if isinstance(c, ClientV2) and c.v2),
        }

    def open_count(self) -> int:
        return sum(1 for c in self.clients if c.state == 1)

    def stats(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "first": self.first,
            "last": self.last,
            "open": self.open_count(),
            "closes": self.closes,
            "bad_frames": self.bad_frames,
            "samples": len(self.latencies),
            "acked": self.acked,
            "ack_frames": self.ack_frames,
            "unacked": sum(len(c.ids) for c in self.unacked),
            "control": self.control,
            "ack_delay_us": delays(self.ack_delays),
            **(
                {
                    "distinct": len(self.seen) - self.seen.count(0),
                    "dupes": self.dupes,
                    "stray": self.stray,
                }
                if self.seen is not None
                else {}
            ),
        }

    def take_latencies(self) -> dict[str, Any]:
        return {
            "latencies_us": base64.b64encode(self.latencies.tobytes()).decode(),
            "arrivals_ms": base64.b64encode(self.arrivals.tobytes()).decode(),
            "t0_ms": self.t0_ms,
            "count": len(self.latencies),
        }

    def watched(self) -> dict[str, Any]:
        """Timings of the clients opened with ``watch``: first open, last watched frame."""
        out = []
        for c in self.clients:
            if c.watch:
                out.append(
                    {"opened": c.opened_at, "frames": c.frames, "done": c.done_at, "began": c.began}
                )
        return {"watched": out}

    async def close_all(self, args: dict[str, Any]) -> dict[str, Any]:
        """Close every connection: with RST (no TIME_WAIT) or with a close frame."""
        rst = bool(args.get("rst", True))
        for c in self.clients:
            if rst:
                c.abort(rst=True)
            else:
                c.close_frame(1000)
        deadline = time.monotonic() + float(args.get("timeout", 20))
        while time.monotonic() < deadline and any(c.state != 2 for c in self.clients):
            await asyncio.sleep(0.05)
        for c in self.clients:
            c.abort(rst=True)
        closed = len(self.clients)
        self.clients = [c for c in self.clients if c.state != 2]
        self.unacked.clear()
        return {"closed": closed, "left": len(self.clients)}

    async def ack_loop(self) -> None:
        """Every ack interval, the v2 clients with ids waiting send their ack frame."""
        while True:
            await asyncio.sleep(self.ack_interval)
            if not self.unacked:
                continue
            now = time.monotonic()
            for c in list(self.unacked):
                try:
                    c.send_acks(now)
                except Exception as exc:  # one client's failure must not stop the others' acks
                    print(f"ack of one client failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    self.unacked.discard(c)


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
            self.upgraded(head)
            self.opened_at = time.time()
            self.opened.set_result(self.opened_at)
            if not data:
                return
        self._frames(data)

    def upgraded(self, head: bytes) -> None:
        """The server's 101 response head, once (a v1 client has no use for it)."""

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

    def upgraded(self, head: bytes) -> None:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-protocol":
                self.v2 = value.strip().decode(errors="replace") == SUBPROTOCOL_V2

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


async def serve(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            return
        request = json.loads(line)
        command = request["cmd"]
        try:
            if command == "connect":
                answer = await worker.connect(request)
            elif command == "stats":
                answer = worker.stats()
            elif command == "reset":
                worker.reset(int(request.get("seq_base", 0)), int(request.get("seq_count", 0)))
                answer = {"ok": True}
            elif command == "latencies":
                answer = worker.take_latencies()
            elif command == "watched":
                answer = worker.watched()
            elif command == "close_all":
                answer = await worker.close_all(request)
            elif command == "quit":
                await worker.close_all({"rst": True, "timeout": 2})
                out.write(json.dumps({"id": request["id"], "ok": True}) + "\n")
                out.flush()
                return
            else:
                answer = {"error": f"unknown command {command}"}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answer["id"] = request["id"]
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark WebSocket client process")
    parser.add_argument("--source-ip", default="127.0.0.1")
    args = parser.parse_args()
    common.raise_nofile()
    uvloop.run(serve(Worker(args.source_ip)))


if __name__ == "__main__":
    main()
