"""Private Kafka, PostgreSQL and Redis for the reliability suite (and the proxy that cuts auth).

The scenarios restart Kafka and Redis and stop PostgreSQL, so they never touch
the shared ones on 9092 / 5432 / 6379: ``scripts/kafka.sh``, ``scripts/postgres.sh``
and ``scripts/redis.sh`` start instances of their own on other ports with their
own cache directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.gateway import ROOT
from tests.support.proxy import TcpProxy

__all__ = ["KafkaBroker", "Postgres", "RedisServer", "TcpProxy"]

SCRIPT_TIMEOUT = 240.0


def _run(command: list[str], env: dict[str, str], timeout: float = SCRIPT_TIMEOUT) -> str:
    """Run a script of the repository; raise with its output if it fails."""
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return result.stdout


class KafkaBroker:
    """A one-node Kafka of the suite's own (``scripts/kafka.sh`` with other ports and cache).

    ``start``, ``stop`` and ``restart`` block until the script returns; call them
    through ``asyncio.to_thread`` from a test. ``stop`` is idempotent.
    """

    def __init__(self, port: int, controller_port: int, cache: Path) -> None:
        self.port = port
        self.cache = cache
        self.env = {
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(controller_port),
            "KAFKA_HOME_CACHE": str(cache),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
        }

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _share_jars(self) -> None:
        """Reuse the jars the shared broker already fetched (hard links, else copies)."""
        shared = ROOT / ".cache" / "kafka"
        for marker in shared.glob("*/libs.complete"):
            version = marker.parent.name
            target = self.cache / version
            if (target / "libs.complete").exists():
                continue
            target.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target / "libs", ignore_errors=True)
            try:
                shutil.copytree(marker.parent / "libs", target / "libs", copy_function=os.link)
            except OSError:
                shutil.rmtree(target / "libs", ignore_errors=True)
                shutil.copytree(marker.parent / "libs", target / "libs")
            shutil.copy2(marker, target / "libs.complete")

    def start(self) -> None:
        self._share_jars()
        _run(["scripts/kafka.sh", "start"], self.env)

    def stop(self) -> None:
        _run(["scripts/kafka.sh", "stop"], self.env)

    def restart(self) -> None:
        _run(["scripts/kafka.sh", "restart"], self.env)


class Postgres:
    """A PostgreSQL cluster of the suite's own (``scripts/postgres.sh`` with another port).

    ``start`` also migrates to head. Blocking, like :class:`KafkaBroker`.
    """

    def __init__(self, port: int, cache: Path) -> None:
        self.port = port
        self.env = {"PG_PORT": str(port), "PG_CACHE": str(cache)}

    @property
    def dsn(self) -> str:
        return f"postgresql://notify:notify@127.0.0.1:{self.port}/notify"

    def start(self, *, migrate: bool = True) -> None:
        _run(["scripts/postgres.sh", "start"], self.env)
        if migrate:
            _run([sys.executable, "-m", "alembic", "upgrade", "head"], {"DATABASE_URL": self.dsn})

    def stop(self) -> None:
        _run(["scripts/postgres.sh", "stop"], self.env)


class RedisServer:
    """A Redis of the suite's own (``scripts/redis.sh`` with another port). Blocking."""

    def __init__(self, port: int, cache: Path) -> None:
        self.port = port
        self.env = {"REDIS_PORT": str(port), "REDIS_CACHE": str(cache)}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        _run(["scripts/redis.sh", "start"], self.env)

    def stop(self) -> None:
        _run(["scripts/redis.sh", "stop"], self.env)
