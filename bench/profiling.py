"""py-spy attached to a gateway process for one window, summarised on stop."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from pathlib import Path

from bench.processes import PY, log
from bench.profile_summary import Summary, summarize


class Profiler:
    """``py-spy record`` of one process until :meth:`stop`; raw stacks in the log folder."""

    def __init__(self, proc: asyncio.subprocess.Process, path: Path) -> None:
        self.proc = proc
        self.path = path

    @classmethod
    async def start(cls, logs: Path, pid: int, label: str, native: bool = True) -> Profiler | None:
        """Attach to ``pid``; None (and a log line) when py-spy is missing or cannot attach."""
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            log("  py-spy not found: pip install -r bench/requirements.txt")
            return None
        path = logs / f"pyspy-{label}.txt"
        proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            # --native cannot be non-blocking: it pauses the gateway for each sample.
            *(["--native"] if native else ["--nonblocking"]),
            "--function",
            "--format",
            "raw",
            "--output",
            str(path),
            stdout=(logs / "py-spy.log").open("ab"),
            stderr=asyncio.subprocess.STDOUT,
        )
        await asyncio.sleep(0.5)
        if proc.returncode is not None:
            log(f"  py-spy could not attach: {(logs / 'py-spy.log').read_text()[-500:]}")
            return None
        log(f"  py-spy recording the gateway (pid {pid}): {label}")
        return cls(proc, path)

    async def stop(self) -> Summary:
        """Stop recording and summarise what was recorded."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        return summarize(self.path)
