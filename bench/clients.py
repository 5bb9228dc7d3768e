"""The WebSocket client processes (``bench/loadgen.py``), driven as one load generator.

Each process holds a slice of the connections, from its own loopback address, and
answers JSON-line commands; this module turns their answers into typed values.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.processes import HOST, PY, Child
from bench.results import Latency, Second


def pct(sorted_values: list[int] | array[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


@dataclass
class Opened:
    """What a connect command opened: counts, errors by kind, first and last open."""

    ok: int
    errors: dict[str, int]
    began: float
    last_open: float
    v2: int = 0  # opened with the subprotocol notify.v2 selected by the server


@dataclass
class Stats:
    """The clients' counters since the last reset."""

    frames: int
    first: float
    last: float
    open: int
    closes: dict[str, int]
    bad_frames: int
    # With a sequence range to check: bench messages received once, twice, outside it.
    distinct: int | None = None
    dupes: int | None = None
    stray: int | None = None
    complete: bool = False
    # v2 clients: ids acknowledged, ack frames sent, ids still waiting to be, and the
    # server's frames other than notifications by type ("gap", "error:bad_frame", ...).
    acked: int = 0
    ack_frames: int = 0
    unacked: int = 0
    control: dict[str, int] = field(default_factory=dict)
    # How long the oldest id of each ack frame had waited in its client, ms: p50, p99,
    # max (of the client process where each is highest).
    ack_delay_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Watched:
    """A client opened with ``watch``: when it began, opened, and got its last frame."""

    began: float
    opened: float
    frames: int
    done: float | None


class ClientProcess(Child):
    """One loadgen process, spoken to in JSON lines."""

    def __init__(self, index: int, logs: Path) -> None:
        # Each client process connects from its own loopback address: 28k ports each.
        self.source_ip = f"127.0.0.{10 + index}"
        super().__init__(
            f"loadgen-{index}",
            [PY, "-m", "bench.loadgen", "--source-ip", self.source_ip],
            logs,
        )
        self._lock = asyncio.Lock()
        self._id = 0

    async def rpc(self, cmd: str, rpc_timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        """One command and its answer; raises RuntimeError on an error or an exit."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        async with self._lock:
            self._id += 1
            self.proc.stdin.write(
                (json.dumps({"id": self._id, "cmd": cmd, **args}) + "\n").encode()
            )
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), rpc_timeout)
        if not line:
            raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name} {cmd}: {answer['error']}")
        return answer

    async def connect(self, rpc_timeout: float, **args: Any) -> Opened:
        a = await self.rpc("connect", rpc_timeout, host=HOST, **args)
        return Opened(
            ok=int(a["ok"]),
            errors=dict(a["errors"]),
            began=a["began"],
            last_open=a["last_open"],
            v2=int(a.get("v2", 0)),
        )

    async def watched(self) -> list[Watched]:
        return [
            Watched(began=w["began"], opened=w["opened"], frames=w["frames"], done=w["done"])
            for w in (await self.rpc("watched"))["watched"]
        ]


class LoadGen:
    """The client processes together: connect slices, count frames, merge latencies."""

    def __init__(self, workers: list[ClientProcess]) -> None:
        self.workers = workers

    def cpu(self) -> float:
        return sum(w.cpu() for w in self.workers)

    async def _all(self, cmd: str, rpc_timeout: float = 120.0, **args: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.rpc(cmd, rpc_timeout, **args) for w in self.workers)))

    async def connect(self, *, start: int, count: int, budget: float = 300, **args: Any) -> Opened:
        """Users ``start .. start + count - 1`` connect, split across the processes."""
        n = len(self.workers)
        slices = [(start + count * i // n, count * (i + 1) // n - count * i // n) for i in range(n)]
        answers = await asyncio.gather(
            *(
                w.connect(budget + 30, start=s, count=c, budget=budget, **args)
                for w, (s, c) in zip(self.workers, slices, strict=True)
                if c > 0
            )
        )
        errors: dict[str, int] = {}
        for a in answers:
            for k, v in a.errors.items():
                errors[k] = errors.get(k, 0) + v
        opened = [a for a in answers if a.ok]
        return Opened(
            ok=sum(a.ok for a in answers),
            errors=errors,
            began=min(a.began for a in answers),
            last_open=max((a.last_open for a in opened), default=0.0),
            v2=sum(a.v2 for a in answers),
        )

    async def stats(self) -> Stats:
        answers = await self._all("stats", 30)
        closes: dict[str, int] = {}
        control: dict[str, int] = {}
        for a in answers:
            for k, v in a["closes"].items():
                closes[k] = closes.get(k, 0) + v
            for k, v in a["control"].items():
                control[k] = control.get(k, 0) + v
        firsts = [a["first"] for a in answers if a["first"]]
        out = Stats(
            frames=sum(a["frames"] for a in answers),
            first=min(firsts) if firsts else 0.0,
            last=max(a["last"] for a in answers),
            open=sum(a["open"] for a in answers),
            closes=closes,
            bad_frames=sum(a["bad_frames"] for a in answers),
            acked=sum(a["acked"] for a in answers),
            ack_frames=sum(a["ack_frames"] for a in answers),
            unacked=sum(a["unacked"] for a in answers),
            control=control,
            ack_delay_ms={
                q: max(a["ack_delay_us"][q] for a in answers) / 1000 for q in ("p50", "p99", "max")
            },
        )
        if all("distinct" in a for a in answers):
            # Each user is connected once, through one client process: the messages
            # each process saw are disjoint, so the counts add up.
            out.distinct = sum(a["distinct"] for a in answers)
            out.dupes = sum(a["dupes"] for a in answers)
            out.stray = sum(a["stray"] for a in answers)
        return out

    async def reset(self, seq_base: int = 0, seq_count: int = 0) -> None:
        await self._all("reset", 30, seq_base=seq_base, seq_count=seq_count)

    async def latencies(self) -> tuple[Latency, list[Second]]:
        """Latency percentiles of all samples, and a per-second timeline of them."""
        merged = array("q")
        by_second: dict[int, list[int]] = {}
        for a in await self._all("latencies", 60):
            lat = array("q")
            lat.frombytes(base64.b64decode(a["latencies_us"]))
            arrivals = array("l")
            arrivals.frombytes(base64.b64decode(a["arrivals_ms"]))
            merged.extend(lat)
            t0 = int(a["t0_ms"])
            for value, at in zip(lat, arrivals, strict=False):
                by_second.setdefault((t0 + at) // 1000, []).append(value)
        timeline = []
        if by_second:
            first = min(by_second)
            for second in sorted(by_second):
                values = sorted(by_second[second])
                timeline.append(
                    Second(
                        t=second - first,
                        n=len(values),
                        p50_ms=pct(values, 0.5) / 1000,
                        p99_ms=pct(values, 0.99) / 1000,
                        max_ms=values[-1] / 1000,
                    )
                )
        lat_sorted = sorted(merged)
        latency = Latency(
            p50=pct(lat_sorted, 0.50) / 1000,
            p99=pct(lat_sorted, 0.99) / 1000,
            p999=pct(lat_sorted, 0.999) / 1000,
            max=(lat_sorted[-1] / 1000) if lat_sorted else float("nan"),
            samples=len(lat_sorted),
        )
        return latency, timeline

    async def close_all(self, rst: bool = True) -> None:
        await self._all("close_all", 60, rst=rst, timeout=20)

    async def wait_frames(self, expected: int, *, budget: float, stall: float = 20.0) -> Stats:
        """Poll until ``expected`` frames arrived, progress stalls, or the budget is spent."""
        deadline = time.monotonic() + budget
        last_count, last_change = -1, time.monotonic()
        while True:
            s = await self.stats()
            now = time.monotonic()
            if s.frames != last_count:
                last_count, last_change = s.frames, now
            if s.frames >= expected or now > deadline or now - last_change > stall:
                s.complete = s.frames >= expected
                return s
            await asyncio.sleep(0.1)
