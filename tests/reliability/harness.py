"""Tools of the reliability scenarios: sizes, figures, the ledger of ids, clients, Kafka helpers.

Every scenario sends known ``message_id``s to known users and checks, at the
end, that each one reached its user at least once. A frame carries no id on
the wire, so the suite puts it there itself: each message's subject is its
``message_id`` and its content names the intended user and the send time,
``"<user>\\t<unix time>\\t<padding>"``. The gateway sends them back as
``{"title": ..., "body": ...}``, which tells the ledger which message reached
which user, how late, and whether any frame reached someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import RecordMetadata
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

# The gateway from outside, the raw client and the wait live in tests/support; the
# scenarios import them from here as well.
from tests.support.probe import ReadinessProbe as ReadinessProbe
from tests.support.probe import readiness as readiness
from tests.support.probe import scrape as scrape
from tests.support.raw_client import RawClient as RawClient
from tests.support.wait import until as until

# --- sizes --------------------------------------------------------------------------------

SCALE = (os.environ.get("RELIABILITY_SCALE") or "short").strip().lower()
if SCALE not in ("short", "full"):
    raise RuntimeError(f"RELIABILITY_SCALE must be 'short' or 'full', got {SCALE!r}")


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is: ``short`` runs inside ``make test``, ``full`` is the issue's."""

    kill_messages: int
    kill_users: int
    kafka_messages: int
    kafka_rate: int
    postgres_outage: float
    postgres_messages: int
    auth_clients: int
    slow_fast_clients: int
    slow_rate: int
    storm_clients: int
    storm_messages: int
    storm_rate: int
    bad_input_examples: int
    security_users: int
    security_messages: int
    scale_users: int
    scale_messages: int
    scale_rate: int
    records_per_kind: int


SIZES = {
    "short": Sizes(
        kill_messages=2_000,
        kill_users=40,
        kafka_messages=1_500,
        kafka_rate=250,
        postgres_outage=5.0,
        postgres_messages=600,
        auth_clients=20,
        slow_fast_clients=10,
        slow_rate=100,
        storm_clients=200,
        storm_messages=1_500,
        storm_rate=300,
        bad_input_examples=25,
        security_users=30,
        security_messages=600,
        scale_users=40,
        scale_messages=2_000,
        scale_rate=250,
        records_per_kind=2,
    ),
    "full": Sizes(
        kill_messages=10_000,
        kill_users=200,
        kafka_messages=10_000,
        kafka_rate=1_000,
        postgres_outage=10.0,
        postgres_messages=3_000,
        auth_clients=200,
        slow_fast_clients=50,
        slow_rate=300,
        storm_clients=2_000,
        storm_messages=10_000,
        storm_rate=1_000,
        bad_input_examples=200,
        security_users=200,
        security_messages=5_000,
        scale_users=200,
        scale_messages=10_000,
        scale_rate=1_000,
        records_per_kind=20,
    ),
}
SIZE = SIZES[SCALE]


# --- figures ------------------------------------------------------------------------------


@dataclass
class Figures:
    """One row of the reliability table; the session hook writes every row as JSON."""

    scenario: str
    test: str = ""
    scale: str = SCALE
    messages: int = 0
    users: int | None = None
    connections: int | None = None
    lost: int | None = None
    duplicates: int | None = None
    same_connection_duplicates: int | None = None
    recovery_s: float | None = None
    recovery: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    outcome: str = "unknown"
    failure: str = ""
    duration_s: float = 0.0

    def count(self, ledger: Ledger) -> None:
        """Copy the ledger's totals into the row (before asserting, so a failure counts too)."""
        self.messages = len(ledger.sent)
        self.users = len(set(ledger.sent.values()))
        self.lost = len(ledger.missing())
        self.duplicates = ledger.duplicates
        self.same_connection_duplicates = ledger.same_connection_duplicates
        if ledger.foreign:
            self.notes["frames to the wrong user"] = len(ledger.foreign)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the ledger ---------------------------------------------------------------------------


class Ledger:
    """Which message went to which user, and every frame each user's connections received.

    Lost: an id no connection of its user received. Duplicate: an extra copy of an id
    on one device (one :class:`Client`, over all its connections).

    Not thread-safe: used from the test's event loop only.
    """

    def __init__(self, *, keep_latency: bool = False) -> None:
        self.sent: dict[str, str] = {}
        self.sent_at: dict[str, float] = {}
        self.counts: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        self.foreign: list[tuple[str, str]] = []
        self.unknown: list[str] = []
        self.same_connection_duplicates = 0
        self.duplicates = 0
        self.keep_latency = keep_latency
        # (send time, user, seconds from send to receipt), when keep_latency.
        self.latencies: list[tuple[float, str, float]] = []

    def message(self, user: str, *, address: str | None = None, padding: int = 0) -> dict[str, Any]:
        """A new push message for ``user`` (sent to Kafka as ``address``, default the user id)."""
        message_id = str(uuid.uuid4())
        self.sent[message_id] = user
        self.sent_at[message_id] = now = time.time()
        return {
            "message_id": message_id,
            "delivery_method": "push",
            "user_id": user if address is None else address,
            "subject": message_id,
            "content": f"{user}\t{now:.6f}\t{'x' * padding}",
        }

    def record(self, user: str, seen: set[str], device: set[str], raw: str | bytes) -> None:
        """Account for one frame received by a connection of ``user``.

        ``seen`` holds the ids this connection received so far, ``device`` those of every
        connection the same client made: a second copy on one device is a duplicate (two
        devices of one user each getting a copy is fan-out, not a duplicate).
        """
        now = time.time()
        try:
            frame = json.loads(raw)
            message_id = frame["title"]
            owner, sent_at, _ = frame["body"].split("\t", 2)
        except (ValueError, KeyError, TypeError, AttributeError):
            self.unknown.append(str(raw)[:200])
            return
        if message_id not in self.sent:
            self.unknown.append(message_id)
            return
        if self.sent[message_id] != user or owner != user:
            self.foreign.append((user, message_id))
            return
        if message_id in seen:
            self.same_connection_duplicates += 1
        if message_id in device:
            self.duplicates += 1
        seen.add(message_id)
        device.add(message_id)
        self.counts[message_id] += 1
        self.first_seen.setdefault(message_id, time.monotonic())
        if self.keep_latency:
            self.latencies.append((float(sent_at), user, now - float(sent_at)))

    def missing(self, users: Iterable[str] | None = None, *, older: float = 0.0) -> list[str]:
        """Ids not received (yet) by their user, optionally only those of ``users``.

        ``older``: only ids sent at least that many seconds ago.
        """
        wanted = None if users is None else set(users)
        before = time.time() - older
        return [
            message_id
            for message_id, user in self.sent.items()
            if self.counts[message_id] == 0
            and (wanted is None or user in wanted)
            and (not older or self.sent_at[message_id] <= before)
        ]

    @property
    def received(self) -> int:
        return sum(self.counts.values())

    def completed_at(self) -> float | None:
        """``time.monotonic()`` of the arrival that made the ledger complete, if it is."""
        if self.missing() or not self.first_seen:
            return None
        return max(self.first_seen.values())

    async def wait_complete(
        self,
        timeout: float,
        users: Iterable[str] | None = None,
        *,
        settle: float = 0.5,
        idle: float = 15.0,
    ) -> bool:
        """Wait until every id (of ``users``) arrived, then ``settle`` s more for duplicates.

        Gives up after ``timeout`` s, or after ``idle`` s without any new arrival.
        """
        wanted = None if users is None else list(users)
        deadline = time.monotonic() + timeout
        received, quiet_since = self.received, time.monotonic()
        while self.missing(wanted):
            now = time.monotonic()
            if self.received != received:
                received, quiet_since = self.received, now
            if now > deadline or now - quiet_since > idle:
                return False
            await asyncio.sleep(0.05)
        await asyncio.sleep(settle)
        return True


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# --- clients ------------------------------------------------------------------------------

CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, EOFError)


class Client:
    """One real WebSocket client of one user that records every frame into a ledger.

    ``open`` connects (raising if the handshake fails); a reader task records
    frames until the connection ends, including frames that arrive while it
    closes. ``close`` is idempotent. ``url`` is called at each connect, so a
    client follows a gateway restarted on another port.
    """

    def __init__(self, ledger: Ledger, user: str, token: str, url: Callable[[str], str]) -> None:
        self.ledger = ledger
        self.user = user
        self.token = token
        self.url = url
        self.connections = 0
        self.refusals = 0
        self.received: set[str] = set()
        self.close_codes: list[int | None] = []
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def open(self, timeout: float = 15.0) -> None:
        ws = await connect(
            self.url(self.token),
            open_timeout=timeout,
            close_timeout=5,
            ping_interval=None,
            max_size=None,
        )
        self._ws = ws
        self.connections += 1
        self._reader = asyncio.create_task(self._read(ws, set()), name=f"reader-{self.user}")

    async def _read(self, ws: ClientConnection, seen: set[str]) -> None:
        try:
            async for raw in ws:
                self.ledger.record(self.user, seen, self.received, raw)
        except ConnectionClosed:
            pass
        self.close_codes.append(ws.close_code)

    async def ended(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the current connection to end; True if it did."""
        if self._reader is None:
            return True
        done, _ = await asyncio.wait({self._reader}, timeout=timeout)
        return bool(done)

    async def close(self) -> None:
        ws, reader = self._ws, self._reader
        if ws is None:
            return
        with contextlib.suppress(*CONNECT_ERRORS):
            await ws.close()
        if reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 10)

    async def keep_open(self, stop: asyncio.Event, timeout: float) -> None:
        """Stay connected until ``stop`` is set; reconnect every 0.2 s when dropped or refused."""
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                await self.open(timeout=5)
            except CONNECT_ERRORS:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
                continue
            assert self._reader is not None
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({self._reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not stop.is_set():
                await asyncio.sleep(0.2)
        await self.close()


RETRY_CODES = frozenset({1001, 1013, 4503})


async def open_all(
    clients: Sequence[Client], *, concurrency: int = 200, timeout: float = 60.0
) -> float:
    """Open every client, at most ``concurrency`` handshakes at a time.

    Like a real client, one closed at once with "retry later" (4503, 1013, 1001)
    tries again after 0.2 s, until ``timeout``; ``Client.refusals`` counts those.
    Returns the ``time.monotonic()`` at which the last handshake that stayed open ended.
    """
    gate = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + timeout
    opened: dict[Client, float] = {}

    async def one(client: Client) -> None:
        async with gate:
            await client.open()
        opened[client] = time.monotonic()

    pending = list(clients)
    while pending:
        await asyncio.gather(*(one(c) for c in pending))
        await asyncio.sleep(0.3)
        pending = [c for c in pending if not c.is_open and c.close_codes[-1] in RETRY_CODES]
        for client in pending:
            client.refusals += 1
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} clients refused until the deadline")
        if pending:
            await asyncio.sleep(0.2)
    return max(opened.values(), default=time.monotonic())


async def close_all(clients: Sequence[Client]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


@contextlib.asynccontextmanager
async def kept_open(clients: Sequence[Client], timeout: float) -> AsyncIterator[None]:
    """Keep every client connected during the block (``Client.keep_open``), closed after it."""
    stop = asyncio.Event()
    keepers = [asyncio.create_task(c.keep_open(stop, timeout)) for c in clients]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*keepers)


async def drain(
    ledger: Ledger,
    clients: Sequence[Client],
    timeout: float,
    *,
    settle: float = 0.5,
    idle: float = 15.0,
) -> bool:
    """Connect ``clients`` (retrying like a real client), wait until their users have all, close."""
    async with kept_open(clients, timeout):
        return await ledger.wait_complete(
            timeout, {c.user for c in clients}, settle=settle, idle=idle
        )


# --- Kafka --------------------------------------------------------------------------------


def encode(value: dict[str, Any] | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return json.dumps(value, ensure_ascii=False).encode()


async def new_topics(
    bootstrap: str, prefix: str, *, partitions: int = 3, configs: dict[str, str] | None = None
) -> tuple[str, str]:
    """Create a fresh ``(topic, dead-letter topic)`` pair on ``bootstrap``."""
    name = f"notification.send.rel-{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, partitions, 1, topic_configs=configs or {}),
                NewTopic(f"{name}.dlq", 1, 1, topic_configs=configs or {}),
            ]
        )
    finally:
        await admin.close()
    return name, f"{name}.dlq"


async def delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    with contextlib.suppress(Exception):
        await admin.start()
        await admin.delete_topics(list(names))
    with contextlib.suppress(Exception):
        await admin.close()


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    values: Iterable[dict[str, Any] | bytes],
    *,
    key: bytes | None = None,
) -> list[RecordMetadata]:
    """Send every value (in order) and wait until Kafka has them all."""
    futures = [await producer.send(topic, encode(v), key=key) for v in values]
    return list(await asyncio.gather(*futures))


async def produce_batch(
    producer: AIOKafkaProducer, topic: str, values: Sequence[dict[str, Any] | bytes]
) -> None:
    """Send ``values`` as one record batch to partition 0: a consumer fetches them together."""
    batch = producer.create_batch()
    for value in values:
        if batch.append(key=None, value=encode(value), timestamp=None) is None:
            raise ValueError("the values do not fit in one batch: raise max_batch_size")
    await (await producer.send_batch(batch, topic, partition=0))


async def stream(
    producer: AIOKafkaProducer,
    topic: str,
    make: Callable[[], dict[str, Any]],
    *,
    rate: float,
    count: int | None = None,
    stop: asyncio.Event | None = None,
    timeout: float = 600.0,
) -> list[RecordMetadata]:
    """Produce ``make()`` at ``rate`` per second until ``count`` are sent or ``stop`` is set."""
    started = time.monotonic()
    futures: list[asyncio.Future[RecordMetadata]] = []
    while (count is None or len(futures) < count) and not (stop is not None and stop.is_set()):
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise TimeoutError("stream ran past its time budget")
        due = int(elapsed * rate) + 1
        if count is not None:
            due = min(due, count)
        while len(futures) < due:
            futures.append(await producer.send(topic, encode(make())))
        await asyncio.sleep(0.02)
    return list(await asyncio.gather(*futures))


async def committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    """The consumer group's committed offsets, by partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


# --- the gateway from outside -------------------------------------------------------------


def tracebacks(log: str) -> list[str]:
    """Lines of a gateway log that carry a traceback or a critical error."""
    found = []
    for line in log.splitlines():
        entry: Any = None
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
        if not isinstance(entry, dict):
            if "Traceback" in line:
                found.append(line[:1000])
            continue
        if "exception" in entry or entry.get("level") == "critical" or "Traceback" in line:
            found.append(line[:1000])
    return found
