"""Request heads: the HTTP side of a client connection, with a deadline on each head.

A request head must arrive within ``REQUEST_TIMEOUT`` (set to ``HANDSHAKE_TIMEOUT``)
of the connection's start, or of the previous response on a kept-alive connection,
however slowly it trickles in: Sanic's own ``REQUEST_TIMEOUT`` restarts with every
byte received, so a head sent a byte at a time would otherwise hold its connection
(and a file descriptor) for minutes (slowloris).

:class:`HeadDeadlineProtocol` is Sanic's WebSocket protocol with that deadline kept
on the timer Sanic already runs for each connection (``check_timeouts``): no
lifecycle signal, no task lookup and no timer of its own per connection. The check
that would come after the deadline is brought forward to it, so a head is cut at its
deadline, not up to half a timeout later. A cut head is answered 408 when its
request line had arrived (the endpoint's ``RequestCancelled`` handler), and the
connection is closed.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from sanic.http import Http, Stage
from sanic.server.protocols.websocket_protocol import WebSocketProtocol

# The stages in which the request head is still awaited: before its first byte
# (IDLE) and while it arrives (REQUEST).
_HEAD_STAGES = (Stage.IDLE, Stage.REQUEST)


class _HeadTimedHttp(Http):
    """Sanic's HTTP/1.1 handler, starting the head's deadline as each request begins."""

    __slots__ = ()

    def init_for_request(self) -> None:
        super().init_for_request()  # type: ignore[no-untyped-call]
        protocol = self.protocol
        assert isinstance(protocol, HeadDeadlineProtocol)
        protocol.head_due = monotonic() + protocol.request_timeout


class HeadDeadlineProtocol(WebSocketProtocol):
    """Sanic's WebSocket protocol; a request head not complete at its deadline is cut.

    The deadline (``head_due``) is set when the connection starts and again when each
    request begins (after the previous response). Only the event loop's thread calls it.
    """

    HTTP_CLASS = _HeadTimedHttp
    __slots__ = ("head_due",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_due = 0.0

    def _setup_connection(self, *args: Any, **kwargs: Any) -> None:
        # Before Sanic's first check_timeouts, which this runs.
        self.head_due = monotonic() + self.request_timeout
        super()._setup_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    def check_timeouts(self) -> None:
        http = self._http
        if self._task is None or http is None or http.stage not in _HEAD_STAGES:
            super().check_timeouts()  # type: ignore[no-untyped-call]
            return
        left = self.head_due - monotonic()
        if left <= 0:
            # Marked lost, Sanic takes the cancellation for RequestCancelled: a quiet
            # answer (408), no traceback in the log.
            if self.conn_info is not None:
                self.conn_info.lost = True
            self._task.cancel()
            return
        super().check_timeouts()  # type: ignore[no-untyped-call]
        check = self._callback_check_timeouts
        if check is not None and not check.cancelled() and check.when() > self.loop.time() + left:
            check.cancel()
            self._callback_check_timeouts = self.loop.call_later(left, self.check_timeouts)
