"""A loopback TCP proxy that can go down, freeze, or hold new connections back."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards loopback connections to ``host:target_port``, and fails on demand.

    - ``down()``: stop listening and cut every open connection (an outage: the
      peer's keep-alive connections do not survive it); ``up()`` listens again on
      the same port.
    - ``freeze()``: the open connections drop every byte without closing
      (half-open, as behind a NAT that forgot them); new ones still work.
    - ``connect_delay``: each new connection waits that long before it reaches
      the target (a service far away).
    - ``hold()``: the target's answers wait in the proxy (requests still reach it)
      until ``release()`` hands them on: an answer that is late, not lost.

    When one side of a connection ends, the proxy ends the other. Runs on the
    event loop of whoever calls ``up()``; not thread-safe. ``close()`` is
    ``down()`` and is idempotent.
    """

    def __init__(
        self, target_port: int, *, host: str = "127.0.0.1", connect_delay: float = 0.0
    ) -> None:
        self.host = host
        self.target_port = target_port
        self.connect_delay = connect_delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._frozen: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._held: dict[asyncio.StreamWriter, list[bytes]] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, where clients connect (valid once ``up()`` returned)."""
        return f"127.0.0.1:{self.port}"

    async def up(self) -> None:
        """Listen (the first time on a free port, then on the same one). Idempotent."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Stop listening and abort every open connection, without waiting. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def down(self) -> None:
        """:meth:`cut`, then wait until the listening socket is closed. Idempotent."""
        server = self._server
        self.cut()
        if server is not None:
            await server.wait_closed()

    close = down

    def freeze(self) -> None:
        """Make the connections open now swallow their bytes from here on."""
        self._frozen |= self._open

    def hold(self) -> None:
        """Keep the target's answers back from here on, until :meth:`release`."""
        self._held = {}

    def release(self) -> None:
        """Hand on every answer held back, in order, and stop holding."""
        held, self._held = self._held or {}, None
        for writer, chunks in held.items():
            writer.write(b"".join(chunks))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.connect_delay)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self._open |= pair
        self._clients.add(writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    if sink in self._frozen:
                        continue
                    if self._held is not None and sink in self._clients:
                        self._held.setdefault(sink, []).append(data)
                        continue
                    sink.write(data)
                    await sink.drain()
            sink.close()  # one side ended: so does the other, once its bytes are out

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._open -= pair
        self._frozen -= pair
        self._clients.discard(writer)
