"""CPU accounting: CPU seconds of processes, shares of a core over a window, CPU caps.

Every figure is % of one core over wall time; ``other`` is everything else the machine
did meanwhile (other people's work, this orchestrator): how noisy the window was.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import psutil

Meter = Callable[[], float]  # CPU seconds (user + system) used so far by some part


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, not idle or iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def process_cpu(pid: int | None) -> float:
    """CPU seconds of one process (0 when there is none or it is gone)."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and of its descendants alive now."""
    if pid is None:
        return 0.0
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


def listener_pid(port: int) -> int | None:
    """The process listening on a TCP port of this machine, if it can be seen."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(conn.pid) if conn.pid else None
    return None


@dataclass
class CpuShares:
    """CPU of each part over a window, % of one core; ``workers``: each gateway worker."""

    wall_s: float
    other: float = 0.0
    loadgen: float = 0.0
    server: float = 0.0
    kafka: float = 0.0
    postgres: float = 0.0
    auth: float = 0.0
    redis: float = 0.0
    producer: float = 0.0
    workers: list[float] = field(default_factory=list)

    @property
    def load(self) -> float:
        """The load generator: client processes and producer."""
        return self.loadgen + self.producer


PARTS = tuple(f.name for f in fields(CpuShares) if f.name not in ("wall_s", "other", "workers"))


@dataclass(frozen=True)
class Meters:
    """What a window reads: one meter per part it covers (None: not in this window)."""

    loadgen: Meter
    kafka: Meter
    postgres: Meter
    server: Meter | None = None
    auth: Meter | None = None
    redis: Meter | None = None
    producer: Meter | None = None

    def read(self) -> dict[str, float]:
        """CPU seconds so far of each part present."""
        out: dict[str, float] = {}
        for name in PARTS:
            meter: Meter | None = getattr(self, name)
            if meter is not None:
                out[name] = meter()
        return out


def shares(
    before: dict[str, float],
    after: dict[str, float],
    wall: float,
    busy: float,
    extra: dict[str, float] | None = None,
) -> CpuShares:
    """Shares from two readings ``wall`` seconds apart while the machine was ``busy``
    seconds busy; ``extra`` adds parts measured in CPU seconds elsewhere (a child's own
    report). A part that went down (a process that exited) counts 0."""
    wall = max(1e-9, wall)
    parts = {k: max(0.0, 100.0 * (after[k] - before[k]) / wall) for k in before}
    for k, seconds in (extra or {}).items():
        parts[k] = 100.0 * seconds / wall
    out = CpuShares(wall_s=wall, other=max(0.0, 100.0 * busy / wall - sum(parts.values())))
    for name, value in parts.items():
        setattr(out, name, value)
    return out


class CpuWindow:
    """CPU of the parts of ``meters`` from now until :meth:`close`."""

    def __init__(self, meters: Meters) -> None:
        self.meters = meters
        self.start = meters.read()
        self.busy0 = machine_busy()
        self.t0 = time.monotonic()

    def close(self, extra: dict[str, float] | None = None) -> CpuShares:
        wall = time.monotonic() - self.t0
        return shares(self.start, self.meters.read(), wall, machine_busy() - self.busy0, extra)


class CpuQuota:
    """Caps one process at a share of a core: a cgroup of its own (v1 ``cpu``, or v2).

    Needs root and a writable cgroup file system; :meth:`unavailable` says why not.
    ``remove()`` deletes the group once its process has exited.
    """

    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")
    PERIOD_US = 20_000

    def __init__(self, name: str, cores: float, pid: int) -> None:
        if (self.V1 / "cpu.cfs_quota_us").exists():
            self.path = self.V1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(cores * self.PERIOD_US)))
        else:
            with contextlib.suppress(OSError):
                (self.V2 / "cgroup.subtree_control").write_text("+cpu")
            self.path = self.V2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{int(cores * self.PERIOD_US)} {self.PERIOD_US}")
        (self.path / "cgroup.procs").write_text(str(pid))

    @classmethod
    def unavailable(cls) -> str | None:
        """Why processes cannot be capped here, or None if they can."""
        if os.geteuid() != 0:
            return "capping CPU needs root (cgroups)"
        if (cls.V1 / "cpu.cfs_quota_us").exists() and os.access(cls.V1, os.W_OK):
            return None
        controllers = cls.V2 / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return None
        return "no writable cgroup cpu controller"

    def throttling(self) -> tuple[int, int]:
        """(CFS periods so far, periods in which the cap stopped the process)."""
        values = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                values[key] = int(value)
        return values.get("nr_periods", 0), values.get("nr_throttled", 0)

    def remove(self) -> bool:
        """Delete the group (waits up to 5 s for its process to exit); False if it could not."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                time.sleep(0.1)  # the process is still exiting
        return False


def throttled_shares(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """Per capped process: the share of CFS periods in a pass in which its cap stopped it."""
    return [
        (t1 - t0) / (p1 - p0) if p1 > p0 else 0.0
        for (p0, t0), (p1, t1) in zip(before, after, strict=True)
    ]
