"""A gateway with C clients: memory per connection, the uncached connect storm, Kafka to
socket (drain of K pre-produced), K produced live, paced latency, the cached storm.

Kafka to socket: the K messages are produced *before* the gateway's consumer starts.
The gateway bootstraps Kafka through a ``Gate`` that holds it until every client is
connected; the gate then opens and the gateway drains the topic. Delivered/s is frames
received over the span from the first to the last frame. The live pass produces K
more as fast as a producer can, for latency from the producer's timestamp to receipt.
"""

from __future__ import annotations

import asyncio
import contextlib

from bench import common
from bench.gate import Gate
from bench.harness import Harness
from bench.processes import WS_PATH, log
from bench.profiling import Profiler
from bench.results import Census, Connect, Fanout, ObjectsPerConnection


def objects_per_connection(before: Census, after: Census, n: int) -> ObjectsPerConnection:
    """Growth of the collector's tracked objects per connection: in all, top 20 types."""
    n = max(1, n)
    grown = {
        kind: (after.types.get(kind, 0) - before.types.get(kind, 0)) / n for kind in after.types
    }
    return ObjectsPerConnection(
        total=(after.total - before.total) / n,
        by_type=dict(sorted(grown.items(), key=lambda kv: -kv[1])[:20]),
    )


async def run(h: Harness, count: int, big: bool) -> None:
    """The big count also measures memory, paced latency and the cached storm."""
    o, lg = h.o, h.lg
    label = f"fanout{count}"
    res = h.results.fanout[count] = Fanout(connections=count)
    topic = await h.new_topic(label)
    drain = o.wants("live")
    if drain:
        log(f"gateway {count}: pre-producing {o.messages} messages")
        res.preproduce = await h.produce(
            topic, population=common.LIVE, users=count, count=o.messages
        )
        log(f"  {res.preproduce.rate:.0f} msg/s into Kafka")
    gate = Gate(o.kafka)
    await gate.start()
    gw = h.gateway(
        label,
        KAFKA_BOOTSTRAP_SERVERS=gate.address,
        KAFKA_TOPIC=topic,
        KAFKA_DLQ_TOPIC=f"{topic}.dlq",
    )
    await gw.start()
    profiler: Profiler | None = None

    async def profile(window: str) -> None:
        nonlocal profiler
        if big and o.profile:
            profiler = await Profiler.start(h.logs, gw.pid, window)

    async def profiled(window: str) -> None:
        nonlocal profiler
        if profiler is not None:
            res.profiles[window] = await profiler.stop()
            profiler = None

    async def storm(window: str) -> Connect:
        """The C users connect, every time with the same tokens: the first storm's are
        new to the gateway (uncached), a second storm's are in its cache."""
        await profile(window)
        connect = await h.connect_storm(
            gw,
            port=gw.port,
            path=WS_PATH,
            population=common.LIVE,
            count=count,
            auth="token",
            salt=f"{h.run_id}-{label}",
            count_registered=True,
        )
        await profiled(window)
        return connect

    try:
        await gw.wait_http(h.http, "/health/live")
        await h.warm_up(gw.port, WS_PATH, "token")
        census0 = await gw.census() if big else None
        rss0 = gw.rss()
        log(f"gateway {count}: connecting {count} (remote auth, uncached)")
        connect = res.connect = await storm(window="connect-uncached")
        await asyncio.sleep(2)
        res.rss_per_conn_kb = (gw.rss() - rss0) / max(1, connect.ok) / 1024
        log(f"  {connect.rate:.0f} handshakes/s, {res.rss_per_conn_kb:.1f} KB/conn")
        census1 = await gw.census() if census0 else None
        if census0 and census1:
            res.gc_objects_per_conn = objects_per_connection(census0, census1, connect.ok)
            log(f"  {res.gc_objects_per_conn.total:.0f} GC-tracked objects per connection")
        if drain:
            await profile("fanout")
            log(f"gateway {count}: draining {o.messages} pre-produced messages")

            async def open_gate() -> None:
                await gate.open()

            res.drain = await h.measure_frames(gw, o.messages, open_gate, budget=300, latency=False)
            log(f"  {res.drain.rate:.0f} notifications/s")
            log(f"gateway {count}: {o.messages} messages produced live")
            live = res.live = await h.measure_frames(
                gw,
                o.messages,
                lambda: h.produce(
                    topic,
                    population=common.LIVE,
                    users=count,
                    count=o.messages,
                    seq_start=o.messages,
                ),
                budget=300,
            )
            assert live.producer is not None and live.latency_ms is not None
            log(
                f"  {live.rate:.0f} delivered/s (producer {live.producer.rate:.0f}/s), "
                f"p50 {live.latency_ms.p50:.1f} ms, p99 {live.latency_ms.p99:.1f} ms"
            )
            await profiled("fanout")
        else:
            await gate.open()
        await gw.wait_http(h.http, "/health/ready", timeout=60)
        if big and o.wants("paced"):
            await profile("paced")
            n = int(o.paced_rate * o.paced_seconds)
            log(f"gateway {count}: paced {o.paced_rate:.0f}/s for {o.paced_seconds:.0f} s")
            paced = res.paced = await h.measure_frames(
                gw,
                n,
                lambda: h.produce(
                    topic,
                    population=common.LIVE,
                    users=count,
                    rate=o.paced_rate,
                    duration=o.paced_seconds,
                    seq_start=10 * o.messages,
                ),
                budget=o.paced_seconds + 120,
            )
            worst = max(paced.timeline, key=lambda b: b.max_ms, default=None)
            if worst:
                slow = sum(1 for b in paced.timeline if b.p99_ms > 25)
                log(
                    f"  worst second t={worst.t} s: max {worst.max_ms:.0f} ms; "
                    f"{slow} of {len(paced.timeline)} seconds with p99 > 25 ms"
                )
            lat = paced.latency_ms
            assert lat is not None
            log(f"  p50 {lat.p50:.1f} ms, p99 {lat.p99:.1f} ms, p999 {lat.p999:.1f} ms")
            await profiled("paced")
        res.metrics = await gw.metrics(h.http)
        if big and o.wants("storm"):
            await lg.close_all()
            await h.wait_connections(gw, 0)
            checks = await h.auth_checks()
            log(f"gateway {count}: reconnecting {count} with the same tokens (cached)")
            cached = await storm(window="connect-cached")
            cached.auth_service_calls = await h.auth_checks() - checks
            res.connect_cached = cached
            log(f"  {cached.rate:.0f} handshakes/s, {cached.auth_service_calls} auth service calls")
        await lg.close_all()
    finally:
        if profiler is not None:
            with contextlib.suppress(Exception):
                await profiler.stop()
        res.log_tail = gw.tail(1500)
        await gw.stop()
        await gate.close()
