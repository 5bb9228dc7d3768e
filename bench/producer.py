"""Benchmark producer: bench messages into a Kafka topic, as fast as possible or paced.

Its own process, so its CPU is counted as load generator and never steals the
gateway's event loop. Uses aiokafka's batch API (``create_batch``/``send_batch``,
1 MiB batches, round-robin over the partitions), which is several times faster
than one ``send()`` per message. Message ``seq`` goes to user ``seq % users``.

Prints one JSON line when done: ``{"produced", "began", "ended", "rate"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvloop
from aiokafka import AIOKafkaProducer

from bench import common

BATCH_BYTES = 1024 * 1024


async def produce(args: argparse.Namespace) -> dict[str, float]:
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks=1,
        linger_ms=0,
        max_batch_size=BATCH_BYTES,
        max_request_size=4 * BATCH_BYTES,
        enable_idempotence=False,
        client_id="notify-bench-producer",
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(args.topic))
        users = [common.user_id(args.population, args.first_user + i) for i in range(args.users)]
        deliveries: list[asyncio.Future[object]] = []
        sent_batches = 0

        async def ship(batch: object) -> None:
            nonlocal sent_batches
            partition = partitions[sent_batches % len(partitions)]
            sent_batches += 1
            deliveries.append(await producer.send_batch(batch, args.topic, partition=partition))
            # Keep a bounded number of batches in flight.
            if len(deliveries) > 16:
                await deliveries.pop(0)

        seq = args.seq_start
        began = time.time()
        deadline = time.monotonic() + args.budget
        if args.rate <= 0:  # as fast as possible
            batch = producer.create_batch()
            for _ in range(args.count):
                value = common.message(users[seq % args.users], common.now_us(), seq)
                if batch.append(key=None, value=value, timestamp=None) is None:
                    await ship(batch)
                    batch = producer.create_batch()
                    batch.append(key=None, value=value, timestamp=None)
                seq += 1
                if time.monotonic() > deadline:
                    break
            await ship(batch)
        else:  # paced: every tick, produce what is due, stamped now
            total = int(args.rate * args.duration)
            start = time.monotonic()
            made = 0
            while made < total and time.monotonic() < deadline:
                due = min(total, int((time.monotonic() - start) * args.rate)) - made
                if due > 0:
                    batch = producer.create_batch()
                    for _ in range(due):
                        value = common.message(users[seq % args.users], common.now_us(), seq)
                        if batch.append(key=None, value=value, timestamp=None) is None:
                            await ship(batch)
                            batch = producer.create_batch()
                            batch.append(key=None, value=value, timestamp=None)
                        seq += 1
                    made += due
                    await ship(batch)
                await asyncio.sleep(args.tick)
        for future in deliveries:
            await future
        ended = time.time()
        produced = seq - args.seq_start
        return {
            "produced": produced,
            "began": began,
            "ended": ended,
            "rate": produced / max(1e-9, ended - began),
            "cpu": time.process_time(),
        }
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark Kafka producer")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--population", type=int, default=common.LIVE)
    parser.add_argument("--first-user", type=int, default=0)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--count", type=int, default=0, help="messages (as fast as possible)")
    parser.add_argument("--rate", type=float, default=0, help="messages/s (paced)")
    parser.add_argument("--duration", type=float, default=0, help="seconds (paced)")
    parser.add_argument("--tick", type=float, default=0.002)
    parser.add_argument("--seq-start", type=int, default=0)
    parser.add_argument("--budget", type=float, default=300, help="hard time limit, seconds")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(produce(args))), flush=True)


if __name__ == "__main__":
    main()
