"""The baseline: a bare Sanic WebSocket push loop, measured with the same clients.

No Kafka, no auth, no store: a dict of user -> websocket and a loop that sends
frames round-robin as fast as Sanic takes them. Same Sanic version, uvloop,
websocket settings and single process as the gateway, and the same ~150-byte
frame (``common.frame``), stamped when the loop makes it.

* ``GET /ws?user=<id>[&flush=N]``  the WebSocket; with ``flush`` it first sends N frames
* ``POST /blast?k=K``             start sending K frames round-robin, as fast as possible
* ``POST /paced?rate=R&seconds=S`` start sending R frames/s for S seconds
* ``GET /count``                  connections and frames sent so far

Run: ``python -m bench.baseline_sanic --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from sanic import Request, Sanic, Websocket
from sanic.response import HTTPResponse, json

from bench import common

app: Sanic[Any, Any] = Sanic("bench_baseline", configure_logging=False)
app.config.update(
    {
        "WEBSOCKET_MAX_SIZE": 4096,
        "WEBSOCKET_PING_INTERVAL": 20,
        "WEBSOCKET_PING_TIMEOUT": 20,
        "ACCESS_LOG": False,
        "MOTD": False,
        "KEEP_ALIVE_TIMEOUT": 5,
    }
)

users: dict[str, Websocket] = {}
state = {"sent": 0, "errors": 0, "running": 0}
tasks: set[asyncio.Task[None]] = set()
frame = common.frame
now_us = common.now_us


@app.websocket("/ws")  # type: ignore[untyped-decorator]
async def ws_route(request: Request, ws: Websocket) -> None:
    user = str(request.args.get("user", ""))
    flush = int(request.args.get("flush", 0))
    users[user] = ws
    try:
        for seq in range(flush):
            await ws.send(common.frame(common.now_us(), seq))
        while True:
            if await ws.recv() is None:
                break
    except Exception:  # the client went away
        pass
    finally:
        if users.get(user) is ws:
            del users[user]


async def blast(k: int) -> None:
    sockets = list(users.values())
    state["running"] += 1
    try:
        n = len(sockets)
        for seq in range(k):
            try:
                await sockets[seq % n].send(frame(now_us(), seq))
            except Exception:  # that client went away
                state["errors"] += 1
        state["sent"] += k
    finally:
        state["running"] -= 1


async def paced(rate: float, seconds: float) -> None:
    sockets = list(users.values())
    n = len(sockets)
    total = int(rate * seconds)
    start = time.monotonic()
    seq = 0
    state["running"] += 1
    try:
        while seq < total and time.monotonic() - start < seconds + 30:
            due = min(total, int((time.monotonic() - start) * rate))
            while seq < due:
                try:
                    await sockets[seq % n].send(frame(now_us(), seq))
                except Exception:
                    state["errors"] += 1
                seq += 1
            await asyncio.sleep(0.002)
    finally:
        state["sent"] += seq
        state["running"] -= 1


def _spawn(coro: Any) -> None:
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


@app.post("/blast")
async def start_blast(request: Request) -> HTTPResponse:
    if not users:
        return json({"error": "no connections"}, status=409)
    _spawn(blast(int(request.args.get("k", 100_000))))
    return json({"started": True, "connections": len(users)})


@app.post("/paced")
async def start_paced(request: Request) -> HTTPResponse:
    if not users:
        return json({"error": "no connections"}, status=409)
    rate = float(request.args.get("rate", 5000))
    seconds = float(request.args.get("seconds", 30))
    _spawn(paced(rate, seconds))
    return json({"started": True, "connections": len(users)})


@app.get("/count")
async def count(request: Request) -> HTTPResponse:
    return json({"connections": len(users), **state})


def main() -> None:
    parser = argparse.ArgumentParser(description="bare Sanic websocket push loop")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    common.raise_nofile()
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, motd=False)


if __name__ == "__main__":
    main()
