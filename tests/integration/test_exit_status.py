"""The exit status of ``python -m service``: what an orchestrator's restart policy sees."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.failing_gateway import FAULT_TITLE

from .clients import message, produce
from .gateway import ROOT, Gateway

FAILING = "tests.integration.failing_gateway"


async def _fail_consumer(gateway: Gateway, producer: AIOKafkaProducer, topic: str) -> int:
    """Start ``gateway``, make its consumer die, and return its exit status (60 s at most)."""
    await asyncio.to_thread(gateway.start, timeout=90)
    await produce(producer, topic, message("exit-user", subject=FAULT_TITLE))
    assert gateway.process is not None
    return await asyncio.to_thread(gateway.process.wait, 60)


def _events(gateway: Gateway) -> list[dict[str, Any]]:
    """The gateway's JSON log lines."""
    return [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_dead_consumer_stops_the_process_with_status_70(
    gateway_env: dict[str, str],
    tmp_path: Path,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """The consumer task dies: the process stops by itself and exits 70, so it is restarted."""
    gateway = Gateway(gateway_env, tmp_path / "gateway.log", module=FAILING)
    try:
        status = await _fail_consumer(gateway, producer, topics[0])
    finally:
        gateway.kill()
    assert status == 70, gateway.logs()[-3000:]
    died = [e for e in _events(gateway) if e.get("event") == "background_task_died"]
    assert [e["task"] for e in died] == ["kafka-consumer"]


async def test_a_dead_consumer_in_one_worker_stops_every_worker_with_status_70(
    gateway_env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
    topics: tuple[str, str],
    producer: AIOKafkaProducer,
    db: asyncpg.Connection,
) -> None:
    """With --workers 2, one worker's dead consumer stops the whole service, status 70."""
    env = {**gateway_env, "NOTIFY_WORKERS": "2", "REDIS_URL": redis_url, "SHUTDOWN_TIMEOUT": "5s"}
    gateway = Gateway(env, tmp_path / "gateway.log", module=FAILING)
    try:
        status = await _fail_consumer(gateway, producer, topics[0])
        assert gateway.process is not None
        pid = gateway.process.pid
        # The main process waits for its workers before it exits: none is left behind.
        assert _group_gone(pid) or await asyncio.to_thread(_wait_group_gone, pid)
    finally:
        gateway.kill()
    assert status == 70, gateway.logs()[-3000:]


def _wait_group_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _group_gone(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_configuration_error_exits_with_status_2(workers: str) -> None:
    """A malformed variable: status 2 and the variable named, whatever the worker count."""
    env = {**os.environ, "NOTIFY_WORKERS": workers, "MAX_CONNECTIONS": "many"}
    env["REDIS_URL"] = env.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "MAX_CONNECTIONS" in result.stderr
