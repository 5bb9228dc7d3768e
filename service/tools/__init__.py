"""Command-line tools beside the gateway: ``send`` produces notifications, ``listen`` prints them.

``python -m service send ...`` and ``python -m service listen ...`` land in :func:`main`;
each tool's module documents its options and exit status (README, "Testing the
pipeline by hand").
"""

from __future__ import annotations

import argparse
import os
from typing import Final

from . import listener, sender

TOOLS: Final = ("send", "listen")


def main(argv: list[str]) -> int:
    """Run the tool ``argv[0]`` (one of :data:`TOOLS`) with the rest; returns its exit status.

    Usage errors exit through argparse with status 2.
    """
    name, rest = argv[0], argv[1:]
    module = sender if name == "send" else listener
    doc = module.__doc__ or ""
    parser = argparse.ArgumentParser(
        prog=f"python -m service {name}",
        description=doc.split("\n\n", 1)[0],
        epilog=doc[doc.index("Exit status") :] if "Exit status" in doc else None,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    module.check_arguments(parser, args)
    status: int = module.run(args, dict(os.environ))
    return status
