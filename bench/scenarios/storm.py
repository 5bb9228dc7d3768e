"""Connect storm against a gateway in ``AUTH_MODE=jwt`` (local verify, no network hop)."""

from __future__ import annotations

from bench import common
from bench.harness import Harness
from bench.processes import WS_PATH, log


async def run(h: Harness) -> None:
    o = h.o
    topic = await h.new_topic("stormjwt")
    gw = h.gateway(
        "stormjwt",
        KAFKA_TOPIC=topic,
        KAFKA_DLQ_TOPIC=f"{topic}.dlq",
        AUTH_MODE="jwt",
        AUTH_JWT_SECRET=common.BENCH_SECRET,
    )
    await gw.start()
    try:
        await gw.wait_http(h.http, "/health/ready")
        log(f"gateway jwt: connecting {o.storm} (local JWT check)")
        res = h.results.storm_jwt = await h.connect_storm(
            gw,
            port=gw.port,
            path=WS_PATH,
            population=common.STORM,
            count=o.storm,
            auth="token",
            salt=f"{h.run_id}-jwt",
            count_registered=True,
        )
        log(f"  {res.rate:.0f} handshakes/s")
        await h.lg.close_all()
    finally:
        await gw.stop()
