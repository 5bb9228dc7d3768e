"""Benchmark producer: bench messages into a Kafka topic, as fast as possible or paced.

Its own process, so its CPU is counted as load generator and never steals the
gateway's event loop. Uses aiokafka's batch API (``create_batch``/``send_batch``,
1 MiB batches, round-robin over the partitions), which is several times faster
than one ``send()`` per message. Message ``seq`` goes to user ``seq % users``.

With ``--channel-header`` the records are for the Centrifugo peer's publication-data
mode: the value is the frame the client gets (``common.frame``), the user's personal
channel is in that header. With ``--hold`` they are produced inside a Kafka transaction
that stays open until a line comes on stdin (a ``{"held": n}`` line says they are all
written): read-committed consumers see none of them, then all at once, so a consumer that
cannot be held back at its start can still drain messages already in Kafka.

Prints one JSON line when done: ``{"produced", "began", "ended", "rate"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable

import uvloop
from aiokafka import AIOKafkaProducer

from bench import common

BATCH_BYTES = 1024 * 1024


Record = tuple[bytes, list[tuple[str, bytes]]]


def record_maker(args: argparse.Namespace) -> Callable[[str, int, int], Record]:
    """How a message for a user becomes a Kafka value and headers."""
    header = args.channel_header
    if not header:
        return lambda user, ts, seq: (common.message(user, ts, seq), [])
    return lambda user, ts, seq: (
        common.frame(ts, seq).encode(),
        [(header, common.personal_channel(user).encode())],
    )


async def held(args: argparse.Namespace, producer: AIOKafkaProducer) -> dict[str, float]:
    """``--count`` messages in one transaction, committed when a line comes on stdin."""
    make = record_maker(args)
    partitions = sorted(await producer.partitions_for(args.topic))
    users = [common.user_id(args.population, args.first_user + i) for i in range(args.users)]
    began = time.time()
    await producer.begin_transaction()
    futures = []
    for i in range(args.count):
        seq = args.seq_start + i
        value, headers = make(users[seq % args.users], common.now_us(), seq)
        partition = partitions[i * len(partitions) // args.count]
        futures.append(await producer.send(args.topic, value, partition=partition, headers=headers))
    await asyncio.gather(*futures)
    print(json.dumps({"held": args.count}), flush=True)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.budget)
    await producer.commit_transaction()
    ended = time.time()
    return {
        "produced": args.count,
        "began": began,
        "ended": ended,
        "rate": args.count / max(1e-9, ended - began),
        "cpu": time.process_time(),
    }


async def produce(args: argparse.Namespace) -> dict[str, float]:
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap,
        acks="all" if args.hold else 1,
        linger_ms=0,
        max_batch_size=BATCH_BYTES,
        max_request_size=4 * BATCH_BYTES,
        enable_idempotence=bool(args.hold),
        transactional_id=f"notify-bench-{args.topic}" if args.hold else None,
        transaction_timeout_ms=900_000,
        client_id="notify-bench-producer",
    )
    await producer.start()
    try:
        if args.hold:
            return await held(args, producer)
        make = record_maker(args)
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
                value, headers = make(users[seq % args.users], common.now_us(), seq)
                if batch.append(key=None, value=value, timestamp=None, headers=headers) is None:
                    await ship(batch)
                    batch = producer.create_batch()
                    batch.append(key=None, value=value, timestamp=None, headers=headers)
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
                        value, headers = make(users[seq % args.users], common.now_us(), seq)
                        if (
                            batch.append(key=None, value=value, timestamp=None, headers=headers)
                            is None
                        ):
                            await ship(batch)
                            batch = producer.create_batch()
                            batch.append(key=None, value=value, timestamp=None, headers=headers)
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
    parser.add_argument(
        "--channel-header", default="", help="Centrifugo: the header naming the channel"
    )
    parser.add_argument(
        "--hold", action="store_true", help="one transaction, committed on a line of stdin"
    )
    args = parser.parse_args()
    print(json.dumps(uvloop.run(produce(args))), flush=True)


if __name__ == "__main__":
    main()
