"""The notification as the gateway sees it, and the rules a Kafka value must obey.

``parse`` turns one Kafka record value into a :class:`Notification`, tells the
caller to skip it (not for this gateway), or raises :class:`PoisonMessage` with a
short machine-readable reason. ``normalise_user_id`` is the one rule for user ids,
applied alike to a record's ``user_id`` and to the id the auth check answers, so a
record addresses exactly the connections it names. Nothing here does I/O; all of
it is safe to call from anywhere.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

MAX_VALUE_BYTES: Final = 64 * 1024
MAX_USER_ID_CHARS: Final = 255
PUSH: Final = "push"
# The last millisecond of year 9999: Python's datetime (and so the store) ends there.
MAX_TIMESTAMP_MS: Final = 253_402_300_799_999


class PoisonMessage(ValueError):
    """A Kafka value breaks the input contract; ``reason`` is a short code for the DLQ header."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Skip:
    """A valid value that is not for this gateway (another delivery method)."""

    __slots__ = ("delivery_method",)

    def __init__(self, delivery_method: str) -> None:
        self.delivery_method = delivery_method


@dataclass(slots=True, unsafe_hash=True)
class Notification:
    """One push notification for one user; never changed once made.

    Shared by every connection and batch it goes through, so no field is assigned
    after construction (only the frames below are filled in, once, on first use).
    Not a frozen dataclass: its ``__init__`` sets each field through
    ``object.__setattr__``, which cost ~1.5 µs a record (a plain one ~0.3 µs), three
    times the ``orjson`` parse of the record. Equality and hash are the frozen
    dataclass's: by the six fields, not the frames.

    ``frame`` is the text frame sent to every connection of the user, encoded once.
    ``created_ms`` is when the notification was made, in milliseconds since the epoch:
    the Kafka record timestamp, or the time it was consumed when the record's timestamp
    is unusable (:func:`created_time`). Always between 1 and :data:`MAX_TIMESTAMP_MS`
    for a notification made by :func:`parse`.
    """

    message_id: str
    user_id: str
    title: str
    body: str
    created_ms: int
    frame: str
    # The protocol v2 frame, made on first use: v1-only traffic never pays for it.
    _frame_v2: str | None = field(default=None, compare=False, repr=False)
    # The complete WebSocket frames (header and payload), made on first use.
    _wire: bytes | None = field(default=None, compare=False, repr=False)
    _wire_v2: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def wire(self) -> bytes:
        """``frame`` as a complete server WebSocket frame, built once and written as is to
        every v1 connection of the user (see :func:`text_frame`)."""
        wire = self._wire
        if wire is None:
            wire = text_frame(self.frame.encode())
            self._wire = wire
        return wire

    @property
    def wire_v2(self) -> bytes:
        """``frame_v2`` as a complete server WebSocket frame, built once (on first use)."""
        wire = self._wire_v2
        if wire is None:
            wire = text_frame(self.frame_v2.encode())
            self._wire_v2 = wire
        return wire

    @property
    def frame_v2(self) -> str:
        """The v2 text frame ``{"type":"notification","id","title","body","created_at"}``,
        encoded once (on first use) and shared by every v2 connection."""
        frame = self._frame_v2
        if frame is None:
            frame = orjson.dumps(
                {
                    "type": "notification",
                    "id": self.message_id,
                    "title": self.title,
                    "body": self.body,
                    "created_at": iso_time(self.created_ms),
                }
            ).decode()
            self._frame_v2 = frame
        return frame

    @classmethod
    def build(
        cls, message_id: str, user_id: str, title: str, body: str, created_ms: int
    ) -> Notification:
        """Make a notification and its frame ``{"title": ..., "body": ...}`` (UTF-8, unescaped)."""
        return cls(message_id, user_id, title, body, created_ms, v1_payload(title, body).decode())


def v1_payload(title: str, body: str) -> bytes:
    """The v1 frame's text, ``{"title": ..., "body": ...}``: UTF-8, non-ASCII unescaped."""
    return orjson.dumps({"title": title, "body": body})


def text_frame(payload: bytes) -> bytes:
    """The complete server WebSocket frame (FIN, text, unmasked) carrying ``payload``.

    ``payload`` is UTF-8 text. The bytes are websockets' own for ``send_text(payload)``
    without extensions (a server frame is unmasked, and the gateway negotiates no
    extension), so one frame serves every socket it is written to.
    """
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big") + payload
    return b"\x81\x7f" + length.to_bytes(8, "big") + payload


# The last second formatted by iso_time: notifications of one batch share it, and
# strftime costs more than the rest of the v2 frame.
_last_second: tuple[int, str] = (-1, "")


def iso_time(created_ms: int) -> str:
    """``created_ms`` as ISO 8601 UTC with milliseconds: ``2026-12-02T10:15:30.123Z``."""
    global _last_second
    seconds, millis = divmod(created_ms, 1000)
    cached, text = _last_second
    if cached != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{millis:03d}Z"


# How JSON spells a NUL character (the only way it can be in a string: orjson rejects a
# raw one).
_NUL_ESCAPE: Final = b"\\u0000"

_UUID_FORM = re.compile(r"\{?[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}\}?")


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def as_uuid(text: str) -> str | None:
    """The canonical lower-case form of ``text`` if it is a UUID in a usual spelling.

    Only hex with optional dashes and braces counts: ``uuid.UUID`` alone also takes
    ``0x`` prefixes, underscores and non-ASCII digits, which would fold distinct ids
    into one.
    """
    if _CANONICAL_UUID.fullmatch(text):
        return text  # the common case, without building a UUID object
    if _UUID_FORM.fullmatch(text):
        return str(uuid.UUID(text))
    return None


def normalise_user_id(text: str) -> str | None:
    """The form user ids are compared in, or None for a text that is no user id.

    A UUID in a usual spelling becomes canonical lower case; any other id is kept
    exactly as is (case and all). None for an empty text, one over
    :data:`MAX_USER_ID_CHARS` characters, one with leading or trailing whitespace, or
    one with a character that is not printable (control, format, line separators,
    non-ASCII spaces): such an id never names a connection. Nothing is stripped: a
    padded id is a different id, and the sender's mistake, on either side.
    """
    if not text or len(text) > MAX_USER_ID_CHARS:
        return None
    if not text.isprintable() or text[0] == " " or text[-1] == " ":
        # str.isprintable() is false for every whitespace but the ASCII space.
        return None
    return as_uuid(text) or text


def created_time(timestamp_ms: int, now_ms: int) -> int:
    """The ``created_ms`` of a notification from its Kafka record timestamp.

    The record's timestamp when it lies in ``1 .. now_ms``; ``now_ms`` (the time the
    record is consumed) otherwise: for -1 (Kafka's "no timestamp"), zero, any
    negative value, and any time in the future, year 10000 and beyond included. A
    future timestamp is clamped, not kept, so it can neither outlive ``BACKLOG_TTL``
    in the store nor sort after notifications made later; producer clocks a little
    ahead lose nothing but those few milliseconds.
    """
    if 0 < timestamp_ms <= now_ms:
        return timestamp_ms
    return now_ms


def parse(value: bytes | None, timestamp_ms: int, now_ms: int | None = None) -> Notification | Skip:
    """Validate a Kafka record value.

    Returns a :class:`Notification` for a ``push`` message, :class:`Skip` for any
    other delivery method. ``timestamp_ms`` is the record's timestamp and ``now_ms``
    the time of consumption (default: the clock); the notification's ``created_ms``
    is :func:`created_time` of the two, so a negative, zero, future or
    unrepresentable (past year 9999) timestamp is never an error: the notification
    counts as made when it was consumed. ``now_ms`` is itself clamped to
    :data:`MAX_TIMESTAMP_MS`.

    Raises:
        PoisonMessage: the value is null, not UTF-8 JSON, not an object, over 64 KiB,
            a field is missing or has the wrong type, the ``message_id`` is no UUID,
            or the ``user_id`` is one :func:`normalise_user_id` refuses
            (``invalid_user_id``).
    """
    if value is None:
        raise PoisonMessage("empty_value")
    if len(value) > MAX_VALUE_BYTES:
        raise PoisonMessage("too_large", f"{len(value)} bytes > {MAX_VALUE_BYTES}")
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        # orjson rejects invalid UTF-8 and nesting deeper than 1024 levels.
        raise PoisonMessage("invalid_json", str(exc)[:200]) from None
    if not isinstance(document, dict):
        raise PoisonMessage("not_an_object", type(document).__name__)

    # The common record: the five fields are strings and no string can hold a NUL
    # (JSON spells one ``\\u0000``; a raw NUL is invalid JSON). Then they are read at
    # once; otherwise one by one, each check saying which field is wrong and why, in
    # the order below (the first fault found is the one reported).
    get: Callable[[str], Any] = document.get
    method, raw_id, raw_user_id = get("delivery_method"), get("message_id"), get("user_id")
    title, body = get("subject"), get("content")
    checked = not (
        type(method) is str
        and type(raw_id) is str
        and type(raw_user_id) is str
        and type(title) is str
        and type(body) is str
        and _NUL_ESCAPE not in value
    )

    if checked:
        method = _string(document, "delivery_method")
    if method != PUSH:
        return Skip(method)

    if checked:
        raw_id = _string(document, "message_id")
    message_id = as_uuid(raw_id)
    if message_id is None:
        raise PoisonMessage("invalid_message_id", "not a UUID")

    if checked:
        raw_user_id = _string(document, "user_id")
    user_id = normalise_user_id(raw_user_id)
    if user_id is None:
        raise PoisonMessage("invalid_user_id", _why_not_a_user_id(raw_user_id))

    if checked:
        title, body = _string(document, "subject"), _string(document, "content")
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    return Notification.build(
        message_id,
        user_id,
        title,
        body,
        created_time(timestamp_ms, min(now_ms, MAX_TIMESTAMP_MS)),
    )


def _why_not_a_user_id(text: str) -> str:
    if not text:
        return "empty"
    if len(text) > MAX_USER_ID_CHARS:
        return f"longer than {MAX_USER_ID_CHARS} characters"
    if text.strip() != text:
        return "leading or trailing whitespace"
    return "a character that is not printable"


def _string(document: dict[str, Any], key: str) -> str:
    if key not in document:
        raise PoisonMessage(f"missing_{key}")
    value = document[key]
    if not isinstance(value, str):
        raise PoisonMessage(f"invalid_{key}", f"expected a string, got {type(value).__name__}")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL: such a value could never be stored.
        raise PoisonMessage(f"invalid_{key}", "contains a NUL character")
    return value
