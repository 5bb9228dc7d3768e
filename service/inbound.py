"""What a protocol v2 client may send: its frames, parsed with limits, and their rate.

``docs/protocol.md`` ("Client frames (v2)") is the contract. Nothing here does
I/O; everything is safe to call from anywhere on the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import orjson

from .notification import as_uuid

SUBPROTOCOL: Final = "notify.v2"
MAX_ACK_IDS: Final = 500
MAX_ACKED_PARAMETER_IDS: Final = 100


class BadFrame(ValueError):
    """A client frame that is not one of the protocol's: answered with ``bad_frame``."""


@dataclass(frozen=True, slots=True)
class Ack:
    """``{"type":"ack","ids":[...]}``: canonical, de-duplicated message ids, in order."""

    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refresh:
    """``{"type":"refresh","token":"..."}``. The token is a secret: never logged."""

    token: str

    def __repr__(self) -> str:
        return "Refresh(token=<hidden>)"


_CANONICAL_CHARS: Final = frozenset("0123456789abcdef-")


def _canonical(value: object) -> bool:
    """Whether ``value`` is a UUID in canonical form (lower-case hex, four dashes in place):
    the form the gateway writes, so the form of nearly every acknowledged id."""
    return (
        type(value) is str
        and len(value) == 36
        and value[8] == value[13] == value[18] == value[23] == "-"
        and value.count("-") == 4
        and _CANONICAL_CHARS.issuperset(value)
    )


def _ids(values: object, limit: int) -> tuple[str, ...]:
    if not isinstance(values, list) or not values or len(values) > limit:
        raise BadFrame(f"ids: a list of 1 to {limit} ids")
    if all(map(_canonical, values)):
        return tuple(dict.fromkeys(values))  # the common case: no UUID parsed, no copy made
    ids: dict[str, None] = {}
    for value in values:
        if not isinstance(value, str):
            raise BadFrame("ids: each id is a string")
        canonical = as_uuid(value)
        if canonical is None:
            raise BadFrame("ids: each id is a UUID")
        ids[canonical] = None
    return tuple(ids)


def parse_client_frame(text: str) -> Ack | Refresh:
    """One v2 text frame from the client.

    Raises:
        BadFrame: not a JSON object, an unknown ``type``, or fields of the wrong
            shape (no ids, more than :data:`MAX_ACK_IDS`, an id that is no UUID, an
            empty token). The message names the problem, never the frame's content.
    """
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadFrame("not JSON") from None
    if not isinstance(document, dict):
        raise BadFrame("not a JSON object")
    kind = document.get("type")
    if kind == "ack":
        return Ack(_ids(document.get("ids"), MAX_ACK_IDS))
    if kind == "refresh":
        token = document.get("token")
        if not isinstance(token, str) or not token:
            raise BadFrame("refresh: token is a non-empty string")
        return Refresh(token)
    raise BadFrame("unknown type")


def parse_acked_parameter(text: str) -> tuple[str, ...]:
    """The ``acked`` query parameter: comma-separated ids, at most 100.

    Raises:
        BadFrame: empty, more than :data:`MAX_ACKED_PARAMETER_IDS`, or an id that is
            no UUID (the connection is closed with 1008).
    """
    return _ids(text.split(",") if text else [], MAX_ACKED_PARAMETER_IDS)


class FrameRate:
    """A token bucket: ``rate`` client frames per second, bursts of ``burst``.

    ``allow()`` takes one token, or returns False when none is left. One per
    connection, used from its reader only.
    """

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, *, now: float | None = None) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = time.monotonic() if now is None else now

    def allow(self, now: float | None = None) -> bool:
        if now is None:
            now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
