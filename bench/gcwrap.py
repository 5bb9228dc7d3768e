"""Run the gateway (``python -m service``) with its garbage-collector pauses logged.

``python -m bench.gcwrap [args of service]`` installs a ``gc.callbacks`` hook and then
runs the ``service`` package as ``__main__``, unchanged. Every collection of the
oldest generation, and any collection longer than 5 ms, is appended to the file
named by ``BENCH_GC_LOG`` as ``<epoch seconds> <generation> <ms> <collected>``,
so ``bench/run.py`` can line stalls in the latency timeline up with GC pauses.
The hook costs about a microsecond per collection.

``BENCH_GC_THRESHOLD=a,b,c`` calls ``gc.set_threshold(a, b, c)`` first: an experiment
knob (``bench/run.py --gateway-gc``) to see what collector tuning would buy, without
touching the gateway's code.

On SIGUSR2 it appends one line ``objects <epoch> <json>``: how many objects the
collector tracks, in all and by type (the 40 commonest), for objects per connection.
That walk takes a while with many connections: the bench does it outside measurements.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import time
from collections import Counter
from typing import Any

_started = [0.0]


def _install(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: SIM115 (open for the life of the process)

    def hook(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _started[0]) * 1000
        generation = info.get("generation", -1)
        if generation == 2 or ms > 5:
            out.write(f"{time.time():.3f} {generation} {ms:.2f} {info.get('collected', 0)}\n")

    gc.callbacks.append(hook)

    def census(signum: int, frame: Any) -> None:
        objects = gc.get_objects()
        kinds = Counter(type(o).__qualname__ for o in objects)
        report = {"total": len(objects), "types": dict(kinds.most_common(40))}
        del objects
        out.write(f"objects {time.time():.3f} {json.dumps(report)}\n")

    signal.signal(signal.SIGUSR2, census)


def main() -> None:
    path = os.environ.get("BENCH_GC_LOG")
    if path:
        _install(path)
    threshold = os.environ.get("BENCH_GC_THRESHOLD")
    if threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    sys.argv = ["service", *sys.argv[1:]]
    runpy.run_module("service", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
