"""JSON-lines logging with secrets scrubbed from every line.

One object per line on stdout: ``time``, ``level``, ``logger``, ``event`` and
the ``extra`` fields of the call. A filter on the handler removes anything that
looks like a token (``token=...`` in a query string, ``Bearer ...``, a JWT) from
the message and from every string field, so no logger, ours or a library's, can
leak one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_SECRETS = (
    (re.compile(r"(?i)(token=)[^&\s\"']+"), r"\1[redacted]"),
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1[redacted]"),
    (re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"), "[redacted-jwt]"),
)

_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", "taskName"}
)


# Text none of the _SECRETS patterns can match lacks all of these: one search,
# instead of three substitutions, for the common line that holds no secret.
_MAYBE_SECRET = re.compile(r"(?i:token=|bearer\s)|eyJ")


def redact(text: str) -> str:
    """Replace anything token-like in ``text``."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _scrub(value: Any) -> Any:
    """Redact every string inside ``value``, however deeply nested."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_scrub(key): _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(item) for item in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))


class _Clock:
    """``time`` of a line: ISO 8601, UTC, milliseconds; the date and time of day are
    formatted once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, created: float) -> str:
        second = int(created)
        micro = round((created - second) * 1_000_000)
        if micro >= 1_000_000:  # rounds up into the next second, as datetime does
            second, micro = second + 1, 0
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micro // 1000:03d}+00:00"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object, secrets removed."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._clock.format(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            entry[key] = _scrub(value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


class _ProtocolNoise(logging.Filter):
    """One warning line, no traceback, for a request Sanic cannot even parse.

    Sanic logs "connection_task uncaught" with a traceback at error level when a
    malformed request line (``GET http://[ HTTP/1.1``) fails its own error path;
    anyone who reaches the port could fill the log with those.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sanic") and "connection_task uncaught" in record.getMessage():
            record.msg, record.args = "malformed_request_dropped", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class LineWriter(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line to the stream at once; flushes it once per turn of the event loop.

    A flush is a system call: a connect storm logs two lines per connection, and
    flushing each cost as much as formatting it. Lines of WARNING and above, and
    lines logged outside a running event loop (another thread, startup, exit), are
    flushed at once; an INFO line waits at most until the end of the loop's turn.
    Thread-safe (the handler's lock).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._flush_soon = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self.stream.write(line + self.terminator)
            if record.levelno >= logging.WARNING or not self._later():
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _later(self) -> bool:
        """Whether a flush at the end of this turn of the loop will write the line."""
        if self._flush_soon:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._flush_soon = True
        loop.call_soon(self._flush_now)
        return True

    def _flush_now(self) -> None:
        self._flush_soon = False
        self.flush()


def configure(level: str) -> None:
    """Send every logger's records to stdout as JSON lines at ``level``."""
    # What a record would otherwise collect and no line shows: the caller's file and
    # line (a walk up the stack per record), thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineWriter(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ProtocolNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("sanic.root", "sanic.error", "sanic.server", "sanic.websockets", "sanic.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Sanic's access log prints the query string, which holds the token: ours replaces it.
    logging.getLogger("sanic.access").disabled = True
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    # httpx logs request URLs, which may carry a token in the query; redis-py
    # reports its feature probes at debug level; websockets logs a refused handshake
    # (answered 400 or 426) at debug level with its traceback.
    for noisy in ("httpx", "httpcore", "asyncio", "redis", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
