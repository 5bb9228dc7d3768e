"""A TCP proxy in front of Redis for tests: slow to connect, slow to answer, or going silent."""

from __future__ import annotations

import asyncio
import contextlib

from service.resp import Address


class RedisProxy:
    """Forwards loopback connections to Redis; ``close()`` is idempotent.

    ``connect_delay`` holds each new connection that long before it reaches Redis (a
    Redis far away). ``freeze()`` makes the open connections drop their bytes without
    closing them (half-open, as behind a NAT that forgot them); new ones still work.
    ``hold()`` keeps Redis's replies back (commands still reach Redis) until
    ``release()`` hands them on: a reply that is late, not lost.
    """

    def __init__(self, redis_url: str, connect_delay: float = 0.0) -> None:
        self.upstream = Address.parse(redis_url)
        self.connect_delay = connect_delay
        self.frozen: set[asyncio.StreamWriter] = set()
        self.open: set[asyncio.StreamWriter] = set()
        self.held: dict[asyncio.StreamWriter, list[bytes]] | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen on a free loopback port; returns the URL to give the gateway."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    def freeze(self) -> None:
        self.frozen |= self.open

    def hold(self) -> None:
        self.held = {}

    def release(self) -> None:
        held, self.held = self.held or {}, None
        for writer, chunks in held.items():
            writer.write(b"".join(chunks))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.open:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.connect_delay)
        up_reader, up_writer = await asyncio.open_connection(self.upstream.host, self.upstream.port)
        self.open |= {writer, up_writer}

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if sink in self.frozen:
                        continue
                    if replies and self.held is not None:
                        self.held.setdefault(sink, []).append(data)
                    else:
                        sink.write(data)
            sink.close()  # one side ended: so does the other

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
