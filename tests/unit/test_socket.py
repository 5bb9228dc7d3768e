"""The Sanic socket adapter: the direct write, and closes that never wait on a silent peer.

A fake Sanic WebSocket drives the real websockets protocol object over the fake
transport of ``test_guard``.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from service import app
from service.app import SanicSocket, _reject
from service.guard import SocketGuard
from service.metrics import Metrics

from .test_guard import FakeSanicProtocol, FakeTransport

CLOSE_TIMEOUT = 0.05


class FakeWebsocket:
    """What SanicSocket uses of Sanic's WebSocket, over a fake transport."""

    def __init__(self) -> None:
        self.io_proto = FakeSanicProtocol()
        self.transport = FakeTransport(self.io_proto)
        self.io_proto.transport = self.transport
        self.ws_proto = ServerProtocol(state=State.OPEN)
        self.conn_mutex = asyncio.Lock()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait_for_connection_lost(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)
        except TimeoutError:
            return False
        return True

    def frames(self) -> list[Frame]:
        """The frames written to the transport, as the client would parse them."""
        client = _client_reader()
        client.receive_data(b"".join(self.transport.written))
        return [event for event in client.events_received() if isinstance(event, Frame)]


def _client_reader() -> ClientProtocol:
    return ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)


@pytest.fixture(autouse=True)
def short_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "CLOSE_TIMEOUT", CLOSE_TIMEOUT)


@pytest.fixture
async def ws() -> FakeWebsocket:
    return FakeWebsocket()


async def test_send_now_writes_to_the_real_transport_of_a_guarded_socket(
    ws: FakeWebsocket,
) -> None:
    """Frames skip the guard: the hot path is one direct write to the transport."""
    assert SocketGuard.install(ws, 1.0) is not None  # type: ignore[arg-type]
    socket = SanicSocket(ws)
    assert socket.send_now("hello")
    assert [f.data for f in ws.frames()] == [b"hello"]
    ws.transport.buffered = 100_000
    assert not socket.send_now("no room")
    assert socket.buffered() == 100_000


async def test_close_with_room_sends_the_frame_and_aborts_a_peer_that_never_answers(
    ws: FakeWebsocket,
) -> None:
    """The close frame is written; with no answer within CLOSE_TIMEOUT the socket is aborted."""
    started = time.monotonic()
    await asyncio.wait_for(SanicSocket(ws).close(4401, "invalid token"), 5.0)
    assert time.monotonic() - started >= CLOSE_TIMEOUT
    [frame] = ws.frames()
    assert Close.parse(frame.data) == Close(4401, "invalid token")
    assert ws.transport.aborted


async def test_close_answered_in_time_is_not_aborted(ws: FakeWebsocket) -> None:
    """A client that answers the close and leaves ends the close without an abort."""
    asyncio.get_running_loop().call_soon(ws.lost.set_result, None)
    await SanicSocket(ws).close(1001, "server shutting down")
    assert not ws.transport.aborted
    assert len(ws.frames()) == 1


async def test_close_without_room_aborts_at_once(ws: FakeWebsocket) -> None:
    """A socket whose buffer is full (a peer that does not read) is aborted, nothing written."""
    ws.transport.buffered = 100_000
    await asyncio.wait_for(SanicSocket(ws).close(4401, "invalid token"), CLOSE_TIMEOUT / 2)
    assert ws.transport.aborted
    assert ws.transport.written == []


async def test_close_does_not_wait_for_a_send_stuck_in_sanic(ws: FakeWebsocket) -> None:
    """Sanic's lock held by a paused send (a keepalive ping) does not hold the close."""
    async with ws.conn_mutex:
        await asyncio.wait_for(SanicSocket(ws).close(1001, "bye"), 5.0)
    assert ws.transport.aborted


async def test_close_twice_sends_one_frame(ws: FakeWebsocket) -> None:
    """Closing again does not write a second close frame."""
    socket = SanicSocket(ws)
    await socket.close(1001, "bye")
    ws.transport.aborted = ws.transport.closing = False
    await socket.close(1001, "bye")
    assert len(ws.frames()) == 1


async def test_reject_never_waits_on_a_client_that_does_not_read(ws: FakeWebsocket) -> None:
    """A refused client whose buffer is full is cut off at once, and the refusal counted."""
    ws.transport.buffered = 100_000
    node: Any = SimpleNamespace(metrics=Metrics())
    await asyncio.wait_for(_reject(node, ws, 4401, "invalid token", "invalid_token"), 1.0)
    assert ws.transport.aborted
    rejected = node.metrics.registry.get_sample_value(
        "notify_connections_rejected_total", {"reason": "invalid_token"}
    )
    assert rejected == 1
