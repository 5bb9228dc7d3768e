"""``python -m tests.integration.failing_gateway``: the gateway with a fault planted, for tests.

A batch holding a notification titled ``FAULT_TITLE`` makes the router raise
``RuntimeError``: a stand-in for a bug on the delivery path, which kills the
Kafka consumer task. Nothing of this is in the ``service`` package, so no
setting of a deployed gateway can reach it.

The patch is made when the module is imported, so Sanic's worker processes,
which are spawned and import the parent's main module, carry it too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from service.__main__ import main
from service.notification import Notification
from service.router import Router, Settlement

FAULT_TITLE = "planted-fault"

_dispatch = Router.dispatch


async def _dispatch_or_fail(self: Router, notifications: Sequence[Notification]) -> Settlement:
    if any(n.title == FAULT_TITLE for n in notifications):
        raise RuntimeError("planted fault on the delivery path")
    return await _dispatch(self, notifications)


Router.dispatch = _dispatch_or_fail  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
