"""The report of the scale-out scenario: set-up rows, ratios, CPU while frames flowed,
and Redis alone. Pure functions of ``Scale``."""

from __future__ import annotations

from dataclasses import dataclass

from bench.options import SCALE_RATIOS, SCALE_TARGET
from bench.report import Window, fmt
from bench.results import Scale


@dataclass
class SetupRow:
    setup: str
    what: str
    workers: int
    connections_per_worker: list[int]
    connect_rate: float | None
    drain_rate: float | None
    live_rate: float | None
    live_p50_ms: float | None
    live_p99_ms: float | None
    missing: int | None  # both passes
    dupes: int | None
    stored_left: int | None
    frames: tuple[int, int]
    group: str  # each assignment the group went through (a 4 before 2/2 is a rebalance)


@dataclass
class RatioRow:
    figure: str
    key: str
    drain: float | None
    live: float | None
    target: str
    met: bool | None


@dataclass
class CapacityRow:
    publisher: str
    publishers: int
    rate: float
    redis_share: float | None
    redis_cpu: float
    publisher_cpu: float
    complete: bool


@dataclass
class ScaleReport:
    rows: list[SetupRow]
    ratios: list[RatioRow]
    capacity: list[CapacityRow]
    redis_ceiling: float | None  # PUBLISH/s one Redis core would take
    redis_path_per_process: float | None  # the most one process delivered through Redis
    processes_per_redis: float | None


def scale_report(scale: Scale) -> ScaleReport:
    """The scale-out figures as table rows."""
    setups = scale.setups
    rows = []
    for name, r in setups.items():
        passes = [p for p in (r.drain, r.live) if p is not None]
        lat = r.live.latency_ms if r.live else None
        rows.append(
            SetupRow(
                setup=name,
                what=r.what,
                workers=r.workers,
                connections_per_worker=r.connections_per_worker,
                connect_rate=r.connect.rate if r.connect else None,
                drain_rate=r.drain.rate if r.drain else None,
                live_rate=r.live.rate if r.live else None,
                live_p50_ms=lat.p50 if lat else None,
                live_p99_ms=lat.p99 if lat else None,
                missing=sum(p.missing or 0 for p in passes) if passes else None,
                dupes=sum(p.dupes or 0 for p in passes) if passes else None,
                stored_left=r.stored_left,
                frames=(r.drain.frames if r.drain else 0, r.live.frames if r.live else 0),
                group=" -> ".join(
                    "/".join(str(n) for n in g.partitions) for g in r.group if g.partitions
                ),
            )
        )
    ratios = []
    for top, bottom, target in SCALE_RATIOS:
        if top in setups and bottom in setups:
            live = scale.ratios.get(f"{top}/{bottom} live")
            ratios.append(
                RatioRow(
                    figure=f"{setups[top].what} / {setups[bottom].what}",
                    key=f"{top}/{bottom}",
                    drain=scale.ratios.get(f"{top}/{bottom} drain"),
                    live=live,
                    target=f">= {SCALE_TARGET}x" if target else "",
                    # Judged on the live pass: the drain of 2 workers can start with a
                    # rebalance (the second member joins the group after the first took
                    # every partition; see "group").
                    met=(live is not None and live >= SCALE_TARGET) if target else None,
                )
            )
    cap_rows = []
    ceiling = None
    for t in scale.redis_capacity.tests if scale.redis_capacity else []:
        share = t.redis_core_share
        cap_rows.append(
            CapacityRow(
                publisher="the gateway's RedisBroker.publish, own process"
                if t.tool == "py"
                else "redis-benchmark (C), pipelined",
                publishers=t.publishers,
                rate=t.rate,
                redis_share=share,
                redis_cpu=t.redis_cpu,
                publisher_cpu=t.publisher_cpu,
                complete=t.complete,
            )
        )
        # Extrapolate to a whole core only from tests that kept Redis mostly busy.
        if share and share > 0.5 and t.complete:
            ceiling = max(ceiling or 0.0, t.rate / share)
    per_process = [
        rate / r.workers
        for r in rows
        if setups[r.setup].redis and r.workers
        for rate in (r.drain_rate, r.live_rate)
        if rate
    ]
    return ScaleReport(
        rows=rows,
        ratios=ratios,
        capacity=cap_rows,
        redis_ceiling=ceiling,
        redis_path_per_process=max(per_process) if per_process else None,
        processes_per_redis=ceiling / max(per_process) if ceiling and per_process else None,
    )


def scale_windows(scale: Scale) -> list[Window]:
    """CPU of each pass while frames flowed (first to last frame), else of its whole window."""
    out = []
    for name, r in scale.setups.items():
        for p, frames in (("drain", r.drain), ("live", r.live)):
            if frames is not None:
                cpu = frames.cpu_flowing or frames.cpu
                out.append(Window(f"{name}.{p}", cpu, frames.throttled))
    return out


def render_scale(scale: Scale, report: ScaleReport) -> str:
    lines = [
        f"| set-up | connections per process | drain {scale.messages:,} pre-produced, msg/s |"
        " produced live, msg/s | live p50 | live p99 | lost | delivered twice |"
        " partitions per process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.rows:
        per = " / ".join(f"{n:,}" for n in r.connections_per_worker) or "-"
        lines.append(
            f"| {r.what} | {per} | {fmt(r.drain_rate, 'msg/s')} | {fmt(r.live_rate, 'msg/s')} | "
            f"{fmt(r.live_p50_ms)} ms | {fmt(r.live_p99_ms)} ms | "
            f"{fmt(r.missing)} | {fmt(r.dupes)} | {r.group or '-'} |"
        )
    lines += [
        "",
        "| ratio | drain | live | target (live) | met? |",
        "| --- | --- | --- | --- | --- |",
    ]
    for x in report.ratios:
        lines.append(
            f"| {x.figure} | "
            + " | ".join("-" if v is None else f"{v:.2f}x" for v in (x.drain, x.live))
            + f" | {x.target or '-'} | {'-' if x.met is None else fmt(x.met)} |"
        )
    return "\n".join(lines)


def render_scale_cpu(ws: list[Window]) -> str:
    lines = [
        "| window | gateway (all processes) | per worker | load generator | kafka | redis |"
        " postgres | rest of machine | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in ws:
        c = w.cpu
        per = " / ".join(f"{x:.0f}%" for x in c.workers)
        if w.throttled:
            # How often the cap held the process back: near 100 %, CPU was what limited it.
            per += " (capped in " + " / ".join(f"{x:.0%}" for x in w.throttled) + ")"
        lines.append(
            f"| {w.name} | {c.server:.0f}% | {per or '-'} | {c.load:.0f}% | {c.kafka:.0f}% | "
            f"{c.redis:.0f}% | {c.postgres:.0f}% | {c.other:.0f}% | {c.wall_s:.1f} |"
        )
    return "\n".join(lines)


def render_capacity(report: ScaleReport, scale: Scale) -> str:
    cap = scale.redis_capacity
    if cap is None or not report.capacity:
        return ""
    lines = [
        f"Redis alone: PUBLISH to {cap.channels:,} per-user channels, one subscriber"
        f" each ({cap.subscribers} pub/sub connections), {cap.payload_bytes}-byte"
        " payloads (the broker's JSON array), pipelines of 1000:",
        "",
        "| publisher | processes / connections | msg/s | Redis, % of a core while traffic flowed"
        " | publishers, % of a core | all arrived |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in report.capacity:
        share = "-" if c.redis_share is None else f"{100 * c.redis_share:.0f}%"
        lines.append(
            f"| {c.publisher} | {c.publishers} | {fmt(c.rate, 'msg/s')} | {share} | "
            f"{c.publisher_cpu:.0f}% | {fmt(c.complete)} |"
        )
    cost = cap.client_cost
    if cost:
        lines += [
            "",
            "The publishing client alone, CPU per PUBLISH in pipelines of 1000 "
            "(`python -m bench.redis_capacity client-cost`): the gateway's `RedisBroker.publish`"
            f" (`service/resp.py`) {cost.gateway_broker_us:.1f} µs; redis-py, as the broker"
            f" used it before, {cost.redis_py_default_us:.1f} µs, with `socket_timeout=None`"
            f" {cost.redis_py_no_socket_timeout_us:.1f} µs.",
        ]
    if report.redis_ceiling and report.processes_per_redis:
        lines += [
            "",
            f"One Redis core: ~{report.redis_ceiling:,.0f} PUBLISH/s (rate ÷ Redis's core"
            " share); the Redis path delivers at most "
            f"{fmt(report.redis_path_per_process, 'msg/s')} msg/s per gateway process here,"
            f" so one Redis feeds ~{report.processes_per_redis:.0f} such processes.",
        ]
    return "\n".join(lines)
