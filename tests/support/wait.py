"""One way to wait for a condition: poll it, and fail with what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    what: str = "the condition",
    *,
    interval: float = 0.05,
) -> float:
    """Poll ``condition()`` (plain or async) every ``interval`` s until it is true.

    Returns the seconds it took. Raises ``AssertionError`` naming ``what`` after
    ``timeout`` seconds; an exception from ``condition`` propagates at once.
    """
    started = time.monotonic()
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(interval)
