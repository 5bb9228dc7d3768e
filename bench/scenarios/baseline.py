"""The baseline: a bare Sanic push loop (``bench/baseline_sanic.py``), measured like the
gateway: connect storm and memory at the big count, blast, paced, flush, small blast."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from bench import common
from bench.harness import Harness
from bench.processes import HOST, PY, Child, free_port, log
from bench.results import Baseline, Connect, Frames
from bench.scenarios.flush import flush_series

SCENARIOS = ("live", "paced", "flush", "storm", "memory")


async def wait_empty(h: Harness, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await h.http.get(url + "/count", timeout=5)).json()["connections"] == 0:
            return
        await asyncio.sleep(0.1)
    log("  baseline still holds connections")


async def run(h: Harness) -> None:
    o, lg = h.o, h.lg
    port = free_port()
    base = Child("baseline", [PY, "-m", "bench.baseline_sanic", "--port", str(port)], h.logs)
    await base.start()
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await h.http.get(url + "/count", timeout=2)).status_code == 200:
                break
        if time.monotonic() > deadline or not base.alive():
            raise RuntimeError(f"baseline did not start:\n{base.tail()}")
        await asyncio.sleep(0.1)
    res = h.results.baseline = Baseline()

    async def open_connections(count: int) -> Connect:
        return await h.connect_storm(
            base, port=port, path="/ws", population=common.LIVE, count=count, auth="user"
        )

    async def blast(count: int) -> Frames:
        """K frames round-robin to the ``count`` clients connected, as fast as it can."""
        log(f"baseline: blast {o.messages} frames to {count}")
        frames = await h.measure_frames(
            base,
            o.messages,
            lambda: h.http.post(url + f"/blast?k={o.messages}", timeout=10),
            budget=300,
        )
        log(f"  {frames.rate:.0f} frames/s")
        return frames

    if o.wants("live", "paced", "storm", "memory"):
        await h.warm_up(port, "/ws", "user")
        rss0 = base.rss()
        log(f"baseline: connecting {o.big}")
        connect = res.connect_big = await open_connections(o.big)
        await asyncio.sleep(2)
        res.rss_per_conn_kb = (base.rss() - rss0) / max(1, connect.ok) / 1024
        log(f"  {connect.rate:.0f} handshakes/s, {res.rss_per_conn_kb:.1f} KB/conn")
        if o.wants("live"):
            res.live_big = await blast(o.big)
        if o.wants("paced"):
            n = int(o.paced_rate * o.paced_seconds)
            log(f"baseline: paced {o.paced_rate:.0f}/s for {o.paced_seconds:.0f} s")
            res.paced = await h.measure_frames(
                base,
                n,
                lambda: h.http.post(
                    url + f"/paced?rate={o.paced_rate}&seconds={o.paced_seconds}", timeout=10
                ),
                budget=o.paced_seconds + 60,
            )
            assert res.paced.latency_ms is not None
            log(f"  p99 {res.paced.latency_ms.p99:.2f} ms")
        await lg.close_all()
        await wait_empty(h, url)
    if o.wants("flush"):
        log(f"baseline: flush {o.flush} frames on connect")
        res.flush = await flush_series(h, port, "/ws", auth="user", query=f"&flush={o.flush}")
        log(f"  {res.flush.median.to_last_ms:.1f} ms to the last frame")
        await lg.close_all()
        await wait_empty(h, url)
    if o.wants("live"):
        await open_connections(o.small)
        res.live_small = await blast(o.small)
        await lg.close_all()
    await base.stop()
