"""The publishing client alone: CPU per PUBLISH in one process, from ``Notification``
objects to the replies, on channels without a subscriber: the gateway's
``RedisBroker.publish``, and for comparison redis-py as the broker used it before
(``pipeline(transaction=False)``), by default and with ``socket_timeout=None``.

    python -m bench.redis_capacity client-cost
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from bench import common
from bench.redis_capacity import notification, origin
from service.broker import RedisBroker, encode


async def client_cost(args: argparse.Namespace) -> dict[str, float]:
    """Client CPU per PUBLISH in one process, pipelines of ``--pipeline``, each way
    from the same ``Notification`` objects to their replies (channel and payload made
    per message, as the broker does): the gateway's ``RedisBroker.publish`` (one packed
    buffer on a ``service/resp.py`` connection, replies parsed by ``hiredis.Reader``);
    redis-py as the broker used it before (``Redis.from_url``, ``pipeline(transaction=
    False)``, one ``publish`` per message, ``execute()``); and the same with
    ``socket_timeout=None`` (redis-py then skips the ``asyncio.timeout`` around each
    reply). Channels have no subscriber: this is the client's cost, not Redis's.
    Each is the best of 3 runs, on a connection opened before the clock starts."""
    from redis.asyncio import Redis

    n: int = args.messages
    prefix = f"bench:cost:{uuid.uuid4().hex[:8]}:"
    ts = common.now_us()
    notifications = [notification(i % args.channels, i, ts) for i in range(n)]
    batches = [notifications[i : i + args.pipeline] for i in range(0, n, args.pipeline)]
    control = origin(prefix)

    async def gateway_broker() -> float:
        broker = RedisBroker(args.url, prefix)
        try:
            await broker.publish(batches[0][:1])  # opens the command connection
            t0 = time.process_time()
            for batch in batches:
                await broker.publish(batch)
            return (time.process_time() - t0) / n * 1e6
        finally:
            await broker.close()

    async def redis_py(**kwargs: Any) -> float:
        client = Redis.from_url(args.url, **kwargs)
        try:
            await client.ping()  # connects
            t0 = time.process_time()
            for batch in batches:
                async with client.pipeline(transaction=False) as pipe:
                    for m in batch:
                        pipe.publish(f"{prefix}{m.user_id}".encode(), encode(m, control))
                    await pipe.execute()
            return (time.process_time() - t0) / n * 1e6
        finally:
            await client.aclose()

    out: dict[str, float] = {}
    for name, run in (
        ("gateway_broker_us", gateway_broker),
        ("redis_py_default_us", lambda: redis_py()),
        ("redis_py_no_socket_timeout_us", lambda: redis_py(socket_timeout=None)),
    ):
        out[name] = min([await run() for _ in range(3)])  # best of 3
    return out
