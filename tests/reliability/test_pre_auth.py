"""Scenario 8d-8f: hostile handshakes: floods of bad tokens, storms, request heads that trickle."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect

from tests.integration.gateway import ROOT, Gateway, free_port

from .conftest import Bench
from .harness import SCALE, Figures, Ledger, produce, scrape, until

FLOOD = {"short": 2_000, "full": 20_000}[SCALE]
STORM = {"short": 1_000, "full": 5_000}[SCALE]
STORM_CONCURRENCY = 100  # handshakes the storm keeps in flight, from one address
PADDING = 6 * 1024
LINGER = 12.0


def rss_mb(gateway: Gateway) -> float:
    """The gateway process's resident memory, in MB."""
    assert gateway.process is not None
    with open(f"/proc/{gateway.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise AssertionError("no VmRSS line")


async def run_storm(port: int, count: int, concurrency: int, **options: Any) -> dict[str, Any]:
    """``tests/reliability/storm.py`` in a process of its own; its counts of outcomes."""
    args = [f"--port={port}", f"--count={count}", f"--concurrency={concurrency}"]
    args += [f"--{name}={value}" for name, value in options.items()]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.reliability.storm",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 900)
    assert process.returncode == 0, f"the storm process exited with {process.returncode}"
    result: dict[str, Any] = json.loads(out)
    return result


def rejections(metrics: dict[str, float]) -> dict[str, int]:
    prefix = 'notify_connections_rejected_total{reason="'
    return {k[len(prefix) : -2]: int(v) for k, v in metrics.items() if k.startswith(prefix)}


async def test_a_flood_of_distinct_invalid_tokens_does_not_pin_memory(
    bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """Distinct invalid tokens with 6 KiB of headers each leave the gateway's memory flat."""
    row = figures(f"8d. {FLOOD:,} distinct invalid tokens, 6 KiB headers each: memory")
    row.recovery = "n/a"
    topics = await bench.topics()
    gateway = await bench.gateway(topics)  # AUTH_CACHE_TTL=10m: every refusal stays cached
    # Warm up to the plateau of a flood (Sanic keeps a refused socket's objects up to
    # its 10 s close timeout), let those go, then measure across the flood.
    await run_storm(gateway.port, 1000, 10, padding=PADDING)
    await asyncio.sleep(LINGER)
    before = rss_mb(gateway)
    asked = bench.auth.requests
    flood = await run_storm(gateway.port, FLOOD, 10, padding=PADDING)
    during = rss_mb(gateway)
    await asyncio.sleep(LINGER)
    after = rss_mb(gateway)
    metrics = await scrape(gateway.base)
    growth = round(after - before, 1)
    row.messages = FLOOD
    row.lost = 0
    row.duplicates = 0
    row.notes["RSS before / at the end / 12 s later (MB)"] = f"{before} / {during} / {after}"
    row.notes["RSS change (MB)"] = growth
    row.notes["outcomes"] = flood["outcomes"]
    row.notes["seconds"] = flood["seconds"]
    row.notes["auth requests"] = bench.auth.requests - asked
    row.notes["refusals cached"] = metrics.get('notify_auth_cache_entries{answer="refused"}')

    assert flood["outcomes"] == {"4401": FLOOD}, flood["outcomes"]
    # Before plain values, each cached refusal kept its handler's request and socket
    # alive until the cache dropped it: ~38 KB per token (+77 MB for 2,000). Then the
    # refused sockets' objects, left in reference cycles, waited for a full collection,
    # which the node's GC thresholds make rare: 10-16 KB per token (+307 MB for
    # 20,000). Now they are freed by reference counting; a cached refusal is ~250 bytes.
    limit = max(16.0, FLOOD * 2 / 1024)  # 2 KB per token, and room for the allocator
    assert growth < limit, f"RSS grew by {growth} MB ({FLOOD} tokens)"


async def test_a_good_client_gets_in_during_a_storm_of_bad_tokens(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """While one address storms the gateway with bad tokens, a good client connects in 1 s."""
    row = figures(f"8e. a good client during a storm of {STORM:,} bad tokens")
    row.recovery = "slowest good client: connect to its first frame (s)"
    topics = await bench.topics()
    # The auth stand-in in a process of its own: in this one, its threads would hold
    # the GIL against the good clients being timed.
    auth_port = free_port()
    auth = await asyncio.create_subprocess_exec(
        sys.executable,
        "dev/auth_server.py",
        f"--port={auth_port}",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        await _storm_with_good_clients(bench, producer, row, topics, auth_port)
    finally:
        auth.kill()
        await auth.wait()


async def _storm_with_good_clients(
    bench: Bench, producer: AIOKafkaProducer, row: Figures, topics: tuple[str, str], auth_port: int
) -> None:
    auth_url = f"http://127.0.0.1:{auth_port}/api/v1/users/me"
    await until(lambda: _answers(auth_url), 30, "the auth stand-in up")
    gateway = await bench.gateway(topics, AUTH_VERIFY_URL=auth_url)
    # Each good user has one stored notification: its first frame, flushed on connect,
    # shows that the connection was accepted and is usable.
    ledger = Ledger()
    users = [bench.user("good", i) for i in range(20)]
    await produce(producer, topics[0], [ledger.message(user) for user in users])
    await until(
        lambda: _stored(gateway.base, len(users)), 60, "the good users' notifications stored"
    )
    storm = asyncio.create_task(run_storm(gateway.port, STORM, STORM_CONCURRENCY))
    await until(lambda: _storming(gateway.base), 30, "the storm under way")
    times: list[float] = []
    upgrades: list[float] = []
    refused: list[str] = []
    for user in users:
        if storm.done():
            break
        started = time.monotonic()
        try:
            # Another loopback address: the storm's per-address bound is not this client's.
            async with connect(
                gateway.ws_url(bench.token(user)), open_timeout=10, local_addr=("127.0.0.2", 0)
            ) as ws:
                upgrades.append(round(time.monotonic() - started, 3))
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                times.append(round(time.monotonic() - started, 3))
                ledger.record(user, set(), set(), json.dumps(frame))
        except Exception as exc:
            refused.append(type(exc).__name__)
        await asyncio.sleep(0.1)
    result = await storm
    metrics = await scrape(gateway.base)
    row.messages = len(users)
    row.users = len(users)
    row.connections = len(times)
    row.lost = len([u for u in users[: len(times) + len(refused)] if ledger.missing([u])])
    row.duplicates = ledger.duplicates
    row.recovery_s = max(times, default=None)
    row.notes["good clients connected during the storm"] = len(times)
    row.notes["good client connect time, median / max (s)"] = (
        f"{statistics.median(times)} / {max(times)}" if times else "none"
    )
    row.notes["of which the HTTP upgrade, median / max (s)"] = (
        f"{statistics.median(upgrades)} / {max(upgrades)}" if upgrades else "none"
    )
    row.notes["good clients refused"] = refused
    row.notes["storm outcomes (close code: count)"] = result["outcomes"]
    row.notes["storm seconds"] = result["seconds"]
    row.notes["gateway rejections by reason"] = rejections(metrics)

    assert len(times) >= 3, f"the storm ended before 3 good clients tried: {result}"
    assert not refused, f"good clients refused during the storm: {refused}"
    # The contract is 1 s; the test asserts only that every good client got in and
    # reports the times (a 2-core machine shared with other work measures the machine).
    slow = [t for t in times if t > 1.0]
    row.notes["good clients over 1 s"] = len(slow)
    if slow:
        row.notes["problems"] = [f"{len(slow)} of {len(times)} good clients took over 1 s"]


async def _answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(url)).status_code == 401
    except httpx.HTTPError:
        return False


async def _stored(base: str, count: int) -> bool:
    return (await scrape(base)).get("notify_notifications_stored_total", 0) >= count


async def _storming(base: str) -> bool:
    metrics = await scrape(base)
    return sum(rejections(metrics).values()) > 0 or metrics.get("notify_unauthenticated", 0) > 0


async def _trickle(port: int, interval: float, limit: float) -> tuple[float | None, str]:
    """Send a request head one byte per ``interval``; when and how the gateway ended it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"GET /api/v1/notify/ws?token=slow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nX-Slow: {'s' * 200}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = asyncio.create_task(reader.read(1024))
    try:
        for byte in head:
            if answer.done() or time.monotonic() - started > limit:
                break
            writer.write(bytes([byte]))
            await asyncio.wait({answer}, timeout=interval)
    finally:
        writer.close()
    if not answer.done():
        answer.cancel()
        return None, "still open"
    try:
        data = answer.result()
    except OSError as exc:
        return round(time.monotonic() - started, 2), type(exc).__name__
    status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
    return round(time.monotonic() - started, 2), status


async def test_a_request_head_that_trickles_in_is_cut_off(
    bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """Slowloris: heads sent a byte every 0.5 s are cut at HANDSHAKE_TIMEOUT; others get in."""
    row = figures("8f. request heads that trickle in (slowloris)")
    row.recovery = "seconds from the first byte to the cut (slowest)"
    topics = await bench.topics()
    gateway = await bench.gateway(topics, HANDSHAKE_TIMEOUT="2s")
    # Each head is ~300 bytes: at a byte every 0.5 s it would take 2.5 minutes, and
    # Sanic's REQUEST_TIMEOUT alone (the pause between two reads) would never fire.
    slow = [asyncio.create_task(_trickle(gateway.port, 0.5, 20.0)) for _ in range(20)]
    await asyncio.sleep(0.5)
    async with connect(gateway.ws_url(bench.token(bench.user("prompt", 0))), open_timeout=10):
        pass  # a client that sends its head at once is served meanwhile
    results = await asyncio.gather(*slow)
    cut = [seconds for seconds, _ in results if seconds is not None]
    row.messages = len(results)
    row.lost = 0
    row.duplicates = 0
    row.recovery_s = max(cut, default=None)
    row.notes["HANDSHAKE_TIMEOUT (s)"] = 2
    row.notes["answers"] = sorted({how for _, how in results})
    row.notes["cut after (s), min / max"] = f"{min(cut)} / {max(cut)}" if cut else "none"

    assert len(cut) == len(results), f"{len(results) - len(cut)} slow heads were never cut"
    assert max(cut) < 10.0, f"a slow head lasted {max(cut)} s with HANDSHAKE_TIMEOUT=2s"
