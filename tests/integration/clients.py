"""Helpers of the integration tests: real WebSocket clients and Kafka messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import uuid
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.gateway import ROOT
from tests.support.probe import has_connections, readiness_answer
from tests.support.wait import until


def message(user_id: str, subject: str = "s", content: str = "c", **extra: Any) -> dict[str, Any]:
    return {
        "message_id": str(uuid.uuid4()),
        "delivery_method": "push",
        "user_id": user_id,
        "subject": subject,
        "content": content,
        **extra,
    }


async def produce(producer: AIOKafkaProducer, topic: str, *values: dict[str, Any] | bytes) -> None:
    """Produce each value, keyed by its ``user_id`` as the README tells producers to, so
    one user's notifications share a partition and keep their order (raw bytes: no key)."""
    futures = []
    for value in values:
        if isinstance(value, bytes):
            raw, key = value, None
        else:
            raw = json.dumps(value, ensure_ascii=False).encode()
            user_id = value.get("user_id")
            key = user_id.encode() if isinstance(user_id, str) else None
        futures.append(await producer.send(topic, raw, key=key))
    await asyncio.gather(*futures)


async def receive(ws: ClientConnection, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The next ``count`` frames, decoded; fails if they do not all come within ``timeout``."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(frames) < count:
            raw = await ws.recv()
            assert isinstance(raw, str), "frames are text"
            frames.append(json.loads(raw))
    return frames


async def silent(ws: ClientConnection, seconds: float = 1.0) -> bool:
    """True if no frame arrives within ``seconds``."""
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except TimeoutError:
        return True
    return False


async def close_code(url: str, **kwargs: Any) -> tuple[int | None, str]:
    """Connect and return the close code and reason the server ends the connection with."""
    async with connect(url, open_timeout=15, **kwargs) as ws:
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code is not None, "server did not close"
        return ws.close_code, ws.close_reason or ""


async def wait_connections(base_url: str, count: int, timeout: float = 10.0) -> None:
    """Wait until the gateway at ``base_url`` has registered exactly ``count`` connections."""
    await until(lambda: has_connections(base_url, count), timeout, f"{count} connections")


async def wait_stored(db: Any, count: int, timeout: float = 20.0) -> None:
    """Wait until the backlog table holds at least ``count`` rows."""

    async def stored() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM undelivered_notification") >= count)

    await until(stored, timeout, f"{count} rows stored", interval=0.1)


async def readiness_once_consuming(base_url: str, timeout: float = 30.0) -> httpx.Response:
    """The /health/ready answer once the Kafka check passes (the other checks may not)."""
    answers: list[httpx.Response] = []

    async def consuming() -> bool:
        answer = await readiness_answer(base_url)
        if answer is not None and answer.json()["checks"].get("kafka"):
            answers.append(answer)
        return bool(answers)

    await until(consuming, timeout, "the Kafka check passes", interval=0.2)
    return answers[-1]


async def console_produce(bootstrap: str, topic: str, line: str) -> None:
    """Produce one line with Kafka's own console producer, as the platform's operators do."""
    await asyncio.to_thread(
        subprocess.run,
        ["scripts/kafka.sh", "produce", topic],
        input=line + "\n",
        text=True,
        cwd=ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap},
        check=True,
        timeout=60,
    )
