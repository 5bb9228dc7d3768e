"""WebSocket bytes by hand: an upgrade request to bend, and a reader of what the server sends.

The reader is the websockets library's own sans-I/O protocol, so frame parsing
(lengths, masking, close payloads, fragments) is the library's, not the tests'.
"""

from __future__ import annotations

from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side, State

WS_PATH = "/api/v1/notify/ws"
SAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample nonce: any valid key will do


def upgrade_request(port: int, path: str = WS_PATH, headers: str = "") -> bytes:
    """A complete upgrade request for ``path`` on ``127.0.0.1:port``.

    ``headers`` is inserted verbatim before the blank line (each ending in CRLF),
    so a test can add, and with ``bytes.replace`` remove or bend, any part.
    """
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {SAMPLE_KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    ).encode()


class FrameReader:
    """The frames a server sends after its ``101``, fed in as raw bytes in any chunks.

    Keeps the text frames (decoded) and the code of the first close frame (1005
    when it carries none). Bytes after the close frame, or after a frame the
    library rejects as malformed, are ignored. Sends nothing: what the protocol
    would answer (pongs, the closing handshake) is dropped. Not thread-safe.
    """

    def __init__(self) -> None:
        self._protocol = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
        self.texts: list[str] = []
        self.close_code: int | None = None

    def feed(self, data: bytes) -> None:
        """Parse ``data``; every frame completed by it is accounted for."""
        self._protocol.receive_data(data)
        for frame in self._protocol.events_received():
            if not isinstance(frame, Frame):  # the handshake is over: only frames come
                continue
            if frame.opcode is Opcode.TEXT:
                self.texts.append(bytes(frame.data).decode())
            elif frame.opcode is Opcode.CLOSE and self.close_code is None:
                self.close_code = Close.parse(frame.data).code
        self._protocol.data_to_send()  # answers the server is never sent


def close_code_in(answer: bytes) -> int | None:
    """The code of the close frame after a ``101`` head in ``answer``; None if none came whole."""
    head, blank, rest = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101") or not blank:
        return None
    reader = FrameReader()
    reader.feed(rest)
    return reader.close_code
