"""How far one Redis takes the gateway: PUBLISH to per-user channels, one subscriber each.

The gateway's Redis path (``service/broker.py``) is, per notification, one PUBLISH on
``<prefix><user id>`` sent in a pipeline of a whole consumer batch (up to 1000), read
by the one process subscribed to that user. This measures that traffic against the
Redis of ``--url`` without a gateway, so the figure is Redis's (and the client's):

* ``S`` subscriber connections (like S gateway processes, one pub/sub connection
  each) SUBSCRIBE to ``--channels`` per-user channels between them. They are raw
  sockets that count bytes (every message has the same size), so reading costs
  almost nothing and Redis, not the reader, is what is measured.
* publishers, each its own process:

  - ``py``: the gateway's own ``RedisBroker.publish`` (``service/broker.py``): per
    batch of ``--pipeline`` notifications, one buffer of packed PUBLISHes (channel
    ``<prefix><user id>``, payload the broker's JSON array, encoded per message)
    written to a ``service/resp.py`` connection and its replies parsed by
    ``hiredis.Reader``; the next batch once the replies are in (one batch in flight
    per publisher, as per gateway process). The ``Notification`` objects are made
    per batch in the same process; the CPU spent in ``publish()`` alone is reported
    per message (``publisher_client_us``);
  - ``redis-benchmark``: the C client, ``-P`` pipelined, random channels
    (``__rand_int__``): Redis's own ceiling with a publisher that costs little.

For each test: messages/s received (first to last byte at the subscribers),
whether all arrived, and CPU as % of one core of Redis, the publishers, the
subscribers and the rest of the machine (Redis is single-threaded: near 100 % it
is the limit). Prints one JSON line; ``python -m bench.run --only scale`` runs it.

``client-cost`` measures the publishing client alone (``bench/redis_client_cost.py``).

    python -m bench.redis_capacity --url redis://127.0.0.1:6379/0 --messages 300000
    python -m bench.redis_capacity client-cost
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

import psutil
import uvloop

from bench import common
from bench.cpu import listener_pid, machine_busy, process_cpu
from service.broker import RedisBroker, encode
from service.notification import Notification

# Channel names end in 12 decimal digits: what redis-benchmark's __rand_int__ expands to.
USER_HEAD = "00000000-0000-4000-8000-"
PONG = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"


def channel(prefix: str, index: int) -> str:
    return f"{prefix}{USER_HEAD}{index:012d}"


def notification(index: int, seq: int, ts_us: int) -> Notification:
    """Message ``seq`` for user ``index``: the same length for every index, seq and time."""
    user = f"{USER_HEAD}{index:012d}"
    message_id = f"{USER_HEAD}{seq:012d}"
    body = common.body(ts_us, seq)
    return Notification.build(message_id, user, common.TITLE, body, ts_us // 1000)


def origin(prefix: str) -> str:
    """Stands for the publisher's control channel: ``RedisBroker`` uses ``<prefix>node:``
    and 32 hex digits (a uuid4), so the payload has the size the broker's has."""
    return f"{prefix}node:{'0' * 32}"


def payload(prefix: str, index: int, seq: int) -> bytes:
    """The broker's wire format (``service.broker.encode``):
    [message id, user id, created ms, title, body, origin]."""
    return encode(notification(index, seq, common.now_us()), origin(prefix))


def resp(*args: str | bytes) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def message_bytes(prefix: str) -> int:
    """Size of one pushed message as the subscriber reads it (RESP2)."""
    ch = channel(prefix, 0).encode()
    return len(resp(b"message", ch, payload(prefix, 0, 0)))


def redis_address(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest or "127.0.0.1", 6379
    return host or "127.0.0.1", int(port)


# -- subscribers ---------------------------------------------------------------------


class Subscriber(asyncio.Protocol):
    """One pub/sub connection: subscribes, then only counts bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.setup = bytearray()
        self.ready = asyncio.get_running_loop().create_future()
        self.counting = False
        self.bytes = 0
        self.first = 0.0
        self.last = 0.0
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed while subscribing"))

    def data_received(self, data: bytes) -> None:
        if self.counting:
            now = time.time()
            if not self.first:
                self.first = now
            self.last = now
            self.bytes += len(data)
            return
        self.setup += data
        if self.setup.endswith(PONG) and not self.ready.done():
            self.ready.set_result(None)

    def reset(self) -> None:
        self.bytes, self.first, self.last = 0, 0.0, 0.0


async def subscribe(url: str, prefix: str, channels: int, connections: int) -> list[Subscriber]:
    host, port = redis_address(url)
    loop = asyncio.get_running_loop()
    subs: list[Subscriber] = []
    for i in range(connections):
        _, sub = await loop.create_connection(Subscriber, host, port)
        mine = [channel(prefix, c) for c in range(i, channels, connections)]
        assert sub.transport is not None
        for start in range(0, len(mine), 1000):
            sub.transport.write(resp("SUBSCRIBE", *mine[start : start + 1000]))
        sub.transport.write(resp("PING"))
        await asyncio.wait_for(sub.ready, 60)
        sub.counting = True
        subs.append(sub)
    return subs


# -- publishers ------------------------------------------------------------------------


async def publish(args: argparse.Namespace) -> dict[str, Any]:
    """One publisher process: the gateway's ``RedisBroker.publish``, one batch in flight.

    The broker's channel for a user is ``<prefix><user id>``, so with ``--prefix`` and
    the users of :func:`channel` it publishes on the channels the subscribers hold.
    """
    broker = RedisBroker(args.url, args.prefix)
    receivers = 0
    zero = 0
    publish_cpu = 0.0
    seq = args.offset
    end = args.offset + args.count
    began = time.time()
    try:
        while seq < end:
            n = min(args.pipeline, end - seq)
            ts = common.now_us()
            batch = [notification(s % args.channels, s, ts) for s in range(seq, seq + n)]
            t0 = time.process_time()
            counts = await broker.publish(batch)
            publish_cpu += time.process_time() - t0
            for c in counts:
                receivers += c
                zero += c == 0
            seq += n
    finally:
        await broker.close()
    ended = time.time()
    published = seq - args.offset
    return {
        "published": published,
        "receivers": receivers,
        "unreceived": zero,
        "began": began,
        "ended": ended,
        "rate": published / max(1e-9, ended - began),
        "cpu": time.process_time(),
        "publish_us": publish_cpu / max(1, published) * 1e6,
    }


# -- one test --------------------------------------------------------------------------


async def run_test(
    args: argparse.Namespace,
    subs: list[Subscriber],
    *,
    tool: str,
    publishers: int,
    redis_pid: int | None,
    size: int,
) -> dict[str, Any]:
    total = args.messages
    for s in subs:
        s.reset()
    procs: list[asyncio.subprocess.Process] = []
    ps: list[psutil.Process] = []
    redis0, me0, busy0, t0 = (
        process_cpu(redis_pid),
        time.process_time(),
        machine_busy(),
        time.time(),
    )
    if tool == "py":
        for i in range(publishers):
            share = total * (i + 1) // publishers - total * i // publishers
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.redis_capacity",
                    "publish",
                    "--url",
                    args.url,
                    "--prefix",
                    args.prefix,
                    "--channels",
                    str(args.channels),
                    "--count",
                    str(share),
                    "--offset",
                    str(total * i // publishers),
                    "--pipeline",
                    str(args.pipeline),
                    stdout=asyncio.subprocess.PIPE,
                )
            )
    else:
        host, port = redis_address(args.url)
        procs.append(
            await asyncio.create_subprocess_exec(
                args.redis_benchmark,
                "-h",
                host,
                "-p",
                str(port),
                "-c",
                str(publishers),
                "-P",
                str(args.pipeline),
                "-n",
                str(total),
                "-r",
                str(args.channels),
                "--csv",
                "PUBLISH",
                f"{args.prefix}{USER_HEAD}__rand_int__",
                payload(args.prefix, 0, 0).decode(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        )
    for p in procs:
        with contextlib.suppress(psutil.Error):
            ps.append(psutil.Process(p.pid))
    pub_cpu: dict[int, float] = {}

    def sample_publishers() -> None:
        for p in ps:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                pub_cpu[p.pid] = t.user + t.system

    outputs: list[bytes] = []
    deadline = time.monotonic() + args.budget
    while any(p.returncode is None for p in procs) and time.monotonic() < deadline:
        sample_publishers()
        await asyncio.sleep(0.05)
    for p in procs:
        out, _ = await asyncio.wait_for(p.communicate(), 30)
        outputs.append(out)
    # The last messages may still be on their way to the subscribers.
    expected = total * size
    settle = time.monotonic() + 10
    while sum(s.bytes for s in subs) < expected and time.monotonic() < settle:
        await asyncio.sleep(0.02)
    wall = time.time() - t0
    received_bytes = sum(s.bytes for s in subs)
    received = received_bytes // size
    firsts = [s.first for s in subs if s.first]
    first, last = (min(firsts), max(s.last for s in subs)) if firsts else (0.0, 0.0)
    span = last - first
    redis_s = process_cpu(redis_pid) - redis0
    me_s = time.process_time() - me0
    pub_s = sum(pub_cpu.values())
    busy = machine_busy() - busy0
    result: dict[str, Any] = {
        "tool": tool,
        "publishers": publishers,
        "pipeline": args.pipeline,
        "messages": total,
        "received": received,
        "complete": received_bytes == expected,
        "odd_bytes": received_bytes % size,
        "subscriber_lost": any(s.lost for s in subs),
        "span_s": span,
        "rate": received / span if span > 0 else 0.0,
        "cpu": {
            "redis": 100 * redis_s / wall,
            "publishers": 100 * pub_s / wall,
            "subscribers": 100 * me_s / wall,
            "other": max(0.0, 100 * (busy - redis_s - pub_s - me_s) / wall),
            "wall_s": wall,
        },
    }
    # Redis's CPU over the span of the traffic only (the wall time above includes starts).
    result["redis_core_share"] = min(1.0, redis_s / span) if span > 0 else None
    if tool == "py":
        answers = [json.loads(o.decode().strip().splitlines()[-1]) for o in outputs if o.strip()]
        result["unreceived_replies"] = sum(a["unreceived"] for a in answers)
        result["publisher_rates"] = [a["rate"] for a in answers]
        # CPU in RedisBroker.publish alone, per message (without making the notifications).
        result["publisher_client_us"] = [a["publish_us"] for a in answers]
    else:
        text = outputs[0].decode(errors="replace").strip().splitlines() if outputs else []
        result["redis_benchmark_csv"] = text[-1] if text else ""
    return result


async def capacity(args: argparse.Namespace) -> dict[str, Any]:
    host, port = redis_address(args.url)
    redis_pid = listener_pid(port)
    size = message_bytes(args.prefix)
    subs = await subscribe(args.url, args.prefix, args.channels, args.subscribers)
    tests: list[dict[str, Any]] = []
    try:
        plan: list[tuple[str, int]] = [("py", n) for n in args.py_publishers]
        if args.redis_benchmark and shutil.which(args.redis_benchmark):
            plan += [("redis-benchmark", n) for n in args.rb_clients]
        for tool, n in plan:
            result = await run_test(
                args, subs, tool=tool, publishers=n, redis_pid=redis_pid, size=size
            )
            tests.append(result)
            print(
                f"[redis-capacity] {tool} x{n}: {result['rate']:,.0f} msg/s, redis "
                f"{result['cpu']['redis']:.0f}% of a core, publishers "
                f"{result['cpu']['publishers']:.0f}%, complete={result['complete']}",
                file=sys.stderr,
                flush=True,
            )
            if any(s.lost for s in subs):
                break
            await asyncio.sleep(1.0)
    finally:
        for s in subs:
            if s.transport is not None:
                s.transport.close()
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [
                "redis-cli",
                "-h",
                host,
                "-p",
                str(port),
                "CONFIG",
                "GET",
                "client-output-buffer-limit",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.split("\n")
        info["client_output_buffer_limit"] = out[1] if len(out) > 1 else ""
    return {
        "url_host": f"{host}:{port}",
        "redis_pid": redis_pid,
        "channels": args.channels,
        "subscribers": args.subscribers,
        "message_bytes": size,
        "payload_bytes": len(payload(args.prefix, 0, 0)),
        "tests": tests,
        **info,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client-cost":
        p = argparse.ArgumentParser(
            prog="python -m bench.redis_capacity client-cost",
            description="Client CPU per PUBLISH (µs, best of 3, channels without a subscriber): "
            "the gateway's RedisBroker.publish (gateway_broker_us) and redis-py as the broker "
            "used it before, by default (redis_py_default_us) and with socket_timeout=None "
            "(redis_py_no_socket_timeout_us). Prints one JSON line.",
        )
        p.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        p.add_argument("--channels", type=int, default=10_000, help="per-user channels (10000)")
        p.add_argument("--messages", type=int, default=50_000, help="per run (50000)")
        p.add_argument("--pipeline", type=int, default=1000, help="PUBLISHes per pipeline (1000)")
        from bench.redis_client_cost import client_cost

        print(json.dumps(uvloop.run(client_cost(p.parse_args(sys.argv[2:])))), flush=True)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "publish":
        p = argparse.ArgumentParser(
            prog="python -m bench.redis_capacity publish",
            description="One publisher process of a test (started by the test itself): "
            "RedisBroker.publish of --pipeline notifications at a time, one batch in flight.",
        )
        p.add_argument("--url", required=True)
        p.add_argument("--prefix", required=True, help="the broker's channel prefix")
        p.add_argument("--channels", type=int, required=True)
        p.add_argument("--count", type=int, required=True, help="messages to publish")
        p.add_argument("--offset", type=int, default=0, help="first sequence number")
        p.add_argument("--pipeline", type=int, default=1000)
        a = p.parse_args(sys.argv[2:])
        print(json.dumps(uvloop.run(publish(a))), flush=True)
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_capacity",
        description="PUBLISH throughput to per-user channels with one subscriber each: "
        "publishers running the gateway's RedisBroker.publish, then redis-benchmark.",
        epilog="python -m bench.redis_capacity client-cost --help: the publishing client's "
        "CPU per PUBLISH alone.",
    )
    parser.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--prefix",
        default=f"bench:cap:{uuid.uuid4().hex[:8]}:",
        help="channel prefix (the broker's), random by default",
    )
    parser.add_argument("--channels", type=int, default=10_000, help="per-user channels (10000)")
    parser.add_argument("--subscribers", type=int, default=2, help="pub/sub connections (2)")
    parser.add_argument("--messages", type=int, default=300_000, help="per test (300000)")
    parser.add_argument("--pipeline", type=int, default=1000, help="PUBLISHes per pipeline (1000)")
    parser.add_argument(
        "--py-publishers",
        default="1,2",
        help="publisher processes running the gateway's RedisBroker.publish, one test per "
        "value (1,2)",
    )
    parser.add_argument(
        "--rb-clients", default="2", help="redis-benchmark connections, one test per value (2)"
    )
    parser.add_argument(
        "--redis-benchmark",
        default="redis-benchmark",
        help="the redis-benchmark binary; empty skips it",
    )
    parser.add_argument("--budget", type=float, default=120, help="seconds per test at most")
    args = parser.parse_args()
    args.py_publishers = [int(x) for x in args.py_publishers.split(",") if x.strip()]
    args.rb_clients = [int(x) for x in args.rb_clients.split(",") if x.strip()]
    common.raise_nofile()
    print(json.dumps(uvloop.run(capacity(args))), flush=True)


if __name__ == "__main__":
    main()
