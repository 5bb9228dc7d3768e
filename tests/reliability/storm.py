"""Many WebSocket handshakes with bad tokens, from a process of its own.

``python -m tests.reliability.storm --port P --count N --concurrency C`` opens N
handshakes to the gateway on 127.0.0.1:P, at most C at a time, each with a token of
its own that no auth service accepts, reads the gateway's answer (the close code
after the upgrade, or the HTTP status) and prints how many ended which way as one
JSON object. A process of its own, so the test's clients do not share an event loop
(or a core) with the storm they are measured in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time
import uuid
from collections import Counter

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


async def handshake(
    port: int, token: str, *, padding: int = 0, local: str | None = None, timeout: float = 15.0
) -> str:
    """One handshake; how it ended: a close code ("4401"), "http <status>", or an error."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(local, 0) if local else None
            )
            try:
                pad = f"X-Padding: {'p' * padding}\r\n" if padding else ""
                writer.write(
                    (
                        f"GET /api/v1/notify/ws?token={token} HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                        f"Sec-WebSocket-Version: 13\r\n{pad}\r\n"
                    ).encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1].decode()
                if status != "101":
                    return f"http {status}"
                first, length = await reader.readexactly(2)
                if first & 0x0F != 0x8:
                    return "open"  # a frame other than close: the token was taken
                payload = await reader.readexactly(length & 0x7F)
                return str(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else "1005"
            finally:
                writer.close()
    except TimeoutError:
        return "timeout"
    except (OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__


async def storm(
    port: int,
    count: int,
    concurrency: int,
    *,
    padding: int = 0,
    local: str | None = None,
    budget: float = 600.0,
) -> dict[str, object]:
    """``count`` handshakes, ``concurrency`` at a time; outcomes counted, and the seconds."""
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    prefix = uuid.uuid4().hex[:8]
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() - started < budget:
            index, next_index = next_index, next_index + 1
            token = f"bad-{prefix}-{index}-{uuid.uuid4().hex}"
            outcomes[await handshake(port, token, padding=padding, local=local)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"outcomes": dict(outcomes), "seconds": round(time.monotonic() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--padding", type=int, default=0, help="bytes of one extra header")
    parser.add_argument("--local", default=None, help="source address, e.g. 127.0.0.3")
    args = parser.parse_args()
    result = asyncio.run(
        storm(args.port, args.count, args.concurrency, padding=args.padding, local=args.local)
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
