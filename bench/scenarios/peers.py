"""Centrifugo as a peer (``--peers``): the same rows as the gateway's, from the same Kafka.

For each GOMAXPROCS (1, then unset) and each consumer setting (tuned
``partition_queue_max_size``, then Centrifugo's default), one Centrifugo process on its
own topic and consumer group. C users (the big count) connect with HS256 tokens whose
``channels`` claim subscribes each to its personal channel: handshakes/s up to the last
connect reply, and RSS per idle connection. Then, as for the gateway: K messages already
in Kafka drained to the sockets, K produced live, and (tuned only) the paced load.

"Already in Kafka": Centrifugo's consumer cannot be held back at its start as the
gateway's is (it pings Kafka within seconds of starting and exits if that fails), so the K
messages are written inside one Kafka transaction before it starts and committed once
every client is connected; its consumer reads committed records only, so it sees none of
them, then all of them. Delivered/s counts from the first frame to the last, as for the
gateway. There is no flush figure: Centrifugo keeps no durable per-user backlog (its
history is in memory, a different promise), so that row says "-".

Without Go and no cached binary, or without the module proxy, the scenario records why
and the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

from bench import centrifugo, common
from bench.centrifugo import CHANNEL_HEADER, Centrifugo
from bench.client_centrifugo import PATH
from bench.harness import Harness
from bench.processes import PY, Child, log
from bench.results import Frames, PeerPass, Peers, PeerSetup, Produced


def columns() -> dict[str, int | None]:
    """The peer's columns: one core (GOMAXPROCS=1), then every core (GOMAXPROCS unset)."""
    cores = os.cpu_count() or 1
    return {"1 core": 1, f"{cores} cores": None}


class HeldProducer:
    """A producer whose messages wait in an open Kafka transaction until :meth:`release`."""

    def __init__(self, h: Harness, topic: str, count: int, seq_start: int) -> None:
        self.child = Child(
            f"producer-held-{topic.rsplit('.', 1)[-1]}",
            [
                PY,
                "-m",
                "bench.producer",
                "--bootstrap",
                h.o.kafka,
                "--topic",
                topic,
                "--population",
                str(common.LIVE),
                "--users",
                str(h.o.big),
                "--count",
                str(count),
                "--seq-start",
                str(seq_start),
                "--channel-header",
                CHANNEL_HEADER,
                "--hold",
                "--budget",
                "900",
            ],
            h.logs,
        )

    async def start(self) -> None:
        """Start it and wait until every message is written (not yet visible)."""
        await self.child.start(pipes=True)
        line = await self.child.readline(300)
        if not line or "held" not in json.loads(line):
            raise RuntimeError(f"held producer failed:\n{self.child.tail()}")

    async def release(self) -> Produced:
        """Commit the transaction: the messages become visible at once."""
        proc = self.child.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.write(b"commit\n")
        await proc.stdin.drain()
        line = await self.child.readline(120)
        if not line:
            raise RuntimeError(f"held producer failed:\n{self.child.tail()}")
        return Produced.parse(json.loads(line))


async def one_pass(
    h: Harness, binary: Path, column: str, gomaxprocs: int | None, p: PeerPass
) -> None:
    """One Centrifugo process: connect, memory, drain, live (and paced when tuned)."""
    o, lg = h.o, h.lg
    count = o.big
    label = f"peer-{column.replace(' ', '')}-{p.consumer}"
    topic = await h.new_topic(label)
    held: HeldProducer | None = None
    if o.wants("live"):
        held = HeldProducer(h, topic, o.messages, seq_start=0)
        await held.start()
    server = Centrifugo(
        label,
        binary,
        h.logs,
        kafka=o.kafka,
        topic=topic,
        group=f"bench-{h.run_id}-{label}",
        gomaxprocs=gomaxprocs,
        partition_queue_max_size=p.partition_queue_max_size,
    )
    await server.start()
    try:
        await server.wait_ready(h.http)
        await h.warm_up(server.port, PATH, "centrifugo")
        rss0 = server.rss()
        log(f"centrifugo {column}, {p.consumer} consumer: connecting {count}")
        connect = p.connect = await h.connect_storm(
            server,
            port=server.port,
            path=PATH,
            population=common.LIVE,
            count=count,
            auth="centrifugo",
        )
        await asyncio.sleep(2)
        p.rss_per_conn_kb = (server.rss() - rss0) / max(1, connect.ok) / 1024
        log(f"  {connect.rate:.0f} handshakes/s, {p.rss_per_conn_kb:.1f} KB/conn")
        if held is not None:
            release = held.release
            log(f"centrifugo {column}, {p.consumer}: draining {o.messages} already in Kafka")
            p.drain = await h.measure_frames(server, o.messages, release, budget=300, latency=False)
            log(f"  {p.drain.rate:.0f} notifications/s")
            log(f"centrifugo {column}, {p.consumer}: {o.messages} messages produced live")
            live = p.live = await h.measure_frames(
                server,
                o.messages,
                lambda: h.produce(
                    topic,
                    population=common.LIVE,
                    users=count,
                    count=o.messages,
                    seq_start=o.messages,
                    channel_header=CHANNEL_HEADER,
                ),
                budget=300,
            )
            log(f"  {live.rate:.0f} delivered/s{latency_text(live)}")
        if p.consumer == "tuned" and o.wants("paced"):
            n = int(o.paced_rate * o.paced_seconds)
            log(f"centrifugo {column}: paced {o.paced_rate:.0f}/s for {o.paced_seconds:.0f} s")
            paced = p.paced = await h.measure_frames(
                server,
                n,
                lambda: h.produce(
                    topic,
                    population=common.LIVE,
                    users=count,
                    rate=o.paced_rate,
                    duration=o.paced_seconds,
                    seq_start=10 * o.messages,
                    channel_header=CHANNEL_HEADER,
                ),
                budget=o.paced_seconds + 120,
            )
            log(f"  {paced.frames} frames{latency_text(paced)}")
        await lg.close_all()
    finally:
        p.log_tail = server.tail(1500)
        await server.stop()
        if held is not None:
            with contextlib.suppress(Exception):
                await held.child.stop(timeout=5)


def latency_text(frames: Frames) -> str:
    lat = frames.latency_ms
    return "" if lat is None else f", p50 {lat.p50:.2f} ms, p99 {lat.p99:.2f} ms"


async def run(h: Harness) -> None:
    """Every column and consumer setting; a missing Go or module proxy skips them all."""
    o = h.o
    res = h.results.peers = Peers(version=centrifugo.VERSION, connections=o.big)
    found = await centrifugo.binary()
    if isinstance(found, str):
        res.skipped = found
        log(f"centrifugo: SKIPPED: {found}")
        return
    consumers: dict[str, int | None] = {"tuned": o.peer_queue}
    if o.wants("live"):
        consumers["default"] = None
    for column, gomaxprocs in columns().items():
        setup = res.setups[column] = PeerSetup(gomaxprocs=gomaxprocs)
        for consumer, queue in consumers.items():
            p = setup.passes[consumer] = PeerPass(consumer, queue)
            await one_pass(h, found, column, gomaxprocs, p)
