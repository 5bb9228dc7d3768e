"""The node's supervision of its background tasks: a task that dies stops the process."""

from __future__ import annotations

import asyncio

from service.config import Settings
from service.node import Node


async def _dies() -> None:
    raise RuntimeError("boom")


async def _waits() -> None:
    await asyncio.sleep(3600)


def _node() -> tuple[Node, list[str]]:
    node = Node(Settings())
    calls: list[str] = []
    node.on_fatal = lambda: calls.append(node.failure or "")
    return node, calls


async def test_a_task_that_dies_names_the_failure_and_stops_once() -> None:
    """The first dead task is named and on_fatal runs once, however many die after it."""
    node, calls = _node()
    first = asyncio.create_task(_dies(), name="kafka-consumer")
    second = asyncio.create_task(_dies(), name="backlog-retention")
    node._supervise(first)
    node._supervise(second)
    await asyncio.gather(first, second, return_exceptions=True)
    await asyncio.sleep(0)
    assert node.failure == "kafka-consumer"
    assert calls == ["kafka-consumer"]


async def test_a_cancelled_task_or_one_ending_during_stop_is_no_failure() -> None:
    """Cancellation (shutdown) and anything ending while the node stops are expected."""
    node, calls = _node()
    cancelled = asyncio.create_task(_waits(), name="write-watchdog")
    node._supervise(cancelled)
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    node.stopping = True
    late = asyncio.create_task(_dies(), name="kafka-consumer")
    node._supervise(late)
    await asyncio.gather(late, return_exceptions=True)
    await asyncio.sleep(0)
    assert node.failure is None
    assert calls == []
