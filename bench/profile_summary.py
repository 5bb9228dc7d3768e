"""Summarise a py-spy ``--format raw --function`` profile: where the gateway's time goes.

Each line of the raw (collapsed) format is ``frame;frame;...;leaf count``. This gives
the top functions by self time (the leaf) and by inclusive time (anywhere on the
stack), and self time grouped by area (Sanic's websocket layer, the websockets
protocol, aiokafka, the gateway's own code, metrics, the event loop...).

    python -m bench.profile_summary <process-log directory>/pyspy-<window>.txt
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

AREAS = (
    ("sanic/server/websockets", "Sanic websocket layer (impl.py: send lock, send_data)"),
    ("websockets/", "websockets sans-I/O protocol (framing)"),
    ("sanic/", "Sanic server (HTTP, protocol)"),
    ("aiokafka/", "aiokafka (fetch, decode, commit)"),
    ("kafka/", "aiokafka (fetch, decode, commit)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("asyncpg/", "asyncpg (store)"),
    ("httpx/", "httpx/httpcore (auth client)"),
    ("httpcore/", "httpx/httpcore (auth client)"),
    ("service/", "gateway code (service/)"),
    ("asyncio/", "asyncio (tasks, futures, locks)"),
    ("uvloop", "uvloop"),
    ("logging/", "logging"),
)


# Frames every sample passes through: left out of the inclusive list.
ROOTS = (
    "<frozen runpy>",
    "service/__main__.py",
    "bench/gcwrap.py",
    "sanic/mixins/startup.py",
    "sanic/worker/serve.py",
    "_serve_http_1 (sanic/server/runners.py",
    # a Sanic worker of `NOTIFY_WORKERS=N` (spawned by multiprocessing)
    "multiprocessing/spawn.py",
    "multiprocessing/process.py",
    "(<string>:",
)


def area(frame: str) -> str:
    if frame.startswith("_run_server_forever (sanic/server/runners.py"):
        return "event loop (uvloop, in C, under run_forever)"
    name, _, where = frame.partition(" (")
    if where == f"{name}:1)":  # Sanic's touchup recompiles hot methods under their own name
        return "Sanic server (HTTP, protocol)"
    for needle, name in AREAS:
        if needle in frame:
            return name
    return "other"


def is_python(frame: str) -> bool:
    """A Python frame: ``name (file.py:line)``, or Sanic's recompiled ``name (name:1)``."""
    name, _, where = frame.partition(" (")
    return ".py:" in where or where == f"{name}:1)" or "<frozen " in where


def is_gc(frame: str) -> bool:
    return "gc_collect" in frame or "gcmodule" in frame


GC = "CPython cyclic garbage collector (gc_collect_main)"


@dataclass
class Share:
    function: str  # a function, an area or a native leaf
    share: float  # % of the samples


@dataclass
class Summary:
    """Shares of non-idle samples: by function (self, inclusive), area and native leaf."""

    samples: int
    self_time: list[Share] = field(default_factory=list)
    inclusive: list[Share] = field(default_factory=list)
    areas: list[Share] = field(default_factory=list)
    native_leaves: list[Share] = field(default_factory=list)
    raw: str = ""  # the py-spy file


def summarize(path: Path, top: int = 20) -> Summary:
    """Shares of samples by function and by area.

    Self time goes to the innermost *Python* frame (with ``--native`` the leaf is
    usually a C function inside it), except that a sample inside the cyclic garbage
    collector is counted as GC: without native frames those pauses show up as the
    self time of whatever Python code happened to allocate.
    """
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    native: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        total += count
        python = [f for f in frames if is_python(f)]
        if any(is_gc(f) for f in frames):
            leaf = GC
            inclusive[GC] += count
        else:
            leaf = python[-1] if python else frames[-1]
        self_time[leaf] += count
        areas[GC if leaf == GC else area(leaf)] += count
        if not is_python(frames[-1]):
            native[frames[-1]] += count
        for frame in set(python):
            if not any(root in frame for root in ROOTS):
                inclusive[frame] += count
    if total == 0:
        return Summary(samples=0, raw=str(path))

    def share(items: list[tuple[str, int]]) -> list[Share]:
        return [Share(f, round(100.0 * n / total, 1)) for f, n in items]

    return Summary(
        samples=total,
        self_time=share(self_time.most_common(top)),
        inclusive=share(inclusive.most_common(top)),
        areas=share(areas.most_common()),
        native_leaves=share(native.most_common(10)),
        raw=str(path),
    )


def render(summary: Summary, top: int = 15) -> str:
    if not summary.samples:
        return "profile: no samples"

    def lines_of(shares: list[Share]) -> list[str]:
        return [f"  {a.share:5.1f}%  {a.function}" for a in shares]

    lines = [f"py-spy profile of the gateway: {summary.samples} samples (non-idle)"]
    lines.append("self time by area:")
    lines += lines_of(summary.areas)
    lines.append("top functions, self time:")
    lines += lines_of(summary.self_time[:top])
    lines.append("top functions, inclusive:")
    lines += lines_of(summary.inclusive[:top])
    if summary.native_leaves:
        lines.append("native leaves (C functions the samples were in):")
        lines += lines_of(summary.native_leaves[:8])
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarize(Path(sys.argv[1]))))
