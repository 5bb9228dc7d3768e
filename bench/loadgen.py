"""Load generator: one process holding a slice of the benchmark's WebSocket clients.

Run by ``bench/run.py`` (several at once, each with its own loopback source address),
driven by JSON lines on stdin, one JSON line answered per command on stdout.

The clients are raw-transport WebSocket clients: :class:`bench.wsclient.Client` (v1),
:class:`bench.client_v2.ClientV2` (``protocol: "v2"``: offers ``notify.v2`` and, where the
server selects it, acknowledges every notification; where it selects nothing, the
connection is v1 and counted so) and :class:`bench.client_centrifugo.CentrifugoClient`
(``auth: "centrifugo"``: Centrifugo's JSON protocol, its token in a connect command). They
book what they receive in this process's :class:`Worker`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from array import array
from typing import Any

import uvloop

from bench import common
from bench.client_centrifugo import CentrifugoClient
from bench.client_v2 import ACK_MAX_IDS, SUBPROTOCOL_V2, ClientV2
from bench.wsclient import KEY, Client


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
        # "token" (gateway), "user" (bare baseline), "centrifugo" (token in a connect command)
        mode = args["auth"]
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
            tok = ""
            if mode == "centrifugo":
                key = ("centrifugo", user)
                tok = self.tokens.get(key) or common.centrifugo_token(user, exp)
                self.tokens[key] = tok
                target = path
            elif mode == "token":
                key = (salt, user)
                tok = self.tokens.get(key) or common.token(user, salt, exp)
                self.tokens[key] = tok
                target = f"{path}?token={tok}{query_extra}"
            else:
                target = f"{path}?user={user}{query_extra}"
            request = (
                f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{offer}\r\n"
            ).encode()
            client: Client
            if mode == "centrifugo":
                client = CentrifugoClient(self, request, loop, watch, tok)
            elif v2:
                client = ClientV2(self, request, loop, watch)
            else:
                client = Client(self, request, loop, watch)
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
