"""The notification as the gateway sees it, and the rules a Kafka value must obey.

``parse`` turns one Kafka record value into a :class:`Notification`, tells the
caller to skip it (not for this gateway), or raises :class:`PoisonMessage` with a
short machine-readable reason. It does no I/O and is safe to call from anywhere.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Final

import orjson

MAX_VALUE_BYTES: Final = 64 * 1024
MAX_USER_ID_CHARS: Final = 255
PUSH: Final = "push"


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


@dataclass(frozen=True, slots=True)
class Notification:
    """One push notification for one user.

    ``frame`` is the text frame sent to every connection of the user, encoded once.
    ``created_ms`` is the Kafka record timestamp (milliseconds since the epoch).
    """

    message_id: str
    user_id: str
    title: str
    body: str
    created_ms: int
    frame: str

    @classmethod
    def build(
        cls, message_id: str, user_id: str, title: str, body: str, created_ms: int
    ) -> Notification:
        """Make a notification and its frame ``{"title": ..., "body": ...}`` (UTF-8, unescaped)."""
        frame = orjson.dumps({"title": title, "body": body}).decode()
        return cls(message_id, user_id, title, body, created_ms, frame)


_UUID_FORM = re.compile(r"\{?[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}\}?")


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _as_uuid(text: str) -> str | None:
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


def canonical_user_id(user_id: str) -> str:
    """Return the form user ids are compared in: a UUID in canonical lower case, else as is."""
    return _as_uuid(user_id) or user_id


def parse(value: bytes | None, created_ms: int) -> Notification | Skip:
    """Validate a Kafka record value.

    Returns a :class:`Notification` for a ``push`` message, :class:`Skip` for any
    other delivery method.

    Raises:
        PoisonMessage: the value is not UTF-8 JSON, not an object, over 64 KiB, or
            a field is missing or has the wrong type.
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

    method = _string(document, "delivery_method")
    if method != PUSH:
        return Skip(method)

    raw_id = _string(document, "message_id")
    message_id = _as_uuid(raw_id)
    if message_id is None:
        raise PoisonMessage("invalid_message_id", "not a UUID")

    user_id = _string(document, "user_id")
    if not user_id.strip():
        raise PoisonMessage("invalid_user_id", "empty")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise PoisonMessage("invalid_user_id", f"longer than {MAX_USER_ID_CHARS} characters")

    return Notification.build(
        message_id,
        canonical_user_id(user_id),
        _string(document, "subject"),
        _string(document, "content"),
        created_ms,
    )


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
