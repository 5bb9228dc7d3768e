"""Scale-out through Redis: the live fan-out with C users through several gateway set-ups
in turn (``options.SCALE_SETUPS``: 1 process without Redis, 1 process with ``REDIS_URL``,
2 workers with it, and the last two again with each process capped at ``--scale-quota``
of a core), each on its own topic of ``--scale-partitions`` partitions; then Redis alone
(``redis_capacity``). A set-up's CPU is summed over its process tree (Sanic's manager
and its workers), and each worker's is shown beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psutil
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from bench import common
from bench.cpu import (
    CpuQuota,
    Meters,
    listener_pid,
    machine_busy,
    shares,
    throttled_shares,
)
from bench.gate import Gate
from bench.harness import Harness, Trigger
from bench.options import SCALE_RATIOS, SCALE_SETUPS
from bench.processes import WS_PATH, Gateway, log, log_events, url_port
from bench.profiling import Profiler
from bench.results import Frames, GroupChange, Scale, ScaleSetup
from bench.scenarios import redis_capacity


async def run(h: Harness) -> None:
    """Every set-up of ``--scale-setups`` in order, the ratios, then Redis alone."""
    o = h.o
    h.redis_pid = redis_pid(o.redis_url)
    res = h.results.scale = Scale(
        connections=o.scale_connections, messages=o.messages, partitions=o.scale_partitions
    )
    redis: Redis = Redis.from_url(o.redis_url)
    try:
        needs_redis = o.redis_capacity_messages > 0 or any(
            SCALE_SETUPS[s].redis for s in o.scale_setups
        )
        if needs_redis:
            try:
                await asyncio.wait_for(redis.ping(), 5)
            except Exception as exc:
                why = f"no Redis at {o.redis_url} ({type(exc).__name__}; scripts/redis.sh start)"
                if o.scale_named:
                    raise RuntimeError(why) from None
                log(f"scale: skipped: {why}")
                res.skipped = why
                return
        for index, name in enumerate(o.scale_setups):
            res.setups[name] = await setup(h, name, index, redis)
    finally:
        await redis.aclose()
    for top, bottom, _ in SCALE_RATIOS:
        for p in ("drain", "live"):
            a, b = rate(res, top, p), rate(res, bottom, p)
            if a and b:
                res.ratios[f"{top}/{bottom} {p}"] = a / b
    if res.ratios:
        log("scale: " + ", ".join(f"{k} {v:.2f}x" for k, v in res.ratios.items()))
    if o.redis_capacity_messages > 0:
        res.redis_capacity = await redis_capacity.run(h)


def redis_pid(url: str) -> int | None:
    return listener_pid(url_port(url, 6379))


def rate(scale: Scale, setup_name: str, phase: str) -> float | None:
    s = scale.setups.get(setup_name)
    frames = None if s is None else (s.drain if phase == "drain" else s.live)
    return None if frames is None else frames.rate


async def setup(h: Harness, name: str, index: int, redis: Redis) -> ScaleSetup:
    """One gateway set-up: C users connect, K pre-produced drain through a gate, K live."""
    o, lg = h.o, h.lg
    spec = SCALE_SETUPS[name]
    workers = spec.workers
    count, k = o.scale_connections, o.messages
    population = common.SCALE + index  # own users per set-up: nothing left over is flushed
    res = ScaleSetup(what=spec.what, workers=workers, redis=spec.redis)
    if spec.capped:
        why = CpuQuota.unavailable()
        if why:
            log(f"scale {name}: skipped: {why}")
            res.skipped = why
            return res
        res.quota_cores = o.scale_quota
        res.what = f"{spec.what} at {o.scale_quota:g} core each"
    topic = await h.new_topic(f"scale-{name}", partitions=o.scale_partitions)
    log(f"scale {name} ({res.what}): pre-producing {k} messages for {count} users")
    res.preproduce = await h.produce(topic, population=population, users=count, count=k)
    prefix = f"bench:{h.run_id}:{name}:"
    group = f"bench-{h.run_id}-scale-{name}"
    env = {
        "KAFKA_TOPIC": topic,
        "KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        "KAFKA_GROUP_ID": group,
        "AUTH_MODE": "jwt",
        "AUTH_JWT_SECRET": common.BENCH_SECRET,
        "NOTIFY_WORKERS": str(workers),
    }
    if spec.redis:
        env |= {"REDIS_URL": o.redis_url, "REDIS_CHANNEL_PREFIX": prefix}
    gate = Gate(o.kafka)
    await gate.start()
    gw = h.gateway(f"scale-{name}", tree=True, KAFKA_BOOTSTRAP_SERVERS=gate.address, **env)
    await gw.start()
    profiler: Profiler | None = None
    quotas: list[CpuQuota] = []
    try:
        await gw.wait_http(h.http, "/health/live")
        deadline = time.monotonic() + 60
        while len(gw.workers()) < workers and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        pids = res.worker_pids = [p.pid for p in gw.workers()]
        if len(pids) != workers:
            raise RuntimeError(f"{gw.name}: {len(pids)} of {workers} workers up:\n{gw.tail()}")
        if spec.capped:
            quotas = [
                CpuQuota(f"notify-bench-{h.run_id}-{name}-{pid}", o.scale_quota, pid)
                for pid in pids
            ]
        if spec.redis:
            # Workers inherit the listening socket before they serve, and one whose
            # Redis subscriber is not connected yet turns clients away (4503): wait
            # for every worker's control channel.
            res.brokers_up_s = await wait_brokers(redis, prefix, workers)
        log(f"scale {name}: connecting {count} (JWT checked locally)")
        connect = res.connect = await h.connect_storm(
            gw,
            port=gw.port,
            path=WS_PATH,
            population=population,
            count=count,
            auth="token",
            salt=f"{h.run_id}-scale-{name}",
        )
        connect.cpu = None  # connecting is not what is measured here
        if connect.ok != count:
            raise RuntimeError(f"{gw.name}: {connect.ok} of {count} connected")
        res.registered_s = await wait_registered(h, gw, redis, prefix, count)
        after = await lg.stats()
        res.open_after_connect, res.closes_after_connect = after.open, after.closes
        if after.open != count:
            log(f"  {count - after.open} connections closed: {after.closes}")
        res.connections_per_worker = gw.connections_per_worker({w.source_ip for w in lg.workers})
        log(
            f"  {connect.rate:.0f} handshakes/s; connections per worker: "
            f"{res.connections_per_worker}"
        )
        if o.profile:
            profiler = await Profiler.start(h.logs, pids[0], f"scale-{name}")
        stop_watch = asyncio.Event()
        watch = asyncio.create_task(watch_group(h, group, stop_watch))

        async def open_gate() -> None:
            await gate.open()

        log(f"scale {name}: draining {k} pre-produced messages")
        before = [q.throttling() for q in quotas]
        drain = res.drain = await measure_frames_tree(h, gw, k, open_gate, seqs=(0, k))
        if quotas:
            drain.throttled = throttled_shares(before, [q.throttling() for q in quotas])
        stop_watch.set()
        res.group = await watch
        drain.per_second = [b.n for b in drain.timeline]
        drain.timeline = []
        drain.latency_ms = None  # pre-produced: the age of the message, not latency
        log(
            f"  {drain.rate:.0f} msg/s, {drain.frames} frames "
            f"({drain.missing} missing, {drain.dupes} twice); "
            f"group: {' -> '.join(str(g.partitions) for g in res.group)}"
        )
        log(f"scale {name}: {k} messages produced live")
        before = [q.throttling() for q in quotas]
        live = res.live = await measure_frames_tree(
            h,
            gw,
            k,
            lambda: h.produce(topic, population=population, users=count, count=k, seq_start=k),
            seqs=(k, k),
        )
        live.per_second = [b.n for b in live.timeline]
        live.timeline = []
        if quotas:
            live.throttled = throttled_shares(before, [q.throttling() for q in quotas])
        assert live.producer is not None and live.latency_ms is not None
        log(
            f"  {live.rate:.0f} msg/s (producer {live.producer.rate:.0f}/s), "
            f"p50 {live.latency_ms.p50:.0f} ms, p99 {live.latency_ms.p99:.0f} ms,"
            f" {live.missing} missing, {live.dupes} twice"
        )
        if profiler is not None:
            res.profile = await profiler.stop()
            profiler = None
        res.stored_left = await h.stored_rows(population)
        if res.stored_left:
            log(f"  {res.stored_left} notifications stored, not delivered")
        await lg.close_all()
    finally:
        if profiler is not None:
            with contextlib.suppress(Exception):
                await profiler.stop()
        res.log_events = log_events(gw.log_path)
        res.log_tail = gw.tail(1500)
        await gw.stop()
        await gate.close()
        for quota in quotas:
            if not quota.remove():
                log(f"  could not remove {quota.path}")
    return res


async def measure_frames_tree(
    h: Harness, gw: Gateway, expected: int, trigger: Trigger, *, seqs: tuple[int, int]
) -> Frames:
    """``measure_frames`` with Redis in the CPU window and each worker's CPU beside it.

    ``cpu`` covers the whole window (from the trigger: consumer start-up or producer
    start included); ``cpu_flowing`` only the span from the first frame to the last,
    from readings taken every 0.2 s: what each part used while the gateway worked.
    """
    procs = gw.workers()
    meters = Meters(
        loadgen=h.lg.cpu,
        kafka=h.kafka_cpu,
        redis=h.redis_cpu,
        postgres=h.postgres_cpu,
        server=gw.cpu,
    )
    me = psutil.Process()
    producers: dict[int, float] = {}

    def producer_cpu() -> float:
        # bench/producer.py runs as a child of this process during the live pass.
        with contextlib.suppress(psutil.Error):
            for child in me.children():
                with contextlib.suppress(psutil.Error):
                    if "bench.producer" in child.cmdline():
                        t = child.cpu_times()
                        producers[child.pid] = t.user + t.system
        return sum(producers.values())

    def worker_cpu() -> list[float]:
        out = []
        for p in procs:
            try:
                t = p.cpu_times()
                out.append(t.user + t.system)
            except psutil.Error:
                out.append(float("nan"))
        return out

    samples: list[tuple[float, dict[str, float], list[float], float]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            values = meters.read()
            values["producer"] = producer_cpu()
            samples.append((time.time(), values, worker_cpu(), machine_busy()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    sampler = asyncio.create_task(sample())
    before, t0 = worker_cpu(), time.monotonic()
    try:
        out = await h.measure_frames(gw, expected, trigger, budget=300, seqs=seqs, meters=meters)
    finally:
        stop.set()
        await sampler
    wall = time.monotonic() - t0
    out.cpu.workers = [100 * (b - a) / wall for a, b in zip(before, worker_cpu(), strict=True)]
    first, last = out.first_at or 0.0, out.last_at or 0.0
    inside = [x for x in samples if first <= x[0] <= last]
    if len(inside) >= 2 and inside[-1][0] - inside[0][0] >= 0.5:
        (ta, a, wa, ba), (tb, b, wb, bb) = inside[0], inside[-1]
        dt = tb - ta
        # (a PostgreSQL backend that exits between readings can make its part negative:
        # shares() counts it 0)
        flowing = shares(a, b, dt, bb - ba)
        flowing.workers = [100 * (y - x) / dt for x, y in zip(wa, wb, strict=True)]
        out.cpu_flowing = flowing
    return out


async def wait_brokers(redis: Redis, prefix: str, want: int) -> float:
    """Seconds until ``want`` gateway processes subscribed their control channel."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if len(await redis.pubsub_channels(f"{prefix}node:*")) >= want:
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{want} gateway processes did not all connect to Redis in 60 s")


async def wait_registered(h: Harness, gw: Gateway, redis: Redis, prefix: str, want: int) -> float:
    """Seconds until every connection is registered (with Redis: its user's channel
    subscribed, which the gateway does before registering)."""
    t0 = time.monotonic()
    deadline = t0 + 120
    while time.monotonic() < deadline:
        if gw.env.get("REDIS_URL"):
            channels = await redis.pubsub_channels(f"{prefix}*")
            node = f"{prefix}node:"
            have = sum(
                1
                for c in channels
                if not (c.decode() if isinstance(c, bytes) else c).startswith(node)
            )
        else:
            have = int((await gw.metrics(h.http)).get("notify_connections", -1))
        if have >= want:
            return time.monotonic() - t0
        await asyncio.sleep(0.2)
    log(f"  {gw.name}: not all {want} connections registered after 120 s")
    return float("nan")


async def watch_group(h: Harness, group: str, stop: asyncio.Event) -> list[GroupChange]:
    """The consumer group's changes while the gate opens: state, partitions per member."""
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    changes: list[GroupChange] = []
    t0 = time.monotonic()
    last: tuple[Any, ...] | None = None
    admin = AIOKafkaAdminClient(bootstrap_servers=h.o.kafka)
    await admin.start()
    try:
        while not stop.is_set() and time.monotonic() - t0 < 300:
            with contextlib.suppress(Exception):
                (answer,) = await admin.describe_consumer_groups([group])
                g = answer.groups[0]
                state, members = g[2], g[5]
                parts = sorted(
                    len(ConsumerProtocolMemberAssignment.decode(m[-1]).partitions()) if m[-1] else 0
                    for m in members
                )
                key = (state, tuple(parts))
                if key != last:
                    last = key
                    changes.append(
                        GroupChange(
                            t=round(time.monotonic() - t0, 2), state=state, partitions=parts
                        )
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        await admin.close()
    return changes
