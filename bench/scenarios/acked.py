"""v1 against v2 with every client acknowledging: the same fan-out, one pass each.

One gateway, one topic, C users (``--v2-connections``, the big count by default). The C
users connect as v1 clients; K messages are produced live as fast as a producer can; the
clients' frames give throughput and latency as in the fan-out scenario. They disconnect
and connect again offering ``notify.v2``: K more messages, and every client acknowledges
every notification, batched as a client would (``--v2-ack-ms``, ``--v2-ack-ids``). For
each pass the store's load is read: the scratch database's statistics (transactions, rows
inserted, deleted and updated in its tables) and the gateway's store counters, from just
before the messages are produced until the last acknowledgement has settled.

A gateway that selects no subprotocol speaks v1 only: the v2 pass then records
"server speaks v1 only" and is skipped.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench import common
from bench.harness import Harness
from bench.processes import WS_PATH, Gateway, log
from bench.results import AckCounts, Acked, ProtocolPass, StoreLoad

V1_ONLY = "server speaks v1 only"
# The gateway's counters that say what the store did (summed over labels).
STORE_METRICS = ("stor", "flush", "ack", "expir", "delet", "pending", "gap", "resen", "status")
SETTLE_S = 15.0  # at most this long for the database's statistics to stop moving

STATS_SQL = """
SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database
        WHERE datname = current_database()) AS transactions,
       coalesce(sum(n_tup_ins), 0)::bigint AS inserted,
       coalesce(sum(n_tup_del), 0)::bigint AS deleted,
       coalesce(sum(n_tup_upd), 0)::bigint AS updated,
       coalesce(sum(idx_scan), 0)::bigint AS index_scans
FROM pg_stat_user_tables
"""


class StoreMeter:
    """Snapshots of the store's statistics and the gateway's store counters."""

    def __init__(self, h: Harness, gw: Gateway, db: asyncpg.Connection) -> None:
        self.h = h
        self.gw = gw
        self.db = db
        self.reads = 0  # our own statements, each a transaction of the database

    async def snapshot(self) -> tuple[dict[str, int], dict[str, float]]:
        row = await self.db.fetchrow(STATS_SQL)
        self.reads += 1
        assert row is not None
        metrics = await self.gw.metrics(self.h.http)
        moved = {
            k: v
            for k, v in metrics.items()
            if k.startswith("notify_")
            and not k.endswith("_bucket")
            and any(word in k for word in STORE_METRICS)
        }
        return {k: int(v) for k, v in row.items()}, moved

    async def settled(self) -> tuple[dict[str, int], dict[str, float], int]:
        """A snapshot once two in a row agree (PostgreSQL publishes a backend's
        statistics up to a second late), or after SETTLE_S; with our reads so far."""
        deadline = time.monotonic() + SETTLE_S
        last = await self.snapshot()
        while time.monotonic() < deadline:
            await asyncio.sleep(1.1)
            now = await self.snapshot()
            rows_now = {k: v for k, v in now[0].items() if k != "transactions"}
            rows_last = {k: v for k, v in last[0].items() if k != "transactions"}
            if rows_now == rows_last and now[1] == last[1]:
                return (*now, self.reads)
            last = now
        log("  the store's statistics were still moving: read as they were")
        return (*last, self.reads)


def load(
    before: tuple[dict[str, int], dict[str, float], int],
    after: tuple[dict[str, int], dict[str, float], int],
    rows_left: int,
) -> StoreLoad:
    """What the store did between two settled snapshots, less our own reads."""
    d = {k: after[0][k] - before[0].get(k, 0) for k in after[0]}
    gateway = {k: v - before[1].get(k, 0.0) for k, v in after[1].items()}
    return StoreLoad(
        transactions=max(0, d["transactions"] - (after[2] - before[2])),
        rows_inserted=d["inserted"],
        rows_deleted=d["deleted"],
        rows_updated=d["updated"],
        index_scans=d["index_scans"],
        rows_left=rows_left,
        gateway={k: v for k, v in gateway.items() if v},
    )


async def one_pass(
    h: Harness, gw: Gateway, meter: StoreMeter, p: ProtocolPass, topic: str, seq: int
) -> None:
    """Connect the users as ``p.protocol`` clients, produce K live, read the store."""
    o, res = h.o, h.results.acked
    assert res is not None
    count = res.connections
    log(f"v1/v2: {count} {p.protocol} clients connecting")
    connect = p.connect = await h.connect_storm(
        gw,
        port=gw.port,
        path=WS_PATH,
        population=common.ACKED,
        count=count,
        auth="token",
        salt=f"{h.run_id}-acked",
        count_registered=True,
        protocol=p.protocol,
        ack_ms=o.v2_ack_ms,
        ack_ids=o.v2_ack_ids,
    )
    try:
        p.open_after_connect = (await h.lg.stats()).open
        if p.open_after_connect < count:
            log(f"  only {p.open_after_connect} of {count} connections open after the storm")
        if p.protocol == "v2":
            if not connect.ok:
                p.skipped = f"no v2 client connected ({connect.errors})"
            elif not connect.v2_selected:
                p.skipped = V1_ONLY
            elif connect.v2_selected < connect.ok:
                log(f"  notify.v2 selected on {connect.v2_selected} of {connect.ok} only")
            if p.skipped:
                log(f"  v2 pass skipped: {p.skipped}")
                return
        before = await meter.settled()
        log(f"v1/v2: {o.messages} messages produced live to {count} {p.protocol} clients")
        live = p.live = await h.measure_frames(
            gw,
            o.messages,
            lambda: h.produce(
                topic, population=common.ACKED, users=count, count=o.messages, seq_start=seq
            ),
            budget=300,
            seqs=(seq, o.messages),
        )
        # The last ids wait at most an ack interval in the clients.
        await asyncio.sleep(2 * o.v2_ack_ms / 1000 + 0.5)
        stats = await h.lg.stats()
        if p.protocol == "v2":
            p.acks = AckCounts(
                acked_ids=stats.acked,
                ack_frames=stats.ack_frames,
                unacked_ids=stats.unacked,
                control=stats.control,
                delay_ms=stats.ack_delay_ms,
            )
        after = await meter.settled()
        store = p.store = load(before, after, await h.stored_rows(common.ACKED))
        lat = live.latency_ms
        log(
            f"  {live.rate:.0f} delivered/s, p50 {lat.p50 if lat else float('nan'):.1f} ms, "
            f"p99 {lat.p99 if lat else float('nan'):.1f} ms; store: {store.rows_inserted} "
            f"inserted, {store.rows_deleted} deleted, {store.transactions} transactions, "
            f"{store.rows_left} left"
        )
        if p.acks is not None:
            log(
                f"  acks: {p.acks.acked_ids} ids in {p.acks.ack_frames} frames, "
                f"{p.acks.unacked_ids} waiting, sent {p.acks.delay_ms} ms after receipt; "
                f"other frames {p.acks.control}"
            )
    finally:
        await h.lg.close_all()
        await h.wait_connections(gw, 0)


async def run(h: Harness) -> None:
    o = h.o
    count = o.v2_connections or o.big
    res = h.results.acked = Acked(
        connections=count, messages=o.messages, ack_ms=o.v2_ack_ms, ack_ids=o.v2_ack_ids
    )
    topic = await h.new_topic("acked")
    gw = h.gateway(
        "acked",
        KAFKA_TOPIC=topic,
        KAFKA_DLQ_TOPIC=f"{topic}.dlq",
        # The clients come from two addresses, 50 handshakes in flight each: the default
        # limits of sockets awaiting their token check would refuse some (1013), and their
        # users' notifications would be stored instead of sent.
        MAX_UNAUTHENTICATED=str(count),
        MAX_UNAUTHENTICATED_PER_ADDRESS=str(count),
    )
    await gw.start()
    db = await asyncpg.connect(h.db_url)
    try:
        await gw.wait_http(h.http, "/health/live")
        await gw.wait_http(h.http, "/health/ready", timeout=60)
        await h.warm_up(gw.port, WS_PATH, "token")
        meter = StoreMeter(h, gw, db)
        for n, protocol in enumerate(("v1", "v2")):
            p = res.passes[protocol] = ProtocolPass(protocol)
            await one_pass(h, gw, meter, p, topic, seq=20 * o.messages + n * o.messages)
            res.skipped = res.skipped or p.skipped
        if res.ratio is not None:
            log(f"  v2/v1 throughput {res.ratio:.2f}x (target >= 0.8x)")
    finally:
        res.log_tail = gw.tail(1500)
        await db.close()
        await gw.stop()
