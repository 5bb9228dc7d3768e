"""Centrifugo as a peer: the binary (built once with ``go install``, cached under
``.cache/``), its configuration, and the running process.

The binary is ``go install github.com/centrifugal/centrifugo/v6@VERSION`` with every Go
path (GOPATH, GOCACHE, GOMODCACHE, GOBIN) under ``.cache/`` of the repository, modules
from the Go module proxy; once built it is reused and Go is not needed again.
:func:`binary` returns the path, or the reason there is none (no Go, no module proxy),
which the run prints and goes on without the peer.

A :class:`Centrifugo` listens on 127.0.0.1 only (a free port; no other listener is
enabled), checks HS256 connection tokens signed with the bench secret, and consumes one
Kafka topic in its consumer's publication-data mode: each record's value is published as
it is to the channels named in its ``centrifugo-channels`` header (one user's personal
channel, ``personal:<user id>``). ``partition_queue_max_size`` is the consumer's setting
the run varies (None: Centrifugo's default, 1000).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import httpx

from bench import common
from bench.processes import HOST, ROOT, Child, free_port, log

VERSION = "6.9.1"
MODULE = "github.com/centrifugal/centrifugo/v6"
CACHE = ROOT / ".cache" / "centrifugo"
GO_CACHE = ROOT / ".cache" / "go"
BUILD_TIMEOUT = 1200.0  # ~3.5 minutes on 2 shared cores from an empty cache
CHANNEL_HEADER = "centrifugo-channels"
NAMESPACE = common.personal_channel("").rstrip(":")


def go_binary() -> str | None:
    """Go's command: /usr/local/go/bin/go, or ``go`` on PATH; None without either."""
    for candidate in ("/usr/local/go/bin/go", shutil.which("go")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


_found: dict[str, Path | str] = {}


async def binary(version: str = VERSION) -> Path | str:
    """The Centrifugo binary of ``version`` (built now if not cached), or why there is none.

    Never raises for a missing Go or module proxy: the reason is returned instead, and
    given again to later calls of this process without trying again. The build is bounded
    by BUILD_TIMEOUT; its output goes to ``.cache/centrifugo/build.log``. Not safe to call
    concurrently.
    """
    if version not in _found:
        _found[version] = await _build(version)
    return _found[version]


async def _build(version: str) -> Path | str:
    out = CACHE / f"v{version}"
    path = out / "centrifugo"
    if path.exists() and os.access(path, os.X_OK):
        return path
    go = go_binary()
    if go is None:
        return "Go not found (/usr/local/go/bin/go or go on PATH)"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOPATH": str(GO_CACHE / "path"),
        "GOCACHE": str(GO_CACHE / "cache"),
        "GOMODCACHE": str(GO_CACHE / "mod"),
        "GOBIN": str(out),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-modcacherw",
        "CGO_ENABLED": "0",
    }
    ldflags = f"-X {MODULE}/internal/build.Version={version}"
    build_log = CACHE / "build.log"
    log(f"centrifugo: building v{version} with go install (once; cached in {out})")
    started = time.monotonic()
    with build_log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            go,
            "install",
            f"-ldflags={ldflags}",
            f"{MODULE}@v{version}",
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            code = await asyncio.wait_for(proc.wait(), BUILD_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"go install did not finish in {BUILD_TIMEOUT:.0f} s"
    tail = build_log.read_text(errors="replace").strip().splitlines()[-3:]
    if code != 0 or not path.exists():
        return f"go install failed (module proxy unreachable?): {' / '.join(tail)[:300]}"
    log(f"  built in {time.monotonic() - started:.0f} s")
    return path


def config(
    port: int, kafka: str, topic: str, group: str, partition_queue_max_size: int | None
) -> dict[str, object]:
    """Centrifugo's configuration: 127.0.0.1 only, HS256 tokens, one Kafka consumer."""
    kafka_config: dict[str, object] = {
        "brokers": kafka.split(","),
        "topics": [topic],
        "consumer_group": group,
        "publication_data_mode": {"enabled": True, "channels_header": CHANNEL_HEADER},
    }
    if partition_queue_max_size is not None:
        kafka_config["partition_queue_max_size"] = partition_queue_max_size
    return {
        "http_server": {"address": HOST, "port": port},
        "log": {"level": "warn"},
        "health": {"enabled": True},
        "usage_stats": {"disabled": True},
        "client": {"token": {"hmac_secret_key": common.BENCH_SECRET}},
        "http_api": {"key": os.urandom(16).hex()},
        "channel": {"namespaces": [{"name": NAMESPACE}]},
        "consumers": [{"name": "kafka", "enabled": True, "type": "kafka", "kafka": kafka_config}],
    }


class Centrifugo(Child):
    """One Centrifugo process on a free port of 127.0.0.1, consuming ``topic``.

    ``gomaxprocs`` None leaves GOMAXPROCS unset (Go uses every core it may).
    """

    def __init__(
        self,
        name: str,
        path: Path,
        logs: Path,
        *,
        kafka: str,
        topic: str,
        group: str,
        gomaxprocs: int | None,
        partition_queue_max_size: int | None,
    ) -> None:
        self.port = free_port()
        conf = logs / f"{name}.json"
        conf.write_text(
            json.dumps(config(self.port, kafka, topic, group, partition_queue_max_size), indent=1)
        )
        super().__init__(name, [str(path), "--config", str(conf)], logs)
        self.env.pop("GOMAXPROCS", None)
        if gomaxprocs is not None:
            self.env["GOMAXPROCS"] = str(gomaxprocs)
        self.base = f"http://{HOST}:{self.port}"

    async def wait_ready(self, http: httpx.AsyncClient, timeout: float = 60.0) -> None:
        """Until /health answers 200; raises RuntimeError if it exits, TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(self.base + "/health", timeout=3)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name}: /health not 200 after {timeout} s:\n{self.tail()}")
