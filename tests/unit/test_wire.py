"""The upgraded socket: prebuilt frames, pings and pongs, closes, limits and back-pressure.

Most tests drive a ``WireSocket`` over a fake transport with a real websockets
client protocol on the other side (what the client sends, what it would read);
the last ones run it on a real TCP connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from service import wire
from service.notification import text_frame
from service.wire import SocketClosed, Sockets, WireSocket

from .fakes import until

LIMIT = 0.05  # WRITE_TIMEOUT of these tests, in seconds


class FakeTransport(asyncio.Transport):
    """A transport that records reading, writes and how it ended, with a settable buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.reading = True
        self.buffered = 0
        self.closing = False
        self.aborted = False
        self.written: list[bytes] = []

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
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

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True
        protocol = self.protocol
        if isinstance(protocol, WireSocket):
            protocol.connection_lost(None)

    def lose(self) -> None:
        """The TCP connection ended (after a close: what the kernel would report)."""
        self.closing = True
        protocol = self.protocol
        if isinstance(protocol, WireSocket):
            protocol.connection_lost(None)


class Client:
    """The client's side: frames it sends (masked), frames it would read."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.protocol = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
        self._read = 0

    def send(self, frame: Frame) -> None:
        self.protocol.send_frame(frame)
        self._deliver()

    def _deliver(self) -> None:
        socket = self.transport.protocol
        assert isinstance(socket, WireSocket)
        for data in self.protocol.data_to_send():
            if data:
                socket.data_received(data)

    def frames(self) -> list[Frame]:
        """The frames the server wrote since the last call."""
        written = self.transport.written
        self.protocol.receive_data(b"".join(written[self._read :]))
        self._read = len(written)
        return [event for event in self.protocol.events_received() if isinstance(event, Frame)]

    def close_received(self) -> Close | None:
        for frame in self.frames():
            if frame.opcode is Opcode.CLOSE:
                return Close.parse(frame.data)
        return None


@pytest.fixture
async def sockets() -> Sockets:
    return Sockets(write_timeout=LIMIT, ping_interval=None, ping_timeout=None, max_size=1024)


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
async def socket(sockets: Sockets, transport: FakeTransport) -> WireSocket:
    return sockets.adopt(transport, sockets.parser(None))


@pytest.fixture
def client(transport: FakeTransport, socket: WireSocket) -> Client:
    return Client(transport)


@pytest.fixture(autouse=True)
def short_close_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "CLOSE_TIMEOUT", 0.05)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_prebuilt_frame_is_the_frame_websockets_writes(size: int) -> None:
    """text_frame gives websockets' own bytes for a server's text frame, at every length form."""
    payload = ("é" * size).encode()[:size]
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


async def test_a_prebuilt_frame_reaches_the_client_as_text(
    socket: WireSocket, client: Client
) -> None:
    """A frame written with send_now is read by a client as the text it carries."""
    assert socket.send_now(text_frame(b'{"title":"t","body":"b"}'))
    [frame] = client.frames()
    assert frame.opcode is Opcode.TEXT and frame.data == b'{"title":"t","body":"b"}'


async def test_a_client_ping_is_answered_with_its_pong(socket: WireSocket, client: Client) -> None:
    """A client's ping gets a pong with the same payload."""
    client.send(Frame(Opcode.PING, b"abcd"))
    [pong] = client.frames()
    assert pong.opcode is Opcode.PONG and pong.data == b"abcd"


async def test_a_fragmented_message_is_received_whole(socket: WireSocket, client: Client) -> None:
    """Fragments of a text message reach the reader as one decoded message."""
    socket.keep_messages()
    client.send(Frame(Opcode.TEXT, "hé".encode(), fin=False))
    client.send(Frame(Opcode.CONT, b"llo ", fin=False))
    client.send(Frame(Opcode.CONT, b"world"))
    await until(lambda: not socket._rest)
    assert await socket.recv() == "héllo world"


async def test_messages_are_dropped_unless_kept(socket: WireSocket, client: Client) -> None:
    """Without keep_messages, what the client sends is parsed and dropped."""
    client.send(Frame(Opcode.TEXT, b"ignored"))
    assert socket._inbox is None


async def test_an_oversized_message_closes_with_1009(socket: WireSocket, client: Client) -> None:
    """A message over max_size, even in fragments, is answered with close 1009."""
    client.send(Frame(Opcode.TEXT, b"x" * 600, fin=False))
    client.send(Frame(Opcode.CONT, b"x" * 600))
    close = client.close_received()
    assert close is not None and close.code == 1009
    assert socket.closed


async def test_bad_utf8_closes_with_1007(socket: WireSocket, client: Client) -> None:
    """A text message that is not UTF-8 is answered with close 1007."""
    client.send(Frame(Opcode.TEXT, b"\xff\xfe"))
    close = client.close_received()
    assert close is not None and close.code == 1007


async def test_the_client_closing_gets_its_answer_and_the_end_of_the_connection(
    socket: WireSocket, client: Client, transport: FakeTransport
) -> None:
    """A client's close is echoed and the server ends the TCP connection."""
    lost: list[bool] = []
    socket.on_lost = lambda: lost.append(True)
    socket.keep_messages()
    reader = asyncio.create_task(socket.recv())
    client.protocol.send_close(1000, "bye")
    client._deliver()
    close = client.close_received()
    assert close is not None and close.code == 1000
    assert transport.closing
    transport.lose()
    assert await reader is None
    assert lost == [True]


async def test_a_server_close_completes_when_the_client_answers(
    socket: WireSocket, client: Client, transport: FakeTransport
) -> None:
    """close(1001) sends the close frame and returns once the connection ends, not aborted."""
    closing = asyncio.create_task(socket.close(1001, "going away"))
    await until(lambda: bool(transport.written))
    close = client.close_received()
    assert close is not None and (close.code, close.reason) == (1001, "going away")
    client._deliver()  # the client's answer
    assert transport.closing
    transport.lose()
    await closing
    assert not transport.aborted


async def test_a_close_the_client_never_answers_is_aborted(
    socket: WireSocket, client: Client, transport: FakeTransport
) -> None:
    """close() waits CLOSE_TIMEOUT for a silent client, then aborts."""
    await socket.close(1001, "going away")
    assert transport.aborted
    await socket.close(1001, "going away")  # idempotent
    assert len([f for f in client.frames() if f.opcode is Opcode.CLOSE]) == 1


async def test_a_close_without_room_aborts_at_once(
    socket: WireSocket, transport: FakeTransport
) -> None:
    """A socket with a full buffer is not sent a close frame: it is aborted."""
    transport.buffered = wire.SEND_NOW_LIMIT + 1
    await socket.close(1001)
    assert transport.aborted and not transport.written


async def test_fail_sends_the_code_and_ends_the_connection(
    socket: WireSocket, client: Client, transport: FakeTransport
) -> None:
    """fail_connection(4401) writes the close frame, closes the transport, aborts it later."""
    socket.fail_connection(4401, "token expired")
    close = client.close_received()
    assert close is not None and close.code == 4401
    assert transport.closing and not transport.aborted
    await until(lambda: transport.aborted)


async def test_reading_and_sending_pause_while_writes_are_paused(
    socket: WireSocket, transport: FakeTransport
) -> None:
    """Paused writes pause reading and make send wait; resumed, both go on."""
    socket.pause_writing()
    assert not transport.reading
    transport.buffered = wire.SEND_NOW_LIMIT + 1
    assert not socket.send_now(b"frame")
    sending = asyncio.create_task(socket.send(b"frame"))
    await asyncio.sleep(0)
    assert not sending.done()
    transport.buffered = 0
    socket.resume_writing()
    await sending
    assert transport.written == [b"frame"] and transport.reading


async def test_a_read_waits_for_writes_to_resume(
    socket: WireSocket, client: Client, transport: FakeTransport
) -> None:
    """The rest of a read is not parsed while writes are paused."""
    pings = Frame(Opcode.PING, b"p").serialize(mask=True) * 2000  # > one slice
    socket.data_received(pings)
    socket.pause_writing()
    await asyncio.sleep(0.01)
    answered = len(client.frames())
    assert 0 < answered < 2000 and socket._rest
    socket.resume_writing()
    await until(lambda: not socket._rest)
    assert answered + len(client.frames()) == 2000


async def test_a_socket_with_no_room_for_the_write_timeout_is_cut_off(
    socket: WireSocket, transport: FakeTransport
) -> None:
    """Writes paused past write_timeout: on_stall runs, then the socket is aborted."""
    stalled: list[bool] = []
    socket.on_stall(lambda: stalled.append(True))
    sending = asyncio.create_task(socket.send(b"frame"))
    socket.pause_writing()
    await until(lambda: transport.aborted)
    assert stalled == [True]
    with pytest.raises(SocketClosed):
        await sending


async def test_writes_that_resume_in_time_keep_the_socket(
    socket: WireSocket, transport: FakeTransport
) -> None:
    """Writes paused shorter than write_timeout do not cut the socket off."""
    socket.pause_writing()
    socket.resume_writing()
    await asyncio.sleep(LIMIT * 2)
    assert not transport.aborted


async def test_an_extension_is_refused(sockets: Sockets, transport: FakeTransport) -> None:
    """A handshake with an extension cannot take prebuilt frames: adopt refuses it."""
    parser = sockets.parser(None)
    parser.extensions = [object()]  # type: ignore[list-item]
    with pytest.raises(ValueError):
        sockets.adopt(transport, parser)


async def test_shutdown_closes_every_socket_with_1001(
    sockets: Sockets, socket: WireSocket, client: Client
) -> None:
    """Sockets.close(1001) sends each open socket a 1001 close (bounded)."""
    await sockets.close(1001, "going away")
    close = client.close_received()
    assert close is not None and close.code == 1001
    assert len(sockets) == 0


async def test_a_ping_unanswered_fails_the_socket_and_an_answered_one_keeps_it() -> None:
    """One timer pings every socket; no pong within ping_timeout closes with 1011."""
    sockets = Sockets(write_timeout=1, ping_interval=0.02, ping_timeout=0.02, max_size=None)
    silent_transport, answering_transport = FakeTransport(), FakeTransport()
    silent = sockets.adopt(silent_transport, sockets.parser(None))
    answering = sockets.adopt(answering_transport, sockets.parser(None))
    silent_client, answering_client = Client(silent_transport), Client(answering_transport)
    sockets.start()
    pongs = 0
    try:
        for _ in range(200):
            for frame in answering_client.frames():
                if frame.opcode is Opcode.PING:
                    answering_client.send(Frame(Opcode.PONG, frame.data))
                    pongs += 1
            if silent.closed and pongs >= 3:
                break
            await asyncio.sleep(0.005)
        assert not answering.closed
    finally:
        await sockets.close(1000, "")
    close = silent_client.close_received()
    assert close is not None and close.code == 1011
    assert pongs >= 3


# --- on a real TCP connection -------------------------------------------------------------


async def test_on_a_real_connection_frames_pongs_and_close_go_both_ways() -> None:
    """Over TCP: a prebuilt frame arrives, a ping is answered, a client close ends it all."""
    sockets = Sockets(write_timeout=1, ping_interval=None, ping_timeout=None, max_size=1024)
    adopted: asyncio.Future[WireSocket] = asyncio.get_running_loop().create_future()

    class Upgraded(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            adopted.set_result(sockets.adopt(transport, sockets.parser(None)))

    server = await asyncio.get_running_loop().create_server(Upgraded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
    socket = await adopted
    lost = asyncio.get_running_loop().create_future()
    socket.on_lost = lambda: lost.set_result(None)

    async def read_frames(count: int) -> list[Frame]:
        frames: list[Frame] = []
        while len(frames) < count:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                client.receive_eof()
            else:
                client.receive_data(data)
            frames += [e for e in client.events_received() if isinstance(e, Frame)]
            if not data:
                break
        return frames

    try:
        assert socket.send_now(text_frame(b"hello"))
        client.send_ping(b"ping")
        writer.write(b"".join(client.data_to_send()))
        frames = await read_frames(2)
        assert [(f.opcode, f.data) for f in frames] == [
            (Opcode.TEXT, b"hello"),
            (Opcode.PONG, b"ping"),
        ]
        client.send_close(1000, "bye")
        writer.write(b"".join(client.data_to_send()))
        [close] = await read_frames(1)
        assert close.opcode is Opcode.CLOSE and Close.parse(close.data).code == 1000
        await asyncio.wait_for(lost, 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        server.close()


async def test_a_new_socket_is_first_pinged_a_round_later(
    sockets: Sockets, socket: WireSocket, client: Client
) -> None:
    """A round of pings passes over a socket opened since the last one (a client refused in
    its first seconds never sees a ping); the next round pings it."""
    sockets.ping_interval = 3600.0
    sockets.ping_timeout = 3600.0
    try:
        sockets._ping_all()
        assert client.frames() == []
        sockets._ping_all()
        [ping] = client.frames()
        assert ping.opcode is Opcode.PING
    finally:
        await sockets.close(1000, "")


async def test_a_round_of_pings_is_spread_over_half_the_interval() -> None:
    """A round pings a slice of the sockets at once and the others over the first half of
    the interval (each ping a write, each pong a read): every socket once a round."""
    sockets = Sockets(write_timeout=1, ping_interval=0.4, ping_timeout=3600.0, max_size=None)
    transports = [FakeTransport() for _ in range(wire._PING_SLICE * 2 + 10)]
    for transport in transports:
        sockets.adopt(transport, sockets.parser(None))

    def round_by_hand() -> None:
        sockets._ping_all()
        assert sockets._timer is not None
        sockets._timer.cancel()  # no next round: this test starts each one

    try:
        round_by_hand()  # the round that passes over new sockets
        await asyncio.sleep(0.3)
        assert not any(t.written for t in transports)
        round_by_hand()
        assert sum(1 for t in transports if t.written) == wire._PING_SLICE
        await asyncio.sleep(0.25)  # past half the interval
        assert all(len(t.written) == 1 for t in transports)
    finally:
        await sockets.close(1000, "")
