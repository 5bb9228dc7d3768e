"""Fixtures of the integration tier: the real Kafka, PostgreSQL, auth server and gateway.

``make up`` starts local Kafka and PostgreSQL; ``KAFKA_BOOTSTRAP_SERVERS`` and
``DATABASE_URL`` point the suite at other ones (a compose stack, say). Each test
gets its own topic pair and consumer group, and an empty backlog table.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from dev.auth_server import AuthStandIn
from tests.support.gateway import ROOT, Gateway, Gateways

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://notify:notify@127.0.0.1:5432/notify")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(address: str) -> bool:
    host, _, port = address.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    if not _reachable(KAFKA):
        pytest.fail(f"Kafka is not reachable at {KAFKA}: run `make up` first")
    return KAFKA


@pytest.fixture(scope="session")
def redis_url() -> str:
    address = REDIS_URL.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    if not _reachable(address):
        pytest.fail(f"Redis is not reachable at {address}: run `make up` first")
    return REDIS_URL


@pytest.fixture(scope="session")
def database_url() -> str:
    """The PostgreSQL DSN, migrated to head once per session."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": DATABASE_URL},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"PostgreSQL at {DATABASE_URL} could not be migrated (run `make up`):\n"
            f"{result.stderr[-2000:]}"
        )
    return DATABASE_URL


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, with the backlog table emptied first."""
    connection = await asyncpg.connect(database_url)
    await connection.execute("TRUNCATE undelivered_notification")
    yield connection
    await connection.close()


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[tuple[str, str]]:
    """A fresh ``(topic, dead-letter topic)`` pair for this test."""
    name = f"notification.send.test-{uuid.uuid4().hex[:10]}"
    pair = (name, f"{name}.dlq")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(pair[0], num_partitions=3, replication_factor=1),
                NewTopic(pair[1], num_partitions=1, replication_factor=1),
            ]
        )
        yield pair
        await admin.delete_topics(list(pair))
    finally:
        await admin.close()


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    client = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0)
    await client.start()
    yield client
    await client.stop()


@pytest.fixture
def auth_server() -> Iterator[AuthStandIn]:
    server = AuthStandIn().start()
    yield server
    server.stop()


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway_env(
    kafka_bootstrap: str, database_url: str, topics: tuple[str, str], auth_server: AuthStandIn
) -> dict[str, str]:
    """The environment of a gateway wired to this test's topic, database and auth server."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC": topics[0],
        "KAFKA_DLQ_TOPIC": topics[1],
        "KAFKA_GROUP_ID": f"notify-ws-test-{uuid.uuid4().hex[:8]}",
        "DATABASE_URL": database_url,
        "AUTH_VERIFY_URL": auth_server.verify_url,
        "LOG_LEVEL": "DEBUG",
        "AUTH_TIMEOUT": "5s",  # the stand-in shares a busy test process
        # One process without Redis unless a test says otherwise: a REDIS_URL exported
        # for the suite's own Redis fixture must not reach every gateway.
        "REDIS_URL": "",
    }


@pytest.fixture
def gateway_factory(
    gateway_env: dict[str, str], tmp_path: Path, db: asyncpg.Connection
) -> Iterator[GatewayFactory]:
    """Starts gateway processes (``factory(**env_overrides)``); all are stopped afterwards."""
    gateways = Gateways(tmp_path)

    def factory(start: bool = True, **overrides: str) -> Gateway:
        gateway = gateways.new({**gateway_env, **overrides})
        return gateway.start() if start else gateway

    yield factory
    gateways.close()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> Gateway:
    """One running gateway, ready (Kafka assigned, PostgreSQL answering)."""
    return gateway_factory()
