"""A real gateway process: ``python -m service`` with its own environment and log file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on right now (another process may take it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """Starts, stops and kills one gateway process; its JSON log goes to ``log_path``.

    The port is chosen once, so a restarted process listens where the first did.
    Methods block (they wait for the process or poll it over HTTP): from a
    coroutine, call them through ``asyncio.to_thread``. Not thread-safe.
    ``module`` is what ``python -m`` runs: ``service``, or a test's wrapper of it.
    """

    def __init__(self, env: Mapping[str, str], log_path: Path, module: str = "service") -> None:
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

    @property
    def alive(self) -> bool:
        """True while the process started last has not exited."""
        return self.process is not None and self.process.poll() is None

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> Gateway:
        """Start the process (again); with ``wait_ready``, return once it answers ready.

        Raises ``RuntimeError`` if it exits while starting, ``TimeoutError`` if it is
        not ready within ``timeout`` seconds (both carry the end of its log).
        """
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
        """Poll ``/health/ready`` until it answers 200; raises as :meth:`start` says."""
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
        """Send ``sig`` and wait for the exit; SIGKILL if it does not come in time.

        Returns the exit status (None if never started). Safe to call twice.
        """
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
        """SIGKILL the process group; safe to call twice."""
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Gateways:
    """The gateway processes of one test: each logs to ``logs/gateway-<n>.log``.

    ``close()`` kills every one of them (idempotent). Not thread-safe.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Gateway] = []

    def new(self, env: Mapping[str, str]) -> Gateway:
        """A gateway with ``env``, not started yet (it is killed at ``close()`` all the same)."""
        gateway = Gateway(env, self.logs / f"gateway-{len(self.started)}.log")
        self.started.append(gateway)
        return gateway

    async def start(
        self, env: Mapping[str, str], *, wait_ready: bool = True, timeout: float = 60.0
    ) -> Gateway:
        """A new gateway with ``env``, started off the event loop; raises as ``Gateway.start``."""
        gateway = self.new(env)
        await asyncio.to_thread(gateway.start, wait_ready=wait_ready, timeout=timeout)
        return gateway

    def close(self) -> None:
        """SIGKILL every gateway made here. Blocks: call it through a thread from a coroutine."""
        for gateway in self.started:
            gateway.kill()
