"""``python -m service listen``: a WebSocket client for operators, printing frames as JSON lines.

Each frame the gateway sends is printed as one JSON line on stdout; everything else
(connected, closed with a code, reconnecting in N s) goes to stderr. The listener
offers protocol ``notify.v2`` and speaks v1 when the gateway does not select it. On v2
it acknowledges what it has printed (batched), drops duplicates by id, prints ``gap``
and ``expiring`` frames, and refreshes the token on ``expiring`` when it has a
``--token-command``. It reconnects after a close as the close-code table of
``docs/protocol.md`` says: :func:`step_after` decides.

The token travels in the ``Authorization`` header, never in the URL, and is never
printed: status lines name the URL without its query.

Exit status: 0 stopped as asked (``--count`` notifications printed, ``--timeout``
elapsed without ``--count``, SIGINT or SIGTERM); 1 ``--timeout`` elapsed before
``--count`` notifications arrived; 2 usage error; 3 the token was refused (4401) and no
new one could be had (no ``--token-command``, or it failed or gave the same token);
4 the gateway forbade the connection (4403) or refused a frame as too large (1009);
5 the URL answered the upgrade with an HTTP 4xx status (not a notify-ws endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import os
import random
import shlex
import signal
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

from ..closecode import CloseCode, Retry
from ..inbound import SUBPROTOCOL

EXIT_OK: Final = 0
EXIT_INCOMPLETE: Final = 1
EXIT_USAGE: Final = 2
EXIT_TOKEN: Final = 3
EXIT_FORBIDDEN: Final = 4
EXIT_NOT_ENDPOINT: Final = 5

V2: Final = SUBPROTOCOL
DEFAULT_URL: Final = "ws://127.0.0.1:8001/api/v1/notify/ws"
# 50 UUIDs make a frame of about 2 KB, well under the gateway's MAX_CLIENT_FRAME (4096).
ACK_BATCH: Final = 50
ACK_INTERVAL: Final = 0.1
# The protocol's limit for ``acked`` on the next connection.
MAX_RESUME_ACKS: Final = 100
SEEN_IDS: Final = 10_000
STABLE_AFTER: Final = 60.0
LONG_WAIT: Final = (20.0, 60.0)
MIN_REDACTED: Final = 8


class Step(enum.Enum):
    """What to do after a connection closed with a code (``docs/protocol.md``)."""

    RETRY = "reconnect with backoff"
    RETRY_SOON = "reconnect soon, with jitter"
    NEW_TOKEN = "get a new token, then reconnect"  # noqa: S105 (an action, not a token)
    WAIT_LONG = "reconnect after a longer wait"
    STOP = "stop"


def step_after(code: int | None) -> Step:
    """The close-code table: 1001 soon, 4401 new token, 4429 long wait, 4403 and 1009 stop.

    Every other code (1000, 1006 for a dropped connection, 1008, 1011, 1013, 4503, or
    none at all) reconnects with backoff: a listener wants notifications again.
    """
    close = _CLOSE_CODES.get(code) if code is not None else None
    if close is None:
        return Step.RETRY
    if close is CloseCode.GOING_AWAY:
        return Step.RETRY_SOON  # a deploy: another process serves at once
    if close is CloseCode.MESSAGE_TOO_BIG:
        return Step.STOP  # this client's own frame: reconnecting would send it again
    return _STEP_OF_RETRY[close.retry]


_CLOSE_CODES: Final = {int(close): close for close in CloseCode}
# What the gateway's advice for each close code (``CloseCode.retry``) means here.
_STEP_OF_RETRY: Final = {
    Retry.RECONNECT: Step.RETRY,
    Retry.REFRESH: Step.NEW_TOKEN,
    Retry.LATER: Step.WAIT_LONG,
    Retry.STOP: Step.STOP,
}


class Backoff:
    """Full-jitter exponential backoff: a uniform wait in ``[0, min(cap, base * 2**n))``.

    ``n`` counts the waits since the last :meth:`reset` (after a stable connection).
    Not thread-safe.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrecy)

    def next(self) -> float:
        delay = self._rng.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 62)
        return delay

    def soon(self) -> float:
        """A short jittered wait (the gateway is going away; another process serves)."""
        self.attempt = min(self.attempt + 1, 62)
        return self._rng.uniform(0, min(self.base, self.cap))

    def long(self) -> float:
        """The wait after 4429: tens of seconds, whatever the cap."""
        return self._rng.uniform(*LONG_WAIT)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(slots=True)
class Session:
    """What the listener does with the frames of its connections; no I/O.

    ``handle`` takes one text frame and returns the line to print (or None) and
    whether it was a new notification; acknowledgements collect in ``pending_acks``
    until :meth:`take_acks`. Ids seen stay known across connections, so a
    notification sent again after a reconnect is not printed twice (v2 only: v1
    frames carry no id).
    """

    v2: bool = False
    pending_acks: list[str] = field(default_factory=list)
    # Acknowledged on this connection: repeated in ``acked`` on the next, in case the
    # last acknowledgement was lost with the connection.
    recent_acks: list[str] = field(default_factory=list)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    notes: list[str] = field(default_factory=list)
    expiring: bool = False

    def opened(self, subprotocol: str | None) -> None:
        self.v2 = subprotocol == V2
        self.pending_acks.clear()
        self.expiring = False

    def handle(self, text: str) -> tuple[bytes | None, bool]:
        """The line to print for a frame and whether it was a new notification."""
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.notes.append(f"a frame that is not JSON ({len(text)} characters), ignored")
            return None, False
        line = orjson.dumps(frame) + b"\n"
        if not self.v2:
            return line, True
        if not isinstance(frame, dict):
            self.notes.append("a v2 frame that is not an object, ignored")
            return None, False
        kind = frame.get("type")
        if kind == "notification":
            ident = frame.get("id")
            if not isinstance(ident, str):
                self.notes.append("a notification without an id, printed, not acknowledged")
                return line, True
            # Acknowledged again even when a duplicate: it is with this client.
            self.pending_acks.append(ident)
            if ident in self.seen:
                self.notes.append(f"duplicate of {ident} dropped")
                return None, False
            self.seen[ident] = None
            if len(self.seen) > SEEN_IDS:
                self.seen.popitem(last=False)
            return line, True
        if kind == "gap":
            self.notes.append(
                f"gap: the gateway dropped {frame.get('dropped')} notifications "
                "(retention) before any client acknowledged them"
            )
        elif kind == "expiring":
            self.expiring = True
        elif kind == "error":
            self.notes.append(f"the gateway refused a frame: {frame.get('code')}")
        return line, False

    def take_acks(self) -> str | None:
        """The next ack frame to send (at most :data:`ACK_BATCH` ids), or None."""
        if not self.pending_acks:
            return None
        ids = self.pending_acks[:ACK_BATCH]
        del self.pending_acks[:ACK_BATCH]
        self.recent_acks = (self.recent_acks + ids)[-MAX_RESUME_ACKS:]
        return orjson.dumps({"type": "ack", "ids": ids}).decode()

    def resume_acks(self) -> list[str]:
        """Ids for ``acked`` on the next connection: unsent acks and the last ones sent."""
        ids = list(dict.fromkeys(self.recent_acks + self.pending_acks))[-MAX_RESUME_ACKS:]
        self.recent_acks = []
        self.pending_acks = []
        return ids

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


class Stop(Exception):
    """Stop listening with ``status``; ``message`` (if any) goes to stderr."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Listener:
    """Connects, prints, acknowledges and reconnects until told to stop. Not thread-safe."""

    def __init__(
        self,
        url: str,
        token: str | None,
        token_command: str | None,
        *,
        count: int | None,
        origin: str | None,
        max_backoff: float,
        out: IO[bytes],
        err: IO[str],
    ) -> None:
        self.url = url
        self.token = token
        self.token_command = token_command
        self.count = count
        self.origin = origin
        self.backoff = Backoff(cap=max_backoff)
        self.out = out
        self.err = err
        self.printed = 0
        self.reader_gone = False
        self.session = Session()
        self.stopping = asyncio.Event()
        self._shown_url = _without_query(url)

    def status(self, text: str) -> None:
        # A last guard: nothing printed here may carry the token. Status lines are built
        # without it; only a token long enough to be one is searched for, so that a short
        # test token ("t") does not mangle every line.
        if self.token and len(self.token) >= MIN_REDACTED and self.token in text:
            text = text.replace(self.token, "<token>")
        print(f"listen: {text}", file=self.err, flush=True)

    async def run(self) -> int:
        """Listen until ``--count``, a signal, or a close code that says stop."""
        if self.token is None:
            self.token = await self._fetch_token()
        resume: list[str] = []
        while not self.stopping.is_set():
            opened_at = asyncio.get_running_loop().time()
            code, reason = await self._connection(resume)
            if self.stopping.is_set() or self._done:
                return EXIT_OK
            resume = self.session.resume_acks() if self.session.v2 else []
            if asyncio.get_running_loop().time() - opened_at >= STABLE_AFTER:
                self.backoff.reset()
            step = step_after(code)
            said = _describe(code, reason)
            if step is Step.STOP:
                why = "forbidden" if code == 4403 else "a frame of this client was too large"
                raise Stop(EXIT_FORBIDDEN, f"{said}: {why}; not reconnecting")
            if step is Step.NEW_TOKEN:
                if self.token_command is None:
                    raise Stop(
                        EXIT_TOKEN,
                        f"{said}: the token was refused or expired; give a new one "
                        "(--token-command fetches one on its own)",
                    )
                old = self.token
                self.token = await self._fetch_token()
                if self.token == old:
                    raise Stop(EXIT_TOKEN, f"{said}: the token command gave the same token")
                delay = self.backoff.next()
            elif step is Step.WAIT_LONG:
                delay = self.backoff.long()
            elif step is Step.RETRY_SOON:
                delay = self.backoff.soon()
            else:
                delay = self.backoff.next()
            self.status(f"{said}; {step.value}: in {delay:.1f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
        return EXIT_OK

    @property
    def _done(self) -> bool:
        return self.count is not None and self.printed >= self.count

    async def _connection(self, resume: list[str]) -> tuple[int | None, str]:
        """One connection, from the upgrade to its close; returns the close code and reason."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.typing import Origin, Subprotocol

        url = self.url
        if resume:
            url = _with_query(url, {"acked": ",".join(resume)})
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {self.token}"},
                subprotocols=[Subprotocol(V2)],
                origin=Origin(self.origin) if self.origin else None,
                open_timeout=15,
                user_agent_header="notify-ws-listen",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if 400 <= status < 500 and status not in (408, 429):
                raise Stop(
                    EXIT_NOT_ENDPOINT,
                    f"{self._shown_url} answered HTTP {status}: not a notify-ws endpoint?",
                ) from None
            return None, f"HTTP {status}"
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return None, f"cannot connect: {type(exc).__name__}"
        self.session.opened(ws.subprotocol)
        self.status(
            f"connected to {self._shown_url} (protocol {'v2' if self.session.v2 else 'v1'})"
        )
        acks = asyncio.create_task(self._send_acks(ws), name="listen-acks")
        stop = asyncio.create_task(self.stopping.wait(), name="listen-stop")
        try:
            while not self._done:
                receive = asyncio.ensure_future(ws.recv())
                await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()  # safe in websockets: no frame is lost
                    break
                try:
                    message = receive.result()
                except ConnectionClosed:
                    break
                if isinstance(message, bytes):
                    self.status("a binary frame, ignored")
                    continue
                await self._on_frame(ws, message)
            if ws.close_code is None:
                await self._flush_acks(ws)
                await ws.close(1000, "listener done")
        finally:
            acks.cancel()
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acks
        return ws.close_code, ws.close_reason or ""

    async def _on_frame(self, ws: Any, text: str) -> None:
        line, new = self.session.handle(text)
        if line is not None:
            try:
                self.out.write(line)
                self.out.flush()
            except BrokenPipeError:
                # The reader went away (``listen | head -1``): nothing more to print to.
                self.reader_gone = True
                self.stopping.set()
                return
        if new:
            self.printed += 1
        for note in self.session.take_notes():
            self.status(note)
        if len(self.session.pending_acks) >= ACK_BATCH:
            await self._flush_acks(ws)
        if self.session.expiring:
            self.session.expiring = False
            await self._refresh(ws)

    async def _refresh(self, ws: Any) -> None:
        if self.token_command is None:
            self.status(
                "the token expires soon; without --token-command the gateway closes with 4401"
            )
            return
        try:
            token = await self._fetch_token()
        except Stop as exc:
            self.status(f"no new token: {exc.message}")
            return
        self.token = token
        with contextlib.suppress(Exception):
            await ws.send(orjson.dumps({"type": "refresh", "token": token}).decode())

    async def _send_acks(self, ws: Any) -> None:
        while True:
            await asyncio.sleep(ACK_INTERVAL)
            await self._flush_acks(ws)

    async def _flush_acks(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        while (frame := self.session.take_acks()) is not None:
            try:
                await ws.send(frame)
            except ConnectionClosed:
                return  # the ids stay in recent_acks, for ``acked`` next time

    async def _fetch_token(self) -> str:
        """Run ``--token-command``; its stdout, stripped, is the token.

        Raises:
            Stop: the command is missing, failed, or printed nothing.
        """
        assert self.token_command is not None
        try:
            process = await asyncio.create_subprocess_exec(
                *shlex.split(self.token_command), stdout=asyncio.subprocess.PIPE
            )
        except OSError as exc:
            raise Stop(EXIT_TOKEN, f"cannot run the token command: {exc.strerror}") from None
        out, _ = await process.communicate()
        token = out.decode(errors="replace").strip()
        if process.returncode != 0 or not token:
            raise Stop(
                EXIT_TOKEN, f"the token command exited with {process.returncode} and no token"
            )
        return token


def _describe(code: int | None, reason: str) -> str:
    """``closed 1001 (server shutting down)``, or the reason alone when no connection was made."""
    if code is None:
        return reason
    return f"closed {code}" + (f" ({reason})" if reason else "")


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _with_query(url: str, extra: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(extra, safe=",")) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``listen``."""
    token = parser.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the access token (visible to ps: prefer --token-command)")
    token.add_argument(
        "--token-command",
        help="a command printing a token on stdout; run at start, after 4401 and on expiring",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    parser.add_argument("--count", type=int, help="stop after N notifications")
    parser.add_argument("--timeout", type=float, help="stop after S seconds")
    parser.add_argument("--origin", help="send this Origin header, as a browser page would")
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=30.0,
        help="longest wait between reconnects, in seconds (default 30; 4429 waits 20-60 s)",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through ``parser.error`` (status 2) for values that make no sense."""
    if urlsplit(args.url).scheme not in ("ws", "wss"):
        parser.error("--url must start with ws:// or wss://")
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.timeout is not None and not args.timeout > 0:
        parser.error("--timeout must be above 0")
    if not args.max_backoff > 0:
        parser.error("--max-backoff must be above 0")
    if args.token is not None and not args.token.strip():
        parser.error("--token must not be empty")


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run ``listen`` with parsed, checked arguments; returns the exit status."""
    del env  # the listener is configured by its arguments alone
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    listener = Listener(
        args.url,
        args.token,
        args.token_command,
        count=args.count,
        origin=args.origin,
        max_backoff=args.max_backoff,
        out=sys.stdout.buffer,
        err=sys.stderr,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, listener.stopping.set)
    task = asyncio.create_task(listener.run(), name="listen")
    try:
        return await _wait(listener, task, args)
    finally:
        if listener.reader_gone:
            with contextlib.suppress(OSError):
                # A closed stdout must not fail the interpreter's final flush.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def _wait(listener: Listener, task: asyncio.Task[int], args: argparse.Namespace) -> int:
    try:
        done, _ = await asyncio.wait({task}, timeout=args.timeout)
        if not done:
            # Let the connection close cleanly, acknowledgements flushed, then stop.
            listener.stopping.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task, 10)
            if args.count is not None and listener.printed < args.count:
                listener.status(
                    f"timeout: {listener.printed} of {args.count} notifications after "
                    f"{args.timeout} s"
                )
                return EXIT_INCOMPLETE
            return EXIT_OK
        return task.result()
    except Stop as exc:
        if exc.message:
            listener.status(exc.message)
        return exc.status
