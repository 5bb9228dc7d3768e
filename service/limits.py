"""The process's open-file limit, raised at start to what the operating system allows.

Every WebSocket is a file descriptor. Most systems start a process with a soft
``RLIMIT_NOFILE`` of 1024 and a hard limit far above it; a gateway left at 1024
refuses connections past about a thousand with ``EMFILE`` ("Too many open
files"), whatever ``MAX_CONNECTIONS`` says. Raising the soft limit up to the hard
one needs no privilege; raising the hard limit is the operator's business
(``ulimit -n``, compose ``ulimits: nofile``, systemd ``LimitNOFILE``).
"""

from __future__ import annotations

import logging
import resource
from typing import NamedTuple

log = logging.getLogger("notify.limits")

# Descriptors besides the WebSockets: the listening socket, the PostgreSQL pool,
# Kafka, Redis and auth connections, sockets still in their handshake, log files.
FD_MARGIN = 1024


class OpenFiles(NamedTuple):
    """A soft limit to run with, against what ``MAX_CONNECTIONS`` needs."""

    soft: int
    needed: int

    @property
    def enough(self) -> bool:
        return self.soft == resource.RLIM_INFINITY or self.soft >= self.needed


def plan_open_files(soft: int, hard: int, max_connections: int) -> OpenFiles:
    """The soft limit to set: the hard limit, or, if that is unlimited, what is needed.

    Never lower than ``soft``. Pure: ``raise_open_files`` applies it.
    """
    needed = max_connections + FD_MARGIN
    if soft == resource.RLIM_INFINITY:
        return OpenFiles(soft, needed)
    if hard == resource.RLIM_INFINITY:
        # An unlimited hard limit does not mean an unlimited soft one is accepted
        # (Linux caps it at fs.nr_open, macOS at OPEN_MAX): ask for what is needed.
        return OpenFiles(max(soft, needed), needed)
    return OpenFiles(max(soft, hard), needed)


def raise_open_files(max_connections: int) -> OpenFiles:
    """Raise this process's soft open-file limit; warn when it stays below the need.

    Safe to call more than once (each worker process calls it for itself). A
    refused ``setrlimit`` keeps the current limit and is part of the warning.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    plan = plan_open_files(soft, hard, max_connections)
    if plan.soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (plan.soft, hard))
        except (ValueError, OSError) as exc:
            log.warning("open_file_limit_not_raised", extra={"error": str(exc)[:200]})
            plan = OpenFiles(soft, plan.needed)
    if plan.enough:
        log.info("open_file_limit", extra={"soft": plan.soft, "hard": hard})
    else:
        log.warning(
            "open_file_limit_too_low",
            extra={
                "soft": plan.soft,
                "hard": hard,
                "needed": plan.needed,
                "max_connections": max_connections,
                "advice": "connections past the limit fail with 'Too many open files'; "
                "raise the hard limit (ulimit -n, compose ulimits: nofile, "
                "systemd LimitNOFILE) or lower MAX_CONNECTIONS",
            },
        )
    return plan
