"""Kafka alone at the paced rate: producer -> an aiokafka consumer looped like the
gateway's (``bench/kafka_floor.py``), committing after every batch and without commits.
What the broker itself takes, next to the gateway's paced latency."""

from __future__ import annotations

import json

from bench import common
from bench.harness import Harness
from bench.processes import PY, Child, log
from bench.results import KafkaFloor


async def run(h: Harness) -> None:
    h.results.kafka_floor = await floor(h, commit=True)
    h.results.kafka_floor_no_commit = await floor(h, commit=False)


async def floor(h: Harness, *, commit: bool) -> KafkaFloor:
    o = h.o
    label = "floor" if commit else "floor-nocommit"
    topic = await h.new_topic(label)
    seconds = min(o.paced_seconds, 10.0)
    n = int(o.paced_rate * seconds)
    consumer = await Child(
        f"kafka-{label}",
        [
            PY,
            "-m",
            "bench.kafka_floor",
            "--bootstrap",
            o.kafka,
            "--topic",
            topic,
            "--group",
            f"bench-{h.run_id}-floor",
            "--count",
            str(n),
            "--budget",
            str(seconds + 60),
            *([] if commit else ["--no-commit"]),
        ],
        h.logs,
    ).start(pipes=True)
    if not await consumer.readline(60):
        raise RuntimeError(f"kafka floor consumer failed:\n{consumer.tail()}")
    log(
        f"kafka alone: paced {o.paced_rate:.0f}/s for {seconds:.0f} s into a bare consumer"
        f" ({'commit per batch' if commit else 'no commits'})"
    )
    produced = await h.produce(
        topic, population=common.LIVE, users=o.big, rate=o.paced_rate, duration=seconds
    )
    res = KafkaFloor.parse(json.loads(await consumer.readline(seconds + 90)), produced)
    log(
        f"  p50 {res.p50:.1f} ms, p99 {res.p99:.1f} ms, p999 {res.p999:.1f} ms"
        + (f", commit p50 {res.commit_ms_p50 or 0:.1f} ms" if commit else "")
    )
    await consumer.stop()
    return res
