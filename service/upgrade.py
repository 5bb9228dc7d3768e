"""The answer to a WebSocket upgrade request that is plainly valid, built without websockets.

websockets' ``ServerProtocol.accept`` checks a request and builds its answer through
a ``Headers`` copy of the request's headers, a ``Response`` object and a ``Date``
formatted for each response: about a fifth of a cached handshake's CPU. Nearly every
request a gateway sees is a plain RFC 6455 one, so :func:`accept_head` answers those
itself, with the same checks, and a response head written from a template:

* the method is ``GET`` and the version ``HTTP/1.1``;
* ``Connection`` (one header) lists ``upgrade`` and ``Upgrade`` (one header) is exactly
  ``websocket``, in any case;
* one ``Sec-WebSocket-Key``, the base64 of 16 bytes, and one ``Sec-WebSocket-Version``,
  ``13``;
* at most one ``Origin``; ``Sec-WebSocket-Protocol``, if any, a list of tokens.

Anything else, or anything it is not sure of (several headers of a kind, quoted or
empty list items, a key that does not decode), is not answered here: it returns None,
and the request goes through websockets' ``accept``, whose answers (400, 405, 426,
505) are the gateway's for every request that is not plainly valid. So this is a
shortcut, never a second opinion: what it answers, websockets would have answered
the same (tests/unit/test_upgrade.py checks that against websockets itself).

Extensions offered by the client are ignored, as websockets ignores them when the
server enables none. Nothing here does I/O; ``Date`` is formatted once a second.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
import time
from collections.abc import Sequence
from typing import Final, Protocol

# RFC 6455, section 1.3.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# RFC 7230 token: what a Connection option or a subprotocol name may be.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class RequestHeaders(Protocol):
    """The request's headers, as Sanic keeps them (case-insensitive, several values)."""

    def getall(self, key: str, default: list[str]) -> list[str]: ...


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key``: base64 of the SHA-1 of the key and the GUID."""
    # SHA-1 because RFC 6455 says so; it protects nothing here.
    digest = hashlib.sha1(key.encode() + _GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


def _tokens(value: str) -> list[str] | None:
    """The comma-separated tokens of ``value``; None if any item is not a plain token."""
    items = [item.strip(" \t") for item in value.split(",")]
    if not all(_TOKEN.fullmatch(item) for item in items):
        return None
    return items


def offered_subprotocols(headers: RequestHeaders) -> list[str] | None:
    """The subprotocols the client offers (``[]``: none); None if the header is not plain."""
    offered: list[str] = []
    for value in headers.getall("sec-websocket-protocol", []):
        names = _tokens(value)
        if names is None:
            return None
        offered += names
    return offered


class _Date:
    """The ``Date`` header's value, formatted once per second of the clock."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._value = email.utils.formatdate(second, usegmt=True).encode()
            self._second = second
        return self._value


_date = _Date()


def accept_head(
    method: str, version: str, headers: RequestHeaders, subprotocol: str | None
) -> bytes | None:
    """The complete 101 head for a plainly valid upgrade request, else None.

    ``version`` is the request's HTTP version as Sanic gives it (``"1.1"``);
    ``subprotocol`` the one selected (named in the answer), or None. None means
    "let websockets answer": the request is invalid, or not plainly valid (see the
    module docstring). Never raises for any header values.
    """
    if method != "GET" or version != "1.1":
        return None
    connection = headers.getall("connection", [])
    upgrade = headers.getall("upgrade", [])
    if len(connection) != 1 or len(upgrade) != 1:
        return None
    options = _tokens(connection[0])
    if options is None or not any(option.lower() == "upgrade" for option in options):
        return None
    if upgrade[0].strip(" \t").lower() != "websocket":
        return None
    keys = headers.getall("sec-websocket-key", [])
    versions = headers.getall("sec-websocket-version", [])
    if len(keys) != 1 or versions != ["13"] or len(headers.getall("origin", [])) > 1:
        return None
    key = keys[0]
    if len(key) != 24 or not key.isascii():
        return None
    try:
        raw_key = base64.b64decode(key.encode(), validate=True)
    except binascii.Error:
        return None
    if len(raw_key) != 16:
        return None
    protocol = (
        b"" if subprotocol is None else b"Sec-WebSocket-Protocol: %s\r\n" % subprotocol.encode()
    )
    return b"".join(
        (
            b"HTTP/1.1 101 Switching Protocols\r\nDate: ",
            _date.now(),
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
            accept_key(key).encode(),
            b"\r\n",
            protocol,
            b"\r\n",
        )
    )


def select_subprotocol(available: Sequence[str], offered: Sequence[str]) -> str | None:
    """The first of ``available`` (the server's order) that the client offered, or None."""
    for name in available:
        if name in offered:
            return name
    return None
