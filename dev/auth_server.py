"""A stand-in for the platform's auth service, for development, tests and the demo only.

NOT the platform's auth service and never shipped in the image. It speaks the
common FastAPI shape the gateway's defaults expect:

* ``POST /api/v1/auth/login`` with ``{"user_id": "..."}`` -> ``{"access_token": "<jwt>"}``
* ``GET /api/v1/users/me`` with ``Authorization: Bearer <jwt>`` -> ``200 {"id": "..."}``,
  ``401`` for a bad or expired token.

Tests can make it fail (a status for every answer), slow (a delay) or count its
requests. Run alone: ``python dev/auth_server.py --port 8000``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

DEV_SECRET = "dev-only-secret-not-for-production"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # reconnect storms: many checks arrive at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a client that gave up (timeout tests) is not an error here


class AuthStandIn:
    """A real HTTP auth server on loopback, in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fail_status: int | None = None
        self.delay = 0.0
        self.requests = 0
        self.user_field = "id"
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: the request line may hold a token

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with stand_in._lock:
                    stand_in.requests += 1
                if stand_in.delay:
                    time.sleep(stand_in.delay)
                if stand_in.fail_status is not None:
                    self._answer(stand_in.fail_status, {"detail": "failing on purpose"})
                    return
                if self.path.split("?")[0] != "/api/v1/users/me":
                    self._answer(404, {"detail": "not found"})
                    return
                header = self.headers.get("Authorization", "")
                token = header[7:] if header.lower().startswith("bearer ") else ""
                try:
                    claims = jwt.decode(token, DEV_SECRET, algorithms=["HS256"])
                except jwt.InvalidTokenError:
                    self._answer(401, {"detail": "Could not validate credentials"})
                    return
                self._answer(200, {stand_in.user_field: claims["sub"], "email": "dev@example.com"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/api/v1/auth/login" or "user_id" not in body:
                    self._answer(400, {"detail": "POST /api/v1/auth/login {user_id}"})
                    return
                self._answer(200, {"access_token": issue_token(str(body["user_id"]))})

        self._server = _QuietServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def verify_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/users/me"

    def issue(self, user_id: str, ttl: float = 3600) -> str:
        return issue_token(user_id, ttl)

    def start(self) -> AuthStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def issue_token(user_id: str, ttl: float = 3600, *, secret: str = DEV_SECRET) -> str:
    """An HS256 access token for ``user_id`` that expires in ``ttl`` seconds."""
    now = int(time.time())
    claims = {"sub": user_id, "type": "access", "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = AuthStandIn(args.host, args.port)
    print(f"dev auth stand-in on http://{args.host}:{server.port} (not for production)", flush=True)
    server._server.serve_forever()


if __name__ == "__main__":
    main()
