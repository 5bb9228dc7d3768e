"""``python -m service send``: produce notifications to the gateway's topic, for testing.

Each notification is checked with the consumer's own rules
(:func:`service.notification.parse`) before it is produced, so what this command
accepts is exactly what the gateway delivers, and what it refuses would have gone to
the dead-letter topic. Records are keyed by the (normalised) user id, as the input
contract asks, and produced with ``acks=all``: a notification counts as sent only when
Kafka has answered for it.

Exit status: 0 every notification sent (or, with ``--dry-run``, valid); 2 usage or
configuration error (bad arguments, an unreadable file, a malformed ``KAFKA_*``
variable); 65 one or more notifications refused as invalid (the valid ones were sent);
69 Kafka could not be reached or did not acknowledge every notification.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Final

import orjson

from ..config import ConfigError, KafkaTarget
from ..notification import PUSH, PoisonMessage, Skip, parse

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_REFUSED: Final = 65  # sysexits.h EX_DATAERR: the input was wrong
EXIT_UNAVAILABLE: Final = 69  # sysexits.h EX_UNAVAILABLE: Kafka did not take it

# The fields of the input contract, as the consumer's reasons name them.
FIELDS: Final = ("message_id", "delivery_method", "user_id", "subject", "content")
# Records in flight before their answers are awaited: bounds memory for a large file.
IN_FLIGHT: Final = 500


class Refused(ValueError):
    """A notification the consumer would refuse; the message names the field and why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record, checked: its value is what the consumer will parse."""

    key: bytes | None
    value: bytes
    message_id: str
    user_id: str
    # Set when the consumer will skip it (another delivery method): said on stderr.
    skipped_as: str | None = None


def record_from_fields(fields: Mapping[str, Any], now_ms: int | None = None) -> Record:
    """The record for one notification; ``message_id`` and ``delivery_method`` default.

    A missing ``message_id`` becomes a new random UUID and a missing ``delivery_method``
    becomes ``push``; every other field is kept as given (unknown ones too, which the
    consumer ignores). Safe to call from anywhere: no I/O.

    Raises:
        Refused: the consumer would refuse the value; the message names the field.
    """
    document = dict(fields)
    document.setdefault("message_id", str(uuid.uuid4()))
    document.setdefault("delivery_method", PUSH)
    value = orjson.dumps(document)
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    try:
        parsed = parse(value, now_ms, now_ms)
    except PoisonMessage as exc:
        raise Refused(_explain(exc), exc.reason) from None
    if isinstance(parsed, Skip):
        user_id = document.get("user_id")
        text = user_id if isinstance(user_id, str) else ""
        return Record(
            text.encode() or None, value, str(document["message_id"]), text, parsed.delivery_method
        )
    return Record(
        parsed.user_id.encode(), value, parsed.message_id, parsed.user_id, skipped_as=None
    )


def record_from_line(line: bytes, now_ms: int | None = None) -> Record:
    """The record for one line of a JSON lines file: a JSON object of the input contract.

    Raises:
        Refused: the line is not a JSON object, or the consumer would refuse it.
    """
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise Refused(f"not JSON: {str(exc)[:120]} (invalid_json)", "invalid_json") from None
    if not isinstance(document, dict):
        raise Refused(
            f"not a JSON object but {type(document).__name__} (not_an_object)", "not_an_object"
        )
    return record_from_fields(document, now_ms)


def _explain(exc: PoisonMessage) -> str:
    """``field: why (reason)``, or ``why (reason)`` for a reason about the whole value."""
    for prefix, default in (("missing_", "missing"), ("invalid_", "invalid")):
        field = exc.reason.removeprefix(prefix)
        if field != exc.reason and field in FIELDS:
            return f"{field}: {exc.detail or default} ({exc.reason})"
    return f"{exc.detail or 'refused'} ({exc.reason})"


@dataclass(slots=True)
class Tally:
    sent: int = 0
    refused: int = 0
    failed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``send``."""
    one = parser.add_argument_group("one notification")
    one.add_argument("--user-id", help="the user the notification is for")
    one.add_argument("--subject", help="its title")
    one.add_argument("--content", help="its body")
    one.add_argument("--message-id", help="a UUID (default: a new random one)")
    one.add_argument(
        "--delivery-method", default=None, help="default push; another method is skipped"
    )
    many = parser.add_argument_group("many notifications")
    many.add_argument(
        "--file",
        help="JSON lines, one notification object per line (- for stdin); "
        "message_id and delivery_method may be left out; blank lines are ignored",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check only; produce nothing, need no Kafka"
    )
    parser.add_argument("--topic", help="default: KAFKA_TOPIC, else notification.send")
    parser.add_argument(
        "--bootstrap-servers", help="default: KAFKA_BOOTSTRAP_SERVERS, else kafka-0:9092"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for Kafka (default 30)"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through ``parser.error`` (status 2) for a combination that makes no sense."""
    single = {
        "--user-id": args.user_id,
        "--subject": args.subject,
        "--content": args.content,
        "--message-id": args.message_id,
        "--delivery-method": args.delivery_method,
    }
    if args.file is not None:
        given = [flag for flag, value in single.items() if value is not None]
        if given:
            parser.error(f"--file takes the notifications from the file, not {', '.join(given)}")
    else:
        missing = [flag for flag in ("--user-id", "--subject", "--content") if single[flag] is None]
        if missing:
            parser.error(
                f"give --file, or --user-id, --subject and --content (missing: "
                f"{', '.join(missing)})"
            )
    if not args.timeout > 0:
        parser.error("--timeout must be above 0")


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run ``send`` with parsed, checked arguments; returns the exit status."""
    try:
        target = KafkaTarget.from_env(env)
    except ConfigError as exc:
        print(f"send: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    target = KafkaTarget(
        args.bootstrap_servers or target.bootstrap_servers, args.topic or target.topic
    )
    if args.file is None:
        fields = {"user_id": args.user_id, "subject": args.subject, "content": args.content}
        if args.message_id is not None:
            fields["message_id"] = args.message_id
        if args.delivery_method is not None:
            fields["delivery_method"] = args.delivery_method
        return asyncio.run(_send(_one(fields), target, args))
    if args.file == "-":
        return asyncio.run(_send(_lines("<stdin>", sys.stdin.buffer), target, args))
    try:
        stream = open(args.file, "rb")  # noqa: SIM115 (closed below, after the run)
    except OSError as exc:
        print(f"send: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    with stream:
        return asyncio.run(_send(_lines(args.file, stream), target, args))


Item = tuple[str, "Record | Refused"]


def _one(fields: Mapping[str, Any]) -> Iterator[Item]:
    try:
        yield "notification", record_from_fields(fields)
    except Refused as exc:
        yield "notification", exc


def _lines(name: str, stream: IO[bytes]) -> Iterator[Item]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{number}", record_from_line(line)
        except Refused as exc:
            yield f"{name}:{number}", exc


async def _send(items: Iterator[Item], target: KafkaTarget, args: argparse.Namespace) -> int:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    # aiokafka logs its retries as warnings; this command says what failed, once.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    tally = Tally()
    producer: Any = None
    in_flight: list[tuple[str, Record, asyncio.Future[Any]]] = []
    unreachable = False
    try:
        while (item := await asyncio.to_thread(next, items, None)) is not None:
            where, outcome = item
            if isinstance(outcome, Refused):
                tally.refused += 1
                print(f"{where}: refused: {outcome}", file=sys.stderr)
                continue
            if outcome.skipped_as is not None:
                print(
                    f"{where}: note: delivery_method {outcome.skipped_as!r}: "
                    "the gateway skips it (it delivers push only)",
                    file=sys.stderr,
                )
            if args.dry_run:
                tally.sent += 1
                continue
            if producer is None:
                # Started on the first valid record: a file of bad lines needs no Kafka.
                producer = AIOKafkaProducer(
                    bootstrap_servers=target.bootstrap_servers,
                    acks="all",
                    request_timeout_ms=int(args.timeout * 1000),
                    client_id="notify-ws-send",
                )
                try:
                    await producer.start()
                except KafkaError as exc:
                    await producer.stop()
                    print(
                        f"send: cannot reach Kafka at {target.bootstrap_servers}: "
                        f"{type(exc).__name__}",
                        file=sys.stderr,
                    )
                    producer = None
                    unreachable = True
                    break
            try:
                future = await producer.send(target.topic, outcome.value, key=outcome.key)
            except KafkaError as exc:
                tally.failed += 1
                print(f"{where}: not sent: {type(exc).__name__}", file=sys.stderr)
                continue
            in_flight.append((where, outcome, future))
            if len(in_flight) >= IN_FLIGHT:
                await _settle(in_flight, tally)
        await _settle(in_flight, tally)
    finally:
        if producer is not None:
            await producer.stop()
    if args.dry_run:
        summary = f"valid {tally.sent}, refused {tally.refused} (dry run: nothing sent)"
    else:
        summary = f"sent {tally.sent}, refused {tally.refused}"
        if tally.failed:
            summary += f", failed {tally.failed}"
        if unreachable:
            summary += ", stopped: Kafka unreachable"
    print(f"send: {summary}", file=sys.stderr)
    if unreachable or tally.failed:
        return EXIT_UNAVAILABLE
    return EXIT_REFUSED if tally.refused else EXIT_OK


async def _settle(in_flight: list[tuple[str, Record, asyncio.Future[Any]]], tally: Tally) -> None:
    """Wait for Kafka's answer to each record in flight; print one JSON line per sent one."""
    for where, record, future in in_flight:
        try:
            metadata = await future
        except Exception as exc:  # aiokafka fails the future with KafkaError subclasses
            tally.failed += 1
            print(f"{where}: not sent: {type(exc).__name__}", file=sys.stderr)
            continue
        tally.sent += 1
        line = {
            "message_id": record.message_id,
            "user_id": record.user_id,
            "topic": metadata.topic,
            "partition": metadata.partition,
            "offset": metadata.offset,
        }
        sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
    sys.stdout.buffer.flush()
    in_flight.clear()
