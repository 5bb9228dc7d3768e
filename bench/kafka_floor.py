"""The Kafka floor of the paced scenario: produce -> aiokafka consumer, no gateway.

An aiokafka consumer configured and looped like the gateway's (consumer group,
manual commit after each batch, ``fetch_max_wait_ms=100``, ``getmany`` of up to
1000 records) reads the paced topic and records, for every bench message, the
time from the timestamp the producer wrote into it to its arrival here. What the
gateway adds on top of this is its own latency.

Prints ``{"ready": true}`` once it holds its partitions, then, after ``--seconds``
of silence or ``--count`` messages, one JSON line of percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import orjson
import uvloop
from aiokafka import AIOKafkaConsumer

from bench import common


async def consume(args: argparse.Namespace) -> dict[str, float | None]:
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        max_poll_records=1000,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        client_id="notify-bench-floor",
    )
    await consumer.start()
    latencies: list[int] = []
    commits: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=100)
        # Position every partition at its end before saying ready.
        for tp in consumer.assignment():
            await consumer.position(tp)
        print(json.dumps({"ready": True}), flush=True)
        deadline = time.monotonic() + args.budget
        quiet_since = time.monotonic()
        while len(latencies) < args.count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            if not batches:
                if latencies and time.monotonic() - quiet_since > args.quiet:
                    break
                continue
            now = common.now_us()
            quiet_since = time.monotonic()
            offsets = {}
            for tp, records in batches.items():
                for record in records:
                    content = orjson.loads(record.value)["content"]
                    latencies.append(now - int(content[: common.TS_DIGITS]))
                offsets[tp] = records[-1].offset + 1
            if args.commit:
                began = time.perf_counter()
                await consumer.commit(offsets)
                commits.append((time.perf_counter() - began) * 1000)
    finally:
        await consumer.stop()
    latencies.sort()
    commits.sort()

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000

    return {
        "samples": len(latencies),
        "p50": pct(0.5),
        "p99": pct(0.99),
        "p999": pct(0.999),
        "commit_ms_p50": commits[len(commits) // 2] if commits else None,
        "commit_ms_p99": commits[int(len(commits) * 0.99)] if commits else None,
        "batches": len(commits),
        "cpu": time.process_time(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Kafka-only latency floor")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--quiet", type=float, default=3.0, help="stop after this long idle")
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument(
        "--no-commit", dest="commit", action="store_false", help="skip the commit per batch"
    )
    parser.add_argument("--fetch-max-wait-ms", type=int, default=100, help="as the gateway's")
    args = parser.parse_args()
    result = uvloop.run(consume(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
