"""A WebSocket client that stops reading: a bare blocking socket after the handshake."""

from __future__ import annotations

import socket
import time

from .frames import WS_PATH, FrameReader, upgrade_request


class RawClient:
    """A WebSocket client on a bare blocking socket that reads only when told to.

    It completes the handshake and then leaves the socket alone, so the server's
    writes pile up in the kernel buffers (kept small with ``SO_RCVBUF``) until they
    stall: a client that stopped reading. Methods block; call them in a thread.
    """

    def __init__(self, port: int, token: str, *, receive_buffer: int = 4096) -> None:
        self.port = port
        self.token = token
        self.receive_buffer = receive_buffer
        self.sock: socket.socket | None = None
        self.reader = FrameReader()

    @property
    def frames(self) -> list[str]:
        """The text frames read so far."""
        return self.reader.texts

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame, once read."""
        return self.reader.close_code

    def handshake(self) -> None:
        """Connect and upgrade; raises ``ConnectionError`` unless the server answers ``101``.

        Reads the answer's head byte by byte, so no frame after it leaves the kernel.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(upgrade_request(self.port, f"{WS_PATH}?token={self.token}"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        self.sock = sock

    def read_all(self, timeout: float, *, enough: int | None = None) -> None:
        """Read frames until the server closes, ``enough`` text frames came, or ``timeout``.

        Keeps the text frames and the close code; closes the socket at the end.
        """
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline and (enough is None or len(self.frames) < enough):
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            self.reader.feed(chunk)
            if self.close_code is not None:
                break
        self.sock.close()
