"""JSON-lines logging with secrets scrubbed from every line.

One object per line on stdout: ``time``, ``level``, ``logger``, ``event`` and
the ``extra`` fields of the call. A filter on the handler removes anything that
looks like a token (``token=...`` in a query string, ``Bearer ...``, a JWT) from
the message and from every string field, so no logger, ours or a library's, can
leak one.
"""

from __future__ import annotations

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


def redact(text: str) -> str:
    """Replace anything token-like in ``text``."""
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


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object, secrets removed."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
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


def configure(level: str) -> None:
    """Send every logger's records to stdout as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stdout)
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
    # reports its feature probes at debug level.
    for noisy in ("httpx", "httpcore", "asyncio", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
