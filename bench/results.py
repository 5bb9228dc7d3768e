"""What a run measured, as types: one dataclass per result, the whole run in ``Results``.

Written as JSON to ``.cache/bench/<run>.json`` (``dataclasses.asdict``); the report
(``bench/report.py``) reads only these types, so a renamed field is a type error, not an
empty table cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.cpu import CpuShares
from bench.profile_summary import Summary


@dataclass
class GitState:
    """Which gateway code was measured: HEAD, and whether service/ had local changes."""

    head: str
    service_dirty: str  # "clean", or `git status --porcelain` of service/
    service_sha256: str


@dataclass
class Meta:
    run_id: str
    started: str
    host: str
    cpus: int
    loadavg_at_start: tuple[float, float, float]
    python: str
    sanic: str
    options: dict[str, Any]  # the run's options (no DSN), and argv_text: the command line
    nofile: int
    git: GitState
    finished: str = ""
    loadavg_at_end: tuple[float, float, float] | None = None

    @property
    def args(self) -> str:
        return " ".join(str(self.options.get("argv_text", "")).split()) or "(defaults)"


@dataclass
class Produced:
    """What a producer process reports."""

    produced: int
    began: float
    ended: float
    rate: float
    cpu: float  # CPU seconds of the producer process

    @classmethod
    def parse(cls, answer: dict[str, Any]) -> Produced:
        return cls(
            produced=int(answer["produced"]),
            began=float(answer["began"]),
            ended=float(answer["ended"]),
            rate=float(answer["rate"]),
            cpu=float(answer["cpu"]),
        )


@dataclass
class Latency:
    """Latency percentiles in ms."""

    p50: float
    p99: float
    p999: float
    max: float
    samples: int

    def get(self, q: str) -> float:
        value: float = getattr(self, q)
        return value


@dataclass
class Second:
    """One second of a latency timeline: samples that arrived then, and their latency."""

    t: int
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class GcPauses:
    """The gateway's garbage-collector pauses in a window (from bench/gcwrap.py's log)."""

    full_collections: int
    full_ms: float
    logged: int
    max_ms: float


@dataclass
class Census:
    """Objects the gateway's collector tracks: in all, and by type."""

    total: int
    types: dict[str, int]


@dataclass
class ObjectsPerConnection:
    total: float
    by_type: dict[str, float]  # the 20 types that grew most


@dataclass
class Connect:
    """A connect storm: handshakes/s up to the last connection open (or registered)."""

    ok: int
    errors: dict[str, int]
    began: float
    last_open: float
    registered_at: float = 0.0
    seconds: float = 0.0
    rate: float = 0.0
    cpu: CpuShares | None = None
    auth_service_calls: int | None = None
    v2_selected: int | None = None  # clients that offered notify.v2: how many got it


@dataclass
class Frames:
    """Frames received by the clients after a trigger: rate, latency, losses, CPU."""

    expected: int
    frames: int
    complete: bool
    closes: dict[str, int]
    bad_frames: int
    span_s: float
    rate: float
    first_frame_after_s: float | None
    first_at: float
    last_at: float
    cpu: CpuShares
    distinct: int | None = None
    missing: int | None = None
    dupes: int | None = None
    stray: int | None = None
    producer: Produced | None = None
    timeline: list[Second] = field(default_factory=list)
    latency_ms: Latency | None = None
    gc: GcPauses | None = None
    # Scale-out only: frames per second, CPU from the first frame to the last, and for
    # capped processes the share of periods in which the cap stopped each.
    per_second: list[int] = field(default_factory=list)
    cpu_flowing: CpuShares | None = None
    throttled: list[float] | None = None


@dataclass
class FlushProbe:
    """One user with a stored backlog connects: time to the last frame of it."""

    frames: int
    complete: bool
    to_last_ms: float
    after_open_ms: float


@dataclass
class FlushSeries:
    """FLUSH_RUNS probes one after another; ``median`` is the one that counts."""

    median: FlushProbe
    runs: list[FlushProbe]


@dataclass
class Baseline:
    """The bare Sanic push loop, measured like the gateway."""

    connect_big: Connect | None = None
    rss_per_conn_kb: float | None = None
    live_big: Frames | None = None
    paced: Frames | None = None
    flush: FlushSeries | None = None
    live_small: Frames | None = None


@dataclass
class KafkaFloor:
    """Kafka alone at the paced rate: an aiokafka consumer looped like the gateway's."""

    samples: int
    p50: float
    p99: float
    p999: float
    commit_ms_p50: float | None
    commit_ms_p99: float | None
    batches: int
    cpu: float
    producer: Produced

    @classmethod
    def parse(cls, answer: dict[str, Any], producer: Produced) -> KafkaFloor:
        def opt(key: str) -> float | None:
            value = answer.get(key)
            return None if value is None else float(value)

        return cls(
            samples=int(answer["samples"]),
            p50=float(answer["p50"]),
            p99=float(answer["p99"]),
            p999=float(answer["p999"]),
            commit_ms_p50=opt("commit_ms_p50"),
            commit_ms_p99=opt("commit_ms_p99"),
            batches=int(answer["batches"]),
            cpu=float(answer["cpu"]),
            producer=producer,
        )


@dataclass
class Fanout:
    """A gateway with ``connections`` clients: memory, storms, drain, live, paced."""

    connections: int
    preproduce: Produced | None = None
    connect: Connect | None = None
    rss_per_conn_kb: float | None = None
    gc_objects_per_conn: ObjectsPerConnection | None = None
    drain: Frames | None = None
    live: Frames | None = None
    paced: Frames | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    connect_cached: Connect | None = None
    profiles: dict[str, Summary] = field(default_factory=dict)  # by window
    log_tail: str = ""


@dataclass
class BareInsert:
    """The store's baseline: the gateway's own INSERT ... unnest from a bare connection."""

    rows: int
    seconds: float
    rate: float


@dataclass
class Store:
    """Offline store (K messages for users never connected), and the flush on connect."""

    stored: float = 0.0
    rows: int = 0
    complete: bool = False
    cpu: CpuShares | None = None
    rate: float | None = None
    from_start_s: float | None = None
    preproduce: Produced | None = None
    flush: FlushSeries | None = None
    bare_insert: BareInsert | None = None
    log_tail: str = ""


@dataclass
class GroupChange:
    """The consumer group at one moment: state and partitions per member."""

    t: float
    state: str
    partitions: list[int]


@dataclass
class ScaleSetup:
    """One gateway set-up of the scale-out scenario."""

    what: str
    workers: int
    redis: bool
    skipped: str | None = None
    quota_cores: float | None = None
    preproduce: Produced | None = None
    worker_pids: list[int] = field(default_factory=list)
    brokers_up_s: float | None = None
    connect: Connect | None = None
    registered_s: float | None = None
    open_after_connect: int | None = None
    closes_after_connect: dict[str, int] = field(default_factory=dict)
    connections_per_worker: list[int] = field(default_factory=list)
    group: list[GroupChange] = field(default_factory=list)
    drain: Frames | None = None
    live: Frames | None = None
    profile: Summary | None = None
    stored_left: int | None = None
    log_events: dict[str, int] = field(default_factory=dict)
    log_tail: str = ""


@dataclass
class CapacityTest:
    """One test of Redis alone (bench/redis_capacity.py)."""

    tool: str  # "py": the gateway's RedisBroker.publish; else redis-benchmark
    publishers: int
    messages: int
    received: int
    complete: bool
    rate: float
    redis_core_share: float | None  # Redis's CPU over the span traffic flowed
    redis_cpu: float  # % of a core over the whole test
    publisher_cpu: float

    @classmethod
    def parse(cls, t: dict[str, Any]) -> CapacityTest:
        share = t.get("redis_core_share")
        return cls(
            tool=str(t["tool"]),
            publishers=int(t["publishers"]),
            messages=int(t["messages"]),
            received=int(t["received"]),
            complete=bool(t["complete"]),
            rate=float(t["rate"]),
            redis_core_share=None if share is None else float(share),
            redis_cpu=float(t["cpu"]["redis"]),
            publisher_cpu=float(t["cpu"]["publishers"]),
        )


@dataclass
class ClientCost:
    """Client CPU per PUBLISH, µs (``python -m bench.redis_capacity client-cost``)."""

    gateway_broker_us: float
    redis_py_default_us: float
    redis_py_no_socket_timeout_us: float


@dataclass
class RedisCapacity:
    channels: int
    subscribers: int
    payload_bytes: int
    tests: list[CapacityTest]
    client_cost: ClientCost | None = None
    answer: dict[str, Any] = field(default_factory=dict)  # all bench/redis_capacity.py said


@dataclass
class Scale:
    """The live fan-out through several gateway set-ups, and Redis alone."""

    connections: int
    messages: int
    partitions: int
    setups: dict[str, ScaleSetup] = field(default_factory=dict)
    skipped: str | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # "top/bottom pass" -> ratio
    redis_capacity: RedisCapacity | None = None


@dataclass
class StoreLoad:
    """The store's work over a window: deltas of the scratch database's statistics
    (every client of it, the bench's own few reads included) and of the gateway's store
    counters."""

    transactions: int  # pg_stat_database xact_commit + xact_rollback
    rows_inserted: int  # of undelivered_notification (pg_stat_user_tables)
    rows_deleted: int
    rows_updated: int
    index_scans: int
    rows_left: int  # of the pass's users, still stored at the end of the window
    gateway: dict[str, float] = field(default_factory=dict)  # store/ack counters that moved


@dataclass
class AckCounts:
    """What the v2 clients sent back during a pass, and what else the server sent them."""

    acked_ids: int
    ack_frames: int
    unacked_ids: int  # received but not yet acknowledged when the pass was read
    control: dict[str, int] = field(default_factory=dict)
    # From an ack frame's oldest id arriving in the client to the frame's send, ms:
    # p50, p99, max (each of the client process where it is highest).
    delay_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ProtocolPass:
    """The fan-out with one protocol's clients: connect, produced live, store load."""

    protocol: str  # "v1" or "v2"
    connect: Connect | None = None
    open_after_connect: int | None = None
    live: Frames | None = None
    acks: AckCounts | None = None
    store: StoreLoad | None = None
    skipped: str | None = None


@dataclass
class Acked:
    """v1 and v2 (every client acknowledging) clients, one pass each, same gateway and
    users, the same number of messages produced live."""

    connections: int
    messages: int
    ack_ms: float
    ack_ids: int
    passes: dict[str, ProtocolPass] = field(default_factory=dict)  # by protocol
    skipped: str | None = None  # why the v2 pass did not run
    log_tail: str = ""

    @property
    def ratio(self) -> float | None:
        """v2 throughput over v1's, when both passes ran."""
        v1, v2 = self.passes.get("v1"), self.passes.get("v2")
        if v1 is None or v2 is None or v1.live is None or v2.live is None:
            return None
        return v2.live.rate / v1.live.rate if v1.live.rate else None


@dataclass
class PeerPass:
    """One Centrifugo process with C clients: connect, memory, drain, live, paced."""

    consumer: str  # "default" or "tuned"
    partition_queue_max_size: int | None  # None: Centrifugo's default
    connect: Connect | None = None
    rss_per_conn_kb: float | None = None
    drain: Frames | None = None
    live: Frames | None = None
    paced: Frames | None = None
    log_tail: str = ""


@dataclass
class PeerSetup:
    """Centrifugo under one GOMAXPROCS (None: unset), with each consumer setting."""

    gomaxprocs: int | None
    passes: dict[str, PeerPass] = field(default_factory=dict)  # by consumer setting


@dataclass
class Peers:
    """The peer gateway, Centrifugo, fed from the same Kafka in the same run."""

    version: str
    connections: int
    skipped: str | None = None
    setups: dict[str, PeerSetup] = field(default_factory=dict)  # by column ("1 core", ...)


@dataclass
class Results:
    """Everything one run measured."""

    meta: Meta
    gateway_code: dict[str, GitState] = field(default_factory=dict)  # by gateway name
    baseline: Baseline | None = None
    kafka_floor: KafkaFloor | None = None
    kafka_floor_no_commit: KafkaFloor | None = None
    fanout: dict[int, Fanout] = field(default_factory=dict)  # by connection count
    storm_jwt: Connect | None = None
    store: Store | None = None
    scale: Scale | None = None
    acked: Acked | None = None
    peers: Peers | None = None
