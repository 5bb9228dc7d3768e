"""The report of a run: table rows, CPU windows and their text. Pure functions of
``Results`` and ``Options``; nothing here measures, prints or writes files."""

from __future__ import annotations

from dataclasses import dataclass

from bench.cpu import CpuShares
from bench.options import FLUSH_RUNS, V2_TARGET, Options
from bench.results import Acked, Fanout, Results
from bench.table import (
    PACED_AT,
    PEER,
    Row,
    connect_rate,
    fmt,
    latency,
    live_latency,
    paced_latency,
    peer_cells,
    rate,
    render_peers_note,
    render_table,
)

__all__ = ["Row", "fmt", "render_peers_note", "render_table"]

NOISY = 50  # % of one core used by everything else in a window: its figures are suspect


@dataclass
class Window:
    """CPU of one measured window (its name is where it sits in the results)."""

    name: str
    cpu: CpuShares
    throttled: list[float] | None = None


def fanout_rows(o: Options, r: Results) -> list[Row]:
    """Kafka to socket and produced live, at both connection counts."""
    b = r.baseline
    rows: list[Row] = []
    for count, big in ((o.small, False), (o.big, True)):
        g = r.fanout.get(count)
        if g is None:
            continue
        base_live = None if b is None else (b.live_big if big else b.live_small)
        if g.drain is not None:
            value, base = g.drain.rate, rate(base_live)
            target, met = "", None
            if big:
                target = ">= 20,000/s and >= 0.6x"
                met = bool(value and value >= 20_000 and base and value / base >= 0.6)
                met = met and g.drain.complete
            rows.append(
                Row(
                    f"fan-out {count} conns, Kafka->socket (pre-produced)",
                    "msg/s",
                    value,
                    base,
                    target,
                    met,
                    "" if g.drain.complete else "INCOMPLETE",
                    peers=peer_cells(r, lambda p: rate(p.drain), both=True) if big else {},
                )
            )
        if g.live is not None:
            producer = g.live.producer.rate if g.live.producer else 0
            base = rate(base_live)
            target, met = "", None
            if big:
                target = ">= 1.0x bare Sanic"
                met = bool(base and g.live.rate / base >= 1.0 and g.live.complete)
            rows.append(
                Row(
                    f"fan-out {count} conns, produced live",
                    "msg/s",
                    g.live.rate,
                    base,
                    target,
                    met,
                    f"producer {producer:.0f}/s",
                    peers=peer_cells(r, lambda p: rate(p.live), both=True) if big else {},
                )
            )
            for q in ("p50", "p99"):
                rows.append(
                    Row(
                        f"fan-out {count} live, latency {q}",
                        "ms",
                        latency(g.live, q),
                        None,
                        note="producer outruns the gateway: mostly time queued in Kafka",
                        peers=peer_cells(r, live_latency(q)) if big else {},
                    )
                )
    return rows


def paced_rows(o: Options, r: Results, g: Fanout) -> list[Row]:
    """Paced latency at the big count, the gateway's GC pauses, Kafka alone."""
    rows: list[Row] = []
    paced = g.paced
    if paced is None:
        return rows
    base = r.baseline.paced if r.baseline else None
    limits = {"p50": 2.0, "p99": 8.0}
    for q in ("p50", "p99", "p999"):
        value = latency(paced, q)
        target, met = "", None
        if q in limits:
            target = f"<= {limits[q]:.0f} ms at {PACED_AT:,}"
            if o.big >= PACED_AT:
                met = value is not None and value <= limits[q] and paced.complete
        rows.append(
            Row(
                f"paced {o.paced_rate:.0f}/s x {o.paced_seconds:.0f} s, {o.big} conns, {q}",
                "ms",
                value,
                latency(base, q),
                target,
                met,
                "baseline: bare Sanic, stamped at send" if q == "p50" else "",
                peers=peer_cells(r, paced_latency(q)),
            )
        )
    if paced.gc:
        rows.append(
            Row(
                "paced: longest GC pause in the gateway",
                "ms",
                paced.gc.max_ms,
                None,
                note=f"{paced.gc.full_collections} full collections, {paced.gc.full_ms:.0f} ms",
            )
        )
    for floor, how in (
        (r.kafka_floor, "commit per batch"),
        (r.kafka_floor_no_commit, "no commit"),
    ):
        if floor is None:
            continue
        for q in ("p50", "p99"):
            note = ""
            if q == "p50" and floor.commit_ms_p50:
                note = f"commit round trip p50 {floor.commit_ms_p50:.1f} ms"
            rows.append(
                Row(
                    f"paced {o.paced_rate:.0f}/s, Kafka alone ({how}), {q}",
                    "ms",
                    None,
                    floor.p50 if q == "p50" else floor.p99,
                    note=note,
                )
            )
    return rows


def acked_rows(r: Results) -> list[Row]:
    """v2 clients acknowledging every notification against v1 clients, same run and gateway:
    throughput (held to the target), latency, and the store's load."""
    a = r.acked
    if a is None:
        return []
    v1, v2 = a.passes.get("v1"), a.passes.get("v2")
    v1_live = v1.live if v1 else None
    v2_live = v2.live if v2 and not v2.skipped else None
    what = f"v2 fan-out {a.connections} conns, every client acking"
    same = "baseline: v1 clients, same gateway and run"
    if a.skipped:
        same = f"v2 SKIPPED: {a.skipped}"
    complete = bool(v2_live and v2_live.complete and v1_live and v1_live.complete)
    ratio = a.ratio
    skipped = f" (v2 skipped: {a.skipped})" if a.skipped else ""
    rows = [
        Row(
            f"{what}, produced live{skipped}",
            "msg/s",
            rate(v2_live),
            rate(v1_live),
            f">= {V2_TARGET}x v1",
            None if ratio is None else bool(ratio >= V2_TARGET and complete),
            same if complete or v2_live is None else same + "; INCOMPLETE",
            versus="v1",
        )
    ]
    for q in ("p50", "p99"):
        rows.append(
            Row(
                f"{what}, latency {q}",
                "ms",
                latency(v2_live, q),
                latency(v1_live, q),
                versus="v1",
            )
        )
    s1 = v1.store if v1 else None
    s2 = v2.store if v2 and not v2.skipped else None
    for figure, unit, key in (
        ("store rows inserted", "rows", "rows_inserted"),
        ("store rows deleted", "rows", "rows_deleted"),
        ("store transactions", "xacts", "transactions"),
    ):
        value = None if s2 is None else float(getattr(s2, key))
        note = ""
        if key == "transactions" and s2 is not None and a.messages:
            note = f"{s2.transactions / a.messages:.3f} per notification; {s2.rows_left} left"
        rows.append(
            Row(
                f"{what}: {figure}",
                unit,
                value,
                None if s1 is None else float(getattr(s1, key)),
                note=note,
                versus="v1",
            )
        )
    return rows


def render_acked(a: Acked) -> str:
    """The v1/v2 passes in words: what connected, the acks, the store's load."""
    lines = [
        f"== v1 against v2 (every client acking: an ack frame at most every {a.ack_ms:.0f} ms,"
        f" sooner at {a.ack_ids} ids), {a.connections} clients, {a.messages} messages a pass =="
    ]
    for p in a.passes.values():
        head = f"{p.protocol}: "
        if p.connect is not None:
            head += f"{p.connect.ok} connected, {p.open_after_connect} open after"
            if p.connect.v2_selected is not None:
                head += f" ({p.connect.v2_selected} with notify.v2 selected)"
        if p.skipped:
            lines.append(f"{head}; SKIPPED: {p.skipped}")
            continue
        if p.live is not None:
            lost = "" if p.live.missing is None else f", {p.live.missing} missing"
            dupes = "" if p.live.dupes is None else f", {p.live.dupes} duplicates"
            head += (
                f"; {p.live.frames}/{p.live.expected} frames at {p.live.rate:,.0f}/s{lost}{dupes}"
            )
            if p.live.closes:
                head += f", closes {p.live.closes}"
        lines.append(head)
        if p.acks is not None:
            lines.append(
                f"  acks: {p.acks.acked_ids} ids in {p.acks.ack_frames} frames, "
                f"{p.acks.unacked_ids} not yet sent; other server frames: {p.acks.control or '-'}"
            )
            d = p.acks.delay_ms
            if d:
                lines.append(
                    f"  ack sent after the oldest id of its frame arrived: p50 {d['p50']:.0f} ms, "
                    f"p99 {d['p99']:.0f} ms, max {d['max']:.0f} ms"
                )
        if p.store is not None and p.live is not None:
            lines.append(
                f"  PostgreSQL {p.live.cpu.postgres:.0f}% of a core, gateway "
                f"{p.live.cpu.server:.0f}% while the frames came"
            )
        if p.store is not None:
            st = p.store
            lines.append(
                f"  store: {st.rows_inserted} rows inserted, {st.rows_deleted} deleted, "
                f"{st.rows_updated} updated, {st.transactions} transactions, "
                f"{st.index_scans} index scans, {st.rows_left} rows left"
            )
            if st.gateway:
                counters = ", ".join(f"{k} {v:g}" for k, v in sorted(st.gateway.items()))
                lines.append(f"  gateway: {counters}")
    return "\n".join(lines)


def table(o: Options, r: Results) -> list[Row]:
    """The rows of the latest-run table of docs/performance.md, in its order."""
    b = r.baseline
    base_connect = b.connect_big.rate if b and b.connect_big else None
    g = r.fanout.get(o.big) or Fanout(connections=o.big)
    rows = fanout_rows(o, r) + paced_rows(o, r, g)
    s = r.store
    if s is not None and s.rate is not None:
        rows.append(
            Row(
                "offline store into PostgreSQL",
                "msg/s",
                s.rate,
                s.bare_insert.rate if s.bare_insert else None,
                ">= 20,000/s",
                bool(s.rate >= 20_000 and s.complete),
                "baseline: bare asyncpg INSERT..unnest, 1000/batch",
            )
        )
    if s is not None and s.flush is not None:
        value = s.flush.median.to_last_ms
        rows.append(
            Row(
                f"flush {o.flush:,} stored, connect to the last frame (median of {FLUSH_RUNS})",
                "ms",
                value,
                b.flush.median.to_last_ms if b and b.flush else None,
                "<= 15 ms",
                bool(value <= 15 and s.flush.median.complete),
                "baseline: bare Sanic sends from memory"
                + ("; Centrifugo: no durable per-user backlog" if r.peers else ""),
                peers=peer_cells(r, lambda p: None, none="\u2013"),
            )
        )
    if g.connect is not None:
        rows.append(
            Row(
                f"connect {o.big}, remote auth uncached",
                "hs/s",
                g.connect.rate,
                base_connect,
                note="fast asyncio auth stand-in; baseline: no auth",
            )
        )
    if g.connect_cached is not None:
        cached = g.connect_cached
        rows.append(
            Row(
                f"connect {o.big}, remote auth cached",
                "hs/s",
                cached.rate,
                base_connect,
                ">= 3,000/s",
                bool(cached.rate and cached.rate >= 3000 and cached.ok == o.big),
                f"{cached.auth_service_calls} auth calls"
                + (f"; {PEER}: {o.big} connects, local HS256 check" if r.peers else ""),
                peers=peer_cells(r, connect_rate),
            )
        )
    if r.storm_jwt is not None:
        rows.append(
            Row(
                f"connect {o.storm}, AUTH_MODE=jwt (local)",
                "hs/s",
                r.storm_jwt.rate,
                base_connect,
                note=f"{PEER}: its {o.big} connects, local HS256 check" if r.peers else "",
                peers=peer_cells(r, connect_rate),
            )
        )
    if g.rss_per_conn_kb is not None and o.wants("memory"):
        rows.append(
            Row(
                f"RSS per idle connection at {o.big}",
                "KB",
                g.rss_per_conn_kb,
                b.rss_per_conn_kb if b else None,
                "<= 20 KB",
                g.rss_per_conn_kb <= 20,
                peers=peer_cells(r, lambda p: p.rss_per_conn_kb),
            )
        )
    if g.gc_objects_per_conn is not None:
        per = g.gc_objects_per_conn
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(per.by_type.items())[:4])
        rows.append(
            Row(
                f"GC-tracked objects per idle connection at {o.big}",
                "objects",
                per.total,
                None,
                note=top,
            )
        )
    return rows + acked_rows(r)


def windows(o: Options, r: Results) -> list[Window]:
    """Where the CPU went in each measured window, in the order they ran (scale apart)."""
    out: list[Window] = []

    def add(name: str, cpu: CpuShares | None) -> None:
        if cpu is not None:
            out.append(Window(name, cpu))

    b = r.baseline
    if b is not None:
        add("baseline.connect_big", b.connect_big.cpu if b.connect_big else None)
        add(f"baseline.live_{o.big}", b.live_big.cpu if b.live_big else None)
        add("baseline.paced", b.paced.cpu if b.paced else None)
        add(f"baseline.live_{o.small}", b.live_small.cpu if b.live_small else None)
    for count, g in r.fanout.items():
        add(f"gateway_{count}.connect", g.connect.cpu if g.connect else None)
        for name, frames in (("drain", g.drain), ("live", g.live), ("paced", g.paced)):
            add(f"gateway_{count}.{name}", frames.cpu if frames else None)
        add(f"gateway_{count}.connect_cached", g.connect_cached.cpu if g.connect_cached else None)
    add("storm_jwt", r.storm_jwt.cpu if r.storm_jwt else None)
    add("store", r.store.cpu if r.store else None)
    if r.acked is not None:
        for name, p in r.acked.passes.items():
            add(f"v2.{name}_live", p.live.cpu if p.live else None)
    if r.peers is not None:
        for column, setup in r.peers.setups.items():
            for consumer, pp in setup.passes.items():
                at = f"centrifugo_{column.replace(' ', '')}_{consumer}"
                add(f"{at}.connect", pp.connect.cpu if pp.connect else None)
                for name, frames in (("drain", pp.drain), ("live", pp.live), ("paced", pp.paced)):
                    add(f"{at}.{name}", frames.cpu if frames else None)
    return out


def noisy(ws: list[Window]) -> list[str]:
    return [w.name for w in ws if w.cpu.other > NOISY]


def peak(ws: list[Window]) -> Window | None:
    """The window where the load generator worked hardest."""
    return max(ws, key=lambda w: w.cpu.load) if ws else None


def render_cpu(ws: list[Window]) -> str:
    lines = [
        "| window | load generator | server | kafka | postgres | auth stand-in | rest of machine"
        " | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in ws:
        c = w.cpu
        lines.append(
            f"| {w.name} | {c.load:.0f}% | {c.server:.0f}% | {c.kafka:.0f}% | "
            f"{c.postgres:.0f}% | {c.auth:.0f}% | {c.other:.0f}% | {c.wall_s:.1f} |"
        )
    return "\n".join(lines)
