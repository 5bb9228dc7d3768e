"""Scenario 7: bad input, from Kafka values and from WebSocket handshakes.

Every Kafka value must end up delivered (live or stored), dead-lettered, or (for
another delivery method) skipped; the process must stay up and the next good
message must arrive. Handshake garbage must get a clear close code or HTTP error,
and no traceback may reach the gateway's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.integration.gateway import Gateway
from tests.support.frames import close_code_in, upgrade_request

from .conftest import Bench
from .harness import SIZE, Client, Figures, Ledger, encode, open_all, tracebacks, until

# Kafka's default limit is 1 MB: a topic that takes "1 MiB values" must say so.
BIG_TOPIC = {"max.message.bytes": str(4 * 1024 * 1024)}
PROBE_TIMEOUT = 10.0


# --- a gateway with a receiver and a reader of its dead-letter topic ----------------------


class Intake:
    """A gateway on a fresh topic, one connected receiver, and what reached the DLQ.

    ``renew()`` replaces a gateway that got stuck with a new one on new topics, so
    one stuck value does not hide what the following ones do.
    """

    def __init__(self, bench: Bench, producer: AIOKafkaProducer) -> None:
        self.bench = bench
        self.producer = producer
        self.ledger = Ledger()
        self.receiver = bench.user("receiver", 0)
        self.dead: dict[tuple[str, int], str] = {}
        self.gateways: list[Gateway] = []
        self.topics: tuple[str, str] = ("", "")
        self.client: Client | None = None
        self._dlq: AIOKafkaConsumer | None = None

    @property
    def gateway(self) -> Gateway:
        return self.gateways[-1]

    async def start(self) -> None:
        self.topics = await self.bench.topics(configs=BIG_TOPIC)
        self.gateways.append(await self.bench.gateway(self.topics, LOG_LEVEL="DEBUG"))
        self.client = Client(
            self.ledger, self.receiver, self.bench.token(self.receiver), self.gateway.ws_url
        )
        await open_all([self.client])
        self._dlq = AIOKafkaConsumer(
            bootstrap_servers=self.bench.kafka.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        await self._dlq.start()
        self._dlq.assign([TopicPartition(self.topics[1], 0)])

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self._dlq is not None:
            await self._dlq.stop()
            self._dlq = None

    async def renew(self) -> None:
        await self.close()
        await asyncio.to_thread(self.gateway.kill)
        await self.start()

    @property
    def alive(self) -> bool:
        return self.gateway.alive

    async def send(self, values: Sequence[bytes | None]) -> list[tuple[str, int]]:
        """Produce ``values`` in order to one partition; their ``(topic, offset)``s."""
        where = []
        for value in values:
            meta = await self.producer.send_and_wait(self.topics[0], value, key=b"bad-input")
            where.append((meta.topic, meta.offset))
        return where

    async def probe(self) -> float | None:
        """Send a good message after the bad ones; seconds until it arrived, None if it did not."""
        good = self.ledger.message(self.receiver)
        started = time.monotonic()
        await self.send([encode(good)])
        try:
            await until(
                lambda: self.ledger.counts[good["message_id"]] > 0,
                PROBE_TIMEOUT,
                "the good message after the bad ones",
            )
        except AssertionError:
            return None
        return time.monotonic() - started

    async def dead_letters(self, wanted: set[tuple[str, int]], timeout: float = 3.0) -> None:
        """Read the DLQ until ``wanted`` source records are all there, or ``timeout``."""
        assert self._dlq is not None
        deadline = time.monotonic() + timeout
        while not wanted <= self.dead.keys() and time.monotonic() < deadline:
            batches = await self._dlq.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    headers = dict(record.headers)
                    topic, _, offset = headers["notify-source"].decode().rsplit("/", 2)
                    self.dead[(topic, int(offset))] = headers["notify-error"].decode()


@dataclass
class Case:
    """Bad values of one kind and what must become of them."""

    name: str
    values: list[bytes | None]
    expect: str  # "dlq", "deliver", "skip", or "either" (deliver or dlq)
    ids: list[str] = field(default_factory=list)


def _raw(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


def catalogue(ledger: Ledger, receiver: str, offline: str) -> list[Case]:
    """One case for each kind of bad input the issue names, and a few more."""

    def good(**changes: Any) -> dict[str, Any]:
        message = ledger.message(receiver)
        message.update(changes)
        return message

    def without(key: str) -> bytes:
        message = good()
        del message[key]
        return _raw(message)

    def deep_object(depth: int) -> bytes:
        return b'{"a":' * depth + b"1" + b"}" * depth

    large = ledger.message(receiver, padding=60_000)
    upper = ledger.message(receiver)
    upper_id = upper["message_id"].upper()
    extra = ledger.message(receiver)
    stored = {"message_id": str(uuid.uuid4()), "delivery_method": "push", "user_id": offline}
    nul_offline = {**stored, "subject": "zero\x00byte", "content": "for someone offline"}
    nul_live = ledger.message(receiver)
    nul_live["content"] += "\x00"
    twice = ledger.message(receiver)
    first = _raw({**twice, "content": "decoy"})[:-1]
    twice_raw = first + b', "content": ' + json.dumps(twice["content"]).encode() + b"}"
    bom = ledger.message(receiver)
    return [
        Case("random bytes", [os.urandom(200), bytes(range(256))], "dlq"),
        Case("empty and null values", [b"", None], "dlq"),
        Case("JSON that is not an object", [b"[1, 2]", b'"push"', b"42", b"null"], "dlq"),
        Case("deep JSON", [b"[" * 5000 + b"]" * 5000, deep_object(3000)], "dlq"),
        Case(
            "deep JSON in a field",
            [
                _raw(good()).replace(
                    b'"subject": "', b'"deep": ' + b"[" * 2000 + b"]" * 2000 + b', "x": "'
                )
            ],
            "dlq",
        ),
        Case("string over 64 KiB", [_raw(good(content="x" * 70_000))], "dlq"),
        Case("string just under 64 KiB", [_raw(large)], "deliver", [large["message_id"]]),
        Case(
            "wrong types",
            [
                _raw(good(user_id=42)),
                _raw(good(subject=["a"])),
                _raw(good(content={"a": 1})),
                _raw(good(message_id=123)),
                _raw(good(delivery_method=True)),
            ],
            "dlq",
        ),
        Case(
            "null fields",
            [_raw(good(**{key: None})) for key in ("message_id", "user_id", "subject", "content")],
            "dlq",
        ),
        Case("missing fields", [without(k) for k in ("message_id", "user_id", "content")], "dlq"),
        Case(
            "invalid ids",
            [
                _raw(good(message_id="not-a-uuid")),
                _raw(good(user_id="")),
                _raw(good(user_id="   ")),
                _raw(good(user_id="u" * 256)),
            ],
            "dlq",
        ),
        Case(
            "not UTF-8",
            [
                _raw(good()).replace(b'"subject": "', b'"subject": "\xff\xfe'),
                json.dumps(good(subject="caf\u00e9"), ensure_ascii=False).encode("latin-1"),
            ],
            "dlq",
        ),
        Case(
            "lone surrogate", [_raw(good()).replace(b'"subject": "', b'"subject": "\\ud800')], "dlq"
        ),
        Case("NaN", [_raw(good()).replace(b'"subject": "', b'"nan": NaN, "subject": "')], "dlq"),
        Case("byte order mark", [b"\xef\xbb\xbf" + _raw(bom)], "either", [bom["message_id"]]),
        Case("duplicated keys", [twice_raw], "either", [twice["message_id"]]),
        Case("another delivery method", [_raw(good(delivery_method="email"))], "skip"),
        Case(
            "unknown fields, upper-case message id",
            [_raw({**upper, "message_id": upper_id}), _raw({**extra, "extra": {"a": [1, None]}})],
            "deliver",
            [upper["message_id"], extra["message_id"]],
        ),
        # PostgreSQL text cannot hold NUL, so such a value could never be stored for
        # an offline user: the gateway treats it as poison, live or not.
        Case("NUL characters", [_raw(nul_live), _raw(nul_offline)], "dlq"),
        Case("1 MiB value", [b'{"padding": "' + b"x" * (1 << 20) + b'"}'], "dlq"),
    ]


async def _reached(intake: Intake, db: asyncpg.Connection, ids: list[str]) -> set[str]:
    """The ids that reached the receiver live or are stored for a user who is offline."""
    reached = {i for i in ids if intake.ledger.counts.get(i)}
    rest = [i for i in ids if i not in reached]
    if rest:
        rows = await db.fetch(
            "SELECT message_id FROM undelivered_notification WHERE message_id = ANY($1::uuid[])",
            rest,
        )
        reached |= {str(r["message_id"]) for r in rows}
    return reached


@pytest.fixture
async def intake(bench: Bench, producer: AIOKafkaProducer) -> Any:
    box = Intake(bench, producer)
    await box.start()
    yield box
    await box.close()


async def test_each_kind_of_bad_value_is_delivered_or_dead_lettered(
    intake: Intake, bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """Each kind of malformed value is delivered or dead-lettered and the next good one arrives."""
    row = figures("7a. bad Kafka values, one case of each kind")
    row.recovery = "bad values sent to the next good message delivered (worst case)"
    db = await asyncpg.connect(bench.postgres.dsn)
    problems: list[str] = []
    waits: list[float] = []
    sent = 0
    try:
        for case in catalogue(intake.ledger, intake.receiver, bench.user("offline", 0)):
            where = await intake.send(case.values)
            sent += len(case.values)
            waited = await intake.probe()
            if not intake.alive:
                problems.append(f"{case.name}: the gateway died")
                await intake.renew()
                continue
            if waited is None:
                problems.append(f"{case.name}: the next good message never arrived (stuck)")
                await intake.renew()
                continue
            waits.append(waited)
            await intake.dead_letters(set(where) if case.expect in ("dlq", "either") else set())
            dead = {w for w in where if w in intake.dead}
            reached = await _reached(intake, db, case.ids)
            if case.expect == "dlq" and dead != set(where):
                problems.append(f"{case.name}: {len(where) - len(dead)} not dead-lettered")
            if case.expect == "deliver" and reached != set(case.ids):
                problems.append(f"{case.name}: {len(case.ids) - len(reached)} not delivered")
            if case.expect == "skip" and dead:
                problems.append(f"{case.name}: dead-lettered instead of skipped")
            if case.expect == "either" and not dead and reached != set(case.ids):
                problems.append(f"{case.name}: neither delivered nor dead-lettered")
        log = "".join(g.logs() for g in intake.gateways)
    finally:
        await db.close()
    row.messages = sent
    row.lost = sum("never arrived" in p or "not delivered" in p or "neither" in p for p in problems)
    row.duplicates = intake.ledger.duplicates
    row.recovery_s = round(max(waits), 2) if waits else None
    row.notes["gateway processes needed"] = len(intake.gateways)
    row.notes["problems"] = problems
    row.notes["tracebacks in the log"] = len(tracebacks(log))

    assert not problems, "\n".join(problems)
    assert not tracebacks(log), tracebacks(log)[:3]


# --- hypothesis: random values ------------------------------------------------------------

_MISSING = object()
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_field = st.one_of(st.just(_MISSING), _json, st.text(max_size=300))


@st.composite
def _notification_like(draw: st.DrawFn) -> bytes:
    """A notification whose fields are each well-formed four times in five, else anything."""
    document: dict[str, Any] = {}
    well_formed = {
        "message_id": st.uuids().map(str),
        "delivery_method": st.sampled_from(["push", "push", "push", "email", "PUSH", ""]),
        "user_id": st.text(min_size=1, max_size=40),
        "subject": st.text(max_size=60),
        "content": st.text(max_size=200),
    }
    for key, strategy in well_formed.items():
        value = draw(strategy) if draw(st.integers(0, 4)) else draw(_field)
        if value is not _MISSING:
            document[key] = value
    return _raw(document)


_values = st.one_of(
    st.binary(max_size=400),
    _json.map(lambda v: json.dumps(v).encode()),
    _notification_like(),
    _notification_like().map(lambda b: b[: len(b) // 2]),
    st.tuples(_notification_like(), st.binary(min_size=1, max_size=3)).map(
        lambda pair: pair[0][:-1] + pair[1] + pair[0][-1:]
    ),
    st.integers(1000, 4000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(60_000, 120_000).map(lambda n: b'{"content": "' + b"x" * n + b'"}'),
)


def _outcome_allowed(value: bytes) -> tuple[bool, str | None]:
    """Whether skipping is allowed (another delivery method), and the value's UUID if any."""
    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
        document = json.loads(value)
        if isinstance(document, dict):
            method = document.get("delivery_method")
            skip = isinstance(method, str) and method != "push"
            try:
                message_id: str | None = str(uuid.UUID(document.get("message_id")))
            except (ValueError, AttributeError, TypeError):
                message_id = None
            return skip, message_id
    return False, None


class RandomRun:
    """What the property test saw, across its examples."""

    def __init__(self, db: asyncpg.Connection) -> None:
        self.db = db
        self.sent = 0
        self.waits: list[float] = []
        self.failure = ""
        self.log_seen = 0

    def __repr__(self) -> str:
        return f"RandomRun(sent={self.sent})"


@pytest.fixture
async def random_run(intake: Intake, bench: Bench, figures: Callable[[str], Figures]) -> Any:
    row = figures("7b. random Kafka values (hypothesis)")
    row.recovery = "bad values sent to the next good message delivered (worst case)"
    run = RandomRun(await asyncpg.connect(bench.postgres.dsn))
    yield run
    await run.db.close()
    row.messages = run.sent
    row.lost = 1 if run.failure else 0
    row.duplicates = intake.ledger.duplicates
    row.recovery_s = round(max(run.waits), 2) if run.waits else None
    row.notes["examples"] = len(run.waits) + bool(run.failure)
    if run.failure:
        row.notes["failure"] = run.failure


@settings(
    max_examples=SIZE.bad_input_examples,
    deadline=None,
    database=None,
    derandomize=True,
    # No shrinking: once a value has stuck the gateway, later examples prove nothing.
    phases=(Phase.explicit, Phase.generate),
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)
@given(values=st.lists(_values, min_size=1, max_size=4))
async def test_random_values_never_stop_the_gateway(
    intake: Intake, random_run: RandomRun, values: list[bytes]
) -> None:
    """Random values are each delivered, dead-lettered or skipped; the process never dies."""
    run = random_run
    if run.failure:
        raise AssertionError(f"an earlier example already broke the gateway: {run.failure}")
    where = await intake.send(values)
    run.sent += len(values)
    waited = await intake.probe()
    if not intake.alive or waited is None:
        run.failure = f"{'died' if not intake.alive else 'stuck'} after {values!r:.300}"
    assert intake.alive, "the gateway died"
    assert waited is not None, "the next good message never arrived"
    run.waits.append(waited)
    await intake.dead_letters(set(where), timeout=1.0)
    for value, place in zip(values, where, strict=True):
        if place in intake.dead:
            continue
        may_skip, message_id = _outcome_allowed(value)
        if message_id is not None and await _reached(intake, run.db, [message_id]):
            continue
        if not may_skip:
            run.failure = f"neither delivered, dead-lettered nor skipped: {value!r:.300}"
        assert may_skip, run.failure
    log = intake.gateway.logs()
    found = tracebacks(log[run.log_seen :])
    run.log_seen = len(log)
    if found:
        run.failure = f"traceback after {values!r:.200}: {found[0][:300]}"
    assert not found, found[:3]


# --- handshakes ---------------------------------------------------------------------------


async def _raw_http(
    port: int, request: bytes, timeout: float = 10.0, *, then: bytes = b""
) -> bytes:
    """Send raw bytes to the gateway and return whatever it answers until it closes.

    ``then`` is sent once the answer's head has arrived (a frame after a ``101``).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    head_done = b"\r\n\r\n" not in answer and b"\r\n\r\n" in answer + chunk
                    answer += chunk
                    if head_done and then:
                        writer.write(then)
                    if head_done and not answer.startswith(b"HTTP/1.1 101"):
                        break
                    if close_code_in(answer) is not None:
                        break
        return answer
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    with contextlib.suppress(ValueError, IndexError):
        return int(answer.split(b" ", 2)[1])
    return 0


async def test_handshake_garbage_gets_clear_answers_and_no_traceback(
    bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """Garbage tokens, huge queries, broken upgrades and oversized frames get clear answers."""
    row = figures("7c. handshake garbage")
    row.recovery = "none needed: a normal client connects afterwards"
    topics = await bench.topics()
    gateway = await bench.gateway(topics, LOG_LEVEL="DEBUG")
    port = gateway.port
    path = "/api/v1/notify/ws"
    valid = bench.token(bench.user("valid", 0))
    problems: list[str] = []
    tried = 0

    garbage_tokens = [
        "x",
        "a" * 3000,
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
        valid[:-4] + "AAAA",
        "caf\u00e9-\u043f\u0440\u0438\u0432\u0435\u0442",
        "tab\there",
        "quote\"and'<script>",
        "line\r\nInjected: yes",
        "\x00nul",
    ]
    for token in garbage_tokens:
        tried += 1
        query = urllib.parse.quote(token, safe="")
        code = close_code_in(
            await _raw_http(port, upgrade_request(port, f"{path}?token={query}"), 5)
        )
        if code != 4401:
            problems.append(f"token {token[:20]!r} in the query: close {code}, not 4401")

    header_tokens = ["x", "a" * 3000, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."]
    for token in header_tokens:
        tried += 1
        request = upgrade_request(port, path, f"Authorization: Bearer {token}\r\n")
        code = close_code_in(await _raw_http(port, request, 5))
        if code != 4401:
            problems.append(f"token {token[:20]!r} as Bearer: close {code}, not 4401")

    http_cases: list[tuple[str, bytes]] = [
        ("huge query string", upgrade_request(port, f"{path}?token={valid}&pad={'a' * 100_000}")),
        ("huge header", upgrade_request(port, path, f"Cookie: c={'b' * 100_000}\r\n")),
        (
            "no upgrade headers",
            f"GET {path}?token={valid} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        ),
        (
            "unknown WebSocket version",
            upgrade_request(port, f"{path}?token={valid}").replace(b"Version: 13", b"Version: 99"),
        ),
        (
            "no WebSocket key",
            upgrade_request(port, f"{path}?token={valid}").replace(
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""
            ),
        ),
        ("POST to the socket", f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        ("not HTTP at all", random.Random(7).randbytes(300) + b"\r\n\r\n"),
        ("a TLS hello on the plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    ]
    # Requests Sanic cannot even parse: it drops the connection without an answer
    # (its error path fails on them); closing is a clear enough answer, but it
    # must not leave a traceback in the log.
    dropped_cases = [
        ("a request line of garbage", b"GET \\x HTTP/1.1\r\nno colon\r\n\r\n"),
        ("an absolute URL that does not parse", b"GET http://[ HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]
    for name, request in http_cases + dropped_cases:
        tried += 1
        seen = len(gateway.logs())
        answer = await _raw_http(port, request, 5)
        status = _status(answer)
        dropped = (name, request) in dropped_cases and answer == b""
        if not 400 <= status < 500 and not dropped:
            problems.append(f"{name}: answered {answer[:60]!r}, not a 4xx")
        if valid.encode() in answer:
            problems.append(f"{name}: the answer echoes the token")
        await asyncio.sleep(0.1)
        if tracebacks(gateway.logs()[seen:]):
            problems.append(f"{name}: a traceback in the log")

    tried += 2
    frames: list[str | bytes] = ["x" * 10_000, b"\x00" * 10_000]
    for n, frame in enumerate(frames):
        # A user of its own each: the frame may arrive while the token is being checked.
        token = bench.token(bench.user("big-frame", n))
        async with connect(gateway.ws_url(token), max_size=None) as ws:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await ws.send(frame)
                await asyncio.wait_for(ws.recv(), 5)
            if ws.close_code != 1009:
                problems.append(f"oversized {type(frame).__name__} frame: close {ws.close_code}")

    tried += 1
    request = upgrade_request(port, f"{path}?token={valid}")
    code = close_code_in(await _raw_http(port, request, 5, then=bytes([0x83, 0x80, 0, 0, 0, 0])))
    if code != 1002:
        problems.append(f"a frame with a reserved opcode: close {code}, not 1002")

    ledger = Ledger()
    user = bench.user("after", 0)
    after = Client(ledger, user, bench.token(user), gateway.ws_url)
    await after.open()
    still_ok = not await after.ended(0.5)
    await after.close()
    if not still_ok or not gateway.alive:
        problems.append("the gateway does not accept a normal client afterwards")
    await asyncio.to_thread(gateway.stop)
    found = tracebacks(gateway.logs())
    if found:
        problems.append(f"{len(found)} tracebacks in the log in all, first: {found[0][:300]}")
    row.messages = tried
    row.lost = 0
    row.duplicates = 0
    row.notes["problems"] = problems

    assert not problems, "\n".join(problems)
