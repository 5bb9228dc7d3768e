"""``python -m service``: run the gateway in one process, configured from the environment."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (only 1 is supported yet)"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
