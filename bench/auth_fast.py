"""A fast auth stand-in for the benchmark: ``GET /api/v1/users/me`` on raw asyncio (uvloop).

NOT the platform's auth service. The threaded ``dev/auth_server.py`` answers a few hundred
requests a second, which would make a connect storm measure the stand-in instead of the
gateway. This one speaks just enough HTTP/1.1 (keep-alive, no bodies) for the gateway's
pooled httpx client: it checks the HS256 signature and ``exp`` of the bearer token with
``hmac`` and answers ``200 {"id": <sub>}`` or ``401``. ``GET /count`` answers how many
token checks it has served (to tell cached from uncached storms).

Run: ``python -m bench.auth_fast --port 0`` prints ``{"port": N}`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from typing import Any

import uvloop

from bench import common

COUNT = {"checks": 0}


def _b64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def check(token: str, secret: bytes) -> str | None:
    """The token's ``sub`` if its HS256 signature and ``exp`` are good, else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    expected = hmac.new(secret, signing_input, hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(expected, _b64(parts[2])):
            return None
        claims = json.loads(_b64(parts[1]))
    except ValueError:
        return None
    if not isinstance(claims, dict) or claims.get("exp", 0) < time.time():
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) else None


def _response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class AuthProtocol(asyncio.Protocol):
    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 64 * 1024 and self.transport is not None:
                    self.transport.close()
                return
            head = self.buf[:end].decode("latin-1")
            self.buf = self.buf[end + 4 :]
            assert self.transport is not None
            self.transport.write(self.answer(head))

    def answer(self, head: str) -> bytes:
        lines = head.split("\r\n")
        path = lines[0].split(" ")[1] if " " in lines[0] else ""
        if path == "/count":
            return _response("200 OK", json.dumps(COUNT).encode())
        if path.split("?")[0] != "/api/v1/users/me":
            return _response("404 Not Found", b'{"detail":"not found"}')
        COUNT["checks"] += 1
        token = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization":
                scheme, _, rest = value.strip().partition(" ")
                if scheme.lower() == "bearer":
                    token = rest.strip()
        sub = check(token, self.secret) if token else None
        if sub is None:
            return _response("401 Unauthorized", b'{"detail":"Could not validate credentials"}')
        return _response("200 OK", json.dumps({"id": sub}).encode())


async def serve(host: str, port: int, secret: bytes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: AuthProtocol(secret), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"port": bound}) + "\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", default=common.BENCH_SECRET)
    args = parser.parse_args()
    common.raise_nofile()
    uvloop.run(serve(args.host, args.port, args.secret.encode()))


if __name__ == "__main__":
    main()
