"""JSON-lines logs with tokens scrubbed from every line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from service.logs import JsonFormatter, LineWriter, redact

JWT = jwt.encode({"sub": "alice", "exp": 2_000_000_000}, "k" * 32, algorithm="HS256")
OPAQUE = "Zq8xv3Kp0wQzSecret"


class Capture:
    def __init__(self, stream: io.StringIO, logger: logging.Logger) -> None:
        self.stream = stream
        self.logger = logger

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def capture() -> Iterator[Capture]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("notify.test-logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield Capture(stream, logger)
    logger.handlers[:] = []


def test_each_record_is_one_json_object_per_line(capture: Capture) -> None:
    """Every log record is one line of JSON with time, level, logger and event."""
    capture.logger.info("node_started", extra={"port": 8001})
    capture.logger.warning("store_unavailable\nsecond line")
    lines = capture.lines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "node_started"
    assert first["level"] == "info"
    assert first["logger"] == "notify.test-logs"
    assert first["port"] == 8001
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert second["level"] == "warning"
    assert second["event"] == "store_unavailable\nsecond line"


def test_exception_is_kept_on_the_same_line(capture: Capture) -> None:
    """A traceback is logged inside the JSON object, not as extra lines."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        capture.logger.exception("writer_failed")
    (entry,) = capture.entries()
    assert entry["level"] == "error"
    assert "RuntimeError: boom" in entry["exception"]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"GET /api/v1/notify/ws?token={OPAQUE}&x=1", OPAQUE),
        (f"GET /api/v1/notify/ws?access_token={OPAQUE}", OPAQUE),
        (f"Authorization: Bearer {OPAQUE}", OPAQUE),
        (f"headers={{'authorization': 'bearer {OPAQUE}'}}", OPAQUE),
        (f"cookie jwt {JWT} rejected", JWT),
        (f"payload={JWT}", JWT),
    ],
)
def test_redact_removes_token_like_text(text: str, secret: str) -> None:
    """A token in a URL, a Bearer header or a bare JWT is replaced wherever it appears."""
    cleaned = redact(text)
    assert secret not in cleaned
    assert "redacted" in cleaned


def test_redact_leaves_ordinary_text_alone() -> None:
    """Ordinary log text is not mangled."""
    text = "delivered 3 notifications to user b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"
    assert redact(text) == text


def test_tokens_are_scrubbed_from_message_and_extra_fields(capture: Capture) -> None:
    """No token reaches a log line through the message, its arguments or an extra field."""
    capture.logger.info(
        "request %s",
        f"/api/v1/notify/ws?token={OPAQUE}",
        extra={"authorization": f"Bearer {OPAQUE}", "cookie": JWT, "count": 3},
    )
    line = capture.stream.getvalue()
    assert OPAQUE not in line
    assert JWT not in line
    (entry,) = capture.entries()
    assert entry["count"] == 3


def test_tokens_are_scrubbed_from_objects_logged_as_extra(capture: Capture) -> None:
    """An object whose text holds a token (a URL, say) is logged without it."""

    class Url:
        def __str__(self) -> str:
            return f"http://auth/api/v1/users/me?token={OPAQUE}"

    capture.logger.info("auth_call", extra={"url": Url()})
    assert OPAQUE not in capture.stream.getvalue()


def test_tokens_are_scrubbed_from_exception_text(capture: Capture) -> None:
    """A token in an exception message does not reach the logged traceback."""
    try:
        raise ValueError(f"bad token {JWT} in ws?token={OPAQUE}")
    except ValueError:
        capture.logger.exception("auth_failed")
    line = capture.stream.getvalue()
    assert JWT not in line
    assert OPAQUE not in line
    assert "ValueError" in line


def test_tokens_are_scrubbed_from_nested_extra_fields(capture: Capture) -> None:
    """A token inside a dict or list passed as an extra field does not reach the log line."""
    capture.logger.info(
        "request",
        extra={"request": {"url": f"/ws?token={OPAQUE}"}, "headers": [f"Bearer {JWT}"]},
    )
    line = capture.stream.getvalue()
    assert OPAQUE not in line
    assert JWT not in line


class FlushCounting(io.StringIO):
    """A stream that counts its flushes and keeps what was flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.flushed = ""

    def flush(self) -> None:
        self.flushes += 1
        self.flushed = self.getvalue()


@pytest.fixture
def writer() -> Iterator[tuple[FlushCounting, logging.Logger]]:
    stream = FlushCounting()
    handler = LineWriter(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("notify.test-line-writer")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield stream, logger
    logger.handlers[:] = []


async def test_info_lines_of_one_loop_turn_are_flushed_together_at_its_end(
    writer: tuple[FlushCounting, logging.Logger],
) -> None:
    """A burst of INFO lines is one flush, at the end of the loop's turn, every line in it."""
    stream, logger = writer
    for i in range(100):
        logger.info("ws_open", extra={"connections": i})
    assert stream.flushes == 0
    await asyncio.sleep(0)
    assert stream.flushes == 1
    assert [json.loads(line)["connections"] for line in stream.flushed.splitlines()] == list(
        range(100)
    )


async def test_a_warning_is_flushed_at_once(writer: tuple[FlushCounting, logging.Logger]) -> None:
    """A WARNING (or worse) never waits for the loop: it is out before the call returns."""
    stream, logger = writer
    logger.info("ws_open")
    logger.warning("store_unavailable")
    assert [json.loads(line)["event"] for line in stream.flushed.splitlines()] == [
        "ws_open",
        "store_unavailable",
    ]


def test_outside_an_event_loop_every_line_is_flushed_at_once(
    writer: tuple[FlushCounting, logging.Logger],
) -> None:
    """At startup, at exit or in another thread there is no turn to wait for."""
    stream, logger = writer
    logger.info("node_started")
    assert json.loads(stream.flushed)["event"] == "node_started"


def test_the_time_is_utc_iso_8601_to_the_millisecond_as_datetime_says() -> None:
    """The time of a line is what ``datetime.isoformat`` gives, also across a second's edge."""
    formatter = JsonFormatter()
    for created in (1_800_000_000.0, 1_800_000_000.0004, 1_800_000_000.9996, 1_800_000_000.9999996):
        record = logging.LogRecord("x", logging.INFO, "", 0, "e", (), None)
        record.created = created
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert json.loads(formatter.format(record))["time"] == expected
