"""What every scenario stands on: the scratch database, topics, the auth stand-in, the
client processes, gateways, and the two measurements (connect storm, frames received).

Local Kafka and PostgreSQL must be running already (``make up``); they are not stopped.
Everything the harness creates (topics, the scratch database, processes) is removed by
:meth:`Harness.cleanup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import common
from bench.clients import ClientProcess, LoadGen
from bench.cpu import CpuWindow, Meters, listener_pid, process_cpu, tree_cpu
from bench.options import Options
from bench.processes import HOST, PY, ROOT, Child, Gateway, log, url_port
from bench.results import (
    Connect,
    Frames,
    GitState,
    Meta,
    Produced,
    Results,
)

Trigger = Callable[[], Coroutine[Any, Any, object]]


def git_state() -> GitState:
    """Which gateway code is in the tree now: HEAD, and whether service/ has local changes."""

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
    return GitState(
        head=git("rev-parse", "--short", "HEAD"),
        service_dirty=git("status", "--porcelain", "--", "service") or "clean",
        service_sha256=digest.hexdigest()[:16],
    )


def meta(run_id: str, o: Options) -> Meta:
    import sanic

    options = {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(o).items()}
    for private in ("database_url", "argv"):
        options.pop(private)
    la = os.getloadavg()
    return Meta(
        run_id=run_id,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        host=platform.node(),
        cpus=os.cpu_count() or 1,
        loadavg_at_start=(la[0], la[1], la[2]),
        python=platform.python_version(),
        sanic=sanic.__version__,
        options=options | {"argv_text": " ".join(o.argv)},
        nofile=common.raise_nofile(),
        git=git_state(),
    )


class Harness:
    """One run's shared state and measuring helpers; scenarios fill :attr:`results`."""

    def __init__(self, options: Options) -> None:
        self.o = options
        self.run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:4]}"
        self.logs = Path(tempfile.mkdtemp(prefix=f"notify-bench-{self.run_id}-"))
        self.results = Results(meta=meta(self.run_id, options))
        self.topics: list[str] = []
        self.db_name = f"notify_bench_{self.run_id.replace('-', '_').lower()}"
        self.db_url = ""
        self.http = httpx.AsyncClient(trust_env=False)
        self.auth: Child | None = None
        self.auth_url = ""
        self._lg: LoadGen | None = None
        self.exp = int(time.time()) + 4 * 3600
        self.kafka_pid: int | None = None
        self.pg_pid: int | None = None
        self.redis_pid: int | None = None

    @property
    def lg(self) -> LoadGen:
        assert self._lg is not None, "setup() starts the client processes"
        return self._lg

    # -- infrastructure ---------------------------------------------------------------

    async def setup(self) -> None:
        """Scratch database (migrated), auth stand-in, client processes; finds Kafka's and
        PostgreSQL's processes for CPU accounting."""
        log(f"run {self.run_id}; process logs in {self.logs}")
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
        self.auth = await Child(
            "auth", [PY, "-m", "bench.auth_fast", "--port", "0"], self.logs
        ).start(pipes=True)
        port = json.loads(await self.auth.readline(30))["port"]
        self.auth_url = f"http://{HOST}:{port}/api/v1/users/me"
        workers = [ClientProcess(i, self.logs) for i in range(self.o.workers)]
        for w in workers:
            await w.start(pipes=True)
        self._lg = LoadGen(workers)
        # The broker listening on our bootstrap port (others may run their own).
        self.kafka_pid = listener_pid(url_port(self.o.kafka.split(",")[0], 9092))
        self.pg_pid = listener_pid(url_port(self.o.database_url, 5432))

    async def cleanup(self) -> None:
        """Stop every child, delete the run's topics, drop the scratch database."""
        for child in reversed(Child.registry):
            with contextlib.suppress(Exception):
                if isinstance(child, ClientProcess) and child.alive():
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
        self,
        topic: str,
        *,
        population: int,
        users: int,
        count: int = 0,
        channel_header: str = "",
        **extra: float,
    ) -> Produced:
        """Run a producer process (``bench/producer.py``) to its end; what it reports.

        With ``channel_header``, records for the Centrifugo peer (see the producer)."""
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
        if channel_header:
            argv += ["--channel-header", channel_header]
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
        return Produced.parse(json.loads(out.decode().strip().splitlines()[-1]))

    def gateway(self, name: str, *, tree: bool = False, **env: str) -> Gateway:
        """A gateway (not started) on the scratch database and the auth stand-in."""
        # The code under service/ may change while a run goes on (others work in this tree):
        # record what each gateway was started from.
        self.results.gateway_code[name] = git_state()
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
                # Every bench client connects from 127.0.0.1, tens of handshakes in flight
                # per client process: the per-address pre-auth bound (20) is for strangers.
                "MAX_UNAUTHENTICATED": "100000",
                "MAX_UNAUTHENTICATED_PER_ADDRESS": "100000",
                **({"BENCH_GC_THRESHOLD": self.o.gateway_gc} if self.o.gateway_gc else {}),
                **env,
            },
        )

    async def auth_checks(self) -> int:
        """Token checks the auth stand-in has answered so far."""
        base = self.auth_url.rsplit("/api/", 1)[0]
        return int((await self.http.get(base + "/count", timeout=5)).json()["checks"])

    # -- CPU ------------------------------------------------------------------------

    def kafka_cpu(self) -> float:
        return process_cpu(self.kafka_pid)

    def postgres_cpu(self) -> float:
        """CPU seconds of the PostgreSQL server and its backends (those alive now)."""
        return tree_cpu(self.pg_pid)

    def redis_cpu(self) -> float:
        return process_cpu(self.redis_pid)

    def meters(self, server: Child | None) -> Meters:
        """The parts of a window: clients, Kafka, PostgreSQL, the server, the auth stand-in."""
        return Meters(
            loadgen=self.lg.cpu,
            kafka=self.kafka_cpu,
            postgres=self.postgres_cpu,
            server=server.cpu if server is not None else None,
            auth=self.auth.cpu if self.auth is not None else None,
        )

    # -- measuring ------------------------------------------------------------------

    async def connect_storm(
        self,
        target: Child,
        *,
        port: int,
        path: str,
        population: int,
        count: int,
        auth: str,
        salt: str = "",
        count_registered: bool = False,
        start: int = 0,
        **client: object,
    ) -> Connect:
        """Open ``count`` connections; handshakes/s up to the last one registered.

        ``client`` goes to the client processes' connect command as it is (for example
        ``protocol="v2"``, ``ack_ms``, ``ack_ids``: see ``bench/loadgen.py``).

        For the gateway "registered" means past the token check (the handshake's 101
        comes before it): ``notify_connections_opened_total`` is polled until it has
        grown by ``count``.
        """
        registered_at = 0.0
        base = 0.0
        stop = asyncio.Event()

        async def poll(gw: Gateway) -> None:
            nonlocal registered_at
            deadline = time.monotonic() + 600
            while not stop.is_set() and time.monotonic() < deadline:
                m = await gw.metrics(self.http)
                if m.get("notify_connections_opened_total", 0) - base >= count:
                    registered_at = time.time()
                    return
                await asyncio.sleep(0.05)

        poller = None
        if count_registered and isinstance(target, Gateway):
            base = (await target.metrics(self.http)).get("notify_connections_opened_total", 0)
            poller = asyncio.create_task(poll(target))
        window = CpuWindow(self.meters(target))
        opened = await self.lg.connect(
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
            **client,
        )
        if poller is not None:
            try:
                await asyncio.wait_for(poller, 60)
            except TimeoutError:
                stop.set()
        cpu = window.close()
        seconds = max(opened.last_open, registered_at) - opened.began
        if opened.errors:
            log(f"  connect errors: {opened.errors}")
        return Connect(
            ok=opened.ok,
            errors=opened.errors,
            began=opened.began,
            last_open=opened.last_open,
            registered_at=registered_at,
            seconds=seconds,
            rate=opened.ok / seconds if seconds > 0 else 0.0,
            cpu=cpu,
            v2_selected=opened.v2 if client.get("protocol") == "v2" else None,
        )

    async def measure_frames(
        self,
        server: Child,
        expected: int,
        trigger: Trigger,
        *,
        budget: float,
        latency: bool = True,
        seqs: tuple[int, int] | None = None,
        meters: Meters | None = None,
    ) -> Frames:
        """Reset the clients, run ``trigger``, wait for ``expected`` frames; rates and latency.

        With ``seqs`` = (first, count), the clients also note which bench messages of that
        range arrived: ``missing`` and ``dupes`` say what was lost or delivered twice.
        """
        await self.lg.reset(*(seqs or (0, 0)))
        window = CpuWindow(meters or self.meters(server))
        started = time.time()
        trigger_task = asyncio.create_task(trigger())
        s = await self.lg.wait_frames(expected, budget=budget)
        produced = await asyncio.wait_for(trigger_task, budget)
        producer = produced if isinstance(produced, Produced) else None
        cpu = window.close({"producer": producer.cpu} if producer else None)
        span = s.last - s.first
        out = Frames(
            expected=expected,
            frames=s.frames,
            complete=s.complete,
            closes=s.closes,
            bad_frames=s.bad_frames,
            span_s=span,
            rate=s.frames / span if span > 0 else 0.0,
            first_frame_after_s=s.first - started if s.first else None,
            first_at=s.first,
            last_at=s.last,
            cpu=cpu,
            producer=producer,
        )
        if seqs is not None and s.distinct is not None:
            out.distinct = s.distinct
            out.missing = seqs[1] - s.distinct
            out.dupes = s.dupes
            out.stray = s.stray
        if latency:
            out.latency_ms, out.timeline = await self.lg.latencies()
        if isinstance(server, Gateway):
            out.gc = gc = server.gc_pauses(started, time.time())
            if gc and gc.max_ms > 20:
                log(
                    f"  gc: {gc.full_collections} full collections, "
                    f"{gc.full_ms:.0f} ms in all, longest pause {gc.max_ms:.0f} ms"
                )
        if not s.complete:
            log(f"  INCOMPLETE: {s.frames} of {expected} frames")
        return out

    async def wait_connections(self, gw: Gateway, want: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await gw.metrics(self.http)).get("notify_connections", -1) == want:
                return
            await asyncio.sleep(0.1)
        log(f"  {gw.name}: connections did not reach {want} in {timeout} s")

    async def warm_up(self, port: int, path: str, auth: str) -> None:
        """One connection opened and closed first, so one-off costs (lazy imports, first
        pool connections) are not counted in the storm or the memory figure."""
        await self.lg.workers[0].connect(
            60,
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
