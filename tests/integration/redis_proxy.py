"""A TCP proxy in front of Redis for tests: slow to connect, or going silent on demand."""

from __future__ import annotations

from service.resp import Address
from tests.support.proxy import TcpProxy


class RedisProxy:
    """:class:`TcpProxy` in front of the Redis at ``redis_url``, spoken to in Redis URLs.

    ``connect_delay`` holds each new connection that long before it reaches Redis (a
    Redis far away). ``freeze()`` makes the open connections drop their bytes without
    closing them (half-open, as behind a NAT that forgot them); new ones still work.
    ``hold()`` keeps Redis's replies back (commands still reach Redis) until
    ``release()`` hands them on: a reply that is late, not lost.
    ``close()`` is idempotent and does not wait.
    """

    def __init__(self, redis_url: str, connect_delay: float = 0.0) -> None:
        upstream = Address.parse(redis_url)
        self.proxy = TcpProxy(upstream.port, host=upstream.host, connect_delay=connect_delay)

    async def start(self) -> str:
        """Listen on a free loopback port; returns the URL to give the gateway."""
        await self.proxy.up()
        return f"redis://{self.proxy.address}/0"

    def freeze(self) -> None:
        self.proxy.freeze()

    def hold(self) -> None:
        self.proxy.hold()

    def release(self) -> None:
        self.proxy.release()

    def close(self) -> None:
        self.proxy.cut()
