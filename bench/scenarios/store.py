"""Offline store (K messages for users never connected), then the flush on connect.

The store rate is ``notify_notifications_stored_total`` growth from the first stored
batch to the last; its baseline is the gateway's own INSERT ... unnest from a bare
asyncpg connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime

import asyncpg

from bench import common
from bench.cpu import CpuWindow
from bench.harness import Harness
from bench.options import FLUSH_RUNS
from bench.processes import WS_PATH, log
from bench.results import BareInsert, Store
from bench.scenarios.flush import flush_series


async def run(h: Harness) -> None:
    o = h.o
    res = h.results.store = Store()
    topic = await h.new_topic("store")
    offline = o.messages if o.wants("store") else 0
    flush = o.flush if o.wants("flush") else 0
    log(f"store: pre-producing {offline} offline + {FLUSH_RUNS} x {flush} for flush users")
    if offline:
        res.preproduce = await h.produce(
            topic, population=common.OFFLINE, users=o.big, count=offline
        )
    if flush:
        await h.produce(topic, population=common.FLUSH, users=FLUSH_RUNS, count=flush * FLUSH_RUNS)
    total = offline + flush * FLUSH_RUNS
    gw = h.gateway("store", KAFKA_TOPIC=topic, KAFKA_DLQ_TOPIC=f"{topic}.dlq")
    await gw.start()
    try:
        await gw.wait_http(h.http, "/health/live")
        window = CpuWindow(h.meters(gw))
        started = time.time()
        first_t, first_n, last_t, stored = 0.0, 0.0, 0.0, 0.0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            stored = (await gw.metrics(h.http)).get("notify_notifications_stored_total", 0)
            now = time.time()
            if stored and not first_t:
                first_t, first_n = now, stored
            if stored >= total:
                last_t = now
                break
            await asyncio.sleep(0.05)
        res.cpu = window.close()
        async with contextlib.AsyncExitStack() as stack:
            conn = await asyncpg.connect(h.db_url)
            stack.push_async_callback(conn.close)
            res.rows = int(await conn.fetchval("SELECT count(*) FROM undelivered_notification"))
        res.stored = stored
        res.complete = stored >= total
        if offline:
            span = last_t - first_t if last_t else 0.0
            res.rate = (stored - first_n) / span if span > 0 else 0.0
            res.from_start_s = (last_t or time.time()) - started
            log(f"  {res.rate:.0f} stored/s ({res.rows} rows)")
        if flush:
            log(f"gateway: flush of {flush} stored messages on connect")
            await gw.wait_http(h.http, "/health/ready")
            res.flush = await flush_series(
                h, gw.port, WS_PATH, auth="token", salt=f"{h.run_id}-flush"
            )
            log(f"  {res.flush.median.to_last_ms:.1f} ms to the last frame")
            await h.lg.close_all()
    finally:
        res.log_tail = gw.tail(1500)
        await gw.stop()
    if offline:
        res.bare_insert = await bare_insert(h, offline)
        log(f"bare asyncpg insert: {res.bare_insert.rate:.0f} rows/s")


async def bare_insert(h: Harness, n: int, batch: int = 1000) -> BareInsert:
    """Baseline of the store: the gateway's own INSERT ... unnest, batches of 1000, bare."""
    conn = await asyncpg.connect(h.db_url)
    try:
        await conn.execute(
            "CREATE TABLE bench_bare_store (LIKE undelivered_notification INCLUDING ALL)"
        )
        body = common.body(common.now_us(), 0)
        now = datetime.now(UTC)
        rows = [
            (uuid.uuid4(), common.user_id(common.OFFLINE, i % h.o.big), "bench", body, now)
            for i in range(n)
        ]
        sql = (
            "INSERT INTO bench_bare_store (message_id, user_id, title, body, created_at) "
            "SELECT * FROM unnest($1::uuid[], $2::varchar[], $3::text[], $4::text[], "
            "$5::timestamptz[]) ON CONFLICT (user_id, message_id) DO NOTHING"
        )
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            chunk = rows[i : i + batch]
            await conn.execute(sql, *(list(col) for col in zip(*chunk, strict=True)))
        seconds = time.perf_counter() - t0
        await conn.execute("DROP TABLE bench_bare_store")
        return BareInsert(rows=n, seconds=seconds, rate=n / seconds)
    finally:
        await conn.close()
