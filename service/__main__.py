"""``python -m service``: run the gateway in one process, configured from the environment."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, Settings

# Connections the kernel holds before the gateway accepts them (capped by
# net.core.somaxconn). Sanic's default, 100, overflows in a burst of handshakes:
# then the SYN of any client, good or bad, is dropped and retried after 1 s, 3 s...
LISTEN_BACKLOG = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
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
        return 2

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


def _serve_workers(settings: Settings, env: dict[str, str]) -> None:
    """Several worker processes behind one port, each a whole node, routed through Redis."""
    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from . import logs
    from .app import app_from_environment

    # Workers read their settings from the environment they inherit.
    os.environ.update(env)
    logs.configure(settings.log_level)
    loader = AppLoader(factory=app_from_environment)
    app = loader.load()
    app.prepare(
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        backlog=LISTEN_BACKLOG,
        access_log=False,
        motd=False,
    )
    Sanic.serve(primary=app, app_loader=loader)


if __name__ == "__main__":
    sys.exit(main())
