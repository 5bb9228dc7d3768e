"""``make demo``: the platform's scenario on a machine without Docker, start to finish.

Starts local Kafka and PostgreSQL (unless already running), migrates, starts the
development auth stand-in and the gateway, logs a client in, connects it,
produces the seed's message with Kafka's own console producer, prints what the
client received, and stops everything it started. The gateway serves the live page
(``DEMO_PAGE=true``) meanwhile, and its address is printed.

``make demo-web`` (``--web``): the same services, then the live page's address with a
token for the seed's user; the seed's message is produced so that the page has one to
show, and everything keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dev.auth_server import AuthStandIn  # noqa: E402

SEED = (
    '{"message_id": "123e4567-e89b-12d3-a456-426614174000","delivery_method": "push",'
    '"user_id": "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce","subject":"Новый фильм", '
    '"content": "Фильм \'Как закалялась сталь\' теперь доступен для просмотра"}'
)
USER = "b1fe6a68-f7b5-4c2c-a52b-97494403d2ce"
PORT = int(os.environ.get("NOTIFY_PORT", "8001"))
KAFKA = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"
DATABASE_URL = f"postgresql://notify:notify@127.0.0.1:{os.environ.get('PG_PORT', '5432')}/notify"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def running(script: str) -> bool:
    return subprocess.run([script, "status"], cwd=ROOT, capture_output=True).returncode == 0


async def scenario(auth: AuthStandIn) -> str:
    step("the client logs in to the auth service and gets an access token")
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://127.0.0.1:{auth.port}/api/v1/auth/login", json={"user_id": USER}
        )
        token = answer.json()["access_token"]
    step(f"the client connects: ws://127.0.0.1:{PORT}/api/v1/notify/ws?token=$token")
    async with connect(f"ws://127.0.0.1:{PORT}/api/v1/notify/ws?token={token}") as ws:
        await asyncio.sleep(0.5)
        step("a backend produces the seed's line into notification.send (console producer)")
        await asyncio.to_thread(
            subprocess.run,
            ["scripts/kafka.sh", "produce", "notification.send"],
            input=SEED + "\n",
            text=True,
            cwd=ROOT,
            check=True,
        )
        frame = await asyncio.wait_for(ws.recv(), 30)
    return str(frame)


def page_url(auth: AuthStandIn) -> str:
    """The live page with a fresh token for the seed's user, in the fragment: browsers
    never send a fragment to the server, so the token reaches no access log."""
    answer = httpx.post(f"http://127.0.0.1:{auth.port}/api/v1/auth/login", json={"user_id": USER})
    return f"http://127.0.0.1:{PORT}/demo/#token={answer.json()['access_token']}"


def serve_page(auth: AuthStandIn, gateway: subprocess.Popen[bytes]) -> int:
    """``--web``: print the page's address, produce the seed, run until Ctrl-C."""
    step(f"the live page (open it in a browser): {page_url(auth)}")
    step("a backend produces the seed's line into notification.send (console producer)")
    subprocess.run(
        ["scripts/kafka.sh", "produce", "notification.send"],
        input=SEED + "\n",
        text=True,
        cwd=ROOT,
        check=True,
    )
    step(
        "more: scripts/kafka.sh produce notification.send, one JSON line per notification "
        f'(user_id "{USER}"); Ctrl-C stops everything'
    )
    try:
        while gateway.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    print("the gateway exited", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--web", action="store_true", help="serve the live page until Ctrl-C (make demo-web)"
    )
    args = parser.parse_args()
    started: list[str] = []
    for script in ("scripts/postgres.sh", "scripts/kafka.sh"):
        if not running(script):
            step(f"starting {script.split('/')[1].removesuffix('.sh')}")
            subprocess.run([script, "start"], cwd=ROOT, check=True)
            started.append(script)
    env = {**os.environ, "DATABASE_URL": DATABASE_URL, "KAFKA_BOOTSTRAP_SERVERS": KAFKA}
    step("migrating: alembic upgrade head")
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True
    )
    auth = AuthStandIn().start()
    step(f"development auth stand-in on 127.0.0.1:{auth.port} (not the platform's auth service)")
    env.update(
        NOTIFY_HOST="127.0.0.1",
        NOTIFY_PORT=str(PORT),
        AUTH_VERIFY_URL=auth.verify_url,
        LOG_LEVEL="WARNING",
        DEMO_PAGE="true",
    )
    step(f"starting the gateway on 127.0.0.1:{PORT}")
    gateway = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if gateway.poll() is not None or time.monotonic() > deadline:
                print("the gateway did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.3)
        if args.web:
            return serve_page(auth, gateway)
        step(f"the live page, while the demo runs: {page_url(auth)}")
        frame = asyncio.run(scenario(auth))
        step("the client received:")
        print(json.dumps(json.loads(frame), ensure_ascii=False, indent=2), flush=True)
        return 0
    finally:
        step("stopping what the demo started")
        gateway.terminate()
        gateway.wait(30)
        auth.stop()
        for script in reversed(started):
            subprocess.run([script, "stop"], cwd=ROOT, check=False)


if __name__ == "__main__":
    sys.exit(main())
