"""The one writer of docs/performance.md's generated blocks: the latest-run table and
the scale-out block, each between its markers. The rest of the page is prose kept by
hand; ``block_*`` build the text (pure), :func:`update` replaces the blocks."""

from __future__ import annotations

from bench.options import Options
from bench.processes import ROOT, log
from bench.report import (
    NOISY,
    Row,
    Window,
    noisy,
    peak,
    render_acked,
    render_cpu,
    render_peers_note,
    render_table,
)
from bench.results import Meta, Results
from bench.scale_report import (
    render_capacity,
    render_scale,
    render_scale_cpu,
    scale_report,
    scale_windows,
)

DOC = ROOT / "docs" / "performance.md"
LATEST = ("<!-- bench:latest:start -->", "<!-- bench:latest:end -->")
SCALE = ("<!-- bench:scale:start -->", "<!-- bench:scale:end -->")


def run_line(meta: Meta) -> str:
    """Which run, on what, from which code (raw results stay on the machine that ran it)."""
    git = meta.git
    state = "clean" if git.service_dirty == "clean" else "with local changes"
    return (
        f"Run `{meta.run_id}` ({meta.started}, {meta.cpus} cores, load average at start "
        f"{meta.loadavg_at_start[0]:.2f}), `python -m bench.run` {meta.args}, gateway code at "
        f"`{git.head or '?'}` (service/ {state}, sha256 {git.service_sha256 or '?'})."
    )


def noisy_lines(names: list[str]) -> list[str]:
    if not names:
        return []
    return [
        "",
        f"Noisy windows (the rest of the machine above {NOISY}% of a core): "
        + ", ".join(names)
        + ".",
    ]


def block_latest(results: Results, rows: list[Row], ws: list[Window]) -> str:
    """The latest-run block: table, load generator's peak, CPU per window."""
    top = peak(ws)
    lines = [
        LATEST[0],
        run_line(results.meta),
        "",
        render_table(rows),
        *(["", render_peers_note(results)] if results.peers else []),
        *(["", "```", render_acked(results.acked), "```"] if results.acked else []),
        "",
        f"Load generator (client processes + producer): at most "
        f"{top.cpu.load if top else 0:.0f}% of one core ({top.name if top else '-'}; the "
        f"server was at {top.cpu.server if top else 0:.0f}% there).",
        "",
        "CPU per measured window, % of one core:",
        "",
        render_cpu(ws),
        *noisy_lines(noisy(ws)),
    ]
    shas = {c.service_sha256 for c in results.gateway_code.values()}
    if len(shas) > 1:
        lines += [
            "",
            "service/ changed during this run (gateways started from "
            + ", ".join(sorted(shas))
            + "): its rows mix versions.",
        ]
    return "\n".join([*lines, LATEST[1]])


def block_scale(results: Results) -> str | None:
    """The scale-out block, or None when the run has no scale-out set-up."""
    scale = results.scale
    if scale is None or not scale.setups:
        return None
    meta = results.meta
    report = scale_report(scale)
    ws = scale_windows(scale)
    capacity = render_capacity(report, scale)
    lines = [
        SCALE[0],
        f"{run_line(meta)} C = {scale.connections:,} users, K = {scale.messages:,} messages "
        f"per pass, {scale.partitions} partitions.",
        "",
        render_scale(scale, report),
        "",
        "CPU while frames flowed (first to last frame), % of one core (the machine has"
        f" {meta.cpus}); load generator = client processes + producer:",
        "",
        render_scale_cpu(ws),
        *noisy_lines(noisy(ws)),
        *(["", capacity] if capacity else []),
        SCALE[1],
    ]
    return "\n".join(lines)


def replace(text: str, markers: tuple[str, str], block: str) -> str | None:
    """``text`` with the block between ``markers`` replaced; None if a marker is missing."""
    start, end = markers
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def update(results: Results, options: Options, rows: list[Row], ws: list[Window]) -> None:
    """Rewrite the blocks this run measured: the latest-run table only from runs that
    measured its scenarios, the scale-out block only from runs with a scale-out set-up."""
    if not DOC.exists():
        log(f"{DOC} not found: not updated")
        return
    text = DOC.read_text()
    blocks = []
    if options.scenarios - {"scale"}:
        blocks.append((LATEST, block_latest(results, rows, ws)))
    scale = block_scale(results)
    if scale is not None:
        blocks.append((SCALE, scale))
    for markers, block in blocks:
        new = replace(text, markers, block)
        if new is None:
            log(f"{DOC.name} has no {markers[0]} ... {markers[1]} block: not updated")
            continue
        text = new
        log(f"updated the {markers[0]} block of {DOC.relative_to(ROOT)}")
    DOC.write_text(text)
