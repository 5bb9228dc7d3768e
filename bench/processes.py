"""The processes a run starts: any child with its log and CPU, and the gateway.

Every child is registered on start, so the run can stop all of them at the end,
whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import ClassVar

import httpx
import psutil

from bench.results import Census, GcPauses

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
HOST = "127.0.0.1"
WS_PATH = "/api/v1/notify/ws"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def url_port(url: str, default: int) -> int:
    """The port of a ``scheme://user@host:port/...`` URL (``default`` when it has none)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    _, sep, port = rest.rpartition(":")
    try:
        return int(port) if sep and port else default
    except ValueError:
        return default


class Child:
    """A child process with its log, CPU and RSS readings; always stopped at the end."""

    registry: ClassVar[list[Child]] = []

    def __init__(
        self, name: str, argv: list[str], logs: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.log_path = logs / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.ps: psutil.Process | None = None
        self._cpu_at_exit = 0.0

    async def start(self, pipes: bool = False) -> Child:
        """Start it; with ``pipes`` its stdin and stdout are pipes to this process."""
        logfile = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else logfile,
            stderr=logfile,
            limit=64 * 1024 * 1024,
        )
        logfile.close()
        self.ps = psutil.Process(self.proc.pid)
        Child.registry.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def readline(self, timeout: float) -> bytes:
        """One line of its stdout (empty when it exited); raises TimeoutError."""
        assert self.proc is not None and self.proc.stdout is not None
        return await asyncio.wait_for(self.proc.stdout.readline(), timeout)

    def cpu(self) -> float:
        """CPU seconds (user + system) used so far."""
        if self.ps is None:
            return 0.0
        try:
            t = self.ps.cpu_times()
            self._cpu_at_exit = t.user + t.system
        except psutil.Error:
            pass
        return self._cpu_at_exit

    def rss(self) -> int:
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Signal it and wait; killed after ``timeout``. Safe to call twice."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        self.cpu()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await asyncio.wait_for(proc.wait(), 10)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Gateway(Child):
    """``python -m service`` on a free port, configured for the bench.

    With ``gc_trace`` it runs under ``bench/gcwrap.py`` (the same ``service`` package as
    ``__main__``, plus a hook that logs garbage-collector pauses). With ``tree``
    (``NOTIFY_WORKERS`` > 1: the process started is Sanic's manager and the workers are
    its children) CPU is summed over the whole process tree.
    """

    def __init__(
        self, name: str, logs: Path, env: dict[str, str], gc_trace: bool = True, tree: bool = False
    ) -> None:
        self.port = free_port()
        self.tree = tree
        self._tree_cpu: dict[int, float] = {}
        self.gc_log = logs / f"{name}-gc.log" if gc_trace else None
        env = {
            "NOTIFY_HOST": HOST,
            "NOTIFY_PORT": str(self.port),
            "LOG_LEVEL": "WARNING",
            **({"BENCH_GC_LOG": str(self.gc_log)} if self.gc_log else {}),
            **env,
        }
        module = "bench.gcwrap" if gc_trace else "service"
        super().__init__(name, [PY, "-m", module], logs, env)
        self.base = f"http://{HOST}:{self.port}"

    def cpu(self) -> float:
        """CPU seconds of the gateway; in tree mode of every process under it (one that
        exited counts with its last reading)."""
        if not self.tree or self.ps is None:
            return super().cpu()
        procs = [self.ps]
        with contextlib.suppress(psutil.Error):
            procs += self.ps.children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                self._tree_cpu[p.pid] = t.user + t.system
        return sum(self._tree_cpu.values())

    def workers(self) -> list[psutil.Process]:
        """The processes that serve the port: the gateway itself, or its Sanic workers."""
        if self.ps is None:
            return []
        if not self.tree:
            return [self.ps]

        def listens(p: psutil.Process) -> bool:
            with contextlib.suppress(psutil.Error):
                return any(
                    c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                    for c in p.net_connections("tcp")
                )
            return False

        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = self.ps.children(recursive=True)
        out = [p for p in children if listens(p)]
        if not out and listens(self.ps):
            out = [self.ps]  # NOTIFY_WORKERS=1: the process itself serves
        return sorted(out, key=lambda p: p.pid)

    def connections_per_worker(self, clients: set[str]) -> list[int]:
        """Established connections each worker holds from the client addresses."""
        counts = []
        for w in self.workers():
            try:
                counts.append(
                    sum(
                        1
                        for c in w.net_connections("tcp")
                        if c.status == psutil.CONN_ESTABLISHED
                        and c.laddr
                        and c.laddr.port == self.port
                        and c.raddr
                        and c.raddr.ip in clients
                    )
                )
            except psutil.Error:
                counts.append(-1)
        return counts

    async def census(self, timeout: float = 60.0) -> Census | None:
        """Objects the gateway's collector tracks, by type (bench/gcwrap.py, on SIGUSR2)."""
        if self.gc_log is None or not self.alive():
            return None
        asked = time.time()
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if not self.gc_log.exists():
                continue
            for line in reversed(self.gc_log.read_text().splitlines()):
                if line.startswith("objects "):
                    _, at, report = line.split(" ", 2)
                    if float(at) >= asked:
                        answer = json.loads(report)
                        return Census(total=int(answer["total"]), types=dict(answer["types"]))
                    break
        return None

    def gc_pauses(self, since: float, until: float) -> GcPauses | None:
        """Garbage-collector pauses logged between two wall-clock times."""
        if self.gc_log is None or not self.gc_log.exists():
            return None
        full, slow, full_ms, worst = 0, 0, 0.0, 0.0
        for line in self.gc_log.read_text().splitlines():
            try:
                at, generation, ms, _ = line.split()
                when, gen, pause = float(at), int(generation), float(ms)
            except ValueError:
                continue
            if not since <= when <= until:
                continue
            if gen == 2:
                full += 1
                full_ms += pause
            slow += 1
            worst = max(worst, pause)
        return GcPauses(full_collections=full, full_ms=full_ms, logged=slow, max_ms=worst)

    async def wait_http(self, http: httpx.AsyncClient, path: str, timeout: float = 60.0) -> None:
        """Until ``path`` answers 200; raises RuntimeError if it exits, TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(self.base + path, timeout=3)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name}: {path} not 200 after {timeout} s:\n{self.tail()}")

    async def metrics(self, http: httpx.AsyncClient) -> dict[str, float]:
        """The Prometheus text as ``name -> value``, labels summed away."""
        text = (await http.get(self.base + "/metrics", timeout=10)).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_part, _, value = line.rpartition(" ")
            name = name_part.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(value)
        return out


def log_events(path: Path) -> dict[str, int]:
    """How many times each warning or error event appears in a gateway's JSON log."""
    counts: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return counts
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("level") in ("warning", "error", "critical"):
            key = f"{record['level']}: {str(record.get('event', ''))[:80]}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
