"""``python -m service send`` and ``listen`` against the real Kafka, gateway and auth stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from dev.auth_server import AuthStandIn
from tests.support.gateway import ROOT

from .clients import message, produce, receive, silent, wait_connections
from .conftest import GatewayFactory
from .gateway import Gateway


async def run_tool(*args: str, env: Mapping[str, str] = {}, timeout: float = 90) -> Any:
    """Run ``python -m service <args>`` to its end: (status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out.decode(), err.decode()


class Listening:
    """A ``listen`` process whose stdout and stderr lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.create_task(self._collect(process.stdout, self.out)),
            asyncio.create_task(self._collect(process.stderr, self.err)),
        ]

    @staticmethod
    async def _collect(stream: asyncio.StreamReader, lines: list[str]) -> None:
        async for line in stream:
            lines.append(line.decode())

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out]

    async def wait_stderr(self, text: str, timeout: float = 60, times: int = 1) -> None:
        """Wait until ``times`` stderr lines contain ``text``."""
        async with asyncio.timeout(timeout):
            while sum(text in line for line in self.err) < times:
                await asyncio.sleep(0.05)

    async def wait_frames(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.out) < count:
                await asyncio.sleep(0.05)
        return self.frames()

    async def exit_status(self, timeout: float = 60) -> int:
        status = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.gather(*self._readers)
        return status


@contextlib.asynccontextmanager
async def listening(*args: str) -> AsyncIterator[Listening]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "listen",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Listening(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
def kafka_env(kafka_bootstrap: str, topics: tuple[str, str]) -> dict[str, str]:
    """The producer's environment; AUTH_MODE=jwt without a key would stop a gateway, not it."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC": topics[0],
        "AUTH_MODE": "jwt",
    }


async def test_send_one_notification_reaches_the_connected_user(
    gateway: Gateway, auth_server: AuthStandIn, kafka_env: dict[str, str]
) -> None:
    """``send`` with flags produces one notification the user's socket receives as a frame."""
    async with connect(gateway.ws_url(auth_server.issue("cli-user"))) as ws:
        status, out, err = await run_tool(
            "send",
            "--user-id",
            "cli-user",
            "--subject",
            "Новый фильм",
            "--content",
            "доступен",
            env=kafka_env,
        )
        assert status == 0, err
        assert await receive(ws, 1) == [{"title": "Новый фильм", "body": "доступен"}]
    [line] = [json.loads(text) for text in out.splitlines()]
    assert line["user_id"] == "cli-user" and line["topic"] == kafka_env["KAFKA_TOPIC"]
    assert "sent 1, refused 0" in err


async def test_send_file_sends_good_lines_and_names_the_bad_ones(
    gateway: Gateway, auth_server: AuthStandIn, kafka_env: dict[str, str], tmp_path: Path
) -> None:
    """Good lines of a file arrive in order; each bad line is named with its field; status 65."""
    lines = [
        json.dumps({"user_id": "filer", "subject": "one", "content": "1"}),
        json.dumps({**message("filer"), "user_id": " filer"}),
        "",
        "{not json",
        json.dumps({"user_id": "filer", "subject": 7, "content": "x"}),
        json.dumps(message("filer", subject="two", content="2")),
    ]
    path = tmp_path / "notifications.jsonl"
    path.write_text("\n".join(lines) + "\n")
    async with connect(gateway.ws_url(auth_server.issue("filer"))) as ws:
        status, out, err = await run_tool("send", "--file", str(path), env=kafka_env)
        assert status == 65, err
        frames = await receive(ws, 2)
        assert [frame["title"] for frame in frames] == ["one", "two"]
        assert await silent(ws, 1.0), "nothing refused reaches the user"
    assert len(out.splitlines()) == 2
    assert f"{path}:2: refused: user_id: leading or trailing whitespace" in err
    assert f"{path}:4: refused: not JSON" in err
    assert f"{path}:5: refused: subject: expected a string, got int" in err
    assert "sent 2, refused 3" in err


async def test_send_from_stdin_with_kafka_down_exits_69(tmp_path: Path) -> None:
    """With Kafka unreachable, ``send`` says so and exits 69 instead of hanging."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "send",
        "--file",
        "-",
        "--timeout",
        "5",
        cwd=ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    line = json.dumps(message("nobody")).encode() + b"\n"
    _, err = await asyncio.wait_for(process.communicate(line), 90)
    assert process.returncode == 69
    assert b"cannot reach Kafka at 127.0.0.1:1" in err


async def test_listen_prints_frames_produced_meanwhile(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """``listen --count 2`` prints two notifications as JSON lines and exits 0; no token shown."""
    token = auth_server.issue("watcher")
    async with listening("--token", token, "--url", gateway.ws_url(), "--count", "2") as listen:
        await wait_connections(gateway.base, 1, timeout=30)
        await produce(producer, topics[0], message("watcher", "a", "1"), message("other", "x"))
        await produce(producer, topics[0], message("watcher", "b", "2"))
        assert await listen.exit_status() == 0
    frames = listen.frames()
    assert [(f["type"], f["title"], f["body"]) for f in frames] == [
        ("notification", "a", "1"),
        ("notification", "b", "2"),
    ]
    assert any("protocol v2" in line for line in listen.err), "the gateway selects notify.v2"
    assert token not in "".join(listen.out + listen.err)


async def test_listen_reconnects_after_the_gateway_restarts(
    gateway: Gateway, auth_server: AuthStandIn, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """A restart closes with 1001; the listener reconnects and prints what came meanwhile."""
    token = auth_server.issue("steady")
    args = ("--token", token, "--url", gateway.ws_url(), "--count", "2", "--max-backoff", "2")
    async with listening(*args) as listen:
        await wait_connections(gateway.base, 1, timeout=30)
        await produce(producer, topics[0], message("steady", "before"))
        await listen.wait_frames(1)
        await asyncio.to_thread(gateway.stop)
        await listen.wait_stderr("closed 1001")
        await produce(producer, topics[0], message("steady", "during"))
        await asyncio.to_thread(gateway.start)
        assert await listen.exit_status(90) == 0
    assert [frame["title"] for frame in listen.frames()] == ["before", "during"]
    assert sum("connected to" in line for line in listen.err) == 2


async def test_listen_stops_on_4401_without_a_way_to_a_new_token(gateway: Gateway) -> None:
    """A refused token ends ``listen`` with status 3 and a message, without retrying."""
    token = "not-a-valid-token"
    async with listening("--token", token, "--url", gateway.ws_url(), "--timeout", "60") as listen:
        assert await listen.exit_status() == 3
    err = "".join(listen.err)
    assert "closed 4401" in err and "give a new one" in err
    assert token not in err
    assert listen.out == []


async def test_listen_gets_a_new_token_after_4401_with_a_token_command(
    gateway: Gateway, topics: tuple[str, str], producer: AIOKafkaProducer
) -> None:
    """With --token-command, a token about to expire is refreshed in band (the gateway speaks
    v2): no 4401, and the listener goes on receiving past the first token's exp."""
    command = shlex.join(
        [
            sys.executable,
            "-c",
            "from dev.auth_server import issue_token; print(issue_token('renewer', ttl=10))",
        ]
    )
    async with listening(
        "--token-command", command, "--url", gateway.ws_url(), "--count", "1", "--max-backoff", "1"
    ) as listen:
        await listen.wait_frames(2, timeout=30)  # expiring, then refreshed
        await asyncio.sleep(6)  # past the first token's exp (expiring came at half its life)
        await produce(producer, topics[0], message("renewer", "after renewal"))
        assert await listen.exit_status() == 0
    frames = listen.frames()
    assert {"expiring", "refreshed"} <= {f["type"] for f in frames}
    assert frames[-1]["title"] == "after renewal"
    assert "closed 4401" not in "".join(listen.err)


async def test_listen_stops_on_4403(
    gateway_factory: GatewayFactory, auth_server: AuthStandIn
) -> None:
    """An Origin the gateway does not allow ends ``listen`` with status 4: retrying cannot help."""
    gateway = gateway_factory(ALLOWED_ORIGINS="https://cinema.example")
    args = ("--token", auth_server.issue("v"), "--url", gateway.ws_url(), "--timeout", "60")
    async with listening(*args, "--origin", "https://evil.example") as listen:
        assert await listen.exit_status() == 4
    assert any("closed 4403" in line and "not reconnecting" in line for line in listen.err)
    assert sum("connected to" in line for line in listen.err) == 1


class V2StandIn:
    """A WebSocket server speaking ``notify.v2`` as docs/protocol.md specifies it.

    The gateway speaks v1 until the v2 server lands; this stand-in checks the listener's
    side of v2 meanwhile. First connection: a gap, two notifications, a duplicate and an
    ``expiring``; once both ids are acknowledged and a refresh came, it closes with 1013.
    Second connection: one more notification.
    """

    def __init__(self) -> None:
        self.ids = [str(uuid.uuid4()) for _ in range(3)]
        self.requests: list[tuple[str, str | None]] = []
        self.received: list[list[dict[str, Any]]] = []

    def notification(self, index: int) -> str:
        return json.dumps(
            {
                "type": "notification",
                "id": self.ids[index],
                "title": f"n{index}",
                "body": "b",
                "created_at": "2026-12-02T10:15:30.123Z",
            }
        )

    def acked(self, connection: int) -> set[str]:
        return {i for f in self.received[connection] if f["type"] == "ack" for i in f["ids"]}

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.requests.append((ws.request.path, ws.request.headers.get("Authorization")))
        received: list[dict[str, Any]] = []
        self.received.append(received)
        if len(self.received) == 1:
            await ws.send('{"type": "gap", "dropped": 2}')
            for index in (0, 1, 0):
                await ws.send(self.notification(index))
            await ws.send('{"type": "expiring", "in_s": 30}')
            async with asyncio.timeout(30):
                async for frame in ws:
                    received.append(json.loads(frame))
                    refreshed = any(f["type"] == "refresh" for f in received)
                    if refreshed and self.acked(0) >= set(self.ids[:2]):
                        break
            await ws.close(1013, "try again")
        else:
            await ws.send(self.notification(2))
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(30):
                    async for frame in ws:
                        received.append(json.loads(frame))


async def test_listen_speaks_v2_acks_refreshes_and_resumes(tmp_path: Path) -> None:
    """On v2: acks batched, duplicate dropped, gap shown, token refreshed, acks resumed."""
    stand_in = V2StandIn()
    counter = tmp_path / "issued"
    command = shlex.join(
        [
            sys.executable,
            "-c",
            "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
            "n = int(p.read_text() or 0) + 1 if p.exists() else 1; "
            "p.write_text(str(n)); print(f'token-{n}')",
            str(counter),
        ]
    )
    async with serve(
        stand_in.handler, "127.0.0.1", 0, subprotocols=[Subprotocol("notify.v2")]
    ) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/api/v1/notify/ws"
        args = ("--token-command", command, "--url", url, "--count", "3", "--max-backoff", "1")
        async with listening(*args) as listen:
            assert await listen.exit_status() == 0
    frames = listen.frames()
    assert [f.get("title", f["type"]) for f in frames] == ["gap", "n0", "n1", "expiring", "n2"]
    err = "".join(listen.err)
    assert "protocol v2" in err and "duplicate" in err and "dropped 2" in err
    assert {"type": "refresh", "token": "token-2"} in stand_in.received[0]
    first, second = stand_in.requests
    assert first == ("/api/v1/notify/ws", "Bearer token-1")
    assert second[1] == "Bearer token-2", "the refreshed token is used on the next connection"
    resumed = parse_qs(urlsplit(second[0]).query)["acked"][0].split(",")
    assert set(resumed) == set(stand_in.ids[:2])
    assert stand_in.acked(1) == {stand_in.ids[2]}, "acknowledged before the listener closed"
    assert "token-" not in err


async def test_listen_timeout_and_wrong_path_statuses(
    gateway: Gateway, auth_server: AuthStandIn
) -> None:
    """--timeout alone ends with 0, short of --count with 1; a path that is no endpoint, 5."""
    token = auth_server.issue("quiet")
    url = gateway.ws_url()
    async with listening("--token", token, "--url", url, "--timeout", "2") as listen:
        assert await listen.exit_status() == 0
    async with listening(
        "--token", token, "--url", url, "--timeout", "2", "--count", "1"
    ) as listen:
        assert await listen.exit_status() == 1
    assert any("timeout: 0 of 1 notifications" in line for line in listen.err)
    wrong = url.replace("/notify/ws", "/notify/nothing")
    async with listening("--token", token, "--url", wrong, "--timeout", "60") as listen:
        assert await listen.exit_status() == 5
    assert any("answered HTTP 404" in line for line in listen.err)
