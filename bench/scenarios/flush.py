"""Flush on connect: a user with a stored backlog connects; time to its last frame."""

from __future__ import annotations

import asyncio
import time

from bench import common
from bench.harness import Harness
from bench.options import FLUSH_RUNS
from bench.results import FlushProbe, FlushSeries


async def flush_series(
    h: Harness, port: int, path: str, *, auth: str, query: str = "", salt: str = ""
) -> FlushSeries:
    """FLUSH_RUNS users connect one after another; the median run, and all of them."""
    runs = []
    for index in range(FLUSH_RUNS):
        await asyncio.sleep(1.0)
        runs.append(
            await flush_probe(h, port, path, auth=auth, query=query, salt=salt, index=index)
        )
        await h.lg.close_all()
    ordered = sorted(runs, key=lambda r: r.to_last_ms if r.complete else float("inf"))
    return FlushSeries(median=ordered[len(ordered) // 2], runs=runs)


async def flush_probe(
    h: Harness, port: int, path: str, *, auth: str, query: str = "", salt: str = "", index: int = 0
) -> FlushProbe:
    """User ``index`` of the flush population connects and waits for ``--flush`` frames."""
    await h.lg.reset()
    worker = h.lg.workers[0]
    opened = await worker.connect(
        60,
        port=port,
        path=path,
        population=common.FLUSH,
        start=index,
        count=1,
        auth=auth,
        salt=salt,
        exp=h.exp,
        query=query,
        watch=h.o.flush,
        concurrency=1,
        budget=30,
    )
    if not opened.ok:
        raise RuntimeError(f"flush probe could not connect: {opened.errors}")
    deadline = time.monotonic() + 30
    watched = None
    while time.monotonic() < deadline:
        watched = (await worker.watched())[-1]
        if watched.done:
            break
        await asyncio.sleep(0.02)
    done = (watched.done if watched else None) or 0.0
    nan = float("nan")
    return FlushProbe(
        frames=watched.frames if watched else 0,
        complete=bool(done),
        to_last_ms=(done - watched.began) * 1000 if watched and done else nan,
        after_open_ms=(done - watched.opened) * 1000 if watched and done else nan,
    )
