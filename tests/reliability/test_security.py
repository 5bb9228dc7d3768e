"""Scenario 8: tokens never leak, foreign origins are refused, no user gets another's message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import uuid
from collections.abc import Callable

import httpx
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.probe import has_connections

from .conftest import Bench
from .harness import (
    SIZE,
    Client,
    Figures,
    Ledger,
    close_all,
    drain,
    open_all,
    stream,
    until,
)


async def _close_reason(url: str, **kwargs: object) -> tuple[int | None, str]:
    """Connect; the close code and reason the gateway ends the connection with (None: open)."""
    try:
        async with connect(url, open_timeout=10, **kwargs) as ws:  # type: ignore[arg-type]
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.7)
            return ws.close_code, ws.close_reason or ""
    except ConnectionClosed as exc:
        return (exc.rcvd.code if exc.rcvd else None), ""


async def test_tokens_never_reach_logs_metrics_or_error_bodies(
    bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """The exact token appears in no log line, metric, close reason or HTTP error body."""
    row = figures("8a. token never in logs, metrics or error bodies")
    row.recovery = "n/a"
    topics = await bench.topics()
    gateway = await bench.gateway(
        topics,
        LOG_LEVEL="DEBUG",
        ALLOWED_ORIGINS="https://cinema.example",
        MAX_CONNECTIONS_PER_USER="1",
        AUTH_TIMEOUT="0.5s",
        AUTH_CACHE_TTL="0",
    )
    user = bench.user("secret", 0)
    jwt_token = bench.token(user)
    short_lived = bench.auth.issue(bench.user("secret", 1), ttl=1)
    opaque = "opaque_" + secrets.token_urlsafe(24)
    tokens = {"jwt": jwt_token, "short-lived jwt": short_lived, "opaque": opaque}
    captured: list[str] = []
    base, ws_url = gateway.base, gateway.ws_url
    bearer = {"Authorization": f"Bearer {jwt_token}"}

    # WebSocket paths: accepted, refused for each reason, expiring while connected.
    for token in (jwt_token, opaque):
        captured += map(str, await _close_reason(ws_url(token)))
        captured += map(str, await _close_reason(ws_url(), additional_headers=bearer))
        captured += map(str, await _close_reason(ws_url(token), origin="https://evil.example"))
    async with connect(ws_url(jwt_token)):
        captured += map(str, await _close_reason(ws_url(jwt_token)))  # over the per-user limit
    captured += map(str, await _close_reason(ws_url(short_lived)))
    await asyncio.sleep(1.0)
    captured += map(str, await _close_reason(ws_url(short_lived)))  # expired by now
    bench.auth.fail_status = 500
    captured += map(str, await _close_reason(ws_url(jwt_token)))
    bench.auth.fail_status = None
    bench.auth.delay = 1.0
    captured += map(str, await _close_reason(ws_url(jwt_token)))
    bench.auth.delay = 0.0
    await bench.auth_proxy.down()
    captured += map(str, await _close_reason(ws_url(jwt_token)))
    await bench.auth_proxy.up()

    # HTTP paths, with the token in the query and in headers.
    async with httpx.AsyncClient(timeout=10) as client:
        for token in tokens.values():
            for path in (
                f"/nowhere?token={token}",
                f"/api/v1/notify/ws?token={token}",
                f"/metrics?token={token}",
                f"/health/ready?token={token}",
                f"/api/v1/notify/ws?token={token}&pad={'a' * 20_000}",
            ):
                answer = await client.get(f"{base}{path}", headers={"Cookie": f"t={token}"})
                captured.append(f"{answer.status_code} {answer.headers} {answer.text}")
            answer = await client.post(f"{base}/api/v1/notify/ws", headers=bearer)
            captured.append(f"{answer.status_code} {answer.headers} {answer.text}")
        metrics = (await client.get(f"{base}/metrics")).text

    await asyncio.to_thread(gateway.stop)
    log = gateway.logs()
    places = {"log": log, "metrics": metrics, "answers and close reasons": "\n".join(captured)}
    leaks = [
        f"{name} token in {where}"
        for name, token in tokens.items()
        for where, text in places.items()
        for needle in {token, token.split(".")[-1] if "." in token else token}
        if needle and needle in text
    ]
    row.messages = len(captured)
    row.lost = 0
    row.duplicates = 0
    row.notes["checked"] = f"{len(log.splitlines())} log lines, /metrics, {len(captured)} answers"
    row.notes["leaks"] = sorted(set(leaks))

    assert not leaks, sorted(set(leaks))


async def test_disallowed_origins_are_refused_before_the_auth_service_is_asked(
    bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """With ALLOWED_ORIGINS set, any other origin gets 4403 and never costs an auth request."""
    row = figures("8b. disallowed Origin refused")
    row.recovery = "n/a"
    topics = await bench.topics()
    gateway = await bench.gateway(topics, ALLOWED_ORIGINS="https://cinema.example")
    token = bench.token(bench.user("viewer", 0))
    refused = [
        "https://evil.example",
        "https://cinema.example.evil.example",
        "https://evilcinema.example",
        "http://cinema.example",
        "https://cinema.example:8443",
        "null",
        "file://",
        "https://cinema.example@evil.example",
    ]
    asked = bench.auth.requests
    answers = {
        origin: (await _close_reason(gateway.ws_url(token), origin=origin))[0] for origin in refused
    }
    refused_asked = bench.auth.requests - asked
    allowed = {
        "https://cinema.example": await _close_reason(
            gateway.ws_url(token), origin="https://cinema.example"
        ),
        "no Origin (not a browser)": await _close_reason(gateway.ws_url(token)),
    }
    row.messages = len(answers) + len(allowed)
    row.lost = 0
    row.duplicates = 0
    row.notes["close codes"] = answers
    row.notes["auth requests for refused origins"] = refused_asked

    assert answers == dict.fromkeys(refused, 4403), answers
    assert all(code is None for code, _ in allowed.values()), allowed
    assert refused_asked == 0, "a refused origin still cost a request to the auth service"


async def test_no_user_ever_receives_another_users_message(
    bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """Across many users with look-alike ids, every frame reaches only the user it names."""
    row = figures("8c. no user receives another user's message (randomised)")
    row.recovery = "n/a"
    seed = int(os.environ.get("RELIABILITY_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    row.notes["seed (RELIABILITY_SEED)"] = seed
    topics = await bench.topics()
    gateway = await bench.gateway(topics)

    # Look-alikes: case variants, prefixes, separators, and UUIDs in other spellings.
    spellings: dict[str, list[str]] = {}
    for i in range(SIZE.security_users // 5):
        base = f"user-{bench.run}-{i}"
        for user in (base, base.upper(), f"{base}0", base.replace("-", "_")):
            spellings[user] = [user]
        canonical = str(uuid.UUID(int=rng.getrandbits(128)))
        spellings[canonical] = [
            canonical,
            canonical.upper(),
            "{" + canonical + "}",
            canonical.replace("-", ""),
        ]
    users = list(spellings)
    # The auth service may name a UUID user in any spelling too.
    token_of = {user: bench.token(rng.choice(spellings[user])) for user in users}
    ledger = Ledger()
    clients = [
        Client(ledger, user, token_of[user], gateway.ws_url)
        for user in users
        for _ in range(rng.choice((0, 1, 1, 2)))
    ]
    online = {c.user for c in clients}
    try:
        await open_all(clients)
        await until(lambda: has_connections(gateway.base, len(clients)), 60, "clients connected")

        def make() -> dict[str, object]:
            user = rng.choice(users)
            return ledger.message(user, address=rng.choice(spellings[user]))

        await stream(producer, topics[0], make, rate=1000, count=SIZE.security_messages)
        await ledger.wait_complete(timeout=120, users=online)
        offline = [Client(ledger, u, token_of[u], gateway.ws_url) for u in users if u not in online]
        await drain(ledger, offline, timeout=120)
    finally:
        await close_all(clients)
    row.count(ledger)
    row.connections = len(clients) + len(users) - len(online)
    row.notes["frames to the wrong user"] = len(ledger.foreign)

    assert not ledger.foreign, f"frames reached the wrong user: {ledger.foreign[:5]}"
    assert not ledger.unknown, f"frames nobody sent: {ledger.unknown[:5]}"
    assert not ledger.missing(), f"{len(ledger.missing())} messages lost"
