"""``make bench``: measure the gateway against a bare Sanic push loop in the same run.

Starts, on loopback only: a fast auth stand-in (``bench/auth_fast.py``), the bare
baseline (``bench/baseline_sanic.py``), gateways (``python -m service``, one per
scenario, each on its own topics and consumer group and a scratch database), client
processes (``bench/loadgen.py``) and producer processes (``bench/producer.py``).
Local Kafka and PostgreSQL must be running already (``make up``); they are not
stopped. Everything it creates (topics, the scratch database, processes) is removed
at the end. Every wait is bounded; ``--budget`` bounds the whole run.

Scenarios (``bench/scenarios/``): live fan-out at two connection counts, paced
latency, offline store, flush on connect, connect storm, memory per idle connection,
v1 against v2 clients acknowledging every notification, and scale-out through Redis;
with ``--peers``, Centrifugo fed from the same Kafka (``bench/scenarios/peers.py``).
Prints the tables and writes everything measured as JSON to ``.cache/bench/<run>.json``
(not tracked); ``--update-doc`` rewrites the generated blocks of docs/performance.md.

    python -m bench.run                  # everything, defaults (~13 minutes on 2 shared cores)
    python -m bench.run --quick          # small sizes, ~2-3 minutes
    python -m bench.run --only store,flush
    python -m bench.run --only live --profile   # py-spy the gateway during fan-out
    python -m bench.run --only scale            # scale-out through Redis (~2.5 minutes)
    python -m bench.run --only v2               # v1 against v2 with acks, and the store's load
    python -m bench.run --peers                 # and Centrifugo beside notify-ws (~4 min more)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import centrifugo, common, doc, report, scale_report
from bench.harness import Harness
from bench.options import Options, parse_options
from bench.processes import ROOT, log
from bench.profile_summary import render
from bench.results import Results
from bench.scenarios import acked, baseline, fanout, kafka_floor, peers, scale, store, storm

RESULTS = ROOT / ".cache" / "bench"
PROFILES = (
    ("fanout", "fan-out (drain + live, with native frames)"),
    ("connect-uncached", "connect storm, remote auth uncached (native)"),
    ("connect-cached", "connect storm, remote auth cached (native)"),
    ("paced", "paced load (with native frames)"),
)


async def scenarios(h: Harness) -> None:
    """Every scenario the options ask for, in a fixed order."""
    o = h.o
    await h.setup()
    if o.wants(*baseline.SCENARIOS):
        await baseline.run(h)
    if o.wants("paced"):
        await kafka_floor.run(h)
    if o.wants("live"):
        await fanout.run(h, o.small, big=False)
    if o.wants("live", "paced", "storm", "memory"):
        await fanout.run(h, o.big, big=True)
    if o.peers and o.wants("live", "paced", "storm", "memory"):
        await peers.run(h)
    if o.wants("storm"):
        await storm.run(h)
    if o.wants("store", "flush"):
        await store.run(h)
    if o.wants("v2"):
        await acked.run(h)
    if o.wants("scale"):
        await scale.run(h)


def write_json(results: Results, rows: list[report.Row], ws: list[report.Window]) -> Path:
    """Everything measured, and the report's rows, to ``.cache/bench/<run>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{results.meta.run_id}.json"
    record: dict[str, Any] = asdict(results)
    record["table"] = [asdict(r) | {"ratio": r.ratio} for r in rows]
    record["cpu"] = [asdict(w) for w in ws]
    top = report.peak(ws)
    record["loadgen_peak"] = asdict(top) if top else None
    record["noisy_windows"] = report.noisy(ws)
    if results.scale is not None and results.scale.setups:
        record["scale_report"] = asdict(scale_report.scale_report(results.scale))
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out


def print_report(
    o: Options, results: Results, rows: list[report.Row], ws: list[report.Window]
) -> None:
    if rows:
        print()
        print(report.render_table(rows))
    peers_note = report.render_peers_note(results)
    if peers_note:
        print()
        print(peers_note)
    if ws:
        print()
        print(f"CPU, % of one core (the machine has {os.cpu_count()}), per measured window:")
        print(report.render_cpu(ws))
    top = report.peak(ws)
    if top:
        print(
            f"load generator (client processes + producer): at most {top.cpu.load:.0f}% of "
            f"one core ({top.name}, server {top.cpu.server:.0f}% there): "
            + ("not the bottleneck" if top.cpu.load < 70 else "CHECK: it may be the limit")
        )
    noisy = report.noisy(ws)
    if noisy:
        print(
            f"noisy: the rest of the machine (other work) used > {report.NOISY}% of a core "
            f"in {', '.join(noisy)}: rerun those before trusting them"
        )
    v2 = results.acked
    if v2 is not None:
        print()
        print(report.render_acked(v2))
    big = results.fanout.get(o.big)
    for key, title in PROFILES:
        if big is not None and key in big.profiles:
            print()
            print(f"== {title} ==")
            print(render(big.profiles[key]))
    sc = results.scale
    if sc is None or not sc.setups:
        return
    rep = scale_report.scale_report(sc)
    print()
    print("== scale-out through Redis ==")
    print(scale_report.render_scale(sc, rep))
    print()
    print("CPU, % of one core, while frames flowed:")
    sws = scale_report.scale_windows(sc)
    print(scale_report.render_scale_cpu(sws))
    if report.noisy(sws):
        print(
            f"noisy: rest of the machine > {report.NOISY}% of a core in "
            + ", ".join(report.noisy(sws))
        )
    for name, r in sc.setups.items():
        if r.log_events:
            print(f"{name}: gateway log warnings/errors: {r.log_events}")
    capacity = scale_report.render_capacity(rep, sc)
    if capacity:
        print()
        print(capacity)
    for name, r in sc.setups.items():
        if r.profile is not None:
            print()
            print(f"== scale {name}: one worker (native) ==")
            print(render(r.profile))


async def amain(options: Options) -> int:
    """The run: 0 if it completed, 1 if a scenario failed, 3 if the budget ran out."""
    common.raise_nofile()
    if options.peers:
        # Built (once, minutes) before the budget starts counting; a reason instead of a
        # binary is reported by the peers scenario.
        await centrifugo.binary()
    h = Harness(options)
    code = 0
    task = asyncio.create_task(scenarios(h))
    try:
        done, _ = await asyncio.wait({task}, timeout=options.budget)
        if not done:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            log(f"budget of {options.budget:.0f} s spent: reporting what was measured")
            code = 3
        else:
            task.result()
    except Exception as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        code = 1
    finally:
        await h.cleanup()
    results = h.results
    results.meta.finished = datetime.now(UTC).isoformat(timespec="seconds")
    la = os.getloadavg()
    results.meta.loadavg_at_end = (la[0], la[1], la[2])
    rows = report.table(options, results)
    ws = report.windows(options, results)
    out = write_json(results, rows, ws)
    print_report(options, results, rows, ws)
    if options.update_doc and code == 0:
        doc.update(results, options, rows, ws)
    print()
    print(f"results: {out.relative_to(ROOT)}   process logs: {h.logs}")
    failed = [r for r in rows if r.met is False]
    if failed and code == 0:
        print(f"targets not met: {', '.join(r.figure for r in failed)}")
    return code


def main() -> None:
    options = parse_options(sys.argv[1:])
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    sys.exit(runner(amain(options)))


if __name__ == "__main__":
    main()
