"""A real gateway process for integration tests: ``python -m service`` with its own env."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """Starts, stops and kills one gateway process; its JSON log goes to ``log_path``.

    ``module`` is what ``python -m`` runs: ``service``, or a test's wrapper of it.
    """

    def __init__(self, env: dict[str, str], log_path: Path, module: str = "service") -> None:
        self.module = module
        self.port = free_port()
        self.env = {**os.environ, **env, "NOTIFY_HOST": "127.0.0.1", "NOTIFY_PORT": str(self.port)}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, token: str | None = None) -> str:
        url = f"ws://127.0.0.1:{self.port}/api/v1/notify/ws"
        return f"{url}?token={token}" if token is not None else url

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> Gateway:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group: with NOTIFY_WORKERS > 1, SIGKILL must reach the
            # Sanic workers too, or they outlive the test.
            start_new_session=True,
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.base}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready after {timeout} s:\n{self.logs()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send ``sig`` and wait for the exit; SIGKILL if it does not come in time."""
        process = self.process
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        if sig == signal.SIGKILL:
            return self._kill_group(process)
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            return self._kill_group(process)

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> int:
        """SIGKILL the process and everything in its group (Sanic's workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
