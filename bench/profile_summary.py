"""Summarise a py-spy ``--format raw --function`` profile: where the gateway's time goes.

Each line of the raw (collapsed) format is ``frame;frame;...;leaf count``. This gives
the top functions by self time (the leaf) and by inclusive time (anywhere on the
stack), and self time grouped by area (Sanic's websocket layer, the websockets
protocol, aiokafka, the gateway's own code, metrics, the event loop...).

    python -m bench.profile_summary bench/results/<run>-pyspy.txt
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

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


def summarize(path: Path, top: int = 20) -> dict[str, Any]:
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
        return {"samples": 0}

    def share(items: list[tuple[str, int]]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(100.0 * n / total, 1)} for f, n in items]

    return {
        "samples": total,
        "self": share(self_time.most_common(top)),
        "inclusive": share(inclusive.most_common(top)),
        "areas": share(areas.most_common()),
        "native_leaves": share(native.most_common(10)),
    }


def render(summary: dict[str, Any], top: int = 15) -> str:
    if not summary.get("samples"):
        return "profile: no samples"
    lines = [f"py-spy profile of the gateway: {summary['samples']} samples (non-idle)"]
    lines.append("self time by area:")
    lines += [f"  {a['share']:5.1f}%  {a['function']}" for a in summary["areas"]]
    lines.append("top functions, self time:")
    lines += [f"  {a['share']:5.1f}%  {a['function']}" for a in summary["self"][:top]]
    lines.append("top functions, inclusive:")
    lines += [f"  {a['share']:5.1f}%  {a['function']}" for a in summary["inclusive"][:top]]
    if summary.get("native_leaves"):
        lines.append("native leaves (C functions the samples were in):")
        lines += [f"  {a['share']:5.1f}%  {a['function']}" for a in summary["native_leaves"][:8]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarize(Path(sys.argv[1]))))
