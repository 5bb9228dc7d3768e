"""``python -m service [serve]``: run the gateway, configured from the environment.

``python -m service send ...`` and ``python -m service listen ...`` run the tools of
:mod:`service.tools` instead (each has its own ``--help`` and exit status).

Exit status (README, "Exit status"): 0 after a clean stop (SIGTERM, SIGINT);
2 for a configuration error; 70 when a background task (the Kafka consumer, the
Redis subscriber, a periodic loop) died and stopped the process, with
``--workers`` too: one worker's failure stops every worker and the main process
exits 70; 1 when the gateway could not start (a traceback says why).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from typing import Any

from .config import ConfigError, Settings

EXIT_OK = 0
EXIT_CONFIG = 2
# sysexits.h's EX_SOFTWARE: an internal error the process cannot recover from.
EXIT_TASK_DIED = 70

# Connections the kernel holds before the gateway accepts them (capped by
# net.core.somaxconn). Sanic's default, 100, overflows in a burst of handshakes:
# then the SYN of any client, good or bad, is dropped and retried after 1 s, 3 s...
LISTEN_BACKLOG = 4096


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("send", "listen"):
        from .tools import main as tool

        return tool(argv)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m service [serve]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (more than 1 needs REDIS_URL)"
    )
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.workers is not None:
        env["NOTIFY_WORKERS"] = str(args.workers)
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        print(f"notify-ws: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    failed = _serve_one(settings) if settings.workers == 1 else _serve_workers(settings, env)
    return EXIT_TASK_DIED if failed else EXIT_OK

    if settings.workers == 1:
        from . import logs
        from .app import create_app

        logs.configure(settings.log_level)
        create_app(settings).run(
            host=settings.host,
            port=settings.port,
            single_process=True,
            backlog=LISTEN_BACKLOG,
            access_log=False,
            motd=False,
        )
    else:
        _serve_workers(settings, env)
    return 0


def _serve_one(settings: Settings) -> bool:
    """The gateway in this process; whether it stopped because a background task died."""
    from . import logs
    from .app import create_app

    logs.configure(settings.log_level)
    app = create_app(settings)
    app.run(
        host=settings.host,
        port=settings.port,
        single_process=True,
        access_log=False,
        motd=False,
    )
    return app.ctx.node.failure is not None


def _serve_workers(settings: Settings, env: dict[str, str]) -> bool:
    """Several worker processes behind one port, each a whole node, routed through Redis.

    A worker whose background task dies stops the whole service rather than being
    restarted alone: the failure shows in the exit status, where an orchestrator
    counts it and backs off, instead of a loop of restarts inside one container.
    Returns whether that happened.
    """
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from . import logs
    from .app import app_from_environment

    # Workers read their settings from the environment they inherit.
    os.environ.update(env)
    logs.configure(settings.log_level)
    loader = AppLoader(factory=app_from_environment)
    app = loader.load()
    # Made before the workers start, handed to each of them; ``service.app.stop_failed`` sets it.
    failed = multiprocessing.get_context("spawn").Value("b", 0)

    @app.main_process_start
    async def share_failure_flag(app: Sanic[Any, Any]) -> None:
        app.shared_ctx.failed = failed

    app.prepare(
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        backlog=LISTEN_BACKLOG,
        access_log=False,
        motd=False,
    )
    Sanic.serve(primary=app, app_loader=loader)
    return bool(failed.value)


if __name__ == "__main__":
    sys.exit(main())
