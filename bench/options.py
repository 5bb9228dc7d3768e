"""What a run measures and at which sizes: the command line, read once into ``Options``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

SCENARIOS = ("live", "paced", "store", "flush", "storm", "memory", "v2", "scale")
# ``scale`` (the set-ups of SCALE_SETUPS, and Redis's own capacity) adds ~2.5 minutes to
# the default run (~5.5 in all). Without a reachable Redis, a default run skips it;
# ``--only scale`` fails instead.
DEFAULT_SCENARIOS = SCENARIOS
FLUSH_RUNS = 3  # users with a stored backlog, flushed one after another; the median counts
V2_TARGET = 0.8  # v2 with every client acknowledging keeps at least 0.8x v1's throughput
# Centrifugo's tuned consumer: its partition queue (default 1000 records) pauses fetching
# from a partition whenever it fills, and the consumer stalls on each pause.
PEER_QUEUE = 10_000


@dataclass(frozen=True)
class Setup:
    """One gateway set-up of the scale-out scenario."""

    what: str
    workers: int  # NOTIFY_WORKERS
    redis: bool  # with REDIS_URL
    capped: bool  # each process capped at --scale-quota of a core (a cgroup)


SCALE_SETUPS = {
    "single": Setup("1 process, no Redis", 1, False, False),
    "redis1": Setup("1 process + Redis", 1, True, False),
    "redis2": Setup("2 workers + Redis", 2, True, False),
    # The same with each gateway process capped at --scale-quota of a core (a cgroup):
    # on 2 cores the load generator, Kafka and Redis leave 2 uncapped workers ~1.4 cores,
    # so only with a cap do 2 processes get twice the CPU of 1 and show what a second
    # process (or machine) adds.
    "singleq": Setup("1 process, no Redis, capped", 1, False, True),  # only with --scale-setups
    "redis1q": Setup("1 process + Redis, capped", 1, True, True),
    "redis2q": Setup("2 workers + Redis, capped", 2, True, True),
}
DEFAULT_SCALE_SETUPS = ("single", "redis1", "redis2", "redis1q", "redis2q")
# Ratios reported: (numerator, denominator, held to the scale-out target).
SCALE_RATIOS = (
    ("redis2", "redis1", True),
    ("redis2q", "redis1q", True),
    ("redis2", "single", False),
    ("redis1", "single", False),
    ("singleq", "single", False),
)
SCALE_TARGET = 1.6  # the scale-out target: 2 processes deliver at least 1.6x what one does


@dataclass(frozen=True)
class Options:
    """Sizes and switches of one run (``python -m bench.run --help`` says each)."""

    messages: int
    small: int
    big: int
    paced_rate: float
    paced_seconds: float
    storm: int
    flush: int
    workers: int
    concurrency: int
    partitions: int
    scenarios: frozenset[str]
    profile: bool
    budget: float
    kafka: str
    database_url: str
    keep: bool
    quick: bool
    gc_trace: bool
    gateway_gc: str
    update_doc: bool
    scale_named: bool = False
    scale_connections: int = 10_000
    scale_setups: tuple[str, ...] = DEFAULT_SCALE_SETUPS
    scale_partitions: int = 4
    scale_quota: float = 0.5
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_capacity_messages: int = 300_000
    v2_connections: int = 0  # 0: the big count
    v2_ack_ms: float = 50.0
    v2_ack_ids: int = 100
    peers: bool = False
    peer_queue: int = PEER_QUEUE
    argv: tuple[str, ...] = field(default=())

    def wants(self, *scenarios: str) -> bool:
        """Whether any of ``scenarios`` is part of this run."""
        return not self.scenarios.isdisjoint(scenarios)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the gateway against a bare Sanic push loop in the same run.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a ~2-3 minute run")
    p.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of {SCENARIOS} (default: all; v2: the fan-out with v1 "
        "clients, then with v2 clients acknowledging every notification, and the store's "
        "load, skipped with 'server speaks v1 only' when the gateway does not select "
        "notify.v2; scale, the scale-out through Redis, ~1.5 min, is skipped when Redis is "
        "not reachable unless named)",
    )
    p.add_argument("-k", "--messages", type=int, help="K for fan-out and store (100000)")
    p.add_argument("-c", "--connections", help="the two connection counts, small,big (1000,10000)")
    p.add_argument("--paced-rate", type=float, default=5000.0, help="messages/s (5000)")
    p.add_argument("--paced-seconds", type=float, help="seconds of paced load (30)")
    p.add_argument("--storm", type=int, help="connections of the JWT-local storm (5000)")
    p.add_argument("--flush", type=int, default=1000, help="stored messages to flush")
    p.add_argument("--workers", type=int, default=2, help="client processes (2)")
    p.add_argument(
        "--concurrency", type=int, default=50, help="handshakes in flight per client process"
    )
    p.add_argument("--partitions", type=int, default=3, help="partitions per topic (3)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the big fan-out (and with scale: one worker of each set-up)",
    )
    p.add_argument("--budget", type=float, default=1500, help="hard limit, seconds")
    p.add_argument("--kafka", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://notify:notify@127.0.0.1:5432/notify"),
        help="a DSN whose user may CREATE DATABASE; the bench works in a scratch database",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch database")
    p.add_argument(
        "--scale-connections", type=int, help="scale: connected users C (10000; --quick 2000)"
    )
    p.add_argument(
        "--scale-setups",
        default=",".join(DEFAULT_SCALE_SETUPS),
        help=f"scale: which gateway set-ups, in order ({','.join(SCALE_SETUPS)})",
    )
    p.add_argument(
        "--scale-partitions",
        type=int,
        default=4,
        help="scale: partitions of its topics (4; at least 4 and even, so 2 workers split them)",
    )
    p.add_argument(
        "--scale-quota",
        type=float,
        default=0.5,
        help="scale: CPU per gateway process in the capped set-ups, in cores (0.5)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="scale: the Redis the gateways route through (not stopped)",
    )
    p.add_argument(
        "--redis-capacity-messages",
        type=int,
        help="scale: PUBLISHes per Redis capacity test (300000; --quick 100000; 0 skips it)",
    )
    p.add_argument(
        "--v2-connections",
        type=int,
        default=0,
        help="v2: clients of the v1 pass and of the v2 pass (default: the big count)",
    )
    p.add_argument(
        "--v2-ack-ms",
        type=float,
        default=50.0,
        help="v2: each client sends an ack frame at most every this many ms (50; the "
        "gateway allows 20 client frames/s)",
    )
    p.add_argument(
        "--v2-ack-ids",
        type=int,
        default=100,
        help="v2: ...and sooner, once this many ids are waiting and the interval has "
        "passed (100; at most 500 ids a frame)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also Centrifugo (built once with go install, cached under .cache/), GOMAXPROCS=1 "
        "and unset, default and tuned consumer, same Kafka and clients (~4 min more; skipped "
        "with a reason without Go or the module proxy)",
    )
    p.add_argument(
        "--peer-queue",
        type=int,
        default=PEER_QUEUE,
        help=f"peers: the tuned consumer's partition_queue_max_size ({PEER_QUEUE}; default 1000)",
    )
    p.add_argument(
        "--update-doc",
        action="store_true",
        help="also write the table into docs/performance.md (between its bench markers)",
    )
    p.add_argument(
        "--gateway-gc",
        default="",
        metavar="A,B,C",
        help="experiment: gc.set_threshold(A, B, C) in the gateway before it starts",
    )
    p.add_argument(
        "--no-gc-trace",
        dest="gc_trace",
        action="store_false",
        help="run the gateway as plain `python -m service` (no GC pause log)",
    )
    return p


def parse_options(argv: list[str]) -> Options:
    """The options of ``argv``; exits with a usage message when they do not make sense."""
    p = parser()
    a = p.parse_args(argv)
    quick: bool = a.quick
    small, big = (1000, 2000) if quick else (1000, 10000)
    if a.connections:
        small, big = (int(x) for x in a.connections.split(","))
    only = {s.strip() for s in a.only.split(",") if s.strip()} or set(DEFAULT_SCENARIOS)
    if a.v2_ack_ms < 50 or not 1 <= a.v2_ack_ids <= 500:
        p.error("--v2-ack-ms: at least 50 (20 frames/s); --v2-ack-ids: 1 to 500")
    unknown = only - set(SCENARIOS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {SCENARIOS}")
    setups = tuple(s.strip() for s in a.scale_setups.split(",") if s.strip())
    if set(setups) - set(SCALE_SETUPS):
        p.error(f"--scale-setups: choose from {list(SCALE_SETUPS)}")
    return Options(
        messages=a.messages or (20_000 if quick else 100_000),
        small=small,
        big=big,
        paced_rate=a.paced_rate,
        paced_seconds=a.paced_seconds or (5.0 if quick else 30.0),
        storm=a.storm or (1000 if quick else 5000),
        flush=a.flush,
        workers=a.workers,
        concurrency=a.concurrency,
        partitions=a.partitions,
        scenarios=frozenset(only),
        profile=a.profile,
        budget=a.budget,
        kafka=a.kafka,
        database_url=a.database_url,
        keep=a.keep,
        quick=quick,
        gc_trace=a.gc_trace or bool(a.gateway_gc),
        gateway_gc=a.gateway_gc,
        update_doc=a.update_doc,
        scale_named="scale" in a.only,
        scale_connections=a.scale_connections or (2000 if quick else 10_000),
        scale_setups=setups,
        scale_partitions=a.scale_partitions,
        scale_quota=a.scale_quota,
        redis_url=a.redis_url,
        redis_capacity_messages=(
            a.redis_capacity_messages
            if a.redis_capacity_messages is not None
            else (100_000 if quick else 300_000)
        ),
        v2_connections=a.v2_connections,
        v2_ack_ms=a.v2_ack_ms,
        v2_ack_ids=a.v2_ack_ids,
        peers=a.peers,
        peer_queue=a.peer_queue,
        argv=tuple(argv),
    )
