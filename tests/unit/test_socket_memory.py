"""A closed socket's objects are freed by reference counting, not left to the cyclic GC.

The node runs full collections rarely (``_tune_gc``), so whatever a closed socket
leaves in reference cycles stays in memory for minutes: a flood of refused
handshakes grew the gateway by 10-16 KB each. Here a real Sanic server on
127.0.0.1 refuses or serves real clients with the garbage collector disabled: the
WebSocket and the request of each must be freed all the same.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from sanic import Request, Sanic, Websocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from service import guard as guard_module
from service.app import WS_PATH, _reject
from service.closecode import CloseCode
from service.guard import SocketGuard
from service.metrics import Metrics

from .fakes import until


class Server:
    """A Sanic app with the gateway's guard and close path; weak references to what it served."""

    def __init__(self) -> None:
        self.app: Sanic[Any, Any] = Sanic("socket_memory", configure_logging=False)
        self.app.config.update({"ACCESS_LOG": False, "MOTD": False})
        self.refs: list[weakref.ref[Any]] = []
        self.port = 0
        node: Any = SimpleNamespace(metrics=Metrics())

        @self.app.websocket(WS_PATH)  # type: ignore[untyped-decorator]
        async def notify(request: Request, ws: Websocket) -> None:
            SocketGuard.install(ws, 10.0)
            self.refs += [weakref.ref(ws), weakref.ref(request)]
            if request.args.get("token") == "bad":
                await _reject(node, ws, CloseCode.UNAUTHORIZED, "invalid token", "invalid_token")
                return
            await ws.send("hello")
            while await ws.recv() is not None:
                pass

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


@pytest.fixture
def gc_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(guard_module, "_UNLINK_AFTER", 0.05, raising=False)
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
    await asyncio_server.startup()
    await asyncio_server.start_serving()
    served.port = asyncio_server.server.sockets[0].getsockname()[1]
    yield served
    asyncio_server.close()
    await asyncio_server.wait_closed()


@pytest.fixture
def server(running: Server, gc_off: None) -> Server:
    running.refs.clear()
    return running


async def test_a_refused_socket_is_freed_without_the_cyclic_gc(server: Server) -> None:
    for _ in range(3):
        async with connect(f"ws://127.0.0.1:{server.port}{WS_PATH}?token=bad") as client:
            with pytest.raises(ConnectionClosed):
                await client.recv()
        assert client.close_code == CloseCode.UNAUTHORIZED
    assert len(server.refs) == 6
    await until(lambda: server.alive() == 0, 10.0)


async def test_a_socket_the_client_closed_is_freed_without_the_cyclic_gc(server: Server) -> None:
    for _ in range(3):
        async with connect(f"ws://127.0.0.1:{server.port}{WS_PATH}?token=good") as client:
            assert await client.recv() == "hello"
            await client.send("ignored")
    assert len(server.refs) == 6
    await until(lambda: server.alive() == 0, 10.0)
