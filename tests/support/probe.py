"""The gateway seen from outside: its ``/metrics`` and ``/health/ready`` answers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import httpx

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", re.M)


async def scrape(base: str) -> dict[str, float]:
    """``GET /metrics`` as ``{"name{labels}": value}``; raises ``httpx.HTTPError`` if unanswered."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{base}/metrics")).text
    return {f"{m[1]}{m[2] or ''}": float(m[3]) for m in _SAMPLE.finditer(text)}


async def readiness_answer(base: str) -> httpx.Response | None:
    """``GET /health/ready`` as it came, or None when the process does not answer."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.get(f"{base}/health/ready")
    except httpx.HTTPError:
        return None


async def readiness(base: str) -> tuple[int, dict[str, Any]]:
    """``GET /health/ready``: status and body (``(0, {})`` when the process does not answer)."""
    answer = await readiness_answer(base)
    if answer is None:
        return 0, {}
    try:
        return answer.status_code, answer.json()
    except ValueError:
        return 0, {}


async def is_ready(base: str) -> bool:
    """True if ``/health/ready`` answers 200."""
    return (await readiness(base))[0] == 200


async def has_connections(base: str, count: int) -> bool:
    """True if the gateway's ``notify_connections`` gauge is exactly ``count``."""
    return (await scrape(base)).get("notify_connections") == count


class ReadinessProbe:
    """Polls ``/health/ready`` every ``interval`` s in the background and keeps every answer.

    ``start()`` needs a running event loop; ``stop()`` is idempotent.
    """

    def __init__(self, base: str, interval: float = 0.2) -> None:
        self.base = base
        self.interval = interval
        self.answers: list[tuple[float, int, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ReadinessProbe:
        self._task = asyncio.create_task(self._poll(), name="readiness-probe")
        return self

    async def _poll(self) -> None:
        while True:
            status, body = await readiness(self.base)
            self.answers.append((time.monotonic(), status, body.get("checks", {})))
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> set[int]:
        """The statuses answered between ``since`` and ``until`` (``time.monotonic()``)."""
        return {status for at, status, _ in self.answers if since <= at <= until}
