"""``make bench``: measure the gateway against a bare Sanic push loop in the same run.

Starts, on loopback only: a fast auth stand-in (``bench/auth_fast.py``), the bare
baseline (``bench/baseline_sanic.py``), gateways (``python -m service``, one per
phase, each on its own topics and consumer group and a scratch database), client
processes (``bench/loadgen.py``) and producer processes (``bench/producer.py``).
Local Kafka and PostgreSQL must be running already (``make up``); they are not
stopped. Everything it creates (topics, the scratch database, processes) is
removed at the end. Every wait is bounded; ``--budget`` bounds the whole run.

Scenarios (issue 6): live fan-out at two connection counts, paced latency, offline
store, flush on connect, connect storm, memory per idle connection. Prints one table
and writes it as JSON to ``bench/results/<timestamp>.json``.

Scale-out (issue 7, ``--only scale``; part of the default run): the live fan-out with
C users through five gateway set-ups in turn, 1 process without Redis, 1 process
with ``REDIS_URL``, 2 workers (``NOTIFY_WORKERS=2``) with it, and the last two again
with each process capped at ``--scale-quota`` of a core (a cgroup), each on its own
topic of ``--scale-partitions`` partitions; then Redis alone (``bench/redis_capacity.py``).
A set-up's CPU is summed over its process tree (Sanic's manager and its workers).

    python -m bench.run                  # everything, defaults (~5.5 minutes)
    python -m bench.run --quick          # small sizes, ~2-3 minutes
    python -m bench.run --only store,flush
    python -m bench.run --only live --profile   # py-spy the gateway during fan-out
    python -m bench.run --only scale            # scale-out through Redis (~2.5 minutes)

How "Kafka to socket" is measured: the K messages are produced *before* the
gateway's consumer starts. The gateway bootstraps Kafka through a small TCP gate
in this process that refuses connections until every client is connected (the
gateway keeps retrying, as it does when Kafka is down); the gate then opens and
the gateway drains the topic. Delivered/s is frames received by the clients over
the span from the first to the last frame. A second pass produces K more messages
live (a producer process, as fast as it can) for end-to-end latency from the
timestamp the producer wrote into each message to its receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import uuid
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import httpx
import psutil
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import common

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
HOST = "127.0.0.1"
WS_PATH = "/api/v1/notify/ws"
SCENARIOS = ("live", "paced", "store", "flush", "storm", "memory", "scale")
# ``scale`` (the set-ups of SCALE_SETUPS, and Redis's own capacity) adds ~2.5 minutes to
# the default run (~5.5 in all). Without a reachable Redis, a default
# run skips it; ``--only scale`` fails instead.
DEFAULT_SCENARIOS = SCENARIOS
SCALE_SETUPS = {
    # name: (what, worker processes, with Redis, CPU quota per process or 0)
    "single": ("1 process, no Redis", 1, False, 0),
    "redis1": ("1 process + Redis", 1, True, 0),
    "redis2": ("2 workers + Redis", 2, True, 0),
    # The same with each gateway process capped at --scale-quota of a core (a cgroup):
    # on 2 cores the load generator, Kafka and Redis leave 2 uncapped workers ~1.4 cores,
    # so only with a cap do 2 processes get twice the CPU of 1 and show what a second
    # process (or machine) adds.
    "singleq": ("1 process, no Redis, capped", 1, False, 1),  # only with --scale-setups
    "redis1q": ("1 process + Redis, capped", 1, True, 1),
    "redis2q": ("2 workers + Redis, capped", 2, True, 1),
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
FLUSH_RUNS = 3  # users with a stored backlog, flushed one after another; the median counts


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def asyncpg_port(dsn: str) -> int | None:
    """The port of a postgresql:// DSN (5432 when none is given)."""
    rest = dsn.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = rest.rpartition(":")
    try:
        return int(port) if host else 5432
    except ValueError:
        return 5432


def pct(sorted_values: list[int] | array[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


# -- options -------------------------------------------------------------------------


@dataclass
class Options:
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
    scenarios: set[str]
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
    scale_setups: list[str] = field(default_factory=lambda: list(DEFAULT_SCALE_SETUPS))
    scale_partitions: int = 4
    scale_quota: float = 0.5
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_capacity_messages: int = 300_000
    argv: list[str] = field(default_factory=list)


def parse_options(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the gateway against a bare Sanic push loop (issue 6).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a ~2-3 minute run")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of {SCENARIOS} (default: all; scale, the scale-out "
        "through Redis, ~1.5 min, is skipped when Redis is not reachable unless named)",
    )
    parser.add_argument("-k", "--messages", type=int, help="K for fan-out and store (100000)")
    parser.add_argument(
        "-c", "--connections", help="the two connection counts, small,big (1000,10000)"
    )
    parser.add_argument("--paced-rate", type=float, default=5000.0, help="messages/s (5000)")
    parser.add_argument("--paced-seconds", type=float, help="seconds of paced load (30)")
    parser.add_argument("--storm", type=int, help="connections of the JWT-local storm (5000)")
    parser.add_argument("--flush", type=int, default=1000, help="stored messages to flush")
    parser.add_argument("--workers", type=int, default=2, help="client processes (2)")
    parser.add_argument(
        "--concurrency", type=int, default=50, help="handshakes in flight per client process"
    )
    parser.add_argument("--partitions", type=int, default=3, help="partitions per topic (3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the big fan-out (and with scale: one worker of each set-up)",
    )
    parser.add_argument("--budget", type=float, default=1500, help="hard limit, seconds")
    parser.add_argument(
        "--kafka", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://notify:notify@127.0.0.1:5432/notify"),
        help="a DSN whose user may CREATE DATABASE; the bench works in a scratch database",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument(
        "--scale-connections", type=int, help="scale: connected users C (10000; --quick 2000)"
    )
    parser.add_argument(
        "--scale-setups",
        default=",".join(DEFAULT_SCALE_SETUPS),
        help=f"scale: which gateway set-ups, in order ({','.join(SCALE_SETUPS)})",
    )
    parser.add_argument(
        "--scale-partitions",
        type=int,
        default=4,
        help="scale: partitions of its topics (4; at least 4 and even, so 2 workers split them)",
    )
    parser.add_argument(
        "--scale-quota",
        type=float,
        default=0.5,
        help="scale: CPU per gateway process in the capped set-ups, in cores (0.5)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="scale: the Redis the gateways route through (not stopped)",
    )
    parser.add_argument(
        "--redis-capacity-messages",
        type=int,
        help="scale: PUBLISHes per Redis capacity test (300000; --quick 100000; 0 skips it)",
    )
    parser.add_argument(
        "--update-doc",
        action="store_true",
        help="also write the table into docs/performance.md (between its bench markers)",
    )
    parser.add_argument(
        "--gateway-gc",
        default="",
        metavar="A,B,C",
        help="experiment: gc.set_threshold(A, B, C) in the gateway before it starts",
    )
    parser.add_argument(
        "--no-gc-trace",
        dest="gc_trace",
        action="store_false",
        help="run the gateway as plain `python -m service` (no GC pause log)",
    )
    a = parser.parse_args(argv)
    quick = a.quick
    small, big = (1000, 2000) if quick else (1000, 10000)
    if a.connections:
        small, big = (int(x) for x in a.connections.split(","))
    only = {s.strip() for s in a.only.split(",") if s.strip()} or set(DEFAULT_SCENARIOS)
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {SCENARIOS}")
    setups = [s.strip() for s in a.scale_setups.split(",") if s.strip()]
    if set(setups) - set(SCALE_SETUPS):
        parser.error(f"--scale-setups: choose from {list(SCALE_SETUPS)}")
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
        scenarios=only,
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
        argv=argv,
    )


# -- processes -----------------------------------------------------------------------


class Child:
    """A child process with its log, CPU and RSS readings; always stopped at the end."""

    registry: ClassVar[list[Child]] = []

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.log_path = logs / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.ps: psutil.Process | None = None
        self._cpu_at_exit = 0.0

    async def start(self, pipes: bool = False) -> Child:
        logfile = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else logfile,
            stderr=logfile,
            limit=64 * 1024 * 1024,
        )
        logfile.close()
        self.ps = psutil.Process(self.proc.pid)
        Child.registry.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def cpu(self) -> float:
        """CPU seconds (user + system) used so far."""
        if self.ps is None:
            return 0.0
        try:
            t = self.ps.cpu_times()
            self._cpu_at_exit = t.user + t.system
        except psutil.Error:
            pass
        return self._cpu_at_exit

    def rss(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        self.cpu()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await asyncio.wait_for(proc.wait(), 10)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Worker(Child):
    """A loadgen process spoken to in JSON lines."""

    def __init__(self, index: int, logs: Path):
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


class LoadGen:
    """The client processes together: connect slices, count frames, merge latencies."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers

    def cpu(self) -> float:
        return sum(w.cpu() for w in self.workers)

    async def _all(self, cmd: str, rpc_timeout: float = 120.0, **args: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.rpc(cmd, rpc_timeout, **args) for w in self.workers)))

    async def connect(
        self, *, port: int, path: str, population: int, start: int, count: int, **args: Any
    ) -> dict[str, Any]:
        n = len(self.workers)
        slices = [(start + count * i // n, count * (i + 1) // n - count * i // n) for i in range(n)]
        budget = float(args.pop("budget", 300))
        answers = await asyncio.gather(
            *(
                w.rpc(
                    "connect",
                    budget + 30,
                    host=HOST,
                    port=port,
                    path=path,
                    population=population,
                    start=s,
                    count=c,
                    budget=budget,
                    **args,
                )
                for w, (s, c) in zip(self.workers, slices, strict=True)
                if c > 0
            )
        )
        errors: dict[str, int] = {}
        for a in answers:
            for k, v in a["errors"].items():
                errors[k] = errors.get(k, 0) + v
        opened = [a for a in answers if a["ok"]]
        return {
            "ok": sum(a["ok"] for a in answers),
            "errors": errors,
            "began": min(a["began"] for a in answers),
            "last_open": max((a["last_open"] for a in opened), default=0.0),
        }

    async def stats(self) -> dict[str, Any]:
        answers = await self._all("stats", 30)
        closes: dict[str, int] = {}
        for a in answers:
            for k, v in a["closes"].items():
                closes[k] = closes.get(k, 0) + v
        firsts = [a["first"] for a in answers if a["first"]]
        return {
            "frames": sum(a["frames"] for a in answers),
            "first": min(firsts) if firsts else 0.0,
            "last": max(a["last"] for a in answers),
            "open": sum(a["open"] for a in answers),
            "closes": closes,
            "bad_frames": sum(a["bad_frames"] for a in answers),
            **(
                {
                    # Each user is connected once, through one client process: the
                    # messages each process saw are disjoint, so the counts add up.
                    "distinct": sum(a["distinct"] for a in answers),
                    "dupes": sum(a["dupes"] for a in answers),
                    "stray": sum(a["stray"] for a in answers),
                }
                if all("distinct" in a for a in answers)
                else {}
            ),
        }

    async def reset(self, seq_base: int = 0, seq_count: int = 0) -> None:
        await self._all("reset", 30, seq_base=seq_base, seq_count=seq_count)

    async def latencies(self) -> tuple[list[int], list[dict[str, float]]]:
        """All latency samples (us, sorted) and a per-second timeline of them."""
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
                    {
                        "t": second - first,
                        "n": len(values),
                        "p50_ms": pct(values, 0.5) / 1000,
                        "p99_ms": pct(values, 0.99) / 1000,
                        "max_ms": values[-1] / 1000,
                    }
                )
        return sorted(merged), timeline

    async def close_all(self, rst: bool = True) -> None:
        await self._all("close_all", 60, rst=rst, timeout=20)

    async def watched(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for a in await self._all("watched", 30):
            out.extend(a["watched"])
        return out

    async def wait_frames(
        self, expected: int, *, budget: float, stall: float = 20.0
    ) -> dict[str, Any]:
        """Poll until ``expected`` frames arrived, progress stalls, or the budget is spent."""
        deadline = time.monotonic() + budget
        last_count, last_change = -1, time.monotonic()
        while True:
            s = await self.stats()
            now = time.monotonic()
            if s["frames"] != last_count:
                last_count, last_change = s["frames"], now
            if s["frames"] >= expected or now > deadline or now - last_change > stall:
                s["complete"] = s["frames"] >= expected
                return s
            await asyncio.sleep(0.1)


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, not idle or iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class CpuWindow:
    """CPU seconds of named processes over a span of wall time, as % of one core.

    ``other`` is everything else the machine did meanwhile (other people's tests,
    PostgreSQL, this orchestrator): how noisy the window was.
    """

    def __init__(self, parts: dict[str, Callable[[], float]]):
        self.parts = parts
        self.start = {k: f() for k, f in parts.items()}
        self.busy0 = machine_busy()
        self.t0 = time.monotonic()

    def close(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self.t0)
        out = {k: max(0.0, 100.0 * (f() - self.start[k]) / wall) for k, f in self.parts.items()}
        for k, seconds in (extra or {}).items():
            out[k] = 100.0 * seconds / wall
        busy = 100.0 * (machine_busy() - self.busy0) / wall
        out["other"] = max(0.0, busy - sum(out.values()))
        out["wall_s"] = wall
        return out


class Gate:
    """A TCP gate in front of Kafka's bootstrap address: holds connections until opened.

    The gateway's consumer connects and sends its first metadata request, which waits
    here (well inside aiokafka's 40 s request timeout, or it retries) until ``open()``;
    then bytes flow both ways. Only the bootstrap connection goes through the gate
    (Kafka then hands out its own advertised address), so it holds back the gateway's
    consumer without sitting on the data path.
    """

    def __init__(self, target: str):
        host, _, port = target.split(",")[0].rpartition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.opened = asyncio.Event()
        self.held = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, HOST, self.port)

    async def open(self) -> None:
        self.opened.set()

    async def close(self) -> None:
        self.opened.set()
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held += 1
        try:
            await asyncio.wait_for(self.opened.wait(), 900)
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError):
            writer.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


class CpuQuota:
    """Caps one process at a share of a core: a cgroup of its own (v1 ``cpu``, or v2).

    Needs root and a writable cgroup file system; :meth:`unavailable` says why not.
    ``remove()`` deletes the group once its process has exited.
    """

    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")
    PERIOD_US = 20_000

    def __init__(self, name: str, cores: float, pid: int) -> None:
        if (self.V1 / "cpu.cfs_quota_us").exists():
            self.path = self.V1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(cores * self.PERIOD_US)))
        else:
            with contextlib.suppress(OSError):
                (self.V2 / "cgroup.subtree_control").write_text("+cpu")
            self.path = self.V2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{int(cores * self.PERIOD_US)} {self.PERIOD_US}")
        (self.path / "cgroup.procs").write_text(str(pid))

    @classmethod
    def unavailable(cls) -> str | None:
        """Why processes cannot be capped here, or None if they can."""
        if os.geteuid() != 0:
            return "capping CPU needs root (cgroups)"
        if (cls.V1 / "cpu.cfs_quota_us").exists() and os.access(cls.V1, os.W_OK):
            return None
        controllers = cls.V2 / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return None
        return "no writable cgroup cpu controller"

    def throttling(self) -> tuple[int, int]:
        """(CFS periods so far, periods in which the cap stopped the process)."""
        values = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                values[key] = int(value)
        return values.get("nr_periods", 0), values.get("nr_throttled", 0)

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # the process is still exiting
        log(f"  could not remove {self.path}")


class Gateway(Child):
    """``python -m service`` on a free port, configured for the bench.

    With ``gc_trace`` it runs under ``bench/gcwrap.py`` (the same ``service`` package as
    ``__main__``, plus a hook that logs garbage-collector pauses).
    """

    def __init__(
        self, name: str, logs: Path, env: dict[str, str], gc_trace: bool = True, tree: bool = False
    ):
        self.port = free_port()
        # With NOTIFY_WORKERS > 1 the process started is Sanic's manager and the workers
        # are its children: CPU is then summed over the whole process tree.
        self.tree = tree
        self._tree_cpu: dict[int, float] = {}
        self.gc_log = logs / f"{name}-gc.log" if gc_trace else None
        env = {
            "NOTIFY_HOST": HOST,
            "NOTIFY_PORT": str(self.port),
            "LOG_LEVEL": "WARNING",
            **({"BENCH_GC_LOG": str(self.gc_log)} if self.gc_log else {}),
            **env,
        }
        module = "bench.gcwrap" if gc_trace else "service"
        super().__init__(name, [PY, "-m", module], logs, env)
        self.base = f"http://{HOST}:{self.port}"

    def cpu(self) -> float:
        """CPU seconds of the gateway; in tree mode of every process under it (one that
        exited counts with its last reading)."""
        if not self.tree or self.ps is None:
            return super().cpu()
        procs = [self.ps]
        with contextlib.suppress(psutil.Error):
            procs += self.ps.children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                self._tree_cpu[p.pid] = t.user + t.system
        return sum(self._tree_cpu.values())

    def workers(self) -> list[psutil.Process]:
        """The processes that serve the port: the gateway itself, or its Sanic workers."""
        if self.ps is None:
            return []
        if not self.tree:
            return [self.ps]

        def listens(p: psutil.Process) -> bool:
            with contextlib.suppress(psutil.Error):
                return any(
                    c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                    for c in p.net_connections("tcp")
                )
            return False

        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = self.ps.children(recursive=True)
        out = [p for p in children if listens(p)]
        if not out and listens(self.ps):
            out = [self.ps]  # NOTIFY_WORKERS=1: the process itself serves
        return sorted(out, key=lambda p: p.pid)

    def connections_per_worker(self, clients: set[str]) -> list[int]:
        """Established connections each worker holds from the client addresses."""
        counts = []
        for w in self.workers():
            try:
                counts.append(
                    sum(
                        1
                        for c in w.net_connections("tcp")
                        if c.status == psutil.CONN_ESTABLISHED
                        and c.laddr
                        and c.laddr.port == self.port
                        and c.raddr
                        and c.raddr.ip in clients
                    )
                )
            except psutil.Error:
                counts.append(-1)
        return counts

    async def census(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """Objects the gateway's collector tracks, by type (bench/gcwrap.py, on SIGUSR2)."""
        if self.gc_log is None or not self.alive():
            return None
        asked = time.time()
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if not self.gc_log.exists():
                continue
            for line in reversed(self.gc_log.read_text().splitlines()):
                if line.startswith("objects "):
                    _, at, report = line.split(" ", 2)
                    if float(at) >= asked:
                        answer: dict[str, Any] = json.loads(report)
                        return answer
                    break
        return None

    def gc_pauses(self, since: float, until: float) -> dict[str, float] | None:
        """Garbage-collector pauses logged between two wall-clock times."""
        if self.gc_log is None or not self.gc_log.exists():
            return None
        full, slow, full_ms, worst = 0, 0, 0.0, 0.0
        for line in self.gc_log.read_text().splitlines():
            try:
                at, generation, ms, _ = line.split()
                when, gen, pause = float(at), int(generation), float(ms)
            except ValueError:
                continue
            if not since <= when <= until:
                continue
            if gen == 2:
                full += 1
                full_ms += pause
            slow += 1
            worst = max(worst, pause)
        return {"full_collections": full, "full_ms": full_ms, "logged": slow, "max_ms": worst}

    async def wait_http(self, http: httpx.AsyncClient, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(self.base + path, timeout=3)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name}: {path} not 200 after {timeout} s:\n{self.tail()}")

    async def metrics(self, http: httpx.AsyncClient) -> dict[str, float]:
        """The Prometheus text as ``name -> value``, labels summed away."""
        text = (await http.get(self.base + "/metrics", timeout=10)).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
        return out


# -- the run -------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options):
        self.o = options
        self.run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"
        self.logs = Path(tempfile.mkdtemp(prefix=f"notify-bench-{self.run_id}-"))
        self.results: dict[str, Any] = {}
        self.topics: list[str] = []
        self.db_name = f"notify_bench_{self.run_id.replace('-', '_').lower()}"
        self.db_url = ""
        self.http = httpx.AsyncClient(trust_env=False)
        self.auth: Child | None = None
        self.auth_url = ""
        self.lg: LoadGen | None = None
        self.exp = int(time.time()) + 4 * 3600
        self.kafka_pid: int | None = None
        self.pg_pid: int | None = None
        self.redis_pid: int | None = None

    # -- infrastructure ---------------------------------------------------------------

    async def setup(self) -> None:
        log(f"run {self.run_id}; process logs in {self.logs}")
        self.results["meta"] = self.meta()
        # A scratch database, migrated with the project's own Alembic revisions.
        admin = await asyncpg.connect(self.o.database_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.db_name}"')
        finally:
            await admin.close()
        base, _, _ = self.o.database_url.rpartition("/")
        self.db_url = f"{base}/{self.db_name}"
        migrate = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "alembic",
            "upgrade",
            "head",
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": self.db_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(migrate.communicate(), 120)
        if migrate.returncode != 0:
            raise RuntimeError(f"alembic upgrade failed:\n{out.decode(errors='replace')}")
        # The auth stand-in.
        self.auth = await Child(
            "auth", [PY, "-m", "bench.auth_fast", "--port", "0"], self.logs
        ).start(pipes=True)
        assert self.auth.proc is not None and self.auth.proc.stdout is not None
        line = await asyncio.wait_for(self.auth.proc.stdout.readline(), 30)
        port = json.loads(line)["port"]
        self.auth_url = f"http://{HOST}:{port}/api/v1/users/me"
        # Client processes.
        workers = [Worker(i, self.logs) for i in range(self.o.workers)]
        for w in workers:
            await w.start(pipes=True)
        self.lg = LoadGen(workers)
        self.kafka_pid = self._find_kafka()
        pg_port = asyncpg_port(self.o.database_url)
        self.pg_pid = self._listener(pg_port) if pg_port else None

    @staticmethod
    def _listener(port: int) -> int | None:
        with contextlib.suppress(psutil.Error):
            for conn in psutil.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return int(conn.pid) if conn.pid else None
        return None

    def postgres_cpu(self) -> float:
        """CPU seconds of the PostgreSQL server and its backends (those alive now)."""
        if self.pg_pid is None:
            return 0.0
        total = 0.0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pg_pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def _find_kafka(self) -> int | None:
        """The broker process listening on our bootstrap port (others may run their own)."""
        return self._listener(int(self.o.kafka.split(",")[0].rpartition(":")[2]))

    def kafka_cpu(self) -> float:
        if self.kafka_pid is None:
            return 0.0
        try:
            t = psutil.Process(self.kafka_pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    async def auth_checks(self) -> int:
        base = self.auth_url.rsplit("/api/", 1)[0]
        return int((await self.http.get(base + "/count", timeout=5)).json()["checks"])

    def meta(self) -> dict[str, Any]:
        import sanic

        return {
            "run_id": self.run_id,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "sanic": sanic.__version__,
            "options": {
                k: (sorted(v) if isinstance(v, set) else v)
                for k, v in vars(self.o).items()
                if k not in ("database_url", "argv")
            }
            | {"argv_text": " ".join(self.o.argv)},
            "nofile": common.raise_nofile(),
            "git": self.git_state(),
        }

    def git_state(self) -> dict[str, str]:
        """Which gateway code was measured: HEAD, and whether service/ had local changes."""
        import hashlib
        import subprocess

        def git(*args: str) -> str:
            try:
                return subprocess.run(
                    ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
                ).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""

        digest = hashlib.sha256()
        for path in sorted((ROOT / "service").glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
        return {
            "head": git("rev-parse", "--short", "HEAD"),
            "service_dirty": git("status", "--porcelain", "--", "service") or "clean",
            "service_sha256": digest.hexdigest()[:16],
        }

    async def cleanup(self) -> None:
        for child in reversed(Child.registry):
            with contextlib.suppress(Exception):
                if isinstance(child, Worker) and child.alive():
                    await child.rpc("quit", 10)
                await child.stop(timeout=15)
        if self.topics:
            with contextlib.suppress(Exception):
                admin = AIOKafkaAdminClient(bootstrap_servers=self.o.kafka)
                await admin.start()
                try:
                    existing = set(await admin.list_topics())
                    doomed = [t for t in self.topics if t in existing]
                    if doomed:
                        await admin.delete_topics(doomed)
                finally:
                    await admin.close()
        if self.db_url and not self.o.keep:
            with contextlib.suppress(Exception):
                admin = await asyncpg.connect(self.o.database_url)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
                finally:
                    await admin.close()
        await self.http.aclose()

    async def new_topic(self, label: str, partitions: int | None = None) -> str:
        name = f"bench.{self.run_id}.{label}"
        admin = AIOKafkaAdminClient(bootstrap_servers=self.o.kafka)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(
                        name, num_partitions=partitions or self.o.partitions, replication_factor=1
                    )
                ]
            )
        finally:
            await admin.close()
        self.topics += [name, f"{name}.dlq"]
        return name

    async def produce(
        self, topic: str, *, population: int, users: int, count: int = 0, **extra: Any
    ) -> dict[str, Any]:
        argv = [
            PY,
            "-m",
            "bench.producer",
            "--bootstrap",
            self.o.kafka,
            "--topic",
            topic,
            "--population",
            str(population),
            "--users",
            str(users),
            "--count",
            str(count),
        ]
        for k, v in extra.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=(self.logs / "producer.log").open("ab"),
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 600)
        if proc.returncode != 0:
            raise RuntimeError(
                f"producer failed: {(self.logs / 'producer.log').read_text()[-2000:]}"
            )
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    def gateway(self, name: str, *, tree: bool = False, **env: str) -> Gateway:
        # The code under service/ may change while a run goes on (others work in this tree):
        # record what each gateway was started from.
        self.results.setdefault("gateway_code", {})[name] = self.git_state()
        return Gateway(
            name,
            self.logs,
            # bench/gcwrap.py is for one process: the scale set-ups run plain `python -m service`.
            gc_trace=self.o.gc_trace and not tree,
            tree=tree,
            env={
                "KAFKA_BOOTSTRAP_SERVERS": self.o.kafka,
                "KAFKA_GROUP_ID": f"bench-{self.run_id}-{name}",
                "DATABASE_URL": self.db_url,
                "AUTH_VERIFY_URL": self.auth_url,
                # Long enough that the reconnect storm later in the phase is all cache hits.
                "AUTH_CACHE_TTL": "15m",
                # One process, no Redis, whatever the caller's environment says; the
                # scale set-ups override both.
                "REDIS_URL": "",
                "NOTIFY_WORKERS": "1",
                **({"BENCH_GC_THRESHOLD": self.o.gateway_gc} if self.o.gateway_gc else {}),
                **env,
            },
        )

    # -- measuring helpers -----------------------------------------------------------

    async def connect_storm(
        self,
        target: Gateway | Child,
        *,
        port: int,
        path: str,
        population: int,
        count: int,
        auth: str,
        salt: str = "",
        count_registered: bool = False,
        start: int = 0,
    ) -> dict[str, Any]:
        """Open ``count`` connections; handshakes/s up to the last one registered.

        For the gateway "registered" means past the token check (the handshake's 101
        comes before it): ``notify_connections_opened_total`` is polled until it has
        grown by ``count``.
        """
        assert self.lg is not None
        registered_at = 0.0
        base = 0.0
        stop = asyncio.Event()

        async def poll() -> None:
            nonlocal registered_at
            assert isinstance(target, Gateway)
            deadline = time.monotonic() + 600
            while not stop.is_set() and time.monotonic() < deadline:
                m = await target.metrics(self.http)
                if m.get("notify_connections_opened_total", 0) - base >= count:
                    registered_at = time.time()
                    return
                await asyncio.sleep(0.05)

        poller = None
        if count_registered and isinstance(target, Gateway):
            base = (await target.metrics(self.http)).get("notify_connections_opened_total", 0)
            poller = asyncio.create_task(poll())
        window = CpuWindow(self.cpu_parts(target))
        result = await self.lg.connect(
            port=port,
            path=path,
            population=population,
            start=start,
            count=count,
            auth=auth,
            salt=salt,
            exp=self.exp,
            concurrency=self.o.concurrency,
            budget=300,
        )
        if poller is not None:
            try:
                await asyncio.wait_for(poller, 60)
            except TimeoutError:
                stop.set()
        cpu = window.close()
        end = max(result["last_open"], registered_at)
        result["registered_at"] = registered_at
        result["seconds"] = end - result["began"]
        result["rate"] = result["ok"] / result["seconds"] if result["seconds"] > 0 else 0.0
        result["cpu"] = cpu
        if result["errors"]:
            log(f"  connect errors: {result['errors']}")
        return result

    def cpu_parts(self, server: Child | None) -> dict[str, Callable[[], float]]:
        assert self.lg is not None
        parts: dict[str, Callable[[], float]] = {
            "loadgen": self.lg.cpu,
            "kafka": self.kafka_cpu,
            "postgres": self.postgres_cpu,
        }
        if server is not None:
            parts["server"] = server.cpu
        if self.auth is not None:
            parts["auth"] = self.auth.cpu
        return parts

    async def measure_frames(
        self,
        server: Child,
        expected: int,
        trigger: Callable[[], Awaitable[Any]],
        *,
        budget: float,
        latency: bool = True,
        seqs: tuple[int, int] | None = None,
        parts: dict[str, Callable[[], float]] | None = None,
    ) -> dict[str, Any]:
        """Reset the clients, run ``trigger``, wait for ``expected`` frames; rates and latency.

        With ``seqs`` = (first, count), the clients also note which bench messages of that
        range arrived: ``missing`` and ``dupes`` say what was lost or delivered twice.
        """
        assert self.lg is not None
        await self.lg.reset(*(seqs or (0, 0)))
        window = CpuWindow(parts or self.cpu_parts(server))
        started = time.time()
        trigger_task = asyncio.create_task(trigger())
        s = await self.lg.wait_frames(expected, budget=budget)
        produced = await asyncio.wait_for(trigger_task, budget)
        extra = {}
        if isinstance(produced, dict) and "cpu" in produced:
            extra["producer"] = float(produced["cpu"])
        cpu = window.close(extra)
        span = s["last"] - s["first"]
        out: dict[str, Any] = {
            "expected": expected,
            "frames": s["frames"],
            "complete": s["complete"],
            "closes": s["closes"],
            "bad_frames": s["bad_frames"],
            "span_s": span,
            "rate": s["frames"] / span if span > 0 else 0.0,
            "first_frame_after_s": s["first"] - started if s["first"] else None,
            "first_at": s["first"],
            "last_at": s["last"],
            "cpu": cpu,
        }
        if seqs is not None and "distinct" in s:
            out["distinct"] = s["distinct"]
            out["missing"] = seqs[1] - s["distinct"]
            out["dupes"] = s["dupes"]
            out["stray"] = s["stray"]
        if isinstance(produced, dict) and "rate" in produced:
            out["producer"] = produced
        if latency:
            lat, timeline = await self.lg.latencies()
            out["timeline"] = timeline
            out["latency_ms"] = {
                "p50": pct(lat, 0.50) / 1000,
                "p99": pct(lat, 0.99) / 1000,
                "p999": pct(lat, 0.999) / 1000,
                "max": (lat[-1] / 1000) if lat else float("nan"),
                "samples": len(lat),
            }
        if isinstance(server, Gateway):
            out["gc"] = server.gc_pauses(started, time.time())
            gc = out["gc"]
            if gc and gc["max_ms"] > 20:
                log(
                    f"  gc: {gc['full_collections']} full collections, "
                    f"{gc['full_ms']:.0f} ms in all, longest pause {gc['max_ms']:.0f} ms"
                )
        if not s["complete"]:
            log(f"  INCOMPLETE: {s['frames']} of {expected} frames")
        return out

    async def wait_connections(self, gw: Gateway, want: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await gw.metrics(self.http)).get("notify_connections", -1) == want:
                return
            await asyncio.sleep(0.1)
        log(f"  {gw.name}: connections did not reach {want} in {timeout} s")

    # -- phases ----------------------------------------------------------------------

    async def phase_baseline(self) -> None:
        """Bare Sanic: connect storm + memory at the big count, blast, paced, flush, small."""
        o, lg = self.o, self.lg
        assert lg is not None
        port = free_port()
        base = Child("baseline", [PY, "-m", "bench.baseline_sanic", "--port", str(port)], self.logs)
        await base.start()
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get(url + "/count", timeout=2)).status_code == 200:
                    break
            if time.monotonic() > deadline or not base.alive():
                raise RuntimeError(f"baseline did not start:\n{base.tail()}")
            await asyncio.sleep(0.1)
        res: dict[str, Any] = {}
        self.results["baseline"] = res
        want_big = self.o.scenarios & {"live", "paced", "storm", "memory"}
        if want_big:
            await self.warm_up(base, port, "/ws", "user")
            rss0 = base.rss()
            log(f"baseline: connecting {o.big}")
            res["connect_big"] = await self.connect_storm(
                base, port=port, path="/ws", population=common.LIVE, count=o.big, auth="user"
            )
            await asyncio.sleep(2)
            res["rss_per_conn_kb"] = (base.rss() - rss0) / max(1, res["connect_big"]["ok"]) / 1024
            log(
                f"  {res['connect_big']['rate']:.0f} handshakes/s, "
                f"{res['rss_per_conn_kb']:.1f} KB/conn"
            )
            if "live" in o.scenarios:
                log(f"baseline: blast {o.messages} frames to {o.big}")
                res[f"live_{o.big}"] = await self.measure_frames(
                    base,
                    o.messages,
                    lambda: self.http.post(url + f"/blast?k={o.messages}", timeout=10),
                    budget=300,
                )
                log(f"  {res[f'live_{o.big}']['rate']:.0f} frames/s")
            if "paced" in o.scenarios:
                n = int(o.paced_rate * o.paced_seconds)
                log(f"baseline: paced {o.paced_rate:.0f}/s for {o.paced_seconds:.0f} s")
                res["paced"] = await self.measure_frames(
                    base,
                    n,
                    lambda: self.http.post(
                        url + f"/paced?rate={o.paced_rate}&seconds={o.paced_seconds}", timeout=10
                    ),
                    budget=o.paced_seconds + 60,
                )
                log(f"  p99 {res['paced']['latency_ms']['p99']:.2f} ms")
            await lg.close_all()
            await self.wait_baseline_empty(url)
        if "flush" in o.scenarios:
            log(f"baseline: flush {o.flush} frames on connect")
            res["flush"] = await self.flush_series(
                port, "/ws", auth="user", query=f"&flush={o.flush}"
            )
            log(f"  {res['flush']['to_last_ms']:.1f} ms to the last frame")
            await lg.close_all()
            await self.wait_baseline_empty(url)
        if "live" in o.scenarios:
            log(f"baseline: blast {o.messages} frames to {o.small}")
            await self.connect_storm(
                base, port=port, path="/ws", population=common.LIVE, count=o.small, auth="user"
            )
            res[f"live_{o.small}"] = await self.measure_frames(
                base,
                o.messages,
                lambda: self.http.post(url + f"/blast?k={o.messages}", timeout=10),
                budget=300,
            )
            log(f"  {res[f'live_{o.small}']['rate']:.0f} frames/s")
            await lg.close_all()
        await base.stop()

    async def wait_baseline_empty(self, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await self.http.get(url + "/count", timeout=5)).json()["connections"] == 0:
                return
            await asyncio.sleep(0.1)
        log("  baseline still holds connections")

    async def warm_up(self, server: Child, port: int, path: str, auth: str) -> None:
        """One connection opened and closed first, so one-off costs (lazy imports, first
        pool connections) are not counted in the storm or the memory figure."""
        assert self.lg is not None
        await self.lg.workers[0].rpc(
            "connect",
            60,
            host=HOST,
            port=port,
            path=path,
            population=common.STORM,
            start=999_999,
            count=1,
            auth=auth,
            salt=f"{self.run_id}-warm",
            exp=self.exp,
            concurrency=1,
            budget=30,
        )
        await asyncio.sleep(0.5)
        await self.lg.close_all()
        await asyncio.sleep(1.0)

    async def flush_series(
        self, port: int, path: str, *, auth: str, query: str = "", salt: str = ""
    ) -> dict[str, Any]:
        """FLUSH_RUNS users connect one after another; the median run, and all of them."""
        assert self.lg is not None
        runs = []
        for index in range(FLUSH_RUNS):
            await asyncio.sleep(1.0)
            runs.append(
                await self.flush_probe(port, path, auth=auth, query=query, salt=salt, index=index)
            )
            await self.lg.close_all()
        ordered = sorted(runs, key=lambda r: r["to_last_ms"] if r["complete"] else float("inf"))
        return {**ordered[len(ordered) // 2], "runs": runs}

    async def flush_probe(
        self,
        port: int,
        path: str,
        *,
        auth: str,
        query: str = "",
        salt: str = "",
        index: int = 0,
    ) -> dict[str, Any]:
        """One user connects and waits for ``flush`` frames: time to the last one."""
        assert self.lg is not None
        await self.lg.reset()
        worker = self.lg.workers[0]
        answer = await worker.rpc(
            "connect",
            60,
            host=HOST,
            port=port,
            path=path,
            population=common.FLUSH,
            start=index,
            count=1,
            auth=auth,
            salt=salt,
            exp=self.exp,
            query=query,
            watch=self.o.flush,
            concurrency=1,
            budget=30,
        )
        if not answer["ok"]:
            raise RuntimeError(f"flush probe could not connect: {answer['errors']}")
        deadline = time.monotonic() + 30
        watched: dict[str, Any] = {}
        while time.monotonic() < deadline:
            watched = (await worker.rpc("watched"))["watched"][-1]
            if watched["done"]:
                break
            await asyncio.sleep(0.02)
        done = watched.get("done") or 0.0
        return {
            "frames": watched.get("frames", 0),
            "complete": bool(done),
            "to_last_ms": (done - watched["began"]) * 1000 if done else float("nan"),
            "after_open_ms": (done - watched["opened"]) * 1000 if done else float("nan"),
        }

    async def phase_gateway_fanout(self, count: int, big: bool) -> None:
        """A gateway with ``count`` clients: memory, storm, drain, live, paced, cached storm."""
        o, lg = self.o, self.lg
        assert lg is not None
        label = f"fanout{count}"
        res: dict[str, Any] = {}
        self.results[f"gateway_{count}"] = res
        topic = await self.new_topic(label)
        drain = "live" in o.scenarios
        if drain:
            log(f"gateway {count}: pre-producing {o.messages} messages")
            res["preproduce"] = await self.produce(
                topic, population=common.LIVE, users=count, count=o.messages
            )
            log(f"  {res['preproduce']['rate']:.0f} msg/s into Kafka")
        gate = Gate(o.kafka)
        await gate.start()
        gw = self.gateway(
            label,
            KAFKA_BOOTSTRAP_SERVERS=gate.address,
            KAFKA_TOPIC=topic,
            KAFKA_DLQ_TOPIC=f"{topic}.dlq",
        )
        await gw.start()
        profiler: asyncio.subprocess.Process | None = None
        quotas: list[CpuQuota] = []
        try:
            await gw.wait_http(self.http, "/health/live")
            await self.warm_up(gw, gw.port, WS_PATH, "token")
            census0 = await gw.census() if big else None
            rss0 = gw.rss()
            log(f"gateway {count}: connecting {count} (remote auth, uncached)")
            salt = f"{self.run_id}-{label}"
            if big and o.profile:
                profiler = await self.start_profiler(gw, "connect-uncached")
            connect = await self.connect_storm(
                gw,
                port=gw.port,
                path=WS_PATH,
                population=common.LIVE,
                count=count,
                auth="token",
                salt=salt,
                count_registered=True,
            )
            res["connect"] = connect
            if profiler is not None:
                res["profile_connect_uncached"] = await self.stop_profiler(profiler)
                profiler = None
            await asyncio.sleep(2)
            res["rss_per_conn_kb"] = (gw.rss() - rss0) / max(1, connect["ok"]) / 1024
            log(f"  {connect['rate']:.0f} handshakes/s, {res['rss_per_conn_kb']:.1f} KB/conn")
            census1 = await gw.census() if census0 else None
            if census0 and census1:
                n = max(1, connect["ok"])
                grown = {
                    kind: (census1["types"].get(kind, 0) - census0["types"].get(kind, 0)) / n
                    for kind in census1["types"]
                }
                res["gc_objects_per_conn"] = {
                    "total": (census1["total"] - census0["total"]) / n,
                    "by_type": dict(sorted(grown.items(), key=lambda kv: -kv[1])[:20]),
                }
                log(
                    f"  {res['gc_objects_per_conn']['total']:.0f} GC-tracked objects per connection"
                )
            if big and o.profile and drain:
                profiler = await self.start_profiler(gw, "fanout", native=True)
            if drain:
                log(f"gateway {count}: draining {o.messages} pre-produced messages")

                async def open_gate() -> None:
                    await gate.open()

                res["drain"] = await self.measure_frames(
                    gw, o.messages, open_gate, budget=300, latency=False
                )
                log(f"  {res['drain']['rate']:.0f} notifications/s")
                log(f"gateway {count}: {o.messages} messages produced live")
                res["live"] = await self.measure_frames(
                    gw,
                    o.messages,
                    lambda: self.produce(
                        topic,
                        population=common.LIVE,
                        users=count,
                        count=o.messages,
                        seq_start=o.messages,
                    ),
                    budget=300,
                )
                log(
                    f"  {res['live']['rate']:.0f} delivered/s "
                    f"(producer {res['live']['producer']['rate']:.0f}/s), "
                    f"p50 {res['live']['latency_ms']['p50']:.1f} ms, "
                    f"p99 {res['live']['latency_ms']['p99']:.1f} ms"
                )
            else:
                await gate.open()
            if profiler is not None:
                res["profile"] = await self.stop_profiler(profiler)
                profiler = None
            await gw.wait_http(self.http, "/health/ready", timeout=60)
            if big and "paced" in o.scenarios:
                if o.profile:
                    profiler = await self.start_profiler(gw, "paced", native=True)
                n = int(o.paced_rate * o.paced_seconds)
                log(f"gateway {count}: paced {o.paced_rate:.0f}/s for {o.paced_seconds:.0f} s")
                res["paced"] = await self.measure_frames(
                    gw,
                    n,
                    lambda: self.produce(
                        topic,
                        population=common.LIVE,
                        users=count,
                        rate=o.paced_rate,
                        duration=o.paced_seconds,
                        seq_start=10 * o.messages,
                    ),
                    budget=o.paced_seconds + 120,
                )
                lat = res["paced"]["latency_ms"]
                worst = max(res["paced"]["timeline"], key=lambda b: b["max_ms"], default=None)
                if worst:
                    slow = sum(1 for b in res["paced"]["timeline"] if b["p99_ms"] > 25)
                    log(
                        f"  worst second t={worst['t']} s: max {worst['max_ms']:.0f} ms; "
                        f"{slow} of {len(res['paced']['timeline'])} seconds with p99 > 25 ms"
                    )
                log(
                    f"  p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, p999 {lat['p999']:.1f} ms"
                )
            if profiler is not None:
                res["profile_paced"] = await self.stop_profiler(profiler)
                profiler = None
            res["metrics"] = await gw.metrics(self.http)
            if big and "storm" in o.scenarios:
                await lg.close_all()
                await self.wait_connections(gw, 0)
                checks = await self.auth_checks()
                log(f"gateway {count}: reconnecting {count} with the same tokens (cached)")
                if o.profile:
                    profiler = await self.start_profiler(gw, "connect-cached")
                cached = await self.connect_storm(
                    gw,
                    port=gw.port,
                    path=WS_PATH,
                    population=common.LIVE,
                    count=count,
                    auth="token",
                    salt=salt,
                    count_registered=True,
                )
                cached["auth_service_calls"] = await self.auth_checks() - checks
                if profiler is not None:
                    res["profile_connect_cached"] = await self.stop_profiler(profiler)
                    profiler = None
                res["connect_cached"] = cached
                log(
                    f"  {cached['rate']:.0f} handshakes/s, "
                    f"{cached['auth_service_calls']} auth service calls"
                )
            await lg.close_all()
        finally:
            if profiler is not None:
                with contextlib.suppress(Exception):
                    await self.stop_profiler(profiler)
            res["log_tail"] = gw.tail(1500)
            await gw.stop()
            await gate.close()
            for quota in quotas:
                quota.remove()

    async def phase_kafka_floor(self) -> None:
        """Paced load with no gateway: producer -> aiokafka consumer looped like the gateway's.

        Twice: committing after every batch as the gateway does, and without commits.
        """
        self.results["kafka_floor"] = await self.kafka_floor(commit=True)
        self.results["kafka_floor_no_commit"] = await self.kafka_floor(commit=False)

    async def kafka_floor(self, *, commit: bool) -> dict[str, Any]:
        o = self.o
        label = "floor" if commit else "floor-nocommit"
        topic = await self.new_topic(label)
        seconds = min(o.paced_seconds, 10.0)
        n = int(o.paced_rate * seconds)
        floor = await Child(
            f"kafka-{label}",
            [
                PY,
                "-m",
                "bench.kafka_floor",
                "--bootstrap",
                o.kafka,
                "--topic",
                topic,
                "--group",
                f"bench-{self.run_id}-floor",
                "--count",
                str(n),
                "--budget",
                str(seconds + 60),
                *([] if commit else ["--no-commit"]),
            ],
            self.logs,
        ).start(pipes=True)
        assert floor.proc is not None and floor.proc.stdout is not None
        ready = await asyncio.wait_for(floor.proc.stdout.readline(), 60)
        if not ready:
            raise RuntimeError(f"kafka floor consumer failed:\n{floor.tail()}")
        log(
            f"kafka alone: paced {o.paced_rate:.0f}/s for {seconds:.0f} s into a bare consumer"
            f" ({'commit per batch' if commit else 'no commits'})"
        )
        produced = await self.produce(
            topic,
            population=common.LIVE,
            users=o.big,
            rate=o.paced_rate,
            duration=seconds,
        )
        line = await asyncio.wait_for(floor.proc.stdout.readline(), seconds + 90)
        res = json.loads(line)
        res["producer"] = produced
        log(
            f"  p50 {res['p50']:.1f} ms, p99 {res['p99']:.1f} ms, p999 {res['p999']:.1f} ms"
            + (f", commit p50 {res['commit_ms_p50']:.1f} ms" if commit else "")
        )
        await floor.stop()
        return res

    async def phase_storm_jwt(self) -> None:
        """Connect storm against a gateway in AUTH_MODE=jwt (local verify, no network hop)."""
        o, lg = self.o, self.lg
        assert lg is not None
        topic = await self.new_topic("stormjwt")
        gw = self.gateway(
            "stormjwt",
            KAFKA_TOPIC=topic,
            KAFKA_DLQ_TOPIC=f"{topic}.dlq",
            AUTH_MODE="jwt",
            AUTH_JWT_SECRET=common.BENCH_SECRET,
        )
        await gw.start()
        try:
            await gw.wait_http(self.http, "/health/ready")
            log(f"gateway jwt: connecting {o.storm} (local JWT check)")
            res = await self.connect_storm(
                gw,
                port=gw.port,
                path=WS_PATH,
                population=common.STORM,
                count=o.storm,
                auth="token",
                salt=f"{self.run_id}-jwt",
                count_registered=True,
            )
            self.results["storm_jwt"] = res
            log(f"  {res['rate']:.0f} handshakes/s")
            await lg.close_all()
        finally:
            await gw.stop()

    async def phase_store_flush(self) -> None:
        """Offline store (K messages for users never connected), then the flush on connect."""
        o = self.o
        res: dict[str, Any] = {}
        self.results["store"] = res
        topic = await self.new_topic("store")
        offline = o.messages if "store" in o.scenarios else 0
        flush = o.flush if "flush" in o.scenarios else 0
        log(f"store: pre-producing {offline} offline + {FLUSH_RUNS} x {flush} for flush users")
        if offline:
            res["preproduce"] = await self.produce(
                topic, population=common.OFFLINE, users=o.big, count=offline
            )
        if flush:
            await self.produce(
                topic, population=common.FLUSH, users=FLUSH_RUNS, count=flush * FLUSH_RUNS
            )
        total = offline + flush * FLUSH_RUNS
        gw = self.gateway("store", KAFKA_TOPIC=topic, KAFKA_DLQ_TOPIC=f"{topic}.dlq")
        await gw.start()
        try:
            await gw.wait_http(self.http, "/health/live")
            window = CpuWindow(self.cpu_parts(gw))
            started = time.time()
            first_t, first_n, last_t, stored = 0.0, 0.0, 0.0, 0.0
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                stored = (await gw.metrics(self.http)).get("notify_notifications_stored_total", 0)
                now = time.time()
                if stored and not first_t:
                    first_t, first_n = now, stored
                if stored >= total:
                    last_t = now
                    break
                await asyncio.sleep(0.05)
            res["cpu"] = window.close()
            async with contextlib.AsyncExitStack() as stack:
                conn = await asyncpg.connect(self.db_url)
                stack.push_async_callback(conn.close)
                res["rows"] = await conn.fetchval("SELECT count(*) FROM undelivered_notification")
            res["stored"] = stored
            res["complete"] = stored >= total
            if offline:
                span = last_t - first_t if last_t else 0.0
                res["rate"] = (stored - first_n) / span if span > 0 else 0.0
                res["from_start_s"] = (last_t or time.time()) - started
                log(f"  {res['rate']:.0f} stored/s ({res['rows']} rows)")
            if flush:
                log(f"gateway: flush of {flush} stored messages on connect")
                await gw.wait_http(self.http, "/health/ready")
                res["flush"] = await self.flush_series(
                    gw.port, WS_PATH, auth="token", salt=f"{self.run_id}-flush"
                )
                log(f"  {res['flush']['to_last_ms']:.1f} ms to the last frame")
                assert self.lg is not None
                await self.lg.close_all()
        finally:
            res["log_tail"] = gw.tail(1500)
            await gw.stop()
        if offline:
            res["bare_insert"] = await self.bare_insert(offline)
            log(f"bare asyncpg insert: {res['bare_insert']['rate']:.0f} rows/s")

    async def bare_insert(self, n: int, batch: int = 1000) -> dict[str, Any]:
        """Baseline of the store: the gateway's own INSERT ... unnest, batches of 1000, bare."""
        conn = await asyncpg.connect(self.db_url)
        try:
            await conn.execute(
                "CREATE TABLE bench_bare_store (LIKE undelivered_notification INCLUDING ALL)"
            )
            body = common.body(common.now_us(), 0)
            now = datetime.now(UTC)
            rows = [
                (uuid.uuid4(), common.user_id(common.OFFLINE, i % self.o.big), "bench", body, now)
                for i in range(n)
            ]
            sql = (
                "INSERT INTO bench_bare_store (message_id, user_id, title, body, created_at) "
                "SELECT * FROM unnest($1::uuid[], $2::varchar[], $3::text[], $4::text[], "
                "$5::timestamptz[]) ON CONFLICT (user_id, message_id) DO NOTHING"
            )
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                chunk = rows[i : i + batch]
                await conn.execute(sql, *(list(col) for col in zip(*chunk, strict=True)))
            seconds = time.perf_counter() - t0
            await conn.execute("DROP TABLE bench_bare_store")
            return {"rows": n, "seconds": seconds, "rate": n / seconds}
        finally:
            await conn.close()

    # -- scale-out through Redis (issue 7) ------------------------------------------

    def redis_port(self) -> int:
        rest = self.o.redis_url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        _, sep, port = rest.rpartition(":")
        return int(port) if sep and port else 6379

    def redis_cpu(self) -> float:
        if self.redis_pid is None:
            return 0.0
        try:
            t = psutil.Process(self.redis_pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def scale_cpu_parts(self, gw: Gateway) -> dict[str, Callable[[], float]]:
        assert self.lg is not None
        return {
            "loadgen": self.lg.cpu,
            "kafka": self.kafka_cpu,
            "redis": self.redis_cpu,
            "postgres": self.postgres_cpu,
            "server": gw.cpu,
        }

    async def phase_scale(self) -> None:
        """Live fan-out through 1 process, 1 process + Redis, 2 workers + Redis; Redis alone."""
        o = self.o
        from redis.asyncio import Redis

        self.redis_pid = self._listener(self.redis_port())
        res: dict[str, Any] = {
            "connections": o.scale_connections,
            "messages": o.messages,
            "partitions": o.scale_partitions,
            "setups": {},
        }
        self.results["scale"] = res
        redis = Redis.from_url(o.redis_url)
        try:
            needs_redis = o.redis_capacity_messages > 0 or any(
                SCALE_SETUPS[s][2] for s in o.scale_setups
            )
            if needs_redis:
                try:
                    await asyncio.wait_for(redis.ping(), 5)
                except Exception as exc:
                    why = (
                        f"no Redis at {o.redis_url} ({type(exc).__name__}; scripts/redis.sh start)"
                    )
                    if o.scale_named:
                        raise RuntimeError(why) from None
                    log(f"scale: skipped: {why}")
                    res["skipped"] = why
                    return
            for index, name in enumerate(o.scale_setups):
                res["setups"][name] = await self.scale_setup(name, index, redis)
        finally:
            await redis.aclose()
        rates = {
            name: {p: get_path(r, p, "rate") for p in ("drain", "live")}
            for name, r in res["setups"].items()
        }
        ratios: dict[str, float] = {}
        for top, bottom, _ in SCALE_RATIOS:
            for p in ("drain", "live"):
                a, b = rates.get(top, {}).get(p), rates.get(bottom, {}).get(p)
                if a and b:
                    ratios[f"{top}/{bottom} {p}"] = a / b
        res["ratios"] = ratios
        if ratios:
            log("scale: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        if o.redis_capacity_messages > 0:
            res["redis_capacity"] = await self.redis_capacity()

    async def scale_setup(self, name: str, index: int, redis: Any) -> dict[str, Any]:
        """One gateway set-up: C users connect, K pre-produced drain through a gate, K live."""
        o, lg = self.o, self.lg
        assert lg is not None
        what, workers, with_redis, capped = SCALE_SETUPS[name]
        count, k = o.scale_connections, o.messages
        population = common.SCALE + index  # own users per set-up: nothing left over is flushed
        res: dict[str, Any] = {"what": what, "workers": workers, "redis": with_redis}
        if capped:
            why = CpuQuota.unavailable()
            if why:
                log(f"scale {name}: skipped: {why}")
                return res | {"skipped": why}
            res["quota_cores"] = o.scale_quota
            res["what"] = what = f"{what} at {o.scale_quota:g} core each"
        topic = await self.new_topic(f"scale-{name}", partitions=o.scale_partitions)
        log(f"scale {name} ({what}): pre-producing {k} messages for {count} users")
        res["preproduce"] = await self.produce(topic, population=population, users=count, count=k)
        prefix = f"bench:{self.run_id}:{name}:"
        group = f"bench-{self.run_id}-scale-{name}"
        env = {
            "KAFKA_TOPIC": topic,
            "KAFKA_DLQ_TOPIC": f"{topic}.dlq",
            "KAFKA_GROUP_ID": group,
            "AUTH_MODE": "jwt",
            "AUTH_JWT_SECRET": common.BENCH_SECRET,
            "NOTIFY_WORKERS": str(workers),
        }
        if with_redis:
            env |= {"REDIS_URL": o.redis_url, "REDIS_CHANNEL_PREFIX": prefix}
        gate = Gate(o.kafka)
        await gate.start()
        gw = self.gateway(f"scale-{name}", tree=True, KAFKA_BOOTSTRAP_SERVERS=gate.address, **env)
        await gw.start()
        profiler: asyncio.subprocess.Process | None = None
        quotas: list[CpuQuota] = []
        try:
            await gw.wait_http(self.http, "/health/live")
            deadline = time.monotonic() + 60
            while len(gw.workers()) < workers and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            pids = [p.pid for p in gw.workers()]
            res["worker_pids"] = pids
            if len(pids) != workers:
                raise RuntimeError(f"{gw.name}: {len(pids)} of {workers} workers up:\n{gw.tail()}")
            if capped:
                quotas = [
                    CpuQuota(f"notify-bench-{self.run_id}-{name}-{pid}", o.scale_quota, pid)
                    for pid in pids
                ]
            if with_redis:
                # Workers inherit the listening socket before they serve, and one whose
                # Redis subscriber is not connected yet turns clients away (4503): wait
                # for every worker's control channel.
                res["brokers_up_s"] = await self.wait_brokers(redis, prefix, workers)
            log(f"scale {name}: connecting {count} (JWT checked locally)")
            connect = await self.connect_storm(
                gw,
                port=gw.port,
                path=WS_PATH,
                population=population,
                count=count,
                auth="token",
                salt=f"{self.run_id}-scale-{name}",
            )
            res["connect"] = {k: v for k, v in connect.items() if k != "cpu"}
            if connect["ok"] != count:
                raise RuntimeError(f"{gw.name}: {connect['ok']} of {count} connected")
            res["registered_s"] = await self.wait_registered(gw, redis, prefix, count)
            after = await lg.stats()
            res["after_connect"] = {"open": after["open"], "closes": after["closes"]}
            if after["open"] != count:
                log(f"  {count - after['open']} connections closed: {after['closes']}")
            res["connections_per_worker"] = gw.connections_per_worker(
                {w.source_ip for w in lg.workers}
            )
            log(
                f"  {connect['rate']:.0f} handshakes/s; connections per worker: "
                f"{res['connections_per_worker']}"
            )
            if o.profile:
                profiler = await self.start_profiler(gw, f"scale-{name}", pid=pids[0])
            stop_watch = asyncio.Event()
            watch = asyncio.create_task(self.watch_group(group, stop_watch))

            async def open_gate() -> None:
                await gate.open()

            log(f"scale {name}: draining {k} pre-produced messages")
            before = [q.throttling() for q in quotas]
            drain = await self.measure_frames_tree(gw, k, open_gate, seqs=(0, k))
            if quotas:
                drain["throttled"] = throttled_shares(before, [q.throttling() for q in quotas])
            stop_watch.set()
            res["group"] = await watch
            timeline = drain.pop("timeline", [])
            drain.pop("latency_ms", None)  # pre-produced: the age of the message, not latency
            drain["per_second"] = [b["n"] for b in timeline]
            res["drain"] = drain
            log(
                f"  {drain['rate']:.0f} msg/s, {drain['frames']} frames "
                f"({drain.get('missing', '?')} missing, {drain.get('dupes', '?')} twice); "
                f"group: {' -> '.join(str(g['partitions']) for g in res['group'])}"
            )
            log(f"scale {name}: {k} messages produced live")
            before = [q.throttling() for q in quotas]
            live = await self.measure_frames_tree(
                gw,
                k,
                lambda: self.produce(
                    topic, population=population, users=count, count=k, seq_start=k
                ),
                seqs=(k, k),
            )
            live["per_second"] = [b["n"] for b in live.pop("timeline", [])]
            if quotas:
                live["throttled"] = throttled_shares(before, [q.throttling() for q in quotas])
            res["live"] = live
            log(
                f"  {live['rate']:.0f} msg/s (producer {live['producer']['rate']:.0f}/s), "
                f"p50 {live['latency_ms']['p50']:.0f} ms, p99 {live['latency_ms']['p99']:.0f} ms,"
                f" {live.get('missing', '?')} missing, {live.get('dupes', '?')} twice"
            )
            if profiler is not None:
                res["profile"] = await self.stop_profiler(profiler)
                profiler = None
            res["stored_left"] = await self.stored_rows(population)
            if res["stored_left"]:
                log(f"  {res['stored_left']} notifications stored, not delivered")
            await lg.close_all()
        finally:
            if profiler is not None:
                with contextlib.suppress(Exception):
                    await self.stop_profiler(profiler)
            res["log_events"] = log_events(gw.log_path)
            res["log_tail"] = gw.tail(1500)
            await gw.stop()
            await gate.close()
            for quota in quotas:
                quota.remove()
        return res

    async def measure_frames_tree(
        self,
        gw: Gateway,
        expected: int,
        trigger: Callable[[], Awaitable[Any]],
        *,
        seqs: tuple[int, int],
    ) -> dict[str, Any]:
        """``measure_frames`` with Redis in the CPU window and each worker's CPU beside it.

        ``cpu`` covers the whole window (from the trigger: consumer start-up or producer
        start included); ``cpu_flowing`` only the span from the first frame to the last,
        from readings taken every 0.2 s: what each part used while the gateway worked.
        """
        procs = gw.workers()
        parts = self.scale_cpu_parts(gw)
        me = psutil.Process()
        producers: dict[int, float] = {}

        def producer_cpu() -> float:
            # bench/producer.py runs as a child of this process during the live pass.
            with contextlib.suppress(psutil.Error):
                for child in me.children():
                    with contextlib.suppress(psutil.Error):
                        if "bench.producer" in child.cmdline():
                            t = child.cpu_times()
                            producers[child.pid] = t.user + t.system
            return sum(producers.values())

        def worker_cpu() -> list[float]:
            out = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    out.append(t.user + t.system)
                except psutil.Error:
                    out.append(float("nan"))
            return out

        samples: list[tuple[float, dict[str, float], list[float], float]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                values = {k: f() for k, f in parts.items()}
                values["producer"] = producer_cpu()
                samples.append((time.time(), values, worker_cpu(), machine_busy()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)

        sampler = asyncio.create_task(sample())
        before, t0 = worker_cpu(), time.monotonic()
        try:
            out = await self.measure_frames(
                gw, expected, trigger, budget=300, seqs=seqs, parts=parts
            )
        finally:
            stop.set()
            await sampler
        wall = time.monotonic() - t0
        out["cpu"]["workers"] = [
            100 * (b - a) / wall for a, b in zip(before, worker_cpu(), strict=True)
        ]
        first, last = out.get("first_at") or 0.0, out.get("last_at") or 0.0
        inside = [x for x in samples if first <= x[0] <= last]
        if len(inside) >= 2 and inside[-1][0] - inside[0][0] >= 0.5:
            (ta, a, wa, ba), (tb, b, wb, bb) = inside[0], inside[-1]
            dt = tb - ta
            # (a PostgreSQL backend that exits between readings can make its part negative)
            flowing = {k: max(0.0, 100 * (b[k] - a[k]) / dt) for k in a}
            flowing["other"] = max(0.0, 100 * (bb - ba) / dt - sum(flowing.values()))
            flowing["workers"] = [100 * (y - x) / dt for x, y in zip(wa, wb, strict=True)]
            flowing["wall_s"] = dt
            out["cpu_flowing"] = flowing
        return out

    async def wait_brokers(self, redis: Any, prefix: str, want: int) -> float:
        """Seconds until ``want`` gateway processes subscribed their control channel."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            if len(await redis.pubsub_channels(f"{prefix}node:*")) >= want:
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{want} gateway processes did not all connect to Redis in 60 s")

    async def wait_registered(self, gw: Gateway, redis: Any, prefix: str, want: int) -> float:
        """Seconds until every connection is registered (with Redis: its user's channel
        subscribed, which the gateway does before registering)."""
        t0 = time.monotonic()
        deadline = t0 + 120
        while time.monotonic() < deadline:
            if redis is not None and gw.env.get("REDIS_URL"):
                channels = await redis.pubsub_channels(f"{prefix}*")
                node = f"{prefix}node:".encode()
                have = sum(1 for c in channels if not c.startswith(node))
            else:
                have = int((await gw.metrics(self.http)).get("notify_connections", -1))
            if have >= want:
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
        log(f"  {gw.name}: not all {want} connections registered after 120 s")
        return float("nan")

    async def watch_group(self, group: str, stop: asyncio.Event) -> list[dict[str, Any]]:
        """The consumer group's changes while the gate opens: state, partitions per member."""
        from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

        changes: list[dict[str, Any]] = []
        t0 = time.monotonic()
        last: tuple[Any, ...] | None = None
        admin = AIOKafkaAdminClient(bootstrap_servers=self.o.kafka)
        await admin.start()
        try:
            while not stop.is_set() and time.monotonic() - t0 < 300:
                with contextlib.suppress(Exception):
                    (answer,) = await admin.describe_consumer_groups([group])
                    g = answer.groups[0]
                    state, members = g[2], g[5]
                    parts = sorted(
                        len(ConsumerProtocolMemberAssignment.decode(m[-1]).partitions())
                        if m[-1]
                        else 0
                        for m in members
                    )
                    key = (state, tuple(parts))
                    if key != last:
                        last = key
                        changes.append(
                            {
                                "t": round(time.monotonic() - t0, 2),
                                "state": state,
                                "partitions": parts,
                            }
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
        finally:
            await admin.close()
        return changes

    async def stored_rows(self, population: int) -> int:
        """Notifications of a population still in the store (reached no socket)."""
        conn = await asyncpg.connect(self.db_url)
        try:
            head = common.user_id(population, 0)[:19]
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM undelivered_notification WHERE user_id LIKE $1",
                    head + "%",
                )
            )
        finally:
            await conn.close()

    async def redis_capacity(self) -> dict[str, Any]:
        """PUBLISH to per-user channels with one subscriber each: bench/redis_capacity.py."""
        o = self.o
        log(
            f"redis capacity: {o.redis_capacity_messages} PUBLISHes per test to "
            f"{o.scale_connections} channels, 2 subscriber connections"
        )
        child = await Child(
            "redis-capacity",
            [
                PY,
                "-m",
                "bench.redis_capacity",
                "--url",
                o.redis_url,
                "--prefix",
                f"bench:{self.run_id}:cap:",
                "--channels",
                str(o.scale_connections),
                "--messages",
                str(o.redis_capacity_messages),
            ],
            self.logs,
        ).start(pipes=True)
        assert child.proc is not None and child.proc.stdout is not None
        line = await asyncio.wait_for(child.proc.stdout.readline(), 600)
        await child.stop()
        if not line:
            raise RuntimeError(f"redis capacity failed:\n{child.tail()}")
        answer: dict[str, Any] = json.loads(line)
        cost = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "bench.redis_capacity",
            "client-cost",
            "--url",
            o.redis_url,
            "--channels",
            str(o.scale_connections),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=(self.logs / "redis-capacity.log").open("ab"),
        )
        out, _ = await asyncio.wait_for(cost.communicate(), 120)
        if cost.returncode == 0 and out.strip():
            answer["client_cost"] = json.loads(out.decode().strip().splitlines()[-1])
            c = answer["client_cost"]
            log(
                f"  client CPU per PUBLISH: the gateway's {c['gateway_broker_us']:.1f} us, "
                f"redis-py {c['redis_py_default_us']:.1f} us, "
                f"socket_timeout=None {c['redis_py_no_socket_timeout_us']:.1f} us"
            )
        for t in answer["tests"]:
            log(
                f"  {t['tool']} x{t['publishers']}: {t['rate']:,.0f} msg/s, Redis "
                f"{t['cpu']['redis']:.0f}% of a core ({100 * (t['redis_core_share'] or 0):.0f}% "
                f"while traffic flowed), publishers {t['cpu']['publishers']:.0f}%"
                + ("" if t["complete"] else f", INCOMPLETE {t['received']}/{t['messages']}")
            )
        return answer

    # -- profiling -------------------------------------------------------------------

    async def start_profiler(
        self, gw: Gateway, label: str, native: bool = True, pid: int | None = None
    ) -> asyncio.subprocess.Process | None:
        """py-spy the gateway (or ``pid``: one of its workers) until ``stop_profiler``."""
        pid = pid or gw.pid
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            log("  py-spy not found: pip install -r bench/requirements.txt")
            return None
        self.profile_path = self.logs / f"pyspy-{label}.txt"
        proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            # --native cannot be non-blocking: it pauses the gateway for each sample.
            *(["--native"] if native else ["--nonblocking"]),
            "--function",
            "--format",
            "raw",
            "--output",
            str(self.profile_path),
            stdout=(self.logs / "py-spy.log").open("ab"),
            stderr=asyncio.subprocess.STDOUT,
        )
        await asyncio.sleep(0.5)
        if proc.returncode is not None:
            log(f"  py-spy could not attach: {(self.logs / 'py-spy.log').read_text()[-500:]}")
            return None
        log(f"  py-spy recording the gateway (pid {pid}): {label}")
        return proc

    async def stop_profiler(self, proc: asyncio.subprocess.Process) -> dict[str, Any]:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        from bench.profile_summary import summarize

        summary = summarize(self.profile_path)
        summary["raw"] = str(self.profile_path)
        return summary

    # -- report ----------------------------------------------------------------------

    def table(self) -> list[dict[str, Any]]:
        r, o = self.results, self.o
        b = r.get("baseline", {})
        rows: list[dict[str, Any]] = []

        def row(
            figure: str,
            unit: str,
            gateway: float | None,
            baseline: float | None,
            target: str = "",
            met: bool | None = None,
            note: str = "",
        ) -> None:
            ratio = None
            if gateway is not None and baseline:
                ratio = gateway / baseline
            rows.append(
                {
                    "figure": figure,
                    "unit": unit,
                    "gateway": gateway,
                    "baseline": baseline,
                    "ratio": ratio,
                    "target": target,
                    "met": met,
                    "note": note,
                }
            )

        def get(d: dict[str, Any], *path: str) -> Any:
            for p in path:
                if not isinstance(d, dict) or p not in d:
                    return None
                d = d[p]
            return d

        for count, big in ((o.small, False), (o.big, True)):
            g = r.get(f"gateway_{count}", {})
            if "drain" in g:
                rate = get(g, "drain", "rate")
                base = get(b, f"live_{count}", "rate")
                target, met = "", None
                if big:
                    target = ">= 20,000/s and >= 0.6x"
                    met = bool(rate and rate >= 20_000 and base and rate / base >= 0.6)
                    met = met and bool(get(g, "drain", "complete"))
                row(
                    f"fan-out {count} conns, Kafka->socket (pre-produced)",
                    "msg/s",
                    rate,
                    base,
                    target,
                    met,
                    "" if get(g, "drain", "complete") else "INCOMPLETE",
                )
            if "live" in g:
                row(
                    f"fan-out {count} conns, produced live",
                    "msg/s",
                    get(g, "live", "rate"),
                    get(b, f"live_{count}", "rate"),
                    note=f"producer {get(g, 'live', 'producer', 'rate') or 0:.0f}/s",
                )
                for q in ("p50", "p99"):
                    row(
                        f"fan-out {count} live, latency {q}",
                        "ms",
                        get(g, "live", "latency_ms", q),
                        None,
                        note="producer outruns the gateway: mostly time queued in Kafka",
                    )
        g = r.get(f"gateway_{o.big}", {})
        if "paced" in g:
            for q in ("p50", "p99", "p999"):
                value = get(g, "paced", "latency_ms", q)
                target, met = "", None
                if q == "p99":
                    target = "<= 25 ms"
                    met = value is not None and value <= 25 and bool(get(g, "paced", "complete"))
                row(
                    f"paced {o.paced_rate:.0f}/s x {o.paced_seconds:.0f} s, {o.big} conns, {q}",
                    "ms",
                    value,
                    get(b, "paced", "latency_ms", q),
                    target,
                    met,
                    "baseline: bare Sanic, stamped at send" if q == "p50" else "",
                )
            gc = get(g, "paced", "gc")
            if gc:
                row(
                    "paced: longest GC pause in the gateway",
                    "ms",
                    gc["max_ms"],
                    None,
                    note=f"{gc['full_collections']} full collections, {gc['full_ms']:.0f} ms",
                )
            for key, how in (
                ("kafka_floor", "commit per batch"),
                ("kafka_floor_no_commit", "no commit"),
            ):
                floor = r.get(key)
                if floor:
                    for q in ("p50", "p99"):
                        note = ""
                        if q == "p50" and floor.get("commit_ms_p50"):
                            note = f"commit round trip p50 {floor['commit_ms_p50']:.1f} ms"
                        row(
                            f"paced {o.paced_rate:.0f}/s, Kafka alone ({how}), {q}",
                            "ms",
                            None,
                            floor.get(q),
                            note=note,
                        )
        s = r.get("store", {})
        if "rate" in s:
            rate = s["rate"]
            row(
                "offline store into PostgreSQL",
                "msg/s",
                rate,
                get(s, "bare_insert", "rate"),
                ">= 20,000/s",
                bool(rate >= 20_000 and s.get("complete")),
                "baseline: bare asyncpg INSERT..unnest, 1000/batch",
            )
        if "flush" in s:
            value = get(s, "flush", "to_last_ms")
            row(
                f"flush {o.flush} stored on connect, to last frame (median of {FLUSH_RUNS})",
                "ms",
                value,
                get(b, "flush", "to_last_ms"),
                "<= 250 ms",
                bool(value is not None and value <= 250 and get(s, "flush", "complete")),
                "baseline: bare Sanic sends from memory",
            )
        if "connect" in g:
            row(
                f"connect {o.big}, remote auth uncached",
                "hs/s",
                get(g, "connect", "rate"),
                get(b, "connect_big", "rate"),
                note="fast asyncio auth stand-in; baseline: no auth",
            )
        if "connect_cached" in g:
            rate = get(g, "connect_cached", "rate")
            row(
                f"connect {o.big}, remote auth cached",
                "hs/s",
                rate,
                get(b, "connect_big", "rate"),
                ">= 1,000/s",
                bool(rate and rate >= 1000 and get(g, "connect_cached", "ok") == o.big),
                f"{get(g, 'connect_cached', 'auth_service_calls')} auth calls",
            )
        if "storm_jwt" in r:
            row(
                f"connect {o.storm}, AUTH_MODE=jwt (local)",
                "hs/s",
                get(r, "storm_jwt", "rate"),
                get(b, "connect_big", "rate"),
            )
        if "rss_per_conn_kb" in g and "memory" in o.scenarios:
            value = g["rss_per_conn_kb"]
            row(
                f"RSS per idle connection at {o.big}",
                "KB",
                value,
                b.get("rss_per_conn_kb"),
                "<= 35 KB",
                value <= 35,
            )
        if "gc_objects_per_conn" in g:
            per = g["gc_objects_per_conn"]
            top = ", ".join(f"{k} {v:.0f}" for k, v in list(per["by_type"].items())[:4])
            row(
                f"GC-tracked objects per idle connection at {o.big}",
                "objects",
                per["total"],
                None,
                note=top,
            )
        return rows

    def loadgen_share(self) -> list[dict[str, Any]]:
        """Where the CPU went in each measured window (% of one core; the machine has N)."""
        out = []

        def walk(prefix: str, d: Any) -> None:
            if isinstance(d, dict):
                if "cpu" in d and isinstance(d["cpu"], dict) and "wall_s" in d["cpu"]:
                    c = d["cpu"]
                    out.append(
                        {
                            "window": prefix,
                            "loadgen": c.get("loadgen", 0) + c.get("producer", 0),
                            "server": c.get("server", 0),
                            "kafka": c.get("kafka", 0),
                            "auth": c.get("auth", 0),
                            **({"postgres": c["postgres"]} if "postgres" in c else {}),
                            "other": c.get("other", 0),
                            "wall_s": c["wall_s"],
                        }
                    )
                for k, v in d.items():
                    if k != "cpu":
                        walk(f"{prefix}.{k}" if prefix else k, v)

        skip = ("meta", "table", "cpu", "scale")  # scale has its own CPU table (with Redis)
        walk("", {k: v for k, v in self.results.items() if k not in skip})
        return out

    async def run(self) -> dict[str, Any]:
        o = self.o
        await self.setup()
        if o.scenarios & {"live", "paced", "flush", "storm", "memory"}:
            await self.phase_baseline()
        if "paced" in o.scenarios:
            await self.phase_kafka_floor()
        if "live" in o.scenarios:
            await self.phase_gateway_fanout(o.small, big=False)
        if o.scenarios & {"live", "paced", "storm", "memory"}:
            await self.phase_gateway_fanout(o.big, big=True)
        if "storm" in o.scenarios:
            await self.phase_storm_jwt()
        if o.scenarios & {"store", "flush"}:
            await self.phase_store_flush()
        if "scale" in o.scenarios:
            await self.phase_scale()
        return self.results


def throttled_shares(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """Per capped process: the share of CFS periods in a pass in which its cap stopped it."""
    return [
        (t1 - t0) / (p1 - p0) if p1 > p0 else 0.0
        for (p0, t0), (p1, t1) in zip(before, after, strict=True)
    ]


def get_path(d: Any, *path: str) -> Any:
    """``d[p0][p1]...``, or None where the path ends early."""
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def log_events(path: Path) -> dict[str, int]:
    """How many times each warning or error event appears in a gateway's JSON log."""
    counts: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") in ("warning", "error", "critical"):
            key = f"{record['level']}: {str(record.get('event', ''))[:80]}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:
            return "-"
        if unit in ("msg/s", "hs/s") or abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def render_table(rows: list[dict[str, Any]]) -> str:
    head = ["figure", "unit", "gateway", "baseline", "ratio", "target", "met?"]
    body = [
        [
            r["figure"],
            r["unit"],
            fmt(r["gateway"], r["unit"]),
            fmt(r["baseline"], r["unit"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
            r["target"] or "-",
            "-" if r["met"] is None else fmt(r["met"]),
        ]
        for r in rows
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def pg_cell(share: dict[str, Any]) -> str:
    return f"{share['postgres']:.0f}%" if "postgres" in share else "-"


def render_cpu(shares: list[dict[str, Any]]) -> str:
    lines = [
        "| window | load generator | server | kafka | postgres | auth stand-in | rest of machine"
        " | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in shares:
        lines.append(
            f"| {s['window']} | {s['loadgen']:.0f}% | {s['server']:.0f}% | {s['kafka']:.0f}% | "
            f"{pg_cell(s)} | {s['auth']:.0f}% | {s.get('other', 0):.0f}% | "
            f"{s['wall_s']:.1f} |"
        )
    return "\n".join(lines)


SCALE_TARGET = 1.6  # issue 7: 2 processes deliver at least 1.6x what one does


def scale_report(scale: dict[str, Any]) -> dict[str, Any]:
    """The scale-out figures as table rows (also stored in the run's JSON)."""
    setups = scale.get("setups", {})
    rows = []
    for name, r in setups.items():
        drain, live = r.get("drain", {}), r.get("live", {})
        rows.append(
            {
                "setup": name,
                "what": r.get("what", name),
                "workers": r.get("workers"),
                "connections_per_worker": r.get("connections_per_worker"),
                "connect_rate": get_path(r, "connect", "rate"),
                "drain_rate": drain.get("rate"),
                "live_rate": live.get("rate"),
                "live_p50_ms": get_path(live, "latency_ms", "p50"),
                "live_p99_ms": get_path(live, "latency_ms", "p99"),
                "missing": sum(p.get("missing", 0) for p in (drain, live) if p)
                if drain or live
                else None,
                "dupes": sum(p.get("dupes", 0) for p in (drain, live) if p)
                if drain or live
                else None,
                "stored_left": r.get("stored_left"),
                "frames": (drain.get("frames", 0), live.get("frames", 0)),
                # Each assignment the group went through (a 4 before 2/2 is a rebalance).
                "group": " -> ".join(
                    "/".join(str(n) for n in g["partitions"])
                    for g in r.get("group", [])
                    if g["partitions"]
                ),
            }
        )
    ratios = []
    for top, bottom, target in SCALE_RATIOS:
        if top in setups and bottom in setups:
            drain = get_path(scale, "ratios", f"{top}/{bottom} drain")
            live = get_path(scale, "ratios", f"{top}/{bottom} live")
            ratios.append(
                {
                    "figure": f"{setups[top].get('what')} / {setups[bottom].get('what')}",
                    "key": f"{top}/{bottom}",
                    "drain": drain,
                    "live": live,
                    "target": f">= {SCALE_TARGET}x" if target else "",
                    # Judged on the live pass: the issue's "live fan-out", and the drain
                    # of 2 workers can start with a rebalance (the second member joins
                    # the group after the first took every partition; see "group").
                    "met": (live is not None and live >= SCALE_TARGET) if target else None,
                }
            )
    capacity = scale.get("redis_capacity") or {}
    cap_rows = []
    ceiling = None
    for t in capacity.get("tests", []):
        share = t.get("redis_core_share")
        cap_rows.append(
            {
                "publisher": "the gateway's RedisBroker.publish, own process"
                if t["tool"] == "py"
                else "redis-benchmark (C), pipelined",
                "publishers": t["publishers"],
                "rate": t["rate"],
                "redis_share": share,
                "redis_cpu": t["cpu"]["redis"],
                "publisher_cpu": t["cpu"]["publishers"],
                "complete": t["complete"],
            }
        )
        # Extrapolate to a whole core only from tests that kept Redis mostly busy.
        if share and share > 0.5 and t["complete"]:
            ceiling = max(ceiling or 0.0, t["rate"] / share)
    per_process = [
        rate / r["workers"]
        for r in rows
        if setups[r["setup"]].get("redis") and r["workers"]
        for rate in (r["drain_rate"], r["live_rate"])
        if rate
    ]
    return {
        "rows": rows,
        "ratios": ratios,
        "capacity": cap_rows,
        "redis_ceiling": ceiling,
        "redis_path_per_process": max(per_process) if per_process else None,
        "processes_per_redis": ceiling / max(per_process) if ceiling and per_process else None,
    }


def scale_cpu_windows(scale: dict[str, Any]) -> list[dict[str, Any]]:
    """CPU of each pass while frames flowed (first to last frame), else of its whole window."""
    out = []
    for name, r in scale.get("setups", {}).items():
        for p in ("drain", "live"):
            c = get_path(r, p, "cpu_flowing") or get_path(r, p, "cpu")
            if c:
                out.append({"window": f"{name}.{p}", **c, "throttled": r[p].get("throttled")})
    return out


def render_scale(scale: dict[str, Any], report: dict[str, Any]) -> str:
    k = scale.get("messages", 0)
    lines = [
        f"| set-up | connections per process | drain {k:,} pre-produced, msg/s | produced live,"
        " msg/s | live p50 | live p99 | lost | delivered twice | partitions per process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        per = r["connections_per_worker"] or []
        lines.append(
            f"| {r['what']} | {' / '.join(f'{n:,}' for n in per) or '-'} | "
            f"{fmt(r['drain_rate'], 'msg/s')} | {fmt(r['live_rate'], 'msg/s')} | "
            f"{fmt(r['live_p50_ms'])} ms | {fmt(r['live_p99_ms'])} ms | "
            f"{fmt(r['missing'])} | {fmt(r['dupes'])} | {r['group'] or '-'} |"
        )
    lines += [
        "",
        "| ratio | drain | live | target (live) | met? |",
        "| --- | --- | --- | --- | --- |",
    ]
    for x in report["ratios"]:
        lines.append(
            f"| {x['figure']} | "
            + " | ".join("-" if v is None else f"{v:.2f}x" for v in (x["drain"], x["live"]))
            + f" | {x['target'] or '-'} | {'-' if x['met'] is None else fmt(x['met'])} |"
        )
    return "\n".join(lines)


def render_scale_cpu(windows: list[dict[str, Any]]) -> str:
    lines = [
        "| window | gateway (all processes) | per worker | load generator | kafka | redis |"
        " postgres | rest of machine | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in windows:
        per = " / ".join(f"{x:.0f}%" for x in w.get("workers", []))
        if w.get("throttled"):
            # How often the cap held the process back: near 100 %, CPU was what limited it.
            per += " (capped in " + " / ".join(f"{x:.0%}" for x in w["throttled"]) + ")"
        lines.append(
            f"| {w['window']} | {w.get('server', 0):.0f}% | {per or '-'} | "
            f"{w.get('loadgen', 0) + w.get('producer', 0):.0f}% | {w.get('kafka', 0):.0f}% | "
            f"{w.get('redis', 0):.0f}% | {w.get('postgres', 0):.0f}% | {w.get('other', 0):.0f}% | "
            f"{w.get('wall_s', 0):.1f} |"
        )
    return "\n".join(lines)


def render_capacity(report: dict[str, Any], scale: dict[str, Any]) -> str:
    cap = scale.get("redis_capacity") or {}
    if not report["capacity"]:
        return ""
    lines = [
        f"Redis alone: PUBLISH to {cap.get('channels', 0):,} per-user channels, one subscriber"
        f" each ({cap.get('subscribers')} pub/sub connections), {cap.get('payload_bytes')}-byte"
        " payloads (the broker's JSON array), pipelines of 1000:",
        "",
        "| publisher | processes / connections | msg/s | Redis, % of a core while traffic flowed"
        " | publishers, % of a core | all arrived |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in report["capacity"]:
        share = c["redis_share"]
        lines.append(
            f"| {c['publisher']} | {c['publishers']} | {fmt(c['rate'], 'msg/s')} | "
            f"{'-' if share is None else f'{100 * share:.0f}%'} | {c['publisher_cpu']:.0f}% | "
            f"{fmt(c['complete'])} |"
        )
    cost = cap.get("client_cost")
    if cost:
        lines += [
            "",
            "The publishing client alone, CPU per PUBLISH in pipelines of 1000 "
            "(`python -m bench.redis_capacity client-cost`): the gateway's `RedisBroker.publish`"
            f" (`service/resp.py`) {cost['gateway_broker_us']:.1f} µs; redis-py, as the broker"
            f" used it before, {cost['redis_py_default_us']:.1f} µs, with `socket_timeout=None`"
            f" {cost['redis_py_no_socket_timeout_us']:.1f} µs.",
        ]
    if report.get("redis_ceiling"):
        lines += [
            "",
            f"One Redis core: ~{report['redis_ceiling']:,.0f} PUBLISH/s (rate ÷ Redis's core"
            " share); the Redis path delivers at most "
            f"{fmt(report['redis_path_per_process'], 'msg/s')} msg/s per gateway process here,"
            f" so one Redis feeds ~{report['processes_per_redis']:.0f} such processes.",
        ]
    return "\n".join(lines)


NOISY = 50  # % of one core used by everything else in a window: its figures are suspect
DOC = ROOT / "docs" / "performance.md"
DOC_START = "<!-- bench:latest:start -->"
DOC_END = "<!-- bench:latest:end -->"
SCALE_START = "<!-- bench:scale:start -->"
SCALE_END = "<!-- bench:scale:end -->"


def update_scale_doc(results: dict[str, Any], out: Path) -> None:
    """Replace the scale-out block of docs/performance.md (its own markers)."""
    scale = results.get("scale")
    if not scale or not scale.get("setups") or not DOC.exists():
        return
    text = DOC.read_text()
    if SCALE_START not in text or SCALE_END not in text:
        log(f"{DOC.name} has no {SCALE_START} ... {SCALE_END} block: scale not written")
        return
    meta = results["meta"]
    git = meta.get("git", {})
    report = results["scale_report"]
    windows = scale_cpu_windows(scale)
    noisy = [w["window"] for w in windows if w.get("other", 0) > NOISY]
    args = " ".join(meta["options"].get("argv_text", "").split()) or "(defaults)"
    block = "\n".join(
        [
            SCALE_START,
            f"Run `{meta['run_id']}` ({meta['started']}, {meta['cpus']} cores, load average at "
            f"start {meta['loadavg_at_start'][0]:.2f}), `python -m bench.run` {args}, gateway "
            f"code at `{git.get('head', '?')}` (service/ "
            f"{'clean' if git.get('service_dirty') == 'clean' else 'with local changes'}, sha256 "
            f"{git.get('service_sha256', '?')}). C = {scale['connections']:,} users, K = "
            f"{scale['messages']:,} messages per pass, {scale['partitions']} partitions. "
            f"Raw: `{out.relative_to(ROOT)}`.",
            "",
            render_scale(scale, report),
            "",
            "CPU while frames flowed (first to last frame), % of one core (the machine has"
            f" {meta['cpus']}); load generator = client processes + producer:",
            "",
            render_scale_cpu(windows),
            *(
                [
                    "",
                    f"Noisy windows (the rest of the machine above {NOISY}% of a core): "
                    + ", ".join(noisy)
                    + ".",
                ]
                if noisy
                else []
            ),
            *(["", render_capacity(report, scale)] if report["capacity"] else []),
            SCALE_END,
        ]
    )
    head, rest = text.split(SCALE_START, 1)
    _, tail = rest.split(SCALE_END, 1)
    DOC.write_text(head + block + tail)
    log(f"updated the scale-out block of {DOC.relative_to(ROOT)}")


def update_doc(results: dict[str, Any], out: Path) -> None:
    """Replace the block between the markers of docs/performance.md with this run's table."""
    if not DOC.exists():
        log(f"{DOC} not found: not updated")
        return
    text = DOC.read_text()
    if DOC_START not in text or DOC_END not in text:
        log(f"{DOC.name} has no {DOC_START} ... {DOC_END} block: not updated")
        return
    meta = results["meta"]
    git = meta.get("git", {})
    peak = results.get("loadgen_peak") or {}
    args = " ".join(meta["options"].get("argv_text", "").split()) or "(defaults)"
    block = "\n".join(
        [
            DOC_START,
            f"Run `{meta['run_id']}` ({meta['started']}, {meta['cpus']} cores, "
            f"load average at start {meta['loadavg_at_start'][0]:.2f}), "
            f"`python -m bench.run` {args}, gateway code at `{git.get('head', '?')}` "
            f"(service/ {'clean' if git.get('service_dirty') == 'clean' else 'with local changes'}"
            f", sha256 {git.get('service_sha256', '?')}). Raw: `{out.relative_to(ROOT)}`.",
            "",
            render_table(results["table"]),
            "",
            f"Load generator (client processes + producer): at most {peak.get('loadgen', 0):.0f}%"
            f" of one core ({peak.get('window', '-')}; the server was at "
            f"{peak.get('server', 0):.0f}% there).",
            "",
            "CPU per measured window, % of one core:",
            "",
            render_cpu(results["cpu"]),
            *(
                [
                    "",
                    f"Noisy windows (the rest of the machine above {NOISY}% of a core): "
                    + ", ".join(results["noisy_windows"])
                    + ".",
                ]
                if results.get("noisy_windows")
                else []
            ),
            DOC_END,
        ]
    )
    shas = {c.get("service_sha256") for c in results.get("gateway_code", {}).values()}
    if len(shas) > 1:
        block = block.replace(
            DOC_END,
            "\nservice/ changed during this run (gateways started from "
            + ", ".join(sorted(str(x) for x in shas))
            + "): its rows mix versions.\n"
            + DOC_END,
        )
    head, rest = text.split(DOC_START, 1)
    _, tail = rest.split(DOC_END, 1)
    DOC.write_text(head + block + tail)
    log(f"updated {DOC.relative_to(ROOT)}")


async def amain(options: Options) -> int:
    common.raise_nofile()
    bench = Bench(options)
    code = 0
    task = asyncio.create_task(bench.run())
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
        await bench.cleanup()
    rows = bench.table()
    shares = bench.loadgen_share()
    bench.results["table"] = rows
    bench.results["cpu"] = shares
    bench.results["meta"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    bench.results["meta"]["loadavg_at_end"] = os.getloadavg()
    peak = max(shares, key=lambda w: w["loadgen"]) if shares else None
    bench.results["loadgen_peak"] = peak
    noisy = [w["window"] for w in shares if w.get("other", 0) > NOISY]
    bench.results["noisy_windows"] = noisy
    scale = bench.results.get("scale")
    if scale and not scale.get("setups"):
        scale = None
    if scale:
        bench.results["scale_report"] = scale_report(scale)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{bench.run_id}.json"
    out.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
    if rows:
        print()
        print(render_table(rows))
    if shares:
        print()
        print(f"CPU, % of one core (the machine has {os.cpu_count()}), per measured window:")
        print(render_cpu(shares))
    if peak:
        print(
            f"load generator (client processes + producer): at most {peak['loadgen']:.0f}% of "
            f"one core ({peak['window']}, server {peak['server']:.0f}% there): "
            + ("not the bottleneck" if peak["loadgen"] < 70 else "CHECK: it may be the limit")
        )
    if noisy:
        print(
            f"noisy: the rest of the machine (other work) used > {NOISY}% of a core "
            f"in {', '.join(noisy)}: rerun those before trusting them"
        )
    big = bench.results.get(f"gateway_{options.big}", {})
    for key, title in (
        ("profile", "fan-out (drain + live, with native frames)"),
        ("profile_connect_uncached", "connect storm, remote auth uncached (native)"),
        ("profile_connect_cached", "connect storm, remote auth cached (native)"),
        ("profile_paced", "paced load (with native frames)"),
    ):
        if big.get(key):
            from bench.profile_summary import render

            print()
            print(f"== {title} ==")
            print(render(big[key]))
    if scale:
        report = bench.results["scale_report"]
        print()
        print("== scale-out through Redis ==")
        print(render_scale(scale, report))
        print()
        print("CPU, % of one core, while frames flowed:")
        windows = scale_cpu_windows(scale)
        print(render_scale_cpu(windows))
        noisy_scale = [w["window"] for w in windows if w.get("other", 0) > NOISY]
        if noisy_scale:
            print(f"noisy: rest of the machine > {NOISY}% of a core in {', '.join(noisy_scale)}")
        for name, r in scale.get("setups", {}).items():
            if r.get("log_events"):
                print(f"{name}: gateway log warnings/errors: {r['log_events']}")
        if report["capacity"]:
            print()
            print(render_capacity(report, scale))
        for name, r in scale.get("setups", {}).items():
            if r.get("profile"):
                from bench.profile_summary import render

                print()
                print(f"== scale {name}: one worker (native) ==")
                print(render(r["profile"]))
    if options.update_doc and code == 0:
        # The latest-run table only from runs that measured its scenarios.
        if options.scenarios - {"scale"}:
            update_doc(bench.results, out)
        update_scale_doc(bench.results, out)
    print()
    print(f"results: {out.relative_to(ROOT)}   process logs: {bench.logs}")
    failed = [r for r in rows if r["met"] is False]
    if failed and code == 0:
        print(f"targets not met: {', '.join(r['figure'] for r in failed)}")
    return code


def main() -> None:
    options = parse_options(sys.argv[1:])
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    sys.exit(runner(amain(options)))


if __name__ == "__main__":
    main()
