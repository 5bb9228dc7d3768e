"""Scenario 10: clients that flood pings and never read are cut off; the gateway's memory holds.

A WebSocket peer must answer every ping with a pong, so a client that sends
pings as fast as it can and never reads makes the server write for every read.
The old gateway read on regardless: pongs piled up in memory (hundreds of MB in
seconds), and once the socket's buffers were full its keepalive ping and its
close waited forever, so the client was never cut off, whether connected,
waiting for the auth service or being refused.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from dev.auth_server import issue_token

from .conftest import Bench
from .harness import (
    Client,
    Figures,
    Ledger,
    drain,
    produce,
    scrape,
    stream,
    tracebacks,
    until,
)

WRITE_TIMEOUT = 2.0
PING_INTERVAL = 2.0
PING_TIMEOUT = 2.0
# The bound a flooder must be cut off within, plus room for a loaded machine to
# schedule the gateway and for the flooder to notice (its sends wait 0.1 s at most).
CUT_BOUND = WRITE_TIMEOUT + PING_TIMEOUT
CUT_ALLOWANCE = 2.0
# Each flood is bounded: at most this long and this many bytes of pings.
FLOOD_SECONDS = 20.0
FLOOD_BYTES = 32 * 1024 * 1024
# Growth of the gateway's resident memory that counts as "flat": the old gateway grew
# by hundreds of MB under one such client.
RSS_BOUND_MB = 50.0

# A masked ping frame with the largest payload a control frame may carry (125 bytes,
# masked with zeros): the server owes a 127-byte pong for each, which soon fills the
# socket's buffers.
FULL_PING = b"\x89\xfd" + b"\x00\x00\x00\x00" + b"p" * 125
# An empty one: 6 bytes to parse for a 2-byte pong. The kernel takes the pongs for
# long, so this one costs the gateway CPU rather than room; the keepalive cuts it off.
EMPTY_PING = b"\x89\x80" + b"\x00\x00\x00\x00"


@dataclass
class Flood:
    """What one flooding client saw: when the server cut it off, what it had sent."""

    cut_after: float | None
    sent: int
    error: str = ""


class PingFlooder:
    """A WebSocket client on a bare socket that floods pings and never reads a byte.

    Its receive buffer is small (``SO_RCVBUF``), so the server's pongs fill the
    kernel buffers at once. Methods block; call them in a thread.
    """

    def __init__(self, port: int, token: str, ping: bytes = FULL_PING) -> None:
        self.port = port
        self.token = token
        self.ping = ping
        self.sock: socket.socket | None = None

    def handshake(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(
            (
                f"GET /api/v1/notify/ws?token={self.token} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)  # the response head only: not a byte of the frames after it
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        self.sock = sock

    def flood(self, seconds: float = FLOOD_SECONDS, limit: int = FLOOD_BYTES) -> Flood:
        """Send pings until the server cuts the connection, ``seconds`` pass or ``limit`` bytes.

        Cut means a send fails (reset, broken pipe): the server closed its socket.
        Closes the socket at the end.
        """
        sock = self.sock
        assert sock is not None
        sock.settimeout(0.1)
        block = self.ping * (65536 // len(self.ping))
        view = memoryview(block)
        started = time.monotonic()
        sent = offset = 0
        try:
            while time.monotonic() - started < seconds:
                if sent < limit:
                    try:
                        n = sock.send(view[offset:])
                    except TimeoutError:
                        continue
                    sent += n
                    offset = (offset + n) % len(block)
                else:
                    # The budget is spent: keep probing with empty-handed waits until the
                    # server lets go (a zero-length send does not tell, so peek at errors).
                    time.sleep(0.1)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, os.strerror(error))
            return Flood(None, sent)
        except OSError as exc:
            return Flood(round(time.monotonic() - started, 2), sent, type(exc).__name__)
        finally:
            sock.close()


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB (``VmRSS`` of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssWatch:
    """Samples a process's resident memory every 0.1 s in a task; keeps the highest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_mb(pid)
        self.peak = self.before
        self._task = asyncio.create_task(self._sample(), name="rss-watch")

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb(self.pid))
            await asyncio.sleep(0.1)

    async def stop(self) -> float:
        """Stop sampling; the growth from the start to the peak, in MB."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, rss_mb(self.pid))
        return round(self.peak - self.before, 1)


async def test_an_authenticated_ping_flooder_that_never_reads_is_cut_off(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """A connected client flooding pings unread is cut within the bound; memory stays flat."""
    row = figures("13a. client floods pings, never reads (connected)")
    row.recovery = "flood start to the gateway cutting the flooder off"
    topics = await bench.topics()
    gateway = await bench.gateway(
        topics,
        WRITE_TIMEOUT=f"{WRITE_TIMEOUT}s",
        PING_INTERVAL=f"{PING_INTERVAL}s",
        PING_TIMEOUT=f"{PING_TIMEOUT}s",
    )
    assert gateway.process is not None
    flooder_user = bench.user("flooder", 0)
    users = [bench.user("reader", i) for i in range(5)]
    ledger = Ledger()
    clients = [Client(ledger, user, bench.token(user), gateway.ws_url) for user in users]
    stop = asyncio.Event()
    keepers = [asyncio.create_task(c.keep_open(stop, timeout=300)) for c in clients]
    await until(lambda: _connections(gateway.base, len(users)), 30, "readers connected")
    flooder = PingFlooder(gateway.port, bench.token(flooder_user))
    await asyncio.to_thread(flooder.handshake)
    await until(lambda: _connections(gateway.base, len(users) + 1), 10, "flooder connected")
    # The others keep receiving while the flooder floods. What was written to the
    # flooder's own socket is its to read (it never does), so its messages come after
    # the cut: stored, then delivered when it comes back as an ordinary client.
    choose = random.Random(10).choice
    stop_stream = asyncio.Event()
    producing = asyncio.create_task(
        stream(
            producer,
            topics[0],
            lambda: ledger.message(choose(users)),
            rate=50,
            stop=stop_stream,
        )
    )
    try:
        await asyncio.sleep(1.0)
        watch = RssWatch(gateway.process.pid)
        flood = await asyncio.to_thread(flooder.flood)
        grown = await watch.stop()
        await until(lambda: _connections(gateway.base, len(users)), 30, "flooder unregistered")
        await produce(producer, topics[0], [ledger.message(flooder_user) for _ in range(20)])
        await asyncio.sleep(1.0)
        stop_stream.set()
        await producing
        comeback = Client(ledger, flooder_user, bench.token(flooder_user), gateway.ws_url)
        await drain(ledger, [comeback], timeout=60, idle=10)
        await ledger.wait_complete(timeout=60, idle=10)
    finally:
        stop_stream.set()
        await asyncio.gather(producing, return_exceptions=True)
        stop.set()
        await asyncio.gather(*keepers)
    row.count(ledger)
    row.connections = len(users) + 1
    row.recovery_s = flood.cut_after
    row.notes["bytes of pings sent (131 bytes each)"] = flood.sent
    row.notes["flooder cut off after (s); bound WRITE_TIMEOUT + PING_TIMEOUT"] = [
        flood.cut_after,
        CUT_BOUND,
    ]
    row.notes["gateway RSS before / growth to peak (MB)"] = [round(watch.before, 1), grown]
    metrics = await scrape(gateway.base)
    row.notes["notify_slow_connections_closed_total"] = metrics.get(
        "notify_slow_connections_closed_total"
    )
    problems = []
    if flood.cut_after is None:
        problems.append(
            f"the flooder was still connected after {FLOOD_SECONDS:g} s "
            f"({flood.sent} bytes of pings taken)"
        )
    elif flood.cut_after > CUT_BOUND + CUT_ALLOWANCE:
        problems.append(f"the flooder was cut off only after {flood.cut_after} s")
    if grown > RSS_BOUND_MB:
        problems.append(f"the gateway's RSS grew by {grown} MB")
    if lost := ledger.missing():
        problems.append(f"{len(lost)} messages lost")
    if errors := tracebacks(gateway.logs()):
        problems.append(f"tracebacks in the gateway's log: {errors[:3]}")
    if ledger.foreign:
        problems.append("a frame reached another user")
    row.notes["problems"] = problems
    assert not problems, "\n".join(problems)


async def test_flooders_still_in_auth_or_being_rejected_are_cut_off(
    bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """A flooder waiting for auth, and one being refused, are cut off: no handler is held."""
    row = figures("13b. client floods pings, never reads (empty pings / in auth / refused)")
    row.recovery = "worst time from flood start to the cut, of the cases"
    topics = await bench.topics()
    gateway = await bench.gateway(
        topics,
        WRITE_TIMEOUT=f"{WRITE_TIMEOUT}s",
        PING_INTERVAL=f"{PING_INTERVAL}s",
        PING_TIMEOUT=f"{PING_TIMEOUT}s",
        AUTH_TIMEOUT="10s",
    )
    assert gateway.process is not None
    cases = {
        # Connected, flooding empty pings: the keepalive ping goes unanswered.
        "empty pings": (bench.token(bench.user("empty", 0)), 0.0, EMPTY_PING),
        # The auth answer takes longer than WRITE_TIMEOUT: the socket is in no hub yet.
        "in auth": (bench.token(bench.user("in-auth", 0)), WRITE_TIMEOUT + 2.0, FULL_PING),
        # The answer (401) comes while the socket's writes are paused: the 4401 close
        # cannot be written.
        "refused": (
            issue_token(bench.user("refused", 0), secret="not-the-secret"),
            1.0,
            FULL_PING,
        ),
    }
    watch = RssWatch(gateway.process.pid)
    floods: dict[str, Flood] = {}
    try:
        for case, (token, auth_delay, ping) in cases.items():
            bench.auth.delay = auth_delay
            flooder = PingFlooder(gateway.port, token, ping)
            await asyncio.to_thread(flooder.handshake)
            floods[case] = await asyncio.to_thread(flooder.flood)
    finally:
        bench.auth.delay = 0.0
        grown = await watch.stop()
    # Nothing is left of them, and the gateway still serves.
    left = await _connections(gateway.base, 0)
    after = bench.user("after", 0)
    probe = Client(Ledger(), after, bench.token(after), gateway.ws_url)
    await probe.open()
    await probe.close()
    row.messages = len(cases)  # handshakes of flooders
    row.connections = len(cases) + 1
    cut_times = [f.cut_after for f in floods.values()]
    row.recovery_s = None if None in cut_times else max(t for t in cut_times if t is not None)
    for case, flood in floods.items():
        row.notes[f"{case}: cut off after (s) / bytes of pings sent"] = [
            flood.cut_after,
            flood.sent,
        ]
    row.notes["gateway RSS before / growth to peak (MB)"] = [round(watch.before, 1), grown]
    problems = []
    for case, flood in floods.items():
        if flood.cut_after is None:
            problems.append(f"{case}: still connected after {FLOOD_SECONDS:g} s")
        elif flood.cut_after > CUT_BOUND + CUT_ALLOWANCE:
            problems.append(f"{case}: cut off only after {flood.cut_after} s")
    if grown > RSS_BOUND_MB:
        problems.append(f"the gateway's RSS grew by {grown} MB")
    if not left:
        problems.append("a flooder's connection was still registered at the end")
    if errors := tracebacks(gateway.logs()):
        problems.append(f"tracebacks in the gateway's log: {errors[:3]}")
    row.notes["problems"] = problems
    assert not problems, "\n".join(problems)


async def _connections(base: str, count: int) -> bool:
    return (await scrape(base)).get("notify_connections") == count
