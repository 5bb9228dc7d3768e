"""The table of a run: its rows as a type, the peer's cells, and their text. Pure
functions of ``Results``; nothing here measures, prints or writes files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.results import Frames, PeerPass, Results

PEER = "Centrifugo"
PACED_AT = 10_000  # the paced targets are figures at 10k connections


@dataclass
class Row:
    """One figure of the table: the gateway's value, the baseline's, the peer's (text by
    column, already formatted), and the target. ``versus`` names what the baseline column
    holds when it is not the bare Sanic loop (for example "v1")."""

    figure: str
    unit: str
    gateway: float | None
    baseline: float | None
    target: str = ""
    met: bool | None = None
    note: str = ""
    peers: dict[str, str] = field(default_factory=dict)
    versus: str = ""

    @property
    def ratio(self) -> float | None:
        if self.gateway is not None and self.baseline:
            return self.gateway / self.baseline
        return None


def rate(frames: Frames | None) -> float | None:
    return None if frames is None else frames.rate


def latency(frames: Frames | None, q: str) -> float | None:
    if frames is None or frames.latency_ms is None:
        return None
    return frames.latency_ms.get(q)


def connect_rate(p: PeerPass) -> float | None:
    return p.connect.rate if p.connect else None


def live_latency(q: str) -> Callable[[PeerPass], float | None]:
    return lambda p: latency(p.live, q)


def paced_latency(q: str) -> Callable[[PeerPass], float | None]:
    return lambda p: latency(p.paced, q)


def peer_cells(
    r: Results,
    value: Callable[[PeerPass], float | None],
    *,
    both: bool = False,
    none: str = "-",
) -> dict[str, str]:
    """The peer's cells of one row, by column: the tuned consumer's value; with ``both``
    also the default consumer's ("58,961 (tuned) / 33,913 (default)")."""
    peers = r.peers
    if peers is None or peers.skipped:
        return {}
    cells = {}
    for column, setup in peers.setups.items():
        parts = []
        for name, p in setup.passes.items():
            if name != "tuned" and not both:
                continue
            v = value(p)
            if v is not None:
                parts.append(fmt(v, "msg/s" if both else "") + (f" ({name})" if both else ""))
        cells[f"{PEER}, {column}"] = " / ".join(parts) or none
    return cells


def fmt(value: float | bool | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "-"
    if unit in ("msg/s", "hs/s", "rows", "xacts") or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def render_table(rows: list[Row]) -> str:
    """One table: notify-ws, bare Sanic (or what ``versus`` names), their ratio, a column
    per peer set-up that any row has, the target and whether it is met."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r.peers if k not in columns]
    head = ["figure", "unit", "notify-ws", "bare Sanic", "ratio", *columns, "target", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        base = fmt(r.baseline, r.unit)
        cells = [
            r.figure,
            r.unit,
            fmt(r.gateway, r.unit),
            f"{r.versus}: {base}" if r.versus and r.baseline is not None else base,
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            *(r.peers.get(k, "-") for k in columns),
            r.target or "-",
            "-" if r.met is None else fmt(r.met),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_peers_note(r: Results) -> str:
    """What the peer columns are, or why there are none (empty without ``--peers``)."""
    peers = r.peers
    if peers is None:
        return ""
    if peers.skipped:
        return f"{PEER} v{peers.version}: SKIPPED: {peers.skipped}"
    tuned = sorted(
        {
            p.partition_queue_max_size
            for s in peers.setups.values()
            for p in s.passes.values()
            if p.consumer == "tuned" and p.partition_queue_max_size is not None
        }
    )
    return (
        f"{PEER} v{peers.version} (go install, 127.0.0.1 only), fed from the same Kafka in its "
        f"consumer's publication-data mode (channel in a record header), {peers.connections:,} "
        "clients speaking its JSON protocol with HS256 tokens whose `channels` claim subscribes "
        "each to its personal channel; columns: GOMAXPROCS=1 and unset. Tuned consumer: "
        f"partition_queue_max_size {', '.join(str(q) for q in tuned)} (default 1000); "
        "the other cells are the tuned consumer's. Its pre-produced messages are committed in "
        "one Kafka transaction once every client is connected. No flush figure: it keeps no "
        "durable per-user backlog."
    )
