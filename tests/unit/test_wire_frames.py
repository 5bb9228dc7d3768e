"""The socket's own path for a complete text frame gives what websockets' parser gives.

Each test sends the same bytes, cut into the same reads, to a ``WireSocket`` and to one
whose every byte goes through websockets' parser (the socket as it was before its own
path): the messages its listener gets, the bytes it writes back (pongs, closes) and
how it ends must be the same.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from service.wire import Sockets, WireSocket

from .test_wire import FakeTransport

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
# Payload lengths around the header's length forms, and around the size limits below.
EDGES = (0, 1, 2, 124, 125, 126, 127, 1008, 1009, 1010, 65535, 65536)


class ParserOnly(WireSocket):
    """The socket with every byte parsed by websockets, as before its own path.

    One byte at a time: each frame is taken the moment it is complete, in the order of
    the stream (given a whole read, websockets parses every frame of it before the first
    is taken, so a frame with bad UTF-8 would fail after a later frame's size had).
    """

    __slots__ = ()

    def _parse(self, data: bytes) -> None:
        for i in range(len(data)):
            self._to_parser(data[i : i + 1])


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bytes | None = b"\x00\x00\x00\x00",
    rsv: int = 0,
) -> bytes:
    """A client frame's bytes, masked with ``mask`` (None: unmasked)."""
    head = bytes(((0x80 if fin else 0) | rsv | opcode,))
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head += bytes((bit | n,))
    elif n < 65536:
        head += bytes((bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((bit | 127,)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    key = (mask * (n // 4 + 1))[:n]
    return head + mask + bytes(a ^ b for a, b in zip(payload, key, strict=True))


def text(rng: random.Random, n: int) -> bytes:
    """``n`` bytes of valid UTF-8 (a two-byte character where it fits, ASCII else)."""
    out = bytearray()
    while len(out) < n:
        out += "é".encode() if n - len(out) >= 2 and rng.random() < 0.2 else b"a"
    return bytes(out)


def random_stream(rng: random.Random, frames: int) -> bytes:
    """Client frames of every kind, in a random order that is mostly the protocol's."""
    out = bytearray()
    for _ in range(frames):
        mask = rng.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", os.urandom(4)])
        kind = rng.random()
        n = rng.choice(EDGES) if rng.random() < 0.3 else rng.randrange(0, 300)
        if kind < 0.5:
            out += frame(TEXT, text(rng, n), mask=mask)
        elif kind < 0.6:
            parts = rng.randrange(2, 5)
            for i in range(parts):
                out += frame(
                    TEXT if i == 0 else CONT,
                    text(rng, rng.randrange(0, 200)),
                    fin=i == parts - 1,
                    mask=mask,
                )
                if rng.random() < 0.5:  # control frames may come between fragments
                    out += frame(rng.choice([PING, PONG]), os.urandom(rng.randrange(0, 126)))
        elif kind < 0.75:
            out += frame(rng.choice([PING, PONG]), os.urandom(rng.randrange(0, 126)), mask=mask)
        elif kind < 0.8:
            out += frame(BINARY, os.urandom(n), mask=mask)
        elif kind < 0.83:
            out += frame(TEXT, b"ok \xff\xfe bad utf-8", mask=mask)
        elif kind < 0.85:
            out += frame(TEXT, b"unmasked", mask=None)
        elif kind < 0.87:
            out += frame(TEXT, b"reserved bit", rsv=0x40, mask=mask)
        elif kind < 0.89:
            out += frame(CONT, b"no message under way", mask=mask)
        elif kind < 0.9:
            out += frame(CLOSE, (1000).to_bytes(2, "big") + b"bye", mask=mask)
        else:
            out += frame(TEXT, text(rng, rng.randrange(0, 60)), mask=mask)
    return bytes(out)


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` in reads of random lengths: single bytes, a header's worth, or many KiB."""
    reads = []
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 7, 14, rng.randrange(1, 200), rng.randrange(1, 20_000)])
        reads.append(data[pos : pos + n])
        pos += n
    return reads


async def run(kind: type[WireSocket], max_size: int, reads: list[bytes]) -> tuple[object, ...]:
    """What a socket of ``kind`` makes of ``reads``: messages, bytes written, its end."""
    sockets = Sockets(write_timeout=5, ping_interval=None, ping_timeout=None, max_size=max_size)
    transport = FakeTransport()
    parser = sockets.parser(None)
    socket = kind(sockets, transport, parser)
    transport.set_protocol(socket)
    messages: list[str | bytes] = []
    socket.listen(messages.append)
    for data in reads:
        if transport.closing:
            break
        socket.data_received(data)
        while not transport.reading and not transport.closing:
            await asyncio.sleep(0)
    return messages, b"".join(transport.written), parser.state, parser.close_code


@pytest.mark.parametrize("max_size", [1009, 70_000])
@pytest.mark.parametrize("seed", range(40))
async def test_random_frames_in_random_reads_give_what_websockets_gives(
    seed: int, max_size: int
) -> None:
    """Any mix of frames, cut anywhere, gives the same messages, answers and end."""
    rng = random.Random(seed)
    reads = cut(rng, random_stream(rng, rng.randrange(1, 40)))
    assert await run(WireSocket, max_size, reads) == await run(ParserOnly, max_size, reads)


@pytest.mark.parametrize("n", EDGES)
@pytest.mark.parametrize("read", [1, 5, 4096, 100_000])
async def test_text_frames_of_edge_lengths_arrive_whole_and_in_order(n: int, read: int) -> None:
    """Text frames of 125/126/65535/65536 bytes and about, with pings between, read a few
    bytes at a time or all at once, arrive as websockets' parser gives them."""
    rng = random.Random(n)
    stream = b"".join(
        frame(TEXT, text(rng, n), mask=os.urandom(4)) + frame(PING, b"p%d" % i) for i in range(3)
    )
    reads = [stream[i : i + read] for i in range(0, len(stream), read)]
    for max_size in (1009, 70_000):
        got = await run(WireSocket, max_size, reads)
        assert got == await run(ParserOnly, max_size, reads)
        if n <= max_size:
            assert len(got[0]) == 3  # type: ignore[arg-type]


async def test_acks_behind_a_ping_and_a_fragment_keep_their_order() -> None:
    """A message in fragments between two whole ones is given between them."""
    stream = (
        frame(TEXT, b"one", mask=b"abcd")
        + frame(PING, b"x")
        + frame(TEXT, b"tw", fin=False)
        + frame(PONG, b"y")
        + frame(CONT, b"o")
        + frame(TEXT, b"three", mask=b"\x01\x02\x03\x04")
    )
    messages, written, _, _ = await run(WireSocket, 1009, [stream])
    assert messages == ["one", "two", "three"]
    assert written == b"\x8a\x01x"  # the pong for the ping


def listened() -> tuple[WireSocket, FakeTransport, list[str | bytes]]:
    sockets = Sockets(write_timeout=5, ping_interval=None, ping_timeout=None, max_size=1009)
    transport = FakeTransport()
    socket = sockets.adopt(transport, sockets.parser(None))
    messages: list[str | bytes] = []
    socket.listen(messages.append)
    return socket, transport, messages


async def test_a_small_read_of_acks_is_taken_at_once_and_reading_goes_on() -> None:
    """Acks need no answer: taken inside the read, and the socket keeps reading."""
    socket, transport, messages = listened()
    socket.data_received(frame(TEXT, b'{"type":"ack"}', mask=b"abcd") * 3)
    assert messages == ['{"type":"ack"}'] * 3
    assert transport.reading and transport.written == []


async def test_a_read_that_needs_an_answer_waits_a_turn_before_the_next_read() -> None:
    """A ping is answered, and the socket reads again only a turn of the loop later."""
    socket, transport, messages = listened()
    socket.data_received(frame(TEXT, b"one", mask=b"abcd") + frame(PING, b"p"))
    assert messages == ["one"] and transport.written == [b"\x8a\x01p"]
    assert not transport.reading
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert transport.reading


async def test_held_messages_past_the_limit_pause_reading_until_released() -> None:
    """While the listener holds (a refresh under way), a few messages wait, then reading
    pauses; released, they come in order and reading resumes."""
    socket, transport, messages = listened()
    socket.hold()
    for i in range(20):
        socket.data_received(frame(TEXT, b"%d" % i, mask=b"abcd"))
        if not transport.reading:
            break
    assert messages == [] and not transport.reading
    socket.release()
    await asyncio.sleep(0)
    assert messages == [str(i) for i in range(16)] and transport.reading
