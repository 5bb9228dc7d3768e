"""A closed socket's objects are freed by reference counting, not left to the cyclic GC.

The node runs full collections rarely (``_tune_gc``), so whatever a closed socket
leaves in reference cycles stays in memory for minutes: a flood of refused
handshakes once grew the gateway by 10-16 KB each. Here the gateway's Sanic app
class on 127.0.0.1 refuses or serves real clients with the garbage collector
disabled: the socket, its parser and the request of each must be freed all the same.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from sanic import Request, Sanic
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from service.app import WS_PATH, _Gateway, _reject
from service.closecode import CloseCode
from service.metrics import Metrics
from service.notification import text_frame
from service.wire import Sockets, WireSocket

from .fakes import until


class Server:
    """The gateway's app class and close path; weak references to what it served."""

    def __init__(self) -> None:
        self.app: Sanic[Any, Any] = _Gateway("socket_memory", configure_logging=False)
        self.app.config.update({"ACCESS_LOG": False, "MOTD": False})
        self.app.ctx.sockets = Sockets(
            write_timeout=10.0, ping_interval=None, ping_timeout=None, max_size=4096
        )
        self.refs: list[weakref.ref[Any]] = []
        self.port = 0
        node: Any = SimpleNamespace(metrics=Metrics())

        @self.app.websocket(WS_PATH)  # type: ignore[untyped-decorator]
        async def notify(request: Request, ws: WireSocket) -> None:
            self.refs += [weakref.ref(ws), weakref.ref(ws._parser), weakref.ref(request)]
            if request.args.get("token") == "bad":
                await _reject(node, ws, CloseCode.UNAUTHORIZED, "invalid token", "invalid_token")
                return
            assert ws.send_now(text_frame(b"hello"))
            # Registered, the handler returns and the socket lives on by itself.

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


@pytest.fixture
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[Server]:
    # One app for the module: Sanic rewrites its own methods the first time an app
    # starts, and a second app in the same process fails to.
    served = Server()
    asyncio_server = await served.app.create_server(
        host="127.0.0.1", port=0, return_asyncio_server=True
    )
    assert asyncio_server is not None
    await asyncio_server.startup()  # type: ignore[no-untyped-call]
    await asyncio_server.start_serving()  # type: ignore[no-untyped-call]
    assert asyncio_server.server is not None
    served.port = asyncio_server.server.sockets[0].getsockname()[1]
    yield served
    asyncio_server.close()
    await asyncio_server.wait_closed()


@pytest.fixture
def server(running: Server, gc_off: None) -> Server:
    running.refs.clear()
    return running


async def test_a_refused_socket_is_freed_without_the_cyclic_gc(server: Server) -> None:
    """A socket refused with 4401 leaves nothing behind once it is closed."""
    for _ in range(3):
        async with connect(f"ws://127.0.0.1:{server.port}{WS_PATH}?token=bad") as client:
            with pytest.raises(ConnectionClosed):
                await client.recv()
        assert client.close_code == CloseCode.UNAUTHORIZED
    assert len(server.refs) == 9
    await until(lambda: server.alive() == 0, 10.0)


async def test_a_socket_the_client_closed_is_freed_without_the_cyclic_gc(server: Server) -> None:
    """A served socket the client closed leaves nothing behind."""
    for _ in range(3):
        async with connect(f"ws://127.0.0.1:{server.port}{WS_PATH}?token=good") as client:
            assert await client.recv() == "hello"
            await client.send("ignored")
    assert len(server.refs) == 9
    await until(lambda: server.alive() == 0, 10.0)


async def test_frames_sent_right_behind_the_request_head_are_not_lost(running: Server) -> None:
    """A client that sends a ping in the same write as its upgrade request gets its pong."""
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    ping = Frame(Opcode.PING, b"early").serialize(mask=True)
    writer.write(
        (
            f"GET {WS_PATH}?token=good HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        + ping
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
        frames: list[Frame] = []
        while len(frames) < 2:
            client.receive_data(await asyncio.wait_for(reader.read(4096), 5))
            frames += [e for e in client.events_received() if isinstance(e, Frame)]
        # The early ping is answered as the socket is taken over, before the handler runs.
        assert [(f.opcode, bytes(f.data)) for f in frames] == [
            (Opcode.PONG, b"early"),
            (Opcode.TEXT, b"hello"),
        ]
    finally:
        writer.close()
