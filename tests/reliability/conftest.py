"""Fixtures of the reliability suite: its own Kafka and PostgreSQL, gateways, and the figures.

The suite never touches the shared Kafka (9092), PostgreSQL (5432) or Redis
(6379): session fixtures start private ones with ``scripts/kafka.sh`` /
``scripts/postgres.sh`` / ``scripts/redis.sh`` on other ports
(``RELIABILITY_KAFKA_PORT``, ``RELIABILITY_KAFKA_CONTROLLER_PORT``,
``RELIABILITY_PG_PORT``, ``RELIABILITY_REDIS_PORT``; default 19092, 19093, 15432,
16379) and stop them at the end (``RELIABILITY_KEEP_SERVICES=1`` leaves them
running for the next session).

Each scenario records a row of figures; at the end of the session they are
written to ``.cache/reliability/last-run.json``, which ``python
tests/reliability/report.py`` turns into the table of ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from dev.auth_server import AuthStandIn
from tests.support.gateway import ROOT, Gateway, Gateways

from .harness import SCALE, Client, Figures, Ledger, delete_topics, new_topics
from .services import KafkaBroker, Postgres, RedisServer, TcpProxy

RESULTS = ROOT / ".cache" / "reliability"
LOGS = RESULTS / "logs" / SCALE
_ROWS: list[Figures] = []
_STARTED = time.time()


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


@pytest.fixture(scope="session")
def exclusive() -> Iterator[None]:
    """One reliability session at a time on this machine: they share the private ports.

    A second session (another engineer's ``make test``) waits for the first, up to
    20 minutes, instead of stopping its Kafka or PostgreSQL under it. Also raises
    the open-file limit for thousands of sockets (the gateway inherits it).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 16384:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "session.lock").open("w") as lock:
        deadline = time.monotonic() + 1200
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another reliability session held the lock for 20 minutes")
                time.sleep(1)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def kafka(exclusive: None) -> Iterator[KafkaBroker]:
    """The suite's own Kafka broker, started once per session."""
    broker = KafkaBroker(
        _port("RELIABILITY_KAFKA_PORT", 19092),
        _port("RELIABILITY_KAFKA_CONTROLLER_PORT", 19093),
        ROOT / ".cache" / "kafka-reliability",
    )
    broker.start()
    yield broker
    if not os.environ.get("RELIABILITY_KEEP_SERVICES"):
        broker.stop()


@pytest.fixture(scope="session")
async def postgres(exclusive: None) -> AsyncIterator[Postgres]:
    """The suite's own PostgreSQL, started and migrated once per session, emptied first."""
    cluster = Postgres(
        _port("RELIABILITY_PG_PORT", 15432), ROOT / ".cache" / "postgres-reliability"
    )
    await asyncio.to_thread(cluster.start)
    connection = await asyncpg.connect(cluster.dsn)
    await connection.execute("TRUNCATE undelivered_notification")
    await connection.close()
    yield cluster
    if not os.environ.get("RELIABILITY_KEEP_SERVICES"):
        await asyncio.to_thread(cluster.stop)


@pytest.fixture(scope="session")
def redis(exclusive: None) -> Iterator[RedisServer]:
    """The suite's own Redis (for the scenarios with several gateway processes)."""
    server = RedisServer(
        _port("RELIABILITY_REDIS_PORT", 16379), ROOT / ".cache" / "redis-reliability"
    )
    server.start()
    yield server
    if not os.environ.get("RELIABILITY_KEEP_SERVICES"):
        server.stop()


class Bench:
    """What one scenario works with: the private services, an auth stand-in, gateways.

    Gateways and topics made here are killed and deleted after the test.
    """

    def __init__(
        self, name: str, kafka: KafkaBroker, postgres: Postgres, auth: AuthStandIn, proxy: TcpProxy
    ) -> None:
        self.name = name
        self.kafka = kafka
        self.postgres = postgres
        self.auth = auth
        self.auth_proxy = proxy
        self.run = uuid.uuid4().hex[:6]
        self.topics_made: list[str] = []
        self.logs = LOGS / name
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes = Gateways(self.logs)

    @property
    def gateways(self) -> list[Gateway]:
        """Every gateway started here, in order."""
        return self.processes.started

    @property
    def auth_url(self) -> str:
        """The auth stand-in, behind the proxy that ``auth_proxy.down()`` cuts."""
        return f"http://127.0.0.1:{self.auth_proxy.port}/api/v1/users/me"

    def user(self, label: str, index: int) -> str:
        return f"{label}-{self.run}-{index}"

    def token(self, user: str) -> str:
        return self.auth.issue(user)

    def clients(
        self, ledger: Ledger, users: Iterable[str], url: Callable[[str], str], *, devices: int = 1
    ) -> list[Client]:
        """``devices`` clients of each user, with the user's token, recording into ``ledger``."""
        return [
            Client(ledger, user, self.token(user), url) for user in users for _ in range(devices)
        ]

    async def topics(self, **options: Any) -> tuple[str, str]:
        pair = await new_topics(self.kafka.bootstrap, self.name[:20], **options)
        self.topics_made += pair
        return pair

    def env(self, topics: tuple[str, str], **overrides: str) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap,
            "KAFKA_TOPIC": topics[0],
            "KAFKA_DLQ_TOPIC": topics[1],
            "KAFKA_GROUP_ID": f"notify-ws-rel-{uuid.uuid4().hex[:8]}",
            "DATABASE_URL": self.postgres.dsn,
            "AUTH_VERIFY_URL": self.auth_url,
            "AUTH_TIMEOUT": "3s",
            "AUTH_CACHE_TTL": "10m",
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_TIMEOUT": "5s",
            "REDIS_URL": "",  # one process without Redis unless a scenario says otherwise
            **overrides,
        }

    async def gateway(
        self, topics: tuple[str, str], *, wait_ready: bool = True, **overrides: str
    ) -> Gateway:
        """Start a gateway process on ``topics`` (env ``overrides``), ready unless told not to."""
        return await self.processes.start(
            self.env(topics, **overrides), wait_ready=wait_ready, timeout=90
        )

    async def restart(self, gateway: Gateway) -> None:
        """Start ``gateway`` again on the same port and environment; wait until ready."""
        await asyncio.to_thread(gateway.start, wait_ready=True, timeout=90)

    async def close(self) -> None:
        await asyncio.to_thread(self.processes.close)
        if self.topics_made:
            await delete_topics(self.kafka.bootstrap, self.topics_made)


@pytest.fixture
async def bench(
    request: pytest.FixtureRequest, kafka: KafkaBroker, postgres: Postgres
) -> AsyncIterator[Bench]:
    auth = AuthStandIn()
    # The stand-in listens with socketserver's backlog of 5: twenty gateway connections
    # at once would wait for SYN retransmits (1 s) and time out as "unavailable".
    auth._server.socket.listen(1024)
    auth.start()
    proxy = TcpProxy(auth.port)
    await proxy.up()
    name = re.sub(r"[^\w.-]+", "_", request.node.name)[:60]
    workbench = Bench(name, kafka, postgres, auth, proxy)
    try:
        yield workbench
    finally:
        await workbench.close()
        await proxy.close()
        auth.stop()


@pytest.fixture
async def producer(kafka: KafkaBroker) -> AsyncIterator[AIOKafkaProducer]:
    """A producer to the private broker that rides out a broker restart without duplicates."""
    client = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        linger_ms=5,
        enable_idempotence=True,
        request_timeout_ms=90_000,
        max_request_size=4 * 1024 * 1024,
        max_batch_size=1024 * 1024,
    )
    await client.start()
    yield client
    await client.stop()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Figures]]:
    """``figures(scenario)``: a new row of the table for this test, written at session end."""
    started = time.monotonic()

    def row(scenario: str) -> Figures:
        figure = Figures(scenario=scenario, test=request.node.nodeid)
        _ROWS.append(figure)
        return figure

    yield row
    for figure in _ROWS:
        if figure.test == request.node.nodeid:
            figure.duration_s = round(time.monotonic() - started, 1)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for figure in _ROWS:
        if figure.test != report.nodeid:
            continue
        if report.failed:
            figure.outcome = "failed"
            crash = getattr(report.longrepr, "reprcrash", None)
            if crash is not None and not figure.failure:
                figure.failure = str(crash.message)[:1500]
        elif report.when == "call" and figure.outcome != "failed":
            figure.outcome = "passed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _ROWS:
        return
    document = {
        "scale": SCALE,
        "started": datetime.datetime.fromtimestamp(_STARTED, datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "duration_s": round(time.time() - _STARTED, 1),
        "commit": os.environ.get("RELIABILITY_COMMIT") or _commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": [row.as_dict() for row in _ROWS],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    (RESULTS / "last-run.json").write_text(text)
    (RESULTS / f"last-run-{SCALE}.json").write_text(text)


def _commit() -> str:
    """The commit the gateway ran from, marked when ``service/`` had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--", "service"):
        commit += " + uncommitted changes in service/"
    return commit
