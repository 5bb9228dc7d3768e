"""The close codes of the wire contract: one place says what each means to a client.

Every close the gateway sends uses a :class:`CloseCode`; ``docs/protocol.md``
("Close codes") is the same table for client authors, and a unit test keeps the
two equal. A client decides on the code alone: the reason is a short English
phrase for people reading logs, never a secret (no token reaches it).
"""

from __future__ import annotations

from enum import Enum, IntEnum


class Retry(Enum):
    """What a client does after a close."""

    RECONNECT = "reconnect with exponential backoff and jitter"
    REFRESH = "get a new token, then reconnect; never retry the same token"
    LATER = "reconnect only after a longer wait (tens of seconds)"
    STOP = "do not reconnect: retrying cannot succeed"


class CloseCode(IntEnum):
    """A WebSocket close code the gateway sends, with its reason phrase and client advice.

    A member is an ``int`` (the code on the wire); ``reason`` is the phrase sent
    with it unless a close names a more precise one; ``retry`` is what the client
    should do next.
    """

    reason: str
    retry: Retry

    def __new__(cls, code: int, reason: str, retry: Retry) -> CloseCode:
        member = int.__new__(cls, code)
        member._value_ = code
        member.reason = reason
        member.retry = retry
        return member

    NORMAL_CLOSURE = 1000, "normal closure", Retry.RECONNECT
    GOING_AWAY = 1001, "server shutting down", Retry.RECONNECT
    POLICY_VIOLATION = 1008, "policy violation", Retry.RECONNECT
    # Sent by Sanic (websockets) itself for a client frame over MAX_CLIENT_FRAME.
    MESSAGE_TOO_BIG = 1009, "frame too large", Retry.RECONNECT
    INTERNAL_ERROR = 1011, "internal error", Retry.RECONNECT
    TRY_AGAIN_LATER = 1013, "too slow to keep up", Retry.RECONNECT
    UNAUTHORIZED = 4401, "invalid token", Retry.REFRESH
    FORBIDDEN = 4403, "origin not allowed", Retry.STOP
    TOO_MANY = 4429, "too many connections", Retry.LATER
    UNAVAILABLE = 4503, "service unavailable, retry later", Retry.RECONNECT
