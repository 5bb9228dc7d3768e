"""Scenarios 10 and 11: any record Kafka can hold is consumed, and a broken DLQ stalls nothing.

Records are written by real producers, as platforms write them: aiokafka with each
``compression_type`` and as transactions (committed and aborted), and Kafka's own
console producer with each ``--compression-codec``; with odd timestamps (-1, 0,
year 10000), keys (none, binary, 100 KiB), headers of odd shapes and null values.
Each valid push notification must reach its connected user or be stored for its
offline user exactly as the contract says, each invalid one must reach the
dead-letter topic with its reason, and the gateway must stay up and ready.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.integration.gateway import ROOT, Gateway

from .conftest import Bench
from .harness import (
    SIZE,
    Client,
    Figures,
    Ledger,
    committed,
    encode,
    open_all,
    readiness,
    scrape,
    tracebacks,
)

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
YEAR_10000_MS = 253_402_300_800_000
# Kafka 4 refuses record timestamps more than an hour ahead by default; Kafka 3.x
# brokers (and the compose image) take any. The topics here take any, like those.
ANY_TIMESTAMP = {"message.timestamp.after.max.ms": str(2**63 - 1)}
DELIVERY_TIMEOUT = 60.0


class Records:
    """A gateway on fresh topics, a connected receiver, an offline user, and the DLQ's content.

    ``live`` messages go to the connected receiver (the ledger checks them), ``offline``
    ones to a user who never connects (checked in PostgreSQL), ``poison`` ones must
    reach the dead-letter topic with the reason given.
    """

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.ledger = Ledger()
        self.receiver = bench.user("receiver", 0)
        self.offline = bench.user("offline", 0)
        self.offline_ids: dict[str, tuple[str, str]] = {}  # id -> (subject, content)
        self.poison: dict[tuple[int, int], str] = {}  # (partition, offset) -> reason
        self.dead: dict[tuple[int, int], str] = {}
        self.topics: tuple[str, str] = ("", "")
        self.gateway: Gateway | None = None
        self.client: Client | None = None
        self.db: asyncpg.Connection | None = None
        self._dlq: AIOKafkaConsumer | None = None
        self.rss_at_start: float | None = None

    async def start(self, **gateway_env: str) -> None:
        self.topics = await self.bench.topics(configs=ANY_TIMESTAMP)
        self.gateway = await self.bench.gateway(self.topics, **gateway_env)
        self.client = Client(
            self.ledger, self.receiver, self.bench.token(self.receiver), self.gateway.ws_url
        )
        await open_all([self.client])
        self.rss_at_start = _rss_mb(self.gateway)
        self.db = await asyncpg.connect(self.bench.postgres.dsn)
        self._dlq = AIOKafkaConsumer(
            bootstrap_servers=self.bench.kafka.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
        )
        await self._dlq.start()
        self._dlq.assign([TopicPartition(self.topics[1], 0)])

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.db is not None:
            await self.db.close()
        if self._dlq is not None:
            await self._dlq.stop()

    def live(self, **changes: Any) -> bytes:
        return encode({**self.ledger.message(self.receiver), **changes})

    def stored(self, **changes: Any) -> bytes:
        message_id = str(uuid.uuid4())
        subject, content = f"for later {message_id[:8]}", "Фильм доступен\tсейчас"
        self.offline_ids[message_id] = (subject, content)
        return encode(
            {
                "message_id": message_id,
                "delivery_method": "push",
                "user_id": self.offline,
                "subject": subject,
                "content": content,
                **changes,
            }
        )

    def unreachable(self, user_id: str | None = None) -> bytes:
        """A push message for a user id no connection can ever have (padded by default)."""
        message_id = str(uuid.uuid4())
        return encode(
            {
                "message_id": message_id,
                "delivery_method": "push",
                "user_id": f" {self.receiver}" if user_id is None else user_id,
                "subject": message_id,
                "content": "never deliverable",
            }
        )

    def expect_poison(self, partition: int, offset: int, reason: str) -> None:
        self.poison[(partition, offset)] = reason

    @property
    def alive(self) -> bool:
        process = self.gateway.process if self.gateway is not None else None
        return process is not None and process.poll() is None

    async def delivered(self, timeout: float = DELIVERY_TIMEOUT) -> bool:
        """Wait until the receiver has every live message; False if it does not in time."""
        return await self.ledger.wait_complete(timeout, [self.receiver], idle=timeout)

    async def stored_rows(self) -> dict[str, asyncpg.Record]:
        assert self.db is not None
        rows = await self.db.fetch(
            "SELECT message_id, user_id, title, body, created_at FROM undelivered_notification"
            " WHERE message_id = ANY($1::uuid[])",
            list(self.offline_ids),
        )
        return {str(row["message_id"]): row for row in rows}

    async def dead_letters(self, timeout: float = 15.0) -> None:
        """Read the DLQ until every expected poison record is there, or ``timeout``."""
        assert self._dlq is not None
        deadline = time.monotonic() + timeout
        while not self.poison.keys() <= self.dead.keys() and time.monotonic() < deadline:
            batches = await self._dlq.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    headers = dict(record.headers)
                    _, partition, offset = headers["notify-source"].decode().rsplit("/", 2)
                    self.dead[(int(partition), int(offset))] = headers["notify-error"].decode()

    async def check(self, row: Figures, problems: list[str], started: float) -> None:
        """Everything the contract says, in ``problems``; the figures into ``row``."""
        assert self.gateway is not None
        complete = await self.delivered()
        row.count(self.ledger)
        if not complete:
            problems.append(f"{len(self.ledger.missing())} live messages never arrived")
        rows: dict[str, asyncpg.Record] = {}
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline and len(rows) < len(self.offline_ids):
            rows = await self.stored_rows()
            await asyncio.sleep(0.2)
        missing_rows = len(self.offline_ids) - len(rows)
        if missing_rows:
            problems.append(f"{missing_rows} messages for the offline user were not stored")
        # Stored as the contract says: the user, the frame's title and body, a time no
        # later than now and no earlier than the test (odd timestamps count as now).
        now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=5)
        earliest = datetime.datetime.fromtimestamp(started - 5, datetime.UTC)
        for message_id, stored in rows.items():
            subject, content = self.offline_ids[message_id]
            if (stored["user_id"], stored["title"], stored["body"]) != (
                self.offline,
                subject,
                content,
            ):
                problems.append(f"stored row {message_id} differs from what was sent")
            if not earliest <= stored["created_at"] <= now:
                problems.append(f"stored row {message_id} has created_at {stored['created_at']}")
        await self.dead_letters()
        for where, reason in self.poison.items():
            if self.dead.get(where) != reason:
                problems.append(f"record {where}: DLQ reason {self.dead.get(where)}, not {reason}")
        row.lost = (row.lost or 0) + missing_rows
        row.messages += len(self.offline_ids) + len(self.poison)
        row.users = 2
        row.notes["stored for the offline user"] = len(rows)
        row.notes["dead-lettered"] = sum(1 for w in self.poison if w in self.dead)
        row.notes["gateway RSS MB (start, end)"] = [self.rss_at_start, _rss_mb(self.gateway)]
        status, body = await readiness(self.gateway.base)
        if not self.alive or status != 200:
            problems.append(f"gateway alive={self.alive}, /health/ready {status} {body}")
        found = tracebacks(self.gateway.logs())
        if found:
            problems.append(f"{len(found)} tracebacks or critical lines, first: {found[0][:300]}")
        row.notes["problems"] = problems


@pytest.fixture
async def records(bench: Bench) -> Any:
    box = Records(bench)
    yield box
    await box.close()


async def _send(
    producer: AIOKafkaProducer,
    topic: str,
    values: Sequence[bytes | None],
    *,
    partition: int = 0,
    timestamp_ms: int | None = None,
    key: bytes | None = None,
    headers: list[tuple[str, bytes | None]] | None = None,
) -> list[int]:
    """Send ``values`` to one partition; their offsets, once Kafka has them all."""
    futures = [
        await producer.send(
            topic, value, key=key, partition=partition, timestamp_ms=timestamp_ms, headers=headers
        )
        for value in values
    ]
    return [meta.offset for meta in await asyncio.gather(*futures)]


def _console_produce(bench: Bench, topic: str, codec: str, lines: list[str]) -> None:
    """Kafka's own console producer with ``--compression-codec codec``, key<TAB>value lines."""
    subprocess.run(
        [
            "scripts/kafka.sh",
            "produce",
            topic,
            "--compression-codec",
            codec,
            "--property",
            "parse.key=true",
            "--property",
            "key.separator=\t",
        ],
        cwd=ROOT,
        env={**os.environ, **bench.kafka.env},
        input="\n".join(lines) + "\n",
        text=True,
        capture_output=True,
        timeout=120,
        check=True,
    )


# --- 10. any record ------------------------------------------------------------------------


async def test_every_compression_codec_is_consumed(
    records: Records, bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """Records compressed with each codec, by aiokafka and the console producer, all arrive."""
    row = figures("10a. records compressed with every codec (aiokafka and console producer)")
    row.recovery = "none needed: each codec's records arrive in order with the others"
    started = time.time()
    await records.start()
    topic = records.topics[0]
    problems: list[str] = []
    n = SIZE.records_per_kind
    for codec in CODECS:
        producer = AIOKafkaProducer(
            bootstrap_servers=bench.kafka.bootstrap,
            compression_type=None if codec == "none" else codec,
            linger_ms=20,
        )
        await producer.start()
        try:
            for partition in range(3):
                values = [records.live() for _ in range(n)] + [records.stored() for _ in range(n)]
                await _send(producer, topic, values, partition=partition)
            offsets = await _send(producer, topic, [records.unreachable()], partition=1)
            records.expect_poison(1, offsets[0], "invalid_user_id")
        finally:
            await producer.stop()
    for codec in CODECS:
        lines = [f"k-{codec}-{i}\t{records.live().decode()}" for i in range(n)]
        lines += [f"k-{codec}-s{i}\t{records.stored().decode()}" for i in range(n)]
        await asyncio.to_thread(_console_produce, bench, topic, codec, lines)
    await records.check(row, problems, started)
    metrics = await scrape(records.gateway.base) if records.alive else {}  # type: ignore[union-attr]
    row.notes["codecs"] = list(CODECS)
    row.notes["consumer errors"] = sum(
        v for k, v in metrics.items() if k.startswith("notify_consumer_errors_total")
    )

    assert not problems, "\n".join(problems)


async def test_odd_timestamps_never_stop_the_gateway(
    records: Records, bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """Records stamped -1, 0 or year 10000 are delivered or stored as made now; nothing dies."""
    row = figures("10b. record timestamps -1, 0, year 10000, an hour ahead")
    row.recovery = "none needed: odd timestamps count as the time of consumption"
    started = time.time()
    await records.start()
    topic = records.topics[0]
    problems: list[str] = []
    stamps = {
        "none (-1)": -1,
        "zero": 0,
        "year 10000": YEAR_10000_MS,
        "an hour ahead": int((time.time() + 3600) * 1000),
    }
    refused: list[str] = []
    for name, stamp in stamps.items():
        values = [records.stored() for _ in range(SIZE.records_per_kind)]
        values += [records.live() for _ in range(SIZE.records_per_kind)]
        try:
            await _send(producer, topic, values, timestamp_ms=stamp)
        except Exception as exc:  # the broker may refuse a timestamp: then not a test case
            refused.append(f"{name}: {type(exc).__name__}")
            for value in values:
                records.offline_ids.pop(json.loads(value)["message_id"], None)
                records.ledger.sent.pop(json.loads(value)["message_id"], None)
    # After the odd ones, a plain one on the same partition: it arrives only if they passed.
    await _send(producer, topic, [records.live(), records.stored()])
    await records.check(row, problems, started)
    row.notes["timestamps"] = [n for n in stamps if not any(r.startswith(n) for r in refused)]
    if refused:
        row.notes["refused by the broker"] = refused

    assert "year 10000" in row.notes["timestamps"], refused
    assert not problems, "\n".join(problems)


async def test_only_committed_transactions_are_delivered(
    records: Records, bench: Bench, figures: Callable[[str], Figures]
) -> None:
    """A transactional producer's committed records arrive; its aborted ones never do."""
    row = figures("10c. transactions: committed delivered, aborted never")
    row.recovery = "none needed"
    started = time.time()
    await records.start()
    topic = records.topics[0]
    problems: list[str] = []
    producer = AIOKafkaProducer(
        bootstrap_servers=bench.kafka.bootstrap,
        transactional_id=f"notify-rel-{uuid.uuid4().hex[:8]}",
        compression_type="lz4",
    )
    await producer.start()
    aborted = Ledger()
    try:
        for _ in range(2):
            async with producer.transaction():
                values = [records.live() for _ in range(SIZE.records_per_kind)]
                values += [records.stored() for _ in range(SIZE.records_per_kind)]
                await _send(producer, topic, values)
            await producer.begin_transaction()
            ghosts = [encode(aborted.message(records.receiver)) for _ in range(3)]
            ghosts += [records.unreachable()]  # aborted poison is not even dead-lettered
            await _send(producer, topic, ghosts)
            await producer.abort_transaction()
        # A last committed record after the aborted ones: once it is in, they were passed.
        async with producer.transaction():
            await _send(producer, topic, [records.live()])
    finally:
        await producer.stop()
    await records.check(row, problems, started)
    ghost_ids = set(aborted.sent)
    seen = ghost_ids & (set(records.ledger.unknown) | set(records.client.received))  # type: ignore[union-attr]
    stored_ghosts = await records.db.fetchval(  # type: ignore[union-attr]
        "SELECT count(*) FROM undelivered_notification WHERE message_id = ANY($1::uuid[])",
        list(ghost_ids),
    )
    if seen or stored_ghosts:
        problems.append(f"aborted records delivered: {len(seen)} live, {stored_ghosts} stored")
    if records.dead:
        problems.append(f"aborted records dead-lettered: {len(records.dead)}")
    row.notes["aborted records sent"] = len(ghost_ids) + 2
    row.notes["aborted records delivered, stored or dead-lettered"] = (
        len(seen) + stored_ghosts + len(records.dead)
    )

    assert not problems, "\n".join(problems)


async def test_keys_headers_and_null_values_of_any_shape(
    records: Records, bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """Any key and header shape is consumed; null values and unreachable user ids go to the DLQ."""
    row = figures("10d. keys, headers and null values of any shape")
    row.recovery = "none needed"
    started = time.time()
    await records.start()
    topic = records.topics[0]
    problems: list[str] = []
    keys: dict[str, bytes | None] = {
        "no key": None,
        "empty key": b"",
        "binary key": bytes(range(256)),
        "100 KiB key": b"k" * 100 * 1024,
    }
    headers: dict[str, list[tuple[str, bytes | None]] | None] = {
        "no headers": None,
        "null header value": [("h", None)],
        "repeated, empty and binary headers": [("h", b""), ("h", b"\x00\xff"), ("", b"x")],
        "many headers": [(f"h{i}", b"v" * 100) for i in range(200)],
        "non-ASCII header name": [("заголовок", "значение".encode())],
    }
    for key in keys.values():
        for header in headers.values():
            await _send(
                producer, topic, [records.live(), records.stored()], key=key, headers=header
            )
    for partition in range(3):
        nulls = await _send(producer, topic, [None], partition=partition, key=b"tombstone")
        records.expect_poison(partition, nulls[0], "empty_value")
        bad = [records.unreachable(), records.unreachable(f"{records.receiver}\x07")]
        for offset in await _send(producer, topic, bad, partition=partition):
            records.expect_poison(partition, offset, "invalid_user_id")
    await _send(producer, topic, [records.live()], key=b"last")
    await records.check(row, problems, started)
    row.notes["key shapes"] = list(keys)
    row.notes["header shapes"] = list(headers)

    assert not problems, "\n".join(problems)


# --- 11. a dead-letter topic that cannot be written ------------------------------------------

UNWRITABLE = {
    # A compacted topic refuses records without a key, as a denied write is refused:
    # every write fails at once, and again on every retry.
    "every write refused (compacted, no key)": {"cleanup.policy": "compact"},
    # A name the broker never creates: metadata never comes and every write times out,
    # like a missing topic with auto-create off.
    "topic missing, writes time out": None,
}


@pytest.mark.parametrize("case", list(UNWRITABLE))
async def test_unwritable_dead_letter_topic_does_not_stop_delivery(
    case: str, bench: Bench, producer: AIOKafkaProducer, figures: Callable[[str], Figures]
) -> None:
    """Poison that cannot be dead-lettered is logged, counted and skipped; delivery goes on."""
    row = figures(f"11{'ab'[list(UNWRITABLE).index(case)]}. dead-letter topic unwritable: {case}")
    row.recovery = "poison sent to the last good message after it delivered (s)"
    records = Records(bench)
    try:
        configs = UNWRITABLE[case]
        topic, dlq = await bench.topics(configs=ANY_TIMESTAMP)
        if configs is None:
            dlq = f"{dlq}-missing!"  # an invalid name: the broker never has such a topic
        else:
            await _alter(bench, dlq, configs)
        records.topics = (topic, dlq)
        records.gateway = await bench.gateway(records.topics, KAFKA_DLQ_TIMEOUT="3s")
        records.client = Client(
            records.ledger, records.receiver, bench.token(records.receiver), records.gateway.ws_url
        )
        await open_all([records.client])
        probe = asyncio.create_task(_watch_readiness(records.gateway.base))
        sent_at = time.monotonic()
        poison_offsets = {}
        for partition in range(3):
            (offset,) = await _send(producer, topic, [b"not json"], partition=partition)
            poison_offsets[partition] = offset
            await _send(
                producer,
                topic,
                [records.live() for _ in range(SIZE.records_per_kind)],
                partition=partition,
            )
        complete = await records.delivered()
        recovery = time.monotonic() - sent_at
        probe.cancel()
        answers = await asyncio.gather(probe, return_exceptions=True)
        dlq_checks = _dlq_checks(answers[0])
        row.count(records.ledger)
        row.messages += len(poison_offsets)
        row.recovery_s = round(recovery, 1) if complete else None
        problems: list[str] = []
        if not complete:
            problems.append(f"{len(records.ledger.missing())} good messages stuck behind poison")
        metrics = await scrape(records.gateway.base) if records.alive else {}
        given_up = metrics.get("notify_dead_letter_failures_total", 0)
        if given_up < len(poison_offsets):
            problems.append(f"notify_dead_letter_failures_total {given_up}, not 3")
        if False not in dlq_checks:
            problems.append("readiness never showed dlq=false")
        log = records.gateway.logs()
        logged = [
            json.loads(line)
            for line in log.splitlines()
            if '"dead_letter_failed"' in line and line.startswith("{")
        ]
        if {(e.get("partition"), e.get("offset")) for e in logged} != set(poison_offsets.items()):
            problems.append(f"dead_letter_failed lines name {len(logged)} records, not the 3")
        group = records.gateway.env["KAFKA_GROUP_ID"]
        done = await committed(bench.kafka.bootstrap, group)
        for partition, offset in poison_offsets.items():
            if done.get(TopicPartition(topic, partition), -1) <= offset:
                problems.append(f"partition {partition}: committed offset not past the poison")
        if not records.alive:
            problems.append("the gateway died")
        row.notes["given up on (metric)"] = given_up
        row.notes["readiness dlq check seen"] = sorted(dlq_checks, key=str)
        row.notes["problems"] = problems

        assert not problems, "\n".join(problems)
    finally:
        await records.close()


def _rss_mb(gateway: Gateway) -> float | None:
    """The gateway process's resident memory in MB (None once it has exited)."""
    try:
        status = Path(f"/proc/{gateway.process.pid}/status").read_text()  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return None
    kilobytes = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")
    )
    return round(kilobytes / 1024, 1)


async def _alter(bench: Bench, name: str, configs: dict[str, str]) -> None:
    """Set topic configs of ``name``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bench.kafka.bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs)])
    finally:
        await admin.close()


async def _watch_readiness(base: str) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    try:
        while True:
            answers.append((await readiness(base))[1].get("checks", {}))
            await asyncio.sleep(0.25)
    except asyncio.CancelledError:
        return answers


def _dlq_checks(answers: Any) -> set[Any]:
    return {a.get("dlq") for a in answers} if isinstance(answers, list) else set()
