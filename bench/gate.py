"""A TCP gate in front of Kafka's bootstrap address: holds connections until opened."""

from __future__ import annotations

import asyncio

from bench.processes import HOST, free_port


class Gate:
    """Holds the gateway's Kafka bootstrap connection until :meth:`open`.

    The gateway's consumer connects and sends its first metadata request, which waits
    here (well inside aiokafka's 40 s request timeout, or it retries) until ``open()``;
    then bytes flow both ways. Only the bootstrap connection goes through the gate
    (Kafka then hands out its own advertised address), so it holds back the gateway's
    consumer without sitting on the data path. So K messages produced *before* the
    consumer starts can be drained once every client is connected: Kafka to socket.
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.split(",")[0].rpartition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.opened = asyncio.Event()
        self.held = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, HOST, self.port)

    async def open(self) -> None:
        self.opened.set()

    async def close(self) -> None:
        """Let anything held through and stop listening; safe to call twice."""
        self.opened.set()
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held += 1
        try:
            await asyncio.wait_for(self.opened.wait(), 900)
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError):
            writer.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
