"""Redis alone: PUBLISH to per-user channels with one subscriber each
(``bench/redis_capacity.py``), and the publishing client's CPU per PUBLISH."""

from __future__ import annotations

import asyncio
import json

from bench.harness import Harness
from bench.processes import PY, ROOT, Child, log
from bench.results import CapacityTest, ClientCost, RedisCapacity


async def run(h: Harness) -> RedisCapacity:
    o = h.o
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
            f"bench:{h.run_id}:cap:",
            "--channels",
            str(o.scale_connections),
            "--messages",
            str(o.redis_capacity_messages),
        ],
        h.logs,
    ).start(pipes=True)
    line = await child.readline(600)
    await child.stop()
    if not line:
        raise RuntimeError(f"redis capacity failed:\n{child.tail()}")
    answer = json.loads(line)
    res = RedisCapacity(
        channels=int(answer["channels"]),
        subscribers=int(answer["subscribers"]),
        payload_bytes=int(answer["payload_bytes"]),
        tests=[CapacityTest.parse(t) for t in answer["tests"]],
        answer=answer,
    )
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
        stderr=(h.logs / "redis-capacity.log").open("ab"),
    )
    out, _ = await asyncio.wait_for(cost.communicate(), 120)
    if cost.returncode == 0 and out.strip():
        c = json.loads(out.decode().strip().splitlines()[-1])
        res.client_cost = ClientCost(
            gateway_broker_us=float(c["gateway_broker_us"]),
            redis_py_default_us=float(c["redis_py_default_us"]),
            redis_py_no_socket_timeout_us=float(c["redis_py_no_socket_timeout_us"]),
        )
        log(
            f"  client CPU per PUBLISH: the gateway's {c['gateway_broker_us']:.1f} us, "
            f"redis-py {c['redis_py_default_us']:.1f} us, "
            f"socket_timeout=None {c['redis_py_no_socket_timeout_us']:.1f} us"
        )
    for t in res.tests:
        log(
            f"  {t.tool} x{t.publishers}: {t.rate:,.0f} msg/s, Redis "
            f"{t.redis_cpu:.0f}% of a core ({100 * (t.redis_core_share or 0):.0f}% "
            f"while traffic flowed), publishers {t.publisher_cpu:.0f}%"
            + ("" if t.complete else f", INCOMPLETE {t.received}/{t.messages}")
        )
    return res
