"""The socket guard: reading pauses with writing, and a socket stalled too long is cut off.

Driven with a fake transport and a fake Sanic protocol: the guard is installed
between them as it is between uvloop's transport and Sanic's protocol.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from service.guard import SocketGuard

from .fakes import until

LIMIT = 0.05  # WRITE_TIMEOUT of these tests, in seconds


class FakeTransport(asyncio.Transport):
    """A transport that records reading, writes and how it ended, with a settable buffer."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.reading = True
        self.buffered = 0
        self.closing = False
        self.aborted = False
        self.written: list[bytes] = []

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return 16384, 65536

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


class FakeSanicProtocol(asyncio.Protocol):
    """Sanic's protocol as the guard sees it: what reached it, and its ``transport``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []
        self.can_write = True
        self.lost = False
        self.answered: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        # Like Sanic: parse now, answer in a task that runs later.
        self.received.append(data)

        async def answer() -> None:
            self.answered.append(data)

        asyncio.get_running_loop().create_task(answer())

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@pytest.fixture
def sanic() -> FakeSanicProtocol:
    return FakeSanicProtocol()


@pytest.fixture
def transport(sanic: FakeSanicProtocol) -> FakeTransport:
    sanic.transport = FakeTransport(sanic)
    return sanic.transport


def websocket(sanic: FakeSanicProtocol) -> Any:
    return SimpleNamespace(io_proto=sanic)


@pytest.fixture
async def guard(sanic: FakeSanicProtocol, transport: FakeTransport) -> SocketGuard:
    installed = SocketGuard.install(websocket(sanic), LIMIT)
    assert installed is not None
    return installed


async def test_install_stands_between_the_transport_and_sanic(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """The transport calls the guard; Sanic writes through the guard's view to the same socket."""
    assert transport.protocol is guard
    assert sanic.transport is not transport
    assert SocketGuard.of(websocket(sanic)) is guard
    assert SocketGuard.install(websocket(sanic), LIMIT) is None  # once only
    assert sanic.transport is not None
    sanic.transport.write(b"pong")
    assert transport.written == [b"pong"]


async def test_install_on_a_closing_socket_changes_nothing(
    sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """A socket already closing is left as it is."""
    transport.closing = True
    assert SocketGuard.install(websocket(sanic), LIMIT) is None
    assert transport.protocol is sanic


async def test_reading_pauses_while_writing_is_paused(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """A full write buffer stops reading (Sanic is told too); a drained one reads again."""
    guard.pause_writing()
    assert not transport.reading
    assert not sanic.can_write
    guard.resume_writing()
    assert transport.reading
    assert sanic.can_write


async def test_sanic_cannot_resume_reading_while_writing_is_paused(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """Sanic's frame assembler resuming reading does not undo the pause for a full buffer."""
    assert sanic.transport is not None
    guard.pause_writing()
    sanic.transport.resume_reading()
    assert not transport.reading
    guard.resume_writing()
    assert transport.reading


async def test_a_drained_buffer_does_not_resume_reading_sanic_paused(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """Reading Sanic paused (no one waits for a message) stays paused until Sanic resumes it."""
    assert sanic.transport is not None
    sanic.transport.pause_reading()
    guard.pause_writing()
    guard.resume_writing()
    assert not transport.reading
    sanic.transport.resume_reading()
    assert transport.reading


async def test_no_more_is_read_until_sanic_handled_the_last_read(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """After a read, reading waits until the task Sanic made for it has run: no pile-up."""
    guard.data_received(b"ping")
    assert sanic.received == [b"ping"]
    assert not transport.reading
    assert sanic.answered == []
    await asyncio.sleep(0)
    assert sanic.answered == [b"ping"]
    assert transport.reading


async def test_a_read_handled_while_writing_is_paused_does_not_resume_reading(
    guard: SocketGuard, transport: FakeTransport
) -> None:
    """The answer to a read filled the buffer: reading stays paused once the read is handled."""
    guard.data_received(b"ping")
    guard.pause_writing()
    await asyncio.sleep(0)
    assert not transport.reading


async def test_a_large_read_reaches_sanic_a_slice_per_turn_of_the_loop(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """A read of many frames is parsed a few KiB at a time: other sockets get their turns."""
    data = bytes(range(256)) * 100  # 25,600 bytes: seven slices
    guard.data_received(data)
    assert len(sanic.received) == 1
    turns = 0
    while not transport.reading:
        turns += 1
        assert turns < 100
        await asyncio.sleep(0)
    assert len(sanic.received) == 7
    assert turns >= 7
    assert b"".join(sanic.received) == data
    assert sanic.answered == sanic.received


async def test_the_rest_of_a_read_waits_while_writes_are_paused(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """No more of a read is parsed (no more pongs owed) until the socket has room again."""
    guard.data_received(b"x" * 10_000)
    guard.pause_writing()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(sanic.received) == 1
    guard.resume_writing()
    await until(lambda: transport.reading)
    assert b"".join(sanic.received) == b"x" * 10_000


async def test_the_rest_of_a_read_waits_while_sanic_holds_reading(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """Sanic pausing reading (a message no one fetched yet) also holds the rest of a read."""
    assert sanic.transport is not None
    guard.data_received(b"x" * 10_000)
    sanic.transport.pause_reading()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(sanic.received) == 1
    sanic.transport.resume_reading()
    await until(lambda: transport.reading)
    assert b"".join(sanic.received) == b"x" * 10_000


async def test_writes_paused_past_the_limit_cut_the_socket_off(
    guard: SocketGuard, transport: FakeTransport
) -> None:
    """A socket with no room for WRITE_TIMEOUT is told (on_stall) once, then aborted."""
    stalls: list[bool] = []
    guard.on_stall = lambda: stalls.append(transport.aborted)
    guard.pause_writing()
    guard.pause_writing()  # a second pause does not start a second clock
    await until(lambda: transport.aborted)
    await asyncio.sleep(LIMIT * 2)
    assert stalls == [False]  # once, before the abort


async def test_the_socket_is_aborted_even_if_on_stall_fails(
    guard: SocketGuard, transport: FakeTransport
) -> None:
    """A failing on_stall still leaves the socket cut off."""

    def broken() -> None:
        raise RuntimeError("on_stall failed")

    guard.on_stall = broken
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        guard.pause_writing()
        await until(lambda: transport.aborted)
    finally:
        loop.set_exception_handler(None)
    assert len(errors) == 1


async def test_writes_that_resume_in_time_keep_the_socket(
    sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """A buffer that drains before WRITE_TIMEOUT stops the clock; a new pause starts a new one."""
    guard = SocketGuard.install(websocket(sanic), 1.0)  # far above the pauses below
    assert guard is not None
    for _ in range(3):
        guard.pause_writing()
        await asyncio.sleep(LIMIT)
        guard.resume_writing()
    await asyncio.sleep(LIMIT)
    assert not transport.aborted
    guard.pause_writing()
    await until(lambda: transport.aborted, timeout=5.0)


async def test_a_lost_connection_stops_the_clock_and_reaches_sanic(
    guard: SocketGuard, sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """Once the connection is lost there is nothing to abort; Sanic hears of the loss."""
    guard.pause_writing()
    guard.connection_lost(None)
    await asyncio.sleep(LIMIT * 3)
    assert sanic.lost
    assert not transport.aborted


async def test_a_socket_already_full_when_guarded_is_paused_and_watched(
    sanic: FakeSanicProtocol, transport: FakeTransport
) -> None:
    """The guard installed on a socket over its high-water mark starts paused, clock running."""
    transport.buffered = 100_000
    guard = SocketGuard.install(websocket(sanic), LIMIT)
    assert guard is not None
    assert guard.writing_paused
    assert not transport.reading
    await until(lambda: transport.aborted)
